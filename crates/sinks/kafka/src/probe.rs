//! Whether the brokers answer, and if not, why: librdkafka reports a failed TLS
//! handshake or SASL login only to the client's error callback (the metadata request
//! itself just times out), so the probe keeps what that callback said.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, Producer as _, ProducerContext};
use sluice_core::ErrorKind;
use sluice_core::egress::Egress;

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
/// config block in the error. Under an egress policy every broker the cluster
/// advertises is checked too: the bootstrap brokers were checked when the pipeline
/// started, but the cluster names the brokers the producer then connects to.
pub async fn brokers_answer(config: ClientConfig, brokers: &str, key: &str, egress: Option<&Arc<Egress>>) -> Result<()> {
    let probe: BaseProducer<LastError> = config
        .create_with_context(LastError::default())
        .map_err(|e| KafkaSinkError::from_kafka(&format!("{key}: creating a Kafka client for {brokers}"), e))?;
    let (shown, key_owned) = (brokers.to_string(), key.to_string());
    let advertised = tokio::task::spawn_blocking(move || match probe.client().fetch_metadata(None, Duration::from_secs(10)) {
        Ok(md) => Ok(md.brokers().iter().map(|b| (b.host().to_string(), b.port())).collect::<Vec<_>>()),
        Err(e) => {
            // Error events reach the context only when the client's queue is served.
            probe.poll(Duration::from_millis(100));
            let said = probe.context().0.lock().unwrap().take();
            Err(failure(&shown, &key_owned, e, said))
        }
    })
    .await
    .map_err(|e| KafkaSinkError::with_source(ErrorKind::Transient, "Kafka metadata task failed", e))??;
    if let Some(policy) = egress {
        for (host, port) in advertised {
            let port = u16::try_from(port).unwrap_or_default();
            policy.resolve(&host, port).await.map_err(|m| {
                KafkaSinkError::new(
                    ErrorKind::Permanent,
                    format!("Kafka brokers {brokers} advertise broker {host}:{port}, where egress is refused: {m}"),
                )
            })?;
        }
    }
    Ok(())
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
