//! Property tests of the server-hint parsers (`classify::hint`): whatever
//! text a server (or a proxy in between) sends, no parser panics and none
//! returns a wait above `hint::MAX_HINT`.

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

    /// Valid values round-trip: whole milliseconds below the cap.
    #[test]
    fn valid_millis_round_trip(ms in 0u64..86_400_000) {
        prop_assert_eq!(hint::retry_after_ms(&ms.to_string()), Some(Duration::from_millis(ms)));
        prop_assert_eq!(hint::go_duration(&format!("{ms}ms")), Some(Duration::from_millis(ms)));
    }
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
