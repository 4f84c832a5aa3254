//! Jobs as stored in Redis: ids, priorities, enqueue options, outcomes, and
//! the parsing of stored entries.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Value;

use super::error::RedisQueueError;

/// A job's id, unique within its queue: its class and the id of the stream
/// entry it was first enqueued as (`normal-1764500000000-0`); a job keeps
/// it when it is re-queued.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub(crate) String);

impl JobId {
    /// The id as text, as it appears in the output and dead-letter streams
    /// (field `job`).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for JobId {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for JobId {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// A job's priority class. Each class has its own stream; workers take from
/// them by weighted round robin, so a busy high class never starves the low
/// one (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Priority {
    /// Taken first: 4 of every 7 jobs when every class has work (default weights).
    High,
    /// The default class: 2 of every 7.
    #[default]
    Normal,
    /// Background work: 1 of every 7, and everything nobody else wants.
    Low,
}

impl Priority {
    pub(crate) const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// The class's name, as used in key names, labels and the dead-letter
    /// stream's `priority` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// 0, 1, 2 for high, normal, low.
    pub(crate) fn index(self) -> usize {
        match self {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }
    }

    pub(crate) fn from_index(i: i64) -> Option<Self> {
        match i {
            0 => Some(Priority::High),
            1 => Some(Priority::Normal),
            2 => Some(Priority::Low),
            _ => None,
        }
    }
}

/// How to enqueue one job: idempotency key, priority, deadline.
///
/// ```
/// use std::time::Duration;
/// use llm_resilience::redis::{Enqueue, Priority};
///
/// let opts = Enqueue::new()
///     .idempotency_key("order-42")
///     .priority(Priority::High)
///     .deadline_in(Duration::from_secs(300));
/// # let _ = opts;
/// ```
#[derive(Debug, Clone, Default)]
pub struct Enqueue {
    pub(crate) key: Option<String>,
    pub(crate) priority: Priority,
    pub(crate) deadline_ms: Option<u64>,
}

impl Enqueue {
    /// Normal priority, no key, no deadline.
    pub fn new() -> Self {
        Self::default()
    }

    /// Enqueue at most once per key (within the queue's
    /// `idempotency_ttl`): a second enqueue with the same key returns the
    /// first job's id and enqueues nothing.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The job's priority class.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// A job not started by this wall-clock time is not processed: it goes
    /// to the output stream as `expired`. A job still running at its
    /// deadline is cancelled and recorded as `expired` too.
    pub fn deadline(mut self, at: SystemTime) -> Self {
        self.deadline_ms = Some(unix_ms(at));
        self
    }

    /// [`deadline`](Self::deadline) at now plus `within` (saturating).
    pub fn deadline_in(self, within: Duration) -> Self {
        let at = SystemTime::now()
            .checked_add(within)
            .unwrap_or(UNIX_EPOCH + Duration::from_millis(u64::MAX / 2));
        self.deadline(at)
    }
}

/// Milliseconds since the Unix epoch, saturating at both ends.
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What became of a job, as recorded once per job id.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobOutcome<R> {
    /// The service answered; its response (in the output stream, status `ok`).
    Completed(R),
    /// The deadline passed before or while the job ran (output stream, status
    /// `expired`); the service's answer, if any, was dropped.
    Expired,
    /// The job is in the dead-letter stream: a permanent failure, too many
    /// deliveries, or a job that does not deserialize.
    DeadLettered {
        /// The last error, as text.
        error: String,
        /// How many times the job was delivered to a worker.
        deliveries: u32,
    },
}

/// The stored form of an outcome in a results hash: a completed job's
/// answer as it is (JSON, which never starts with `!`), `!expired`,
/// `!dead:<n>:<error>`; `None` for `!requeued:<entry>` (the job was
/// re-queued and has no outcome yet).
pub(crate) fn decode_outcome<'a>(
    job: &str,
    raw: &'a [u8],
) -> Result<Option<JobOutcome<&'a [u8]>>, RedisQueueError> {
    let bad = || RedisQueueError::malformed(format!("result of job {job}"), "unknown status");
    let Some(rest) = raw.strip_prefix(b"!") else {
        return Ok(Some(JobOutcome::Completed(raw)));
    };
    if rest.starts_with(b"requeued:") {
        return Ok(None);
    }
    if rest == b"expired" {
        return Ok(Some(JobOutcome::Expired));
    }
    let rest = rest.strip_prefix(b"dead:").ok_or_else(bad)?;
    let c = rest.iter().position(|&b| b == b':').ok_or_else(bad)?;
    let deliveries = std::str::from_utf8(&rest[..c])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok(Some(JobOutcome::DeadLettered {
        error: String::from_utf8_lossy(&rest[c + 1..]).into_owned(),
        deliveries,
    }))
}

