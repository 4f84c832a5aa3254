//! The lock-free fast path: a lease of budget that the locked limiter
//! grants, and that calls admitted at once draw from with one
//! compare-and-swap.
//!
//! Under its lock the limiter works out how many requests and tokens could
//! go right now without breaking the bucket or the window (what could go
//! now can go at any later instant too: the bucket only refills and the
//! log only empties), books an entry of its sliding log for them, and
//! opens a lease with that allowance, valid until the entry's time is up
//! (at most 1/128 of the window). A call then takes its cost from a word
//! with one compare-and-swap, if the lease is open, its time is not up and
//! enough is left. Everything else (the waiting line, a pause, settling,
//! steering, a snapshot) first closes the lease under the lock and folds
//! what was taken into the bucket and the log: the locked state is then
//! exact again.
//!
//! **One word, then one per core.** A lease starts as one word, next to
//! what every call reads. When calls from two threads race for it (a
//! compare-and-swap lost to another call's take), every call of every
//! thread is writing that one cache line, which then moves between cores
//! on each call: with 64 tasks on 2 workers, half of each call's time. From
//! then on each lease is split between up to [`MAX_SHARDS`] words (one per
//! core), each on a cache line of its own, and a call takes from the word
//! its thread maps to (its number, masked by the number of open words: a
//! routing hint only, so a stale count is harmless). The call that lost
//! the race goes to the lock, which opens the first split lease. A word
//! that runs dry sends its calls to the lock, which closes every word,
//! folds what they took and opens the next lease split afresh: a word that
//! is dry while another has plenty costs one locked call, never a refusal
//! the limit does not require. A lease too small to give each word one
//! call (one request, and the last locked call's tokens) opens fewer. A
//! split lease keeps the one word closed, so the one-word path never looks
//! at the split words: it stays as short as it was before they existed.
//!
//! A word: bit 63 open, bits 43 to 62 the lease's number (so that a
//! compare-and-swap on a later lease's word fails), bits 22 to 42 the
//! requests left, bits 0 to 21 the tokens left. The lease's end and its log
//! entries are written before the words open it (release) and read after
//! a word (acquire), before the compare-and-swap: a call that read a later
//! lease's end or entries has its compare-and-swap fail, because the close
//! of every word that came before them is ordered before it. The number
//! has 20 bits: a call would take from the wrong lease only if it were held
//! up between reading a word and its compare-and-swap while exactly a
//! multiple of 2^20 leases (each one a locked call) opened, and the word
//! then held the same allowance to the token.

use std::cell::Cell;
use std::sync::OnceLock;

use super::sync::{AtomicBool, AtomicU64, Ordering, Padded};

const OPEN: u64 = 1 << 63;
const EPOCH_SHIFT: u32 = 43;
const EPOCH_MASK: u64 = (1 << 20) - 1;
const REQ_SHIFT: u32 = 22;
/// The most requests one lease holds.
pub(crate) const REQ_MAX: u64 = (1 << 21) - 1;
/// The most tokens one lease holds.
pub(crate) const TOK_MAX: u64 = (1 << 22) - 1;
/// The most words a lease is split into (a power of two): one per core, up
/// to eight cores' worth; more threads share them.
pub(crate) const MAX_SHARDS: usize = 8;

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

/// The unsplit lease's word with what every call reads: written by a
/// call only while the lease is one word (the calls then come from one
/// thread at a time, in effect).
#[derive(Debug)]
struct Head {
    word: AtomicU64,
    end: AtomicU64,
    req_seq: AtomicU64,
    tok_seq: AtomicU64,
    /// 0: the lease is `word`; otherwise the open split words less one
    /// (a mask: where a thread finds its word).
    mask: AtomicU64,
    /// Two calls have raced for `word`: leases from now on are split.
    split: AtomicBool,
}

/// The fast path's state (see the module's docs).
#[derive(Debug)]
pub(crate) struct Lease {
    head: Padded<Head>,
    /// The words of a split lease, each on a line of its own (none when
    /// a lease may open only one).
    words: Box<[Padded<AtomicU64>]>,
}

