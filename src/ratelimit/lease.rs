//! The lock-free fast path: a lease of budget that the locked limiter
//! grants, and that calls admitted at once draw from with one
//! compare-and-swap.
//!
//! Under its lock the limiter works out how many requests and tokens could
//! go right now without breaking the bucket or the window (what could go
//! now can go at any later instant too: the bucket only refills and the
//! log only empties), books an entry of its sliding log for them, and
//! opens a lease with that allowance, valid until the entry's time is up
//! (at most 1/128 of the window). A call then takes its cost from the word
//! with one compare-and-swap, if the lease is open, its time is not up and
//! enough is left. Everything else (the waiting line, a pause, settling,
//! steering, a snapshot) first closes the lease under the lock and folds
//! what was taken into the bucket and the log: the locked state is then
//! exact again.
//!
//! The word: bit 63 open, bits 43 to 62 the lease's number (so that a
//! compare-and-swap on a later lease's word fails), bits 22 to 42 the
//! requests left, bits 0 to 21 the tokens left. The lease's end and its log
//! entries are written before the word opens it (release) and read after
//! it (acquire), before the compare-and-swap: a call that read a later
//! lease's end or entries has its compare-and-swap fail, because the close
//! that came before them is ordered before it.

use super::sync::{AtomicU64, Ordering};

const OPEN: u64 = 1 << 63;
const EPOCH_SHIFT: u32 = 43;
const EPOCH_MASK: u64 = (1 << 20) - 1;
const REQ_SHIFT: u32 = 22;
/// The most requests one lease holds.
pub(crate) const REQ_MAX: u64 = (1 << 21) - 1;
/// The most tokens one lease holds.
pub(crate) const TOK_MAX: u64 = (1 << 22) - 1;

/// What the lock grants to the fast path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Grant {
    /// Calls are taken only strictly before this instant (ns from the
    /// limiter's origin).
    pub(crate) end: u64,
    /// The log entries the calls are booked into (`u64::MAX`: no such
    /// dimension).
    pub(crate) req_seq: u64,
    pub(crate) tok_seq: u64,
    /// The allowance (at most [`REQ_MAX`] and [`TOK_MAX`]).
    pub(crate) requests: u64,
    pub(crate) tokens: u64,
}

/// What was left of a lease when it closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Left {
    pub(crate) requests: u64,
    pub(crate) tokens: u64,
}

/// The fast path's state (see the module's docs).
#[derive(Debug)]
pub(crate) struct Lease {
    word: AtomicU64,
    end: AtomicU64,
    req_seq: AtomicU64,
    tok_seq: AtomicU64,
}

impl Lease {
    /// A closed lease.
    pub(crate) fn new() -> Self {
        Self {
            word: AtomicU64::new(0),
            end: AtomicU64::new(0),
            req_seq: AtomicU64::new(u64::MAX),
            tok_seq: AtomicU64::new(u64::MAX),
        }
    }

    /// Takes `requests` and `tokens` at `now` if the lease is open, its
    /// time is not up and that much is left; returns the log entries they
    /// are booked into.
    #[inline]
    pub(crate) fn take(&self, now: u64, requests: u64, tokens: u64) -> Option<(u64, u64)> {
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            if word & OPEN == 0
                || (word >> REQ_SHIFT) & REQ_MAX < requests
                || word & TOK_MAX < tokens
            {
                return None;
            }
            // Read before the compare-and-swap: if any of these belongs to
            // a later lease, the exchange below fails.
            if now >= self.end.load(Ordering::Acquire) {
                return None;
            }
            let seqs = (
                self.req_seq.load(Ordering::Acquire),
                self.tok_seq.load(Ordering::Acquire),
            );
            let next = word - (requests << REQ_SHIFT) - tokens;
            match self
                .word
                .compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(seqs),
                Err(now_word) => word = now_word,
            }
        }
    }

    /// Closes the lease (under the limiter's lock); what was left of it, if
    /// it was open. Every call taken from it is ordered before this.
    pub(crate) fn close(&self) -> Option<Left> {
        let word = self.word.swap(0, Ordering::AcqRel);
        (word & OPEN != 0).then_some(Left {
            requests: (word >> REQ_SHIFT) & REQ_MAX,
            tokens: word & TOK_MAX,
        })
    }

    /// Opens lease number `epoch` (under the limiter's lock, when closed).
    pub(crate) fn open(&self, epoch: u64, grant: &Grant) {
        debug_assert!(grant.requests <= REQ_MAX && grant.tokens <= TOK_MAX);
        self.end.store(grant.end, Ordering::Release);
        self.req_seq.store(grant.req_seq, Ordering::Release);
        self.tok_seq.store(grant.tok_seq, Ordering::Release);
        let word = OPEN
            | (epoch & EPOCH_MASK) << EPOCH_SHIFT
            | grant.requests.min(REQ_MAX) << REQ_SHIFT
            | grant.tokens.min(TOK_MAX);
        self.word.store(word, Ordering::Release);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn grant(requests: u64, tokens: u64) -> Grant {
        Grant {
            end: 100,
            req_seq: 3,
            tok_seq: 7,
            requests,
            tokens,
        }
    }

    #[test]
    fn takes_until_empty_or_late_and_closes_with_the_rest() {
        let l = Lease::new();
        assert_eq!(l.take(0, 1, 0), None, "closed");
        l.open(1, &grant(2, 10));
        assert_eq!(l.take(0, 1, 4), Some((3, 7)));
        assert_eq!(l.take(99, 1, 7), None, "not enough tokens");
        assert_eq!(l.take(100, 1, 1), None, "time is up");
        assert_eq!(l.take(99, 1, 6), Some((3, 7)));
        assert_eq!(l.take(99, 1, 0), None, "no request left");
        assert_eq!(l.take(99, 0, 0), Some((3, 7)));
        assert_eq!(
            l.close(),
            Some(Left {
                requests: 0,
                tokens: 0
            })
        );
        assert_eq!(l.close(), None);
        assert_eq!(l.take(0, 0, 0), None);
    }

    #[test]
    fn the_fields_do_not_spill_into_each_other() {
        let l = Lease::new();
        l.open(EPOCH_MASK, &grant(REQ_MAX, TOK_MAX));
        assert!(l.take(0, 1, TOK_MAX).is_some());
        assert_eq!(
            l.close(),
            Some(Left {
                requests: REQ_MAX - 1,
                tokens: 0
            })
        );
    }
}