/// How much enqueue time one results hash covers: a job's outcome is a
/// field of the hash of the 10 ms its id was made in (ids are
/// `<class>-<ms>-<seq>`; an id of any other form goes to hash 0). At a
/// hundred jobs a second or fewer that is about a hash per job; at high
/// rates a hash holds the jobs of 10 ms (a few hundred to a few thousand):
/// a small hash costs Redis less per write than a large one (its table
/// stays in cache and is rehashed in small steps), and there is no key or
/// TTL per job.
pub(crate) const RESULT_BUCKET_MS: u64 = 10;

/// The results hash (its number) that holds job `job`'s outcome.
pub(crate) fn result_bucket(job: &str) -> u64 {
    job.split('-')
        .nth(1)
        .and_then(|ms| ms.parse::<u64>().ok())
        .map_or(0, |ms| ms / RESULT_BUCKET_MS)
}

/// Key names of one queue. Every key carries the hash tag `{name}`, so a
/// queue lives in one Redis Cluster slot and its scripts stay legal there.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
    /// The class streams' names, made once (read on every take).
    streams: [String; 3],
}

impl Keys {
    pub(crate) fn new(name: &str) -> Self {
        let prefix = format!("llmq:{{{name}}}");
        Self {
            streams: Priority::ALL.map(|p| format!("{prefix}:jobs:{}", p.as_str())),
            prefix,
        }
    }
    pub(crate) fn stream(&self, p: Priority) -> &str {
        &self.streams[p.index()]
    }
    pub(crate) fn delayed(&self) -> String {
        format!("{}:delayed", self.prefix)
    }
    pub(crate) fn output(&self) -> String {
        format!("{}:output", self.prefix)
    }
    pub(crate) fn dead(&self) -> String {
        format!("{}:dead", self.prefix)
    }
    pub(crate) fn retried(&self) -> String {
        format!("{}:retried", self.prefix)
    }
    pub(crate) fn idempotency(&self, key: &str) -> String {
        format!("{}:idem:{key}", self.prefix)
    }
    /// The results hash of bucket `bucket` (see [`result_bucket`]).
    pub(crate) fn results(&self, bucket: u64) -> String {
        format!("{}:results:{bucket}", self.prefix)
    }
}

/// The consumer group every worker of every queue reads through.
pub(crate) const GROUP: &str = "llm-resilience";

/// One job as taken from a stream by a worker.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub(crate) class: Priority,
    pub(crate) entry: String,
    pub(crate) job: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) deadline_ms: Option<u64>,
    /// Deliveries so far, this one included.
    pub(crate) deliveries: u32,
    /// The error of the last failed delivery (`""` if none).
    pub(crate) last_error: String,
    /// Why the entry is not a valid job, if it is not.
    pub(crate) malformed: Option<String>,
    /// The entry names its job in a `job` field (a re-queued job, or a
    /// foreign entry), so the job may have had other entries before: its
    /// outcome is checked against the results hash, not only its entry's
    /// acknowledgement.
    pub(crate) named: bool,
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => std::str::from_utf8(bytes(other)?).ok()?.parse().ok(),
    }
}

/// Parses one `{class, entry id, fields, deliveries in the pending list}`
/// tuple as returned by the take script. An entry whose id or class cannot be
/// read is an error (it cannot even be acknowledged); anything else wrong is
/// reported in [`Delivery::malformed`] so the worker dead-letters it.
pub(crate) fn parse_delivery(v: Value) -> Result<Delivery, RedisQueueError> {
    let Value::Array(parts) = v else {
        return Err(RedisQueueError::malformed(
            "?",
            "take reply is not an array",
        ));
    };
    let Ok([class, entry, fields, pel]) = <[Value; 4]>::try_from(parts) else {
        return Err(RedisQueueError::malformed(
            "?",
            "take reply has the wrong arity",
        ));
    };
    let class = int(&class).and_then(Priority::from_index).ok_or_else(|| {
        RedisQueueError::malformed(
            bytes(&entry)
                .and_then(|b| std::str::from_utf8(b).ok())
                .unwrap_or("?"),
            "unknown class",
        )
    })?;
    let deliveries = int(&pel).and_then(|n| u32::try_from(n).ok()).unwrap_or(1);
    parse_entry(class, entry, fields, deliveries)
}

/// The id of the job that entry `entry` of `class`'s stream started
/// (`<class>-<entry id>`), made with one allocation: it is built for every
/// job enqueued and every job a worker reads.
pub(crate) fn job_id(class: Priority, entry: &str) -> String {
    let class = class.as_str();
    let mut id = String::with_capacity(class.len() + 1 + entry.len());
    id.push_str(class);
    id.push('-');
    id.push_str(entry);
    id
}

