//! The harness's own side of the broker: declaring the topology, publishing (through restarts:
//! a publish that fails is retried on a new connection, as a producer would, which may itself
//! publish a copy), reading how much is left in flight, and reading or replaying the dead
//! letters as an operator would.
//!
//! The harness talks to the broker directly, not through the proxy it severs.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use idem_runtime::broker::nats::{REASON_HEADER as NATS_REASON, dead_letter_stream_name};
use idem_runtime::broker::rabbitmq::lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use idem_runtime::broker::rabbitmq::lapin::types::AMQPValue;
use idem_runtime::broker::rabbitmq::{REASON_HEADER as RABBITMQ_REASON, RabbitMqTopology, lapin};

use crate::{BoxError, BrokerKind, names};

/// A dead letter: the payload and the reason idem gave.
#[derive(Debug, Clone)]
pub(crate) struct DeadLetter {
    pub(crate) payload: Vec<u8>,
    pub(crate) reason: String,
}

pub(crate) struct Broker {
    kind: BrokerKind,
    url: String,
    /// The RabbitMQ node, for `rabbitmqctl`.
    node: String,
    rabbitmq: Option<(lapin::Connection, lapin::Channel)>,
    nats: Option<jetstream::Context>,
    /// Publishes that failed and were sent again.
    pub(crate) publish_retries: u64,
}

impl Broker {
    /// Connects and declares the work queue (or stream and durable consumer) and the
    /// dead-letter destination.
    pub(crate) async fn setup(
        kind: BrokerKind,
        url: String,
        node: String,
    ) -> Result<Self, BoxError> {
        let mut broker = Self {
            kind,
            url,
            node,
            rabbitmq: None,
            nats: None,
            publish_retries: 0,
        };
        match kind {
            BrokerKind::Rabbitmq => {
                let channel = broker.rabbitmq().await?;
                RabbitMqTopology::for_queue(names::QUEUE)?
                    .declare(&channel)
                    .await?;
            }
            BrokerKind::Nats => {
                let js = broker.nats().await?;
                let stream = js
                    .get_or_create_stream(jetstream::stream::Config {
                        name: names::STREAM.to_owned(),
                        subjects: vec![names::SUBJECT.to_owned()],
                        ..Default::default()
                    })
                    .await?;
                idem_runtime::broker::nats::ensure_dead_letter_stream(&js, names::STREAM).await?;
                stream
                    .get_or_create_consumer(
                        names::NATS_CONSUMER,
                        pull::Config {
                            durable_name: Some(names::NATS_CONSUMER.to_owned()),
                            ack_policy: AckPolicy::Explicit,
                            // A killed consumer's messages come back after this.
                            ack_wait: Duration::from_secs(5),
                            // No broker-side limit: idem's max_attempts dead-letters.
                            max_deliver: -1,
                            ..Default::default()
                        },
                    )
                    .await?;
            }
        }
        Ok(broker)
    }

