//! Where dedup records live, and the transactions the handler's body runs in.
//!
//! One file per backend, each behind a cargo feature: [`pg`] (`pg`), [`mysql`] (`mysql`),
//! [`sqlite`] (`sqlite`),
//! and [`memory`] (always on, for unit tests only: it forgets everything on restart).
//!
//! [`redis`] (feature `redis`) is of another kind: it keeps leases, done markers and tokens for
//! `strategy = "lock"` and `"token"`, and has no transaction to share with the body (it does not
//! implement [`Store`]; see its module docs for what that means for the guarantee).
//!
//! # The dedup table
//!
//! SQL stores keep one row per processed message in a records table, `idem_records` unless
//! configured otherwise:
//!
//! | column | meaning |
//! |---|---|
//! | `scope` | the handler's namespace ([`Key::scope`]) |
//! | `record_key` | the encoded key ([`Key::value`]) |
//! | `fingerprint` | SHA-256 of the JSON payload, when the handler has `fingerprint` |
//! | `response` | the JSON result, when the handler has `replay` |
//! | `created_at_ms` | when the record was first written, Unix milliseconds ([`StoredRecord::created_at_ms`]) |
//! | `expires_at_ms` | when it stops counting, Unix milliseconds; `NULL` = never (no `ttl`) |
//!
//! Timestamps are integers so that one schema reads the same on every database. An expired
//! record no longer makes a delivery a duplicate: the next delivery takes it over (and its
//! `created_at_ms` becomes that delivery's). Delete expired rows with the store's
//! `purge_expired()`, in bounded batches (or with [`crate::retention`]: by scope, by age, in
//! the background); delete one record, so that its message is processed again, with
//! [`Store::forget`]; read the table as an operator with [`Records`] (or the `idem` command).
//!
//! # Creating it
//!
//! Either call the store's `migrate()` at start-up (safe to run any number of times, from
//! several processes at once), or run the SQL yourself with your migration tool: the crate
//! ships it as plain files in sqlx-cli's layout, `migrations/{postgres,mysql,mariadb,sqlite}/`,
//! also available as constants in [`migrations`]. `migrate()` runs exactly that SQL.
//!
//! # Another name, another schema
//!
//! Each SQL store takes a [`RecordsTable`] with `with_records_table`, checked when built and
//! quoted for the database; its statements are built once, when the table is set. The expiry
//! index is named after the table (`<table>_expires_at_ms`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use idem_runtime::PgStore;
//! use idem_runtime::store::RecordsTable;
//!
//! let store = PgStore::connect("postgres://postgres@127.0.0.1/test")
//!     .await?
//!     .with_records_table(RecordsTable::new("dedup_records")?.in_schema("billing")?);
//! store.migrate().await?; // creates billing.dedup_records (the schema must exist)
//! # Ok(()) }
//! ```

use std::future::Future;

use crate::key::Key;
use crate::transition::{StateKey, Transition, TransitionOutcome, TransitionSql};

#[cfg(feature = "pg")]
pub mod literal;
pub mod memory;
pub mod migrations;
#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "pg")]
pub mod pg;
pub mod records;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqlite")]
pub mod sqlite;
mod table;

pub use records::{AgedBatch, RecordDetails, RecordStats, Records, ScopeStats};
pub use table::{
    IdentifierPart, InvalidIdentifier, MAX_IDENTIFIER_BYTES, MAX_TABLE_NAME_BYTES, RecordsTable,
};

/// A dedup record about to be written.
#[derive(Debug, Clone, Copy)]
pub struct NewRecord<'a> {
    /// The message's key.
    pub key: &'a Key,
    /// SHA-256 of the payload, hex, when the handler fingerprints payloads.
    pub fingerprint: Option<&'a str>,
    /// The result to replay to duplicates, JSON, when known at write time.
    pub response: Option<&'a str>,
    /// Now, Unix milliseconds.
    pub now_ms: i64,
    /// Expiry, Unix milliseconds; `None` = never.
    pub expires_at_ms: Option<i64>,
}

/// What a live dedup record holds, as read back for a duplicate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredRecord {
    /// The payload fingerprint written by the first delivery, if any.
    pub fingerprint: Option<String>,
    /// The first delivery's result, JSON, if the handler replays results.
    pub response: Option<String>,
    /// When the record was written, Unix milliseconds by the store's
    /// [`Clock`](crate::clock::Clock): the first delivery's time (or the time of the delivery
    /// that took an expired record over, or of [`Store::mark_processed`]).
    pub created_at_ms: i64,
}

