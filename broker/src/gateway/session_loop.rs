//! The loop every accepted session runs, whichever way it reaches the rest of the relay: it waits
//! at once on the relay stopping, the client's keepalive, the client's next packet and the next
//! message for the client. A device's place in the hub ([`super::device_session`]) and a host's
//! router link ([`super::session`]) differ only in what they do with each; they say it through
//! [`Side`].

use std::future::Future;
use std::time::Duration;

use rumqttd::protocol::Packet;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::conn::ClientConn;
use super::keepalive::{Due, Keepalive};
use super::session::SessionError;

/// One way a session reaches the relay: what it does with a client's packets and where the
/// client's messages come from.
pub(super) trait Side {
    /// What the relay has for the client.
    type Down;

    /// Handles `first` (and whatever arrived with it). Returns whether the client said
    /// DISCONNECT. Replies it leaves queued and unflushed go out with the next write, or after
    /// [`Side::reply_hold`].
    fn on_packet<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut ClientConn<S>,
        first: Packet,
    ) -> impl Future<Output = Result<bool, SessionError>>;

    /// Longest replies left unsent by [`Side::on_packet`] wait for the next write to the client.
    /// A device's PUBACK waits for the message's ack (sent once committed, a few milliseconds
    /// later): both leave in one write, which saves the relay a send and the device a wake-up per
    /// message. A reply still held then is sent alone.
    fn reply_hold(&self) -> Duration {
        Duration::ZERO
    }

    /// Waits for what the relay has next for the client; `Ok(None)`: woken with nothing to send.
    fn next_down(&mut self) -> impl Future<Output = Result<Option<Self::Down>, SessionError>>;

    /// Writes `first` (and whatever else is already waiting) to the client.
    fn send_down<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut ClientConn<S>,
        first: Self::Down,
    ) -> impl Future<Output = Result<(), SessionError>>;
}

/// Runs the session until the client leaves, misbehaves, is replaced or the relay stops.
/// Returns whether the client said DISCONNECT.
pub(super) async fn drive<S, D>(
    conn: &mut ClientConn<S>,
    side: &mut D,
    keepalive: &mut Keepalive,
    stop: &CancellationToken,
) -> Result<bool, SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: Side,
{
    // Made once, not per packet: a fresh `cancelled()` registers with the token that every
    // session shares.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            () = &mut stopped => return Ok(false),
            due = keepalive.due() => match due {
                Due::Silent => return Err(SessionError::KeepaliveExpired),
                Due::Replies => conn.flush().await?,
            },
            packet = conn.read_packet() => {
                let Some(packet) = packet? else { return Ok(false) };
                keepalive.heard();
                if side.on_packet(conn, packet).await? {
                    return Ok(true);
                }
                if conn.has_unsent() {
                    keepalive.hold_replies(side.reply_hold());
                }
            }
            down = side.next_down() => {
                if let Some(first) = down? {
                    side.send_down(conn, first).await?;
                    keepalive.replies_sent();
                }
            }
        }
    }
}
