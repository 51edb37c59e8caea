//! The store the core's tests run on: one suite, every backend. `CHUKEI_TEST_STORE` names the
//! backend — `redb`, the default, on a file in the test's temp directory; or `postgres`, a
//! database of its own per test directory on the server `CHUKEI_TEST_PG_URL` names
//! (`scripts/with-postgres` starts one on loopback and sets both):
//! `scripts/with-postgres cargo nextest run -p chukei-broker core:: store::`. The store-level tests
//! written against the interface take their store here too.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use super::{RedbStore, Store};

/// The environment variable that picks the backend.
pub const BACKEND_VAR: &str = "CHUKEI_TEST_STORE";

/// Opens the test store kept under `dir`; opening the same `dir` again finds what was committed
/// (the tests of restarts rely on it).
pub fn open(dir: &Path) -> Arc<dyn Store> {
    let backend = std::env::var(BACKEND_VAR).unwrap_or_else(|_| "redb".to_owned());
    match backend.as_str() {
        "redb" => Arc::new(RedbStore::open(dir).expect("open a redb store in a temp dir")),
        "postgres" => Arc::new(postgres_store(dir)),
        other => panic!("{BACKEND_VAR}={other}: unknown store backend (known: redb, postgres)"),
    }
}

/// Whether the tests run on the `postgres` backend (tests of the PostgreSQL store alone return
/// early otherwise).
pub(crate) fn on_postgres() -> bool {
    std::env::var(BACKEND_VAR).as_deref() == Ok("postgres")
}

/// The server's URL for the `postgres` backend.
pub const PG_URL_VAR: &str = "CHUKEI_TEST_PG_URL";

/// A database named after `dir` (created and migrated the first time), so that a test that
/// opens the same directory again finds what it committed.
pub(crate) fn postgres_store(dir: &Path) -> super::PgStore {
    let url = postgres_database(dir);
    super::pg_store::migrate(&url).expect("migrate the test database");
    super::PgStore::open(&url).expect("open the test database")
}

/// [`postgres_store`] reached through a relay on loopback that counts the store's trips: the
/// reads that bring its requests, one per trip however many statements it holds.
pub(crate) fn postgres_store_counting_trips(dir: &Path) -> (super::PgStore, Arc<AtomicUsize>) {
    let url = postgres_database(dir);
    super::pg_store::migrate(&url).expect("migrate the test database");
    let config: tokio_postgres::Config = url.parse().expect("the test database's URL");
    let server = config.get_ports()[0];
    let (proxy, trips) = counting_proxy(server);
    let store = super::PgStore::open(&url.replace(
        &format!("127.0.0.1:{server}/"),
        &format!("127.0.0.1:{proxy}/"),
    ))
    .expect("open the test database through the counting relay");
    (store, trips)
}

/// Forwards one connection's bytes between a store and the server on loopback, counting the
/// reads that bring the store's requests: one per trip, however many statements it holds.
fn counting_proxy(server: u16) -> (u16, Arc<AtomicUsize>) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let bursts = Arc::new(AtomicUsize::new(0));
    let counted = bursts.clone();
    std::thread::spawn(move || {
        for store in listener.incoming() {
            let Ok(mut store) = store else { return };
            let Ok(mut server) = std::net::TcpStream::connect(("127.0.0.1", server)) else {
                return;
            };
            let (mut store_out, mut server_in) =
                (store.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut server_in, &mut store_out));
            let counted = counted.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n @ 1..) = store.read(&mut buf) {
                    counted.fetch_add(1, Ordering::SeqCst);
                    if server.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                let _ = server.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (port, bursts)
}

/// The URL of a database named after `dir`, created the first time, with whatever schema it
/// has (none when new).
pub(crate) fn postgres_database(dir: &Path) -> String {
    let server = std::env::var(PG_URL_VAR).unwrap_or_else(|_| {
        panic!("{BACKEND_VAR}=postgres needs {PG_URL_VAR} (scripts/with-postgres sets it)")
    });
    // FNV-1a of the path: short, stable, a valid identifier.
    let hash = dir
        .to_string_lossy()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    let name = format!("chukei_t_{hash:016x}");
    let admin = server.clone();
    let create = name.clone();
    // The blocking client runs a runtime of its own: not on a test's runtime thread.
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&admin, postgres::NoTls)
            .unwrap_or_else(|e| panic!("{PG_URL_VAR}={admin}: {e}"));
        let exists = client
            .query("SELECT 1 FROM pg_database WHERE datname = $1", &[&create])
            .expect("look the test database up");
        if exists.is_empty() {
            client
                .batch_execute(&format!("CREATE DATABASE {create}"))
                .expect("create the test database");
        }
    })
    .join()
    .expect("create the test database");
    with_dbname(&server, &name)
}

/// `url` with its database replaced by `name` (`postgresql://user@host:port/db?…`).
fn with_dbname(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}
