//! Tests of the sliding windows: against plain lists, and of the branches
//! only a race or years of traffic reach, driven by hand.

use super::*;

#[test]
fn count_window_evicts_the_oldest_call() {
    let w = Window::count(3);
    assert!(!w.record(true, false, 0, 3));
    assert!(!w.record(true, true, 0, 3));
    w.record(false, false, 0, 3);
    assert_eq!(
        w.counts(0),
        WindowCounts {
            calls: 3,
            failures: 2,
            slow: 1
        }
    );
    w.record(false, false, 0, 3);
    assert_eq!(
        w.counts(0),
        WindowCounts {
            calls: 3,
            failures: 1,
            slow: 1
        }
    );
    w.record(false, false, 0, 3);
    assert_eq!(
        w.counts(0),
        WindowCounts {
            calls: 3,
            failures: 0,
            slow: 0
        }
    );
    w.clear();
    assert_eq!(w.counts(0), WindowCounts::default());
}

#[test]
fn time_window_forgets_seconds_that_leave_it() {
    let w = Window::time(3);
    w.record(true, false, 0, 3);
    w.record(false, false, 1_500, 3);
    assert!(w.record(true, false, 2_999, 3));
    assert_eq!(
        w.counts(2_999),
        WindowCounts {
            calls: 3,
            failures: 2,
            slow: 0
        }
    );
    // Second 3 evicts second 0.
    assert_eq!(
        w.counts(3_000),
        WindowCounts {
            calls: 2,
            failures: 1,
            slow: 0
        }
    );
    // A long gap empties it.
    assert_eq!(w.counts(100_000), WindowCounts::default());
    w.record(true, true, 100_000, 3);
    assert_eq!(
        w.counts(100_000),
        WindowCounts {
            calls: 1,
            failures: 1,
            slow: 1
        }
    );
    w.clear();
    assert_eq!(w.counts(100_000), WindowCounts::default());
}

/// A clear costs the same whatever the window's size: 100 000 clears of
/// the largest windows allowed (a million calls, a day of seconds),
/// each refilled a little, would touch 10^11 slots if a clear visited
/// them; done in O(1), this takes milliseconds.
#[test]
fn clear_is_constant_time_whatever_the_size() {
    let count = Window::count(1_000_000);
    let time = Window::time(86_400);
    for i in 0..100_000u64 {
        for w in [&count, &time] {
            w.record(true, false, i * 10, 1);
            w.record(false, true, i * 10 + 3_000, 1);
            let c = w.counts(i * 10 + 3_000);
            assert_eq!((c.calls, c.failures, c.slow), (2, 1, 1), "round {i}");
            w.clear();
            assert_eq!(w.counts(i * 10 + 3_000), WindowCounts::default());
        }
    }
}

/// The breaker reads the clock for a record only when the window needs
/// it: a count window never does, a time window always.
#[test]
fn only_time_windows_need_the_clock() {
    assert!(!Window::count(3).needs_clock());
    assert!(Window::time(3).needs_clock());
}

/// `record` says when a success may have brought the window to a trip: a
/// count window, the record that brought it to exactly `min_calls` calls;
/// a time window, every record while it holds at least `min_calls` calls
/// and some failure or slow call.
#[test]
fn a_record_says_when_the_window_needs_its_rates_checked() {
    let w = Window::count(5);
    let reached: Vec<bool> = (0..5).map(|i| w.record(i % 2 == 0, false, 0, 3)).collect();
    assert_eq!(reached, [false, false, true, false, false]);
    let w = Window::time(5);
    let reached: Vec<bool> = (0..5).map(|i| w.record(i % 2 == 0, false, 0, 3)).collect();
    assert_eq!(reached, [false, false, true, true, true]);
    // Only successes: never.
    let w = Window::time(5);
    assert!((0..5).all(|_| !w.record(false, false, 0, 3)));
    // The failure leaves the window (5 s later): no longer.
    let w = Window::time(5);
    w.record(true, false, 0, 1);
    assert!(w.record(false, false, 4_999, 1));
    assert!(!w.record(false, false, 5_000, 1));
}

