//! PostgreSQL (`store = "pg"`, feature `pg`).
//!
//! What happens to a duplicate here: the gate's one statement, an `INSERT … ON CONFLICT DO
//! NOTHING` on `idem_records` that also returns the record holding a taken key, finds the
//! committed row and inserts nothing, or, when a twin's transaction is still in flight, waits
//! on that row until the twin commits (then it is a duplicate) or rolls back (then this
//! delivery claims the key). Read Committed, the default isolation, is enough. A row the twin
//! committed after the statement's snapshot is not in the statement's result; a second
//! statement reads it.
//!
//! # Round trips
//!
//! | | default | [`with_gate_in_begin`](PgStore::with_gate_in_begin) |
//! |---|---|---|
//! | first delivery (`dedup_table`) | `BEGIN`; the claim; the body; the checked commit | the claim and `BEGIN`; the body; the checked commit |
//! | duplicate | `BEGIN`; the claim, which returns the record | the claim, which fails (plus a read of the record with `fingerprint`, `replay` or observe mode) |
//! | `state_machine` step | `BEGIN`; the guarded update; the checked commit | the guarded update and `BEGIN`; the checked commit |
//! | `unique_constraint` | `BEGIN`; the body; the checked commit | the same |
//!
//! The `ROLLBACK` of a duplicate's transaction, and of the empty one the checked commit leaves,
//! travels with the ping sqlx's pool sends on every returned connection: no round trip of its
//! own. BENCHMARKS.md counts them on the wire (`tests/pg_round_trips.rs`) and measures when
//! sending the gate with the `BEGIN` pays.
//!
//! # The commit
//!
//! A body that ignores a failed statement leaves the transaction *aborted*; PostgreSQL then
//! answers `COMMIT` with `ROLLBACK` and no error, so a plain commit would report success for a
//! transaction that committed nothing. The commit here is one simple-query round trip,
//! `SELECT 1; COMMIT; BEGIN`: in an aborted transaction the `SELECT` fails with `25P02` and the
//! rest is skipped, so the store reports [`CommitFailure::Aborted`]; otherwise the `COMMIT`
//! runs and the trailing `BEGIN` opens an empty transaction that sqlx's `Transaction` rolls
//! back when dropped, on the round trip with which the pool tests every returned connection.
//! The check costs no extra round trip (BENCHMARKS.md measures it).

use std::sync::Arc;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Postgres, SqlStr, Transaction};

use super::literal;
use super::records::{AgedSql, RecordStats, Records};
use super::table::Dialect;
use super::{
    BatchPlan, Begun, CLAIM_ATTEMPTS, Claim, CommitFailure, NewRecord, RecordRow, RecordsTable,
    Store, StoredRecord, TransitionStore, live_record, migrations, record_kept_vanishing, sealed,
};
use crate::classify::is_transaction_gone;
use crate::clock::{Clock, SharedClock};
use crate::key::Key;
use crate::transition::{
    StateKey, Transition, TransitionOutcome, TransitionSql, transition_statements,
};

/// The transaction an `#[idempotent(store = "pg")]` handler's body receives.
pub type PgTx<'c> = Transaction<'c, Postgres>;

/// Dedup records and handler transactions on PostgreSQL, through a sqlx pool.
///
/// ```no_run
/// # async fn demo() -> Result<(), sqlx::Error> {
/// use idem_runtime::PgStore;
///
/// let store = PgStore::connect("postgres://postgres@127.0.0.1/test").await?;
/// store.migrate().await?; // creates idem_records if missing; safe to run twice
/// # Ok(()) }
/// ```
///
/// The records live in `idem_records` unless [`with_records_table`](Self::with_records_table)
/// names another table.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    clock: SharedClock,
    sql: Arc<RecordsSql>,
    gate_in_begin: bool,
    /// Whether the server's encoding is UTF-8, read once, when the gate first travels with the
    /// `BEGIN`: elsewhere a literal's escapes may not convert (`SQL_ASCII`; before PostgreSQL
    /// 13, any other encoding) where a bound parameter does, so the gate stays after the
    /// `BEGIN`.
    utf8_server: Arc<tokio::sync::OnceCell<bool>>,
}

