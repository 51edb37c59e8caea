//! TLS for client connections, on rustls' unbuffered API so that an idle connection holds no
//! TLS buffer at all.
//!
//! rustls' ordinary (buffered) connection keeps a 4 KiB record buffer for its whole life, and
//! tokio-rustls reads through it: with ~19,000 mostly idle devices per relay that is 4 KiB of
//! 24 per device (bench/RESULTS.md, "Memory"). Here rustls only keeps its session state; the
//! bytes are ours. A read lands on the stack first and is decrypted there; only a record cut in
//! half by the network, plaintext the reader has not taken yet, or ciphertext the socket has not
//! taken yet is kept on the heap, and each of those buffers is released as soon as it is empty.
//!
//! Behaviour towards the session above matches tokio-rustls: a clean close (`close_notify`)
//! reads as end of stream, a TCP close without it as `UnexpectedEof`; a failed handshake sends
//! rustls' alert before the error is returned.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// One socket read, on the stack: a whole TLS record (16 KiB of plaintext and its framing)
/// fits, so a busy connection decrypts what it read without copying it anywhere first.
const READ_SCRATCH: usize = 17 * 1024;
/// Ciphertext not yet taken by a partial record may wait for more bytes; rustls refuses records
/// over 16 KiB + 2 KiB, and a handshake message may span records up to 64 KiB (what rustls' own
/// buffered connection allows). More than this is a peer not speaking TLS.
const MAX_INCOMING: usize = 64 * 1024 + 5;
/// Ciphertext queued for a socket that is not taking it: past this, writes wait.
const MAX_QUEUED_OUT: usize = 64 * 1024;
/// Framing each record adds to its plaintext (TLS 1.2 AES-GCM's is the largest: header 5,
/// explicit nonce 8, tag 16); a first guess for the output buffer, corrected if short.
const RECORD_OVERHEAD: usize = 32;
const MAX_FRAGMENT: usize = 16 * 1024;
/// What a handshake's output buffer starts with ([`accept`]).
const FLIGHT_ROOM: usize = 768;

/// A server-side TLS connection over TCP, after its handshake.
pub struct TlsConn {
    tcp: TcpStream,
    tls: UnbufferedServerConnection,
    /// Ciphertext received but not yet a whole record.
    incoming: Vec<u8>,
    /// Decrypted application data the reader has not taken yet, from `plain_at`.
    plain: Vec<u8>,
    plain_at: usize,
    /// Ciphertext for the socket, from `out_at`.
    outgoing: Vec<u8>,
    out_at: usize,
    /// The peer sent `close_notify`: reads end cleanly.
    peer_closed: bool,
    /// TCP end of stream.
    eof: bool,
    /// Our `close_notify` is queued or sent.
    close_sent: bool,
}

/// A new connection's first read, into `first` (left empty at end of stream or on an error,
/// which the handshake then meets and reports). Cancel-safe.
pub async fn read_first(tcp: &TcpStream, first: &mut Vec<u8>) {
    let _ = read_appending(tcp, first).await;
}

