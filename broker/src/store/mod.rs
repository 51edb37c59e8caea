//! The relay's durable state: jobs, their timelines, what devices reported, the dedupe journal,
//! devices, presence, alarms, meter readings, firmware artifacts and the notification outbox.
//!
//! [`interface`] says what the core and the notification worker need from storage — a [`Store`]
//! that begins transactions, a [`Txn`] with one trait per kind of record — and nothing else in the
//! relay names a table. [`RedbStore`] implements it on one embedded redb file; another backend (a
//! database shared by a cluster of relays) implements the same traits and runs the same core
//! tests (docs/decisions.md, D14).
//!
//! Records are CBOR wherever a backend keeps a record as bytes (`encode`, `decode`): a record
//! that does not decode is a [`StoreError::Corrupt`] naming its table and key, never a panic.

mod device_journal;
pub mod interface;
pub mod pg_store;
mod records;
mod redb_store;
pub mod seen;
mod space;
#[cfg(test)]
pub(crate) mod testing;

use std::fmt::Display;
use std::path::PathBuf;

use protocol::JobId;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use interface::{
    AlarmTables, ArtifactTables, DeviceTables, Hints, JobTables, JournalTables, NotificationTables,
    OpenJobKey, PresenceTables, ReadingTables, RolloutTables, Store, StoreStats, Txn, UplinkTables,
};
pub use pg_store::PgStore;
pub use records::{
    AlarmDigest, DeviceRecord, Due, JobRecord, JournalEntry, JournalOutcome, MAX_DIGEST_ALARMS,
    MAX_OVERFLOW_CODES, Member, NotifyChannel, OverflowRecord, PresenceRecord, QueuedNotification,
    ReadingCursor, RolloutRecord, WaveRecord, alarm_id, alarm_number, rollout_id, rollout_number,
};
pub use redb_store::format::{FORMAT_VERSION, force_version};
#[cfg(test)]
pub(crate) use redb_store::test_disk;
pub use redb_store::{FILE_NAME, RedbStore, RedbTxn};
pub use space::{Reading as SpaceReading, Space};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the data directory {}: {source}", .path.display())]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot open the store {}: {source} (is another broker using the same data directory?)",
        .path.display()
    )]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error("store failed to {op}: {source}")]
    Backend {
        op: &'static str,
        source: redb::Error,
    },
    /// Refused before redb was asked to write: committing now could fill the disk, and a failed
    /// write would stop redb from reading too (see [`Space`]).
    #[error(
        "relay storage full: {free} bytes free on the file system of {}, below the {reserve} bytes \
         kept in reserve; the relay refuses new work until its operator frees space there, and \
         resumes by itself",
        .dir.display()
    )]
    Full {
        dir: PathBuf,
        free: u64,
        reserve: u64,
    },
    /// Written by a newer release: its records may mean something else, so it is not opened.
    #[error(
        "the store {} has format version {found}, newer than this release reads ({supported}): \
         run the release that wrote it, or restore a backup made by this release into an empty \
         data directory (`broker restore --from FILE --data-dir DIR`)",
        .path.display()
    )]
    NewerFormat {
        path: PathBuf,
        found: u64,
        supported: u64,
    },
    /// The database was closed after an I/O error and could not be opened again yet.
    #[error("the store {} is closed after an I/O error and is being reopened", .path.display())]
    Closed { path: PathBuf },
    #[error("cannot write the backup {}: {source}", .path.display())]
    Backup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} already holds a store: restore into an empty data directory, or move that file \
         aside first",
        .path.display()
    )]
    RestoreTarget { path: PathBuf },
    #[error("{} is not a backup of a chukei relay: {reason}", .path.display())]
    NotABackup { path: PathBuf, reason: String },
    #[error(
        "cluster store unavailable: {location}: {reason}; the relay acks nothing new until it is \
         back, and reconnects by itself"
    )]
    Unavailable { location: String, reason: String },
    #[error("cluster store failed to {op}: {reason}")]
    Database { op: &'static str, reason: String },
    #[error(
        "the cluster database {location} has schema version {found}, newer than this release \
         reads ({supported}): run the release that migrated it"
    )]
    NewerSchema {
        location: String,
        found: i32,
        supported: i32,
    },
    #[error(
        "the cluster database {location} has schema version {found}; this release needs \
         {supported}: run `broker db migrate --cluster-db URL` first"
    )]
    NeedsMigration {
        location: String,
        found: i32,
        supported: i32,
    },
    #[error("{what} does not apply to this store: {instead}")]
    NotHere {
        what: &'static str,
        instead: &'static str,
    },
    #[error("corrupt record in table {table}, key {key}: {reason}")]
    Corrupt {
        table: &'static str,
        key: String,
        reason: String,
    },
    #[error("cannot encode a record for table {table}, key {key}: {reason}")]
    Encode {
        table: &'static str,
        key: String,
        reason: String,
    },
}

