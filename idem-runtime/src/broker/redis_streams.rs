//! Redis Streams: consumer groups read with `XREADGROUP`, `XACK` after the commit, delayed
//! retries that keep the entry, dead-letters to a stream, and `XAUTOCLAIM` of the entries a
//! dead consumer left pending. Behind the `redis-streams` feature, on the `redis` crate.
//!
//! # The pieces
//!
//! - [`StreamGroup`]: the stream, its consumer group and how entries are read (the payload
//!   field, the dead-letter stream, the reclaim idle time), with the low-level calls a
//!   service's own loop needs: [`create`](StreamGroup::create), [`read`](StreamGroup::read),
//!   [`reclaim`](StreamGroup::reclaim), [`publish`](StreamGroup::publish),
//!   [`pending`](StreamGroup::pending).
//! - [`RedisStreamAcknowledger`]: the [`Acknowledger`] of one entry read by one consumer.
//! - [`RedisStreamConsumer`]: the runner that does the loop.
//! - [`RedisStreamsBatchConsumer`]: the same loop in batch mode, for a `batch` handler: up to
//!   `max_size` entries in one transaction, each still acked (`XACK`) on its own after its
//!   commit.
//!
//! # What each outcome becomes
//!
//! | outcome | Redis |
//! |---|---|
//! | processed, duplicate | `XACK`, after the commit |
//! | retryable failure | the entry stays pending; `XCLAIM … IDLE <reclaim_idle − delay> JUSTID` makes it reclaimable `delay` from now |
//! | permanent failure, out of attempts, undecodable, malformed | one script: if still pending, `XADD <dead-letter stream>` with the entry's fields plus `idem-reason`, `idem-attempt`, `idem-stream`, `idem-id`, `idem-group`, then `XACK` (a refused `XADD` leaves the entry pending) |
//! | cancelled at the shutdown deadline, process died | nothing: the entry stays pending and is reclaimed |
//!
//! The attempt number is the entry's delivery count in the group's pending list: 1 for a
//! fresh read, and one more each time `XAUTOCLAIM` takes the entry over. Because a retry
//! keeps the entry, its id and its count survive the retries.
//!
//! `$message_id` ([`Acknowledger::message_id`]) is `<stream>/<entry id>`
//! (`orders:{0}/1700000000000-0`) by default: an entry id alone is unique only within its
//! stream, and two shards of one stream (`orders:{0}`, `orders:{1}`) hand out equal ids, which
//! one handler scope would otherwise take for duplicates of each other. A producer's id field
//! ([`StreamGroup::with_message_id_field`]) replaces it.
//!
//! **Retry delays are capped at the reclaim idle time**: a requeued entry becomes reclaimable
//! when its idle time reaches [`StreamGroup::with_reclaim_idle`] (60 s by default), so a delay
//! longer than that is shortened to it. Keep the reclaim idle time above the longest backoff
//! you want honoured. A requeued entry is picked up by the next reclaim sweep after its delay
//! ([`RedisStreamConsumer::with_reclaim_interval`]), by this consumer or any other.
//!
//! # The runner
//!
//! ```no_run
//! use idem_runtime::broker::redis_streams::{RedisStreamConsumer, StreamGroup};
//! use idem_runtime::broker::{CancellationToken, ConsumerOptions};
//! use idem_runtime::{idempotent, HandlerError, PgStore, PgTx};
//!
//! #[derive(serde::Deserialize)]
//! struct OrderPaid { order_id: String, amount: i64 }
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error(transparent)]
//! struct AppError(#[from] idem_runtime::sqlx::Error);
//! impl HandlerError for AppError {}
//!
//! #[idempotent(key = "order_id", store = "pg", strategy = "dedup_table", scope = "doc.redis.runner")]
//! async fn on_order_paid(tx: &mut PgTx<'_>, msg: OrderPaid) -> Result<(), AppError> {
//!     idem_runtime::sqlx::query("INSERT INTO ledger (order_id, amount) VALUES ($1, $2)")
//!         .bind(&msg.order_id)
//!         .bind(msg.amount)
//!         .execute(&mut **tx)
//!         .await?;
//!     Ok(())
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = redis::Client::open("redis://127.0.0.1:6379")?;
//! let store = PgStore::connect("postgres://postgres@127.0.0.1/app").await?;
//! let shutdown = CancellationToken::new();
//!
//! let group = StreamGroup::new("orders", "ledger");
//! let consumer = RedisStreamConsumer::new(
//!     client,
//!     group,
//!     "ledger-1", // unique per process: a host name, a pod name
//!     idem_runtime::handler!(on_order_paid),
//!     store,
//! )
//! .with_options(ConsumerOptions::default().concurrency(8).prefetch(32));
//!
//! // Cancel `shutdown` on SIGTERM; `run` then drains and returns.
//! let report = consumer.run(shutdown).await?;
//! println!("processed {}", report.processed);
//! # Ok(()) }
//! ```
//!
//! # Your own loop
//!
//! A service that already reads its streams keeps its loop and hands each entry to the
//! handler with a [`RedisStreamAcknowledger`]: the handler acks, requeues or dead-letters the
//! entry itself, after its commit. An entry the loop cannot decode (or a
//! [malformed](StreamDelivery::malformed) one, whose payload is empty) goes to the
//! dead-letter stream with [`RedisStreamAcknowledger::dead_letter_now`]. Sweep the pending
//! list now and then with [`StreamGroup::reclaim_from`], continuing from the cursor it
//! returned, so that retries and a dead consumer's entries come back ([`StreamGroup::reclaim`]
//! always starts from the beginning, and `XAUTOCLAIM` looks at no more than ten times `count`
//! entries per call: with a long pending list, it may never reach the end).
//!
//! Unlike the runner, this loop does not keep the entries it holds fresh: an entry whose
//! handler runs longer than the [reclaim idle time](StreamGroup::with_reclaim_idle) can be
//! taken over by another consumer while it runs (the gate still runs its body once, but the
//! work is done twice). Keep handlers well under the reclaim idle time, or touch the entries
//! while they run (`XCLAIM <stream> <group> <consumer> 0 <id> … JUSTID`).
//!
//! ```no_run
//! use std::time::Duration;
//! use idem_runtime::broker::redis_streams::{GroupStart, RedisStreamAcknowledger, StreamGroup};
//! # use idem_runtime::{idempotent, HandlerError, PgStore, PgTx};
//! # #[derive(serde::Deserialize)]
//! # struct OrderPaid { order_id: String }
//! # #[derive(Debug, thiserror::Error)]
//! # #[error("failed")]
//! # struct AppError;
//! # impl HandlerError for AppError {}
//! # #[idempotent(key = "order_id", store = "pg", strategy = "dedup_table", scope = "doc.redis.loop")]
//! # async fn on_order_paid(tx: &mut PgTx<'_>, msg: OrderPaid) -> Result<(), AppError> { Ok(()) }
//!
//! # async fn run(store: PgStore) -> Result<(), Box<dyn std::error::Error>> {
//! let client = redis::Client::open("redis://127.0.0.1:6379")?;
//! let mut conn = client.get_connection_manager().await?;
//! let group = StreamGroup::new("orders", "ledger");
//! group.create(&mut conn, GroupStart::Beginning).await?;
//!
//! let mut cursor = String::from("0-0");
//! loop {
//!     // No BLOCK on a shared connection manager: a blocked connection delays the acks
//!     // behind it. Block on a connection of its own instead.
//!     let mut deliveries = group.read(&mut conn, "ledger-1", 16, None).await?;
//!     // Retries and a dead consumer's entries, the scan continuing where it stopped.
//!     let (next, reclaimed) = group.reclaim_from(&mut conn, "ledger-1", &cursor, 16).await?;
//!     cursor = next;
//!     deliveries.extend(reclaimed);
//!     if deliveries.is_empty() {
//!         tokio::time::sleep(Duration::from_millis(200)).await;
//!     }
//!     for delivery in deliveries {
//!         let decoded = serde_json::from_slice::<OrderPaid>(delivery.payload(&group));
//!         let ack = RedisStreamAcknowledger::new(conn.clone(), &group, "ledger-1", delivery);
//!         match decoded {
//!             // Acks after the commit, requeues or dead-letters by itself.
//!             Ok(message) => {
//!                 let _outcome = on_order_paid(&store, message, ack).await;
//!             }
//!             // Cannot succeed: to the dead-letter stream, with the reason.
//!             Err(error) => ack.dead_letter_now(&format!("undecodable: {error}")).await?,
//!         }
//!     }
//! }
//! # }
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::Value;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::{
    BatchOptions, CancellationToken, ConsumerOptions, ConsumerReport, ConsumerStats, Decode, Json,
    Settled, Workers, deliver, deliver_batch,
};
use crate::ack::{Acknowledger, Committed, DeadLetter, Requeue};
use crate::handler::{BatchHandler, Handler};

