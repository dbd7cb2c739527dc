//! A handler as a value: something a consumer loop or a routing table holds and calls.
//!
//! [`handler!(on_order_paid)`](crate::handler!) turns an `#[idempotent]` function into a
//! [`Handler`], so a consumer can keep it in a field or pass it to a generic runner;
//! [`FnHandler`] does the same for a method, from a closure. [`Handler::handle`] does exactly
//! what calling the function does: gate, body, commit, then settle with the acknowledger.
//!
//! To dispatch several handlers, of different message types, from one consumer, erase them
//! with [`Handler::into_dyn`]: a [`DynHandler`] takes the payload as bytes, decodes it as
//! JSON into the handler's message type (a payload that does not decode is dead-lettered, not
//! dropped) and calls the handler.
//!
//! ```
//! use std::collections::HashMap;
//! use idem_runtime::handler::{DynHandler, Handler as _};
//! use idem_runtime::{idempotent, HandlerError, MemoryStore, MemoryTx, NoAck};
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("failed")]
//! struct AppError;
//! impl HandlerError for AppError {}
//!
//! #[derive(serde::Deserialize)]
//! struct OrderPaid { order_id: String }
//! #[derive(serde::Deserialize)]
//! struct OrderShipped { order_id: String, carrier: String }
//!
//! #[idempotent(key = "order_id", store = "memory", strategy = "dedup_table", scope = "doc.routing.paid")]
//! async fn on_paid(tx: &mut MemoryTx, msg: OrderPaid) -> Result<(), AppError> { Ok(()) }
//!
//! #[idempotent(key = "order_id", store = "memory", strategy = "dedup_table", scope = "doc.routing.shipped")]
//! async fn on_shipped(tx: &mut MemoryTx, msg: OrderShipped) -> Result<(), AppError> { Ok(()) }
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let mut routes: HashMap<&str, Box<dyn DynHandler<MemoryStore>>> = HashMap::new();
//! routes.insert("order.paid", idem_runtime::handler!(on_paid).into_dyn());
//! routes.insert("order.shipped", idem_runtime::handler!(on_shipped).into_dyn());
//!
//! let store = MemoryStore::new();
//! let payload = br#"{"order_id": "o-1", "carrier": "ups"}"#;
//! let outcome = routes["order.shipped"].handle_payload(&store, payload, Box::new(NoAck)).await;
//! assert!(outcome.unwrap().is_processed());
//! # });
//! ```

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;

use crate::ack::{Acknowledger, Committed, DeadLetter, Requeue};
use crate::error::{Error, HandlerFailure};
use crate::outcome::Outcome;
use crate::store::Backend;

/// A boxed future, as [`DynHandler`] and [`DynAcknowledger`] return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An idempotent handler as a value.
///
/// Made from an `#[idempotent]` function by [`handler!`](crate::handler!), from a method by
/// [`FnHandler`]; implement it yourself for anything else that handles a message. The future
/// is `Send`, so that any runtime can run it.
pub trait Handler: Send + Sync + 'static {
    /// The store the handler's gate and body run on.
    type Store: Backend;
    /// The message type the handler takes.
    type Message: Send + 'static;
    /// The body's result (`T` in `Result<T, E>`).
    type Output: Send + 'static;
    /// The body's error (`E` in `Result<T, E>`).
    type Error: HandlerFailure;

    /// Handles one delivery: gate, body, commit, then settle with `ack`, as calling the
    /// handler function does.
    fn handle<'a, A: Acknowledger + 'a>(
        &'a self,
        store: &'a Self::Store,
        message: Self::Message,
        ack: A,
    ) -> impl Future<Output = Result<Outcome<Self::Output>, Error<Self::Error>>> + Send + 'a;

    /// This handler, for a routing table of handlers with different message types: it takes
    /// the payload as JSON bytes.
    fn into_dyn(self) -> Box<dyn DynHandler<Self::Store>>
    where
        Self: Sized,
        Self::Message: serde::de::DeserializeOwned,
    {
        Box::new(Json(self))
    }
}

/// The failure of an erased handler: the handler's own error, boxed.
pub type DynError = Error<Box<dyn HandlerFailure>>;

