//! The scheduler: a due-time queue of every scheduled tag (a binary heap keyed by due time,
//! with versioned entries so a changed or removed tag needs no heap search). Nothing scans all
//! tags per tick; a tag costs one heap entry and one map entry while idle. First checks after
//! start are spread over each tag's period by a deterministic jitter; a failed check backs off
//! exponentially (with jitter, capped at the period); a registry's `Retry-After` pauses all of
//! that registry's checks in the registry client. A check that finds the known digest (a `304`
//! to `If-None-Match`) does not touch the store.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Schedule;
use crate::core::view;
use crate::core::{Engine, SpecChange};
use crate::model::{Cause, Digest, ImageStream, StreamName, StreamTagRef, TagSpec};

/// Checks completed since start, for benchmarks and `/metrics`.
pub static CHECKS: AtomicU64 = AtomicU64::new(0);

/// Read side of the scheduler's state, for `describe` and the API.
#[derive(Clone, Default)]
pub struct SchedulerHandle {
    info: Arc<Mutex<HashMap<String, view::Schedule>>>,
}

impl SchedulerHandle {
    pub fn info(&self, key: &str) -> Option<view::Schedule> {
        self.info
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
    }

    fn set(&self, key: &str, s: view::Schedule) {
        self.info
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), s);
    }

    fn remove(&self, key: &str) {
        self.info
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

/// A min-heap of due times with lazy deletion: an item is live only while its version matches
/// the tag's current version.
#[derive(Default)]
pub struct DueQueue {
    heap: BinaryHeap<Reverse<(Instant, u64, String)>>,
    versions: HashMap<String, u64>,
    next_version: u64,
}

impl DueQueue {
    /// Schedules `key` at `due`, replacing any earlier schedule of it. Returns its version.
    pub fn schedule(&mut self, key: &str, due: Instant) -> u64 {
        self.next_version += 1;
        let v = self.next_version;
        self.versions.insert(key.to_string(), v);
        self.heap.push(Reverse((due, v, key.to_string())));
        v
    }

    pub fn remove(&mut self, key: &str) {
        self.versions.remove(key);
    }

    /// The earliest live due time.
    pub fn peek(&mut self) -> Option<Instant> {
        while let Some(Reverse((due, v, key))) = self.heap.peek() {
            if self.versions.get(key) == Some(v) {
                return Some(*due);
            }
            self.heap.pop();
        }
        None
    }

    /// Pops the earliest live item if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(String, u64)> {
        let due = self.peek()?;
        if due > now {
            return None;
        }
        let Reverse((_, v, key)) = self.heap.pop()?;
        Some((key, v))
    }

    pub fn version(&self, key: &str) -> Option<u64> {
        self.versions.get(key).copied()
    }
}

/// A stable fraction in [0, 1) per tag, so restarts spread the same way every time.
pub fn jitter_fraction(key: &str) -> f64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % 1_000_000) as f64 / 1_000_000.0
}

/// Delay before the next check after `failures` consecutive failures: the engine's retry
/// policy from 2 s, never more than the period.
pub fn failure_backoff(failures: u32, period: Duration) -> Duration {
    crate::retry::Backoff::new(Duration::from_secs(2), period).delay(failures)
}

struct Entry {
    tag: StreamTagRef,
    spec: TagSpec,
    schedule: Schedule,
    known: Option<Digest>,
    has_error: bool,
    failures: u32,
    /// Next nominal due time (wall clock), from which the following one is computed.
    checking: bool,
}

pub struct Scheduler {
    engine: Arc<Engine>,
    default: Schedule,
    handle: SchedulerHandle,
    rx: mpsc::UnboundedReceiver<SpecChange>,
    entries: HashMap<String, Entry>,
    queue: DueQueue,
    /// Checks in flight at once, over all registries (each registry has its own budget too).
    max_inflight: usize,
    /// Spread first checks over the period (false: all due at start, for benchmarks).
    spread_start: bool,
}

