//! The cluster backend: every table of the store in PostgreSQL (`broker run --cluster-db URL`).
//!
//! The same records as the embedded store (CBOR, see [`crate::store::records`]) in plain SQL
//! tables whose key and index columns are real columns ([`schema`]), so that PostgreSQL keeps the
//! indexes (open jobs by device and deadline, active alarms, due check-ins and digests) and any
//! node can ask. One [`Txn`] is one SQL transaction, committed before the messages it holds are
//! acked, as on redb.
//!
//! The store's interface is synchronous (the core calls it from its own thread, the notification
//! worker and the metrics endpoint from tasks on the runtime). The connection's client
//! ([`client`]) blocks on a runtime of its own, which must not run inside another; so each
//! connection lives on a thread of its own ([`Conn`]) and every statement is a closure sent to
//! it. A writer connection carries the transactions, one at a time as on redb; a second writer
//! carries devices' alarms beside it ([`Store::begin_alarms`]); a third connection reads the
//! metrics' counts.

mod batch_reads;
mod client;
mod combine;
mod leader;
pub mod nodes;
mod schema;
mod tables;
mod target;
mod warm;

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, RwLock};

use postgres::types::{ToSql, Type};

pub use schema::{SCHEMA_VERSION, migrate};
pub(crate) use target::Target;
pub(crate) use target::is_loopback;

use super::{OpenJobKey, Store, StoreError, StoreStats, Txn};

/// A statement's parameter, owned so that it can travel to the connection's thread.
#[derive(Debug, Clone)]
pub(crate) enum P {
    I64(i64),
    I32(i32),
    OptI64(Option<i64>),
    Text(String),
    OptText(Option<String>),
    Bytes(Vec<u8>),
    /// A list of keys (`key = ANY($n)`).
    TextList(Vec<String>),
    I64List(Vec<i64>),
}

impl P {
    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            P::I64(v) => v,
            P::I32(v) => v,
            P::OptI64(v) => v,
            P::Text(v) => v,
            P::OptText(v) => v,
            P::Bytes(v) => v,
            P::TextList(v) => v,
            P::I64List(v) => v,
        }
    }

    /// The parameter's type, for a statement planned for its values (batch_reads.rs).
    fn sql_type(&self) -> Type {
        match self {
            P::I64(_) | P::OptI64(_) => Type::INT8,
            P::I32(_) => Type::INT4,
            P::Text(_) | P::OptText(_) => Type::TEXT,
            P::Bytes(_) => Type::BYTEA,
            P::TextList(_) => Type::TEXT_ARRAY,
            P::I64List(_) => Type::INT8_ARRAY,
        }
    }
}

