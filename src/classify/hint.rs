//! Server wait hints: `retry-after-ms`, `retry-after`, `x-ratelimit-reset-*`,
//! `anthropic-ratelimit-*-reset` and `x-should-retry`.
//!
//! Every parser takes untrusted header text and returns `None` for anything
//! malformed or negative; it never panics. Huge values saturate at
//! [`MAX_HINT`] (so a later cap turns them into a typed error instead of an
//! hour-long sleep), and instants in the past mean "now" (zero).
//!
//! Precedence (`REFERENCE.md` §2): `retry-after-ms` (and Azure's
//! `x-ms-retry-after-ms`), then `retry-after` (seconds, fractional, or an
//! HTTP-date), then, on a 429 only, OpenAI's `x-ratelimit-reset-{requests,
//! tokens}` (Go durations) and Anthropic's `anthropic-ratelimit-*-reset`
//! (RFC 3339 instants). Of the reset headers, those of an exhausted dimension
//! (`remaining: 0`) count; when none says it is exhausted, the soonest reset
//! does.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::HttpView;

/// The longest hint the parsers return: one day. Larger values saturate.
pub const MAX_HINT: Duration = Duration::from_secs(24 * 60 * 60);

fn from_secs_f64(secs: f64) -> Option<Duration> {
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    Some(if secs >= MAX_HINT.as_secs_f64() {
        MAX_HINT
    } else {
        Duration::from_secs_f64(secs)
    })
}

fn plain_number(v: &str) -> Option<f64> {
    let v = v.trim();
    // Only digits with at most one dot: no sign, exponent, "inf" or "nan".
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    v.parse().ok()
}

/// `retry-after-ms`: a non-negative number of milliseconds, possibly
/// fractional.
pub fn retry_after_ms(v: &str) -> Option<Duration> {
    from_secs_f64(plain_number(v)? / 1000.0)
}

/// `retry-after`: a non-negative number of seconds (possibly fractional) or an
/// HTTP-date, relative to `now` (a past date gives zero).
pub fn retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    if let Some(n) = plain_number(v) {
        return from_secs_f64(n);
    }
    let at = httpdate::parse_http_date(v.trim()).ok()?;
    Some(until(at, now))
}

fn until(at: SystemTime, now: SystemTime) -> Duration {
    at.duration_since(now)
        .unwrap_or(Duration::ZERO)
        .min(MAX_HINT)
}

/// A Go duration (`1s`, `6m0s`, `12ms`, `1h2m3.5s`, `0`), as OpenAI's
/// `x-ratelimit-reset-*` headers send it. Negative values are `None`.
pub fn go_duration(v: &str) -> Option<Duration> {
    let v = v.trim();
    if v == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = v.strip_prefix('+').unwrap_or(v);
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0f64;
    while !rest.is_empty() {
        let num_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(rest.len(), |(i, _)| i);
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * scale;
    }
    from_secs_f64(total)
}

/// An RFC 3339 instant (`2026-11-28T16:00:05Z`, fractional seconds and
/// `±HH:MM` offsets allowed), relative to `now` (a past instant gives zero).
pub fn rfc3339(v: &str, now: SystemTime) -> Option<Duration> {
    Some(until(parse_rfc3339(v.trim())?, now))
}

fn digits(s: &str, at: usize, len: usize) -> Option<i64> {
    let part = s.get(at..at + len)?;
    if !part.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    part.parse().ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d) = (digits(s, 0, 4)?, digits(s, 5, 2)?, digits(s, 8, 2)?);
    let (h, mi, se) = (digits(s, 11, 2)?, digits(s, 14, 2)?, digits(s, 17, 2)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0u64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 9 {
                nanos = nanos * 10 + u64::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return None;
        }
        for _ in (i - start).min(9)..9 {
            nanos *= 10;
        }
    }
    let offset = match &s[i..] {
        "Z" | "z" => 0,
        tz if tz.len() == 6
            && (tz.starts_with('+') || tz.starts_with('-'))
            && tz.as_bytes()[3] == b':' =>
        {
            let secs = digits(tz, 1, 2)? * 3600 + digits(tz, 4, 2)? * 60;
            if tz.starts_with('-') {
                -secs
            } else {
                secs
            }
        }
        _ => return None,
    };
    let unix = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se - offset;
    let unix = u64::try_from(unix).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(unix, nanos as u32))
}

/// `x-should-retry`: `true` or `false`, case-insensitive; anything else is
/// `None` (ignored).
pub fn should_retry(v: &str) -> Option<bool> {
    let v = v.trim();
    if v.eq_ignore_ascii_case("true") {
        Some(true)
    } else if v.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

fn exhausted(view: &dyn HttpView, remaining_header: &str) -> Option<bool> {
    view.header(remaining_header)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|n| n == 0)
}

