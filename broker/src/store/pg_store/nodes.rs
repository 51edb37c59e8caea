//! The cluster's nodes as the database knows them: each node writes its row every
//! [`HEARTBEAT`] (its address, when it started, how many devices it holds), and `broker nodes
//! list` reads them. A node whose heartbeat is older than [`STALE_AFTER`] is shown as gone.

use std::time::Duration;

use protocol::Timestamp;
use serde::Serialize;

use super::{Conn, P, PgStore};
use crate::store::StoreError;

/// How often a node writes its row.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A node not heard from for this long is taken for gone.
pub const STALE_AFTER: Duration = Duration::from_secs(15);

/// One node, for `broker nodes list`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeView {
    pub node_id: String,
    /// Where its devices and hosts connect (its `listen` address).
    pub listen: String,
    pub started_at: Timestamp,
    pub heartbeat_at: Timestamp,
    /// Device sessions open at the node at its last heartbeat.
    pub devices: u64,
    /// Heard from within [`STALE_AFTER`].
    pub alive: bool,
}

impl PgStore {
    /// Writes this node's row (outside any transaction of the core's).
    pub fn heartbeat(
        &self,
        node: &str,
        listen: &str,
        started_at: Timestamp,
        devices: u64,
    ) -> Result<(), StoreError> {
        let conn = PgStore::conn(&self.reader, &self.location)?;
        let done = conn.execute(
            "INSERT INTO nodes (node_id, listen, started_at_ms, heartbeat_at_ms, devices)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (node_id) DO UPDATE SET listen = EXCLUDED.listen,
                 started_at_ms = EXCLUDED.started_at_ms,
                 heartbeat_at_ms = EXCLUDED.heartbeat_at_ms, devices = EXCLUDED.devices",
            vec![
                P::Text(node.to_owned()),
                P::Text(listen.to_owned()),
                P::I64(started_at.timestamp_millis()),
                P::I64(chrono::Utc::now().timestamp_millis()),
                P::I64(i64::try_from(devices).unwrap_or(i64::MAX)),
            ],
        );
        match done {
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(StoreError::Database {
                op: "write this node's heartbeat",
                reason: super::reason(&e),
            }),
            None => Err(StoreError::Unavailable {
                location: self.location.clone(),
                reason: "the connection was lost while writing this node's heartbeat".into(),
            }),
        }
    }
}

/// The nodes whose heartbeat is older than [`STALE_AFTER`].
pub(super) fn gone(store: &PgStore) -> Result<Vec<String>, StoreError> {
    let conn = PgStore::conn(&store.reader, &store.location)?;
    let since = silent_since();
    let rows = conn
        .query(
            "SELECT node_id FROM nodes WHERE heartbeat_at_ms < $1 ORDER BY node_id",
            vec![P::I64(since.timestamp_millis())],
        )
        .ok_or_else(|| StoreError::Unavailable {
            location: store.location.clone(),
            reason: "the connection was lost while listing the nodes".into(),
        })?
        .map_err(|e| StoreError::Database {
            op: "list the nodes gone",
            reason: super::reason(&e),
        })?;
    rows.iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(|e| StoreError::Database {
            op: "list the nodes gone",
            reason: super::reason(&e),
        })
}

/// Heartbeats before this are a node gone.
fn silent_since() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() - chrono::Duration::from_std(STALE_AFTER).unwrap_or_default()
}

/// A connection of `broker nodes …` to the database at `url`, its schema checked, and where
/// it is (for errors).
fn connect(url: &str) -> Result<(Conn, String), StoreError> {
    let target = super::Target::parse(url)?;
    let conn = Conn::open(&target, "chukei-pg-nodes")?;
    super::schema::check(&conn, &target.location)?;
    Ok((conn, target.location))
}

/// Every node the database at `url` has heard of, by name.
pub fn list(url: &str) -> Result<Vec<NodeView>, StoreError> {
    let (conn, location) = connect(url)?;
    let rows = conn
        .query(
            "SELECT node_id, listen, started_at_ms, heartbeat_at_ms, devices FROM nodes
             ORDER BY node_id",
            Vec::new(),
        )
        .ok_or_else(|| StoreError::Unavailable {
            location: location.clone(),
            reason: "the connection was lost".into(),
        })?
        .map_err(|e| StoreError::Database {
            op: "list the nodes",
            reason: super::reason(&e),
        })?;
    let since = silent_since();
    let time = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
    let view = |r: &postgres::Row| -> Result<NodeView, postgres::Error> {
        let heartbeat_at = time(r.try_get(3)?);
        Ok(NodeView {
            node_id: r.try_get(0)?,
            listen: r.try_get(1)?,
            started_at: time(r.try_get(2)?),
            heartbeat_at,
            devices: r.try_get::<_, i64>(4)?.max(0) as u64,
            alive: heartbeat_at >= since,
        })
    };
    rows.iter()
        .map(view)
        .collect::<Result<_, _>>()
        .map_err(|e| StoreError::Database {
            op: "list the nodes",
            reason: super::reason(&e),
        })
}

/// What `broker nodes forget` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forgot {
    /// The node's row is gone from `broker nodes list`.
    Forgotten,
    /// No node by that name.
    Unknown,
    /// Heard from within [`STALE_AFTER`]: stop it first.
    Alive,
    /// Devices are still taken for online at it: the leading node marks them offline (or finds
    /// them on another node) within seconds of the grace period; forget it then.
    HoldsDevices(u64),
}

/// Removes a node that is gone for good from the list, in one statement that checks, at the
/// moment it deletes, that the node is silent and no device's presence points at it — so a
/// node that came back, or devices the leader has not moved yet, are never lost track of.
pub fn forget(url: &str, node: &str) -> Result<Forgot, StoreError> {
    let (conn, location) = connect(url)?;
    let lost = || StoreError::Unavailable {
        location: location.clone(),
        reason: "the connection was lost".into(),
    };
    let failed = |e: postgres::Error| StoreError::Database {
        op: "forget a node",
        reason: super::reason(&e),
    };
    let since = silent_since();
    let deleted = conn
        .execute(
            "DELETE FROM nodes WHERE node_id = $1 AND heartbeat_at_ms < $2
             AND NOT EXISTS (SELECT 1 FROM presence WHERE node = $1)",
            vec![P::Text(node.to_owned()), P::I64(since.timestamp_millis())],
        )
        .ok_or_else(lost)?
        .map_err(failed)?;
    if deleted == 1 {
        return Ok(Forgot::Forgotten);
    }
    // Why not: read after the attempt, for the message only.
    let rows = conn
        .query(
            "SELECT heartbeat_at_ms, (SELECT count(*) FROM presence WHERE node = $1)
             FROM nodes WHERE node_id = $1",
            vec![P::Text(node.to_owned())],
        )
        .ok_or_else(lost)?
        .map_err(failed)?;
    let Some(row) = rows.first() else {
        return Ok(Forgot::Unknown);
    };
    let heartbeat: i64 = row.try_get(0).map_err(failed)?;
    let devices: i64 = row.try_get(1).map_err(failed)?;
    Ok(if heartbeat >= since.timestamp_millis() {
        Forgot::Alive
    } else {
        Forgot::HoldsDevices(devices.max(0) as u64)
    })
}
