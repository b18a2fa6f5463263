//! Image change triggers, with BuildConfig semantics: per trigger and tag the last image fired
//! for is persisted; a tag whose current image differs fires once (a never-fired trigger fires
//! for the current image, unless `skip_initial`); a newer image supersedes a still-pending
//! delivery of an older one. The planner is level-triggered — it compares state, not events —
//! so it can run again after any crash and do exactly what is missing. On SQLite a change of a
//! watched tag applies the same rule in its own transaction (`FireSink`), so the planner is
//! asked only at start-up, on JetStream and for replicas' changes. Deliveries live in the
//! store and are sent by the deliverer, at least once, with backoff and dead-lettering.

pub mod sink;
pub mod template;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{DeliveryConfig, TriggerConfig};
use crate::core::{CoreError, Engine};
use crate::model::event::TAG_CHANGED;
use crate::model::{Event, EventData, ImageStream, StreamTagRef};
use crate::store::{Completion, Delivery, DeliveryState, FireOutcome, FireRequest, StoreError};

pub struct Triggers {
    engine: Arc<Engine>,
    configs: Vec<Arc<TriggerConfig>>,
    /// `ns/stream:tag` -> the unpaused triggers watching it.
    watchers: std::collections::HashMap<String, Vec<Arc<TriggerConfig>>>,
    delivery: DeliveryConfig,
    http: reqwest::Client,
    wake: Notify,
    /// Bumped whenever this replica records a delivery's progress (claimed, settled,
    /// re-queued): the web UI's live pages refresh on it.
    changed: tokio::sync::watch::Sender<u64>,
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

/// How often, with replicas, each replica re-plans the watched tags it owns.
const SWEEP: Duration = Duration::from_secs(10);

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
        engine.instance(),
        cur.created,
        EventData {
            digest: Some(cur.digest.to_string()),
            previous: t.history.get(1).map(|h| h.digest.to_string()),
            image: Some(cur.image.clone()),
            generation: cur.generation,
            cause: Some(cur.cause.as_str().into()),
            ..EventData::for_tag(&s.namespace, &s.name, tag)
        },
    ))
    .map(|mut e| {
        e.data
            .explain(cur, t.history.get(1).map(|h| h.image.as_str()));
        e
    })
}

/// The firing rule applied by the change's own transaction (see `crate::core::FireSink`):
/// the same requests the planner would make for the tag's new current image.
impl crate::core::FireSink for Triggers {
    fn requests(&self, changed: &Event) -> Vec<FireRequest> {
        let Some(watching) = self.watchers.get(&changed.subject) else {
            return Vec::new();
        };
        watching
            .iter()
            .map(|t| FireRequest {
                trigger: t.name.clone(),
                tag: changed.subject.clone(),
                event: changed.clone(),
                skip_initial: t.skip_initial,
            })
            .collect()
    }