/// The calls of the current second join the total when the window rolls
/// past it, once: a cell sealed by the roll refuses a late record, which
/// counts in the new second instead.
#[test]
fn a_roll_seals_the_current_second_and_counts_it_once() {
    let w = TimeWindow::new(3);
    for _ in 0..4 {
        w.record(false, false, 1, 1);
    }
    let (epoch, at) = w.advance(1);
    assert_eq!(w.calls(epoch, at), 4);
    let cell = &w.buckets[1].calls;
    // Second 2: second 1 is sealed, its calls in the total.
    assert_eq!(w.advance(2), (epoch, 2));
    assert_eq!(cell.load(Ordering::Relaxed), tag(1) << 32 | SEALED | 4);
    assert_eq!(count_in(&w.calls, epoch), 4);
    // A record still on second 1 is refused, and counts in second 2.
    assert!(!bump(cell, 1));
    w.record(false, false, 1, 1);
    assert_eq!(w.counts(2).calls, 5);
    // Second 4 evicts second 1 (sealed: its 4 leave the total), second 2's
    // one call joins it.
    assert_eq!(w.counts(4).calls, 1);
    assert_eq!(w.counts(5).calls, 0);
}

/// Over a full window of successes another success writes nothing (it
/// would evict a success): the head does not move and the record
/// reports no calls. A failure or a slow call in the window makes
/// successes write again until it has left.
#[test]
fn a_clean_full_window_writes_nothing() {
    let w = CountWindow::new(3);
    assert_eq!([1, 2, 3].map(|_| w.record(false, false)), [1, 2, 3]);
    let head = w.head.load(Ordering::Relaxed);
    assert_eq!(w.record(false, false), 0);
    assert_eq!(w.head.load(Ordering::Relaxed), head);
    for (failed, slow) in [(true, false), (false, true)] {
        let n = w.record(failed, slow);
        // Three successes push it out; each of them writes.
        let after = [1, 2, 3].map(|_| w.record(false, false));
        assert_eq!(after, [n + 1, n + 2, n + 3]);
        assert_eq!(
            w.counts(),
            WindowCounts {
                calls: 3,
                failures: 0,
                slow: 0
            }
        );
        let head = w.head.load(Ordering::Relaxed);
        assert_eq!(w.record(false, false), 0);
        assert_eq!(w.head.load(Ordering::Relaxed), head);
    }
}

/// The head folds back into `[size, 2 size)` once it reaches `FOLD_AT`
/// (2^39 calls, or a few more when records race past it), keeps its
/// epoch, and the ring goes on where it was: the window still equals
/// the last `size` calls.
#[test]
fn the_head_folds_back_without_breaking_the_ring() {
    for size in [1u32, 3, 5] {
        let size64 = u64::from(size);
        for start in FOLD_AT - 2 * size64 - 1..FOLD_AT + 3 {
            let w = CountWindow::new(size);
            // A few clears first: an epoch other than zero.
            for _ in 0..3 {
                w.clear();
            }
            let epoch = epoch_of(w.head.load(Ordering::Relaxed));
            // As if `start` successes had been recorded.
            w.head
                .store(epoch << EPOCH_SHIFT | start, Ordering::Relaxed);
            let mut all = vec![(false, false); size as usize];
            let mut wrote = false;
            for i in 0..4 * size64 + 3 {
                let bits = (i * 7 + start % 5) % 11;
                let (failed, slow) = (bits & 1 != 0, bits & 2 != 0);
                let before = w.head.load(Ordering::Relaxed) & COUNT_MASK;
                w.record(failed, slow);
                all.push((failed, slow));
                let h = w.head.load(Ordering::Relaxed);
                let n = h & COUNT_MASK;
                let at = format!("size {size}, start {start}, record {i}");
                assert_eq!(epoch_of(h), epoch, "{at}");
                wrote |= n != before;
                assert!(!wrote || n < FOLD_AT, "{at}: head {n}");
                if n != before && before + 1 >= FOLD_AT {
                    assert!((size64..2 * size64).contains(&n), "{at}: head {n}");
                }
                let last = &all[all.len() - size as usize..];
                let want = WindowCounts {
                    calls: size64,
                    failures: last.iter().filter(|c| c.0).count() as u64,
                    slow: last.iter().filter(|c| c.1).count() as u64,
                };
                assert_eq!(w.counts(), want, "{at}");
            }
        }
    }
}

/// A bucket cell counts its own second, claims a cell of an older
/// second (dead: passed over by a reset, never drained) and refuses one
/// of a newer second (the window moved on: the caller records again),
/// also across the wrap of the 32-bit tags.
#[test]
fn a_bucket_cell_claims_older_seconds_and_refuses_newer_ones() {
    for sec in [5u64, 0xffff_ffff, 0x1_0000_0002] {
        let own = AtomicU64::new(tag(sec) << 32 | 2);
        assert!(bump(&own, sec));
        assert_eq!(own.load(Ordering::Relaxed), tag(sec) << 32 | 3);
        let older = AtomicU64::new(tag(sec - 3) << 32 | 7);
        assert!(bump(&older, sec));
        assert_eq!(older.load(Ordering::Relaxed), tag(sec) << 32 | 1);
        for ahead in [1, (1 << 31) - 1] {
            let newer = AtomicU64::new(tag(sec + ahead) << 32 | 7);
            assert!(!bump(&newer, sec), "{ahead} ahead");
            assert_eq!(newer.load(Ordering::Relaxed), tag(sec + ahead) << 32 | 7);
        }
        // Half the tag space away counts as older.
        let far = AtomicU64::new(tag(sec + (1 << 31)) << 32 | 7);
        assert!(bump(&far, sec));
        assert_eq!(far.load(Ordering::Relaxed), tag(sec) << 32 | 1);
    }
}

