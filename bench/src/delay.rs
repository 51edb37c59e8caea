//! A TCP relay that holds every chunk for a fixed time in each direction before passing it on:
//! a database across a network, for the cluster scenario (`--db-delay-us`). Order is kept, and
//! chunks do not wait behind each other's delay (a link's latency, not its bandwidth).
//!
//! Blocking threads, not the bench's runtime: Tokio's timers tick in whole milliseconds, and
//! the delays wanted here are a few hundred microseconds (`std::thread::sleep` keeps them).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Listens on 127.0.0.1 and relays each connection to `target`, `delay` late each way; returns
/// the address to connect to instead of `target`.
pub fn start(target: SocketAddr, delay: Duration) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("bench-db-delay".into())
        .spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { return };
                if let Err(e) = relay(inbound, target, delay) {
                    eprintln!("bench: db delay: cannot relay a connection to {target}: {e}");
                }
            }
        })?;
    Ok(addr)
}

fn relay(inbound: TcpStream, target: SocketAddr, delay: Duration) -> std::io::Result<()> {
    let outbound = TcpStream::connect(target)?;
    for s in [&inbound, &outbound] {
        s.set_nodelay(true)?;
    }
    pump(inbound.try_clone()?, outbound.try_clone()?, delay)?;
    pump(outbound, inbound, delay)
}

/// Copies `from` to `to`, each chunk `delay` after it was read.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) -> std::io::Result<()> {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::Builder::new()
        .name("bench-db-delay-in".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = from.read(&mut buf) {
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        })?;
    std::thread::Builder::new()
        .name("bench-db-delay-out".into())
        .spawn(move || {
            while let Ok((due, bytes)) = rx.recv() {
                let wait = due.saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
                if to.write_all(&bytes).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        })?;
    Ok(())
}