/// One socket read, appended to `buf`; `Ok(0)` at end of stream. Cancel-safe.
///
/// The bytes land on the stack and only what came is appended: a handshake's flights are a few
/// hundred bytes, which the buffer's capacity from the first read usually holds. Reserving a
/// read's worth in the buffer instead (4 KiB) was a reallocation per handshake, one large
/// enough to make glibc consolidate its free lists each time.
async fn read_appending(tcp: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    loop {
        tcp.readable().await?;
        // Never across an await (which would make it part of every connection's task): a
        // silent connection holds no buffer while it waits.
        let mut scratch = [0u8; 4096];
        match tcp.try_read(&mut scratch) {
            Ok(n) => {
                buf.extend_from_slice(&scratch[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Runs the server side of a TLS handshake on `tcp`, beginning with `first`, bytes the
/// connection sent already ([`read_first`]). The caller bounds it in time.
pub async fn accept(
    mut tcp: TcpStream,
    first: Vec<u8>,
    config: Arc<ServerConfig>,
) -> io::Result<TlsConn> {
    let mut tls = UnbufferedServerConnection::new(config).map_err(invalid_data)?;
    let mut incoming = first;
    let mut plain = Vec::new();
    // Room for a resumed handshake's flight, and then for the session ticket and the CONNACK
    // it waits for (about 600 bytes): one allocation instead of one per record. Under 1 KiB,
    // where glibc serves it from its per-thread cache.
    let mut outgoing = Vec::with_capacity(FLIGHT_ROOM);
    loop {
        let step = match advance(&mut tls, &mut incoming, &mut plain, &mut outgoing) {
            Ok(step) => step,
            Err(e) => {
                // rustls queued an alert saying why. Best effort: the client learns the
                // reason, and the error is ours either way.
                outgoing.clear();
                queued_alert(&mut tls, &mut incoming, &mut outgoing);
                if !outgoing.is_empty() {
                    let _ = tcp.write_all(&outgoing).await;
                }
                return Err(e);
            }
        };
        incoming.drain(..step.consumed);
        if step.traffic {
            // What follows the handshake (the session ticket) waits for the session's first
            // write, the CONNACK: one send fewer per connection.
            break;
        }
        if !outgoing.is_empty() {
            tcp.write_all(&outgoing).await?;
            outgoing.clear();
        }
        if step.peer_closed {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed the connection during the TLS handshake",
            ));
        }
        if incoming.len() >= MAX_INCOMING {
            return Err(too_much_incoming());
        }
        if read_appending(&tcp, &mut incoming).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed the connection during the TLS handshake",
            ));
        }
    }
    Ok(TlsConn {
        tcp,
        tls,
        incoming: compact(incoming),
        plain: compact(plain),
        plain_at: 0,
        outgoing: compact(outgoing),
        out_at: 0,
        peer_closed: false,
        eof: false,
        close_sent: false,
    })
}

impl TlsConn {
    /// The client's certificate chain, leaf first (verified during the handshake).
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.tls.peer_certificates()
    }

    /// Whether the handshake resumed a session from a ticket (so verified no certificate).
    pub fn resumed(&self) -> bool {
        self.tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }

    fn queued_out(&self) -> usize {
        self.outgoing.len() - self.out_at
    }

    /// Writes queued ciphertext until the queue is empty (`Ready(Ok)`) or the socket is full.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_at += n;
        }
        self.outgoing = Vec::new();
        self.out_at = 0;
        Poll::Ready(Ok(()))
    }

    /// Decrypts what `read` brought (behind anything kept from before) into `plain`.
    fn take_in(&mut self, read: &mut [u8]) -> io::Result<()> {
        if self.incoming.is_empty() {
            // The usual case: whole records, decrypted where they landed.
            let step = self.advance_or_alert(read)?;
            self.incoming.extend_from_slice(&read[step.consumed..]);
        } else {
            self.incoming.extend_from_slice(read);
            let mut incoming = std::mem::take(&mut self.incoming);
            let step = self.advance_or_alert(&mut incoming)?;
            incoming.drain(..step.consumed);
            self.incoming = compact(incoming);
        }
        if self.incoming.len() >= MAX_INCOMING {
            return Err(too_much_incoming());
        }
        Ok(())
    }

    /// [`advance`] over `buf`; on an error, the alert rustls queued for the peer is queued for
    /// the socket (the caller sends it, best effort, before it reports the error).
    fn advance_or_alert(&mut self, buf: &mut [u8]) -> io::Result<Step> {
        match advance(&mut self.tls, buf, &mut self.plain, &mut self.outgoing) {
            Ok(step) => {
                self.peer_closed |= step.peer_closed;
                Ok(step)
            }
            Err(e) => {
                queued_alert(&mut self.tls, buf, &mut self.outgoing);
                Err(e)
            }
        }
    }

    /// Brings rustls to the state where it encrypts application data and hands that to `f`.
    fn with_write_traffic<T>(
        &mut self,
        f: impl FnOnce(
            &mut rustls::unbuffered::WriteTraffic<'_, rustls::server::ServerConnectionData>,
            &mut Vec<u8>,
        ) -> io::Result<T>,
    ) -> io::Result<T> {
        // Only partial records can be waiting in `incoming` (reads decrypt everything whole), so
        // this finds nothing to decrypt; it is passed because rustls may hold positions in it.
        loop {
            let UnbufferedStatus { discard, state } =
                self.tls.process_tls_records(&mut self.incoming);
            match state.map_err(invalid_data)? {
                ConnectionState::WriteTraffic(mut traffic) => {
                    let out = f(&mut traffic, &mut self.outgoing);
                    self.incoming.drain(..discard);
                    return out;
                }
                ConnectionState::EncodeTlsData(mut data) => encode(&mut data, &mut self.outgoing)?,
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        self.plain
                            .extend_from_slice(record.map_err(invalid_data)?.payload);
                    }
                }
                ConnectionState::PeerClosed => self.peer_closed = true,
                ConnectionState::Closed => return Err(io::ErrorKind::BrokenPipe.into()),
                other => {
                    return Err(io::Error::other(format!(
                        "TLS connection cannot send in state {other:?}"
                    )));
                }
            }
            self.incoming.drain(..discard);
        }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_at < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.plain_at);
                buf.put_slice(&this.plain[this.plain_at..this.plain_at + n]);
                this.plain_at += n;
                if this.plain_at == this.plain.len() {
                    this.plain = Vec::new();
                    this.plain_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection without sending TLS close_notify",
                )));
            }
            let mut scratch = [MaybeUninit::<u8>::uninit(); READ_SCRATCH];
            let mut read = ReadBuf::uninit(&mut scratch);
            ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
                continue;
            }
            if let Err(e) = this.take_in(read.filled_mut()) {
                // The alert saying why, if the socket takes it now; the connection is over.
                let _ = this.poll_send(cx);
                return Poll::Ready(Err(e));
            }
            // Anything rustls answered on its own (an alert, a key update) goes out now; a full
            // socket keeps it queued for the next write or flush.
            if this.queued_out() > 0
                && let Poll::Ready(Err(e)) = this.poll_send(cx)
            {
                return Poll::Ready(Err(e));
            }
        }
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.queued_out() >= MAX_QUEUED_OUT {
            ready!(this.poll_send(cx))?;
        }
        this.with_write_traffic(|traffic, outgoing| {
            let records = data.len() / MAX_FRAGMENT + 1;
            write_into(outgoing, data.len() + records * RECORD_OVERHEAD, |room| {
                traffic.encrypt(data, room).map_err(Shortfall::from)
            })
        })?;
        // Sent now if the socket takes it; otherwise it waits for the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            this.close_sent = true;
            let queued = this.with_write_traffic(|traffic, outgoing| {
                write_into(outgoing, 64, |room| {
                    traffic.queue_close_notify(room).map_err(Shortfall::from)
                })
            });
            // A connection rustls already considers closed or failed has nothing to say.
            if queued.is_err() {
                return Pin::new(&mut this.tcp).poll_shutdown(cx);
            }
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

