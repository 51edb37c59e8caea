//! The cluster database's schema and its migrations (`broker db migrate`).
//!
//! Plain SQL — tables, primary keys, b-tree indexes, `bytea` and `bigint` — so that databases
//! speaking PostgreSQL's protocol can take it later. Text keys are `COLLATE "C"`: ordered by
//! bytes, as the embedded store orders them. Times the store ranges over are Unix milliseconds
//! (`*_ms`), exactly the keys the embedded store uses, so both answer the same.
//!
//! `chukei_schema` holds the version. A relay refuses a database without one, or with another
//! version than it knows, and says what to do; `broker db migrate` creates or upgrades it, each
//! step in one transaction.

use super::Conn;
use crate::store::StoreError;

/// The schema this release reads and writes.
pub const SCHEMA_VERSION: i32 = 3;

/// Each migration, from version `i` to `i + 1`.
const MIGRATIONS: [&str; 3] = [
    r#"
CREATE TABLE chukei_schema (version integer NOT NULL);
INSERT INTO chukei_schema (version) VALUES (0);

-- Counters (next_job, next_alarm, …): a row each, locked by the transaction that bumps it.
CREATE TABLE meta (name text COLLATE "C" PRIMARY KEY, value bigint NOT NULL);

CREATE TABLE jobs (
    number bigint PRIMARY KEY,
    status text NOT NULL,
    record bytea NOT NULL
);
CREATE TABLE open_jobs (
    number bigint PRIMARY KEY,
    serial text COLLATE "C" NOT NULL,
    deadline_ms bigint
);
CREATE INDEX open_jobs_by_serial ON open_jobs (serial, number);
CREATE INDEX open_jobs_by_deadline ON open_jobs (deadline_ms, number) WHERE deadline_ms IS NOT NULL;
CREATE TABLE job_events (
    number bigint NOT NULL,
    seq integer NOT NULL,
    event bytea NOT NULL,
    PRIMARY KEY (number, seq)
);
CREATE TABLE reports (number bigint PRIMARY KEY, data bytea NOT NULL);
CREATE TABLE merged (number bigint PRIMARY KEY, data bytea NOT NULL);

CREATE TABLE journal (
    sender text COLLATE "C" NOT NULL,
    msg_id bigint NOT NULL,
    entry bytea NOT NULL,
    PRIMARY KEY (sender, msg_id)
);
CREATE TABLE seen_by_device (serial text COLLATE "C" PRIMARY KEY, windows bytea NOT NULL);
CREATE TABLE devices (serial text COLLATE "C" PRIMARY KEY, record bytea NOT NULL);

CREATE TABLE artifacts (id text COLLATE "C" PRIMARY KEY, info bytea NOT NULL);
CREATE TABLE artifact_chunks (
    id text COLLATE "C" NOT NULL,
    index integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (id, index)
);

CREATE TABLE alarms (number bigint PRIMARY KEY, alarm bytea NOT NULL);
CREATE TABLE active_alarms (
    serial text COLLATE "C" NOT NULL,
    code text COLLATE "C" NOT NULL,
    number bigint NOT NULL,
    PRIMARY KEY (serial, code)
);
CREATE TABLE alarm_overflow (serial text COLLATE "C" PRIMARY KEY, record bytea NOT NULL);

CREATE TABLE presence (
    serial text COLLATE "C" PRIMARY KEY,
    due_by_ms bigint,
    -- The node holding the device's session while it is online (a cluster's nodes).
    node text COLLATE "C",
    record bytea NOT NULL
);
CREATE INDEX presence_due ON presence (due_by_ms, serial) WHERE due_by_ms IS NOT NULL;
CREATE INDEX presence_by_node ON presence (node, serial) WHERE node IS NOT NULL;

CREATE TABLE readings (
    number bigint PRIMARY KEY,
    read_at_ms bigint NOT NULL,
    serial text COLLATE "C" NOT NULL,
    reading bytea NOT NULL
);
CREATE INDEX readings_by_time ON readings (read_at_ms, serial, number);

CREATE TABLE notify_queue (
    number bigint PRIMARY KEY,
    serial text COLLATE "C" NOT NULL,
    next_at_ms bigint NOT NULL,
    item bytea NOT NULL
);
CREATE TABLE alarm_digests (
    serial text COLLATE "C" PRIMARY KEY,
    due_at_ms bigint NOT NULL,
    digest bytea NOT NULL
);
CREATE INDEX alarm_digests_due ON alarm_digests (due_at_ms, serial);

CREATE TABLE uplink (number bigint PRIMARY KEY, item bytea NOT NULL);

