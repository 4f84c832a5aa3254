//! Property tests of the server-hint parsers (`classify::hint`): whatever
//! text a server (or a proxy in between) sends, no parser panics and none
//! returns a wait above `hint::MAX_HINT`; a number is a hint exactly when it
//! is within `[0, MAX_HINT]`, whatever its size; zero is never a hint; and
//! the retry layer jitters a hint within `[h, h · (1 + ratio)]`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use llm_resilience::classify::hint::{self, MAX_HINT};
use llm_resilience::classify::HttpError;
use proptest::prelude::*;

fn now_strategy() -> impl Strategy<Value = SystemTime> {
    prop_oneof![
        Just(UNIX_EPOCH),
        (0u64..=4_102_444_800).prop_map(|s| UNIX_EPOCH + Duration::from_secs(s)),
        (0u64..=u64::from(u32::MAX) * 8, 0u32..1_000_000_000)
            .prop_map(|(s, n)| UNIX_EPOCH + Duration::new(s, n)),
    ]
}

/// Arbitrary text: any Unicode, arbitrary bytes read lossily, and text that
/// is close to each valid form (where the parsers do the most work).
fn header_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        proptest::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        "[ 0-9.]{0,40}",
        "[0-9]{1,400}",
        "[+-]?([0-9.]{0,30}(ns|us|µs|μs|ms|s|m|h|x|é)?){0,6}",
        // RFC 3339-like, with arbitrary fractions and offsets.
        "[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{0,20})?(Z|z|[+-][0-9]{2}:[0-9]{2}|.{0,7})",
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}[+-].{5}",
        // Six-byte offsets whose bytes 2..4 or 1..4 are one character.
        "2026-05-28T20:26:45(\\.[0-9])?[+-]([0-9][é£§μ]|[€→])[0-9:]{2}",
        // HTTP-date-like.
        "(Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{1,3} (Jan|Feb|Nov|Foo) [0-9]{1,6} [0-9]{2}:[0-9]{2}:[0-9]{2} (GMT|UTC|.{0,3})",
        "(true|false|TRUE|False|maybe)[ \t]?",
    ]
}

fn bounded(d: Option<Duration>) -> Result<(), TestCaseError> {
    if let Some(d) = d {
        prop_assert!(d <= MAX_HINT, "hint {d:?} above MAX_HINT");
    }
    Ok(())
}