/// Where one round of [`advance`] left the connection.
struct Step {
    /// Bytes at the front of the buffer rustls is done with.
    consumed: usize,
    /// The handshake is over: application data may flow.
    traffic: bool,
    /// `close_notify` came.
    peer_closed: bool,
}

/// Runs rustls over the ciphertext in `buf` until it needs more: decrypted application data is
/// appended to `plain`, records rustls wants sent (handshake, alerts) to `outgoing`.
fn advance(
    tls: &mut UnbufferedServerConnection,
    buf: &mut [u8],
    plain: &mut Vec<u8>,
    outgoing: &mut Vec<u8>,
) -> io::Result<Step> {
    let mut step = Step {
        consumed: 0,
        traffic: false,
        peer_closed: false,
    };
    loop {
        let UnbufferedStatus { mut discard, state } =
            tls.process_tls_records(&mut buf[step.consumed..]);
        let state = match state {
            Ok(state) => state,
            // The connection is over; what it consumed no longer matters.
            Err(e) => return Err(invalid_data(e)),
        };
        let done = match state {
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(invalid_data)?;
                    discard += record.discard;
                    plain.extend_from_slice(record.payload);
                }
                false
            }
            ConnectionState::EncodeTlsData(mut data) => {
                encode(&mut data, outgoing)?;
                false
            }
            // Queued in `outgoing`, which the caller sends before it waits for more input.
            ConnectionState::TransmitTlsData(transmit) => {
                transmit.done();
                false
            }
            ConnectionState::PeerClosed => {
                step.peer_closed = true;
                false
            }
            ConnectionState::Closed => {
                step.peer_closed = true;
                true
            }
            ConnectionState::WriteTraffic(_) => {
                step.traffic = true;
                true
            }
            ConnectionState::BlockedHandshake => true,
            // Early data is not enabled in the server config.
            other => {
                return Err(io::Error::other(format!(
                    "unexpected TLS connection state {other:?}"
                )));
            }
        };
        step.consumed += discard;
        if done {
            return Ok(step);
        }
    }
}

/// After an error, the alert rustls queued (it hands out queued records before anything else);
/// nothing more is processed.
fn queued_alert(tls: &mut UnbufferedServerConnection, incoming: &mut [u8], outgoing: &mut Vec<u8>) {
    if let Ok(ConnectionState::EncodeTlsData(mut data)) = tls.process_tls_records(incoming).state {
        let _ = encode(&mut data, outgoing);
    }
}