    async fn rabbitmq(&mut self) -> Result<lapin::Channel, BoxError> {
        if let Some((connection, channel)) = &self.rabbitmq
            && connection.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let connection =
            lapin::Connection::connect(&self.url, lapin::ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        self.rabbitmq = Some((connection, channel.clone()));
        Ok(channel)
    }

    async fn nats(&mut self) -> Result<jetstream::Context, BoxError> {
        if let Some(js) = &self.nats {
            return Ok(js.clone());
        }
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(&self.url)
            .await?;
        let js = jetstream::new(client);
        self.nats = Some(js.clone());
        Ok(js)
    }

    /// Publishes `payload` to the work queue, durably, and waits for the broker's confirmation;
    /// on a failure (a restart), tries again on a new connection until it is confirmed.
    pub(crate) async fn publish(&mut self, payload: &[u8]) -> Result<(), BoxError> {
        let mut failures = 0_u32;
        loop {
            match self.publish_once(payload).await {
                Ok(()) => return Ok(()),
                Err(error) => {
                    failures += 1;
                    self.publish_retries += 1;
                    if failures > 600 {
                        return Err(format!("publishing failed 600 times: {error}").into());
                    }
                    self.rabbitmq = None;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn publish_once(&mut self, payload: &[u8]) -> Result<(), BoxError> {
        match self.kind {
            BrokerKind::Rabbitmq => {
                let channel = self.rabbitmq().await?;
                let confirmation = tokio::time::timeout(Duration::from_secs(10), async {
                    channel
                        .basic_publish(
                            "".into(),
                            names::QUEUE.into(),
                            BasicPublishOptions::default(),
                            payload,
                            lapin::BasicProperties::default().with_delivery_mode(2),
                        )
                        .await?
                        .await
                })
                .await??;
                if confirmation.is_ack() {
                    Ok(())
                } else {
                    Err("RabbitMQ did not confirm the publish".into())
                }
            }
            BrokerKind::Nats => {
                let js = self.nats().await?;
                tokio::time::timeout(Duration::from_secs(10), async {
                    js.publish(names::SUBJECT, payload.to_vec().into())
                        .await?
                        .await
                })
                .await??;
                Ok(())
            }
        }
    }

    /// Messages not yet settled: ready, unacknowledged or waiting in a retry queue (RabbitMQ),
    /// pending or awaiting an ack (JetStream). Dead letters are not counted.
    pub(crate) async fn in_flight(&mut self) -> Result<u64, BoxError> {
        match self.kind {
            BrokerKind::Rabbitmq => {
                let output = tokio::process::Command::new("rabbitmqctl")
                    .args([
                        "-n",
                        &self.node,
                        "-q",
                        "list_queues",
                        "--no-table-headers",
                        "name",
                        "messages_ready",
                        "messages_unacknowledged",
                    ])
                    .output()
                    .await?;
                if !output.status.success() {
                    return Err(format!(
                        "rabbitmqctl list_queues failed: {}",
                        String::from_utf8_lossy(&output.stderr)
                    )
                    .into());
                }
                let dead_letter_queue = RabbitMqTopology::for_queue(names::QUEUE)?
                    .dead_letter_queue()
                    .to_owned();
                let mut total = 0;
                for line in String::from_utf8_lossy(&output.stdout).lines() {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    if let [name, ready, unacked] = fields.as_slice()
                        && *name != dead_letter_queue
                    {
                        total += ready.parse::<u64>()? + unacked.parse::<u64>()?;
                    }
                }
                Ok(total)
            }
            BrokerKind::Nats => {
                let js = self.nats().await?;
                let mut consumer: jetstream::consumer::PullConsumer = js
                    .get_stream(names::STREAM)
                    .await?
                    .get_consumer(names::NATS_CONSUMER)
                    .await?;
                let info = consumer.info().await?;
                Ok(info.num_pending + u64::try_from(info.num_ack_pending)?)
            }
        }
    }

    /// Takes every dead letter off the dead-letter destination.
    pub(crate) async fn take_dead_letters(&mut self) -> Result<Vec<DeadLetter>, BoxError> {
        let mut letters = Vec::new();
        match self.kind {
            BrokerKind::Rabbitmq => {
                let channel = self.rabbitmq().await?;
                let topology = RabbitMqTopology::for_queue(names::QUEUE)?;
                while let Some(message) = channel
                    .basic_get(
                        topology.dead_letter_queue().into(),
                        BasicGetOptions { no_ack: false },
                    )
                    .await?
                {
                    let reason = match message
                        .delivery
                        .properties
                        .headers()
                        .as_ref()
                        .and_then(|headers| headers.inner().get(RABBITMQ_REASON))
                    {
                        Some(AMQPValue::LongString(reason)) => reason.to_string(),
                        _ => String::new(),
                    };
                    letters.push(DeadLetter {
                        payload: message.delivery.data.clone(),
                        reason,
                    });
                    message
                        .delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await?;
                }
            }
            BrokerKind::Nats => {
                let js = self.nats().await?;
                let mut stream = js
                    .get_stream(dead_letter_stream_name(names::STREAM))
                    .await?;
                let state = stream.info().await?.state.clone();
                if state.messages > 0 {
                    for sequence in state.first_sequence..=state.last_sequence {
                        let Ok(message) = stream.get_raw_message(sequence).await else {
                            continue;
                        };
                        let reason = message
                            .headers
                            .get(NATS_REASON)
                            .map(|value| value.as_str().to_owned())
                            .unwrap_or_default();
                        letters.push(DeadLetter {
                            payload: message.payload.to_vec(),
                            reason,
                        });
                    }
                    stream.purge().sequence(state.last_sequence + 1).await?;
                }
            }
        }
        Ok(letters)
    }
}