/// A dedup row as SQL stores read it: fingerprint, response, creation, expiry.
pub(crate) type RecordRow = (Option<String>, Option<String>, i64, Option<i64>);

/// The record in `row`, if there is one and it has not expired at `now_ms`.
#[cfg_attr(
    not(any(feature = "pg", feature = "mysql", feature = "sqlite")),
    allow(dead_code)
)] // used by the SQL stores
pub(crate) fn live_record(row: Option<RecordRow>, now_ms: i64) -> Option<StoredRecord> {
    let (fingerprint, response, created_at_ms, expires_at_ms) = row?;
    expires_at_ms
        .is_none_or(|expires| expires > now_ms)
        .then_some(StoredRecord {
            fingerprint,
            response,
            created_at_ms,
        })
}

/// How often a claim starts over when the record it conflicted with vanished before it could
/// be read or taken over (a concurrent `purge_expired`). Each retry needs another record to
/// appear and vanish between two statements, so this bound is never reached in practice.
#[cfg_attr(
    not(any(feature = "pg", feature = "mysql", feature = "sqlite")),
    allow(dead_code)
)] // used by the SQL stores
pub(crate) const CLAIM_ATTEMPTS: usize = 8;

/// The statements of a savepoint a handler's `in_transaction` takes in its caller's
/// transaction; `name` is the runtime's own (`idem_call_<n>`), never user input.
#[cfg(any(feature = "pg", feature = "mysql", feature = "sqlite"))]
pub(crate) fn savepoint_sql(statement: &str, name: &str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(statement.replace("{name}", name))
}

/// The error when [`CLAIM_ATTEMPTS`] ran out: retryable (an I/O-class error), so the message is
/// requeued. Never a duplicate: the key was free each time we looked.
#[cfg_attr(
    not(any(feature = "pg", feature = "mysql", feature = "sqlite")),
    allow(dead_code)
)] // used by the SQL stores
pub(crate) fn record_kept_vanishing(key: &Key) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::other(format!(
        "the dedup record for `{key}` vanished {CLAIM_ATTEMPTS} times while it was being claimed (a concurrent purge?); requeueing"
    )))
}

/// The order in which a batch's keys are claimed: each key once, in `(scope, key)` order, and
/// the later occurrences of a key given twice.
#[derive(Debug)]
pub(crate) struct BatchPlan {
    /// The index of each key's first occurrence, sorted by key.
    pub(crate) unique: Vec<usize>,
    /// `(later occurrence, first occurrence)`.
    pub(crate) twins: Vec<(usize, usize)>,
}

