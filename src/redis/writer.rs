//! A worker's outcome writer: the outcomes of jobs that finish while a
//! write is on its way are written together, in one script call, each still
//! atomic (output entry, done marker, acknowledgement).
//!
//! A job hands its outcome over and is done: the writer reports what became
//! of it ([`WorkerEvent`]) and, while Redis cannot be reached, retries the
//! batch (backing off) for up to the visibility timeout, after which other
//! workers reclaim those jobs anyway. So no job
//! task waits for its write, and nothing is allocated per job for a reply.
//!
//! A batch is sent once the worker has sent its next take (or after
//! [`TAKE_WAIT`] at most), not as soon as its outcomes are handed over.
//! Redis runs one command at a time: a batch sent at once runs before that
//! take, and the worker waits for the batch's writes before it gets its
//! next jobs. Sent after the take, the batch is written while the worker
//! starts those jobs (measured in the Redis benchmark: with one worker and
//! jobs that answer at once, about a fifth more jobs per second).

use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use super::error::RedisQueueError;
use super::event::{Events, WorkerEvent};
use super::job::{Keys, Priority, GROUP};
use super::scripts;

/// Most outcomes written by one script call.
const MAX_BATCH: usize = 64;
// A job's results-hash number is written as the byte `b'0' + n`, n <= MAX_BATCH.
const _: () = assert!(MAX_BATCH + b'0' as usize <= u8::MAX as usize);

/// How long a batch of outcomes waits at most for the worker's next take to
/// be sent. The take normally follows at once: a job's hand-off frees its
/// slot, and the worker takes as soon as a slot is free. It does not come
/// while the worker waits idle for new jobs or stops; then this is the most
/// an outcome waits before it is sent.
pub(crate) const TAKE_WAIT: Duration = Duration::from_millis(1);

/// The worker's takes, counted, so that the writer can wait for the next one
/// (see the module's docs).
#[derive(Debug, Default)]
pub(crate) struct Takes {
    sent: AtomicU64,
    notify: Notify,
}

impl Takes {
    /// A take was sent.
    pub(crate) fn sent(&self) {
        self.sent.fetch_add(1, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// The takes sent so far (stamped on each outcome at hand-off).
    pub(crate) fn count(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }

    /// Waits until more than `seen` takes have been sent (`true`), or for
    /// `limit` (`false`).
    pub(crate) async fn wait_past(&self, seen: u64, limit: Duration) -> bool {
        let deadline = tokio::time::sleep(limit);
        let mut deadline = pin!(deadline);
        loop {
            // Made before the count is read: `notify_waiters` reaches a
            // `Notified` from its creation on, so a take sent between the two
            // is not missed.
            let next = self.notify.notified();
            if self.count() > seen {
                return true;
            }
            tokio::select! {
                () = next => {}
                () = &mut deadline => return false,
            }
        }
    }
}

/// Retrying a write of outcomes while Redis does not answer: waits 20 ms,
/// doubling up to 1 s, and gives up once the next try would come `limit`
/// or more after the first (other workers may reclaim the job by then).
pub(crate) struct Retrying {
    first_try: Instant,
    backoff: Duration,
    limit: Duration,
}

impl Retrying {
    pub(crate) fn new(limit: Duration) -> Self {
        Self {
            first_try: Instant::now(),
            backoff: Duration::from_millis(20),
            limit,
        }
    }

    /// Waits before the next try; `false`: give up instead.
    pub(crate) async fn wait(&mut self) -> bool {
        if self.first_try.elapsed() + self.backoff >= self.limit {
            return false;
        }
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(1));
        true
    }
}

/// One outcome to record.
pub(crate) struct Outcome {
    pub(crate) class: Priority,
    /// The job's results hash ([`result_bucket`](super::job::result_bucket)).
    pub(crate) bucket: u64,
    pub(crate) entry: String,
    pub(crate) job: String,
    pub(crate) deliveries: u32,
    /// The entry named its job (see `Delivery::named`).
    pub(crate) named: bool,
    pub(crate) kind: Kind,
    /// The worker's takes sent when the outcome was handed over
    /// ([`Takes::count`]).
    pub(crate) takes: u64,
}

/// What an outcome writes.
pub(crate) enum Kind {
    /// A completed job: the script builds the output entry and the stored
    /// outcome from its answer (JSON).
    Completed(Vec<u8>),
    /// Any other outcome, to the output stream (expired) or, with an
    /// `error`, the dead-letter stream: the stored outcome and the entry's
    /// fields and values.
    Other {
        error: Option<String>,
        stored: Vec<u8>,
        fields: Vec<Vec<u8>>,
    },
}

/// What the writer needs besides its connection.
pub(crate) struct WriterConfig {
    pub(crate) keys: Keys,
    pub(crate) result_ttl_ms: u64,
    pub(crate) max_len: u64,
    /// A batch not written within this is given up (its jobs get
    /// reclaimed).
    pub(crate) give_up_after: Duration,
    pub(crate) events: Arc<Events>,
    /// The worker's takes, to send each batch after the next one.
    pub(crate) takes: Arc<Takes>,
}

/// The sending side, held by the worker's jobs.
#[derive(Debug, Clone)]
pub(crate) struct Writer(mpsc::Sender<Outcome>);

impl Writer {
    /// Starts the writer task; it ends, after writing what it holds, when
    /// every `Writer` clone is gone. Returns the task's handle so a crash
    /// (abort) can stop it too. The queue holds at most `capacity`
    /// outcomes.
    pub(crate) fn spawn(
        conn: ConnectionManager,
        config: WriterConfig,
        capacity: usize,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let task = tokio::spawn(run(conn, rx, config));
        (Self(tx), task)
    }