/// What a trip to the server asks, after the writes it carries: rows, or the transaction's end.
pub(crate) enum Ask {
    /// The rows of a prepared statement.
    Rows { sql: &'static str, params: Vec<P> },
    /// The rows of a statement planned for its values (a long key list: batch_reads.rs).
    Planned { sql: &'static str, params: Vec<P> },
    /// A command without parameters: COMMIT or ROLLBACK.
    Command(&'static str),
}

type Job = Box<dyn FnOnce(&mut Session) + Send>;

/// A connection's client and the statements it has prepared: each SQL text is parsed once per
/// connection, not on every call (half the round trips, and the server's planning).
pub(crate) struct Session {
    pub(crate) client: client::Client,
    prepared: std::collections::HashMap<String, postgres::Statement>,
}

impl Session {
    /// Runs BEGIN (if `begin`), `steps` and `asks` in one pipeline: a trip to the server, plus
    /// one for each statement this connection has not prepared yet. Returns the asks' rows, or
    /// the first failure with the operation it belongs to.
    fn run(
        &mut self,
        begin: bool,
        steps: &[combine::Step],
        asks: &[Ask],
        op: &'static str,
    ) -> Result<Vec<Vec<postgres::Row>>, (&'static str, postgres::Error)> {
        let mut step_statements = Vec::with_capacity(steps.len());
        for step in steps {
            step_statements.push(self.statement(step.sql()).map_err(|e| (step.op(), e))?);
        }
        let mut ask_statements = Vec::with_capacity(asks.len());
        for ask in asks {
            ask_statements.push(match ask {
                Ask::Rows { sql, .. } => Some(self.statement(sql).map_err(|e| (op, e))?),
                Ask::Planned { .. } | Ask::Command(_) => None,
            });
        }
        let mut requests = Vec::with_capacity(steps.len() + asks.len() + 1);
        let mut ops = Vec::with_capacity(requests.capacity());
        if begin {
            requests.push(client::Request::Command("BEGIN"));
            ops.push("begin a transaction");
        }
        for (step, statement) in steps.iter().zip(&step_statements) {
            requests.push(client::Request::Prepared(statement, step.params()));
            ops.push(step.op());
        }
        for (ask, statement) in asks.iter().zip(&ask_statements) {
            requests.push(match (ask, statement) {
                (Ask::Rows { params, .. }, Some(statement)) => {
                    client::Request::Prepared(statement, params.iter().map(P::as_sql).collect())
                }
                (Ask::Rows { sql, params } | Ask::Planned { sql, params }, _) => {
                    client::Request::Planned(
                        sql,
                        params.iter().map(|p| (p.as_sql(), p.sql_type())).collect(),
                    )
                }
                (Ask::Command(sql), _) => client::Request::Command(sql),
            });
            ops.push(op);
        }
        let answers = self.client.pipeline(&requests);
        let first_ask = answers.len() - asks.len();
        let mut rows = Vec::with_capacity(asks.len());
        for (i, answer) in answers.into_iter().enumerate() {
            match answer {
                Ok(found) if i >= first_ask => rows.push(found),
                Ok(_) => {}
                Err(e) => return Err((ops[i], e)),
            }
        }
        Ok(rows)
    }

    fn statement(&mut self, sql: &str) -> Result<postgres::Statement, postgres::Error> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.prepared.insert(sql.to_owned(), s.clone());
        Ok(s)
    }
}

/// One connection, on a thread of its own.
struct Conn {
    jobs: mpsc::Sender<Job>,
}

impl Conn {
    fn open(target: &Target, name: &str) -> Result<Conn, StoreError> {
        let location = target.location.as_str();
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (ready_tx, ready) = mpsc::sync_channel(1);
        let connecting = target.clone();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || match connecting.connect() {
                Ok(client) => {
                    let _ = ready_tx.send(Ok(()));
                    let mut session = Session {
                        client,
                        prepared: std::collections::HashMap::new(),
                    };
                    while let Ok(job) = inbox.recv() {
                        job(&mut session);
                    }
                }
                Err(reason) => {
                    let _ = ready_tx.send(Err(reason));
                }
            })
            .map_err(|e| StoreError::Unavailable {
                location: location.to_owned(),
                reason: format!("could not start the connection's thread: {e}"),
            })?;
        match ready.recv() {
            Ok(Ok(())) => Ok(Conn { jobs }),
            Ok(Err(reason)) => Err(StoreError::Unavailable {
                location: location.to_owned(),
                reason,
            }),
            Err(_) => Err(StoreError::Unavailable {
                location: location.to_owned(),
                reason: "the connection's thread ended".into(),
            }),
        }
    }

    /// Runs `f` on the connection's thread and waits for its answer.
    fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Session) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |client| {
            let _ = tx.send(f(client));
        });
        self.jobs.send(job).ok()?;
        rx.recv().ok()
    }

    fn execute(&self, sql: &'static str, params: Vec<P>) -> Option<Result<u64, postgres::Error>> {
        self.call(move |s| {
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(P::as_sql).collect();
            let statement = s.statement(sql)?;
            s.client.execute(&statement, &refs)
        })
    }

    fn query(
        &self,
        sql: &'static str,
        params: Vec<P>,
    ) -> Option<Result<Vec<postgres::Row>, postgres::Error>> {
        self.call(move |s| {
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(P::as_sql).collect();
            let statement = s.statement(sql)?;
            s.client.query(&statement, &refs)
        })
    }
}

/// Whether a transaction is open on the writer: [`Store::begin`] waits while one is.
#[derive(Default)]
struct Permit {
    taken: Mutex<bool>,
    freed: Condvar,
}

impl Permit {
    fn take(&self) {
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        while *taken {
            taken = self.freed.wait(taken).unwrap_or_else(|p| p.into_inner());
        }
        *taken = true;
    }

    fn give_back(&self) {
        *self.taken.lock().unwrap_or_else(|p| p.into_inner()) = false;
        self.freed.notify_one();
    }
}

/// The PostgreSQL store: a writer connection for transactions, a second for alarms' and a reader
/// for statistics.
pub struct PgStore {
    target: Target,
    location: String,
    writer: RwLock<Option<Arc<Conn>>>,
    alarm_writer: RwLock<Option<Arc<Conn>>>,
    reader: RwLock<Option<Arc<Conn>>>,
    permit: Arc<Permit>,
    alarm_permit: Arc<Permit>,
    leader: leader::Leader,
}

