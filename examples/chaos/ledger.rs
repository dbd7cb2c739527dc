//! The verdict: what the database and the dead-letter destination hold, against what was
//! published. Every good order applied exactly once (a ledger row, its amount in its account's
//! balance), every bad message dead-lettered with the reason its kind calls for, a payload
//! mismatch pair resolved to exactly one of its two payloads, and nothing left in flight.

use std::collections::HashMap;

use idem_runtime::sqlx::{self, PgPool};

use crate::broker::DeadLetter;
use crate::workload::{Kind, Workload};
use crate::{ACCOUNTS, BoxError, names};

/// What the ledger says.
#[derive(Debug, Default)]
pub(crate) struct Verdict {
    /// Good orders applied (once or more).
    pub(crate) applied: u64,
    /// Orders never applied, and bad messages never dead-lettered: messages lost.
    pub(crate) lost: u64,
    /// Applications beyond the first, and rows no published order explains.
    pub(crate) double_effects: u64,
    /// Sum over accounts of |balance - expected|.
    pub(crate) money_off: i64,
    /// Ledger rows whose amount or account is not the order's.
    pub(crate) wrong_rows: u64,
    /// Bad messages dead-lettered (distinct).
    pub(crate) dead_lettered: u64,
    /// Bad messages dead-lettered with a reason that does not say what was wrong.
    pub(crate) wrong_reasons: u64,
    /// Good orders found in the dead-letter destination (accounted for, but not applied).
    pub(crate) good_dead_lettered: u64,
    /// What the first few problems were.
    pub(crate) problems: Vec<String>,
}

impl Verdict {
    fn problem(&mut self, text: String) {
        if self.problems.len() < 20 {
            self.problems.push(text);
        }
    }

    pub(crate) fn exactly_once(&self, left_in_flight: u64) -> bool {
        self.lost == 0
            && self.double_effects == 0
            && self.money_off == 0
            && self.wrong_rows == 0
            && self.wrong_reasons == 0
            && self.good_dead_lettered == 0
            && left_in_flight == 0
    }
}

/// The reason a bad message of `kind` must be dead-lettered with.
fn expected_reason(kind: Kind) -> &'static str {
    match kind {
        Kind::Undecodable => "does not decode",
        Kind::EmptyKey => "is empty",
        Kind::LongKey => "bytes, more than the",
        Kind::Panics => "panicked",
        Kind::Mismatch { .. } => "payload mismatch",
        Kind::Good => "",
    }
}