impl HandlerFailure for Box<dyn HandlerFailure> {
    fn classify(&self) -> crate::Disposition {
        (**self).classify()
    }
    fn as_std_error(&self) -> &(dyn std::error::Error + 'static) {
        (**self).as_std_error()
    }
}

impl std::fmt::Display for dyn HandlerFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self.as_std_error(), f)
    }
}

/// A handler with its message type erased: it decodes the payload itself. Object-safe, so
/// that one consumer can hold `Box<dyn DynHandler<S>>`s of several handlers. Made by
/// [`Handler::into_dyn`].
pub trait DynHandler<S: Backend>: Send + Sync {
    /// Decodes `payload` into the handler's message type and handles it. A payload that does
    /// not decode (or whose `Deserialize` panics) is dead-lettered through `ack` at once, with
    /// the reason, and the result is [`Error::Decode`]: redelivering the same bytes to the same
    /// code cannot succeed (a message from a newer producer during a rolling deploy lands in the
    /// dead-letter queue, to be replayed once the consumers understand it). The handler's result value is dropped (`Outcome<()>`).
    fn handle_payload<'a>(
        &'a self,
        store: &'a S,
        payload: &'a [u8],
        ack: Box<dyn DynAcknowledger + 'a>,
    ) -> BoxFuture<'a, Result<Outcome<()>, DynError>>;
}

/// A [`Handler`] whose messages arrive as JSON.
struct Json<H>(H);

impl<H> DynHandler<H::Store> for Json<H>
where
    H: Handler,
    H::Message: serde::de::DeserializeOwned,
{
    fn handle_payload<'a>(
        &'a self,
        store: &'a H::Store,
        payload: &'a [u8],
        ack: Box<dyn DynAcknowledger + 'a>,
    ) -> BoxFuture<'a, Result<Outcome<()>, DynError>> {
        Box::pin(async move {
            // The message type's `Deserialize` is user code: a panic there is a failure to
            // decode, not a crashed consumer.
            let decoded =
                crate::unwind::catch_sync(|| serde_json::from_slice::<H::Message>(payload))
                    .unwrap_or_else(|message| {
                        Err(serde::de::Error::custom(format_args!(
                            "the decoder panicked: {message}"
                        )))
                    });
            let message: H::Message = match decoded {
                Ok(message) => message,
                Err(source) => {
                    return Err(
                        dead_letter_undecodable::<H::Message, _>(ack, Box::new(source)).await,
                    );
                }
            };
            match self.0.handle(store, message, ack).await {
                Ok(outcome) => Ok(outcome.map(|_| ())),
                Err(error) => {
                    Err(error.map_handler(|error| Box::new(error) as Box<dyn HandlerFailure>))
                }
            }
        })
    }
}

/// Dead-letters a delivery whose payload does not decode into `M`, with the decoder's error
/// as the reason: the same bytes to the same code can never succeed.
pub(crate) async fn dead_letter_undecodable<M, A: Acknowledger>(
    ack: A,
    source: Box<dyn std::error::Error + Send + Sync>,
) -> DynError {
    let error = Error::Decode {
        message_type: std::any::type_name::<M>(),
        source,
    };
    let reason = error.to_string();
    let attempt = ack.attempt().unwrap_or(1).max(1);
    tracing::error!(target: "idem", %reason, attempt, "undecodable payload; dead-lettering");
    if let Err(ack_error) = ack
        .dead_letter(DeadLetter {
            reason: &reason,
            attempt,
        })
        .await
    {
        tracing::warn!(error = %ack_error, "could not dead-letter the undecodable delivery");
    }
    error
}

