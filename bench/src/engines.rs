//! The engines a cluster of relay nodes runs on (the `chukei-engines` crate): PostgreSQL with
//! the settings a write-heavy relay cluster gets, optionally a synchronous standby, and three
//! NATS servers joined by routes. What the bench adds: every process of each, for its CPU meter.

use std::path::Path;

use anyhow::Context;

pub use engines::NatsCluster as Nats;

/// Room for a write-heavy load, as an operator would give it: larger buffers, checkpoints far
/// apart (fewer full-page images in the WAL), compressed WAL. fsync and `synchronous_commit`
/// stay on (the defaults).
///
/// `wal_init_zero=off`: a database that has run a while writes into WAL files it recycled at
/// its checkpoints; the bench's database is new and makes no checkpoint during a run, so each
/// 16 MB WAL file is new, and PostgreSQL fills it with zeros before using it, on the primary
/// and on the standby. Every commit waits meanwhile: measured, all three nodes' commits stalled
/// 70–130 ms at new WAL files (every 6–15 s at 1,500 reports/s), part of what made the ack and
/// alarm p99 (bench/RESULTS.md, "An alarm lane"). Not filling them stands in for the recycled
/// files of a database in service.
const SETTINGS: &[&str] = &[
    "max_connections=200",
    "shared_buffers=512MB",
    "max_wal_size=8GB",
    "checkpoint_timeout=30min",
    "wal_compression=on",
    "wal_init_zero=off",
    // Each autovacuum run in the server's log, to set beside the relays' commit times.
    "log_autovacuum_min_duration=0",
];

/// One PostgreSQL server with database `chukei`, stopped when dropped.
pub struct Postgres(engines::Postgres);

impl Postgres {
    /// With `tls` (the CA's directory), the node user logs in by certificate over TLS only.
    pub fn start(dir: &Path, tls: Option<&Path>) -> anyhow::Result<Postgres> {
        let pg = engines::Postgres::start(dir, SETTINGS).context("starting PostgreSQL")?;
        match tls {
            Some(pki_dir) => pg.require_tls(pki_dir, "db")?,
            None => pg.create_db("chukei")?,
        }
        Ok(Postgres(pg))
    }

    /// Vacuums and freezes what a phase left (`VACUUM (FREEZE, ANALYZE)`), then makes a
    /// checkpoint here and on `standby` and flushes the machine's dirty pages (`sync`), so that
    /// the next phase does not pay for the last one. Measured without it: the max phase's
    /// millions of readings started an autovacuum of `readings` during the paced phase (11 s,
    /// 28 MB/s written), and every node's commits stalled 100–460 ms while it ran and when its
    /// pages were written back (bench/RESULTS.md, "An alarm lane").
    pub fn settle(&self, standby: Option<&Postgres>) -> anyhow::Result<()> {
        self.0
            .sql("chukei", "VACUUM (FREEZE, ANALYZE)")
            .context("vacuuming between phases")?;
        self.0
            .sql("chukei", "CHECKPOINT")
            .context("a checkpoint between phases")?;
        if let Some(standby) = standby {
            standby
                .0
                .sql("postgres", "CHECKPOINT")
                .context("a restartpoint on the standby between phases")?;
        }
        let synced = std::process::Command::new("sync")
            .status()
            .context("running sync")?;
        anyhow::ensure!(synced.success(), "sync failed: {synced}");
        Ok(())
    }

    /// A synchronous standby: every acked report is on two servers' disks.
    pub fn start_standby(&self, dir: &Path) -> anyhow::Result<Postgres> {
        Ok(Postgres(self.0.start_standby(dir, "standby")?))
    }

    /// The nodes' URL: `postgresql://postgres@127.0.0.1:PORT/chukei`, or with `tls` the node
    /// user's with `sslmode=verify-full` and its certificate.
    pub fn url(&self, tls: Option<&Path>) -> anyhow::Result<String> {
        Ok(match tls {
            Some(pki_dir) => self.0.tls_url(pki_dir)?,
            None => self.0.url("chukei"),
        })
    }

    /// The port the primary listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.0.port()
    }

    /// The postmaster and its children (a backend per connection, the WAL writer, …).
    pub fn pids(&self) -> Vec<u32> {
        let Some(main) = self.0.main_pid() else {
            return Vec::new();
        };
        let mut all = vec![main];
        all.extend(crate::procfs::children(main));
        all
    }
}