impl PgStore {
    /// Connects to the database at `url` (a libpq connection string or URL; several hosts and
    /// `target_session_attrs=read-write` follow a promoted standby) and checks its schema: a
    /// database without one, or with an older or newer one, is refused with what to do.
    pub fn open(url: &str) -> Result<PgStore, StoreError> {
        let target = Target::parse(url)?;
        let location = target.location.clone();
        let writer = Conn::open(&target, "chukei-pg-writer")?;
        schema::check(&writer, &location)?;
        say_durability(&writer, &location);
        say_privacy(&target);
        let alarm_writer = Conn::open(&target, "chukei-pg-alarms")?;
        let reader = Conn::open(&target, "chukei-pg-reader")?;
        Ok(PgStore {
            target,
            location,
            writer: RwLock::new(Some(Arc::new(writer))),
            alarm_writer: RwLock::new(Some(Arc::new(alarm_writer))),
            reader: RwLock::new(Some(Arc::new(reader))),
            permit: Arc::default(),
            alarm_permit: Arc::default(),
            leader: leader::Leader::default(),
        })
    }

    fn conn(slot: &RwLock<Option<Arc<Conn>>>, location: &str) -> Result<Arc<Conn>, StoreError> {
        slot.read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| StoreError::Unavailable {
                location: location.to_owned(),
                reason: "not connected; reconnecting".into(),
            })
    }
}

impl PgStore {
    /// A transaction on the writer, waiting while another is open.
    fn txn(&self) -> Result<PgTxn, StoreError> {
        self.txn_on(&self.writer, &self.permit)
    }

    /// A transaction on `writer`, waiting while another is open on it.
    fn txn_on(
        &self,
        writer: &RwLock<Option<Arc<Conn>>>,
        permit: &Arc<Permit>,
    ) -> Result<PgTxn, StoreError> {
        let conn = PgStore::conn(writer, &self.location)?;
        permit.take();
        // BEGIN goes with the transaction's first read, in the same trip. Read committed,
        // with every record the core may change read `FOR UPDATE` (tables.rs): two nodes
        // touching the same job or device take turns, each seeing the other's commit, so
        // neither update is lost. A deadlock between two nodes fails one batch, whose senders
        // resend it.
        Ok(PgTxn {
            conn,
            permit: permit.clone(),
            location: self.location.clone(),
            dirty: false,
            begun: std::cell::Cell::new(false),
            ended: false,
            failed: std::cell::Cell::new(false),
            held: std::cell::RefCell::default(),
            cache: std::cell::RefCell::default(),
        })
    }
}

impl crate::gateway::tickets::SharedKeys for PgStore {
    fn update(
        &self,
        update: crate::gateway::tickets::KeyUpdate,
    ) -> Result<Option<Vec<u8>>, String> {
        let conn = PgStore::conn(&self.reader, &self.location).map_err(|e| e.to_string())?;
        let done = conn.call(move |s| -> Result<Option<Vec<u8>>, postgres::Error> {
            s.client.in_transaction(|txn| {
                let current: Option<Vec<u8>> = txn
                    .query_opt(
                        "SELECT keys FROM tls_ticket_keys WHERE name = 'tickets' FOR UPDATE",
                        &[],
                    )?
                    .map(|r| r.try_get(0))
                    .transpose()?;
                let Some(next) = update(current.as_deref()) else {
                    return Ok(current);
                };
                // Two nodes making the first keys at once: the first insert wins, the other
                // adopts it.
                let written = txn.execute(
                    "INSERT INTO tls_ticket_keys (name, keys) VALUES ('tickets', $1)
                 ON CONFLICT (name) DO UPDATE SET keys = EXCLUDED.keys
                 WHERE tls_ticket_keys.keys = $2",
                    &[&next, &current.clone().unwrap_or_default()],
                )?;
                let stored = if written == 1 {
                    Some(next)
                } else {
                    txn.query_opt(
                        "SELECT keys FROM tls_ticket_keys WHERE name = 'tickets'",
                        &[],
                    )?
                    .map(|r| r.try_get(0))
                    .transpose()?
                };
                Ok(stored)
            })
        });
        match done {
            Some(r) => r.map_err(|e| e.to_string()),
            None => Err("the connection was lost".into()),
        }
    }
}

