//! A PostgreSQL server of our own: Debian's programs (`/usr/lib/postgresql/VERSION/bin`), a
//! database cluster made by `initdb` in the caller's directory, TCP on 127.0.0.1 only.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{EngineError, Result, free_port, io, is_root, run};

/// Ports a server start tries before it gives up ([`Postgres::start`]).
const PORT_TRIES: usize = 5;
/// What PostgreSQL logs when its port was taken between the pick and the bind.
const ADDRESS_IN_USE: &str = "Address already in use";

/// The database user and database a node of the cluster uses on a server with
/// [`Postgres::require_tls`].
pub const NODE_USER: &str = "chukei";

/// One running server, stopped (`-m immediate`) when dropped.
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    settings: Vec<String>,
}

/// Where Debian puts the server's programs, newest version first.
fn bindir() -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(std::result::Result::ok)
                .map(|e| e.path().join("bin"))
                .filter(|b| b.join("initdb").is_file())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().ok_or(EngineError::NotInstalled {
        what: "PostgreSQL's server (/usr/lib/postgresql/*/bin)",
        install: "apt-get install postgresql",
    })
}

/// `program`, as the `postgres` user when this process is root's.
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// A directory the server's user owns and can reach through its parents (a temporary
/// directory is root's and 0700).
fn server_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    if !is_root() {
        return Ok(());
    }
    let mut chown = Command::new("chown");
    chown.arg("postgres").arg(dir);
    run(chown, "chown postgres")?;
    let mut parent = dir.parent();
    while let Some(p) = parent {
        if p == Path::new("/tmp") || p == Path::new("/") {
            break;
        }
        let mut chmod = Command::new("chmod");
        chmod.arg("o+x").arg(p);
        run(chmod, "chmod o+x")?;
        parent = p.parent();
    }
    Ok(())
}

impl Postgres {
    /// Makes a database cluster in `dir/data` (superuser `postgres`, trusted on loopback) and
    /// starts its server with `settings` (`name=value`, each passed as `-c`).
    pub fn start(dir: &Path, settings: &[&str]) -> Result<Postgres> {
        Postgres::start_picking(dir, settings, free_port)
    }

