use sluice_core::ErrorKind;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error of the Kafka sink or the schema registry client: one line for the person
/// running the pipeline, and whether retrying can help.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct KafkaSinkError {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<BoxError>,
}

impl KafkaSinkError {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None }
    }

    pub(crate) fn with_source(kind: ErrorKind, message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self { kind, message: message.into(), source: Some(source.into()) }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Librdkafka errors: a broker that is down or restarting, or a full queue, is
    /// transient; configuration and authorization errors are not.
    pub(crate) fn from_kafka(context: &str, e: rdkafka::error::KafkaError) -> Self {
        use rdkafka::error::RDKafkaErrorCode as C;
        let code = e.rdkafka_error_code();
        let permanent = matches!(
            code,
            Some(
                C::TopicAuthorizationFailed
                    | C::ClusterAuthorizationFailed
                    | C::SaslAuthenticationFailed
                    | C::InvalidConfig
                    | C::InvalidReplicationFactor
                    | C::InvalidPartitions
                    | C::PolicyViolation
                    | C::MessageSizeTooLarge
                    | C::InvalidTopic
                    | C::UnknownTopicOrPartition
            )
        ) || matches!(e, rdkafka::error::KafkaError::ClientCreation(_) | rdkafka::error::KafkaError::ClientConfig(..));
        let kind = if permanent { ErrorKind::Permanent } else { ErrorKind::Transient };
        Self::with_source(kind, format!("{context}: {e}"), e)
    }
}

pub type Result<T, E = KafkaSinkError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A setting librdkafka refuses is the configuration's fault: retrying cannot help
    /// (it was retried every 10 s for good).
    #[tokio::test]
    async fn a_refused_client_setting_is_permanent() {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", "127.0.0.1:9").set("compression.type", "no-such-codec");
        let e = crate::probe::brokers_answer(config, "127.0.0.1:9", "sink.kafka", None).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Permanent, "{e}");
        assert!(e.to_string().contains("compression"), "{e}");
    }
}
