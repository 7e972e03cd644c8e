//! Whether the brokers answer, and if not, why: librdkafka reports a failed TLS
//! handshake or SASL login only to the client's error callback (the metadata request
//! itself just times out), so the probe keeps what that callback said. And where each
//! Kafka client may connect: [`Guarded`].

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, Producer as _, ProducerContext};
use sluice_core::ErrorKind;
use sluice_core::egress::{BrokerGuard, Egress};

use crate::error::{KafkaSinkError, Result};

/// The context of every Kafka client Sluice makes for a tenant's cluster (producers,
/// admin clients, consumers): under an egress policy, librdkafka connects only to
/// addresses the policy allows, checked on the address it resolved, just before it
/// connects (the patched rdkafka's connect hook, third_party/rdkafka/PATCHED.md). That
/// covers the brokers the cluster advertises and names that resolve elsewhere later,
/// which a check made before the client exists cannot.
/// A clone shares the refusals: keep one to read them from a client whose context is
/// wrapped (librdkafka's future producer).
#[derive(Debug, Default, Clone)]
pub struct Guarded(Arc<BrokerGuard>);

impl Guarded {
    /// `policy`: none lets the client connect anywhere (`sluice run`).
    pub fn new(policy: Option<&Arc<Egress>>) -> Self {
        Self(Arc::new(BrokerGuard::new(policy.cloned())))
    }

    /// The last broker connection the policy refused, one line.
    pub fn refusal(&self) -> Option<String> {
        self.0.refusal()
    }
}

impl ClientContext for Guarded {
    const CHECK_CONNECT: bool = true;

    fn allow_connect(&self, addr: SocketAddr, broker: &str) -> bool {
        let allowed = self.0.allow(addr, broker);
        if !allowed {
            tracing::warn!(broker, address = %addr, "egress refused a Kafka broker connection");
        }
        allowed
    }
}

impl rdkafka::consumer::ConsumerContext for Guarded {}

impl ProducerContext for Guarded {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// The probe's context: the guard, and the first error librdkafka reported that says
/// why (not the "all brokers are down" that follows it).
#[derive(Default)]
struct LastError {
    guard: Guarded,
    said: Mutex<Option<(Option<RDKafkaErrorCode>, String)>>,
}

impl ClientContext for LastError {
    const CHECK_CONNECT: bool = true;

    fn allow_connect(&self, addr: SocketAddr, broker: &str) -> bool {
        self.guard.allow_connect(addr, broker)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        let mut said = self.said.lock().unwrap();
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
        .create_with_context(LastError { guard: Guarded::new(egress), said: Mutex::default() })
        .map_err(|e| KafkaSinkError::from_kafka(&format!("{key}: creating a Kafka client for {brokers}"), e))?;
    let (shown, key_owned) = (brokers.to_string(), key.to_string());
    let advertised = tokio::task::spawn_blocking(move || match probe.client().fetch_metadata(None, Duration::from_secs(10)) {
        Ok(md) => Ok(md.brokers().iter().map(|b| (b.host().to_string(), b.port())).collect::<Vec<_>>()),
        Err(e) => {
            // Error events reach the context only when the client's queue is served.
            probe.poll(Duration::from_millis(100));
            if let Some(refusal) = probe.context().guard.refusal() {
                return Err(KafkaSinkError::new(ErrorKind::Permanent, format!("{key_owned}.brokers {shown}: {refusal}")));
            }
            let said = probe.context().said.lock().unwrap().take();
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
