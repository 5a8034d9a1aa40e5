//! What publishing fails with, and which failures a new producer can cure.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("creating the Kafka client failed")]
    Client(#[source] KafkaError),
    #[error("creating topic {topic} failed")]
    CreateTopic {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("reading the partitions of topic {topic} failed")]
    Metadata {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("Kafka did not accept a record")]
    Delivery(#[source] KafkaError),
    #[error("{action} the Kafka transaction failed")]
    Transaction {
        action: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("the producer went away before reporting a delivery")]
    Cancelled,
    #[error("reading {topic} [{partition}] back failed")]
    ReadBack {
        topic: String,
        partition: i32,
        #[source]
        source: KafkaError,
    },
    #[error("the committed position of {key} in {topic} is not readable: {value:?}")]
    Position {
        topic: String,
        key: String,
        value: String,
    },
}

/// True for errors that retrying with a fresh producer can cure (broker away, timeouts, leader
/// changes). An answer that will be the same next time (a record or request the broker refuses,
/// missing authorization, a bad topic name or setting) halts the reader with the error instead of
/// retrying forever; nothing past the last acknowledged position was confirmed.
pub fn is_transient(err: &PublishError) -> bool {
    match err {
        PublishError::Client(_) | PublishError::Position { .. } => false,
        PublishError::Cancelled => true,
        PublishError::Delivery(e)
        | PublishError::CreateTopic { source: e, .. }
        | PublishError::Metadata { source: e, .. }
        | PublishError::Transaction { source: e, .. }
        | PublishError::ReadBack { source: e, .. } => {
            // rdkafka gives no code for a failed admin operation; its code is inside.
            let code = match e {
                KafkaError::AdminOp(code) => Some(*code),
                e => e.rdkafka_error_code(),
            };
            !code.is_some_and(definite)
        }
    }
}

/// Broker answers that do not change by retrying.
fn definite(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::InvalidMessage
            | C::InvalidMessageSize
            | C::MessageBatchTooLarge
            | C::InvalidRecord
            | C::InvalidTopic
            | C::InvalidRequiredAcks
            | C::InvalidReplicationFactor
            | C::InvalidPartitions
            | C::InvalidConfig
            | C::PolicyViolation
            | C::UnsupportedForMessageFormat
            | C::UnsupportedCompressionType
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::Authentication
            | C::TransactionalIdAuthorizationFailed
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_answers_that_retrying_cannot_change_are_not_transient() {
        let delivery = |code| PublishError::Delivery(KafkaError::MessageProduction(code));
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::InvalidRecord,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::ClusterAuthorizationFailed,
        ] {
            assert!(!is_transient(&delivery(code)), "{code:?}");
        }
        let create = |code| PublishError::CreateTopic {
            topic: "t".to_owned(),
            source: KafkaError::AdminOp(code),
        };
        assert!(!is_transient(&create(RDKafkaErrorCode::PolicyViolation)));
        assert!(!is_transient(&create(
            RDKafkaErrorCode::InvalidReplicationFactor
        )));
        for code in [
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ] {
            assert!(is_transient(&delivery(code)), "{code:?}");
        }
        assert!(is_transient(&PublishError::Cancelled));
    }
}
