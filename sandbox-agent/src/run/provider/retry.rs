//! When to try a model call again, and how long to wait first. Pure: randomness comes in through
//! [`Jitter`], the current time as an argument.
//!
//! Retried: HTTP 429, 500, 502, 503, 504 and 529; connect errors; and a stream `error` of kind
//! `overloaded_error` or `api_error` that arrives before any text or thinking was produced. Never
//! retried: other statuses (400, 401, 403, 404, …), timeouts, errors after content began.
//!
//! The wait is exponential backoff with full jitter — uniform in `[0, min(max_delay, base_delay·2^n)]`
//! before retry `n` (from 0) — unless the server said how long: `retry-after-ms` (milliseconds),
//! `retry-after` (seconds, or an HTTP date), capped at [`RetryPolicy::max_retry_after`].

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;

/// HTTP statuses worth another attempt (529: Anthropic's "overloaded").
const RETRYABLE_STATUSES: [u16; 6] = [429, 500, 502, 503, 504, 529];
/// Stream error kinds worth another attempt, if nothing was produced yet.
const RETRYABLE_STREAM_ERRORS: [&str; 2] = ["overloaded_error", "api_error"];

/// A source of numbers in `[0, 1]`: random in production, fixed in tests.
#[derive(Clone)]
pub struct Jitter(Arc<dyn Fn() -> f64 + Send + Sync>);

impl Jitter {
    /// Uniformly random.
    pub fn random() -> Self {
        Self(Arc::new(rand::random::<f64>))
    }

    /// Always `unit` (clamped to `[0, 1]`).
    #[cfg(test)]
    pub fn fixed(unit: f64) -> Self {
        Self(Arc::new(move || unit))
    }

    /// The next number, clamped to `[0, 1]` (NaN counts as 0).
    pub fn unit(&self) -> f64 {
        let unit = (self.0)();
        if unit.is_nan() {
            0.0
        } else {
            unit.clamp(0.0, 1.0)
        }
    }
}

impl fmt::Debug for Jitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Jitter")
    }
}

/// How often and how patiently to retry.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Backoff before the first retry, at most (doubling after each).
    pub base_delay: Duration,
    /// Backoff cap.
    pub max_delay: Duration,
    /// Attempts in all, the first one included (1: never retry).
    pub max_attempts: u32,
    /// Cap of a server's `retry-after`.
    pub max_retry_after: Duration,
    /// The randomness of the backoff.
    pub jitter: Jitter,
}

impl Default for RetryPolicy {
    /// 500 ms base, 30 s cap, 5 attempts, `retry-after` honoured up to 60 s.
    fn default() -> Self {
        Self {
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_attempts: 5,
            max_retry_after: Duration::from_secs(60),
            jitter: Jitter::random(),
        }
    }
}

impl RetryPolicy {
    /// The backoff before retry `retry` (0 for the first), full jitter.
    pub fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self
            .base_delay
            .saturating_mul(2_u32.saturating_pow(retry.min(31)))
            .min(self.max_delay);
        ceiling.mul_f64(self.jitter.unit())
    }

    /// The wait before retry `retry`: the server's hint (capped) if there is one, else the backoff.
    pub fn delay(&self, retry: u32, server_hint: Option<Duration>) -> Duration {
        match server_hint {
            Some(hint) => hint.min(self.max_retry_after),
            None => self.backoff(retry),
        }
    }
}

/// Whether a response with this status is worth another attempt.
pub fn is_retryable_status(status: u16) -> bool {
    RETRYABLE_STATUSES.contains(&status)
}

/// Whether a stream error of this kind (before any content) is worth another attempt.
pub fn is_retryable_stream_error(kind: &str) -> bool {
    RETRYABLE_STREAM_ERRORS.contains(&kind)
}

/// The server's requested wait: `retry-after-ms`, else `retry-after` in seconds or as an HTTP date
/// (relative to `now`; a date in the past means no wait). Unparsable values are ignored.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let duration = |value: f64, scale: f64| {
        (value.is_finite() && value >= 0.0)
            .then(|| Duration::try_from_secs_f64(value / scale).ok())
            .flatten()
    };
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        if let Some(delay) = duration(ms, 1000.0) {
            return Some(delay);
        }
    }
    let value = header("retry-after")?.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return duration(seconds, 1.0);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn policy(unit: f64) -> RetryPolicy {
        RetryPolicy {
            jitter: Jitter::fixed(unit),
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_full_jitter() {
        let top = policy(1.0);
        let ceilings: Vec<u64> = (0..9)
            .map(|retry| top.backoff(retry).as_millis() as u64)
            .collect();
        assert_eq!(
            ceilings,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(top.backoff(u32::MAX), Duration::from_secs(30));
        assert_eq!(policy(0.0).backoff(5), Duration::ZERO);
        assert_eq!(policy(0.5).backoff(2), Duration::from_millis(1000));
        assert_eq!(
            policy(7.0).backoff(0),
            Duration::from_millis(500),
            "clamped"
        );
        assert_eq!(policy(f64::NAN).backoff(0), Duration::ZERO);
        let random = RetryPolicy::default();
        for retry in 0..10 {
            assert!(random.backoff(retry) <= Duration::from_secs(30));
        }
    }

    #[test]
    fn a_server_hint_wins_over_the_backoff_but_is_capped() {
        let policy = policy(1.0);
        assert_eq!(
            policy.delay(3, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(
            policy.delay(0, Some(Duration::from_secs(3600))),
            Duration::from_secs(60)
        );
        assert_eq!(policy.delay(1, None), Duration::from_secs(1));
    }

    #[test]
    fn retry_after_headers() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // 2015-10-21 07:28:00 GMT
        let parse = |pairs: &[(&'static str, &'static str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.insert(*name, HeaderValue::from_static(value));
            }
            retry_after(&headers, now)
        };
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&[("retry-after", "7")]), Some(Duration::from_secs(7)));
        assert_eq!(
            parse(&[("retry-after", "1.5")]),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse(&[("retry-after-ms", "250"), ("retry-after", "7")]),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            parse(&[("retry-after-ms", "soon"), ("retry-after", "7")]),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse(&[("retry-after", "Wed, 21 Oct 2015 07:28:30 GMT")]),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse(&[("retry-after", "Wed, 21 Oct 2015 07:00:00 GMT")]),
            Some(Duration::ZERO)
        );
        assert_eq!(parse(&[("retry-after", "-3")]), None);
        assert_eq!(parse(&[("retry-after", "tomorrow")]), None);
    }

    #[test]
    fn what_is_retried() {
        for status in [429, 500, 502, 503, 504, 529] {
            assert!(is_retryable_status(status), "{status}");
        }
        for status in [400, 401, 403, 404, 413, 422] {
            assert!(!is_retryable_status(status), "{status}");
        }
        assert!(is_retryable_stream_error("overloaded_error"));
        assert!(is_retryable_stream_error("api_error"));
        assert!(!is_retryable_stream_error("invalid_request_error"));
    }
}