impl Lease {
    /// A closed lease that opens at most `shards` words (clamped to 1 to
    /// [`MAX_SHARDS`] and rounded down to a power of two; [`shards`] gives
    /// one). One word needs no split words.
    pub(crate) fn new(shards: usize) -> Self {
        let shards = shards.clamp(1, MAX_SHARDS);
        let shards = if shards == 1 {
            0
        } else {
            1usize << shards.ilog2()
        };
        Self {
            head: Padded(Head {
                word: AtomicU64::new(0),
                end: AtomicU64::new(0),
                req_seq: AtomicU64::new(u64::MAX),
                tok_seq: AtomicU64::new(u64::MAX),
                mask: AtomicU64::new(0),
                split: AtomicBool::new(false),
            }),
            words: (0..shards).map(|_| Padded(AtomicU64::new(0))).collect(),
        }
    }

    /// Every word, the unsplit one first.
    fn all_words(&self) -> impl Iterator<Item = &AtomicU64> {
        std::iter::once(&self.head.word).chain(self.words.iter().map(|w| &w.0))
    }

    /// Splits the leases opened from now on (as a race between two calls
    /// does).
    pub(crate) fn split(&self) {
        self.head.split.store(true, Ordering::Relaxed);
    }

    /// Takes `requests` and `tokens` at `now` from the lease's one word,
    /// if the lease is open there (it is not when split), its time is not
    /// up and that much is left; returns the log entries they are booked
    /// into.
    #[inline]
    pub(crate) fn take(&self, now: u64, requests: u64, tokens: u64) -> Option<(u64, u64)> {
        let word = self.head.word.load(Ordering::Acquire);
        if word & OPEN == 0 {
            // Closed, or split: the split words are tried off this path
            // (a call to them here, even one never made, slowed every
            // call by a tenth).
            return None;
        }
        self.take_from(&self.head.word, word, true, now, requests, tokens)
    }

    /// The same from a split lease's word that the thread numbered
    /// `thread` maps to; `None` at once when the lease is not split.
    #[inline]
    pub(crate) fn take_split(
        &self,
        thread: impl FnOnce() -> usize,
        now: u64,
        requests: u64,
        tokens: u64,
    ) -> Option<(u64, u64)> {
        // A routing hint only (see the module's docs).
        let mask = self.head.mask.load(Ordering::Relaxed) as usize;
        if mask == 0 {
            return None;
        }
        let cell = &self.words.get(thread() & mask)?.0;
        let word = cell.load(Ordering::Acquire);
        self.take_from(cell, word, false, now, requests, tokens)
    }

