//! MySQL and MariaDB (`store = "mysql"`, feature `mysql`). Tested on MariaDB 10.11; written for
//! MySQL 8 too (which has no `RETURNING`: see batches below).
//!
//! What happens to a duplicate here: the gate is a plain `INSERT` into `idem_records`. A live
//! record makes it fail with error 1062 on the table's primary key, which the store reads as
//! "exists" — only that error on that key: `INSERT IGNORE` would also turn truncation and
//! other errors into warnings, and `ON DUPLICATE KEY UPDATE` cannot tell an insert from a
//! no-op duplicate when the client sets `CLIENT_FOUND_ROWS` (sqlx does: both report 1 row).
//! In MySQL a failed statement does not abort the transaction, so the gate goes on with one
//! read. A twin in flight makes the `INSERT` wait on InnoDB's lock on the uncommitted row, then
//! fail with 1062 (the twin committed) or succeed (it rolled back). Deadlocks (1213) and lock
//! wait time-outs (1205) are retryable.
//!
//! A batch's gate ([`Store::claim_batch`]) depends on the server, asked once (`SELECT
//! VERSION()`, by [`migrate`](MySqlStore::migrate) or the first batch) and remembered by the
//! store and its clones. On MariaDB 10.5 and later, which has `INSERT … RETURNING`, it is one
//! multi-row `INSERT IGNORE … RETURNING scope, record_key` for the batch's keys (one per
//! [`CLAIM_BATCH_ROWS`] keys), in key order, which returns the keys it wrote, then one read of
//! the keys it found taken; a key found expired, or deleted since, takes the one-key path. A
//! twin in flight makes that insert wait on its row as the plain `INSERT` does (a duplicate
//! takes the same lock with or without `IGNORE`), then skip the key (the twin committed) or
//! write it (it rolled back). `IGNORE` turns the duplicates into warnings, and would do the same
//! to a truncated value or a `NULL` in a `NOT NULL` column; neither can happen in the table the
//! shipped migrations create: a scope and a key are at most 200 and 500 *bytes*
//! ([`MAX_SCOPE_BYTES`](crate::key::MAX_SCOPE_BYTES), [`MAX_KEY_BYTES`](crate::key::MAX_KEY_BYTES)),
//! so at most as many characters as `VARCHAR(200)` and `VARCHAR(500)` hold, any of them in
//! `utf8mb4`; the times are `BIGINT`s and never `NULL`; and a batch that carries a fingerprint
//! longer than `CHAR(64)` or a response longer than `MEDIUMTEXT` is claimed key by key, where
//! the plain `INSERT` fails on it (in strict mode, the servers' default; without it, the plain
//! `INSERT` truncates too). A records table altered to narrower columns or another character
//! set loses this. On MySQL, and MariaDB before 10.5, a batch is claimed key by key
//! with the one-key gate, in key order, in the same transaction.
//!
//! Two twins that find the same *expired* record both hold a shared lock on it from their
//! failed `INSERT`, and both then need an exclusive one to take it over: InnoDB resolves that
//! deadlock by rolling one back (1213). That one is requeued, and its redelivery finds the
//! record renewed: a duplicate. At most one of them runs its body to commit.
//!
//! A deadlock rolls back the *whole* transaction, and MySQL runs the statements that follow in
//! autocommit mode. A body that ignores that error therefore goes on outside any transaction:
//! its later writes are committed one by one, and the dedup record is gone. Every handler
//! transaction therefore starts with `BEGIN; SAVEPOINT idem_open` (one round trip), and the
//! commit is `RELEASE SAVEPOINT idem_open; COMMIT; BEGIN` (one round trip): when the
//! transaction is gone, so is the savepoint, the release fails (1305) and the store reports
//! [`CommitFailure::Aborted`], so the message is requeued rather than acked. A write the
//! runtime makes after the body (the dedup record of `unique_constraint` with `replay` or
//! `fingerprint`, a replayed result) is preceded by the same check, so it never commits on
//! its own. The writes the *body* made after the ignored error are already committed: never
//! ignore a database error in a handler's body. (An ignored error that does *not* end the
//! transaction, such as a duplicate key, is not caught: that statement had no effect and the
//! rest commits.) The check needs no privilege and works the same on MariaDB and MySQL.

use sqlx::mysql::{MySql, MySqlDatabaseError, MySqlPool, MySqlPoolOptions};
use sqlx::{SqlStr, Transaction};

