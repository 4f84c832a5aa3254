//! The coordination task of one attachment: subscribes to the namespace's
//! channel, publishes local trips and closes, applies the others', and
//! takes the probe permit when an open period ends. It never runs on a
//! call's path: the breakers wake it through their link on transitions.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, FromRedisValue, RedisError, RedisResult};
use tokio::time::{sleep, timeout};

use super::event::SharedBreakerEvent;
use super::scripts::{CLOSE, PROBE, TRIP};
use super::Inner;
use crate::breaker::Link;
use crate::breaker::SharedCore as Core;
use crate::breaker::{BreakerHandle, State};

/// The longest the task sleeps without checking the connection (a `PING`
/// on the subscription) and the open periods.
const TICK: Duration = Duration::from_secs(1);
/// Names read per pipeline when breakers are (re)read.
const READ_BATCH: usize = 256;
/// The longest shared open period taken from Redis (a year).
const MAX_OPEN_MS: u64 = 365 * 24 * 3_600_000;
/// The first reconnection delay, doubled per failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// The longest reconnection delay: after Redis answers again, the breakers
/// are shared again within about a second.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The breakers an attachment covers, by shared name.
pub(super) trait Source: Send + Sync + 'static {
    fn list(&self, out: &mut Vec<(String, BreakerHandle)>);
}

/// One key's breaker and what the coordination knows of it.
struct Slot {
    handle: BreakerHandle,
    /// The open generation published (or applied from another process).
    known_open: Option<u64>,
    /// The newest epoch seen for the key.
    epoch: u64,
    /// This process holds the key's probe permit.
    prober: bool,
    /// The shared state is still to be read (new breaker, or resubscribed).
    fresh: bool,
}

impl Slot {
    fn new(handle: BreakerHandle) -> Self {
        Self {
            handle,
            known_open: None,
            epoch: 0,
            prober: false,
            fresh: true,
        }
    }
}

/// What the task decides with: everything but the slots.
pub(super) struct Ctx {
    pub(super) inner: Arc<Inner>,
    pub(super) client: redis::Client,
    pub(super) link: Arc<Link>,
    pub(super) source: Box<dyn Source>,
    /// This attachment's id in the published messages and the permits.
    pub(super) origin: String,
}

impl Ctx {
    fn record(&self, name: &str) -> String {
        format!("llmbrk:{{{}}}:key:{name}", self.inner.namespace)
    }

    fn emit(&self, event: SharedBreakerEvent) {
        self.inner.metrics.record(&event);
        if let Some(listener) = &self.inner.listener {
            listener(&event);
        }
    }
}

/// Sets the link down when the task ends (aborted, or its runtime shut
/// down): the breakers go back to working alone.
struct Down(Arc<Link>);

impl Drop for Down {
    fn drop(&mut self) {
        self.0.connected.store(false, Ordering::Release);
    }
}

