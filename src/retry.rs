//! The one retry policy of the engine: exponential backoff from an initial delay, doubling,
//! ±20% jitter (so replicas and tags that failed together do not retry together), never above
//! a cap; a `Retry-After` the other side named wins over the formula. Every loop that retries
//! (scheduled checks, deliveries, the event publisher, push re-checks) uses it, so the rules
//! are written and tested once. `compare_and_set` is the one loop of every optimistic write
//! (store commits, outbox clearing, trigger state, delivery records, the engine's changes).

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// Fraction of the delay drawn at random either way (0.2: ±20%).
    pub jitter: f64,
}

impl Backoff {
    pub const fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            jitter: 0.2,
        }
    }

    /// The delay before retry number `retry` (1 for the first retry after a failure).
    pub fn delay(&self, retry: u32) -> Duration {
        let base = self
            .initial
            .saturating_mul(1u32 << retry.saturating_sub(1).min(20));
        let factor = 1.0 - self.jitter + fastrand::f64() * 2.0 * self.jitter;
        base.min(self.max).mul_f64(factor.max(0.0)).min(self.max)
    }

    /// As `delay`, unless the other side said when to come back (`Retry-After`).
    pub fn delay_or(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        retry_after.unwrap_or_else(|| self.delay(retry))
    }
}

/// A retrying loop's state: consecutive failures, forgotten after a success.
#[derive(Debug, Clone)]
pub struct Retry {
    policy: Backoff,
    failures: u32,
}

impl Retry {
    pub const fn new(policy: Backoff) -> Retry {
        Retry {
            policy,
            failures: 0,
        }
    }

    /// Records a failure; returns how long to wait before the next attempt.
    pub fn failed(&mut self, retry_after: Option<Duration>) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.policy.delay_or(self.failures, retry_after)
    }

    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// What one attempt of a compare-and-set loop found.
#[derive(Debug)]
pub enum Cas<T> {
    Done(T),
    /// Another writer came first: read again and retry.
    Conflict,
}

/// Waits between conflicts, from the second on: writers that collided spread out.
const CONFLICTS: Backoff = Backoff::new(Duration::from_millis(2), Duration::from_millis(200));

/// The one compare-and-set loop: runs `attempt` (read, change, write on the revision read)
/// until it is done or has conflicted `max` times (None then); an error ends it at once.
pub async fn compare_and_set<T, E, Fut>(
    max: u32,
    mut attempt: impl FnMut() -> Fut,
) -> Result<Option<T>, E>
where
    Fut: Future<Output = Result<Cas<T>, E>>,
{
    let mut tries = CasLoop::new(max);
    while tries.next().await {
        if let Cas::Done(t) = attempt().await? {
            return Ok(Some(t));
        }
    }
    Ok(None)
}

/// The same loop for code that cannot hand its attempt over as a closure (`while
/// tries.next().await { ... }`; `continue` on a conflict).
#[derive(Debug)]
pub struct CasLoop {
    max: u32,
    done: u32,
}

impl CasLoop {
    pub const fn new(max: u32) -> CasLoop {
        CasLoop { max, done: 0 }
    }

    /// Whether to attempt again (false once `max` attempts were made), after the backoff
    /// from the third attempt on.
    pub async fn next(&mut self) -> bool {
        if self.done >= self.max {
            return false;
        }
        if self.done > 1 {
            tokio::time::sleep(CONFLICTS.delay(self.done - 1)).await;
        }
        self.done += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_with_jitter_and_never_exceeds_the_cap() {
        let b = Backoff::new(Duration::from_secs(2), Duration::from_secs(60));
        for _ in 0..200 {
            let d1 = b.delay(1);
            assert!(d1 >= Duration::from_millis(1600) && d1 <= Duration::from_millis(2400));
            let d3 = b.delay(3);
            assert!(d3 >= Duration::from_millis(6400) && d3 <= Duration::from_millis(9600));
            assert!(b.delay(30) <= Duration::from_secs(60));
            assert!(b.delay(u32::MAX) <= Duration::from_secs(60));
        }
    }

    #[test]
    fn retry_after_wins_and_success_resets() {
        let mut r = Retry::new(Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(5),
        ));
        assert_eq!(
            r.failed(Some(Duration::from_secs(42))),
            Duration::from_secs(42)
        );
        r.failed(None);
        r.failed(None);
        assert_eq!(r.failures(), 3);
        r.succeeded();
        assert_eq!(r.failures(), 0);
        assert!(r.failed(None) <= Duration::from_millis(120));
    }

    #[tokio::test]
    async fn compare_and_set_retries_conflicts_and_stops_at_errors() {
        let tries = std::cell::Cell::new(0);
        let done = compare_and_set(5, || async {
            tries.set(tries.get() + 1);
            Ok::<_, ()>(if tries.get() < 3 {
                Cas::Conflict
            } else {
                Cas::Done(tries.get())
            })
        })
        .await;
        assert_eq!(done, Ok(Some(3)));
        let gave_up = compare_and_set(4, || async { Ok::<Cas<()>, ()>(Cas::Conflict) }).await;
        assert_eq!(gave_up, Ok(None));
        let calls = std::cell::Cell::new(0);
        let failed = compare_and_set(4, || async {
            calls.set(calls.get() + 1);
            Err::<Cas<()>, _>("broken")
        })
        .await;
        assert_eq!((failed, calls.get()), (Err("broken"), 1));
    }

    #[test]
    fn without_jitter_is_exact() {
        let b = Backoff {
            jitter: 0.0,
            ..Backoff::new(Duration::from_millis(2), Duration::from_secs(2))
        };
        assert_eq!(b.delay(1), Duration::from_millis(2));
        assert_eq!(b.delay(4), Duration::from_millis(16));
        assert_eq!(b.delay(20), Duration::from_secs(2));
    }
}