    /// Takes from `cell`, last read as `word`.
    #[inline(always)]
    fn take_from(
        &self,
        cell: &AtomicU64,
        mut word: u64,
        single: bool,
        now: u64,
        requests: u64,
        tokens: u64,
    ) -> Option<(u64, u64)> {
        let head = &self.head.0;
        loop {
            if word & OPEN == 0
                || (word >> REQ_SHIFT) & REQ_MAX < requests
                || word & TOK_MAX < tokens
            {
                return None;
            }
            // Read before the compare-and-swap: if any of these belongs to
            // a later lease, the exchange below fails. (Acquire, for the
            // argument in the module's docs; loom cannot check these three:
            // its compare-and-swap always sees the latest word, so the
            // models pass with them relaxed. Do not weaken them.)
            if now >= head.end.load(Ordering::Acquire) {
                return None;
            }
            let seqs = (
                head.req_seq.load(Ordering::Acquire),
                head.tok_seq.load(Ordering::Acquire),
            );
            let next = word - (requests << REQ_SHIFT) - tokens;
            match cell.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(seqs),
                Err(now_word) => {
                    if single && self.raced(word, now_word) {
                        return None;
                    }
                    word = now_word;
                }
            }
        }
    }

    /// Whether the one word's change from `was` to `now` was another
    /// call's take (the same lease, still open, less left): if so (the
    /// first time), the next lease is split and this call goes to the
    /// lock, which opens it. A close, or a close and the next lease's
    /// opening (the lock's work, as a settlement does it), is no race.
    #[cold]
    fn raced(&self, was: u64, now: u64) -> bool {
        let same_lease = (now ^ was) >> EPOCH_SHIFT == 0;
        if now == was || !same_lease || now & OPEN == 0 || self.words.is_empty() {
            return false;
        }
        if self.head.split.load(Ordering::Relaxed) {
            return false;
        }
        self.split();
        true
    }

    /// Closes the lease (under the limiter's lock); what was left of it, if
    /// it was open. Every call taken from it is ordered before this.
    pub(crate) fn close(&self) -> Option<Left> {
        let mut left: Option<Left> = None;
        for cell in self.all_words() {
            let word = cell.swap(0, Ordering::AcqRel);
            if word & OPEN != 0 {
                let l = left.get_or_insert(Left {
                    requests: 0,
                    tokens: 0,
                });
                l.requests += (word >> REQ_SHIFT) & REQ_MAX;
                l.tokens += word & TOK_MAX;
            }
        }
        left
    }

    /// Opens lease number `epoch` (under the limiter's lock, when closed):
    /// one word until two calls have raced for it, then split between as
    /// many words as give each at least one request and `cost` tokens.
    pub(crate) fn open(&self, epoch: u64, grant: &Grant, cost: u64) {
        debug_assert!(grant.requests <= REQ_MAX && grant.tokens <= TOK_MAX);
        let head = &self.head.0;
        let requests = grant.requests.min(REQ_MAX);
        let tokens = grant.tokens.min(TOK_MAX);
        let n = if head.split.load(Ordering::Relaxed) {
            let fit = requests.min(tokens / cost.max(1));
            1u64 << (self.words.len() as u64).min(fit).max(1).ilog2()
        } else {
            1
        };
        head.end.store(grant.end, Ordering::Release);
        head.req_seq.store(grant.req_seq, Ordering::Release);
        head.tok_seq.store(grant.tok_seq, Ordering::Release);
        let top = OPEN | (epoch & EPOCH_MASK) << EPOCH_SHIFT;
        if n == 1 {
            head.mask.store(0, Ordering::Relaxed);
            head.word
                .store(top | requests << REQ_SHIFT | tokens, Ordering::Release);
            return;
        }
        head.mask.store(n - 1, Ordering::Relaxed);
        for (i, cell) in self.words.iter().take(n as usize).enumerate() {
            // The first word also takes what does not split evenly.
            let (r, t) = if i == 0 {
                (requests / n + requests % n, tokens / n + tokens % n)
            } else {
                (requests / n, tokens / n)
            };
            cell.0.store(top | r << REQ_SHIFT | t, Ordering::Release);
        }
    }
}

/// How many words a lease is split into: one per core (rounded up to a
/// power of two, at most [`MAX_SHARDS`]).
pub(crate) fn shards() -> usize {
    static SHARDS: OnceLock<usize> = OnceLock::new();
    *SHARDS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.next_power_of_two().min(MAX_SHARDS)
    })
}