/// What went wrong talking to Redis.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisStreamError {
    /// The runner could not open its connections.
    #[error(
        "could not connect to Redis for the stream `{stream}`: {source} (check the client's URL and that the server is running)"
    )]
    Connect {
        /// The stream the runner consumes.
        stream: String,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
    /// Redis refused a command, or the connection failed during it.
    #[error("Redis refused `{command}` on the stream `{stream}`, group `{group}`: {source}")]
    Command {
        /// The command, as Redis names it.
        command: &'static str,
        /// The stream.
        stream: String,
        /// The consumer group.
        group: String,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
    /// Redis answered something this module does not understand.
    #[error(
        "unexpected reply to `{command}` on the stream `{stream}`: {detail} (is the server Redis 7 or later, and the key a stream?)"
    )]
    Reply {
        /// The command.
        command: &'static str,
        /// The stream.
        stream: String,
        /// What was wrong with the reply.
        detail: String,
    },
}

/// Where a new consumer group starts reading, when [`StreamGroup::create`] makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum GroupStart {
    /// From the first entry in the stream (`0`): nothing already published is missed. The
    /// default.
    #[default]
    Beginning,
    /// Only entries added after the group is made (`$`).
    New,
}

/// A stream, the consumer group that reads it, and how its entries are read and settled.
///
/// Cheap to clone. The defaults: the payload in the field `payload`, dead-letters to
/// `<stream>:dead-letter`, entries reclaimable after 60 s idle, `$message_id` is
/// `<stream>/<entry id>`.
///
/// ```
/// use std::time::Duration;
/// use idem_runtime::broker::redis_streams::StreamGroup;
///
/// let group = StreamGroup::new("orders", "ledger")
///     .with_payload_field("body")
///     .with_reclaim_idle(Duration::from_secs(120));
/// assert_eq!(group.dead_letter_stream(), "orders:dead-letter");
/// assert_eq!(group.payload_field(), "body");
/// ```
#[derive(Debug, Clone)]
pub struct StreamGroup {
    stream: Arc<str>,
    group: Arc<str>,
    dead_letter_stream: Arc<str>,
    payload_field: Arc<str>,
    message_id_field: Option<Arc<str>>,
    reclaim_idle: Duration,
}

/// The field the dead-letter entries carry the reason in.
pub const REASON_FIELD: &str = "idem-reason";
/// The field the dead-letter entries carry the failed delivery's number in (1 for the first).
pub const ATTEMPT_FIELD: &str = "idem-attempt";
/// The field the dead-letter entries carry the original stream's key in.
pub const STREAM_FIELD: &str = "idem-stream";
/// The field the dead-letter entries carry the original entry's id in.
pub const ID_FIELD: &str = "idem-id";
/// The field the dead-letter entries carry the consumer group's name in.
pub const GROUP_FIELD: &str = "idem-group";
/// The field a dead letter carries when the entry had more than [`MAX_COPIED_FIELDS`] fields
/// and only its payload (and message id) field was copied: how many fields it had.
pub const TRUNCATED_FIELD: &str = "idem-truncated";

impl StreamGroup {
    /// The default reclaim idle time: 60 seconds.
    pub const DEFAULT_RECLAIM_IDLE: Duration = Duration::from_secs(60);

    /// The group `group` on the stream `stream`, with the defaults.
    pub fn new(stream: impl Into<String>, group: impl Into<String>) -> Self {
        let stream: String = stream.into();
        Self {
            dead_letter_stream: Arc::from(format!("{stream}:dead-letter")),
            stream: Arc::from(stream),
            group: Arc::from(group.into()),
            payload_field: Arc::from("payload"),
            message_id_field: None,
            reclaim_idle: Self::DEFAULT_RECLAIM_IDLE,
        }
    }

    /// Dead-letters go to this stream (default `<stream>:dead-letter`).
    #[must_use]
    pub fn with_dead_letter_stream(mut self, stream: impl Into<String>) -> Self {
        self.dead_letter_stream = Arc::from(stream.into());
        self
    }

    /// The entry field that holds the payload (default `payload`). An entry without it has an
    /// empty payload, which the decoder refuses: it is dead-lettered.
    #[must_use]
    pub fn with_payload_field(mut self, field: impl Into<String>) -> Self {
        self.payload_field = Arc::from(field.into());
        self
    }

    /// Take `$message_id` from this entry field, set by the producer, instead of
    /// `<stream>/<entry id>`.
    ///
    /// The entry id is Redis's: a message published twice gets two ids, so keying on it
    /// catches redeliveries of one entry but not a producer's re-publish. A producer-set id
    /// field catches both. The field's value is used as it is: make it unique across every
    /// stream one handler scope consumes. An entry without the field (or with a value that is not UTF-8) has
    /// no message id: a handler keyed on `$message_id` dead-letters it.
    #[must_use]
    pub fn with_message_id_field(mut self, field: impl Into<String>) -> Self {
        self.message_id_field = Some(Arc::from(field.into()));
        self
    }

    /// How long an entry stays pending, unacknowledged and untouched, before a consumer may
    /// take it over with `XAUTOCLAIM` (default 60 s): the time a dead consumer's entries wait,
    /// and the cap on retry delays. Runners keep their running entries fresh (`XCLAIM …
    /// JUSTID` every third of it), so a long handler is not taken over while it runs.
    /// Clamped to between 1 ms and [`MAX_DURATION`] (one day).
    #[must_use]
    pub fn with_reclaim_idle(mut self, idle: Duration) -> Self {
        self.reclaim_idle = clamp(idle);
        self
    }

    /// The stream's key.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The consumer group's name.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The dead-letter stream's key.
    pub fn dead_letter_stream(&self) -> &str {
        &self.dead_letter_stream
    }

    /// The payload field.
    pub fn payload_field(&self) -> &str {
        &self.payload_field
    }

    /// The field `$message_id` comes from, when not `<stream>/<entry id>`.
    pub fn message_id_field(&self) -> Option<&str> {
        self.message_id_field.as_deref()
    }

    /// The reclaim idle time.
    pub fn reclaim_idle(&self) -> Duration {
        self.reclaim_idle
    }

    fn command_error(&self, command: &'static str, source: redis::RedisError) -> RedisStreamError {
        RedisStreamError::Command {
            command,
            stream: self.stream.to_string(),
            group: self.group.to_string(),
            source,
        }
    }

    fn reply_error(&self, command: &'static str, detail: impl Into<String>) -> RedisStreamError {
        RedisStreamError::Reply {
            command,
            stream: self.stream.to_string(),
            detail: detail.into(),
        }
    }