fn encode(
    data: &mut rustls::unbuffered::EncodeTlsData<'_, rustls::server::ServerConnectionData>,
    outgoing: &mut Vec<u8>,
) -> io::Result<()> {
    // rustls holds the record encoded already and, given no room, says its size: asking first
    // grows the buffer to fit exactly. A 4 KiB guess per record was zeroed, regrown as the
    // flight grew and cut back (2.6 % of the relay's CPU in a reconnect storm).
    write_into(outgoing, 0, |room| {
        data.encode(room).map_err(Shortfall::from)
    })
}

/// Why rustls wrote nothing into the room it was given.
enum Shortfall {
    /// The room was too small; this much is needed.
    Room(usize),
    Failed(String),
}

impl From<EncryptError> for Shortfall {
    fn from(e: EncryptError) -> Self {
        match e {
            EncryptError::InsufficientSize(e) => Shortfall::Room(e.required_size),
            e => Shortfall::Failed(e.to_string()),
        }
    }
}

impl From<EncodeError> for Shortfall {
    fn from(e: EncodeError) -> Self {
        match e {
            EncodeError::InsufficientSize(e) => Shortfall::Room(e.required_size),
            e => Shortfall::Failed(e.to_string()),
        }
    }
}

/// Appends what `write` puts in a slice at the end of `out`, growing the slice once if the
/// first guess (`guess` bytes) was short.
fn write_into(
    out: &mut Vec<u8>,
    guess: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Shortfall>,
) -> io::Result<()> {
    let start = out.len();
    let mut room = guess;
    loop {
        out.resize(start + room, 0);
        match write(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(Shortfall::Room(needed)) if needed > room => room = needed,
            Err(Shortfall::Room(_)) => {
                out.truncate(start);
                return Err(io::Error::other(
                    "TLS output did not fit the room it asked for",
                ));
            }
            Err(Shortfall::Failed(e)) => {
                out.truncate(start);
                return Err(io::Error::other(format!("TLS encryption failed: {e}")));
            }
        }
    }
}

/// An empty buffer gives its memory back; anything else is kept as it is.
fn compact(buf: Vec<u8>) -> Vec<u8> {
    if buf.is_empty() { Vec::new() } else { buf }
}