/// Logs what "acked" means on this database (README, "A cluster of relay nodes"): on the
/// primary's disk, or also on a synchronous standby's; warns where it means less than a disk.
fn say_durability(conn: &Conn, location: &str) {
    let setting = |name: &'static str| {
        conn.call(move |s| {
            s.client
                .query_one(&format!("SHOW {name}"), &[])
                .and_then(|r| r.try_get::<_, String>(0))
        })
        .and_then(Result::ok)
        .unwrap_or_default()
    };
    let commit = setting("synchronous_commit");
    let standbys = setting("synchronous_standby_names");
    let fsync = setting("fsync");
    let promise = match (commit.as_str(), standbys.is_empty(), fsync.as_str()) {
        ("off", ..) | (_, _, "off") => None,
        ("on" | "remote_apply", false, _) => {
            Some("the primary's and a synchronous standby's disks")
        }
        ("remote_write", false, _) => Some("the primary's disk and a synchronous standby's memory"),
        _ => Some("the primary's disk"),
    };
    match promise {
        Some(promise) => tracing::info!(
            store = %location, synchronous_commit = %commit, synchronous_standby_names = %standbys,
            "cluster store: a message is acked once it is on {promise}"
        ),
        None => tracing::warn!(
            store = %location, synchronous_commit = %commit, fsync = %fsync,
            "the cluster database may lose messages this relay acked (a crash can undo commits it confirmed): set synchronous_commit = on and fsync = on"
        ),
    }
}

/// Says how the node's connections to the database are protected; warns where they cross a
/// network in the clear (the database holds every job, and the keys of the TLS tickets).
fn say_privacy(target: &Target) {
    if target.clear_over_network() {
        tracing::warn!(
            store = %target.location, sslmode = target.mode().as_str(),
            "the connection to the cluster database is not encrypted: add sslmode=verify-full&sslrootcert=CA.pem to --cluster-db (README, \"TLS to the database and the bus\")"
        );
    } else {
        tracing::info!(store = %target.location, sslmode = target.mode().as_str(), encrypted = target.mode().encrypts(), "cluster store: connected");
    }
}

/// What went wrong, in the server's words where it said something ("duplicate key value
/// violates unique constraint …: Key (name)=(t) already exists"): the client's own text for a
/// server error is only "db error".
pub(crate) fn reason(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{}: {detail}", db.message()),
            None => db.message().to_owned(),
        },
        // The client's own text stops at what failed ("error performing TLS handshake"); why
        // is in its sources ("invalid peer certificate: UnknownIssuer").
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        }
    }
}

impl Store for PgStore {
    fn begin(&self) -> Result<Box<dyn Txn>, StoreError> {
        Ok(Box::new(self.txn()?))
    }

    fn has_alarm_writer(&self) -> bool {
        true
    }

    fn begin_alarms(&self) -> Result<Box<dyn Txn>, StoreError> {
        Ok(Box::new(
            self.txn_on(&self.alarm_writer, &self.alarm_permit)?,
        ))
    }

    fn reopen(&self) -> Result<(), StoreError> {
        let writer = Conn::open(&self.target, "chukei-pg-writer")?;
        schema::check(&writer, &self.location)?;
        let alarm_writer = Conn::open(&self.target, "chukei-pg-alarms")?;
        let reader = Conn::open(&self.target, "chukei-pg-reader")?;
        *self.writer.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(writer));
        *self.alarm_writer.write().unwrap_or_else(|p| p.into_inner()) =
            Some(Arc::new(alarm_writer));
        *self.reader.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(reader));
        Ok(())
    }

    fn is_closed(&self) -> bool {
        self.writer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    fn space(&self) -> Option<&super::Space> {
        None
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        let conn = PgStore::conn(&self.reader, &self.location)?;
        tables::stats(&conn, &self.location)
    }

    fn open_job_keys(&self) -> Result<Vec<Result<OpenJobKey, StoreError>>, StoreError> {
        let conn = PgStore::conn(&self.reader, &self.location)?;
        tables::open_job_keys(&conn, &self.location)
    }

    fn location(&self) -> String {
        self.location.clone()
    }

    fn leads_cluster_work(&self) -> bool {
        self.leader.leads(&self.target)
    }

    fn gone_nodes(&self) -> Result<Vec<String>, StoreError> {
        nodes::gone(self)
    }

    fn backup(&self, _out: &std::path::Path) -> Result<u64, StoreError> {
        Err(StoreError::NotHere {
            what: "`broker backup`",
            instead: "back the cluster database up with PostgreSQL's own tools (pg_dump, or a base backup with WAL archiving)",
        })
    }
}

