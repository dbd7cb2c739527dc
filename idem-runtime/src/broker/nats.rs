//! NATS JetStream (feature `nats`, client [`async_nats`]): an [`Acknowledger`] for JetStream
//! messages and a pull-consumer runner that acks only after the commit ([`NatsConsumer`]), with
//! a batch mode for `batch` handlers ([`NatsBatchConsumer`]: up to `max_size` messages in one
//! transaction, each still acked on its own after its commit).
//!
//! | outcome | JetStream is told |
//! |---|---|
//! | processed, duplicate | `+ACK`, after the commit (confirmed by the server: a lost ack is an error, logged) |
//! | retryable failure, attempts left | `-NAK` with the backoff delay; the server counts the delivery, so the next one's [`attempt`](Acknowledger::attempt) is one more |
//! | out of attempts, permanent failure, undecodable payload, bad key | the payload is published to the dead-letter subject with `Idem-*` headers, the publish is confirmed, then `+TERM` |
//! | a long body | `+WPI` (in progress) every third of the consumer's `ack_wait`, so the server does not redeliver it meanwhile |
//! | cancelled at the shutdown deadline, the process died | nothing: the server redelivers after `ack_wait` |
//!
//! - **Attempts** are the server's delivery count (`Info::delivered`, 1 for the first).
//! - **`max_deliver` is honoured**: the consumer's `max_deliver` is the
//!   [`delivery_limit`](Acknowledger::delivery_limit), so a retryable failure is dead-lettered
//!   at the last delivery the server allows, even when the handler's `max_attempts` is higher,
//!   instead of the server silently giving up on it.
//! - **`key = "$message_id"`** takes the `Nats-Msg-Id` header. JetStream itself drops a
//!   re-publish with the same `Nats-Msg-Id` inside the stream's duplicate window, so idem's gate
//!   is what catches the duplicates the window does not: a re-publish after the window, the
//!   same id on another stream, a redelivery.
//! - **Dead letters** go to a subject, `<stream>.dead-letter` by default, which a stream must
//!   capture ([`ensure_dead_letter_stream`] creates one). Each carries the original payload and
//!   headers (except `Nats-*`), plus `Idem-Reason`, `Idem-Attempt`, `Idem-Stream`,
//!   `Idem-Stream-Sequence`, `Idem-Subject` and, when the message had one, `Idem-Message-Id`.
//!   Its own `Nats-Msg-Id` is `idem-dl.<stream>.<sequence>`, so a dead letter published twice
//!   (the `+TERM` after it was lost) is stored once.
//!
//! # Wiring: the runner
//!
//! ```no_run
//! use async_nats::jetstream::{self, consumer::pull, stream};
//! use idem_runtime::broker::nats::{ensure_dead_letter_stream, NatsConsumer};
//! use idem_runtime::broker::{CancellationToken, ConsumerOptions};
//! use idem_runtime::{idempotent, HandlerError, PgStore, PgTx};
//!
//! #[derive(Debug, serde::Deserialize)]
//! struct OrderPaid { order_id: String, amount: i64 }
//!
//! #[derive(Debug, thiserror::Error)]
//! enum AppError { #[error(transparent)] Db(#[from] sqlx::Error) }
//! impl HandlerError for AppError {}
//!
//! #[idempotent(key = "order_id", store = "pg", strategy = "dedup_table", scope = "doc.nats.order_paid")]
//! async fn on_order_paid(tx: &mut PgTx<'_>, msg: OrderPaid) -> Result<(), AppError> {
//!     sqlx::query("INSERT INTO payments (order_id, amount) VALUES ($1, $2)")
//!         .bind(&msg.order_id).bind(msg.amount)
//!         .execute(&mut **tx).await?;
//!     Ok(())
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = PgStore::connect("postgres://postgres@127.0.0.1/app").await?;
//! let js = jetstream::new(async_nats::connect("127.0.0.1:4222").await?);
//! let orders = js
//!     .get_or_create_stream(stream::Config {
//!         name: "ORDERS".into(),
//!         subjects: vec!["orders.>".into()],
//!         ..Default::default()
//!     })
//!     .await?;
//! // Dead letters go to `ORDERS.dead-letter`, kept by the stream `ORDERS_DEAD_LETTER`.
//! ensure_dead_letter_stream(&js, "ORDERS").await?;
//! let consumer = orders
//!     .get_or_create_consumer("billing", pull::Config {
//!         durable_name: Some("billing".into()),
//!         ack_policy: jetstream::consumer::AckPolicy::Explicit,
//!         max_deliver: 10,
//!         ..Default::default()
//!     })
//!     .await?;
//!
//! let shutdown = CancellationToken::new();
//! let runner = NatsConsumer::new(consumer, js, idem_runtime::handler!(on_order_paid), store)
//!     .with_options(ConsumerOptions::default().concurrency(16).prefetch(32));
//! let stats = runner.stats(); // read while it runs
//! let report = runner.run(shutdown.child_token()).await?; // until `shutdown.cancel()`
//! println!("processed={} duplicates={}", report.processed, report.duplicates);
//! # Ok(()) }
//! ```
//!
//! # Wiring: your own consumer loop
//!
//! Keep your loop and hand each message to the handler with a [`NatsAcknowledger`]; the
//! handler acks, naks or dead-letters it:
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use async_nats::jetstream::consumer::PullConsumer;
//! use idem_runtime::broker::nats::{NatsAckOptions, NatsAcknowledger};
//! use idem_runtime::handler::Handler as _;
//! # use idem_runtime::{idempotent, HandlerError, PgStore, PgTx};
//! # #[derive(Debug, serde::Deserialize)]
//! # struct OrderPaid { order_id: String }
//! # #[derive(Debug, thiserror::Error)]
//! # enum AppError { #[error(transparent)] Db(#[from] sqlx::Error) }
//! # impl HandlerError for AppError {}
//! # #[idempotent(key = "order_id", store = "pg", strategy = "dedup_table", scope = "doc.nats.own_loop")]
//! # async fn on_order_paid(tx: &mut PgTx<'_>, msg: OrderPaid) -> Result<(), AppError> { Ok(()) }
//!
//! # async fn run(consumer: PullConsumer, store: PgStore) -> Result<(), Box<dyn std::error::Error>> {
//! // Dead-letter subject, `max_deliver` and the in-progress interval, from the consumer.
//! let settle = NatsAckOptions::for_consumer(consumer.cached_info());
//! // A payload that does not decode is dead-lettered with the reason, never dropped.
//! let handler = idem_runtime::handler!(on_order_paid).into_dyn();
//! let mut messages = consumer.messages().await?;
//! while let Some(message) = messages.next().await {
//!     let message = message?;
//!     let payload = message.payload.clone();
//!     let ack = NatsAcknowledger::new(message, &settle);
//!     // Decode, gate, body, commit, then ack (or nak with the backoff, or dead-letter).
//!     let _outcome = handler.handle_payload(&store, &payload, Box::new(ack)).await;
//! }
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::pull::{self, MessagesError, MessagesErrorKind};
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, StreamError};
use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::{self, AckKind};
use futures_util::StreamExt as _;
use tracing::Instrument as _;