    /// Creates the consumer group, and the stream if missing (`XGROUP CREATE … MKSTREAM`).
    /// Returns `false` when the group already existed (`BUSYGROUP`), which is not an error.
    pub async fn create(
        &self,
        conn: &mut ConnectionManager,
        start: GroupStart,
    ) -> Result<bool, RedisStreamError> {
        let start = match start {
            GroupStart::Beginning => "0",
            GroupStart::New => "$",
        };
        let created: Result<Value, _> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&*self.stream)
            .arg(&*self.group)
            .arg(start)
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        match created {
            Ok(_) => Ok(true),
            Err(error) if error.code() == Some("BUSYGROUP") => Ok(false),
            Err(error) => Err(self.command_error("XGROUP CREATE", error)),
        }
    }

    /// Reads up to `count` new entries for `consumer` (`XREADGROUP GROUP g c COUNT n [BLOCK ms]
    /// STREAMS s >`). They join the group's pending list under `consumer`, with a delivery
    /// count of 1, until acknowledged.
    ///
    /// Each entry is parsed on its own: one that cannot be (see
    /// [`StreamDelivery::malformed`]) is returned among the others, for the caller to
    /// dead-letter, and never fails the read (the entries are in the pending list already).
    ///
    /// `block`: wait up to this long when there is nothing new (`None`: return at once). Do
    /// not block on a connection shared with other work: Redis answers nothing else on it
    /// while the read blocks, and the client's response timeout (500 ms by default) must be
    /// longer than the block.
    pub async fn read(
        &self,
        conn: &mut ConnectionManager,
        consumer: &str,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<StreamDelivery>, RedisStreamError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&*self.group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count.max(1));
        if let Some(block) = block {
            // BLOCK 0 would wait forever.
            cmd.arg("BLOCK").arg(millis(block).max(1));
        }
        cmd.arg("STREAMS").arg(&*self.stream).arg(">");
        let reply: Value = cmd
            .query_async(conn)
            .await
            .map_err(|error| self.command_error("XREADGROUP", error))?;
        let entries = match reply {
            Value::Nil => return Ok(Vec::new()),
            Value::Array(streams) => streams
                .into_iter()
                .filter_map(|stream| match stream {
                    Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
                    _ => None,
                })
                .collect::<Vec<_>>(),
            Value::Map(streams) => streams.into_iter().map(|(_, entries)| entries).collect(),
            other => {
                return Err(self.reply_error("XREADGROUP", format!("{other:?}")));
            }
        };
        let mut deliveries = Vec::new();
        for entries in entries {
            let Value::Array(entries) = entries else {
                return Err(self.reply_error("XREADGROUP", "the entries are not an array"));
            };
            for entry in entries {
                if let Some(delivery) = self.delivery("XREADGROUP", parse_entry(entry), 1) {
                    deliveries.push(delivery);
                }
            }
        }
        Ok(deliveries)
    }

    /// Takes over up to `count` entries that have been pending, untouched, for at least the
    /// reclaim idle time, whoever held them, scanning from the start of the pending list
    /// (`XAUTOCLAIM`, with each entry's new delivery count
    /// from `XPENDING`, in one script): a dead consumer's entries, and requeued ones whose
    /// delay is over. Entries deleted from the stream while pending (`XDEL`, `XTRIM`,
    /// `MAXLEN`) are dropped from the pending list by Redis: for each, a stub dead letter with
    /// `idem-id`, `idem-stream`, `idem-group` and `idem-reason` [`DELETED_REASON`] is written.
    ///
    /// Looks at no more than ten times `count` pending entries: to sweep a long pending list,
    /// use [`reclaim_from`](Self::reclaim_from) with the cursor it returns.
    pub async fn reclaim(
        &self,
        conn: &mut ConnectionManager,
        consumer: &str,
        count: usize,
    ) -> Result<Vec<StreamDelivery>, RedisStreamError> {
        self.reclaim_from(conn, consumer, "0-0", count)
            .await
            .map(|(_, deliveries)| deliveries)
    }

    /// [`reclaim`](Self::reclaim) from `cursor` (`0-0`: the start of the pending list);
    /// returns the cursor to continue from, `0-0` once the whole pending list was scanned.
    /// `XAUTOCLAIM` looks at no more than ten times `count` pending entries per call, so a
    /// loop that always starts at `0-0` ([`reclaim`](Self::reclaim)) may never reach the
    /// entries past them; pass the returned cursor to the next call.
    pub async fn reclaim_from(
        &self,
        conn: &mut ConnectionManager,
        consumer: &str,
        cursor: &str,
        count: usize,
    ) -> Result<(String, Vec<StreamDelivery>), RedisStreamError> {
        static RECLAIM: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(RECLAIM_SCRIPT));
        let reply: Value = RECLAIM
            .key(&*self.stream)
            .key(&*self.dead_letter_stream)
            .arg(&*self.group)
            .arg(consumer)
            .arg(millis(self.reclaim_idle))
            .arg(cursor)
            .arg(count.max(1))
            .arg(REASON_FIELD)
            .arg(ID_FIELD)
            .arg(STREAM_FIELD)
            .arg(GROUP_FIELD)
            .arg(DELETED_REASON)
            .invoke_async(conn)
            .await
            .map_err(|error| self.command_error("XAUTOCLAIM", error))?;
        let malformed = || self.reply_error("XAUTOCLAIM", "the reply is malformed");
        let Value::Array(mut parts) = reply else {
            return Err(malformed());
        };
        if parts.len() < 3 {
            return Err(malformed());
        }
        let refused = if parts.len() > 3 { parts.pop() } else { None };
        let deleted = parts.pop();
        let claimed = parts.pop();
        let next = parts.pop().and_then(text).ok_or_else(malformed)?;
        let ids = |value: Option<Value>| match value {
            Some(Value::Array(ids)) => ids.into_iter().filter_map(text).collect(),
            _ => Vec::new(),
        };
        let (deleted, refused): (Vec<String>, Vec<String>) = (ids(deleted), ids(refused));
        if !deleted.is_empty() {
            tracing::warn!(
                target: "idem",
                stream = %self.stream,
                group = %self.group,
                dead_letter_stream = %self.dead_letter_stream,
                ?deleted,
                "pending entries were deleted from the stream before they were settled; Redis dropped them from the pending list; stub dead letters written"
            );
        }
        if !refused.is_empty() {
            tracing::error!(
                target: "idem",
                stream = %self.stream,
                group = %self.group,
                dead_letter_stream = %self.dead_letter_stream,
                ?refused,
                "pending entries were deleted from the stream before they were settled, and their stub dead letters were refused: they are gone"
            );
        }
        let Some(Value::Array(claimed)) = claimed else {
            return Err(malformed());
        };
        let mut deliveries = Vec::with_capacity(claimed.len());
        for entry in claimed {
            // `{id, fields, count}`, from the script; each parsed on its own.
            let (entry, count) = match entry {
                Value::Array(mut triple) if triple.len() == 3 => {
                    let count = match triple.pop() {
                        Some(Value::Int(count)) => u32::try_from(count).unwrap_or(u32::MAX),
                        _ => 1,
                    };
                    (Value::Array(triple), count)
                }
                other => (other, 1),
            };
            if let Some(delivery) = self.delivery("XAUTOCLAIM", parse_entry(entry), count.max(1)) {
                deliveries.push(delivery);
            }
        }
        Ok((next, deliveries))
    }

    /// The delivery of one parsed entry: a malformed one (with an id) becomes a delivery to
    /// dead-letter; one without a readable id cannot be settled, and is logged.
    fn delivery(
        &self,
        command: &'static str,
        parsed: Result<(String, Fields), (Option<String>, String)>,
        count: u32,
    ) -> Option<StreamDelivery> {
        match parsed {
            Ok((id, fields)) => Some(StreamDelivery::new(self, id, fields, count)),
            Err((Some(id), detail)) => {
                tracing::warn!(
                    target: "idem",
                    stream = %self.stream,
                    entry_id = %id,
                    %detail,
                    "a malformed entry; it is dead-lettered"
                );
                let mut delivery = StreamDelivery::new(self, id, Vec::new(), count);
                delivery.malformed = Some(format!("malformed entry: {detail}").into());
                Some(delivery)
            }
            Err((None, detail)) => {
                tracing::error!(
                    target: "idem",
                    stream = %self.stream,
                    group = %self.group,
                    command,
                    %detail,
                    "an entry without a readable id in the reply; it cannot be settled and stays pending"
                );
                None
            }
        }
    }

    /// Appends a message: `XADD <stream> * <payload field> <payload>`. Returns the entry id.
    pub async fn publish(
        &self,
        conn: &mut ConnectionManager,
        payload: &[u8],
    ) -> Result<String, RedisStreamError> {
        redis::cmd("XADD")
            .arg(&*self.stream)
            .arg("*")
            .arg(&*self.payload_field)
            .arg(payload)
            .query_async(conn)
            .await
            .map_err(|error| self.command_error("XADD", error))
    }

    /// How many entries the group has pending: read by a consumer, not yet acknowledged
    /// (`XPENDING <stream> <group>`).
    pub async fn pending(&self, conn: &mut ConnectionManager) -> Result<u64, RedisStreamError> {
        let reply: Value = redis::cmd("XPENDING")
            .arg(&*self.stream)
            .arg(&*self.group)
            .query_async(conn)
            .await
            .map_err(|error| self.command_error("XPENDING", error))?;
        match reply {
            Value::Array(parts) => match parts.first() {
                Some(Value::Int(count)) => Ok(u64::try_from(*count).unwrap_or(0)),
                _ => Err(self.reply_error("XPENDING", "no count in the summary")),
            },
            other => Err(self.reply_error("XPENDING", format!("{other:?}"))),
        }
    }
}

/// `XAUTOCLAIM`, then each claimed entry's delivery count from `XPENDING`, and a stub dead
/// letter for each pending entry found deleted from the stream (which `XAUTOCLAIM` drops from
/// the pending list), atomically. KEYS: stream, dead-letter stream. ARGV: group, consumer,
/// min idle, cursor, count, then the reason, id, stream and group field names and the reason.
/// Replies `{next cursor, {{id, {field, value, …}, count}, …}, {deleted id, …}, {deleted id
/// whose stub was refused, …}}`.
const RECLAIM_SCRIPT: &str = r"
local reply = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local claimed = {}
for _, entry in ipairs(reply[2]) do
  if type(entry) == 'table' and type(entry[2]) == 'table' then
    local pending = redis.call('XPENDING', KEYS[1], ARGV[1], entry[1], entry[1], 1)
    local count = 1
    if pending[1] then count = pending[1][4] end
    claimed[#claimed + 1] = {entry[1], entry[2], count}
  end
end
local deleted = reply[3] or {}
local refused = {}
for _, id in ipairs(deleted) do
  local added = redis.pcall('XADD', KEYS[2], '*', ARGV[6], ARGV[10], ARGV[7], id, ARGV[8], KEYS[1], ARGV[9], ARGV[1])
  if type(added) == 'table' and added.err then refused[#refused + 1] = id end
end
return {reply[1], claimed, deleted, refused}
";

/// The reason of the stub dead letter of an entry deleted from the stream while pending.
pub const DELETED_REASON: &str = "entry deleted from the stream before it was settled";

/// If the entry is still pending for the group, `XADD` the dead letter, then `XACK` the
/// entry: atomically, and never twice. KEYS: stream, dead-letter stream. ARGV: group, id, then
/// field/value pairs, at most [`MAX_COPIED_FIELDS`] of the entry's plus a few of idem's (Lua's
/// `unpack` fails past about 8000 values).
///
/// The `XADD` comes first: Redis does not roll a script back when a command fails, so an
/// `XADD` refused after the `XACK` (`WRONGTYPE` at the dead-letter key, `NOPERM`) would leave
/// the entry acked and no dead letter. Refused first, the entry stays pending, for a reclaim.
const DEAD_LETTER_SCRIPT: &str = r"
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 then
  return false
end
local added = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return added
";

/// A dead letter copies at most this many of the entry's fields; an entry with more is
/// dead-lettered with its payload field, its message id field, idem's fields and
/// [`TRUNCATED_FIELD`].
pub const MAX_COPIED_FIELDS: usize = 1000;

/// `<stream>/<entry id>`: an entry's id, unique across streams.
fn qualified_id(group: &StreamGroup, delivery: &StreamDelivery) -> Box<str> {
    format!("{}/{}", group.stream, delivery.id).into()
}

/// The longest block, reclaim interval and reclaim idle time: one day. Longer ones are
/// clamped to it (they would overflow a deadline, or Redis's millisecond arguments).
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// A configured duration, between 1 ms and [`MAX_DURATION`].
fn clamp(duration: Duration) -> Duration {
    duration.clamp(Duration::from_millis(1), MAX_DURATION)
}

/// `now + duration`, never overflowing: at most a day later when `duration` is out of range.
fn later(now: Instant, duration: Duration) -> Instant {
    now.checked_add(duration)
        .or_else(|| now.checked_add(MAX_DURATION))
        .unwrap_or(now)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn text(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        Value::SimpleString(text) => Some(text),
        _ => None,
    }
}

fn bytes(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.into_bytes()),
        Value::Int(number) => Some(number.to_string().into_bytes()),
        _ => None,
    }
}

