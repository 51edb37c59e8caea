//! A transaction's writes, held until its next read or its commit and then sent together: rows
//! the same `INSERT … VALUES` statement adds go as one statement over arrays (`unnest`), so a
//! batch of a thousand device reports costs PostgreSQL a few statements, not thousands.
//!
//! Writes are held in the order they were made and may only move where the result cannot tell:
//! a write joins an earlier one of the same statement only if no other statement touched that
//! table in between (different tables do not see each other's rows within these writes: none
//! of them reads another table). An upsert keeps the last row of each key (the one a row-by-row
//! run would leave), and is combined only when its `DO UPDATE` sets every column from
//! `EXCLUDED`; `DO NOTHING` keeps the first. Anything else runs as it was written.

use std::collections::HashMap;

use postgres::types::ToSql;

use super::P;

/// A write the transaction made and has not sent yet.
pub(crate) struct Write {
    pub(crate) op: &'static str,
    pub(crate) sql: &'static str,
    pub(crate) params: Vec<P>,
}

/// What a flush runs, in order.
pub(crate) enum Step {
    One(Write),
    Many {
        op: &'static str,
        sql: String,
        columns: Vec<Column>,
    },
}

/// One column of a combined insert: every row's value, as the array `unnest` reads.
pub(crate) enum Column {
    I64(Vec<i64>),
    I32(Vec<i32>),
    OptI64(Vec<Option<i64>>),
    Text(Vec<String>),
    OptText(Vec<Option<String>>),
    Bytes(Vec<Vec<u8>>),
}

impl Column {
    fn sql_type(&self) -> &'static str {
        match self {
            Column::I64(_) | Column::OptI64(_) => "int8[]",
            Column::I32(_) => "int4[]",
            Column::Text(_) | Column::OptText(_) => "text[]",
            Column::Bytes(_) => "bytea[]",
        }
    }

    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Column::I64(v) => v,
            Column::I32(v) => v,
            Column::OptI64(v) => v,
            Column::Text(v) => v,
            Column::OptText(v) => v,
            Column::Bytes(v) => v,
        }
    }

    /// Gathers column `i` of `rows`, whose values are all of one type ([`combined`] checked).
    fn gather(rows: &mut [Vec<P>], i: usize) -> Column {
        let first = rows.first().map(|r| std::mem::discriminant(&r[i]));
        let values = rows
            .iter_mut()
            .map(|r| std::mem::replace(&mut r[i], P::I64(0)));
        macro_rules! all {
            ($variant:ident) => {
                Column::$variant(
                    values
                        .filter_map(|p| match p {
                            P::$variant(v) => Some(v),
                            _ => None,
                        })
                        .collect(),
                )
            };
        }
        let is = |p: P| first == Some(std::mem::discriminant(&p));
        if is(P::I32(0)) {
            all!(I32)
        } else if is(P::OptI64(None)) {
            all!(OptI64)
        } else if is(P::Text(String::new())) {
            all!(Text)
        } else if is(P::OptText(None)) {
            all!(OptText)
        } else if is(P::Bytes(Vec::new())) {
            all!(Bytes)
        } else {
            all!(I64)
        }
    }
}

impl Step {
    /// The operation the step came from, for an error.
    pub(crate) fn op(&self) -> &'static str {
        match self {
            Step::One(w) => w.op,
            Step::Many { op, .. } => op,
        }
    }

    pub(crate) fn sql(&self) -> &str {
        match self {
            Step::One(w) => w.sql,
            Step::Many { sql, .. } => sql,
        }
    }

    /// The step's parameters, as its statement takes them.
    pub(crate) fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        match self {
            Step::One(w) => w.params.iter().map(P::as_sql).collect(),
            Step::Many { columns, .. } => columns.iter().map(Column::as_sql).collect(),
        }
    }
}

/// An `INSERT INTO t (c…) VALUES ($1, …, $k) [ON CONFLICT …]` that can take many rows at once.
#[derive(Debug, PartialEq)]
struct Shape {
    table: String,
    columns: Vec<String>,
    /// The positions of the conflict key among the columns, and whether the first row of a key
    /// wins (`DO NOTHING`) or the last (`DO UPDATE` of every other column).
    conflict: Option<(Vec<usize>, bool)>,
    /// What follows the `VALUES` list, as written.
    rest: String,
}

