//! MQTT keepalive (3.1.1 §3.1.2.10): a session that hears nothing from its client for one and a
//! half keepalive periods ends. The same timer bounds how long a session may hold replies back
//! ([`Keepalive::hold_replies`]): one timer per session, not two.

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
    /// Replies are held back until then at the latest ([`Keepalive::hold_replies`]).
    replies_by: Option<Instant>,
    timer: Pin<Box<Sleep>>,
}

/// What the session's timer says is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// The client has been silent too long: the session ends.
    Silent,
    /// Replies held back have waited long enough: send them now.
    Replies,
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
            replies_by: None,
            timer: Box::pin(sleep_until(last_heard + silence)),
        }
    }

    pub fn heard(&mut self) {
        self.last_heard = Instant::now();
    }

    /// Replies queued now may wait up to `hold` for what the session sends next, to leave in
    /// the same write; [`Keepalive::due`] says [`Due::Replies`] when the wait is over. Replies
    /// already held keep their earlier deadline.
    pub fn hold_replies(&mut self, hold: Duration) {
        if self.replies_by.is_none() {
            let by = Instant::now() + hold;
            self.replies_by = Some(by);
            if by < self.timer.deadline() {
                self.timer.as_mut().reset(by);
            }
        }
    }

    /// The held replies have gone out with something else: the timer goes back to the
    /// keepalive alone, rather than wake the session for nothing.
    pub fn replies_sent(&mut self) {
        if self.replies_by.take().is_some() {
            self.timer.as_mut().reset(self.last_heard + self.silence);
        }
    }

    /// Resolves when held replies are due or the client has been silent too long. Cancel-safe:
    /// a `select!` may drop it and call it again.
    pub async fn due(&mut self) -> Due {
        loop {
            self.timer.as_mut().await;
            let now = Instant::now();
            if self.replies_by.is_some_and(|by| now >= by) {
                self.replies_by = None;
                self.timer.as_mut().reset(self.last_heard + self.silence);
                return Due::Replies;
            }
            let silent_by = self.last_heard + self.silence;
            if now >= silent_by {
                return Due::Silent;
            }
            let next = self.replies_by.map_or(silent_by, |by| by.min(silent_by));
            self.timer.as_mut().reset(next);
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
        assert_eq!(k.due().await, Due::Silent);
        // 12 s, then 15 s (1.5 × 10) of silence after the packet heard.
        assert_eq!(start.elapsed(), Duration::from_secs(27));
        assert_eq!(Keepalive::new(0).silence, MAX_SILENCE);
    }

    #[tokio::test(start_paused = true)]
    async fn held_replies_are_due_after_the_hold_and_the_keepalive_still_counts() {
        let mut k = Keepalive::new(10);
        let start = Instant::now();
        k.hold_replies(Duration::from_millis(50));
        // A second hold does not push the first one's deadline back.
        tokio::time::advance(Duration::from_millis(30)).await;
        k.hold_replies(Duration::from_millis(50));
        assert_eq!(k.due().await, Due::Replies);
        assert_eq!(start.elapsed(), Duration::from_millis(50));
        // Sent with something else before the hold is over: nothing is due until the silence.
        k.hold_replies(Duration::from_millis(50));
        k.replies_sent();
        assert_eq!(k.due().await, Due::Silent);
        assert_eq!(start.elapsed(), Duration::from_secs(15));
    }
}
