//! The pages, rendered on the server with maud: every `(value)` in a template is HTML-escaped
//! by the macro, so a device's site or a fault's detail can never become markup. Nothing here
//! writes unescaped text (no `PreEscaped`); the chart's SVG is built the same way.
//!
//! Each list is also a fragment of its own (`alarms`, `jobs_table`, `devices_table`): the page
//! embeds it, and the live stream or the page's script fetches it again when the relay says it
//! changed, so there is one rendering of each, not a server one and a script one.

use maud::{DOCTYPE, Markup, html};
use protocol::Timestamp;
use protocol::alarm::AlarmView;
use protocol::data::{Section, Value};
use protocol::job::{JobStatus, JobView};
use protocol::meter::CounterReading;
use protocol::presence::StateView;

use super::chart;

/// The page's place in the navigation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    Emergencies,
    Jobs,
    Devices,
    Rollouts,
    Submit,
    Login,
}

impl Page {
    fn slug(self) -> &'static str {
        match self {
            Page::Emergencies => "emergencies",
            Page::Jobs => "jobs",
            Page::Devices => "devices",
            Page::Rollouts => "rollouts",
            Page::Submit => "submit",
            Page::Login => "login",
        }
    }
}

/// What every page's frame needs to know.
pub struct Frame<'a> {
    pub page: Page,
    pub title: &'a str,
    /// This session's CSRF token, for the logout form; `None` on the login page.
    pub csrf: Option<&'a str>,
    pub host: &'a str,
    /// Active alarms, for the count in the navigation.
    pub alarm_count: usize,
    pub linked: bool,
    /// Whether a password protects the dashboard (then there is a logout button).
    pub auth: bool,
}

