//! How an agent reaches a relay: MQTT over TLS (`mqtts://`) or over WebSocket over TLS
//! (`wss://…/mqtt`), directly or through an HTTP proxy's `CONNECT` tunnel.
//!
//! rumqttc makes the connection itself (its `websocket` and `proxy` features, with our rustls
//! configuration and client certificate); this crate only says which, so that the device agent
//! and the host agent build their options the same way. Which proxy, if any, is decided by the
//! caller ([`protocol::proxy`], as curl decides it).
//!
//! A crate of its own because neither shared crate may hold it: `protocol` stays free of I/O and
//! of rumqttc, and `pki` holds certificates and TLS configurations, not MQTT.

use std::sync::Arc;

use protocol::proxy::ProxyUrl;
use protocol::url::{BrokerUrl, Scheme};
use rumqttc::{MqttOptions, Proxy, ProxyAuth, ProxyType, TlsConfiguration, Transport};

/// rumqttc's options for `broker`, through `proxy` if given: transport, address and proxy. The
/// caller sets keepalive, limits and the rest.
pub fn mqtt_options(
    client_id: &str,
    broker: &BrokerUrl,
    proxy: Option<&ProxyUrl>,
    tls: Arc<rustls::ClientConfig>,
) -> MqttOptions {
    let tls = TlsConfiguration::Rustls(tls);
    let mut opts = match broker.scheme {
        Scheme::Mqtts => {
            let mut o = MqttOptions::new(client_id, broker.host.clone(), broker.port);
            o.set_transport(Transport::tls_with_config(tls));
            o
        }
        // rumqttc takes a WebSocket relay's whole URL as its address, and asks for subprotocol
        // `mqtt` itself.
        Scheme::Wss => {
            let mut o = MqttOptions::new(client_id, broker.to_string(), broker.port);
            o.set_transport(Transport::wss_with_config(tls));
            o
        }
    };
    if let Some(proxy) = proxy {
        opts.set_proxy(Proxy {
            ty: ProxyType::Http,
            auth: match &proxy.credentials {
                Some((username, password)) => ProxyAuth::Basic {
                    username: username.clone(),
                    password: password.clone(),
                },
                None => ProxyAuth::None,
            },
            addr: proxy.host.clone(),
            port: proxy.port,
        });
    }
    opts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_and_proxy_reach_rumqttc() {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path(), &[]).unwrap();
        let ca = pki::Ca::load(dir.path()).unwrap();
        let issued = ca.issue(protocol::Role::Host, "svc").unwrap();
        let tls = pki::client_config(ca.ca_pem(), &issued.cert_pem, &issued.key_pem).unwrap();

        let url: BrokerUrl = "wss://relay:9001/mqtt".parse().unwrap();
        let opts = mqtt_options("svc", &url, None, tls.clone());
        assert_eq!(
            opts.broker_address(),
            ("wss://relay:9001/mqtt".into(), 9001)
        );
        assert!(matches!(opts.transport(), Transport::Wss(_)));
        assert!(opts.proxy().is_none());

        let url: BrokerUrl = "mqtts://relay:8883".parse().unwrap();
        let proxy: ProxyUrl = "http://proxy:3128".parse().unwrap();
        let opts = mqtt_options("svc", &url, Some(&proxy), tls);
        assert_eq!(opts.broker_address(), ("relay".into(), 8883));
        let p = opts.proxy().unwrap();
        assert_eq!((p.addr.as_str(), p.port), ("proxy", 3128));
        assert!(matches!(p.auth, ProxyAuth::None));
    }
}
