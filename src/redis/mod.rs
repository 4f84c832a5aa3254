//! A durable job queue on Redis Streams, for agent workers on any number of
//! machines (feature `redis`; Redis 7.0 or later); and circuit breakers
//! whose trips and half-open probes are shared across processes
//! ([`breaker`]).
//!
//! Producers [`enqueue`](JobQueue::enqueue_with) serde-serializable jobs and
//! get a [`JobId`]; [`Worker`]s in any number of processes take them through
//! one consumer group and run each through a tower `Service` (a whole
//! pipeline: retry, breaker, client); every job ends with exactly one
//! outcome, in the output stream (`ok` or `expired`) or the dead-letter
//! stream, which callers can [await by id](JobQueue::wait_for).
//!
//! ```no_run
//! use std::time::Duration;
//! use llm_resilience::redis::{Enqueue, JobOutcome, JobQueue, Priority, QueueConfig, Worker, WorkerConfig};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let queue = JobQueue::connect("redis://127.0.0.1:6379/", QueueConfig::builder("summaries").build()?).await?;
//!
//! // Any tower service of the job type; here a closure.
//! let service = tower::service_fn(|text: String| async move {
//!     Ok::<_, std::convert::Infallible>(text.len())
//! });
//! let worker = Worker::new(&queue, service, WorkerConfig::builder().max_in_flight(16).build()?)
//!     .spawn()
//!     .await?;
//!
//! let (id, _new) = queue
//!     .enqueue_with("some long text", &Enqueue::new().idempotency_key("doc-17").priority(Priority::High))
//!     .await?;
//! match queue.wait_for::<usize>(&id, Duration::from_secs(30)).await? {
//!     JobOutcome::Completed(len) => println!("{len}"),
//!     other => println!("{other:?}"),
//! }
//! worker.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Delivery: at least once, one outcome per job
//!
//! A job is delivered **at least once**: a worker acknowledges it only in
//! the same Lua script that writes its outcome (output or dead-letter
//! stream entry, the job's field in a results hash, `XACK`), so a worker
//! that dies at any point leaves the job pending in the group, and after
//! the worker's `visibility_timeout` another worker reclaims it
//! (`XAUTOCLAIM`) and runs it again. The service may therefore see a job
//! more than once (make side effects idempotent, e.g. with the job id); the
//! **output is written once per job id**: the script writes an outcome
//! only if the job's entry was still pending, so of two workers that ran a
//! reclaimed entry only the first to finish writes, and the second writes
//! nothing. (The script acknowledges a batch with one `XACK` per stream; if
//! the count falls short of the batch, each job is decided by what is
//! recorded for it: its outcome, or the re-queue of that very entry.) A job
//! has one pending entry at a time (a re-queue acknowledges the old entry
//! before the job comes back as a new one); an entry that names its job (a
//! re-queued job) is always checked against the job's recorded outcome.
//! Outcomes stay readable by id for at least `result_ttl` (default 24 h).
//!
//! With `appendonly yes` and `appendfsync always`, an enqueue or an outcome
//! that was answered `Ok` survives a Redis crash; with the default
//! `everysec`, up to a second of writes can be lost.
//!
//! # Failures, retries, dead letters
//!
//! The service's error is classified ([`default_classify`]: the crate's
//! `Permanent` and `BadRequest` errors are permanent, all else transient).
//! A transient failure (after the pipeline's own retries) re-queues the job
//! in a delayed set (sorted by due time) for `retry_delay` doubling per
//! delivery up to `max_retry_delay`; workers move due jobs back to their
//! stream (a busy worker looks at the due time of the first delayed job it
//! last saw, and at least every `idle_wait`). After `max_deliveries` deliveries, or on a permanent failure, the
//! job goes to the dead-letter stream with its last error. A crashed or
//! hung delivery counts too, so a job that kills its worker ends in dead
//! letters instead of killing every worker in turn. A stored entry that is
//! malformed, too large or does not deserialize into the job type is
//! dead-lettered at once: a poison job never blocks the stream.
//!
//! # Priorities and deadlines
//!
//! Each [`Priority`] class has its own stream. Each worker takes by
//! weighted round robin over its own turn counter (default weights 4:2:1):
//! when every class has work, of 7 jobs a worker takes 4 are high, 2
//! normal, 1 low; a turn whose class is empty goes to the others in
//! priority order. So the low class is never starved. A job past its deadline is not run: it is
//! recorded as `expired` in the output stream; a job still running at its
//! deadline is cancelled and recorded the same way.
//!
//! # Backpressure and shutdown
//!
//! A worker runs at most `max_in_flight` jobs and takes only as many jobs
//! as it has free slots, so what it cannot start stays in Redis for other
//! workers. A job's slot is free again once its outcome is queued for
//! writing (that queue holds at most `max_in_flight` outcomes, and one
//! script call writes up to 64 of them), so taking the next jobs overlaps
//! with writing the last ones' outcomes: a worker holds at most
//! `2 × max_in_flight + 64` jobs not yet acknowledged. The outcomes are
//! written on a connection of their own, and a batch of them is sent once
//! the worker has sent its next take (1 ms after the hand-off at most), so
//! the take is not queued behind them and Redis writes them while the
//! worker starts the jobs it took. A job is polled once in the worker's
//! loop before it gets a task of its own: a job whose service answers at
//! once ends there, without a task (CPU-heavy work in a service's first
//! poll therefore delays the worker's next take; spawn it if it is long). An idle worker blocks on
//! `XREAD` (a connection of its own too) and wakes on a new entry, on a due
//! delayed job, or after `idle_wait`.
//! [`WorkerHandle::shutdown`] stops taking, lets in-flight jobs finish
//! within `shutdown_grace`, and releases the rest to the queue without
//! counting their delivery.
//!
//! # Keys
//!
//! For a queue named `q`: streams `llmq:{q}:jobs:high|normal|low` (group
//! `llm-resilience`), `llmq:{q}:output`, `llmq:{q}:dead`; sorted set
//! `llmq:{q}:delayed`; hashes `llmq:{q}:results:<n>` (the outcomes of the
//! jobs whose ids were made in the `n`-th 10 ms since the Unix epoch, one
//! field per job id: at high rates a hash per few hundred or thousand jobs
//! instead of a key per job, which costs Redis less per job; a hash expires
//! `result_ttl` after its last write); strings `llmq:{q}:idem:<key>`,
//! `llmq:{q}:retried`. The hash tag `{q}`
//! keeps a queue in one Redis Cluster slot. Output entries have fields
//! `job`, `deliveries`, `status` (`ok` or `expired`) and `result` (the
//! answer as JSON); dead letters `job`, `deliveries`, `error`, `priority`,
//! `entry`, `payload`.
//!
//! # Errors
//!
//! [`RedisQueueError`]: an unreachable Redis or a bad URL (`Redis`, after
//! `connect_timeout` / `response_timeout`), a job that does not serialize or
//! is too large, a malformed stored entry, an answer that does not
//! deserialize, a wait that timed out. Workers never stop on a Redis error:
//! they report it ([`WorkerEvent::RedisError`]), back off (50 ms doubling to
//! 2 s) and go on; the connection reconnects by itself.
//!
//! # Metrics
//!
//! With the `metrics` feature: the counter `llm_resilience_redis_jobs_total`
//! labelled `queue` and `outcome` (the [`WorkerEvent::kind`] names:
//! `completed`, `expired`, `retried`, `dead_lettered`, `duplicate`,
//! `released`, `redis_error`); and from [`JobQueue::record_metrics`] the
//! gauges `llm_resilience_redis_queue_depth` and
//! `llm_resilience_redis_queue_pending` (labels `queue`, `priority`),
//! `llm_resilience_redis_queue_delayed`,
//! `llm_resilience_redis_queue_dead_letters` and
//! `llm_resilience_redis_queue_retried` (label `queue`).

pub mod breaker;
mod config;
mod error;
mod event;
mod job;
mod process;
mod producer;
pub mod ratelimit;
mod scripts;
mod take;
mod worker;
mod writer;

pub use config::{QueueConfig, QueueConfigBuilder, WorkerConfig, WorkerConfigBuilder};
pub use error::RedisQueueError;
pub use event::WorkerEvent;
pub use job::{Enqueue, JobId, JobOutcome, Priority};
pub use process::Failure;
pub use producer::{JobQueue, QueueStats};
pub use worker::{default_classify, Worker, WorkerHandle};
