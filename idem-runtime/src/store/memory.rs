//! In-process memory (`store = "memory"`): **for unit tests only**.
//!
//! It forgets every record when the process exits, so a redelivery after a restart runs the
//! body again: it breaks the "persisted, never in memory" rule on purpose, to let you test
//! handler logic without a database. It supports `dedup_table` only (there is no business
//! table whose constraint could fire).
//!
//! What happens to a duplicate here: the gate takes a per-key async lock that the transaction
//! holds until it commits, rolls back or is dropped (as a database row lock would), then looks
//! the key up.
//!
//! The body's "writes" can ride on the transaction too: [`MemoryTx::on_commit`] runs a closure
//! when, and only when, the transaction commits, so a unit test can count effects exactly as
//! it would count rows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::OwnedMutexGuard;

use super::records::{AgedBatch, RecordDetails, RecordStats, Records, ScopeStats};
use super::{Claim, CommitFailure, NewRecord, Store, StoredRecord, sealed};
use crate::clock::{Clock, SharedClock, Sleep};
use crate::key::Key;

type RecordId = (String, String);

#[derive(Debug, Clone)]
struct MemoryRecord {
    stored: StoredRecord,
    expires_at_ms: Option<i64>,
}

impl MemoryRecord {
    fn is_live(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_none_or(|expires| expires > now_ms)
    }
}

#[derive(Debug, Default)]
struct Inner {
    records: Mutex<HashMap<RecordId, MemoryRecord>>,
    key_locks: Mutex<HashMap<RecordId, Arc<tokio::sync::Mutex<()>>>>,
}

/// Poisoning only means another test thread panicked mid-update of a map; the map itself is
/// still consistent (every update is a single insert or remove), so keep going.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Dedup records in a `HashMap`, for unit tests. Cloning shares the records.
///
/// ```
/// use idem_runtime::MemoryStore;
///
/// let store = MemoryStore::new();
/// assert_eq!(store.len(), 0);
/// ```
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
    clock: SharedClock,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            clock: crate::clock::system(),
        }
    }
}

type Effect = Box<dyn FnOnce() + Send>;

/// The "transaction" an `#[idempotent(store = "memory")]` handler's body receives. It holds the
/// key's lock and the pending record, and the effects registered with
/// [`on_commit`](Self::on_commit). Dropping it (a panic, a cancelled handler) rolls back.
pub struct MemoryTx {
    inner: Arc<Inner>,
    held: Vec<(RecordId, OwnedMutexGuard<()>)>,
    pending: Vec<(RecordId, MemoryRecord)>,
    effects: Vec<Effect>,
    /// `in_transaction`'s savepoints, innermost last: each name, and how many locks, records
    /// and effects were held or pending when it was taken.
    savepoints: Vec<(String, usize, usize, usize)>,
}

impl std::fmt::Debug for MemoryTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTx")
            .field("held", &self.held.len())
            .field("pending", &self.pending)
            .field("effects", &self.effects.len())
            .finish()
    }
}

impl MemoryTx {
    /// Runs `effect` if and when this transaction commits; never if it rolls back. The memory
    /// store's stand-in for the body's database writes. An effect that panics fails the commit
    /// (a retryable error; the record is not written, the effects before it have run).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// use idem_runtime::{idempotent, HandlerError, MemoryStore, MemoryTx, NoAck};
    ///
    /// #[derive(Debug, thiserror::Error)]
    /// #[error("never")]
    /// struct Never;
    /// impl HandlerError for Never {}
    ///
    /// static SENT: AtomicU32 = AtomicU32::new(0);
    ///
    /// #[idempotent(key = "0", store = "memory", strategy = "dedup_table", scope = "doc.on_commit")]
    /// async fn send(tx: &mut MemoryTx, msg: (String,)) -> Result<(), Never> {
    ///     tx.on_commit(|| { SENT.fetch_add(1, Ordering::SeqCst); });
    ///     Ok(())
    /// }
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let store = MemoryStore::new();
    /// send(&store, ("m-1".into(),), NoAck).await.unwrap();
    /// send(&store, ("m-1".into(),), NoAck).await.unwrap();
    /// assert_eq!(SENT.load(Ordering::SeqCst), 1);
    /// # });
    /// ```
    pub fn on_commit(&mut self, effect: impl FnOnce() + Send + 'static) {
        self.effects.push(Box::new(effect));
    }

    fn release(&mut self) {
        let ids: Vec<RecordId> = self.held.drain(..).map(|(id, _guard)| id).collect();
        let mut locks = lock(&self.inner.key_locks);
        for id in ids {
            // Drop the map's entry once nobody else waits on it, so the map does not grow.
            if locks.get(&id).is_some_and(|l| Arc::strong_count(l) == 1) {
                locks.remove(&id);
            }
        }
    }
}

