//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`).
//!
//! Every handling records three metrics. idem installs no exporter: install the `metrics`
//! recorder of your choice (Prometheus, StatsD, OpenTelemetry, ...) and they appear there;
//! without a recorder, recording does nothing.
//!
//! | metric | type | labels | unit | what |
//! | --- | --- | --- | --- | --- |
//! | [`idem_handlings_total`](HANDLINGS_TOTAL) | counter | `scope`, `strategy`, `store`, `outcome` | handlings | deliveries handled, by how each ended |
//! | [`idem_handling_duration_seconds`](HANDLING_DURATION_SECONDS) | histogram | `scope`, `strategy`, `store`, `outcome` | seconds | from the start of the handling to its settlement with the broker |
//! | [`idem_attempts_at_success`](ATTEMPTS_AT_SUCCESS) | histogram | `scope`, `strategy`, `store` | deliveries | the delivery number at which a message was processed |
//!
//! The labels:
//!
//! - `scope`: the handler's `scope`;
//! - `strategy`: `dedup_table`, `unique_constraint`, `state_machine`, `lock` or `token`;
//! - `store`: `pg`, `mysql`, `sqlite`, `redis` or `memory`;
//! - `outcome`, one of:
//!   - [`processed`](OUTCOME_PROCESSED): the body ran and its effects were committed, then the
//!     message was acked;
//!   - [`duplicate`](OUTCOME_DUPLICATE): an earlier delivery had committed the message; the
//!     body did not run, the message was acked;
//!   - [`observed_duplicate`](OUTCOME_OBSERVED_DUPLICATE): `mode = "observe"`, the gate found an
//!     earlier delivery and the body ran anyway (what enforcing would have dropped), acked;
//!   - [`retried`](OUTCOME_RETRIED): the delivery failed and was requeued for another attempt:
//!     a retryable failure before the handler's last attempt, or (`lock`, `token`) another
//!     delivery holding the key's lease;
//!   - [`dead_lettered`](OUTCOME_DEAD_LETTERED): the delivery failed for good (a permanent
//!     error, an invalid key, a payload mismatch, or a retryable failure out of attempts) and
//!     was dead-lettered;
//!   - [`failed`](OUTCOME_FAILED): only for a handler called in a transaction you own
//!     (`<name>_in_transaction`), which returned an error. There is no broker there: the
//!     runtime settles nothing, and what happens next is your code's decision.
//!
//! A handling is counted once it is settled with the broker (or, in your transaction, once
//! its savepoint is released or rolled back), with the outcome the runtime chose, even when
//! telling the broker failed (a lost ack: the redelivery will count as a `duplicate`). A
//! handling whose future is dropped before it settles (a cancelled task) is not counted: the
//! broker redelivers that message, and its next handling is.
//!
//! `idem_attempts_at_success` is the acknowledger's [`attempt`](crate::Acknowledger::attempt)
//! (1 when the broker does not count deliveries), recorded for the `processed` and
//! `observed_duplicate` outcomes only: its count is their sum, and how far it sits above 1 is
//! what retries cost. In your transaction there is no delivery to number: nothing is recorded.
//!
//! Histograms are rendered by some exporters as summaries unless they are given buckets;
//! [`DURATION_SECONDS_BUCKETS`] and [`ATTEMPTS_BUCKETS`] are reasonable ones.
//!
//! Recording costs a few atomic operations and the label vectors the facade builds: every
//! label is a `&'static str`, so no string is copied.
//!
//! ```
//! use idem_runtime::{idempotent, MemoryStore, MemoryTx, NoAck};
//! use metrics_exporter_prometheus::PrometheusBuilder;
//!
//! #[derive(serde::Serialize)]
//! struct OrderPaid { order_id: String }
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("payment failed")]
//! struct AppError;
//! impl idem_runtime::HandlerError for AppError {}
//!
//! #[idempotent(key = "order_id", store = "memory", strategy = "dedup_table", scope = "docs.paid")]
//! async fn on_order_paid(_tx: &mut MemoryTx, _msg: OrderPaid) -> Result<(), AppError> {
//!     Ok(())
//! }
//!
//! // In a service: `PrometheusBuilder::new().install_recorder()?` once, at startup.
//! let recorder = PrometheusBuilder::new().build_recorder();
//! let prometheus = recorder.handle();
//! metrics::with_local_recorder(&recorder, || {
//!     let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
//!     runtime.block_on(async {
//!         let store = MemoryStore::new();
//!         let paid = || OrderPaid { order_id: "o-1".into() };
//!         on_order_paid(&store, paid(), NoAck).await?;
//!         on_order_paid(&store, paid(), NoAck).await?;
//!         Ok::<(), idem_runtime::Error<AppError>>(())
//!     })
//! })?;
//! let text = prometheus.render();
//! for outcome in ["processed", "duplicate"] {
//!     let line = format!(
//!         r#"idem_handlings_total{{scope="docs.paid",strategy="dedup_table",store="memory",outcome="{outcome}"}} 1"#
//!     );
//!     assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
//! }
//! # Ok::<(), idem_runtime::Error<AppError>>(())
//! ```