/// An [`Acknowledger`] behind a pointer: what a [`DynHandler`] takes. Implemented for every
/// `Acknowledger`; you never implement it.
pub trait DynAcknowledger: Send {
    /// [`Acknowledger::attempt`].
    fn attempt(&self) -> Option<u32>;
    /// [`Acknowledger::delivery_limit`].
    fn delivery_limit(&self) -> Option<u32>;
    /// [`Acknowledger::message_id`].
    fn message_id(&self) -> Option<&str>;
    /// [`Acknowledger::ack`].
    fn ack_boxed<'a>(self: Box<Self>, proof: Committed) -> BoxFuture<'a, Result<(), BoxedAckError>>
    where
        Self: 'a;
    /// [`Acknowledger::requeue`].
    fn requeue_boxed<'a>(
        self: Box<Self>,
        requeue: Requeue,
    ) -> BoxFuture<'a, Result<(), BoxedAckError>>
    where
        Self: 'a;
    /// [`Acknowledger::dead_letter`].
    fn dead_letter_boxed<'a>(
        self: Box<Self>,
        letter: DeadLetter<'a>,
    ) -> BoxFuture<'a, Result<(), BoxedAckError>>
    where
        Self: 'a;
}

/// A broker client's error, boxed.
pub type BoxedAckError = Box<dyn std::error::Error + Send + Sync>;

impl<A: Acknowledger> DynAcknowledger for A {
    fn attempt(&self) -> Option<u32> {
        Acknowledger::attempt(self)
    }
    fn delivery_limit(&self) -> Option<u32> {
        Acknowledger::delivery_limit(self)
    }
    fn message_id(&self) -> Option<&str> {
        Acknowledger::message_id(self)
    }
    fn ack_boxed<'a>(self: Box<Self>, proof: Committed) -> BoxFuture<'a, Result<(), BoxedAckError>>
    where
        Self: 'a,
    {
        Box::pin(async move { (*self).ack(proof).await.map_err(Into::into) })
    }
    fn requeue_boxed<'a>(
        self: Box<Self>,
        requeue: Requeue,
    ) -> BoxFuture<'a, Result<(), BoxedAckError>>
    where
        Self: 'a,
    {
        Box::pin(async move { (*self).requeue(requeue).await.map_err(Into::into) })
    }
    fn dead_letter_boxed<'a>(
        self: Box<Self>,
        letter: DeadLetter<'a>,
    ) -> BoxFuture<'a, Result<(), BoxedAckError>>
    where
        Self: 'a,
    {
        Box::pin(async move { (*self).dead_letter(letter).await.map_err(Into::into) })
    }
}

/// The error of a boxed acknowledger.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct DynAckError(BoxedAckError);

impl<'b> Acknowledger for Box<dyn DynAcknowledger + 'b> {
    type Error = DynAckError;
    fn attempt(&self) -> Option<u32> {
        (**self).attempt()
    }
    fn delivery_limit(&self) -> Option<u32> {
        (**self).delivery_limit()
    }
    fn message_id(&self) -> Option<&str> {
        (**self).message_id()
    }
    async fn ack(self, proof: Committed) -> Result<(), Self::Error> {
        self.ack_boxed(proof).await.map_err(DynAckError)
    }
    async fn requeue(self, requeue: Requeue) -> Result<(), Self::Error> {
        self.requeue_boxed(requeue).await.map_err(DynAckError)
    }
    async fn dead_letter(self, letter: DeadLetter<'_>) -> Result<(), Self::Error> {
        self.dead_letter_boxed(letter).await.map_err(DynAckError)
    }
}

/// A [`Handler`] made from a function: what [`handler!`](crate::handler!) returns for an
/// `#[idempotent]` function, or what you build from a closure for a method handler.
///
/// `call` gets the store, the message and the delivery's acknowledger (boxed), and returns the
/// handler's future, boxed.
///
/// ```
/// use std::sync::Arc;
/// use idem_runtime::handler::{BoxFuture, FnHandler, Handler as _};
/// use idem_runtime::{idempotent, HandlerError, MemoryStore, MemoryTx, NoAck};
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("failed")]
/// struct AppError;
/// impl HandlerError for AppError {}
///
/// struct Billing { fee: i64 }
///
/// impl Billing {
///     #[idempotent(key = "0", store = "memory", strategy = "dedup_table", scope = "doc.fn_handler.method")]
///     async fn on_paid(&self, tx: &mut MemoryTx, msg: (String, i64)) -> Result<i64, AppError> {
///         Ok(msg.1 - self.fee)
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let billing = Arc::new(Billing { fee: 2 });
/// let handler = FnHandler::new(move |store, msg, ack| {
///     let billing = Arc::clone(&billing);
///     Box::pin(async move { billing.on_paid(store, msg, ack).await }) as BoxFuture<'_, _>
/// });
/// let store = MemoryStore::new();
/// let outcome = handler.handle(&store, ("o-1".to_owned(), 10_i64), NoAck).await.unwrap();
/// assert_eq!(outcome.into_value(), Some(8_i64));
/// # });
/// ```
pub struct FnHandler<S, M, T, E, F> {
    call: F,
    types: PhantomData<Signature<S, M, T, E>>,
}

