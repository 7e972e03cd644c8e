use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// A mirror error: one line for the person running it, and whether retrying can help.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct MirrorError {
    retry: bool,
    message: String,
}

impl MirrorError {
    /// Bad configuration or a state a person must fix: retrying cannot help.
    pub(crate) fn fatal(message: impl Into<String>) -> Self {
        Self { retry: false, message: message.into() }
    }

    /// A failure worth retrying (a server restarting, a timeout).
    pub(crate) fn retry(message: impl Into<String>) -> Self {
        Self { retry: true, message: message.into() }
    }

    /// Librdkafka errors: a broker that is down, restarting or slow is worth retrying;
    /// configuration, authorization and fencing errors are not.
    pub(crate) fn kafka(context: &str, e: &KafkaError) -> Self {
        use RDKafkaErrorCode as C;
        let fatal = matches!(
            e.rdkafka_error_code(),
            Some(
                C::TopicAuthorizationFailed
                    | C::ClusterAuthorizationFailed
                    | C::GroupAuthorizationFailed
                    | C::TransactionalIdAuthorizationFailed
                    | C::SaslAuthenticationFailed
                    | C::InvalidConfig
                    | C::InvalidReplicationFactor
                    | C::PolicyViolation
                    | C::InvalidTopic
                    | C::ProducerFenced
                    | C::Fenced
            )
        ) || matches!(e, KafkaError::ClientCreation(_) | KafkaError::ClientConfig(..));
        Self { retry: !fatal, message: format!("{context}: {e}") }
    }

    /// Whether the mirror should back off and try again (a broker restarting) rather
    /// than stop.
    pub fn is_retryable(&self) -> bool {
        self.retry
    }
}

pub type Result<T, E = MirrorError> = std::result::Result<T, E>;
