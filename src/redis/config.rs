//! Validated settings of a queue (shared by its producers and workers) and
//! of one worker.

use std::time::Duration;

use crate::error::ConfigError;

/// The longest duration any setting accepts (one year): bounds every timer
/// and keeps millisecond arithmetic far from overflow.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn check_duration(field: &'static str, d: Duration, min: Duration) -> Result<(), ConfigError> {
    let rule = if min.is_zero() {
        "must be at most one year"
    } else {
        "must be from 1 ms to one year"
    };
    check_duration_in(field, d, min, MAX_DURATION, rule)
}

/// Checks that `d` is from `min` to `max`; `rule` is the error's message.
pub(crate) fn check_duration_in(
    field: &'static str,
    d: Duration,
    min: Duration,
    max: Duration,
    rule: &'static str,
) -> Result<(), ConfigError> {
    if d < min || d > max {
        return Err(ConfigError::new(field, rule));
    }
    Ok(())
}

/// Checks a name that goes into Redis keys or channels: 1 to `max` bytes,
/// no control characters and none of `banned` (a brace would move a key
/// out of its hash-tag slot); `rule` is the error's message.
pub(crate) fn check_name(
    field: &'static str,
    name: &str,
    max: usize,
    banned: &[char],
    rule: &'static str,
) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= max
        && !name.contains(banned)
        && !name.chars().any(char::is_control);
    if !ok {
        return Err(ConfigError::new(field, rule));
    }
    Ok(())
}

pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Settings of one queue, the same for its producers and workers.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub(crate) name: String,
    pub(crate) result_ttl: Duration,
    pub(crate) idempotency_ttl: Duration,
    pub(crate) output_max_len: u64,
    pub(crate) max_payload_bytes: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) response_timeout: Duration,
}

impl QueueConfig {
    /// The defaults for a queue of LLM jobs named `name`, already valid.
    pub fn llm_defaults(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            result_ttl: Duration::from_secs(24 * 3600),
            idempotency_ttl: Duration::from_secs(24 * 3600),
            output_max_len: 1_000_000,
            max_payload_bytes: 1 << 20,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
        }
    }

    /// A builder starting from [`llm_defaults`](Self::llm_defaults).
    pub fn builder(name: impl Into<String>) -> QueueConfigBuilder {
        QueueConfigBuilder(Self::llm_defaults(name))
    }

    /// The queue's name (part of every key).
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Builder of [`QueueConfig`].
#[derive(Debug, Clone)]
pub struct QueueConfigBuilder(QueueConfig);

impl QueueConfigBuilder {
    /// How long a job's outcome stays readable by id at least (default 24
    /// h): outcomes are kept in one hash per 10 ms of job ids, which
    /// expires this long after its last write. A re-queued job's entry is
    /// checked against its recorded outcome for as long.
    pub fn result_ttl(mut self, ttl: Duration) -> Self {
        self.0.result_ttl = ttl;
        self
    }

    /// How long an idempotency key keeps naming its job (default 24 h, as
    /// Stripe keeps its idempotency keys).
    pub fn idempotency_ttl(mut self, ttl: Duration) -> Self {
        self.0.idempotency_ttl = ttl;
        self
    }

    /// Approximate length at which the output and dead-letter streams are
    /// trimmed (`XADD MAXLEN ~`, default 1,000,000 entries), so Redis memory
    /// stays bounded when nobody reads them.
    pub fn output_max_len(mut self, len: u64) -> Self {
        self.0.output_max_len = len;
        self
    }

    /// Largest serialized job accepted by `enqueue` and by workers (default
    /// 1 MiB); a larger stored job is dead-lettered unread.
    pub fn max_payload_bytes(mut self, bytes: usize) -> Self {
        self.0.max_payload_bytes = bytes;
        self
    }