/// Parses one stream entry (`id`, `[field, value, ...]`) of `class`,
/// delivered `deliveries` times by the group so far (this one included).
pub(crate) fn parse_entry(
    class: Priority,
    entry: Value,
    fields: Value,
    deliveries: u32,
) -> Result<Delivery, RedisQueueError> {
    // The reply's strings are moved into the delivery, not copied.
    let entry = match entry {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
    .ok_or_else(|| RedisQueueError::malformed("?", "entry id is not text"))?;
    let mut d = Delivery {
        class,
        job: job_id(class, &entry),
        entry,
        payload: Vec::new(),
        deadline_ms: None,
        deliveries,
        last_error: String::new(),
        malformed: None,
        named: false,
    };
    let Value::Array(fields) = fields else {
        d.malformed = Some("fields are not an array".into());
        return Ok(d);
    };
    let (mut job, mut payload, mut prior) = (None, None, None);
    let mut fields = fields.into_iter();
    while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
        let (Some(k), Some(vb)) = (bytes(&k), bytes(&v)) else {
            continue;
        };
        match k {
            b"job" => job = std::str::from_utf8(vb).ok().map(str::to_owned),
            b"payload" => {
                payload = Some(match v {
                    Value::BulkString(b) => b,
                    other => bytes(&other).map(<[u8]>::to_vec).unwrap_or_default(),
                })
            }
            b"deadline" => {
                d.deadline_ms = std::str::from_utf8(vb).ok().and_then(|s| s.parse().ok())
            }
            b"n" => {
                prior = std::str::from_utf8(vb)
                    .ok()
                    .and_then(|s| s.parse::<u32>().ok())
            }
            b"err" => d.last_error = String::from_utf8_lossy(vb).into_owned(),
            _ => {}
        }
    }
    if let Some(p) = payload {
        d.payload = p;
    }
    // A first enqueue is a bare entry (its id names the job); a re-queued
    // one carries its job id and earlier deliveries.
    match job {
        Some(job) if !job.is_empty() => {
            d.job = job;
            d.named = true;
        }
        Some(_) => d.malformed = Some("field `job` is empty".into()),
        None => {}
    }
    d.deliveries = d.deliveries.saturating_add(prior.unwrap_or(0));
    if d.payload.is_empty() {
        d.malformed = Some("field `payload` missing".into());
    }
    if d.deadline_ms == Some(0) {
        d.deadline_ms = None;
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn a_job_id_is_its_class_and_entry_in_one_exact_allocation() {
        let id = job_id(Priority::High, "1700000000000-7");
        assert_eq!(id, "high-1700000000000-7");
        assert_eq!(id.capacity(), id.len());
    }

    #[test]
    fn parses_a_stored_job_and_counts_prior_deliveries() {
        let v = Value::Array(vec![
            Value::Int(2),
            b("1-0"),
            Value::Array(vec![
                b("job"),
                b("7"),
                b("payload"),
                b("{}"),
                b("deadline"),
                b("0"),
                b("n"),
                b("2"),
                b("err"),
                b("boom"),
            ]),
            Value::Int(1),
        ]);
        let d = parse_delivery(v).unwrap();
        assert_eq!(
            (d.class, d.job.as_str(), d.deliveries),
            (Priority::Low, "7", 3)
        );
        assert_eq!((d.deadline_ms, d.last_error.as_str()), (None, "boom"));
        assert!(d.malformed.is_none());
    }

    #[test]
    fn a_first_enqueue_is_named_by_its_entry() {
        let v = Value::Array(vec![
            Value::Int(1),
            b("9-0"),
            Value::Array(vec![b("payload"), b("{}")]),
            Value::Int(2),
        ]);
        let d = parse_delivery(v).unwrap();
        assert_eq!((d.job.as_str(), d.deliveries), ("normal-9-0", 2));
        assert!(d.malformed.is_none());
    }

    #[test]
    fn a_foreign_entry_is_reported_malformed_not_an_error() {
        let v = Value::Array(vec![
            Value::Int(0),
            b("5-1"),
            Value::Array(vec![b("hello"), b("world")]),
            Value::Int(1),
        ]);
        let d = parse_delivery(v).unwrap();
        assert_eq!(d.job, "high-5-1");
        assert!(d.malformed.is_some());
        assert!(parse_delivery(Value::Int(3)).is_err());
    }

    #[test]
    fn outcomes_round_trip_their_stored_form() {
        assert_eq!(
            decode_outcome("1", b"{\"a\":1}").unwrap(),
            Some(JobOutcome::Completed(&b"{\"a\":1}"[..]))
        );
        assert_eq!(
            decode_outcome("1", b"!expired").unwrap(),
            Some(JobOutcome::Expired)
        );
        assert_eq!(
            decode_outcome("1", b"!dead:3:bad: thing").unwrap(),
            Some(JobOutcome::DeadLettered {
                error: "bad: thing".into(),
                deliveries: 3
            })
        );
        assert_eq!(decode_outcome("1", b"!requeued:5-0").unwrap(), None);
        assert!(decode_outcome("1", b"!nonsense").is_err());
        assert!(decode_outcome("1", b"!dead:x:e").is_err());
    }

    #[test]
    fn a_jobs_results_hash_is_the_10_ms_of_its_id() {
        assert_eq!(result_bucket("normal-1764500000000-0"), 176_450_000_000);
        assert_eq!(result_bucket("high-9-3"), 0);
        assert_eq!(result_bucket("low-10-0"), 1);
        assert_eq!(result_bucket("404"), 0);
        assert_eq!(result_bucket("normal-x-0"), 0);
    }
}
