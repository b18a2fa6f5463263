//! Durable state behind one interface: image streams (compare-and-set on revisions), the event
//! outbox written in the same transaction as each change, and trigger bookkeeping (last image
//! fired for, delivery queue). `sqlite` is the embedded default and stores each tag and each
//! history entry as its own row, so a change costs what it changes, not the stream's size;
//! `nats` keeps a small head per stream and a record per tag and per history entry in
//! JetStream, so that several replicas share them at the same cost per change.

pub mod nats;
pub mod rules;
pub mod sqlite;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

use serde::Serialize;

use crate::model::{Event, HistoryEntry, ImageStream, Tag};

/// Store failures. `Conflict` is retryable (re-read and re-apply); the others are not.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("image stream {0} was changed concurrently")]
    Conflict(String),
    #[error("store: {0}")]
    Backend(String),
    #[error("store holds unreadable data: {0}")]
    Corrupt(String),
}

/// One change, written atomically with the events it causes.
#[derive(Debug, Clone, Default)]
pub struct Commit {
    pub key: String,
    /// The stream revision read before the change; None: the stream must not exist yet.
    pub expected_rev: Option<i64>,
    /// The stream after the change (None deletes it). With `tags`, only the loaded tags.
    pub doc: Option<ImageStream>,
    pub events: Vec<Event>,
    /// What changed, tag by tag (a store that keeps tags apart writes only these); None:
    /// `doc` is the whole stream and replaces what is stored.
    pub tags: Option<Vec<TagWrite>>,
    /// The stream's own record (generation, created) changed, or the stream is new.
    pub meta_changed: bool,
    /// `[history] max_entries` (0: keep all): older entries of written tags are dropped.
    pub max_history: usize,
}

/// One tag's part of a change.
#[derive(Debug, Clone)]
pub struct TagWrite {
    pub name: String,
    /// The tag's revision when loaded; None: it must not exist yet.
    pub expected_rev: Option<i64>,
    /// The tag after the change (its history beyond the recent entries is not read); None deletes it.
    pub tag: Option<Tag>,
    /// History entries added by the change, newest first.
    pub new_entries: Vec<HistoryEntry>,
    /// The current entry rewritten in place (same image digest, new pull spec or media type).
    pub head_update: Option<HistoryEntry>,
}

/// Which tags of a stream a change needs. Stores add what the rules need with them: the
/// aliases that follow a loaded tag and the tags it copies from, transitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every tag with its whole history.
    All,
    /// Every tag with its current and previous entries (specs and state, as the scheduler needs).
    Heads,
    /// These tags (and their alias closure) with their current and previous entries.
    Tags(Vec<String>),
}

/// A stream as loaded for a change: the document (tags per `Scope`), its revision, and the
/// revision of each loaded tag (for the compare-and-set of the tags a change writes).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub doc: ImageStream,
    pub rev: i64,
    pub tag_revs: BTreeMap<String, i64>,
}

/// A push notification recorded before the hook answers, until its re-check is done: a crash
/// in between leaves it for the next start to re-check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Hint {
    pub registry: String,
    pub repository: String,
    /// Empty: every tracked tag of the repository.
    pub tag: String,
    pub digest: Option<String>,
}

