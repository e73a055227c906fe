//! Units spelled one way everywhere: bytes for people, and "now" on the Unix clock.

use std::time::{SystemTime, UNIX_EPOCH};

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
    fn the_clocks_agree() {
        let ms = now_ms();
        let s = now_secs() as i64;
        assert!(ms > 1_600_000_000_000);
        assert!((ms / 1000 - s).abs() <= 1);
    }
}
