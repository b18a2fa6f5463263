//! Image change triggers, with BuildConfig semantics: per trigger and tag the last image fired
//! for is persisted; a tag whose current image differs fires once (a never-fired trigger fires
//! for the current image, unless `skip_initial`); a newer image supersedes a still-pending
//! delivery of an older one. The planner is level-triggered — it compares state, not events —
//! so it can run again after any crash and do exactly what is missing. Deliveries live in the
//! store and are sent by the deliverer, at least once, with backoff and dead-lettering.

pub mod sink;
pub mod template;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{DeliveryConfig, TriggerConfig};
use crate::core::{CoreError, Engine};
use crate::model::event::TAG_CHANGED;
use crate::model::{Event, EventData, ImageStream, StreamTagRef};
use crate::store::{Delivery, DeliveryState, StoreError};

pub struct Triggers {
    engine: Arc<Engine>,
    configs: Vec<Arc<TriggerConfig>>,
    delivery: DeliveryConfig,
    http: reqwest::Client,
    wake: Notify,
    inflight: Mutex<HashSet<i64>>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct TriggerView {
    pub name: String,
    pub sink: String,
    pub on: Vec<String>,
    pub paused: bool,
    pub pending: i64,
    pub dead: i64,
    pub delivered: i64,
    pub superseded: i64,
    /// `ns/stream:tag` -> digest last fired for.
    pub last_fired: BTreeMap<String, String>,
    /// Recent deliveries, newest first.
    pub deliveries: Vec<DeliveryView>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct DeliveryView {
    pub id: i64,
    pub tag: String,
    pub digest: String,
    pub state: String,
    pub attempts: u32,
    pub next_attempt: Option<chrono::DateTime<chrono::Utc>>,
    pub last_error: Option<String>,
    pub event_id: String,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The `tag.changed` event of a tag's current image: the same id as the event published when
/// it changed, so deliveries and bus subscribers can match them up.
pub fn current_event(engine: &Engine, s: &ImageStream, tag: &str) -> Option<Event> {
    let t = s.tags.get(tag)?;
    let cur = t.current()?;
    Some(Event::new(
        TAG_CHANGED,
        cur.id.clone(),
        &engine.instance,
        cur.created,
        EventData {
            namespace: s.namespace.clone(),
            stream: s.name.clone(),
            tag: tag.to_string(),
            digest: Some(cur.digest.to_string()),
            previous: t.history.get(1).map(|h| h.digest.to_string()),
            image: Some(cur.image.clone()),
            generation: cur.generation,
            cause: Some(cur.cause.as_str().into()),
            reason: None,
            message: None,
            trigger: None,
        },
    ))
}

impl Triggers {
    pub fn new(
        engine: Arc<Engine>,
        configs: &[TriggerConfig],
        delivery: DeliveryConfig,
    ) -> Arc<Triggers> {
        crate::registry::install_crypto();
        let http = reqwest::Client::builder()
            .user_agent(concat!("istream/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(64)
            .build()
            .expect("HTTP client with static settings");
        Arc::new(Triggers {
            engine,
            configs: configs.iter().cloned().map(Arc::new).collect(),
            delivery,
            http,
            wake: Notify::new(),
            inflight: Mutex::new(HashSet::new()),
        })
    }

    /// Fires what is due for one tag (`ns/stream:tag`), for every trigger watching it.
    pub async fn plan(&self, tag_key: &str) -> Result<(), StoreError> {
        let Some((stream_key, tag)) = tag_key.rsplit_once(':') else {
            return Ok(());
        };
        let watching: Vec<&Arc<TriggerConfig>> = self
            .configs
            .iter()
            .filter(|t| !t.paused && t.on.iter().any(|o| o.to_string() == tag_key))
            .collect();
        if watching.is_empty() {
            return Ok(());
        }
        let Some((stream, _)) = self.engine.store.get(stream_key).await? else {
            return Ok(());
        };
        let Some(event) = current_event(&self.engine, &stream, tag) else {
            return Ok(());
        };
        let digest = event.data.digest.clone().unwrap_or_default();
        for t in watching {
            let last = self.engine.store.last_fired(&t.name, tag_key).await?;
            if last.as_deref() == Some(digest.as_str()) {
                continue;
            }
            let delivery = if last.is_none() && t.skip_initial {
                tracing::info!(trigger = %t.name, tag = tag_key, digest = %digest, "first image recorded without firing (skip_initial)");
                None
            } else {
                tracing::info!(trigger = %t.name, tag = tag_key, digest = %digest, "trigger fired");
                Some(event.clone())
            };
            let queued = delivery.is_some();
            self.engine
                .store
                .fire(&t.name, tag_key, &digest, delivery, now_ms())
                .await?;
            if queued {
                self.wake.notify_one();
            }
        }
        Ok(())
    }

    /// Plans every watched tag (at start), then each tag as it changes.
    pub async fn run_planner(
        self: Arc<Self>,
        mut changed: mpsc::UnboundedReceiver<String>,
        cancel: CancellationToken,
    ) {
        let mut all: Vec<String> = self
            .configs
            .iter()
            .flat_map(|t| t.on.iter().map(|o| o.to_string()))
            .collect();
        all.sort();
        all.dedup();
        for k in &all {
            if let Err(e) = self.plan(k).await {
                tracing::error!(tag = %k, error = %e, "cannot plan triggers");
            }
        }
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                msg = changed.recv() => {
                    let Some(first) = msg else { return };
                    // Coalesce a burst: plan each tag once, newest state wins.
                    let mut batch = vec![first];
                    while let Ok(more) = changed.try_recv() {
                        batch.push(more);
                    }
                    batch.sort();
                    batch.dedup();
                    for k in batch {
                        if let Err(e) = self.plan(&k).await {
                            tracing::error!(tag = %k, error = %e, "cannot plan triggers; retrying at the next change or restart");
                        }
                    }
                }
            }
        }
    }

    /// Sends due deliveries, at most `concurrency` at once, until cancelled.
    pub async fn run_deliverer(self: Arc<Self>, cancel: CancellationToken) {
        let mut running: JoinSet<()> = JoinSet::new();
        loop {
            let room = self.delivery.concurrency.saturating_sub(running.len());
            if room > 0 {
                let exclude: Vec<i64> = self
                    .inflight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .copied()
                    .collect();
                match self
                    .engine
                    .store
                    .due_deliveries(now_ms(), room, exclude)
                    .await
                {
                    Ok(due) => {
                        for d in due {
                            self.inflight
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(d.id);
                            let me = self.clone();
                            running.spawn(async move {
                                let id = d.id;
                                me.attempt(d).await;
                                me.inflight
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .remove(&id);
                            });
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot read due deliveries"),
                }
            }
            let wait = match self.engine.store.next_due().await {
                Ok(Some(t)) => Duration::from_millis((t - now_ms()).clamp(0, 5_000) as u64),
                _ => Duration::from_secs(5),
            };
            // Due deliveries still in flight would make the wait zero: let them finish first.
            let wait = if running.is_empty() {
                wait
            } else {
                wait.max(Duration::from_millis(50))
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.wake.notified() => {}
                Some(_) = running.join_next(), if !running.is_empty() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // Let attempts in flight finish briefly; what does not is retried after restart.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while running.join_next().await.is_some() {}
        })
        .await;
    }

    async fn attempt(&self, d: Delivery) {
        let Some(cfg) = self.configs.iter().find(|t| t.name == d.trigger).cloned() else {
            // The trigger was removed from the config: keep the delivery, visible as dead.
            let _ = self
                .engine
                .store
                .update_delivery(
                    d.id,
                    DeliveryState::Dead,
                    d.attempts,
                    d.next_at,
                    Some("trigger no longer configured".into()),
                    now_ms(),
                )
                .await;
            return;
        };
        let started = std::time::Instant::now();
        let result = sink::send(&self.http, &cfg, &d.event).await;
        let secs = started.elapsed().as_secs_f64();
        let attempts = d.attempts + 1;
        let age = Duration::from_millis((now_ms() - d.created).max(0) as u64);
        let (state, next_at, err) = match result {
            Ok(()) => {
                crate::metrics::delivery(&cfg.name, "delivered", secs);
                tracing::info!(trigger = %cfg.name, tag = %d.tag, digest = %d.digest, attempts, "delivered");
                (DeliveryState::Delivered, d.next_at, None)
            }
            Err(e) => {
                let retry = e.retryable() && attempts < cfg.max_attempts;
                let delay = e.retry_after().unwrap_or_else(|| self.backoff(attempts));
                let too_old = age + delay > cfg.max_age;
                if retry && !too_old {
                    crate::metrics::delivery(&cfg.name, "retry", secs);
                    tracing::warn!(trigger = %cfg.name, tag = %d.tag, attempts, error = %e, retry_in = ?delay, "delivery failed; will retry");
                    (
                        DeliveryState::Pending,
                        now_ms() + delay.as_millis() as i64,
                        Some(e.to_string()),
                    )
                } else {
                    crate::metrics::delivery(&cfg.name, "dead", secs);
                    let why = if !e.retryable() {
                        "permanent failure"
                    } else if too_old {
                        "too old"
                    } else {
                        "attempts exhausted"
                    };
                    tracing::error!(trigger = %cfg.name, tag = %d.tag, attempts, error = %e, "delivery dead ({why}); `istream triggers retry {}` re-queues it", cfg.name);
                    (DeliveryState::Dead, d.next_at, Some(e.to_string()))
                }
            }
        };
        if let Err(e) = self
            .engine
            .store
            .update_delivery(d.id, state, attempts, next_at, err, now_ms())
            .await
        {
            tracing::error!(error = %e, delivery = d.id, "cannot record delivery result; it will be attempted again");
        }
    }

    /// Exponential backoff from `initial_backoff`, doubling, capped, with ±20% jitter.
    fn backoff(&self, attempts: u32) -> Duration {
        let base = self
            .delivery
            .initial_backoff
            .saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
        base.min(self.delivery.max_backoff)
            .mul_f64(0.8 + fastrand::f64() * 0.4)
    }

    pub async fn views(&self, name: Option<&str>) -> Result<Vec<TriggerView>, StoreError> {
        let mut out = Vec::new();
        for t in self
            .configs
            .iter()
            .filter(|t| name.is_none_or(|n| n == t.name))
        {
            let s = self.engine.store.summary(&t.name).await?;
            let deliveries = self
                .engine
                .store
                .deliveries(&t.name, 20)
                .await?
                .into_iter()
                .map(|d| DeliveryView {
                    id: d.id,
                    tag: d.tag,
                    digest: d.digest,
                    state: d.state.as_str().into(),
                    attempts: d.attempts,
                    next_attempt: (d.state == DeliveryState::Pending)
                        .then(|| chrono::DateTime::from_timestamp_millis(d.next_at))
                        .flatten(),
                    last_error: d.last_error,
                    event_id: d.event.id,
                })
                .collect();
            out.push(TriggerView {
                name: t.name.clone(),
                sink: t.sink.kind().into(),
                on: t.on.iter().map(|o| o.to_string()).collect(),
                paused: t.paused,
                pending: s.pending,
                dead: s.dead,
                delivered: s.delivered,
                superseded: s.superseded,
                last_fired: s.last_fired,
                deliveries,
            });
        }
        Ok(out)
    }

    pub async fn retry(&self, name: &str) -> Result<usize, CoreError> {
        if !self.configs.iter().any(|t| t.name == name) {
            return Err(CoreError::NotFound(format!("trigger {name} not found")));
        }
        let n = self.engine.store.retry_dead(name, now_ms()).await?;
        self.wake.notify_one();
        Ok(n)
    }

    /// Whether any trigger watches a stream tag (used to validate nothing; for docs/tests).
    pub fn watches(&self, t: &StreamTagRef) -> bool {
        self.configs.iter().any(|c| c.on.contains(t))
    }
}