/// An entry's fields, in order, names and values as Redis stores them (bytes).
type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// `[id, [field, value, …]]` (or a map of fields, in RESP3). `Err`: the entry's id when it
/// has a readable one, and what is wrong.
fn parse_entry(entry: Value) -> Result<(String, Fields), (Option<String>, String)> {
    let Value::Array(mut pair) = entry else {
        return Err((None, format!("not an array: {entry:?}")));
    };
    if pair.len() != 2 {
        let id = pair.into_iter().next().and_then(text);
        return Err((id, "not an [id, fields] pair".into()));
    }
    let fields = pair.pop();
    let id = pair
        .pop()
        .and_then(text)
        .ok_or((None, "no readable id".to_owned()))?;
    let field = |name: Value, value: Value| match (bytes(name), bytes(value)) {
        (Some(name), Some(value)) => Ok((name, value)),
        _ => Err((
            Some(id.clone()),
            "a field name or value is not a string".to_owned(),
        )),
    };
    let fields = match fields {
        Some(Value::Array(flat)) => {
            if flat.len() % 2 != 0 {
                return Err((Some(id), "an odd number of field names and values".into()));
            }
            let mut fields = Vec::with_capacity(flat.len() / 2);
            let mut flat = flat.into_iter();
            while let (Some(name), Some(value)) = (flat.next(), flat.next()) {
                fields.push(field(name, value)?);
            }
            fields
        }
        Some(Value::Map(map)) => map
            .into_iter()
            .map(|(name, value)| field(name, value))
            .collect::<Result<Vec<_>, _>>()?,
        // A pending entry whose stream entry was deleted.
        Some(Value::Nil) => Vec::new(),
        _ => return Err((Some(id), "the fields are not an array".into())),
    };
    Ok((id, fields))
}

/// One stream entry as a consumer received it: its id, its fields and its delivery count.
#[derive(Debug, Clone)]
pub struct StreamDelivery {
    id: String,
    fields: Arc<[(Vec<u8>, Vec<u8>)]>,
    payload_index: Option<usize>,
    message_id_index: Option<usize>,
    delivery_count: u32,
    malformed: Option<Arc<str>>,
}

impl StreamDelivery {
    fn new(group: &StreamGroup, id: String, fields: Fields, count: u32) -> Self {
        let index = |name: &str| {
            fields
                .iter()
                .position(|(field, _)| field == name.as_bytes())
        };
        let payload_index = index(&group.payload_field);
        let message_id_index = group.message_id_field.as_deref().and_then(index);
        Self {
            id,
            payload_index,
            message_id_index,
            fields: fields.into(),
            delivery_count: count,
            malformed: None,
        }
    }

    /// The entry id (`1700000000000-0`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Which delivery of the entry this is, from the group's pending list: 1 for the first.
    pub fn delivery_count(&self) -> u32 {
        self.delivery_count
    }

    /// The entry's fields, in order, names and values as bytes (Redis does not require
    /// either to be UTF-8; use [`String::from_utf8_lossy`] where text is needed).
    pub fn fields(&self) -> &[(Vec<u8>, Vec<u8>)] {
        &self.fields
    }

    /// The value of `field`, if the entry has it.
    pub fn field(&self, field: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(name, _)| name == field.as_bytes())
            .map(|(_, value)| value.as_slice())
    }

    /// Why the entry could not be parsed (`malformed entry: …`), if it could not: its fields
    /// are then empty. It can never be handled; dead-letter it
    /// ([`RedisStreamAcknowledger::dead_letter_now`]), as the runner does.
    pub fn malformed(&self) -> Option<&str> {
        self.malformed.as_deref()
    }

    /// The payload: the value of the group's payload field, empty when the entry lacks it.
    /// `group` must be the one the entry was read with.
    pub fn payload(&self, group: &StreamGroup) -> &[u8] {
        match self.payload_index {
            Some(index) => self.fields.get(index).map_or(&[][..], |(_, v)| v),
            None => self.field(&group.payload_field).unwrap_or_default(),
        }
    }

    fn message_id(&self) -> Option<&str> {
        let index = self.message_id_index?;
        std::str::from_utf8(&self.fields.get(index)?.1).ok()
    }
}

/// The entries a runner's handlers hold, with how many handlers hold each (two when a
/// reclaim handed this runner an entry one of its handlers still runs): kept fresh while any
/// holder runs, so that no consumer reclaims them; what is left after the shutdown deadline
/// was cancelled.
type Held = tokio::sync::Mutex<HashMap<String, usize>>;

/// One handler's hold on its entry, released exactly once: by the settle, or after the
/// handler returned without settling (a refused settle). Never when the handler is
/// cancelled at the shutdown deadline: its entry stays held, and is handed back.
struct Hold {
    held: Arc<Held>,
    id: String,
    released: AtomicBool,
}

impl Hold {
    async fn take(held: &Arc<Held>, id: String) -> Arc<Self> {
        *held.lock().await.entry(id.clone()).or_default() += 1;
        Arc::new(Self {
            held: Arc::clone(held),
            id,
            released: AtomicBool::new(false),
        })
    }

    async fn release(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut held = self.held.lock().await;
        if let Some(holders) = held.get_mut(&self.id) {
            *holders = holders.saturating_sub(1);
            if *holders == 0 {
                held.remove(&self.id);
            }
        }
    }
}

/// The [`Acknowledger`] of one stream entry read by one consumer of a group.
///
/// - `ack`: `XACK`.
/// - `requeue`: the entry stays pending (its id and delivery count survive); its idle time is
///   set so that it becomes reclaimable after the delay (`XCLAIM … IDLE <reclaim_idle −
///   delay> JUSTID`), capped at the group's reclaim idle time. A reclaim sweep
///   ([`StreamGroup::reclaim`], or a runner's) delivers it again with the next count.
/// - `dead_letter`: one script appends the entry, with its fields (at most
///   [`MAX_COPIED_FIELDS`], else its payload and [`TRUNCATED_FIELD`]) and `idem-reason`,
///   `idem-attempt`, `idem-stream`, `idem-id`, `idem-group`, to the dead-letter stream, then
///   `XACK`s it; nothing is done if the entry was no longer pending (settled elsewhere). If
///   the append is refused (the dead-letter key is not a stream, an ACL), the entry is not
///   acked: it stays pending, is reclaimed, and the error is returned.
/// - `attempt`: the delivery count; `message_id`: `<stream>/<entry id>`, or the group's
///   [message id field](StreamGroup::with_message_id_field).
pub struct RedisStreamAcknowledger {
    conn: ConnectionManager,
    group: StreamGroup,
    consumer: Arc<str>,
    delivery: StreamDelivery,
    /// `<stream>/<entry id>`: the default message id.
    qualified_id: Box<str>,
    held: Option<Arc<Hold>>,
}

impl std::fmt::Debug for RedisStreamAcknowledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamAcknowledger")
            .field("stream", &self.group.stream)
            .field("group", &self.group.group)
            .field("consumer", &self.consumer)
            .field("entry_id", &self.delivery.id)
            .field("delivery_count", &self.delivery.delivery_count)
            .finish_non_exhaustive()
    }
}

impl RedisStreamAcknowledger {
    /// The acknowledger of `delivery`, read from `group` by `consumer`, settling through
    /// `conn` (a clone of the service's connection manager).
    pub fn new(
        conn: ConnectionManager,
        group: &StreamGroup,
        consumer: impl Into<Arc<str>>,
        delivery: StreamDelivery,
    ) -> Self {
        Self {
            conn,
            qualified_id: qualified_id(group, &delivery),
            group: group.clone(),
            consumer: consumer.into(),
            delivery,
            held: None,
        }
    }

    /// The entry.
    pub fn delivery(&self) -> &StreamDelivery {
        &self.delivery
    }

