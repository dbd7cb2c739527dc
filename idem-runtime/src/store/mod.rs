//! Where dedup records live, and the transactions the handler's body runs in.
//!
//! One file per backend, each behind a cargo feature: [`pg`] (`pg`), [`sqlite`] (`sqlite`),
//! and [`memory`] (always on, for unit tests only: it forgets everything on restart).
//!
//! # The dedup table
//!
//! SQL stores keep one row per processed message in `idem_records`, created by the store's
//! `migrate()` (safe to run any number of times):
//!
//! | column | meaning |
//! |---|---|
//! | `scope` | the handler's namespace ([`Key::scope`]) |
//! | `record_key` | the encoded key ([`Key::value`]) |
//! | `fingerprint` | SHA-256 of the JSON payload, when the handler has `fingerprint` |
//! | `response` | the JSON result, when the handler has `replay` |
//! | `created_at_ms` | when the record was written, Unix milliseconds |
//! | `expires_at_ms` | when it stops counting, Unix milliseconds; `NULL` = never (no `ttl`) |
//!
//! Timestamps are integers so that one schema reads the same on every database. An expired
//! record no longer makes a delivery a duplicate: the next delivery takes it over. Delete
//! expired rows with the store's `purge_expired()`.

use std::future::Future;

use crate::key::Key;

pub mod memory;
#[cfg(feature = "pg")]
pub mod pg;
#[cfg(feature = "sqlite")]
pub mod sqlite;

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
}

/// A dedup row as SQL stores read it: fingerprint, response, expiry.
pub(crate) type RecordRow = (Option<String>, Option<String>, Option<i64>);

/// The record in `row`, if there is one and it has not expired at `now_ms`.
pub(crate) fn live_record(row: Option<RecordRow>, now_ms: i64) -> Option<StoredRecord> {
    let (fingerprint, response, expires_at_ms) = row?;
    expires_at_ms
        .is_none_or(|expires| expires > now_ms)
        .then_some(StoredRecord {
            fingerprint,
            response,
        })
}

/// The result of writing a dedup record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The record is ours: no live record existed (or an expired one was taken over).
    Claimed,
    /// A live record exists: an earlier delivery committed this message.
    Existing(StoredRecord),
}

/// A backend that runs the handler's transaction and keeps dedup records.
///
/// Implemented by [`PgStore`](pg::PgStore), [`SqliteStore`](sqlite::SqliteStore) and
/// [`MemoryStore`](memory::MemoryStore). The strategies are written against this trait only,
/// so a new backend is one file.
pub trait Store: Send + Sync {
    /// The transaction the handler's body receives as `&mut Self::Tx`.
    type Tx: Send;

    /// The store's name in `store = "..."`, for logs.
    const NAME: &'static str;

    /// Opens a write transaction.
    fn begin(&self) -> impl Future<Output = Result<Self::Tx, sqlx::Error>> + Send;

    /// Commits. When this returns `Ok`, the effects are durable.
    fn commit(tx: Self::Tx) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Rolls back.
    fn rollback(tx: Self::Tx) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Writes `record` inside `tx`, unless a live record exists for its key. A concurrent
    /// transaction writing the same key makes this wait until that one ends, so a twin in
    /// flight is never mistaken for a fresh key. An expired record is taken over.
    fn claim(
        &self,
        tx: &mut Self::Tx,
        record: &NewRecord<'_>,
    ) -> impl Future<Output = Result<Claim, sqlx::Error>> + Send;

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

    /// Whether `error` is a unique violation of `constraint` (or of any unique constraint,
    /// when `None`). Stores without business tables return `false`.
    fn is_unique_violation(
        &self,
        error: &dyn sqlx::error::DatabaseError,
        constraint: Option<&str>,
    ) -> bool;
}