pub(super) async fn run(ctx: Ctx) {
    let _down = Down(Arc::clone(&ctx.link));
    let mut task = Task {
        ctx,
        slots: HashMap::new(),
        warned: false,
    };
    let mut backoff = MIN_BACKOFF;
    loop {
        let error = task.session(&mut backoff).await;
        if task.ctx.link.connected.swap(false, Ordering::AcqRel) || !task.warned {
            task.warned = true;
            tracing::warn!(
                target: "llm_resilience::redis::breaker",
                error = %error,
                "shared breaker coordination cannot reach Redis; breakers work alone until it can"
            );
        }
        task.ctx.emit(SharedBreakerEvent::Disconnected {
            error: error.to_string(),
        });
        sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

struct Task {
    ctx: Ctx,
    slots: HashMap<String, Slot>,
    /// The first failure was logged (then one warning per outage).
    warned: bool,
}

fn io_error(what: &'static str) -> RedisError {
    RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
}

impl Task {
    /// One connection's life: returns the error that ended it.
    async fn session(&mut self, backoff: &mut Duration) -> RedisError {
        let inner = Arc::clone(&self.ctx.inner);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(inner.connect_timeout))
            .set_response_timeout(Some(inner.response_timeout));
        let mut conn = match self
            .ctx
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(c) => c,
            Err(e) => return e,
        };
        let pubsub = match timeout(inner.connect_timeout, self.ctx.client.get_async_pubsub()).await
        {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return e,
            Err(_) => return io_error("connecting the subscription timed out"),
        };
        let (mut sink, mut stream) = pubsub.split();
        match timeout(inner.response_timeout, sink.subscribe(&inner.channel)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return e,
            Err(_) => return io_error("SUBSCRIBE timed out"),
        }
        self.ctx.link.connected.store(true, Ordering::Release);
        *backoff = MIN_BACKOFF;
        self.ctx.emit(SharedBreakerEvent::Connected);
        // Whatever was missed while unsubscribed is read from the records.
        for slot in self.slots.values_mut() {
            slot.fresh = true;
        }
        if let Err(e) = self.sync(&mut conn, true).await {
            return e;
        }
        let link = Arc::clone(&self.ctx.link);
        loop {
            let result = tokio::select! {
                msg = stream.next() => match msg {
                    None => return io_error("the subscription's connection closed"),
                    Some(msg) => {
                        self.on_message(&msg);
                        Ok(())
                    }
                },
                () = link.notify.notified() => {
                    let changed = link.changed.swap(false, Ordering::AcqRel);
                    self.sync(&mut conn, changed).await
                }
                () = sleep(TICK) => {
                    match timeout(inner.response_timeout, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => self.sync(&mut conn, false).await,
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(io_error("PING timed out")),
                    }
                }
            };
            if let Err(e) = result {
                return e;
            }
        }
    }

    /// The slots for the breakers the source has now.
    fn refresh(&mut self) {
        let mut list = Vec::new();
        self.ctx.source.list(&mut list);
        let mut slots = HashMap::with_capacity(list.len());
        for (name, handle) in list {
            let slot = match self.slots.remove(&name) {
                // The same breaker (a keyed breaker evicted and made again
                // is a new one).
                Some(slot) if std::ptr::eq(slot.handle.core(), handle.core()) => slot,
                _ => Slot::new(handle),
            };
            slots.insert(name, slot);
        }
        self.slots = slots;
    }

    /// Reads the shared state of the breakers not read yet (new ones, or
    /// all after a resubscription): the server's clock and each record, in
    /// one pipeline (one round trip) per [`READ_BATCH`] names.
    async fn read_fresh(&mut self, conn: &mut MultiplexedConnection) -> RedisResult<()> {
        let fresh: Vec<String> = self
            .slots
            .iter()
            .filter(|(_, slot)| slot.fresh)
            .map(|(name, _)| name.clone())
            .collect();
        for chunk in fresh.chunks(READ_BATCH) {
            let mut pipe = redis::pipe();
            pipe.cmd("TIME");
            for name in chunk {
                pipe.cmd("HMGET")
                    .arg(self.ctx.record(name))
                    .arg("epoch")
                    .arg("until")
                    .arg("closed");
            }
            let mut values = pipe
                .query_async::<Vec<redis::Value>>(conn)
                .await?
                .into_iter();
            let (secs, micros): (u64, u64) =
                FromRedisValue::from_redis_value(values.next().unwrap_or(redis::Value::Nil))?;
            let now = secs.saturating_mul(1_000).saturating_add(micros / 1_000);
            for (name, value) in chunk.iter().zip(values) {
                let (epoch, until, closed): (Option<u64>, Option<u64>, Option<String>) =
                    FromRedisValue::from_redis_value(value)?;
                let Some(slot) = self.slots.get_mut(name) else {
                    continue;
                };
                slot.fresh = false;
                let Some(epoch) = epoch.filter(|&e| e > slot.epoch) else {
                    continue;
                };
                if closed.as_deref() == Some("1") {
                    continue;
                }
                slot.epoch = epoch;
                let remaining = until.unwrap_or(0).saturating_sub(now).clamp(1, MAX_OPEN_MS);
                if let Some(gen) = slot
                    .handle
                    .core()
                    .trip_until(Duration::from_millis(remaining))
                {
                    slot.known_open = Some(gen);
                    slot.prober = false;
                    self.ctx.emit(SharedBreakerEvent::TripReceived);
                }
            }
        }
        Ok(())
    }

    /// Publishes local trips and closes, reads the shared state of new
    /// breakers, and asks for the probe permit where an open period ended.
    async fn sync(&mut self, conn: &mut MultiplexedConnection, refresh: bool) -> RedisResult<()> {
        if refresh {
            self.refresh();
        }
        self.read_fresh(conn).await?;
        let ctx = &self.ctx;
        for (name, slot) in &mut self.slots {
            // Formatted only in the arms that talk to Redis: most breakers
            // are closed and untouched on most syncs.
            let record = || ctx.record(name);
            let core = slot.handle.core();
            let snap = core.snapshot();
            match snap.state {
                State::Open if slot.known_open != Some(snap.gen) => {
                    let open_ms = snap.remaining.as_millis().max(1) as u64;
                    let (epoch, _): (u64, u64) = TRIP
                        .key(record())
                        .key(&ctx.inner.epoch_key)
                        .arg(open_ms)
                        .arg(&ctx.origin)
                        .arg(&ctx.inner.channel)
                        .arg(name.as_str())
                        .arg(retain_ms(core))
                        .invoke_async(conn)
                        .await?;
                    slot.epoch = slot.epoch.max(epoch);
                    slot.known_open = Some(snap.gen);
                    slot.prober = false;
                    ctx.emit(SharedBreakerEvent::TripPublished);
                }
                State::Open if snap.remaining.is_zero() && snap.wanted && !snap.granted => {
                    let lease = lease_ms(core);
                    let (answer, wait_ms, epoch): (u8, u64, u64) = PROBE
                        .key(record())
                        .arg(&ctx.origin)
                        .arg(lease)
                        .invoke_async(conn)
                        .await?;
                    slot.epoch = slot.epoch.max(epoch);
                    match answer {
                        1 => {
                            slot.prober = true;
                            core.grant_probes(snap.gen);
                            ctx.emit(SharedBreakerEvent::ProbeGranted);
                        }
                        // The prober closed (its message is on its way, or
                        // was missed): close too, without probing.
                        2 => {
                            if core.close_now() {
                                ctx.emit(SharedBreakerEvent::CloseReceived);
                            }
                        }
                        _ => {
                            let wait = Duration::from_millis(wait_ms.clamp(10, lease));
                            core.hold_open(snap.gen, wait);
                            ctx.emit(SharedBreakerEvent::ProbeDenied { wait });
                        }
                    }
                }
                State::Closed if slot.prober => {
                    slot.prober = false;
                    let published: u8 = CLOSE
                        .key(record())
                        .arg(&ctx.origin)
                        .arg(&ctx.inner.channel)
                        .arg(name.as_str())
                        .arg(retain_ms(core))
                        .invoke_async(conn)
                        .await?;
                    if published == 1 {
                        ctx.emit(SharedBreakerEvent::ClosePublished);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Another process's trip or close.
    fn on_message(&mut self, msg: &redis::Msg) {
        let Ok(payload) = msg.get_payload::<String>() else {
            return;
        };
        let Some(message) = Message::parse(&payload) else {
            return;
        };
        if message.origin == self.ctx.origin {
            return;
        }
        // A name without a breaker here: nothing to do. A keyed breaker
        // made since the last look reads the record when its wake-up is
        // handled (the record is written before the message is sent).
        let Some(slot) = self.slots.get_mut(message.name) else {
            return;
        };
        let core = slot.handle.core();
        match message.kind {
            Kind::Trip { remaining } => {
                if message.epoch <= slot.epoch {
                    return;
                }
                slot.epoch = message.epoch;
                slot.prober = false;
                if let Some(gen) = core.trip_until(remaining) {
                    slot.known_open = Some(gen);
                    self.ctx.emit(SharedBreakerEvent::TripReceived);
                }
            }
            Kind::Close => {
                if message.epoch < slot.epoch {
                    return;
                }
                slot.epoch = message.epoch;
                slot.prober = false;
                if core.close_now() {
                    self.ctx.emit(SharedBreakerEvent::CloseReceived);
                }
            }
        }
    }
}

/// How long a probe permit holds: the breaker's probe timeout, after which
/// a hung probe frees its permit locally too.
fn lease_ms(core: &Core) -> u64 {
    (core.settings().probe_timeout.as_millis() as u64).max(1)
}

/// How long a key's record outlives its open period: two probe leases.
fn retain_ms(core: &Core) -> u64 {
    lease_ms(core).saturating_mul(2)
}

enum Kind {
    Trip { remaining: Duration },
    Close,
}

/// A published message: `trip <epoch> <remaining ms> <origin> <name>` or
/// `close <epoch> <origin> <name>` (the name last: it may hold spaces).
struct Message<'a> {
    kind: Kind,
    epoch: u64,
    origin: &'a str,
    name: &'a str,
}

impl<'a> Message<'a> {
    fn parse(s: &'a str) -> Option<Self> {
        let (verb, rest) = s.split_once(' ')?;
        let (epoch, rest) = rest.split_once(' ')?;
        let epoch = epoch.parse().ok()?;
        let (kind, rest) = match verb {
            "trip" => {
                let (ms, rest) = rest.split_once(' ')?;
                let ms: u64 = ms.parse().ok()?;
                let remaining = Duration::from_millis(ms.clamp(1, MAX_OPEN_MS));
                (Kind::Trip { remaining }, rest)
            }
            "close" => (Kind::Close, rest),
            _ => return None,
        };
        let (origin, name) = rest.split_once(' ')?;
        Some(Self {
            kind,
            epoch,
            origin,
            name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse_and_garbage_does_not() {
        let m = Message::parse("trip 7 1500 abc openai gpt-4o").unwrap();
        assert!(
            matches!(m.kind, Kind::Trip { remaining } if remaining == Duration::from_millis(1500))
        );
        assert_eq!((m.epoch, m.origin, m.name), (7, "abc", "openai gpt-4o"));
        let m = Message::parse("close 8 abc k").unwrap();
        assert!(matches!(m.kind, Kind::Close));
        assert_eq!((m.epoch, m.origin, m.name), (8, "abc", "k"));
        for bad in [
            "",
            "trip",
            "trip x 1 a b",
            "trip 1 -5 a b",
            "close 1 a",
            "open 1 a b",
        ] {
            assert!(Message::parse(bad).is_none(), "{bad}");
        }
    }
}