/// The commit, with the check that the transaction was not aborted riding on its round trip
/// (see the [module docs](self)).
const CHECKED_COMMIT: &str = "SELECT 1; COMMIT; BEGIN";
// What sqlx 0.9 allows, read in its sources (issue 17). `Pool::begin_with(sql)` sends `sql` as
// one *simple* query (`PgTransactionManager::begin` → `queue_simple_query`, then
// `wait_until_ready`), so it may carry several statements, binds nothing (values must be
// literals: see `literal`), and *discards every result*: the only things the caller learns are
// an error, or whether the server is in a transaction afterwards (`BeginFailed` if not). A
// taken key must therefore make the statement fail. It must fail *before* `BEGIN` (the gate
// runs in the implicit transaction of the query string, which `BEGIN` then adopts): a failure
// after `BEGIN` would leave the connection in an aborted transaction that sqlx does not know
// about (its depth is still 0) and the pool would hand it out again. A failure before it rolls
// the implicit transaction back; the pool's release ping then reads the pending
// `ReadyForQuery`, and the connection is clean. The connection tracks the server's transaction
// status from every `ReadyForQuery` (`PgConnection::in_transaction`), but only crate-privately:
// that is why `CHECKED_COMMIT` asks the server instead. A dropped `Transaction` queues its
// `ROLLBACK` (`start_rollback`), which the pool flushes with its release ping, so it adds a
// statement but no round trip of its own. A batch (`claim_batch`) costs BEGIN, the claim, the
// body, this commit: one round trip per step, as a hand-written inbox.

/// The claim that travels with the `BEGIN` ([`Store::begin_claim`]): this head, the values as
/// literals, [`CLAIM_AND_BEGIN_WHERE`], now, [`CLAIM_AND_BEGIN_TAIL`]. A fresh key is inserted,
/// an expired record taken over; a live record makes the `WHERE` divide by zero, so that the
/// statement fails, the rest of the query string (the `BEGIN`) is skipped, and the server rolls
/// the implicit transaction back. The comment is for whoever reads the server log.
const CLAIM_AND_BEGIN_HEAD: &str = "/* idem gate: a \"division by zero\" from this statement means \
    the message is a duplicate, not a failure */ INSERT INTO idem_records AS r \
    (scope, record_key, fingerprint, response, created_at_ms, expires_at_ms) VALUES (";
const CLAIM_AND_BEGIN_WHERE: &str = ") ON CONFLICT (scope, record_key) DO UPDATE \
    SET fingerprint = EXCLUDED.fingerprint, response = EXCLUDED.response, \
    created_at_ms = EXCLUDED.created_at_ms, expires_at_ms = EXCLUDED.expires_at_ms \
    WHERE CASE WHEN r.expires_at_ms <= ";
const CLAIM_AND_BEGIN_TAIL: &str = " THEN TRUE ELSE r.created_at_ms / 0 = 0 END; BEGIN";
/// The guarded update that travels with the `BEGIN` ([`TransitionStore::begin_transition`]):
/// this head, the update with literals, [`TRANSITION_AND_BEGIN_TAIL`]. When it moves no row,
/// the count divides by zero and the `BEGIN` is skipped, as for the claim.
const TRANSITION_AND_BEGIN_HEAD: &str = "/* idem gate: a \"division by zero\" from this statement \
    means the row did not move (a duplicate or a refused step), not a failure */ WITH moved AS (";
const TRANSITION_AND_BEGIN_TAIL: &str = " RETURNING 1) SELECT 1 / count(*)::int FROM moved; BEGIN";
/// SQLSTATE `division_by_zero`: the one-round-trip gate found the key taken (or the row
/// unmoved).
const GATE_CLOSED: &str = "22012";

const MIGRATION_LOCK: &str = "SELECT pg_advisory_xact_lock(7280321149621735001)";
// The statements on the records table, written for the default one; `RecordsSql::new` rewrites
// them for another.
const SELECT: &str = "SELECT fingerprint, response, created_at_ms, expires_at_ms \
    FROM idem_records WHERE scope = $1 AND record_key = $2";
/// The claim in one statement: insert the record, or, when the key is taken, return the record
/// that holds it, for the duplicate's verdict, its fingerprint check or its replay. Returns one
/// row: whether this statement inserted, then the existing record's columns (all `NULL` when it
/// inserted, and also when the row that holds the key was committed by a twin after this
/// statement's snapshot was taken: the insert waited for it, but the read cannot see it; the
/// caller then reads it with a statement of its own). Binds: scope, key, fingerprint, response,
/// now, expiry.
const INSERT_OR_READ: &str = "WITH inserted AS (INSERT INTO idem_records \
    (scope, record_key, fingerprint, response, created_at_ms, expires_at_ms) \
    VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (scope, record_key) DO NOTHING RETURNING 1) \
    SELECT EXISTS (SELECT FROM inserted), r.fingerprint, r.response, r.created_at_ms, \
    r.expires_at_ms FROM (SELECT 1) AS one \
    LEFT JOIN idem_records AS r ON r.scope = $1 AND r.record_key = $2";