use std::sync::Once;
use std::time::Duration;

use crate::ack::Settlement;
use crate::outcome::Outcome;

/// Counter: handlings, labelled [`LABEL_SCOPE`], [`LABEL_STRATEGY`], [`LABEL_STORE`] and
/// [`LABEL_OUTCOME`].
pub const HANDLINGS_TOTAL: &str = "idem_handlings_total";
/// Histogram, seconds: from the start of a handling to its settlement with the broker,
/// labelled [`LABEL_SCOPE`], [`LABEL_STRATEGY`], [`LABEL_STORE`] and [`LABEL_OUTCOME`].
pub const HANDLING_DURATION_SECONDS: &str = "idem_handling_duration_seconds";
/// Histogram, deliveries: the delivery number ([`Acknowledger::attempt`](crate::Acknowledger::attempt),
/// 1 for the first) at which a message was processed (outcomes `processed` and
/// `observed_duplicate`), labelled [`LABEL_SCOPE`], [`LABEL_STRATEGY`] and [`LABEL_STORE`].
pub const ATTEMPTS_AT_SUCCESS: &str = "idem_attempts_at_success";

/// Label: the handler's `scope`.
pub const LABEL_SCOPE: &str = "scope";
/// Label: the strategy (`dedup_table`, `unique_constraint`, `state_machine`, `lock`, `token`).
pub const LABEL_STRATEGY: &str = "strategy";
/// Label: the store (`pg`, `mysql`, `sqlite`, `redis`, `memory`).
pub const LABEL_STORE: &str = "store";
/// Label: how the handling ended, one of [`OUTCOMES`].
pub const LABEL_OUTCOME: &str = "outcome";

/// Outcome: the body ran, its effects were committed and the message acked.
pub const OUTCOME_PROCESSED: &str = "processed";
/// Outcome: an earlier delivery had committed the message; acked without running the body.
pub const OUTCOME_DUPLICATE: &str = "duplicate";
/// Outcome: `mode = "observe"` found an earlier delivery and ran the body anyway; acked.
pub const OUTCOME_OBSERVED_DUPLICATE: &str = "observed_duplicate";
/// Outcome: the delivery failed and was requeued for another attempt (a retryable failure, or
/// another delivery holding the key's lease).
pub const OUTCOME_RETRIED: &str = "retried";
/// Outcome: the delivery failed for good and was dead-lettered.
pub const OUTCOME_DEAD_LETTERED: &str = "dead_lettered";
/// Outcome: a handler called in your transaction (`_in_transaction`) returned an error; no
/// broker was told anything.
pub const OUTCOME_FAILED: &str = "failed";

/// Every value of the [`LABEL_OUTCOME`] label.
pub const OUTCOMES: [&str; 6] = [
    OUTCOME_PROCESSED,
    OUTCOME_DUPLICATE,
    OUTCOME_OBSERVED_DUPLICATE,
    OUTCOME_RETRIED,
    OUTCOME_DEAD_LETTERED,
    OUTCOME_FAILED,
];

/// Suggested buckets for [`HANDLING_DURATION_SECONDS`], from a millisecond to a minute.
pub const DURATION_SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Suggested buckets for [`ATTEMPTS_AT_SUCCESS`].
pub const ATTEMPTS_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0, 15.0, 20.0, 50.0];

/// Describes the three metrics (unit and help text) to the current recorder.
///
/// The runtime does this by itself at the first handling of the process; call it after
/// installing a recorder to have the descriptions before any message arrives, or when the
/// recorder was installed after the first handling.
pub fn describe() {
    metrics::describe_counter!(
        HANDLINGS_TOTAL,
        metrics::Unit::Count,
        "Message deliveries handled by idem, by scope, strategy, store and outcome"
    );
    metrics::describe_histogram!(
        HANDLING_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time from the start of a handling to its settlement with the broker"
    );
    metrics::describe_histogram!(
        ATTEMPTS_AT_SUCCESS,
        metrics::Unit::Count,
        "The delivery attempt at which a message was processed"
    );
}

/// The labels a handling is recorded with, besides its outcome.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Labels {
    pub(crate) scope: &'static str,
    pub(crate) strategy: &'static str,
    pub(crate) store: &'static str,
}

/// The outcome label of a delivery the runtime acked.
pub(crate) fn acked<T>(outcome: &Outcome<T>) -> &'static str {
    match outcome {
        Outcome::Processed(_) => OUTCOME_PROCESSED,
        Outcome::Duplicate { .. } => OUTCOME_DUPLICATE,
        Outcome::ObservedDuplicate { .. } => OUTCOME_OBSERVED_DUPLICATE,
    }
}

/// The outcome label of a failed delivery, by how the runtime settled it.
pub(crate) fn settled(settlement: &Settlement) -> &'static str {
    match settlement {
        Settlement::Requeue { .. } => OUTCOME_RETRIED,
        Settlement::DeadLetter { .. } => OUTCOME_DEAD_LETTERED,
    }
}