/// Reads `sql` as a combinable insert, or `None`.
fn shape(sql: &str) -> Option<Shape> {
    let words = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    let after = words.strip_prefix("INSERT INTO ")?;
    let (table, after) = after.split_once(" (")?;
    let (columns, after) = after.split_once(") VALUES (")?;
    let (values, rest) = after.split_once(')')?;
    let columns: Vec<String> = columns.split(", ").map(str::to_owned).collect();
    let placeholders: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
    if values.split(", ").collect::<Vec<_>>() != placeholders {
        return None;
    }
    let rest = rest.trim().to_owned();
    let conflict = if rest.is_empty() {
        None
    } else {
        let after = rest.strip_prefix("ON CONFLICT (")?;
        let (keys, action) = after.split_once(") ")?;
        let keys: Vec<usize> = keys
            .split(", ")
            .map(|k| columns.iter().position(|c| c == k))
            .collect::<Option<_>>()?;
        if action == "DO NOTHING" {
            Some((keys, true))
        } else {
            let sets = action.strip_prefix("DO UPDATE SET ")?;
            let mut set: Vec<&str> = Vec::new();
            for assignment in sets.split(", ") {
                let (column, value) = assignment.split_once(" = ")?;
                if value != format!("EXCLUDED.{column}") {
                    return None;
                }
                set.push(column);
            }
            let others: Vec<&str> = columns
                .iter()
                .enumerate()
                .filter(|(i, _)| !keys.contains(i))
                .map(|(_, c)| c.as_str())
                .collect();
            set.sort_unstable();
            let mut want = others;
            want.sort_unstable();
            if set != want {
                return None;
            }
            Some((keys, false))
        }
    };
    Some(Shape {
        table: table.to_owned(),
        columns,
        conflict,
        rest,
    })
}

/// The table a write touches, for ordering: `INSERT INTO t`, `UPDATE t`, `DELETE FROM t`.
fn table_of(sql: &str) -> &str {
    let mut words = sql.split_whitespace();
    let first = words.next().unwrap_or("");
    let table = match first {
        "INSERT" | "DELETE" => words.nth(1),
        _ => words.next(),
    };
    table.unwrap_or("").trim_end_matches('(')
}

/// Turns the held writes into the steps to run, in an order the result cannot tell apart from
/// theirs.
pub(crate) fn plan(writes: Vec<Write>) -> Vec<Step> {
    // Groups of writes, each of one statement; `open[table]` is the group a write to that table
    // may still join (the table's last group).
    let mut groups: Vec<Vec<Write>> = Vec::new();
    let mut open: HashMap<&str, usize> = HashMap::new();
    for w in writes {
        let table = table_of(w.sql);
        match open.get(table) {
            Some(&g) if groups[g][0].sql == w.sql => groups[g].push(w),
            _ => {
                open.insert(table, groups.len());
                groups.push(vec![w]);
            }
        }
    }
    let mut steps = Vec::new();
    for group in groups {
        match (group.len(), shape(group[0].sql)) {
            (2.., Some(shape)) => steps.extend(combined(group, &shape)),
            _ => steps.extend(group.into_iter().map(Step::One)),
        }
    }
    steps
}