use super::{
    BatchOptions, CancellationToken, ConsumerOptions, ConsumerReport, ConsumerStats, Decode, Json,
};
use super::{Workers, deliver, deliver_batch};
use crate::ack::{Acknowledger, Committed, DeadLetter, Requeue};
use crate::handler::{BatchHandler, Handler};

/// Header of a dead letter: why it was dead-lettered.
pub const REASON_HEADER: &str = "Idem-Reason";
/// Header of a dead letter: the delivery that failed, 1 for the first.
pub const ATTEMPT_HEADER: &str = "Idem-Attempt";
/// Header of a dead letter: the stream the message came from.
pub const STREAM_HEADER: &str = "Idem-Stream";
/// Header of a dead letter: the message's sequence in that stream.
pub const STREAM_SEQUENCE_HEADER: &str = "Idem-Stream-Sequence";
/// Header of a dead letter: the subject the message was published to.
pub const SUBJECT_HEADER: &str = "Idem-Subject";
/// Header of a dead letter: the message's `Nats-Msg-Id`, when it had one.
pub const MESSAGE_ID_HEADER: &str = "Idem-Message-Id";

/// The longest reason a dead letter carries in its header, in bytes; a longer one is cut.
const MAX_REASON_BYTES: usize = 2048;

/// The server's `ack_wait` when the consumer does not set one.
const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

/// The idle heartbeat of the runner's pull requests: a dead connection is noticed after two.
const PULL_HEARTBEAT: Duration = Duration::from_secs(5);

/// The default dead-letter subject of a stream: `<stream>.dead-letter`.
///
/// ```
/// use idem_runtime::broker::nats::default_dead_letter_subject;
///
/// assert_eq!(default_dead_letter_subject("ORDERS"), "ORDERS.dead-letter");
/// ```
pub fn default_dead_letter_subject(stream: &str) -> String {
    format!("{stream}.dead-letter")
}

/// The name of the stream [`ensure_dead_letter_stream`] creates for `stream`:
/// `<stream>_DEAD_LETTER`.
///
/// ```
/// use idem_runtime::broker::nats::dead_letter_stream_name;
///
/// assert_eq!(dead_letter_stream_name("ORDERS"), "ORDERS_DEAD_LETTER");
/// ```
pub fn dead_letter_stream_name(stream: &str) -> String {
    format!("{stream}_DEAD_LETTER")
}

/// Makes sure a stream keeps the dead letters of `stream`: creates the stream
/// [`dead_letter_stream_name`] capturing [`default_dead_letter_subject`] (file storage, no
/// limits) if it does not exist, and returns the subject.
///
/// # Errors
///
/// [`NatsError::Setup`] when the server refuses, for example because another stream already
/// captures the subject.
pub async fn ensure_dead_letter_stream(
    context: &jetstream::Context,
    stream: &str,
) -> Result<String, NatsError> {
    let subject = default_dead_letter_subject(stream);
    let name = dead_letter_stream_name(stream);
    context
        .get_or_create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            description: Some(format!("idem dead letters of the stream {stream}")),
            ..Default::default()
        })
        .await
        .map_err(|source| NatsError::Setup {
            stream: name,
            source: Box::new(source),
        })?;
    Ok(subject)
}

