//! SQLite (`store = "sqlite"`, feature `sqlite`): the embedded default, no server needed.
//!
//! What happens to a duplicate here: every handler transaction starts with `BEGIN IMMEDIATE`,
//! which takes the database's write lock up front, so transactions that write run one at a
//! time. A twin waits for the lock (the busy timeout), then its gate finds the committed
//! record. Starting with a plain `BEGIN` would let two readers both try to upgrade to writer
//! and fail with `SQLITE_BUSY` instead of waiting.
//!
//! A batch's gate ([`Store::claim_batch`]) writes all its keys in one multi-row
//! `INSERT … ON CONFLICT DO NOTHING RETURNING` (one per [`CLAIM_BATCH_ROWS`] keys, for SQLite's
//! limit on bound parameters) and reads the keys it found taken in one more statement; a key
//! found expired is taken over on its own.
//!
//! Durability: [`SqliteStore::open`] sets `synchronous = FULL`, so a transaction that
//! committed (and whose message was then acked) survives a power loss or an OS crash, not only
//! a process crash. `NORMAL` is faster in WAL mode but may lose the last transactions on power
//! loss, after their messages were acked: opt in with [`SqliteStore::open_with`] and
//! [`Synchronous::Normal`] only where that is acceptable (BENCHMARKS.md measures the cost).
//!
//! A statement with `OR ROLLBACK`, a `RAISE(ROLLBACK)` trigger or some I/O errors roll the whole
//! transaction back, and SQLite runs later statements in autocommit mode. Every handler
//! transaction therefore starts with `BEGIN IMMEDIATE; SAVEPOINT idem_open`, and the commit is
//! `RELEASE idem_open; COMMIT; BEGIN`: when the transaction is gone, so is the savepoint ("no
//! such savepoint"), which the store reports as [`CommitFailure::Aborted`]: requeued, never
//! acked. A write the runtime makes after the body is preceded by the same check. Statements
//! the body ran after that ignored error were committed one by one.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{SqlStr, Sqlite, Transaction};

use super::records::{AgedSql, RecordStats, Records};
use super::table::Dialect;
use super::{
    BatchPlan, Claim, CommitFailure, KeyedRecordRow, NewRecord, RecordRow, RecordsTable, RowsSql,
    Store, StoredRecord, TransitionStore, claimed_or_taken, existing_or_left, live_record,
    migrations, padded, sealed,
};
use crate::classify::{is_savepoint_gone, sqlite_unique_detail_matches};
use crate::clock::{Clock, SharedClock};
use crate::key::Key;
use crate::transition::{
    StateKey, Transition, TransitionOutcome, TransitionSql, transition_statements,
};

/// The transaction an `#[idempotent(store = "sqlite")]` handler's body receives.
pub type SqliteTx<'c> = Transaction<'c, Sqlite>;

/// How long a writer waits for another writer's transaction before failing with `SQLITE_BUSY`
/// (which is then retryable).
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Dedup records and handler transactions in a SQLite database file.
///
/// ```no_run
/// # async fn demo() -> Result<(), sqlx::Error> {
/// use idem_runtime::SqliteStore;
///
/// let store = SqliteStore::open("orders.db").await?; // WAL, busy timeout, created if missing
/// store.migrate().await?;
/// # Ok(()) }
/// ```
///
/// The records live in `idem_records` unless [`with_records_table`](Self::with_records_table)
/// names another table.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    clock: SharedClock,
    sql: Arc<RecordsSql>,
}

/// How hard SQLite works to keep a committed transaction across a power loss
/// (`PRAGMA synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Synchronous {
    /// `FULL`, the default: a committed transaction survives a power loss or an OS crash.
    #[default]
    Full,
    /// `NORMAL`: survives a process crash, but the last transactions may be lost on power loss,
    /// after their messages were acknowledged. Faster; choose it knowingly.
    Normal,
}

// The statements on the records table, written for the default one; `RecordsSql::new` rewrites
// them for another.
const INSERT: &str = "INSERT INTO idem_records \
    (scope, record_key, fingerprint, response, created_at_ms, expires_at_ms) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (scope, record_key) DO NOTHING";
