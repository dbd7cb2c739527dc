//! RabbitMQ, through [`lapin`]: an [`Acknowledger`] for a [`Delivery`], the queues it settles
//! into ([`RabbitMqTopology`]), and a consumer runner ([`RabbitMqConsumer`]).
//!
//! # What goes where
//!
//! [`RabbitMqTopology::for_queue("orders")`](RabbitMqTopology::for_queue) names, and
//! [`declare`](RabbitMqTopology::declare)s idempotently:
//!
//! | name | what | for |
//! |---|---|---|
//! | `orders` | durable queue, dead-lettering to `orders.dead-letter` | the work queue |
//! | `orders.dead-letter` | durable direct exchange | dead letters |
//! | `orders.dead-letter` | durable queue, bound to it with the key `orders` | dead letters, to inspect or replay |
//! | `orders.retry.<k>` | durable queues, declared when first needed, dead-lettering back to `orders`; never expire (at most 33 per work queue) | delayed retries |
//!
//! How each outcome is settled (every delivery is acknowledged manually, by its delivery tag):
//!
//! - **processed, duplicate**: `basic.ack`, after the commit.
//! - **retryable failure, attempts left**: a copy of the message (same body and properties,
//!   `message_id` kept, but always persistent, and without RabbitMQ's own `x-death`,
//!   `x-first-death-*`, `x-last-death-*` and `x-delivery-count` headers) is published to a
//!   retry queue with the per-message `expiration` set to the backoff delay and the header
//!   `x-idem-attempt` set to the next attempt's number; once the broker confirms it, the
//!   original is acked. When the copy expires, the retry queue
//!   dead-letters it back to the work queue. A crash between the confirm and the ack leaves two
//!   copies: the gate makes the second a duplicate.
//! - **out of attempts, permanent failure, undecodable payload, a bad key**: a copy is published
//!   (persistent, without RabbitMQ's dead-lettering headers, like a retry copy) to the
//!   dead-letter exchange with the headers `x-idem-reason` (why), `x-idem-attempt` (the delivery
//!   that failed, 1 for the first) and `x-idem-queue` (the work queue); once the broker confirms
//!   it, the original is acked. Nothing is dropped.
//! - When the broker does not store a copy (a nack, an unroutable copy, a channel without
//!   publisher confirms), the original is held for a while, then handed back with `basic.nack`
//!   and `requeue = true` (it is redelivered, with the same attempt number), and the
//!   acknowledger returns the error. It is held for the retry's delay (at least 1 s, at most
//!   5 min) or, for a dead letter, 5 s: a broker that keeps refusing copies slows the
//!   redeliveries down instead of spinning on them. An unroutable copy first re-declares its
//!   destination (the retry tier, or the dead-letter exchange and queue) and is published once
//!   more. On a closed channel nothing is sent: RabbitMQ has requeued the delivery.
//! - **cancelled at the shutdown deadline, or the process died**: nothing; RabbitMQ redelivers
//!   the message when the channel closes (the runner closes it as it returns).
//!
//! ## Why retry queues by tier
//!
//! RabbitMQ has no delayed delivery without a plugin, and it expires a message with a
//! per-message TTL only when the message reaches the head of its queue: in a single retry
//! queue, a retry due in one second would wait behind one due in five minutes. So retries go to
//! one queue per *tier* of delay: tier `k` (`orders.retry.<k>`) holds the delays of more than
//! 2<sup>k-1</sup> and at most 2<sup>k</sup> milliseconds (1 s is in tier 10, 1024 ms). Within
//! a tier, a message waits behind another for at most the tier's width, so a retry comes back
//! after its delay and before twice its delay; never in a hot loop. Tier queues have no
//! `x-expires` (an expiring tier would delete the copies waiting in it): an idle tier stays, empty
//! (there are at most 33, tiers 0 to 32, per work queue). Each is declared the first time a
//! topology uses it, and declared again when a copy comes back unroutable (someone deleted it).
//!
//! ## Which attempt a delivery is
//!
//! [`Acknowledger::attempt`] is `x-idem-attempt` (1 when absent), plus the `x-delivery-count`
//! that quorum queues add to a message they redeliver (after a consumer crashed or a channel
//! closed with the message unacked). **Classic queues do not count redeliveries**: there, a
//! delivery redelivered after a crash (`redelivered = true`) keeps the attempt number it had,
//! so a message that crashes its consumer every time (a poison pill) is redelivered forever.
//! For such workloads declare the work queue as a quorum queue with a delivery limit (its
//! dead-lettering already points at the dead-letter exchange), with
//! [`RabbitMqTopology::with_queue_arguments`]. On RabbitMQ 3.x and 4.0–4.2 the broker then
//! dead-letters a message past `x-delivery-limit` redeliveries, which ends a crash loop; from
//! 4.3 on, a message returned to the queue without a failure (a closed channel, a
//! cancelled consumer) no longer counts towards the limit, so check how your version counts
//! before relying on it to stop a consumer that crashes:
//!
//! ```
//! use idem_runtime::broker::rabbitmq::{lapin, RabbitMqTopology};
//! use lapin::types::{AMQPValue, FieldTable};
//!
//! let topology = RabbitMqTopology::for_queue("orders")?;
//! let mut arguments = topology.queue_arguments().clone();
//! arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
//! arguments.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(20));
//! let topology = topology.with_queue_arguments(arguments);
//! # Ok::<(), idem_runtime::broker::rabbitmq::RabbitMqError>(())
//! ```
//!
//! On a quorum queue, attempts can also rise without a run: when the runner shuts down, the
//! deliveries it had prefetched but not started are returned to the queue (its channel closes)
//! and come back with `x-delivery-count` one higher, so their next delivery counts one more
//! attempt than the handler ran. Keep the prefetch small next to `max_attempts` (and the
//! delivery limit) if restarts are frequent.
//!
//! # The runner
//!
//! ```no_run
//! use idem_runtime::broker::rabbitmq::{lapin, RabbitMqConsumer, RabbitMqTopology};
//! use idem_runtime::broker::{CancellationToken, ConsumerOptions};
//! use idem_runtime::{handler, idempotent, HandlerError, PgStore, PgTx};
//!
//! #[derive(serde::Deserialize)]
//! struct OrderPaid { order_id: String, amount: i64 }
//!
//! #[derive(Debug, thiserror::Error)]
//! enum AppError {
//!     #[error(transparent)]
//!     Db(#[from] idem_runtime::sqlx::Error),
//! }
//! impl HandlerError for AppError {}
//!
//! #[idempotent(key = "order_id", store = "pg", strategy = "dedup_table", scope = "doc.rabbitmq.order_paid")]
//! async fn on_order_paid(tx: &mut PgTx<'_>, msg: OrderPaid) -> Result<(), AppError> {
//!     idem_runtime::sqlx::query("INSERT INTO payments (order_id, amount) VALUES ($1, $2)")
//!         .bind(&msg.order_id).bind(msg.amount)
//!         .execute(&mut **tx).await?;
//!     Ok(())
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = PgStore::connect("postgres://postgres@127.0.0.1/app").await?;
//! store.migrate().await?;
//! let connection = lapin::Connection::connect(
//!     "amqp://guest:guest@127.0.0.1:5672/%2f",
//!     lapin::ConnectionProperties::default(),
//! ).await?;
//!
//! let shutdown = CancellationToken::new();
//! let consumer = RabbitMqConsumer::new(
//!     connection.create_channel().await?,      // the runner's own channel
//!     RabbitMqTopology::for_queue("orders")?,  // declared by `run`
//!     handler!(on_order_paid),
//!     store,
//! )
//! .with_options(ConsumerOptions::default().concurrency(8).prefetch(32));
//! let stats = consumer.stats();                 // read it while it runs
//! let task = tokio::spawn(consumer.run(shutdown.clone()));
//!
//! // … on SIGTERM:
//! shutdown.cancel();
//! let report = task.await??;                    // in-flight handlers finished and settled
//! println!("processed={} duplicates={}", report.processed, report.duplicates);
//! # drop(stats);
//! # Ok(())
//! # }
//! ```
//!
//! [`RabbitMqConsumer::run`] returns an error when the channel or the connection fails, or the
//! broker cancels the consumer (the queue was deleted): restart it, on a new channel (and a new
//! connection if that one is closed). Deliveries it had not settled are redelivered.
//!
//! # Your own consumer loop
//!
//! To keep a loop you already have, wrap each delivery in a [`RabbitMqAcknowledger`] and hand it
//! to the handler, which acks, requeues or dead-letters it. The channel it is given publishes the
//! retry and dead-letter copies; it may be the consuming channel. Three rules, which the runner
//! keeps by itself:
//!
//! - **Consume with manual acks** (`no_ack = false`, the default of `BasicConsumeOptions`): the
//!   acknowledger acks, nacks and dead-letters by delivery tag, and an auto-acked delivery would
//!   be gone before its commit.
//! - **The acknowledger's channel must be in confirm mode** (`confirm_select`) **and carry no
//!   other mandatory publishes**: a copy counts as stored only once the broker confirms it (on
//!   a channel without confirms every copy fails with [`RabbitMqError::ConfirmsNotEnabled`] and
//!   the delivery is handed back after a wait), and lapin attaches a returned (unroutable)
//!   message to whichever confirm of the channel completes next. The acknowledgers of one
//!   channel publish their copies one at a time for that reason; publish your own messages on
//!   another channel.
//! - **Settle every acknowledger; cancel handlers only at shutdown, then close the channel.** An
//!   acknowledger dropped without settling (a handler future cancelled, a `select!` that lost)
//!   leaves its delivery unacked: RabbitMQ redelivers it only when the channel closes, or after
//!   its `consumer_timeout` (30 min by default), when it closes the channel itself, with every
//!   other delivery on it. Until then the delivery holds a prefetch slot.
//!
//! ```no_run
//! # use idem_runtime::{idempotent, HandlerError, PgStore, PgTx};
//! # #[derive(serde::Deserialize)]
//! # struct OrderPaid { order_id: String }
//! # #[derive(Debug, thiserror::Error)]
//! # #[error("failed")]
//! # struct AppError;
//! # impl HandlerError for AppError {}
//! # #[idempotent(key = "order_id", store = "pg", strategy = "dedup_table", scope = "doc.rabbitmq.own_loop")]
//! # async fn on_order_paid(tx: &mut PgTx<'_>, msg: OrderPaid) -> Result<(), AppError> { Ok(()) }
//! use futures_util::StreamExt as _;
//! use idem_runtime::broker::rabbitmq::{lapin, RabbitMqAcknowledger, RabbitMqTopology};
//! use lapin::options::{BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
//! use lapin::types::FieldTable;
//!
//! # async fn run(store: PgStore, connection: lapin::Connection) -> Result<(), Box<dyn std::error::Error>> {
//! let topology = RabbitMqTopology::for_queue("orders")?;
//! let channel = connection.create_channel().await?;
//! channel.confirm_select(ConfirmSelectOptions::default()).await?;
//! channel.basic_qos(32, BasicQosOptions::default()).await?;
//! topology.declare(&channel).await?;
//! let mut deliveries = channel
//!     .basic_consume(topology.queue().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
//!     .await?;
//! while let Some(delivery) = deliveries.next().await {
//!     let delivery = delivery?;
//!     let decoded = serde_json::from_slice::<OrderPaid>(&delivery.data);
//!     let ack = RabbitMqAcknowledger::new(delivery, channel.clone(), topology.clone());
//!     match decoded {
//!         // Acked after the commit, requeued with backoff, or dead-lettered, as it turns out.
//!         Ok(msg) => { let _ = on_order_paid(&store, msg, ack).await; }
//!         // Cannot succeed: to the dead-letter queue, with the reason.
//!         Err(error) => ack.dead_letter_now(&format!("undecodable: {error}")).await?,
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! To replay a dead letter, publish it back to the work queue without its `x-idem-attempt`
//! header (with it, its attempts count on from where they stopped).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Acker, BasicProperties, Channel, Confirmation, ExchangeKind};
use tracing::Instrument as _;