    /// [`Postgres::start`] with the ports to try from `pick`.
    fn start_picking(
        dir: &Path,
        settings: &[&str],
        pick: impl FnMut() -> Result<u16>,
    ) -> Result<Postgres> {
        let bin = bindir()?;
        server_dir(dir)?;
        let data = dir.join("data");
        let mut initdb = as_postgres(&bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "--no-sync"]);
        run(initdb, "initdb")?;
        let mut pg = Postgres {
            bin,
            data,
            port: 0,
            settings: settings.iter().map(|s| (*s).to_owned()).collect(),
        };
        pg.start_on_a_free_port(pick)?;
        Ok(pg)
    }

    /// Starts the server on a port from `pick`. A port free when it was picked may be taken by
    /// the time the server binds it (a test beside this one, or any socket's ephemeral port), so
    /// a start that fails because the address is in use picks again, up to [`PORT_TRIES`] times.
    fn start_on_a_free_port(&mut self, mut pick: impl FnMut() -> Result<u16>) -> Result<()> {
        let mut tries = 0;
        loop {
            self.port = pick()?;
            tries += 1;
            let logged = std::fs::metadata(self.log_path()).map_or(0, |m| m.len());
            match self.start_again() {
                Ok(()) => return Ok(()),
                Err(_) if tries < PORT_TRIES && self.logged_since(logged, ADDRESS_IN_USE) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the server's log says `what` after its first `from` bytes.
    fn logged_since(&self, from: u64, what: &str) -> bool {
        std::fs::read(self.log_path()).is_ok_and(|log| {
            let from = usize::try_from(from).unwrap_or(usize::MAX).min(log.len());
            String::from_utf8_lossy(&log[from..]).contains(what)
        })
    }

    /// Starts the stopped server again, on the same port and data.
    pub fn start_again(&self) -> Result<()> {
        let mut options = format!(
            // TCP only: a test directory's path is too long for a Unix socket's.
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories=''",
            self.port
        );
        for s in &self.settings {
            options.push_str(&format!(" -c {s}"));
        }
        let mut start = as_postgres(&self.bin.join("pg_ctl"));
        start
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-o", &options, "start"]);
        run(start, "pg_ctl start").map(drop)
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.data.with_file_name("server.log")
    }

    /// Stops the server at once (`-m immediate`: as if its machine died; nothing committed is
    /// lost, PostgreSQL recovers it at the next start).
    pub fn stop(&self) -> Result<()> {
        let mut stop = as_postgres(&self.bin.join("pg_ctl"));
        stop.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"]);
        run(stop, "pg_ctl stop").map(drop)
    }

    /// A synchronous standby in `dir`, as an operator sets one up: a base backup streaming
    /// from this server (`pg_basebackup -R`) as `name`, and this server told to wait for it on
    /// every commit (`synchronous_standby_names`) — returned once it is synchronous, so that a
    /// commit is on both servers' disks from then on.
    pub fn start_standby(&self, dir: &Path, name: &str) -> Result<Postgres> {
        server_dir(dir)?;
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
        run(backup, "pg_basebackup")?;
        let mut standby = Postgres {
            bin: self.bin.clone(),
            data,
            port: 0,
            settings: self.settings.clone(),
        };
        standby.start_on_a_free_port(free_port)?;
        self.sql(
            "postgres",
            &format!("ALTER SYSTEM SET synchronous_standby_names = '{name}'"),
        )?;
        self.sql("postgres", "SELECT pg_reload_conf()")?;
        let started = Instant::now();
        while self.sql("postgres", "SELECT sync_state FROM pg_stat_replication")? != "sync" {
            if started.elapsed() > Duration::from_secs(60) {
                return Err(EngineError::NotReady(
                    "the standby did not become synchronous within 60 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(standby)
    }

    /// Makes a standby the primary (`pg_ctl promote`), as an operator or Patroni would.
    pub fn promote(&self) -> Result<()> {
        let mut promote = as_postgres(&self.bin.join("pg_ctl"));
        promote.arg("-D").arg(&self.data).args(["-w", "promote"]);
        run(promote, "pg_ctl promote").map(drop)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgresql://postgres@127.0.0.1:PORT/DB`: the superuser, in the clear.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs SQL as the superuser in `db` (psql); what it printed (unaligned, tuples only).
    pub fn sql(&self, db: &str, sql: &str) -> Result<String> {
        let mut psql = Command::new(self.bin.join("psql"));
        psql.arg(self.url(db))
            .args(["-v", "ON_ERROR_STOP=1", "-Atc", sql]);
        run(psql, &format!("psql -c {sql:?}"))
    }

    /// Creates an empty database.
    pub fn create_db(&self, db: &str) -> Result<()> {
        self.sql("postgres", &format!("CREATE DATABASE {db}"))
            .map(drop)
    }

    /// The postmaster's process id (the first line of `postmaster.pid`); its children are the
    /// backends, the WAL writer and the rest.
    pub fn main_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
    }

    /// Makes this server one to reach over a network: TLS with a certificate for 127.0.0.1
    /// named `name` from the CA in `pki_dir` (`broker pki cluster-cert`), and the node user
    /// [`NODE_USER`] admitted over TLS with a client certificate whose CN is its name only
    /// (`hostssl … cert`; in the clear: rejected), owning database [`NODE_USER`]. The
    /// superuser still connects in the clear from this machine.
    pub fn require_tls(&self, pki_dir: &Path, name: &str) -> Result<()> {
        let (cert, key) = pki::cluster::issue_cluster_to_dir(pki_dir, name, &["127.0.0.1".into()])?;
        for (from, to) in [
            (cert, "server.crt"),
            (key, "server.key"),
            (pki_dir.join(pki::CA_CERT), "root.crt"),
        ] {
            let dest = self.data.join(to);
            std::fs::copy(&from, &dest).map_err(io(format!("copying {}", from.display())))?;
            if is_root() {
                let mut chown = Command::new("chown");
                chown.arg("postgres").arg(&dest);
                run(chown, "chown postgres")?;
            }
        }
        let mut chmod = Command::new("chmod");
        chmod.arg("600").arg(self.data.join("server.key"));
        run(chmod, "chmod 600 server.key")?;
        let conf = self.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).map_err(io("reading postgresql.conf"))?;
        text.push_str(
            "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'root.crt'\n",
        );
        std::fs::write(&conf, text).map_err(io("writing postgresql.conf"))?;
        // The first matching line decides: the node user by certificate over TLS, never in
        // the clear; everyone else (the superuser) as before.
        let hba_path = self.data.join("pg_hba.conf");
        let hba = std::fs::read_to_string(&hba_path).map_err(io("reading pg_hba.conf"))?;
        std::fs::write(
            &hba_path,
            format!(
                "hostssl all {NODE_USER} 127.0.0.1/32 cert\nhost all {NODE_USER} 127.0.0.1/32 reject\n{hba}"
            ),
        )
        .map_err(io("writing pg_hba.conf"))?;
        self.sql("postgres", "SELECT pg_reload_conf()")?;
        self.sql("postgres", &format!("CREATE ROLE {NODE_USER} LOGIN"))?;
        self.sql(
            "postgres",
            &format!("CREATE DATABASE {NODE_USER} OWNER {NODE_USER}"),
        )?;
        Ok(())
    }

    /// The URL a node reaches a [`Postgres::require_tls`] server by: `sslmode=verify-full`
    /// against the CA in `pki_dir`, logged in as [`NODE_USER`] by its certificate
    /// (`pki_dir/cluster/chukei.pem`, issued on first use).
    pub fn tls_url(&self, pki_dir: &Path) -> Result<String> {
        let (cert, key) = pki::cluster::cluster_cert_paths(pki_dir, NODE_USER);
        if !cert.exists() {
            pki::cluster::issue_cluster_to_dir(pki_dir, NODE_USER, &[])?;
        }
        Ok(format!(
            "postgresql://{NODE_USER}@127.0.0.1:{}/{NODE_USER}?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
            self.port,
            pki_dir.join(pki::CA_CERT).display(),
            cert.display(),
            key.display()
        ))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The race made on purpose: the first port picked is taken before the server binds it. The
    /// server says so in its log, and starts on the next port picked. Needs Debian's
    /// `postgresql` (`scripts/test` installs it).
    #[test]
    fn a_server_whose_port_was_taken_meanwhile_starts_on_another() {
        let dir = tempfile::tempdir().unwrap();
        let (_taken, taken_port, pick) = crate::taken_first();
        let pg = Postgres::start_picking(&dir.path().join("pg"), &[], pick)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(pg.port(), taken_port);
        assert!(
            pg.logged_since(0, ADDRESS_IN_USE),
            "the first start failed for the taken port"
        );
        assert_eq!(pg.sql("postgres", "SELECT 1").unwrap(), "1");
        pg.stop().unwrap();
    }
}