/// A record that races a clear (it read the epoch before the clear and
/// adds to the totals after it) is forgotten with the old epoch.
#[test]
fn a_record_that_races_a_clear_is_forgotten() {
    let w = TimeWindow::new(3);
    w.record(true, false, 1, 1);
    let (epoch, _) = w.advance(1);
    w.clear();
    assert_eq!(add_in(&w.calls, epoch, 1), None);
    assert_eq!(add_in(&w.failures, epoch, 1), None);
    assert_eq!(w.counts(1), WindowCounts::default());
    w.record(false, true, 1, 1);
    let want = WindowCounts {
        calls: 1,
        failures: 0,
        slow: 1,
    };
    assert_eq!(w.counts(1), want);
}

/// The epoch wraps around to zero after 2^24 clears, and both windows
/// go on counting.
#[test]
fn the_epoch_wraps_around() {
    let last = EPOCH_MASK << EPOCH_SHIFT;
    let c = CountWindow::new(3);
    for cell in [&c.head.0, &c.failures.0, &c.slow] {
        cell.store(last, Ordering::Relaxed);
    }
    let t = TimeWindow::new(3);
    for cell in [&t.current.0, &t.calls.0, &t.failures, &t.slow] {
        cell.store(last, Ordering::Relaxed);
    }
    c.record(true, false);
    t.record(true, false, 0, 1);
    let failed = WindowCounts {
        calls: 1,
        failures: 1,
        slow: 0,
    };
    assert_eq!((c.counts(), t.counts(0)), (failed, failed));
    c.clear();
    t.clear();
    assert_eq!(epoch_of(c.head.load(Ordering::Relaxed)), 0);
    assert_eq!(epoch_of(t.current.load(Ordering::Relaxed)), 0);
    c.record(false, true);
    t.record(false, true, 0, 1);
    let slow = WindowCounts {
        calls: 1,
        failures: 0,
        slow: 1,
    };
    assert_eq!((c.counts(), t.counts(0)), (slow, slow));
}

proptest::proptest! {
    /// The count window equals "the last N calls" of a plain list.
    #[test]
    fn count_window_matches_a_plain_list(
        size in 1u32..8,
        calls in proptest::collection::vec((proptest::bool::ANY, proptest::bool::ANY, 0u8..10), 0..60),
    ) {
        let w = Window::count(size);
        let mut all = Vec::new();
        for (failed, slow, op) in calls {
            if op == 0 {
                // One step in ten clears the window.
                w.clear();
                all.clear();
            }
            w.record(failed, slow, 0, 1);
            all.push((failed, slow));
            let last: Vec<_> = all.iter().rev().take(size as usize).collect();
            let want = WindowCounts {
                calls: last.len() as u64,
                failures: last.iter().filter(|c| c.0).count() as u64,
                slow: last.iter().filter(|c| c.1).count() as u64,
            };
            proptest::prop_assert_eq!(w.counts(0), want);
        }
    }

    /// The time window equals "the calls of the last N seconds" of a
    /// plain list, across gaps of any length.
    #[test]
    fn time_window_matches_a_plain_list(
        size in 1u32..6,
        steps in proptest::collection::vec((0u64..4_000, proptest::bool::ANY, proptest::bool::ANY, 0u8..10), 0..60),
    ) {
        let w = Window::time(size);
        let mut now = 0u64;
        let mut all: Vec<(u64, bool, bool)> = Vec::new();
        for (gap, failed, slow, op) in steps {
            if op == 0 {
                // One step in ten clears the window.
                w.clear();
                all.clear();
            }
            now += gap;
            w.record(failed, slow, now, 1);
            all.push((now / 1000, failed, slow));
            let sec = now / 1000;
            let live: Vec<_> = all.iter().filter(|c| c.0 + u64::from(size) > sec).collect();
            let want = WindowCounts {
                calls: live.len() as u64,
                failures: live.iter().filter(|c| c.1).count() as u64,
                slow: live.iter().filter(|c| c.2).count() as u64,
            };
            proptest::prop_assert_eq!(w.counts(now), want);
        }
    }
}
