//! The service desk's dashboard (`host-agent dashboard`), end to end: the real broker, real
//! device agents and the real `host-agent dashboard`, spoken to over HTTP as a browser would
//! (session cookie, CSRF tokens, forms, uploads), and once with a real headless Chromium that
//! keeps the Emergencies page open while a fault is injected.

mod emergency;

use std::time::Duration;

use emergency::fault;
use harness::browser::Browser;
use harness::{Broker, Proc, TestEnv, deadline, pseudo_random_bytes};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, LOCATION, SET_COOKIE};
use reqwest::multipart::Form;

/// A site name that would run script if any page printed it unescaped.
const HOSTILE: &str = "<script>alert(1)</script>";
const HOSTILE_ESCAPED: &str = "&lt;script&gt;alert(1)&lt;/script&gt;";

/// `host-agent dashboard --listen 127.0.0.1:0 EXTRA…` as host `svc`; returns the process and
/// the base URL it printed, once the page says the relay is connected.
async fn dashboard(env: &TestEnv, broker: &Broker, extra: &[&str]) -> (Proc, String) {
    dashboard_named(env, broker, "dashboard", extra).await
}

/// [`dashboard`], logging to `<name>.log`, for a test that runs more than one.
async fn dashboard_named(
    env: &TestEnv,
    broker: &Broker,
    name: &str,
    extra: &[&str],
) -> (Proc, String) {
    let mut args = vec!["dashboard", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let proc = env.host("svc", broker).spawn(name, &args);
    let line = proc
        .wait_for_line("the dashboard's URL on stdout", deadline(), |l| {
            l.trim_start().starts_with("http://127.0.0.1:")
        })
        .await;
    let base = line.trim().trim_end_matches('/').to_owned();
    (proc, base)
}

/// A browser's side of HTTP: one session cookie, no automatic redirects (the tests look at them).
struct Web {
    http: reqwest::Client,
    base: String,
    cookie: Option<String>,
}

struct Reply {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Reply {
    fn location(&self) -> &str {
        self.headers
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The CSRF token of the first form on the page.
    fn csrf(&self) -> String {
        let marker = "name=\"csrf\" value=\"";
        let start = self
            .body
            .find(marker)
            .unwrap_or_else(|| panic!("no CSRF token on the page:\n{}", self.body))
            + marker.len();
        self.body[start..start + 64].to_owned()
    }
}

impl Web {
    fn new(base: &str) -> Web {
        Web {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(deadline())
                .build()
                .expect("an HTTP client"),
            base: base.to_owned(),
            cookie: None,
        }
    }

    async fn send(&mut self, req: reqwest::RequestBuilder) -> Reply {
        let req = match &self.cookie {
            Some(c) => req.header("cookie", c.as_str()),
            None => req,
        };
        let resp = req.send().await.expect("the dashboard answers");
        let status = resp.status();
        let headers = resp.headers().clone();
        // The session cookie, as a browser would keep it (a Max-Age=0 one deletes it).
        for v in headers.get_all(SET_COOKIE) {
            let v = v.to_str().unwrap_or("");
            let pair = v.split(';').next().unwrap_or("").to_owned();
            if v.contains("Max-Age=0") {
                self.cookie = None;
            } else if !pair.is_empty() {
                assert!(
                    v.contains("HttpOnly") && v.contains("SameSite=Strict"),
                    "{v}"
                );
                self.cookie = Some(pair);
            }
        }
        let body = resp.text().await.unwrap_or_default();
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn get(&mut self, path: &str) -> Reply {
        let req = self.http.get(format!("{}{path}", self.base));
        self.send(req).await
    }

    async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Reply {
        let req = self.http.post(format!("{}{path}", self.base)).form(fields);
        self.send(req).await
    }

    async fn post_multipart(&mut self, path: &str, form: Form) -> Reply {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .multipart(form);
        self.send(req).await
    }

    /// GETs `path` until its body contains `needle`.
    async fn wait_for(&mut self, path: &str, needle: &str) -> Reply {
        let start = std::time::Instant::now();
        loop {
            let r = self.get(path).await;
            if r.body.contains(needle) {
                return r;
            }
            assert!(
                start.elapsed() < deadline(),
                "{path} never showed {needle:?}; last ({}):\n{}",
                r.status,
                r.body
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The job id in "Submitted J-000001 (…)".
fn submitted_id(r: &Reply) -> String {
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let at = r.body.find("Submitted J-").expect("a submitted job") + "Submitted ".len();
    r.body[at..at + 8].to_owned()
}

fn form(csrf: &str, fields: &[(&str, &str)]) -> Form {
    let mut f = Form::new().text("csrf", csrf.to_owned());
    for (k, v) in fields {
        f = f.text(k.to_string(), v.to_string());
    }
    f
}

fn assert_escaped(page: &str, r: &Reply) {
    assert!(
        !r.body.contains(HOSTILE),
        "{page} printed the hostile site unescaped:\n{}",
        r.body
    );
    assert!(
        r.body.contains(HOSTILE_ESCAPED),
        "{page} should show the site, escaped:\n{}",
        r.body
    );
}

#[tokio::test]
async fn the_pages_show_the_fleet_live_data_and_escape_a_hostile_site_name() {
    let env = TestEnv::new("dashboard_pages");
    let broker = env.broker().start().await;
    let c1 = env.device("C1").site(HOSTILE).start(&broker).await;
    let _c2 = env.device("C2").site("Kobe 2F").start(&broker).await;
    let (_dash, base) = dashboard(&env, &broker, &[]).await;
    let mut web = Web::new(&base);
    let host = env.host("svc", &broker);

    // Emergencies: a fatal fault on C1 arrives over MQTT, with the device's site.
    fault(&c1, &["raise", "SC-541"]).await;
    let r = web.wait_for("/", "data-alarm-code=\"SC-541\"").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains("main motor failure"), "{}", r.body);
    assert!(r.body.contains("aria-live"), "{}", r.body);
    assert!(
        r.headers
            .get("content-security-policy")
            .is_some_and(|v| v.to_str().unwrap_or("").contains("script-src 'self'")),
        "{:?}",
        r.headers
    );
    assert_escaped("Emergencies", &r);
    let csrf = r.csrf();

    // A get-data job through the submit form; its counters become a meter reading.
    let r = web
        .post_multipart(
            "/submit",
            form(
                &csrf,
                &[
                    ("serial", "C1"),
                    ("kind", "get-data"),
                    ("sections", "counters"),
                ],
            ),
        )
        .await;
    let job = submitted_id(&r);
    host.wait_for_status(&job, "succeeded", deadline()).await;

    // Jobs: the Fig. 9 columns, the job, and the filters.
    let r = web.wait_for("/jobs", "data-status=\"succeeded\"").await;
    assert_eq!(r.status, StatusCode::OK);
    for col in [
        "Serial",
        "Site",
        "Instruction",
        "Data type",
        "Managing server",
        "Instructing host",
        "Instruction time",
        "Execution time",
        "Status",
    ] {
        assert!(
            r.body.contains(&format!("<th scope=\"col\">{col}")),
            "no {col} column:\n{}",
            r.body
        );
    }
    assert!(
        r.body.contains(&format!("data-job=\"{job}\"")),
        "{}",
        r.body
    );
    assert!(r.body.contains("GET DATA"), "{}", r.body);
    assert_escaped("Jobs", &r);
    for (query, shown) in [
        ("?status=succeeded", true),
        ("?status=failed", false),
        ("?serial=c1", true),
        ("?serial=C2", false),
        ("?status=succeeded&serial=C1&all=1", true),
    ] {
        let r = web.get(&format!("/jobs{query}")).await;
        assert_eq!(r.status, StatusCode::OK, "{query}");
        assert_eq!(
            r.body.contains(&format!("data-job=\"{job}\"")),
            shown,
            "{query}:\n{}",
            r.body
        );
    }
    // What a visitor types comes back escaped too.
    let r = web
        .get("/jobs?serial=%3Cscript%3Ealert(1)%3C%2Fscript%3E")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_escaped("Jobs filtered by a hostile serial", &r);
    let r = web.get("/jobs?status=nonsense").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body.contains("nonsense"), "{}", r.body);
    let r = web.get("/jobs?fragment=table").await;
    assert!(
        !r.body.contains("<html") && r.body.contains(&job),
        "{}",
        r.body
    );

    // Devices: presence, firmware, counters and the chart of C1's total count.
    let r = web
        .wait_for("/devices", "aria-label=\"C1: total count from")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.body
            .contains("data-serial=\"C1\" data-presence=\"online\""),
        "{}",
        r.body
    );
    assert!(
        r.body
            .contains("data-serial=\"C2\" data-presence=\"online\""),
        "{}",
        r.body
    );
    assert!(
        r.body.contains("Kobe 2F") && r.body.contains("<svg"),
        "{}",
        r.body
    );
    assert_escaped("Devices", &r);

    let r = web.get("/submit").await;
    assert_eq!(r.status, StatusCode::OK);
    for kind in ["get-data", "update-data", "firmware", "set-schedule"] {
        assert!(
            r.body.contains(&format!("<option value=\"{kind}\"")),
            "{kind}:\n{}",
            r.body
        );
    }
    assert!(r.body.contains("<label for=\"serial\">"), "{}", r.body);

    // The live stream answers as SSE.
    let resp = reqwest::Client::new()
        .get(format!("{base}/events"))
        .header("cookie", web.cookie.clone().expect("a session"))
        .send()
        .await
        .expect("/events answers");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[CONTENT_TYPE], "text/event-stream");
    drop(resp);

    // CSRF: an ack without the token, or with another one, is refused; nothing changes.
    let alarms = host.run_ok(["alarms", "list", "--json"]).await;
    let alarms: serde_json::Value = serde_json::from_str(&alarms).expect("JSON");
    let id = alarms[0]["id"].as_str().expect("an alarm id").to_owned();
    let r = web.post(&format!("/alarms/{id}/ack"), &[]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let r = web
        .post(&format!("/alarms/{id}/ack"), &[("csrf", &"0".repeat(64))])
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let before = host.list_json(true).await.len();
    let r = web
        .post_multipart(
            "/submit",
            Form::new().text("serial", "C1").text("kind", "get-data"),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert_eq!(
        host.list_json(true).await.len(),
        before,
        "a refused form must file no job"
    );
    // A visitor without the session cookie has no token either.
    let mut stranger = Web::new(&base);
    let r = stranger
        .post(&format!("/alarms/{id}/ack"), &[("csrf", &csrf)])
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);

    // Acknowledge with the token: back to Emergencies, which says who did.
    let r = web
        .post(&format!("/alarms/{id}/ack"), &[("csrf", &csrf)])
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    assert_eq!(r.location(), "/");
    web.wait_for("/", "by svc").await;
    let alarms = host.run_ok(["alarms", "list", "--json"]).await;
    assert!(alarms.contains("\"acked_by\": \"svc\""), "{alarms}");
    let r = web.post("/alarms/A-999999/ack", &[("csrf", &csrf)]).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
}

#[tokio::test]
async fn the_forms_submit_every_kind_upload_firmware_and_cancel() {
    let env = TestEnv::new("dashboard_forms");
    let broker = env.broker().start().await;
    let host = env.host("svc", &broker);
    let keys = host.keys_generate(&env.path("keys")).await;
    let _c1 = env
        .device("C1")
        .publisher_key(&keys.public)
        .start(&broker)
        .await;
    let key = keys.secret.to_string_lossy().into_owned();
    let (_dash, base) = dashboard(&env, &broker, &["--signing-key", &key]).await;
    let mut web = Web::new(&base);
    let csrf = web.get("/submit").await.csrf();

    // update-data, merged at the relay.
    let r = web
        .post_multipart(
            "/submit",
            form(
                &csrf,
                &[
                    ("serial", "C1"),
                    ("kind", "update-data"),
                    ("values", "adjustment.density=6\n"),
                    ("merge", "broker"),
                ],
            ),
        )
        .await;
    let job = submitted_id(&r);
    let detail = host.wait_for_status(&job, "succeeded", deadline()).await;
    assert_eq!(detail["instruction"], "UPDATE DATA", "{detail:#}");

    // set-schedule.
    let r = web
        .post_multipart(
            "/submit",
            form(
                &csrf,
                &[
                    ("serial", "C1"),
                    ("kind", "set-schedule"),
                    ("mode", "persistent"),
                    ("moments", "power-on"),
                ],
            ),
        )
        .await;
    let job = submitted_id(&r);
    host.wait_for_status(&job, "succeeded", deadline()).await;

    // firmware, with a new image uploaded and signed by the dashboard.
    let image = pseudo_random_bytes(100_000, 7);
    let upload = form(
        &csrf,
        &[("serial", "C1"), ("kind", "firmware"), ("version", "2.0.0")],
    )
    .part(
        "image",
        reqwest::multipart::Part::bytes(image).file_name("fw-2.0.0.bin"),
    );
    let r = web.post_multipart("/submit", upload).await;
    let job = submitted_id(&r);
    let detail = host.wait_for_status(&job, "succeeded", deadline()).await;
    assert_eq!(detail["instruction"], "UPDATE ISW", "{detail:#}");
    let artifacts = host.artifacts_json().await;
    assert!(
        artifacts
            .iter()
            .any(|a| a["version"] == "2.0.0" && a["complete"] == true),
        "{artifacts:#?}"
    );

    // The relay's refusal comes back with its reason, and the form keeps what was typed.
    let r = web
        .post_multipart(
            "/submit",
            form(
                &csrf,
                &[
                    ("serial", "C1"),
                    ("kind", "get-data"),
                    ("at", "tomorrow-ish"),
                ],
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert!(
        r.body.contains("rejected") && r.body.contains("value=\"tomorrow-ish\""),
        "{}",
        r.body
    );
    let r = web
        .post_multipart(
            "/submit",
            form(
                &csrf,
                &[
                    ("serial", "C1"),
                    ("kind", "update-data"),
                    ("values", "no equals sign"),
                ],
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(
        r.body.contains("SECTION.NAME=VALUE") && r.body.contains("no equals sign"),
        "{}",
        r.body
    );

    // Cancel: a job for tomorrow waits queued, shows a Cancel button, and is withdrawn.
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let r = web
        .post_multipart(
            "/submit",
            form(
                &csrf,
                &[("serial", "C1"), ("kind", "get-data"), ("at", &tomorrow)],
            ),
        )
        .await;
    let job = submitted_id(&r);
    let r = web.get("/jobs").await;
    assert!(
        r.body.contains(&format!("action=\"/jobs/{job}/cancel\"")),
        "{}",
        r.body
    );
    let r = web.post(&format!("/jobs/{job}/cancel"), &[]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "no token, no cancel");
    let r = web
        .post(&format!("/jobs/{job}/cancel"), &[("csrf", &csrf)])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains(&format!("Canceled {job}")), "{}", r.body);
    assert_eq!(host.show_json(&job).await["status"], "canceled");
    let r = web
        .post(&format!("/jobs/{job}/cancel"), &[("csrf", &csrf)])
        .await;
    assert_eq!(
        r.status,
        StatusCode::CONFLICT,
        "an ended job cannot be canceled:\n{}",
        r.body
    );
}

#[tokio::test]
async fn a_password_guards_the_dashboard_and_other_addresses_need_one() {
    let env = TestEnv::new("dashboard_auth");
    let broker = env.broker().start().await;
    let host = env.host("svc", &broker);

    // Safe by default: no password, no address but loopback.
    let out = host.run(["dashboard", "--listen", "0.0.0.0:0"]).await;
    assert_eq!(out.status.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("--auth FILE"),
        "the error must say what to do:\n{out}"
    );

    let pw = env.path("dashboard.pw");
    std::fs::write(&pw, "open sesame\n").expect("write the password file");
    let (_dash, base) = dashboard(&env, &broker, &["--auth", &pw.to_string_lossy()]).await;
    let mut web = Web::new(&base);

    for page in ["/", "/jobs", "/devices", "/submit"] {
        let r = web.get(page).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{page} without a login");
        assert_eq!(r.location(), "/login", "{page}");
    }
    assert_eq!(web.get("/events").await.status, StatusCode::UNAUTHORIZED);
    let r = web.post("/alarms/A-000001/ack", &[("csrf", "x")]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    let login = web.get("/login").await;
    assert_eq!(login.status, StatusCode::OK);
    assert!(login.body.contains("type=\"password\""), "{}", login.body);
    let csrf = login.csrf();
    let r = web.post("/login", &[("password", "open sesame")]).await;
    assert_eq!(
        r.status,
        StatusCode::FORBIDDEN,
        "a login without the form's token"
    );
    let r = web
        .post("/login", &[("csrf", &csrf), ("password", "open sesame!")])
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.body.contains("Wrong password"), "{}", r.body);
    let before = web.cookie.clone();
    let r = web
        .post("/login", &[("csrf", &csrf), ("password", "open sesame")])
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    assert_eq!(r.location(), "/");
    assert_ne!(web.cookie, before, "a login starts a new session");

    let r = web.get("/").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains("Log out"), "{}", r.body);
    let csrf = r.csrf();

    // Strangers without a cookie, more of them than the dashboard keeps sessions for, do not
    // displace the logged-in session: its cookie and its forms' token still hold.
    let mut stranger = Web::new(&base);
    for _ in 0..1100 {
        stranger.cookie = None;
        assert_eq!(stranger.get("/login").await.status, StatusCode::OK);
    }
    let r = web.get("/").await;
    assert_eq!(r.status, StatusCode::OK, "still logged in: {}", r.body);
    assert_eq!(r.csrf(), csrf);

    let r = web.post("/logout", &[("csrf", &csrf)]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(
        web.get("/").await.status,
        StatusCode::SEE_OTHER,
        "logged out"
    );
}

/// One HTTP/1.1 exchange over a plain TCP connection, written byte for byte as given: the way to
/// send the `Host` and `Origin` a browser on another site would send, which an HTTP client
/// library fills in by itself.
struct RawReply {
    status: u16,
    head: String,
    body: String,
}

async fn raw_http(base: &str, request: &str) -> RawReply {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = base.trim_start_matches("http://");
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.write_all(request.as_bytes()).await?;
        let mut bytes = Vec::new();
        tcp.read_to_end(&mut bytes).await?;
        Ok::<_, std::io::Error>(bytes)
    };
    let bytes = tokio::time::timeout(deadline(), exchange)
        .await
        .expect("the dashboard answers within the deadline")
        .expect("an HTTP exchange with the dashboard");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    RawReply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// `GET PATH` with `Host: HOST`, the connection closed after the answer.
async fn get_as(base: &str, host: &str, path: &str) -> RawReply {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    raw_http(base, &req).await
}

/// A form POST with `Host: HOST`, the extra header lines `extra` (each ending in CRLF), a
/// session cookie and the form's fields.
async fn post_as(base: &str, host: &str, extra: &str, cookie: &str, body: &str) -> RawReply {
    let req = format!(
        "POST /alarms/A-000001/ack HTTP/1.1\r\nHost: {host}\r\n{extra}Cookie: {cookie}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    raw_http(base, &req).await
}

/// A session as a browser at `http://HOST/` gets one: its cookie, and the form body
/// `csrf=TOKEN` of its first form.
async fn session_as(base: &str, host: &str) -> (String, String) {
    let page = get_as(base, host, "/submit").await;
    assert_eq!(page.status, 200, "Host: {host}\n{}", page.body);
    let cookie = page
        .head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("set-cookie"))
        .and_then(|(_, v)| v.trim().split(';').next())
        .expect("a session cookie")
        .to_owned();
    let marker = "name=\"csrf\" value=\"";
    let at = page.body.find(marker).expect("a CSRF token") + marker.len();
    (cookie, format!("csrf={}", &page.body[at..at + 64]))
}

#[tokio::test]
async fn a_page_under_another_name_or_a_form_from_another_origin_is_refused() {
    let env = TestEnv::new("dashboard_rebinding");
    let broker = env.broker().start().await;
    let (_dash, base) = dashboard(&env, &broker, &[]).await;
    let port = base.rsplit(':').next().expect("a port").to_owned();

    // DNS rebinding: a page on rebind.attacker.example, whose name now resolves to 127.0.0.1.
    // The browser sends the attacker's name as Host: no page, no cookie, no CSRF token.
    let evil = format!("rebind.attacker.example:{port}");
    let r = get_as(&base, &evil, "/").await;
    assert_eq!(r.status, 421, "a foreign Host:\n{}\n\n{}", r.head, r.body);
    assert!(
        r.body.contains("--allowed-host") && r.body.contains("allowed_hosts"),
        "the refusal says which flag admits a name of one's own:\n{}",
        r.body
    );
    assert!(
        !r.head.to_ascii_lowercase().contains("set-cookie"),
        "{}",
        r.head
    );
    assert!(!r.body.contains("csrf"), "{}", r.body);
    for path in ["/submit", "/events", "/login", "/static/dashboard.js"] {
        assert_eq!(get_as(&base, &evil, path).await.status, 421, "{path}");
    }
    // The same port under another loopback name of the machine's, or no name at all.
    for host in [
        format!(
            "127.0.0.1:{}",
            port.parse::<u16>().expect("a port number") ^ 1
        ),
        "127.0.0.1".to_owned(),
    ] {
        assert_eq!(get_as(&base, &host, "/").await.status, 421, "Host: {host}");
    }
    let r = raw_http(&base, "GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert_eq!(r.status, 421, "no Host at all:\n{}", r.body);
    // A request line naming the attacker's site, whatever the Host line says.
    let req = format!(
        "GET http://{evil}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw_http(&base, &req).await.status, 421);

    // The names of loopback, at the listening port, are this dashboard's.
    for host in ["127.0.0.1", "localhost", "LocalHost", "[::1]"] {
        let r = get_as(&base, &format!("{host}:{port}"), "/").await;
        assert_eq!(r.status, 200, "Host: {host}:{port}\n{}", r.body);
    }

    // A form from another origin is refused even with the session's cookie and token.
    let host = format!("127.0.0.1:{port}");
    let (cookie, form) = session_as(&base, &host).await;
    for origin in [format!("http://{evil}"), "null".to_owned()] {
        let r = post_as(
            &base,
            &host,
            &format!("Origin: {origin}\r\n"),
            &cookie,
            &form,
        )
        .await;
        assert_eq!(r.status, 403, "Origin: {origin}\n{}", r.body);
        assert!(r.body.contains("Origin"), "{}", r.body);
    }
    // The dashboard's own origin, and no Origin (a client that is not a browser), pass this
    // check: the relay then answers that there is no such alarm.
    for extra in [format!("Origin: http://{host}\r\n"), String::new()] {
        let r = post_as(&base, &host, &extra, &cookie, &form).await;
        assert_eq!(r.status, 409, "{extra:?}\n{}", r.body);
    }

    // A name of one's own (a reverse proxy's, say) is admitted with --allowed-host.
    let (_dash2, base2) = dashboard_named(
        &env,
        &broker,
        "dashboard2",
        &["--allowed-host", "dash.example"],
    )
    .await;
    let port2 = base2.rsplit(':').next().expect("a port");
    for host in [format!("dash.example:{port2}"), "DASH.example".to_owned()] {
        assert_eq!(get_as(&base2, &host, "/").await.status, 200, "Host: {host}");
    }
    assert_eq!(
        get_as(&base2, "dash.example.evil:80", "/").await.status,
        421
    );
    assert_eq!(get_as(&base2, &evil, "/").await.status, 421);
    // Behind a TLS proxy the browser's origin is the proxy's https one.
    let (cookie, form) = session_as(&base2, "dash.example").await;
    let extra = "Origin: https://dash.example\r\n";
    let r = post_as(&base2, "dash.example", extra, &cookie, &form).await;
    assert_eq!(r.status, 409, "the proxy's own origin:\n{}", r.body);
    let extra = "Origin: https://dash.example.evil\r\n";
    assert_eq!(
        post_as(&base2, "dash.example", extra, &cookie, &form)
            .await
            .status,
        403
    );
}

#[tokio::test]
async fn an_injected_fatal_fault_appears_on_the_open_emergencies_page_without_a_reload() {
    let env = TestEnv::new("dashboard_browser");
    let broker = env.broker().start().await;
    let c1 = env.device("C1").site("Osaka HQ 3F").start(&broker).await;
    let (_dash, base) = dashboard(&env, &broker, &[]).await;

    let mut browser = Browser::open(&env, &format!("{base}/")).await;
    browser
        .wait_for(
            "the page's live stream to connect",
            "document.body.dataset.live === 'connected'",
            deadline(),
        )
        .await;
    // A mark in the page's memory: a reload would wipe it.
    let none = browser
        .eval("window.__chukeiMark = 'still here'; document.querySelectorAll('tr[data-alarm-code]').length")
        .await;
    assert_eq!(none, 0, "no alarm yet");

    fault(&c1, &["raise", "SC-541"]).await;
    browser
        .wait_for(
            "the SC-541 alarm on the open page",
            "document.querySelector('#alarms tr[data-alarm-code=\"SC-541\"][data-serial=\"C1\"]') !== null",
            deadline(),
        )
        .await;
    assert_eq!(
        browser.eval("window.__chukeiMark").await,
        "still here",
        "the page must not reload"
    );
    assert_eq!(
        browser
            .eval("document.getElementById('alarm-count').textContent")
            .await,
        "1"
    );
    let announced = browser
        .eval("document.getElementById('announce').textContent")
        .await;
    assert_eq!(announced, "New emergency SC-541 on C1 (Osaka HQ 3F).");
    let row = browser
        .eval("document.querySelector('#alarms tr[data-alarm-code]').innerText")
        .await;
    assert!(
        row.as_str()
            .is_some_and(|t| t.contains("main motor failure") && t.contains("Osaka HQ 3F")),
        "{row}"
    );
    browser.screenshot("dashboard-emergency").await;

    // On a phone's width the page does not scroll sideways (the table scrolls in its box).
    browser
        .call(
            "Emulation.setDeviceMetricsOverride",
            serde_json::json!({ "width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true }),
        )
        .await;
    browser
        .wait_for(
            "the page to fit a phone's width",
            "document.documentElement.scrollWidth <= window.innerWidth",
            deadline(),
        )
        .await;
    browser.screenshot("dashboard-emergency-phone").await;
    browser
        .call(
            "Emulation.clearDeviceMetricsOverride",
            serde_json::json!({}),
        )
        .await;

    // Acknowledge from the page: the form posts and the list comes back saying who did.
    browser
        .eval("document.querySelector('#alarms form button').click(); true")
        .await;
    browser
        .wait_for(
            "the acknowledgement on the page",
            "document.querySelector('#alarms tr[data-alarm-code]').textContent.includes('by svc')",
            deadline(),
        )
        .await;

    // Jobs: a job submitted elsewhere (the CLI) appears in the open list without a reload.
    browser
        .call(
            "Page.navigate",
            serde_json::json!({ "url": format!("{base}/jobs") }),
        )
        .await;
    browser
        .wait_for(
            "the Jobs page, live",
            "location.pathname === '/jobs' && document.body.dataset.live === 'connected'",
            deadline(),
        )
        .await;
    browser.eval("window.__chukeiMark = 'jobs'; true").await;
    let job = env.host("svc", &broker).submit_get_data("C1").await;
    browser
        .wait_for(
            "the new job in the open list",
            &format!("document.querySelector('#jobs-table tr[data-job=\"{job}\"]') !== null"),
            deadline(),
        )
        .await;
    assert_eq!(
        browser.eval("window.__chukeiMark").await,
        "jobs",
        "the Jobs page must not reload"
    );
}

/// A page's live stream (`GET /events`), read event by event as the page's script would.
struct Events {
    resp: reqwest::Response,
    buf: String,
}

impl Events {
    async fn open(base: &str) -> Events {
        let resp = reqwest::Client::new()
            .get(format!("{base}/events"))
            .send()
            .await
            .expect("the dashboard answers /events");
        assert_eq!(resp.status(), StatusCode::OK);
        Events {
            resp,
            buf: String::new(),
        }
    }

    /// The next event's name and data (its `data:` lines joined); keep-alive comments skipped.
    async fn next(&mut self) -> (String, String) {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut name = String::new();
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if !name.is_empty() {
                    return (name, data.join("\n"));
                }
                continue;
            }
            let chunk = tokio::time::timeout(deadline(), self.resp.chunk())
                .await
                .unwrap_or_else(|_| panic!("no event within the deadline; pending: {}", self.buf))
                .unwrap_or_else(|e| panic!("reading /events: {e}"))
                .unwrap_or_else(|| panic!("/events ended"));
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

/// The alarm count an `alarms` event carries.
fn alarm_count(data: &str) -> usize {
    let marker = "data-count=\"";
    let start = data
        .find(marker)
        .unwrap_or_else(|| panic!("no data-count in the alarms event: {data}"))
        + marker.len();
    data[start..]
        .split('"')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a bad data-count: {data}"))
}

#[tokio::test]
async fn the_alarm_list_stays_on_the_page_while_the_dashboard_reconnects() {
    let env = TestEnv::new("dashboard_alarms_across_reconnect");
    let mut broker = env.broker().start().await;
    let addr = broker.addr();
    let c1 = env.device("C1").start(&broker).await;
    let (_dash, base) = dashboard(&env, &broker, &[]).await;
    fault(&c1, &["raise", "SC-541"]).await;
    Web::new(&base)
        .wait_for("/", "data-alarm-code=\"SC-541\"")
        .await;

    // An open page's stream: it starts with the link and the one alarm.
    let mut events = Events::open(&base).await;
    let mut log = Vec::new();
    let (mut went_down, mut back_up) = (false, false);
    // The relay restarts where it was: the dashboard's feed loses its session and makes a new one.
    assert!(broker.stop().await.success());
    let _broker = env.broker().listen(addr).start().await;
    loop {
        let (name, data) = events.next().await;
        log.push(format!(
            "{name}: {}",
            data.chars().take(60).collect::<String>()
        ));
        match (name.as_str(), data.as_str()) {
            ("link", "down") => went_down = true,
            ("link", "up") if went_down => back_up = true,
            ("alarms", data) => {
                let n = alarm_count(data);
                assert_eq!(
                    n,
                    1,
                    "the page was sent {n} alarms; it must keep SC-541 throughout:\n{}",
                    log.join("\n")
                );
                // The relay's retained view again, after the feed's new session: done.
                if back_up {
                    break;
                }
            }
            _ => {}
        }
    }
    assert!(
        Web::new(&base)
            .get("/")
            .await
            .body
            .contains("data-alarm-code=\"SC-541\""),
        "still on the page after the reconnect"
    );
}

#[tokio::test]
async fn wrong_passwords_from_one_address_are_refused_for_a_minute() {
    let env = TestEnv::new("dashboard_login_rate_limit");
    let broker = env.broker().start().await;
    let pw = env.path("dashboard.pw");
    std::fs::write(&pw, "open sesame\n").expect("write the password file");
    let (dash, base) = dashboard(
        &env,
        &broker,
        &["--auth", &pw.to_string_lossy(), "--log-format", "json"],
    )
    .await;

    let mut web = Web::new(&base);
    let csrf = web.get("/login").await.csrf();
    for i in 1..=5 {
        let r = web
            .post("/login", &[("csrf", &csrf), ("password", "guess")])
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "wrong password {i}");
    }
    // The sixth attempt is refused before the password is looked at: even the right one.
    let r = web
        .post("/login", &[("csrf", &csrf), ("password", "open sesame")])
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    let retry: u64 = r
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a Retry-After in seconds: {:?}", r.headers));
    assert!((1..=60).contains(&retry), "Retry-After: {retry}");

    // Another source address is not locked out (loopback has them all: 127.0.0.2).
    let mut other = Web {
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
            .timeout(deadline())
            .build()
            .expect("an HTTP client"),
        base: base.clone(),
        cookie: None,
    };
    let csrf = other.get("/login").await.csrf();
    let r = other
        .post("/login", &[("csrf", &csrf), ("password", "open sesame")])
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);

    // The lockout is logged once, as JSON with the source (--log-format json).
    let line = dash
        .wait_for_log("too many wrong passwords", deadline())
        .await;
    let json: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    assert_eq!(json["level"], "WARN", "{line}");
    assert_eq!(json["source"], "127.0.0.1", "{line}");
}

#[tokio::test]
async fn the_rollouts_page_follows_waves_live_and_its_buttons_approve_and_need_csrf() {
    let env = TestEnv::new("the_rollouts_page_follows_waves_live");
    let broker = env.broker().start().await;
    let host = env.host("svc", &broker);
    let fleet = env.fleet(4).start(&broker).await;
    let (_dash, base) = dashboard(&env, &broker, &[]).await;
    host.wait_for_devices(4).await;
    // A job of no rollout, which the rollout filter must leave out.
    let other = host.submit_get_data(&fleet.serial(0)).await;
    host.wait_for_status(&other, "succeeded", deadline()).await;
    let id = host
        .run_ok([
            "rollouts",
            "create",
            "--name",
            "two-waves",
            "--kind",
            "get-data",
            "--target",
            "serial=SIM-*",
            "--waves",
            "50%,100%",
            "--approve-each-wave",
        ])
        .await
        .trim()
        .to_owned();
    let mut web = Web::new(&base);
    let page = web.wait_for("/rollouts", "waiting-approval").await;
    assert!(page.body.contains(&id), "{}", page.body);
    assert!(page.body.contains("<progress"), "{}", page.body);
    assert!(page.body.contains("Approve next wave"), "{}", page.body);

    // A button without the session's token is refused, and changes nothing.
    let forged = web
        .post(&format!("/rollouts/{id}/abort"), &[("csrf", "forged")])
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN, "{}", forged.body);

    // An open page hears of the change by itself.
    let mut events = Events::open(&base).await;
    let approved = web
        .post(
            &format!("/rollouts/{id}/approve"),
            &[("csrf", &page.csrf())],
        )
        .await;
    assert_eq!(approved.status, StatusCode::OK, "{}", approved.body);
    assert!(approved.body.contains("is running"), "{}", approved.body);
    loop {
        let (name, _) = events.next().await;
        if name == "rollouts" {
            break;
        }
    }
    web.wait_for("/rollouts?fragment=table", "succeeded").await;

    // The job list filtered by the rollout: its four jobs, not the other one.
    let jobs = web.get(&format!("/jobs?rollout={id}&all=1")).await;
    assert_eq!(jobs.status, StatusCode::OK);
    assert!(!jobs.body.contains(&other), "{}", jobs.body);
    assert_eq!(
        jobs.body.matches("tr data-job=").count(),
        4,
        "{}",
        jobs.body
    );
}