/// The types a [`FnHandler`] handles, without owning any of them.
type Signature<S, M, T, E> = fn(&S, M) -> (T, E);

impl<S, M, T, E, F> std::fmt::Debug for FnHandler<S, M, T, E, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FnHandler")
            .field("message", &std::any::type_name::<M>())
            .finish_non_exhaustive()
    }
}

impl<S, M, T, E, F> FnHandler<S, M, T, E, F>
where
    S: Backend,
    F: for<'a> Fn(
            &'a S,
            M,
            Box<dyn DynAcknowledger + 'a>,
        ) -> BoxFuture<'a, Result<Outcome<T>, Error<E>>>
        + Send
        + Sync
        + 'static,
{
    /// The handler that calls `call`.
    pub fn new(call: F) -> Self {
        Self {
            call,
            types: PhantomData,
        }
    }
}

impl<S, M, T, E, F> Handler for FnHandler<S, M, T, E, F>
where
    S: Backend,
    M: Send + 'static,
    T: Send + 'static,
    E: HandlerFailure,
    F: for<'a> Fn(
            &'a S,
            M,
            Box<dyn DynAcknowledger + 'a>,
        ) -> BoxFuture<'a, Result<Outcome<T>, Error<E>>>
        + Send
        + Sync
        + 'static,
{
    type Store = S;
    type Message = M;
    type Output = T;
    type Error = E;

    fn handle<'a, A: Acknowledger + 'a>(
        &'a self,
        store: &'a S,
        message: M,
        ack: A,
    ) -> impl Future<Output = Result<Outcome<T>, Error<E>>> + Send + 'a {
        (self.call)(store, message, Box::new(ack))
    }
}

/// An `#[idempotent]` function as a [`Handler`] value, by its path as you would call it
/// (`on_order_paid`, `orders::on_order_paid`, `Ledger::handle`).
///
/// ```
/// use idem_runtime::handler::Handler as _;
/// use idem_runtime::{idempotent, HandlerError, MemoryStore, MemoryTx, NoAck};
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("failed")]
/// struct AppError;
/// impl HandlerError for AppError {}
///
/// #[idempotent(key = "0", store = "memory", strategy = "dedup_table", scope = "doc.handler_macro")]
/// async fn on_paid(tx: &mut MemoryTx, msg: (String,)) -> Result<(), AppError> { Ok(()) }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let handler = idem_runtime::handler!(on_paid);
/// let store = MemoryStore::new();
/// assert!(handler.handle(&store, ("o-1".into(),), NoAck).await.unwrap().is_processed());
/// assert!(handler.handle(&store, ("o-1".into(),), NoAck).await.unwrap().is_duplicate());
/// # });
/// ```
#[macro_export]
macro_rules! handler {
    ($($function:tt)+) => {
        $crate::handler::FnHandler::new(|store, message, ack| {
            ::std::boxed::Box::pin($($function)+(store, message, ack))
                as $crate::handler::BoxFuture<'_, _>
        })
    };
}

/// A `batch` handler (`#[idempotent(.., batch)]`) as a value: what a consumer runner's batch
/// mode calls with the deliveries it collected. Made from a batch function by
/// [`batch_handler!`](crate::batch_handler!), from anything else by [`FnBatchHandler`].
///
/// The acknowledgers arrive boxed, so that the trait is object-safe and a runner can hand its
/// own. [`handle_batch`](Self::handle_batch) returns one result per delivery, in order, as the
/// batch function does.
pub trait BatchHandler: Send + Sync + 'static {
    /// The store the handler's gate and body run on.
    type Store: Backend;
    /// The message type the handler takes (`M` in `msgs: &[M]`).
    type Message: Send + 'static;
    /// The body's error (`E` in `Result<(), E>`).
    type Error: HandlerFailure;

    /// Handles the deliveries as one batch: gate, body on the fresh messages, commit, then
    /// settle each delivery.
    fn handle_batch<'a>(
        &'a self,
        store: &'a Self::Store,
        deliveries: Vec<(Self::Message, Box<dyn DynAcknowledger + 'a>)>,
    ) -> BoxFuture<'a, BatchResults<Self::Error>>;
}

