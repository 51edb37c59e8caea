//! The host's connection to the relay and the request/response exchange of S222.
//!
//! One [`HostClient`] is one MQTT session. A background task drives rumqttc's event loop: it
//! (re)subscribes after every CONNACK, routes replies on `host/{host}/resp` to the request that
//! waits for them, and passes job views from `fleet/+/jobs/+` to `watch`. A request is published
//! only once the reply topic's SUBACK is in, so a fast broker cannot answer into the void, and it
//! is resent — the same envelope, the same msg id — every [`RESEND_EVERY`] until its reply comes
//! or the timeout passes. The broker deduplicates submissions by (host, msg id), so a resend
//! never files a second job.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use protocol::alarm::AlarmState;
use protocol::artifact::{ArtifactId, ArtifactInfo, Chunk};
use protocol::host::{HostReply, HostRequest, HostResponse, SubmitJob};
use protocol::job::{JobDetail, JobView};
use protocol::proxy::ProxyUrl;
use protocol::rollout::{DeviceListing, RolloutAction, RolloutSpec, RolloutView};
use protocol::topic::{self, Topic};
use protocol::url::BrokerUrl;
use protocol::{Envelope, EnvelopeError, HostId, MsgId, Serial};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, Outgoing, Packet, QoS,
    SubscribeFilter, SubscribeReasonCode,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};
use tracing::{debug, info, warn};

/// How often an unanswered request is sent again (S222).
pub const RESEND_EVERY: Duration = Duration::from_secs(2);
/// How long a request (and the first connection) may take unless the caller says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest reply we accept. A `jobs list --all` of a busy fleet or a `jobs show` with a full
/// data dump is far bigger than rumqttc's 10 KiB default.
pub const MAX_INCOMING_BYTES: usize = 16 << 20;
/// The largest request we send: an upload chunk (`artifact::CHUNK_SIZE`, 32 KiB) and its
/// envelope; a submission is a few hundred bytes.
const MAX_OUTGOING_BYTES: usize = 1 << 20;
/// MQTT keepalive: short enough that a dead link is noticed while a request still waits.
const KEEP_ALIVE: Duration = Duration::from_secs(20);
/// Reconnect backoff after a lost connection.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// rumqttc's request queue. The driver uses `try_subscribe_many` from inside the event loop's
/// own task, so the queue must have room for it without being polled.
const REQUEST_QUEUE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("could not connect to {broker}: {detail} — {hint}")]
    Connect {
        broker: BrokerUrl,
        detail: String,
        hint: &'static str,
    },
    #[error(
        "no reply from {broker} to {what} within {secs} s (sent {tries} times){down} — is the broker running and healthy? raise --timeout-secs if it is slow"
    )]
    Timeout {
        broker: BrokerUrl,
        what: &'static str,
        secs: u64,
        tries: u32,
        down: String,
    },
    /// The broker understood the request and said no (unknown job, undecodable request…).
    #[error("{reason}")]
    Refused { reason: String },
    #[error(
        "the broker answered a {want} request with a {got:?} reply — are the broker and host-agent the same version?"
    )]
    UnexpectedReply {
        want: &'static str,
        got: &'static str,
    },
    #[error("could not encode the request: {0}")]
    Encode(#[from] EnvelopeError),
    #[error("the connection to {broker} is closed")]
    Closed { broker: BrokerUrl },
}

impl HostError {
    /// True when the broker answered and said no: `host-agent` exits 1 for these, 2 for the rest.
    pub fn is_refusal(&self) -> bool {
        matches!(self, HostError::Refused { .. })
    }
}

/// How to open a session; [`ConnectOptions::default`] is what `jobs …` commands use.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// MQTT client id. `None`: the certificate's CN, which the gateway always accepts. A host may
    /// also use `CN:SUFFIX` (see `protocol::acl::check_client_id`) so that two sessions of the
    /// same host — a `watch` beside a `jobs submit` — do not take each other over.
    pub client_id: Option<String>,
    /// Also subscribe to every job view (`fleet/+/jobs/+`); read them with
    /// [`HostClient::take_job_views`].
    pub watch_jobs: bool,
    /// Limit for the first connection and for each request.
    pub timeout: Duration,
    /// Also subscribe to every device's active alarms (`fleet/+/alarm`); read them with
    /// [`HostClient::take_alarm_states`].
    pub watch_alarms: bool,
    /// The HTTP proxy to tunnel through (`CONNECT`), if any: see [`protocol::proxy::proxy_for`].
    pub proxy: Option<ProxyUrl>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            client_id: None,
            watch_jobs: false,
            timeout: DEFAULT_TIMEOUT,
            watch_alarms: false,
            proxy: None,
        }
    }
}