/// The errors of the NATS integration: settling a message, publishing a dead letter, setting
/// up and running a consumer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// The server did not take (or, with confirmed acks, did not confirm) an ack, nak, term or
    /// in-progress. The message stays pending and is redelivered after `ack_wait`; after a
    /// commit, the redelivery is a duplicate.
    #[error(
        "could not {action} JetStream message {stream_sequence}: {source}; the server redelivers it after the consumer's ack_wait (after a commit, as a duplicate)"
    )]
    Settle {
        /// `ack`, `nak` or `term`.
        action: &'static str,
        /// The message's stream sequence (0 when unknown).
        stream_sequence: u64,
        /// The client's error.
        #[source]
        source: async_nats::Error,
    },
    /// A dead letter could not be published (or its publish was not confirmed). The message
    /// was not terminated: it is redelivered after `ack_wait` and dead-lettered again.
    #[error(
        "could not publish the dead letter of JetStream message {stream_sequence} to `{subject}`: {source}; the message was not terminated and is redelivered after ack_wait. Make sure a stream captures `{subject}` (`ensure_dead_letter_stream` creates one)"
    )]
    DeadLetterPublish {
        /// The dead-letter subject.
        subject: String,
        /// The message's stream sequence (0 when unknown).
        stream_sequence: u64,
        /// The client's error.
        #[source]
        source: PublishError,
    },
    /// No stream captures the runner's dead-letter subject: dead letters would be refused and
    /// their messages redelivered until `max_deliver`, then lost.
    #[error(
        "no JetStream stream captures the dead-letter subject `{subject}` ({source}); create one (`ensure_dead_letter_stream`) or point the runner at one (`with_dead_letter_subject`)"
    )]
    NoDeadLetterStream {
        /// The dead-letter subject.
        subject: String,
        /// The server's answer.
        #[source]
        source: async_nats::Error,
    },
    /// The dead-letter subject is captured by the very stream the consumer reads: dead letters
    /// would come back as deliveries.
    #[error(
        "the dead-letter subject `{subject}` is captured by `{stream}`, the stream being consumed: dead letters would be delivered again; use a subject outside that stream (`with_dead_letter_subject`)"
    )]
    DeadLetterLoop {
        /// The dead-letter subject.
        subject: String,
        /// The consumed stream.
        stream: String,
    },
    /// The consumer does not ack each message explicitly, so acking after the commit is not
    /// possible.
    #[error(
        "consumer `{consumer}` on stream `{stream}` has ack policy {policy:?}: idem acks each message after its commit and needs AckPolicy::Explicit"
    )]
    AckPolicy {
        /// The consumer.
        consumer: String,
        /// Its stream.
        stream: String,
        /// Its ack policy.
        policy: AckPolicy,
    },
    /// The runner could not start pulling from the consumer.
    #[error("could not start pulling from consumer `{consumer}`: {source}")]
    Pull {
        /// The consumer.
        consumer: String,
        /// The client's error.
        #[source]
        source: StreamError,
    },
    /// Pulling failed for good: the consumer was deleted, is a push consumer, or the pull
    /// requests exceed its limits (`max_batch`: lower the prefetch).
    #[error("pulling from consumer `{consumer}` failed for good: {source}")]
    Messages {
        /// The consumer.
        consumer: String,
        /// The client's error.
        #[source]
        source: MessagesError,
    },
    /// The consumer's message stream ended: the NATS connection was closed.
    #[error(
        "the messages of consumer `{consumer}` stopped: the NATS connection was closed; deliveries in flight were drained, undelivered ones stay on the server"
    )]
    StreamEnded {
        /// The consumer.
        consumer: String,
    },
    /// A stream could not be created or looked up.
    #[error("could not create or look up the JetStream stream `{stream}`: {source}")]
    Setup {
        /// The stream.
        stream: String,
        /// The server's answer.
        #[source]
        source: async_nats::Error,
    },
}

/// How [`NatsAcknowledger`]s settle: where dead letters go, the consumer's delivery limit,
/// how often a running handler tells the server it is still at work, and whether acks are
/// confirmed. Cheap to clone; make one per consumer.
///
/// ```
/// use std::time::Duration;
/// use idem_runtime::broker::nats::NatsAckOptions;
///
/// let options = NatsAckOptions::new("ORDERS.dead-letter")
///     .with_delivery_limit(Some(5))
///     .with_progress_every(Some(Duration::from_secs(10)));
/// assert_eq!(options.dead_letter_subject(), "ORDERS.dead-letter");
/// assert_eq!(options.delivery_limit(), Some(5));
/// assert!(options.confirms_acks());
/// ```
#[derive(Debug, Clone)]
pub struct NatsAckOptions {
    dead_letter_subject: Arc<str>,
    delivery_limit: Option<u32>,
    progress_every: Option<Duration>,
    confirm_acks: bool,
}

impl NatsAckOptions {
    /// Dead letters to `dead_letter_subject`; no delivery limit, no in-progress signals,
    /// confirmed acks.
    pub fn new(dead_letter_subject: impl Into<String>) -> Self {
        Self {
            dead_letter_subject: Arc::from(dead_letter_subject.into()),
            delivery_limit: None,
            progress_every: None,
            confirm_acks: true,
        }
    }

    /// The options for a consumer, from its info (`consumer.cached_info()`): dead letters to
    /// `<stream>.dead-letter`, its `max_deliver` as the delivery limit, an in-progress signal
    /// every third of its `ack_wait` (30 s when unset), confirmed acks.
    pub fn for_consumer(info: &jetstream::consumer::Info) -> Self {
        let ack_wait = if info.config.ack_wait.is_zero() {
            DEFAULT_ACK_WAIT
        } else {
            info.config.ack_wait
        };
        Self::new(default_dead_letter_subject(&info.stream_name))
            .with_delivery_limit(delivery_limit_of(info.config.max_deliver))
            .with_progress_every(Some(ack_wait / 3))
    }

    /// Dead letters go to `subject`; a stream must capture it.
    #[must_use]
    pub fn with_dead_letter_subject(mut self, subject: impl Into<String>) -> Self {
        self.dead_letter_subject = Arc::from(subject.into());
        self
    }

    /// The consumer's `max_deliver`, when it has one: the last delivery the server allows is
    /// dead-lettered rather than requeued. `None`: no limit.
    #[must_use]
    pub fn with_delivery_limit(mut self, limit: Option<u32>) -> Self {
        self.delivery_limit = limit.filter(|&limit| limit > 0);
        self
    }

    /// While a handler runs, send `+WPI` (in progress) this often, so that the server does
    /// not redeliver the message after `ack_wait`; keep it below `ack_wait`. `None`: never.
    #[must_use]
    pub fn with_progress_every(mut self, every: Option<Duration>) -> Self {
        self.progress_every = every.filter(|every| !every.is_zero());
        self
    }

