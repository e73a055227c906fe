//! Bandwidth caps: a token bucket over bytes sent, per destination (`max_rate`) and for the
//! whole agent (`[limits] max_rate`). Tokens refill at the rate, up to one second's worth;
//! a request larger than the bucket goes into debt and the next sender waits it off, so the
//! average never exceeds the cap whatever the part size.

use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Mutex;

/// A token bucket over bytes.
#[derive(Debug)]
pub struct Limiter {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Limiter {
    /// A bucket refilling at `bytes_per_sec`, holding at most one second's worth.
    pub fn new(bytes_per_sec: u64) -> Limiter {
        Limiter {
            rate: bytes_per_sec as f64,
            state: Mutex::new((bytes_per_sec as f64, Instant::now())),
        }
    }

    /// The cap in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// Wait until `bytes` may be sent; returns how long it waited.
    pub async fn acquire(&self, bytes: u64) -> Duration {
        let wait = {
            let mut s = self.state.lock().await;
            let now = Instant::now();
            let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
            s.0 = (s.0 + refill).min(self.rate);
            s.1 = now;
            s.0 -= bytes as f64;
            if s.0 < 0.0 {
                Duration::from_secs_f64(-s.0 / self.rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn debt_is_waited_off_at_the_rate() {
        let l = Limiter::new(1000);
        assert_eq!(l.acquire(1000).await, Duration::ZERO);
        // 3000 more bytes with an empty bucket: 3 s of debt.
        assert_eq!(l.acquire(3000).await, Duration::from_secs(3));
    }
}