/// A batch's gate in one statement: every record, in the order given (the batch's sorted
/// order, so that two batches sharing keys wait instead of deadlocking); returns the keys it
/// wrote. Binds: scopes, keys, fingerprints, responses, creation times, expiries (arrays).
const INSERT_BATCH: &str = "INSERT INTO idem_records \
    (scope, record_key, fingerprint, response, created_at_ms, expires_at_ms) \
    SELECT s, k, f, r, c, e FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], \
    $5::int8[], $6::int8[]) WITH ORDINALITY AS t(s, k, f, r, c, e, n) ORDER BY n \
    ON CONFLICT (scope, record_key) DO NOTHING RETURNING scope, record_key";
/// A batch's insert when its records share a scope, a time and an expiry and carry no
/// response (every batch of one handler): one array, of keys (and one of fingerprints), instead
/// of six. Binds: scope, keys, fingerprints, now, expiry.
const INSERT_BATCH_IN_SCOPE: &str = "INSERT INTO idem_records \
    (scope, record_key, fingerprint, response, created_at_ms, expires_at_ms) \
    SELECT $1, k, f, NULL, $4, $5 FROM unnest($2::text[], $3::text[]) \
    WITH ORDINALITY AS t(k, f, n) ORDER BY n \
    ON CONFLICT (scope, record_key) DO NOTHING RETURNING record_key";
/// The records of the keys a batch's insert found taken. Binds: scopes, keys (arrays).
const SELECT_BATCH: &str = "SELECT scope, record_key, fingerprint, response, created_at_ms, \
    expires_at_ms FROM idem_records \
    WHERE (scope, record_key) IN (SELECT * FROM unnest($1::text[], $2::text[]))";
const TAKE_OVER_EXPIRED: &str = "UPDATE idem_records \
    SET fingerprint = $3, response = $4, created_at_ms = $5, expires_at_ms = $6 \
    WHERE scope = $1 AND record_key = $2 AND expires_at_ms IS NOT NULL AND expires_at_ms <= $5";
const SAVE_RESPONSE: &str =
    "UPDATE idem_records SET response = $3 WHERE scope = $1 AND record_key = $2";
const FORGET: &str = "DELETE FROM idem_records WHERE scope = $1 AND record_key = $2";
/// One batch of expired records, by the expiry index; rows a gate holds are skipped, not
/// waited for. Binds: now, the scope (`NULL`: every scope), the limit.
const PURGE_EXPIRED_BATCH: &str = "DELETE FROM idem_records WHERE (scope, record_key) IN (\
    SELECT scope, record_key FROM idem_records \
    WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= $1 AND ($2::text IS NULL OR scope = $2) \
    LIMIT $3 FOR UPDATE SKIP LOCKED)";
// A purge by age walks the primary key in windows of a batch's size: find the window's last key
// (an index-only walk of at most `limit` entries), then delete the old records in that range.
// Each statement touches at most one window, however sparse the old records are.
/// Binds: after scope, after key, limit - 1.
const AGED_WINDOW_END: &str = "SELECT scope, record_key FROM idem_records \
    WHERE (scope, record_key) > ($1, $2) ORDER BY scope, record_key LIMIT 1 OFFSET $3";
/// Binds: after scope, after key, last scope, last key, cutoff.
const DELETE_AGED_WINDOW: &str = "DELETE FROM idem_records \
    WHERE (scope, record_key) > ($1, $2) AND (scope, record_key) <= ($3, $4) \
    AND created_at_ms < $5";
/// The last window, shorter than a batch. Binds: after scope, after key, cutoff.
const DELETE_AGED_TAIL: &str = "DELETE FROM idem_records \
    WHERE (scope, record_key) > ($1, $2) AND created_at_ms < $3";
/// The same within one scope. Binds: scope, after key, limit - 1.
const AGED_WINDOW_END_IN_SCOPE: &str = "SELECT scope, record_key FROM idem_records \
    WHERE scope = $1 AND record_key > $2 ORDER BY record_key LIMIT 1 OFFSET $3";
/// Binds: scope, after key, last key, cutoff.
const DELETE_AGED_WINDOW_IN_SCOPE: &str = "DELETE FROM idem_records \
    WHERE scope = $1 AND record_key > $2 AND record_key <= $3 AND created_at_ms < $4";
/// Binds: scope, after key, cutoff.
const DELETE_AGED_TAIL_IN_SCOPE: &str = "DELETE FROM idem_records \
    WHERE scope = $1 AND record_key > $2 AND created_at_ms < $3";
/// Binds: now.
const STATS: &str = "SELECT scope, count(*), \
    count(*) FILTER (WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= $1), \
    min(created_at_ms), max(created_at_ms) FROM idem_records GROUP BY scope ORDER BY scope";
