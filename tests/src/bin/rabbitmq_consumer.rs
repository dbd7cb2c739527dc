//! A service's own RabbitMQ consumer loop, as a separate process for the `broker_rabbitmq`
//! kill test: it consumes `IDEM_RMQ_QUEUE` with a [`RabbitMqAcknowledger`] per delivery and
//! calls the handler (scope `rmq.kill`), and aborts the process inside `ack()` (after the
//! commit, before the ack reaches the broker) for the message whose `order_id` is
//! `IDEM_RMQ_ABORT_ON`.

use futures_util::StreamExt as _;
use idem_runtime::broker::rabbitmq::lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use idem_runtime::broker::rabbitmq::lapin::types::FieldTable;
use idem_runtime::broker::rabbitmq::{
    RabbitMqAcknowledger, RabbitMqError, RabbitMqTopology, lapin,
};
use idem_runtime::{Acknowledger, Committed, DeadLetter, PgTx, Requeue, idempotent};
use idem_tests::effects::Effects as _;
use idem_tests::{AppError, Payment};

#[idempotent(
    key = "order_id",
    store = "pg",
    strategy = "dedup_table",
    scope = "rmq.kill"
)]
async fn on_kill(tx: &mut PgTx<'_>, msg: Payment) -> Result<(), AppError> {
    tx.ledger(&msg.order_id, msg.amount).await
}

/// Aborts the process in `ack()` when told to: a consumer that dies between commit and ack.
struct AbortingAck {
    inner: RabbitMqAcknowledger,
    abort: bool,
}

impl Acknowledger for AbortingAck {
    type Error = RabbitMqError;

    fn attempt(&self) -> Option<u32> {
        self.inner.attempt()
    }
    fn message_id(&self) -> Option<&str> {
        self.inner.message_id()
    }
    async fn ack(self, proof: Committed) -> Result<(), RabbitMqError> {
        if self.abort {
            eprintln!("rabbitmq_consumer: committed; aborting before the ack");
            std::process::abort();
        }
        self.inner.ack(proof).await
    }
    async fn requeue(self, requeue: Requeue) -> Result<(), RabbitMqError> {
        self.inner.requeue(requeue).await
    }
    async fn dead_letter(self, letter: DeadLetter<'_>) -> Result<(), RabbitMqError> {
        self.inner.dead_letter(letter).await
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let queue = std::env::var("IDEM_RMQ_QUEUE")?;
    let abort_on = std::env::var("IDEM_RMQ_ABORT_ON")?;
    let url = std::env::var("IDEM_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let store = idem_tests::pg::store().await;
    let connection =
        lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel.basic_qos(1, BasicQosOptions::default()).await?;
    let topology = RabbitMqTopology::for_queue(&queue)?;
    topology.declare(&channel).await?;
    let mut deliveries = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    while let Some(delivery) = deliveries.next().await {
        let delivery = delivery?;
        let msg: Payment = serde_json::from_slice(&delivery.data)?;
        let abort = msg.order_id == abort_on;
        let inner = RabbitMqAcknowledger::new(delivery, channel.clone(), topology.clone());
        let outcome = on_kill(&store, msg, AbortingAck { inner, abort }).await?;
        eprintln!("rabbitmq_consumer: {outcome:?}");
    }
    Ok(())
}