/// The frame around every page: skip link, navigation, live status, then `body`.
pub fn layout(f: &Frame<'_>, body: Markup) -> Markup {
    let nav = [
        (Page::Emergencies, "/", "Emergencies"),
        (Page::Jobs, "/jobs", "Jobs"),
        (Page::Devices, "/devices", "Devices"),
        (Page::Rollouts, "/rollouts", "Rollouts"),
        (Page::Submit, "/submit", "Submit a job"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (f.title) " · chukei dashboard" }
                link rel="stylesheet" href="/static/dashboard.css";
                script src="/static/dashboard.js" defer {}
            }
            body data-page=(f.page.slug()) data-live="off" {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    p.brand { "chukei" span.host { " · " (f.host) } }
                    @if f.page != Page::Login {
                        nav aria-label="Main" {
                            ul {
                                @for (page, href, label) in nav {
                                    li {
                                        a href=(href) aria-current=[(page == f.page).then_some("page")] {
                                            (label)
                                            @if page == Page::Emergencies {
                                                " "
                                                span #alarm-count .count .zero[f.alarm_count == 0]
                                                    aria-label=(format!("{} active", f.alarm_count)) {
                                                    (f.alarm_count)
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                        p #live-status .status role="status" {
                            @if f.linked { "Relay connected" } @else { "Relay not connected" }
                        }
                        @if let (true, Some(csrf)) = (f.auth, f.csrf) {
                            form.logout method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(csrf);
                                button type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main #main tabindex="-1" {
                    h1 { (f.title) }
                    (body)
                }
            }
        }
    }
}

/// `<time>` in UTC to the second (the dashboard serves desks in several time zones; the column
/// headers say "UTC" once rather than every cell).
pub fn time(at: &Timestamp) -> Markup {
    html! {
        time datetime=(at.to_rfc3339()) title=(format!("{} UTC", at.format("%Y-%m-%d %H:%M:%S"))) {
            (at.format("%Y-%m-%d %H:%M:%S"))
        }
    }
}

fn opt_time(at: &Option<Timestamp>) -> Markup {
    match at {
        Some(at) => time(at),
        None => html! { span.none { "—" } },
    }
}

/// A message after a form: what happened, in words, announced to screen readers.
pub fn notice(ok: bool, text: &str) -> Markup {
    html! {
        p.notice .ok[ok] .error[!ok] role=(if ok { "status" } else { "alert" }) { (text) }
    }
}

/// The Emergencies page: the live list inside an `aria-live` region, and a hidden announcer the
/// script fills with one sentence per new alarm.
pub fn emergencies(alarms_fragment: Markup) -> Markup {
    html! {
        p.lead {
            "Active alarms from every device, the most urgent first: device faults before overdue "
            "check-ins, unacknowledged before acknowledged. The list updates by itself."
        }
        div #alarms aria-live="polite" aria-relevant="additions removals" { (alarms_fragment) }
        p #announce .sr-only aria-live="assertive" {}
    }
}

/// The alarm list alone (the live stream sends it on every change).
pub fn alarms(alarms: &[AlarmView], csrf: &str) -> Markup {
    html! {
        div.fragment data-count=(alarms.len()) {
            @if alarms.is_empty() {
                p.empty { "No active emergencies." }
            } @else {
                div.table-wrap {
                    table.alarms {
                        caption.sr-only { "Active alarms" }
                        thead { tr {
                            th scope="col" { "Alarm" }
                            th scope="col" { "Device" }
                            th scope="col" { "Code" }
                            th scope="col" { "Detail" }
                            th scope="col" { "Status" }
                            th scope="col" { "Raised (UTC)" }
                            th scope="col" { "Acknowledged" }
                        } }
                        tbody {
                            @for a in alarms {
                                tr #(format!("alarm-{}", a.id)) .alarm .(a.kind.as_str())
                                    data-alarm-id=(a.id) data-alarm-code=(a.code) data-serial=(a.serial)
                                    data-site=(a.site) {
                                    th scope="row" { (a.id) }
                                    td { strong { (a.serial) } @if !a.site.is_empty() { br; span.site { (a.site) } } }
                                    td { span.badge .(a.kind.as_str()) { (a.code) } }
                                    td { (a.detail) @if let Some(total) = a.total { br; span.muted { "total count " (total) } } }
                                    td { span.badge .(a.status.as_str()) { (a.status.as_str()) } }
                                    td { (time(&a.raised_at)) }
                                    td {
                                        @if let Some(by) = &a.acked_by {
                                            "by " (by) @if let Some(at) = &a.acked_at { br; (time(at)) }
                                        } @else {
                                            form method="post" action=(format!("/alarms/{}/ack", a.id)) {
                                                input type="hidden" name="csrf" value=(csrf);
                                                button type="submit" aria-label=(format!("Acknowledge {} {} on {}", a.id, a.code, a.serial)) {
                                                    "Acknowledge"
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The Jobs page's filter, as the query string carries it.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub status: Option<JobStatus>,
    pub serial: String,
    /// Also the normal ends past the relay's retention (`jobs list --all`).
    pub all: bool,
    /// Only the jobs of this rollout (R-000001), as its view lists them.
    pub rollout: String,
}

impl JobFilter {
    pub fn keeps(&self, job: &JobView) -> bool {
        self.status.is_none_or(|s| s == job.status)
            && (self.serial.is_empty() || job.serial.eq_ignore_ascii_case(self.serial.trim()))
    }
}

/// The Jobs page: the filter form, then the table the script refreshes on every job change.
pub fn jobs(filter: &JobFilter, table: Markup) -> Markup {
    html! {
        form.filters method="get" action="/jobs" role="search" aria-label="Filter jobs" {
            div.field {
                label for="f-status" { "Status" }
                select #f-status name="status" {
                    option value="" selected[filter.status.is_none()] { "any" }
                    @for s in JobStatus::ALL {
                        option value=(s.as_str()) selected[filter.status == Some(s)] { (s.as_str()) }
                    }
                }
            }
            div.field {
                label for="f-serial" { "Serial" }
                input #f-serial name="serial" type="text" value=(filter.serial) autocomplete="off"
                    placeholder="e.g. C123" pattern="[A-Za-z0-9-]{0,64}";
            }
            div.field {
                label for="f-rollout" { "Rollout" }
                input #f-rollout name="rollout" type="text" value=(filter.rollout) autocomplete="off"
                    placeholder="e.g. R-000001" pattern="R-[0-9]{1,20}|";
            }
            div.field.check {
                input #f-all name="all" type="checkbox" value="1" checked[filter.all];
                label for="f-all" { "Also jobs that ended normally a while ago" }
            }
            button type="submit" { "Filter" }
        }
        p.hint {
            "Succeeded and canceled jobs leave this list a while after they end (the relay's "
            "retention, as in " code { "jobs list" } "); failed, rejected and timed-out ones stay."
        }
        div #jobs-table { (table) }
    }
}

/// The Fig. 9 table: serial, site, instruction, data type, managing server, instructing host,
/// instruction time, execution time, status; plus the id, the reason and a cancel button.
pub fn jobs_table(jobs: &[JobView], csrf: &str) -> Markup {
    html! {
        @if jobs.is_empty() {
            p.empty { "No jobs to show." }
        } @else {
            div.table-wrap {
                table.jobs {
                    caption.sr-only { "Jobs (Fig. 9)" }
                    thead { tr {
                        th scope="col" { "Job" }
                        th scope="col" { "Serial" }
                        th scope="col" { "Site" }
                        th scope="col" { "Instruction" }
                        th scope="col" { "Data type" }
                        th scope="col" { "Managing server" }
                        th scope="col" { "Instructing host" }
                        th scope="col" { "Instruction time (UTC)" }
                        th scope="col" { "Execution time (UTC)" }
                        th scope="col" { "Status" }
                        th scope="col" { span.sr-only { "Actions" } }
                    } }
                    tbody {
                        @for j in jobs {
                            tr data-job=(j.id) data-status=(j.status.as_str()) {
                                th scope="row" { (j.id) }
                                td { (j.serial) }
                                td { (j.site) }
                                td { (j.instruction) }
                                td { (j.data_type.replace(',', ", ")) }
                                td { (j.server) }
                                td { (j.host) }
                                td { (opt_time(&j.instruction_time)) }
                                td { (opt_time(&j.execution_time)) }
                                td {
                                    span.badge .(j.status.as_str()) { (j.status.as_str()) }
                                    @if let Some(reason) = &j.reason { br; span.reason { (reason) } }
                                }
                                td {
                                    @if !j.status.is_terminal() {
                                        form method="post" action=(format!("/jobs/{}/cancel", j.id)) {
                                            input type="hidden" name="csrf" value=(csrf);
                                            button type="submit" .secondary aria-label=(format!("Cancel {}", j.id)) { "Cancel" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// One device's row data: its state and its meter readings, oldest first.
pub struct DeviceRow<'a> {
    pub serial: &'a str,
    pub state: &'a StateView,
    pub readings: &'a [&'a CounterReading],
}

/// The Devices page.
pub fn devices(table: Markup, days: u32) -> Markup {
    html! {
        p.lead {
            "Every device the relay knows: presence as the relay sees its sessions, the firmware it "
            "reports, and its total count over the last " (days) " days of meter readings."
        }
        div #devices-table { (table) }
    }
}

pub fn devices_table(rows: &[DeviceRow<'_>]) -> Markup {
    html! {
        @if rows.is_empty() {
            p.empty { "No device has reported yet." }
        } @else {
            div.table-wrap {
                table.devices {
                    caption.sr-only { "Devices" }
                    thead { tr {
                        th scope="col" { "Serial" }
                        th scope="col" { "Site" }
                        th scope="col" { "Presence" }
                        th scope="col" { "Last seen (UTC)" }
                        th scope="col" { "Model" }
                        th scope="col" { "Firmware" }
                        th scope="col" { "Counters" }
                        th scope="col" { "Total count over time" }
                    } }
                    tbody {
                        @for r in rows {
                            tr data-serial=(r.serial) data-presence=(r.state.presence.as_str()) {
                                th scope="row" { (r.serial) }
                                td { (r.state.state.site) }
                                td {
                                    span.badge .(r.state.presence.as_str()) { (r.state.presence.as_str()) }
                                    @if let Some(relay) = &r.state.relay { br; span.muted { "via child relay " (relay) } }
                                    @if let Some(due) = &r.state.due_by { br; span.muted { "due by " (time(due)) " UTC" } }
                                }
                                td { (time(&r.state.last_seen)) }
                                td { (r.state.state.model) }
                                td { (r.state.state.firmware) }
                                td { (counters(r.readings.last().copied())) }
                                td { (chart::total_chart(r.serial, r.readings)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The latest reading's main counters.
fn counters(latest: Option<&CounterReading>) -> Markup {
    const SHOWN: [&str; 5] = ["total", "copy", "print", "scan", "fax"];
    let Some(r) = latest else {
        return html! { span.none { "no readings" } };
    };
    html! {
        dl.counters {
            @for name in SHOWN {
                @if let Some(v) = r.counters.get(name) {
                    div { dt { (name) } dd { (value_text(v)) } }
                }
            }
        }
        span.muted { "read " (time(&r.read_at)) " UTC" }
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::Bool(b) => b.to_string(),
        Value::Int(n) => n.to_string(),
        Value::Text(t) => t.clone(),
    }
}

/// What the submit form shows again after a refusal, so nothing typed is lost.
#[derive(Debug, Clone, Default)]
pub struct SubmitForm {
    pub serial: String,
    pub kind: String,
    pub at: String,
    pub deadline: String,
    pub execute_at: String,
    pub sections: Vec<String>,
    pub values: String,
    pub merge: String,
    pub artifact: String,
    pub version: String,
    pub max_attempts: String,
    pub mode: String,
    pub interval_secs: String,
    pub calendar: String,
    pub moments: Vec<String>,
    pub conditions: String,
}

/// The submit form: one form, a fieldset per kind; each kind reads only its own fields.
pub fn submit(form: &SubmitForm, csrf: &str, can_sign: bool) -> Markup {
    let kinds = [
        ("get-data", "get-data — read sections of the device's data"),
        ("update-data", "update-data — set values"),
        ("firmware", "firmware — install an uploaded image"),
        (
            "set-schedule",
            "set-schedule — when the device reaches the relay",
        ),
    ];
    let kind = if form.kind.is_empty() {
        "get-data"
    } else {
        form.kind.as_str()
    };
    html! {
        form.submit method="post" action="/submit" enctype="multipart/form-data" {
            input type="hidden" name="csrf" value=(csrf);
            fieldset {
                legend { "Job" }
                div.field {
                    label for="serial" { "Device serial" }
                    input #serial name="serial" type="text" required value=(form.serial)
                        autocomplete="off" pattern="[A-Za-z0-9-]{1,64}" aria-describedby="serial-hint";
                    span #serial-hint .hint { "1 to 64 letters, digits or -, e.g. C123" }
                }
                div.field {
                    label for="kind" { "Kind" }
                    select #kind name="kind" {
                        @for (value, label) in kinds {
                            option value=(value) selected[value == kind] { (label) }
                        }
                    }
                }
                div.field {
                    label for="at" { "Instruction time (optional)" }
                    input #at name="at" type="text" value=(form.at) placeholder="2026-11-27T02:00:00+09:00"
                        aria-describedby="time-hint";
                }
                div.field {
                    label for="deadline" { "Deadline (optional)" }
                    input #deadline name="deadline" type="text" value=(form.deadline) placeholder="2026-11-28T00:00:00Z"
                        aria-describedby="time-hint";
                }
                span #time-hint .hint { "Times are RFC 3339 with a zone; empty means now (instruction) or the relay's default (deadline)." }
            }
            fieldset data-kind="get-data" {
                legend { "get-data" }
                p.hint { "Sections to read; none ticked means all of them." }
                div.checks {
                    @for s in Section::ALL {
                        @let id = format!("sec-{}", s.as_str());
                        span.check {
                            input #(id) type="checkbox" name="sections" value=(s.as_str())
                                checked[form.sections.iter().any(|x| x == s.as_str())];
                            label for=(id) { (s.as_str()) }
                        }
                    }
                }
            }
            fieldset data-kind="update-data" {
                legend { "update-data" }
                div.field {
                    label for="values" { "Values, one SECTION.NAME=VALUE per line" }
                    textarea #values name="values" rows="4" placeholder="adjustment.density=6\nadjustment.toner_save=true" { (form.values) }
                }
                div.field {
                    label for="merge" { "Merge at" }
                    select #merge name="merge" {
                        option value="broker" selected[form.merge != "device"] { "the relay (default)" }
                        option value="device" selected[form.merge == "device"] { "the device" }
                    }
                }
            }
            fieldset data-kind="firmware" {
                legend { "firmware" }
                div.field {
                    label for="artifact" { "Artifact already on the relay: id or version" }
                    input #artifact name="artifact" type="text" value=(form.artifact) placeholder="2.1";
                }
                @if can_sign {
                    div.field {
                        label for="image" { "…or upload a new image" }
                        input #image name="image" type="file";
                    }
                    div.field {
                        label for="version" { "Version of the uploaded image" }
                        input #version name="version" type="text" value=(form.version) placeholder="2.1";
                    }
                } @else {
                    p.hint {
                        "To upload an image from here, start the dashboard with "
                        code { "--signing-key publisher.key" } "; or upload it with "
                        code { "host-agent artifacts upload" } "."
                    }
                }
                div.field {
                    label for="execute_at" { "Execution time: write the image at (optional)" }
                    input #execute_at name="execute_at" type="text" value=(form.execute_at) placeholder="2026-11-27T02:00:00Z";
                }
                div.field {
                    label for="max_attempts" { "Write attempts (optional)" }
                    input #max_attempts name="max_attempts" type="number" min="1" value=(form.max_attempts);
                }
            }
            fieldset data-kind="set-schedule" {
                legend { "set-schedule" }
                div.field {
                    label for="mode" { "Mode" }
                    select #mode name="mode" {
                        option value="" selected[form.mode.is_empty()] { "periodic if an interval or calendar is given" }
                        option value="persistent" selected[form.mode == "persistent"] { "persistent (always connected)" }
                        option value="periodic" selected[form.mode == "periodic"] { "periodic (connect, drain, disconnect)" }
                    }
                }
                div.field {
                    label for="interval_secs" { "Check in every N seconds" }
                    input #interval_secs name="interval_secs" type="number" min="1" value=(form.interval_secs);
                }
                div.field {
                    label for="calendar" { "Calendar times (UTC), one per line" }
                    textarea #calendar name="calendar" rows="2" placeholder="daily:22:00\nweekly:sun 02:00" { (form.calendar) }
                }
                div.checks {
                    @for m in ["power-on", "operator-action"] {
                        @let id = format!("moment-{m}");
                        span.check {
                            input #(id) type="checkbox" name="moments" value=(m) checked[form.moments.iter().any(|x| x == m)];
                            label for=(id) { "at " (m) }
                        }
                    }
                }
                div.field {
                    label for="conditions" { "Conditions, one per line" }
                    textarea #conditions name="conditions" rows="2" placeholder="count:total/1000\nfault:SC-541" { (form.conditions) }
                }
            }
            button type="submit" { "Submit job" }
        }
    }
}

/// The login page.
pub fn login(csrf: &str, failed: bool) -> Markup {
    html! {
        @if failed { (notice(false, "Wrong password.")) }
        form.login method="post" action="/login" {
            input type="hidden" name="csrf" value=(csrf);
            div.field {
                label for="password" { "Password" }
                input #password name="password" type="password" required autocomplete="current-password" autofocus;
            }
            button type="submit" { "Log in" }
        }
    }
}

/// A page that only says something, with a way on.
pub fn message(text: Markup, back: (&str, &str)) -> Markup {
    html! {
        (text)
        p { a href=(back.0) { (back.1) } }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::device::DeviceState;
    use protocol::presence::Presence;

    fn view(presence: Presence, relay: Option<&str>) -> StateView {
        StateView {
            state: DeviceState::default(),
            presence,
            last_seen: chrono::Utc::now(),
            since: None,
            mode: None,
            interval_secs: None,
            due_by: None,
            relay: relay.map(str::to_owned),
            node: None,
        }
    }

    #[test]
    fn a_device_behind_a_child_relay_shows_the_child_and_unreachable_is_its_own_badge() {
        let (on, lost, here) = (
            view(Presence::Online, Some("R1")),
            view(Presence::Unreachable, Some("R1")),
            view(Presence::Online, None),
        );
        let rows = [
            DeviceRow {
                serial: "C1",
                state: &on,
                readings: &[],
            },
            DeviceRow {
                serial: "C2",
                state: &lost,
                readings: &[],
            },
            DeviceRow {
                serial: "C3",
                state: &here,
                readings: &[],
            },
        ];
        let page = devices_table(&rows).into_string();
        assert_eq!(page.matches("via child relay R1").count(), 2, "{page}");
        assert!(page.contains(r#"class="badge unreachable""#), "{page}");
    }
}
