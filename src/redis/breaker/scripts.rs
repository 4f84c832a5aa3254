//! The Lua scripts of the shared breaker state: each decision is one script,
//! atomic on the server, timed by the server's clock (`TIME`), so that
//! processes on machines whose clocks disagree still agree on an open
//! period's end.
//!
//! A key's record is a hash: `epoch` (the trip's number, from the
//! namespace's counter, so it only grows), `until` (server milliseconds at
//! which the open period ends), `prober` (the process holding the probe
//! permit, or empty), `lease` (when that permit lapses) and `closed` (1
//! once the prober's breaker closed: kept, so that a process asking for
//! the permit after the close learns of it instead of probing again).

use std::sync::LazyLock;

use redis::Script;

/// The server's clock in milliseconds, as a Lua prelude.
macro_rules! now_ms {
    () => {
        "local t = redis.call('TIME')
         local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        "
    };
}

/// A trip: a new epoch, the open period's end (the later of the current
/// one and `now + open_ms`), the probe permit freed, the record kept
/// `retain_ms` past the end; published as
/// `trip <epoch> <remaining ms> <origin> <name>`.
///
/// KEYS: record, epoch counter. ARGV: open_ms, origin, channel, name,
/// retain_ms. Returns `{epoch, remaining_ms}`.
pub(super) static TRIP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        now_ms!(),
        "local untl = now + tonumber(ARGV[1])
         local cur = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
         if cur > untl then untl = cur end
         local epoch = redis.call('INCR', KEYS[2])
         redis.call('HSET', KEYS[1], 'epoch', epoch, 'until', untl, 'prober', '', 'lease', 0,
           'closed', 0)
         redis.call('PEXPIRE', KEYS[1], untl - now + tonumber(ARGV[5]))
         redis.call('PUBLISH', ARGV[3],
           'trip ' .. epoch .. ' ' .. (untl - now) .. ' ' .. ARGV[2] .. ' ' .. ARGV[4])
         return {epoch, untl - now}"
    ))
});

/// The probe permit of an ended open period: granted to the first process
/// that asks (or to the holder again, or to anyone once the holder's lease
/// lapsed), refused to the others with the time to wait. A closed record:
/// the asker should close too. No record (it expired, long after its open
/// period): granted, there is nothing to share.
///
/// KEYS: record. ARGV: origin, lease_ms. Returns
/// `{answer, wait_ms, epoch}`, the answer 1 granted, 0 refused, 2 closed.
pub(super) static PROBE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        now_ms!(),
        "local h = redis.call('HMGET', KEYS[1], 'epoch', 'until', 'prober', 'lease')
         if not h[1] then return {1, 0, 0} end
         local epoch = tonumber(h[1])
         if redis.call('HGET', KEYS[1], 'closed') == '1' then return {2, 0, epoch} end
         local untl = tonumber(h[2] or '0')
         if now < untl then return {0, untl - now, epoch} end
         local lease = tonumber(h[4] or '0')
         if (not h[3]) or h[3] == '' or h[3] == ARGV[1] or lease <= now then
           local ms = tonumber(ARGV[2])
           redis.call('HSET', KEYS[1], 'prober', ARGV[1], 'lease', now + ms)
           if redis.call('PTTL', KEYS[1]) < 2 * ms then
             redis.call('PEXPIRE', KEYS[1], 2 * ms)
           end
           return {1, 0, epoch}
         end
         return {0, lease - now, epoch}"
    ))
});

/// The prober's breaker closed: the record is marked closed (kept
/// `retain_ms`) and `close <epoch> <origin> <name>` is published, only if
/// this process still holds the permit (otherwise a newer trip or another
/// prober owns the key's state).
///
/// KEYS: record. ARGV: origin, channel, name, retain_ms. Returns 1 if
/// published.
pub(super) static CLOSE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local h = redis.call('HMGET', KEYS[1], 'epoch', 'prober', 'closed')
         if (not h[1]) or h[2] ~= ARGV[1] or h[3] == '1' then return 0 end
         redis.call('HSET', KEYS[1], 'closed', 1, 'until', 0, 'prober', '', 'lease', 0)
         redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
         redis.call('PUBLISH', ARGV[2], 'close ' .. h[1] .. ' ' .. ARGV[1] .. ' ' .. ARGV[3])
         return 1",
    )
});