use std::sync::{Arc, OnceLock};

use super::records::{AgedBatch, AgedSql, RecordStats, Records};
use super::table::Dialect;
use super::{
    BatchPlan, CLAIM_ATTEMPTS, Claim, CommitFailure, KeyedRecordRow, NewRecord, RecordRow,
    RecordsTable, RowsSql, Store, StoredRecord, TransitionStore, claimed_or_taken,
    existing_or_left, live_record, migrations, padded, record_kept_vanishing, sealed,
};
use crate::classify::{MYSQL_DUPLICATE_ENTRY, is_savepoint_gone, mysql_duplicate_key_name};
use crate::clock::{Clock, SharedClock};
use crate::key::Key;
use crate::transition::{
    StateKey, Transition, TransitionOutcome, TransitionSql, transition_statements,
};

/// The transaction an `#[idempotent(store = "mysql")]` handler's body receives.
pub type MySqlTx<'c> = Transaction<'c, MySql>;

/// Dedup records and handler transactions on MySQL or MariaDB, through a sqlx pool.
///
/// ```no_run
/// # async fn demo() -> Result<(), sqlx::Error> {
/// use idem_runtime::MySqlStore;
///
/// let store = MySqlStore::connect("mysql://root@127.0.0.1:3306/test").await?;
/// store.migrate().await?; // creates idem_records if missing; safe to run twice
/// # Ok(()) }
/// ```
///
/// The records live in `idem_records` unless [`with_records_table`](Self::with_records_table)
/// names another table.
#[derive(Debug, Clone)]
pub struct MySqlStore {
    pool: MySqlPool,
    clock: SharedClock,
    sql: Arc<RecordsSql>,
    /// Whether the server takes `INSERT … RETURNING` (MariaDB 10.5+): asked once, shared by
    /// the clones.
    returning: Arc<OnceLock<bool>>,
}

/// `BEGIN`, then the savepoint whose presence proves the transaction is still open.
const BEGIN: &str = "BEGIN; SAVEPOINT idem_open";
/// The commit, after a check that fails (1305) when the savepoint, and so the transaction, is
/// gone; the trailing `BEGIN` gives sqlx's `Transaction` one to roll back.
const CHECKED_COMMIT: &str = "RELEASE SAVEPOINT idem_open; COMMIT; BEGIN";
/// The same check before a write after the body, re-arming the savepoint.
const ENSURE_OPEN: &str = "RELEASE SAVEPOINT idem_open; SAVEPOINT idem_open";

// The table is created by `migrations::MYSQL` (MySQL 8) or `migrations::MARIADB`: keys compare
// byte for byte (a binary NO PAD collation, named differently on each server). The statements
// on the records table are written for the default one; `RecordsSql::new` rewrites them for
// another.
/// The key column's collation; binds: the table's schema (`NULL`: the current database), its
/// name.
const KEY_COLLATION: &str = "SELECT COLLATION_NAME FROM information_schema.COLUMNS \
    WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ? AND COLUMN_NAME = 'record_key'";
const CONVERT_TABLE: &str =
    "ALTER TABLE idem_records CONVERT TO CHARACTER SET utf8mb4 COLLATE {collation}";
const MARIADB_COLLATION: &str = "utf8mb4_nopad_bin";
const MYSQL_COLLATION: &str = "utf8mb4_0900_bin";
const INSERT: &str = "INSERT INTO idem_records \
    (scope, record_key, fingerprint, response, created_at_ms, expires_at_ms) \
    VALUES (?, ?, ?, ?, ?, ?)";
const SELECT: &str = "SELECT fingerprint, response, created_at_ms, expires_at_ms \
    FROM idem_records WHERE scope = ? AND record_key = ?";