impl Hint {
    pub fn key(&self) -> String {
        format!("{}/{}:{}", self.registry, self.repository, self.tag)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    Pending,
    /// Claimed by the deliverer, attempt running.
    Inflight,
    Delivered,
    Dead,
    Superseded,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Inflight => "inflight",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Dead => "dead",
            DeliveryState::Superseded => "superseded",
        }
    }
    pub fn parse(s: &str) -> Option<DeliveryState> {
        Some(match s {
            "pending" => DeliveryState::Pending,
            "inflight" => DeliveryState::Inflight,
            "delivered" => DeliveryState::Delivered,
            "dead" => DeliveryState::Dead,
            "superseded" => DeliveryState::Superseded,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    pub id: i64,
    pub trigger: String,
    /// `ns/stream:tag`
    pub tag: String,
    pub digest: String,
    pub event: Event,
    pub state: DeliveryState,
    pub attempts: u32,
    /// Unix milliseconds.
    pub next_at: i64,
    pub created: i64,
    pub last_error: Option<String>,
}

/// A tag's current image offered to a trigger (see `fire_due`).
#[derive(Debug, Clone)]
pub struct FireRequest {
    pub trigger: String,
    /// `ns/stream:tag`
    pub tag: String,
    /// The `tag.changed` event of the tag's current image.
    pub event: Event,
    pub skip_initial: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FireOutcome {
    /// Already fired for this image.
    Unchanged,
    /// First image under `skip_initial`: recorded, nothing sent.
    Recorded,
    /// A delivery was queued (older pending ones superseded).
    Fired,
}

/// The result of one delivery attempt, to record.
#[derive(Debug, Clone)]
pub struct Completion {
    pub id: i64,
    pub state: DeliveryState,
    pub attempts: u32,
    /// Unix ms of the next attempt, for a retry.
    pub next_at: i64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TriggerSummary {
    pub pending: i64,
    pub dead: i64,
    pub delivered: i64,
    pub superseded: i64,
    /// `ns/stream:tag` -> digest last fired for.
    pub last_fired: BTreeMap<String, String>,
}

/// The outbox entries of one change, identified as `pending_events` identifies them.
pub type Handed = Vec<(i64, Event)>;

/// Hands a change's events from the commit straight to the publisher, so that publishing
/// waits for no outbox read. Each store offers them while it still holds what orders its
/// changes (SQLite's connection, a JetStream stream's lock), so the publisher receives them
/// in commit order. The outbox stays the record: what is not handed off, or not published
/// from here, is drained from it (the publisher is woken for that).
#[derive(Default)]
pub struct Handoff {
    to: Mutex<Option<(mpsc::UnboundedSender<Handed>, Arc<Notify>)>>,
}

impl Handoff {
    fn attach(&self, wake: Arc<Notify>) -> mpsc::UnboundedReceiver<Handed> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.to.lock().unwrap_or_else(|e| e.into_inner()) = Some((tx, wake));
        rx
    }

    pub(crate) fn attached(&self) -> bool {
        self.to
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|(tx, _)| !tx.is_closed())
    }

    /// Hands `events` over when `ready` and a publisher is attached; otherwise wakes the
    /// publisher to drain the outbox. Returns whether they were handed over.
    pub(crate) fn offer(&self, ready: bool, events: impl FnOnce() -> Handed) -> bool {
        let guard = self.to.lock().unwrap_or_else(|e| e.into_inner());
        let Some((tx, wake)) = guard.as_ref() else {
            return false;
        };
        if ready && tx.send(events()).is_ok() {
            return true;
        }
        wake.notify_one();
        false
    }
}

/// Tags per page for readers of whole streams (`Store::head_pages`): small enough that a
/// page of a 10,000-tag stream is a few hundred KiB, big enough that a page is one query.
pub const HEAD_PAGE: usize = 256;

#[derive(Clone)]
pub enum Store {
    Sqlite(Arc<sqlite::SqliteStore>),
    Nats(Arc<nats::NatsStore>),
}

/// SQLite calls block, so they run on the blocking pool; JetStream calls are awaited.
macro_rules! blocking {
    ($self:ident, $s:ident => $body:expr, $n:ident => $nbody:expr) => {{
        match $self {
            Store::Sqlite(inner) => {
                let $s = inner.clone();
                tokio::task::spawn_blocking(move || $body)
                    .await
                    .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
            }
            Store::Nats($n) => $nbody.await,
        }
    }};
}

impl Store {
    pub fn open_sqlite(path: &Path) -> Result<Store, StoreError> {
        Ok(Store::Sqlite(Arc::new(sqlite::SqliteStore::open(path)?)))
    }

    /// Opens the JetStream store on its own connection (tests and benchmarks; `serve` shares
    /// the bus's connection).
    pub async fn connect_nats(cfg: &crate::config::NatsConfig) -> Result<Store, StoreError> {
        let addrs = crate::bus::server_addrs(&cfg.url).map_err(StoreError::Backend)?;
        let client = async_nats::connect(addrs)
            .await
            .map_err(|e| StoreError::Backend(format!("NATS at {}: {e}", cfg.url)))?;
        let store = nats::NatsStore::open(client, cfg, Duration::from_secs(30)).await?;
        Ok(Store::Nats(Arc::new(store)))
    }

    pub async fn get(&self, key: &str) -> Result<Option<(ImageStream, i64)>, StoreError> {
        let key = key.to_string();
        blocking!(self, s => s.get(&key), n => n.get(&key))
    }

    /// The stream with the tags `scope` names, for a change or a cheap read.
    pub async fn load(&self, key: &str, scope: Scope) -> Result<Option<Loaded>, StoreError> {
        let key = key.to_string();
        blocking!(self, s => s.load(&key, &scope), n => n.load(&key, &scope))
    }

    /// The tags of a stream with their heads (as `Scope::Heads`), `page` tags at a time, each
    /// page a partial stream: the scheduler reads a stream of any size holding a page of it,
    /// not all of it. No page: no such stream, or no tags; an error ends the pages.
    pub fn head_pages(
        &self,
        key: &str,
        page: usize,
    ) -> mpsc::Receiver<Result<ImageStream, StoreError>> {
        let (tx, rx) = mpsc::channel(1);
        let key = key.to_string();
        let page = page.max(1);
        match self {
            Store::Sqlite(s) => {
                let s = s.clone();
                // A query per page, the connection free between them.
                tokio::task::spawn_blocking(move || {
                    let mut after = String::new();
                    loop {
                        let doc = match s.head_page(&key, &after, page) {
                            Ok(Some(doc)) if !doc.tags.is_empty() => doc,
                            Ok(_) => return,
                            Err(e) => {
                                let _ = tx.blocking_send(Err(e));
                                return;
                            }
                        };
                        let full = doc.tags.len() >= page;
                        after = doc.tags.keys().next_back().cloned().unwrap_or_default();
                        if tx.blocking_send(Ok(doc)).is_err() || !full {
                            return;
                        }
                    }
                });
            }
            Store::Nats(n) => {
                let n = n.clone();
                tokio::spawn(async move {
                    if let Err(e) = n.head_pages(&key, page, &tx).await {
                        let _ = tx.send(Err(e)).await;
                    }
                });
            }
        }
        rx
    }

    /// One tag with its whole history (`get istag`, `describe istag`).
    pub async fn tag(
        &self,
        key: &str,
        tag: &str,
    ) -> Result<Option<(ImageStream, Tag)>, StoreError> {
        let (key, tag) = (key.to_string(), tag.to_string());
        blocking!(self, s => s.tag(&key, &tag), n => n.tag(&key, &tag))
    }

    pub async fn list(&self, namespace: Option<&str>) -> Result<Vec<ImageStream>, StoreError> {
        let ns = namespace.map(str::to_string);
        blocking!(self, s => s.list(ns.as_deref()), n => n.list(ns.as_deref()))
    }

    /// Every stream key, to walk all streams without holding them all in memory.
    pub async fn keys(&self) -> Result<Vec<String>, StoreError> {
        blocking!(self, s => s.keys(), n => n.keys())
    }

    pub async fn commit(&self, commit: Commit) -> Result<i64, StoreError> {
        blocking!(self, s => s.commit(&commit), n => n.commit(&commit))
    }

    /// Whether `commit_firing` applies the firing rule in the change's transaction.
    pub fn fires_in_commit(&self) -> bool {
        matches!(self, Store::Sqlite(_))
    }

    /// `commit`, and where the store can (`fires_in_commit`: SQLite) the firing rule applied
    /// to `fire` in the same transaction: then the outcomes, with the requests given back.
    /// JetStream commits the change alone (None); its planner fires.
    #[allow(clippy::type_complexity)]
    pub async fn commit_firing(
        &self,
        commit: Commit,
        fire: Vec<FireRequest>,
        now_ms: i64,
    ) -> Result<(i64, Option<(Vec<FireRequest>, Vec<FireOutcome>)>), StoreError> {
        match self {
            Store::Sqlite(inner) => {
                let s = inner.clone();
                tokio::task::spawn_blocking(move || {
                    s.commit_firing(&commit, &fire, now_ms)
                        .map(|(rev, outcomes)| (rev, Some((fire, outcomes))))
                })
                .await
                .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
            }
            Store::Nats(n) => n.commit(&commit).await.map(|rev| (rev, None)),
        }
    }

    /// Attaches the publisher: from now on each change's events are handed to the returned
    /// receiver as they are committed (see `Handoff`), and `wake` is notified when a drain
    /// of the outbox is needed instead.
    pub fn attach_publisher(&self, wake: Arc<Notify>) -> mpsc::UnboundedReceiver<Handed> {
        self.handoff().attach(wake)
    }

    /// Whether a publisher takes the events from the commits (it needs no wake for them).
    pub fn hands_off(&self) -> bool {
        self.handoff().attached()
    }

    fn handoff(&self) -> &Handoff {
        match self {
            Store::Sqlite(s) => &s.handoff,
            Store::Nats(n) => &n.handoff,
        }
    }

    /// Handed-off events the publisher dropped unpublished (the outbox has them): a store
    /// forgets what it noted for them.
    pub fn unhand(&self, seqs: &[i64]) {
        if let Store::Nats(n) = self {
            n.unhand(seqs);
        }
    }

    pub async fn pending_events(&self, limit: usize) -> Result<Vec<(i64, Event)>, StoreError> {
        blocking!(self, s => s.pending_events(limit), n => n.pending_events(limit))
    }

    pub async fn outbox_depth(&self) -> Result<i64, StoreError> {
        blocking!(self, s => s.outbox_depth(), n => n.outbox_depth())
    }

    /// Events the publisher has just sent, before the (deferred) `mark_published`: the
    /// JetStream store drops them from the outbox with the stream's next commit.
    pub fn note_published(&self, seqs: &[i64]) {
        if let Store::Nats(n) = self {
            n.note_published(seqs);
        }
    }

    pub async fn mark_published(&self, seqs: Vec<i64>) -> Result<(), StoreError> {
        blocking!(self, s => s.mark_published(&seqs), n => n.mark_published(&seqs))
    }

    pub async fn last_fired(&self, trigger: &str, tag: &str) -> Result<Option<String>, StoreError> {
        let (t, g) = (trigger.to_string(), tag.to_string());
        blocking!(self, s => s.last_fired(&t, &g), n => n.last_fired(&t, &g))
    }

    pub async fn fire_due(
        &self,
        reqs: Vec<FireRequest>,
        now_ms: i64,
    ) -> Result<Vec<FireOutcome>, StoreError> {
        blocking!(self, s => s.fire_due(&reqs, now_ms), n => n.fire_due(&reqs, now_ms))
    }

    pub async fn complete_and_claim(
        &self,
        done: Vec<Completion>,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        blocking!(self, s => s.complete_and_claim(&done, now_ms, limit), n => n.complete_and_claim(&done, now_ms, limit))
    }

    pub async fn claim_due(&self, now_ms: i64, limit: usize) -> Result<Vec<Delivery>, StoreError> {
        blocking!(self, s => s.claim_due(now_ms, limit), n => n.claim_due(now_ms, limit))
    }

    pub async fn next_due(&self) -> Result<Option<i64>, StoreError> {
        blocking!(self, s => s.next_due(), n => n.next_due())
    }

    pub async fn deliveries(
        &self,
        trigger: &str,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        let t = trigger.to_string();
        blocking!(self, s => s.deliveries(&t, limit), n => n.deliveries(&t, limit))
    }

    pub async fn summary(&self, trigger: &str) -> Result<TriggerSummary, StoreError> {
        let t = trigger.to_string();
        blocking!(self, s => s.summary(&t), n => n.summary(&t))
    }

    /// Records push hints durably (one write for a whole notification).
    pub async fn record_hints(&self, hints: Vec<Hint>) -> Result<(), StoreError> {
        blocking!(self, s => s.record_hints(&hints), n => n.record_hints(&hints))
    }

    /// Hints not yet re-checked.
    pub async fn pending_hints(&self) -> Result<Vec<Hint>, StoreError> {
        blocking!(self, s => s.pending_hints(), n => n.pending_hints())
    }

    /// A hint's re-check is done.
    pub async fn drop_hint(&self, key: &str) -> Result<(), StoreError> {
        let key = key.to_string();
        blocking!(self, s => s.drop_hint(&key), n => n.drop_hint(&key))
    }

    /// Settled deliveries (delivered, superseded) last changed before `cutoff_ms` are dropped;
    /// pending and dead ones are kept whatever their age (a dead delivery waits for a retry).
    pub async fn purge_settled(&self, cutoff_ms: i64) -> Result<usize, StoreError> {
        blocking!(self, s => s.purge_settled(cutoff_ms), n => n.purge_settled(cutoff_ms))
    }

    pub async fn retry_dead(&self, trigger: &str, now_ms: i64) -> Result<usize, StoreError> {
        let t = trigger.to_string();
        blocking!(self, s => s.retry_dead(&t, now_ms), n => n.retry_dead(&t, now_ms))
    }
}

#[doc(hidden)]
pub mod conformance;

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn sqlite_behaviour() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::Store::open_sqlite(&dir.path().join("x.db")).unwrap();
        super::conformance::behaviour(store).await;
    }
}
