//! Card charges gated by single-use tokens in Redis (`store = "redis"`, `strategy = "token"`):
//! a checkout is charged once, however often its charge message is submitted.
//!
//! ```text
//! cargo run --example payments_redis
//! ```
//!
//! Against the local Redis (`IDEM_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`); the run
//! fails at once if Redis is not reachable. Tokens are random, so every run uses fresh ones
//! and runs do not see each other's records.
//!
//! The story: when a checkout page is rendered, the service mints a token
//! ([`RedisStore::issue_token`]) and puts it in the form. Submitting the form publishes a
//! `ChargeRequested` message carrying the token, and the consumer charges the card. The charge
//! is **not idempotent by itself**: every call appends a charge to the ledger (here an
//! in-process ledger standing in for the payment provider), so a second application would show
//! as a second row. For each of eight checkouts:
//!
//! - the charge message is delivered **three times at once** (a double click, and a broker
//!   redelivery racing the original): one delivery takes the token, the others find it in use
//!   ([`Error::InProgress`]: requeued, never acked) and, redelivered once it has settled, find it
//!   spent by a success: duplicates, acked, with the first charge's receipt replayed;
//! - then it is **submitted once more** (the client retried after a timeout): a duplicate, with
//!   the same receipt.
//!
//! A ninth message carries a token that was never issued: [`Error::UnknownToken`], which a
//! real consumer dead-letters; here it is printed. The last line reports what happened, and the
//! exit code is non-zero if a checkout was charged twice, not at all, or got two receipts.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;
use idem_runtime::{Disposition, Error, NoAck, Outcome, RedisStore, idempotent};
use tokio::sync::watch;

/// The handlers' scope (tokens are minted for it).
const SCOPE: &str = "example.payments_redis.charge";

/// The message: charge the card of a checkout, carrying the token its form was rendered with.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ChargeRequested {
    /// The single-use token minted with the checkout page.
    token: String,
    /// The checkout being paid.
    checkout_id: String,
    /// The amount to charge, in cents.
    amount_cents: i64,
}

/// What the payment provider returns for a charge, replayed to every duplicate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Receipt {
    /// The provider's charge id.
    charge_id: u64,
}

/// One charge the provider applied.
#[derive(Debug, Clone)]
struct Applied {
    checkout_id: String,
    amount_cents: i64,
}

/// The payment provider's ledger: every call of the body appends a charge. Not idempotent on
/// purpose: a second application of one message would be a second row.
static LEDGER: Mutex<Vec<Applied>> = Mutex::new(Vec::new());

/// The handler: consumes the message's token in one round trip, charges, and turns the token
/// into a done marker holding the receipt (`replay`), so that every later delivery gets the
/// same receipt without charging again.
#[idempotent(
    key = "token",
    store = "redis",
    strategy = "token",
    scope = "example.payments_redis.charge",
    replay
)]
async fn on_charge_requested(msg: ChargeRequested) -> Result<Receipt, std::convert::Infallible> {
    let mut ledger = LEDGER.lock().unwrap_or_else(PoisonError::into_inner);
    ledger.push(Applied {
        checkout_id: msg.checkout_id,
        amount_cents: msg.amount_cents,
    });
    Ok(Receipt {
        charge_id: u64::try_from(ledger.len()).unwrap_or(u64::MAX),
    })
}

/// How one submission ended, after its redeliveries.
#[derive(Debug)]
enum Settled {
    /// This delivery charged the card.
    Charged(Receipt),
    /// A duplicate: acked without charging, with the first charge's receipt.
    Duplicate(Option<Receipt>),
    /// Dead-lettered: the token is unknown.
    Rejected(String),
}

