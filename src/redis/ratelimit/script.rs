//! The fleet limiter's state on the Redis server: the two Lua scripts that
//! decide and settle atomically (one per decision), and the connection
//! they run on.
//!
//! Time is the server's (`TIME`, in microseconds), so the clients' clocks
//! do not matter. Every number passed back to Redis is formatted with
//! `%.0f` (Lua's default `%.14g` would round a microsecond timestamp).

use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, Script};
use tokio::sync::OnceCell;

/// Shared by both scripts. `KEYS` = state hash, then per dimension (1 =
/// requests, 2 = tokens) a sorted set of log slots (score: the slot's latest
/// admission) and a hash of their costs. `ARGV[1..6]` = window (µs), request
/// limit and burst, token limit and burst (a limit of 0: not limited), and
/// how long the log holds a call (µs: the window plus the send margin).
///
/// Per dimension: a GCRA (`tat`: the theoretical arrival time; interval
/// `window / limit`) paces calls with a bucket of `burst` units, and a log of
/// at most ~128 slots (window / 128 each) keeps the exact count of what was
/// admitted in the last window (`tot`). A slot's score is its latest
/// admission, so it leaves the window no earlier than any call in it.
const PRELUDE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[1])
local hold = tonumber(ARGV[6])
local gran = math.max(math.floor(window / 128), 1)
local st = KEYS[1]
local function fmt(x) return string.format('%.0f', x) end
local saved = redis.call('HMGET', st, 'lim1', 'tat1', 'tot1', 'lim2', 'tat2', 'tot2', 'paused')
local paused = tonumber(saved[7] or 0)
local function dim(i, limit, burst)
  limit = tonumber(limit)
  if limit <= 0 then return nil end
  burst = tonumber(burst)
  local d = {i = i, log = KEYS[2 * i], cost = KEYS[2 * i + 1], cfg = limit, cfg_burst = burst}
  local eff = tonumber(saved[3 * i - 2] or limit)
  if eff > limit or eff < 1 then eff = limit end
  d.limit = eff
  d.burst = math.min(burst, eff)
  d.iv = window / eff
  d.tat = tonumber(saved[3 * i - 1] or 0)
  d.total = tonumber(saved[3 * i] or 0)
  local old = redis.call('ZRANGEBYSCORE', d.log, '-inf', fmt(now - hold))
  if #old > 0 then
    for _, s in ipairs(old) do
      d.total = d.total - tonumber(redis.call('HGET', d.cost, s) or 0)
    end
    redis.call('HDEL', d.cost, unpack(old))
    redis.call('ZREMRANGEBYSCORE', d.log, '-inf', fmt(now - hold))
  end
  if d.total < 0 then d.total = 0 end
  return d
