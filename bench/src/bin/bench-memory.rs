//! `bench-memory`: what each layer of an idle chukei session costs in heap bytes, measured with a
//! counting allocator rather than guessed from RSS:
//!
//! - rumqttd's router state for one local link subscribed to a device's two filters (both halves:
//!   what the router keeps and the `LinkTx`/`LinkRx` the gateway holds);
//! - a rustls server connection after the mTLS handshake and one small record each way, with
//!   rustls' default ticket settings and with the gateway's (no tickets).
//!
//! Prints one JSON object. The rest of a session (the gateway's task and buffers, its tracing
//! span) is what chukei's measured RSS per connection leaves over; see bench/RESULTS.md.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use clap::Parser;
use rumqttd::{Broker, Config, RouterConfig};
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection};

struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

/// Resident memory of this process in bytes: what is actually touched, unlike heap bytes asked
/// for (rumqttd reserves large buffers per link that mostly stay untouched).
fn rss() -> i64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Heap bytes asked for and resident bytes, per item.
fn per_item(heap: i64, rss: i64, n: usize) -> serde_json::Value {
    serde_json::json!({
        "heap_bytes": (heap as f64 / n as f64).round(),
        "rss_bytes": (rss as f64 / n as f64).round(),
    })
}

#[derive(Debug, Parser)]
#[command(
    name = "bench-memory",
    about = "Heap bytes per idle session, layer by layer"
)]
struct Cli {
    /// How many of each to create (the figure is the average).
    #[arg(long, default_value_t = 2_000)]
    n: usize,
    /// A scratch folder for the CA.
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let temp = tempfile::tempdir()?;
    let dir = cli.dir.unwrap_or_else(|| temp.path().to_owned());
    let pki_dir = dir.join("pki");
    if !pki_dir.join(pki::CA_CERT).exists() {
        pki::init(&pki_dir, &[])?;
    }
    let links = router_links(cli.n)?;
    let server = pki::server_config(&pki_dir)?;
    let mut no_tickets = (*server).clone();
    no_tickets.send_tls13_tickets = 0;
    no_tickets.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    let tls_default = tls_sessions(&pki_dir, server, cli.n.min(2_000), handshake)?;
    let no_tickets = Arc::new(no_tickets);
    let tls_gateway = tls_sessions(&pki_dir, no_tickets.clone(), cli.n.min(2_000), handshake)?;
    let tls_unbuffered =
        tls_sessions(&pki_dir, no_tickets, cli.n.min(2_000), unbuffered_handshake)?;
    let out = serde_json::json!({
        "rumqttd_local_link": links,
        "rustls_server_session_default": tls_default,
        "rustls_server_session_no_tickets": tls_gateway,
        "rustls_unbuffered_server_session_no_tickets": tls_unbuffered,
        "sizes": {
            "rumqttd_packet": std::mem::size_of::<rumqttd::protocol::Packet>(),
            "rumqttd_notification": std::mem::size_of::<rumqttd::Notification>(),
            "rustls_server_connection": std::mem::size_of::<ServerConnection>(),
            "tokio_rustls_server_stream": std::mem::size_of::<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>(),
        },
        "n": cli.n,
    });
    println!("{out}");
    Ok(())
}

/// Heap bytes per local link with a device's two subscriptions, router side included.
fn router_links(n: usize) -> anyhow::Result<serde_json::Value> {
    let broker = Broker::new(Config {
        router: RouterConfig {
            max_connections: n + 64,
            max_outgoing_packet_count: 200,
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 8,
            ..Default::default()
        },
        ..Default::default()
    });
    // Warm up: the router's first link and first filters allocate shared structures.
    let mut keep = Vec::with_capacity(n + 1);
    let (mut tx, rx) = broker.link("warmup")?;
    tx.subscribe("dev/warmup/jobs/+")?;
    keep.push((tx, rx));
    settle_router(&broker)?;
    let (before, rss_before) = (live(), rss());
    for i in 0..n {
        let serial = format!("B{i:06}");
        let (mut tx, rx) = broker.link(&serial)?;
        tx.subscribe(protocol::topic::dev_jobs_filter(&protocol::Serial::parse(
            &serial,
        )?))?;
        tx.subscribe(protocol::topic::dev_ack(&protocol::Serial::parse(&serial)?))?;
        keep.push((tx, rx));
    }
    settle_router(&broker)?;
    // Drain the SUBACKs the router queued for each link, as a session would.
    for (_, rx) in keep.iter_mut() {
        while let Ok(Some(_)) = rx.recv_deadline(std::time::Instant::now()) {}
    }
    Ok(per_item(live() - before, rss() - rss_before, n))
}