struct CheckDone {
    key: String,
    version: u64,
    known: Option<Digest>,
    has_error: bool,
    retry_after: Option<Duration>,
    failed: bool,
}

impl Scheduler {
    pub fn new(
        engine: Arc<Engine>,
        default: Schedule,
        rx: mpsc::UnboundedReceiver<SpecChange>,
    ) -> (Scheduler, SchedulerHandle) {
        let handle = SchedulerHandle::default();
        (
            Scheduler {
                engine,
                default,
                handle: handle.clone(),
                rx,
                entries: HashMap::new(),
                queue: DueQueue::default(),
                max_inflight: 256,
                spread_start: true,
            },
            handle,
        )
    }

    /// Makes every tag due at start instead of spreading them (benchmarks only).
    pub fn without_start_spread(mut self) -> Scheduler {
        self.spread_start = false;
        self
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        // Spec changes announced before this first read are in what it reads.
        while self.rx.try_recv().is_ok() {}
        // A page of one stream at a time: a large store never sits in memory whole.
        match self.engine.store().keys().await {
            Ok(keys) => {
                for k in keys {
                    if let Err(e) = self.load_pages(&k, true, &mut Vec::new()).await {
                        tracing::error!(stream = %k, error = %e, "scheduler cannot read stream")
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "scheduler cannot read the store; scheduled tags wait for changes")
            }
        }
        crate::metrics::scheduled_tags(self.entries.len());
        tracing::info!(tags = self.entries.len(), "scheduler started");
        let mut inflight: JoinSet<CheckDone> = JoinSet::new();
        loop {
            // Start every due check there is room for.
            let now = Instant::now();
            while inflight.len() < self.max_inflight {
                let Some((key, version)) = self.queue.pop_due(now) else {
                    break;
                };
                let Some(e) = self.entries.get_mut(&key) else {
                    continue;
                };
                if !self.engine.owns(&key) {
                    // Another replica polls it; look again a period later, in case the
                    // ownership moves here.
                    let delay = until(e.schedule.next_after(Utc::now()));
                    self.enqueue(&key, delay, None);
                    continue;
                }
                e.checking = true;
                let engine = self.engine.clone();
                let (tag, spec, known, has_error) =
                    (e.tag.clone(), e.spec.clone(), e.known.clone(), e.has_error);
                inflight.spawn(check(engine, key, version, tag, spec, known, has_error));
            }
            let next = self.queue.peek();
            let room = inflight.len() < self.max_inflight;
            tokio::select! {
                _ = cancel.cancelled() => break,
                msg = self.rx.recv() => match msg {
                    Some(SpecChange::Stream(key)) => {
                        // A burst of spec changes (a declaration applied in parts, a script
                        // tagging many tags) re-reads each stream once.
                        let mut keys = std::collections::BTreeSet::from([key]);
                        while let Ok(SpecChange::Stream(k)) = self.rx.try_recv() {
                            keys.insert(k);
                        }
                        for k in keys {
                            self.reload(&k).await;
                        }
                    }
                    None => break,
                },
                Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                    if let Ok(done) = done {
                        self.finish(done);
                    }
                }
                _ = sleep_until_opt(next), if room && next.is_some() => {}
            }
        }
        inflight.shutdown().await;
    }

    /// Loads (or refreshes) the polled tags of a stream a page at a time; `keys` gets the
    /// keys of every polled tag seen.
    async fn load_pages(
        &mut self,
        stream_key: &str,
        at_start: bool,
        keys: &mut Vec<String>,
    ) -> Result<(), crate::store::StoreError> {
        let mut pages = self
            .engine
            .store()
            .head_pages(stream_key, crate::store::HEAD_PAGE);
        while let Some(page) = pages.recv().await {
            keys.extend(self.load_stream(&page?, at_start));
        }
        Ok(())
    }