/// Counts kept by the in-process "broker".
#[derive(Debug, Default)]
struct Counts {
    submitted: u64,
    charged: u64,
    duplicates: u64,
    requeued: u64,
    rejected: u64,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Delivers `msg` as a broker would: a delivery found in progress elsewhere is requeued and
/// delivered again once another delivery has settled (`settled` counts them; a broker would
/// wait `lease_remaining` at most); returns how it ended and how often it was requeued.
async fn deliver(
    store: &RedisStore,
    msg: ChargeRequested,
    settled: &watch::Sender<u64>,
) -> Result<(Settled, u64), BoxError> {
    let mut requeued = 0;
    loop {
        // Subscribed before the attempt: a settlement between it and the wait still counts.
        let mut others = settled.subscribe();
        let attempt = on_charge_requested(store, msg.clone(), NoAck).await;
        if !matches!(attempt, Err(Error::InProgress { .. })) {
            settled.send_modify(|count| *count += 1);
        }
        match attempt {
            Ok(Outcome::Processed(receipt)) => return Ok((Settled::Charged(receipt), requeued)),
            Ok(Outcome::Duplicate { replayed }) => {
                return Ok((Settled::Duplicate(replayed), requeued));
            }
            Ok(other) => return Err(format!("unexpected outcome {}", other.as_str()).into()),
            Err(Error::InProgress { .. }) if requeued < 50 => {
                // Another delivery holds the token right now: try again once one has settled.
                requeued += 1;
                others.changed().await?;
            }
            Err(error) if error.disposition() == Disposition::DeadLetter => {
                return Ok((Settled::Rejected(error.to_string()), requeued));
            }
            Err(error) => return Err(format!("delivery failed: {error}").into()),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let redis_url =
        std::env::var("IDEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let store = RedisStore::connect(&redis_url)
        .await
        .map_err(|error| format!("Redis is not reachable at {redis_url}: {error}"))?;
    let run = format!(
        "{}-{:x}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );

    // Eight checkout pages rendered, each with a token valid for 15 minutes.
    let mut checkouts = Vec::new();
    for n in 0..8_i64 {
        let token = store
            .issue_token(SCOPE, Duration::from_secs(15 * 60))
            .await?;
        checkouts.push(ChargeRequested {
            token,
            checkout_id: format!("checkout-{run}-{n}"),
            amount_cents: 1_000 + n * 250,
        });
    }

    let settled = watch::Sender::new(0_u64);
    let mut counts = Counts::default();
    let mut receipts: HashMap<String, Vec<Option<Receipt>>> = HashMap::new();
    let mut record = |counts: &mut Counts, checkout_id: &str, settled: Settled, requeued: u64| {
        counts.submitted += 1;
        counts.requeued += requeued;
        match settled {
            Settled::Charged(receipt) => {
                counts.charged += 1;
                receipts
                    .entry(checkout_id.to_owned())
                    .or_default()
                    .push(Some(receipt));
            }
            Settled::Duplicate(replayed) => {
                counts.duplicates += 1;
                receipts
                    .entry(checkout_id.to_owned())
                    .or_default()
                    .push(replayed);
            }
            Settled::Rejected(reason) => {
                counts.rejected += 1;
                println!("dead-letter {checkout_id}: {reason}");
            }
        }
    };

    for checkout in &checkouts {
        // A double click and a broker redelivery: three deliveries at once. Their claims all
        // reach Redis before the first one's marker (sent only after its claim's reply), so
        // two of them find the token in use.
        let racing = join_all((0..3).map(|_| deliver(&store, checkout.clone(), &settled))).await;
        for delivered in racing {
            let (ended, requeued) = delivered?;
            record(&mut counts, &checkout.checkout_id, ended, requeued);
        }
        // The client timed out and submits again.
        let (ended, requeued) = deliver(&store, checkout.clone(), &settled).await?;
        record(&mut counts, &checkout.checkout_id, ended, requeued);
    }

    // A charge with a token that was never issued (forged, or from another environment).
    let forged = ChargeRequested {
        token: format!("never-issued-{run}"),
        checkout_id: format!("checkout-{run}-forged"),
        amount_cents: 99_999,
    };
    let (ended, requeued) = deliver(&store, forged.clone(), &settled).await?;
    record(&mut counts, &forged.checkout_id, ended, requeued);

    // The provider's ledger, per checkout of this run.
    let mut applied: HashMap<String, (u64, i64)> = HashMap::new();
    for charge in LEDGER.lock().unwrap_or_else(PoisonError::into_inner).iter() {
        let entry = applied.entry(charge.checkout_id.clone()).or_default();
        entry.0 += 1;
        entry.1 += charge.amount_cents;
    }
    let mut double_charges = 0;
    let mut lost = 0;
    let mut receipt_mismatches = 0;
    for checkout in &checkouts {
        match applied.get(&checkout.checkout_id).map_or(0, |(n, _)| *n) {
            0 => lost += 1,
            1 => {}
            _ => double_charges += 1,
        }
        // Every submission of one checkout got the one receipt.
        let seen = receipts
            .get(&checkout.checkout_id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if seen.len() != 4 || seen.iter().any(|r| r.is_none() || *r != seen[0]) {
            receipt_mismatches += 1;
        }
    }
    let forged_charged = applied.contains_key(&forged.checkout_id);
    let charged_cents: i64 = applied.values().map(|(_, cents)| cents).sum();
    let expected_cents: i64 = checkouts.iter().map(|c| c.amount_cents).sum();

    println!(
        "payments_redis tokens={} submitted={} charged={} duplicates={} requeued={} rejected={} charged_cents={charged_cents} double_charges={double_charges} lost={lost}",
        checkouts.len(),
        counts.submitted,
        counts.charged,
        counts.duplicates,
        counts.requeued,
        counts.rejected,
    );
    let tokens = u64::try_from(checkouts.len())?;
    let ok = double_charges == 0
        && lost == 0
        && receipt_mismatches == 0
        && !forged_charged
        && counts.charged == tokens
        && counts.duplicates == tokens * 3
        && counts.rejected == 1
        && charged_cents == expected_cents;
    if !ok {
        eprintln!(
            "the ledger does not match: {double_charges} checkouts charged twice, {lost} never charged, {receipt_mismatches} with differing receipts, forged token charged: {forged_charged}, {counts:?}"
        );
        std::process::exit(1);
    }
    Ok(())
}