/// Where the session stands, as the driver task sees it.
#[derive(Debug, Clone, PartialEq)]
enum Link {
    /// Not yet subscribed on the current connection.
    Connecting,
    /// Subscribed to the reply topic: requests may be published.
    Ready,
    /// The last attempt failed; the driver retries after a backoff.
    Down { detail: String, hint: &'static str },
}

/// State shared by the driver task and the callers. Short critical sections only, never held
/// across an `.await`, so a std `Mutex` is the right tool (as in mini-redis `db.rs`).
struct Shared {
    pending: Mutex<HashMap<MsgId, oneshot::Sender<HostReply>>>,
    views: Option<mpsc::UnboundedSender<JobView>>,
    alarms: Option<mpsc::UnboundedSender<AlarmUpdate>>,
    link: watch::Sender<Link>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves a map that is still consistent (each
    // operation is a single insert or remove), so recovering from poisoning is safe.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A host's session with the relay. Dropping it stops the session at once; [`HostClient::disconnect`]
/// closes it politely.
pub struct HostClient {
    broker: BrokerUrl,
    host: HostId,
    mqtt: AsyncClient,
    shared: Arc<Shared>,
    timeout: Duration,
    req_topic: String,
    views: Option<mpsc::UnboundedReceiver<JobView>>,
    alarms: Option<mpsc::UnboundedReceiver<AlarmUpdate>>,
    driver: Option<JoinHandle<()>>,
}

/// A device's active alarms as the relay retains them on `fleet/{serial}/alarm`; `state` is
/// `None` when the relay deleted the message (the device's last alarm cleared).
#[derive(Debug, Clone, PartialEq)]
pub struct AlarmUpdate {
    pub serial: Serial,
    pub state: Option<AlarmState>,
}

impl HostClient {
    /// Connects as `host` (client id = the CN) and subscribes to the host's reply topic.
    pub async fn connect(
        broker: &BrokerUrl,
        tls: Arc<rustls::ClientConfig>,
        host: HostId,
    ) -> Result<HostClient, HostError> {
        Self::connect_with(broker, tls, host, ConnectOptions::default()).await
    }

    /// Connects with explicit options; returns once the session can carry requests.
    pub async fn connect_with(
        broker: &BrokerUrl,
        tls: Arc<rustls::ClientConfig>,
        host: HostId,
        opts: ConnectOptions,
    ) -> Result<HostClient, HostError> {
        let client_id = opts.client_id.clone().unwrap_or_else(|| host.to_string());
        let mut mqtt_opts = link::mqtt_options(&client_id, broker, opts.proxy.as_ref(), tls);
        mqtt_opts
            .set_keep_alive(KEEP_ALIVE)
            .set_clean_session(true)
            .set_max_packet_size(MAX_INCOMING_BYTES, MAX_OUTGOING_BYTES);
        let (mqtt, mut eventloop) = AsyncClient::new(mqtt_opts, REQUEST_QUEUE);
        // Without it each request waits ~40 ms on Nagle and the relay's delayed ACK: an upload,
        // one 32 KiB chunk per request, crawled at ~0.7 MB/s.
        let mut net = eventloop.network_options();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);

        let resp_topic = topic::host_resp(&host);
        let mut filters = vec![resp_topic.clone()];
        let (views_tx, views_rx) = if opts.watch_jobs {
            filters.push(topic::ALL_FLEET_JOBS.to_owned());
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let (alarms_tx, alarms_rx) = if opts.watch_alarms {
            filters.push(topic::ALL_FLEET_ALARMS.to_owned());
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let (link, mut link_rx) = watch::channel(Link::Connecting);
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            views: views_tx,
            alarms: alarms_tx,
            link,
        });
        let driver = tokio::spawn(drive(
            eventloop,
            mqtt.clone(),
            shared.clone(),
            filters,
            resp_topic,
            host.clone(),
        ));
        let client = HostClient {
            broker: broker.clone(),
            host: host.clone(),
            mqtt,
            shared,
            timeout: opts.timeout,
            req_topic: topic::host_req(&host),
            views: views_rx,
            alarms: alarms_rx,
            driver: Some(driver),
        };

        let settled = timeout(opts.timeout, link_rx.wait_for(|l| *l != Link::Connecting)).await;
        let link = match settled {
            Ok(Ok(link)) => link.clone(),
            Ok(Err(_)) => {
                return Err(HostError::Closed {
                    broker: broker.clone(),
                });
            }
            Err(_) => {
                return Err(HostError::Connect {
                    broker: broker.clone(),
                    detail: format!("no answer within {} s", opts.timeout.as_secs()),
                    hint: "is the broker running and reachable? check --broker and --timeout-secs",
                });
            }
        };
        match link {
            Link::Ready => {
                info!(host = %host, client_id, broker = %broker, "connected");
                Ok(client)
            }
            Link::Down { detail, hint } => Err(HostError::Connect {
                broker: broker.clone(),
                detail,
                hint,
            }),
            Link::Connecting => {
                unreachable!("wait_for returned only once the link left Connecting")
            }
        }
    }

    /// The host id this session speaks for.
    pub fn host(&self) -> &HostId {
        &self.host
    }

    /// The relay this session talks to.
    pub fn broker(&self) -> &BrokerUrl {
        &self.broker
    }

    /// Changes how long each later request may take.
    pub fn set_timeout(&mut self, limit: Duration) {
        self.timeout = limit;
    }

    /// The job views the broker publishes, if the session was opened with `watch_jobs`. Retained
    /// views arrive first (one per known job), then every change. Returns `None` the second time.
    pub fn take_job_views(&mut self) -> Option<mpsc::UnboundedReceiver<JobView>> {
        self.views.take()
    }

    /// Every device's active alarms, if the session was opened with `watch_alarms`: the retained
    /// ones first (every active emergency at once), then each change. `None` the second time.
    pub fn take_alarm_states(&mut self) -> Option<mpsc::UnboundedReceiver<AlarmUpdate>> {
        self.alarms.take()
    }

    /// Sends `req` and waits for its reply, resending the same envelope every [`RESEND_EVERY`]
    /// until the reply arrives or the timeout passes.
    pub async fn request(&self, req: HostRequest) -> Result<HostReply, HostError> {
        let what = request_name(&req);
        let id = fresh_msg_id();
        let bytes = Envelope::new(id, chrono::Utc::now(), req).to_cbor()?;
        let (tx, mut reply_rx) = oneshot::channel();
        lock(&self.shared.pending).insert(id, tx);
        let _forget = Forget {
            shared: &self.shared,
            id,
        };

        let deadline = Instant::now() + self.timeout;
        let mut link_rx = self.shared.link.subscribe();
        let mut tries = 0u32;
        loop {
            // Publish only on a subscribed session: a reply sent before our SUBACK would be lost.
            tokio::select! {
                reply = &mut reply_rx => return self.answered(reply),
                ready = timeout_at(deadline, link_rx.wait_for(|l| *l == Link::Ready)) => match ready {
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => return Err(HostError::Closed { broker: self.broker.clone() }),
                    Err(_) => return Err(self.timed_out(what, tries)),
                },
            }
            tries += 1;
            debug!(host = %self.host, msg_id = id, topic = %self.req_topic, tries, what, "sending request");
            self.mqtt
                .publish(
                    self.req_topic.clone(),
                    QoS::AtLeastOnce,
                    false,
                    bytes.clone(),
                )
                .await
                .map_err(|_| HostError::Closed {
                    broker: self.broker.clone(),
                })?;
            let next = (Instant::now() + RESEND_EVERY).min(deadline);
            tokio::select! {
                reply = &mut reply_rx => return self.answered(reply),
                () = sleep_until(next) => {
                    if Instant::now() >= deadline {
                        return Err(self.timed_out(what, tries));
                    }
                }
            }
        }
    }

    /// Submits a job. `Submitted` and `Rejected` are both answers: a rejected job is recorded
    /// with its reason (S104) and shown in the list.
    pub async fn submit(&self, job: SubmitJob) -> Result<HostReply, HostError> {
        match self.request(HostRequest::Submit(job)).await? {
            reply @ (HostReply::Submitted { .. } | HostReply::Rejected { .. }) => Ok(reply),
            HostReply::Error { reason } => Err(HostError::Refused { reason }),
            other => Err(unexpected("submit", &other)),
        }
    }

    /// The Fig. 9 list: open jobs, or every job with `all`.
    pub async fn list(&self, all: bool) -> Result<Vec<JobView>, HostError> {
        match self.request(HostRequest::List { all }).await? {
            HostReply::Jobs { jobs } => Ok(jobs),
            HostReply::Error { reason } => Err(HostError::Refused { reason }),
            other => Err(unexpected("list", &other)),
        }
    }

    /// One job with its timeline and collected data.
    pub async fn show(&self, job: &str) -> Result<JobDetail, HostError> {
        match self
            .request(HostRequest::Show {
                job: job.to_owned(),
            })
            .await?
        {
            HostReply::Job { job } => Ok(*job),
            HostReply::Error { reason } => Err(HostError::Refused { reason }),
            other => Err(unexpected("show", &other)),
        }
    }

    /// Withdraws a job; returns its view, now `canceled`. A job in progress or already ended is
    /// the broker's refusal, with its reason.
    pub async fn cancel(&self, job: &str) -> Result<JobView, HostError> {
        match self
            .request(HostRequest::Cancel {
                job: job.to_owned(),
            })
            .await?
        {
            HostReply::Canceled { job } => Ok(job),
            HostReply::Error { reason } => Err(HostError::Refused { reason }),
            other => Err(unexpected("cancel", &other)),
        }
    }

    /// Starts or resumes an upload; the reply says how many chunks the relay already holds (as
    /// a contiguous prefix) and whether it has the whole artifact. See [`crate::upload`].
    pub async fn upload_begin(
        &self,
        artifact: &ArtifactId,
        version: &str,
        size: u64,
        chunk_size: u32,
        signature: &str,
    ) -> Result<ArtifactInfo, HostError> {
        let req = HostRequest::UploadBegin {
            artifact: artifact.to_string(),
            version: version.to_owned(),
            size,
            chunk_size,
            signature: signature.to_owned(),
        };
        match self.request(req).await? {
            HostReply::Upload { artifact } => Ok(artifact),
            HostReply::Error { reason } => Err(HostError::Refused { reason }),
            other => Err(unexpected("upload-begin", &other)),
        }
    }

    /// Sends one chunk of an upload. After the last one the relay checks the digest: a mismatch
    /// is its refusal ("digest mismatch: …; upload again").
    pub async fn upload_chunk(&self, chunk: Chunk) -> Result<ArtifactInfo, HostError> {
        match self.request(HostRequest::UploadChunk { chunk }).await? {
            HostReply::Upload { artifact } => Ok(artifact),
            HostReply::Error { reason } => Err(HostError::Refused { reason }),
            other => Err(unexpected("upload-chunk", &other)),
        }
    }

    /// The artifacts the relay holds, complete or not.
    pub async fn artifacts(&self) -> Result<Vec<ArtifactInfo>, HostError> {
        match self.request(HostRequest::Artifacts).await? {
            HostReply::Artifacts { artifacts } => Ok(artifacts),
            HostReply::Error { reason } => Err(HostError::Refused { reason }),
            other => Err(unexpected("artifacts", &other)),
        }
    }

    /// The child relays, as this relay sees them.
    pub async fn relays(&self) -> Result<Vec<protocol::relay::RelayView>, HostError> {
        match self.request(HostRequest::Relays).await? {
            HostReply::Relays { relays } => Ok(relays),
            HostReply::Error { reason } => Err(HostError::Refused { reason }),
            other => Err(unexpected("relays", &other)),
        }
    }

    /// Creates a rollout; the relay refuses a bad one with the reason.
    pub async fn create_rollout(&self, spec: RolloutSpec) -> Result<RolloutView, HostError> {
        self.rollout_reply(
            "create-rollout",
            HostRequest::CreateRollout { rollout: spec },
        )
        .await
    }

    /// One rollout, with its waves' devices and its jobs.
    pub async fn rollout(&self, id: &str) -> Result<RolloutView, HostError> {
        self.rollout_reply(
            "show-rollout",
            HostRequest::ShowRollout {
                rollout: id.to_owned(),
            },
        )
        .await
    }

    /// Pauses, resumes, aborts or approves a rollout; returns it as it is after.
    pub async fn act_on_rollout(
        &self,
        id: &str,
        action: RolloutAction,
    ) -> Result<RolloutView, HostError> {
        self.rollout_reply(
            "act-on-rollout",
            HostRequest::ActOnRollout {
                rollout: id.to_owned(),
                action,
            },
        )
        .await
    }

    async fn rollout_reply(
        &self,
        what: &'static str,
        req: HostRequest,
    ) -> Result<RolloutView, HostError> {
        match self.request(req).await? {
            HostReply::Rollout { rollout } => Ok(*rollout),
            HostReply::Error { reason } => Err(HostError::Refused { reason }),
            other => Err(unexpected(what, &other)),
        }
    }

    /// Every rollout, newest first, without device and job lists.
    pub async fn rollouts(&self) -> Result<Vec<RolloutView>, HostError> {
        match self.request(HostRequest::Rollouts).await? {
            HostReply::Rollouts { rollouts } => Ok(rollouts),
            HostReply::Error { reason } => Err(HostError::Refused { reason }),
            other => Err(unexpected("rollouts", &other)),
        }
    }

    /// The devices the relay knows that pass every target.
    pub async fn devices(&self, targets: Vec<String>) -> Result<Vec<DeviceListing>, HostError> {
        self.devices_reply("devices", HostRequest::Devices { targets })
            .await
    }

    /// Adds and removes tags on devices; returns them as they are after.
    pub async fn tag_devices(
        &self,
        serials: Vec<String>,
        add: Vec<String>,
        remove: Vec<String>,
    ) -> Result<Vec<DeviceListing>, HostError> {
        self.devices_reply(
            "tag-devices",
            HostRequest::TagDevices {
                serials,
                add,
                remove,
            },
        )
        .await
    }

    async fn devices_reply(
        &self,
        what: &'static str,
        req: HostRequest,
    ) -> Result<Vec<DeviceListing>, HostError> {
        match self.request(req).await? {
            HostReply::Devices { devices } => Ok(devices),
            HostReply::Error { reason } => Err(HostError::Refused { reason }),
            other => Err(unexpected(what, &other)),
        }
    }

    /// Sends DISCONNECT and waits briefly for the driver to finish, so the broker sees a clean
    /// goodbye rather than a dropped socket.
    pub async fn disconnect(mut self) {
        if self.mqtt.disconnect().await.is_ok()
            && let Some(driver) = self.driver.take()
            && timeout(Duration::from_secs(2), driver).await.is_err()
        {
            debug!(host = %self.host, "driver did not stop after DISCONNECT");
        }
    }

    fn answered(
        &self,
        reply: Result<HostReply, oneshot::error::RecvError>,
    ) -> Result<HostReply, HostError> {
        reply.map_err(|_| HostError::Closed {
            broker: self.broker.clone(),
        })
    }

    fn timed_out(&self, what: &'static str, tries: u32) -> HostError {
        let down = match &*self.shared.link.borrow() {
            Link::Down { detail, .. } => format!("; the connection is down: {detail}"),
            _ => String::new(),
        };
        HostError::Timeout {
            broker: self.broker.clone(),
            what,
            secs: self.timeout.as_secs(),
            tries,
            down,
        }
    }
}

impl Drop for HostClient {
    fn drop(&mut self) {
        if let Some(driver) = self.driver.take() {
            driver.abort();
        }
    }
}

/// Removes a request's reply slot however the request ends (answer, timeout, cancellation).
struct Forget<'a> {
    shared: &'a Shared,
    id: MsgId,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(&self.shared.pending).remove(&self.id);
    }
}