/// The table with its indexes and TOAST, plus its partitions' if it is partitioned (a
/// partitioned table's own size is 0); binds: the table's quoted, qualified name. `NULL` when
/// there is no such table.
const TABLE_BYTES: &str = "SELECT (pg_total_relation_size(to_regclass($1)) + COALESCE((\
    SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree(to_regclass($1)) \
    WHERE relid <> to_regclass($1)), 0))::BIGINT";

/// A record with its scope and key, as the batch gate reads the keys it found taken.
type KeyedRecordRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    i64,
    Option<i64>,
);

/// The statements a store runs on its records table, built once, when the table is set.
#[derive(Debug)]
struct RecordsSql {
    table: RecordsTable,
    migration: SqlStr,
    insert_or_read: SqlStr,
    insert_batch: SqlStr,
    insert_batch_in_scope: SqlStr,
    select: SqlStr,
    select_batch: SqlStr,
    /// [`CLAIM_AND_BEGIN_HEAD`] for this table.
    claim_and_begin_head: String,
    take_over_expired: SqlStr,
    save_response: SqlStr,
    forget: SqlStr,
    purge_expired_batch: SqlStr,
    aged: AgedSql,
    stats: SqlStr,
    /// The table's name as `to_regclass` reads it: quoted and qualified.
    regclass: String,
}

impl RecordsSql {
    fn new(table: RecordsTable) -> Self {
        let sql = |statement| table.rewrite(statement, Dialect::Postgres);
        Self {
            migration: sql(migrations::POSTGRES),
            insert_or_read: sql(INSERT_OR_READ),
            insert_batch: sql(INSERT_BATCH),
            insert_batch_in_scope: sql(INSERT_BATCH_IN_SCOPE),
            select: sql(SELECT),
            select_batch: sql(SELECT_BATCH),
            claim_and_begin_head: table.rewrite_text(CLAIM_AND_BEGIN_HEAD, Dialect::Postgres),
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
            regclass: table.rewrite_text("idem_records", Dialect::Postgres),
            table,
        }
    }
}

