//! Chaos: fifty simulated copiers in five fleet processes run GET DATA and UPDATE DATA
//! jobs a host submits through the real CLI, and send a meter reading every two seconds, while the
//! test kills the broker with SIGKILL at random moments (restarting it on the same data directory
//! and port) and kills whole fleet processes (restarting them on their outboxes).
//!
//! The same storm runs on three tiers: the fleets connect to two child relays, the host to their
//! parent, and the test kills the parent, the children and the fleets.
//!
//! At the end: every job is in a final state, every message an agent saw acked (by the relay it
//! is connected to) is in the journal of the relay the host uses, every meter reading an agent
//! saw acked is stored there, and nothing is stored twice. The figures are printed as one JSON
//! line.
//!
//! The plan (the order of the kills, the pauses, which device gets which job) comes from a seed,
//! printed first; `CHUKEI_CHAOS_SEED=<seed>` replays the same plan. The processes' own timing is
//! the operating system's, so a replay is the same storm, not the same interleaving.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use broker::store::{RedbStore, Store};
use harness::chaos::{FleetSpec, Rng, acks_logged, ids_logged, start_broker};
use harness::{Broker, ENDS, Proc, TestEnv, deadline, poll_until, raw, secs};

const FLEETS: usize = 5;
const PER_FLEET: usize = 10;
/// How long jobs are submitted and processes killed.
const STORM: Duration = Duration::from_secs(40);
const BROKER_KILLS: usize = 6;
const AGENT_KILLS: usize = 6;

/// Short reconnect and resend periods so that the storm's outages are ridden out within seconds;
/// a meter reading every two seconds from every copier.
const FLEET_TOML: &str = "\
[session]
reconnect_min_secs = 1
reconnect_max_secs = 2
resend_min_secs = 1
resend_max_secs = 3

[report]
counters_every_secs = 2

[fleet]
connect_spread_ms = 500
";

#[derive(Debug, Clone, Copy)]
enum Kill {
    /// The relay the host uses: the only one, or the parent.
    Broker,
    /// A child relay (three tiers).
    Child(usize),
    Fleet(usize),
}

/// The children of the three-tier storm and the fleets each serves (fleet `i` is on child
/// `i % CHILDREN`).
const CHILDREN: usize = 2;

/// The relays of one storm: the one the host uses, and the children between it and the fleets
/// (none for one tier). Each keeps its data directory and port across kills.
struct Relays {
    top: Broker,
    top_addr: std::net::SocketAddr,
    top_dir: std::path::PathBuf,
    children: Vec<Broker>,
    child_addrs: Vec<std::net::SocketAddr>,
}