    /// Dead-letters the entry without handing it to a handler (a payload your loop cannot
    /// decode, a [malformed](StreamDelivery::malformed) entry, a message no handler takes),
    /// with `reason` and this delivery's count as the attempt: the same script as
    /// [`Acknowledger::dead_letter`].
    ///
    /// # Errors
    ///
    /// As [`Acknowledger::dead_letter`]: when Redis refuses the append, the entry is not
    /// acked (it stays pending, and is reclaimed) and the error is returned.
    pub async fn dead_letter_now(self, reason: &str) -> Result<(), RedisStreamError> {
        let attempt = self.delivery.delivery_count.max(1);
        Acknowledger::dead_letter(self, DeadLetter { reason, attempt }).await
    }

    /// The entry no longer needs keeping fresh: it is being settled.
    async fn release(&self) {
        if let Some(hold) = &self.held {
            hold.release().await;
        }
    }
}

impl Acknowledger for RedisStreamAcknowledger {
    type Error = RedisStreamError;

    fn attempt(&self) -> Option<u32> {
        Some(self.delivery.delivery_count.max(1))
    }

    fn message_id(&self) -> Option<&str> {
        if self.group.message_id_field.is_some() {
            self.delivery.message_id()
        } else {
            Some(&self.qualified_id)
        }
    }

    async fn ack(mut self, _proof: Committed) -> Result<(), Self::Error> {
        self.release().await;
        let _acked: i64 = redis::cmd("XACK")
            .arg(&*self.group.stream)
            .arg(&*self.group.group)
            .arg(&self.delivery.id)
            .query_async(&mut self.conn)
            .await
            .map_err(|error| self.group.command_error("XACK", error))?;
        Ok(())
    }

    async fn requeue(mut self, requeue: Requeue) -> Result<(), Self::Error> {
        self.release().await;
        let idle = self.group.reclaim_idle.saturating_sub(requeue.delay);
        if requeue.delay > self.group.reclaim_idle {
            tracing::debug!(
                target: "idem",
                delay_ms = millis(requeue.delay),
                reclaim_idle_ms = millis(self.group.reclaim_idle),
                "the retry delay is longer than the reclaim idle time; shortened to it"
            );
        }
        let _claimed: Value = redis::cmd("XCLAIM")
            .arg(&*self.group.stream)
            .arg(&*self.group.group)
            .arg(&*self.consumer)
            .arg(0)
            .arg(&self.delivery.id)
            .arg("IDLE")
            .arg(millis(idle))
            .arg("JUSTID")
            .query_async(&mut self.conn)
            .await
            .map_err(|error| self.group.command_error("XCLAIM", error))?;
        Ok(())
    }

    async fn dead_letter(mut self, letter: DeadLetter<'_>) -> Result<(), Self::Error> {
        static DEAD_LETTER: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(DEAD_LETTER_SCRIPT));
        self.release().await;
        let mut invocation = DEAD_LETTER.key(&*self.group.stream);
        invocation
            .key(&*self.group.dead_letter_stream)
            .arg(&*self.group.group)
            .arg(&self.delivery.id);
        let fields = &self.delivery.fields;
        if fields.len() <= MAX_COPIED_FIELDS {
            for (name, value) in fields.iter() {
                invocation.arg(name).arg(value.as_slice());
            }
        } else {
            let mut kept = [self.delivery.payload_index, self.delivery.message_id_index];
            if kept[0] == kept[1] {
                kept[1] = None;
            }
            for (name, value) in kept.into_iter().flatten().filter_map(|i| fields.get(i)) {
                invocation.arg(name).arg(value.as_slice());
            }
            invocation.arg(TRUNCATED_FIELD).arg(format!(
                "{} fields, more than {MAX_COPIED_FIELDS}: only the payload and message id fields were copied",
                fields.len()
            ));
        }
        invocation
            .arg(REASON_FIELD)
            .arg(letter.reason)
            .arg(ATTEMPT_FIELD)
            .arg(letter.attempt)
            .arg(STREAM_FIELD)
            .arg(&*self.group.stream)
            .arg(ID_FIELD)
            .arg(&self.delivery.id)
            .arg(GROUP_FIELD)
            .arg(&*self.group.group);
        let added: Value = invocation
            .invoke_async(&mut self.conn)
            .await
            .map_err(|error| self.group.command_error("XADD", error))?;
        if matches!(added, Value::Nil) {
            tracing::warn!(
                target: "idem",
                entry_id = %self.delivery.id,
                "the entry was no longer pending (settled by another consumer); not dead-lettered"
            );
        }
        Ok(())
    }
}

/// A consumer of one stream's consumer group: reads with `XREADGROUP` and reclaims with
/// `XAUTOCLAIM`, runs the handler on each entry, acks after the commit.
///
/// - Bounded: `XREADGROUP … COUNT` [`ConsumerOptions::prefetch`] when a handler slot is free,
///   at most [`ConsumerOptions::concurrency`] handlers at once.
/// - Every [reclaim interval](Self::with_reclaim_interval), a sweep takes over the group's
///   entries idle for at least the [reclaim idle time](StreamGroup::with_reclaim_idle):
///   retries whose delay is over, and entries of consumers that died.
/// - Every third of the reclaim idle time, the entries its handlers hold (and those fetched
///   ahead) are touched (`XCLAIM … JUSTID`, which resets their idle time and not their
///   delivery count), so that no one reclaims them while they run: also while the runner
///   waits out the backoff after a failed read, and while shutdown waits for the handlers.
/// - Each entry is handled inside a span `idem.delivery` with `stream`, `entry_id` and
///   `delivery_count`.
/// - On cancellation it stops reading and reclaiming, hands the entries fetched ahead back
///   (reclaimable at once, their delivery count unchanged), lets the running handlers finish
///   for [`ConsumerOptions::shutdown_grace`], then cancels the rest: their entries stay
///   pending, unacknowledged, and are made reclaimable at once by another consumer.
///
/// The runner opens two connections from the client: one for its blocking reads, one for
/// everything else (settling, reclaiming), so that a blocked read never delays an ack.
pub struct RedisStreamConsumer<H: Handler, D = Json> {
    client: redis::Client,
    group: StreamGroup,
    consumer: Arc<str>,
    handler: Arc<H>,
    store: Arc<H::Store>,
    decoder: Arc<D>,
    options: ConsumerOptions,
    block: Duration,
    reclaim_interval: Option<Duration>,
    start: GroupStart,
    stats: Arc<ConsumerStats>,
}

impl<H: Handler, D> std::fmt::Debug for RedisStreamConsumer<H, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamConsumer")
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .field("options", &self.options)
            .field("block", &self.block)
            .field("reclaim_interval", &self.reclaim_interval)
            .finish_non_exhaustive()
    }
}

impl<H> RedisStreamConsumer<H, Json>
where
    H: Handler,
    H::Store: 'static,
    Json: Decode<H::Message>,
{
    /// A consumer named `consumer` (unique among the group's live consumers: a host or pod
    /// name) of `group`, running `handler` on `store`. JSON payloads, the default
    /// [`ConsumerOptions`], reads blocking for 2 s at most, the group made at
    /// [`GroupStart::Beginning`] if missing.
    pub fn new(
        client: redis::Client,
        group: StreamGroup,
        consumer: impl Into<String>,
        handler: H,
        store: H::Store,
    ) -> Self {
        Self {
            client,
            group,
            consumer: Arc::from(consumer.into()),
            handler: Arc::new(handler),
            store: Arc::new(store),
            decoder: Arc::new(Json),
            options: ConsumerOptions::default(),
            block: Duration::from_secs(2),
            reclaim_interval: None,
            start: GroupStart::Beginning,
            stats: Arc::new(ConsumerStats::default()),
        }
    }
}