    /// Whether to wait for the server to confirm each ack, nak and term (the default). A
    /// confirmed ack that is lost is an error (logged, and the redelivery is a duplicate);
    /// unconfirmed settling is one round trip cheaper, and a lost ack goes unnoticed until the
    /// redelivery.
    #[must_use]
    pub fn with_confirmed_acks(mut self, confirm: bool) -> Self {
        self.confirm_acks = confirm;
        self
    }

    /// Where dead letters go.
    pub fn dead_letter_subject(&self) -> &str {
        &self.dead_letter_subject
    }

    /// [`with_delivery_limit`](Self::with_delivery_limit).
    pub fn delivery_limit(&self) -> Option<u32> {
        self.delivery_limit
    }

    /// [`with_progress_every`](Self::with_progress_every).
    pub fn progress_every(&self) -> Option<Duration> {
        self.progress_every
    }

    /// [`with_confirmed_acks`](Self::with_confirmed_acks).
    pub fn confirms_acks(&self) -> bool {
        self.confirm_acks
    }
}

/// A consumer's `max_deliver` as a delivery limit: none when 0 or -1 (unlimited).
fn delivery_limit_of(max_deliver: i64) -> Option<u32> {
    u32::try_from(max_deliver).ok().filter(|&limit| limit > 0)
}

/// Sends `+WPI` for a message until dropped.
#[derive(Debug)]
struct ProgressTicker(tokio::task::JoinHandle<()>);

impl Drop for ProgressTicker {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ProgressTicker {
    fn start(message: &jetstream::Message, every: Duration) -> Option<Self> {
        // Outside a Tokio runtime there is nothing to tick on: settle without it.
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let message = message.clone();
        Some(Self(runtime.spawn(async move {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                ticks.tick().await;
                if let Err(error) = message.ack_with(AckKind::Progress).await {
                    tracing::debug!(target: "idem", %error, "could not send an in-progress signal");
                }
            }
        })))
    }
}

/// The [`Acknowledger`] of one JetStream message: acks after the commit, naks with the backoff
/// delay, dead-letters to a subject then terminates; tells the server the message is in
/// progress while the handler runs (see [`NatsAckOptions::with_progress_every`]), until it
/// settles or is dropped. Dropped unsettled (a handler cancelled at the shutdown deadline), the
/// message is left pending and redelivered after `ack_wait`.
///
/// See the [module](self) for a consumer loop that uses it.
#[derive(Debug)]
pub struct NatsAcknowledger {
    message: jetstream::Message,
    options: NatsAckOptions,
    progress: Option<ProgressTicker>,
}

impl NatsAcknowledger {
    /// The acknowledger of `message`. Starts the in-progress signals, if the options ask for
    /// them (inside a Tokio runtime).
    pub fn new(message: jetstream::Message, options: &NatsAckOptions) -> Self {
        let progress = options
            .progress_every
            .and_then(|every| ProgressTicker::start(&message, every));
        Self {
            message,
            options: options.clone(),
            progress,
        }
    }

    /// The message.
    pub fn message(&self) -> &jetstream::Message {
        &self.message
    }

    /// The message's payload.
    pub fn payload(&self) -> &[u8] {
        &self.message.payload
    }

    /// The message's sequence in its stream (0 when it is not a JetStream delivery).
    pub fn stream_sequence(&self) -> u64 {
        self.message.info().map_or(0, |info| info.stream_sequence)
    }

    async fn send(&mut self, kind: AckKind, action: &'static str) -> Result<(), NatsError> {
        // Settling ends the in-progress signals.
        self.progress = None;
        let told = if self.options.confirm_acks {
            self.message.double_ack_with(kind).await
        } else {
            self.message.ack_with(kind).await
        };
        told.map_err(|source| NatsError::Settle {
            action,
            stream_sequence: self.stream_sequence(),
            source,
        })
    }

    /// The dead letter's headers: the message's own (except `Nats-*`), and idem's.
    fn dead_letter_headers(&self, letter: &DeadLetter<'_>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(original) = &self.message.headers {
            for (name, values) in original.iter() {
                let name: &str = name.as_ref();
                if name.starts_with("Nats-") || name.starts_with("Idem-") {
                    continue;
                }
                for value in values {
                    headers.append(name, value.as_str());
                }
            }
        }
        let (stream, sequence) = match self.message.info() {
            Ok(info) => (info.stream.to_owned(), info.stream_sequence),
            Err(_) => (String::new(), 0),
        };
        headers.insert(REASON_HEADER, header_safe(letter.reason).as_str());
        headers.insert(ATTEMPT_HEADER, letter.attempt.to_string().as_str());
        headers.insert(STREAM_HEADER, stream.as_str());
        headers.insert(STREAM_SEQUENCE_HEADER, sequence.to_string().as_str());
        headers.insert(SUBJECT_HEADER, self.message.subject.as_str());
        if let Some(id) = Acknowledger::message_id(self) {
            headers.insert(MESSAGE_ID_HEADER, header_safe(id).as_str());
        }
        if sequence > 0 {
            // Published twice (the term after it was lost), it is stored once.
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                format!("idem-dl.{stream}.{sequence}").as_str(),
            );
        }
        headers
    }
}

/// A header value: one line, at most [`MAX_REASON_BYTES`].
fn header_safe(text: &str) -> String {
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
    }
    line
}

impl Acknowledger for NatsAcknowledger {
    type Error = NatsError;

    /// The server's delivery count: 1 for the first delivery.
    fn attempt(&self) -> Option<u32> {
        let delivered = self.message.info().ok()?.delivered;
        Some(u32::try_from(delivered).unwrap_or(u32::MAX).max(1))
    }

    /// The consumer's `max_deliver` ([`NatsAckOptions::with_delivery_limit`]).
    fn delivery_limit(&self) -> Option<u32> {
        self.options.delivery_limit
    }