end
local function save(r, k)
  local args = {}
  for _, d in ipairs({r or false, k or false}) do
    if d then
      args[#args + 1] = 'tat' .. d.i
      args[#args + 1] = fmt(math.ceil(d.tat))
      args[#args + 1] = 'tot' .. d.i
      args[#args + 1] = fmt(d.total)
    end
  end
  if #args > 0 then redis.call('HSET', st, unpack(args)) end
end
-- A new slot outlives every call it will hold: it expires (key TTL) no
-- sooner than a slot's length plus the hold after its first call.
local slot_ms = fmt(math.ceil((hold + gran) / 1000) + 1000)
local function charge(d, c, slot)
  if c <= 0 then return end
  d.tat = math.max(d.tat, now) + c * d.iv
  d.total = d.total + c
  local new = redis.call('ZADD', d.log, fmt(now), fmt(slot))
  redis.call('HINCRBY', d.cost, fmt(slot), fmt(c))
  if new == 1 then
    redis.call('PEXPIRE', d.log, slot_ms)
    redis.call('PEXPIRE', d.cost, slot_ms)
  end
end
local function keep(r, k)
  local horizon = math.max(now + hold, paused)
  for _, d in ipairs({r or false, k or false}) do
    if d then horizon = math.max(horizon, d.tat + hold) end
  end
  redis.call('PEXPIRE', st, fmt(math.ceil((horizon - now) / 1000) + 1000))
end
local r = dim(1, ARGV[2], ARGV[3])
local k = dim(2, ARGV[4], ARGV[5])
"#;

/// One admission decision. `ARGV[7]` = the call's tokens. Returns `{1,
/// slot}` (admitted and charged), `{0, wait µs}` (not before then), or
/// `{-1, 0}` (the cost exceeds the limit itself: never).
const ADMIT: &str = r#"
local c = tonumber(ARGV[7])
local function earliest(d, cost)
  if cost <= 0 then return now end
  if cost > d.limit then return nil end
  local at = now
  local tat = math.max(d.tat, now)
  if cost <= d.burst then
    at = math.max(at, tat - (d.burst - cost) * d.iv)
  else
    at = math.max(at, tat)
  end
  if d.total + cost > d.limit then
    local need = d.total + cost - d.limit
    local entries = redis.call('ZRANGE', d.log, 0, -1, 'WITHSCORES')
    local found = false
    for j = 1, #entries, 2 do
      need = need - tonumber(redis.call('HGET', d.cost, entries[j]) or 0)
      if need <= 0 then
        at = math.max(at, tonumber(entries[j + 1]) + hold)
        found = true
        break
      end
    end
    if not found then at = math.max(at, now + hold) end
  end
  return math.ceil(at)
end
local at = now
if paused > at then at = paused end
local never = false
if r then
  local e = earliest(r, 1)
  if e then at = math.max(at, e) else never = true end
end
if k then
  local e = earliest(k, c)
  if e then at = math.max(at, e) else never = true end
end
if never then
  save(r, k)
  return {-1, 0}
end
if at <= now then
  local slot = math.floor(now / gran)
  if r then charge(r, 1, slot) end
  if k then charge(k, c, slot) end
  save(r, k) keep(r, k)
  return {1, slot}
end
save(r, k)
return {0, at - now}
"#;

/// Settles an admitted call. `ARGV[7]` = its slot, `[8]` = requests to give
/// back (0 or 1), `[9]` = tokens to give back (negative: charge more, now),
/// `[10..13]` = the server's request limit (scaled to our window) and
/// remaining, token limit and remaining (-1: not said), `[14]` = 1 for a
/// 429, `[15]` = its wait hint in µs (-1: none; a 429 without one takes
/// the burst away). Returns `{1 if the server's headers lowered the
/// budget, µs of a pause that this call started (0: none)}`.
const SETTLE: &str = r#"
local slot = ARGV[7]
local function refund(d, x)
  if not d or x <= 0 then return end
  local have = tonumber(redis.call('HGET', d.cost, slot) or -1)
  if have > 0 then
    local back = math.min(x, have)
    redis.call('HINCRBY', d.cost, slot, fmt(-back))
    d.total = math.max(d.total - back, 0)
  end
  d.tat = d.tat - x * d.iv
end
local lowered = 0
local function steer(d, lim, rem)
  if not d then return end
  if lim >= 0 then
    local eff = math.min(math.max(lim, 1), d.cfg)
    if eff < d.limit then lowered = 1 end
    if eff ~= d.limit then
      d.limit = eff
      d.burst = math.min(d.cfg_burst, eff)
      d.iv = window / eff
      redis.call('HSET', st, 'lim' .. d.i, fmt(eff))
    end
  end
  if rem >= 0 and rem < d.burst then
    local floor = now + (d.burst - rem) * d.iv
    if floor > d.tat then
      d.tat = floor
      lowered = 1
    end
  end
end
refund(r, tonumber(ARGV[8]))
local x = tonumber(ARGV[9])
if x > 0 then
  refund(k, x)
elseif x < 0 and k then
  charge(k, -x, math.floor(now / gran))
end
steer(r, tonumber(ARGV[10]), tonumber(ARGV[11]))
steer(k, tonumber(ARGV[12]), tonumber(ARGV[13]))
local started = 0
if ARGV[14] == '1' then
  local hint = tonumber(ARGV[15])
  if hint >= 0 then
    local untl = now + hint
    if untl > paused then
      if paused <= now then started = hint end
      paused = untl
      redis.call('HSET', st, 'paused', fmt(untl))
    end
  else
    for _, d in ipairs({r or false, k or false}) do
      if d then d.tat = math.max(d.tat, now + d.burst * d.iv) end
    end
  end
end
save(r, k) keep(r, k)
return {lowered, started}
"#;

static ADMIT_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{PRELUDE}{ADMIT}")));
static SETTLE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{PRELUDE}{SETTLE}")));

/// The answer of one admission script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Admitted and charged, in this log slot.
    Granted(i64),
    /// Not before this long.
    Wait(Duration),
    /// The cost exceeds the limit itself.
    Never,
}

/// What a finished call settles.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Settle {
    pub(crate) requests_back: u64,
    /// Tokens given back (negative: charged on top).
    pub(crate) tokens_back: i64,
    /// The server's request and token limits (scaled to our window) and
    /// remaining budgets.
    pub(crate) server: [Option<u64>; 4],
    /// A 429, with its wait hint.
    pub(crate) throttled: Option<Option<Duration>>,
}

/// The limits the scripts enforce: window (µs), request limit and burst,
/// token limit and burst (0: none), and how long the log holds a call
/// (µs).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) window_us: u64,
    pub(crate) hold_us: u64,
    pub(crate) requests: Option<(u64, u64)>,
    pub(crate) tokens: Option<(u64, u64)>,
}

/// The Redis side: the client, one lazily opened self-reconnecting
/// connection, the key's names and the limits.
pub(crate) struct Store {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    keys: [String; 5],
    timeout: Duration,
    limits: Limits,
}

fn timed_out() -> RedisError {
    RedisError::from((
        ErrorKind::Io,
        "redis did not answer within the fleet limiter's timeout",
    ))
}

pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl Store {
    pub(crate) fn new(client: redis::Client, key: &str, timeout: Duration, limits: Limits) -> Self {
        // One hash tag: every key of a limit is in one Redis Cluster slot.
        let keys = ["state", "req:log", "req:cost", "tok:log", "tok:cost"]
            .map(|part| format!("llmrl:{{{key}}}:{part}"));
        Self {
            client,
            conn: OnceCell::new(),
            keys,
            timeout,
            limits,
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, RedisError> {
        let open = || async {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(self.timeout))
                .set_response_timeout(Some(self.timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            ConnectionManager::new_with_config(self.client.clone(), config).await
        };
        let conn = tokio::time::timeout(self.timeout, self.conn.get_or_try_init(open))
            .await
            .map_err(|_| timed_out())??;
        Ok(conn.clone())
    }

    fn invocation<'a>(&'a self, script: &'a Script) -> redis::ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        for k in &self.keys {
            inv.key(k);
        }
        let l = &self.limits;
        let (rl, rb) = l.requests.unwrap_or((0, 0));
        let (tl, tb) = l.tokens.unwrap_or((0, 0));
        inv.arg(l.window_us)
            .arg(rl)
            .arg(rb)
            .arg(tl)
            .arg(tb)
            .arg(l.hold_us);
        inv
    }

    async fn run(&self, inv: redis::ScriptInvocation<'_>) -> Result<(i64, i64), RedisError> {
        let mut conn = self.connection().await?;
        let reply: Vec<i64> = tokio::time::timeout(self.timeout, inv.invoke_async(&mut conn))
            .await
            .map_err(|_| timed_out())??;
        match reply[..] {
            [a, b] => Ok((a, b)),
            _ => Err(RedisError::from((
                ErrorKind::UnexpectedReturnType,
                "the fleet limiter's script answered an unexpected shape",
            ))),
        }
    }

    /// One admission decision for a call of `tokens`.
    pub(crate) async fn admit(&self, tokens: u64) -> Result<Admit, RedisError> {
        let mut inv = self.invocation(&ADMIT_SCRIPT);
        inv.arg(tokens);
        Ok(match self.run(inv).await? {
            (1, slot) => Admit::Granted(slot),
            (0, us) => Admit::Wait(Duration::from_micros(us.max(1).unsigned_abs())),
            _ => Admit::Never,
        })
    }

    /// Settles a call admitted in `slot`: whether the server's headers
    /// lowered the budget, and the pause this call started (if any).
    pub(crate) async fn settle(
        &self,
        slot: i64,
        s: &Settle,
    ) -> Result<(bool, Option<Duration>), RedisError> {
        let mut inv = self.invocation(&SETTLE_SCRIPT);
        let opt = |v: Option<u64>| v.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
        inv.arg(slot).arg(s.requests_back).arg(s.tokens_back);
        for v in s.server {
            inv.arg(opt(v));
        }
        match s.throttled {
            Some(hint) => inv.arg(1).arg(hint.map_or(-1, micros)),
            None => inv.arg(0).arg(-1),
        };
        let (lowered, started) = self.run(inv).await?;
        let paused = (started > 0).then(|| Duration::from_micros(started.unsigned_abs()));
        Ok((lowered == 1, paused))
    }
}