impl BatchPlan {
    pub(crate) fn of(records: &[NewRecord<'_>]) -> Self {
        let id = |index: usize| (records[index].key.scope(), records[index].key.value());
        let mut order: Vec<usize> = (0..records.len()).collect();
        // Stable: the first occurrence of a key comes first among its twins.
        order.sort_by(|&a, &b| id(a).cmp(&id(b)));
        let mut unique = Vec::with_capacity(order.len());
        let mut twins = Vec::new();
        for index in order {
            match unique.last() {
                Some(&first) if id(first) == id(index) => twins.push((index, first)),
                _ => unique.push(index),
            }
        }
        Self { unique, twins }
    }

    /// The claims in the batch's own order, from the claims of the unique keys: a twin is a
    /// duplicate of what its first occurrence claimed or found.
    pub(crate) fn spread(
        &self,
        records: &[NewRecord<'_>],
        claims: Vec<(usize, Claim)>,
    ) -> Vec<Claim> {
        let mut out: Vec<Option<Claim>> = vec![None; records.len()];
        for (index, claim) in claims {
            out[index] = Some(claim);
        }
        for &(twin, first) in &self.twins {
            let existing = match &out[first] {
                Some(Claim::Existing(found)) => found.clone(),
                _ => StoredRecord {
                    fingerprint: records[first].fingerprint.map(str::to_owned),
                    response: records[first].response.map(str::to_owned),
                    created_at_ms: records[first].now_ms,
                },
            };
            out[twin] = Some(Claim::Existing(existing));
        }
        // Every index is a unique key's or a twin's, so every slot is filled.
        let claims: Vec<Claim> = out.into_iter().flatten().collect();
        debug_assert_eq!(claims.len(), records.len());
        claims
    }
}

/// A record with its scope and key, as a batch's gate reads the keys it found taken.
#[cfg(any(feature = "mysql", feature = "sqlite"))]
pub(crate) type KeyedRecordRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    i64,
    Option<i64>,
);

/// A statement on the records table with a list of rows of variable length (a multi-row
/// `VALUES`): its text before and after the rows, rewritten for the table once, and one row's
/// placeholders. Only placeholders go between the two: every value is bound.
#[cfg(any(feature = "mysql", feature = "sqlite"))]
#[derive(Debug)]
pub(crate) struct RowsSql {
    head: String,
    row: &'static str,
    tail: String,
}

#[cfg(any(feature = "mysql", feature = "sqlite"))]
impl RowsSql {
    /// `head`, `row` and `tail` are written for the default table, as every statement is.
    pub(crate) fn new(
        table: &RecordsTable,
        dialect: table::Dialect,
        [head, row, tail]: [&'static str; 3],
    ) -> Self {
        Self {
            head: table.rewrite_text(head, dialect),
            row,
            tail: table.rewrite_text(tail, dialect),
        }
    }

    /// The statement for `rows` rows (at least one).
    pub(crate) fn for_rows(&self, rows: usize) -> sqlx::AssertSqlSafe<String> {
        debug_assert!(rows > 0, "a statement without rows");
        let mut text =
            String::with_capacity(self.head.len() + rows * (self.row.len() + 2) + self.tail.len());
        text.push_str(&self.head);
        for n in 0..rows {
            if n > 0 {
                text.push_str(", ");
            }
            text.push_str(self.row);
        }
        text.push_str(&self.tail);
        // The table's validated, quoted name and placeholders: no value is in the text.
        sqlx::AssertSqlSafe(text)
    }
}

/// The keys `indexes` (at most `max`) as a statement with a list of rows binds them: padded to
/// the next power of two rows, at most `max`, by repeating the last key. The statement's text
/// depends on its number of rows, and sqlx prepares and keeps each text per connection (100 by
/// default; MariaDB keeps them on the server too): padded, batches of every size share a dozen
/// texts. A repeated key is harmless: the insert skips it as a duplicate of the row it has
/// just written or found (it returns each key it wrote once), and the read finds its row again.
#[cfg(any(feature = "mysql", feature = "sqlite"))]
pub(crate) fn padded(indexes: &[usize], max: usize) -> Vec<usize> {
    let rows = indexes
        .len()
        .next_power_of_two()
        .min(max)
        .max(indexes.len());
    let mut padded = Vec::with_capacity(rows);
    padded.extend_from_slice(indexes);
    if let Some(&last) = indexes.last() {
        padded.resize(rows, last);
    }
    padded
}

/// After a batch's insert of the keys `chunk` (indexes into `records`) returned the keys it
/// wrote: pushes a claim for each of those, and returns the others (found taken), in order.
#[cfg(any(feature = "mysql", feature = "sqlite"))]
pub(crate) fn claimed_or_taken(
    records: &[NewRecord<'_>],
    chunk: &[usize],
    inserted: Vec<(String, String)>,
    claims: &mut Vec<(usize, Claim)>,
) -> Vec<usize> {
    let inserted: std::collections::HashSet<(String, String)> = inserted.into_iter().collect();
    let mut taken = Vec::with_capacity(chunk.len() - inserted.len().min(chunk.len()));
    for &index in chunk {
        let key = records[index].key;
        if inserted.contains(&(key.scope().to_owned(), key.value().to_owned())) {
            claims.push((index, Claim::Claimed));
        } else {
            taken.push(index);
        }
    }
    taken
}

/// After the read of the keys `taken` found: pushes [`Claim::Existing`] for each live record,
/// and returns the keys left for the one-key claim (expired, or deleted since the insert), in
/// order.
#[cfg(any(feature = "mysql", feature = "sqlite"))]
pub(crate) fn existing_or_left(
    records: &[NewRecord<'_>],
    taken: Vec<usize>,
    rows: Vec<KeyedRecordRow>,
    claims: &mut Vec<(usize, Claim)>,
) -> Vec<usize> {
    let mut found: std::collections::HashMap<(String, String), RecordRow> = rows
        .into_iter()
        .map(|(scope, key, fingerprint, response, created, expires)| {
            ((scope, key), (fingerprint, response, created, expires))
        })
        .collect();
    let mut left = Vec::new();
    for index in taken {
        let record = &records[index];
        let row = found.remove(&(record.key.scope().to_owned(), record.key.value().to_owned()));
        match live_record(row, record.now_ms) {
            Some(existing) => claims.push((index, Claim::Existing(existing))),
            None => left.push(index),
        }
    }
    left
}

/// The result of writing a dedup record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The record is ours: no live record existed (or an expired one was taken over).
    Claimed,
    /// A live record exists: an earlier delivery committed this message.
    Existing(StoredRecord),
}

pub(crate) mod sealed {
    /// Only this crate's stores implement [`Store`](super::Store).
    #[allow(unreachable_pub)] // public in a private module: nameable by no one outside
    pub trait Sealed {}
}

/// Any store a handler runs on: every [`Store`] (the SQL stores and the memory store), and the
/// Redis store, which keeps leases and markers but runs no transaction. What a handler value
/// ([`Handler::Store`](crate::handler::Handler::Store)) and the broker runners need of a store.
/// Sealed.
pub trait Backend: sealed::Sealed + Send + Sync + 'static {}

impl<S: Store + 'static> Backend for S {}

#[cfg(feature = "redis")]
impl Backend for redis::RedisStore {}

/// A transaction begun together with its gate ([`Store::begin_claim`],
/// [`TransitionStore::begin_transition`]): on PostgreSQL both travel in one round trip.
#[derive(Debug)]
pub struct Begun<Tx, V> {
    /// The transaction. Always open when the gate let the delivery in. When it did not, `None`
    /// where the gate ran before the transaction was kept (PostgreSQL), otherwise open: roll it
    /// back.
    pub tx: Option<Tx>,
    /// What the gate found, or its error.
    pub verdict: Result<V, sqlx::Error>,
}

/// Why a commit did not make the transaction's effects durable.
#[derive(Debug)]
#[non_exhaustive]
pub enum CommitFailure {
    /// The transaction had already ended before the commit: a statement in the body failed,
    /// the body ignored the error, and the database aborted (PostgreSQL) or rolled back
    /// (MySQL after a deadlock, SQLite after `OR ROLLBACK`) the whole transaction. Nothing of
    /// it is committed, the dedup record included.
    Aborted,
    /// The commit failed, or its outcome is unknown (the connection dropped mid-commit).
    Database(sqlx::Error),
}

impl From<sqlx::Error> for CommitFailure {
    fn from(error: sqlx::Error) -> Self {
        Self::Database(error)
    }
}

/// A backend that runs the handler's transaction and keeps dedup records.
///
/// Implemented by [`PgStore`](pg::PgStore), [`MySqlStore`](mysql::MySqlStore),
/// [`SqliteStore`](sqlite::SqliteStore) and [`MemoryStore`](memory::MemoryStore); sealed. The
/// strategies are written against this trait only, so a new backend is one file.
pub trait Store: sealed::Sealed + Send + Sync {
    /// The transaction the handler's body receives as `&mut Self::Tx`.
    type Tx: Send;

    /// The store's name in `store = "..."`, for logs.
    const NAME: &'static str;

    /// Opens a write transaction.
    fn begin(&self) -> impl Future<Output = Result<Self::Tx, sqlx::Error>> + Send;

    /// Now, Unix milliseconds, from the store's [`Clock`](crate::clock::Clock).
    fn now_ms(&self) -> i64;

    /// Commits, after checking that the transaction is still the one [`begin`](Self::begin)
    /// opened (the check rides on the commit's round trip where the database allows). When
    /// this returns `Ok`, the effects are durable.
    fn commit(&self, tx: Self::Tx) -> impl Future<Output = Result<(), CommitFailure>> + Send;

    /// Rolls back. On PostgreSQL the `ROLLBACK` is queued and sent with the ping of the
    /// connection's return to the pool (no round trip of its own): when this returns, the
    /// transaction's locks may be held a moment longer, and nothing of it is visible or will
    /// commit.
    fn rollback(tx: Self::Tx) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Checks that `tx` is still the transaction [`begin`](Self::begin) opened, before the
    /// runtime writes after the body: where the database runs statements in autocommit mode
    /// once it has rolled a transaction back (MySQL, SQLite), a write there would commit on
    /// its own. PostgreSQL refuses every statement in an aborted transaction, so it needs none.
    fn ensure_open(
        &self,
        tx: &mut Self::Tx,
    ) -> impl Future<Output = Result<(), CommitFailure>> + Send;

    /// Takes the savepoint `name` in a transaction the caller owns, before a handler's
    /// `in_transaction` runs its gate and body there, after proving that the transaction is
    /// still open: on MySQL and SQLite a transaction the database ended leaves the connection in
    /// autocommit mode, where the gate's and the body's writes would each commit on their own.
    /// Each call takes its own name, so calls nest.
    fn savepoint(
        &self,
        tx: &mut Self::Tx,
        name: &str,
    ) -> impl Future<Output = Result<(), CommitFailure>> + Send;
    /// Releases `name`: what the gate and the body wrote joins the caller's transaction.
    /// Fails when the transaction ended under the call (the savepoint went with it), or, on
    /// PostgreSQL, when a failed statement aborted it.
    fn release_savepoint(
        &self,
        tx: &mut Self::Tx,
        name: &str,
    ) -> impl Future<Output = Result<(), CommitFailure>> + Send;
    /// Rolls back to `name` and releases it: nothing the gate and the body wrote stays, and the
    /// caller's transaction is usable again (on PostgreSQL, also after a failed statement in
    /// the body). Fails when the transaction itself is gone.
    fn rollback_to_savepoint(
        &self,
        tx: &mut Self::Tx,
        name: &str,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
    /// Writes `record` inside `tx`, unless a live record exists for its key. A concurrent
    /// transaction writing the same key makes this wait until that one ends, so a twin in
    /// flight is never mistaken for a fresh key. An expired record is taken over.
    fn claim(
        &self,
        tx: &mut Self::Tx,
        record: &NewRecord<'_>,
    ) -> impl Future<Output = Result<Claim, sqlx::Error>> + Send;

    /// Opens a write transaction and claims `record` in it, as [`begin`](Self::begin) then
    /// [`claim`](Self::claim) would. The verdict is `None` when an earlier delivery holds the
    /// key and its record was not read: the caller did not ask for it (`wants_record`, for a
    /// fingerprint check or a replay) and the store could tell without a read.
    ///
    /// PostgreSQL sends the claim with the `BEGIN`, in one round trip, when asked to
    /// ([`PgStore::with_gate_in_begin`](pg::PgStore::with_gate_in_begin)); otherwise, and on
    /// the other stores, the two steps run.
    fn begin_claim(
        &self,
        record: &NewRecord<'_>,
        wants_record: bool,
    ) -> impl Future<Output = Result<Begun<Self::Tx, Option<Claim>>, sqlx::Error>> + Send
    where
        Self: Sized,
    {
        let _ = wants_record;
        begin_then_claim(self, record)
    }

    /// Claims every record of `records` inside `tx`, as [`claim`](Self::claim) would one by
    /// one, and returns their claims in the same order. A key given twice is claimed once: the
    /// later ones are [`Claim::Existing`] with what the first wrote (or found). Keys are claimed
    /// in `(scope, key)` order, whatever their order in `records`, so that two batches sharing
    /// keys wait for each other rather than deadlock. One case escapes the order: on
    /// PostgreSQL and MariaDB a key found expired, or deleted (by a purge or `forget`) between
    /// the batch's two statements, is claimed again after the others of its statement; a batch
    /// racing it for the same keys can then deadlock, and the database ends one of them with a
    /// retryable error (the broker redelivers; nothing is claimed twice).
    ///
    /// How many statements a batch takes, by store:
    ///
    /// | store | the batch's keys | the keys found taken |
    /// |---|---|---|
    /// | PostgreSQL | one `INSERT … SELECT … ON CONFLICT DO NOTHING RETURNING` | one `SELECT` |
    /// | SQLite | one `INSERT … VALUES … ON CONFLICT DO NOTHING RETURNING` per [`CLAIM_BATCH_ROWS`](sqlite::CLAIM_BATCH_ROWS) keys (SQLite's limit on bound parameters) | one `SELECT` per such statement |
    /// | MariaDB 10.5+ | one `INSERT IGNORE … VALUES … RETURNING` per [`CLAIM_BATCH_ROWS`](mysql::CLAIM_BATCH_ROWS) keys | one `SELECT` per such statement |
    /// | MySQL (no `RETURNING`), MariaDB before 10.5 | one `INSERT` per key | one `SELECT` each |
    ///
    /// plus the one-key claim for each key found expired. The memory store claims key by key.
    /// All in the same transaction.
    fn claim_batch(
        &self,
        tx: &mut Self::Tx,
        records: &[NewRecord<'_>],
    ) -> impl Future<Output = Result<Vec<Claim>, sqlx::Error>> + Send
    where
        Self: Sized,
    {
        async move {
            let plan = BatchPlan::of(records);
            let mut claims = Vec::with_capacity(plan.unique.len());
            for &index in &plan.unique {
                claims.push((index, self.claim(tx, &records[index]).await?));
            }
            Ok(plan.spread(records, claims))
        }
    }

    /// Stores the JSON result on this transaction's own record, for replay.
    fn save_response(
        &self,
        tx: &mut Self::Tx,
        key: &Key,
        response: &str,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Reads the live record for `key` outside any transaction (after a rollback).
    fn find_record(
        &self,
        key: &Key,
        now_ms: i64,
    ) -> impl Future<Output = Result<Option<StoredRecord>, sqlx::Error>> + Send;

    /// Records each of `keys` as processed, in one transaction, without running any handler:
    /// the next delivery of each is a duplicate. For switching a service over to idem without
    /// reprocessing what it already handled (import the keys from its own processed-messages
    /// table or a log). Build each key as the handler does: its scope and its key fields in
    /// order, `Key::new("billing.order_paid", &[("order_id", &id)])`. A key already recorded is
    /// left as it is (an expired one is renewed); `ttl` is the handler's `ttl` (`None`: forever).
    /// Returns how many keys were newly recorded.
    ///
    /// ```no_run
    /// # async fn demo(store: idem_runtime::PgStore) -> Result<(), Box<dyn std::error::Error>> {
    /// use idem_runtime::{Key, Store as _};
    ///
    /// let handled = ["o-1", "o-2"]; // from the service's own processed-messages table
    /// let keys = handled
    ///     .iter()
    ///     .map(|id| Key::new("billing.order_paid", &[("order_id", id)]))
    ///     .collect::<Result<Vec<_>, _>>()?;
    /// let imported = store.mark_processed(keys, None).await?;
    /// # Ok(()) }
    /// ```
    fn mark_processed(
        &self,
        keys: impl IntoIterator<Item = Key>,
        ttl: Option<std::time::Duration>,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send
    where
        Self: Sized,
    {
        // Collected first, so that the future does not hold the caller's iterator.
        let keys: Vec<Key> = keys.into_iter().collect();
        async move {
            let now_ms = self.now_ms();
            let expires_at_ms = ttl.map(|ttl| {
                now_ms.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
            });
            let mut tx = self.begin().await?;
            let records: Vec<NewRecord<'_>> = keys
                .iter()
                .map(|key| NewRecord {
                    key,
                    fingerprint: None,
                    response: None,
                    now_ms,
                    expires_at_ms,
                })
                .collect();
            // A key given twice is one key: claimed once.
            let recorded = match self.claim_batch(&mut tx, &records).await {
                Ok(claims) => claims
                    .iter()
                    .filter(|claim| matches!(claim, Claim::Claimed))
                    .count() as u64,
                Err(error) => {
                    let _ = Self::rollback(tx).await;
                    return Err(error);
                }
            };
            match self.commit(tx).await {
                Ok(()) => Ok(recorded),
                Err(CommitFailure::Database(error)) => Err(error),
                Err(CommitFailure::Aborted) => Err(sqlx::Error::Io(std::io::Error::other(
                    "the transaction importing the keys was aborted; nothing was recorded",
                ))),
            }
        }
    }

    /// Deletes the dedup record of the key `key` in `scope`, so that the next delivery of its
    /// message is processed again (its body runs): for an operator who reprocesses one message
    /// on purpose. `scope` is the handler's scope and `key` the encoded key, both as the
    /// handler's logs show them (the `scope` and `key` fields of the `idem.handle` span;
    /// [`Key::scope`] and [`Key::value`]). Returns whether a record existed (live or expired).
    ///
    /// Only the dedup record goes: the business rows the first delivery wrote stay, so the
    /// body must be able to run again on top of them. A record is deleted outside any handler's
    /// transaction: a delivery of the same key in flight is unaffected. `unique_constraint`
    /// without `replay` or `fingerprint` keeps no record (its constraint is the record: delete
    /// the business row instead), and neither does `state_machine` (the status is the record:
    /// move it back instead); for those, `forget` finds nothing and returns `false`.
    ///
    /// ```no_run
    /// # async fn demo(store: idem_runtime::PgStore) -> Result<(), sqlx::Error> {
    /// use idem_runtime::Store as _;
    ///
    /// // From a log line: scope=billing.order_paid key=o-1
    /// let existed = store.forget("billing.order_paid", "o-1").await?;
    /// # Ok(()) }
    /// ```
    fn forget(
        &self,
        scope: &str,
        key: &str,
    ) -> impl Future<Output = Result<bool, sqlx::Error>> + Send;

    /// Whether `error` is a unique violation of `constraint`. Stores without business tables
    /// return `false`.
    fn is_unique_violation(&self, error: &dyn sqlx::error::DatabaseError, constraint: &str)
    -> bool;
}

/// A store whose business tables can be the gate of `state_machine`.
pub trait TransitionStore: Store {
    /// The statements of `transition`, quoted for this dialect.
    fn transition_sql(transition: &Transition) -> TransitionSql;

    /// Runs the guarded update and, when it moves nothing, the classifying read, in `tx`.
    fn transition(
        &self,
        tx: &mut Self::Tx,
        statements: &TransitionSql,
        transition: &Transition,
        key: &StateKey,
    ) -> impl Future<Output = Result<TransitionOutcome, sqlx::Error>> + Send;

    /// Opens a write transaction and runs [`transition`](Self::transition) in it. PostgreSQL
    /// sends the guarded update with the `BEGIN`, in one round trip, when asked to
    /// ([`PgStore::with_gate_in_begin`](pg::PgStore::with_gate_in_begin)); otherwise, and on
    /// the other stores, the two steps run.
    fn begin_transition(
        &self,
        statements: &TransitionSql,
        transition: &Transition,
        key: &StateKey,
    ) -> impl Future<Output = Result<Begun<Self::Tx, TransitionOutcome>, sqlx::Error>> + Send
    where
        Self: Sized,
    {
        begin_then_transition(self, statements, transition, key)
    }
}

/// [`Store::begin_claim`] in two steps, every value bound: `begin`, then `claim`.
pub(crate) async fn begin_then_claim<S: Store>(
    store: &S,
    record: &NewRecord<'_>,
) -> Result<Begun<S::Tx, Option<Claim>>, sqlx::Error> {
    let mut tx = store.begin().await?;
    let verdict = store.claim(&mut tx, record).await.map(Some);
    Ok(Begun {
        tx: Some(tx),
        verdict,
    })
}

/// [`TransitionStore::begin_transition`] in two steps, every value bound: `begin`, then
/// `transition`.
pub(crate) async fn begin_then_transition<S: TransitionStore>(
    store: &S,
    statements: &TransitionSql,
    transition: &Transition,
    key: &StateKey,
) -> Result<Begun<S::Tx, TransitionOutcome>, sqlx::Error> {
    let mut tx = store.begin().await?;
    let verdict = store.transition(&mut tx, statements, transition, key).await;
    Ok(Begun {
        tx: Some(tx),
        verdict,
    })
}

/// [`Store::release_savepoint`] and [`Store::rollback_to_savepoint`] for a sqlx store whose
/// transaction derefs to its connection: the same standard statements on every SQL database
/// (each store writes its own [`Store::savepoint`], which must also prove the transaction open).
#[cfg(any(feature = "pg", feature = "mysql", feature = "sqlite"))]
macro_rules! sql_savepoint_endings {
    () => {
        async fn release_savepoint(
            &self,
            tx: &mut Self::Tx,
            name: &str,
        ) -> Result<(), CommitFailure> {
            sqlx::raw_sql($crate::store::savepoint_sql(
                "RELEASE SAVEPOINT {name}",
                name,
            ))
            .execute(&mut **tx)
            .await?;
            Ok(())
        }

        async fn rollback_to_savepoint(
            &self,
            tx: &mut Self::Tx,
            name: &str,
        ) -> Result<(), sqlx::Error> {
            sqlx::raw_sql($crate::store::savepoint_sql(
                "ROLLBACK TO SAVEPOINT {name}; RELEASE SAVEPOINT {name}",
                name,
            ))
            .execute(&mut **tx)
            .await?;
            Ok(())
        }
    };
}
#[cfg(any(feature = "pg", feature = "mysql", feature = "sqlite"))]
pub(crate) use sql_savepoint_endings;

/// The body of [`TransitionStore::transition`] for a sqlx store, the same in every dialect
/// once the statements are built: bind `to`, the key and `from`; run the guarded update; when
/// it moved nothing, run the classifying read. (A macro, because the generic version needs a
/// wall of higher-ranked sqlx bounds.) Rows affected count *matched* rows on MySQL too, as
/// sqlx sets `CLIENT_FOUND_ROWS`.
#[cfg(any(feature = "pg", feature = "mysql", feature = "sqlite"))]
macro_rules! run_transition {
    ($conn:expr, $statements:expr, $transition:expr, $key:expr, uuid = $uuid:ident) => {{
        use $crate::transition::StateKey;
        // Built from identifiers the macro validated and the store quoted; values are bound.
        let update = sqlx::query(sqlx::AssertSqlSafe(std::sync::Arc::clone(
            &$statements.update,
        )))
        .bind($transition.to());
        let mut update = match $key {
            StateKey::Text(text) => update.bind(text.as_str()),
            StateKey::Integer(integer) => update.bind(*integer),
            #[cfg(feature = "uuid")]
            StateKey::Uuid(uuid) => $crate::store::run_transition!(@uuid $uuid, update, uuid),
        };
        for state in $transition.from() {
            update = update.bind(*state);
        }
        if update.execute(&mut *$conn).await?.rows_affected() > 0 {
            Ok($crate::transition::TransitionOutcome::Moved)
        } else {
            let select = sqlx::query_scalar(sqlx::AssertSqlSafe(std::sync::Arc::clone(
                &$statements.select,
            )));
            let select = match $key {
                StateKey::Text(text) => select.bind(text.as_str()),
                StateKey::Integer(integer) => select.bind(*integer),
                #[cfg(feature = "uuid")]
                StateKey::Uuid(uuid) => $crate::store::run_transition!(@uuid $uuid, select, uuid),
            };
            let current: Option<Option<String>> = select.fetch_optional(&mut *$conn).await?;
            Ok($crate::transition::TransitionOutcome::Unmoved { current })
        }
    }};
    (@uuid native, $query:ident, $uuid:ident) => {
        $query.bind(*$uuid)
    };
    (@uuid text, $query:ident, $uuid:ident) => {
        $query.bind($uuid.hyphenated().to_string())
    };
}
#[cfg(any(feature = "pg", feature = "mysql", feature = "sqlite"))]
pub(crate) use run_transition;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_claimed_in_key_order_each_key_once() {
        let keys: Vec<Key> = ["c", "a", "c", "b", "a"]
            .iter()
            .map(|id| Key::new("plan", &[("id", id)]).expect("key"))
            .collect();
        let records: Vec<NewRecord<'_>> = keys
            .iter()
            .map(|key| NewRecord {
                key,
                fingerprint: Some("f"),
                response: None,
                now_ms: 7,
                expires_at_ms: None,
            })
            .collect();
        let plan = BatchPlan::of(&records);
        assert_eq!(
            plan.unique,
            [1, 3, 0],
            "a, b, c: each first occurrence, sorted"
        );
        assert_eq!(plan.twins, [(4, 1), (2, 0)]);
        #[cfg(any(feature = "mysql", feature = "sqlite"))]
        {
            assert_eq!(padded(&plan.unique, 100), [1, 3, 0, 0], "up to four rows");
            assert_eq!(padded(&[5, 6], 100), [5, 6]);
            assert_eq!(
                padded(&[1, 2, 3, 4, 5], 6),
                [1, 2, 3, 4, 5, 5],
                "at most six"
            );
            assert_eq!(padded(&[], 6), [0_usize; 0]);
        }
        let found = StoredRecord {
            fingerprint: None,
            response: Some("1".into()),
            created_at_ms: 3,
        };
        let claims = plan.spread(
            &records,
            vec![
                (1, Claim::Claimed),
                (3, Claim::Existing(found.clone())),
                (0, Claim::Claimed),
            ],
        );
        let written = StoredRecord {
            fingerprint: Some("f".into()),
            response: None,
            created_at_ms: 7,
        };
        assert_eq!(
            claims,
            [
                Claim::Claimed,
                Claim::Claimed,
                Claim::Existing(written.clone()),
                Claim::Existing(found),
                Claim::Existing(written),
            ]
        );
    }
}