/// The most keys one statement of a batch's gate writes, on MariaDB (see the
/// [module docs](self)): six placeholders a key, far from the 65,535 a prepared statement may
/// hold, and with keys at their longest under 1 MiB of values, far from the default
/// `max_allowed_packet` (16 MiB). A larger batch takes one insert (and at most one read) per
/// chunk of this many keys, chunk after chunk in key order, in the same transaction.
///
/// A statement's rows are padded to the next power of two (repeating its last key, which it
/// then skips), so that batches of every size share a dozen statement texts in the cache of
/// prepared statements sqlx keeps per connection.
pub const CLAIM_BATCH_ROWS: usize = 1_000;
/// A batch's gate on MariaDB: one row a key, in the batch's sorted order; returns the keys it
/// wrote (a duplicate is skipped, after waiting for a twin in flight). Binds, a key after the
/// other: scope, key, fingerprint, response, creation, expiry.
const INSERT_BATCH: [&str; 3] = [
    "INSERT IGNORE INTO idem_records \
    (scope, record_key, fingerprint, response, created_at_ms, expires_at_ms) VALUES ",
    "(?, ?, ?, ?, ?, ?)",
    " RETURNING scope, record_key",
];
/// The records of the keys a batch's insert found taken (a range read of the primary key).
/// Binds, a key after the other: scope, key.
const SELECT_BATCH: [&str; 3] = [
    "SELECT scope, record_key, fingerprint, response, created_at_ms, expires_at_ms \
    FROM idem_records WHERE (scope, record_key) IN (",
    "(?, ?)",
    ")",
];
/// The widest fingerprint (characters) and response (bytes) the shipped table holds:
/// `CHAR(64)`, `MEDIUMTEXT`. `INSERT IGNORE` would truncate a wider one without an error.
const FINGERPRINT_CHARS: usize = 64;
const RESPONSE_BYTES: usize = (1 << 24) - 1;
// Scope and key fit `VARCHAR(200)` and `VARCHAR(500)` (characters) whatever they hold, so that
// `INSERT IGNORE` never truncates them.
const _: () = assert!(
    crate::key::MAX_SCOPE_BYTES <= 200 && crate::key::MAX_KEY_BYTES <= 500,
    "a key must fit the records table's columns"
);
const TAKE_OVER_EXPIRED: &str = "UPDATE idem_records \
    SET fingerprint = ?, response = ?, created_at_ms = ?, expires_at_ms = ? \
    WHERE scope = ? AND record_key = ? AND expires_at_ms IS NOT NULL AND expires_at_ms <= ?";
const SAVE_RESPONSE: &str =
    "UPDATE idem_records SET response = ? WHERE scope = ? AND record_key = ?";
const FORGET: &str = "DELETE FROM idem_records WHERE scope = ? AND record_key = ?";
/// One batch of expired records, by the expiry index. Binds: now, the scope twice (`NULL`:
/// every scope), the limit.
const PURGE_EXPIRED_BATCH: &str = "DELETE FROM idem_records \
    WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= ? AND (? IS NULL OR scope = ?) LIMIT ?";
// A purge by age walks the primary key in windows of a batch's size: find the window's last key,
// then delete the old records in that range (InnoDB locks what it scans: at most one window).
// Row comparisons are spelled out, so that the range optimizer reads them as index ranges.
/// Binds: after scope, after scope, after key, limit - 1.
const AGED_WINDOW_END: &str = "SELECT scope, record_key FROM idem_records \
    WHERE (scope > ? OR (scope = ? AND record_key > ?)) \
    ORDER BY scope, record_key LIMIT 1 OFFSET ?";
/// Binds: after scope, after scope, after key, last scope, last scope, last key, cutoff.
const DELETE_AGED_WINDOW: &str = "DELETE FROM idem_records \
    WHERE (scope > ? OR (scope = ? AND record_key > ?)) \
    AND (scope < ? OR (scope = ? AND record_key <= ?)) AND created_at_ms < ?";
/// The last window, shorter than a batch. Binds: after scope, after scope, after key, cutoff.
const DELETE_AGED_TAIL: &str = "DELETE FROM idem_records \
    WHERE (scope > ? OR (scope = ? AND record_key > ?)) AND created_at_ms < ?";
/// The same within one scope. Binds: scope, after key, limit - 1.
const AGED_WINDOW_END_IN_SCOPE: &str = "SELECT scope, record_key FROM idem_records \
    WHERE scope = ? AND record_key > ? ORDER BY record_key LIMIT 1 OFFSET ?";
/// Binds: scope, after key, last key, cutoff.
const DELETE_AGED_WINDOW_IN_SCOPE: &str = "DELETE FROM idem_records \
    WHERE scope = ? AND record_key > ? AND record_key <= ? AND created_at_ms < ?";
/// Binds: scope, after key, cutoff.
const DELETE_AGED_TAIL_IN_SCOPE: &str = "DELETE FROM idem_records \
    WHERE scope = ? AND record_key > ? AND created_at_ms < ?";
