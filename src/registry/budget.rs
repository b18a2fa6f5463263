//! Politeness towards one registry host: at most `max_concurrency` requests in flight, at most
//! `max_requests_per_second` started (a token bucket with a one-second burst), and a pause
//! until the time a `429`/`503` `Retry-After` named, which holds every request to that host.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

pub struct HostBudget {
    permits: Semaphore,
    bucket: Mutex<Bucket>,
    paused_until: Mutex<Option<Instant>>,
}

struct Bucket {
    /// Requests per second; 0 means unlimited.
    rate: f64,
    tokens: f64,
    last: Instant,
}

/// The longest a request waits for a token or a pause (a day).
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

impl HostBudget {
    pub fn new(rate: f64, concurrency: usize) -> HostBudget {
        HostBudget {
            permits: Semaphore::new(concurrency.max(1)),
            bucket: Mutex::new(Bucket {
                rate,
                tokens: rate.max(1.0),
                last: Instant::now(),
            }),
            paused_until: Mutex::new(None),
        }
    }

    /// Waits for the pause, a concurrency slot and a rate token, in that order.
    pub async fn acquire(&self) -> SemaphorePermit<'_> {
        loop {
            let pause = *self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
            match pause {
                Some(until) if until > Instant::now() => tokio::time::sleep_until(until).await,
                _ => break,
            }
        }
        let permit = self
            .permits
            .acquire()
            .await
            .expect("semaphore never closed");
        loop {
            let wait = {
                let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
                if b.rate <= 0.0 {
                    break;
                }
                let now = Instant::now();
                let elapsed = now.duration_since(b.last).as_secs_f64();
                b.tokens = (b.tokens + elapsed * b.rate).min(b.rate.max(1.0));
                b.last = now;
                if b.tokens >= 1.0 {
                    b.tokens -= 1.0;
                    break;
                }
                // A rate too small to wait for (validated away in config) still cannot panic.
                Duration::try_from_secs_f64((1.0 - b.tokens) / b.rate)
                    .unwrap_or(MAX_WAIT)
                    .min(MAX_WAIT)
            };
            tokio::time::sleep(wait).await;
        }
        permit
    }

    /// Holds every request to this host until `d` from now (a later pause wins).
    pub fn pause_for(&self, d: Duration) {
        // `Retry-After` is the registry's word, capped so a hostile one cannot stop us forever.
        let Some(until) = Instant::now().checked_add(d.min(MAX_WAIT)) else {
            return;
        };
        let mut p = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_none_or(|cur| cur < until) {
            *p = Some(until);
        }
    }

    /// When the host is paused, until when.
    pub fn paused_until(&self) -> Option<Instant> {
        let p = *self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        p.filter(|u| *u > Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_and_pause() {
        let b = HostBudget::new(2.0, 8);
        let start = Instant::now();
        for _ in 0..6 {
            drop(b.acquire().await);
        }
        // 2 in the burst, then 4 more at 2/s
        assert!(
            start.elapsed() >= Duration::from_millis(1900),
            "{:?}",
            start.elapsed()
        );
        b.pause_for(Duration::from_secs(5));
        let t = Instant::now();
        drop(b.acquire().await);
        assert!(t.elapsed() >= Duration::from_secs(5));
    }

    /// Issue 15: a rate of 1e-300 made the wait overflow `Duration`; a huge `Retry-After`
    /// overflowed the clock.
    #[tokio::test(start_paused = true)]
    async fn tiny_rates_and_huge_pauses_do_not_panic() {
        let b = HostBudget::new(1e-300, 1);
        drop(b.acquire().await); // the burst token
        let waited = tokio::time::timeout(Duration::from_secs(1), b.acquire()).await;
        assert!(
            waited.is_err(),
            "waits (a day at most) instead of panicking"
        );
        b.pause_for(Duration::MAX);
        assert!(b.paused_until().is_some());
    }
}