pub use lapin;

use super::{
    BatchOptions, CancellationToken, ConsumerOptions, ConsumerReport, ConsumerStats, Decode, Json,
};
use crate::ack::{Acknowledger, Committed, DeadLetter, Requeue};
use crate::handler::{BatchHandler, Handler};

/// The header that carries which delivery of a message a copy is (1 for the first), on retry
/// copies; on dead letters, the delivery that failed.
pub const ATTEMPT_HEADER: &str = "x-idem-attempt";
/// The header of a dead letter that says why it was dead-lettered.
pub const REASON_HEADER: &str = "x-idem-reason";
/// The header of a dead letter that names the work queue it came from.
pub const QUEUE_HEADER: &str = "x-idem-queue";
/// The header quorum queues set on a redelivered message: how often it was delivered before.
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";
/// The headers RabbitMQ sets when it dead-letters or redelivers a message, dropped from every
/// retry and dead-letter copy: a copy is a new message. With the work queue still in its
/// `x-death`, RabbitMQ 3.x's cycle detection would silently drop a retry copy on its way back
/// from its tier; a quorum queue's `x-delivery-count` would count again on a copy (and on a
/// replayed dead letter) redeliveries that belonged to the original.
const DEAD_LETTERING_HEADERS: [&str; 8] = [
    "x-death",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-first-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-last-death-exchange",
    DELIVERY_COUNT_HEADER,
];

/// The longest delay a retry copy can wait, in milliseconds: RabbitMQ's per-message
/// `expiration` is a 32-bit count of milliseconds.
const MAX_DELAY_MS: u64 = u32::MAX as u64;

/// How long a delivery whose dead-letter copy the broker did not store is held before it is
/// handed back (`basic.nack`, requeued) to be tried again.
const DEAD_LETTER_BACKOFF: Duration = Duration::from_secs(5);
/// The shortest and the longest a delivery whose retry copy the broker did not store is held
/// before it is handed back: the retry's delay, at least 1 s (never a hot loop), at most 5 min
/// (an unacked delivery held much longer would run into RabbitMQ's `consumer_timeout`, 30 min
/// by default, which closes the channel).
const GIVE_BACK_MIN: Duration = Duration::from_secs(1);
const GIVE_BACK_MAX: Duration = Duration::from_secs(300);

fn give_back_wait(delay: Duration) -> Duration {
    delay.clamp(GIVE_BACK_MIN, GIVE_BACK_MAX)
}

/// What went wrong talking to RabbitMQ.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RabbitMqError {
    /// A queue or exchange name is not a valid AMQP short string.
    #[error(
        "`{name}` is not a valid RabbitMQ name ({reason}); AMQP names are at most 255 bytes, and the topology appends suffixes such as `.dead-letter` and `.retry.<tier>`: choose a shorter queue name"
    )]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The broker or the client refused an operation: a closed channel or connection, a
    /// declaration that conflicts with an existing queue's arguments, an I/O error.
    #[error(
        "RabbitMQ refused `{operation}`: {source}. A closed channel or connection cannot be used again: open new ones (and restart the consumer); a PRECONDITION_FAILED on a declaration means the queue exists with other arguments (see RabbitMqTopology::with_queue_arguments)"
    )]
    Amqp {
        /// The AMQP operation.
        operation: &'static str,
        /// The client's error.
        #[source]
        source: lapin::Error,
    },
    /// The channel given to the acknowledger does not have publisher confirms enabled, so a
    /// retry or dead-letter copy could not be known to be stored.
    #[error(
        "the channel that publishes retry and dead-letter copies must have publisher confirms enabled: call `channel.confirm_select(ConfirmSelectOptions::default())` before handing it to RabbitMqAcknowledger"
    )]
    ConfirmsNotEnabled,
    /// The broker did not store a retry or dead-letter copy: it negatively confirmed it, or
    /// returned it as unroutable (even after its destination was declared again). The original
    /// delivery was handed back (`basic.nack` with `requeue`) after a wait, to be delivered
    /// again.
    #[error(
        "RabbitMQ did not take the {what} copy of delivery {delivery_tag} (exchange `{exchange}`, routing key `{routing_key}`): {why}; the original was requeued. Check that the topology is declared (RabbitMqTopology::declare) and that the broker is not out of resources"
    )]
    NotStored {
        /// `retry` or `dead-letter`.
        what: &'static str,
        /// The original delivery's tag.
        delivery_tag: u64,
        /// Where the copy was published.
        exchange: String,
        /// With which routing key.
        routing_key: String,
        /// `nacked by the broker` or `unroutable`.
        why: &'static str,
    },
    /// The delivery's channel closed before it was settled: RabbitMQ requeued it, and will
    /// deliver it again (after a commit, the redelivery is a duplicate).
    #[error(
        "delivery {delivery_tag} cannot be settled: its channel is closed; RabbitMQ redelivers it, and after a commit the redelivery is a duplicate"
    )]
    ChannelClosed {
        /// The delivery's tag.
        delivery_tag: u64,
    },
    /// The broker cancelled the runner's consumer (its queue was deleted, or the node that held
    /// it went away).
    #[error(
        "RabbitMQ cancelled the consumer of queue `{queue}` (was the queue deleted?); restart the consumer once the queue exists"
    )]
    ConsumerCancelled {
        /// The queue.
        queue: String,
    },
}

impl RabbitMqError {
    fn amqp(operation: &'static str) -> impl FnOnce(lapin::Error) -> Self {
        move |source| Self::Amqp { operation, source }
    }
}

fn short_string(name: String) -> Result<ShortString, RabbitMqError> {
    ShortString::try_new(name.clone()).map_err(|error| RabbitMqError::InvalidName {
        name,
        reason: error.to_string(),
    })
}

