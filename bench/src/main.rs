//! `bench`: measures chukei side by side with bare rumqttd and Mosquitto (`bench/RESULTS.md`).
//!
//! Every relay runs as its own process on loopback; the load comes from separate load processes
//! (`bench load`, started by this one), each holding up to a few thousand connections as futures
//! driven by a handful of tasks, from several 127.0.0.x source addresses. Each scenario prints one
//! JSON object on stdout. See bench/RESULTS.md for the figures on this machine.

mod client;
mod delay;
mod engines;
mod fleet;
mod hist;
mod mqtt;
mod procfs;
mod scenarios;
mod servers;
mod tls;
mod worker;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::fleet::LoadShape;
use crate::scenarios::{Env, alarm, cluster, fanout, idle, pubsub, reports, rollout, storm, tree};
use crate::worker::ReportKind;

/// Measure chukei against bare rumqttd and Mosquitto, one scenario at a time.
///
/// Each scenario runs against every target it applies to, one after the other, and prints one
/// JSON object (parameters, figures per target, ratios, versions, the machine). Scenarios that
/// need chukei's acks and views (durable-reports, alarm-latency, job-fanout) run on chukei only.
#[derive(Debug, Parser)]
#[command(name = "bench", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Global {
    /// Relays to measure: chukei, rumqttd-tls, rumqttd-plain, mosquitto, or chukei@NAME=PATH for
    /// another chukei build (e.g. the one before an optimisation) under NAME.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = "chukei,rumqttd-tls,rumqttd-plain,mosquitto"
    )]
    targets: Vec<String>,
    /// Keep the working files (CA, data, logs) here instead of a temporary folder.
    #[arg(long, global = true, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Devices per load process (each process may hold at most 20,000 open files). Fewer,
    /// larger processes take less CPU from the relays measured.
    #[arg(long, global = true, default_value_t = fleet::DEFAULT_PER_PROCESS)]
    per_process: u32,
    /// Connection attempts in flight over all load processes.
    #[arg(long, global = true, default_value_t = 600)]
    concurrency: usize,
    /// Extra environment for one target's process, NAME:KEY=VALUE (repeatable), e.g.
    /// `after-je:LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2`.
    #[arg(long = "env", global = true, value_name = "NAME:KEY=VALUE")]
    envs: Vec<String>,
    /// An extra `broker run` argument for one chukei target, NAME:ARG (repeatable), e.g.
    /// `--targets chukei,chukei@no-tickets=target/release/broker --arg no-tickets:--tls-tickets=false`.
    #[arg(long = "arg", global = true, value_name = "NAME:ARG")]
    args: Vec<String>,
    /// Also append each JSON object, as one line, to this file.
    #[arg(long, global = true, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Pretty-print the JSON on stdout.
    #[arg(long, global = true)]
    pretty: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Ramp N mTLS devices that subscribe and stay idle: memory per connection, connect rate, CPU.
    IdleConnections {
        #[arg(long, default_value_t = 19_000)]
        devices: u32,
        /// How long to measure idle CPU once all are connected.
        #[arg(long, default_value_t = 10)]
        idle_secs: u64,
        /// Each device publishes its state once per session, as the real agent does.
        #[arg(long)]
        announce: bool,
    },
    /// N devices connected, the relay restarts: time until all are back and subscribed.
    ReconnectStorm {
        #[arg(long, default_value_t = 19_000)]
        devices: u32,
        /// Each device publishes its state once per session, as the real agent does.
        #[arg(long)]
        announce: bool,
        /// Devices connect with a clean session and subscribe on every connection, as the agent
        /// did before persistent sessions. By default they connect as the agent does:
        /// `clean_session` 0, and no SUBSCRIBE when the broker resumes the session (a broker
        /// that keeps no sessions across its restart answers "no session", and they subscribe).
        #[arg(long)]
        clean_sessions: bool,
    },
    /// K devices send reports through the outbox/ack path: acked reports/s, ack latency, and a
    /// check after a restart that the store holds every report exactly once (chukei only).
    DurableReports {
        #[arg(long, default_value_t = 1_000)]
        devices: u32,
        /// Unacked reports per device in the max phase.
        #[arg(long, default_value_t = 32)]
        window: usize,
        /// Length of each measured phase.
        #[arg(long, default_value_t = 15)]
        secs: u64,
        /// Total reports/s offered in each paced phase, one phase per rate.
        #[arg(long, value_delimiter = ',', default_value = "2000,5000,10000,20000")]
        rates: Vec<f64>,
        /// What each report is: a state announcement with new firmware (rewrites the device's
        /// record and view) or a counters reading (appends a row to the readings table).
        #[arg(long, value_enum, default_value_t = ReportKind::State)]
        report: ReportKind,
    },
    /// A device's alarm to a host and an integrator under background load: p50/p99 (chukei only).
    AlarmLatency {
        /// Idle devices in the background.
        #[arg(long, default_value_t = 15_000)]
        idle: u32,
        /// Devices sending durable reports in the background.
        #[arg(long, default_value_t = 1_000)]
        reporters: u32,
        /// Their total reports/s.
        #[arg(long, default_value_t = 10_000.0)]
        report_rate: f64,
        #[arg(long, default_value_t = 200)]
        samples: u32,
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
        /// Devices at a child relay, host and integrator at its parent.
        #[arg(long)]
        through_child: bool,
    },
    /// One host submits a job to each of M devices: time until all have it and all have acked
    /// (chukei only).
    JobFanout {
        #[arg(long, default_value_t = 10_000)]
        devices: u32,
    },
    /// A rollout to M devices in four waves (no rate limit) beside M single jobs on a fresh
    /// relay: time until all succeeded, and relay CPU (chukei only).
    Rollout {
        #[arg(long, default_value_t = 10_000)]
        devices: u32,
    },
    /// A cluster of relay nodes on one PostgreSQL and a 3-server NATS bus, all started here:
    /// closed-loop acked reports/s; N × D devices sending paced reports (ack p99) with alarms
    /// timed from one node to a host on another; GET DATA to M devices over the nodes (chukei
    /// only; needs Debian's postgresql and nats-server).
    Cluster {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        #[arg(long, default_value_t = 19_000)]
        devices_per_node: u32,
        /// Length of the max and the paced phase.
        #[arg(long, default_value_t = 15)]
        secs: u64,
        /// Total counters reports/s the paced devices offer.
        #[arg(long, default_value_t = 20_000.0)]
        rate: f64,
        /// Run PostgreSQL with a synchronous standby (every commit on two servers).
        #[arg(long)]
        standby: bool,
        /// The nodes reach PostgreSQL and NATS over TLS with certificates both ways
        /// (sslmode=verify-full and certificate login; NATS --tlsverify), as across a network.
        #[arg(long)]
        tls: bool,
        /// Microseconds the nodes' connections to PostgreSQL are held each way, as across a
        /// network (a relay in the bench adds them; 250 makes a round trip 0.5 ms longer).
        #[arg(long, default_value_t = 0)]
        db_delay_us: u64,
        #[arg(long, default_value_t = 10_000)]
        fanout: u32,
        /// Closed-loop devices per node in the max phase.
        #[arg(long, default_value_t = 1_000)]
        max_devices_per_node: u32,
        /// Unacked reports per device in the max phase.
        #[arg(long, default_value_t = 32)]
        window: usize,
        #[arg(long, default_value_t = 200)]
        alarm_samples: u32,
        #[arg(long, default_value_t = 50)]
        alarm_interval_ms: u64,
    },
    /// Child and parent relays: C children × D devices behind one parent, and a flat relay with
    /// D devices beside it: connect, memory per device, GET DATA to all (chukei only).
    Tree {
        #[arg(long, default_value_t = 5)]
        children: u32,
        #[arg(long, default_value_t = 19_000)]
        devices_per_child: u32,
    },
    /// Child relays carrying steady reports: C children × D devices each sending a counters
    /// report a second; upstream messages per report at the parent (chukei only).
    TreeReports {
        #[arg(long, default_value_t = 5)]
        children: u32,
        #[arg(long, default_value_t = 200)]
        devices_per_child: u32,
        #[arg(long, default_value_t = 30)]
        secs: u64,
    },
    /// QoS 1 publish → subscribe through each relay, same payloads, same TLS.
    PubsubThroughput {
        #[arg(long, default_value_t = 10)]
        devices: u32,
        /// Messages in flight end to end per device.
        #[arg(long, default_value_t = 100)]
        window: usize,
        #[arg(long, default_value_t = 100)]
        payload: usize,
        #[arg(long, default_value_t = 10)]
        secs: u64,
    },
    /// Every scenario at full size (what this machine allows), or tiny with --smoke.
    All {
        /// Tiny sizes: checks that the harness works, says nothing about performance.
        #[arg(long)]
        smoke: bool,
    },
    /// A load process; started by bench itself.
    #[command(hide = true)]
    Load {
        #[arg(long)]
        spec: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A load process runs on one thread: the orchestrator starts several, which is where the
    // parallelism comes from, and one thread spares each device's wake-up the hand-over between
    // worker threads (measured: 8–15 % less CPU per paced report, bench/RESULTS.md).
    let rt = if matches!(cli.command, Command::Load { .. }) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(real_main(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    if let Command::Load { spec } = &cli.command {
        let spec = serde_json::from_str(spec)?;
        return worker::run(spec).await;
    }
    let g = &cli.global;
    let mut targets = servers::parse_targets(&g.targets)?;
    servers::apply_env(&mut targets, &g.envs)?;
    servers::apply_args(&mut targets, &g.args)?;
    let shape = LoadShape {
        per_process: g.per_process,
        concurrency: g.concurrency,
        ..LoadShape::default()
    };
    let env = Env::new(g.dir.as_deref(), shape)?;
    let emit = |v: Value| -> anyhow::Result<()> {
        let line = serde_json::to_string(&v)?;
        if let Some(path) = &g.out {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            writeln!(f, "{line}")?;
        }
        let mut out = std::io::stdout().lock();
        if g.pretty {
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        } else {
            writeln!(out, "{line}")?;
        }
        out.flush()?;
        Ok(())
    };
    match cli.command {
        Command::IdleConnections {
            devices,
            idle_secs,
            announce,
        } => emit(idle::run(&env, &targets, devices, idle_secs, announce).await?),
        Command::ReconnectStorm {
            devices,
            announce,
            clean_sessions,
        } => emit(storm::run(&env, &targets, devices, announce, !clean_sessions).await?),
        Command::DurableReports {
            devices,
            window,
            secs,
            rates,
            report,
        } => emit(
            reports::run(
                &env,
                &targets,
                reports::Params {
                    devices,
                    window,
                    secs,
                    rates,
                    report,
                },
            )
            .await?,
        ),
        Command::AlarmLatency {
            idle,
            reporters,
            report_rate,
            samples,
            interval_ms,
            through_child,
        } => emit(
            alarm::run(
                &env,
                &targets,
                alarm::Params {
                    idle,
                    reporters,
                    report_rate,
                    samples,
                    interval_ms,
                    through_child,
                },
            )
            .await?,
        ),
        Command::JobFanout { devices } => emit(fanout::run(&env, &targets, devices).await?),
        Command::Rollout { devices } => emit(rollout::run(&env, &targets, devices).await?),
        Command::Cluster {
            nodes,
            devices_per_node,
            secs,
            rate,
            standby,
            tls,
            db_delay_us,
            fanout,
            max_devices_per_node,
            window,
            alarm_samples,
            alarm_interval_ms,
        } => emit(
            cluster::run(
                &env,
                &targets,
                cluster::Params {
                    nodes,
                    per_node: devices_per_node,
                    secs,
                    rate,
                    standby,
                    tls,
                    db_delay: std::time::Duration::from_micros(db_delay_us),
                    fanout,
                    max_devices_per_node,
                    window,
                    alarm_samples,
                    alarm_interval_ms,
                },
            )
            .await?,
        ),
        Command::Tree {
            children,
            devices_per_child,
        } => emit(tree::run(&env, &targets, children, devices_per_child).await?),
        Command::TreeReports {
            children,
            devices_per_child,
            secs,
        } => emit(tree::reports(&env, &targets, children, devices_per_child, secs).await?),
        Command::PubsubThroughput {
            devices,
            window,
            payload,
            secs,
        } => emit(
            pubsub::run(
                &env,
                &targets,
                pubsub::Params {
                    devices,
                    window,
                    payload,
                    secs,
                },
            )
            .await?,
        ),
        Command::All { smoke } => {
            let s = |small: u32, full: u32| if smoke { small } else { full };
            for announce in [false, true] {
                let idle_secs = if smoke { 1 } else { 10 };
                emit(idle::run(&env, &targets, s(40, 19_000), idle_secs, announce).await?)?;
                emit(storm::run(&env, &targets, s(40, 19_000), announce, true).await?)?;
            }
            let secs = if smoke { 2 } else { 15 };
            for report in [ReportKind::State, ReportKind::Counters] {
                emit(
                    reports::run(
                        &env,
                        &targets,
                        reports::Params {
                            devices: s(10, 1_000),
                            window: if smoke { 4 } else { 32 },
                            secs,
                            rates: if smoke {
                                vec![50.0]
                            } else {
                                vec![2_000.0, 5_000.0, 10_000.0, 20_000.0]
                            },
                            report,
                        },
                    )
                    .await?,
                )?;
            }
            emit(
                alarm::run(
                    &env,
                    &targets,
                    alarm::Params {
                        idle: s(20, 15_000),
                        reporters: s(10, 1_000),
                        report_rate: if smoke { 100.0 } else { 10_000.0 },
                        samples: s(10, 200),
                        interval_ms: if smoke { 20 } else { 50 },
                        through_child: false,
                    },
                )
                .await?,
            )?;
            emit(fanout::run(&env, &targets, s(20, 10_000)).await?)?;
            emit(
                pubsub::run(
                    &env,
                    &targets,
                    pubsub::Params {
                        devices: s(4, 10),
                        window: if smoke { 10 } else { 100 },
                        payload: 100,
                        secs,
                    },
                )
                .await?,
            )
        }
        Command::Load { .. } => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn targets_parse_including_another_chukei_build() {
        let t =
            servers::parse_targets(&["chukei".into(), "chukei@before=/tmp/broker".into()]).unwrap();
        assert_eq!(t[1].name, "before");
        assert_eq!(t[1].binary, PathBuf::from("/tmp/broker"));
        assert!(servers::parse_targets(&["bogus".into()]).is_err());
    }
}
