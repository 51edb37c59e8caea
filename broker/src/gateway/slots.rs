//! Handshake slots (`max_handshakes`), and who gives one up when they are all taken.
//!
//! A slot is held from accept until the handshake ends. A socket that never sends a byte costs
//! an attacker nothing but a connect, so with every slot taken by such sockets a real client
//! would wait in the kernel's backlog until their deadlines free one. Instead, while a connection
//! has sent nothing (it is *silent*), its slot may be asked back: when a new connection finds
//! every slot taken, the connection silent longest is asked to give its slot up, and does unless
//! a byte has reached its socket meanwhile (its task may not have run since). A real client sends
//! its ClientHello at once, so it is silent for a round trip at most, and the newest of all; the
//! sockets shed are those that waited longest without a word. A connection that has started its
//! handshake is never shed: its deadline bounds it.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

/// A request for a silent connection's slot; it answers `true` if it gives the slot up (and
/// closes), `false` if it has sent a byte after all.
pub type Ask = oneshot::Sender<bool>;

/// The gateway's handshake slots, shared by both listeners.
#[derive(Debug)]
pub struct HandshakeSlots {
    free: Arc<Semaphore>,
    /// Silent connections by age (ids only grow), each with the channel that asks for its slot.
    silent: Mutex<BTreeMap<u64, oneshot::Sender<Ask>>>,
    next: AtomicU64,
}

/// One connection's slot; dropping it gives the slot back.
#[derive(Debug)]
pub struct Slot {
    id: u64,
    asked: oneshot::Receiver<Ask>,
    slots: Arc<HandshakeSlots>,
    _permit: OwnedSemaphorePermit,
}

impl HandshakeSlots {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(HandshakeSlots {
            free: Arc::new(Semaphore::new(max)),
            silent: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
        })
    }

    /// A free slot now, if there is one. The connection counts as silent until [`Slot::spoke`].
    pub fn try_take(self: &Arc<Self>) -> Option<Slot> {
        let permit = self.free.clone().try_acquire_owned().ok()?;
        Some(self.slot(permit))
    }

    /// The next slot to come free.
    pub async fn take(self: &Arc<Self>) -> Slot {
        match self.free.clone().acquire_owned().await {
            Ok(permit) => self.slot(permit),
            // The semaphore is never closed; were it, no slot could ever be had again.
            Err(_) => std::future::pending().await,
        }
    }

    fn slot(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Slot {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (ask, asked) = oneshot::channel();
        self.lock().insert(id, ask);
        Slot {
            id,
            asked,
            slots: self.clone(),
            _permit: permit,
        }
    }

    /// Asks the connection silent longest for its slot; `None` if no connection is silent. The
    /// answer comes as soon as its task runs: `true` (or the channel closed) if it gave the slot
    /// up, `false` if it had spoken after all (then ask again: the next one is asked).
    pub fn ask_oldest_silent(&self) -> Option<oneshot::Receiver<bool>> {
        let mut silent = self.lock();
        loop {
            let (_, ask) = silent.pop_first()?;
            let (answer, answered) = oneshot::channel();
            // Sent under the lock: a connection that speaks now takes the lock after this and
            // finds the question waiting ([`Slot::spoke`]).
            if ask.send(answer).is_ok() {
                return Some(answered);
            }
        }
    }

    /// Connections holding a slot that have not sent a byte yet.
    #[cfg(test)]
    pub fn silent(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, oneshot::Sender<Ask>>> {
        self.silent.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Slot {
    /// Resolves when a newer connection asks for this slot; answer through the [`Ask`].
    pub async fn asked(&mut self) -> Ask {
        match (&mut self.asked).await {
            Ok(ask) => ask,
            // The question can no longer come (the slots are gone).
            Err(_) => std::future::pending().await,
        }
    }

    /// The connection has sent its first byte: it can no longer be asked for its slot, and a
    /// question already on its way is answered "no".
    pub fn spoke(&mut self) {
        // Under the lock, like the asking: either the question was sent before (and is here
        // now), or it never will be.
        let mut silent = self.slots.lock();
        silent.remove(&self.id);
        if let Ok(ask) = self.asked.try_recv() {
            let _ = ask.send(false);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.lock().remove(&self.id);
    }
}

/// Whether bytes wait on `socket` now, asked of the kernel (not of the runtime, whose readiness
/// may not have caught up): a connection asked for its slot may have spoken a moment ago.
pub fn has_bytes(socket: &impl AsFd) -> bool {
    let mut probe = [0u8; 1];
    let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
    matches!(rustix::net::recv(socket, &mut probe[..], flags), Ok((_, n)) if n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn answer_when_asked(slot: &mut Slot, yields: bool) {
        let ask = tokio::time::timeout(Duration::from_secs(5), slot.asked())
            .await
            .expect("the slot was asked for");
        ask.send(yields).unwrap();
    }

    #[tokio::test]
    async fn the_oldest_silent_slot_is_asked_for_and_one_that_spoke_is_not() {
        let slots = HandshakeSlots::new(3);
        let mut spoke = slots.try_take().unwrap();
        let mut oldest = slots.try_take().unwrap();
        let mut newer = slots.try_take().unwrap();
        assert!(slots.try_take().is_none(), "three slots, all taken");
        spoke.spoke();
        assert_eq!(slots.silent(), 2);

        // A fourth connection: the oldest silent one is asked, not the one that spoke.
        let answer = slots.ask_oldest_silent().unwrap();
        answer_when_asked(&mut oldest, true).await;
        assert!(answer.await.unwrap());
        drop(oldest);
        let fourth = slots.take().await;
        assert_eq!(slots.silent(), 2, "the newer silent one and the fourth");

        // The next oldest had sent a byte by the time it was asked: it keeps its slot, and the
        // one after it is asked.
        let answer = slots.ask_oldest_silent().unwrap();
        answer_when_asked(&mut newer, false).await;
        assert!(!answer.await.unwrap());
        assert_eq!(slots.silent(), 1);
        let answer = slots.ask_oldest_silent().unwrap();
        drop(fourth);
        assert!(
            answer.await.is_err(),
            "a slot dropped unanswered gave itself up"
        );
        assert!(
            slots.ask_oldest_silent().is_none(),
            "nothing silent is left: a new connection must wait"
        );
        drop(spoke);
        assert!(slots.try_take().is_some());
    }

    #[tokio::test]
    async fn a_question_that_crosses_the_first_byte_is_answered_no() {
        let slots = HandshakeSlots::new(1);
        let mut slot = slots.try_take().unwrap();
        let answer = slots.ask_oldest_silent().unwrap();
        // The task saw its first byte before it saw the question.
        slot.spoke();
        assert!(!answer.await.unwrap());
        assert!(slots.ask_oldest_silent().is_none());
    }

    #[tokio::test]
    async fn bytes_waiting_on_a_socket_are_seen_without_reading_them() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        assert!(!has_bytes(&server));
        client.write_all(&[22]).await.unwrap();
        let mut byte = [0u8; 1];
        server.peek(&mut byte).await.unwrap();
        assert!(has_bytes(&server));
        server.read_exact(&mut byte).await.unwrap();
        assert_eq!(byte, [22], "peeking left the byte in place");
        assert!(!has_bytes(&server));
    }
}