impl<H, D> RedisStreamConsumer<H, D>
where
    H: Handler,
    H::Store: 'static,
    D: Decode<H::Message>,
{
    /// Decode payloads with `decoder` instead of JSON.
    pub fn with_decoder<D2: Decode<H::Message>>(self, decoder: D2) -> RedisStreamConsumer<H, D2> {
        RedisStreamConsumer {
            client: self.client,
            group: self.group,
            consumer: self.consumer,
            handler: self.handler,
            store: self.store,
            decoder: Arc::new(decoder),
            options: self.options,
            block: self.block,
            reclaim_interval: self.reclaim_interval,
            start: self.start,
            stats: self.stats,
        }
    }

    /// Concurrency, prefetch (the `XREADGROUP` `COUNT`) and shutdown grace.
    #[must_use]
    pub fn with_options(mut self, options: ConsumerOptions) -> Self {
        self.options = options;
        self
    }

    /// How long one `XREADGROUP` waits for new entries (default 2 s, clamped to between 1 ms
    /// and [`MAX_DURATION`]; a read also stops waiting at the next reclaim sweep or touch).
    /// Shutdown waits for a read in progress, so this bounds how long it takes to stop
    /// reading.
    #[must_use]
    pub fn with_block(mut self, block: Duration) -> Self {
        self.block = clamp(block);
        self
    }

    /// How often the runner sweeps the pending list for entries to reclaim (default: a quarter
    /// of the reclaim idle time, at most 1 s). A retry is delivered within this long after its
    /// delay. Clamped to between 1 ms and [`MAX_DURATION`].
    #[must_use]
    pub fn with_reclaim_interval(mut self, interval: Duration) -> Self {
        self.reclaim_interval = Some(clamp(interval));
        self
    }

    /// Where the group starts if the runner has to make it (default
    /// [`GroupStart::Beginning`]).
    #[must_use]
    pub fn with_group_start(mut self, start: GroupStart) -> Self {
        self.start = start;
        self
    }

    /// The runner's counts, live.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        Arc::clone(&self.stats)
    }

    /// Consumes until `shutdown` is cancelled, then drains (see the type's docs) and returns
    /// the counts. Fails only when it cannot connect or make the group at the start; later
    /// errors (a lost connection) are logged and retried.
    pub async fn run(
        self,
        shutdown: CancellationToken,
    ) -> Result<ConsumerReport, RedisStreamError> {
        let mut intake = Intake::open(
            &self.client,
            &self.group,
            &self.consumer,
            self.start,
            self.block,
            self.reclaim_interval,
            usize::from(self.options.prefetch_count()),
        )
        .await?;
        let mut workers = Workers::new(self.options.concurrency_limit(), Arc::clone(&self.stats));
        while let Some(permit) = intake.slot(&mut workers, &shutdown).await {
            let Some(delivery) = intake.next(&shutdown, None).await else {
                break;
            };
            let span = tracing::info_span!(
                "idem.delivery",
                stream = %self.group.stream,
                entry_id = %delivery.id,
                delivery_count = delivery.delivery_count,
            );
            let taken = intake.take(delivery).await;
            let handler = Arc::clone(&self.handler);
            let store = Arc::clone(&self.store);
            let decoder = Arc::clone(&self.decoder);
            let stats = Arc::clone(&self.stats);
            workers.spawn(
                permit,
                async move {
                    let Taken {
                        ack,
                        payload,
                        malformed,
                        hold,
                    } = taken;
                    match malformed {
                        Some(reason) => dead_letter_malformed(ack, &reason, &stats).await,
                        None => deliver(&*handler, &*decoder, &*store, &payload, ack, &stats).await,
                    }
                    // Settled, or left for a reclaim after a refused settle: no longer held.
                    hold.release().await;
                }
                .instrument(span),
            );
        }
        intake.close(workers, self.options.grace()).await;
        Ok(self.stats.snapshot())
    }
}

/// What a runner reads from, and the state of its reading: its two connections, the entries
/// its handlers hold and those fetched ahead, when to reclaim and touch next, and the backoff
/// after a failed command. Shared by [`RedisStreamConsumer`] and [`RedisStreamsBatchConsumer`].
struct Intake {
    group: StreamGroup,
    consumer: Arc<str>,
    /// Settling, reclaiming, touching.
    conn: ConnectionManager,
    /// The blocking reads.
    reader: ConnectionManager,
    held: Arc<Held>,
    ahead: VecDeque<StreamDelivery>,
    /// The `COUNT` of reads and reclaims.
    prefetch: usize,
    block: Duration,
    reclaim_interval: Duration,
    touch_interval: Duration,
    next_reclaim: Instant,
    next_touch: Instant,
    cursor: String,
    retry_after_error: Duration,
    /// After a failed read or reclaim: not before this.
    retry_at: Option<Instant>,
}

impl Intake {
    /// Opens the runner's connections and makes the group if missing.
    async fn open(
        client: &redis::Client,
        group: &StreamGroup,
        consumer: &Arc<str>,
        start: GroupStart,
        block: Duration,
        reclaim_interval: Option<Duration>,
        prefetch: usize,
    ) -> Result<Self, RedisStreamError> {
        let connect_error = |source| RedisStreamError::Connect {
            stream: group.stream.to_string(),
            source,
        };
        let mut conn = client
            .get_connection_manager()
            .await
            .map_err(connect_error)?;
        // The reads block: a connection of their own, with a response timeout past the block.
        let reader = client
            .get_connection_manager_with_config(
                ConnectionManagerConfig::new()
                    .set_response_timeout(Some(block.saturating_add(Duration::from_secs(5)))),
            )
            .await
            .map_err(connect_error)?;
        group.create(&mut conn, start).await?;

        let reclaim_idle = group.reclaim_idle;
        let reclaim_interval = reclaim_interval.unwrap_or_else(|| {
            (reclaim_idle / 4)
                .min(Duration::from_secs(1))
                .max(Duration::from_millis(1))
        });
        let touch_interval = (reclaim_idle / 3).max(Duration::from_millis(1));
        Ok(Self {
            group: group.clone(),
            consumer: Arc::clone(consumer),
            conn,
            reader,
            held: Arc::default(),
            ahead: VecDeque::new(),
            prefetch,
            block,
            reclaim_interval,
            touch_interval,
            // Take over what dead consumers left at once.
            next_reclaim: Instant::now(),
            next_touch: later(Instant::now(), touch_interval),
            cursor: String::from("0-0"),
            retry_after_error: Duration::ZERO,
            retry_at: None,
        })
    }

    /// Touches the held and fetched-ahead entries, and sets the next touch.
    async fn touch(&mut self) {
        touch(
            &mut self.conn,
            &self.group,
            &self.consumer,
            &self.held,
            &self.ahead,
        )
        .await;
        self.next_touch = later(Instant::now(), self.touch_interval);
    }

    /// A free handler slot, keeping held entries fresh while waiting for one; `None` once
    /// `shutdown` is cancelled.
    async fn slot(
        &mut self,
        workers: &mut Workers,
        shutdown: &CancellationToken,
    ) -> Option<OwnedSemaphorePermit> {
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep_until(self.next_touch) => self.touch().await,
                permit = workers.ready() => return Some(permit),
            }
        }
    }

    /// An entry: fetched ahead, reclaimed, or read. `None` once `shutdown` is cancelled, or,
    /// with a `deadline`, when it passes with nothing fetched ahead (a read then waits no
    /// longer than it).
    async fn next(
        &mut self,
        shutdown: &CancellationToken,
        deadline: Option<Instant>,
    ) -> Option<StreamDelivery> {
        loop {
            let now = Instant::now();
            if now >= self.next_touch {
                self.touch().await;
            }
            if let Some(delivery) = self.ahead.pop_front() {
                return Some(delivery);
            }
            if deadline.is_some_and(|deadline| now >= deadline) {
                return None;
            }
            let wake = deadline.map_or(self.next_touch, |deadline| deadline.min(self.next_touch));
            if let Some(at) = self.retry_at {
                if now < at {
                    // Wait out the backoff, waking for the next touch (or the deadline) on the
                    // way.
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => return None,
                        () = tokio::time::sleep_until(at.min(wake)) => {}
                    }
                    continue;
                }
                self.retry_at = None;
            }
            if now >= self.next_reclaim {
                match self
                    .group
                    .reclaim_from(&mut self.conn, &self.consumer, &self.cursor, self.prefetch)
                    .await
                {
                    Ok((next, reclaimed)) => {
                        self.retry_after_error = Duration::ZERO;
                        self.ahead.extend(reclaimed);
                        // A full sweep done: the next one after the interval; otherwise
                        // continue the scan at once.
                        if next == "0-0" {
                            self.next_reclaim = later(now, self.reclaim_interval);
                        }
                        self.cursor = next;
                    }
                    Err(error) => {
                        tracing::warn!(target: "idem", %error, "reclaim failed; retrying");
                        self.retry_after_error = backoff(self.retry_after_error);
                        self.retry_at = Some(later(Instant::now(), self.retry_after_error));
                        self.next_reclaim = later(now, self.reclaim_interval);
                    }
                }
                continue;
            }
            let wait = self
                .next_reclaim
                .min(wake)
                .saturating_duration_since(now)
                .min(self.block);
            let read = self.group.read(
                &mut self.reader,
                &self.consumer,
                self.prefetch,
                Some(wait.max(Duration::from_millis(1))),
            );
            tokio::pin!(read);
            let read = tokio::select! {
                biased;
                read = &mut read => read,
                () = shutdown.cancelled() => {
                    // The server may be handing out entries to this read: take them, to
                    // hand them back at the close, rather than leave them pending for a
                    // reclaim.
                    if let Ok(read) = read.await {
                        self.ahead.extend(read);
                    }
                    return None;
                }
            };
            match read {
                Ok(read) => {
                    self.retry_after_error = Duration::ZERO;
                    self.ahead.extend(read);
                }
                Err(error) => {
                    tracing::warn!(target: "idem", %error, "XREADGROUP failed; retrying");
                    self.retry_after_error = backoff(self.retry_after_error);
                    self.retry_at = Some(later(Instant::now(), self.retry_after_error));
                }
            }
        }
    }

    /// Takes `delivery` for a handler: held (kept fresh) from now until it is settled or its
    /// handler returns, with its acknowledger and payload.
    async fn take(&self, delivery: StreamDelivery) -> Taken {
        let hold = Hold::take(&self.held, delivery.id.clone()).await;
        let payload = EntryPayload {
            fields: Arc::clone(&delivery.fields),
            index: delivery.payload_index,
        };
        let malformed = delivery.malformed.clone();
        let ack = RedisStreamAcknowledger {
            conn: self.conn.clone(),
            qualified_id: qualified_id(&self.group, &delivery),
            group: self.group.clone(),
            consumer: Arc::clone(&self.consumer),
            delivery,
            held: Some(Arc::clone(&hold)),
        };
        Taken {
            ack,
            payload,
            malformed,
            hold,
        }
    }

    /// After the loop: hands the entries fetched ahead back, lets the running handlers finish
    /// for `grace` (their entries kept fresh meanwhile), and makes the entries of those
    /// cancelled at the deadline reclaimable at once.
    async fn close(mut self, workers: Workers, grace: Duration) {
        // Entries fetched ahead never reached a handler: hand them back, reclaimable at once,
        // with the delivery count they had before this consumer took them.
        let unstarted: Vec<StreamDelivery> = self.ahead.drain(..).collect();
        hand_back(&mut self.conn, &self.group, &self.consumer, &unstarted).await;
        // The running handlers finish, their entries kept fresh meanwhile.
        let drain = workers.drain(grace);
        tokio::pin!(drain);
        loop {
            tokio::select! {
                () = &mut drain => break,
                () = tokio::time::sleep_until(self.next_touch) => self.touch().await,
            }
        }
        // What is still held was cancelled at the deadline: unacknowledged, reclaimable now.
        let cancelled: Vec<String> = self.held.lock().await.drain().map(|(id, _)| id).collect();
        if !cancelled.is_empty() {
            let ids: Vec<&str> = cancelled.iter().map(String::as_str).collect();
            release_ids(&mut self.conn, &self.group, &self.consumer, &ids, None).await;
        }
    }
}