/// A random nonzero id. The CLI is a one-shot process with no durable outbox to number from, and
/// 64 random bits make a collision with an earlier request of the same host vanishingly unlikely.
/// Zero is reserved for broker-originated messages.
fn fresh_msg_id() -> MsgId {
    loop {
        let id: MsgId = rand::random();
        if id != 0 {
            return id;
        }
    }
}

fn request_name(req: &HostRequest) -> &'static str {
    match req {
        HostRequest::Submit(_) => "submit",
        HostRequest::List { .. } => "list",
        HostRequest::Show { .. } => "show",
        HostRequest::Cancel { .. } => "cancel",
        HostRequest::UploadBegin { .. } => "upload-begin",
        HostRequest::UploadChunk { .. } => "upload-chunk",
        HostRequest::Artifacts => "artifacts",
        HostRequest::Alarms { .. } => "alarms",
        HostRequest::AckAlarm { .. } => "ack-alarm",
        HostRequest::ExportCounters { .. } => "export-counters",
        HostRequest::Relays => "relays",
        HostRequest::CreateRollout { .. } => "create-rollout",
        HostRequest::Rollouts => "rollouts",
        HostRequest::ShowRollout { .. } => "show-rollout",
        HostRequest::ActOnRollout { .. } => "act-on-rollout",
        HostRequest::Devices { .. } => "devices",
        HostRequest::TagDevices { .. } => "tag-devices",
    }
}

