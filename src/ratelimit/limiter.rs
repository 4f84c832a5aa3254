//! One key's limiter: both dimensions, the pause, and the waiting line,
//! under one short lock, and the lease that calls admitted at once take
//! from without it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Duration;

use tokio::time::Instant;

use super::event::RateLimitEventKind as Kind;
use super::gcra::Dimension;
use super::handle::Snapshot;
use super::lease::{shards, thread_number, Grant, Lease, REQ_MAX, TOK_MAX};
pub(crate) use super::settings::{Settings, WhenLimited};
use super::usage::ServerLimits;
use crate::util::clock::Origin;

struct Waiter {
    id: u64,
    tokens: u64,
    waker: Option<Waker>,
}

struct State {
    req: Option<Dimension>,
    tok: Option<Dimension>,
    paused_until: u64,
    waiters: VecDeque<Waiter>,
    next_id: u64,
    last_used: u64,
    /// The open lease's grant (the lease is open exactly when this is set),
    /// and the number of the last lease opened.
    lease: Option<Grant>,
    epoch: u64,
    /// The tokens of the last call that came to the lock: the lease gives
    /// each of its words at least that many.
    cost: u64,
}

impl State {
    #[inline]
    fn fits(&mut self, tokens: u64, now: u64) -> bool {
        self.req.as_mut().is_none_or(|d| d.fits(1, now))
            && self.tok.as_mut().is_none_or(|d| d.fits(tokens, now))
    }

    #[inline]
    fn admit(&mut self, tokens: u64, now: u64) -> Ticket {
        self.last_used = now;
        Ticket {
            req_seq: self.req.as_mut().map_or(u64::MAX, |d| d.admit(1, now)),
            tok_seq: self.tok.as_mut().map_or(u64::MAX, |d| d.admit(tokens, now)),
            tokens,
        }
    }

    /// When a call of `tokens` could go, with nobody ahead of it.
    fn earliest(&mut self, tokens: u64, now: u64) -> Option<u64> {
        let mut at = now.max(self.paused_until);
        if let Some(d) = self.req.as_mut() {
            at = at.max(d.earliest(1, now)?);
        }
        if let Some(d) = self.tok.as_mut() {
            at = at.max(d.earliest(tokens, now)?);
        }
        Some(at)
    }

    fn head_waker(&mut self) -> Option<Waker> {
        self.waiters.front_mut().and_then(|w| w.waker.take())
    }
}

/// An admitted call's charges, for settling.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ticket {
    req_seq: u64,
    tok_seq: u64,
    tokens: u64,
}

impl Ticket {
    /// A call of `tokens` taken from a lease, booked into its log entries.
    #[inline]
    fn booked(entries: Option<(u64, u64)>, tokens: u64) -> Option<Self> {
        entries.map(|(req_seq, tok_seq)| Self {
            req_seq,
            tok_seq,
            tokens,
        })
    }
}

/// The answer to a call's arrival.
pub(crate) enum Arrival {
    Admitted(Ticket),
    Queued(u64),
    Rejected(Duration),
}

/// The answer to a waiting call's poll.
pub(crate) enum WaitPoll {
    Admitted(Ticket),
    /// Not yet; check again at this instant (the head of the line), or when
    /// woken (the others).
    Pending(Option<Instant>),
}