    fn fired(&self, reqs: &[FireRequest], outcomes: &[FireOutcome]) {
        self.report(reqs, outcomes);
    }
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
        let configs: Vec<Arc<TriggerConfig>> = configs.iter().cloned().map(Arc::new).collect();
        let mut watchers: std::collections::HashMap<String, Vec<Arc<TriggerConfig>>> =
            Default::default();
        for t in configs.iter().filter(|t| !t.paused) {
            for o in &t.on {
                watchers.entry(o.to_string()).or_default().push(t.clone());
            }
        }
        Arc::new(Triggers {
            engine,
            configs,
            watchers,
            delivery,
            http,
            wake: Notify::new(),
            changed: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Fires when deliveries progressed on this replica (see `changed`).
    pub fn subscribe_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn note_change(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Plans several tags, reading each stream once however many of its tags are watched,
    /// and applying the firing rule for all of them in one store transaction.
    pub async fn plan_many(&self, tag_keys: &[String]) {
        let mut by_stream: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for k in tag_keys {
            if let Some((stream_key, tag)) = k.rsplit_once(':') {
                by_stream.entry(stream_key).or_default().push(tag);
            }
        }
        let mut reqs = Vec::new();
        for (stream_key, tags) in by_stream {
            let watched: Vec<(&str, &Vec<Arc<TriggerConfig>>)> = tags
                .iter()
                .filter_map(|t| {
                    self.watchers
                        .get(&format!("{stream_key}:{t}"))
                        .map(|w| (*t, w))
                })
                .collect();
            if watched.is_empty() {
                continue;
            }
            let scope =
                crate::store::Scope::Tags(watched.iter().map(|(t, _)| t.to_string()).collect());
            let stream = match self.engine.store().load(stream_key, scope).await {
                Ok(Some(l)) => l.doc,
                Ok(None) => continue,
                Err(e) => {
                    // Level-triggered: the next change or restart plans it again.
                    tracing::error!(stream = stream_key, error = %e, "cannot plan triggers");
                    continue;
                }
            };
            for (tag, watching) in watched {
                let Some(event) = current_event(&self.engine, &stream, tag) else {
                    continue;
                };
                for t in watching {
                    reqs.push(FireRequest {
                        trigger: t.name.clone(),
                        tag: format!("{stream_key}:{tag}"),
                        event: event.clone(),
                        skip_initial: t.skip_initial,
                    });
                }
            }
        }
        for chunk in reqs.chunks(512) {
            match self.engine.store().fire_due(chunk.to_vec(), now_ms()).await {
                Ok(outcomes) => self.report(chunk, &outcomes),
                Err(e) => {
                    tracing::error!(error = %e, "cannot plan triggers; the next change or restart plans them again")
                }
            }
        }
    }

    /// Logs what firing did and wakes the deliverer when a delivery was queued.
    fn report(&self, reqs: &[FireRequest], outcomes: &[FireOutcome]) {
        let mut fired = false;
        for (r, o) in reqs.iter().zip(outcomes) {
            let digest = r.event.data.digest.as_deref().unwrap_or("");
            match o {
                FireOutcome::Fired => {
                    fired = true;
                    tracing::info!(trigger = %r.trigger, tag = %r.tag, digest, "trigger fired");
                }
                FireOutcome::Recorded => {
                    tracing::info!(trigger = %r.trigger, tag = %r.tag, digest, "first image recorded without firing (skip_initial)");
                }
                FireOutcome::Unchanged => {}
            }
        }
        if fired {
            self.wake.notify_one();
        }
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
        self.plan_many(&all).await;
        tracing::info!(tags = all.len(), "start-up trigger planning done");
        // Replicas: a replica that died between a change and its planning leaves work that
        // only a sweep finds, so the owner of each watched tag plans it again now and then.
        let mut sweep = tokio::time::interval(SWEEP);
        sweep.tick().await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = sweep.tick(), if self.engine.cluster().is_some() => {
                    let owned: Vec<String> =
                        all.iter().filter(|t| self.engine.owns(t)).cloned().collect();
                    self.plan_many(&owned).await;
                }
                msg = changed.recv() => {
                    let Some(first) = msg else { return };
                    // Coalesce a burst: plan each tag once, newest state wins.
                    let mut batch = vec![first];
                    while let Ok(more) = changed.try_recv() {
                        batch.push(more);
                    }
                    batch.sort();
                    batch.dedup();
                    self.plan_many(&batch).await;
                }
            }
        }
    }

    /// Sends due deliveries, at most `concurrency` at once, until cancelled. Each turn of the
    /// loop records every finished attempt and claims new ones in one store transaction.
    pub async fn run_deliverer(self: Arc<Self>, cancel: CancellationToken) {
        let mut running: JoinSet<Completion> = JoinSet::new();
        let mut done: Vec<Completion> = Vec::new();
        loop {
            let room = self.delivery.concurrency.saturating_sub(running.len());
            let settled = !done.is_empty();
            match self
                .engine
                .store()
                .complete_and_claim(std::mem::take(&mut done), now_ms(), room)
                .await
            {
                Ok(due) => {
                    if settled || !due.is_empty() {
                        self.note_change();
                    }
                    for d in due {
                        let me = self.clone();
                        running.spawn(async move { me.attempt(d).await });
                    }
                }
                // The attempts stay `inflight` and are sent again after a restart.
                Err(e) => {
                    tracing::error!(error = %e, "cannot record delivery results or claim deliveries")
                }
            }
            // While attempts run, each completion wakes us; a retry falling due meanwhile waits
            // at most a quarter second. Idle, sleep until the next retry is due.
            let wait = if !running.is_empty() {
                Duration::from_millis(250)
            } else {
                match self.engine.store().next_due().await {
                    Ok(Some(t)) => Duration::from_millis((t - now_ms()).clamp(0, 5_000) as u64),
                    _ => Duration::from_secs(5),
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.wake.notified() => {}
                Some(r) = running.join_next(), if !running.is_empty() => {
                    done.extend(r.ok());
                    while let Some(r) = running.try_join_next() {
                        done.extend(r.ok());
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // Let attempts in flight finish briefly and record them; the rest is retried later.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(r) = running.join_next().await {
                done.extend(r.ok());
            }
        })
        .await;
        if let Err(e) = self
            .engine
            .store()
            .complete_and_claim(done, now_ms(), 0)
            .await
        {
            tracing::error!(error = %e, "cannot record delivery results at shutdown");
        }
    }

    /// One attempt; returns what to record (the deliverer records results in batches).
    async fn attempt(&self, d: Delivery) -> Completion {
        let Some(cfg) = self.configs.iter().find(|t| t.name == d.trigger).cloned() else {
            // The trigger was removed from the config: keep the delivery, visible as dead.
            return Completion {
                id: d.id,
                state: DeliveryState::Dead,
                attempts: d.attempts,
                next_at: d.next_at,
                error: Some("trigger no longer configured".into()),
            };
        };
        let started = std::time::Instant::now();
        let result = sink::send(&self.http, &cfg, &d.event, false)
            .await
            .map(|_| ());
        let secs = started.elapsed().as_secs_f64();
        let attempts = d.attempts + 1;
        let age = Duration::from_millis((now_ms() - d.created).max(0) as u64);
        let (state, next_at, error) = match result {
            Ok(()) => {
                crate::metrics::delivery(&cfg.name, "delivered", secs);
                tracing::info!(trigger = %cfg.name, tag = %d.tag, digest = %d.digest, attempts, "delivered");
                (DeliveryState::Delivered, d.next_at, None)
            }
            Err(e) => {
                let retry = e.retryable() && attempts < cfg.max_attempts;
                let delay = self.backoff().delay_or(attempts, e.retry_after());
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
        Completion {
            id: d.id,
            state,
            attempts,
            next_at,
            error,
        }
    }

    /// `[delivery] initial_backoff` doubling up to `max_backoff`, the engine's retry policy.
    fn backoff(&self) -> crate::retry::Backoff {
        crate::retry::Backoff::new(self.delivery.initial_backoff, self.delivery.max_backoff)
    }

    pub async fn views(&self, name: Option<&str>) -> Result<Vec<TriggerView>, StoreError> {
        let mut out = Vec::new();
        for t in self
            .configs
            .iter()
            .filter(|t| name.is_none_or(|n| n == t.name))
        {
            let s = self.engine.store().summary(&t.name).await?;
            let deliveries = self
                .engine
                .store()
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

    /// `triggers test`: one delivery of `name` now, for the current image of `tag` (default:
    /// the first tag it watches), marked as a test; no state is recorded or changed. Returns
    /// the receiver's HTTP status, or the error that prevented an answer.
    pub async fn test(
        &self,
        name: &str,
        tag: Option<&str>,
    ) -> Result<(StreamTagRef, Result<u16, String>), CoreError> {
        let Some(cfg) = self.configs.iter().find(|t| t.name == name) else {
            return Err(CoreError::NotFound(format!("trigger {name} not found")));
        };
        let tag =
            match tag {
                Some(t) => StreamTagRef::parse(t, "default")?,
                None => cfg.on.first().cloned().ok_or_else(|| {
                    CoreError::BadRequest(format!("trigger {name} watches no tag"))
                })?,
            };
        let key = tag.stream.key();
        let doc = self
            .engine
            .store()
            .load(&key, crate::store::Scope::Tags(vec![tag.tag.clone()]))
            .await?
            .map(|l| l.doc)
            .ok_or_else(|| CoreError::NotFound(format!("image stream {} not found", tag.stream)))?;
        let Some(mut event) = current_event(&self.engine, &doc, &tag.tag) else {
            return Err(CoreError::BadRequest(format!(
                "stream tag {tag} has no image yet; nothing to test with"
            )));
        };
        event.data.test = Some(true);
        let answer = match sink::send(&self.http, cfg, &event, true).await {
            Ok(status) => Ok(status),
            Err(sink::SinkError::Status { status, .. }) => Ok(status),
            Err(e) => Err(e.to_string()),
        };
        Ok((tag, answer))
    }

    pub async fn retry(&self, name: &str) -> Result<usize, CoreError> {
        if !self.configs.iter().any(|t| t.name == name) {
            return Err(CoreError::NotFound(format!("trigger {name} not found")));
        }
        let n = self.engine.store().retry_dead(name, now_ms()).await?;
        self.note_change();
        self.wake.notify_one();
        Ok(n)
    }
}