fn reply_name(reply: &HostReply) -> &'static str {
    match reply {
        HostReply::Submitted { .. } => "submitted",
        HostReply::Rejected { .. } => "rejected",
        HostReply::Jobs { .. } => "jobs",
        HostReply::Job { .. } => "job",
        HostReply::Error { .. } => "error",
        HostReply::Canceled { .. } => "canceled",
        HostReply::Upload { .. } => "upload",
        HostReply::Artifacts { .. } => "artifacts",
        HostReply::Alarms { .. } => "alarms",
        HostReply::Alarm { .. } => "alarm",
        HostReply::Counters { .. } => "counters",
        HostReply::Relays { .. } => "relays",
        HostReply::Rollout { .. } => "rollout",
        HostReply::Rollouts { .. } => "rollouts",
        HostReply::Devices { .. } => "devices",
    }
}

pub(crate) fn unexpected(want: &'static str, got: &HostReply) -> HostError {
    HostError::UnexpectedReply {
        want,
        got: reply_name(got),
    }
}

/// What to tell a person whose connection failed this way.
fn hint(e: &ConnectionError) -> &'static str {
    // When the broker refuses our certificate, rustls on our side sees only the TLS alert it
    // sent, surfacing from the first read as an I/O error deep inside rumqttc's error types.
    if e.to_string().contains("fatal alert") {
        return "the broker refused our certificate: check that --cert/--key were issued by the broker's CA (`broker pki issue --role host --id NAME`)";
    }
    match e {
        ConnectionError::Tls(_) => {
            "check that --ca is the broker's CA and that --cert/--key were issued by it (`broker pki issue --role host --id NAME`)"
        }
        ConnectionError::ConnectionRefused(code) => refused_hint(*code),
        ConnectionError::NetworkTimeout | ConnectionError::FlushTimeout => {
            "is the broker running and reachable? check --broker"
        }
        _ => "is the broker running? check --broker",
    }
}

