//! In-process memory (`store = "memory"`): **for unit tests only**.
//!
//! It forgets every record when the process exits, so a redelivery after a restart runs the
//! body again: it breaks the "persisted, never in memory" rule on purpose, to let you test
//! handler logic without a database. It supports `dedup_table` only (there is no business
//! table whose constraint could fire).
//!
//! What happens to a duplicate here: the gate takes a per-key async lock that the transaction
//! holds until it commits or rolls back (as a database row lock would), then looks the key up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::OwnedMutexGuard;

use super::{Claim, NewRecord, Store, StoredRecord};
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
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

/// The "transaction" an `#[idempotent(store = "memory")]` handler's body receives. It holds the
/// key's lock and the pending record; there is nothing for the body to write through it.
#[derive(Debug)]
pub struct MemoryTx {
    inner: Arc<Inner>,
    held: Vec<(RecordId, OwnedMutexGuard<()>)>,
    pending: Vec<(RecordId, MemoryRecord)>,
}

impl MemoryTx {
    fn release(mut self) {
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

    /// Forgets every record: what a process restart does to this store.
    pub fn clear(&self) {
        lock(&self.inner.records).clear();
    }

    /// Deletes records that expired before now; returns how many.
    pub fn purge_expired(&self) -> u64 {
        let now = crate::strategy::now_ms();
        let mut records = lock(&self.inner.records);
        let before = records.len();
        records.retain(|_, record| record.is_live(now));
        (before - records.len()) as u64
    }
}

fn record_id(key: &Key) -> RecordId {
    (key.scope().to_owned(), key.value().to_owned())
}

impl Store for MemoryStore {
    type Tx = MemoryTx;
    const NAME: &'static str = "memory";

    async fn begin(&self) -> Result<Self::Tx, sqlx::Error> {
        Ok(MemoryTx {
            inner: Arc::clone(&self.inner),
            held: Vec::new(),
            pending: Vec::new(),
        })
    }

    async fn commit(mut tx: Self::Tx) -> Result<(), sqlx::Error> {
        {
            let mut records = lock(&tx.inner.records);
            records.extend(tx.pending.drain(..));
        }
        tx.release();
        Ok(())
    }

    async fn rollback(tx: Self::Tx) -> Result<(), sqlx::Error> {
        tx.release();
        Ok(())
    }

    async fn claim(&self, tx: &mut Self::Tx, record: &NewRecord<'_>) -> Result<Claim, sqlx::Error> {
        let id = record_id(record.key);
        let key_lock = Arc::clone(lock(&self.inner.key_locks).entry(id.clone()).or_default());
        let guard = key_lock.lock_owned().await;
        tx.held.push((id.clone(), guard));
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

    fn is_unique_violation(
        &self,
        _error: &dyn sqlx::error::DatabaseError,
        _constraint: Option<&str>,
    ) -> bool {
        false
    }
}
