//! Taking jobs for a worker's free slots.
//!
//! Two ways, one rule (weighted round robin over the worker's turn counter,
//! a turn whose class is empty going to the others in priority order):
//!
//! - the take script (`scripts::TAKE`): moves due delayed jobs back to
//!   their streams, reclaims jobs pending past the visibility timeout and
//!   trims acknowledged entries, then reads; it also answers the server's
//!   time and the first delayed job's due time;
//! - plain `XREADGROUP`s, pipelined (one round trip when every class has
//!   what its turns ask): no Lua, so several times less work for Redis per
//!   job. A class found empty is not read again for [`EMPTY_RECHECK`] (its
//!   turns go to the others, as when it is empty), so a busy worker whose
//!   high class is idle does not spend a round trip on it per take; a job
//!   arriving in such a class waits up to that much longer. Used while nothing else is due: no reclaim pass, no delayed job
//!   due by the worker's estimate of the server's clock, no re-queue by this
//!   worker since the last script take. Jobs other workers delay are seen at
//!   the next script take, at least every `idle_wait`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::Value;
use tokio::time::Instant;

use super::config::ms;
use super::error::RedisQueueError;
use super::job::{parse_delivery, parse_entry, Delivery, Priority, GROUP};
use super::scripts;
use super::worker::Ctx;

/// How long plain reads skip a class that had nothing.
pub(crate) const EMPTY_RECHECK: Duration = Duration::from_millis(10);

/// One take's answer.
pub(crate) struct Taken {
    /// The server's time (ms since the Unix epoch), exact after a script
    /// take.
    pub(crate) now_ms: u64,
    /// When the first delayed job is due (server ms), if any.
    pub(crate) next_due_ms: Option<u64>,
    pub(crate) jobs: Vec<Delivery>,
}

/// What a worker remembers between takes.
pub(crate) struct Taker {
    turn: u64,
    reclaim_every: Duration,
    last_reclaim: Option<Instant>,
    /// The server's time at the last script take, and the local instant
    /// its answer arrived.
    clock: Option<(u64, Instant)>,
    next_due_ms: Option<u64>,
    /// Until when plain reads skip each class (found empty).
    skip_until: [Option<Instant>; 3],
}

impl Taker {
    pub(crate) fn new(reclaim_every: Duration) -> Self {
        Self {
            turn: 0,
            reclaim_every,
            last_reclaim: None,
            clock: None,
            next_due_ms: None,
            skip_until: [None; 3],
        }
    }

    fn server_now(&self) -> Option<u64> {
        self.clock
            .map(|(at, local)| at.saturating_add(ms(local.elapsed())))
    }

    /// Takes up to `n` jobs.
    pub(crate) async fn take(&mut self, ctx: &Ctx, n: usize) -> Result<Taken, RedisQueueError> {
        let reclaim = self
            .last_reclaim
            .is_none_or(|t| t.elapsed() >= self.reclaim_every);
        let delayed_due = match (self.server_now(), self.next_due_ms) {
            (None, _) => true,
            (Some(now), Some(due)) => now >= due,
            (Some(_), None) => false,
        };
        let requeued = ctx.requeued.swap(false, Ordering::Relaxed);
        if !(reclaim || delayed_due || requeued) {
            let jobs = self.read(ctx, n).await?;
            if !jobs.is_empty() {
                return Ok(Taken {
                    now_ms: self.server_now().unwrap_or(0),
                    next_due_ms: self.next_due_ms,
                    jobs,
                });
            }
            // Nothing new: the script tells the exact time and the next due
            // job before the worker waits.
        }
        let taken = self.script(ctx, n, reclaim).await?;
        if reclaim {
            self.last_reclaim = Some(Instant::now());
        }
        self.clock = Some((taken.now_ms, Instant::now()));
        self.next_due_ms = taken.next_due_ms;
        Ok(taken)
    }

    /// How many of the next `n` turns belong to each class.
    fn turns(&mut self, weights: [u32; 3], n: usize) -> [usize; 3] {
        let total = u64::from(weights[0]) + u64::from(weights[1]) + u64::from(weights[2]);
        let mut want = [0; 3];
        for i in 0..n as u64 {
            let s = self.turn.wrapping_add(i) % total;
            let c = if s < u64::from(weights[0]) {
                0
            } else if s < u64::from(weights[0]) + u64::from(weights[1]) {
                1
            } else {
                2
            };
            want[c] += 1;
        }
        self.turn = self.turn.wrapping_add(n as u64);
        want
    }

    async fn script(
        &mut self,
        ctx: &Ctx,
        n: usize,
        reclaim: bool,
    ) -> Result<Taken, RedisQueueError> {
        let turn = self.turn;
        self.turn = self.turn.wrapping_add(n as u64);
        let mut inv = scripts::TAKE.prepare_invoke();
        for p in Priority::ALL {
            inv.key(ctx.keys.stream(p));
        }
        inv.key(ctx.keys.delayed());
        let w = ctx.config.weights;
        inv.arg(GROUP)
            .arg(&ctx.consumer)
            .arg(n)
            .arg(w[0])
            .arg(w[1])
            .arg(w[2])
            .arg(if reclaim { "1" } else { "0" })
            .arg(ms(ctx.config.visibility_timeout))
            .arg(1000)
            .arg(turn);
        let v: Value = inv.invoke_async(&mut ctx.conn.clone()).await?;
        let Value::Array(parts) = v else {
            return Err(RedisQueueError::malformed("take", "reply is not an array"));
        };
        let Ok([Value::Int(now), Value::Int(next), Value::Array(entries)]) =
            <[Value; 3]>::try_from(parts)
        else {
            return Err(RedisQueueError::malformed(
                "take",
                "reply has the wrong shape",
            ));
        };
        let mut jobs = Vec::with_capacity(entries.len());
        for e in entries {
            jobs.push(parse_delivery(e)?);
        }
        Ok(Taken {
            now_ms: u64::try_from(now).unwrap_or(0),
            next_due_ms: u64::try_from(next).ok(),
            jobs,
        })
    }

