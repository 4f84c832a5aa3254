//! The Lua scripts that make every queue step atomic on the server.
//!
//! Each script runs as one unit (Redis executes a script without
//! interleaving other commands), and with `appendfsync always` its effects
//! are on disk before the reply. The client sends `EVALSHA` and falls back
//! to `EVAL` when the server lost its script cache (after a restart).

use std::sync::LazyLock;

use redis::Script;

/// Enqueue with an idempotency key: `KEYS` = class stream, idempotency
/// key; `ARGV` = payload, deadline (unix ms, 0 = none), idempotency TTL
/// (ms), class name. Returns `{job id, 1 if enqueued / 0 if the key already
/// named a job}`. (Without a key, an enqueue is one plain `XADD`.)
pub(crate) static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local existing = redis.call('GET', KEYS[2])
if existing then return {existing, 0} end
local e
if ARGV[2] == '0' then
  e = redis.call('XADD', KEYS[1], '*', 'payload', ARGV[1])
else
  e = redis.call('XADD', KEYS[1], '*', 'payload', ARGV[1], 'deadline', ARGV[2])
end
local id = ARGV[4] .. '-' .. e
redis.call('SET', KEYS[2], id, 'PX', ARGV[3])
return {id, 1}
"#,
    )
});

/// Take up to `n` jobs for one worker.
///
/// `KEYS` = high, normal, low streams, delayed set;
/// `ARGV` = group, consumer, n, weight high, weight normal, weight low,
/// reclaim (`1`/`0`), visibility timeout (ms), most delayed jobs to promote,
/// the worker's turn counter.
///
/// 1. Due delayed jobs move back to their class stream.
/// 2. If `reclaim`: each stream is trimmed (`XTRIM MINID ~`) below its
///    oldest pending entry, or below the first undelivered one when none is
///    pending: acknowledged entries are not deleted one by one (`XDEL`
///    costs more than the rest of a job's writes), they go in whole nodes.
///    Then entries pending longer than the visibility timeout (a
///    worker died or hung) are claimed with `XAUTOCLAIM`, oldest class first;
///    their delivery count comes from `XPENDING`.
/// 3. New entries by weighted round robin over the worker's turn counter
///    (the same rule as the worker's plain reads, `take.rs`):
///    turn `t` belongs to high if `t mod W < wh`, normal if `< wh + wn`, low
///    otherwise; a turn whose class is empty goes to the others in priority
///    order.
///
/// Returns `{now ms, due time of the first delayed job (ms) or -1,
/// {class, entry id, fields, pending deliveries}...}`.
pub(crate) static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, tonumber(ARGV[9]))
for _, m in ipairs(due) do
  local ok, e = pcall(cjson.decode, m)
  if ok and type(e) == 'table' and KEYS[e[1]] and type(e[2]) == 'table' then
    redis.call('XADD', KEYS[e[1]], '*', unpack(e[2]))
  end
  redis.call('ZREM', KEYS[4], m)
end
local n = tonumber(ARGV[3])
local out = {}
local function push(c, entries, pel)
  for _, e in ipairs(entries) do
    local d = 1
    if pel then
      local p = redis.call('XPENDING', KEYS[c], ARGV[1], e[1], e[1], 1)
      if p[1] then d = p[1][4] end
    end
    out[#out + 1] = {c - 1, e[1], e[2], d}
    n = n - 1
  end
end
local function trim(c)
  local p = redis.call('XPENDING', KEYS[c], ARGV[1])
  local minid = p[2]
  if p[1] == 0 then
    minid = nil
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[c])) do
      local f = {}
      for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
      if f['name'] == ARGV[1] then
        local ms, seq = string.match(f['last-delivered-id'], '^(%d+)-(%d+)$')
        if ms and tonumber(seq) < 1e15 then minid = ms .. '-' .. string.format('%d', tonumber(seq) + 1) end
      end
    end
  end
  if minid then redis.call('XTRIM', KEYS[c], 'MINID', '~', minid) end
end
if ARGV[7] == '1' then
  for c = 1, 3 do trim(c) end
  for c = 1, 3 do
    if n <= 0 then break end
    local r = redis.call('XAUTOCLAIM', KEYS[c], ARGV[1], ARGV[2], ARGV[8], '0-0', 'COUNT', n)
    push(c, r[2], true)
  end
end
local empty = {false, false, false}
local function read(c, count)
  if count <= 0 or empty[c] then return end
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', count, 'STREAMS', KEYS[c], '>')
  local got = 0
  if r then got = #r[1][2]; push(c, r[1][2], false) end
  if got < count then empty[c] = true end
end
if n > 0 then
  local w = {tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])}
  local total = w[1] + w[2] + w[3]
  local turn = tonumber(ARGV[10])
  local want = {0, 0, 0}
  for i = 0, n - 1 do
    local s = (turn + i) % total
    if s < w[1] then want[1] = want[1] + 1
    elseif s < w[1] + w[2] then want[2] = want[2] + 1
    else want[3] = want[3] + 1 end
  end
  for c = 1, 3 do read(c, want[c]) end
  for c = 1, 3 do read(c, n) end
end
local next_due = -1
local first = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
if first[2] then next_due = math.floor(tonumber(first[2])) end
return {now, next_due, out}
"#,
    )
});

