//! The engines a cluster of relay nodes runs on, started by the bench itself on loopback:
//! a PostgreSQL server (Debian's programs, `initdb` in the run's directory), optionally a
//! synchronous standby streaming from it, and NATS servers joined by routes into one bus.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::servers::free_port;

/// Where Debian puts PostgreSQL's server programs, newest version first.
fn pg_bindir() -> anyhow::Result<PathBuf> {
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
    found.pop().context(
        "no PostgreSQL server programs in /usr/lib/postgresql/*/bin: apt-get install postgresql",
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `program`, run as the `postgres` user when the bench runs as root (the server refuses root).
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn run(mut cmd: Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("could not run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A directory the `postgres` user owns and can reach.
fn pg_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    if is_root() {
        run(
            {
                let mut c = Command::new("chown");
                c.arg("postgres").arg(dir);
                c
            },
            "chown postgres",
        )?;
        let mut parent = dir.parent();
        while let Some(p) = parent {
            if p == Path::new("/tmp") || p == Path::new("/") {
                break;
            }
            let _ = Command::new("chmod").arg("o+x").arg(p).status();
            parent = p.parent();
        }
    }
    Ok(())
}

/// One PostgreSQL server, stopped when dropped.
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
}

impl Postgres {
    /// A new database cluster in `dir`, started, with database `chukei`. Settings as a relay
    /// operator would run it: fsync and `synchronous_commit` on (the defaults).
    pub fn start(dir: &Path) -> anyhow::Result<Postgres> {
        let bin = pg_bindir()?;
        pg_dir(dir)?;
        let data = dir.join("data");
        let mut initdb = as_postgres(&bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust"]);
        run(initdb, "initdb")?;
        let pg = Postgres {
            bin,
            data,
            port: free_port()?,
        };
        pg.start_server()?;
        pg.sql("postgres", "CREATE DATABASE chukei")?;
        Ok(pg)
    }

    fn start_server(&self) -> anyhow::Result<()> {
        let mut start = as_postgres(&self.bin.join("pg_ctl"));
        start
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.data.with_file_name("server.log"))
            .arg("-w")
            .arg("-o")
            .arg(format!(
                // Room for a write-heavy load, as an operator would give it: larger buffers,
                // checkpoints far apart (fewer full-page images in the WAL), compressed WAL.
                "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories='' -c max_connections=200 \
                 -c shared_buffers=512MB -c max_wal_size=8GB -c checkpoint_timeout=30min -c wal_compression=on",
                self.port
            ))
            .arg("start");
        run(start, "pg_ctl start")
    }

    /// A synchronous standby: a base backup streaming from this server, and this server told to
    /// wait for it on every commit, so an acked report is on two servers' disks.
    pub fn start_standby(&self, dir: &Path) -> anyhow::Result<Postgres> {
        pg_dir(dir)?;
        let data = dir.join("data");
        let mut backup = as_postgres(&self.bin.join("pg_basebackup"));
        backup
            .arg("-D")
            .arg(&data)
            .args(["-R", "-X", "stream", "-c", "fast", "-d"])
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres application_name=standby",
                self.port
            ));
        run(backup, "pg_basebackup")?;
        let standby = Postgres {
            bin: self.bin.clone(),
            data,
            port: free_port()?,
        };
        standby.start_server()?;
        self.sql(
            "postgres",
            "ALTER SYSTEM SET synchronous_standby_names = 'standby'",
        )?;
        self.sql("postgres", "SELECT pg_reload_conf()")?;
        let started = Instant::now();
        while self.sql("postgres", "SELECT sync_state FROM pg_stat_replication")? != "sync" {
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the standby did not become synchronous within 60 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(standby)
    }

    /// `postgresql://postgres@127.0.0.1:PORT/chukei`.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/chukei", self.port)
    }

    /// Runs SQL with psql; what it printed (unaligned, tuples only).
    pub fn sql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let out = Command::new(self.bin.join("psql"))
            .arg(format!(
                "postgresql://postgres@127.0.0.1:{}/{db}",
                self.port
            ))
            .args(["-v", "ON_ERROR_STOP=1", "-Atc", sql])
            .output()
            .context("could not run psql")?;
        if !out.status.success() {
            bail!(
                "psql -c {sql:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The server's processes: the postmaster (first line of `postmaster.pid`) and its
    /// children (a backend per connection, the WAL writer, …).
    pub fn pids(&self) -> Vec<u32> {
        let main: Option<u32> = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()));
        let Some(main) = main else {
            return Vec::new();
        };
        let mut all = vec![main];
        all.extend(crate::procfs::children(main));
        all
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

/// NATS servers joined by routes into one bus, stopped when dropped.
pub struct Nats {
    children: Vec<std::process::Child>,
    ports: Vec<u16>,
}

impl Nats {
    pub fn start_cluster(dir: &Path, n: usize) -> anyhow::Result<Nats> {
        let program = if Path::new("/usr/sbin/nats-server").is_file() {
            "/usr/sbin/nats-server"
        } else {
            "nats-server"
        };
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
        let all = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nats = Nats {
            children: Vec::new(),
            ports: Vec::new(),
        };
        for (i, route) in routes.iter().enumerate() {
            let port = free_port()?;
            let log = std::fs::File::create(dir.join(format!("nats{i}.log")))?;
            let child = Command::new(program)
                .args(["-a", "127.0.0.1", "-p", &port.to_string()])
                .args(["--cluster_name", "chukei", "--cluster"])
                .arg(format!("nats://127.0.0.1:{route}"))
                .args(["--routes", &all])
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("could not start nats-server: apt-get install nats-server")?;
            nats.children.push(child);
            nats.ports.push(port);
        }
        for port in &nats.ports {
            let started = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                if started.elapsed() > Duration::from_secs(20) {
                    bail!("nats-server on port {port} did not start");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(nats)
    }

    /// `nats://127.0.0.1:PORT` of every server.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(std::process::Child::id).collect()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