/// This thread's number, which picks its word of a lease: threads are
/// numbered in the order they first call a limiter, so a runtime's
/// workers, which start together, get words of their own.
#[inline]
pub(crate) fn thread_number() -> usize {
    thread_local! {
        static NUMBER: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    let n = NUMBER.get();
    if n != usize::MAX {
        return n;
    }
    number_thread(&NUMBER)
}

#[cold]
fn number_thread(slot: &'static std::thread::LocalKey<Cell<usize>>) -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    // Never the unset mark; only the low bits pick a word.
    let n = NEXT.fetch_add(1, Relaxed) & (usize::MAX >> 1);
    slot.set(n);
    n
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
        let l = Lease::new(1);
        assert_eq!(l.take(0, 1, 0), None, "closed");
        l.open(1, &grant(2, 10), 0);
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
        let l = Lease::new(1);
        l.open(EPOCH_MASK, &grant(REQ_MAX, TOK_MAX), 0);
        assert!(l.take(0, 1, TOK_MAX).is_some());
        assert_eq!(
            l.close(),
            Some(Left {
                requests: REQ_MAX - 1,
                tokens: 0
            })
        );
    }

    #[test]
    fn a_lease_is_one_word_until_it_is_split() {
        let l = Lease::new(4);
        l.open(1, &grant(8, 800), 0);
        assert_eq!(l.take_split(|| 1, 0, 1, 0), None, "not split");
        assert!(l.take(0, 8, 800).is_some(), "all of it on one word");
        assert_eq!(l.close().map(|l| l.requests), Some(0));
        l.split();
        l.open(2, &grant(8, 800), 0);
        assert!(
            l.take_split(|| 1, 0, 2, 200).is_some(),
            "word 1 holds 2 of 8"
        );
        assert_eq!(l.take_split(|| 5, 0, 1, 0), None, "word 1 is spent");
        assert_eq!(l.close().map(|l| l.requests), Some(6));
    }

    #[test]
    fn a_lease_splits_between_the_words_and_closes_with_their_sum() {
        let l = Lease::new(4);
        l.split();
        // 4 words: 3 + 2 + 2 + 2 requests, 103 + 100 + 100 + 100 tokens.
        l.open(1, &grant(9, 403), 0);
        // Threads 1 and 5 share a word; thread 0's word has the remainder.
        assert!(l.take_split(|| 1, 0, 2, 100).is_some());
        assert_eq!(
            l.take_split(|| 5, 0, 1, 1),
            None,
            "thread 1's word is spent"
        );
        assert_eq!(l.take_split(|| 2, 0, 3, 0), None, "a word holds 2 requests");
        assert!(
            l.take_split(|| 0, 0, 3, 103).is_some(),
            "the first word holds 3"
        );
        assert_eq!(
            l.close(),
            Some(Left {
                requests: 4,
                tokens: 200
            })
        );
        assert_eq!(l.take_split(|| 2, 0, 1, 0), None, "every word closed");
    }

    #[test]
    fn a_split_lease_opens_only_words_that_hold_a_call() {
        let l = Lease::new(8);
        l.split();
        // 3 requests: two words (a power of two), 2 + 1.
        l.open(1, &grant(3, 1_000), 0);
        assert!(l.take_split(|| 0, 0, 2, 0).is_some());
        assert!(
            l.take_split(|| 3, 0, 1, 0).is_some(),
            "thread 3 maps to word 1"
        );
        assert_eq!(l.take_split(|| 2, 0, 1, 0), None, "word 0 is spent");
        assert_eq!(l.close().map(|l| l.requests), Some(0));
        // 1 000 tokens at 300 a call: three calls' worth, two words.
        l.open(2, &grant(100, 1_000), 300);
        assert!(l.take_split(|| 1, 0, 1, 500).is_some(), "word 1 holds 500");
        assert_eq!(l.close().map(|l| l.tokens), Some(500));
        // Less than one call's worth: the one word, with all of it.
        l.open(3, &grant(100, 200), 300);
        assert!(l.take(0, 1, 200).is_some(), "not split: the one word");
    }

    #[test]
    fn a_race_for_the_one_word_splits_the_next_lease() {
        let l = Lease::new(2);
        l.open(1, &grant(8, 800), 0);
        let before = l.head.word.load(Ordering::Relaxed);
        let taken = before - (1 << REQ_SHIFT) - 100;
        // Another call's take, seen by a failed compare-and-swap.
        assert!(l.raced(before, taken), "the first race splits");
        assert!(!l.raced(before, taken), "only the first");
        assert!(!Lease::new(2).raced(before, 0), "a close is no race");
        let reopened = Lease::new(2);
        reopened.open(1, &grant(8, 800), 0);
        let w1 = reopened.head.word.load(Ordering::Relaxed);
        reopened.close();
        reopened.open(2, &grant(8, 800), 0);
        let w2 = reopened.head.word.load(Ordering::Relaxed);
        assert!(
            !reopened.raced(w1, w2),
            "nor the lock's close and reopening"
        );
        assert!(
            !Lease::new(2).raced(before, before),
            "nor a spurious failure"
        );
        assert!(
            !Lease::new(1).raced(before, taken),
            "one word only: no split"
        );
        l.close();
        l.open(2, &grant(8, 800), 0);
        assert_eq!(l.take(0, 1, 0), None, "split: the one word stays closed");
        assert!(l.take_split(|| 1, 0, 4, 400).is_some(), "word 1 holds half");
    }

    #[test]
    fn the_word_count_is_a_power_of_two_up_to_the_cap() {
        assert_eq!(Lease::new(0).words.len(), 0, "one word: the head's");
        assert_eq!(Lease::new(1).words.len(), 0);
        assert_eq!(Lease::new(3).words.len(), 2);
        assert_eq!(Lease::new(8).words.len(), 8);
        assert_eq!(Lease::new(64).words.len(), MAX_SHARDS);
    }
}