const SELECT: &str = "SELECT fingerprint, response, created_at_ms, expires_at_ms \
    FROM idem_records WHERE scope = ?1 AND record_key = ?2";
/// The most keys one statement of a batch's gate writes (see [`Store::claim_batch`]): SQLite
/// binds at most 32,766 parameters a statement (`SQLITE_MAX_VARIABLE_NUMBER`: the bundled
/// library's, and the default of every SQLite since 3.32; `RETURNING` needs 3.35), six a key.
/// A larger batch takes one insert (and at most one read) per chunk of this many keys, chunk
/// after chunk in key order, in the same transaction.
///
/// A statement's rows are padded to the next power of two (repeating its last key, which it
/// then skips), so that batches of every size share a dozen statement texts in the cache of
/// prepared statements sqlx keeps per connection.
pub const CLAIM_BATCH_ROWS: usize = 32_766 / 6;
/// A batch's gate: one row a key, in the batch's sorted order; returns the keys it wrote.
/// Binds, a key after the other: scope, key, fingerprint, response, creation, expiry.
const INSERT_BATCH: [&str; 3] = [
    "INSERT INTO idem_records \
    (scope, record_key, fingerprint, response, created_at_ms, expires_at_ms) VALUES ",
    "(?, ?, ?, ?, ?, ?)",
    " ON CONFLICT (scope, record_key) DO NOTHING RETURNING scope, record_key",
];
/// The records of the keys a batch's insert found taken. A join on the key list rather than
/// `(scope, record_key) IN (VALUES …)`, which SQLite answers with a scan of the whole table.
/// Binds, a key after the other: scope, key.
const SELECT_BATCH: [&str; 3] = [
    "SELECT r.scope, r.record_key, r.fingerprint, r.response, r.created_at_ms, \
    r.expires_at_ms FROM (VALUES ",
    "(?, ?)",
    ") AS v JOIN idem_records AS r ON r.scope = v.column1 AND r.record_key = v.column2",
];
const TAKE_OVER_EXPIRED: &str = "UPDATE idem_records \
    SET fingerprint = ?3, response = ?4, created_at_ms = ?5, expires_at_ms = ?6 \
    WHERE scope = ?1 AND record_key = ?2 AND expires_at_ms IS NOT NULL AND expires_at_ms <= ?5";
const SAVE_RESPONSE: &str =
    "UPDATE idem_records SET response = ?3 WHERE scope = ?1 AND record_key = ?2";
const FORGET: &str = "DELETE FROM idem_records WHERE scope = ?1 AND record_key = ?2";
/// One batch of expired records, by the expiry index. Binds: now, the scope (`NULL`: every
/// scope), the limit.
const PURGE_EXPIRED_BATCH: &str = "DELETE FROM idem_records WHERE (scope, record_key) IN (\
    SELECT scope, record_key FROM idem_records \
    WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= ?1 AND (?2 IS NULL OR scope = ?2) \
    LIMIT ?3)";
// A purge by age walks the primary key in windows of a batch's size: find the window's last key,
// then delete the old records in that range.
/// Binds: after scope, after key, limit - 1.
const AGED_WINDOW_END: &str = "SELECT scope, record_key FROM idem_records \
    WHERE (scope, record_key) > (?1, ?2) ORDER BY scope, record_key LIMIT 1 OFFSET ?3";
/// Binds: after scope, after key, last scope, last key, cutoff.
const DELETE_AGED_WINDOW: &str = "DELETE FROM idem_records \
    WHERE (scope, record_key) > (?1, ?2) AND (scope, record_key) <= (?3, ?4) \
    AND created_at_ms < ?5";
/// The last window, shorter than a batch. Binds: after scope, after key, cutoff.
const DELETE_AGED_TAIL: &str = "DELETE FROM idem_records \
    WHERE (scope, record_key) > (?1, ?2) AND created_at_ms < ?3";
