//! The queue handle: connect, enqueue, await outcomes, read counts.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, ErrorKind, RedisError, Value};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::config::{ms, QueueConfig};
use super::error::RedisQueueError;
use super::job::{
    decode_outcome, job_id, result_bucket, Enqueue, JobId, JobOutcome, Keys, Priority, GROUP,
};
use super::scripts;

/// Opens a self-reconnecting connection. `response_timeout` bounds every
/// command's answer; the first connection attempt is bounded by the queue's
/// `connect_timeout`.
pub(crate) async fn connect(
    url: &str,
    config: &QueueConfig,
    response_timeout: Duration,
) -> Result<ConnectionManager, RedisQueueError> {
    let client = redis::Client::open(url)?;
    let cm_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1));
    match tokio::time::timeout(
        config.connect_timeout,
        ConnectionManager::new_with_config(client, cm_config),
    )
    .await
    {
        Ok(conn) => Ok(conn?),
        Err(_) => Err(RedisError::from((ErrorKind::Io, "connecting to redis timed out")).into()),
    }
}

/// Creates the consumer group on every class stream (idempotent).
pub(crate) async fn ensure_groups(
    conn: &mut ConnectionManager,
    keys: &Keys,
) -> Result<(), RedisQueueError> {
    for p in Priority::ALL {
        let r: Result<Value, RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(keys.stream(p))
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        match r {
            Ok(_) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A handle on one durable job queue: enqueue jobs, await their outcomes,
/// read its counts. Cheap to clone (clones share one connection).
///
/// See the [module docs](super) for the delivery guarantees.
#[derive(Clone)]
pub struct JobQueue {
    pub(crate) conn: ConnectionManager,
    pub(crate) keys: Keys,
    pub(crate) config: QueueConfig,
    pub(crate) url: String,
}

impl std::fmt::Debug for JobQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: never printed.
        f.debug_struct("JobQueue")
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

impl JobQueue {
    /// Connects to Redis at `url` (`redis://host:port/db`) and creates the
    /// queue's consumer group if it is missing.
    ///
    /// # Errors
    ///
    /// [`RedisQueueError::Redis`] for a bad URL or an unreachable server
    /// (after the queue's `connect_timeout`).
    pub async fn connect(url: &str, config: QueueConfig) -> Result<Self, RedisQueueError> {
        let mut conn = connect(url, &config, config.response_timeout).await?;
        let keys = Keys::new(&config.name);
        ensure_groups(&mut conn, &keys).await?;
        Ok(Self {
            conn,
            keys,
            config,
            url: url.to_owned(),
        })
    }

    /// The queue's settings.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Enqueues `job` at normal priority, without key or deadline.
    pub async fn enqueue<T: Serialize + ?Sized>(&self, job: &T) -> Result<JobId, RedisQueueError> {
        self.enqueue_with(job, &Enqueue::new())
            .await
            .map(|(id, _)| id)
    }

    /// Enqueues `job` with `options`, in one atomic step: one `XADD` to the
    /// class's stream, or with an idempotency key one script (check the key,
    /// append, set the key).
    /// Returns the job's id and whether it was enqueued now (`false`: the
    /// idempotency key already named this job, and nothing was enqueued).
    ///
    /// Once this returns `Ok`, the job is in Redis (on disk with
    /// `appendfsync always`) and will end in the output or dead-letter
    /// stream.
    pub async fn enqueue_with<T: Serialize + ?Sized>(
        &self,
        job: &T,
        options: &Enqueue,
    ) -> Result<(JobId, bool), RedisQueueError> {
        let payload =
            serde_json::to_vec(job).map_err(|source| RedisQueueError::Serialize { source })?;
        if payload.len() > self.config.max_payload_bytes {
            return Err(RedisQueueError::PayloadTooLarge {
                size: payload.len(),
                limit: self.config.max_payload_bytes,
            });
        }
        let class = options.priority;
        let Some(key) = &options.key else {
            // No key: one plain XADD, and the entry's id names the job.
            let mut cmd = redis::cmd("XADD");
            cmd.arg(self.keys.stream(class))
                .arg("*")
                .arg("payload")
                .arg(payload);
            if let Some(d) = options.deadline_ms {
                cmd.arg("deadline").arg(d);
            }
            let entry: String = cmd.query_async(&mut self.conn.clone()).await?;
            return Ok((JobId(job_id(class, &entry)), true));
        };
        let mut inv = scripts::ENQUEUE.prepare_invoke();
        inv.key(self.keys.stream(class))
            .key(self.keys.idempotency(key));
        inv.arg(payload)
            .arg(options.deadline_ms.unwrap_or(0))
            .arg(ms(self.config.idempotency_ttl))
            .arg(class.as_str());
        let (id, created): (String, i64) = inv.invoke_async(&mut self.conn.clone()).await?;
        Ok((JobId(id), created == 1))
    }

    /// The outcome of job `id` if one is recorded, `None` while it is queued
    /// or running (or after `result_ttl`).
    pub async fn outcome<R: DeserializeOwned>(
        &self,
        id: &JobId,
    ) -> Result<Option<JobOutcome<R>>, RedisQueueError> {
        let hash = self.keys.results(result_bucket(id.as_str()));
        let raw: Option<Vec<u8>> = self.conn.clone().hget(hash, id.as_str()).await?;
        let Some(raw) = raw else { return Ok(None) };
        let Some(outcome) = decode_outcome(id.as_str(), &raw)? else {
            // Re-queued: no outcome yet.
            return Ok(None);
        };
        let outcome = match outcome {
            JobOutcome::Completed(bytes) => {
                JobOutcome::Completed(serde_json::from_slice(bytes).map_err(|source| {
                    RedisQueueError::Deserialize {
                        job: id.to_string(),
                        source,
                    }
                })?)
            }
            JobOutcome::Expired => JobOutcome::Expired,
            JobOutcome::DeadLettered { error, deliveries } => {
                JobOutcome::DeadLettered { error, deliveries }
            }
        };
        Ok(Some(outcome))
    }

    /// Waits up to `timeout` for job `id`'s outcome, polling its field in the queue's results hash
    /// (every 2 ms at first, backing off to every 100 ms).
    ///
    /// # Errors
    ///
    /// [`RedisQueueError::WaitTimedOut`] when no outcome is recorded in time
    /// (the job is still queued, delayed or running); Redis errors as they
    /// come, except that a failed poll is retried until the timeout.
    pub async fn wait_for<R: DeserializeOwned>(
        &self,
        id: &JobId,
        timeout: Duration,
    ) -> Result<JobOutcome<R>, RedisQueueError> {
        let start = tokio::time::Instant::now();
        let mut every = Duration::from_millis(2);
        loop {
            match self.outcome(id).await {
                Ok(Some(o)) => return Ok(o),
                Ok(None) => {}
                Err(RedisQueueError::Redis { source }) if start.elapsed() < timeout => {
                    tracing::debug!(error = %source, "redis queue: polling an outcome failed");
                }
                Err(e) => return Err(e),
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(RedisQueueError::WaitTimedOut {
                    job: id.to_string(),
                    waited: timeout,
                });
            }
            tokio::time::sleep(every.min(left)).await;
            every = (every * 2).min(Duration::from_millis(100));
        }
    }

    /// The queue's counts, read in one round trip.
    pub async fn stats(&self) -> Result<QueueStats, RedisQueueError> {
        let mut pipe = redis::pipe();
        for p in Priority::ALL {
            pipe.cmd("XINFO").arg("GROUPS").arg(self.keys.stream(p));
        }
        pipe.cmd("ZCARD").arg(self.keys.delayed());
        pipe.cmd("XLEN").arg(self.keys.output());
        pipe.cmd("XLEN").arg(self.keys.dead());
        pipe.cmd("GET").arg(self.keys.retried());
        let v: Vec<Value> = pipe.query_async(&mut self.conn.clone()).await?;
        let int = |v: &Value| -> Option<u64> {
            match v {
                Value::Int(i) => u64::try_from(*i).ok(),
                Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
                Value::Nil => Some(0),
                _ => None,
            }
        };
        let bad = |what: &str| RedisQueueError::malformed("stats", what.to_owned());
        if v.len() != 7 {
            return Err(bad("unexpected reply length"));
        }
        let mut s = QueueStats::default();
        for (i, groups) in v[..3].iter().enumerate() {
            // XINFO GROUPS: one flat field/value array per group; `lag` is
            // the number of entries not yet delivered (Redis 7).
            let Value::Array(groups) = groups else {
                return Err(bad("XINFO GROUPS is not an array"));
            };
            for g in groups {
                let Value::Array(kv) = g else { continue };
                let field = |name: &str| {
                    kv.chunks(2).find_map(|c| match c {
                        [Value::BulkString(k), v] if k == name.as_bytes() => Some(v),
                        [Value::SimpleString(k), v] if k == name => Some(v),
                        _ => None,
                    })
                };
                let ours =
                    matches!(field("name"), Some(Value::BulkString(n)) if n == GROUP.as_bytes());
                if !ours {
                    continue;
                }
                s.pending[i] = field("pending")
                    .and_then(int)
                    .ok_or_else(|| bad("no pending"))?;
                s.depth[i] = field("lag").and_then(int).ok_or_else(|| bad("no lag"))?;
            }
        }
        let [delayed, output, dead, retried] = &v[3..] else {
            return Err(bad("unexpected reply length"));
        };
        s.delayed = int(delayed).unwrap_or(0);
        s.output = int(output).unwrap_or(0);
        s.dead_letters = int(dead).unwrap_or(0);
        s.retried = int(retried).unwrap_or(0);
        Ok(s)
    }
    /// Reads [`stats`](Self::stats) and sets them as gauges (see the module
    /// docs for the names), labelled `queue` = the queue's name.
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub async fn record_metrics(&self) -> Result<QueueStats, RedisQueueError> {
        let s = self.stats().await?;
        super::event::record_stats(&self.config.name, &s);
        Ok(s)
    }
}

/// A queue's counts at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Jobs waiting to be taken, per class (high, normal, low).
    pub depth: [u64; 3],
    /// Jobs taken by a worker and not yet finished, per class.
    pub pending: [u64; 3],
    /// Jobs waiting out a re-queue delay.
    pub delayed: u64,
    /// Entries in the output stream (trimmed at `output_max_len`).
    pub output: u64,
    /// Entries in the dead-letter stream (trimmed at `output_max_len`).
    pub dead_letters: u64,
    /// Re-queues after a transient failure, since the queue was created.
    pub retried: u64,
}

impl QueueStats {
    /// Waiting jobs over every class, delayed ones included.
    pub fn total_depth(&self) -> u64 {
        self.depth.iter().sum::<u64>() + self.delayed
    }
}