impl StoreError {
    /// A single record is bad; the store itself works. Callers may skip the record and go on.
    pub fn is_corrupt_record(&self) -> bool {
        matches!(self, StoreError::Corrupt { .. })
    }

    /// The store cannot write (disk full, an I/O error, closed to be reopened): nothing of the
    /// transaction was stored, and the store must be reopened (see [`StoreError::needs_reopen`])
    /// or given space before it can. The broker keeps running and refuses new work meanwhile.
    pub fn is_storage(&self) -> bool {
        matches!(self, StoreError::Full { .. } | StoreError::Closed { .. }) || self.needs_reopen()
    }

    /// redb refuses every further transaction, reads included, after an I/O error until the file
    /// is closed and opened again ([`Store::reopen`]). Errors of other backends say the same
    /// through their own variants.
    pub fn needs_reopen(&self) -> bool {
        matches!(
            self,
            StoreError::Backend {
                source: redb::Error::Io(_) | redb::Error::PreviousIo,
                ..
            } | StoreError::Closed { .. }
                | StoreError::Unavailable { .. }
        )
    }

    /// Out of space, as opposed to some other I/O failure: the advice differs.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Full { .. } => true,
            StoreError::Backend {
                source: redb::Error::Io(e),
                ..
            } => e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28),
            _ => false,
        }
    }
}

/// The first of `items` (oldest first) that fit in `max_bytes` of payload — the first always,
/// alone if it is larger — as a batch for the parent takes them.
pub(crate) fn within_bytes(
    items: impl IntoIterator<Item = Result<protocol::relay::UplinkItem, StoreError>>,
    max_items: usize,
    max_bytes: usize,
) -> Result<Vec<protocol::relay::UplinkItem>, StoreError> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for item in items {
        let item = item?;
        bytes += item.payload.len();
        if !out.is_empty() && bytes > max_bytes {
            break;
        }
        out.push(item);
        if out.len() >= max_items {
            break;
        }
    }
    Ok(out)
}

pub(crate) fn encode<T: Serialize>(
    table: &'static str,
    key: impl Display,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(256);
    ciborium::into_writer(value, &mut out).map_err(|e| StoreError::Encode {
        table,
        key: key.to_string(),
        reason: e.to_string(),
    })?;
    Ok(out)
}

pub(crate) fn decode<T: DeserializeOwned>(
    table: &'static str,
    key: impl Display,
    bytes: &[u8],
) -> Result<T, StoreError> {
    ciborium::from_reader(bytes).map_err(|e| StoreError::Corrupt {
        table,
        key: key.to_string(),
        reason: e.to_string(),
    })
}

/// The job id the broker gives its `n`th job: `J-000001`, `J-000002`, …
pub fn job_id(n: u64) -> JobId {
    // Cannot fail: "J-" and decimal digits are all allowed, and a u64 has at most 20 digits.
    JobId::parse(&format!("J-{n:06}")).expect("J-<digits> is a valid job id")
}

/// The number behind a job id the broker gave, or `None` for text it never gives out.
/// `J-1` and `J-000001` both give 1: callers compare the stored id to tell them apart.
pub fn job_number(id: &str) -> Option<u64> {
    let digits = id.strip_prefix("J-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}
