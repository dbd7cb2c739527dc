//! The `metrics` feature, end to end (`cargo test -p idem-tests --test metrics`): real handlers
//! on a SQLite file, the Prometheus exporter installed as the global recorder, and the
//! rendered text checked line by line.
//!
//! One test in this binary: the recorder is global to the process.

use idem_runtime::metrics::{ATTEMPTS_BUCKETS, DURATION_SECONDS_BUCKETS};
use idem_runtime::{Disposition, HandlerError, SqliteStore, SqliteTx, Store as _, idempotent};
use idem_tests::{AckEvent, RecordingAck};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

const SCOPE: &str = "idem_tests.metrics.order_paid";
const OBSERVED_SCOPE: &str = "idem_tests.metrics.order_paid_observed";

/// A message, and what its body should do.
#[derive(Debug, Clone)]
struct OrderPaid {
    order_id: String,
    then: Then,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    Succeed,
    FailTransiently,
    FailForGood,
}

fn order(id: &str, then: Then) -> OrderPaid {
    OrderPaid {
        order_id: format!("{}-{id}", idem_tests::run_id()),
        then,
    }
}

#[derive(Debug, thiserror::Error)]
enum OrderError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("the payment service is unavailable")]
    Unavailable,
    #[error("the order is malformed")]
    Malformed,
}

impl HandlerError for OrderError {
    fn disposition(&self) -> Disposition {
        match self {
            Self::Db(error) => idem_runtime::classify_sqlx_error(error),
            Self::Unavailable => Disposition::Retry,
            Self::Malformed => Disposition::DeadLetter,
        }
    }
}

async fn pay(tx: &mut SqliteTx<'_>, msg: &OrderPaid) -> Result<(), OrderError> {
    sqlx::query("INSERT INTO metrics_payments (order_id) VALUES (?1)")
        .bind(&msg.order_id)
        .execute(&mut **tx)
        .await?;
    match msg.then {
        Then::Succeed => Ok(()),
        Then::FailTransiently => Err(OrderError::Unavailable),
        Then::FailForGood => Err(OrderError::Malformed),
    }
}

#[idempotent(
    key = "order_id",
    store = "sqlite",
    strategy = "dedup_table",
    scope = "idem_tests.metrics.order_paid",
    max_attempts = 3
)]
async fn on_order_paid(tx: &mut SqliteTx<'_>, msg: OrderPaid) -> Result<(), OrderError> {
    pay(tx, &msg).await
}

#[idempotent(
    key = "order_id",
    store = "sqlite",
    strategy = "dedup_table",
    scope = "idem_tests.metrics.order_paid_observed",
    mode = "observe"
)]
async fn on_order_paid_observed(tx: &mut SqliteTx<'_>, msg: OrderPaid) -> Result<(), OrderError> {
    pay(tx, &msg).await
}

/// The value of the sample `name{labels}` whose labels include each of `labels`, or `None`
/// when there is no such line. Two matching lines are a failure.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((inside, value)) = rest.split_once("} ") else {
            continue;
        };
        let pairs: Vec<(&str, &str)> = inside
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        if labels.iter().all(|wanted| pairs.contains(wanted)) {
            assert!(
                found.is_none(),
                "two samples of {name} {labels:?} in\n{text}"
            );
            found = Some(value.trim().parse::<f64>().expect("a number"));
        }
    }
    found
}

fn recorder() -> PrometheusHandle {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(idem_runtime::metrics::HANDLING_DURATION_SECONDS.to_owned()),
            DURATION_SECONDS_BUCKETS,
        )
        .expect("duration buckets")
        .set_buckets_for_metric(
            Matcher::Full(idem_runtime::metrics::ATTEMPTS_AT_SUCCESS.to_owned()),
            ATTEMPTS_BUCKETS,
        )
        .expect("attempt buckets")
        .install_recorder()
        .expect("the only recorder of this test binary")
}