fn invalid_data(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn too_much_incoming() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("peer sent more than {MAX_INCOMING} bytes without a complete TLS record"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsConnector;
    use tokio_rustls::client::TlsStream;

    struct Pki {
        _dir: tempfile::TempDir,
        server: Arc<ServerConfig>,
        client: Arc<rustls::ClientConfig>,
        ca_pem: String,
    }

    fn pki() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path(), &[]).unwrap();
        let ca = pki::Ca::load(dir.path()).unwrap();
        let issued = ca.issue(protocol::Role::Device, "TLS0001").unwrap();
        let client = pki::client_config(ca.ca_pem(), &issued.cert_pem, &issued.key_pem).unwrap();
        Pki {
            // As the gateway runs it: a session ticket follows the handshake.
            server: crate::gateway::with_tickets(
                pki::server_config(dir.path()).unwrap(),
                Some(&crate::gateway::tickets::Ticketer::open(dir.path(), TICKETS).unwrap()),
            ),
            client,
            ca_pem: ca.ca_pem().to_owned(),
            _dir: dir,
        }
    }

    /// The server side of one loopback connection, accepted with `server`, and what `peer`
    /// (given the address to connect to) made of its side, run together.
    async fn accept_from<F: std::future::Future>(
        server: Arc<ServerConfig>,
        peer: impl FnOnce(std::net::SocketAddr) -> F,
    ) -> (io::Result<TlsConn>, F::Output) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = peer(listener.local_addr().unwrap());
        let served = async move {
            let (tcp, _) = listener.accept().await?;
            accept(tcp, Vec::new(), server).await
        };
        tokio::join!(served, peer)
    }

    /// A real client over loopback TCP and the server side of the same connection.
    async fn pair(
        server: Arc<ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> (io::Result<TlsConn>, io::Result<TlsStream<TcpStream>>) {
        accept_from(server, |addr| async move {
            let tcp = TcpStream::connect(addr).await?;
            TlsConnector::from(client)
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
        })
        .await
    }

    const TICKETS: crate::gateway::tickets::TicketSettings =
        crate::gateway::tickets::TicketSettings {
            lifetime: std::time::Duration::from_secs(3600),
            rotation: std::time::Duration::from_secs(3600),
        };

    /// One byte from the server read by the client: the ticket sent after the handshake is
    /// taken on the way.
    async fn exchange_a_byte(server: &mut TlsConn, client: &mut TlsStream<TcpStream>) {
        server.write_all(b"x").await.unwrap();
        server.flush().await.unwrap();
        let mut b = [0u8; 1];
        client.read_exact(&mut b).await.unwrap();
    }

    #[tokio::test]
    async fn a_client_back_with_its_ticket_resumes_with_the_same_certificate() {
        let pki = pki();
        let (server, client) = pair(pki.server.clone(), pki.client.clone()).await;
        let (mut server, mut client) = (server.unwrap(), client.unwrap());
        assert!(!server.resumed(), "the first handshake is a full one");
        // The relay's choice, though rustls' client lists AES-256 first (pki::server_provider).
        assert_eq!(
            client
                .get_ref()
                .1
                .negotiated_cipher_suite()
                .map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        exchange_a_byte(&mut server, &mut client).await;
        let first = server.peer_certificates().unwrap().to_vec();
        drop((server, client));

        let (server, client) = pair(pki.server.clone(), pki.client.clone()).await;
        let (mut server, mut client) = (server.unwrap(), client.unwrap());
        assert!(server.resumed(), "the second handshake resumes");
        assert_eq!(
            server.peer_certificates().unwrap(),
            &first[..],
            "a resumed session carries the certificate it began with"
        );
        exchange_a_byte(&mut server, &mut client).await;
        assert!(
            holds_no_buffer(&server),
            "a resumed session holds nothing either"
        );

        // A server whose keys are not the ones that sealed the ticket does a full handshake.
        let other = tempfile::tempdir().unwrap();
        let stranger = crate::gateway::with_tickets(
            pki::server_config(pki._dir.path()).unwrap(),
            Some(&crate::gateway::tickets::Ticketer::open(other.path(), TICKETS).unwrap()),
        );
        let (server, _client) = pair(stranger, pki.client.clone()).await;
        assert!(!server.unwrap().resumed());
    }

    fn holds_no_buffer(conn: &TlsConn) -> bool {
        conn.incoming.capacity() == 0 && conn.plain.capacity() == 0 && conn.outgoing.capacity() == 0
    }

    #[tokio::test]
    async fn data_flows_both_ways_in_records_of_every_size_and_idle_holds_no_buffer() {
        let pki = pki();
        let (server, client) = pair(pki.server.clone(), pki.client.clone()).await;
        let (mut server, mut client) = (server.unwrap(), client.unwrap());
        let leaf = server.peer_certificates().and_then(|c| c.first()).unwrap();
        assert_eq!(
            pki::identity_from_der(leaf).unwrap().to_string(),
            "device:TLS0001"
        );

        // Small, then larger than one record (many records, cut anywhere by TCP).
        for size in [3usize, 40, 16 * 1024 + 1, 300 * 1024] {
            let sent: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let (mut got, mut back) = (vec![0u8; size], vec![0u8; size]);
            let echo = async {
                server.read_exact(&mut got).await.unwrap();
                server.write_all(&got).await.unwrap();
                server.flush().await.unwrap();
            };
            let talk = async {
                client.write_all(&sent).await.unwrap();
                client.flush().await.unwrap();
                client.read_exact(&mut back).await.unwrap();
            };
            tokio::join!(echo, talk);
            assert_eq!(got, sent, "server read what the client sent ({size} bytes)");
            assert_eq!(
                back, sent,
                "client read what the server wrote ({size} bytes)"
            );
            assert!(holds_no_buffer(&server), "idle after {size} bytes");
        }

        // A clean close reads as the end of the stream on both sides.
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(server.read_to_end(&mut rest).await.unwrap(), 0);
        server.shutdown().await.unwrap();
        assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_tampered_record_is_refused_and_the_client_told_why() {
        let pki = pki();
        let (server, client) = pair(pki.server.clone(), pki.client.clone()).await;
        let (mut server, mut client) = (server.unwrap(), client.unwrap());
        // An application-data record whose ciphertext and tag are not what the keys make,
        // written under the client's TLS layer.
        let mut record = vec![23, 3, 3, 0, 40];
        record.extend_from_slice(&[0x5a; 40]);
        client.get_mut().0.write_all(&record).await.unwrap();
        let mut buf = [0u8; 8];
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        drop(server);
        let err = client.read(&mut buf).await.unwrap_err();
        assert!(err.to_string().contains("BadRecordMac"), "{err}");
    }

    #[tokio::test]
    async fn a_tcp_close_without_close_notify_is_an_unexpected_eof() {
        let pki = pki();
        let (server, client) = pair(pki.server.clone(), pki.client.clone()).await;
        let mut server = server.unwrap();
        let (mut tcp, _) = client.unwrap().into_inner();
        tcp.shutdown().await.unwrap();
        let mut buf = [0u8; 8];
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// A client's TCP stream that hands the socket at most `STEP` bytes per write, so that its
    /// flights reach the server in many small segments.
    struct Trickle(TcpStream);

    impl Trickle {
        const STEP: usize = 7;
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = data.len().min(Self::STEP);
            Pin::new(&mut self.0).poll_write(cx, &data[..n])
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    /// The handshake reads whatever each read brings and appends it: flights cut into 7-byte
    /// segments complete a full handshake and then a resumed one, and the session's first
    /// bytes, cut the same way, arrive whole.
    #[tokio::test]
    async fn flights_that_arrive_a_few_bytes_at_a_time_complete_the_handshake() {
        let pki = pki();
        for resumed in [false, true] {
            let client = pki.client.clone();
            let (server, client) = accept_from(pki.server.clone(), |addr| async move {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                TlsConnector::from(client)
                    .connect(ServerName::try_from("localhost").unwrap(), Trickle(tcp))
                    .await
            })
            .await;
            let (mut server, mut client) = (server.unwrap(), client.unwrap());
            assert_eq!(server.resumed(), resumed);
            client.write_all(b"CONNECT, cut small").await.unwrap();
            client.flush().await.unwrap();
            let mut got = [0u8; 18];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"CONNECT, cut small");
            // The ticket for the next round goes out with the server's first write.
            server.write_all(b"x").await.unwrap();
            server.flush().await.unwrap();
            let mut b = [0u8; 1];
            client.read_exact(&mut b).await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_handshake_message_that_never_ends_is_refused_without_buffering_it_all() {
        let pki = pki();
        // A ClientHello that claims 16 MB, sent as full handshake records for as long as the
        // server reads them.
        let flood = |addr| async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            let mut sent = 0usize;
            let mut first = true;
            while sent < 64 * 1024 * 1024 {
                let mut record = vec![22, 3, 1, 0x40, 0];
                let mut body = vec![0u8; 16 * 1024];
                if first {
                    body[..4].copy_from_slice(&[1, 0xff, 0xff, 0x00]);
                    first = false;
                }
                record.extend_from_slice(&body);
                if tcp.write_all(&record).await.is_err() {
                    break;
                }
                sent += record.len();
            }
            sent
        };
        let (refused, sent) = accept_from(pki.server.clone(), flood).await;
        let err = refused
            .err()
            .expect("an endless handshake message is refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        // More than the kernel buffers on loopback, had the server kept reading.
        assert!(
            sent < 64 * 1024 * 1024,
            "the server stopped reading: {sent} bytes went out"
        );
    }

    #[tokio::test]
    async fn bad_peers_are_refused_with_the_reason() {
        let pki = pki();
        // Not TLS at all.
        let junk = |addr| async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut answer = Vec::new();
            let _ = tcp.read_to_end(&mut answer).await;
        };
        let (refused, ()) = accept_from(pki.server.clone(), junk).await;
        let err = refused.err().expect("plain HTTP is not a TLS client");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");

        // A certificate from another CA: the server refuses it and tells the client why.
        let other = tempfile::tempdir().unwrap();
        pki::init(other.path(), &[]).unwrap();
        let foreign = pki::Ca::load(other.path()).unwrap();
        let issued = foreign.issue(protocol::Role::Device, "TLS0002").unwrap();
        let stranger = pki::client_config(&pki.ca_pem, &issued.cert_pem, &issued.key_pem).unwrap();
        let (server, client) = pair(pki.server.clone(), stranger).await;
        let err = server.err().expect("a foreign certificate is refused");
        assert!(
            err.to_string().contains("invalid peer certificate"),
            "{err}"
        );
        // TLS 1.3: the client finished first; the server's alert arrives on its first read.
        let mut buf = [0u8; 8];
        let read = client.unwrap().read(&mut buf).await;
        let err = read.expect_err("the client hears the refusal");
        assert!(err.to_string().to_lowercase().contains("alert"), "{err}");
    }
}