/// An entry a runner took for a handler.
struct Taken {
    ack: RedisStreamAcknowledger,
    payload: EntryPayload,
    /// Why the entry cannot be handled, if it cannot.
    malformed: Option<Arc<str>>,
    hold: Arc<Hold>,
}

/// An entry's payload: its payload field's value, empty when it lacks one.
struct EntryPayload {
    fields: Arc<[(Vec<u8>, Vec<u8>)]>,
    index: Option<usize>,
}

impl std::ops::Deref for EntryPayload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.index
            .and_then(|index| self.fields.get(index))
            .map_or(&[][..], |(_, value)| value.as_slice())
    }
}

/// Dead-letters an entry that cannot be handled (a malformed one), with the reason, and
/// counts it.
async fn dead_letter_malformed(ack: RedisStreamAcknowledger, reason: &str, stats: &ConsumerStats) {
    let settled = match ack.dead_letter_now(reason).await {
        Ok(()) => Settled::DeadLettered,
        Err(error) => {
            tracing::warn!(target: "idem", %error, "could not dead-letter a malformed entry; it stays pending");
            Settled::Refused
        }
    };
    stats.count(settled);
}

/// A consumer of one stream's consumer group in batch mode, for a `batch` handler
/// ([`BatchHandler`]): collects up to [`BatchOptions::max_size`] entries, or what arrives
/// within [`BatchOptions::max_wait`] of the first, hands them to the handler as one batch (one
/// transaction, see [`pipeline::batch`](crate::pipeline::batch)), and runs up to
/// [`ConsumerOptions::concurrency`] batches at once.
///
/// Everything else is as [`RedisStreamConsumer`]: `XREADGROUP` and `XAUTOCLAIM` sweeps, with
/// a `COUNT` raised to at least `max_size` × concurrency so that batches can fill (one read
/// often fills a batch at once); the entries of a batch are kept fresh from the moment they
/// are collected; each entry is acked on its own (`XACK`) once the part of the batch it
/// belongs to committed, requeued or dead-lettered as one entry is; a
/// [malformed](StreamDelivery::malformed) entry is dead-lettered on its own, before its batch
/// runs. Each batch runs inside a span `idem.delivery_batch` with `stream` and `size`. On
/// cancellation the batch being collected runs with what it has, the entries fetched ahead
/// are handed back, and the batches in flight finish for the shutdown grace.
///
/// ```no_run
/// use idem_runtime::broker::redis_streams::{RedisStreamsBatchConsumer, StreamGroup};
/// use idem_runtime::broker::{BatchOptions, CancellationToken, ConsumerOptions};
/// use idem_runtime::{batch_handler, idempotent, HandlerError, PgStore, PgTx};
///
/// #[derive(serde::Deserialize)]
/// struct OrderPaid { order_id: String, amount: i64 }
///
/// #[derive(Debug, thiserror::Error)]
/// #[error(transparent)]
/// struct AppError(#[from] idem_runtime::sqlx::Error);
/// impl HandlerError for AppError {}
///
/// #[idempotent(key = "order_id", store = "pg", strategy = "dedup_table", scope = "doc.redis.batch", batch)]
/// async fn on_orders_paid(tx: &mut PgTx<'_>, msgs: &[OrderPaid]) -> Result<(), AppError> {
///     let ids: Vec<&str> = msgs.iter().map(|msg| msg.order_id.as_str()).collect();
///     let amounts: Vec<i64> = msgs.iter().map(|msg| msg.amount).collect();
///     idem_runtime::sqlx::query(
///         "INSERT INTO ledger (order_id, amount) SELECT * FROM unnest($1::text[], $2::bigint[])",
///     )
///     .bind(&ids).bind(&amounts)
///     .execute(&mut **tx).await?;
///     Ok(())
/// }
///
/// # async fn run(store: PgStore) -> Result<(), Box<dyn std::error::Error>> {
/// let client = redis::Client::open("redis://127.0.0.1:6379")?;
/// let shutdown = CancellationToken::new();
/// let consumer = RedisStreamsBatchConsumer::new(
///     client,
///     StreamGroup::new("orders", "ledger"),
///     "ledger-1", // unique per process: a host name, a pod name
///     batch_handler!(on_orders_paid),
///     store,
/// )
/// .with_options(ConsumerOptions::default().concurrency(4))
/// .with_batch(BatchOptions::default().max_size(100));
/// let stats = consumer.stats(); // read while it runs
/// // Cancel `shutdown` on SIGTERM; `run` then drains and returns.
/// let report = consumer.run(shutdown).await?;
/// println!("processed={} duplicates={}", report.processed, report.duplicates);
/// # drop(stats);
/// # Ok(()) }
/// ```
pub struct RedisStreamsBatchConsumer<H: BatchHandler, D = Json> {
    client: redis::Client,
    group: StreamGroup,
    consumer: Arc<str>,
    handler: Arc<H>,
    store: Arc<H::Store>,
    decoder: Arc<D>,
    options: ConsumerOptions,
    batch: BatchOptions,
    block: Duration,
    reclaim_interval: Option<Duration>,
    start: GroupStart,
    stats: Arc<ConsumerStats>,
}

impl<H: BatchHandler, D> std::fmt::Debug for RedisStreamsBatchConsumer<H, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamsBatchConsumer")
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .field("options", &self.options)
            .field("batch", &self.batch)
            .field("block", &self.block)
            .field("reclaim_interval", &self.reclaim_interval)
            .finish_non_exhaustive()
    }
}

impl<H> RedisStreamsBatchConsumer<H, Json>
where
    H: BatchHandler,
    Json: Decode<H::Message>,
{
    /// A batch consumer named `consumer` (unique among the group's live consumers: a host or
    /// pod name) of `group`, running `handler` on `store`. JSON payloads, the default
    /// [`ConsumerOptions`] and [`BatchOptions`], reads blocking for 2 s at most, the group made
    /// at [`GroupStart::Beginning`] if missing.
    pub fn new(
        client: redis::Client,
        group: StreamGroup,
        consumer: impl Into<String>,
        handler: H,
        store: H::Store,
    ) -> Self {
        Self {
            client,
            group,
            consumer: Arc::from(consumer.into()),
            handler: Arc::new(handler),
            store: Arc::new(store),
            decoder: Arc::new(Json),
            options: ConsumerOptions::default(),
            batch: BatchOptions::default(),
            block: Duration::from_secs(2),
            reclaim_interval: None,
            start: GroupStart::Beginning,
            stats: Arc::new(ConsumerStats::default()),
        }
    }
}

