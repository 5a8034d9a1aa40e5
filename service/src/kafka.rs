//! The rdkafka client context every Kafka client of the pipeline is created with: librdkafka's
//! logs and client errors go to `tracing` (target `librdkafka`) instead of stderr.

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;

/// Routes librdkafka's logs and errors into `tracing`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TracingContext;

impl ClientContext for TracingContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        client_error(&error, reason);
    }
}

impl ConsumerContext for TracingContext {}

/// One librdkafka log line, at the matching `tracing` level. For contexts that add behaviour of
/// their own (statistics, rebalance hooks) and log like [`TracingContext`].
pub fn log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", fac, message),
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, message),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", fac, message)
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, message),
    }
}

/// A client-level error librdkafka reports (it retries by itself; this is for the operator).
/// Reaching the end of a partition, which a consumer asked to be told of, is not one.
pub fn client_error(error: &KafkaError, reason: &str) {
    if matches!(
        error.rdkafka_error_code(),
        Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
    ) {
        tracing::debug!(target: "librdkafka", %error, reason, "end of a partition");
        return;
    }
    tracing::warn!(target: "librdkafka", %error, reason, "client error");
}

/// A short-lived Kafka client that, when dropped, is closed on a thread of its own. Destroying a
/// librdkafka handle waits for its threads to end, about 0.1 s for a consumer here, which a caller
/// done with it (a start-up's read back, say) need not wait for. If no thread can be started, the
/// client is closed in place.
pub struct Detached<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> Detached<T> {
    pub fn new(client: T) -> Self {
        Detached(Some(client))
    }
}

impl<T: Send + 'static> std::ops::Deref for Detached<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // (Taken only by `drop`.)
        self.0
            .as_ref()
            .expect("a Detached client is there until dropped")
    }
}

impl<T: Send + 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        let Some(client) = self.0.take() else {
            return;
        };
        let closing = std::thread::Builder::new()
            .name("kafka-close".into())
            .spawn(move || drop(client));
        if let Err(error) = closing {
            tracing::debug!(%error, "no thread to close a Kafka client on: closed in place");
        }
    }
}

impl<T: Send + 'static> std::fmt::Debug for Detached<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detached").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{channel, Sender};
    use std::time::Duration;

    /// Tells, when dropped, the name of the thread it was dropped on.
    struct Probe(Sender<Option<String>>);

    impl Drop for Probe {
        fn drop(&mut self) {
            // (Should the send fail, the test's receive times out.)
            let _ = self
                .0
                .send(std::thread::current().name().map(str::to_owned));
        }
    }

    #[test]
    fn a_detached_client_is_dropped_on_a_thread_of_its_own() {
        let (tx, rx) = channel();
        drop(super::Detached::new(Probe(tx)));
        let on = rx.recv_timeout(Duration::from_secs(10)).expect("dropped");
        assert_eq!(on.as_deref(), Some("kafka-close"));
    }
}