    /// Queues one outcome for writing; waits while the queue is full. When
    /// the writer has stopped (the worker is going away) the outcome is
    /// dropped: the job stays pending and gets reclaimed.
    pub(crate) async fn write(&self, outcome: Outcome) {
        let _ = self.0.send(outcome).await;
    }
}

async fn run(mut conn: ConnectionManager, mut rx: mpsc::Receiver<Outcome>, config: WriterConfig) {
    let fixed = [
        config.keys.stream(Priority::High).to_owned(),
        config.keys.stream(Priority::Normal).to_owned(),
        config.keys.stream(Priority::Low).to_owned(),
        config.keys.output(),
        config.keys.dead(),
    ];
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // The results hashes of one batch: a few at most (jobs enqueued close
    // together), so a list.
    let mut buckets: Vec<u64> = Vec::new();
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // After the worker's next take (see the module's docs); what comes
        // in meanwhile joins the batch.
        let seen = batch.iter().map(|o| o.takes).max().unwrap_or(0);
        let _ = config.takes.wait_past(seen, TAKE_WAIT).await;
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        // Each batch retries on its own schedule: one given up does not
        // leave the next one a long first wait.
        let mut retry = Retrying::new(config.give_up_after);
        loop {
            let cmd = finish_cmd(&batch, &fixed, &config, &mut buckets);
            let mut written: Result<Vec<i64>, redis::RedisError> = cmd.query_async(&mut conn).await;
            if matches!(&written, Err(e) if e.code() == Some("NOSCRIPT")) {
                // The server lost its scripts (a restart): load it, once.
                written = match scripts::FINISH_MANY.load_async(&mut conn).await {
                    Ok(_) => cmd.query_async(&mut conn).await,
                    Err(e) => Err(e),
                };
            }
            let error = match written {
                Ok(w) if w.len() == batch.len() => {
                    for (o, w) in batch.drain(..).zip(w) {
                        report(&config.events, &o, w == 1);
                    }
                    break;
                }
                Ok(_) => RedisQueueError::malformed("finish", "reply length"),
                Err(e) => {
                    config.events.emit(WorkerEvent::RedisError { error: &e });
                    e.into()
                }
            };
            // Not written: try again later, but not once other workers may
            // have reclaimed the jobs (the outcomes were queued before the
            // first try, so this gives up a little early, never late).
            if !retry.wait().await {
                for o in batch.drain(..) {
                    tracing::warn!(job = %o.job, error = %error, "redis queue: outcome not recorded; the job will be reclaimed");
                }
                break;
            }
        }
    }
}