impl PgStore {
    /// Uses an existing pool: the store shares your service's connections and transactions.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            clock: crate::clock::system(),
            sql: Arc::new(RecordsSql::new(RecordsTable::default())),
            gate_in_begin: false,
            utf8_server: Arc::default(),
        }
    }

    /// Sends the gate of `dedup_table` and `state_machine` with the `BEGIN`, in one round trip,
    /// instead of after it (the default). Worth it where a round trip is expensive (a database
    /// across a network: a first delivery and a `state_machine` step wait for one round trip
    /// less, and so does a duplicate without `fingerprint` or `replay`); not on a database next
    /// to the service whose CPU is the limit, where parsing the statement for every delivery
    /// costs more than the round trip saves. BENCHMARKS.md measures both. Used only on a UTF-8
    /// database (read once, with `SHOW server_encoding`); elsewhere the gate stays after the
    /// `BEGIN`.
    ///
    /// What changes:
    ///
    /// - The gate statement travels as a *simple* query, so its values are written into the
    ///   SQL text, as escape-string literals ([`literal`]); PostgreSQL parses and plans it for
    ///   every delivery, where the default path reuses a prepared statement.
    /// - A duplicate (or, under `state_machine`, a row that does not move) is reported by the
    ///   statement *failing*, with SQLSTATE `22012` ("division by zero"): there is no other way
    ///   for it to tell sqlx not to open the transaction. The server logs every such failure
    ///   (`log_min_error_statement`), with the statement, so expect an `ERROR` line per
    ///   duplicate in the server log. The statement starts with a comment that says so.
    /// - With `fingerprint`, `replay` or `mode = "observe"`, a duplicate's record is read with a
    ///   second statement (one round trip more than the default path, which returns it from
    ///   the claim); under `state_machine`, a refused or duplicate step's state likewise (as on
    ///   the default path).
    /// - On a duplicate, the claim locks the record before it fails (`ON CONFLICT DO UPDATE`
    ///   locks the row it conflicts with, to take an expired record over in the same
    ///   statement): a transaction id and a small WAL record per duplicate, which the default
    ///   path's `DO NOTHING` does not spend. The statement in the server log carries the key,
    ///   escaped but readable.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool) {
    /// use idem_runtime::PgStore;
    ///
    /// // The database is a network hop away: one round trip less per delivery.
    /// let store = PgStore::new(pool).with_gate_in_begin(true);
    /// # }
    /// ```
    #[must_use]
    pub fn with_gate_in_begin(mut self, on: bool) -> Self {
        self.gate_in_begin = on;
        self
    }

    /// Whether the gate travels with the `BEGIN` ([`with_gate_in_begin`](Self::with_gate_in_begin)).
    pub fn gate_in_begin(&self) -> bool {
        self.gate_in_begin
    }

    /// Keeps the records in `table` instead of `idem_records` (every statement on the table is
    /// built here, once). The schema must exist; [`migrate`](Self::migrate) creates the table
    /// in it.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
    /// use idem_runtime::PgStore;
    /// use idem_runtime::store::RecordsTable;
    ///
    /// let store = PgStore::new(pool).with_records_table(RecordsTable::parse("billing.dedup")?);
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
        Ok(Self::new(PgPoolOptions::new().connect(url).await?))
    }

    /// The pool, for the rest of your queries.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the records table and its expiry index if missing: runs
    /// [`migrations::POSTGRES`] (for another table, [`migrations::postgres`]) in one
    /// transaction. Safe to run any number of times, also from several processes at once (it
    /// serialises on an advisory lock).
    pub async fn migrate(&self) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(MIGRATION_LOCK).execute(&mut *tx).await?;
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

    /// The query string of [`Store::begin_claim`]'s one round trip; `None` when a value
    /// cannot be written as a literal (a NUL in the scope: the two-step path then binds it,
    /// and PostgreSQL refuses it there).
    fn claim_and_begin(&self, record: &NewRecord<'_>) -> Option<String> {
        let mut sql = String::with_capacity(
            self.sql.claim_and_begin_head.len()
                + CLAIM_AND_BEGIN_WHERE.len()
                + CLAIM_AND_BEGIN_TAIL.len()
                + 2 * (record.key.scope().len() + record.key.value().len())
                + record.fingerprint.map_or(0, |f| 2 * f.len())
                + 200,
        );
        sql.push_str(&self.sql.claim_and_begin_head);
        literal::push_pg_text(&mut sql, record.key.scope()).ok()?;
        sql.push_str(", ");
        literal::push_pg_text(&mut sql, record.key.value()).ok()?;
        sql.push_str(", ");
        literal::push_pg_optional_text(&mut sql, record.fingerprint).ok()?;
        sql.push_str(", ");
        literal::push_pg_optional_text(&mut sql, record.response).ok()?;
        sql.push_str(", ");
        literal::push_pg_int8(&mut sql, record.now_ms);
        sql.push_str(", ");
        literal::push_pg_optional_int8(&mut sql, record.expires_at_ms);
        sql.push_str(CLAIM_AND_BEGIN_WHERE);
        literal::push_pg_int8(&mut sql, record.now_ms);
        sql.push_str(CLAIM_AND_BEGIN_TAIL);
        Some(sql)
    }

    /// Whether the gate travels with the `BEGIN`: asked for, and the server's encoding is UTF-8.
    async fn folds_gate(&self) -> Result<bool, sqlx::Error> {
        if !self.gate_in_begin {
            return Ok(false);
        }
        let utf8 = self
            .utf8_server
            .get_or_try_init(|| async {
                let encoding: String = sqlx::query_scalar("SHOW server_encoding")
                    .fetch_one(&self.pool)
                    .await?;
                Ok::<_, sqlx::Error>(encoding.eq_ignore_ascii_case("UTF8"))
            })
            .await?;
        Ok(*utf8)
    }

    /// `BEGIN` with the gate in front of it, in one round trip, on a task of its own: once the
    /// query is sent, the server runs it whether or not anyone waits for the answer, and a
    /// caller dropped mid-way (a timeout, a shutdown that aborts the worker) would leave sqlx
    /// holding a connection whose transaction it does not know about, claim included, and
    /// handing it to the next borrower. Run to completion, the begin either fails (nothing
    /// open) or yields a `Transaction`, which the task drops, rolling it back.
    async fn begin_folded(&self, sql: String) -> Result<PgTx<'static>, sqlx::Error> {
        let pool = self.pool.clone();
        tokio::spawn(async move { pool.begin_with(AssertSqlSafe(sql)).await })
            .await
            .unwrap_or_else(|ended| {
                Err(sqlx::Error::Protocol(format!(
                    "idem: the task that opened the transaction ended: {ended}"
                )))
            })
    }

    async fn read(
        &self,
        conn: &mut sqlx::PgConnection,
        key: &Key,
    ) -> Result<Option<RecordRow>, sqlx::Error> {
        sqlx::query_as::<_, RecordRow>(self.sql.select.clone())
            .bind(key.scope())
            .bind(key.value())
            .fetch_optional(conn)
            .await
    }
}

impl sealed::Sealed for PgStore {}