/// Waits until the router thread has handled what was sent (a fresh link is acked in order).
fn settle_router(broker: &Broker) -> anyhow::Result<()> {
    let _ = broker.link("settle")?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    Ok(())
}

/// Heap bytes per server-side rustls connection that `handshake` leaves after an mTLS handshake
/// and one small record each way, the client side dropped.
fn tls_sessions<C>(
    pki_dir: &std::path::Path,
    server: Arc<rustls::ServerConfig>,
    n: usize,
    handshake: fn(&Arc<rustls::ServerConfig>, &Arc<rustls::ClientConfig>) -> anyhow::Result<C>,
) -> anyhow::Result<serde_json::Value> {
    let ca = pki::Ca::load(pki_dir)?;
    let issued = ca.issue(protocol::Role::Device, "B000001")?;
    let client = pki::client_config(ca.ca_pem(), &issued.cert_pem, &issued.key_pem)?;
    let mut keep = Vec::with_capacity(n);
    // One first, so lazily built shared state is not counted.
    keep.push(handshake(&server, &client)?);
    let (before, rss_before) = (live(), rss());
    for _ in 0..n {
        keep.push(handshake(&server, &client)?);
    }
    Ok(per_item(live() - before, rss() - rss_before, n))
}

fn handshake(
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<rustls::ClientConfig>,
) -> anyhow::Result<ServerConnection> {
    let mut s = ServerConnection::new(server.clone())?;
    let mut c = ClientConnection::new(client.clone(), ServerName::try_from("localhost")?)?;
    let mut pipe = Vec::new();
    for _ in 0..10 {
        pipe.clear();
        while c.wants_write() {
            c.write_tls(&mut pipe)?;
        }
        if !pipe.is_empty() {
            s.read_tls(&mut &pipe[..])?;
            s.process_new_packets()?;
        }
        pipe.clear();
        while s.wants_write() {
            s.write_tls(&mut pipe)?;
        }
        if !pipe.is_empty() {
            c.read_tls(&mut &pipe[..])?;
            c.process_new_packets()?;
        }
        if !s.is_handshaking() && !c.is_handshaking() {
            break;
        }
    }
    // One small record each way, like a CONNECT and its CONNACK.
    c.writer().write_all(&[0x10; 40])?;
    pipe.clear();
    while c.wants_write() {
        c.write_tls(&mut pipe)?;
    }
    s.read_tls(&mut &pipe[..])?;
    s.process_new_packets()?;
    let mut got = [0u8; 64];
    let _ = s.reader().read(&mut got)?;
    s.writer().write_all(&[0x20, 2, 0, 0])?;
    pipe.clear();
    while s.wants_write() {
        s.write_tls(&mut pipe)?;
    }
    Ok(s)
}

/// As [`handshake`], with rustls' unbuffered server connection: the caller owns the buffers.
fn unbuffered_handshake(
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<rustls::ClientConfig>,
) -> anyhow::Result<rustls::server::UnbufferedServerConnection> {
    use rustls::unbuffered::ConnectionState;
    let mut s = rustls::server::UnbufferedServerConnection::new(server.clone())?;
    let mut c = ClientConnection::new(client.clone(), ServerName::try_from("localhost")?)?;
    let mut incoming: Vec<u8> = Vec::new();
    let mut outgoing = vec![0u8; 16 * 1024];
    let mut out_len = 0;
    let mut sent_app = false;
    for _ in 0..40 {
        while c.wants_write() {
            c.write_tls(&mut incoming)?;
        }
        let status = s.process_tls_records(&mut incoming);
        let discard = status.discard;
        match status.state? {
            ConnectionState::EncodeTlsData(mut e) => {
                out_len += e
                    .encode(&mut outgoing[out_len..])
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            }
            ConnectionState::TransmitTlsData(t) => {
                c.read_tls(&mut &outgoing[..out_len])?;
                c.process_new_packets()?;
                out_len = 0;
                t.done();
            }
            ConnectionState::ReadTraffic(mut r) => {
                while let Some(rec) = r.next_record() {
                    let _ = rec?;
                }
            }
            ConnectionState::WriteTraffic(mut w) => {
                if !sent_app {
                    c.writer().write_all(&[0x10; 40])?;
                    let n = w
                        .encrypt(&[0x20, 2, 0, 0], &mut outgoing)
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    c.read_tls(&mut &outgoing[..n])?;
                    c.process_new_packets()?;
                    sent_app = true;
                } else {
                    incoming.drain(..discard);
                    break;
                }
            }
            ConnectionState::BlockedHandshake => {}
            other => anyhow::bail!("unexpected {other:?}"),
        }
        incoming.drain(..discard);
    }
    anyhow::ensure!(sent_app, "handshake did not finish");
    Ok(s)
}