/// Record outcomes and acknowledge, each job in one step (and the whole
/// batch too): a worker writes the outcomes of the jobs that finished while
/// its previous write was on its way in one call.
///
/// `KEYS` = high, normal, low streams, output stream, dead-letter stream,
/// then the results hashes the batch's jobs belong to; `ARGV` = group,
/// result TTL (ms), target max length, then for each job a header of
/// three or four bytes: its kind (`o`, `x` or `d`), its class (`1` to `3`),
/// its results hash (`'0' + i` for the `i`-th after the dead-letter
/// stream), and `r` if the entry named its job; then its entry id and job
/// id, and
/// - kind `o` (a completed job): deliveries, the answer (JSON): the output
///   entry is `job`, `deliveries`, `status ok`, `result`, and the stored
///   outcome the answer itself;
/// - kind `x` (to the output stream) or `d` (to dead letters): the stored
///   outcome, the number of entry fields, and those fields.
///
/// A job's outcome is written only if its entry was still pending: an
/// entry is delivered to one worker at a time until it is acknowledged,
/// and a job has at most one pending entry (a re-queue acknowledges the old
/// one before the job comes back), so a second finisher of a reclaimed
/// entry finds it acknowledged and writes nothing. The batch is
/// acknowledged first, with one `XACK` per stream: if the count is the
/// batch's size, every entry was pending (the usual case, no more checks).
/// If not, each job is decided by what is recorded for it: an outcome, or
/// a re-queue of this very entry (`!requeued:<entry>`, written by the
/// re-queue script) means the entry was finished already, and so does the
/// same entry or job id earlier in the batch; otherwise it was pending. An
/// entry that names its job (a re-queued job, or a foreign entry) is always
/// checked that way, so no second outcome is recorded for one job id
/// whatever the entries say (the batch's entries and job ids are tracked
/// only when some entry is checked). The outcomes go to the results hashes with one
/// `HSET` per hash; a results hash lives at least the result TTL after its
/// last write (its TTL is set to a second more whenever it is below, so at
/// most once a second). The streams are trimmed (`MAXLEN ~`) once per
/// batch. Returns 1 (written) or 0 (a duplicate) per job.
pub(crate) static FINISH_MANY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local starts = {}
local ids = {{}, {}, {}}
local anynamed = false
local a = 4
while a <= #ARGV do
  starts[#starts + 1] = a
  local kind, c, _, named = string.byte(ARGV[a], 1, 4)
  local l = ids[c - 48]
  l[#l + 1] = ARGV[a + 1]
  if named then anynamed = true end
  if kind == 111 then a = a + 5 else a = a + 5 + tonumber(ARGV[a + 4]) end
end
local n = #starts
local acked = 0
for c = 1, 3 do
  if #ids[c] > 0 then acked = acked + redis.call('XACK', KEYS[c], ARGV[1], unpack(ids[c])) end
end
local check = acked ~= n
local track = check or anynamed
local out, sets, wrote = {}, {}, {false, false}
local seen, seenjob = {{}, {}, {}}, {}
for i = 1, n do
  local b = starts[i]
  local kind, c, h, named = string.byte(ARGV[b], 1, 4)
  c = c - 48
  h = h - 48
  local entry, job = ARGV[b + 1], ARGV[b + 2]
  local stored, nf
  if kind == 111 then stored, nf = ARGV[b + 4], 0 else stored, nf = ARGV[b + 3], tonumber(ARGV[b + 4]) end
  local ok = true
  if check or named == 114 then
    if seen[c][entry] or seenjob[job] then
      ok = false
    else
      local v = redis.call('HGET', KEYS[5 + h], job)
      if v then ok = string.sub(v, 1, 10) == '!requeued:' and string.sub(v, 11) ~= entry end
    end
  end
  if track then
    seen[c][entry] = true
    seenjob[job] = true
  end
  if not ok then
    out[i] = 0
  else
    local l = sets[h]
    if not l then l = {}; sets[h] = l end
    l[#l + 1] = job
    l[#l + 1] = stored
    if kind == 111 then
      redis.call('XADD', KEYS[4], '*', 'job', job, 'deliveries', ARGV[b + 3], 'status', 'ok', 'result', stored)
      wrote[1] = true
    else
      local t = 1
      if kind == 100 then t = 2 end
      redis.call('XADD', KEYS[3 + t], '*', unpack(ARGV, b + 5, b + 4 + nf))
      wrote[t] = true
    end
    out[i] = 1
  end
end
local ttl = tonumber(ARGV[2])
for i = 6, #KEYS do
  local l = sets[i - 5]
  if l then redis.call('HSET', KEYS[i], unpack(l)) end
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl + 1000) end
end
for t = 1, 2 do
  if wrote[t] then redis.call('XTRIM', KEYS[3 + t], 'MAXLEN', '~', ARGV[3]) end
end
return out
"#,
    )
});

/// Put a job back for a later attempt, in one step: `KEYS` = source stream,
/// delayed set, the job's results hash, re-queue counter; `ARGV` = group,
/// entry id, delay (ms), the delayed member (`[class + 1, [field, value,
/// ...]]` as JSON), `1` to count a retry (`0` for a job released at
/// shutdown), job id, result TTL (ms).
///
/// Nothing is re-queued when the entry was no longer pending (another
/// worker finished or re-queued a reclaimed copy first) or the job already
/// has an outcome. A re-queue is recorded in the job's field of its
/// results hash (`!requeued:<entry>`, read as "no outcome yet"), so that a
/// late finisher of the same entry sees it was finished (see
/// [`FINISH_MANY`]). Returns 1 if re-queued, 0 if not.
pub(crate) static REQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local v = redis.call('HGET', KEYS[3], ARGV[6])
if v and string.sub(v, 1, 10) ~= '!requeued:' then return 0 end
redis.call('HSET', KEYS[3], ARGV[6], '!requeued:' .. ARGV[2])
local ttl = tonumber(ARGV[7])
if redis.call('PTTL', KEYS[3]) < ttl then redis.call('PEXPIRE', KEYS[3], ttl + 1000) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[4])
if ARGV[5] == '1' then redis.call('INCR', KEYS[4]) end
return 1
"#,
    )
});