impl Store for PgStore {
    type Tx = PgTx<'static>;
    const NAME: &'static str = "pg";

    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    async fn begin(&self) -> Result<Self::Tx, sqlx::Error> {
        self.pool.begin().await
    }

    /// With [`with_gate_in_begin`](PgStore::with_gate_in_begin), one round trip: the claim,
    /// then `BEGIN`, in one simple query (its values as literals, see [`literal`]). PostgreSQL runs the claim in an implicit transaction that
    /// the `BEGIN` then makes the handler's; a taken key fails the claim, which skips the
    /// `BEGIN` and rolls the claim back. A twin in flight makes the claim wait, as in
    /// [`claim`](Store::claim). The record of a taken key is read with a second statement,
    /// only when `wants_record`; if it vanished meanwhile (a purge, `forget`), the two-step
    /// path claims the key.
    async fn begin_claim(
        &self,
        record: &NewRecord<'_>,
        wants_record: bool,
    ) -> Result<Begun<Self::Tx, Option<Claim>>, sqlx::Error> {
        let sql = match self.folds_gate().await? {
            true => self.claim_and_begin(record),
            false => None,
        };
        let Some(sql) = sql else {
            return super::begin_then_claim(self, record).await;
        };
        match self.begin_folded(sql).await {
            Ok(tx) => Ok(Begun {
                tx: Some(tx),
                verdict: Ok(Some(Claim::Claimed)),
            }),
            Err(error) if gate_closed(&error) => {
                if !wants_record {
                    return Ok(Begun {
                        tx: None,
                        verdict: Ok(None),
                    });
                }
                failpoint!(crate::failpoints::BEFORE_TAKEN_KEY_READ);
                match self.find_record(record.key, record.now_ms).await? {
                    Some(existing) => Ok(Begun {
                        tx: None,
                        verdict: Ok(Some(Claim::Existing(existing))),
                    }),
                    None => super::begin_then_claim(self, record).await,
                }
            }
            Err(error) => Err(error),
        }
    }

    async fn commit(&self, mut tx: Self::Tx) -> Result<(), CommitFailure> {
        match sqlx::raw_sql(CHECKED_COMMIT).execute(&mut *tx).await {
            // Committed; dropping `tx` rolls back the empty transaction `BEGIN` opened.
            Ok(_) => Ok(()),
            Err(error) if is_transaction_gone(&error) => {
                // Still in the aborted transaction: end it.
                let _ = tx.rollback().await;
                Err(CommitFailure::Aborted)
            }
            Err(error) => {
                // `COMMIT` failed (a deferred constraint, a serialization failure) and ended the
                // transaction, or the connection is gone. Open one so that dropping `tx` rolls
                // back a transaction rather than warning that there is none.
                let _ = sqlx::raw_sql("BEGIN").execute(&mut *tx).await;
                Err(CommitFailure::Database(error))
            }
        }
    }

    async fn ensure_open(&self, _tx: &mut Self::Tx) -> Result<(), CommitFailure> {
        Ok(())
    }

    async fn rollback(tx: Self::Tx) -> Result<(), sqlx::Error> {
        // Dropping the transaction queues its ROLLBACK, which sqlx sends with the ping of the
        // connection's return to the pool: the same statement, one round trip fewer on the
        // delivery's path (a duplicate's above all).
        drop(tx);
        Ok(())
    }

    async fn savepoint(&self, tx: &mut Self::Tx, name: &str) -> Result<(), CommitFailure> {
        // In an aborted transaction this fails (25P02), which the runtime reports as such.
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
        for _ in 0..CLAIM_ATTEMPTS {
            // One statement: a fresh key is inserted, a taken one comes back with its record.
            // A twin in flight makes it wait here, on the row.
            let (inserted, fingerprint, response, created_at_ms, expires_at_ms): (
                bool,
                Option<String>,
                Option<String>,
                Option<i64>,
                Option<i64>,
            ) = sqlx::query_as(self.sql.insert_or_read.clone())
                .bind(record.key.scope())
                .bind(record.key.value())
                .bind(record.fingerprint)
                .bind(record.response)
                .bind(record.now_ms)
                .bind(record.expires_at_ms)
                .fetch_one(&mut **tx)
                .await?;
            if inserted {
                return Ok(Claim::Claimed);
            }
            let mismatched =
                record.fingerprint.is_some() && fingerprint.as_deref() != record.fingerprint;
            let row = match created_at_ms {
                // The record as of the statement's snapshot. If the key was forgotten and claimed
                // again since, the row that holds it now is another: before a verdict that
                // dead-letters the delivery, read the current one.
                Some(_) if mismatched => self.read(tx, record.key).await?,
                Some(created_at_ms) => Some((fingerprint, response, created_at_ms, expires_at_ms)),
                // The key's row is not in this statement's snapshot: a twin committed it after
                // the snapshot was taken (the insert waited for that commit). A statement of
                // its own reads it (or finds it purged since).
                None => self.read(tx, record.key).await?,
            };
            if row.is_none() {
                // Purged since the insert conflicted: the key is free again. Start over.
                continue;
            }
            if let Some(existing) = live_record(row, record.now_ms) {
                return Ok(Claim::Existing(existing));
            }
            // Expired: take it over. A racing twin blocks on the row lock and then sees the
            // renewed expiry, so at most one of them claims it.
            if bind(&self.sql.take_over_expired)
                .execute(&mut **tx)
                .await?
                .rows_affected()
                == 1
            {
                return Ok(Claim::Claimed);
            }
            // A twin renewed it first (it is live now), or a purge deleted it (start over).
            if let Some(existing) = live_record(self.read(tx, record.key).await?, record.now_ms) {
                return Ok(Claim::Existing(existing));
            }
        }
        Err(record_kept_vanishing(record.key))
    }

