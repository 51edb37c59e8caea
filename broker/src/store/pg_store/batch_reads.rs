//! The reads that fetch a whole batch's rows in one trip, by a list of keys (`key = ANY($1)`),
//! and how each is planned.
//!
//! The store's statements are prepared once per connection, and PostgreSQL runs a prepared
//! statement on a generic plan once it has seen it a few times: a plan made with the table's
//! size and statistics of then. A node whose fleet grows (a new installation, the devices coming
//! in) has tables far larger than that plan assumed until autovacuum analyzes them, and the
//! generic plan of `key = ANY($1)` is then a scan of every row with the list searched element by
//! element for each: measured here, 1.8 s to read 2,000 devices out of 60,000. A batch of
//! presence changes held a node's single writer for seconds that way, and every report queued
//! behind it (bench/RESULTS.md). So a long list is planned for itself, at each read, knowing its
//! length and the table's size now (the list is hashed, or each key looked up in the index:
//! 5 ms); a short one keeps the prepared statement, whose plan it costs nothing to reuse.
//! (Written `IN (SELECT unnest($1))` instead, the long read was fast on every plan but each
//! short one scanned the table: PostgreSQL's CPU per paced report grew by half.)

use super::{Ask, P};

pub(super) const READ_JOURNAL: &str =
    "SELECT msg_id, entry FROM journal WHERE sender = $1 AND msg_id = ANY($2)";

pub(super) const READ_JOBS: &str =
    "SELECT number, record FROM jobs WHERE number = ANY($1) ORDER BY number FOR UPDATE";
pub(super) const READ_JOB_EVENTS: &str =
    "SELECT number, seq, event FROM job_events WHERE number = ANY($1) ORDER BY number, seq";
pub(super) const READ_REPORTS: &str = "SELECT number, data FROM reports WHERE number = ANY($1)";

pub(super) const READ_WINDOWS: &str =
    "SELECT serial, windows FROM seen_by_device WHERE serial = ANY($1) ORDER BY serial FOR UPDATE";
pub(super) const READ_DEVICES: &str =
    "SELECT serial, record FROM devices WHERE serial = ANY($1) ORDER BY serial FOR UPDATE";
pub(super) const READ_PRESENCE: &str =
    "SELECT serial, record FROM presence WHERE serial = ANY($1) ORDER BY serial FOR UPDATE";

pub(super) const READ_ACTIVE_ALARMS: &str =
    "SELECT serial, code, number FROM active_alarms WHERE serial = ANY($1)";
pub(super) const READ_ACTIVE_ALARM_RECORDS: &str = "SELECT number, alarm FROM alarms
     WHERE number IN (SELECT number FROM active_alarms WHERE serial = ANY($1))
     ORDER BY number FOR UPDATE";
pub(super) const READ_ALARM_OVERFLOW: &str =
    "SELECT serial, record FROM alarm_overflow WHERE serial = ANY($1) ORDER BY serial FOR UPDATE";

/// Lists longer than this are planned for themselves at each read. A paced fleet's batches hold a
/// few keys, and planning would be most of their read; a list this long comes from a batch of
/// many messages (or a fleet reconnecting), where one plan is small beside the rows it reads.
const PLAN_EACH_ABOVE: usize = 32;

/// One of the reads above with `params`, `keys` long, as a trip asks it.
pub(super) fn by_keys(sql: &'static str, params: Vec<P>, keys: usize) -> Ask {
    if keys > PLAN_EACH_ABOVE {
        // An unnamed statement: planned with these values, in the same trip as its rows.
        return Ask::Planned { sql, params };
    }
    Ask::Rows { sql, params }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::pg_store::Session;
    use crate::store::testing;

    /// The hazard above, made on purpose: the device read is prepared and planned generically
    /// while `devices` holds 100 analyzed rows, then 60,000 rows come. A long list must not run
    /// on that plan (PostgreSQL counts each statement's generic runs in
    /// `pg_prepared_statements`), and it finds exactly the rows asked for; a short one does
    /// reuse it.
    #[test]
    fn a_long_key_list_is_planned_for_itself_and_a_short_one_reuses_the_prepared_plan() {
        if !testing::on_postgres() {
            return; // The PostgreSQL store only.
        }
        let dir = tempfile::tempdir().unwrap();
        let _store = testing::postgres_store(dir.path());
        let url = testing::postgres_database(dir.path());
        // The blocking client runs a runtime of its own: not on a test's runtime thread.
        let (after_short, after_long, found) = std::thread::spawn(move || {
            let config: tokio_postgres::Config = url.parse().unwrap();
            let mut s = Session {
                client: super::super::client::Client::connect(&config, None).unwrap(),
                prepared: Default::default(),
            };
            s.client
                .batch_execute(
                    "ALTER TABLE devices SET (autovacuum_enabled = false);
                     INSERT INTO devices SELECT 'M' || g, '\\x00' FROM generate_series(1, 100) g;
                     ANALYZE devices;
                     SET plan_cache_mode = force_generic_plan;",
                )
                .unwrap();
            let generic_runs = |s: &mut Session| -> i64 {
                s.client
                    .query_one(
                        "SELECT coalesce(sum(generic_plans), 0)::int8 FROM pg_prepared_statements
                         WHERE statement = $1",
                        &[&READ_DEVICES],
                    )
                    .unwrap()
                    .get(0)
            };
            let read = |s: &mut Session, keys: &Vec<String>| -> usize {
                let ask = by_keys(READ_DEVICES, vec![P::TextList(keys.clone())], keys.len());
                let rows = s.run(false, &[], &[ask], "test").unwrap();
                rows[0].len()
            };
            let short: Vec<String> = vec!["M1".into(), "M2".into()];
            assert_eq!(read(&mut s, &short), 2);
            let after_short = generic_runs(&mut s);
            s.client
                .batch_execute(
                    "INSERT INTO devices SELECT 'P' || g, '\\x00' FROM generate_series(1, 60000) g",
                )
                .unwrap();
            let long: Vec<String> = (1..=60_000).step_by(30).map(|g| format!("P{g}")).collect();
            let found = read(&mut s, &long);
            (after_short, generic_runs(&mut s), found)
        })
        .join()
        .unwrap();
        assert_eq!(
            after_short, 1,
            "a short list reuses the prepared, generic plan"
        );
        assert_eq!(
            after_long, after_short,
            "a long list ran on the generic plan made for 100 rows"
        );
        assert_eq!(found, 2_000, "one row per key asked for");
    }
}
