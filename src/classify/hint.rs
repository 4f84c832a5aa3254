//! Server wait hints: `retry-after-ms`, `retry-after`, `x-ratelimit-reset-*`,
//! `anthropic-ratelimit-*-reset` and `x-should-retry`.
//!
//! Every parser takes untrusted header text and never panics. A value that
//! is malformed, negative, infinite, NaN or longer than [`MAX_HINT`] (one
//! day) is no hint at all (`None`), whatever the size of the number: an
//! integer too large for `u64`, `1e300` and `inf` are all `None`, never a
//! saturated day-long sleep. An instant in the past parses as zero.
//!
//! # Precedence
//!
//! [`server_hint`] reads, in order: `retry-after-ms` (and Azure's
//! `x-ms-retry-after-ms`), then `retry-after` (seconds, fractional, or an
//! HTTP-date), then, on a 429 only, OpenAI's `x-ratelimit-reset-{requests,
//! tokens}` (Go durations) and Anthropic's `anthropic-ratelimit-*-reset`
//! (RFC 3339 instants). The first of `retry-after-ms` and `retry-after`
//! that parses decides, as in the OpenAI SDK. Of the reset headers, those
//! of an exhausted dimension (`remaining: 0`) count; when none says it is
//! exhausted, the soonest reset does.
//!
//! # Zero is no hint
//!
//! A hint of zero (`retry-after: 0`, an HTTP-date or reset instant in the
//! past) is not "retry at once": [`server_hint`] returns `None` for it, so
//! the caller's normal jittered backoff applies. The OpenAI SDK does the
//! same (it honours only hints above zero), and it keeps a fleet of clients
//! that were all told "0" from retrying in the same instant.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::HttpView;

/// The longest hint the parsers return: one day. A longer value is no hint.
pub const MAX_HINT: Duration = Duration::from_secs(24 * 60 * 60);

/// Seconds as a hint: `None` unless finite and within `[0, MAX_HINT]`.
fn from_secs_f64(secs: f64) -> Option<Duration> {
    // `!(x <= max)` is also true for NaN.
    if !(0.0..=MAX_HINT.as_secs_f64()).contains(&secs) {
        return None;
    }
    Some(Duration::from_secs_f64(secs))
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
/// HTTP-date, relative to `now` (a past date gives zero; a date more than
/// [`MAX_HINT`] ahead is `None`).
pub fn retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    if let Some(n) = plain_number(v) {
        return from_secs_f64(n);
    }
    let at = httpdate::parse_http_date(v.trim()).ok()?;
    until(at, now)
}

/// The wait until `at`: zero when it is past, `None` beyond [`MAX_HINT`].
fn until(at: SystemTime, now: SystemTime) -> Option<Duration> {
    let d = at.duration_since(now).unwrap_or(Duration::ZERO);
    (d <= MAX_HINT).then_some(d)
}

/// A Go duration (`1s`, `6m0s`, `12ms`, `1h2m3.5s`, `0`), as OpenAI's
/// `x-ratelimit-reset-*` headers send it. Negative values and values above
/// [`MAX_HINT`] are `None`.
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