const HINT_HEADERS: [&str; 16] = [
    "retry-after-ms",
    "x-ms-retry-after-ms",
    "retry-after",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-reset",
    "anthropic-ratelimit-output-tokens-reset",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-input-tokens-remaining",
    "anthropic-ratelimit-output-tokens-remaining",
    "x-should-retry",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn retry_after_ms_never_panics_and_is_bounded(v in header_text()) {
        bounded(hint::retry_after_ms(&v))?;
    }

    #[test]
    fn retry_after_never_panics_and_is_bounded(v in header_text(), now in now_strategy()) {
        bounded(hint::retry_after(&v, now))?;
    }

    #[test]
    fn go_duration_never_panics_and_is_bounded(v in header_text()) {
        bounded(hint::go_duration(&v))?;
    }

    #[test]
    fn rfc3339_never_panics_and_is_bounded(v in header_text(), now in now_strategy()) {
        bounded(hint::rfc3339(&v, now))?;
    }

    #[test]
    fn should_retry_never_panics(v in header_text()) {
        let parsed = hint::should_retry(&v);
        // Only the two words, in any case, mean anything.
        let word = v.trim().to_ascii_lowercase();
        prop_assert_eq!(parsed.is_some(), word == "true" || word == "false");
    }

    #[test]
    fn server_hint_never_panics_and_is_bounded(
        status in prop_oneof![Just(429u16), Just(503), Just(529), 100u16..600],
        headers in proptest::collection::vec((0..HINT_HEADERS.len(), header_text()), 0..8),
        now in now_strategy(),
    ) {
        let mut e = HttpError::new(status);
        for (i, v) in headers {
            e = e.with_header(HINT_HEADERS[i], v);
        }
        bounded(hint::server_hint(&e, now))?;
        // And through the classifier.
        if let llm_resilience::classify::Outcome::Transient { retry_after, .. } =
            llm_resilience::classify::classify_http_at(&e, now)
        {
            bounded(retry_after)?;
        }
    }

    /// An integer of any length (beyond `u64` and `u128` too) is a hint
    /// exactly when it is at most a day, in seconds or milliseconds.
    #[test]
    fn integers_of_any_size_are_hints_exactly_up_to_a_day(
        digits in prop_oneof!["[0-9]{1,6}", "[0-9]{6,60}", "0{0,30}[0-9]{1,6}"],
        now in now_strategy(),
    ) {
        let value: Option<u128> = digits.parse().ok(); // None: beyond u128
        let secs = hint::retry_after(&digits, now);
        match value.filter(|&n| n <= 86_400) {
            Some(n) => prop_assert_eq!(secs, Some(Duration::from_secs(n as u64))),
            None => prop_assert_eq!(secs, None),
        }
        let ms = hint::retry_after_ms(&digits);
        match value.filter(|&n| n <= 86_400_000) {
            Some(n) => prop_assert_eq!(ms, Some(Duration::from_millis(n as u64))),
            None => prop_assert_eq!(ms, None),
        }
        let go = hint::go_duration(&format!("{digits}s"));
        match value.filter(|&n| n <= 86_400) {
            Some(n) => prop_assert_eq!(go, Some(Duration::from_secs(n as u64))),
            None => prop_assert_eq!(go, None),
        }
    }

    /// Any `f64`, as Rust prints it (`1e300` prints all its digits; `NaN`,
    /// `inf` and negatives as such): a hint exactly when finite and within
    /// `[0, 86400]` seconds, and then equal to it to the nanosecond.
    #[test]
    fn floats_of_any_size_are_hints_exactly_up_to_a_day(
        x in prop_oneof![
            any::<f64>(),
            0.0f64..=86_400.0,
            86_399.0f64..86_401.0,
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(f64::NAN),
            Just(1e300),
            Just(-0.0),
        ],
        now in now_strategy(),
    ) {
        let text = format!("{x}");
        let parsed = hint::retry_after(&text, now);
        if x.is_finite() && (0.0..=86_400.0).contains(&x) && !text.starts_with('-') {
            let d = parsed.expect("a number within a day is a hint");
            prop_assert!((d.as_secs_f64() - x).abs() <= 1e-9 * x.max(1.0), "{text} -> {d:?}");
        } else {
            prop_assert_eq!(parsed, None, "{}", text);
        }
        // Exponent notation is not a delay-seconds value.
        prop_assert_eq!(hint::retry_after(&format!("{x:e}"), now), None);
        prop_assert_eq!(hint::retry_after_ms(&format!("{x:e}")), None);
    }

    /// `server_hint` never says "retry at once": zero is no hint, whatever
    /// header carried it.
    #[test]
    fn zero_is_never_a_hint(
        status in prop_oneof![Just(429u16), Just(503)],
        headers in proptest::collection::vec(
            (0..HINT_HEADERS.len(), prop_oneof![
                Just("0".to_string()), Just("0s".to_string()), Just("0.0".to_string()),
                Just("0ms".to_string()), Just("2020-01-01T00:00:00Z".to_string()),
                Just("Thu, 01 Jan 1970 00:00:00 GMT".to_string()),
                header_text(),
            ]),
            0..8,
        ),
        now in now_strategy(),
    ) {
        let mut e = HttpError::new(status);
        for (i, v) in headers {
            e = e.with_header(HINT_HEADERS[i], v);
        }
        prop_assert_ne!(hint::server_hint(&e, now), Some(Duration::ZERO));
    }

    /// An HTTP-date or RFC 3339 instant `s` seconds away (past or future):
    /// zero in the past, `s` up to a day, no hint beyond.
    #[test]
    fn dates_within_a_day_are_hints(
        base in 1_000_000_000u64..4_000_000_000,
        offset in -200_000i64..200_000,
    ) {
        let now = UNIX_EPOCH + Duration::from_secs(base);
        let at = UNIX_EPOCH + Duration::from_secs(base.checked_add_signed(offset).unwrap());
        let expected = match offset {
            o if o <= 0 => Some(Duration::ZERO),
            o if o <= 86_400 => Some(Duration::from_secs(o as u64)),
            _ => None,
        };
        prop_assert_eq!(hint::retry_after(&httpdate::fmt_http_date(at), now), expected);
        let e = HttpError::new(503).with_header("retry-after", httpdate::fmt_http_date(at));
        prop_assert_eq!(hint::server_hint(&e, now), expected.filter(|d| !d.is_zero()));
    }

    /// RFC 3339 round trip: an instant written with any offset, fraction and
    /// separator case reads back as the wait until it (zero when past, `None`
    /// beyond a day).
    #[test]
    fn rfc3339_round_trips(
        base in 0u64..4_000_000_000,
        offset in -100_000i64..100_000,
        nanos in 0u32..1_000_000_000,
        zone_min in -(23 * 60 + 59)..=(23 * 60 + 59i64),
        lower in any::<bool>(),
        frac_digits in 0usize..=12,
    ) {
        let now = UNIX_EPOCH + Duration::from_secs(base);
        let Some(at_secs) = base.checked_add_signed(offset) else { return Ok(()) };
        // Fraction cut to `frac_digits` digits (zeros past the ninth).
        let shown = if frac_digits >= 9 { nanos } else {
            nanos / 10u32.pow(9 - frac_digits as u32) * 10u32.pow(9 - frac_digits as u32)
        };
        let at = UNIX_EPOCH + Duration::new(at_secs, shown);
        let local = at_secs as i64 + zone_min * 60;
        prop_assume!(local >= 0);
        let text = format_rfc3339(local, nanos, frac_digits, zone_min, lower);
        let expected = match at.duration_since(now) {
            Err(_) => Some(Duration::ZERO),
            Ok(d) if d <= MAX_HINT => Some(d),
            Ok(_) => None,
        };
        prop_assert_eq!(hint::rfc3339(&text, now), expected, "{}", text);
    }

    /// Valid values round-trip: whole milliseconds below the cap.
    #[test]
    fn valid_millis_round_trip(ms in 0u64..=86_400_000) {
        prop_assert_eq!(hint::retry_after_ms(&ms.to_string()), Some(Duration::from_millis(ms)));
        prop_assert_eq!(hint::go_duration(&format!("{ms}ms")), Some(Duration::from_millis(ms)));
    }
}