#[tokio::test]
async fn handlings_are_counted_by_outcome_in_prometheus_text() {
    idem_tests::init_tracing();
    let prometheus = recorder();
    let store = SqliteStore::open(idem_tests::sqlite::db_path("metrics"))
        .await
        .expect("open");
    store.migrate().await.expect("migrate");
    sqlx::query("CREATE TABLE metrics_payments (order_id TEXT NOT NULL)")
        .execute(store.pool())
        .await
        .expect("create the business table");

    // Three fresh messages, each at its first delivery.
    for id in ["a", "b", "c"] {
        let outcome = on_order_paid(&store, order(id, Then::Succeed), RecordingAck::new())
            .await
            .expect("processed");
        assert!(outcome.is_processed(), "{outcome:?}");
    }
    // Two of them again.
    for id in ["a", "b"] {
        let outcome = on_order_paid(
            &store,
            order(id, Then::Succeed),
            RecordingAck::at_attempt(2),
        )
        .await
        .expect("duplicate");
        assert!(outcome.is_duplicate(), "{outcome:?}");
    }
    // A retryable failure at the first delivery, requeued; the second delivery succeeds.
    let ack = RecordingAck::at_attempt(1);
    on_order_paid(&store, order("d", Then::FailTransiently), ack.clone())
        .await
        .expect_err("a transient failure");
    assert!(ack.requeued_once(), "{:?}", ack.events());
    let outcome = on_order_paid(
        &store,
        order("d", Then::Succeed),
        RecordingAck::at_attempt(2),
    )
    .await
    .expect("processed at the second delivery");
    assert!(outcome.is_processed(), "{outcome:?}");
    // A permanent failure: dead-lettered at once.
    let ack = RecordingAck::at_attempt(1);
    on_order_paid(&store, order("e", Then::FailForGood), ack.clone())
        .await
        .expect_err("a permanent failure");
    assert!(ack.dead_lettered_with("malformed"), "{:?}", ack.events());
    // A retryable failure at the last attempt: dead-lettered too.
    let ack = RecordingAck::at_attempt(3);
    on_order_paid(&store, order("f", Then::FailTransiently), ack.clone())
        .await
        .expect_err("out of attempts");
    assert!(
        matches!(ack.events().as_slice(), [AckEvent::DeadLetter(reason)] if reason.contains("gave up after 3")),
        "{:?}",
        ack.events()
    );
    // In a transaction of the caller's: processed, then a failure (no broker: "failed").
    let mut tx = store.begin().await.expect("begin");
    let outcome = on_order_paid_in_transaction(&store, &mut tx, order("g", Then::Succeed))
        .await
        .expect("processed in the caller's transaction");
    assert!(outcome.is_processed(), "{outcome:?}");
    on_order_paid_in_transaction(&store, &mut tx, order("h", Then::FailForGood))
        .await
        .expect_err("a failure in the caller's transaction");
    store.commit(tx).await.expect("commit");
    // Observe mode: the second delivery runs the body anyway, at delivery 4.
    on_order_paid_observed(&store, order("x", Then::Succeed), RecordingAck::new())
        .await
        .expect("processed");
    let outcome = on_order_paid_observed(
        &store,
        order("x", Then::Succeed),
        RecordingAck::at_attempt(4),
    )
    .await
    .expect("observed");
    assert!(outcome.is_observed_duplicate(), "{outcome:?}");

    let text = prometheus.render();
    let labels = |scope, outcome| {
        [
            ("scope", scope),
            ("strategy", "dedup_table"),
            ("store", "sqlite"),
            ("outcome", outcome),
        ]
    };
    let count = |scope, outcome| sample(&text, "idem_handlings_total", &labels(scope, outcome));
    // a, b, c, d (second delivery), g (in the transaction).
    assert_eq!(count(SCOPE, "processed"), Some(5.0), "{text}");
    assert_eq!(count(SCOPE, "duplicate"), Some(2.0), "{text}");
    assert_eq!(count(SCOPE, "retried"), Some(1.0), "{text}");
    // e (permanent), f (out of attempts).
    assert_eq!(count(SCOPE, "dead_lettered"), Some(2.0), "{text}");
    assert_eq!(count(SCOPE, "failed"), Some(1.0), "{text}");
    assert_eq!(count(SCOPE, "observed_duplicate"), None, "{text}");
    assert_eq!(count(OBSERVED_SCOPE, "processed"), Some(1.0), "{text}");
    assert_eq!(
        count(OBSERVED_SCOPE, "observed_duplicate"),
        Some(1.0),
        "{text}"
    );

    // One duration per handling, under the same labels.
    let durations: f64 = idem_runtime::metrics::OUTCOMES
        .iter()
        .filter_map(|outcome| {
            sample(
                &text,
                "idem_handling_duration_seconds_count",
                &labels(SCOPE, outcome),
            )
        })
        .sum();
    assert_eq!(durations, 11.0, "{text}");
    let le_inf = |outcome| {
        let [scope, strategy, store, outcome] = labels(SCOPE, outcome);
        sample(
            &text,
            "idem_handling_duration_seconds_bucket",
            &[scope, strategy, store, outcome, ("le", "+Inf")],
        )
    };
    assert_eq!(le_inf("processed"), Some(5.0), "{text}");

    // Attempts at success: a, b, c at 1, d at 2; not the call in the caller's transaction.
    let base = |scope| {
        [
            ("scope", scope),
            ("strategy", "dedup_table"),
            ("store", "sqlite"),
        ]
    };
    let attempts = |suffix: &str, scope| {
        sample(
            &text,
            &format!("idem_attempts_at_success_{suffix}"),
            &base(scope),
        )
    };
    assert_eq!(attempts("count", SCOPE), Some(4.0), "{text}");
    assert_eq!(attempts("sum", SCOPE), Some(5.0), "{text}");
    let [scope, strategy, store_label] = base(SCOPE);
    assert_eq!(
        sample(
            &text,
            "idem_attempts_at_success_bucket",
            &[scope, strategy, store_label, ("le", "1")]
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(attempts("count", OBSERVED_SCOPE), Some(2.0), "{text}");
    assert_eq!(attempts("sum", OBSERVED_SCOPE), Some(5.0), "{text}");

    // Described, with their types.
    for line in [
        "# TYPE idem_handlings_total counter",
        "# TYPE idem_handling_duration_seconds histogram",
        "# TYPE idem_attempts_at_success histogram",
        "# HELP idem_handlings_total Message deliveries handled by idem, by scope, strategy, store and outcome",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }

    // The effects: one row per processed message (and the observed duplicate's second).
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM metrics_payments")
        .fetch_one(store.pool())
        .await
        .expect("count");
    assert_eq!(rows, 7);
}
