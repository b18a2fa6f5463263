//! The trigger rules, defined once and applied by both stores: when a tag's image fires a
//! trigger, which deliveries a newer image supersedes, what an attempt's outcome leaves, and
//! which deliveries may be claimed for an attempt. The stores only read and write records
//! around these decisions (SQLite in one transaction, JetStream by compare-and-set), so both
//! behave alike by construction, and `conformance` checks that they do.

use super::{DeliveryState, FireOutcome};

/// Offering a tag's current image (`digest`) to a trigger that last fired for `last_fired`:
/// the same image does nothing; a first image under `skip_initial` is only recorded; any
/// other image fires (a delivery is queued and the trigger's state moves to it).
pub fn fire(last_fired: Option<&str>, digest: &str, skip_initial: bool) -> FireOutcome {
    match last_fired {
        Some(last) if last == digest => FireOutcome::Unchanged,
        None if skip_initial => FireOutcome::Recorded,
        _ => FireOutcome::Fired,
    }
}

/// A newer image of the same tag fired: a delivery still queued is superseded and never sent,
/// so an old image never reaches CI after a newer one. An attempt already under way finishes,
/// and its outcome is decided by `after_attempt`; a settled delivery stays as it is.
/// Returns the note to record, or None when `state` is left alone.
pub fn supersede(state: DeliveryState, by_digest: &str) -> Option<String> {
    (state == DeliveryState::Pending).then(|| format!("superseded by {by_digest}"))
}

/// The state an attempt leaves: its `outcome`, except that a retry (`Pending`) of a delivery
/// that was superseded meanwhile, or whose tag fired a newer one, is superseded
/// instead (the newer image goes out; this one must not follow it). `newer_fired`: the
/// trigger fired a later delivery for the same tag.
pub fn after_attempt(
    current: DeliveryState,
    outcome: DeliveryState,
    newer_fired: bool,
) -> DeliveryState {
    if outcome == DeliveryState::Pending && (current == DeliveryState::Superseded || newer_fired) {
        DeliveryState::Superseded
    } else {
        outcome
    }
}

/// Whether a delivery may be attempted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    Now,
    /// Queued, due in this many milliseconds.
    Later(i64),
    /// Under way elsewhere, or settled.
    Never,
}

/// A queued delivery is claimed once its `next_at` (Unix ms) has come; nothing else is.
pub fn claim(state: DeliveryState, next_at: i64, now_ms: i64) -> Claim {
    match state {
        DeliveryState::Pending if next_at <= now_ms => Claim::Now,
        DeliveryState::Pending => Claim::Later(next_at - now_ms),
        _ => Claim::Never,
    }
}

/// Settled deliveries are kept `[delivery] retention`-long for inspection, then dropped; a
/// dead one is kept until it is retried (SPEC 5), a queued one until it settles.
pub fn purgeable(state: DeliveryState, settled_ms: i64, cutoff_ms: i64) -> bool {
    matches!(state, DeliveryState::Delivered | DeliveryState::Superseded) && settled_ms < cutoff_ms
}

/// `retry_dead`: a dead delivery is queued again as new, now; nothing else changes.
pub fn retry(state: DeliveryState) -> Option<DeliveryState> {
    (state == DeliveryState::Dead).then_some(DeliveryState::Pending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeliveryState::*;

    #[test]
    fn firing() {
        assert_eq!(fire(Some("a"), "a", false), FireOutcome::Unchanged);
        assert_eq!(fire(Some("a"), "a", true), FireOutcome::Unchanged);
        assert_eq!(fire(Some("a"), "b", true), FireOutcome::Fired);
        assert_eq!(fire(None, "a", false), FireOutcome::Fired);
        assert_eq!(fire(None, "a", true), FireOutcome::Recorded);
    }

    #[test]
    fn superseding_and_attempts() {
        assert!(supersede(Pending, "sha256:b").is_some_and(|n| n.contains("sha256:b")));
        for s in [Inflight, Delivered, Dead, Superseded] {
            assert_eq!(supersede(s, "x"), None, "{s:?}");
        }
        assert_eq!(after_attempt(Inflight, Pending, false), Pending);
        assert_eq!(after_attempt(Inflight, Pending, true), Superseded);
        assert_eq!(after_attempt(Superseded, Pending, false), Superseded);
        assert_eq!(after_attempt(Superseded, Delivered, true), Delivered);
        assert_eq!(after_attempt(Inflight, Dead, true), Dead);
    }

    #[test]
    fn claiming_purging_retrying() {
        assert_eq!(claim(Pending, 10, 10), Claim::Now);
        assert_eq!(claim(Pending, 15, 10), Claim::Later(5));
        for s in [Inflight, Delivered, Dead, Superseded] {
            assert_eq!(claim(s, 0, 10), Claim::Never);
        }
        assert!(purgeable(Delivered, 1, 2) && purgeable(Superseded, 1, 2));
        assert!(!purgeable(Delivered, 2, 2) && !purgeable(Dead, 1, 2) && !purgeable(Pending, 1, 2));
        assert_eq!(retry(Dead), Some(Pending));
        assert_eq!(retry(Delivered), None);
    }
}