    /// New entries by plain reads: the turns' counts in one pipelined round
    /// trip, then what is missing from the classes that still have work, in
    /// priority order.
    async fn read(&mut self, ctx: &Ctx, n: usize) -> Result<Vec<Delivery>, RedisQueueError> {
        let mut want = self.turns(ctx.config.weights, n);
        let now = Instant::now();
        let mut skip = self.skip_until.map(|u| u.is_some_and(|u| now < u));
        if skip == [true; 3] {
            skip = [false; 3];
        }
        // A skipped class's turns go to the others in priority order.
        for p in Priority::ALL {
            let i = p.index();
            if skip[i] && want[i] > 0 {
                let to = (0..3).find(|&j| !skip[j]).unwrap_or(i);
                want[to] += std::mem::take(&mut want[i]);
            }
        }
        let mut conn = ctx.conn.clone();
        let mut pipe = redis::pipe();
        for p in Priority::ALL {
            if want[p.index()] > 0 {
                pipe.add_command(xreadgroup(ctx, p, want[p.index()]));
            }
        }
        let replies: Vec<Value> = pipe.query_async(&mut conn).await?;
        let mut jobs = Vec::with_capacity(n);
        let mut empty = skip;
        let mut replies = replies.into_iter();
        for p in Priority::ALL {
            if want[p.index()] > 0 {
                let reply = replies
                    .next()
                    .ok_or_else(|| RedisQueueError::malformed("take", "pipeline reply length"))?;
                let got = entries(p, reply, &mut jobs)?;
                if got < want[p.index()] {
                    empty[p.index()] = true;
                    self.skip_until[p.index()] = Some(now + EMPTY_RECHECK);
                }
            }
        }
        for p in Priority::ALL {
            let left = n - jobs.len();
            if left == 0 {
                break;
            }
            if empty[p.index()] {
                continue;
            }
            let reply: Value = xreadgroup(ctx, p, left).query_async(&mut conn).await?;
            if entries(p, reply, &mut jobs)? < left {
                self.skip_until[p.index()] = Some(now + EMPTY_RECHECK);
            }
        }
        Ok(jobs)
    }
}

fn xreadgroup(ctx: &Ctx, p: Priority, count: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(GROUP)
        .arg(&ctx.consumer)
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(ctx.keys.stream(p))
        .arg(">");
    cmd
}

/// Appends the entries of one `XREADGROUP` reply (one stream) to `jobs`;
/// returns how many there were.
fn entries(p: Priority, reply: Value, jobs: &mut Vec<Delivery>) -> Result<usize, RedisQueueError> {
    let list = match reply {
        Value::Nil => return Ok(0),
        Value::Array(mut streams) if streams.len() == 1 => match streams.pop() {
            Some(Value::Array(mut kv)) if kv.len() == 2 => kv.pop(),
            _ => None,
        },
        Value::Map(mut streams) if streams.len() == 1 => streams.pop().map(|(_, v)| v),
        _ => None,
    };
    let Some(Value::Array(list)) = list else {
        return Err(RedisQueueError::malformed(
            "take",
            "XREADGROUP reply has the wrong shape",
        ));
    };
    let got = list.len();
    for e in list {
        let Value::Array(e) = e else {
            return Err(RedisQueueError::malformed(
                "take",
                "stream entry is not an array",
            ));
        };
        let Ok([id, fields]) = <[Value; 2]>::try_from(e) else {
            return Err(RedisQueueError::malformed(
                "take",
                "stream entry has the wrong arity",
            ));
        };
        jobs.push(parse_entry(p, id, fields, 1)?);
    }
    Ok(got)
}

/// Waits (up to `wait`) for a new entry in any class stream, without taking
/// it: the next take then takes it under the priority rule.
pub(crate) async fn wait_for_new(
    ctx: &Ctx,
    conn: &mut redis::aio::ConnectionManager,
    now_ms: u64,
    wait: Duration,
) -> Result<(), RedisQueueError> {
    let block = ms(wait);
    if block == 0 {
        return Ok(());
    }
    // Any entry added after the take script ran has an id above this one.
    let after = format!("{}-{}", now_ms.saturating_sub(1), u64::MAX);
    let mut cmd = redis::cmd("XREAD");
    cmd.arg("COUNT")
        .arg(1)
        .arg("BLOCK")
        .arg(block)
        .arg("STREAMS");
    for p in Priority::ALL {
        cmd.arg(ctx.keys.stream(p));
    }
    for _ in Priority::ALL {
        cmd.arg(&after);
    }
    let _: Value = cmd.query_async(conn).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_follow_the_weights_across_takes() {
        let mut t = Taker::new(Duration::from_secs(1));
        assert_eq!(t.turns([4, 2, 1], 7), [4, 2, 1]);
        // Split across takes, the sequence goes on where it stopped.
        let (a, b) = (t.turns([4, 2, 1], 3), t.turns([4, 2, 1], 4));
        assert_eq!((a, b), ([3, 0, 0], [1, 2, 1]));
        assert_eq!(t.turns([1, 1, 1], 0), [0, 0, 0]);
        let mut t = Taker::new(Duration::from_secs(1));
        let w = t.turns([1000, 1, 1], 1002);
        assert_eq!(w, [1000, 1, 1]);
    }
}