/// One SQL transaction on the writer connection. Dropped without [`Txn::commit`], it is rolled
/// back.
///
/// Writes are held ([`combine`]) until the transaction's next read or its commit, and go to the
/// server together with it, in one network trip ([`client::Client::pipeline`]): a batch of
/// device reports makes a few trips, not one per row or per statement.
pub struct PgTxn {
    conn: Arc<Conn>,
    permit: Arc<Permit>,
    location: String,
    dirty: bool,
    /// Whether BEGIN has been sent.
    begun: std::cell::Cell<bool>,
    /// Whether the permit was given back (COMMIT or ROLLBACK sent, or nothing to send).
    ended: bool,
    /// Whether a statement failed (the transaction was rolled back there and then).
    failed: std::cell::Cell<bool>,
    held: std::cell::RefCell<Vec<combine::Write>>,
    pub(crate) cache: std::cell::RefCell<Cache>,
}

/// Rows this transaction holds locked (`FOR UPDATE`, from their first read to the commit), so
/// they cannot change meanwhile and are read once: a device's seen-ids windows, its record and
/// its presence, by serial (`None`: no row), and the counters it has taken numbers from.
#[derive(Default)]
pub(crate) struct Cache {
    pub(crate) windows: std::collections::HashMap<String, Option<super::seen::SeenSet>>,
    pub(crate) devices: std::collections::HashMap<String, Option<Vec<u8>>>,
    pub(crate) presence: std::collections::HashMap<String, Option<Vec<u8>>>,
    /// Jobs by number: their records (read `FOR UPDATE`), events and reports.
    pub(crate) jobs: std::collections::HashMap<u64, Option<Vec<u8>>>,
    pub(crate) events: std::collections::HashMap<u64, Vec<(i32, Vec<u8>)>>,
    pub(crate) reports: std::collections::HashMap<u64, Option<Vec<u8>>>,
    /// Journal entries by sender and message id.
    pub(crate) journal: std::collections::HashMap<(String, u64), Option<Vec<u8>>>,
    pub(crate) counters: std::collections::HashMap<&'static str, Counter>,
    /// Devices' active alarms, code to number, by serial: all of a device's, once read.
    pub(crate) active_alarms:
        std::collections::HashMap<String, std::collections::BTreeMap<String, u64>>,
    /// Alarm records by number (read `FOR UPDATE`), and devices' overflow records by serial.
    pub(crate) alarms: std::collections::HashMap<u64, Option<Vec<u8>>>,
    pub(crate) alarm_overflow: std::collections::HashMap<String, Option<Vec<u8>>>,
}

/// A counter this transaction takes numbers from: the last it took, and whether the row does
/// not hold it yet (written once, with the next trip, however many were taken).
pub(crate) struct Counter {
    pub(crate) last: u64,
    pub(crate) unsent: bool,
}

impl PgTxn {
    fn lost(&self, op: &'static str) -> StoreError {
        StoreError::Unavailable {
            location: self.location.clone(),
            reason: format!("the connection was lost while trying to {op}"),
        }
    }

    fn db_error(&self, op: &'static str, e: postgres::Error) -> StoreError {
        if e.is_closed() || e.code().is_none() {
            StoreError::Unavailable {
                location: self.location.clone(),
                reason: format!("could not {op}: {e}"),
            }
        } else {
            StoreError::Database {
                op,
                reason: reason(&e),
            }
        }
    }

    /// Sends BEGIN if not yet sent, the held writes and `asks`, all in one trip to the server
    /// ([`client::Client::pipeline`]); returns each ask's rows, in order.
    fn send(
        &self,
        op: &'static str,
        asks: Vec<Ask>,
    ) -> Result<Vec<Vec<postgres::Row>>, StoreError> {
        if self.failed.get() {
            return Err(StoreError::Database {
                op,
                reason: "an earlier statement of this transaction failed; it was rolled back"
                    .into(),
            });
        }
        let begin = !self.begun.replace(true);
        let mut held = std::mem::take(&mut *self.held.borrow_mut());
        for (name, counter) in &mut self.cache.borrow_mut().counters {
            if std::mem::take(&mut counter.unsent) {
                held.push(combine::Write {
                    op: "count",
                    sql: "UPDATE meta SET value = $2 WHERE name = $1",
                    params: vec![P::Text((*name).to_owned()), P::I64(counter.last as i64)],
                });
            }
        }
        let steps = combine::plan(held);
        let done = self.conn.call(move |s| {
            let r = s.run(begin, &steps, &asks, op);
            if r.is_err() {
                // A failed statement leaves the transaction refusing everything but its end:
                // end it here, so the connection is ready for the next one.
                let _ = s.client.batch_execute("ROLLBACK");
            }
            r
        });
        match done {
            Some(Ok(r)) => Ok(r),
            Some(Err((op, e))) => {
                self.failed.set(true);
                Err(self.db_error(op, e))
            }
            None => {
                self.failed.set(true);
                Err(self.lost(op))
            }
        }
    }

