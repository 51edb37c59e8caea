//! MQTT over WebSocket over TLS, for customer networks whose proxy or firewall lets nothing out
//! but HTTPS (docs/decisions.md, D1). The same front door as MQTT over TLS: the handshake — TLS, then the
//! HTTP upgrade — runs in the connection's own task under one deadline, never in the accept loop
//! (rumqttd's own WebSocket listener upgrades inline in its accept loop); the identity comes from
//! the same client certificate; and the session above sees only packets, because binary
//! WebSocket messages are turned back into a byte stream ([`WsStream`]) for [`ClientConn`].
//!
//! Served at path `/mqtt` with subprotocol `mqtt`, as MQTT 3.1.1 §6 and common clients (paho,
//! mosquitto, MQTT.js) expect.

use std::sync::Arc;

use async_tungstenite::tokio::accept_hdr_async_with_config;
use async_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use async_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use protocol::Shown;
use protocol::url::DEFAULT_WS_PATH;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use ws_stream_tungstenite::WsStream;

use super::slots::Slot;
use super::{ClientConn, Gateway, Listener, limits};
use crate::metrics::Metrics;

/// The WebSocket subprotocol of MQTT 3.1.1.
pub const SUBPROTOCOL: &str = "mqtt";

/// Why an upgrade was refused; sent as the HTTP response body.
const WRONG_PATH: &str = "MQTT over WebSocket is served at /mqtt\n";
const NO_SUBPROTOCOL: &str =
    "offer the WebSocket subprotocol \"mqtt\" (Sec-WebSocket-Protocol: mqtt)\n";

impl Gateway {
    /// Accepts MQTT over WebSocket over TLS until `stop`, like [`Gateway::run`] does for MQTT
    /// over TLS; both may run at once on one gateway, sharing its limits.
    pub async fn run_ws(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        self.accept_loop(listener, Listener::Ws, stop).await
    }

    pub(super) async fn serve_ws(
        self: Arc<Self>,
        tcp: TcpStream,
        mut slot: Slot,
        stop: CancellationToken,
    ) {
        // One deadline for TLS and the HTTP upgrade together: a client that stalls in either
        // holds a handshake slot no longer than a plain TLS client may.
        let settings = self.settings();
        let deadline = Instant::now() + settings.handshake_timeout;
        let Some(first) = self.first_byte(&tcp, &mut slot, deadline).await else {
            return;
        };
        let Some(tls) = self.tls_accept(tcp, first, deadline).await else {
            return;
        };
        let Some(who) = self.identity(&tls) else {
            return;
        };
        let config = ws_config(settings.max_packet_bytes);
        let upgraded = timeout_at(
            deadline,
            accept_hdr_async_with_config(tls, check_upgrade, Some(config)),
        );
        let ws = match upgraded.await {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                Metrics::inc(&self.metrics.connect_refused);
                if let Some(suppressed) = self.logs.ws_refused.check() {
                    // tungstenite's error may quote what the client sent (a header name).
                    info!(error = %Shown(&e.to_string()), suppressed, "websocket upgrade refused");
                }
                return;
            }
            Err(_) => {
                limits::report_handshake_timeout(
                    &self.metrics,
                    &self.logs.handshake_timeout,
                    "websocket upgrade",
                );
                return;
            }
        };
        drop(slot);
        debug!("websocket upgraded");
        let conn = ClientConn::new(WsStream::new(ws), settings.max_packet_bytes);
        self.serve_session(conn, who, stop).await
    }
}

/// tungstenite's defaults hold a 128 KiB read buffer per connection and accept 64 MiB messages;
/// a relay holds thousands of mostly idle clients and takes packets of `max_packet_bytes`. A
/// message may carry several MQTT packets, so it may be twice that; [`ClientConn`] still
/// refuses any single packet over the limit.
fn ws_config(max_packet_bytes: usize) -> WebSocketConfig {
    let max_message = max_packet_bytes.saturating_mul(2);
    WebSocketConfig::default()
        .read_buffer_size(4096)
        // ClientConn writes a whole batch at once and flushes: no reason to buffer again.
        .write_buffer_size(0)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

/// Accepts the upgrade only at `/mqtt` and only for a client that offers subprotocol `mqtt`,
/// which the response then names (clients such as paho refuse a response without it).
// The signature is tungstenite's handshake `Callback`; its error type is an HTTP response.
#[allow(clippy::result_large_err)]
fn check_upgrade(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    if req.uri().path() != DEFAULT_WS_PATH {
        return Err(refusal(StatusCode::NOT_FOUND, WRONG_PATH));
    }
    let offered = req
        .headers()
        .get_all("Sec-WebSocket-Protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case(SUBPROTOCOL));
    if !offered {
        return Err(refusal(StatusCode::BAD_REQUEST, NO_SUBPROTOCOL));
    }
    resp.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(SUBPROTOCOL),
    );
    Ok(resp)
}

fn refusal(status: StatusCode, why: &str) -> ErrorResponse {
    let mut resp = ErrorResponse::new(Some(why.to_owned()));
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: &str, protocols: Option<&str>) -> Request {
        let mut req = Request::builder().uri(path);
        if let Some(p) = protocols {
            req = req.header("Sec-WebSocket-Protocol", p);
        }
        req.body(()).unwrap()
    }

    #[test]
    fn upgrades_only_mqtt_at_its_path() {
        let cases = [
            ("/mqtt", Some("mqtt"), Ok(())),
            ("/mqtt", Some("mqttv3.1, mqtt"), Ok(())),
            ("/mqtt", Some("MQTT"), Ok(())),
            ("/mqtt", None, Err(StatusCode::BAD_REQUEST)),
            ("/mqtt", Some("chat"), Err(StatusCode::BAD_REQUEST)),
            ("/", Some("mqtt"), Err(StatusCode::NOT_FOUND)),
            ("/mqtt/x", Some("mqtt"), Err(StatusCode::NOT_FOUND)),
        ];
        for (path, protocols, want) in cases {
            let got = check_upgrade(&request(path, protocols), Response::new(()));
            match (got, want) {
                (Ok(resp), Ok(())) => assert_eq!(
                    resp.headers().get("Sec-WebSocket-Protocol").unwrap(),
                    "mqtt",
                    "{path} {protocols:?}"
                ),
                (Err(resp), Err(status)) => {
                    assert_eq!(resp.status(), status, "{path} {protocols:?}")
                }
                (got, want) => panic!("{path} {protocols:?}: {got:?}, wanted {want:?}"),
            }
        }
    }
}