    /// The `Nats-Msg-Id` header, when present and not empty.
    fn message_id(&self) -> Option<&str> {
        self.message
            .headers
            .as_ref()?
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(async_nats::HeaderValue::as_str)
            .filter(|id| !id.is_empty())
    }

    async fn ack(mut self, _proof: Committed) -> Result<(), NatsError> {
        self.send(AckKind::Ack, "ack").await
    }

    async fn requeue(mut self, requeue: Requeue) -> Result<(), NatsError> {
        self.send(AckKind::Nak(Some(requeue.delay)), "nak").await
    }

    async fn dead_letter(mut self, letter: DeadLetter<'_>) -> Result<(), NatsError> {
        let headers = self.dead_letter_headers(&letter);
        let subject = self.options.dead_letter_subject.to_string();
        let published = async {
            self.message
                .context
                .publish_with_headers(subject.clone(), headers, self.message.payload.clone())
                .await?
                .await
        }
        .await;
        if let Err(source) = published {
            // Not terminated: redelivered after ack_wait, and dead-lettered again.
            return Err(NatsError::DeadLetterPublish {
                subject,
                stream_sequence: self.stream_sequence(),
                source,
            });
        }
        self.send(AckKind::Term, "term").await
    }
}

/// What a runner pulls from and settles with: the consumer, the context dead letters are
/// published through, and how its acknowledgers settle. Shared by [`NatsConsumer`] and
/// [`NatsBatchConsumer`].
struct PullSource {
    consumer: PullConsumer,
    context: jetstream::Context,
    dead_letter_subject: Option<String>,
    progress_every: Option<Option<Duration>>,
    confirm_acks: bool,
}

impl PullSource {
    fn new(consumer: PullConsumer, context: jetstream::Context) -> Self {
        Self {
            consumer,
            context,
            dead_letter_subject: None,
            progress_every: None,
            confirm_acks: true,
        }
    }

    fn info(&self) -> &jetstream::consumer::Info {
        self.consumer.cached_info()
    }

    /// The acknowledger options the runner settles with.
    fn ack_options(&self) -> NatsAckOptions {
        let info = self.info();
        let mut options = NatsAckOptions::for_consumer(info).with_confirmed_acks(self.confirm_acks);
        if let Some(subject) = &self.dead_letter_subject {
            options = options.with_dead_letter_subject(subject.clone());
        }
        if let Some(every) = self.progress_every {
            options = options.with_progress_every(every);
        }
        options
    }

    /// Checks the consumer and the dead-letter destination before pulling.
    async fn check(&self, settle: &NatsAckOptions) -> Result<(), NatsError> {
        let info = self.info();
        if info.config.ack_policy != AckPolicy::Explicit {
            return Err(NatsError::AckPolicy {
                consumer: info.name.clone(),
                stream: info.stream_name.clone(),
                policy: info.config.ack_policy,
            });
        }
        let subject = settle.dead_letter_subject();
        match self.context.stream_by_subject(subject).await {
            Ok(stream) if stream == info.stream_name => Err(NatsError::DeadLetterLoop {
                subject: subject.to_owned(),
                stream,
            }),
            Ok(_) => Ok(()),
            Err(source) => Err(NatsError::NoDeadLetterStream {
                subject: subject.to_owned(),
                source: Box::new(source),
            }),
        }
    }

    /// Checks, then starts pulling, `prefetch` messages per pull request: the options to settle
    /// with and the messages.
    async fn start(&self, prefetch: u16) -> Result<(NatsAckOptions, pull::Stream), NatsError> {
        let settle = self.ack_options();
        self.check(&settle).await?;
        let messages = self
            .consumer
            .stream()
            .max_messages_per_batch(usize::from(prefetch))
            .heartbeat(PULL_HEARTBEAT)
            .messages()
            .await
            .map_err(|source| NatsError::Pull {
                consumer: self.info().name.clone(),
                source,
            })?;
        Ok((settle, messages))
    }

    /// Stops pulling (what was fetched and not started stays pending on the server), drains
    /// the handlers in flight for `grace`, and sends the acks the client still buffers.
    async fn stop(&self, messages: pull::Stream, workers: Workers, grace: Duration) {
        drop(messages);
        workers.drain(grace).await;
        // Unconfirmed acks are buffered in the client: send them before returning.
        if let Err(error) = self.context.client().flush().await {
            tracing::warn!(target: "idem", %error, "could not flush the last acks; the server redelivers those messages");
        }
    }
}

/// What one poll of the message stream gave a runner: a message to handle; `None`, nothing
/// this time (missed heartbeats, a failed pull request, logged), and the stream pulls again;
/// or an error when pulling failed for good or the connection was closed, and the runner
/// stops.
fn pulled(
    next: Option<Result<jetstream::Message, MessagesError>>,
    consumer: &str,
) -> Result<Option<jetstream::Message>, NatsError> {
    match next {
        Some(Ok(message)) => Ok(Some(message)),
        Some(Err(error)) => {
            if matches!(
                error.kind(),
                MessagesErrorKind::ConsumerDeleted
                    | MessagesErrorKind::PushBasedConsumer
                    | MessagesErrorKind::RequestLimitExceeded
            ) {
                return Err(NatsError::Messages {
                    consumer: consumer.to_owned(),
                    source: error,
                });
            }
            tracing::warn!(target: "idem", %consumer, %error, "pulling from JetStream failed; retrying");
            Ok(None)
        }
        None => Err(NatsError::StreamEnded {
            consumer: consumer.to_owned(),
        }),
    }
}