/// One key's limiter.
pub(crate) struct Limiter {
    /// The fast path (its words, written on every admitted call, each on a
    /// cache line of its own, away from what every call only reads).
    lease: Lease,
    /// A call's request cost (0 without a request limit), and whether
    /// tokens are limited.
    req_cost: u64,
    tok_on: bool,
    state: Mutex<State>,
    /// No call waiting and no pause set: `poll_ready` may ready the inner
    /// service. A hint only (read without the lock).
    clear: AtomicBool,
    /// Where the limiter's time (nanoseconds) counts from, and the
    /// per-call clock.
    clock: Origin,
    /// Its number in the registry (`registry.rs`).
    pub(crate) id: u64,
    pub(crate) settings: Arc<Settings>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("clear", &self.is_clear())
            .finish_non_exhaustive()
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Limiter {
    /// Made by `registry::new_limiter` only, which numbers and registers
    /// it (a detached call finds its limiter there).
    pub(super) fn new(settings: Arc<Settings>, origin: Origin, id: u64) -> Self {
        let dim = |c: Option<(u64, u64)>| c.map(|(l, b)| Dimension::new(l, b, settings.window));
        Self {
            state: Mutex::new(State {
                req: dim(settings.requests),
                tok: dim(settings.tokens),
                paused_until: 0,
                waiters: VecDeque::new(),
                next_id: 0,
                last_used: 0,
                lease: None,
                epoch: 0,
                cost: 0,
            }),
            lease: Lease::new(shards()),
            req_cost: u64::from(settings.requests.is_some()),
            tok_on: settings.tokens.is_some(),
            clear: AtomicBool::new(true),
            clock: origin,
            id,
            settings,
        }
    }

    /// Locks the state and closes the lease, folding what calls took from
    /// it into the bucket and the log; returns the time, read after the
    /// close (so at or after every call taken from the lease).
    fn lock(&self) -> (MutexGuard<'_, State>, u64) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let grant = st.lease.take();
        let left = self.lease.close();
        let now = self.now();
        if let (Some(g), Some(left)) = (grant, left) {
            // Taken strictly before the end, and before now.
            let at = now.min(g.end.saturating_sub(1));
            let requests = g.requests - left.requests;
            let tokens = g.tokens - left.tokens;
            if let Some(d) = st.req.as_mut() {
                d.fold(g.req_seq, requests, at);
            }
            if let Some(d) = st.tok.as_mut() {
                d.fold(g.tok_seq, tokens, at);
            }
            if requests > 0 || tokens > 0 {
                st.last_used = st.last_used.max(at);
            }
        }
        (st, now)
    }

    /// Opens a lease with what could go at once, when nobody waits and no
    /// pause holds (under the lock, the lease closed).
    fn reopen(&self, st: &mut State, now: u64) {
        if !st.waiters.is_empty() || st.paused_until > now {
            return;
        }
        let requests = st.req.as_mut().map_or(REQ_MAX, |d| d.allowance(now));
        let tokens = st.tok.as_mut().map_or(TOK_MAX, |d| d.allowance(now));
        if requests == 0 || tokens == 0 {
            return;
        }
        let mut grant = Grant {
            end: u64::MAX,
            req_seq: u64::MAX,
            tok_seq: u64::MAX,
            requests: requests.min(REQ_MAX),
            tokens: tokens.min(TOK_MAX),
        };
        if let Some(d) = st.req.as_mut() {
            let (seq, end) = d.lease_entry(now);
            grant.req_seq = seq;
            grant.end = grant.end.min(end);
        }
        if let Some(d) = st.tok.as_mut() {
            let (seq, end) = d.lease_entry(now);
            grant.tok_seq = seq;
            grant.end = grant.end.min(end);
        }
        st.epoch += 1;
        self.lease.open(st.epoch, &grant, st.cost);
        st.lease = Some(grant);
    }

    /// The time in nanoseconds from the origin (tokio's clock: paused time
    /// in tests), read now.
    #[inline]
    fn now(&self) -> u64 {
        self.clock.nanos_at(Instant::now())
    }

    fn instant(&self, at: u64) -> Instant {
        self.clock.instant() + Duration::from_nanos(at)
    }

    fn update_clear(&self, st: &State, now: u64) {
        let clear = st.waiters.is_empty() && st.paused_until <= now;
        if self.clear.load(Ordering::Relaxed) != clear {
            self.clear.store(clear, Ordering::Relaxed);
        }
    }

    #[inline]
    pub(crate) fn is_clear(&self) -> bool {
        self.clear.load(Ordering::Relaxed)
    }

    /// A call of `tokens` arrives: admitted at once, queued, or refused.
    /// Admitted from the lease without the lock when it can be.
    #[inline]
    pub(crate) fn arrive(&self, tokens: u64) -> Arrival {
        let now = self.now_late();
        match self.take(tokens, now) {
            Some(ticket) => Arrival::Admitted(ticket),
            None => self.arrive_locked(tokens, now),
        }
    }

    /// A call of `tokens` admitted from the lease (its one word, or this
    /// thread's word of a split lease; no lock, no event), if it can be.
    #[inline]
    pub(crate) fn arrive_unlocked(&self, tokens: u64) -> Option<Ticket> {
        let now = self.now_late();
        self.take(tokens, now)
            .or_else(|| self.take_split(tokens, now))
    }

    /// The per-call clock, read so that it is never behind the true time:
    /// the lease ends, if anything, a kernel tick early (with `test-util`,
    /// tokio's clock, and inside an agent pipeline's poll the reading its
    /// layers share: a reading a little behind is one taken just before a
    /// preemption, checked against the lease's end all the same). The
    /// locked path reads afresh.
    #[inline]
    fn now_late(&self) -> u64 {
        self.clock.elapsed_nanos_late()
    }

    /// What a call of `tokens` costs in the token dimension.
    #[inline]
    fn tok_cost(&self, tokens: u64) -> u64 {
        if self.tok_on {
            tokens
        } else {
            0
        }
    }

    /// From the lease's one word.
    #[inline]
    fn take(&self, tokens: u64, now: u64) -> Option<Ticket> {
        let taken = self.lease.take(now, self.req_cost, self.tok_cost(tokens));
        Ticket::booked(taken, tokens)
    }

    /// From this thread's word of a split lease (out of line: a call to it
    /// on the one-word path, even one never made, slowed every call).
    #[inline(never)]
    fn take_split(&self, tokens: u64, now: u64) -> Option<Ticket> {
        let cost = self.tok_cost(tokens);
        let taken = self
            .lease
            .take_split(thread_number, now, self.req_cost, cost);
        Ticket::booked(taken, tokens)
    }

    #[inline(never)]
    fn arrive_locked(&self, tokens: u64, now: u64) -> Arrival {
        if let Some(ticket) = self.take_split(tokens, now) {
            return Arrival::Admitted(ticket);
        }
        let (mut st, now) = self.lock();
        st.cost = self.tok_cost(tokens);
        if st.waiters.is_empty() && st.paused_until <= now && st.fits(tokens, now) {
            let ticket = st.admit(tokens, now);
            self.reopen(&mut st, now);
            return Arrival::Admitted(ticket);
        }
        self.arrive_slow(st, tokens, now)
    }

    #[cold]
    fn arrive_slow(&self, mut st: MutexGuard<'_, State>, tokens: u64, now: u64) -> Arrival {
        let window = Duration::from_nanos(self.settings.window);
        let Some(at) = st.earliest(tokens, now) else {
            self.reopen(&mut st, now);
            drop(st);
            // Above the limit itself: it can never go.
            self.settings.emit(Kind::Rejected, None, Some(window));
            return Arrival::Rejected(window);
        };
        let wait = Duration::from_nanos(at - now);
        // Under an agent pipeline, a wait that would outlast the call's
        // deadline is refused at once: the fallback moves on.
        let within_deadline =
            crate::fallback::current_deadline().is_none_or(|d| self.instant(at) < d);
        let queue = match self.settings.when_limited {
            WhenLimited::Wait { max_wait } => wait <= max_wait && within_deadline,
            WhenLimited::Reject => false,
        };
        if !queue {
            self.reopen(&mut st, now);
            drop(st);
            self.settings.emit(Kind::Rejected, None, Some(wait));
            return Arrival::Rejected(wait);
        }
        let id = st.next_id;
        st.next_id += 1;
        st.waiters.push_back(Waiter {
            id,
            tokens,
            waker: None,
        });
        self.update_clear(&st, now);
        drop(st);
        self.settings.emit(Kind::Queued, None, None);
        Arrival::Queued(id)
    }

    /// A waiting call is polled: the head of the line is admitted when its
    /// time has come; the others wait to become the head.
    pub(crate) fn poll_wait(&self, id: u64, waker: &Waker) -> WaitPoll {
        let (mut st, now) = self.lock();
        let is_head = st.waiters.front().is_some_and(|w| w.id == id);
        if !is_head {
            if let Some(w) = st.waiters.iter_mut().find(|w| w.id == id) {
                if !w.waker.as_ref().is_some_and(|old| old.will_wake(waker)) {
                    w.waker = Some(waker.clone());
                }
            }
            return WaitPoll::Pending(None);
        }
        let tokens = st.waiters[0].tokens;
        // `earliest` exists (checked on arrival) unless the server lowered
        // the limit below this call's cost since: then it waits out its
        // maximum wait.
        let at = st
            .earliest(tokens, now)
            .unwrap_or(now.saturating_add(self.settings.window));
        if at <= now && st.fits(tokens, now) {
            let ticket = st.admit(tokens, now);
            st.waiters.pop_front();
            let next = st.head_waker();
            self.update_clear(&st, now);
            self.reopen(&mut st, now);
            drop(st);
            if let Some(w) = next {
                w.wake();
            }
            return WaitPoll::Admitted(ticket);
        }
        if let Some(w) = st.waiters.front_mut() {
            if !w.waker.as_ref().is_some_and(|old| old.will_wake(waker)) {
                w.waker = Some(waker.clone());
            }
        }
        WaitPoll::Pending(Some(self.instant(at.max(now + 1))))
    }

    /// Takes a waiting call out of line (its caller gave up, or its wait ran
    /// out); the next in line takes its place at once. Returns the wait it
    /// would still have had, when it was the head.
    pub(crate) fn leave(&self, id: u64) -> Option<Duration> {
        let (mut st, now) = self.lock();
        let Some(pos) = st.waiters.iter().position(|w| w.id == id) else {
            self.reopen(&mut st, now);
            return None;
        };
        let tokens = st.waiters[pos].tokens;
        let left = st
            .earliest(tokens, now)
            .map(|at| Duration::from_nanos(at - now));
        st.waiters.remove(pos);
        let next = if pos == 0 { st.head_waker() } else { None };
        self.update_clear(&st, now);
        self.reopen(&mut st, now);
        drop(st);
        if let Some(w) = next {
            w.wake();
        }
        left
    }

    fn scale(&self, server_limit: Option<u64>) -> Option<u64> {
        let server_window = self.settings.server_window?;
        server_limit.map(|l| {
            super::scale_limit(
                l,
                Duration::from_nanos(self.settings.window),
                Duration::from_nanos(server_window),
            )
        })
    }

    fn steer(&self, st: &mut State, server: &ServerLimits, now: u64) -> bool {
        if server.is_empty() || self.settings.server_window.is_none() {
            return false;
        }
        let mut lowered = false;
        if let Some(d) = st.req.as_mut() {
            lowered |= d.steer(
                self.scale(server.requests.limit),
                server.requests.remaining,
                now,
            );
        }
        if let Some(d) = st.tok.as_mut() {
            lowered |= d.steer(
                self.scale(server.tokens.limit),
                server.tokens.remaining,
                now,
            );
        }
        lowered
    }

    /// A call ended: refund or charge the difference between its estimate
    /// and the tokens it used, and follow what the server said is left.
    pub(crate) fn settle(&self, ticket: Ticket, used: Option<u64>, server: &ServerLimits) {
        if used.is_none() && server.is_empty() {
            return;
        }
        let (mut st, now) = self.lock();
        if let (Some(used), Some(d)) = (used, st.tok.as_mut()) {
            if used < ticket.tokens {
                d.refund(ticket.tok_seq, ticket.tokens - used, now);
            } else {
                d.overrun(used - ticket.tokens, now);
            }
        }
        let lowered = self.steer(&mut st, server, now);
        self.reopen(&mut st, now);
        let head = st.head_waker();
        drop(st);
        if let Some(w) = head {
            w.wake();
        }
        if lowered {
            self.settings.emit(Kind::Steered, None, None);
        }
    }

    /// An admitted call was never sent (or a layer below refused it without
    /// sending): its charges come back.
    pub(crate) fn refund_all(&self, ticket: Ticket) {
        let (mut st, now) = self.lock();
        if let Some(d) = st.req.as_mut() {
            d.refund(ticket.req_seq, 1, now);
        }
        if let Some(d) = st.tok.as_mut() {
            d.refund(ticket.tok_seq, ticket.tokens, now);
        }
        self.reopen(&mut st, now);
        let head = st.head_waker();
        drop(st);
        if let Some(w) = head {
            w.wake();
        }
    }

    /// A call was refused with a 429: the server charged nothing, so the
    /// call's charges come back; every call on this key waits for the hint
    /// (capped), or, without one, the burst is gone.
    pub(crate) fn rate_limited(
        &self,
        ticket: Ticket,
        hint: Option<Duration>,
        server: &ServerLimits,
    ) {
        let (mut st, now) = self.lock();
        if let Some(d) = st.req.as_mut() {
            d.refund(ticket.req_seq, 1, now);
        }
        if let Some(d) = st.tok.as_mut() {
            d.refund(ticket.tok_seq, ticket.tokens, now);
        }
        self.steer(&mut st, server, now);
        let mut paused = None;
        match hint {
            Some(h) => {
                let h = h.min(self.settings.hint_cap);
                let until = now.saturating_add(nanos(h));
                if until > st.paused_until {
                    if st.paused_until <= now {
                        paused = Some(h);
                    }
                    st.paused_until = until;
                }
            }
            None => {
                if let Some(d) = st.req.as_mut() {
                    d.drain(now);
                }
                if let Some(d) = st.tok.as_mut() {
                    d.drain(now);
                }
            }
        }
        self.update_clear(&st, now);
        self.reopen(&mut st, now);
        let head = st.head_waker();
        drop(st);
        if let Some(w) = head {
            w.wake();
        }
        if paused.is_some() {
            self.settings.emit(Kind::Paused, None, paused);
        }
    }

    /// Requests and tokens that could go at once now (`None` for an
    /// unlimited dimension), and the pause left.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let (mut st, now) = self.lock();
        let snapshot = Snapshot {
            requests: st.req.as_mut().map(|d| d.remaining(now)),
            tokens: st.tok.as_mut().map(|d| d.remaining(now)),
            request_limit: st.req.as_ref().map(|d| d.effective_limit()),
            token_limit: st.tok.as_ref().map(|d| d.effective_limit()),
            paused_for: Duration::from_nanos(st.paused_until.saturating_sub(now)),
            waiting: st.waiters.len(),
        };
        self.reopen(&mut st, now);
        snapshot
    }

    /// Whether nothing is waiting and the key's history has left the window
    /// (evicting it loses nothing), and when it was last used.
    pub(crate) fn idle(&self) -> (bool, u64) {
        let (mut st, now) = self.lock();
        let quiet = st.waiters.is_empty()
            && st.paused_until <= now
            && st.last_used.saturating_add(self.settings.window) <= now;
        let last_used = st.last_used;
        self.reopen(&mut st, now);
        (quiet, last_used)
    }
}