/// Binds: now.
const STATS: &str = "SELECT scope, COUNT(*), \
    CAST(COALESCE(SUM(expires_at_ms IS NOT NULL AND expires_at_ms <= ?), 0) AS SIGNED), \
    MIN(created_at_ms), MAX(created_at_ms) FROM idem_records GROUP BY scope ORDER BY scope";
/// InnoDB's estimate of the table and its indexes. Binds: the schema (`NULL`: the current
/// database), the table's name.
const TABLE_BYTES: &str = "SELECT CAST(DATA_LENGTH + INDEX_LENGTH AS SIGNED) \
    FROM information_schema.TABLES WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?";

/// The statements a store runs on its records table, built once, when the table is set.
#[derive(Debug)]
struct RecordsSql {
    table: RecordsTable,
    create_mysql: SqlStr,
    create_mariadb: SqlStr,
    convert: String,
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
        let sql = |statement| table.rewrite(statement, Dialect::MySql);
        Self {
            create_mysql: sql(migrations::MYSQL),
            create_mariadb: sql(migrations::MARIADB),
            convert: table.rewrite_text(CONVERT_TABLE, Dialect::MySql),
            insert: sql(INSERT),
            insert_batch: RowsSql::new(&table, Dialect::MySql, INSERT_BATCH),
            select: sql(SELECT),
            select_batch: RowsSql::new(&table, Dialect::MySql, SELECT_BATCH),
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

impl MySqlStore {
    /// Uses an existing pool: the store shares your service's connections and transactions.
    pub fn new(pool: MySqlPool) -> Self {
        Self {
            pool,
            clock: crate::clock::system(),
            sql: Arc::new(RecordsSql::new(RecordsTable::default())),
            returning: Arc::new(OnceLock::new()),
        }
    }

    /// Keeps the records in `table` instead of `idem_records` (every statement on the table is
    /// built here, once). A schema is a MySQL database, which must exist;
    /// [`migrate`](Self::migrate) creates the table in it.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::MySqlPool) -> Result<(), Box<dyn std::error::Error>> {
    /// use idem_runtime::MySqlStore;
    /// use idem_runtime::store::RecordsTable;
    ///
    /// let store = MySqlStore::new(pool).with_records_table(RecordsTable::parse("billing.dedup")?);
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

    /// Reads the time from `clock` instead of the system's (for tests of expiry).
    #[must_use]
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Connects a new pool to `url`.
    pub async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        Ok(Self::new(MySqlPoolOptions::new().connect(url).await?))
    }

    /// The pool, for the rest of your queries.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Creates the records table, with its expiry index, if missing: runs
    /// [`migrations::MARIADB`] on MariaDB and [`migrations::MYSQL`] on MySQL (for another
    /// table, [`migrations::mariadb`] and [`migrations::mysql`]). Safe to run any number of
    /// times. (MySQL commits DDL implicitly, so there is no transaction to hold a lock in;
    /// `IF NOT EXISTS` makes concurrent runs harmless.)
    ///
    /// A table created by idem 0.1 before 2026-11-23 compared keys with a PAD SPACE collation
    /// (trailing spaces ignored); `migrate` converts it to the NO PAD one. That is a table
    /// rebuild (`ALTER TABLE … CONVERT`), which blocks handlers' writes to `idem_records` while
    /// it runs: run it once, from one process, before deploying consumers (concurrent runs
    /// each rebuild the table). No record is lost: NO PAD only tells apart keys that PAD SPACE
    /// merged.
    pub async fn migrate(&self) -> Result<(), sqlx::Error> {
        let version: String = sqlx::query_scalar("SELECT VERSION()")
            .fetch_one(&self.pool)
            .await?;
        let _ = self.returning.set(inserts_returning(&version));
        let (create, collation) = if version.contains("MariaDB") {
            (&self.sql.create_mariadb, MARIADB_COLLATION)
        } else {
            (&self.sql.create_mysql, MYSQL_COLLATION)
        };
        sqlx::raw_sql(create.clone()).execute(&self.pool).await?;
        let current: Option<String> = sqlx::query_scalar(KEY_COLLATION)
            .bind(self.sql.table.schema())
            .bind(self.sql.table.name())
            .fetch_optional(&self.pool)
            .await?
            .flatten();
        if current.as_deref() != Some(collation) {
            // The collation is one of the two constants above, the table a validated name.
            let convert = self.sql.convert.replace("{collation}", collation);
            sqlx::query(sqlx::AssertSqlSafe(convert))
                .execute(&self.pool)
                .await?;
        }
        Ok(())
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
        conn: &mut sqlx::MySqlConnection,
        key: &Key,
    ) -> Result<Option<RecordRow>, sqlx::Error> {
        sqlx::query_as::<_, RecordRow>(self.sql.select.clone())
            .bind(key.scope())
            .bind(key.value())
            .fetch_optional(conn)
            .await
    }

    /// Whether the server takes `INSERT … RETURNING`; asked on `conn` the first time only.
    async fn server_inserts_returning(
        &self,
        conn: &mut sqlx::MySqlConnection,
    ) -> Result<bool, sqlx::Error> {
        if let Some(&known) = self.returning.get() {
            return Ok(known);
        }
        let version: String = sqlx::query_scalar("SELECT VERSION()")
            .fetch_one(conn)
            .await?;
        let known = inserts_returning(&version);
        // A clone that asked at the same time found the same.
        let _ = self.returning.set(known);
        Ok(known)
    }
}

/// Whether the server whose `VERSION()` is `version` takes `INSERT … RETURNING`: MariaDB from
/// 10.5 (`10.11.19-MariaDB-0+deb12u1`); MySQL has no `RETURNING`.
fn inserts_returning(version: &str) -> bool {
    if !version.contains("MariaDB") {
        return false;
    }
    // Older MariaDB announced itself as `5.5.5-10.x` in the handshake; skip that prefix.
    let version = version.strip_prefix("5.5.5-").unwrap_or(version);
    let mut numbers = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().ok());
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (10, 5),
        _ => false,
    }
}