    /// Bound on one connection attempt (default 5 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.0.connect_timeout = d;
        self
    }

    /// Bound on one command's answer (default 5 s); an unreachable Redis
    /// then surfaces as [`RedisQueueError::Redis`](super::RedisQueueError::Redis)
    /// instead of a hang.
    pub fn response_timeout(mut self, d: Duration) -> Self {
        self.0.response_timeout = d;
        self
    }

    /// Checks every field.
    pub fn build(self) -> Result<QueueConfig, ConfigError> {
        let c = self.0;
        check_name(
            "name",
            &c.name,
            128,
            &['{', '}'],
            "must be 1 to 128 bytes without braces or control characters",
        )?;
        check_duration("result_ttl", c.result_ttl, Duration::from_millis(1))?;
        check_duration(
            "idempotency_ttl",
            c.idempotency_ttl,
            Duration::from_millis(1),
        )?;
        check_duration(
            "connect_timeout",
            c.connect_timeout,
            Duration::from_millis(1),
        )?;
        check_duration(
            "response_timeout",
            c.response_timeout,
            Duration::from_millis(1),
        )?;
        if c.output_max_len == 0 {
            return Err(ConfigError::new("output_max_len", "must be at least 1"));
        }
        if c.max_payload_bytes == 0 || c.max_payload_bytes > 512 << 20 {
            return Err(ConfigError::new(
                "max_payload_bytes",
                "must be between 1 and 512 MiB (Redis's largest string)",
            ));
        }
        Ok(c)
    }
}

/// Settings of one worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub(crate) consumer: Option<String>,
    pub(crate) max_in_flight: usize,
    pub(crate) visibility_timeout: Duration,
    pub(crate) job_timeout: Duration,
    pub(crate) max_deliveries: u32,
    pub(crate) retry_delay: Duration,
    pub(crate) max_retry_delay: Duration,
    pub(crate) weights: [u32; 3],
    pub(crate) idle_wait: Duration,
    pub(crate) shutdown_grace: Duration,
}

impl WorkerConfig {
    /// Defaults for LLM jobs, already valid: 8 jobs in flight, a visibility
    /// timeout of 15 minutes over a job timeout of 10 minutes (the OpenAI
    /// SDK's default request timeout), 5 deliveries at most (SQS's common
    /// redrive setting is 3 to 5), re-queue delays from 1 s doubling to 5
    /// min, priority weights 4:2:1, idle wait 1 s, shutdown grace 30 s.
    pub fn llm_defaults() -> Self {
        Self {
            consumer: None,
            max_in_flight: 8,
            visibility_timeout: Duration::from_secs(15 * 60),
            job_timeout: Duration::from_secs(10 * 60),
            max_deliveries: 5,
            retry_delay: Duration::from_secs(1),
            max_retry_delay: Duration::from_secs(300),
            weights: [4, 2, 1],
            idle_wait: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(30),
        }
    }

    /// A builder starting from [`llm_defaults`](Self::llm_defaults).
    pub fn builder() -> WorkerConfigBuilder {
        WorkerConfigBuilder(Self::llm_defaults())
    }

    /// The re-queue delay after `deliveries` failed deliveries: `retry_delay`
    /// doubling per delivery, capped at `max_retry_delay`.
    pub(crate) fn requeue_delay(&self, deliveries: u32) -> Duration {
        let shift = deliveries.saturating_sub(1).min(31);
        self.retry_delay
            .saturating_mul(1u32 << shift)
            .min(self.max_retry_delay)
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self::llm_defaults()
    }
}

/// Builder of [`WorkerConfig`].
#[derive(Debug, Clone)]
pub struct WorkerConfigBuilder(WorkerConfig);