/// The finish script's call for `batch` (see `scripts::FINISH_MANY`), as
/// one `EVALSHA` built in one buffer (a `ScriptInvocation` would allocate
/// every argument apart and copy them again).
fn finish_cmd(
    batch: &[Outcome],
    fixed: &[String; 5],
    config: &WriterConfig,
    buckets: &mut Vec<u64>,
) -> redis::Cmd {
    buckets.clear();
    for o in batch {
        if !buckets.contains(&o.bucket) {
            buckets.push(o.bucket);
        }
    }
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(scripts::FINISH_MANY.get_hash())
        .arg(fixed.len() + buckets.len());
    for k in fixed {
        cmd.arg(k);
    }
    for &b in buckets.iter() {
        cmd.arg(config.keys.results(b));
    }
    cmd.arg(GROUP).arg(config.result_ttl_ms).arg(config.max_len);
    for o in batch {
        // The hash's key number: `buckets` was collected from this batch,
        // so it is there, and with at most MAX_BATCH (64) hashes `b'0' +
        // hash` stays one byte.
        let hash = 1 + buckets
            .iter()
            .position(|&b| b == o.bucket)
            .expect("every job's results hash is among the batch's");
        // Kind, class, results hash, named: one argument (see the script).
        let kind = match &o.kind {
            Kind::Completed(_) => b'o',
            Kind::Other { error: None, .. } => b'x',
            Kind::Other { error: Some(_), .. } => b'd',
        };
        let header = [kind, b'1' + o.class.index() as u8, b'0' + hash as u8, b'r'];
        cmd.arg(&header[..if o.named { 4 } else { 3 }])
            .arg(&o.entry)
            .arg(&o.job);
        match &o.kind {
            Kind::Completed(answer) => {
                cmd.arg(o.deliveries).arg(answer.as_slice());
            }
            Kind::Other { stored, fields, .. } => {
                cmd.arg(stored.as_slice()).arg(fields.len());
                for f in fields {
                    cmd.arg(f.as_slice());
                }
            }
        }
    }
    cmd
}

fn report(events: &Events, o: &Outcome, written: bool) {
    let job = o.job.as_str();
    events.emit(match &o.kind {
        _ if !written => WorkerEvent::Duplicate { job },
        Kind::Completed(_) => WorkerEvent::Completed {
            job,
            deliveries: o.deliveries,
        },
        Kind::Other { error: None, .. } => WorkerEvent::Expired { job },
        Kind::Other {
            error: Some(error), ..
        } => WorkerEvent::DeadLettered {
            job,
            deliveries: o.deliveries,
            error,
        },
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_batch_waits_for_the_next_take_sent_or_the_limit() {
        let takes = Arc::new(Takes::default());
        let limit = Duration::from_secs(1);
        // A take sent since the hand-off: no wait.
        takes.sent();
        let t = Instant::now();
        assert!(takes.wait_past(0, limit).await);
        assert_eq!(t.elapsed(), Duration::ZERO);
        // None yet: it waits for the next one, and no longer.
        let seen = takes.count();
        let other = takes.clone();
        let take = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            other.sent();
        });
        let t = Instant::now();
        assert!(takes.wait_past(seen, limit).await);
        assert_eq!(t.elapsed(), Duration::from_millis(300));
        take.await.unwrap();
        // None at all: the limit.
        let t = Instant::now();
        assert!(!takes.wait_past(takes.count(), limit).await);
        assert_eq!(t.elapsed(), limit);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_take_sent_between_the_check_and_the_wait_is_not_missed() {
        // Each round, the other thread counts a take sent, right as this
        // one starts to wait: every wait must end by it, none at the limit.
        let takes = Arc::new(Takes::default());
        let round = Arc::new(AtomicU64::new(0));
        let (other, other_round) = (takes.clone(), round.clone());
        const ROUNDS: u64 = 20_000;
        let takes_sent = std::thread::spawn(move || {
            for r in 1..=ROUNDS {
                while other_round.load(Ordering::Acquire) < r {
                    std::hint::spin_loop();
                }
                other.sent();
            }
        });
        for r in 1..=ROUNDS {
            let seen = takes.count();
            round.store(r, Ordering::Release);
            assert!(
                takes.wait_past(seen, Duration::from_secs(10)).await,
                "round {r}: the take was missed"
            );
        }
        takes_sent.join().unwrap();
    }
}
