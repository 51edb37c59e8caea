//! A real PostgreSQL server for the cluster tests, as an operator would run it: Debian's
//! `postgresql` programs (installed by `scripts/test`), a cluster made by `initdb` in the test's
//! directory, listening on loopback on a port of its own. Stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::TestEnv;

/// One running server.
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
}

/// Where Debian puts the server's programs (`/usr/lib/postgresql/VERSION/bin`), newest first.
fn bindir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .filter(|b| b.join("initdb").is_file())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!("no PostgreSQL server programs in /usr/lib/postgresql/*/bin: install Debian's postgresql (scripts/test does)")
    })
}

/// The command, run as the `postgres` user when the tests run as root (the server refuses root).
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn is_root() -> bool {
    std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || std::fs::read_to_string("/proc/self/status")
            .map(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    == Some("0")
            })
            .unwrap_or(false)
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A server's directory in the test's, made and (when the tests run as root) given to the
/// `postgres` user: the test's directory is root's, the server's own must be postgres's.
fn server_dir(env: &TestEnv, name: &str) -> PathBuf {
    let dir = env.path(format!("pg-{name}"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    if is_root() {
        run(
            {
                let mut c = Command::new("chown");
                c.arg("postgres").arg(&dir);
                c
            },
            "chown postgres",
        );
    }
    dir
}

impl Postgres {
    /// Makes a database cluster under the test's directory and starts its server.
    pub fn start(env: &TestEnv, name: &str) -> Postgres {
        let bin = bindir();
        let dir = server_dir(env, name);
        if is_root() {
            let mut parent = dir.parent();
            while let Some(p) = parent {
                if p == Path::new("/tmp") || p == Path::new("/") {
                    break;
                }
                // Let postgres reach its directory through the test's (0700 by tempfile).
                let _ = Command::new("chmod").arg("o+x").arg(p).status();
                parent = p.parent();
            }
        }
        let data = dir.join("data");
        let mut initdb = as_postgres(&bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "--no-sync"]);
        run(initdb, "initdb");
        let pg = Postgres {
            bin,
            data,
            port: free_port(),
        };
        pg.start_server();
        pg
    }

    /// Like [`Postgres::start`], as a server reached over a network should be run: TLS with a
    /// certificate for 127.0.0.1 from the CA in `pki_dir` (`broker pki cluster-cert`), and the
    /// nodes' user `chukei` admitted only over TLS with a client certificate whose CN is
    /// `chukei` (`hostssl … cert`; in the clear: rejected). The superuser still connects in
    /// the clear, as the tests' own `psql` does. Database `chukei` is the node user's.
    pub fn start_tls(env: &TestEnv, name: &str, pki_dir: &Path) -> Postgres {
        let pg = Postgres::start(env, name);
        let (cert, key) = pki::cluster::issue_cluster_to_dir(pki_dir, name, &["127.0.0.1".into()])
            .unwrap_or_else(|e| panic!("issuing the database's certificate: {e}"));
        let conf = pg.data.clone();
        for (from, to) in [
            (cert, "server.crt"),
            (key, "server.key"),
            (pki_dir.join(pki::CA_CERT), "root.crt"),
        ] {
            std::fs::copy(&from, conf.join(to))
                .unwrap_or_else(|e| panic!("{} -> {to}: {e}", from.display()));
        }
        if is_root() {
            let mut chown = Command::new("chown");
            chown
                .arg("postgres")
                .arg(conf.join("server.crt"))
                .arg(conf.join("server.key"))
                .arg(conf.join("root.crt"));
            run(chown, "chown postgres");
        }
        let mut chmod = Command::new("chmod");
        chmod.arg("600").arg(conf.join("server.key"));
        run(chmod, "chmod 600 server.key");
        let append = |file: &str, text: &str| {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .append(true)
                .open(conf.join(file))
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .unwrap_or_else(|e| panic!("{file}: {e}"));
        };
        append(
            "postgresql.conf",
            "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'root.crt'\n",
        );
        // The first matching line decides: the node user by certificate over TLS, never in the
        // clear; everyone else (the superuser) as before.
        let hba = std::fs::read_to_string(conf.join("pg_hba.conf"))
            .unwrap_or_else(|e| panic!("pg_hba.conf: {e}"));
        std::fs::write(
            conf.join("pg_hba.conf"),
            format!(
                "hostssl all chukei 127.0.0.1/32 cert\nhost all chukei 127.0.0.1/32 reject\n{hba}"
            ),
        )
        .unwrap_or_else(|e| panic!("pg_hba.conf: {e}"));
        pg.sql("postgres", "SELECT pg_reload_conf()");
        pg.sql("postgres", "CREATE ROLE chukei LOGIN");
        pg.sql("postgres", "CREATE DATABASE chukei OWNER chukei");
        pg
    }

    /// The URL a node reaches a [`Postgres::start_tls`] server by: `sslmode=verify-full` against
    /// the CA in `pki_dir`, logged in as `chukei` by its certificate (issued on first use).
    pub fn tls_url(&self, pki_dir: &Path) -> String {
        let (cert, key) = pki::cluster::cluster_cert_paths(pki_dir, "chukei");
        if !cert.exists() {
            pki::cluster::issue_cluster_to_dir(pki_dir, "chukei", &[])
                .unwrap_or_else(|e| panic!("issuing the node's certificate: {e}"));
        }
        format!(
            "postgresql://chukei@127.0.0.1:{}/chukei?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
            self.port,
            pki_dir.join(pki::CA_CERT).display(),
            cert.display(),
            key.display()
        )
    }

    fn start_server(&self) {
        let mut start = as_postgres(&self.bin.join("pg_ctl"));
        start
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.data.with_file_name("server.log"))
            .arg("-w")
            .arg("-o")
            .arg(format!(
                // TCP only: a test directory's path is too long for a Unix socket's.
                "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories='' -c max_connections=200",
                self.port
            ))
            .arg("start");
        run(start, "pg_ctl start");
    }

    /// Stops the server at once (`-m immediate`: as if its machine died; nothing committed is
    /// lost, PostgreSQL recovers it at the next start).
    pub fn stop(&self) {
        let mut stop = as_postgres(&self.bin.join("pg_ctl"));
        stop.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"]);
        run(stop, "pg_ctl stop");
    }

    /// Starts the stopped server again, on the same port and data.
    pub fn start_again(&self) {
        self.start_server();
    }

    /// A synchronous standby of this server, as an operator sets one up: a base backup streaming
    /// from it (`pg_basebackup -R`), and this server told to wait for the standby on every commit
    /// (`synchronous_standby_names`), so a commit is on both servers' disks.
    pub fn start_standby(&self, env: &TestEnv, name: &str) -> Postgres {
        let dir = server_dir(env, name);
        let data = dir.join("data");
        let mut backup = as_postgres(&self.bin.join("pg_basebackup"));
        backup
            .arg("-D")
            .arg(&data)
            // A fast checkpoint: the default spreads it over minutes.
            .args(["-R", "-X", "stream", "-c", "fast", "-d"])
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres application_name={name}",
                self.port
            ));
        run(backup, "pg_basebackup");
        let standby = Postgres {
            bin: self.bin.clone(),
            data,
            port: free_port(),
        };
        standby.start_server();
        self.sql(
            "postgres",
            &format!("ALTER SYSTEM SET synchronous_standby_names = '{name}'"),
        );
        self.sql("postgres", "SELECT pg_reload_conf()");
        standby
    }

    /// Makes a standby the primary (`pg_ctl promote`), as an operator or Patroni would.
    pub fn promote(&self) {
        let mut promote = as_postgres(&self.bin.join("pg_ctl"));
        promote.arg("-D").arg(&self.data).args(["-w", "promote"]);
        run(promote, "pg_ctl promote");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgresql://postgres@127.0.0.1:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs SQL as the superuser in `db` (psql), returning what it printed (unaligned, tuples
    /// only).
    pub fn sql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .arg(self.url(db))
            .args(["-v", "ON_ERROR_STOP=1", "-Atc", sql])
            .output()
            .unwrap_or_else(|e| panic!("could not run psql: {e}"));
        assert!(
            out.status.success(),
            "psql -c {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
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

    /// Creates an empty database.
    pub fn create_db(&self, db: &str) {
        self.sql("postgres", &format!("CREATE DATABASE {db}"));
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}