    /// Forgets what is held (writes, counters' last numbers): the transaction is abandoned.
    fn discard(&self) {
        self.held.borrow_mut().clear();
        for counter in self.cache.borrow_mut().counters.values_mut() {
            counter.unsent = false;
        }
    }

    /// Holds a statement that writes until the next read or the commit.
    pub(crate) fn write(
        &mut self,
        op: &'static str,
        sql: &'static str,
        params: Vec<P>,
    ) -> Result<(), StoreError> {
        self.dirty = true;
        self.held
            .borrow_mut()
            .push(combine::Write { op, sql, params });
        Ok(())
    }

    /// Runs a query (after the writes held before it).
    pub(crate) fn rows(
        &self,
        op: &'static str,
        sql: &'static str,
        params: Vec<P>,
    ) -> Result<Vec<postgres::Row>, StoreError> {
        let mut answers = self.send(op, vec![Ask::Rows { sql, params }])?;
        Ok(answers.pop().unwrap_or_default())
    }

    /// Runs a query that writes and returns rows (`… RETURNING`).
    pub(crate) fn write_rows(
        &mut self,
        op: &'static str,
        sql: &'static str,
        params: Vec<P>,
    ) -> Result<Vec<postgres::Row>, StoreError> {
        self.dirty = true;
        self.rows(op, sql, params)
    }

    /// Ends the transaction with `sql` (COMMIT or ROLLBACK) if it began and is not over
    /// already, and lets the next one start.
    fn end(&mut self, op: &'static str, sql: &'static str) -> Result<(), StoreError> {
        self.ended = true;
        let r = if self.failed.get() {
            // Rolled back when its statement failed.
            Err(StoreError::Database {
                op,
                reason: "an earlier statement of this transaction failed; it was rolled back"
                    .into(),
            })
        } else if self.begun.get() || !self.held.borrow().is_empty() {
            self.send(op, vec![Ask::Command(sql)]).map(|_| ())
        } else {
            Ok(())
        };
        self.permit.give_back();
        r
    }
}

impl Txn for PgTxn {
    fn commit(mut self: Box<Self>) -> Result<bool, StoreError> {
        if !self.dirty {
            self.discard();
            self.end("end a transaction", "ROLLBACK")?;
            return Ok(false);
        }
        self.end("commit a transaction", "COMMIT")?;
        Ok(true)
    }

    fn wants_hints(&self) -> bool {
        true
    }

    fn warm(&mut self, hints: &crate::store::Hints) -> Result<(), StoreError> {
        self.warm_rows(hints)
    }

    fn warm_devices(&mut self, serials: &[&str]) -> Result<(), StoreError> {
        self.warm_rows(&crate::store::Hints {
            devices: serials.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        })
    }
}