/// Whether `INSERT IGNORE` writes `record` as a plain `INSERT` would: no value wider than its
/// column in the shipped table (scope and key always fit; see the [module docs](self)).
fn fits_columns(record: &NewRecord<'_>) -> bool {
    record
        .fingerprint
        .is_none_or(|fingerprint| fingerprint.chars().count() <= FINGERPRINT_CHARS)
        && record
            .response
            .is_none_or(|response| response.len() <= RESPONSE_BYTES)
}

/// Whether `error` is a duplicate entry on the records table's primary key (the only unique
/// key of that table, and no other table is written in the gate's statement).
fn is_record_conflict(error: &sqlx::Error) -> bool {
    let Some(db) = error.as_database_error() else {
        return false;
    };
    db.try_downcast_ref::<MySqlDatabaseError>()
        .is_some_and(|e| e.number() == MYSQL_DUPLICATE_ENTRY)
        && mysql_duplicate_key_name(db.message()) == Some("PRIMARY")
}

impl sealed::Sealed for MySqlStore {}

impl Store for MySqlStore {
    type Tx = MySqlTx<'static>;
    const NAME: &'static str = "mysql";

    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    async fn begin(&self) -> Result<Self::Tx, sqlx::Error> {
        self.pool.begin_with(BEGIN).await
    }

    async fn commit(&self, mut tx: Self::Tx) -> Result<(), CommitFailure> {
        match sqlx::raw_sql(CHECKED_COMMIT).execute(&mut *tx).await {
            // Committed; dropping `tx` rolls back the empty transaction `BEGIN` opened.
            Ok(_) => Ok(()),
            Err(error) => {
                // Outside a transaction `ROLLBACK` does nothing, so this is right either way.
                let _ = tx.rollback().await;
                if is_savepoint_gone(&error) {
                    Err(CommitFailure::Aborted)
                } else {
                    Err(CommitFailure::Database(error))
                }
            }
        }
    }

    async fn ensure_open(&self, tx: &mut Self::Tx) -> Result<(), CommitFailure> {
        match sqlx::raw_sql(ENSURE_OPEN).execute(&mut **tx).await {
            Ok(_) => Ok(()),
            Err(error) if is_savepoint_gone(&error) => Err(CommitFailure::Aborted),
            Err(error) => Err(CommitFailure::Database(error)),
        }
    }

    async fn rollback(tx: Self::Tx) -> Result<(), sqlx::Error> {
        tx.rollback().await
    }

