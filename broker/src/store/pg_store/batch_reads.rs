//! The reads that fetch a whole batch's rows in one trip, by a list of keys.
//!
//! Written `key IN (SELECT unnest($1::type[]))`, not `key = ANY($1)`. Both mean the same, but a
//! prepared statement runs on a generic plan once PostgreSQL has seen it a few times, and that
//! plan was made with the table's statistics of then. A node whose fleet grows (a new
//! installation, the devices coming in) has tables far larger than their statistics say until
//! autovacuum analyzes them, and the generic plan of `= ANY($1)` is then a scan of every row
//! with the parameter's array searched element by element for each: measured here, 1.8 s to
//! read 2,000 devices out of 60,000 — a batch of presence changes held a node's single writer
//! for seconds, and every report waiting behind it with it (bench/RESULTS.md). Written as a
//! semi-join on the unnested list, the same stale plan hashes the list or looks each key up in
//! the index: 10 ms. Plain SQL either way, as the other PostgreSQL-protocol databases take it.

pub(super) const READ_JOURNAL: &str =
    "SELECT msg_id, entry FROM journal WHERE sender = $1 AND msg_id IN (SELECT unnest($2::int8[]))";

pub(super) const READ_JOBS: &str = "SELECT number, record FROM jobs
     WHERE number IN (SELECT unnest($1::int8[])) ORDER BY number FOR UPDATE";
pub(super) const READ_JOB_EVENTS: &str = "SELECT number, seq, event FROM job_events
     WHERE number IN (SELECT unnest($1::int8[])) ORDER BY number, seq";
pub(super) const READ_REPORTS: &str =
    "SELECT number, data FROM reports WHERE number IN (SELECT unnest($1::int8[]))";

pub(super) const READ_WINDOWS: &str = "SELECT serial, windows FROM seen_by_device
     WHERE serial IN (SELECT unnest($1::text[])) ORDER BY serial FOR UPDATE";
pub(super) const READ_DEVICES: &str = "SELECT serial, record FROM devices
     WHERE serial IN (SELECT unnest($1::text[])) ORDER BY serial FOR UPDATE";
pub(super) const READ_PRESENCE: &str = "SELECT serial, record FROM presence
     WHERE serial IN (SELECT unnest($1::text[])) ORDER BY serial FOR UPDATE";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing;

    /// The hazard above, made on purpose: statistics taken while `devices` held 100 rows,
    /// 60,000 rows since, generic plans forced. The device read must not test each row against
    /// the list (an `= ANY` filter on a scan), and it finds exactly the rows asked for.
    #[test]
    fn a_batch_read_looks_its_keys_up_even_on_stale_statistics() {
        if std::env::var(testing::BACKEND_VAR).as_deref() != Ok("postgres") {
            return; // The PostgreSQL store only.
        }
        let dir = tempfile::tempdir().unwrap();
        let _store = testing::postgres_store(dir.path());
        let url = testing::postgres_database(dir.path());
        // The blocking client runs a runtime of its own: not on a test's runtime thread.
        let (plan, found) = std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            c.batch_execute(
                "ALTER TABLE devices SET (autovacuum_enabled = false);
                 INSERT INTO devices SELECT 'M' || g, '\\x00' FROM generate_series(1, 100) g;
                 ANALYZE devices;
                 INSERT INTO devices SELECT 'P' || g, '\\x00' FROM generate_series(1, 60000) g;
                 SET plan_cache_mode = force_generic_plan;",
            )
            .unwrap();
            let wanted: Vec<String> = (1..=60_000).step_by(30).map(|g| format!("P{g}")).collect();
            let explain = format!("EXPLAIN {READ_DEVICES}");
            let mut t = c.transaction().unwrap();
            let plan: Vec<String> = t
                .query(&explain, &[&wanted])
                .unwrap()
                .iter()
                .map(|row| row.get::<_, String>(0).chars().take(120).collect())
                .collect();
            let found = t.query(READ_DEVICES, &[&wanted]).unwrap().len();
            t.rollback().unwrap();
            (plan, found)
        })
        .join()
        .unwrap();
        let plan = plan.join("\n");
        assert!(
            !plan.contains("= ANY"),
            "the plan tests every row against the list:\n{plan}"
        );
        assert_eq!(found, 2_000, "one row per key asked for");
    }
}