impl Drop for MemoryTx {
    /// A transaction dropped without commit (a panicking body, a cancelled handler) rolls back:
    /// its key locks and their map entries are released.
    fn drop(&mut self) {
        self.release();
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of records held, expired ones included.
    pub fn len(&self) -> usize {
        lock(&self.inner.records).len()
    }

    /// `true` when no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the time from `clock` instead of the system's (for tests of expiry).
    #[must_use]
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Whether a record (live or expired) exists for `key` in `scope`.
    pub fn has_record(&self, scope: &str, key: &str) -> bool {
        lock(&self.inner.records).contains_key(&(scope.to_owned(), key.to_owned()))
    }

    /// Number of per-key locks held or awaited right now: 0 once every transaction ended.
    pub fn locked_keys(&self) -> usize {
        lock(&self.inner.key_locks).len()
    }

    /// Forgets every record: what a process restart does to this store.
    pub fn clear(&self) {
        lock(&self.inner.records).clear();
    }

    /// Deletes records that expired before now; returns how many.
    pub fn purge_expired(&self) -> u64 {
        let now = self.clock.now_ms();
        let mut records = lock(&self.inner.records);
        let before = records.len();
        records.retain(|_, record| record.is_live(now));
        (before - records.len()) as u64
    }
}

impl Records for MemoryStore {
    async fn purge_expired_batch(
        &self,
        now_ms: i64,
        scope: Option<&str>,
        limit: u32,
    ) -> Result<u64, sqlx::Error> {
        let mut records = lock(&self.inner.records);
        let doomed: Vec<RecordId> = records
            .iter()
            .filter(|((in_scope, _), record)| {
                !record.is_live(now_ms) && scope.is_none_or(|scope| scope == in_scope)
            })
            .map(|(id, _)| id.clone())
            .take(limit as usize)
            .collect();
        for id in &doomed {
            records.remove(id);
        }
        Ok(doomed.len() as u64)
    }

    async fn purge_created_before_batch(
        &self,
        cutoff_ms: i64,
        scope: Option<&str>,
        after: (&str, &str),
        limit: u32,
    ) -> Result<AgedBatch, sqlx::Error> {
        let mut records = lock(&self.inner.records);
        let mut window: Vec<RecordId> = records
            .keys()
            .filter(|(in_scope, key)| {
                scope.is_none_or(|scope| scope == in_scope)
                    && (in_scope.as_str(), key.as_str()) > after
            })
            .cloned()
            .collect();
        window.sort_unstable();
        let limit = limit.max(1) as usize;
        // A full window may have more after it; a shorter one is the last.
        let last = (window.len() >= limit).then(|| window[limit - 1].clone());
        window.truncate(limit);
        let mut deleted = 0;
        for id in &window {
            if records
                .get(id)
                .is_some_and(|record| record.stored.created_at_ms < cutoff_ms)
            {
                records.remove(id);
                deleted += 1;
            }
        }
        Ok(AgedBatch { deleted, last })
    }

    async fn stats(&self) -> Result<RecordStats, sqlx::Error> {
        let now_ms = self.clock.now_ms();
        let records = lock(&self.inner.records);
        let mut scopes: std::collections::BTreeMap<&str, ScopeStats> = Default::default();
        for ((scope, _), record) in records.iter() {
            let created = record.stored.created_at_ms;
            let entry = scopes
                .entry(scope)
                .or_insert_with(|| ScopeStats::from_row((scope.clone(), 0, 0, created, created)));
            entry.records += 1;
            entry.expired += u64::from(!record.is_live(now_ms));
            entry.oldest_created_at_ms = entry.oldest_created_at_ms.min(created);
            entry.newest_created_at_ms = entry.newest_created_at_ms.max(created);
        }
        Ok(RecordStats {
            scopes: scopes.into_values().collect(),
            table_bytes: None,
            now_ms,
        })
    }

    async fn inspect(&self, scope: &str, key: &str) -> Result<Option<RecordDetails>, sqlx::Error> {
        let now_ms = self.clock.now_ms();
        let records = lock(&self.inner.records);
        Ok(records
            .get(&(scope.to_owned(), key.to_owned()))
            .map(|record| {
                let stored = record.stored.clone();
                let row = (
                    stored.fingerprint,
                    stored.response,
                    stored.created_at_ms,
                    record.expires_at_ms,
                );
                RecordDetails::from_row(scope, key, row, now_ms)
            }))
    }

    fn sleep(&self, duration: std::time::Duration) -> Sleep<'_> {
        self.clock.sleep(duration)
    }
}

fn record_id(key: &Key) -> RecordId {
    (key.scope().to_owned(), key.value().to_owned())
}

impl sealed::Sealed for MemoryStore {}

impl Store for MemoryStore {
    type Tx = MemoryTx;
    const NAME: &'static str = "memory";

    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    async fn begin(&self) -> Result<Self::Tx, sqlx::Error> {
        Ok(MemoryTx {
            inner: Arc::clone(&self.inner),
            held: Vec::new(),
            pending: Vec::new(),
            effects: Vec::new(),
            savepoints: Vec::new(),
        })
    }