/// The same within one scope. Binds: scope, after key, limit - 1.
const AGED_WINDOW_END_IN_SCOPE: &str = "SELECT scope, record_key FROM idem_records \
    WHERE scope = ?1 AND record_key > ?2 ORDER BY record_key LIMIT 1 OFFSET ?3";
/// Binds: scope, after key, last key, cutoff.
const DELETE_AGED_WINDOW_IN_SCOPE: &str = "DELETE FROM idem_records \
    WHERE scope = ?1 AND record_key > ?2 AND record_key <= ?3 AND created_at_ms < ?4";
/// Binds: scope, after key, cutoff.
const DELETE_AGED_TAIL_IN_SCOPE: &str = "DELETE FROM idem_records \
    WHERE scope = ?1 AND record_key > ?2 AND created_at_ms < ?3";
/// Binds: now.
const STATS: &str = "SELECT scope, count(*), \
    count(CASE WHEN expires_at_ms IS NOT NULL AND expires_at_ms <= ?1 THEN 1 END), \
    min(created_at_ms), max(created_at_ms) FROM idem_records GROUP BY scope ORDER BY scope";
/// The table and its expiry index, from the `dbstat` virtual table (when compiled in). Binds:
/// the schema (`main` unless attached), the table's name, the index's name.
const TABLE_BYTES: &str = "SELECT sum(pgsize) FROM dbstat(?1) WHERE name IN (?2, ?3)";

/// The statements a store runs on its records table, built once, when the table is set.
#[derive(Debug)]
struct RecordsSql {
    table: RecordsTable,
    migration: SqlStr,
    insert: SqlStr,
    insert_batch: RowsSql,
    select: SqlStr,
    select_batch: RowsSql,
    take_over_expired: SqlStr,
    save_response: SqlStr,
    forget: SqlStr,
    purge_expired_batch: SqlStr,
    aged: AgedSql,
    stats: SqlStr,
}

impl RecordsSql {
    fn new(table: RecordsTable) -> Self {
        let sql = |statement| table.rewrite(statement, Dialect::Sqlite);
        Self {
            migration: sql(migrations::SQLITE),
            insert: sql(INSERT),
            insert_batch: RowsSql::new(&table, Dialect::Sqlite, INSERT_BATCH),
            select: sql(SELECT),
            select_batch: RowsSql::new(&table, Dialect::Sqlite, SELECT_BATCH),
            take_over_expired: sql(TAKE_OVER_EXPIRED),
            save_response: sql(SAVE_RESPONSE),
            forget: sql(FORGET),
            purge_expired_batch: sql(PURGE_EXPIRED_BATCH),
            aged: AgedSql::new(
                sql,
                [
                    AGED_WINDOW_END,
                    DELETE_AGED_WINDOW,
                    DELETE_AGED_TAIL,
                    AGED_WINDOW_END_IN_SCOPE,
                    DELETE_AGED_WINDOW_IN_SCOPE,
                    DELETE_AGED_TAIL_IN_SCOPE,
                ],
            ),
            stats: sql(STATS),
            table,
        }
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the database file at `path` with the settings this store
    /// relies on: WAL journal, `synchronous = FULL` (a committed, acked message survives a
    /// power loss), foreign keys on, and a [`BUSY_TIMEOUT`] for waiting writers.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, sqlx::Error> {
        Self::open_with(path, Synchronous::Full).await
    }

    /// Like [`open`](Self::open), with the durability `synchronous` (see [`Synchronous`]).
    pub async fn open_with(
        path: impl AsRef<Path>,
        synchronous: Synchronous,
    ) -> Result<Self, sqlx::Error> {
        let options = SqliteConnectOptions::new().filename(path);
        Self::with_options(options, synchronous).await
    }