/// A JetStream pull-consumer runner: pulls with bounded prefetch, runs the handler on up to
/// [`ConsumerOptions::concurrency`] messages at once, settles each after its commit, and stops
/// gracefully when its [`CancellationToken`] is cancelled.
///
/// The consumer must use `AckPolicy::Explicit`. Its `max_deliver` is honoured (the last
/// delivery is dead-lettered), its `ack_wait` sets the in-progress interval (a third of it).
/// Size the prefetch so that the fetched messages are handled within `ack_wait`: a message
/// waiting in the prefetch buffer longer is redelivered meanwhile (harmless: a duplicate).
///
/// On cancellation it stops pulling, lets the handlers in flight finish and settle for
/// [`ConsumerOptions::shutdown_grace`], then cancels the rest, whose messages are left
/// pending and redelivered after `ack_wait`. Messages fetched but not yet started are left
/// pending too.
///
/// See the [module](self) for an example.
pub struct NatsConsumer<H: Handler, D = Json> {
    source: PullSource,
    handler: Arc<H>,
    store: Arc<H::Store>,
    decoder: Arc<D>,
    options: ConsumerOptions,
    stats: Arc<ConsumerStats>,
}

impl<H: Handler, D> std::fmt::Debug for NatsConsumer<H, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConsumer")
            .field("stream", &self.source.info().stream_name)
            .field("consumer", &self.source.info().name)
            .field("options", &self.options)
            .field("dead_letter_subject", &self.source.dead_letter_subject)
            .finish_non_exhaustive()
    }
}

impl<H: Handler> NatsConsumer<H, Json> {
    /// A runner for `consumer` (a durable or ephemeral pull consumer with explicit acks),
    /// publishing dead letters through `context`, handling with `handler` on `store`. Payloads
    /// are JSON until [`with_decoder`](Self::with_decoder).
    pub fn new(
        consumer: PullConsumer,
        context: jetstream::Context,
        handler: H,
        store: H::Store,
    ) -> Self {
        Self {
            source: PullSource::new(consumer, context),
            handler: Arc::new(handler),
            store: Arc::new(store),
            decoder: Arc::new(Json),
            options: ConsumerOptions::default(),
            stats: Arc::default(),
        }
    }
}

impl<H: Handler, D: Decode<H::Message>> NatsConsumer<H, D> {
    /// Decodes payloads with `decoder` instead of JSON.
    pub fn with_decoder<D2: Decode<H::Message>>(self, decoder: D2) -> NatsConsumer<H, D2> {
        NatsConsumer {
            source: self.source,
            handler: self.handler,
            store: self.store,
            decoder: Arc::new(decoder),
            options: self.options,
            stats: self.stats,
        }
    }

    /// Concurrency, prefetch (the pull batch size) and shutdown grace.
    #[must_use]
    pub fn with_options(mut self, options: ConsumerOptions) -> Self {
        self.options = options;
        self
    }

    /// Dead letters go to `subject` instead of `<stream>.dead-letter`. A stream other than the
    /// consumed one must capture it; [`run`](Self::run) checks.
    #[must_use]
    pub fn with_dead_letter_subject(mut self, subject: impl Into<String>) -> Self {
        self.source.dead_letter_subject = Some(subject.into());
        self
    }

    /// How often a running handler's message is signalled in progress, instead of a third of
    /// the consumer's `ack_wait`; `None`: never (a body longer than `ack_wait` is then
    /// redelivered while it runs, and the redelivery waits on the gate).
    #[must_use]
    pub fn with_progress_every(mut self, every: Option<Duration>) -> Self {
        self.source.progress_every = Some(every);
        self
    }

    /// Whether acks, naks and terms wait for the server's confirmation (the default; see
    /// [`NatsAckOptions::with_confirmed_acks`]).
    #[must_use]
    pub fn with_confirmed_acks(mut self, confirm: bool) -> Self {
        self.source.confirm_acks = confirm;
        self
    }

    /// The runner's counts, readable while it runs.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        Arc::clone(&self.stats)
    }

    /// Pulls and handles messages until `shutdown` is cancelled, then drains the handlers in
    /// flight (for the shutdown grace) and returns what it did.
    ///
    /// # Errors
    ///
    /// Before pulling: [`NatsError::AckPolicy`], [`NatsError::NoDeadLetterStream`],
    /// [`NatsError::DeadLetterLoop`], [`NatsError::Pull`]. While running, after draining the
    /// handlers in flight: [`NatsError::Messages`] (the consumer was deleted, or the prefetch
    /// exceeds its `max_batch`) and [`NatsError::StreamEnded`] (the connection was closed).
    /// Settling failures are not errors of `run`: they are logged and counted
    /// ([`ConsumerReport::settle_failures`]), and the server redelivers those messages.
    pub async fn run(self, shutdown: CancellationToken) -> Result<ConsumerReport, NatsError> {
        let (settle, mut messages) = self.source.start(self.options.prefetch_count()).await?;
        let consumer_name = self.source.info().name.clone();
        let mut workers = Workers::new(self.options.concurrency_limit(), Arc::clone(&self.stats));
        let mut failed = None;
        loop {
            let permit = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                permit = workers.ready() => permit,
            };
            let next = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                next = messages.next() => next,
            };
            let message = match pulled(next, &consumer_name) {
                Ok(Some(message)) => message,
                Ok(None) => continue,
                Err(error) => {
                    failed = Some(error);
                    break;
                }
            };
            let span = delivery_span(&message);
            let ack = NatsAcknowledger::new(message, &settle);
            let handler = Arc::clone(&self.handler);
            let store = Arc::clone(&self.store);
            let decoder = Arc::clone(&self.decoder);
            let stats = Arc::clone(&self.stats);
            workers.spawn(
                permit,
                async move {
                    let payload = ack.message.payload.clone();
                    deliver(&*handler, &*decoder, &*store, &payload, ack, &stats).await;
                }
                .instrument(span),
            );
        }
        self.source
            .stop(messages, workers, self.options.grace())
            .await;
        match failed {
            Some(error) => Err(error),
            None => Ok(self.stats.snapshot()),
        }
    }
}