/// The server's wait hint from `view`'s headers, by the precedence above.
pub fn server_hint(view: &dyn HttpView, now: SystemTime) -> Option<Duration> {
    for name in ["retry-after-ms", "x-ms-retry-after-ms"] {
        if let Some(d) = view.header(name).and_then(retry_after_ms) {
            return Some(d);
        }
    }
    if let Some(d) = view.header("retry-after").and_then(|v| retry_after(v, now)) {
        return Some(d);
    }
    if view.status() != Some(429) {
        return None;
    }
    let openai = [
        (
            "x-ratelimit-reset-requests",
            "x-ratelimit-remaining-requests",
        ),
        ("x-ratelimit-reset-tokens", "x-ratelimit-remaining-tokens"),
    ]
    .map(|(reset, remaining)| {
        (
            view.header(reset).and_then(go_duration),
            exhausted(view, remaining),
        )
    });
    let anthropic = ["requests", "tokens", "input-tokens", "output-tokens"].map(|dim| {
        let reset = view
            .header(&format!("anthropic-ratelimit-{dim}-reset"))
            .and_then(|v| rfc3339(v, now));
        (
            reset,
            exhausted(view, &format!("anthropic-ratelimit-{dim}-remaining")),
        )
    });
    pick_reset(openai.iter().chain(anthropic.iter()).copied())
}

fn pick_reset(
    resets: impl Iterator<Item = (Option<Duration>, Option<bool>)> + Clone,
) -> Option<Duration> {
    let of_exhausted = resets
        .clone()
        .filter(|(_, ex)| *ex == Some(true))
        .filter_map(|(d, _)| d)
        .max();
    of_exhausted.or_else(|| resets.filter_map(|(d, _)| d).min())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::HttpError;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_780_000_000)
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(retry_after("3", now()), Some(Duration::from_secs(3)));
        assert_eq!(
            retry_after(" 1.5 ", now()),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(retry_after("-1", now()), None);
        assert_eq!(retry_after("nan", now()), None);
        assert_eq!(retry_after("1e9", now()), None);
        assert_eq!(retry_after("99999999999999999999", now()), Some(MAX_HINT));
        let later = httpdate::fmt_http_date(now() + Duration::from_secs(30));
        assert_eq!(retry_after(&later, now()), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now() - Duration::from_secs(30));
        assert_eq!(retry_after(&past, now()), Some(Duration::ZERO));
        assert_eq!(retry_after("Tue, 99 Foo 2026", now()), None);
    }

    #[test]
    fn retry_after_ms_forms() {
        assert_eq!(retry_after_ms("250"), Some(Duration::from_millis(250)));
        assert_eq!(retry_after_ms("0.5"), Some(Duration::from_micros(500)));
        assert_eq!(retry_after_ms(""), None);
        assert_eq!(retry_after_ms("-5"), None);
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(go_duration("12ms"), Some(Duration::from_millis(12)));
        assert_eq!(
            go_duration("1h2m3.5s"),
            Some(Duration::from_millis(3_723_500))
        );
        assert_eq!(go_duration("0"), Some(Duration::ZERO));
        assert_eq!(go_duration("1.5µs"), Some(Duration::from_nanos(1500)));
        assert_eq!(go_duration("-1s"), None);
        assert_eq!(go_duration("1"), None);
        assert_eq!(go_duration("s"), None);
        assert_eq!(go_duration("1x"), None);
        assert_eq!(go_duration("9999999999h"), Some(MAX_HINT));
    }

    #[test]
    fn rfc3339_instants() {
        // 1_780_000_000 is 2026-05-28T20:26:40Z.
        assert_eq!(
            rfc3339("2026-05-28T20:26:45Z", now()),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            rfc3339("2026-05-28T20:26:45.250Z", now()),
            Some(Duration::from_millis(5250))
        );
        assert_eq!(
            rfc3339("2026-05-28T22:26:45+02:00", now()),
            Some(Duration::from_secs(5))
        );
        assert_eq!(rfc3339("2020-01-01T00:00:00Z", now()), Some(Duration::ZERO));
        assert_eq!(rfc3339("2026-13-28T20:26:45Z", now()), None);
        assert_eq!(rfc3339("2026-05-28T20:26:45", now()), None);
        assert_eq!(rfc3339("garbage", now()), None);
        // Before 1970: not a plausible reset instant, ignored.
        assert_eq!(rfc3339("0000-01-01T00:00:00Z", now()), None);
    }

    #[test]
    fn precedence() {
        let e = HttpError::new(429)
            .with_header("retry-after", "3")
            .with_header("retry-after-ms", "1200");
        assert_eq!(server_hint(&e, now()), Some(Duration::from_millis(1200)));
        let e = HttpError::new(429)
            .with_header("retry-after", "bogus")
            .with_header("x-ratelimit-reset-requests", "2s")
            .with_header("x-ratelimit-reset-tokens", "6m0s");
        // Neither says it is exhausted: the soonest.
        assert_eq!(server_hint(&e, now()), Some(Duration::from_secs(2)));
        let e = e.with_header("x-ratelimit-remaining-tokens", "0");
        assert_eq!(server_hint(&e, now()), Some(Duration::from_secs(360)));
        let e = HttpError::new(429)
            .with_header("anthropic-ratelimit-tokens-reset", "2026-05-28T20:26:50Z")
            .with_header("anthropic-ratelimit-tokens-remaining", "0");
        assert_eq!(server_hint(&e, now()), Some(Duration::from_secs(10)));
        // Reset headers are not wait hints on other statuses.
        let e = HttpError::new(500).with_header("x-ratelimit-reset-requests", "2s");
        assert_eq!(server_hint(&e, now()), None);
    }
}