impl<H, D> RedisStreamsBatchConsumer<H, D>
where
    H: BatchHandler,
    D: Decode<H::Message>,
{
    /// Decode payloads with `decoder` instead of JSON.
    pub fn with_decoder<D2: Decode<H::Message>>(
        self,
        decoder: D2,
    ) -> RedisStreamsBatchConsumer<H, D2> {
        RedisStreamsBatchConsumer {
            client: self.client,
            group: self.group,
            consumer: self.consumer,
            handler: self.handler,
            store: self.store,
            decoder: Arc::new(decoder),
            options: self.options,
            batch: self.batch,
            block: self.block,
            reclaim_interval: self.reclaim_interval,
            start: self.start,
            stats: self.stats,
        }
    }

    /// Concurrency (batches at once), prefetch (the `XREADGROUP` `COUNT`, raised to at least
    /// `max_size` × concurrency) and shutdown grace.
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

    /// As [`RedisStreamConsumer::with_block`]; a read while a batch is collected also stops
    /// waiting at the batch's `max_wait`.
    #[must_use]
    pub fn with_block(mut self, block: Duration) -> Self {
        self.block = clamp(block);
        self
    }

    /// As [`RedisStreamConsumer::with_reclaim_interval`].
    #[must_use]
    pub fn with_reclaim_interval(mut self, interval: Duration) -> Self {
        self.reclaim_interval = Some(clamp(interval));
        self
    }

    /// As [`RedisStreamConsumer::with_group_start`].
    #[must_use]
    pub fn with_group_start(mut self, start: GroupStart) -> Self {
        self.start = start;
        self
    }

    /// The runner's counts, live.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        Arc::clone(&self.stats)
    }

    /// Consumes in batches until `shutdown` is cancelled, then drains (see the type's docs)
    /// and returns the counts. Fails only when it cannot connect or make the group at the
    /// start; later errors (a lost connection) are logged and retried.
    pub async fn run(
        self,
        shutdown: CancellationToken,
    ) -> Result<ConsumerReport, RedisStreamError> {
        let mut intake = Intake::open(
            &self.client,
            &self.group,
            &self.consumer,
            self.start,
            self.block,
            self.reclaim_interval,
            usize::from(self.batch.prefetch_for(&self.options)),
        )
        .await?;
        let max_size = self.batch.size_limit();
        let mut workers = Workers::new(self.options.concurrency_limit(), Arc::clone(&self.stats));
        while let Some(permit) = intake.slot(&mut workers, &shutdown).await {
            // The batch's first entry, however long it takes to come.
            let Some(first) = intake.next(&shutdown, None).await else {
                break;
            };
            // Then up to `max_size`, until `max_wait` after the first, or shutdown. Each entry
            // is held (kept fresh) from here on.
            let mut collected = Vec::with_capacity(max_size.min(super::BATCH_CAPACITY));
            collected.push(intake.take(first).await);
            let deadline = later(Instant::now(), self.batch.wait_limit());
            while collected.len() < max_size {
                let Some(delivery) = intake.next(&shutdown, Some(deadline)).await else {
                    break;
                };
                collected.push(intake.take(delivery).await);
            }
            let span = tracing::info_span!(
                "idem.delivery_batch",
                stream = %self.group.stream,
                size = collected.len(),
            );
            let handler = Arc::clone(&self.handler);
            let store = Arc::clone(&self.store);
            let decoder = Arc::clone(&self.decoder);
            let stats = Arc::clone(&self.stats);
            workers.spawn_batch(
                permit,
                collected.len(),
                async move {
                    let mut deliveries = Vec::with_capacity(collected.len());
                    let mut holds = Vec::with_capacity(collected.len());
                    for taken in collected {
                        let Taken {
                            ack,
                            payload,
                            malformed,
                            hold,
                        } = taken;
                        match malformed {
                            // Cannot be handled: to the dead-letter stream, before the batch.
                            Some(reason) => dead_letter_malformed(ack, &reason, &stats).await,
                            None => deliveries.push((payload, ack)),
                        }
                        holds.push(hold);
                    }
                    if !deliveries.is_empty() {
                        deliver_batch(&*handler, &*decoder, &*store, deliveries, &stats).await;
                    }
                    // Settled, or left for a reclaim after a refused settle: no longer held.
                    for hold in holds {
                        hold.release().await;
                    }
                }
                .instrument(span),
            );
        }
        intake.close(workers, self.options.grace()).await;
        Ok(self.stats.snapshot())
    }
}

fn backoff(previous: Duration) -> Duration {
    (previous * 2)
        .max(Duration::from_millis(100))
        .min(Duration::from_secs(5))
}

/// Resets the idle time of the entries the handlers hold and of those fetched ahead.
async fn touch(
    conn: &mut ConnectionManager,
    group: &StreamGroup,
    consumer: &str,
    held: &Held,
    ahead: &VecDeque<StreamDelivery>,
) {
    // Holding the lock across the command: a handler settling meanwhile (a requeue setting
    // its own idle time) waits, so that this touch never lands after it.
    let held = held.lock().await;
    if held.is_empty() && ahead.is_empty() {
        return;
    }
    let mut cmd = redis::cmd("XCLAIM");
    cmd.arg(&*group.stream)
        .arg(&*group.group)
        .arg(consumer)
        .arg(0);
    for id in held.keys() {
        cmd.arg(id);
    }
    for delivery in ahead {
        cmd.arg(&delivery.id);
    }
    cmd.arg("JUSTID");
    let touched: Result<Value, _> = cmd.query_async(conn).await;
    drop(held);
    if let Err(error) = touched {
        tracing::warn!(target: "idem", %error, "could not keep the running entries fresh; another consumer may reclaim them");
    }
}

/// Hands entries that never reached a handler back to the group, reclaimable at once, with
/// the delivery count they had before this consumer took them.
async fn hand_back(
    conn: &mut ConnectionManager,
    group: &StreamGroup,
    consumer: &str,
    deliveries: &[StreamDelivery],
) {
    let mut by_count: HashMap<u32, Vec<&str>> = HashMap::new();
    for delivery in deliveries {
        by_count
            .entry(delivery.delivery_count)
            .or_default()
            .push(&delivery.id);
    }
    for (count, ids) in by_count {
        release_ids(conn, group, consumer, &ids, Some(count.saturating_sub(1))).await;
    }
}

/// `XCLAIM … IDLE <reclaim_idle> [RETRYCOUNT n] JUSTID`: reclaimable by anyone at once.
async fn release_ids(
    conn: &mut ConnectionManager,
    group: &StreamGroup,
    consumer: &str,
    ids: &[&str],
    retry_count: Option<u32>,
) {
    if ids.is_empty() {
        return;
    }
    let mut cmd = redis::cmd("XCLAIM");
    cmd.arg(&*group.stream)
        .arg(&*group.group)
        .arg(consumer)
        .arg(0);
    for id in ids {
        cmd.arg(*id);
    }
    cmd.arg("IDLE").arg(millis(group.reclaim_idle));
    if let Some(count) = retry_count {
        cmd.arg("RETRYCOUNT").arg(count);
    }
    cmd.arg("JUSTID");
    let released: Result<Value, _> = cmd.query_async(conn).await;
    if let Err(error) = released {
        tracing::warn!(target: "idem", %error, entries = ids.len(), "could not hand entries back; they are reclaimed after the reclaim idle time");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &[u8]) -> Value {
        Value::BulkString(text.to_vec())
    }

    #[test]
    fn out_of_range_durations_are_clamped_not_overflowed() {
        let group = StreamGroup::new("s", "g").with_reclaim_idle(Duration::MAX);
        assert_eq!(group.reclaim_idle(), MAX_DURATION);
        let group = StreamGroup::new("s", "g").with_reclaim_idle(Duration::ZERO);
        assert_eq!(group.reclaim_idle(), Duration::from_millis(1));
        assert_eq!(clamp(Duration::MAX), MAX_DURATION);
        let now = Instant::now();
        assert!(later(now, Duration::MAX) > now);
        assert_eq!(
            later(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
        assert_eq!(
            Duration::MAX.saturating_add(Duration::from_secs(5)),
            Duration::MAX
        );
    }

    #[tokio::test]
    async fn an_entry_held_twice_stays_held_until_both_release() {
        let held: Arc<Held> = Arc::default();
        let first = Hold::take(&held, "1-0".into()).await;
        let second = Hold::take(&held, "1-0".into()).await;
        first.release().await;
        first.release().await; // once only
        assert_eq!(held.lock().await.get("1-0"), Some(&1));
        second.release().await;
        assert!(held.lock().await.is_empty());
    }

    #[test]
    fn field_names_and_values_are_bytes() {
        let entry = Value::Array(vec![
            bulk(b"1-0"),
            Value::Array(vec![
                bulk(b"\xff"),
                bulk(b"v"),
                bulk(b"payload"),
                bulk(b"\xfe"),
            ]),
        ]);
        let (id, fields) = parse_entry(entry).expect("parses");
        assert_eq!(id, "1-0");
        assert_eq!(
            fields,
            [
                (b"\xff".to_vec(), b"v".to_vec()),
                (b"payload".to_vec(), b"\xfe".to_vec())
            ]
        );
    }

    #[test]
    fn a_malformed_entry_keeps_its_id() {
        let group = StreamGroup::new("s", "g");
        let nested = Value::Array(vec![
            bulk(b"1-0"),
            Value::Array(vec![bulk(b"a"), Value::Array(vec![])]),
        ]);
        let odd = Value::Array(vec![bulk(b"2-0"), Value::Array(vec![bulk(b"a")])]);
        for (entry, id) in [(nested, "1-0"), (odd, "2-0")] {
            let delivery = group
                .delivery("XREADGROUP", parse_entry(entry), 1)
                .expect("a delivery to dead-letter");
            assert_eq!(delivery.id(), id);
            assert!(
                delivery
                    .malformed()
                    .is_some_and(|m| m.starts_with("malformed entry: ")),
                "{delivery:?}"
            );
        }
        assert!(
            group
                .delivery("XREADGROUP", parse_entry(Value::Int(3)), 1)
                .is_none()
        );
    }
}