/// A JetStream pull-consumer runner in batch mode, for a `batch` handler ([`BatchHandler`]):
/// collects up to [`BatchOptions::max_size`] messages, or what arrives within
/// [`BatchOptions::max_wait`] of the first, hands them to the handler as one batch (one
/// transaction, see [`pipeline::batch`](crate::pipeline::batch)), and runs up to
/// [`ConsumerOptions::concurrency`] batches at once. Everything else is as [`NatsConsumer`]:
/// the consumer must use `AckPolicy::Explicit`, `max_deliver` is honoured, each message is
/// kept in progress while it waits in its batch and while the batch runs, dead letters go to
/// the same subject, and shutdown is graceful (the batch being collected runs with what it
/// has; messages fetched and not collected stay pending).
///
/// Each message is acked on its own ([`NatsAcknowledger`]), once the part of the batch it
/// belongs to committed. Each pull request asks for at least `max_size` × concurrency
/// messages (the prefetch is raised to it), so that batches can fill: the consumer's
/// `max_batch`, if it sets one, must allow that, and its `max_ack_pending` should be at least
/// as large, or batches run smaller than `max_size`.
///
/// ```no_run
/// use async_nats::jetstream::{self, consumer::pull};
/// use idem_runtime::broker::nats::{ensure_dead_letter_stream, NatsBatchConsumer};
/// use idem_runtime::broker::{BatchOptions, CancellationToken, ConsumerOptions};
/// use idem_runtime::{batch_handler, idempotent, HandlerError, PgStore, PgTx};
///
/// #[derive(Debug, serde::Deserialize)]
/// struct OrderPaid { order_id: String, amount: i64 }
///
/// #[derive(Debug, thiserror::Error)]
/// enum AppError { #[error(transparent)] Db(#[from] sqlx::Error) }
/// impl HandlerError for AppError {}
///
/// #[idempotent(key = "order_id", store = "pg", strategy = "dedup_table", scope = "doc.nats.batch", batch)]
/// async fn on_orders_paid(tx: &mut PgTx<'_>, msgs: &[OrderPaid]) -> Result<(), AppError> {
///     let ids: Vec<&str> = msgs.iter().map(|msg| msg.order_id.as_str()).collect();
///     let amounts: Vec<i64> = msgs.iter().map(|msg| msg.amount).collect();
///     sqlx::query(
///         "INSERT INTO payments (order_id, amount) SELECT * FROM unnest($1::text[], $2::bigint[])",
///     )
///     .bind(&ids).bind(&amounts)
///     .execute(&mut **tx).await?;
///     Ok(())
/// }
///
/// # async fn run(store: PgStore) -> Result<(), Box<dyn std::error::Error>> {
/// let js = jetstream::new(async_nats::connect("127.0.0.1:4222").await?);
/// ensure_dead_letter_stream(&js, "ORDERS").await?;
/// let consumer = js
///     .get_stream("ORDERS")
///     .await?
///     .get_or_create_consumer("billing", pull::Config {
///         durable_name: Some("billing".into()),
///         ack_policy: jetstream::consumer::AckPolicy::Explicit,
///         ..Default::default()
///     })
///     .await?;
///
/// let shutdown = CancellationToken::new();
/// let runner = NatsBatchConsumer::new(consumer, js, batch_handler!(on_orders_paid), store)
///     .with_options(ConsumerOptions::default().concurrency(4))
///     .with_batch(BatchOptions::default().max_size(100));
/// let stats = runner.stats(); // read while it runs
/// let report = runner.run(shutdown.child_token()).await?; // until `shutdown.cancel()`
/// println!("processed={} duplicates={}", report.processed, report.duplicates);
/// # drop(stats);
/// # Ok(()) }
/// ```
pub struct NatsBatchConsumer<H: BatchHandler, D = Json> {
    source: PullSource,
    handler: Arc<H>,
    store: Arc<H::Store>,
    decoder: Arc<D>,
    options: ConsumerOptions,
    batch: BatchOptions,
    stats: Arc<ConsumerStats>,
}

impl<H: BatchHandler, D> std::fmt::Debug for NatsBatchConsumer<H, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBatchConsumer")
            .field("stream", &self.source.info().stream_name)
            .field("consumer", &self.source.info().name)
            .field("options", &self.options)
            .field("batch", &self.batch)
            .field("dead_letter_subject", &self.source.dead_letter_subject)
            .finish_non_exhaustive()
    }
}

impl<H: BatchHandler> NatsBatchConsumer<H, Json> {
    /// A batch runner for `consumer` (a durable or ephemeral pull consumer with explicit
    /// acks), publishing dead letters through `context`, handling with `handler` on `store`.
    /// Payloads are JSON until [`with_decoder`](Self::with_decoder); the options and batches
    /// the defaults.
    pub fn new(
        consumer: PullConsumer,
        context: jetstream::Context,
        handler: H,
        store: H::Store,
    ) -> Self {
        Self {
            source: PullSource::new(consumer, context),
            handler: Arc::new(handler),
            store: Arc::new(store),
            decoder: Arc::new(Json),
            options: ConsumerOptions::default(),
            batch: BatchOptions::default(),
            stats: Arc::default(),
        }
    }
}

impl<H: BatchHandler, D: Decode<H::Message>> NatsBatchConsumer<H, D> {
    /// Decodes payloads with `decoder` instead of JSON.
    pub fn with_decoder<D2: Decode<H::Message>>(self, decoder: D2) -> NatsBatchConsumer<H, D2> {
        NatsBatchConsumer {
            source: self.source,
            handler: self.handler,
            store: self.store,
            decoder: Arc::new(decoder),
            options: self.options,
            batch: self.batch,
            stats: self.stats,
        }
    }

    /// Concurrency (batches at once), prefetch (the pull batch size, raised to at least
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

