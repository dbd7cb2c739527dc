//! Failpoints: named places in the pipeline where a chaos test can stop the process, for the
//! `failpoints` cargo feature only. Without the feature every site compiles to nothing.
//!
//! They are [`fail`] crate failpoints, so a test (or a chaos harness) arms them with
//! [`fail::cfg`] or [`fail::cfg_callback`], or with the `FAILPOINTS` environment variable and
//! [`fail::FailScenario`]. The one action worth taking at most of them is to kill the process:
//! what happens to a delivery when its consumer dies at that moment is the question each
//! answers.
//!
//! | failpoint | where | a consumer killed here leaves |
//! |---|---|---|
//! | [`AFTER_GATE`] | the gate let the delivery in, before the body | an open transaction the database rolls back; the broker redelivers |
//! | [`AFTER_BODY`] | the body returned, before the gate after it | the same |
//! | [`BEFORE_COMMIT`] | the commit is about to be sent | the same |
//! | [`AFTER_COMMIT`] | committed, before the ack | committed effects and an unacked delivery: the redelivery is a duplicate |
//! | [`AFTER_ACK`] | acked | nothing to redo |
//!
//! A duplicate passes only the last two (it is acked like a processed delivery). On the Redis
//! store (`lock`, `token`) the "commit" is the script that writes the done marker.
//!
//! ```
//! # #[cfg(feature = "failpoints")] {
//! use idem_runtime::failpoints;
//!
//! let scenario = fail::FailScenario::setup();
//! // Panic (instead of killing the process) when a delivery has committed but is not acked.
//! fail::cfg(failpoints::AFTER_COMMIT, "panic").unwrap();
//! fail::remove(failpoints::AFTER_COMMIT);
//! scenario.teardown();
//! # }
//! ```

pub use fail;

/// The gate let the delivery in; the body has not started.
pub const AFTER_GATE: &str = "idem::after_gate";
/// The body returned (success or failure); nothing after it has run.
pub const AFTER_BODY: &str = "idem::after_body";
/// The transaction (or, on Redis, the done marker) is about to be committed.
pub const BEFORE_COMMIT: &str = "idem::before_commit";
/// The delivery's effects are committed; the broker has not been told.
pub const AFTER_COMMIT: &str = "idem::after_commit";
/// The broker has been told (ack, or the ack failed and was logged).
pub const AFTER_ACK: &str = "idem::after_ack";

/// PostgreSQL's one-round-trip gate found the key taken (or, under `state_machine`, the row
/// unmoved) and is about to read the record (the row's state) with a second statement. Not a
/// place to kill a consumer (nothing is open here): a test hook, for what another transaction
/// does between the two statements. Not in [`ALL`].
pub const BEFORE_TAKEN_KEY_READ: &str = "idem::before_taken_key_read";

/// Every failpoint, in the order a delivery passes them.
pub const ALL: [&str; 5] = [
    AFTER_GATE,
    AFTER_BODY,
    BEFORE_COMMIT,
    AFTER_COMMIT,
    AFTER_ACK,
];

/// Evaluates the failpoint `name`: whatever action is configured for it runs here.
pub(crate) fn hit(name: &str) {
    fail::eval(name, |_| ());
}
