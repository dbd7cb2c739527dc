//! SQLite (`store = "sqlite"`, feature `sqlite`): the embedded default, no server needed.
//!
//! What happens to a duplicate here: every handler transaction starts with `BEGIN IMMEDIATE`,
//! which takes the database's write lock up front, so transactions that write run one at a
//! time. A twin waits for the lock (the busy timeout), then its gate finds the committed
//! record. Starting with a plain `BEGIN` would let two readers both try to upgrade to writer
//! and fail with `SQLITE_BUSY` instead of waiting.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

use super::{
    Claim, NewRecord, RecordRow, Store, StoredRecord, TransitionOutcome, TransitionSql,
    TransitionStore, live_record, transition_statements,
};
use crate::key::Key;
use crate::strategy::Transition;
use crate::strategy::state_machine::StateKey;

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
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS idem_records (
    scope         TEXT    NOT NULL,
    record_key    TEXT    NOT NULL,
    fingerprint   TEXT,
    response      TEXT,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER,
    PRIMARY KEY (scope, record_key)
) WITHOUT ROWID";
const CREATE_EXPIRY_INDEX: &str = "CREATE INDEX IF NOT EXISTS idem_records_expires_at_ms \
    ON idem_records (expires_at_ms) WHERE expires_at_ms IS NOT NULL";
const INSERT: &str = "INSERT INTO idem_records \
    (scope, record_key, fingerprint, response, created_at_ms, expires_at_ms) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (scope, record_key) DO NOTHING";
const SELECT: &str = "SELECT fingerprint, response, expires_at_ms FROM idem_records \
    WHERE scope = ?1 AND record_key = ?2";
const TAKE_OVER_EXPIRED: &str = "UPDATE idem_records \
    SET fingerprint = ?3, response = ?4, created_at_ms = ?5, expires_at_ms = ?6 \
    WHERE scope = ?1 AND record_key = ?2 AND expires_at_ms IS NOT NULL AND expires_at_ms <= ?5";
const SAVE_RESPONSE: &str =
    "UPDATE idem_records SET response = ?3 WHERE scope = ?1 AND record_key = ?2";
const PURGE_EXPIRED: &str =
    "DELETE FROM idem_records WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= ?1";

impl SqliteStore {
    /// Opens (creating if missing) the database file at `path` with the settings this store
    /// relies on: WAL journal, `synchronous = NORMAL` (durable across process crashes, which is
    /// what redelivery is about), foreign keys on, and a [`BUSY_TIMEOUT`] for waiting writers.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, sqlx::Error> {
        let options = SqliteConnectOptions::new().filename(path);
        Self::with_options(options).await
    }

    /// Like [`open`](Self::open), from a `sqlite:` URL.
    pub async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        Self::with_options(SqliteConnectOptions::from_str(url)?).await
    }

    async fn with_options(options: SqliteConnectOptions) -> Result<Self, sqlx::Error> {
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }

    /// Uses an existing pool. Configure it as [`open`](Self::open) does (WAL and a busy
    /// timeout at least), or concurrent deliveries fail with `SQLITE_BUSY` instead of waiting.
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }

    /// The pool, for the rest of your queries.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Creates `idem_records` and its expiry index if missing. Safe to run any number of times.
    pub async fn migrate(&self) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(CREATE_TABLE).execute(&mut *tx).await?;
        sqlx::query(CREATE_EXPIRY_INDEX).execute(&mut *tx).await?;
        tx.commit().await
    }

    /// Deletes records that expired before now; returns how many.
    pub async fn purge_expired(&self) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(PURGE_EXPIRED)
            .bind(crate::strategy::now_ms())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn read(
        conn: &mut sqlx::SqliteConnection,
        key: &Key,
    ) -> Result<Option<RecordRow>, sqlx::Error> {
        sqlx::query_as::<_, RecordRow>(SELECT)
            .bind(key.scope())
            .bind(key.value())
            .fetch_optional(conn)
            .await
    }
}

impl Store for SqliteStore {
    type Tx = SqliteTx<'static>;
    const NAME: &'static str = "sqlite";

    async fn begin(&self) -> Result<Self::Tx, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    async fn commit(tx: Self::Tx) -> Result<(), sqlx::Error> {
        tx.commit().await
    }

    async fn rollback(tx: Self::Tx) -> Result<(), sqlx::Error> {
        tx.rollback().await
    }

    async fn claim(&self, tx: &mut Self::Tx, record: &NewRecord<'_>) -> Result<Claim, sqlx::Error> {
        let bind = |sql| {
            sqlx::query(sql)
                .bind(record.key.scope())
                .bind(record.key.value())
                .bind(record.fingerprint)
                .bind(record.response)
                .bind(record.now_ms)
                .bind(record.expires_at_ms)
        };
        if bind(INSERT).execute(&mut **tx).await?.rows_affected() == 1 {
            return Ok(Claim::Claimed);
        }
        // We hold the write lock (BEGIN IMMEDIATE): nothing changes between these statements.
        if let Some(existing) = live_record(Self::read(tx, record.key).await?, record.now_ms) {
            return Ok(Claim::Existing(existing));
        }
        bind(TAKE_OVER_EXPIRED).execute(&mut **tx).await?;
        Ok(Claim::Claimed)
    }

    async fn save_response(
        &self,
        tx: &mut Self::Tx,
        key: &Key,
        response: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(SAVE_RESPONSE)
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
        Ok(live_record(Self::read(&mut conn, key).await?, now_ms))
    }

    /// SQLite reports no constraint names: its message lists the columns
    /// (`UNIQUE constraint failed: payments.order_id`) or, for an index on expressions, the
    /// index (`UNIQUE constraint failed: index 'payments_by_order'`). `constraint` matches either
    /// form: `"payments.order_id"` (comma-separated for several columns) or the index name.
    fn is_unique_violation(
        &self,
        error: &dyn sqlx::error::DatabaseError,
        constraint: Option<&str>,
    ) -> bool {
        if error.kind() != sqlx::error::ErrorKind::UniqueViolation {
            return false;
        }
        let Some(name) = constraint else {
            return true;
        };
        let detail = error
            .message()
            .split_once("constraint failed: ")
            .map_or("", |(_, detail)| detail);
        sqlite_detail_matches(detail, name)
    }
}

fn sqlite_detail_matches(detail: &str, constraint: &str) -> bool {
    if let Some(index) = detail
        .strip_prefix("index '")
        .and_then(|rest| rest.strip_suffix('\''))
    {
        return index == constraint;
    }
    let columns = detail.split(',').map(str::trim);
    columns.eq(constraint.split(',').map(str::trim))
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
        super::run_transition!(&mut **tx, statements, transition, key)
    }
}

#[cfg(test)]
mod tests {
    use super::sqlite_detail_matches;

    #[test]
    fn constraint_names_match_sqlite_messages() {
        assert!(sqlite_detail_matches(
            "payments.order_id",
            "payments.order_id"
        ));
        assert!(sqlite_detail_matches("t.a, t.b", "t.a,t.b"));
        assert!(!sqlite_detail_matches("t.a, t.b", "t.a"));
        assert!(!sqlite_detail_matches("payments.id", "payments.order_id"));
        assert!(sqlite_detail_matches("index 'by_order'", "by_order"));
        assert!(!sqlite_detail_matches("index 'by_order'", "other"));
    }
}
