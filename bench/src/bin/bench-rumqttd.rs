//! `bench-rumqttd`: bare rumqttd, with its own v4 listener, for the benchmark to compare against.
//!
//! Same rumqttd version and the same router settings as chukei embeds (broker/src/router.rs);
//! with `--pki-dir` the listener is rumqttd's rustls one, requiring a client certificate from our
//! CA (its `verify-client-cert` feature), else its plain TCP listener.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};

#[derive(Debug, Parser)]
#[command(
    name = "bench-rumqttd",
    about = "Bare rumqttd for the chukei benchmark"
)]
struct Cli {
    /// Address of the MQTT v4 listener.
    #[arg(long)]
    listen: SocketAddr,
    /// Folder with ca.pem, server.pem and server.key (`broker pki init`): TLS with client
    /// certificates. Without it the listener is plain TCP.
    #[arg(long)]
    pki_dir: Option<PathBuf>,
    /// Connections the router admits.
    #[arg(long, default_value_t = 20_000)]
    max_connections: usize,
}

fn main() {
    let cli = Cli::parse();
    let path = |f: &str| {
        cli.pki_dir
            .as_ref()
            .map(|d| d.join(f).display().to_string())
    };
    let tls = cli.pki_dir.as_ref().map(|_| TlsConfig::Rustls {
        capath: path(pki::CA_CERT),
        certpath: path(pki::SERVER_CERT).unwrap_or_default(),
        keypath: path(pki::SERVER_KEY).unwrap_or_default(),
    });
    let server = ServerSettings {
        name: "v4".into(),
        listen: cli.listen,
        tls,
        // rumqttd's sample config waits 1 ms after each accept; 0 gives it its best connect rate.
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 256 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        router: RouterConfig {
            max_connections: cli.max_connections + 64,
            max_outgoing_packet_count: 200,
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 8,
            ..Default::default()
        },
        v4: Some(HashMap::from([("v4".to_owned(), server)])),
        ..Default::default()
    };
    let mut broker = Broker::new(config);
    if let Err(e) = broker.start() {
        eprintln!("bench-rumqttd: {e}");
        std::process::exit(2);
    }
}
