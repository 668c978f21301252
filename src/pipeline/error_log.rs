//! Rate-limited logging of repeated client errors. While a Kafka broker is unreachable,
//! librdkafka reports an error on every poll and reconnect attempt (about 40 a second); logging
//! each one writes millions of lines a day. Instead the first error of an outage is logged, the
//! rest are counted (`glowwatch_kafka_client_errors_total`) and summarised at most once per
//! interval, and the recovery is logged once.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// What to log for one event (the decision, separate from the logging, for tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The first error after a healthy period: log it.
    First,
    /// Counted, not logged.
    Suppressed,
    /// An interval has passed: log a summary of the `n` errors suppressed since the last line.
    Summary {
        /// Errors suppressed since the last line.
        n: u64,
    },
    /// The first success after errors: log the recovery after `total` errors.
    Recovered {
        /// Errors during the outage.
        total: u64,
        /// How long it lasted.
        lasted: Duration,
    },
    /// A success with no outage in progress.
    Healthy,
}

#[derive(Debug)]
struct Outage {
    since: Instant,
    last_line: Instant,
    suppressed: u64,
    total: u64,
}

/// The state of one client's error stream.
#[derive(Debug)]
pub struct ErrorLog {
    interval: Duration,
    outage: Mutex<Option<Outage>>,
    /// Whether `outage` is set: successes (one per consumed message) read only this.
    in_outage: AtomicBool,
}

impl ErrorLog {
    /// At most one summary line per `interval` during an outage.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            outage: Mutex::new(None),
            in_outage: AtomicBool::new(false),
        }
    }

    /// Decides what an error at `now` logs.
    pub fn on_error(&self, now: Instant) -> Decision {
        let mut o = self.outage.lock().expect("error log");
        match o.as_mut() {
            None => {
                self.in_outage.store(true, Ordering::Release);
                *o = Some(Outage {
                    since: now,
                    last_line: now,
                    suppressed: 0,
                    total: 1,
                });
                Decision::First
            }
            Some(x) => {
                x.total += 1;
                x.suppressed += 1;
                if now.duration_since(x.last_line) >= self.interval {
                    let n = std::mem::take(&mut x.suppressed);
                    x.last_line = now;
                    Decision::Summary { n }
                } else {
                    Decision::Suppressed
                }
            }
        }
    }

    /// Decides what a success (a message, or a healthy poll) at `now` logs.
    pub fn on_success(&self, now: Instant) -> Decision {
        if !self.in_outage.load(Ordering::Acquire) {
            return Decision::Healthy;
        }
        let mut o = self.outage.lock().expect("error log");
        self.in_outage.store(false, Ordering::Release);
        match o.take() {
            Some(x) => Decision::Recovered {
                total: x.total,
                lasted: now.duration_since(x.since),
            },
            None => Decision::Healthy,
        }
    }

    /// Counts and logs an error of `client` as decided.
    pub fn error(&self, client: &str, what: &dyn std::fmt::Display) {
        metrics::counter!(super::metrics::KAFKA_CLIENT_ERRORS).increment(1);
        match self.on_error(Instant::now()) {
            Decision::First => warn!(
                client,
                "{what} (repeats are counted in glowwatch_kafka_client_errors_total and \
                 summarised every {:?})",
                self.interval
            ),
            Decision::Summary { n } => warn!(client, suppressed = n, "still failing: {what}"),
            _ => {}
        }
    }

    /// Logs the end of an outage, if one was in progress.
    pub fn success(&self, client: &str) {
        if let Decision::Recovered { total, lasted } = self.on_success(Instant::now()) {
            info!(client, errors = total, lasted = ?lasted, "recovered");
        }
    }
}

/// A librdkafka client context whose errors and warnings go through an [`ErrorLog`] (the
/// producer's; the consumer's context does the same in [`super::stream`]).
pub struct LimitedLogContext {
    /// Client name in log lines (`producer`, `consumer`).
    pub client: &'static str,
    /// The shared error state.
    pub errors: std::sync::Arc<ErrorLog>,
}

impl rdkafka::ClientContext for LimitedLogContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        log_librdkafka(&self.errors, self.client, level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.errors
            .error(self.client, &format_args!("{error}: {reason}"));
    }
}

/// librdkafka's log callback: warnings and worse through `errors`, the rest as tracing events.
pub fn log_librdkafka(
    errors: &ErrorLog,
    client: &'static str,
    level: rdkafka::config::RDKafkaLogLevel,
    fac: &str,
    message: &str,
) {
    use rdkafka::config::RDKafkaLogLevel as L;
    match level {
        L::Emerg | L::Alert | L::Critical | L::Error | L::Warning => {
            errors.error(client, &format_args!("librdkafka {fac}: {message}"))
        }
        L::Notice | L::Info => info!(client, "librdkafka {fac}: {message}"),
        L::Debug => tracing::debug!(client, "librdkafka {fac}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_logs_its_first_error_a_summary_per_interval_and_its_recovery() {
        let log = ErrorLog::new(Duration::from_secs(30));
        let t0 = Instant::now();
        assert_eq!(log.on_success(t0), Decision::Healthy);
        assert_eq!(log.on_error(t0), Decision::First);
        // 40 errors a second for a minute: two summary lines, nothing else.
        let mut lines = vec![];
        for i in 1..=2400u64 {
            let d = log.on_error(t0 + Duration::from_millis(25 * i));
            if d != Decision::Suppressed {
                lines.push(d);
            }
        }
        assert_eq!(
            lines,
            [Decision::Summary { n: 1200 }, Decision::Summary { n: 1200 }]
        );
        let d = log.on_success(t0 + Duration::from_secs(61));
        assert_eq!(
            d,
            Decision::Recovered {
                total: 2401,
                lasted: Duration::from_secs(61)
            }
        );
        assert_eq!(log.on_error(t0 + Duration::from_secs(62)), Decision::First);
    }
}
