//! Units spelled one way everywhere: bytes for people, and "now" on the Unix clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    now_ns() / 1_000_000
}

/// Whole seconds since the Unix epoch (0 if the clock is before it).
pub fn now_secs() -> u64 {
    (now_ns() / 1_000_000_000) as u64
}

/// Delay before retry number `attempt` (1 for the first retry): exponential from `first`,
/// capped at `cap`, with ±25% jitter so that many retries do not fall due together. The one
/// backoff of the agent: uploads, notifications and listing pages.
pub fn retry_delay(attempt: i64, first: Duration, cap: Duration) -> Duration {
    let cap = cap.as_millis() as f64;
    let base = (first.as_millis() as f64 * 2f64.powi((attempt - 1).clamp(0, 20) as i32)).min(cap);
    let jitter = 0.75 + fastrand::f64() * 0.5;
    Duration::from_millis((base * jitter) as u64)
}

/// Delay before a queued job's retry number `attempt` (an upload, a notification):
/// exponential from 1 s, capped at 2 minutes (10 minutes for permanent errors, which are
/// retried slowly, not dropped).
pub fn backoff(attempt: i64, permanent: bool) -> Duration {
    let cap = if permanent { 600 } else { 120 };
    retry_delay(attempt, Duration::from_secs(1), Duration::from_secs(cap))
}

/// Bytes for people: `512 B`, `1.5 MiB`.
pub fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_for_people() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert!(backoff(1, false) <= Duration::from_millis(1250));
        assert!(backoff(30, false) <= Duration::from_secs(150));
        assert!(backoff(30, true) >= Duration::from_secs(450));
    }

    #[test]
    fn the_clocks_agree() {
        let ms = now_ms();
        let s = now_secs() as i64;
        assert!(ms > 1_600_000_000_000);
        assert!((ms / 1000 - s).abs() <= 1);
    }
}
