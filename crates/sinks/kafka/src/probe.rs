//! Whether the brokers answer, and if not, why: librdkafka reports a failed TLS
//! handshake or SASL login only to the client's error callback (the metadata request
//! itself just times out), so the probe keeps what that callback said.

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, Producer as _, ProducerContext};
use sluice_core::ErrorKind;

use crate::error::{KafkaSinkError, Result};

/// The first error librdkafka reported for the probe's client that says why (not the
/// "all brokers are down" that follows it).
#[derive(Default)]
struct LastError(Mutex<Option<(Option<RDKafkaErrorCode>, String)>>);

impl ClientContext for LastError {
    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        let mut said = self.0.lock().unwrap();
        if said.is_none() && code != Some(RDKafkaErrorCode::AllBrokersDown) {
            *said = Some((code, reason.to_string()));
        }
    }

    // The failure is returned as one line; librdkafka's own log lines would repeat it.
    fn log(&self, _: rdkafka::config::RDKafkaLogLevel, _: &str, _: &str) {}
}

impl ProducerContext for LastError {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// Fetches the cluster's metadata with `config` (within 10 s); `key` names the
/// config block in the error.
pub async fn brokers_answer(config: ClientConfig, brokers: &str, key: &str) -> Result<()> {
    let probe: BaseProducer<LastError> = config
        .create_with_context(LastError::default())
        .map_err(|e| KafkaSinkError::from_kafka(&format!("{key}: creating a Kafka client for {brokers}"), e))?;
    let (brokers, key) = (brokers.to_string(), key.to_string());
    tokio::task::spawn_blocking(move || {
        let Err(e) = probe.client().fetch_metadata(None, Duration::from_secs(10)) else { return Ok(()) };
        // Error events reach the context only when the client's queue is served.
        probe.poll(Duration::from_millis(100));
        let said = probe.context().0.lock().unwrap().take();
        Err(failure(&brokers, &key, e, said))
    })
    .await
    .map_err(|e| KafkaSinkError::with_source(ErrorKind::Transient, "Kafka metadata task failed", e))?
}

/// One line: what failed, from librdkafka's own words, and which settings to check.
fn failure(brokers: &str, key: &str, e: KafkaError, said: Option<(Option<RDKafkaErrorCode>, String)>) -> KafkaSinkError {
    let Some((code, reason)) = said else {
        return KafkaSinkError::with_source(
            ErrorKind::Transient,
            format!("Kafka brokers {brokers} did not answer: check {key}.brokers and that the brokers are up ({e})"),
            e,
        );
    };
    let reason = reason.lines().next().unwrap_or_default().to_string();
    let lower = reason.to_ascii_lowercase();
    let (kind, fix) = if code == Some(RDKafkaErrorCode::Authentication) || lower.contains("sasl") {
        (ErrorKind::Permanent, format!("check sasl.mechanism, sasl.username and sasl.password in {key}.properties"))
    } else if lower.contains("ssl") || lower.contains("certificate") || lower.contains("handshake") {
        (ErrorKind::Permanent, format!("check security.protocol and ssl.ca.location in {key}.properties"))
    } else {
        (ErrorKind::Transient, format!("check {key}.brokers and that the brokers are up"))
    };
    KafkaSinkError::with_source(kind, format!("Kafka brokers {brokers}: {reason}: {fix}"), e)
}