/// One statement for a group's rows (each key once), or the rows one by one if their values
/// do not line up.
fn combined(group: Vec<Write>, shape: &Shape) -> Vec<Step> {
    let lined_up = (0..shape.columns.len()).all(|i| {
        let first = std::mem::discriminant(&group[0].params[i]);
        group
            .iter()
            .all(|w| std::mem::discriminant(&w.params[i]) == first)
    });
    if !lined_up {
        return group.into_iter().map(Step::One).collect();
    }
    let op = group[0].op;
    let mut rows: Vec<Vec<P>> = Vec::with_capacity(group.len());
    match &shape.conflict {
        None => rows.extend(group.into_iter().map(|w| w.params)),
        Some((keys, first_wins)) => {
            let mut at: HashMap<String, usize> = HashMap::new();
            for w in group {
                let key = keys
                    .iter()
                    .map(|&k| format!("{:?}", w.params[k]))
                    .collect::<Vec<_>>()
                    .join("\u{0}");
                match at.get(&key) {
                    Some(_) if *first_wins => {}
                    Some(&i) => rows[i] = w.params,
                    None => {
                        at.insert(key, rows.len());
                        rows.push(w.params);
                    }
                }
            }
        }
    }
    let columns: Vec<Column> = (0..shape.columns.len())
        .map(|i| Column::gather(&mut rows, i))
        .collect();
    let arrays: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("${}::{}", i + 1, c.sql_type()))
        .collect();
    let sql = format!(
        "INSERT INTO {} ({}) SELECT * FROM unnest({}) {}",
        shape.table,
        shape.columns.join(", "),
        arrays.join(", "),
        shape.rest
    );
    vec![Step::Many { op, sql, columns }]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(sql: &'static str, params: Vec<P>) -> Write {
        Write {
            op: "test",
            sql,
            params,
        }
    }

    const UPSERT: &str = "INSERT INTO devices (serial, record) VALUES ($1, $2)
             ON CONFLICT (serial) DO UPDATE SET record = EXCLUDED.record";
    const READING: &str =
        "INSERT INTO readings (number, read_at_ms, serial, reading) VALUES ($1, $2, $3, $4)";

    #[test]
    fn reads_the_shapes_it_can_combine_and_refuses_the_rest() {
        let s = shape(UPSERT).unwrap();
        assert_eq!(s.table, "devices");
        assert_eq!(s.conflict, Some((vec![0], false)));
        assert!(shape(READING).unwrap().conflict.is_none());
        // A literal among the values, a column left as it was, arithmetic on the old row.
        assert!(
            shape("INSERT INTO jobs (number, status, record) VALUES ($1, 'queued', $2)").is_none()
        );
        assert!(
            shape(
                "INSERT INTO alarm_digests (serial, due_at_ms, digest) VALUES ($1, $2, $3)
                 ON CONFLICT (serial) DO UPDATE SET digest = EXCLUDED.digest"
            )
            .is_none()
        );
        assert!(
            shape(
                "INSERT INTO meta (name, value) VALUES ($1, 1)
                 ON CONFLICT (name) DO UPDATE SET value = meta.value + 1 RETURNING value"
            )
            .is_none()
        );
    }

    #[test]
    fn an_upsert_keeps_each_keys_last_row_in_one_statement() {
        let steps = plan(vec![
            w(UPSERT, vec![P::Text("C1".into()), P::Bytes(vec![1])]),
            w(
                READING,
                vec![
                    P::I64(1),
                    P::I64(5),
                    P::Text("C1".into()),
                    P::Bytes(vec![9]),
                ],
            ),
            w(UPSERT, vec![P::Text("C2".into()), P::Bytes(vec![2])]),
            w(UPSERT, vec![P::Text("C1".into()), P::Bytes(vec![3])]),
        ]);
        assert_eq!(steps.len(), 2);
        let Step::Many { sql, columns, .. } = &steps[0] else {
            panic!("the upserts are one statement")
        };
        assert!(sql.contains("unnest($1::text[], $2::bytea[])"), "{sql}");
        assert!(sql.ends_with("ON CONFLICT (serial) DO UPDATE SET record = EXCLUDED.record"));
        match (&columns[0], &columns[1]) {
            (Column::Text(keys), Column::Bytes(records)) => {
                assert_eq!(keys, &["C1", "C2"]);
                assert_eq!(records, &[vec![3], vec![2]], "C1's last row wins");
            }
            _ => panic!("wrong column types"),
        }
        assert!(matches!(&steps[1], Step::One(w) if w.sql == READING));
    }

    #[test]
    fn a_different_statement_on_the_same_table_keeps_its_place() {
        const OPEN: &str =
            "INSERT INTO open_jobs (number, serial, deadline_ms) VALUES ($1, $2, $3)";
        const CLOSE: &str = "DELETE FROM open_jobs WHERE number = $1";
        let open = |n| w(OPEN, vec![P::I64(n), P::Text("C1".into()), P::OptI64(None)]);
        let steps = plan(vec![open(1), w(CLOSE, vec![P::I64(1)]), open(1), open(2)]);
        let kinds: Vec<&str> = steps
            .iter()
            .map(|s| match s {
                Step::One(w) if w.sql == OPEN => "open",
                Step::One(_) => "close",
                Step::Many { .. } => "open many",
            })
            .collect();
        assert_eq!(kinds, ["open", "close", "open many"]);
    }

    #[test]
    fn rows_whose_values_differ_in_type_run_one_by_one() {
        const PRESENCE: &str =
            "INSERT INTO presence (serial, due_by_ms, node, record) VALUES ($1, $2, $3, $4)
             ON CONFLICT (serial) DO UPDATE
             SET due_by_ms = EXCLUDED.due_by_ms, node = EXCLUDED.node, record = EXCLUDED.record";
        assert!(shape(PRESENCE).is_some());
        let steps = plan(vec![
            w(
                PRESENCE,
                vec![
                    P::Text("A".into()),
                    P::OptI64(None),
                    P::OptText(None),
                    P::Bytes(vec![]),
                ],
            ),
            w(
                PRESENCE,
                vec![
                    P::Text("B".into()),
                    P::I64(1),
                    P::OptText(None),
                    P::Bytes(vec![]),
                ],
            ),
        ]);
        assert_eq!(steps.len(), 2);
        assert!(steps.iter().all(|s| matches!(s, Step::One(_))));
    }
}