    async fn commit(&self, mut tx: Self::Tx) -> Result<(), CommitFailure> {
        // Effects first: one that panics fails the commit (retryable) before the record is
        // written, so the delivery is settled and redelivered rather than left hanging.
        for effect in tx.effects.drain(..) {
            if let Err(message) = crate::unwind::catch_sync(effect) {
                return Err(CommitFailure::Database(sqlx::Error::Io(
                    std::io::Error::other(format!("an on_commit effect panicked: {message}")),
                )));
            }
        }
        {
            let mut records = lock(&tx.inner.records);
            records.extend(tx.pending.drain(..));
        }
        // Dropping `tx` releases its key locks.
        Ok(())
    }

    async fn ensure_open(&self, _tx: &mut Self::Tx) -> Result<(), CommitFailure> {
        Ok(())
    }

    async fn rollback(tx: Self::Tx) -> Result<(), sqlx::Error> {
        drop(tx);
        Ok(())
    }

    async fn savepoint(&self, tx: &mut Self::Tx, name: &str) -> Result<(), CommitFailure> {
        let mark = (
            name.to_owned(),
            tx.held.len(),
            tx.pending.len(),
            tx.effects.len(),
        );
        tx.savepoints.push(mark);
        Ok(())
    }

    async fn release_savepoint(&self, tx: &mut Self::Tx, name: &str) -> Result<(), CommitFailure> {
        match tx.savepoints.iter().rposition(|(taken, ..)| taken == name) {
            Some(at) => {
                tx.savepoints.truncate(at);
                Ok(())
            }
            None => Err(CommitFailure::Aborted),
        }
    }

    async fn rollback_to_savepoint(
        &self,
        tx: &mut Self::Tx,
        name: &str,
    ) -> Result<(), sqlx::Error> {
        let Some(at) = tx.savepoints.iter().rposition(|(taken, ..)| taken == name) else {
            return Err(sqlx::Error::Io(std::io::Error::other(format!(
                "no savepoint {name} in this memory transaction"
            ))));
        };
        let (_, held, pending, effects) = tx.savepoints[at].clone();
        tx.savepoints.truncate(at);
        tx.pending.truncate(pending);
        tx.effects.truncate(effects);
        // As a database releases the row locks of a rolled-back savepoint.
        let released: Vec<RecordId> = tx.held.drain(held..).map(|(id, _guard)| id).collect();
        let mut locks = lock(&tx.inner.key_locks);
        for id in released {
            if locks.get(&id).is_some_and(|l| Arc::strong_count(l) == 1) {
                locks.remove(&id);
            }
        }
        Ok(())
    }

    async fn claim(&self, tx: &mut Self::Tx, record: &NewRecord<'_>) -> Result<Claim, sqlx::Error> {
        let id = record_id(record.key);
        // A transaction that already holds the key (a claim rolled back to a savepoint, then
        // tried again) must not wait on its own lock.
        if !tx.held.iter().any(|(held, _)| *held == id) {
            let key_lock = Arc::clone(lock(&self.inner.key_locks).entry(id.clone()).or_default());
            let guard = key_lock.lock_owned().await;
            tx.held.push((id.clone(), guard));
        }
        if let Some((_, pending)) = tx.pending.iter().find(|(pending, _)| *pending == id)
            && pending.is_live(record.now_ms)
        {
            return Ok(Claim::Existing(pending.stored.clone()));
        }
        if let Some(existing) = lock(&self.inner.records).get(&id)
            && existing.is_live(record.now_ms)
        {
            return Ok(Claim::Existing(existing.stored.clone()));
        }
        tx.pending.push((
            id,
            MemoryRecord {
                stored: StoredRecord {
                    fingerprint: record.fingerprint.map(str::to_owned),
                    response: record.response.map(str::to_owned),
                    created_at_ms: record.now_ms,
                },
                expires_at_ms: record.expires_at_ms,
            },
        ));
        Ok(Claim::Claimed)
    }

    async fn save_response(
        &self,
        tx: &mut Self::Tx,
        key: &Key,
        response: &str,
    ) -> Result<(), sqlx::Error> {
        let id = record_id(key);
        if let Some((_, pending)) = tx.pending.iter_mut().find(|(pid, _)| *pid == id) {
            pending.stored.response = Some(response.to_owned());
        }
        Ok(())
    }

    async fn find_record(
        &self,
        key: &Key,
        now_ms: i64,
    ) -> Result<Option<StoredRecord>, sqlx::Error> {
        Ok(lock(&self.inner.records)
            .get(&record_id(key))
            .filter(|record| record.is_live(now_ms))
            .map(|record| record.stored.clone()))
    }

    async fn forget(&self, scope: &str, key: &str) -> Result<bool, sqlx::Error> {
        let id = (scope.to_owned(), key.to_owned());
        Ok(lock(&self.inner.records).remove(&id).is_some())
    }

    fn is_unique_violation(
        &self,
        _error: &dyn sqlx::error::DatabaseError,
        _constraint: &str,
    ) -> bool {
        false
    }
}