impl Relays {
    async fn start(env: &TestEnv, tiers: usize) -> Relays {
        let top_dir = env.path("broker-data");
        if tiers == 3 {
            let entries: String = (0..CHILDREN)
                .map(|j| {
                    let fleets: Vec<String> = (0..FLEETS)
                        .filter(|i| i % CHILDREN == j)
                        .map(|i| format!("\"F{i}-*\""))
                        .collect();
                    format!(
                        "[[relays]]\nid = \"R{j}\"\nserials = [{}]\n",
                        fleets.join(", ")
                    )
                })
                .collect();
            std::fs::write(env.path("parent.toml"), entries).unwrap_or_else(|e| panic!("{e}"));
            for j in 0..CHILDREN {
                pki::issue_relay_to_dir(env.pki().dir(), &format!("R{j}"), &[])
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
        let top = top_relay(env, tiers, None, &top_dir).await;
        let top_addr = top.addr();
        let mut relays = Relays {
            top,
            top_addr,
            top_dir,
            children: Vec::new(),
            child_addrs: Vec::new(),
        };
        if tiers == 3 {
            for j in 0..CHILDREN {
                let child = relays.child(env, j, None).await;
                relays.child_addrs.push(child.addr());
                relays.children.push(child);
            }
        }
        relays
    }

    async fn child(&self, env: &TestEnv, j: usize, addr: Option<std::net::SocketAddr>) -> Broker {
        let mut b = env
            .broker()
            .data_dir(env.path(format!("child-{j}")))
            .args(["--relay-id", &format!("R{j}"), "--parent", &self.top.url()])
            .args([
                "--uplink-batch-delay-ms",
                "50",
                "--metrics-listen",
                "127.0.0.1:0",
            ]);
        if let Some(addr) = addr {
            b = b.listen(addr);
        }
        b.start().await
    }

    /// Where fleet `i` connects.
    fn url_for_fleet(&self, i: usize) -> String {
        match self.children.get(i % CHILDREN.max(1)) {
            Some(child) => child.url(),
            None => self.top.url(),
        }
    }

    /// Waits until every child has handed everything it stored to the parent.
    async fn drained(&self) {
        for child in &self.children {
            poll_until(
                "a child's queue for the parent drained",
                secs(60),
                || async {
                    let m = raw::scrape(child.metrics_addr()).await;
                    let (waiting, up) = (
                        raw::sample(&m, "chukei_uplink_waiting"),
                        raw::sample(&m, "chukei_uplink_connected"),
                    );
                    if waiting == 0 && up == 1 {
                        Ok(())
                    } else {
                        Err(format!("{waiting} waiting, connected {up}"))
                    }
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// The relay the host uses: `broker run` on its data directory (and, on a restart, its port);
/// with three tiers, a parent configured with its children's `[[relays]]`.
async fn top_relay(
    env: &TestEnv,
    tiers: usize,
    addr: Option<std::net::SocketAddr>,
    data_dir: &Path,
) -> Broker {
    if tiers != 3 {
        return start_broker(env, addr, data_dir).await;
    }
    let mut b = env
        .broker()
        .data_dir(data_dir)
        .arg("--config")
        .arg(env.path("parent.toml"));
    if let Some(addr) = addr {
        b = b.listen(addr);
    }
    b.start().await
}

/// What the broker's store says, read from its redb file after it stopped.
#[derive(Default)]
struct Audit {
    jobs: usize,
    jobs_by_status: BTreeMap<String, usize>,
    not_final: Vec<String>,
    /// Acked messages missing from the journal.
    lost_messages: Vec<(String, u64)>,
    /// Acked meter readings not stored (per device: acked minus distinct stored).
    lost_reports: usize,
    /// Readings stored more than once, job results applied more than once.
    duplicated: usize,
    reports: usize,
}

fn audit(
    data_dir: &Path,
    acked: &BTreeSet<(String, u64)>,
    acked_reports: &BTreeMap<String, usize>,
    submitted: &[String],
) -> Audit {
    let store = RedbStore::open(data_dir)
        .unwrap_or_else(|e| panic!("opening the stopped broker's store: {e}"));
    audit_store(&store, acked, acked_reports, submitted)
}

/// [`audit`] on any store: a stopped relay's redb file, or a cluster's database.
fn audit_store(
    store: &dyn Store,
    acked: &BTreeSet<(String, u64)>,
    acked_reports: &BTreeMap<String, usize>,
    submitted: &[String],
) -> Audit {
    let txn = store.begin().unwrap_or_else(|e| panic!("{e}"));
    let mut a = Audit::default();
    for (serial, id) in acked {
        let entry = txn
            .journal(&format!("device:{serial}"), *id)
            .unwrap_or_else(|e| panic!("{e}"));
        if entry.is_none() {
            a.lost_messages.push((serial.clone(), *id));
        }
    }
    let jobs = txn
        .jobs_newest_first(&mut |_| true)
        .unwrap_or_else(|e| panic!("{e}"));
    a.jobs = jobs.len();
    let ids: BTreeSet<&str> = jobs.iter().map(|r| r.view.id.as_str()).collect();
    for id in submitted {
        assert!(
            ids.contains(id.as_str()),
            "job {id} was submitted (its id printed) but is not in the store"
        );
    }
    for record in &jobs {
        let status = record.view.status;
        *a.jobs_by_status.entry(status.to_string()).or_default() += 1;
        if !status.is_terminal() {
            a.not_final.push(format!("{} {status}", record.view.id));
        }
        let n = broker::store::job_number(&record.view.id)
            .unwrap_or_else(|| panic!("a stored job id {} the broker never gives", record.view.id));
        let events = txn.events(n).unwrap_or_else(|e| panic!("{e}"));
        let ends = events.iter().filter(|e| e.status.is_terminal()).count();
        // A final status applied twice (a resent result stored again) shows up as two ends.
        a.duplicated += ends.saturating_sub(1);
    }
    let from = chrono::Utc::now() - chrono::Duration::days(1);
    let to = chrono::Utc::now() + chrono::Duration::days(1);
    let (readings, next) = txn
        .readings(from, to, None, None, 10_000_000)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(next.is_none(), "more readings than one page");
    // A report is its (serial, read_at): the device's own clock, to the nanosecond.
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut per_job: BTreeMap<String, usize> = BTreeMap::new();
    for r in readings {
        if r.source == "report" {
            *seen.entry((r.serial, r.read_at.to_rfc3339())).or_default() += 1;
        } else {
            *per_job.entry(r.source).or_default() += 1;
        }
    }
    a.reports = seen.len();
    a.duplicated += seen.values().map(|n| n - 1).sum::<usize>();
    a.duplicated += per_job.values().map(|n| n - 1).sum::<usize>();
    let mut distinct: BTreeMap<&str, usize> = BTreeMap::new();
    for (serial, _) in seen.keys() {
        *distinct.entry(serial.as_str()).or_default() += 1;
    }
    for (serial, n) in acked_reports {
        a.lost_reports += n.saturating_sub(distinct.get(serial.as_str()).copied().unwrap_or(0));
    }
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_survives_broker_and_agent_sigkills_without_loss_or_duplicates() {
    storm("chaos", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_tiers_survive_parent_child_and_agent_sigkills_without_loss_or_duplicates() {
    storm("chaos-tree", 3).await;
}

/// The storm on `tiers` tiers: 1 (fleets → relay ← host) or 3 (fleets → children → parent ←
/// host).
async fn storm(name: &str, tiers: usize) {
    let (mut plan, seed) = Rng::from_env();
    eprintln!("chaos seed {seed} (replay with CHUKEI_CHAOS_SEED={seed})");
    let env = TestEnv::new(name);
    let mut relays = Relays::start(&env, tiers).await;
    let host = env.host("svc", &relays.top);

    let mut specs: Vec<FleetSpec> = (0..FLEETS)
        .map(|i| FleetSpec::new(&env, &format!("F{i}"), PER_FLEET, FLEET_TOML))
        .collect();
    let mut fleets: Vec<Proc> = Vec::with_capacity(FLEETS);
    for (i, spec) in specs.iter_mut().enumerate() {
        fleets.push(spec.start(&env, &relays.url_for_fleet(i), true).await);
    }
    let started = Instant::now();

    // The plan: the kills in a seeded order, with seeded pauses that fit the storm. With three
    // tiers, half of the relay kills are the parent's and half a child's.
    let mut kills: Vec<Kill> = Vec::with_capacity(BROKER_KILLS + AGENT_KILLS);
    for k in 0..BROKER_KILLS {
        kills.push(match tiers {
            3 if k % 2 == 1 => Kill::Child(plan.below(CHILDREN as u64) as usize),
            _ => Kill::Broker,
        });
    }
    for _ in 0..AGENT_KILLS {
        kills.push(Kill::Fleet(plan.below(FLEETS as u64) as usize));
    }
    for i in (1..kills.len()).rev() {
        let j = plan.below(i as u64 + 1) as usize;
        kills.swap(i, j);
    }
    let pause = STORM / (kills.len() as u32 + 1);
    let pauses: Vec<Duration> = kills
        .iter()
        .map(|_| plan.between(pause / 2, pause * 3 / 2))
        .collect();
    let downtimes: Vec<Duration> = kills
        .iter()
        .map(|_| plan.between(Duration::from_millis(100), Duration::from_millis(1500)))
        .collect();
    eprintln!("plan: {kills:?}");
    let mut jobs_plan = Rng::new(plan.next_u64());

    // Jobs, one after another, through the CLI, until the storm ends.
    let submitting = async {
        let mut submitted = Vec::new();
        let mut refused = 0usize;
        while started.elapsed() < STORM {
            let serial = format!(
                "F{}-{:05}",
                jobs_plan.below(FLEETS as u64),
                jobs_plan.below(PER_FLEET as u64)
            );
            let density = format!("adjustment.density={}", 1 + jobs_plan.below(9));
            let args: Vec<&str> = if jobs_plan.below(2) == 0 {
                vec!["jobs", "submit", "--serial", &serial, "--kind", "get-data"]
            } else {
                vec![
                    "jobs",
                    "submit",
                    "--serial",
                    &serial,
                    "--kind",
                    "update-data",
                    "--set",
                    &density,
                ]
            };
            let out = host.run(&args).await;
            if out.success() {
                submitted.push(out.stdout.trim().to_owned());
            } else {
                // The broker died under the request and stayed down past the CLI's patience; a
                // host resubmits then. Whether it was stored is checked at the end.
                if refused == 0 {
                    eprintln!(
                        "first failed submission (expected while the broker is down):\n{out}"
                    );
                }
                refused += 1;
            }
            // Pacing, not synchronisation: a service desk's rate, not a benchmark's.
            tokio::time::sleep(
                jobs_plan.between(Duration::from_millis(50), Duration::from_millis(250)),
            )
            .await;
        }
        (submitted, refused)
    };

    // The kills.
    let mut dead_logs: Vec<String> = Vec::new();
    let killing = async {
        let (mut broker_kills, mut agent_kills) = (0usize, 0usize);
        for ((kill, pause), down) in kills.iter().zip(&pauses).zip(&downtimes) {
            tokio::time::sleep(*pause).await;
            match *kill {
                Kill::Broker => {
                    relays.top.kill9().await;
                    broker_kills += 1;
                    tokio::time::sleep(*down).await;
                    relays.top =
                        top_relay(&env, tiers, Some(relays.top_addr), &relays.top_dir).await;
                }
                Kill::Child(j) => {
                    relays.children[j].kill9().await;
                    broker_kills += 1;
                    tokio::time::sleep(*down).await;
                    let addr = relays.child_addrs[j];
                    relays.children[j] = relays.child(&env, j, Some(addr)).await;
                }
                Kill::Fleet(i) => {
                    fleets[i].kill9().await;
                    dead_logs.push(fleets[i].log());
                    agent_kills += 1;
                    tokio::time::sleep(*down).await;
                    let url = relays.url_for_fleet(i);
                    fleets[i] = specs[i].start(&env, &url, false).await;
                }
            }
        }
        (broker_kills, agent_kills)
    };
    let ((submitted, refused), (broker_kills, agent_kills)) = tokio::join!(submitting, killing);
    eprintln!(
        "storm over after {:?}: {} jobs submitted, {refused} submissions failed",
        started.elapsed(),
        submitted.len()
    );

    // Settle: every fleet connected, every job ended, every reading queued so far acked.
    for fleet in &fleets {
        fleet
            .wait_for_log("fleet connected and subscribed", deadline())
            .await;
    }
    every_job_final(&host).await;
    let all_logs = |fleets: &[Proc]| -> Vec<String> {
        dead_logs
            .iter()
            .cloned()
            .chain(fleets.iter().map(Proc::log))
            .collect()
    };
    every_reading_acked(|| all_logs(&fleets)).await;

    // What the children acked is at the parent once their queues are empty; the fleets stop
    // first, or a reading acked after the check would still wait at its child.
    for fleet in &mut fleets {
        fleet.stop().await;
    }
    relays.drained().await;
    for child in &mut relays.children {
        assert!(child.stop().await.success(), "a child exits cleanly");
    }
    assert!(
        relays.top.stop().await.success(),
        "the broker exits cleanly"
    );
    let Acked {
        acked,
        acked_reports,
        rejected,
    } = acked(&all_logs(&fleets));
    let a = audit(&relays.top_dir, &acked, &acked_reports, &submitted);
    let lost = a.lost_messages.len() + a.lost_reports;
    let figures = serde_json::json!({
        "seed": seed,
        "tiers": tiers,
        "devices": FLEETS * PER_FLEET,
        "jobs": a.jobs,
        "jobs_by_status": a.jobs_by_status,
        "submissions_failed": refused,
        "reports": a.reports,
        "acked_messages": acked.len(),
        "rejected_acks": rejected,
        "broker_kills": broker_kills,
        "agent_kills": agent_kills,
        "lost": lost,
        "duplicated": a.duplicated,
        "secs": started.elapsed().as_secs(),
    });
    println!("{figures}");
    assert!(broker_kills >= 5 && agent_kills >= 1, "{figures}");
    assert!(
        a.jobs > 0 && a.reports > 0,
        "the storm did no work: {figures}"
    );
    assert!(
        a.not_final.is_empty(),
        "jobs not in a final state: {:?}",
        a.not_final
    );
    assert!(
        a.lost_messages.is_empty(),
        "acked but not in the broker's journal: {:?}",
        a.lost_messages
    );
    assert_eq!(lost, 0, "{figures}");
    assert_eq!(a.duplicated, 0, "{figures}");
}

/// The fleets of the cluster storm: as [`FLEET_TOML`], and the nodes are one system.
const CLUSTER_FLEET_TOML: &str = "\
[session]
reconnect_min_secs = 1
reconnect_max_secs = 2
resend_min_secs = 1
resend_max_secs = 3
one_tree = true

[report]
counters_every_secs = 2

[fleet]
connect_spread_ms = 500
";

/// Nodes of the cluster storm, NATS servers of its bus, and kills of each.
const NODES: usize = 3;
const NODE_KILLS: usize = 5;
const BUS_KILLS: usize = 2;

/// Waits until every meter reading the fleets' logs (`logs()`, read again on each try) say was
/// queued has been acked.
async fn every_reading_acked(logs: impl Fn() -> Vec<String>) {
    let queued = ids_logged(&logs(), "meter reading queued");
    poll_until("every queued meter reading acked", deadline(), || async {
        let acked = ids_logged(&logs(), "ack received");
        let missing = queued.difference(&acked).count();
        if missing == 0 {
            Ok(())
        } else {
            Err(format!("{missing} of {} not acked yet", queued.len()))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// What the fleets' logs say the relays acked.
struct Acked {
    /// (serial, message id) of every message acked `stored` or `duplicate`.
    acked: BTreeSet<(String, u64)>,
    /// Per serial, how many of its queued meter readings were acked.
    acked_reports: BTreeMap<String, usize>,
    /// Acks that said `rejected`.
    rejected: usize,
}

fn acked(logs: &[String]) -> Acked {
    let queued = ids_logged(logs, "meter reading queued");
    let acks = acks_logged(logs);
    let rejected = acks.iter().filter(|(_, _, o)| o == "rejected").count();
    let acked: BTreeSet<(String, u64)> = acks
        .iter()
        .filter(|(_, _, o)| o != "rejected")
        .map(|(s, id, _)| (s.clone(), *id))
        .collect();
    let mut acked_reports: BTreeMap<String, usize> = BTreeMap::new();
    for (serial, id) in &queued {
        if acked.contains(&(serial.clone(), *id)) {
            *acked_reports.entry(serial.clone()).or_default() += 1;
        }
    }
    Acked {
        acked,
        acked_reports,
        rejected,
    }
}

/// Waits until every job the host's relay lists is in a final state (a relay still reconnecting
/// to its store refuses the listing meanwhile: asked again).
async fn every_job_final(host: &harness::Host) {
    poll_until("every job in a final state", secs(90), || async {
        let jobs = host.try_list_json(true).await?;
        let open: Vec<String> = jobs
            .iter()
            .filter(|j| !ENDS.contains(&j["status"].as_str().unwrap_or("")))
            .map(|j| format!("{} {} {}", j["id"], j["serial"], j["status"]))
            .collect();
        if open.is_empty() {
            Ok(())
        } else {
            Err(format!("{} open: {open:?}", open.len()))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

#[derive(Debug, Clone, Copy)]
enum ClusterKill {
    Node(usize),
    Bus(usize),
    Fleet(usize),
    /// The PostgreSQL primary stopped at once and its synchronous standby promoted, as an
    /// operator or Patroni would (once per storm).
    Primary,
}

/// The storm on a cluster: three nodes on one PostgreSQL with a synchronous standby and a
/// three-server NATS cluster; each fleet prefers its own node and knows them all. The test kills
/// nodes, NATS servers and fleets, and once the PostgreSQL primary (promoting the standby); the
/// host is on N0. The audit reads the cluster's database, on the promoted server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_survives_node_bus_and_agent_sigkills_without_loss_or_duplicates() {
    use harness::nats::Nats;
    use harness::postgres::Postgres;

    let (mut plan, seed) = Rng::from_env();
    eprintln!("chaos seed {seed} (replay with CHUKEI_CHAOS_SEED={seed})");
    let env = TestEnv::new("chaos-cluster");
    let (primary, _) = Postgres::with_schema(&env).await;
    let standby = primary.start_standby(&env, "standby");
    // Both servers in one URL: a node uses whichever takes writes.
    let url = format!(
        "postgresql://postgres@127.0.0.1:{},127.0.0.1:{}/chukei?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let mut bus = Nats::start_cluster(&env, 3).await;
    let bus_urls: Vec<String> = bus.iter().map(Nats::url).collect();
    let start_node = |i: usize, addr: Option<std::net::SocketAddr>| {
        let mut b = env.broker().data_dir(env.path(format!("N{i}"))).args([
            "--node-id",
            &format!("N{i}"),
            "--cluster-db",
            &url,
        ]);
        for u in &bus_urls {
            b = b.args(["--cluster-bus", u]);
        }
        if let Some(addr) = addr {
            b = b.listen(addr);
        }
        b.start()
    };
    let mut nodes = Vec::with_capacity(NODES);
    for i in 0..NODES {
        nodes.push(start_node(i, None).await);
    }
    let addrs: Vec<std::net::SocketAddr> = nodes.iter().map(Broker::addr).collect();
    let urls: Vec<String> = nodes.iter().map(Broker::url).collect();
    // Fleet i prefers node i % NODES, then the others.
    let prefers =
        |i: usize| -> Vec<String> { (0..NODES).map(|k| urls[(i + k) % NODES].clone()).collect() };
    let host = env.host("svc", &nodes[0]);
    let mut specs: Vec<FleetSpec> = (0..FLEETS)
        .map(|i| FleetSpec::new(&env, &format!("F{i}"), PER_FLEET, CLUSTER_FLEET_TOML))
        .collect();
    let mut fleets: Vec<Proc> = Vec::with_capacity(FLEETS);
    for (i, spec) in specs.iter_mut().enumerate() {
        fleets.push(spec.start_on(&env, &prefers(i), true).await);
    }
    let started = Instant::now();

    let mut kills: Vec<ClusterKill> = Vec::new();
    kills.extend((0..NODE_KILLS).map(|_| ClusterKill::Node(plan.below(NODES as u64) as usize)));
    kills.extend((0..BUS_KILLS).map(|_| ClusterKill::Bus(plan.below(3) as usize)));
    kills.extend((0..AGENT_KILLS).map(|_| ClusterKill::Fleet(plan.below(FLEETS as u64) as usize)));
    kills.push(ClusterKill::Primary);
    for i in (1..kills.len()).rev() {
        let j = plan.below(i as u64 + 1) as usize;
        kills.swap(i, j);
    }
    let pause = STORM / (kills.len() as u32 + 1);
    let pauses: Vec<Duration> = kills
        .iter()
        .map(|_| plan.between(pause / 2, pause * 3 / 2))
        .collect();
    let downtimes: Vec<Duration> = kills
        .iter()
        .map(|_| plan.between(Duration::from_millis(100), Duration::from_millis(1500)))
        .collect();
    eprintln!("plan: {kills:?}");
    let mut jobs_plan = Rng::new(plan.next_u64());

    let submitting = async {
        let mut submitted = Vec::new();
        let mut refused = 0usize;
        while started.elapsed() < STORM {
            let serial = format!(
                "F{}-{:05}",
                jobs_plan.below(FLEETS as u64),
                jobs_plan.below(PER_FLEET as u64)
            );
            let out = host
                .run(["jobs", "submit", "--serial", &serial, "--kind", "get-data"])
                .await;
            if out.success() {
                submitted.push(out.stdout.trim().to_owned());
            } else {
                refused += 1;
            }
            tokio::time::sleep(
                jobs_plan.between(Duration::from_millis(50), Duration::from_millis(250)),
            )
            .await;
        }
        (submitted, refused)
    };
    let mut dead_logs: Vec<String> = Vec::new();
    let killing = async {
        let mut done = BTreeMap::<&str, usize>::new();
        for ((kill, pause), down) in kills.iter().zip(&pauses).zip(&downtimes) {
            tokio::time::sleep(*pause).await;
            match *kill {
                ClusterKill::Node(i) => {
                    nodes[i].kill9().await;
                    tokio::time::sleep(*down).await;
                    nodes[i] = start_node(i, Some(addrs[i])).await;
                    *done.entry("node").or_default() += 1;
                }
                ClusterKill::Bus(i) => {
                    bus[i].kill9().await;
                    tokio::time::sleep(*down).await;
                    bus[i].restart(&env).await;
                    *done.entry("bus").or_default() += 1;
                }
                ClusterKill::Fleet(i) => {
                    fleets[i].kill9().await;
                    dead_logs.push(fleets[i].log());
                    tokio::time::sleep(*down).await;
                    fleets[i] = specs[i].start_on(&env, &prefers(i), false).await;
                    *done.entry("fleet").or_default() += 1;
                }
                ClusterKill::Primary => {
                    primary.stop();
                    tokio::time::sleep(*down).await;
                    standby.promote();
                    *done.entry("postgres_primary").or_default() += 1;
                }
            }
        }
        done
    };
    let ((submitted, refused), done) = tokio::join!(submitting, killing);
    eprintln!(
        "storm over after {:?}: {} jobs submitted, {refused} submissions failed",
        started.elapsed(),
        submitted.len()
    );

    for fleet in &fleets {
        fleet
            .wait_for_log("fleet connected and subscribed", deadline())
            .await;
    }
    every_job_final(&host).await;
    let all_logs = |fleets: &[Proc]| -> Vec<String> {
        dead_logs
            .iter()
            .cloned()
            .chain(fleets.iter().map(Proc::log))
            .collect()
    };
    every_reading_acked(|| all_logs(&fleets)).await;
    for fleet in &mut fleets {
        fleet.stop().await;
    }
    for node in &mut nodes {
        assert!(node.stop().await.success(), "a node exits cleanly");
    }

    let Acked {
        acked,
        acked_reports,
        ..
    } = acked(&all_logs(&fleets));
    let store = broker::store::PgStore::open(&url)
        .unwrap_or_else(|e| panic!("opening the cluster's database: {e}"));
    let a = audit_store(&store, &acked, &acked_reports, &submitted);
    let lost = a.lost_messages.len() + a.lost_reports;
    let figures = serde_json::json!({
        "seed": seed,
        "topology": "cluster",
        "nodes": NODES,
        "devices": FLEETS * PER_FLEET,
        "jobs": a.jobs,
        "jobs_by_status": a.jobs_by_status,
        "submissions_failed": refused,
        "reports": a.reports,
        "acked_messages": acked.len(),
        "kills": done,
        "lost": lost,
        "duplicated": a.duplicated,
        "secs": started.elapsed().as_secs(),
    });
    println!("{figures}");
    assert!(
        a.jobs > 0 && a.reports > 0,
        "the storm did no work: {figures}"
    );
    assert!(
        a.not_final.is_empty(),
        "jobs not in a final state: {:?}",
        a.not_final
    );
    assert!(
        a.lost_messages.is_empty(),
        "acked but not in the cluster's journal: {:?}",
        a.lost_messages
    );
    assert_eq!(lost, 0, "{figures}");
    assert_eq!(a.duplicated, 0, "{figures}");
}