    async fn reload(&mut self, stream_key: &str) {
        let mut keep = Vec::new();
        if let Err(e) = self.load_pages(stream_key, false, &mut keep).await {
            tracing::warn!(stream = stream_key, error = %e, "scheduler cannot re-read stream");
            return;
        }
        let keep: std::collections::HashSet<String> = keep.into_iter().collect();
        let prefix = format!("{stream_key}:");
        let present: Vec<String> = self
            .entries
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .cloned()
            .collect();
        for k in present {
            if !keep.contains(&k) {
                self.entries.remove(&k);
                self.queue.remove(&k);
                self.handle.remove(&k);
            }
        }
        crate::metrics::scheduled_tags(self.entries.len());
    }

    /// Adds or refreshes the polled tags of a stream; returns their keys.
    fn load_stream(&mut self, s: &ImageStream, at_start: bool) -> Vec<String> {
        let mut keys = Vec::new();
        let Ok(sn) = StreamName::new(&s.namespace, &s.name) else {
            return keys;
        };
        for (name, t) in &s.tags {
            if !t.is_polled() {
                continue;
            }
            let key = format!("{}:{}", s.key(), name);
            let schedule = match t.spec.schedule.as_deref().map(Schedule::parse) {
                Some(Ok(sch)) => sch,
                Some(Err(e)) => {
                    tracing::warn!(tag = %key, error = %e, "bad schedule; using the default");
                    self.default.clone()
                }
                None => self.default.clone(),
            };
            keys.push(key.clone());
            let known = t.current_digest().cloned();
            let has_error = t.import_error().is_some();
            if let Some(e) = self.entries.get_mut(&key)
                && e.spec == t.spec
            {
                // Same spec: the digest may have moved by another path; keep the due time.
                if !e.checking {
                    e.known = known;
                    e.has_error = has_error;
                }
                continue;
            }
            let period = schedule.period(Utc::now());
            let delay = if at_start && !self.spread_start {
                Duration::ZERO
            } else if at_start {
                // Spread first checks over the period; cron schedules keep their own times.
                match &schedule {
                    Schedule::Interval(_) => period.mul_f64(jitter_fraction(&key)),
                    Schedule::Cron(c) => until(Schedule::Cron(c.clone()).next_after(Utc::now())),
                }
            } else {
                // A new or changed spec was imported just now by the write path.
                until(schedule.next_after(Utc::now()))
            };
            let Ok(tag) = StreamTagRef::new(sn.clone(), name) else {
                continue;
            };
            self.entries.insert(
                key.clone(),
                Entry {
                    tag,
                    spec: t.spec.clone(),
                    schedule,
                    known,
                    has_error,
                    failures: 0,
                    checking: false,
                },
            );
            self.enqueue(&key, delay, None);
        }
        keys
    }

    fn enqueue(&mut self, key: &str, delay: Duration, last_checked: Option<chrono::DateTime<Utc>>) {
        let due = Instant::now() + delay;
        self.queue.schedule(key, due);
        let prev = self.handle.info(key).and_then(|i| i.last_checked);
        self.handle.set(
            key,
            view::Schedule {
                last_checked: last_checked.or(prev),
                next_due: chrono::Duration::from_std(delay)
                    .ok()
                    .map(|d| Utc::now() + d),
            },
        );
    }

    fn finish(&mut self, done: CheckDone) {
        CHECKS.fetch_add(1, Ordering::Relaxed);
        let Some(e) = self.entries.get_mut(&done.key) else {
            return;
        };
        e.checking = false;
        if self
            .queue
            .version(&done.key)
            .is_some_and(|v| v != done.version)
        {
            // Rescheduled (spec changed) while checking.
            return;
        }
        e.known = done.known;
        e.has_error = done.has_error;
        let period = e.schedule.period(Utc::now());
        let delay = if done.failed {
            e.failures += 1;
            let backoff = failure_backoff(e.failures, period);
            done.retry_after.map_or(backoff, |r| {
                r.max(Duration::from_millis(100)).min(period.max(r))
            })
        } else {
            e.failures = 0;
            until(e.schedule.next_after(Utc::now()))
        };
        self.enqueue(&done.key, delay, Some(Utc::now()));
    }
}

