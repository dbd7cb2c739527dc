//! The records table as an operator sees it: how many records each scope holds, what one record
//! says, and deleting them in bounded batches.
//!
//! Every store that keeps records implements [`Records`]; [`crate::retention`] builds the
//! purge loop and the background purger on it, and the `idem` command-line tool its `stats`,
//! `inspect` and `purge` commands.

use std::future::Future;
use std::time::Duration;

use super::Store;
use crate::clock::Sleep;

/// How many records each scope holds, and how large the table is.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct RecordStats {
    /// One entry per scope that has records, ordered by scope.
    pub scopes: Vec<ScopeStats>,
    /// The table's size on disk with its indexes, in bytes, where the store can tell
    /// (PostgreSQL exactly; MySQL and MariaDB InnoDB's estimate; SQLite when its `dbstat` table
    /// is compiled in).
    pub table_bytes: Option<u64>,
    /// The time the expired counts were taken at, Unix milliseconds, by the store's clock.
    pub now_ms: i64,
}

impl RecordStats {
    /// Records in every scope.
    pub fn records(&self) -> u64 {
        self.scopes.iter().map(|scope| scope.records).sum()
    }

    /// Expired records in every scope: what a purge deletes.
    pub fn expired(&self) -> u64 {
        self.scopes.iter().map(|scope| scope.expired).sum()
    }
}

/// The records of one scope.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ScopeStats {
    /// The handler's scope ([`Key::scope`](crate::Key::scope)).
    pub scope: String,
    /// Records, live and expired.
    pub records: u64,
    /// Records whose expiry has passed: they no longer make a delivery a duplicate, and a
    /// purge deletes them.
    pub expired: u64,
    /// The oldest record's `created_at_ms`.
    pub oldest_created_at_ms: i64,
    /// The newest record's `created_at_ms`.
    pub newest_created_at_ms: i64,
}

impl ScopeStats {
    /// A scope's line of [`RecordStats`], as the stores read it.
    pub(crate) fn from_row(row: (String, i64, i64, i64, i64)) -> Self {
        let (scope, records, expired, oldest_created_at_ms, newest_created_at_ms) = row;
        Self {
            scope,
            records: u64::try_from(records).unwrap_or(0),
            expired: u64::try_from(expired).unwrap_or(0),
            oldest_created_at_ms,
            newest_created_at_ms,
        }
    }
}

/// One record, as [`Records::inspect`] reads it: whether a message was processed, when, and
/// what its duplicates are told.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct RecordDetails {
    /// The handler's scope.
    pub scope: String,
    /// The encoded key ([`Key::value`](crate::Key::value)).
    pub key: String,
    /// SHA-256 of the first delivery's payload, hex, when the handler has `fingerprint`.
    pub fingerprint: Option<String>,
    /// The first delivery's result, JSON, replayed to duplicates, when the handler has
    /// `replay`.
    pub response: Option<String>,
    /// When the record was written, Unix milliseconds.
    pub created_at_ms: i64,
    /// When it stops counting, Unix milliseconds; `None`: never.
    pub expires_at_ms: Option<i64>,
    /// Whether it had expired when read (by the store's clock): an expired record no longer
    /// makes a delivery a duplicate.
    pub expired: bool,
}

impl RecordDetails {
    /// A record as the stores read it, judged at `now_ms`.
    pub(crate) fn from_row(scope: &str, key: &str, row: super::RecordRow, now_ms: i64) -> Self {
        let (fingerprint, response, created_at_ms, expires_at_ms) = row;
        Self {
            scope: scope.to_owned(),
            key: key.to_owned(),
            fingerprint,
            response,
            created_at_ms,
            expires_at_ms,
            expired: expires_at_ms.is_some_and(|expires| expires <= now_ms),
        }
    }
}

/// What one batch of a purge by age deleted, and where the walk through the table stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgedBatch {
    /// Records this batch deleted.
    pub deleted: u64,
    /// The last `(scope, key)` of the window this batch examined: the next batch starts after
    /// it. `None` when the window was the table's (or the scope's) last.
    pub last: Option<(String, String)>,
}