    async fn claim_batch(
        &self,
        tx: &mut Self::Tx,
        records: &[NewRecord<'_>],
    ) -> Result<Vec<Claim>, sqlx::Error> {
        let plan = BatchPlan::of(records);
        let unique: Vec<&NewRecord<'_>> = plan.unique.iter().map(|&i| &records[i]).collect();
        let inserted = match unique.first() {
            Some(first)
                if unique.iter().all(|r| {
                    r.key.scope() == first.key.scope()
                        && r.response.is_none()
                        && r.now_ms == first.now_ms
                        && r.expires_at_ms == first.expires_at_ms
                }) =>
            {
                let keys: Vec<String> = sqlx::query_scalar(self.sql.insert_batch_in_scope.clone())
                    .bind(first.key.scope())
                    .bind(unique.iter().map(|r| r.key.value()).collect::<Vec<_>>())
                    .bind(unique.iter().map(|r| r.fingerprint).collect::<Vec<_>>())
                    .bind(first.now_ms)
                    .bind(first.expires_at_ms)
                    .fetch_all(&mut **tx)
                    .await?;
                let scope = first.key.scope();
                keys.into_iter()
                    .map(|key| (scope.to_owned(), key))
                    .collect::<std::collections::HashSet<(String, String)>>()
            }
            _ => {
                let rows: Vec<(String, String)> = sqlx::query_as(self.sql.insert_batch.clone())
                    .bind(unique.iter().map(|r| r.key.scope()).collect::<Vec<_>>())
                    .bind(unique.iter().map(|r| r.key.value()).collect::<Vec<_>>())
                    .bind(unique.iter().map(|r| r.fingerprint).collect::<Vec<_>>())
                    .bind(unique.iter().map(|r| r.response).collect::<Vec<_>>())
                    .bind(unique.iter().map(|r| r.now_ms).collect::<Vec<_>>())
                    .bind(unique.iter().map(|r| r.expires_at_ms).collect::<Vec<_>>())
                    .fetch_all(&mut **tx)
                    .await?;
                rows.into_iter().collect()
            }
        };
        let mut claims = Vec::with_capacity(unique.len());
        let mut taken = Vec::new();
        for &index in &plan.unique {
            let key = records[index].key;
            if inserted.contains(&(key.scope().to_owned(), key.value().to_owned())) {
                claims.push((index, Claim::Claimed));
            } else {
                taken.push(index);
            }
        }
        if !taken.is_empty() {
            let rows: Vec<KeyedRecordRow> = sqlx::query_as(self.sql.select_batch.clone())
                .bind(
                    taken
                        .iter()
                        .map(|&i| records[i].key.scope())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    taken
                        .iter()
                        .map(|&i| records[i].key.value())
                        .collect::<Vec<_>>(),
                )
                .fetch_all(&mut **tx)
                .await?;
            let mut found: std::collections::HashMap<(String, String), RecordRow> = rows
                .into_iter()
                .map(|(scope, key, fingerprint, response, created, expires)| {
                    ((scope, key), (fingerprint, response, created, expires))
                })
                .collect();
            for index in taken {
                let record = &records[index];
                let row =
                    found.remove(&(record.key.scope().to_owned(), record.key.value().to_owned()));
                match live_record(row, record.now_ms) {
                    Some(existing) => claims.push((index, Claim::Existing(existing))),
                    // Expired (to take over) or purged since the insert: the one-key path
                    // handles both, still in key order.
                    None => claims.push((index, self.claim(tx, record).await?)),
                }
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

    fn is_unique_violation(
        &self,
        error: &dyn sqlx::error::DatabaseError,
        constraint: &str,
    ) -> bool {
        error.kind() == sqlx::error::ErrorKind::UniqueViolation
            && error.constraint() == Some(constraint)
    }
}

impl Records for PgStore {
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
        let bytes: Option<i64> = sqlx::query_scalar(TABLE_BYTES)
            .bind(&self.sql.regclass)
            .fetch_one(&mut *conn)
            .await?;
        Ok(RecordStats {
            scopes,
            table_bytes: bytes.and_then(|bytes| u64::try_from(bytes).ok()),
            now_ms,
        })
    }

    super::records::sql_records_reads!();
}

impl TransitionStore for PgStore {
    fn transition_sql(transition: &Transition) -> TransitionSql {
        transition_statements(transition, '"', |n| format!("${n}"))
    }

    async fn transition(
        &self,
        tx: &mut Self::Tx,
        statements: &TransitionSql,
        transition: &Transition,
        key: &StateKey,
    ) -> Result<TransitionOutcome, sqlx::Error> {
        super::run_transition!(&mut **tx, statements, transition, key, uuid = native)
    }

    /// With [`with_gate_in_begin`](PgStore::with_gate_in_begin), one round trip, as
    /// [`begin_claim`](Store::begin_claim): the guarded update, then `BEGIN`; an update that moves nothing fails and skips the `BEGIN`. Then, only for a
    /// delivery that moved nothing, the classifying read. If that read finds the row in a
    /// state the step moves from (it changed between the two statements), the two-step path
    /// runs the gate again.
    async fn begin_transition(
        &self,
        statements: &TransitionSql,
        transition: &Transition,
        key: &StateKey,
    ) -> Result<Begun<Self::Tx, TransitionOutcome>, sqlx::Error> {
        let sql = match self.folds_gate().await? {
            true => transition_and_begin(transition, key),
            false => None,
        };
        let Some(sql) = sql else {
            return super::begin_then_transition(self, statements, transition, key).await;
        };
        match self.begin_folded(sql).await {
            Ok(tx) => Ok(Begun {
                tx: Some(tx),
                verdict: Ok(TransitionOutcome::Moved),
            }),
            Err(error) if gate_closed(&error) => {
                failpoint!(crate::failpoints::BEFORE_TAKEN_KEY_READ);
                let select = sqlx::query_scalar(AssertSqlSafe(Arc::clone(&statements.select)));
                let select = match key {
                    StateKey::Text(text) => select.bind(text.as_str()),
                    StateKey::Integer(integer) => select.bind(*integer),
                    #[cfg(feature = "uuid")]
                    StateKey::Uuid(uuid) => select.bind(*uuid),
                };
                let current: Option<Option<String>> = select.fetch_optional(&self.pool).await?;
                let movable = matches!(&current, Some(Some(state)) if transition.from().contains(&state.as_str()));
                if movable {
                    return super::begin_then_transition(self, statements, transition, key).await;
                }
                Ok(Begun {
                    tx: None,
                    verdict: Ok(TransitionOutcome::Unmoved { current }),
                })
            }
            Err(error) => Err(error),
        }
    }
}

/// Whether `error` is the one-round-trip gate's own `22012`: raised by the statement itself,
/// so with no context (a trigger or a function that divides by zero reports where it was).
fn gate_closed(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(error) => error
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .is_some_and(|error| error.code() == GATE_CLOSED && error.r#where().is_none()),
        _ => false,
    }
}

/// The query string of [`TransitionStore::begin_transition`]'s one round trip: the guarded
/// update with its values as literals; `None` when one cannot be written as a literal.
fn transition_and_begin(transition: &Transition, key: &StateKey) -> Option<String> {
    let mut values = Vec::with_capacity(transition.from().len() + 2);
    let text = |value: &str| literal::pg_text(value).ok();
    values.push(text(transition.to())?);
    values.push(match key {
        StateKey::Text(value) => text(value)?,
        StateKey::Integer(value) => {
            let mut sql = String::new();
            literal::push_pg_int8(&mut sql, *value);
            sql
        }
        #[cfg(feature = "uuid")]
        StateKey::Uuid(value) => {
            let mut sql = String::new();
            literal::push_pg_uuid(&mut sql, value);
            sql
        }
    });
    for state in transition.from() {
        values.push(text(state)?);
    }
    let update = crate::transition::guarded_update(transition, '"', |n| values[n - 1].clone());
    Some(format!(
        "{TRANSITION_AND_BEGIN_HEAD}{update}{TRANSITION_AND_BEGIN_TAIL}"
    ))
}