/// The queues and the exchange a work queue settles into: the work queue itself, the
/// dead-letter exchange and queue, and the retry queues by tier (see the
/// [module documentation](self)). Cheap to clone: the clones share the record of which retry
/// tiers were declared.
///
/// ```
/// use std::time::Duration;
/// use idem_runtime::broker::rabbitmq::RabbitMqTopology;
///
/// let topology = RabbitMqTopology::for_queue("orders")?;
/// assert_eq!(topology.queue(), "orders");
/// assert_eq!(topology.dead_letter_exchange(), "orders.dead-letter");
/// assert_eq!(topology.dead_letter_queue(), "orders.dead-letter");
/// // 1 s is in the tier of delays up to 1024 ms.
/// assert_eq!(topology.retry_queue(Duration::from_secs(1)), "orders.retry.10");
///
/// let topology = RabbitMqTopology::for_queue("orders")?
///     .with_dead_letter("errors", "orders.errors")?
///     .with_retry_prefix("orders.later")?;
/// assert_eq!(topology.retry_queue(Duration::from_millis(3)), "orders.later.2");
/// # Ok::<(), idem_runtime::broker::rabbitmq::RabbitMqError>(())
/// ```
#[derive(Debug, Clone)]
pub struct RabbitMqTopology {
    names: Arc<Names>,
    /// The retry tiers declared through this topology (or a clone).
    tiers: Arc<Mutex<HashSet<u32>>>,
}

#[derive(Debug, Clone)]
struct Names {
    queue: ShortString,
    dead_letter_exchange: ShortString,
    dead_letter_queue: ShortString,
    retry_prefix: String,
    queue_arguments: FieldTable,
}

impl RabbitMqTopology {
    /// The topology of the work queue `queue`, with the default names: `<queue>.dead-letter`
    /// for the dead-letter exchange and queue, `<queue>.retry.<tier>` for the retry queues. The
    /// work queue is declared durable, dead-lettering (what the broker itself dead-letters:
    /// quorum queues' delivery limit, rejects) to the dead-letter exchange.
    ///
    /// # Errors
    ///
    /// [`RabbitMqError::InvalidName`] when a name would be longer than AMQP allows.
    pub fn for_queue(queue: &str) -> Result<Self, RabbitMqError> {
        let dead_letter = format!("{queue}.dead-letter");
        let names = Names {
            queue: short_string(queue.to_owned())?,
            dead_letter_exchange: short_string(dead_letter.clone())?,
            dead_letter_queue: short_string(dead_letter)?,
            retry_prefix: String::new(),
            queue_arguments: FieldTable::default(),
        };
        let topology = Self {
            names: Arc::new(names),
            tiers: Arc::default(),
        };
        let topology = topology.with_retry_prefix(&format!("{queue}.retry"))?;
        let arguments = topology.default_queue_arguments();
        Ok(topology.with_queue_arguments(arguments))
    }

    /// Dead letters go to the exchange `exchange` (declared direct and durable) and from it to
    /// the durable queue `queue`, bound with the work queue's name as the routing key.
    ///
    /// # Errors
    ///
    /// [`RabbitMqError::InvalidName`] when a name is longer than AMQP allows.
    pub fn with_dead_letter(mut self, exchange: &str, queue: &str) -> Result<Self, RabbitMqError> {
        let exchange = short_string(exchange.to_owned())?;
        let queue = short_string(queue.to_owned())?;
        let names = Arc::make_mut(&mut self.names);
        let defaults = Self::dead_letter_arguments(&names.queue, &names.dead_letter_exchange);
        let still_default = names.queue_arguments == defaults;
        names.dead_letter_exchange = exchange;
        names.dead_letter_queue = queue;
        if still_default {
            names.queue_arguments =
                Self::dead_letter_arguments(&names.queue, &names.dead_letter_exchange);
        }
        Ok(self)
    }

    /// Retry queues are named `<prefix>.<tier>`.
    ///
    /// # Errors
    ///
    /// [`RabbitMqError::InvalidName`] when the retry queues' names would be longer than AMQP
    /// allows.
    pub fn with_retry_prefix(mut self, prefix: &str) -> Result<Self, RabbitMqError> {
        // The longest tier suffix.
        short_string(format!("{prefix}.{}", tier_of(MAX_DELAY_MS)))?;
        self.tiers = Arc::default();
        Arc::make_mut(&mut self.names).retry_prefix = prefix.to_owned();
        Ok(self)
    }

    /// The arguments the work queue is declared with, replacing the defaults
    /// ([`queue_arguments`](Self::queue_arguments)): to match a queue that already exists
    /// (declaring it with other arguments fails with PRECONDITION_FAILED), or to make it a
    /// quorum queue with a delivery limit. Pass an empty table for a queue declared without
    /// arguments.
    #[must_use]
    pub fn with_queue_arguments(mut self, arguments: FieldTable) -> Self {
        Arc::make_mut(&mut self.names).queue_arguments = arguments;
        self
    }

    /// The work queue.
    pub fn queue(&self) -> &str {
        self.names.queue.as_str()
    }

    /// The dead-letter exchange.
    pub fn dead_letter_exchange(&self) -> &str {
        self.names.dead_letter_exchange.as_str()
    }

    /// The dead-letter queue.
    pub fn dead_letter_queue(&self) -> &str {
        self.names.dead_letter_queue.as_str()
    }

    /// The arguments the work queue is declared with. By default `x-dead-letter-exchange` (the
    /// dead-letter exchange) and `x-dead-letter-routing-key` (the work queue's name), so that
    /// what the broker dead-letters by itself lands in the dead-letter queue too.
    pub fn queue_arguments(&self) -> &FieldTable {
        &self.names.queue_arguments
    }

    /// The retry queue a copy waiting `delay` goes to: `<prefix>.<k>`, where tier `k` holds the
    /// delays of more than 2<sup>k-1</sup> and at most 2<sup>k</sup> milliseconds.
    pub fn retry_queue(&self, delay: Duration) -> String {
        self.retry_queue_of_tier(tier_of(delay_ms(delay)))
    }

    fn retry_queue_of_tier(&self, tier: u32) -> String {
        format!("{}.{tier}", self.names.retry_prefix)
    }