fn until(t: chrono::DateTime<Utc>) -> Duration {
    (t - Utc::now()).to_std().unwrap_or(Duration::ZERO)
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[allow(clippy::too_many_arguments)]
async fn check(
    engine: Arc<Engine>,
    key: String,
    version: u64,
    tag: StreamTagRef,
    spec: TagSpec,
    known: Option<Digest>,
    has_error: bool,
) -> CheckDone {
    // A policy tag's check lists its repository; an image tag's is one conditional HEAD that
    // touches the store only when something changed.
    let recorded = if matches!(spec.from, crate::model::TagFrom::Policy(_)) {
        engine
            .check_policy(&tag, &spec, Cause::Schedule, false)
            .await
    } else {
        let result = engine.resolve(&spec, known.as_ref()).await;
        let unchanged =
            matches!(&result, Ok((_, r)) if r.unchanged || Some(&r.digest) == known.as_ref());
        if unchanged && !has_error {
            return CheckDone {
                key,
                version,
                known,
                has_error,
                retry_after: None,
                failed: false,
            };
        }
        engine
            .record_import(&tag, &spec, result, Cause::Schedule, false, None)
            .await
    };
    match recorded {
        Ok((stream, err)) => {
            let t = stream.tags.get(&tag.tag);
            CheckDone {
                key,
                version,
                known: t.and_then(|t| t.current_digest().cloned()),
                has_error: t.is_some_and(|t| t.import_error().is_some()),
                retry_after: err.as_ref().and_then(|e| e.retry_after()),
                failed: err.is_some(),
            }
        }
        Err(e) => {
            tracing::warn!(tag = %tag, error = %e, "cannot record scheduled check");
            CheckDone {
                key,
                version,
                known,
                has_error,
                retry_after: None,
                failed: true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn queue_orders_and_replaces() {
        let mut q = DueQueue::default();
        let t0 = Instant::now();
        q.schedule("b", t0 + Duration::from_secs(2));
        q.schedule("a", t0 + Duration::from_secs(1));
        q.schedule("c", t0 + Duration::from_secs(3));
        // rescheduling replaces: "a" moves after "c"
        q.schedule("a", t0 + Duration::from_secs(5));
        q.remove("c");
        assert_eq!(q.pop_due(t0), None, "nothing due yet");
        tokio::time::advance(Duration::from_secs(10)).await;
        let now = Instant::now();
        let order: Vec<String> = std::iter::from_fn(|| q.pop_due(now).map(|x| x.0)).collect();
        assert_eq!(order, vec!["b", "a"]);
        assert_eq!(q.peek(), None);
    }

    #[test]
    fn jitter_is_stable_and_spread() {
        assert_eq!(
            jitter_fraction("default/a:1"),
            jitter_fraction("default/a:1")
        );
        let fr: Vec<f64> = (0..1000)
            .map(|i| jitter_fraction(&format!("default/s:{i}")))
            .collect();
        assert!(fr.iter().all(|f| (0.0..1.0).contains(f)));
        // spread: each tenth of the period gets a fair share
        for b in 0..10 {
            let n = fr.iter().filter(|f| (**f * 10.0) as usize == b).count();
            assert!((50..150).contains(&n), "bucket {b} has {n}");
        }
    }

    #[test]
    fn backoff_grows_and_caps_at_period() {
        let p = Duration::from_secs(60);
        let b1 = failure_backoff(1, p);
        let b3 = failure_backoff(3, p);
        assert!(b1 >= Duration::from_millis(1600) && b1 <= Duration::from_millis(2400));
        assert!(b3 >= Duration::from_millis(6400) && b3 <= Duration::from_millis(9600));
        assert!(failure_backoff(30, p) <= p);
        assert!(failure_backoff(30, p) >= p.mul_f64(0.8));
    }
}