    async fn savepoint(&self, tx: &mut Self::Tx, name: &str) -> Result<(), CommitFailure> {
        // In autocommit mode each statement is its own transaction: the savepoint is gone by
        // the release, which fails (1305): the caller's transaction had ended.
        sqlx::raw_sql(super::savepoint_sql(
            "SAVEPOINT {name}; RELEASE SAVEPOINT {name}; SAVEPOINT {name}",
            name,
        ))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    super::sql_savepoint_endings!();

    async fn claim(&self, tx: &mut Self::Tx, record: &NewRecord<'_>) -> Result<Claim, sqlx::Error> {
        for _ in 0..CLAIM_ATTEMPTS {
            let inserted = sqlx::query(self.sql.insert.clone())
                .bind(record.key.scope())
                .bind(record.key.value())
                .bind(record.fingerprint)
                .bind(record.response)
                .bind(record.now_ms)
                .bind(record.expires_at_ms)
                .execute(&mut **tx)
                .await;
            match inserted {
                Ok(_) => return Ok(Claim::Claimed),
                Err(error) if is_record_conflict(&error) => {}
                Err(error) => return Err(error),
            }
            let row = self.read(tx, record.key).await?;
            if row.is_none() {
                // Purged since the insert conflicted: the key is free again. Start over.
                continue;
            }
            if let Some(existing) = live_record(row, record.now_ms) {
                return Ok(Claim::Existing(existing));
            }
            // Expired: take it over. A racing twin that also saw the expired record holds a
            // shared lock on it from its failed INSERT, as we do: one of the two updates
            // deadlocks (1213, retryable) and that delivery is requeued (module docs).
            let taken = sqlx::query(self.sql.take_over_expired.clone())
                .bind(record.fingerprint)
                .bind(record.response)
                .bind(record.now_ms)
                .bind(record.expires_at_ms)
                .bind(record.key.scope())
                .bind(record.key.value())
                .bind(record.now_ms)
                .execute(&mut **tx)
                .await?;
            if taken.rows_affected() > 0 {
                return Ok(Claim::Claimed);
            }
            // A twin renewed it first (it is live now), or a purge deleted it (start over).
            if let Some(existing) = live_record(self.read(tx, record.key).await?, record.now_ms) {
                return Ok(Claim::Existing(existing));
            }
        }
        Err(record_kept_vanishing(record.key))
    }

    /// On MariaDB 10.5+, one `INSERT IGNORE … RETURNING` for the batch's keys (one per
    /// [`CLAIM_BATCH_ROWS`] keys), one read of the keys it found taken, and the one-key claim
    /// for those found expired or deleted since; elsewhere, or for a value `INSERT IGNORE`
    /// could truncate, the one-key claim for each key. In key order either way (module docs).
    async fn claim_batch(
        &self,
        tx: &mut Self::Tx,
        records: &[NewRecord<'_>],
    ) -> Result<Vec<Claim>, sqlx::Error> {
        let plan = BatchPlan::of(records);
        let mut claims = Vec::with_capacity(plan.unique.len());
        let one_statement = !plan.unique.is_empty()
            && self.server_inserts_returning(tx).await?
            && plan
                .unique
                .iter()
                .all(|&index| fits_columns(&records[index]));
        if !one_statement {
            for &index in &plan.unique {
                claims.push((index, self.claim(tx, &records[index]).await?));
            }
            return Ok(plan.spread(records, claims));
        }
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
                // Expired (to take over) or deleted since the insert: the one-key path handles
                // both, before the next chunk.
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
            .bind(response)
            .bind(key.scope())
            .bind(key.value())
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

    /// MySQL names the violated key in the message (`Duplicate entry 'x' for key 'name'`);
    /// `constraint` is that key's name (the `CONSTRAINT name UNIQUE (...)` or index name).
    fn is_unique_violation(
        &self,
        error: &dyn sqlx::error::DatabaseError,
        constraint: &str,
    ) -> bool {
        error.kind() == sqlx::error::ErrorKind::UniqueViolation
            && mysql_duplicate_key_name(error.message()) == Some(constraint)
    }
}

impl Records for MySqlStore {
    async fn purge_expired_batch(
        &self,
        now_ms: i64,
        scope: Option<&str>,
        limit: u32,
    ) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(self.sql.purge_expired_batch.clone())
            .bind(now_ms)
            .bind(scope)
            .bind(scope)
            .bind(limit)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn purge_created_before_batch(
        &self,
        cutoff_ms: i64,
        scope: Option<&str>,
        after: (&str, &str),
        limit: u32,
    ) -> Result<AgedBatch, sqlx::Error> {
        let sql = &self.sql.aged;
        let offset = limit.max(1) - 1;
        let window_end: Option<(String, String)> = match scope {
            None => sqlx::query_as(sql.window_end.clone())
                .bind(after.0)
                .bind(after.0),
            Some(scope) => sqlx::query_as(sql.window_end_in_scope.clone()).bind(scope),
        }
        .bind(after.1)
        .bind(offset)
        .fetch_optional(&self.pool)
        .await?;
        let delete = match (scope, &window_end) {
            (None, Some((last_scope, last_key))) => sqlx::query(sql.delete_window.clone())
                .bind(after.0)
                .bind(after.0)
                .bind(after.1)
                .bind(last_scope)
                .bind(last_scope)
                .bind(last_key),
            (Some(scope), Some((_, last_key))) => sqlx::query(sql.delete_window_in_scope.clone())
                .bind(scope)
                .bind(after.1)
                .bind(last_key),
            (None, None) => sqlx::query(sql.delete_tail.clone())
                .bind(after.0)
                .bind(after.0)
                .bind(after.1),
            (Some(scope), None) => sqlx::query(sql.delete_tail_in_scope.clone())
                .bind(scope)
                .bind(after.1),
        };
        let done = delete.bind(cutoff_ms).execute(&self.pool).await?;
        Ok(AgedBatch {
            deleted: done.rows_affected(),
            last: window_end,
        })
    }

    async fn stats(&self) -> Result<RecordStats, sqlx::Error> {
        let now_ms = self.clock.now_ms();
        let mut conn = self.pool.acquire().await?;
        let scopes = super::records::scope_stats!(self.sql.stats.clone(), now_ms, &mut *conn);
        let table = &self.sql.table;
        let bytes: Option<Option<i64>> = sqlx::query_scalar(TABLE_BYTES)
            .bind(table.schema())
            .bind(table.name())
            .fetch_optional(&mut *conn)
            .await?;
        Ok(RecordStats {
            scopes,
            table_bytes: bytes.flatten().and_then(|bytes| u64::try_from(bytes).ok()),
            now_ms,
        })
    }

    super::records::sql_records_reads!();
}

impl TransitionStore for MySqlStore {
    fn transition_sql(transition: &Transition) -> TransitionSql {
        // MySQL has only positional `?` markers, bound in order: to, key, from….
        transition_statements(transition, '`', |_| "?".to_owned())
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
    fn only_mariadb_from_10_5_inserts_returning() {
        for (version, expected) in [
            ("10.11.19-MariaDB-0+deb12u1", true),
            ("10.5.0-MariaDB", true),
            ("11.4.2-MariaDB-log", true),
            ("5.5.5-10.6.12-MariaDB", true),
            ("10.4.32-MariaDB", false),
            ("10.3.39-MariaDB-0ubuntu0.20.04.2", false),
            ("8.0.36", false),
            ("8.4.0-commercial", false),
            ("MariaDB", false),
        ] {
            assert_eq!(inserts_returning(version), expected, "{version}");
        }
    }

    #[test]
    fn a_batch_statement_binds_every_value() {
        let table = RecordsTable::parse("billing.Order").expect("a valid name");
        let sql = RecordsSql::new(table);
        assert_eq!(
            sql.insert_batch.for_rows(2).0,
            "INSERT IGNORE INTO `billing`.`Order` \
            (scope, record_key, fingerprint, response, created_at_ms, expires_at_ms) \
            VALUES (?, ?, ?, ?, ?, ?), (?, ?, ?, ?, ?, ?) RETURNING scope, record_key"
        );
        assert_eq!(
            sql.select_batch.for_rows(1).0,
            "SELECT scope, record_key, fingerprint, response, created_at_ms, expires_at_ms \
            FROM `billing`.`Order` WHERE (scope, record_key) IN ((?, ?))"
        );
    }

    #[test]
    fn transition_statements_use_backticks_and_positional_parameters() {
        const STEP: Transition = Transition::new(
            "shop.orders",
            "status",
            "order_id",
            &["new", "held"],
            "paid",
        );
        let sql = MySqlStore::transition_sql(&STEP);
        assert_eq!(
            &*sql.update,
            "UPDATE `shop`.`orders` SET `status` = ? WHERE `order_id` = ? AND `status` IN (?, ?)"
        );
        assert_eq!(
            &*sql.select,
            "SELECT `status` FROM `shop`.`orders` WHERE `order_id` = ?"
        );
    }
}