-- The TLS session ticket keys every node seals and opens with (one row).
CREATE TABLE tls_ticket_keys (name text COLLATE "C" PRIMARY KEY, keys bytea NOT NULL);

CREATE TABLE nodes (
    node_id text COLLATE "C" PRIMARY KEY,
    listen text NOT NULL,
    started_at_ms bigint NOT NULL,
    heartbeat_at_ms bigint NOT NULL,
    devices bigint NOT NULL
);
CREATE TABLE mirrored (topic text COLLATE "C" PRIMARY KEY, payload bytea NOT NULL);
"#,
    // 2: rollouts and the tags operators set on devices.
    r#"
CREATE TABLE rollouts (number bigint PRIMARY KEY, record bytea NOT NULL);
CREATE TABLE active_rollouts (number bigint PRIMARY KEY);
CREATE TABLE device_tags (serial text COLLATE "C" PRIMARY KEY, tags bytea NOT NULL);
"#,
    // 3: readings numbered by a sequence, not a counter row: a row every counter report's
    // transaction locked until its commit made the nodes store readings one transaction at a
    // time. A reading's number only orders readings of one device at one instant.
    r#"
CREATE SEQUENCE reading_numbers OWNED BY readings.number;
SELECT setval('reading_numbers', COALESCE((SELECT max(number) FROM readings), 0) + 1, false);
ALTER TABLE readings ALTER COLUMN number SET DEFAULT nextval('reading_numbers');
DELETE FROM meta WHERE name = 'next_reading';
"#,
];

/// The schema version the database holds; `None` without a chukei schema.
fn found(conn: &Conn, location: &str) -> Result<Option<i32>, StoreError> {
    let unavailable = |reason: String| StoreError::Unavailable {
        location: location.to_owned(),
        reason,
    };
    let rows = conn
        .query(
            "SELECT version FROM chukei_schema WHERE to_regclass('chukei_schema') IS NOT NULL",
            Vec::new(),
        )
        .ok_or_else(|| unavailable("the connection was lost".into()))?;
    match rows {
        Ok(rows) => rows
            .first()
            .map(|r| r.try_get::<_, i32>(0))
            .transpose()
            .map_err(|e| unavailable(format!("unreadable schema version: {e}"))),
        // 42P01: undefined_table — the planner resolves the name before the WHERE.
        Err(e) if e.code().map(|c| c.code()) == Some("42P01") => Ok(None),
        Err(e) => Err(unavailable(e.to_string())),
    }
}

/// Refuses a database whose schema this release does not use as it is.
pub(super) fn check(conn: &Conn, location: &str) -> Result<(), StoreError> {
    match found(conn, location)? {
        Some(SCHEMA_VERSION) => Ok(()),
        Some(v) if v > SCHEMA_VERSION => Err(StoreError::NewerSchema {
            location: location.to_owned(),
            found: v,
            supported: SCHEMA_VERSION,
        }),
        found => Err(StoreError::NeedsMigration {
            location: location.to_owned(),
            found: found.unwrap_or(0),
            supported: SCHEMA_VERSION,
        }),
    }
}

/// Creates the schema in an empty database or upgrades an older one; returns the versions
/// before and after. A newer schema is refused untouched.
pub fn migrate(url: &str) -> Result<(i32, i32), StoreError> {
    migrate_to(url, SCHEMA_VERSION)
}

/// [`migrate`], up to `version` only: the tests make an older release's database with it.
pub(crate) fn migrate_to(url: &str, version: i32) -> Result<(i32, i32), StoreError> {
    let target = super::Target::parse(url)?;
    let location = target.location.clone();
    let conn = Conn::open(&target, "chukei-pg-migrate")?;
    let before = found(&conn, &location)?.unwrap_or(0);
    if before > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            location,
            found: before,
            supported: SCHEMA_VERSION,
        });
    }
    for (step, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .take(version as usize)
        .skip(before as usize)
    {
        let to = step as i32 + 1;
        let failed = |reason: String| StoreError::Database {
            op: "migrate the schema",
            reason: format!("step {step} → {to}: {reason}"),
        };
        let done = conn.call(move |s| -> Result<(), postgres::Error> {
            s.client.in_transaction(|txn| {
                txn.batch_execute(sql)?;
                txn.execute("UPDATE chukei_schema SET version = $1", &[&to])?;
                Ok(())
            })
        });
        match done {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(failed(e.to_string())),
            None => return Err(failed("the connection was lost".into())),
        }
    }
    Ok((before, version.max(before)))
}
