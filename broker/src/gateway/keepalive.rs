//! MQTT keepalive (3.1.1 §3.1.2.10): a session that hears nothing from its client for one and a
//! half keepalive periods ends.

use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep, sleep_until};

/// A client that sets keepalive 0 still gets a bound on how long it may stay silent.
const MAX_SILENCE: Duration = Duration::from_secs(600);

/// One timer per session, made once. Hearing a packet only moves `last_heard`; the timer catches
/// up when it fires, because resetting it per packet would touch the runtime's timer wheel for
/// every packet of every session.
pub struct Keepalive {
    silence: Duration,
    last_heard: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Keepalive {
    /// From the keepalive seconds of the client's CONNECT.
    pub fn new(keep_alive_secs: u16) -> Self {
        let silence = match keep_alive_secs {
            0 => MAX_SILENCE,
            secs => Duration::from_millis(u64::from(secs) * 1500),
        };
        let last_heard = Instant::now();
        Keepalive {
            silence,
            last_heard,
            timer: Box::pin(sleep_until(last_heard + silence)),
        }
    }

    pub fn heard(&mut self) {
        self.last_heard = Instant::now();
    }

    /// Resolves once the client has been silent too long. Cancel-safe: a `select!` may drop it
    /// and call it again.
    pub async fn expired(&mut self) {
        loop {
            self.timer.as_mut().await;
            let due = self.last_heard + self.silence;
            if Instant::now() >= due {
                return;
            }
            self.timer.as_mut().reset(due);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn silence_ends_the_session_and_hearing_postpones_it() {
        let mut k = Keepalive::new(10);
        let start = Instant::now();
        tokio::time::advance(Duration::from_secs(12)).await;
        k.heard();
        k.expired().await;
        // 12 s, then 15 s (1.5 × 10) of silence after the packet heard.
        assert_eq!(start.elapsed(), Duration::from_secs(27));
        assert_eq!(Keepalive::new(0).silence, MAX_SILENCE);
    }
}
