//! Several relays in order of preference (claims 16–17, 24): the device uses the first it can
//! reach, falls back along the list when it cannot, and returns to a preferred relay once that
//! one answers again.
//!
//! Each relay is its own broker with its own store: a job waits at the relay it was submitted
//! to until the device comes there. So the device does not leave a relay in the middle of work:
//! it returns to a preferred one only when idle (no job queued or running, nothing unacked).
//! A relay that is lost is another matter — it is gone, and the device moves on at once.
//!
//! The [`Relays`] cursor is what the link (in [`crate::agent`]) consults after each attempt; the
//! [`failback`] task runs beside a connection to a fallback relay and probes the preferred ones.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use protocol::Serial;
use rand::Rng;
use rumqttc::AsyncClient;
use tokio::sync::watch;
use tokio::time::sleep;
use tracing::{debug, info};

use crate::transport::{Endpoint, probe};

/// Which relay to try next.
#[derive(Debug, Clone)]
pub struct Relays {
    endpoints: Vec<Endpoint>,
    current: usize,
}

impl Relays {
    /// `endpoints` in order of preference; the configuration guarantees at least one.
    pub fn new(endpoints: Vec<Endpoint>) -> Relays {
        assert!(!endpoints.is_empty(), "at least one relay");
        Relays {
            endpoints,
            current: 0,
        }
    }

    pub fn current(&self) -> &Endpoint {
        &self.endpoints[self.current]
    }

    /// 0 for the preferred relay, 1 for the first fallback…
    pub fn rank(&self) -> usize {
        self.current
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// An attempt at the current relay failed: moves to the next one. Returns true when that
    /// wraps around to the preferred relay — every relay has failed this round, so the caller
    /// backs off before trying again; within a round it tries the next one at once.
    pub fn failed(&mut self) -> bool {
        self.current = (self.current + 1) % self.endpoints.len();
        self.current == 0
    }

    /// Starts over from the preferred relay: after a connection was lost, or before a periodic
    /// check-in.
    pub fn restart(&mut self) {
        self.current = 0;
    }

    pub fn switch_to(&mut self, rank: usize) {
        self.current = rank.min(self.endpoints.len() - 1);
    }

    /// The relays preferred to the current one, best first.
    pub fn preferred(&self) -> &[Endpoint] {
        &self.endpoints[..self.current]
    }
}

/// No relay is marked for a return.
pub const NO_TARGET: usize = usize::MAX;

/// Runs beside a connection to fallback relay `connected_rank`: every `every` (jittered), once
/// the device is `idle`, probes each preferred relay in turn ([`probe`]: TCP, tunnel, TLS — no
/// MQTT session). On the first that answers it stores that relay's rank in `target` and asks
/// rumqttc to DISCONNECT; the link sees the DISCONNECT go out and reconnects to `target`.
/// Ends then, or when aborted because the connection ended.
#[allow(clippy::too_many_arguments)]
pub async fn failback(
    serial: Serial,
    preferred: Vec<Endpoint>,
    connected_rank: usize,
    tls: Arc<rustls::ClientConfig>,
    client: AsyncClient,
    mut idle: watch::Receiver<bool>,
    target: Arc<AtomicUsize>,
    every: Duration,
    probe_timeout: Duration,
) {
    loop {
        let pause = every.mul_f64(rand::thread_rng().gen_range(0.75..1.25));
        sleep(pause).await;
        if idle.wait_for(|idle| *idle).await.is_err() {
            return;
        }
        for (rank, ep) in preferred.iter().enumerate() {
            match probe(ep, tls.clone(), probe_timeout).await {
                Ok(()) => {
                    if !*idle.borrow() {
                        // Work started during the probe: it finishes here first.
                        break;
                    }
                    info!(serial = %serial, relay = %ep, rank, from_rank = connected_rank, "preferred relay reachable again; returning to it");
                    target.store(rank, Ordering::SeqCst);
                    if client.try_disconnect().is_err() {
                        // The request channel is full: try again at the next round.
                        target.store(NO_TARGET, Ordering::SeqCst);
                        break;
                    }
                    return;
                }
                Err(e) => {
                    debug!(serial = %serial, relay = %ep, rank, error = %e, "preferred relay still unreachable");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relays(n: usize) -> Relays {
        Relays::new(
            (0..n)
                .map(|i| Endpoint::direct(format!("mqtts://relay-{i}:8883").parse().unwrap()))
                .collect(),
        )
    }

    #[test]
    fn failures_walk_the_list_and_a_full_round_says_back_off() {
        let mut r = relays(3);
        assert_eq!(r.rank(), 0);
        assert!(!r.failed());
        assert_eq!(r.current().url.host, "relay-1");
        assert!(!r.failed());
        assert_eq!(r.rank(), 2);
        assert!(r.failed(), "all three failed: back off");
        assert_eq!(r.rank(), 0);

        let mut one = relays(1);
        assert!(one.failed(), "a single relay backs off after every failure");
        assert_eq!(one.rank(), 0);
    }

    #[test]
    fn only_better_relays_are_probed() {
        let mut r = relays(3);
        assert!(r.preferred().is_empty());
        r.switch_to(2);
        let hosts: Vec<_> = r.preferred().iter().map(|e| e.url.host.as_str()).collect();
        assert_eq!(hosts, ["relay-0", "relay-1"]);
        r.restart();
        assert_eq!(r.rank(), 0);
        r.switch_to(99);
        assert_eq!(r.rank(), 2);
    }
}