/// Writes local time `local` (seconds since 1970 in the zone) as RFC 3339.
fn format_rfc3339(
    local: i64,
    nanos: u32,
    frac_digits: usize,
    zone_min: i64,
    lower: bool,
) -> String {
    // Howard Hinnant's `civil_from_days`.
    let (days, rem) = (local.div_euclid(86_400), local.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let frac = if frac_digits == 0 {
        String::new()
    } else {
        let nine = format!("{nanos:09}");
        format!(".{}", format!("{nine}000")[..frac_digits].to_owned())
    };
    let zone = if zone_min == 0 && !lower {
        "Z".to_owned()
    } else if zone_min == 0 {
        "z".to_owned()
    } else {
        let sign = if zone_min < 0 { '-' } else { '+' };
        format!(
            "{sign}{:02}:{:02}",
            zone_min.abs() / 60,
            zone_min.abs() % 60
        )
    };
    let t = if lower { 't' } else { 'T' };
    format!(
        "{y:04}-{m:02}-{d:02}{t}{:02}:{:02}:{:02}{frac}{zone}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A regression found by the properties above: an offset whose fourth byte
/// falls inside a multi-byte character made the RFC 3339 parser slice a
/// string off a character boundary and panic.
#[test]
fn rfc3339_offset_with_a_multibyte_character() {
    let now = UNIX_EPOCH + Duration::from_secs(1_780_000_000);
    assert_eq!(hint::rfc3339("2026-05-28T20:26:45+1é00", now), None);
    assert_eq!(hint::rfc3339("2026-05-28T20:26:45+1éxx", now), None);
}

/// One retry after a `retry-after-ms: hint_ms` answer, on a paused clock:
/// the delay the retry layer reports and the time it actually slept.
fn jittered_wait(hint_ms: u64, ratio: f64, seed: u64) -> (Duration, Duration) {
    use llm_resilience::retry::{RetryEventKind, RetryLayer};
    use std::sync::{Arc, Mutex};
    use tower::{service_fn, Layer, ServiceExt};

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let reported = Arc::new(Mutex::new(None));
        let seen = Arc::clone(&reported);
        let layer = RetryLayer::builder()
            .no_budget()
            .hint_jitter(ratio)
            .seed(seed)
            .on_event(move |e| {
                if e.kind == RetryEventKind::Retrying {
                    *seen.lock().unwrap() = e.delay;
                }
            })
            .build()
            .unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&calls);
        let svc = layer.layer(service_fn(move |_: ()| {
            let log = Arc::clone(&log);
            async move {
                let mut log = log.lock().unwrap();
                log.push(tokio::time::Instant::now());
                if log.len() == 1 {
                    Err(HttpError::new(503).with_header("retry-after-ms", hint_ms.to_string()))
                } else {
                    Ok(())
                }
            }
        }));
        svc.oneshot(()).await.unwrap();
        let calls = calls.lock().unwrap();
        let slept = calls[1] - calls[0];
        let delay = reported.lock().unwrap().expect("one retry");
        (delay, slept)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A hint `h` waits in `[h, h · (1 + ratio)]`, exactly as reported.
    #[test]
    fn the_retry_layer_jitters_a_hint_within_its_ratio(
        hint_ms in 1u64..120_000,
        ratio in prop_oneof![Just(0.0), Just(1.0), 0.0f64..=1.0],
        seed in any::<u64>(),
    ) {
        let (delay, slept) = jittered_wait(hint_ms, ratio, seed);
        let h = Duration::from_millis(hint_ms);
        prop_assert!(delay >= h, "{delay:?} below the hint {h:?}");
        prop_assert!(delay <= h.mul_f64(1.0 + ratio), "{delay:?} above {h:?} x (1 + {ratio})");
        // The paused clock advances exactly to the timer (to the ms tick).
        prop_assert!(slept >= delay && slept <= delay + Duration::from_millis(1), "{slept:?} vs {delay:?}");
    }
}

/// The jitter is real: over many seeds the waits spread across the whole
/// `[h, 1.5 h]` band (a quarter of them in each half), not all at `h`.
#[test]
fn hint_jitter_spreads_callers() {
    let h = Duration::from_secs(10);
    let waits: Vec<Duration> = (0..64)
        .map(|seed| jittered_wait(10_000, 0.5, seed).0)
        .collect();
    let low = waits.iter().filter(|w| **w < h.mul_f64(1.25)).count();
    let high = waits.iter().filter(|w| **w >= h.mul_f64(1.25)).count();
    assert!(low >= 16 && high >= 16, "low {low}, high {high}: {waits:?}");
    let distinct: std::collections::HashSet<_> = waits.iter().collect();
    assert!(
        distinct.len() > 60,
        "only {} distinct waits",
        distinct.len()
    );
    // Without jitter, exactly the hint.
    assert!((0..8).all(|seed| jittered_wait(10_000, 0.0, seed).0 == h));
}