    /// Like [`open`](Self::open), from a `sqlite:` URL.
    pub async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        Self::with_options(SqliteConnectOptions::from_str(url)?, Synchronous::Full).await
    }

    async fn with_options(
        options: SqliteConnectOptions,
        synchronous: Synchronous,
    ) -> Result<Self, sqlx::Error> {
        let synchronous = match synchronous {
            Synchronous::Full => SqliteSynchronous::Full,
            Synchronous::Normal => SqliteSynchronous::Normal,
        };
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        Ok(Self::new(pool))
    }

    /// Uses an existing pool. Configure it as [`open`](Self::open) does (WAL, a busy timeout,
    /// `synchronous = FULL`), or concurrent deliveries fail with `SQLITE_BUSY` instead of
    /// waiting, and acked messages may be lost on power loss.
    pub fn new(pool: SqlitePool) -> Self {
        Self {
            pool,
            clock: crate::clock::system(),
            sql: Arc::new(RecordsSql::new(RecordsTable::default())),
        }
    }

    /// Reads the time from `clock` instead of the system's (for tests of expiry).
    #[must_use]
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Keeps the records in `table` instead of `idem_records` (every statement on the table is
    /// built here, once). A schema is an attached database (`main`, or one every connection of
    /// the pool attaches); [`migrate`](Self::migrate) creates the table in it.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use idem_runtime::SqliteStore;
    /// use idem_runtime::store::RecordsTable;
    ///
    /// let store = SqliteStore::open("orders.db")
    ///     .await?
    ///     .with_records_table(RecordsTable::new("dedup")?);
    /// store.migrate().await?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn with_records_table(mut self, table: RecordsTable) -> Self {
        self.sql = Arc::new(RecordsSql::new(table));
        self
    }

    /// The table that holds the records.
    pub fn records_table(&self) -> &RecordsTable {
        &self.sql.table
    }

    /// The pool, for the rest of your queries.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Creates the records table and its expiry index if missing: runs [`migrations::SQLITE`]
    /// (for another table, [`migrations::sqlite`]) in one transaction. Safe to run any number
    /// of times.
    pub async fn migrate(&self) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::raw_sql(self.sql.migration.clone())
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    /// Deletes records that expired before now, in batches of
    /// [`DEFAULT_BATCH_SIZE`](crate::retention::DEFAULT_BATCH_SIZE), each committed on its
    /// own; returns how many. For a scope, an age, another batch size, or progress, see
    /// [`retention::purge`](crate::retention::purge); to purge in the background,
    /// [`Purger`](crate::retention::Purger).
    pub async fn purge_expired(&self) -> Result<u64, sqlx::Error> {
        crate::retention::purge_expired(self).await
    }

    async fn read(
        &self,
        conn: &mut sqlx::SqliteConnection,
        key: &Key,
    ) -> Result<Option<RecordRow>, sqlx::Error> {
        sqlx::query_as::<_, RecordRow>(self.sql.select.clone())
            .bind(key.scope())
            .bind(key.value())
            .fetch_optional(conn)
            .await
    }
}

impl sealed::Sealed for SqliteStore {}

impl Store for SqliteStore {
    type Tx = SqliteTx<'static>;
    const NAME: &'static str = "sqlite";

    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    async fn begin(&self) -> Result<Self::Tx, sqlx::Error> {
        self.pool
            .begin_with("BEGIN IMMEDIATE; SAVEPOINT idem_open")
            .await
    }

    async fn commit(&self, mut tx: Self::Tx) -> Result<(), CommitFailure> {
        // Not `tx.commit()`: when SQLite already ended the transaction, that `COMMIT` fails,
        // the `ROLLBACK` sqlx then sends fails too, and the connection goes back to the pool
        // believing it is still in a transaction, so that every later `begin` on it fails.
        // The trailing `BEGIN` (deferred: no lock) gives the `Transaction` one to roll back.
        match sqlx::raw_sql("RELEASE idem_open; COMMIT; BEGIN")
            .execute(&mut *tx)
            .await
        {
            Ok(_) => Ok(()),
            Err(error) => {
                let _ = Self::rollback(tx).await;
                if is_savepoint_gone(&error) {
                    Err(CommitFailure::Aborted)
                } else {
                    Err(CommitFailure::Database(error))
                }
            }
        }
    }