impl Drop for PgTxn {
    fn drop(&mut self) {
        if !self.ended {
            // Nothing held is sent: the transaction is abandoned.
            self.discard();
            let _ = self.end("roll a transaction back", "ROLLBACK");
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::store::testing;
    use crate::store::testing::on_postgres;

    #[test]
    fn numbers_taken_in_one_transaction_continue_in_the_next_and_a_rolled_back_one_leaves_no_gap() {
        let dir = tempfile::tempdir().unwrap();
        let store = testing::open(dir.path());
        let mut txn = store.begin().unwrap();
        let taken: Vec<u64> = (0..3).map(|_| txn.next_job_number().unwrap()).collect();
        assert_eq!(taken, [1, 2, 3]);
        assert!(txn.commit().unwrap());
        let mut txn = store.begin().unwrap();
        assert_eq!(txn.next_job_number().unwrap(), 4);
        assert_eq!(txn.next_job_number().unwrap(), 5);
        drop(txn);
        let mut txn = store.begin().unwrap();
        assert_eq!(
            txn.next_job_number().unwrap(),
            4,
            "the dropped transaction's numbers are free"
        );
        assert!(txn.commit().unwrap());
    }

    #[test]
    fn a_held_write_that_fails_fails_its_transaction_whole_and_the_next_one_runs() {
        if !on_postgres() {
            return; // Only the PostgreSQL store holds writes.
        }
        let dir = tempfile::tempdir().unwrap();
        let pg = testing::postgres_store(dir.path());
        let mut txn = pg.txn().unwrap();
        txn.write(
            "test",
            "INSERT INTO meta (name, value) VALUES ($1, $2)",
            vec![super::P::Text("t".into()), super::P::I64(1)],
        )
        .unwrap();
        txn.write(
            "test",
            "INSERT INTO meta (name, value) VALUES ($1, $2)",
            vec![super::P::Text("t".into()), super::P::I64(2)],
        )
        .unwrap();
        let e = crate::store::Txn::commit(Box::new(txn)).unwrap_err();
        assert!(e.to_string().contains("duplicate key"), "{e}");
        // Nothing of it was kept, and the connection serves the next transaction.
        let txn = pg.txn().unwrap();
        let rows = txn
            .rows(
                "test",
                "SELECT count(*) FROM meta WHERE name = $1",
                vec![super::P::Text("t".into())],
            )
            .unwrap();
        assert_eq!(rows[0].get::<_, i64>(0), 0);
    }

    /// Two nodes' stores on one test database (kept while the directory lives); `None` unless
    /// the tests run on PostgreSQL.
    fn two_nodes() -> Option<(tempfile::TempDir, super::PgStore, super::PgStore)> {
        if !on_postgres() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let n1 = testing::postgres_store(dir.path());
        let n2 = testing::postgres_store(dir.path());
        Some((dir, n1, n2))
    }

    #[test]
    fn two_nodes_doing_the_same_host_request_at_once_commit_it_once() {
        use crate::store::{JournalEntry, JournalOutcome, Store, job_id};
        let Some((_dir, n1, n2)) = two_nodes() else {
            return; // Two nodes on one database: the PostgreSQL store only.
        };
        let entry = |n: u64| JournalEntry {
            at: chrono::Utc::now(),
            outcome: JournalOutcome::Submission { job: job_id(n) },
        };
        // Both read the request as new, both do it; the first commit wins.
        let (mut a, mut b) = (n1.begin().unwrap(), n2.begin().unwrap());
        assert!(a.journal("host:svc", 7).unwrap().is_none());
        assert!(b.journal("host:svc", 7).unwrap().is_none());
        a.put_journal("host:svc", 7, &entry(1)).unwrap();
        b.put_journal("host:svc", 7, &entry(2)).unwrap();
        assert!(a.commit().unwrap());
        let e = b.commit().unwrap_err();
        assert!(e.to_string().contains("duplicate key"), "{e}");
        // The resend through either node finds the first's answer.
        let txn = n2.begin().unwrap();
        let found = txn.journal("host:svc", 7).unwrap().unwrap();
        assert_eq!(found.outcome, JournalOutcome::Submission { job: job_id(1) });
    }

    /// A transaction's statements go to the server in as many trips as the transaction reads,
    /// plus its commit: BEGIN rides with the first read, the writes held with the next one.
    #[test]
    fn a_transaction_sends_its_statements_together_one_trip_per_read_and_one_to_commit() {
        use crate::store::{DeviceRecord, Store};
        use std::sync::atomic::Ordering;
        if !on_postgres() {
            return; // The PostgreSQL store only.
        }
        let dir = tempfile::tempdir().unwrap();
        let (store, bursts) = testing::postgres_store_counting_trips(dir.path());
        let serials = ["C1", "C2"].map(|s| protocol::Serial::parse(s).unwrap());
        let once = |round: i64| {
            let mut txn = store.begin().unwrap();
            // BEGIN and three reads (windows, records, presence).
            txn.warm_devices(&["C1", "C2"]).unwrap();
            for serial in &serials {
                let record = DeviceRecord {
                    state: Default::default(),
                    last_seen: chrono::DateTime::from_timestamp(round, 0).unwrap(),
                };
                txn.put_device(serial, &record).unwrap();
            }
            // The writes held, and a read.
            assert!(txn.journal("host:svc", 7).unwrap().is_none());
            assert!(txn.commit().unwrap());
        };
        // The first round prepares each statement on the connection (a trip each, once).
        once(1);
        let before = bursts.load(Ordering::SeqCst);
        once(2);
        let trips = bursts.load(Ordering::SeqCst) - before;
        // One statement a trip, it would be seven: BEGIN, three reads, the writes, a read, COMMIT.
        assert_eq!(trips, 3, "trips the second transaction took");
        let txn = store.begin().unwrap();
        let seen = txn
            .device(&serials[1])
            .unwrap()
            .map(|d| d.last_seen.timestamp());
        assert_eq!(seen, Some(2), "the held writes were committed");
    }

    fn reading(serial: &str, at_ms: i64) -> protocol::meter::CounterReading {
        protocol::meter::CounterReading {
            serial: serial.into(),
            site: String::new(),
            read_at: chrono::DateTime::from_timestamp_millis(at_ms).unwrap(),
            source: "report".into(),
            counters: Default::default(),
        }
    }

    /// Every reading a node stores, in the export's order.
    fn stored(store: &dyn crate::store::Store) -> Vec<(String, u64)> {
        let txn = store.begin().unwrap();
        let (page, _) = txn
            .readings(
                chrono::DateTime::from_timestamp_millis(0).unwrap(),
                chrono::DateTime::from_timestamp_millis(4_000_000_000_000).unwrap(),
                None,
                None,
                1000,
            )
            .unwrap();
        page.into_iter()
            .map(|r| (r.serial.to_string(), r.read_at.timestamp_millis() as u64))
            .collect()
    }

    /// Two nodes storing counter reports at once take no lock in common: the second commits
    /// while the first's insert is in and its transaction still open.
    #[test]
    fn readings_from_two_nodes_commit_side_by_side() {
        use crate::store::Store;
        let Some((_dir, n1, n2)) = two_nodes() else {
            return; // Two nodes on one database: the PostgreSQL store only.
        };
        let mut a = n1.begin().unwrap();
        a.put_reading(&reading("C1", 1_000)).unwrap();
        // A read sends what the transaction holds: the insert is done, the transaction open.
        let c1 = protocol::Serial::parse("C1").unwrap();
        assert!(a.device(&c1).unwrap().is_none());
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let n2 = std::sync::Arc::new(n2);
        let other = std::sync::Arc::clone(&n2);
        std::thread::spawn(move || {
            let mut b = other.begin().unwrap();
            b.put_reading(&reading("C2", 2_000)).unwrap();
            let _ = done_tx.send(b.commit());
        });
        let committed = done_rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the second node's reading waited for the first node's transaction");
        assert!(committed.unwrap());
        assert!(a.commit().unwrap());
        assert_eq!(
            stored(&*n2),
            [("C1".to_owned(), 1_000), ("C2".to_owned(), 2_000)]
        );
    }

    /// A database of the release before (schema 2, readings numbered from a counter row) is
    /// upgraded: its readings stay, and new ones are numbered after them.
    #[test]
    fn readings_numbered_before_the_upgrade_stay_and_new_ones_follow() {
        use crate::store::Store;
        if !on_postgres() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let url = testing::postgres_database(dir.path());
        assert_eq!(super::schema::migrate_to(&url, 2).unwrap(), (0, 2));
        let old = postgres::Client::connect(&url, postgres::NoTls).and_then(|mut c| {
            c.batch_execute(
                "INSERT INTO readings (number, read_at_ms, serial, reading) VALUES (41, 5, 'C1', '\\x');
                 INSERT INTO meta (name, value) VALUES ('next_reading', 41);",
            )
        });
        std::thread::spawn(move || old)
            .join()
            .unwrap()
            .expect("a release-2 database with a reading");
        assert_eq!(super::migrate(&url).unwrap(), (2, super::SCHEMA_VERSION));
        let store = super::PgStore::open(&url).unwrap();
        let mut txn = store.begin().unwrap();
        txn.put_reading(&reading("C1", 5)).unwrap();
        assert!(txn.commit().unwrap());
        let txn = store.txn().unwrap();
        let numbers = txn
            .rows(
                "test",
                "SELECT number FROM readings ORDER BY number",
                Vec::new(),
            )
            .unwrap()
            .iter()
            .map(|r| r.get::<_, i64>(0))
            .collect::<Vec<_>>();
        assert_eq!(numbers, [41, 42]);
        let counters = txn
            .rows(
                "test",
                "SELECT count(*) FROM meta WHERE name = 'next_reading'",
                Vec::new(),
            )
            .unwrap()[0]
            .get::<_, i64>(0);
        assert_eq!(counters, 0, "the counter row is gone");
    }
}
