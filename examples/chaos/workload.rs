//! What the harness publishes: business orders, some of them several times (a producer that
//! retries), some replayed later (an operator), and bad input of every kind the runtime must
//! dead-letter rather than drop or retry forever.

use crate::{ACCOUNTS, Order};

/// What a distinct message is, and so where it must end up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A valid order: applied exactly once.
    Good,
    /// Not JSON: dead-lettered, "does not decode".
    Undecodable,
    /// An empty `order_id`: dead-lettered, the key is empty.
    EmptyKey,
    /// An `order_id` over the key limit: dead-lettered, the key is too long.
    LongKey,
    /// An order the handler panics on: retried, then dead-lettered with the panic.
    Panics,
    /// An order id published twice with different amounts: one of the two is applied, the
    /// other dead-lettered as a payload mismatch. `pair` is the other one's index.
    Mismatch { pair: usize },
}

/// One distinct message.
#[derive(Debug, Clone)]
pub(crate) struct Message {
    pub(crate) kind: Kind,
    /// The order, for every kind but `Undecodable`.
    pub(crate) order: Option<Order>,
    pub(crate) payload: Vec<u8>,
}

/// The whole run's traffic.
#[derive(Debug)]
pub(crate) struct Workload {
    pub(crate) messages: Vec<Message>,
    /// The publishing order, as indices into `messages`: every message once, and copies.
    pub(crate) sends: Vec<usize>,
    /// Published later, after everything else, as an operator replaying a stretch of the
    /// queue: indices of good orders already published.
    pub(crate) replays: Vec<usize>,
    /// Extra copies in `sends` plus the replays.
    pub(crate) duplicates_injected: usize,
}

/// How the traffic is made.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) orders: usize,
    /// Share of orders published more than once.
    pub(crate) duplicate_share: f64,
    /// Share of orders replayed at the end.
    pub(crate) replay_share: f64,
    /// Messages of each bad kind.
    pub(crate) bad_each: usize,
}

impl Workload {
    pub(crate) fn build(shape: Shape, rng: &mut fastrand::Rng) -> Self {
        let mut messages: Vec<Message> = Vec::new();
        let order = |id: String, rng: &mut fastrand::Rng| Order {
            order_id: id,
            account: rng.i32(0..ACCOUNTS),
            amount: rng.i64(1..100_000),
        };
        let message = |kind: Kind, order: Order| Message {
            kind,
            payload: serde_json::to_vec(&order).unwrap_or_default(),
            order: Some(order),
        };
        let mut goods = Vec::new();
        for n in 0..shape.orders {
            goods.push(messages.len());
            messages.push(message(Kind::Good, order(format!("o-{n}"), rng)));
        }
        for n in 0..shape.bad_each {
            messages.push(Message {
                kind: Kind::Undecodable,
                order: None,
                payload: format!(r#"{{"order_id": "u-{n}", "amount": "#).into_bytes(),
            });
            messages.push(message(Kind::EmptyKey, order(String::new(), rng)));
            let long = format!("l-{n}-{}", "x".repeat(600));
            messages.push(message(Kind::LongKey, order(long, rng)));
            messages.push(message(Kind::Panics, order(format!("panic-{n}"), rng)));
            let first = order(format!("m-{n}"), rng);
            let mut second = first.clone();
            second.amount += 1;
            let at = messages.len();
            messages.push(message(Kind::Mismatch { pair: at + 1 }, first));
            messages.push(message(Kind::Mismatch { pair: at }, second));
        }

        // Every message once, in a shuffled order, then copies a little later than their
        // original (adjacent up to about 2% of the run later), as a retrying producer makes.
        let mut keyed: Vec<(f64, usize)> = Vec::new();
        let mut positions: Vec<usize> = (0..messages.len()).collect();
        rng.shuffle(&mut positions);
        let window = (messages.len() as f64 * 0.02).max(2.0);
        let mut duplicates_injected = 0;
        for (position, &index) in positions.iter().enumerate() {
            keyed.push((position as f64, index));
            if messages[index].kind == Kind::Good && rng.f64() < shape.duplicate_share {
                let copies = if rng.f64() < 0.3 { 2 } else { 1 };
                for _ in 0..copies {
                    keyed.push((position as f64 + 0.5 + rng.f64() * window, index));
                    duplicates_injected += 1;
                }
            }
        }
        keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
        let sends = keyed.into_iter().map(|(_, index)| index).collect();
        let mut replays: Vec<usize> = goods
            .iter()
            .copied()
            .filter(|_| rng.f64() < shape.replay_share)
            .collect();
        rng.shuffle(&mut replays);
        duplicates_injected += replays.len();
        Self {
            messages,
            sends,
            replays,
            duplicates_injected,
        }
    }
}