    async fn ensure_open(&self, tx: &mut Self::Tx) -> Result<(), CommitFailure> {
        match sqlx::raw_sql("RELEASE idem_open; SAVEPOINT idem_open")
            .execute(&mut **tx)
            .await
        {
            Ok(_) => Ok(()),
            Err(error) if is_savepoint_gone(&error) => Err(CommitFailure::Aborted),
            Err(error) => Err(CommitFailure::Database(error)),
        }
    }

    async fn rollback(mut tx: Self::Tx) -> Result<(), sqlx::Error> {
        // When SQLite already ended the transaction (a statement the body ran rolled it back),
        // sqlx's `ROLLBACK` fails and its `Transaction` goes back to the pool believing it is
        // still open: every later `begin` on that connection would fail. Opening one first
        // (which fails harmlessly when one is open) keeps the two in step.
        let _ = sqlx::raw_sql("BEGIN").execute(&mut *tx).await;
        tx.rollback().await
    }

    async fn savepoint(&self, tx: &mut Self::Tx, name: &str) -> Result<(), CommitFailure> {
        // `BEGIN` succeeds only outside a transaction: then the caller's had ended (a
        // savepoint there would open a new one, and its release would commit).
        if sqlx::raw_sql("BEGIN").execute(&mut **tx).await.is_ok() {
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut **tx).await;
            return Err(CommitFailure::Aborted);
        }
        sqlx::raw_sql(super::savepoint_sql("SAVEPOINT {name}", name))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    super::sql_savepoint_endings!();

    async fn claim(&self, tx: &mut Self::Tx, record: &NewRecord<'_>) -> Result<Claim, sqlx::Error> {
        let bind = |sql: &SqlStr| {
            sqlx::query(sql.clone())
                .bind(record.key.scope())
                .bind(record.key.value())
                .bind(record.fingerprint)
                .bind(record.response)
                .bind(record.now_ms)
                .bind(record.expires_at_ms)
        };
        if bind(&self.sql.insert)
            .execute(&mut **tx)
            .await?
            .rows_affected()
            == 1
        {
            return Ok(Claim::Claimed);
        }
        // We hold the write lock (BEGIN IMMEDIATE): nothing changes between these statements.
        if let Some(existing) = live_record(self.read(tx, record.key).await?, record.now_ms) {
            return Ok(Claim::Existing(existing));
        }
        bind(&self.sql.take_over_expired).execute(&mut **tx).await?;
        Ok(Claim::Claimed)
    }

