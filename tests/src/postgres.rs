//! A real PostgreSQL server for the cluster tests, as an operator would run it (the
//! `chukei-engines` crate: Debian's programs, installed by `scripts/test`, a cluster made by
//! `initdb` in the test's directory, on loopback). Every step panics with the reason, as a test
//! should; stopped when dropped.

use std::path::Path;

use crate::TestEnv;

/// One running server. Derefs to [`engines::Postgres`] (`port`, `url`, `log_path`).
pub struct Postgres(engines::Postgres);

impl std::ops::Deref for Postgres {
    type Target = engines::Postgres;
    fn deref(&self) -> &engines::Postgres {
        &self.0
    }
}

impl Postgres {
    /// Makes a database cluster under the test's directory and starts its server.
    pub fn start(env: &TestEnv, name: &str) -> Postgres {
        let dir = env.path(format!("pg-{name}"));
        Postgres(
            engines::Postgres::start(&dir, &["max_connections=200"])
                .unwrap_or_else(|e| panic!("PostgreSQL {name}: {e}")),
        )
    }

    /// Like [`Postgres::start`], as a server reached over a network should be run
    /// ([`engines::Postgres::require_tls`]): TLS only for the node user `chukei`, by its
    /// certificate; database `chukei` is its.
    pub fn start_tls(env: &TestEnv, name: &str, pki_dir: &Path) -> Postgres {
        let pg = Postgres::start(env, name);
        pg.0.require_tls(pki_dir, name)
            .unwrap_or_else(|e| panic!("TLS for PostgreSQL {name}: {e}"));
        pg
    }

    /// The URL a node reaches a [`Postgres::start_tls`] server by (`sslmode=verify-full`).
    pub fn tls_url(&self, pki_dir: &Path) -> String {
        self.0
            .tls_url(pki_dir)
            .unwrap_or_else(|e| panic!("the node's certificate: {e}"))
    }

    /// Stops the server at once (as if its machine died).
    pub fn stop(&self) {
        self.0.stop().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts the stopped server again, on the same port and data.
    pub fn start_again(&self) {
        self.0.start_again().unwrap_or_else(|e| panic!("{e}"));
    }

    /// A synchronous standby of this server, returned once it is synchronous.
    pub fn start_standby(&self, env: &TestEnv, name: &str) -> Postgres {
        let dir = env.path(format!("pg-{name}"));
        Postgres(
            self.0
                .start_standby(&dir, name)
                .unwrap_or_else(|e| panic!("standby {name}: {e}")),
        )
    }

    /// Makes a standby the primary (`pg_ctl promote`), as an operator or Patroni would.
    pub fn promote(&self) {
        self.0.promote().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Runs SQL as the superuser in `db`, returning what psql printed (unaligned, tuples only).
    pub fn sql(&self, db: &str, sql: &str) -> String {
        self.0.sql(db, sql).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Creates an empty database.
    pub fn create_db(&self, db: &str) {
        self.0.create_db(db).unwrap_or_else(|e| panic!("{e}"));
    }

    /// A server with database `chukei` and the relay's schema (`broker db migrate`), and the
    /// database's URL.
    pub async fn with_schema(env: &TestEnv) -> (Postgres, String) {
        let pg = Postgres::start(env, "db");
        pg.create_db("chukei");
        let url = pg.url("chukei");
        let (ok, _, err) = crate::broker_cmd(&["db", "migrate", "--cluster-db", &url]).await;
        assert!(ok, "broker db migrate: {err}");
        (pg, url)
    }
}

/// A port on 127.0.0.1 free a moment ago.
pub(crate) fn free_port() -> u16 {
    engines::free_port().unwrap_or_else(|e| panic!("{e}"))
}