/// A store's records as an operator sees them: statistics, one record, and deleting them in
/// bounded batches. Implemented by every [`Store`]; sealed like it. The purge loop and the
/// background purger ([`crate::retention`]) are written against this trait.
///
/// Each batch commits before the next, and each of its statements (one for expired records; a
/// read of the window's end and a range delete for a purge by age) touches at most one batch
/// of rows: a purge of millions of records never holds a long lock or grows one huge
/// transaction. On PostgreSQL, a batch of expired records skips rows a gate holds locked
/// (`FOR UPDATE SKIP LOCKED`) instead of waiting for them; a window of a purge by age waits for
/// them (a gate's transaction is short).
pub trait Records: Store {
    /// Deletes at most `limit` records whose expiry is at or before `now_ms`, in `scope` when
    /// given; returns how many. Uses the expiry index.
    fn purge_expired_batch(
        &self,
        now_ms: i64,
        scope: Option<&str>,
        limit: u32,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send;

    /// Examines the next `limit` records after `after` in `(scope, key)` order (in `scope`
    /// when given) and deletes those created before `cutoff_ms`, whatever their expiry: a walk
    /// along the primary key in windows, so that a purge by age needs no index on
    /// `created_at_ms`, each statement touches at most one window however sparse the old
    /// records are, and each batch starts where the last one ended.
    fn purge_created_before_batch(
        &self,
        cutoff_ms: i64,
        scope: Option<&str>,
        after: (&str, &str),
        limit: u32,
    ) -> impl Future<Output = Result<AgedBatch, sqlx::Error>> + Send;

    /// Records per scope, expired records (at the store clock's now), oldest and newest, and
    /// the table's size where the store can tell. Reads the whole table: on a large one, this
    /// takes as long as a full scan.
    fn stats(&self) -> impl Future<Output = Result<RecordStats, sqlx::Error>> + Send;

    /// The record of `key` in `scope` (both as the handler's logs show them), live or expired;
    /// `None` when there is none.
    fn inspect(
        &self,
        scope: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<RecordDetails>, sqlx::Error>> + Send;

    /// Waits `duration` on the store's [`Clock`](crate::clock::Clock): the background
    /// purger's interval, which a test moves with a
    /// [`ManualClock`](crate::clock::ManualClock).
    fn sleep(&self, duration: Duration) -> Sleep<'_>;
}

/// The statements of a purge by age, in a store's dialect: the window's end (all scopes, one
/// scope), the delete of a full window, and the delete of the last, shorter one.
#[cfg(any(feature = "pg", feature = "mysql", feature = "sqlite"))]
#[derive(Debug)]
pub(crate) struct AgedSql {
    pub(crate) window_end: sqlx::SqlStr,
    pub(crate) delete_window: sqlx::SqlStr,
    pub(crate) delete_tail: sqlx::SqlStr,
    pub(crate) window_end_in_scope: sqlx::SqlStr,
    pub(crate) delete_window_in_scope: sqlx::SqlStr,
    pub(crate) delete_tail_in_scope: sqlx::SqlStr,
}

#[cfg(any(feature = "pg", feature = "mysql", feature = "sqlite"))]
impl AgedSql {
    /// `statements` in the order of the fields, each rewritten for the store's table by `sql`.
    pub(crate) fn new(
        sql: impl Fn(&'static str) -> sqlx::SqlStr,
        statements: [&'static str; 6],
    ) -> Self {
        let [
            window_end,
            delete_window,
            delete_tail,
            window_end_in_scope,
            delete_window_in_scope,
            delete_tail_in_scope,
        ] = statements.map(sql);
        Self {
            window_end,
            delete_window,
            delete_tail,
            window_end_in_scope,
            delete_window_in_scope,
            delete_tail_in_scope,
        }
    }
}

/// The parts of [`Records`] every sqlx store writes the same way, given a pool `self.pool`, a
/// clock `self.clock` and the one-record statement `self.sql.select`: `inspect` and `sleep`.
#[cfg(any(feature = "pg", feature = "mysql", feature = "sqlite"))]
macro_rules! sql_records_reads {
    () => {
        async fn inspect(
            &self,
            scope: &str,
            key: &str,
        ) -> Result<Option<$crate::store::RecordDetails>, sqlx::Error> {
            let now_ms = self.clock.now_ms();
            let row = sqlx::query_as::<_, $crate::store::RecordRow>(self.sql.select.clone())
                .bind(scope)
                .bind(key)
                .fetch_optional(&self.pool)
                .await?;
            Ok(row.map(|row| $crate::store::RecordDetails::from_row(scope, key, row, now_ms)))
        }

        fn sleep(&self, duration: std::time::Duration) -> $crate::clock::Sleep<'_> {
            self.clock.sleep(duration)
        }
    };
}
#[cfg(any(feature = "pg", feature = "mysql", feature = "sqlite"))]
pub(crate) use sql_records_reads;

/// Every scope's line of [`RecordStats`] (a `Vec<ScopeStats>`), by a store's `stats`
/// statement (binds: now), on `executor`.
#[cfg(any(feature = "pg", feature = "mysql", feature = "sqlite"))]
macro_rules! scope_stats {
    ($statement:expr, $now_ms:expr, $executor:expr) => {
        sqlx::query_as($statement)
            .bind($now_ms)
            .fetch_all($executor)
            .await?
            .into_iter()
            .map($crate::store::ScopeStats::from_row)
            .collect::<Vec<_>>()
    };
}
#[cfg(any(feature = "pg", feature = "mysql", feature = "sqlite"))]
pub(crate) use scope_stats;

/// `Records::purge_created_before_batch` for a dialect that compares row values, where
/// `(scope, record_key) > (?, ?)` binds the walk's position as two values (PostgreSQL,
/// SQLite): find the window's end, then delete the old records up to it.
#[cfg(any(feature = "pg", feature = "sqlite"))]
macro_rules! row_value_aged_batch {
    () => {
        async fn purge_created_before_batch(
            &self,
            cutoff_ms: i64,
            scope: Option<&str>,
            after: (&str, &str),
            limit: u32,
        ) -> Result<$crate::store::AgedBatch, sqlx::Error> {
            let sql = &self.sql.aged;
            let offset = i64::from(limit.max(1) - 1);
            let window_end: Option<(String, String)> = match scope {
                None => sqlx::query_as(sql.window_end.clone()).bind(after.0),
                Some(scope) => sqlx::query_as(sql.window_end_in_scope.clone()).bind(scope),
            }
            .bind(after.1)
            .bind(offset)
            .fetch_optional(&self.pool)
            .await?;
            let delete = match (scope, &window_end) {
                (None, Some((last_scope, last_key))) => sqlx::query(sql.delete_window.clone())
                    .bind(after.0)
                    .bind(after.1)
                    .bind(last_scope)
                    .bind(last_key),
                (Some(scope), Some((_, last_key))) => {
                    sqlx::query(sql.delete_window_in_scope.clone())
                        .bind(scope)
                        .bind(after.1)
                        .bind(last_key)
                }
                (None, None) => sqlx::query(sql.delete_tail.clone())
                    .bind(after.0)
                    .bind(after.1),
                (Some(scope), None) => sqlx::query(sql.delete_tail_in_scope.clone())
                    .bind(scope)
                    .bind(after.1),
            };
            let done = delete.bind(cutoff_ms).execute(&self.pool).await?;
            Ok($crate::store::AgedBatch {
                deleted: done.rows_affected(),
                last: window_end,
            })
        }
    };
}
#[cfg(any(feature = "pg", feature = "sqlite"))]
pub(crate) use row_value_aged_batch;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_expired_from_its_expiry_on() {
        let row = |expires| (None, None, 10, expires);
        assert!(!RecordDetails::from_row("s", "k", row(None), i64::MAX).expired);
        assert!(!RecordDetails::from_row("s", "k", row(Some(100)), 99).expired);
        assert!(RecordDetails::from_row("s", "k", row(Some(100)), 100).expired);
    }

    #[test]
    fn totals_add_up_the_scopes() {
        let stats = RecordStats {
            scopes: vec![
                ScopeStats::from_row(("a".into(), 3, 1, 1, 2)),
                ScopeStats::from_row(("b".into(), 4, 2, 1, 2)),
            ],
            table_bytes: None,
            now_ms: 0,
        };
        assert_eq!((stats.records(), stats.expired()), (7, 3));
    }
}