/// What a CONNACK refusal from a chukei relay means, and what to do about it. The relay sends two
/// codes: "server unavailable" for load (it is full, or this certificate already holds its
/// sessions), which says nothing about the certificate, and "not authorized" for a client id that
/// does not belong to the certificate.
fn refused_hint(code: ConnectReturnCode) -> &'static str {
    match code {
        ConnectReturnCode::ServiceUnavailable => {
            "the relay is not taking this connection now (server unavailable): either this host \
             certificate already holds max_connections_per_identity sessions (close other \
             host-agent processes or dashboards using it, or ask the relay's operator to raise \
             the limit), or the relay is at max_clients (try again later); the relay's log says \
             which"
        }
        ConnectReturnCode::NotAuthorized => {
            "the relay refused this client id for this certificate (not authorized): the client \
             id must be the certificate's CN, or CN:SUFFIX; check that --cert is a host \
             certificate issued by the broker's CA (`broker pki issue --role host --id NAME`)"
        }
        ConnectReturnCode::Success
        | ConnectReturnCode::RefusedProtocolVersion
        | ConnectReturnCode::BadClientId
        | ConnectReturnCode::BadUserNamePassword => {
            "a chukei relay never answers this; check that --broker is the chukei relay's address"
        }
    }
}

/// Drives the MQTT session until the client disconnects or the `HostClient` is dropped.
async fn drive(
    mut eventloop: EventLoop,
    mqtt: AsyncClient,
    shared: Arc<Shared>,
    filters: Vec<String>,
    resp_topic: String,
    host: HostId,
) {
    let mut backoff = BACKOFF_MIN;
    let mut was_ready = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = BACKOFF_MIN;
                // Clean session: the broker forgot our subscriptions, so every connection
                // subscribes afresh, and requests wait until the SUBACK.
                let subs = filters
                    .iter()
                    .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                if let Err(e) = mqtt.try_subscribe_many(subs) {
                    warn!(host = %host, error = %e, "could not queue the subscription");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    warn!(host = %host, filters = ?filters, "the broker refused a subscription");
                    shared.link.send_replace(Link::Down {
                        detail: format!(
                            "the broker refused the subscription to {}",
                            filters.join(", ")
                        ),
                        hint: "check that --cert is a host certificate and the client id is its CN",
                    });
                } else {
                    if was_ready {
                        info!(host = %host, "reconnected");
                    }
                    was_ready = true;
                    shared.link.send_replace(Link::Ready);
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                on_publish(&shared, &resp_topic, &publish.topic, &publish.payload);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                debug!(host = %host, "disconnected");
                return;
            }
            Ok(_) => {}
            Err(ConnectionError::RequestsDone) => return,
            Err(e) => {
                if was_ready {
                    warn!(host = %host, error = %e, "connection to the broker lost; reconnecting");
                } else {
                    debug!(host = %host, error = %e, "connection attempt failed");
                }
                shared.link.send_replace(Link::Down {
                    detail: e.to_string(),
                    hint: hint(&e),
                });
                sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Routes one incoming message: a reply to the request that waits for it, a job view to `watch`.
fn on_publish(shared: &Shared, resp_topic: &str, topic: &str, payload: &[u8]) {
    if topic == resp_topic {
        match Envelope::<HostResponse>::from_cbor(payload, MAX_INCOMING_BYTES) {
            Ok(env) => {
                let waiter = lock(&shared.pending).remove(&env.body.reply_to);
                match waiter {
                    // The receiver may have just timed out; nothing more to do then.
                    Some(tx) => {
                        let _ = tx.send(env.body.reply);
                    }
                    // Another process of this host, or a second reply to a resent request.
                    None => {
                        debug!(msg_id = env.body.reply_to, %topic, "reply to no pending request")
                    }
                }
            }
            Err(e) => warn!(%topic, error = %e, "undecodable reply from the broker"),
        }
        return;
    }
    if let Ok(Topic::FleetAlarm { serial }) = Topic::parse(topic) {
        let Some(alarms) = &shared.alarms else { return };
        // An empty retained message: the device's last alarm cleared.
        let state = if payload.is_empty() {
            None
        } else {
            match Envelope::<AlarmState>::from_cbor(payload, MAX_INCOMING_BYTES) {
                Ok(env) => Some(env.body),
                Err(e) => {
                    warn!(%topic, error = %e, "undecodable alarm view");
                    return;
                }
            }
        };
        let _ = alarms.send(AlarmUpdate { serial, state });
        return;
    }
    let Some(views) = &shared.views else { return };
    if !matches!(Topic::parse(topic), Ok(Topic::FleetJob { .. })) {
        debug!(%topic, "message on an unexpected topic");
        return;
    }
    // An empty retained message clears a view; there is no change to show for it.
    if payload.is_empty() {
        return;
    }
    match Envelope::<JobView>::from_cbor(payload, MAX_INCOMING_BYTES) {
        Ok(env) => {
            let _ = views.send(env.body);
        }
        Err(e) => warn!(%topic, error = %e, "undecodable job view"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: &str) -> JobView {
        let now = chrono::Utc::now();
        JobView {
            id: id.into(),
            serial: "C1".into(),
            site: String::new(),
            instruction: "GET DATA".into(),
            data_type: "counters".into(),
            server: "relay".into(),
            host: "svc".into(),
            instruction_time: Some(now),
            execution_time: None,
            status: protocol::job::JobStatus::Queued,
            submitted_at: now,
            updated_at: now,
            reason: None,
        }
    }

    fn shared(watch_jobs: bool) -> (Shared, Option<mpsc::UnboundedReceiver<JobView>>) {
        let (tx, rx) = if watch_jobs {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let (link, _) = watch::channel(Link::Connecting);
        (
            Shared {
                pending: Mutex::new(HashMap::new()),
                views: tx,
                alarms: None,
                link,
            },
            rx,
        )
    }

    /// The broker's `demo` shares one client between tasks on a multi-threaded runtime.
    #[test]
    fn the_client_and_its_futures_can_cross_threads() {
        fn send_sync<T: Send + Sync>(_: &T) {}
        fn send<T: Send>(_: T) {}
        fn check(client: &HostClient) {
            send_sync(client);
            send(client.request(HostRequest::List { all: false }));
            send(client.submit(SubmitJob::default()));
            send(client.list(true));
            send(client.show("J-1"));
            send(client.cancel("J-1"));
            send(client.artifacts());
        }
        let _ = check;
    }

    #[test]
    fn msg_ids_are_nonzero_and_fresh() {
        let a = fresh_msg_id();
        let b = fresh_msg_id();
        assert_ne!(a, 0);
        assert_ne!(a, b, "two random 64-bit ids should differ");
    }

    #[test]
    fn a_reply_goes_to_the_request_it_answers_and_only_once() {
        let (shared, _) = shared(false);
        let (tx7, mut rx7) = oneshot::channel();
        let (tx8, mut rx8) = oneshot::channel();
        lock(&shared.pending).insert(7, tx7);
        lock(&shared.pending).insert(8, tx8);
        let reply = HostResponse {
            reply_to: 8,
            reply: HostReply::Error {
                reason: "nope".into(),
            },
        };
        let bytes = Envelope::new(0, chrono::Utc::now(), reply)
            .to_cbor()
            .unwrap();
        on_publish(&shared, "host/svc/resp", "host/svc/resp", &bytes);
        // A duplicate reply (to a resend) finds no waiter and is dropped quietly.
        on_publish(&shared, "host/svc/resp", "host/svc/resp", &bytes);
        assert_eq!(
            rx8.try_recv().unwrap(),
            HostReply::Error {
                reason: "nope".into()
            }
        );
        assert!(rx7.try_recv().is_err(), "request 7 must still be waiting");
        assert_eq!(lock(&shared.pending).len(), 1);
    }

    #[test]
    fn job_views_reach_watch_and_garbage_does_not() {
        let (shared, rx) = shared(true);
        let mut rx = rx.unwrap();
        let bytes = Envelope::new(0, chrono::Utc::now(), view("J-1"))
            .to_cbor()
            .unwrap();
        on_publish(&shared, "host/svc/resp", "fleet/C1/jobs/J-1", &bytes);
        on_publish(&shared, "host/svc/resp", "fleet/C1/jobs/J-2", b"");
        on_publish(&shared, "host/svc/resp", "fleet/C1/jobs/J-3", b"\xff\x00");
        on_publish(&shared, "host/svc/resp", "fleet/C1/state", &bytes);
        assert_eq!(rx.try_recv().unwrap().id, "J-1");
        assert!(
            rx.try_recv().is_err(),
            "only the one valid view should arrive"
        );
    }

    #[test]
    fn only_broker_refusals_are_refusals() {
        assert!(HostError::Refused { reason: "x".into() }.is_refusal());
        let broker: BrokerUrl = "mqtts://localhost:1".parse().unwrap();
        let timeout = HostError::Timeout {
            broker: broker.clone(),
            what: "submit",
            secs: 1,
            tries: 1,
            down: String::new(),
        };
        assert!(!timeout.is_refusal());
        let e = HostError::Connect {
            broker,
            detail: "refused".into(),
            hint: hint(&ConnectionError::NetworkTimeout),
        };
        let text = e.to_string();
        assert!(
            text.contains("could not connect to mqtts://localhost:1")
                && text.contains("check --broker"),
            "{text}"
        );
    }

    #[test]
    fn a_refused_connack_says_what_to_do_for_its_code() {
        let busy = hint(&ConnectionError::ConnectionRefused(
            ConnectReturnCode::ServiceUnavailable,
        ));
        assert!(
            busy.contains("max_connections_per_identity") && busy.contains("max_clients"),
            "{busy}"
        );
        assert!(!busy.contains("refused this identity"), "{busy}");
        let denied = hint(&ConnectionError::ConnectionRefused(
            ConnectReturnCode::NotAuthorized,
        ));
        assert!(
            denied.contains("client id") && denied.contains("--cert"),
            "{denied}"
        );
        let odd = hint(&ConnectionError::ConnectionRefused(
            ConnectReturnCode::BadUserNamePassword,
        ));
        assert!(odd.contains("--broker"), "{odd}");
    }
}
