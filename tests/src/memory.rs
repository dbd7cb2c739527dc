//! The memory store for the conformance suite: a fresh one per test.

use idem_runtime::MemoryStore;

/// A fresh, empty memory store.
pub fn store() -> MemoryStore {
    MemoryStore::new()
}