    /// Declares the work queue, the dead-letter exchange and queue and their binding; safe to
    /// call again (and from every consumer). Retry queues are declared when first used.
    ///
    /// # Errors
    ///
    /// [`RabbitMqError::Amqp`] when the broker refuses, for instance because the work queue
    /// exists with other arguments (which also closes the channel).
    pub async fn declare(&self, channel: &Channel) -> Result<(), RabbitMqError> {
        self.declare_dead_letter(channel).await?;
        channel
            .queue_declare(
                self.names.queue.clone(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                self.names.queue_arguments.clone(),
            )
            .await
            .map_err(RabbitMqError::amqp("queue.declare (work queue)"))?;
        Ok(())
    }

    /// Declares only the dead-letter exchange and queue and their binding, for a work queue
    /// declared elsewhere.
    ///
    /// # Errors
    ///
    /// [`RabbitMqError::Amqp`] when the broker refuses.
    pub async fn declare_dead_letter(&self, channel: &Channel) -> Result<(), RabbitMqError> {
        channel
            .exchange_declare(
                self.names.dead_letter_exchange.clone(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(RabbitMqError::amqp(
                "exchange.declare (dead-letter exchange)",
            ))?;
        channel
            .queue_declare(
                self.names.dead_letter_queue.clone(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(RabbitMqError::amqp("queue.declare (dead-letter queue)"))?;
        channel
            .queue_bind(
                self.names.dead_letter_queue.clone(),
                self.names.dead_letter_exchange.clone(),
                self.names.queue.clone(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(RabbitMqError::amqp("queue.bind (dead-letter queue)"))?;
        Ok(())
    }

    fn default_queue_arguments(&self) -> FieldTable {
        Self::dead_letter_arguments(&self.names.queue, &self.names.dead_letter_exchange)
    }

    fn dead_letter_arguments(queue: &ShortString, exchange: &ShortString) -> FieldTable {
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(exchange.as_str().into()),
        );
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(queue.as_str().into()),
        );
        arguments
    }

    /// Declares the retry queue of `tier` unless this topology (or a clone) declared it
    /// already. `force` declares it anyway (a copy came back unroutable: the queue was deleted).
    async fn ensure_tier(
        &self,
        channel: &Channel,
        tier: u32,
        force: bool,
    ) -> Result<ShortString, RabbitMqError> {
        let name = short_string(self.retry_queue_of_tier(tier))?;
        let declared = !force
            && self
                .tiers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&tier);
        if declared {
            return Ok(name);
        }
        channel
            .queue_declare(
                name.clone(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                self.tier_arguments(),
            )
            .await
            .map_err(RabbitMqError::amqp("queue.declare (retry queue)"))?;
        self.tiers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(tier);
        Ok(name)
    }

    /// The arguments of a retry tier queue: dead-letter expired copies back to the work queue,
    /// through the default exchange. No `x-expires`: an expiring tier would delete the copies
    /// waiting in it.
    fn tier_arguments(&self) -> FieldTable {
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(self.names.queue.as_str().into()),
        );
        arguments
    }
}

fn delay_ms(delay: Duration) -> u64 {
    u64::try_from(delay.as_millis())
        .unwrap_or(u64::MAX)
        .min(MAX_DELAY_MS)
}

/// The tier of a delay: the power of two of the delay in milliseconds, rounded up.
fn tier_of(delay_ms: u64) -> u32 {
    if delay_ms <= 1 {
        0
    } else {
        u64::BITS - (delay_ms - 1).leading_zeros()
    }
}

fn header_count(headers: Option<&FieldTable>, name: &str) -> Option<u64> {
    let value = headers?.inner().get(name)?;
    let count = match value {
        AMQPValue::ShortShortUInt(n) => i128::from(*n),
        AMQPValue::ShortUInt(n) => i128::from(*n),
        AMQPValue::LongUInt(n) => i128::from(*n),
        AMQPValue::ShortShortInt(n) => i128::from(*n),
        AMQPValue::ShortInt(n) => i128::from(*n),
        AMQPValue::LongInt(n) => i128::from(*n),
        AMQPValue::LongLongInt(n) => i128::from(*n),
        AMQPValue::Timestamp(n) => i128::from(*n),
        AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes())
            .ok()?
            .trim()
            .parse()
            .ok()?,
        AMQPValue::ShortString(text) => text.as_str().trim().parse().ok()?,
        _ => return None,
    };
    u64::try_from(count).ok()
}

/// Which delivery a message with `headers` is: `x-idem-attempt` (1 when absent, zero, negative
/// or not a number; any AMQP integer type or a decimal string is read) plus the quorum queues'
/// `x-delivery-count` (0 when absent or unreadable), saturating at `u32::MAX`. Never panics.
fn attempt_of(headers: Option<&FieldTable>) -> u32 {
    let first = header_count(headers, ATTEMPT_HEADER)
        .filter(|attempt| *attempt >= 1)
        .unwrap_or(1);
    let redeliveries = header_count(headers, DELIVERY_COUNT_HEADER).unwrap_or(0);
    u32::try_from(first.saturating_add(redeliveries)).unwrap_or(u32::MAX)
}

/// A copy of `properties` with `headers` and `expiration`, persistent (`delivery_mode` 2)
/// whatever the original's: the copy lives in a classic durable queue after the original was
/// acked, and a transient one would be lost on a broker restart. The `user_id` is dropped:
/// RabbitMQ refuses a publish whose `user_id` is not the publishing connection's user.
fn copy_properties(
    properties: &BasicProperties,
    headers: FieldTable,
    expiration: Option<ShortString>,
) -> BasicProperties {
    let mut copy = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2);
    macro_rules! keep {
        ($($get:ident => $with:ident),* $(,)?) => {
            $(if let Some(value) = properties.$get().clone() {
                copy = copy.$with(value);
            })*
        };
    }
    keep!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    if let Some(expiration) = expiration {
        copy = copy.with_expiration(expiration);
    }
    copy
}

/// Held from a copy's `basic.publish` until its confirm: at most one copy publish per channel
/// awaits its confirm. lapin hands a returned (unroutable) message to whichever confirm of the
/// channel completes next, so with two mandatory publishes in flight, one copy's return could be
/// taken for the other's: the unroutable copy counted as stored, its original acked, the message
/// lost.
type CopyLock = Arc<tokio::sync::Mutex<()>>;

/// The copy lock of the channel `channel_id`, shared by every acknowledger on it (and, since
/// lapin does not tell two connections apart, with channels of the same id on other
/// connections of the process: they only wait for each other's confirms).
fn copy_lock(channel_id: u16) -> CopyLock {
    static LOCKS: LazyLock<Mutex<HashMap<u16, Weak<tokio::sync::Mutex<()>>>>> =
        LazyLock::new(Mutex::default);
    let mut locks = LOCKS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(lock) = locks.get(&channel_id).and_then(Weak::upgrade) {
        return lock;
    }
    locks.retain(|_, lock| lock.strong_count() > 0);
    let lock = CopyLock::default();
    locks.insert(channel_id, Arc::downgrade(&lock));
    lock
}

/// The headers of a copy: the original's, without RabbitMQ's dead-lettering headers, with
/// `add`.
fn copy_headers(original: Option<&FieldTable>, add: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut headers: BTreeMap<ShortString, AMQPValue> = original
        .map(|headers| headers.inner().clone())
        .unwrap_or_default();
    for name in DEAD_LETTERING_HEADERS {
        headers.remove(name);
    }
    for (name, value) in add {
        headers.insert(name.into(), value);
    }
    headers.into()
}

/// The [`Acknowledger`] of one RabbitMQ [`Delivery`]: acks it by its delivery tag after the
/// commit, requeues it through a retry queue with the backoff delay, dead-letters it to the
/// dead-letter exchange (see the [module documentation](self)).
///
/// `channel` publishes the retry and dead-letter copies: it **must be in confirm mode**
/// (`confirm_select`; without it every copy fails with [`RabbitMqError::ConfirmsNotEnabled`]
/// and the delivery is handed back after a wait), and may be the channel the delivery came
/// from. The acknowledgers of one channel publish their copies one at a time, each until its
/// confirm, so that a copy returned as unroutable is never taken for another; the channel
/// **must not carry other mandatory publishes** (lapin would attach their returns to a copy's
/// confirm, or a copy's return to theirs). Drop an acknowledger without settling it only when
/// you close its channel next (see the [module documentation](self)).
#[derive(Debug)]
pub struct RabbitMqAcknowledger {
    acker: Acker,
    delivery_tag: u64,
    redelivered: bool,
    properties: BasicProperties,
    payload: Arc<Vec<u8>>,
    channel: Channel,
    copy_lock: CopyLock,
    topology: RabbitMqTopology,
    attempt: u32,
    /// In a batch runner: how its deliveries are tracked, and where its ack waits.
    tracking: Option<Tracking>,
}

impl RabbitMqAcknowledger {
    /// Wraps `delivery`, to be settled through `channel` into `topology`'s queues. Decode the
    /// payload (`delivery.data`) first, or read it back with [`payload`](Self::payload).
    pub fn new(delivery: Delivery, channel: Channel, topology: RabbitMqTopology) -> Self {
        let attempt = attempt_of(delivery.properties.headers().as_ref());
        Self {
            acker: delivery.acker,
            delivery_tag: delivery.delivery_tag,
            redelivered: delivery.redelivered,
            properties: delivery.properties,
            payload: Arc::new(delivery.data),
            copy_lock: copy_lock(channel.id()),
            channel,
            topology,
            attempt,
            tracking: None,
        }
    }

    /// In a batch runner: the delivery is outstanding in `tracking` until settled, and its ack
    /// is left for the runner to send after the batch.
    fn tracked(mut self, tracking: Tracking) -> Self {
        tracking.outstanding.received(self.delivery_tag);
        self.tracking = Some(tracking);
        self
    }

    /// This delivery is settled with the broker (or never will be by us).
    fn settled(&self) {
        if let Some(tracking) = &self.tracking {
            tracking.outstanding.settled(self.delivery_tag);
        }
    }

    /// The message's body.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The message's properties and headers.
    pub fn properties(&self) -> &BasicProperties {
        &self.properties
    }

    /// The delivery tag, which acknowledges it on its channel.
    pub fn delivery_tag(&self) -> u64 {
        self.delivery_tag
    }

    /// Whether RabbitMQ delivered this message before (to a consumer that did not settle it).
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    fn check_acked(&self, acked: bool) -> Result<(), RabbitMqError> {
        if acked {
            Ok(())
        } else {
            Err(RabbitMqError::ChannelClosed {
                delivery_tag: self.delivery_tag,
            })
        }
    }

    async fn ack_original(&self) -> Result<(), RabbitMqError> {
        let acked = self
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(RabbitMqError::amqp("basic.ack"));
        self.settled();
        self.check_acked(acked?)
    }

    /// Hands the original back after a copy could not be stored, and returns `error`: after
    /// `wait`, so that a copy the broker keeps refusing (a full disk, a nack, a missing
    /// topology, a channel without confirms) does not turn into an immediate redelivery of the
    /// same attempt, in a hot loop. On a closed channel there is nothing to wait for: RabbitMQ
    /// has requeued the delivery already.
    async fn give_back(&self, error: RabbitMqError, wait: Duration) -> RabbitMqError {
        if self.channel.status().connected() {
            tracing::warn!(
                target: "idem",
                %error,
                delivery_tag = self.delivery_tag,
                wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                "the broker did not store the copy; handing the delivery back after a wait"
            );
            tokio::time::sleep(wait).await;
        }
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        if let Err(nack_error) = self.acker.nack(requeue).await {
            tracing::warn!(
                target: "idem",
                error = %nack_error,
                delivery_tag = self.delivery_tag,
                "could not hand the delivery back either; RabbitMQ redelivers it when the channel closes"
            );
        }
        self.settled();
        error
    }

    /// Publishes a copy of the message and waits for the broker's confirm. `Ok(false)`: the
    /// copy was returned as unroutable.
    async fn publish_copy(
        &self,
        what: &'static str,
        exchange: &ShortString,
        routing_key: &ShortString,
        properties: BasicProperties,
    ) -> Result<bool, RabbitMqError> {
        if !self.channel.status().confirm() {
            return Err(RabbitMqError::ConfirmsNotEnabled);
        }
        // One copy awaiting its confirm per channel: a return is then this copy's.
        let _one_at_a_time = self.copy_lock.lock().await;
        let confirm = self
            .channel
            .basic_publish(
                exchange.clone(),
                routing_key.clone(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &self.payload,
                properties,
            )
            .await
            .map_err(RabbitMqError::amqp("basic.publish"))?;
        let confirmation = confirm
            .await
            .map_err(RabbitMqError::amqp("publisher confirm"))?;
        match confirmation {
            Confirmation::Ack(None) => Ok(true),
            Confirmation::Ack(Some(_)) => Ok(false),
            Confirmation::Nack(_) => Err(RabbitMqError::NotStored {
                what,
                delivery_tag: self.delivery_tag,
                exchange: exchange.to_string(),
                routing_key: routing_key.to_string(),
                why: "nacked by the broker",
            }),
            Confirmation::NotRequested => Err(RabbitMqError::ConfirmsNotEnabled),
        }
    }

    fn unroutable(&self, what: &'static str, exchange: &str, routing_key: &str) -> RabbitMqError {
        RabbitMqError::NotStored {
            what,
            delivery_tag: self.delivery_tag,
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            why: "unroutable",
        }
    }

    fn headers_with(&self, add: Vec<(&str, AMQPValue)>) -> FieldTable {
        copy_headers(self.properties.headers().as_ref(), add)
    }

    async fn publish_retry(&self, requeue: Requeue) -> Result<(), RabbitMqError> {
        let delay = delay_ms(requeue.delay);
        let tier = tier_of(delay);
        // A delivery that found the key in progress elsewhere did not fail: its copy keeps the
        // attempt number, so that waiting for a twin never eats into `max_attempts`.
        let next = if requeue.reason == crate::ack::RequeueReason::InProgressElsewhere {
            i64::from(requeue.attempt.max(1))
        } else {
            i64::from(requeue.attempt.saturating_add(1))
        };
        let headers = self.headers_with(vec![(ATTEMPT_HEADER, AMQPValue::LongLongInt(next))]);
        let properties = copy_properties(
            &self.properties,
            headers,
            Some(short_string(delay.to_string())?),
        );
        let default_exchange = ShortString::default();
        let queue = self
            .topology
            .ensure_tier(&self.channel, tier, false)
            .await?;
        if self
            .publish_copy("retry", &default_exchange, &queue, properties.clone())
            .await?
        {
            return Ok(());
        }
        // Unroutable: the tier queue expired under us. Declare it again, and retry once.
        let queue = self.topology.ensure_tier(&self.channel, tier, true).await?;
        if self
            .publish_copy("retry", &default_exchange, &queue, properties)
            .await?
        {
            Ok(())
        } else {
            Err(self.unroutable("retry", "", queue.as_str()))
        }
    }

    /// Dead-letters the delivery without handing it to a handler (a payload your loop cannot
    /// decode, a message no handler takes), with `reason` and this delivery's attempt number:
    /// a copy goes to the dead-letter exchange, then the original is acked.
    ///
    /// # Errors
    ///
    /// As [`Acknowledger::dead_letter`]: when the broker does not store the copy, the original
    /// is handed back (`basic.nack`, requeued) after 5 s and the error returned.
    pub async fn dead_letter_now(self, reason: &str) -> Result<(), RabbitMqError> {
        let attempt = self.attempt;
        Acknowledger::dead_letter(self, DeadLetter { reason, attempt }).await
    }

    async fn publish_dead_letter(&self, letter: DeadLetter<'_>) -> Result<(), RabbitMqError> {
        let names = &self.topology.names;
        let headers = self.headers_with(vec![
            (REASON_HEADER, AMQPValue::LongString(letter.reason.into())),
            (
                ATTEMPT_HEADER,
                AMQPValue::LongLongInt(i64::from(letter.attempt)),
            ),
            (
                QUEUE_HEADER,
                AMQPValue::LongString(names.queue.as_str().into()),
            ),
        ]);
        // No expiration: a dead letter waits until someone looks at it.
        let properties = copy_properties(&self.properties, headers, None);
        if self
            .publish_copy(
                "dead-letter",
                &names.dead_letter_exchange,
                &names.queue,
                properties.clone(),
            )
            .await?
        {
            return Ok(());
        }
        // Unroutable: the dead-letter queue (or its binding) is gone. Declare them again, and
        // retry once.
        self.topology.declare_dead_letter(&self.channel).await?;
        if self
            .publish_copy(
                "dead-letter",
                &names.dead_letter_exchange,
                &names.queue,
                properties,
            )
            .await?
        {
            Ok(())
        } else {
            Err(self.unroutable(
                "dead-letter",
                names.dead_letter_exchange.as_str(),
                names.queue.as_str(),
            ))
        }
    }
}

impl Acknowledger for RabbitMqAcknowledger {
    type Error = RabbitMqError;

    /// `x-idem-attempt` (1 when absent) plus the quorum queues' `x-delivery-count`.
    fn attempt(&self) -> Option<u32> {
        Some(self.attempt)
    }

    /// The AMQP `message_id` property.
    fn message_id(&self) -> Option<&str> {
        self.properties
            .message_id()
            .as_ref()
            .map(ShortString::as_str)
    }

    async fn ack(self, _proof: Committed) -> Result<(), RabbitMqError> {
        if let Some(tracking) = &self.tracking {
            // A batch runner acks after the batch, at once where it is safe.
            tracking
                .deferred
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((self.delivery_tag, self.acker));
            return Ok(());
        }
        self.ack_original().await
    }

    async fn requeue(self, requeue: Requeue) -> Result<(), RabbitMqError> {
        match self.publish_retry(requeue).await {
            Ok(()) => self.ack_original().await,
            Err(error) => Err(self.give_back(error, give_back_wait(requeue.delay)).await),
        }
    }

    async fn dead_letter(self, letter: DeadLetter<'_>) -> Result<(), RabbitMqError> {
        match self.publish_dead_letter(letter).await {
            Ok(()) => self.ack_original().await,
            Err(error) => Err(self.give_back(error, DEAD_LETTER_BACKOFF).await),
        }
    }
}

/// A consumer runner for one work queue: consumes with manual acks and a bounded prefetch,
/// runs up to [`ConsumerOptions::concurrency`] handlers at once, settles each delivery through
/// a [`RabbitMqAcknowledger`], and shuts down gracefully (see the
/// [module documentation](self) for an example).
///
/// The channel is the runner's own: [`run`](Self::run) enables publisher confirms and the
/// prefetch on it, declares the topology, consumes, publishes the retry and dead-letter copies,
/// and closes it when it returns, so that the deliveries it did not settle go back to the queue
/// at once.
pub struct RabbitMqConsumer<H: Handler, D = Json> {
    channel: Channel,
    topology: RabbitMqTopology,
    handler: Arc<H>,
    store: Arc<H::Store>,
    decoder: Arc<D>,
    options: ConsumerOptions,
    stats: Arc<ConsumerStats>,
}

impl<H: Handler> RabbitMqConsumer<H, Json> {
    /// A runner consuming `topology`'s work queue on `channel` (a channel of its own), with
    /// `handler`, on `store`; payloads are JSON, the options the defaults.
    pub fn new(channel: Channel, topology: RabbitMqTopology, handler: H, store: H::Store) -> Self {
        Self {
            channel,
            topology,
            handler: Arc::new(handler),
            store: Arc::new(store),
            decoder: Arc::new(Json),
            options: ConsumerOptions::default(),
            stats: Arc::default(),
        }
    }
}

impl<H: Handler, D> RabbitMqConsumer<H, D> {
    /// Decodes payloads with `decoder` instead.
    pub fn with_decoder<D2: Decode<H::Message>>(self, decoder: D2) -> RabbitMqConsumer<H, D2> {
        RabbitMqConsumer {
            channel: self.channel,
            topology: self.topology,
            handler: self.handler,
            store: self.store,
            decoder: Arc::new(decoder),
            options: self.options,
            stats: self.stats,
        }
    }

    /// Concurrency, prefetch and shutdown grace.
    #[must_use]
    pub fn with_options(mut self, options: ConsumerOptions) -> Self {
        self.options = options;
        self
    }

    /// The runner's counts, live.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        Arc::clone(&self.stats)
    }
}

impl<H, D> RabbitMqConsumer<H, D>
where
    H: Handler,
    H::Store: 'static,
    D: Decode<H::Message>,
{
    /// Consumes until `shutdown` is cancelled: then stops fetching (`basic.cancel`), lets the
    /// handlers in flight finish and settle for up to the shutdown grace, cancels the rest
    /// (their deliveries are not acked), closes the channel (RabbitMQ requeues what was not
    /// settled) and returns what it did. The deliveries prefetched but never started go back
    /// too; on a quorum queue they come back with `x-delivery-count` one higher, so their
    /// attempt number rises without a run (see the [module documentation](self)).
    ///
    /// # Errors
    ///
    /// When the set-up fails (the channel is closed, the topology conflicts with existing
    /// queues), the channel or connection fails while consuming, or the broker cancels the
    /// consumer. The handlers in flight are drained first. Restart the runner on a new channel.
    pub async fn run(self, shutdown: CancellationToken) -> Result<ConsumerReport, RabbitMqError> {
        let Self {
            channel,
            topology,
            handler,
            store,
            decoder,
            options,
            stats,
        } = self;
        let mut consumer = match Self::start(&channel, &topology, options).await {
            Ok(consumer) => consumer,
            Err(error) => {
                close(&channel).await;
                return Err(error);
            }
        };
        let mut workers = super::Workers::new(options.concurrency_limit(), Arc::clone(&stats));
        let ended = loop {
            let Some(permit) = shutdown.run_until_cancelled(workers.ready()).await else {
                break Ok(());
            };
            let Some(next) = shutdown.run_until_cancelled(consumer.next()).await else {
                break Ok(());
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(source)) => {
                    break Err(RabbitMqError::Amqp {
                        operation: "basic.consume",
                        source,
                    });
                }
                None => {
                    break Err(RabbitMqError::ConsumerCancelled {
                        queue: topology.queue().to_owned(),
                    });
                }
            };
            let ack = RabbitMqAcknowledger::new(delivery, channel.clone(), topology.clone());
            let span = tracing::info_span!(
                "idem.delivery",
                broker = "rabbitmq",
                queue = topology.queue(),
                delivery_tag = ack.delivery_tag,
                redelivered = ack.redelivered,
                message_id = Acknowledger::message_id(&ack),
                attempt = ack.attempt,
            );
            let payload = Arc::clone(&ack.payload);
            let (handler, decoder, store, stats) = (
                Arc::clone(&handler),
                Arc::clone(&decoder),
                Arc::clone(&store),
                Arc::clone(&stats),
            );
            workers.spawn(
                permit,
                async move {
                    super::deliver(&*handler, &*decoder, &*store, &payload, ack, &stats).await;
                }
                .instrument(span),
            );
        };
        if ended.is_ok() {
            // Stop fetching; what was prefetched and not started goes back when the channel
            // closes.
            if let Err(error) = channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await
            {
                tracing::warn!(target: "idem", %error, "basic.cancel failed while shutting down");
            }
        }
        workers.drain(options.grace()).await;
        close(&channel).await;
        ended.map(|()| stats.snapshot())
    }

    async fn start(
        channel: &Channel,
        topology: &RabbitMqTopology,
        options: ConsumerOptions,
    ) -> Result<lapin::Consumer, RabbitMqError> {
        start_consuming(channel, topology, options.prefetch_count()).await
    }
}

/// Sets the runner's channel up (publisher confirms, the prefetch), declares the topology and
/// starts consuming the work queue.
async fn start_consuming(
    channel: &Channel,
    topology: &RabbitMqTopology,
    prefetch: u16,
) -> Result<lapin::Consumer, RabbitMqError> {
    {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(RabbitMqError::amqp("confirm.select"))?;
        if !channel.status().confirm() {
            return Err(RabbitMqError::ConfirmsNotEnabled);
        }
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(RabbitMqError::amqp("basic.qos"))?;
        topology.declare(channel).await?;
        channel
            .basic_consume(
                topology.names.queue.clone(),
                ShortString::default(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(RabbitMqError::amqp("basic.consume"))
    }
}

/// A delivery's body, shared with its acknowledger (which publishes it again as a retry or
/// dead-letter copy).
struct Payload(Arc<Vec<u8>>);

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// A batch runner's bookkeeping of its deliveries: which are outstanding (received, not yet
/// settled), and, per batch, the acks waiting for the batch to end.
#[derive(Debug, Clone)]
struct Tracking {
    outstanding: Arc<Outstanding>,
    deferred: Arc<Mutex<Vec<(u64, Acker)>>>,
}

/// The delivery tags of one channel that were received and not yet settled.
#[derive(Debug, Default)]
struct Outstanding(Mutex<BTreeSet<u64>>);

impl Outstanding {
    fn tags(&self) -> std::sync::MutexGuard<'_, BTreeSet<u64>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn received(&self, tag: u64) {
        self.tags().insert(tag);
    }

    fn settled(&self, tag: u64) {
        self.tags().remove(&tag);
    }

    /// Whether one `multiple` ack up to the highest of `tags` would settle exactly `tags`.
    fn settled_only_by(&self, tags: &BTreeSet<u64>) -> bool {
        multiple_ack_settles_only(&self.tags(), tags)
    }

    /// `tags` were acked: forget them. Only once their ack is sent: until then another batch's
    /// `multiple` ack must not cover them, or it could reach the broker first (lapin sends each
    /// ack from a task of its own) and leave ours acking an unknown tag, which closes the
    /// channel.
    fn forget(&self, tags: &BTreeSet<u64>) {
        let mut outstanding = self.tags();
        for tag in tags {
            outstanding.remove(tag);
        }
    }
}

/// Whether `basic.ack` with `multiple` up to the highest of `tags` acks nothing but `tags`:
/// every outstanding delivery up to it is one of them. A delivery being requeued or
/// dead-lettered (its copy not yet confirmed), or one of another batch still running, below
/// that tag makes it unsafe: it would be acked before its copy is stored, or before its commit.
fn multiple_ack_settles_only(outstanding: &BTreeSet<u64>, tags: &BTreeSet<u64>) -> bool {
    match tags.last() {
        Some(&last) => outstanding.range(..=last).all(|tag| tags.contains(tag)),
        None => false,
    }
}

/// Sends the acks a batch left waiting: one `multiple` ack where it settles exactly them, one
/// ack each otherwise. Returns the tags whose ack did not reach the broker.
async fn flush_acks(tracking: &Tracking) -> BTreeSet<u64> {
    let acks = std::mem::take(
        &mut *tracking
            .deferred
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    let tags: BTreeSet<u64> = acks.iter().map(|(tag, _)| *tag).collect();
    if tags.is_empty() {
        return BTreeSet::new();
    }
    let failed = |error: &dyn std::fmt::Display| {
        tracing::warn!(
            target: "idem",
            %error,
            "ack failed after commit; the broker will redeliver and the gate will report duplicates"
        );
    };
    let mut refused = BTreeSet::new();
    if tracking.outstanding.settled_only_by(&tags) {
        let last = acks.into_iter().max_by_key(|(tag, _)| *tag);
        if let Some((_, acker)) = last {
            match acker.ack(BasicAckOptions { multiple: true }).await {
                Ok(true) => {}
                Ok(false) => {
                    failed(&"the channel is closed");
                    refused.clone_from(&tags);
                }
                Err(error) => {
                    failed(&error);
                    refused.clone_from(&tags);
                }
            }
        }
        tracking.outstanding.forget(&tags);
        return refused;
    }
    for (tag, acker) in acks {
        match acker.ack(BasicAckOptions::default()).await {
            Ok(true) => {}
            Ok(false) => {
                failed(&"the channel is closed");
                refused.insert(tag);
            }
            Err(error) => {
                failed(&error);
                refused.insert(tag);
            }
        }
        tracking.outstanding.settled(tag);
    }
    refused
}

/// A consumer runner in batch mode, for a `batch` handler ([`BatchHandler`]): collects up to
/// [`BatchOptions::max_size`] deliveries or what arrives within [`BatchOptions::max_wait`] of
/// the first, hands them to the handler as one batch (one transaction, see
/// [`pipeline::batch`](crate::pipeline::batch)), and runs up to
/// [`ConsumerOptions::concurrency`] batches at once. Everything else is as
/// [`RabbitMqConsumer`]: the channel is its own, retries and dead letters go to the same
/// queues, shutdown is graceful.
///
/// Acks wait until the batch's handler returns (every part of it committed), then go out as
/// one `basic.ack` with `multiple` when that acks exactly the batch's processed and duplicate
/// deliveries: no delivery of another batch still running, and none being requeued or
/// dead-lettered, has a lower tag. Otherwise each delivery is acked on its own.
///
/// ```no_run
/// use idem_runtime::broker::rabbitmq::{lapin, RabbitMqBatchConsumer, RabbitMqTopology};
/// use idem_runtime::broker::{BatchOptions, CancellationToken};
/// use idem_runtime::{batch_handler, idempotent, HandlerError, PgStore, PgTx};
///
/// #[derive(serde::Deserialize)]
/// struct OrderPaid { order_id: String, amount: i64 }
///
/// #[derive(Debug, thiserror::Error)]
/// enum AppError {
///     #[error(transparent)]
///     Db(#[from] idem_runtime::sqlx::Error),
/// }
/// impl HandlerError for AppError {}
///
/// #[idempotent(key = "order_id", store = "pg", strategy = "dedup_table", scope = "doc.rabbitmq.batch", batch)]
/// async fn on_orders_paid(tx: &mut PgTx<'_>, msgs: &[OrderPaid]) -> Result<(), AppError> {
///     let ids: Vec<&str> = msgs.iter().map(|msg| msg.order_id.as_str()).collect();
///     let amounts: Vec<i64> = msgs.iter().map(|msg| msg.amount).collect();
///     idem_runtime::sqlx::query(
///         "INSERT INTO payments (order_id, amount) SELECT * FROM unnest($1::text[], $2::bigint[])",
///     )
///     .bind(&ids).bind(&amounts)
///     .execute(&mut **tx).await?;
///     Ok(())
/// }
///
/// # async fn run(store: PgStore, connection: lapin::Connection) -> Result<(), Box<dyn std::error::Error>> {
/// let shutdown = CancellationToken::new();
/// let consumer = RabbitMqBatchConsumer::new(
///     connection.create_channel().await?,
///     RabbitMqTopology::for_queue("orders")?,
///     batch_handler!(on_orders_paid),
///     store,
/// )
/// .with_batch(BatchOptions::default().max_size(100));
/// let report = consumer.run(shutdown).await?;
/// # drop(report);
/// # Ok(())
/// # }
/// ```
pub struct RabbitMqBatchConsumer<H: BatchHandler, D = Json> {
    channel: Channel,
    topology: RabbitMqTopology,
    handler: Arc<H>,
    store: Arc<H::Store>,
    decoder: Arc<D>,
    options: ConsumerOptions,
    batch: BatchOptions,
    stats: Arc<ConsumerStats>,
}

impl<H: BatchHandler> RabbitMqBatchConsumer<H, Json> {
    /// A batch runner consuming `topology`'s work queue on `channel` (a channel of its own),
    /// with `handler`, on `store`; payloads are JSON, the options and batches the defaults.
    pub fn new(channel: Channel, topology: RabbitMqTopology, handler: H, store: H::Store) -> Self {
        Self {
            channel,
            topology,
            handler: Arc::new(handler),
            store: Arc::new(store),
            decoder: Arc::new(Json),
            options: ConsumerOptions::default(),
            batch: BatchOptions::default(),
            stats: Arc::default(),
        }
    }
}

impl<H: BatchHandler, D> RabbitMqBatchConsumer<H, D> {
    /// Decodes payloads with `decoder` instead.
    pub fn with_decoder<D2: Decode<H::Message>>(self, decoder: D2) -> RabbitMqBatchConsumer<H, D2> {
        RabbitMqBatchConsumer {
            channel: self.channel,
            topology: self.topology,
            handler: self.handler,
            store: self.store,
            decoder: Arc::new(decoder),
            options: self.options,
            batch: self.batch,
            stats: self.stats,
        }
    }

    /// Concurrency (batches at once), prefetch and shutdown grace.
    #[must_use]
    pub fn with_options(mut self, options: ConsumerOptions) -> Self {
        self.options = options;
        self
    }

    /// How batches are collected.
    #[must_use]
    pub fn with_batch(mut self, batch: BatchOptions) -> Self {
        self.batch = batch;
        self
    }

    /// The runner's counts, live.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        Arc::clone(&self.stats)
    }
}

impl<H, D> RabbitMqBatchConsumer<H, D>
where
    H: BatchHandler,
    H::Store: 'static,
    D: Decode<H::Message>,
{
    /// Consumes in batches until `shutdown` is cancelled, then stops as
    /// [`RabbitMqConsumer::run`] does: the batch being collected runs with what it has, the
    /// batches in flight finish for up to the shutdown grace, and the channel closes.
    ///
    /// # Errors
    ///
    /// As [`RabbitMqConsumer::run`].
    pub async fn run(self, shutdown: CancellationToken) -> Result<ConsumerReport, RabbitMqError> {
        let Self {
            channel,
            topology,
            handler,
            store,
            decoder,
            options,
            batch,
            stats,
        } = self;
        let prefetch = batch.prefetch_for(&options);
        let mut consumer = match start_consuming(&channel, &topology, prefetch).await {
            Ok(consumer) => consumer,
            Err(error) => {
                close(&channel).await;
                return Err(error);
            }
        };
        let outstanding = Arc::new(Outstanding::default());
        let mut workers = super::Workers::new(options.concurrency_limit(), Arc::clone(&stats));
        let ended = loop {
            let Some(permit) = shutdown.run_until_cancelled(workers.ready()).await else {
                break Ok(());
            };
            let Some(first) = shutdown.run_until_cancelled(consumer.next()).await else {
                break Ok(());
            };
            let mut collected = Vec::with_capacity(batch.size_limit().min(super::BATCH_CAPACITY));
            let mut failed = match first {
                Some(Ok(delivery)) => {
                    collected.push(delivery);
                    None
                }
                Some(Err(source)) => break Err(RabbitMqError::amqp("basic.consume")(source)),
                None => {
                    break Err(RabbitMqError::ConsumerCancelled {
                        queue: topology.queue().to_owned(),
                    });
                }
            };
            let deadline = tokio::time::Instant::now() + batch.wait_limit();
            while failed.is_none() && collected.len() < batch.size_limit() {
                tokio::select! {
                    biased;
                    next = consumer.next() => match next {
                        Some(Ok(delivery)) => collected.push(delivery),
                        Some(Err(source)) => {
                            failed = Some(RabbitMqError::amqp("basic.consume")(source));
                        }
                        None => {
                            failed = Some(RabbitMqError::ConsumerCancelled {
                                queue: topology.queue().to_owned(),
                            });
                        }
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                    () = shutdown.cancelled() => break,
                }
            }
            let tracking = Tracking {
                outstanding: Arc::clone(&outstanding),
                deferred: Arc::default(),
            };
            let span = tracing::info_span!(
                "idem.delivery_batch",
                broker = "rabbitmq",
                queue = topology.queue(),
                size = collected.len(),
            );
            let deliveries: Vec<(Payload, RabbitMqAcknowledger)> = collected
                .into_iter()
                .map(|delivery| {
                    let ack =
                        RabbitMqAcknowledger::new(delivery, channel.clone(), topology.clone())
                            .tracked(tracking.clone());
                    (Payload(Arc::clone(&ack.payload)), ack)
                })
                .collect();
            let (handler, decoder, store, stats) = (
                Arc::clone(&handler),
                Arc::clone(&decoder),
                Arc::clone(&store),
                Arc::clone(&stats),
            );
            let size = deliveries.len();
            workers.spawn_batch(
                permit,
                size,
                async move {
                    let tags: Vec<u64> =
                        deliveries.iter().map(|(_, ack)| ack.delivery_tag).collect();
                    let mut settled =
                        super::handle_batch(&*handler, &*decoder, &*store, deliveries).await;
                    // The acks were only queued: a delivery whose ack then fails is not acked.
                    let refused = flush_acks(&tracking).await;
                    for (settled, tag) in settled.iter_mut().zip(tags) {
                        if refused.contains(&tag)
                            && matches!(
                                settled,
                                super::Settled::Processed | super::Settled::Duplicate
                            )
                        {
                            *settled = super::Settled::Refused;
                        }
                    }
                    for settled in settled {
                        stats.count(settled);
                    }
                }
                .instrument(span),
            );
            if let Some(error) = failed {
                break Err(error);
            }
        };
        if ended.is_ok()
            && let Err(error) = channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await
        {
            tracing::warn!(target: "idem", %error, "basic.cancel failed while shutting down");
        }
        workers.drain(options.grace()).await;
        close(&channel).await;
        ended.map(|()| stats.snapshot())
    }
}

/// Closes the runner's channel, if it is still open: its unacknowledged deliveries go back to
/// the queue.
async fn close(channel: &Channel) {
    if channel.status().connected()
        && let Err(error) = channel.close(200, "idem consumer stopped".into()).await
    {
        tracing::debug!(target: "idem", %error, "closing the consumer's channel failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multiple_ack_is_sent_only_when_it_settles_the_batch_alone() {
        let set = |tags: &[u64]| tags.iter().copied().collect::<BTreeSet<u64>>();
        // The batch is everything outstanding up to its last tag.
        assert!(multiple_ack_settles_only(
            &set(&[3, 4, 5, 9]),
            &set(&[3, 4, 5])
        ));
        // Tag 2 (another batch, or a copy not yet confirmed) would be acked with it.
        assert!(!multiple_ack_settles_only(
            &set(&[2, 3, 4, 5]),
            &set(&[3, 4, 5])
        ));
        // A delivery of the batch itself still being requeued, below its last tag.
        assert!(!multiple_ack_settles_only(&set(&[3, 4, 5]), &set(&[3, 5])));
        assert!(!multiple_ack_settles_only(&set(&[1]), &set(&[])));
        let outstanding = Outstanding::default();
        for tag in 1..=6 {
            outstanding.received(tag);
        }
        assert!(
            !outstanding.settled_only_by(&set(&[2, 3])),
            "1 is outstanding"
        );
        outstanding.settled(1);
        assert!(outstanding.settled_only_by(&set(&[2, 3])));
        assert_eq!(
            *outstanding.tags(),
            set(&[2, 3, 4, 5, 6]),
            "until the ack is sent"
        );
        outstanding.forget(&set(&[2, 3]));
        assert_eq!(*outstanding.tags(), set(&[4, 5, 6]));
    }

    #[test]
    fn tiers_round_the_delay_up_to_a_power_of_two() {
        assert_eq!(tier_of(0), 0);
        assert_eq!(tier_of(1), 0);
        assert_eq!(tier_of(2), 1);
        assert_eq!(tier_of(3), 2);
        assert_eq!(tier_of(1000), 10);
        assert_eq!(tier_of(1024), 10);
        assert_eq!(tier_of(1025), 11);
        assert_eq!(tier_of(MAX_DELAY_MS), 32);
    }

    #[test]
    fn tier_queues_never_expire_and_dead_letter_back_to_the_work_queue() {
        let topology = RabbitMqTopology::for_queue("orders").expect("a valid name");
        let arguments = topology.tier_arguments();
        assert!(!arguments.contains_key("x-expires"), "{arguments:?}");
        assert!(!arguments.contains_key("x-message-ttl"), "{arguments:?}");
        assert_eq!(
            arguments.inner().get("x-dead-letter-exchange"),
            Some(&AMQPValue::LongString("".into()))
        );
        assert_eq!(
            arguments.inner().get("x-dead-letter-routing-key"),
            Some(&AMQPValue::LongString("orders".into()))
        );
    }

    fn headers(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
        let mut headers = FieldTable::default();
        for (name, value) in entries {
            headers.insert(name.into(), value);
        }
        headers
    }

    #[test]
    fn attempts_add_the_quorum_delivery_count() {
        assert_eq!(attempt_of(None), 1);
        assert_eq!(attempt_of(Some(&FieldTable::default())), 1);
        let attempt = |value: AMQPValue| attempt_of(Some(&headers(vec![(ATTEMPT_HEADER, value)])));
        assert_eq!(attempt(AMQPValue::LongLongInt(3)), 3);
        assert_eq!(
            attempt_of(Some(&headers(vec![
                (ATTEMPT_HEADER, AMQPValue::LongLongInt(3)),
                (DELIVERY_COUNT_HEADER, AMQPValue::LongInt(2)),
            ]))),
            5,
            "3 + two redeliveries"
        );
        assert_eq!(
            attempt_of(Some(&headers(vec![(
                DELIVERY_COUNT_HEADER,
                AMQPValue::LongLongInt(4)
            )]))),
            5,
            "no x-idem-attempt: 1 + 4"
        );
        // Every AMQP integer type, and strings.
        assert_eq!(attempt(AMQPValue::ShortShortUInt(2)), 2);
        assert_eq!(attempt(AMQPValue::ShortShortInt(2)), 2);
        assert_eq!(attempt(AMQPValue::ShortUInt(2)), 2);
        assert_eq!(attempt(AMQPValue::ShortInt(2)), 2);
        assert_eq!(attempt(AMQPValue::LongUInt(2)), 2);
        assert_eq!(attempt(AMQPValue::LongInt(2)), 2);
        assert_eq!(attempt(AMQPValue::Timestamp(2)), 2);
        assert_eq!(attempt(AMQPValue::LongString(" 7 ".into())), 7);
        assert_eq!(attempt(AMQPValue::ShortString("7".into())), 7);
        // Zero, negative, not a number: the first attempt.
        for value in [
            AMQPValue::LongLongInt(0),
            AMQPValue::LongLongInt(-1),
            AMQPValue::LongLongInt(i64::MIN),
            AMQPValue::ShortShortInt(-128),
            AMQPValue::LongString("-3".into()),
            AMQPValue::LongString("three".into()),
            AMQPValue::LongString(vec![0xff, 0xfe].into()),
            AMQPValue::ShortString("".into()),
            AMQPValue::Double(2.0),
            AMQPValue::Boolean(true),
            AMQPValue::Void,
        ] {
            assert_eq!(attempt(value.clone()), 1, "{value:?}");
        }
        // Huge values saturate.
        assert_eq!(attempt(AMQPValue::LongLongInt(i64::MAX)), u32::MAX);
        assert_eq!(
            attempt_of(Some(&headers(vec![
                (ATTEMPT_HEADER, AMQPValue::Timestamp(u64::MAX)),
                (DELIVERY_COUNT_HEADER, AMQPValue::Timestamp(u64::MAX)),
            ]))),
            u32::MAX
        );
        // An unreadable delivery count counts nothing.
        assert_eq!(
            attempt_of(Some(&headers(vec![
                (ATTEMPT_HEADER, AMQPValue::LongInt(2)),
                (DELIVERY_COUNT_HEADER, AMQPValue::LongInt(-5)),
            ]))),
            2
        );
    }

    #[test]
    fn a_copy_not_stored_holds_the_delivery_back_never_for_nothing() {
        assert_eq!(give_back_wait(Duration::ZERO), Duration::from_secs(1));
        assert_eq!(
            give_back_wait(Duration::from_millis(2500)),
            Duration::from_millis(2500)
        );
        assert_eq!(
            give_back_wait(Duration::from_secs(86_400)),
            Duration::from_secs(300)
        );
        assert_eq!(DEAD_LETTER_BACKOFF, Duration::from_secs(5));
    }

    #[test]
    fn copies_are_persistent_and_drop_the_dead_lettering_headers() {
        let mut original = FieldTable::default();
        for name in DEAD_LETTERING_HEADERS {
            original.insert(name.into(), AMQPValue::LongString("x".into()));
        }
        original.insert("x-app".into(), AMQPValue::LongString("kept".into()));
        original.insert(ATTEMPT_HEADER.into(), AMQPValue::LongLongInt(2));
        let headers = copy_headers(
            Some(&original),
            vec![(ATTEMPT_HEADER, AMQPValue::LongLongInt(3))],
        );
        let names: Vec<&str> = headers.inner().keys().map(ShortString::as_str).collect();
        assert_eq!(names, ["x-app", ATTEMPT_HEADER]);
        assert_eq!(
            headers.inner().get(ATTEMPT_HEADER),
            Some(&AMQPValue::LongLongInt(3))
        );

        let transient = BasicProperties::default()
            .with_delivery_mode(1)
            .with_message_id("m".into())
            .with_user_id("someone".into());
        let copy = copy_properties(&transient, headers, None);
        assert_eq!(*copy.delivery_mode(), Some(2));
        assert_eq!(
            copy.message_id().as_ref().map(ShortString::as_str),
            Some("m")
        );
        assert_eq!(*copy.user_id(), None);
        let copy = copy_properties(&BasicProperties::default(), FieldTable::default(), None);
        assert_eq!(*copy.delivery_mode(), Some(2));
    }

    #[test]
    fn copy_publishes_on_one_channel_share_one_lock() {
        let first = copy_lock(7);
        let second = copy_lock(7);
        assert!(Arc::ptr_eq(&first, &second));
        assert!(!Arc::ptr_eq(&first, &copy_lock(8)));
        let held = first.try_lock().expect("free");
        assert!(second.try_lock().is_err(), "one copy in flight per channel");
        drop(held);
        assert!(second.try_lock().is_ok());
    }

    #[test]
    fn names_longer_than_amqp_allows_are_errors() {
        let long = "q".repeat(250);
        assert!(matches!(
            RabbitMqTopology::for_queue(&long),
            Err(RabbitMqError::InvalidName { .. })
        ));
        let topology = RabbitMqTopology::for_queue("orders").expect("a valid name");
        assert!(topology.with_dead_letter(&long, &"x".repeat(300)).is_err());
    }
}
