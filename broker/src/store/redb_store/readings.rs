//! Meter readings for billing (Fig. 3 counters): `readings` maps (read time in Unix ms, serial,
//! reading number) → [`CounterReading`], so an export by time range is one range scan and two
//! readings of the same millisecond never collide.

use protocol::Timestamp;
use protocol::meter::CounterReading;
use redb::{ReadableTable, TableDefinition};

use super::{RedbTxn, backend};
use crate::store::{ReadingCursor, ReadingTables, StoreError, decode, encode};

pub(super) const READINGS: TableDefinition<(i64, &str, u64), &[u8]> =
    TableDefinition::new("readings");
const NEXT_READING: &str = "next_reading";

impl ReadingTables for RedbTxn {
    fn put_reading(&mut self, reading: &CounterReading) -> Result<(), StoreError> {
        let op = "write a reading";
        let n = self.next_counter(NEXT_READING, op)?;
        let at = reading.read_at.timestamp_millis();
        let bytes = encode("readings", format_args!("{}@{at}", reading.serial), reading)?;
        self.txn
            .open_table(READINGS)
            .map_err(backend(op))?
            .insert((at, reading.serial.as_str(), n), bytes.as_slice())
            .map_err(backend(op))?;
        self.dirty = true;
        Ok(())
    }

    fn readings(
        &self,
        from: Timestamp,
        to: Timestamp,
        after: Option<&ReadingCursor>,
        serial: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<CounterReading>, Option<ReadingCursor>), StoreError> {
        let op = "read readings";
        let table = self.txn.open_table(READINGS).map_err(backend(op))?;
        let start = (from.timestamp_millis(), "", 0u64);
        let end = (to.timestamp_millis(), "", 0u64);
        let mut out = Vec::new();
        let mut last = None;
        for entry in table.range(start..end).map_err(backend(op))? {
            let (k, v) = entry.map_err(backend(op))?;
            let (at_ms, s, n) = k.value();
            if let Some(a) = after
                && (at_ms, s, n) <= (a.at_ms, a.serial.as_str(), a.n)
            {
                continue;
            }
            if serial.is_some_and(|want| want != s) {
                continue;
            }
            if out.len() == limit {
                return Ok((out, last));
            }
            out.push(decode("readings", format_args!("{s}@{at_ms}"), v.value())?);
            last = Some(ReadingCursor {
                at_ms,
                serial: s.to_owned(),
                n,
            });
        }
        Ok((out, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::*;
    use chrono::TimeZone;
    use protocol::data::{SectionData, Value};

    fn reading(serial: &str, minute: u32, total: i64) -> CounterReading {
        let mut counters = SectionData::new();
        counters.insert("total".into(), Value::Int(total));
        CounterReading {
            serial: serial.into(),
            site: String::new(),
            read_at: chrono::Utc
                .with_ymd_and_hms(2026, 11, 26, 9, minute, 0)
                .unwrap(),
            source: "report".into(),
            counters,
        }
    }

    #[test]
    fn readings_come_back_by_time_range_a_page_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::open(dir.path());
        let mut txn = store.begin().unwrap();
        for (s, m, t) in [("C2", 1, 10), ("C1", 1, 20), ("C1", 2, 30), ("C1", 5, 40)] {
            txn.put_reading(&reading(s, m, t)).unwrap();
        }
        let from = reading("x", 1, 0).read_at;
        let to = reading("x", 5, 0).read_at;
        let (all, next) = txn.readings(from, to, None, None, 10).unwrap();
        let totals: Vec<_> = all.iter().map(|r| r.counters["total"].clone()).collect();
        assert_eq!(totals, [Value::Int(20), Value::Int(10), Value::Int(30)]);
        assert_eq!(next, None);

        let (page, next) = txn.readings(from, to, None, None, 2).unwrap();
        assert_eq!(page.len(), 2);
        let cursor = next.expect("a full page has a cursor");
        let back = ReadingCursor::parse(&cursor.to_text()).unwrap();
        assert_eq!(back, cursor);
        let (rest, next) = txn.readings(from, to, Some(&back), None, 2).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].counters["total"], Value::Int(30));
        assert_eq!(next, None);

        let (c2, _) = txn.readings(from, to, None, Some("C2"), 10).unwrap();
        assert_eq!(c2.len(), 1);
        assert_eq!(ReadingCursor::parse("nonsense"), None);
    }
}