pub(crate) async fn check(
    pool: &PgPool,
    workload: &Workload,
    dead_letters: &[DeadLetter],
) -> Result<Verdict, BoxError> {
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT order_id, account, amount FROM {}",
        names::LEDGER
    )))
    .fetch_all(pool)
    .await?;
    let mut ledger: HashMap<&str, Vec<(i32, i64)>> = HashMap::new();
    for (order_id, account, amount) in &rows {
        ledger
            .entry(order_id.as_str())
            .or_default()
            .push((*account, *amount));
    }
    let balances: Vec<(i32, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, balance FROM {} ORDER BY id",
        names::ACCOUNTS
    )))
    .fetch_all(pool)
    .await?;
    let mut letters: HashMap<&[u8], Vec<&str>> = HashMap::new();
    for letter in dead_letters {
        letters
            .entry(letter.payload.as_slice())
            .or_default()
            .push(letter.reason.as_str());
    }

    let mut verdict = Verdict::default();
    let mut expected_balance = vec![0_i64; usize::try_from(ACCOUNTS)?];
    let mut explained: HashMap<&str, ()> = HashMap::new();
    for (index, message) in workload.messages.iter().enumerate() {
        let order_id = message.order.as_ref().map(|order| order.order_id.as_str());
        let applied = order_id
            .and_then(|id| ledger.get(id))
            .map_or(&[][..], Vec::as_slice);
        let reasons = letters
            .get(message.payload.as_slice())
            .map_or(&[][..], Vec::as_slice);
        match message.kind {
            Kind::Good => {
                let Some(order) = &message.order else {
                    continue;
                };
                explained.insert(&order.order_id, ());
                // What the balances must show: every good order, once.
                expected_balance[usize::try_from(order.account)?] += order.amount;
                if applied.is_empty() {
                    verdict.lost += 1;
                    if reasons.is_empty() {
                        verdict.problem(format!("order {} was never applied", order.order_id));
                    } else {
                        verdict.good_dead_lettered += 1;
                        verdict.problem(format!(
                            "order {} was dead-lettered, not applied: {}",
                            order.order_id, reasons[0]
                        ));
                    }
                    continue;
                }
                verdict.applied += 1;
                if applied.len() > 1 {
                    verdict.double_effects += applied.len() as u64 - 1;
                    verdict.problem(format!(
                        "order {} was applied {} times",
                        order.order_id,
                        applied.len()
                    ));
                }
                if applied
                    .iter()
                    .any(|row| *row != (order.account, order.amount))
                {
                    verdict.wrong_rows += 1;
                }
            }
            Kind::Mismatch { pair } => {
                // Each pair once, from its first half.
                if pair < index {
                    continue;
                }
                let (Some(first), Some(second)) = (&message.order, &workload.messages[pair].order)
                else {
                    continue;
                };
                explained.insert(&first.order_id, ());
                match applied {
                    [] => {
                        verdict.lost += 1;
                        verdict.problem(format!(
                            "mismatch order {} was never applied",
                            first.order_id
                        ));
                    }
                    [(account, amount)] => {
                        verdict.applied += 1;
                        let (winner, loser) = if *amount == first.amount {
                            (first, pair)
                        } else {
                            (second, index)
                        };
                        if (*account, *amount) != (winner.account, winner.amount) {
                            verdict.wrong_rows += 1;
                        }
                        expected_balance[usize::try_from(winner.account)?] += winner.amount;
                        let loser_reasons = letters
                            .get(workload.messages[loser].payload.as_slice())
                            .map_or(&[][..], Vec::as_slice);
                        judge_dead_letter(
                            &mut verdict,
                            Kind::Mismatch { pair },
                            &first.order_id,
                            loser_reasons,
                        );
                    }
                    more => {
                        verdict.double_effects += more.len() as u64 - 1;
                        verdict.problem(format!(
                            "mismatch order {} was applied {} times",
                            first.order_id,
                            more.len()
                        ));
                    }
                }
            }
            kind => {
                if !applied.is_empty() {
                    verdict.double_effects += applied.len() as u64;
                    verdict.problem(format!("bad message {kind:?} was applied"));
                }
                let label = order_id.map_or_else(
                    || String::from_utf8_lossy(&message.payload).into_owned(),
                    |id| id.chars().take(40).collect(),
                );
                if let Some(id) = order_id {
                    explained.insert(id, ());
                }
                judge_dead_letter(&mut verdict, kind, &label, reasons);
            }
        }
    }
    for (order_id, applied) in &ledger {
        if !explained.contains_key(order_id) {
            verdict.double_effects += applied.len() as u64;
            verdict.problem(format!(
                "ledger rows for {order_id}, which nobody published"
            ));
        }
    }
    for (id, balance) in balances {
        let expected = expected_balance[usize::try_from(id)?];
        if balance != expected {
            verdict.money_off += (balance - expected).abs();
            verdict.problem(format!(
                "account {id}: balance {balance}, expected {expected}"
            ));
        }
    }
    Ok(verdict)
}

/// A panicking body is retried like any retryable failure, and the dead letter carries the
/// *last* attempt's error: when chaos cut the database on that attempt, the reason is the
/// connection's ("gave up after 5 attempts: … Connection reset by peer"), not the panic's.
/// Still dead-lettered, never lost: the right outcome for a message that can never succeed.
fn gave_up_on_infrastructure(kind: Kind, reason: &str) -> bool {
    matches!(kind, Kind::Panics) && reason.starts_with("gave up after ")
}

fn judge_dead_letter(verdict: &mut Verdict, kind: Kind, label: &str, reasons: &[&str]) {
    let wanted = expected_reason(kind);
    if reasons.is_empty() {
        verdict.lost += 1;
        verdict.problem(format!(
            "{kind:?} message {label} is neither applied nor dead-lettered"
        ));
    } else if reasons
        .iter()
        .all(|reason| reason.contains(wanted) || gave_up_on_infrastructure(kind, reason))
    {
        verdict.dead_lettered += 1;
    } else {
        verdict.wrong_reasons += 1;
        verdict.problem(format!(
            "{kind:?} message {label} dead-lettered with {reasons:?}, expected a reason with {wanted:?}"
        ));
    }
}