    /// As [`NatsConsumer::with_dead_letter_subject`].
    #[must_use]
    pub fn with_dead_letter_subject(mut self, subject: impl Into<String>) -> Self {
        self.source.dead_letter_subject = Some(subject.into());
        self
    }

    /// As [`NatsConsumer::with_progress_every`]: each message of a batch is signalled in
    /// progress from the moment it is collected until it is settled.
    #[must_use]
    pub fn with_progress_every(mut self, every: Option<Duration>) -> Self {
        self.source.progress_every = Some(every);
        self
    }

    /// As [`NatsConsumer::with_confirmed_acks`].
    #[must_use]
    pub fn with_confirmed_acks(mut self, confirm: bool) -> Self {
        self.source.confirm_acks = confirm;
        self
    }

    /// The runner's counts, readable while it runs.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        Arc::clone(&self.stats)
    }

    /// Pulls and handles messages in batches until `shutdown` is cancelled, then stops as
    /// [`NatsConsumer::run`] does: the batch being collected runs with what it has, the
    /// batches in flight finish and settle for up to the shutdown grace, the rest are
    /// cancelled (their messages left pending), and it returns what it did.
    ///
    /// # Errors
    ///
    /// As [`NatsConsumer::run`]; [`NatsError::Messages`] also when `max_size` × concurrency
    /// exceeds the consumer's `max_batch`. A batch collected when pulling fails for good still
    /// runs, before the error is returned.
    pub async fn run(self, shutdown: CancellationToken) -> Result<ConsumerReport, NatsError> {
        let prefetch = self.batch.prefetch_for(&self.options);
        let (settle, mut messages) = self.source.start(prefetch).await?;
        let consumer_name = self.source.info().name.clone();
        let stream_name = self.source.info().stream_name.clone();
        let max_size = self.batch.size_limit();
        let mut workers = Workers::new(self.options.concurrency_limit(), Arc::clone(&self.stats));
        let mut failed = None;
        'consume: loop {
            let permit = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                permit = workers.ready() => permit,
            };
            // The batch's first message, however long it takes to come.
            let first = loop {
                let next = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break 'consume,
                    next = messages.next() => next,
                };
                match pulled(next, &consumer_name) {
                    Ok(Some(message)) => break message,
                    Ok(None) => {}
                    Err(error) => {
                        failed = Some(error);
                        break 'consume;
                    }
                }
            };
            // Then up to `max_size`, until `max_wait` after the first, or shutdown. Each
            // message is in progress from here on.
            let mut collected = Vec::with_capacity(max_size.min(super::BATCH_CAPACITY));
            collected.push(NatsAcknowledger::new(first, &settle));
            let deadline = batch_deadline(self.batch.wait_limit());
            while collected.len() < max_size {
                let next = tokio::select! {
                    biased;
                    next = messages.next() => next,
                    () = tokio::time::sleep_until(deadline) => break,
                    () = shutdown.cancelled() => break,
                };
                match pulled(next, &consumer_name) {
                    Ok(Some(message)) => {
                        collected.push(NatsAcknowledger::new(message, &settle));
                    }
                    Ok(None) => {}
                    Err(error) => {
                        failed = Some(error);
                        break;
                    }
                }
            }
            let span = tracing::info_span!(
                "idem.delivery_batch",
                broker = "nats",
                stream = %stream_name,
                consumer = %consumer_name,
                size = collected.len(),
            );
            let deliveries: Vec<_> = collected
                .into_iter()
                .map(|ack| (ack.message.payload.clone(), ack))
                .collect();
            let handler = Arc::clone(&self.handler);
            let store = Arc::clone(&self.store);
            let decoder = Arc::clone(&self.decoder);
            let stats = Arc::clone(&self.stats);
            workers.spawn_batch(
                permit,
                deliveries.len(),
                async move {
                    deliver_batch(&*handler, &*decoder, &*store, deliveries, &stats).await;
                }
                .instrument(span),
            );
            if failed.is_some() {
                break;
            }
        }
        self.source
            .stop(messages, workers, self.options.grace())
            .await;
        match failed {
            Some(error) => Err(error),
            None => Ok(self.stats.snapshot()),
        }
    }
}

/// When a batch collected now stops waiting for more: `wait` from now, or, when that is out
/// of the clock's range, a day from now.
fn batch_deadline(wait: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(wait)
        .or_else(|| now.checked_add(Duration::from_secs(24 * 60 * 60)))
        .unwrap_or(now)
}

/// The span of one delivery: `idem.delivery` with the stream, its sequence, the delivery
/// count and the message id.
fn delivery_span(message: &jetstream::Message) -> tracing::Span {
    let (stream, stream_sequence, delivered) = match message.info() {
        Ok(info) => (info.stream.to_owned(), info.stream_sequence, info.delivered),
        Err(_) => (String::new(), 0, 0),
    };
    let message_id = message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(async_nats::header::NATS_MESSAGE_ID))
        .map(|id| id.as_str().to_owned());
    tracing::info_span!(
        "idem.delivery",
        broker = "nats",
        stream = %stream,
        subject = %message.subject,
        stream_sequence,
        delivered,
        message_id = message_id.as_deref(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_deliver_becomes_a_delivery_limit() {
        assert_eq!(delivery_limit_of(-1), None);
        assert_eq!(delivery_limit_of(0), None);
        assert_eq!(delivery_limit_of(3), Some(3));
        assert_eq!(delivery_limit_of(i64::MAX), None);
    }

    #[test]
    fn header_values_are_one_bounded_line() {
        assert_eq!(header_safe("a\r\nb\tc"), "a  b c");
        let long = "é".repeat(MAX_REASON_BYTES);
        let cut = header_safe(&long);
        assert!(cut.len() <= MAX_REASON_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
