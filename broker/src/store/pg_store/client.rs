//! A connection's client: blocking, like the `postgres` crate's, but able to send several
//! statements to the server at once and read their answers in order (pipelining).
//!
//! The blocking `postgres` client waits for each statement's answer before it sends the next,
//! so a transaction made one network round trip per statement: BEGIN, each read, each write,
//! COMMIT — fifteen for a device's alarm, each a wake-up of the server's process and of this
//! thread. The asynchronous client under it queues requests in the order they are made and
//! writes them together; this client drives it on the connection's own thread (a
//! current-thread runtime), so that [`Client::pipeline`] sends BEGIN, the writes held and the
//! next read in one trip. Each statement still runs on its own, in order: one that fails fails
//! the transaction there, and those after it are refused by the server, as before.

use postgres::types::{ToSql, Type};
use postgres::{Error, Row, Statement};
use tokio_postgres::ToStatement;
use tokio_postgres_rustls::MakeRustlsConnect;

/// One statement of a pipeline, its parameters borrowed until the answers are in.
pub(crate) enum Request<'a> {
    /// A command without parameters, in the simple protocol (BEGIN, COMMIT, ROLLBACK).
    Command(&'a str),
    /// A prepared statement and its parameters; its rows (none for a write).
    Prepared(&'a Statement, Vec<&'a (dyn ToSql + Sync)>),
    /// A statement planned for these values (an unnamed statement: batch_reads.rs); its rows.
    Planned(&'a str, Vec<(&'a (dyn ToSql + Sync), Type)>),
}

/// A connection to the server and the runtime that drives it, on one thread.
pub(crate) struct Client {
    runtime: tokio::runtime::Runtime,
    inner: tokio_postgres::Client,
}

impl Client {
    /// Connects (blocking): the caller's thread must not be running a Tokio runtime. The error
    /// says why, for the operator.
    pub(crate) fn connect(
        config: &tokio_postgres::Config,
        tls: Option<&MakeRustlsConnect>,
    ) -> Result<Client, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("could not start the connection's runtime: {e}"))?;
        let inner = runtime
            .block_on(async {
                // The connection's task runs whenever this thread waits on the client.
                match tls {
                    Some(tls) => {
                        let (client, connection) = config.connect(tls.clone()).await?;
                        tokio::spawn(connection);
                        Ok(client)
                    }
                    None => {
                        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
                        tokio::spawn(connection);
                        Ok(client)
                    }
                }
            })
            .map_err(|e: Error| super::reason(&e))?;
        Ok(Client { runtime, inner })
    }

    /// Sends `requests` together and returns each one's answer, in order.
    pub(crate) fn pipeline(&mut self, requests: &[Request<'_>]) -> Vec<Result<Vec<Row>, Error>> {
        let client = &self.inner;
        // `join_all` polls each in turn before waiting on any: every request is queued on the
        // connection, in this order, before the connection's task writes them out.
        let answers = requests.iter().map(|request| async move {
            match request {
                Request::Command(sql) => client.batch_execute(sql).await.map(|()| Vec::new()),
                Request::Prepared(statement, params) => client.query(*statement, params).await,
                Request::Planned(sql, params) => client.query_typed(sql, params).await,
            }
        });
        self.runtime
            .block_on(futures_util::future::join_all(answers))
    }

    pub(crate) fn prepare(&mut self, sql: &str) -> Result<Statement, Error> {
        self.runtime.block_on(self.inner.prepare(sql))
    }

    pub(crate) fn query<T: ?Sized + ToStatement>(
        &mut self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        self.runtime.block_on(self.inner.query(statement, params))
    }

    pub(crate) fn query_one<T: ?Sized + ToStatement>(
        &mut self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error> {
        self.runtime
            .block_on(self.inner.query_one(statement, params))
    }

    pub(crate) fn query_opt<T: ?Sized + ToStatement>(
        &mut self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        self.runtime
            .block_on(self.inner.query_opt(statement, params))
    }

    pub(crate) fn execute<T: ?Sized + ToStatement>(
        &mut self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Error> {
        self.runtime.block_on(self.inner.execute(statement, params))
    }

    pub(crate) fn batch_execute(&mut self, sql: &str) -> Result<(), Error> {
        self.runtime.block_on(self.inner.batch_execute(sql))
    }

    /// Runs `work` in a transaction of its own: committed if it returns `Ok`, rolled back if
    /// not.
    pub(crate) fn in_transaction<R>(
        &mut self,
        work: impl FnOnce(&mut Client) -> Result<R, Error>,
    ) -> Result<R, Error> {
        self.batch_execute("BEGIN")?;
        match work(self) {
            Ok(r) => {
                self.batch_execute("COMMIT")?;
                Ok(r)
            }
            Err(e) => {
                let _ = self.batch_execute("ROLLBACK");
                Err(e)
            }
        }
    }
}
