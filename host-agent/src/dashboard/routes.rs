//! The HTTP side: routes, the session layer in front of them, and one handler per page or form.
//! Handlers ask the relay through the [`HostClient`] (list, submit, cancel, ack, readings) or
//! read the [`Model`]; rendering is [`super::html`]'s.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Multipart, Path, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use maud::{Markup, html};
use protocol::artifact::MAX_ARTIFACT_BYTES;
use protocol::host::{HostReply, HostRequest};
use protocol::job::JobStatus;
use protocol::meter::CounterReading;
use serde::Deserialize;
use tracing::{info, warn};

use super::auth::{self, Session, Sessions};
use super::hosts::{self, AllowedHosts};
use super::html::{self, Frame, JobFilter, Page, SubmitForm};
use super::model::Model;
use super::throttle::LoginThrottle;
use super::{rollouts, sse, submit, throttle};
use crate::client::{HostClient, HostError, unexpected};
use crate::keys::SigningKey;
use crate::upload::{self, Prepared};

const CSS: &str = include_str!("static/dashboard.css");
const JS: &str = include_str!("static/dashboard.js");

/// Pages of meter readings the Devices page reads at most (500 each): enough for a month of a
/// few hundred devices; past it the chart shows the oldest readings it got.
const MAX_READING_PAGES: usize = 20;

/// No script, style or connection but the dashboard's own; no framing. Inline script and style
/// are refused, so even an escaping mistake could not run injected code.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What every handler shares.
pub struct App {
    pub model: Arc<Model>,
    pub client: Arc<HostClient>,
    pub sessions: Sessions,
    /// Failed logins per source address.
    pub logins: LoginThrottle,
    /// Signs images uploaded through the submit form; without it the form offers only
    /// artifacts already on the relay.
    pub signing_key: Option<SigningKey>,
    /// Days of meter readings behind each device's chart.
    pub counter_days: u32,
    /// Ends the live streams at shutdown.
    pub stop: tokio_util::sync::CancellationToken,
    /// The names requests must use, and the origins forms must come from.
    pub allowed: Arc<AllowedHosts>,
}

pub fn router(app: Arc<App>) -> Router {
    // The largest image the relay takes, plus room for the form's other fields.
    let upload_limit = usize::try_from(MAX_ARTIFACT_BYTES).unwrap_or(usize::MAX) + (1 << 20);
    Router::new()
        .route("/", get(emergencies))
        .route("/jobs", get(jobs))
        .route("/jobs/:id/cancel", post(cancel))
        .route("/devices", get(devices))
        .route("/rollouts", get(rollouts))
        .route("/rollouts/:id/:action", post(rollout_action))
        .route(
            "/submit",
            get(submit_form)
                .post(submit_post)
                .layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route("/alarms/:id/ack", post(ack))
        .route("/events", get(events))
        .route("/login", get(login_form).post(login_post))
        .route("/logout", post(logout))
        .route(
            "/static/dashboard.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], CSS) }),
        )
        .route(
            "/static/dashboard.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    JS,
                )
            }),
        )
        .layer(middleware::from_fn_with_state(app.clone(), session_layer))
        // Outermost: a request under a foreign name gets nothing, not even a cookie.
        .layer(middleware::from_fn_with_state(
            app.allowed.clone(),
            hosts::guard,
        ))
        .with_state(app)
}