/// An RFC 3339 instant (`2026-11-28T16:00:05Z`), relative to `now`: a past
/// instant gives zero, one more than [`MAX_HINT`] ahead is `None`.
///
/// Accepted as RFC 3339 allows: `T`, `t` or a space between date and time;
/// `Z`, `z` or a `±HH:MM` offset (hours 0 to 23, minutes 0 to 59; `-00:00`
/// is UTC); fractional seconds of any length (read to the nanosecond); a
/// leap second `60`, read as the first second of the next minute. A day
/// that its month does not have (`2026-02-30`) is `None`.
pub fn rfc3339(v: &str, now: SystemTime) -> Option<Duration> {
    until(parse_rfc3339(v.trim())?, now)
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

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
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
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) {
        return None;
    }
    if h > 23 || mi > 59 || se > 60 {
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
            let (oh, om) = (digits(tz, 1, 2)?, digits(tz, 4, 2)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let secs = oh * 3600 + om * 60;
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

/// The server's wait hint from `view`'s headers, by the precedence in the
/// [module docs](self); `None` when there is none or it is zero (see
/// "Zero is no hint" there).
pub fn server_hint(view: &dyn HttpView, now: SystemTime) -> Option<Duration> {
    header_hint(view, now).filter(|d| !d.is_zero())
}

fn header_hint(view: &dyn HttpView, now: SystemTime) -> Option<Duration> {
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

/// A reset that is zero (already past) says nothing about when to retry, so
/// it is left out before picking.
fn pick_reset(
    resets: impl Iterator<Item = (Option<Duration>, Option<bool>)> + Clone,
) -> Option<Duration> {
    let resets = resets.map(|(d, ex)| (d.filter(|d| !d.is_zero()), ex));
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
        // Over a day is no hint, whatever the size of the number.
        assert_eq!(retry_after("86400", now()), Some(MAX_HINT));
        assert_eq!(retry_after("86400.5", now()), None);
        assert_eq!(retry_after("99999999999999999999", now()), None);
        assert_eq!(retry_after(&"9".repeat(400), now()), None);
        assert_eq!(retry_after("inf", now()), None);
        assert_eq!(retry_after("1e300", now()), None);
        let far = httpdate::fmt_http_date(now() + MAX_HINT + Duration::from_secs(1));
        assert_eq!(retry_after(&far, now()), None);
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
        // Every unit Go prints.
        assert_eq!(go_duration("500ns"), Some(Duration::from_nanos(500)));
        assert_eq!(go_duration("3us"), Some(Duration::from_micros(3)));
        assert_eq!(go_duration("3μs"), Some(Duration::from_micros(3)));
        assert_eq!(go_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(go_duration("+5s"), Some(Duration::from_secs(5)));
        assert_eq!(go_duration(" 7m "), Some(Duration::from_secs(420)));
        assert_eq!(go_duration("+"), None);
        assert_eq!(go_duration(""), None);
        assert_eq!(go_duration("1s2"), None);
        assert_eq!(go_duration("-1s"), None);
        assert_eq!(go_duration("1"), None);
        assert_eq!(go_duration("s"), None);
        assert_eq!(go_duration("1x"), None);
        assert_eq!(go_duration("24h"), Some(MAX_HINT));
        assert_eq!(go_duration("24h1ns"), None);
        assert_eq!(go_duration("9999999999h"), None);
        assert_eq!(go_duration(&format!("{}h", "9".repeat(400))), None);
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
        // More than a day ahead: no hint.
        assert_eq!(rfc3339("2026-05-29T20:26:41Z", now()), None);
        assert_eq!(rfc3339("2026-05-29T20:26:40Z", now()), Some(MAX_HINT));
    }

    #[test]
    fn rfc3339_edge_fields() {
        let at = |s| rfc3339(s, now());
        // Lowercase separators and a space, as RFC 3339 allows.
        assert_eq!(at("2026-05-28t20:26:45z"), Some(Duration::from_secs(5)));
        assert_eq!(at("2026-05-28 20:26:45Z"), Some(Duration::from_secs(5)));
        // Fractions: one digit, nine, and more than nine (cut at the ns).
        assert_eq!(
            at("2026-05-28T20:26:45.5Z"),
            Some(Duration::from_millis(5500))
        );
        assert_eq!(
            at("2026-05-28T20:26:45.123456789Z"),
            Some(Duration::new(5, 123_456_789))
        );
        assert_eq!(
            at("2026-05-28T20:26:45.1234567891234Z"),
            Some(Duration::new(5, 123_456_789))
        );
        assert_eq!(at("2026-05-28T20:26:45.Z"), None);
        // A fraction that runs to the end: no zone, not RFC 3339.
        assert_eq!(at("2026-05-28T20:26:45.5"), None);
        assert_eq!(at("2026-05-28T20:26:45,5Z"), None);
        // Offsets: negative, half-hour, `-00:00`, out of range.
        assert_eq!(
            at("2026-05-28T15:26:45-05:00"),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            at("2026-05-29T01:56:45+05:30"),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            at("2026-05-28T20:26:45-00:00"),
            Some(Duration::from_secs(5))
        );
        assert_eq!(at("2026-05-28T20:26:45+24:00"), None);
        assert_eq!(at("2026-05-28T20:26:45+01:60"), None);
        assert_eq!(at("2026-05-28T20:26:45+0100"), None);
        assert_eq!(at("2026-05-28T20:26:45x01:00"), None);
        assert_eq!(at("2026-05-28T20:26:45+01-00"), None);
        assert_eq!(at("2026-05-28T20:26:45+1:00"), None);
        // A leap second is the first second of the next minute.
        assert_eq!(at("2026-05-28T20:26:60Z"), at("2026-05-28T20:27:00Z"));
        assert_eq!(at("2026-05-28T20:27:00Z"), Some(Duration::from_secs(20)));
        assert_eq!(at("2026-05-28T20:26:61Z"), None);
        assert_eq!(at("2026-05-28T24:00:00Z"), None);
        assert_eq!(at("2026-05-28T20:60:00Z"), None);
        // Days the month has, and does not.
        let leap_now = UNIX_EPOCH + Duration::from_secs(1_709_164_800); // 2024-02-29T00:00:00Z
        assert_eq!(
            rfc3339("2024-02-29T00:00:07Z", leap_now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(rfc3339("2024-02-30T00:00:07Z", leap_now), None);
        assert_eq!(at("2026-02-29T00:00:00Z"), None);
        assert_eq!(at("2026-04-31T00:00:00Z"), None);
        assert_eq!(at("2026-05-00T00:00:00Z"), None);
        assert_eq!(at("2026-00-10T00:00:00Z"), None);
        // Century years are leap years only when divisible by 400.
        let y2000 = UNIX_EPOCH + Duration::from_secs(951_782_399); // 2000-02-28T23:59:59Z
        assert_eq!(
            rfc3339("2000-02-29T00:00:00Z", y2000),
            Some(Duration::from_secs(1))
        );
        let y2100 = UNIX_EPOCH + Duration::from_secs(4_107_542_399); // 2100-02-28T23:59:59Z
        assert_eq!(rfc3339("2100-02-29T00:00:00Z", y2100), None);
        assert_eq!(
            rfc3339("2100-03-01T00:00:00Z", y2100),
            Some(Duration::from_secs(1))
        );
        // Signs and stray bytes.
        assert_eq!(at("+026-05-28T20:26:45Z"), None);
        assert_eq!(at("2026-05-28T20:26:45Zjunk"), None);
        assert_eq!(at("2026/05/28T20:26:45Z"), None);
        assert_eq!(at("2026-05/28T20:26:45Z"), None);
        assert_eq!(at("2026-05-28X20:26:45Z"), None);
        assert_eq!(at("2026-05-28T20:26-45Z"), None);
        assert_eq!(at("2026-05-28T20:26:45"), None);
        assert_eq!(at("2026-05-28T20-26:45Z"), None);
    }

    #[test]
    fn zero_and_past_hints_are_no_hint() {
        let e = HttpError::new(429).with_header("retry-after", "0");
        assert_eq!(server_hint(&e, now()), None);
        let e = HttpError::new(503).with_header("retry-after-ms", "0");
        assert_eq!(server_hint(&e, now()), None);
        // The first header that parses decides, even when it says zero
        // (as in the OpenAI SDK): a later one is not consulted.
        let e = HttpError::new(503)
            .with_header("retry-after-ms", "0")
            .with_header("retry-after", "7");
        assert_eq!(server_hint(&e, now()), None);
        let past = httpdate::fmt_http_date(now() - Duration::from_secs(30));
        let e = HttpError::new(503).with_header("retry-after", past);
        assert_eq!(server_hint(&e, now()), None);
        // An exhausted dimension whose reset is past says nothing; the
        // other reset decides.
        let e = HttpError::new(429)
            .with_header("x-ratelimit-reset-requests", "0s")
            .with_header("x-ratelimit-remaining-requests", "0")
            .with_header("x-ratelimit-reset-tokens", "4s");
        assert_eq!(server_hint(&e, now()), Some(Duration::from_secs(4)));
        let e = HttpError::new(429)
            .with_header("anthropic-ratelimit-tokens-reset", "2020-01-01T00:00:00Z");
        assert_eq!(server_hint(&e, now()), None);
        // A malformed retry-after-ms falls through to retry-after.
        let e = HttpError::new(503)
            .with_header("retry-after-ms", "soon")
            .with_header("retry-after", "2");
        assert_eq!(server_hint(&e, now()), Some(Duration::from_secs(2)));
        // Azure's header.
        let e = HttpError::new(503).with_header("x-ms-retry-after-ms", "1500");
        assert_eq!(server_hint(&e, now()), Some(Duration::from_millis(1500)));
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
        // Of several exhausted dimensions, the latest reset.
        let e = HttpError::new(429)
            .with_header("x-ratelimit-reset-requests", "2s")
            .with_header("x-ratelimit-remaining-requests", "0")
            .with_header("anthropic-ratelimit-requests-reset", "2026-05-28T20:26:43Z")
            .with_header("anthropic-ratelimit-requests-remaining", "0")
            .with_header("x-ratelimit-reset-tokens", "6m0s");
        assert_eq!(server_hint(&e, now()), Some(Duration::from_secs(3)));
        // Remaining but not zero is not exhausted: the soonest.
        let e = HttpError::new(429)
            .with_header("x-ratelimit-reset-requests", "2s")
            .with_header("x-ratelimit-remaining-requests", "5")
            .with_header("x-ratelimit-reset-tokens", "6m0s");
        assert_eq!(server_hint(&e, now()), Some(Duration::from_secs(2)));
        // Anthropic's other dimensions count too.
        for dim in ["requests", "input-tokens", "output-tokens"] {
            let e = HttpError::new(429).with_header(
                &format!("anthropic-ratelimit-{dim}-reset"),
                "2026-05-28T20:26:50Z",
            );
            assert_eq!(
                server_hint(&e, now()),
                Some(Duration::from_secs(10)),
                "{dim}"
            );
        }
        // Reset headers are not wait hints on other statuses.
        let e = HttpError::new(500).with_header("x-ratelimit-reset-requests", "2s");
        assert_eq!(server_hint(&e, now()), None);
    }
}