/// Records one handling: counted under `outcome`, its duration, and for a processed message
/// the attempt it succeeded at.
pub(crate) fn record(
    labels: Labels,
    outcome: &'static str,
    elapsed: Duration,
    attempt_at_success: Option<u32>,
) {
    static DESCRIBED: Once = Once::new();
    DESCRIBED.call_once(describe);
    let Labels {
        scope,
        strategy,
        store,
    } = labels;
    metrics::counter!(
        HANDLINGS_TOTAL,
        LABEL_SCOPE => scope,
        LABEL_STRATEGY => strategy,
        LABEL_STORE => store,
        LABEL_OUTCOME => outcome,
    )
    .increment(1);
    metrics::histogram!(
        HANDLING_DURATION_SECONDS,
        LABEL_SCOPE => scope,
        LABEL_STRATEGY => strategy,
        LABEL_STORE => store,
        LABEL_OUTCOME => outcome,
    )
    .record(elapsed.as_secs_f64());
    if let Some(attempt) = attempt_at_success {
        metrics::histogram!(
            ATTEMPTS_AT_SUCCESS,
            LABEL_SCOPE => scope,
            LABEL_STRATEGY => strategy,
            LABEL_STORE => store,
        )
        .record(f64::from(attempt));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ack::RequeueReason;

    #[test]
    fn acked_outcomes_have_their_labels() {
        assert_eq!(acked(&Outcome::Processed(())), "processed");
        assert_eq!(
            acked(&Outcome::<()>::Duplicate { replayed: None }),
            "duplicate"
        );
        let observed = Outcome::ObservedDuplicate {
            value: (),
            first_seen_ms: None,
        };
        assert_eq!(acked(&observed), "observed_duplicate");
        // The span's `outcome` field and the metric's label say the same.
        for outcome in [
            Outcome::Processed(()),
            Outcome::Duplicate { replayed: None },
            observed,
        ] {
            assert_eq!(acked(&outcome), outcome.as_str());
        }
    }

    #[test]
    fn failures_are_labelled_by_their_settlement() {
        let requeue = |reason| Settlement::Requeue {
            attempt: 1,
            delay: Duration::from_secs(1),
            reason,
        };
        assert_eq!(settled(&requeue(RequeueReason::Retryable)), "retried");
        assert_eq!(
            settled(&requeue(RequeueReason::InProgressElsewhere)),
            "retried"
        );
        let letter = Settlement::DeadLetter {
            attempt: 3,
            reason: "gave up".into(),
        };
        assert_eq!(settled(&letter), "dead_lettered");
        // A failure settled by the policy: the last attempt dead-letters.
        let policy = crate::RetryPolicy::with_max_attempts(2);
        let of = |attempt| {
            settled(&Settlement::of_failure(
                crate::Disposition::Retry,
                attempt,
                &policy,
                "deadlock",
                0.5,
            ))
        };
        assert_eq!((of(1), of(2)), ("retried", "dead_lettered"));
    }

    #[test]
    fn the_outcome_values_are_distinct_prometheus_label_values() {
        for (i, outcome) in OUTCOMES.iter().enumerate() {
            assert!(
                outcome.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{outcome}"
            );
            assert!(!OUTCOMES[..i].contains(outcome), "{outcome} twice");
        }
        for name in [
            HANDLINGS_TOTAL,
            HANDLING_DURATION_SECONDS,
            ATTEMPTS_AT_SUCCESS,
        ] {
            assert!(name.starts_with("idem_"), "{name}");
        }
    }

    /// The value of the line `name{labels} value` in Prometheus text.
    fn value(text: &str, name_and_labels: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(name_and_labels)?.trim().parse().ok())
    }

    #[test]
    fn a_handling_is_recorded_under_its_labels() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets(ATTEMPTS_BUCKETS)
            .expect("buckets")
            .build_recorder();
        let labels = Labels {
            scope: "metrics.unit",
            strategy: "dedup_table",
            store: "memory",
        };
        metrics::with_local_recorder(&recorder, || {
            record(labels, OUTCOME_PROCESSED, Duration::from_millis(3), Some(2));
            record(labels, OUTCOME_PROCESSED, Duration::from_millis(1), Some(1));
            record(labels, OUTCOME_RETRIED, Duration::from_millis(2), None);
        });
        let text = recorder.handle().render();
        let base = r#"scope="metrics.unit",strategy="dedup_table",store="memory""#;
        let counted = |outcome: &str| {
            value(
                &text,
                &format!(r#"idem_handlings_total{{{base},outcome="{outcome}"}}"#),
            )
        };
        assert_eq!(counted("processed"), Some(2.0), "{text}");
        assert_eq!(counted("retried"), Some(1.0), "{text}");
        assert_eq!(counted("dead_lettered"), None, "{text}");
        assert_eq!(
            value(
                &text,
                &format!(r#"idem_handling_duration_seconds_count{{{base},outcome="processed"}}"#)
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            value(&text, &format!("idem_attempts_at_success_count{{{base}}}")),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            value(&text, &format!("idem_attempts_at_success_sum{{{base}}}")),
            Some(3.0),
            "{text}"
        );
        assert!(
            text.contains("# TYPE idem_handlings_total counter"),
            "{text}"
        );
    }
}