impl WorkerConfigBuilder {
    /// The worker's consumer name in the group (default: host-free random
    /// `worker-<hex>`). Reuse a name only for the same worker restarting.
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.0.consumer = Some(name.into());
        self
    }

    /// Most jobs this worker runs at once (default 8). The worker reads only
    /// as many jobs as it has free slots; a slot is free again once the
    /// job's outcome is queued for writing.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.0.max_in_flight = n;
        self
    }

    /// How long a delivered job may stay unacknowledged before another
    /// worker reclaims it (default 15 min). Must exceed `job_timeout`.
    pub fn visibility_timeout(mut self, d: Duration) -> Self {
        self.0.visibility_timeout = d;
        self
    }

    /// Bound on one run of the service for one job (default 10 min); a job
    /// that takes longer counts as a transient failure.
    pub fn job_timeout(mut self, d: Duration) -> Self {
        self.0.job_timeout = d;
        self
    }

    /// Deliveries after which a job that keeps failing goes to the
    /// dead-letter stream (default 5).
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.0.max_deliveries = n;
        self
    }

    /// First re-queue delay after a transient failure (default 1 s), doubled
    /// per delivery up to [`max_retry_delay`](Self::max_retry_delay).
    pub fn retry_delay(mut self, d: Duration) -> Self {
        self.0.retry_delay = d;
        self
    }

    /// Longest re-queue delay (default 5 min).
    pub fn max_retry_delay(mut self, d: Duration) -> Self {
        self.0.max_retry_delay = d;
        self
    }

    /// Weighted round robin shares of high, normal and low (default 4, 2, 1):
    /// when every class has work, of each `h + n + l` jobs taken, `h` are
    /// high, `n` normal and `l` low. Each must be at least 1, so no class
    /// starves.
    pub fn priority_weights(mut self, high: u32, normal: u32, low: u32) -> Self {
        self.0.weights = [high, normal, low];
        self
    }

    /// How long an idle worker waits for new jobs before it looks for
    /// reclaimable or due ones again (default 1 s). New jobs wake it at once.
    pub fn idle_wait(mut self, d: Duration) -> Self {
        self.0.idle_wait = d;
        self
    }

    /// On shutdown, how long in-flight jobs may run to completion before
    /// they are released back to the queue (default 30 s).
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.0.shutdown_grace = d;
        self
    }

    /// Checks every field.
    pub fn build(self) -> Result<WorkerConfig, ConfigError> {
        let c = self.0;
        if c.max_in_flight == 0 || c.max_in_flight > 10_000 {
            return Err(ConfigError::new(
                "max_in_flight",
                "must be between 1 and 10000",
            ));
        }
        if c.max_deliveries == 0 {
            return Err(ConfigError::new("max_deliveries", "must be at least 1"));
        }
        if c.weights.iter().any(|&w| w == 0 || w > 1000) {
            return Err(ConfigError::new(
                "priority_weights",
                "must each be between 1 and 1000",
            ));
        }
        if let Some(name) = &c.consumer {
            check_name(
                "consumer",
                name,
                128,
                &[],
                "must be 1 to 128 bytes without control characters",
            )?;
        }
        let one_ms = Duration::from_millis(1);
        check_duration("visibility_timeout", c.visibility_timeout, one_ms)?;
        check_duration("job_timeout", c.job_timeout, one_ms)?;
        check_duration("retry_delay", c.retry_delay, Duration::ZERO)?;
        check_duration("max_retry_delay", c.max_retry_delay, Duration::ZERO)?;
        check_duration("idle_wait", c.idle_wait, one_ms)?;
        check_duration("shutdown_grace", c.shutdown_grace, Duration::ZERO)?;
        if c.job_timeout >= c.visibility_timeout {
            return Err(ConfigError::new(
                "job_timeout",
                "must be shorter than visibility_timeout (or running jobs get reclaimed)",
            ));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_typed_errors() {
        assert_eq!(QueueConfig::builder("").build().unwrap_err().field, "name");
        assert_eq!(
            QueueConfig::builder("a{b}").build().unwrap_err().field,
            "name"
        );
        let e = QueueConfig::builder("q")
            .result_ttl(Duration::MAX)
            .build()
            .unwrap_err();
        assert_eq!(e.field, "result_ttl");
        let e = WorkerConfig::builder()
            .max_in_flight(0)
            .build()
            .unwrap_err();
        assert_eq!(e.field, "max_in_flight");
        let e = WorkerConfig::builder()
            .job_timeout(Duration::from_secs(60))
            .visibility_timeout(Duration::from_secs(60))
            .build()
            .unwrap_err();
        assert_eq!(e.field, "job_timeout");
        let e = WorkerConfig::builder()
            .priority_weights(1, 0, 1)
            .build()
            .unwrap_err();
        assert_eq!(e.field, "priority_weights");
        assert!(WorkerConfig::builder().build().is_ok());
    }

    #[test]
    fn requeue_delay_doubles_and_saturates() {
        let c = WorkerConfig::llm_defaults();
        assert_eq!(c.requeue_delay(1), Duration::from_secs(1));
        assert_eq!(c.requeue_delay(3), Duration::from_secs(4));
        assert_eq!(c.requeue_delay(u32::MAX), Duration::from_secs(300));
    }
}