    /// One `INSERT … ON CONFLICT DO NOTHING RETURNING` for the batch's keys (one per
    /// [`CLAIM_BATCH_ROWS`] keys), one read of the keys it found taken, and the one-key claim
    /// for those found expired. The transaction holds the write lock (`BEGIN IMMEDIATE`):
    /// nothing changes between these statements.
    async fn claim_batch(
        &self,
        tx: &mut Self::Tx,
        records: &[NewRecord<'_>],
    ) -> Result<Vec<Claim>, sqlx::Error> {
        let plan = BatchPlan::of(records);
        let mut claims = Vec::with_capacity(plan.unique.len());
        for chunk in plan.unique.chunks(CLAIM_BATCH_ROWS) {
            let bound = padded(chunk, CLAIM_BATCH_ROWS);
            let mut insert =
                sqlx::query_as::<_, (String, String)>(self.sql.insert_batch.for_rows(bound.len()));
            for record in bound.iter().map(|&index| &records[index]) {
                insert = insert
                    .bind(record.key.scope())
                    .bind(record.key.value())
                    .bind(record.fingerprint)
                    .bind(record.response)
                    .bind(record.now_ms)
                    .bind(record.expires_at_ms);
            }
            let inserted = insert.fetch_all(&mut **tx).await?;
            let taken = claimed_or_taken(records, chunk, inserted, &mut claims);
            if taken.is_empty() {
                continue;
            }
            let bound = padded(&taken, CLAIM_BATCH_ROWS);
            let mut select =
                sqlx::query_as::<_, KeyedRecordRow>(self.sql.select_batch.for_rows(bound.len()));
            for record in bound.iter().map(|&index| &records[index]) {
                select = select.bind(record.key.scope()).bind(record.key.value());
            }
            let rows = select.fetch_all(&mut **tx).await?;
            for index in existing_or_left(records, taken, rows, &mut claims) {
                // Expired: taken over, still in key order.
                claims.push((index, self.claim(tx, &records[index]).await?));
            }
        }
        Ok(plan.spread(records, claims))
    }

    async fn save_response(
        &self,
        tx: &mut Self::Tx,
        key: &Key,
        response: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(self.sql.save_response.clone())
            .bind(key.scope())
            .bind(key.value())
            .bind(response)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn find_record(
        &self,
        key: &Key,
        now_ms: i64,
    ) -> Result<Option<StoredRecord>, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        Ok(live_record(self.read(&mut conn, key).await?, now_ms))
    }

    async fn forget(&self, scope: &str, key: &str) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(self.sql.forget.clone())
            .bind(scope)
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// SQLite reports no constraint names; `constraint` is matched against its message (see
    /// `idempotent`'s `constraint` docs): `"payments.order_id"` or an index name.
    fn is_unique_violation(
        &self,
        error: &dyn sqlx::error::DatabaseError,
        constraint: &str,
    ) -> bool {
        error.kind() == sqlx::error::ErrorKind::UniqueViolation
            && sqlite_unique_detail_matches(error.message(), constraint)
    }
}

impl Records for SqliteStore {
    async fn purge_expired_batch(
        &self,
        now_ms: i64,
        scope: Option<&str>,
        limit: u32,
    ) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(self.sql.purge_expired_batch.clone())
            .bind(now_ms)
            .bind(scope)
            .bind(i64::from(limit))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    super::records::row_value_aged_batch!();

    async fn stats(&self) -> Result<RecordStats, sqlx::Error> {
        let now_ms = self.clock.now_ms();
        let mut conn = self.pool.acquire().await?;
        let scopes = super::records::scope_stats!(self.sql.stats.clone(), now_ms, &mut *conn);
        let table = &self.sql.table;
        // Without `dbstat` compiled in, the size is unknown, not an error.
        let bytes: Option<i64> = sqlx::query_scalar(TABLE_BYTES)
            .bind(table.schema().unwrap_or("main"))
            .bind(table.name())
            .bind(table.expiry_index_name())
            .fetch_one(&mut *conn)
            .await
            .unwrap_or(None);
        Ok(RecordStats {
            scopes,
            table_bytes: bytes.and_then(|bytes| u64::try_from(bytes).ok()),
            now_ms,
        })
    }

    super::records::sql_records_reads!();
}

impl TransitionStore for SqliteStore {
    fn transition_sql(transition: &Transition) -> TransitionSql {
        transition_statements(transition, '"', |n| format!("?{n}"))
    }

    async fn transition(
        &self,
        tx: &mut Self::Tx,
        statements: &TransitionSql,
        transition: &Transition,
        key: &StateKey,
    ) -> Result<TransitionOutcome, sqlx::Error> {
        super::run_transition!(&mut **tx, statements, transition, key, uuid = text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_statement_binds_every_value() {
        let table = RecordsTable::parse("main.Order").expect("a valid name");
        let sql = RecordsSql::new(table);
        assert_eq!(
            sql.insert_batch.for_rows(2).0,
            "INSERT INTO \"main\".\"Order\" \
            (scope, record_key, fingerprint, response, created_at_ms, expires_at_ms) \
            VALUES (?, ?, ?, ?, ?, ?), (?, ?, ?, ?, ?, ?) \
            ON CONFLICT (scope, record_key) DO NOTHING RETURNING scope, record_key"
        );
        assert_eq!(
            sql.select_batch.for_rows(1).0,
            "SELECT r.scope, r.record_key, r.fingerprint, r.response, r.created_at_ms, \
            r.expires_at_ms FROM (VALUES (?, ?)) AS v JOIN \"main\".\"Order\" AS r \
            ON r.scope = v.column1 AND r.record_key = v.column2"
        );
    }
}