/// In front of every route: finds or makes the session, sends strangers to the login page when
/// a password is required, and adds the security headers.
async fn session_layer(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let mut resp = if path.starts_with("/static/") {
        next.run(req).await
    } else {
        let (session, fresh) = match app.sessions.find(req.headers()) {
            Some(s) => (s, false),
            None => (app.sessions.create(), true),
        };
        let mut resp = if !session.authenticated && path != "/login" {
            if req.method() == Method::GET && path != "/events" {
                Redirect::to("/login").into_response()
            } else {
                (StatusCode::UNAUTHORIZED, "log in first: open /login").into_response()
            }
        } else {
            req.extensions_mut().insert(session.clone());
            next.run(req).await
        };
        if fresh && !resp.headers().contains_key(header::SET_COOKIE) {
            add_cookie(&mut resp, &auth::set_cookie(&session));
        }
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // `same-origin`, not `no-referrer`: under `no-referrer` a browser sends `Origin: null` with
    // the page's own forms, which the origin check (`hosts`) must refuse. Other sites still get
    // no `Referer`, so no dashboard URL leaks through a link.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

fn add_cookie(resp: &mut Response, cookie: &str) {
    if let Ok(v) = HeaderValue::from_str(cookie) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

fn frame<'a>(app: &'a App, page: Page, title: &'a str, session: &'a Session) -> Frame<'a> {
    Frame {
        page,
        title,
        csrf: Some(&session.csrf),
        host: app.client.host().as_str(),
        alarm_count: app.model.active_alarms().len(),
        linked: app.model.linked(),
        auth: app.sessions.required(),
    }
}

fn page(app: &App, p: Page, title: &str, session: &Session, body: Markup) -> Html<String> {
    Html(html::layout(&frame(app, p, title, session), body).into_string())
}

/// A page that says what happened after a form, with `status`.
fn outcome(
    app: &App,
    session: &Session,
    status: StatusCode,
    title: &str,
    text: &str,
    back: (&str, &str),
) -> Response {
    let body = html::message(html::notice(status.is_success(), text), back);
    (status, page(app, Page::Jobs, title, session, body)).into_response()
}

fn forbidden(app: &App, session: &Session) -> Response {
    outcome(
        app,
        session,
        StatusCode::FORBIDDEN,
        "Refused",
        "This form is out of date or did not come from this dashboard (CSRF check failed). \
         Reload the page and try again.",
        ("/", "Back to Emergencies"),
    )
}

/// The relay's answer as a status: its refusals are 409 (the request was understood and said
/// no), everything else (no answer, lost session) is 502.
fn relay_status(e: &HostError) -> StatusCode {
    if e.is_refusal() {
        StatusCode::CONFLICT
    } else {
        StatusCode::BAD_GATEWAY
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: Option<String>,
}

async fn emergencies(State(app): State<Arc<App>>, Extension(s): Extension<Session>) -> Response {
    let alarms = app.model.active_alarms();
    let body = html::emergencies(html::alarms(&alarms, &s.csrf));
    page(&app, Page::Emergencies, "Emergencies", &s, body).into_response()
}

#[derive(Deserialize, Default)]
struct JobsQuery {
    status: Option<String>,
    serial: Option<String>,
    all: Option<String>,
    rollout: Option<String>,
    /// `table`: only the table, for the page's script.
    fragment: Option<String>,
}

async fn jobs(
    State(app): State<Arc<App>>,
    Extension(s): Extension<Session>,
    Query(q): Query<JobsQuery>,
) -> Response {
    let mut problem = None;
    let status = match q.status.as_deref().map(str::trim).unwrap_or("") {
        "" => None,
        text => match text.parse::<JobStatus>() {
            Ok(st) => Some(st),
            Err(e) => {
                problem = Some((StatusCode::BAD_REQUEST, e));
                None
            }
        },
    };
    let filter = JobFilter {
        status,
        serial: q.serial.unwrap_or_default(),
        all: q.all.is_some_and(|v| !v.is_empty()),
        rollout: q.rollout.unwrap_or_default().trim().to_owned(),
    };
    // A rollout filter keeps the jobs its view lists.
    let of_rollout = if filter.rollout.is_empty() {
        Ok(None)
    } else {
        app.client.rollout(&filter.rollout).await.map(|r| {
            Some(
                r.jobs
                    .into_iter()
                    .collect::<std::collections::BTreeSet<_>>(),
            )
        })
    };
    let listed = match of_rollout {
        Ok(ids) => app.client.list(filter.all).await.map(|all| (all, ids)),
        Err(e) => Err(e),
    };
    let table = match listed {
        Ok((all, ids)) => {
            let shown: Vec<_> = all
                .into_iter()
                .filter(|j| filter.keeps(j) && ids.as_ref().is_none_or(|ids| ids.contains(&j.id)))
                .collect();
            html::jobs_table(&shown, &s.csrf)
        }
        Err(e) => {
            warn!(error = %e, "dashboard: listing jobs failed");
            problem = Some((
                relay_status(&e),
                format!("The relay did not give the job list: {e}"),
            ));
            html! {}
        }
    };
    let code = problem.as_ref().map_or(StatusCode::OK, |p| p.0);
    let table = html! {
        @if let Some((_, text)) = &problem { (html::notice(false, text)) }
        (table)
    };
    if q.fragment.as_deref() == Some("table") {
        return (code, Html(table.into_string())).into_response();
    }
    (
        code,
        page(&app, Page::Jobs, "Jobs", &s, html::jobs(&filter, table)),
    )
        .into_response()
}

#[derive(Deserialize, Default)]
struct RolloutsQuery {
    /// `table`: only the list, for the page's script.
    fragment: Option<String>,
}

async fn rollouts(
    State(app): State<Arc<App>>,
    Extension(s): Extension<Session>,
    Query(q): Query<RolloutsQuery>,
) -> Response {
    let (code, table) = match app.client.rollouts().await {
        Ok(list) => (StatusCode::OK, rollouts::list(&list, &s.csrf)),
        Err(e) => {
            warn!(error = %e, "dashboard: listing rollouts failed");
            (
                relay_status(&e),
                html::notice(false, &format!("The relay did not give the rollouts: {e}")),
            )
        }
    };
    if q.fragment.as_deref() == Some("table") {
        return (code, Html(table.into_string())).into_response();
    }
    (
        code,
        page(&app, Page::Rollouts, "Rollouts", &s, rollouts::page(table)),
    )
        .into_response()
}

/// The buttons of the Rollouts page: pause, resume, abort or approve, each with the CSRF token.
async fn rollout_action(
    State(app): State<Arc<App>>,
    Extension(s): Extension<Session>,
    Path((id, action)): Path<(String, String)>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if !auth::csrf_ok(&s, f.csrf.as_deref()) {
        return forbidden(&app, &s);
    }
    use protocol::rollout::RolloutAction as A;
    let back = ("/rollouts", "Back to the rollouts");
    let action = match action.as_str() {
        "pause" => A::Pause,
        "resume" => A::Resume,
        "abort" => A::Abort,
        "approve" => A::Approve,
        other => {
            return outcome(
                &app,
                &s,
                StatusCode::NOT_FOUND,
                "Unknown action",
                &format!(
                    "{other:?} is not something a rollout does: pause, resume, abort or approve."
                ),
                back,
            );
        }
    };
    match app.client.act_on_rollout(&id, action).await {
        Ok(r) => {
            info!(rollout = %r.id, action = action.as_str(), status = %r.status, "dashboard: rollout changed");
            outcome(
                &app,
                &s,
                StatusCode::OK,
                "Rollout changed",
                &format!("{} is {}.", r.id, r.status),
                back,
            )
        }
        Err(e) => outcome(
            &app,
            &s,
            relay_status(&e),
            "Not changed",
            &format!("{id} was not changed: {e}"),
            back,
        ),
    }
}

#[derive(Deserialize, Default)]
struct DevicesQuery {
    fragment: Option<String>,
}

async fn devices(
    State(app): State<Arc<App>>,
    Extension(s): Extension<Session>,
    Query(q): Query<DevicesQuery>,
) -> Response {
    let devices = app.model.devices();
    let (readings, problem) = match readings(&app.client, app.counter_days).await {
        Ok(r) => (r, None),
        Err(e) => {
            warn!(error = %e, "dashboard: reading meter readings failed");
            (
                Vec::new(),
                Some(format!("The relay did not give the meter readings: {e}")),
            )
        }
    };
    let mut by_serial: BTreeMap<&str, Vec<&CounterReading>> = BTreeMap::new();
    for r in &readings {
        by_serial.entry(r.serial.as_str()).or_default().push(r);
    }
    let rows: Vec<html::DeviceRow<'_>> = devices
        .iter()
        .map(|(serial, state)| html::DeviceRow {
            serial,
            state,
            readings: by_serial
                .get(serial.as_str())
                .map_or(&[][..], |v| v.as_slice()),
        })
        .collect();
    let table = html! {
        @if let Some(text) = &problem { (html::notice(false, text)) }
        (html::devices_table(&rows))
    };
    if q.fragment.as_deref() == Some("table") {
        return Html(table.into_string()).into_response();
    }
    page(
        &app,
        Page::Devices,
        "Devices",
        &s,
        html::devices(table, app.counter_days),
    )
    .into_response()
}

/// Every meter reading of the last `days` days, oldest first, a page at a time.
async fn readings(client: &HostClient, days: u32) -> Result<Vec<CounterReading>, HostError> {
    let to = chrono::Utc::now() + chrono::Duration::minutes(1);
    let from = to - chrono::Duration::days(i64::from(days));
    let mut out = Vec::new();
    let mut after = None;
    for _ in 0..MAX_READING_PAGES {
        let req = HostRequest::ExportCounters {
            from: from.to_rfc3339(),
            to: to.to_rfc3339(),
            after: after.take(),
            serial: None,
        };
        match client.request(req).await? {
            HostReply::Counters { readings, next } => {
                out.extend(readings);
                match next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            HostReply::Error { reason } => return Err(HostError::Refused { reason }),
            other => return Err(unexpected("export-counters", &other)),
        }
    }
    Ok(out)
}

async fn submit_form(State(app): State<Arc<App>>, Extension(s): Extension<Session>) -> Response {
    let body = html::submit(&SubmitForm::default(), &s.csrf, app.signing_key.is_some());
    page(&app, Page::Submit, "Submit a job", &s, body).into_response()
}

/// The form again, with a message above it and what was typed still in it.
fn submit_again(
    app: &App,
    s: &Session,
    status: StatusCode,
    text: &str,
    form: &SubmitForm,
) -> Response {
    let body = html! {
        (html::notice(false, text))
        (html::submit(form, &s.csrf, app.signing_key.is_some()))
    };
    (status, page(app, Page::Submit, "Submit a job", s, body)).into_response()
}

async fn submit_post(
    State(app): State<Arc<App>>,
    Extension(s): Extension<Session>,
    mp: Multipart,
) -> Response {
    let posted = match submit::read(mp).await {
        Ok(p) => p,
        Err(e) => {
            return submit_again(
                &app,
                &s,
                StatusCode::BAD_REQUEST,
                &e,
                &SubmitForm::default(),
            );
        }
    };
    if !auth::csrf_ok(&s, posted.csrf.as_deref()) {
        return forbidden(&app, &s);
    }
    let form = posted.form;
    // An image to upload first: sign it, send it, and install it by its id.
    let mut uploaded = None;
    if let Some((name, bytes)) = posted.image {
        let Some(key) = &app.signing_key else {
            return submit_again(
                &app,
                &s,
                StatusCode::BAD_REQUEST,
                "This dashboard has no signing key, so it cannot publish images: start it with --signing-key, or name an artifact already on the relay.",
                &form,
            );
        };
        if form.version.is_empty() {
            return submit_again(
                &app,
                &s,
                StatusCode::BAD_REQUEST,
                "Give the uploaded image's version: the signature covers it and devices report it.",
                &form,
            );
        }
        let prepared = Prepared::new(&bytes, &form.version, key);
        match upload::upload(&app.client, &bytes, &prepared, |_| {}).await {
            Ok(done) => {
                info!(artifact = %done.info.artifact.id, file = %name, "dashboard: image uploaded");
                uploaded = Some(done.info.artifact.id.to_string());
            }
            Err(e) => {
                return submit_again(
                    &app,
                    &s,
                    StatusCode::BAD_GATEWAY,
                    &format!("Uploading {name} failed: {e}"),
                    &form,
                );
            }
        }
    }
    let job = match submit::into_job(&form, uploaded) {
        Ok(job) => job,
        Err(e) => return submit_again(&app, &s, StatusCode::BAD_REQUEST, &e, &form),
    };
    match app.client.submit(job).await {
        Ok(HostReply::Submitted { job }) => {
            info!(job = %job.id, serial = %job.serial, "dashboard: job submitted");
            let text = format!(
                "Submitted {} ({}) for {}.",
                job.id, job.instruction, job.serial
            );
            let body = html! {
                (html::notice(true, &text))
                p { a href=(format!("/jobs?serial={}", job.serial)) { "See it in the job list" } }
                (html::submit(&SubmitForm::default(), &s.csrf, app.signing_key.is_some()))
            };
            (
                StatusCode::CREATED,
                page(&app, Page::Submit, "Submit a job", &s, body),
            )
                .into_response()
        }
        Ok(HostReply::Rejected { job, reason }) => submit_again(
            &app,
            &s,
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!(
                "The relay rejected the job (recorded as {}): {reason}",
                job.id
            ),
            &form,
        ),
        Ok(other) => submit_again(
            &app,
            &s,
            StatusCode::BAD_GATEWAY,
            &unexpected("submit", &other).to_string(),
            &form,
        ),
        Err(e) => submit_again(
            &app,
            &s,
            relay_status(&e),
            &format!("The relay did not take the job: {e}"),
            &form,
        ),
    }
}

async fn cancel(
    State(app): State<Arc<App>>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if !auth::csrf_ok(&s, f.csrf.as_deref()) {
        return forbidden(&app, &s);
    }
    let back = ("/jobs", "Back to the job list");
    match app.client.cancel(&id).await {
        Ok(job) => {
            info!(job = %job.id, serial = %job.serial, "dashboard: job canceled");
            outcome(
                &app,
                &s,
                StatusCode::OK,
                "Job canceled",
                &format!("Canceled {}.", job.id),
                back,
            )
        }
        Err(e) => outcome(
            &app,
            &s,
            relay_status(&e),
            "Not canceled",
            &format!("{id} was not canceled: {e}"),
            back,
        ),
    }
}

async fn ack(
    State(app): State<Arc<App>>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if !auth::csrf_ok(&s, f.csrf.as_deref()) {
        return forbidden(&app, &s);
    }
    let back = ("/", "Back to Emergencies");
    let result = match app
        .client
        .request(HostRequest::AckAlarm { id: id.clone() })
        .await
    {
        Ok(HostReply::Alarm { alarm }) => Ok(alarm),
        Ok(HostReply::Error { reason }) => Err(HostError::Refused { reason }),
        Ok(other) => Err(unexpected("ack-alarm", &other)),
        Err(e) => Err(e),
    };
    match result {
        Ok(alarm) => {
            info!(serial = %alarm.serial, alarm = %alarm.id, "dashboard: alarm acknowledged");
            // Back to the list, which shows who acknowledged it (post/redirect/get).
            Redirect::to("/").into_response()
        }
        Err(e) => outcome(
            &app,
            &s,
            relay_status(&e),
            "Not acknowledged",
            &format!("{id} was not acknowledged: {e}"),
            back,
        ),
    }
}

async fn events(State(app): State<Arc<App>>, Extension(s): Extension<Session>) -> Response {
    sse::stream(app.model.clone(), s, app.stop.clone()).into_response()
}

fn login_page(app: &App, s: &Session, failed: bool) -> Html<String> {
    let f = Frame {
        page: Page::Login,
        title: "Log in",
        csrf: None,
        host: app.client.host().as_str(),
        alarm_count: 0,
        linked: false,
        auth: true,
    };
    Html(html::layout(&f, html::login(&s.csrf, failed)).into_string())
}

async fn login_form(State(app): State<Arc<App>>, Extension(s): Extension<Session>) -> Response {
    if s.authenticated {
        return Redirect::to("/").into_response();
    }
    login_page(&app, &s, false).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    csrf: Option<String>,
    password: Option<String>,
}

async fn login_post(
    State(app): State<Arc<App>>,
    Extension(s): Extension<Session>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(f): Form<LoginForm>,
) -> Response {
    if !auth::csrf_ok(&s, f.csrf.as_deref()) {
        return (StatusCode::FORBIDDEN, login_page(&app, &s, false)).into_response();
    }
    let Some(hash) = app.sessions.password().cloned() else {
        return Redirect::to("/").into_response();
    };
    // Before the password is checked: a locked-out source costs no argon2 hash.
    if let Err(wait) = app.logins.check(peer.ip(), Instant::now()) {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, secs.to_string())],
            format!("too many failed logins from this address: try again in {secs} s\n"),
        )
            .into_response();
    }
    let password = f.password.unwrap_or_default();
    // argon2 is slow on purpose; keep it off the async threads.
    let good = tokio::task::spawn_blocking(move || hash.verify(&password))
        .await
        .unwrap_or(false);
    if !good {
        if app.logins.failed(peer.ip(), Instant::now()) {
            warn!(source = %peer.ip(), max = throttle::MAX_FAILURES, "dashboard: too many wrong passwords; logins from this address refused for a minute");
        } else {
            warn!("dashboard: wrong password");
        }
        return (StatusCode::UNAUTHORIZED, login_page(&app, &s, true)).into_response();
    }
    app.logins.succeeded(peer.ip());
    let fresh = app.sessions.login(&s);
    let mut resp = Redirect::to("/").into_response();
    add_cookie(&mut resp, &auth::set_cookie(&fresh));
    resp
}

async fn logout(
    State(app): State<Arc<App>>,
    Extension(s): Extension<Session>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if !auth::csrf_ok(&s, f.csrf.as_deref()) {
        return forbidden(&app, &s);
    }
    app.sessions.logout(&s);
    let mut resp = Redirect::to("/login").into_response();
    add_cookie(&mut resp, &auth::clear_cookie());
    resp
}