/// What a batch handler returns: one result per delivery, in the batch's order.
pub type BatchResults<E> = Vec<Result<Outcome<()>, Error<E>>>;

/// The types a [`FnBatchHandler`] handles, without owning any of them.
type BatchSignature<S, M, E> = fn(&S, M) -> E;

/// A [`BatchHandler`] made from a function: what [`batch_handler!`](crate::batch_handler!)
/// returns, or what you build from a closure for a batch method.
pub struct FnBatchHandler<S, M, E, F> {
    call: F,
    types: PhantomData<BatchSignature<S, M, E>>,
}

impl<S, M, E, F> std::fmt::Debug for FnBatchHandler<S, M, E, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FnBatchHandler")
            .field("message", &std::any::type_name::<M>())
            .finish_non_exhaustive()
    }
}

impl<S, M, E, F> FnBatchHandler<S, M, E, F>
where
    S: Backend,
    F: for<'a> Fn(&'a S, Vec<(M, Box<dyn DynAcknowledger + 'a>)>) -> BoxFuture<'a, BatchResults<E>>
        + Send
        + Sync
        + 'static,
{
    /// The batch handler that calls `call`.
    pub fn new(call: F) -> Self {
        Self {
            call,
            types: PhantomData,
        }
    }
}

impl<S, M, E, F> BatchHandler for FnBatchHandler<S, M, E, F>
where
    S: Backend,
    M: Send + 'static,
    E: HandlerFailure,
    F: for<'a> Fn(&'a S, Vec<(M, Box<dyn DynAcknowledger + 'a>)>) -> BoxFuture<'a, BatchResults<E>>
        + Send
        + Sync
        + 'static,
{
    type Store = S;
    type Message = M;
    type Error = E;

    fn handle_batch<'a>(
        &'a self,
        store: &'a S,
        deliveries: Vec<(M, Box<dyn DynAcknowledger + 'a>)>,
    ) -> BoxFuture<'a, BatchResults<E>> {
        (self.call)(store, deliveries)
    }
}

/// A `batch` `#[idempotent]` function as a [`BatchHandler`] value, by its path as you would
/// call it.
///
/// ```
/// use idem_runtime::handler::{BatchHandler as _, DynAcknowledger};
/// use idem_runtime::{idempotent, HandlerError, MemoryStore, MemoryTx, NoAck};
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("failed")]
/// struct AppError;
/// impl HandlerError for AppError {}
///
/// #[idempotent(key = "0", store = "memory", strategy = "dedup_table", scope = "doc.batch_handler_macro", batch)]
/// async fn on_paid(tx: &mut MemoryTx, msgs: &[(String,)]) -> Result<(), AppError> { Ok(()) }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let handler = idem_runtime::batch_handler!(on_paid);
/// let store = MemoryStore::new();
/// let batch = |ids: &[&str]| -> Vec<((String,), Box<dyn DynAcknowledger>)> {
///     ids.iter().map(|id| (((*id).to_owned(),), Box::new(NoAck) as Box<dyn DynAcknowledger>)).collect()
/// };
/// let results = handler.handle_batch(&store, batch(&["o-1", "o-2", "o-1"])).await;
/// assert!(results[0].as_ref().unwrap().is_processed());
/// assert!(results[2].as_ref().unwrap().is_duplicate());
/// # });
/// ```
#[macro_export]
macro_rules! batch_handler {
    ($($function:tt)+) => {
        $crate::handler::FnBatchHandler::new(|store, deliveries| {
            ::std::boxed::Box::pin($($function)+(store, deliveries))
                as $crate::handler::BoxFuture<'_, _>
        })
    };
}
