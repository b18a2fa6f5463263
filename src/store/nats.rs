//! The scale-out store: the same behaviour as the SQLite store, kept in NATS JetStream so that
//! several replicas share it. No consensus of our own — JetStream's does the work:
//!
//! - `<S>_STREAMS` (key-value, history 1): one entry per image stream, `ns/name` → the stream
//!   document plus its *outbox* (the events of changes not yet published). Writes are
//!   compare-and-set on the entry's revision, so two replicas never overwrite each other's
//!   change, and a change and its events are one write: the outbox cannot lose an event
//!   between the commit and the publication. A deleted stream leaves a tombstone holding the
//!   `tag.deleted` events until they are published.
//! - `<S>_META` (key-value): `schema`, the layout version; read first at every start, so a
//!   newer release's buckets are refused untouched.
//! - `<S>_TRIGGERS` (key-value): per trigger and tag, the digest last fired for (CAS).
//! - `<S>_DELIVERIES` (key-value): one record per delivery (state, attempts, last error), for
//!   `istream triggers` and to skip work that is already finished.
//! - `<S>_WORK` (work-queue stream) with the durable pull consumer `deliverer`: one message per
//!   delivery to attempt. Every replica pulls from it, so each delivery is attempted by one
//!   replica at a time; success acks it, a retry is a NAK with the backoff as delay, a dead
//!   delivery is terminated, and a replica that dies mid-attempt leaves the message unacked so
//!   the server hands it to another after the ack wait.
//!
//! Firing is "publish, then record": the work message (with `Nats-Msg-Id` = the delivery, so a
//! racing replica's identical publication is dropped by the server) goes out before the trigger
//! state moves. A crash in between means the next planning publishes again — at least once.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, kv};
use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::{
    Commit, Completion, Delivery, DeliveryState, FireOutcome, FireRequest, StoreError,
    TriggerSummary,
};
use crate::config::NatsConfig;
use crate::model::{Event, ImageStream};

/// What one `<S>_STREAMS` entry holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// None: a tombstone, kept until its outbox is published.
    pub doc: Option<ImageStream>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbox: Vec<Event>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FiredState {
    trigger: String,
    tag: String,
    digest: String,
    /// Key of the delivery queued for it (None under `skip_initial`).
    delivery: Option<String>,
    /// When it fired (ms): a pending delivery of the same trigger and tag created before
    /// this, other than `delivery`, is stale (superseded).
    #[serde(default)]
    fired_at: i64,
}

/// One `<S>_DELIVERIES` record.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DeliveryRecord {
    id: i64,
    trigger: String,
    tag: String,
    digest: String,
    event: Event,
    state: DeliveryState,
    attempts: u32,
    next_at: i64,
    created: i64,
    last_error: Option<String>,
}

impl DeliveryRecord {
    fn to_delivery(&self) -> Delivery {
        Delivery {
            id: self.id,
            trigger: self.trigger.clone(),
            tag: self.tag.clone(),
            digest: self.digest.clone(),
            event: self.event.clone(),
            state: self.state,
            attempts: self.attempts,
            next_at: self.next_at,
            created: self.created,
            last_error: self.last_error.clone(),
        }
    }
}

/// The body of a work message: which delivery record to attempt.
#[derive(Serialize, Deserialize)]
struct WorkItem {
    key: String,
}

pub struct NatsStore {
    js: jetstream::Context,
    streams: kv::Store,
    triggers: kv::Store,
    deliveries: kv::Store,
    /// Push hints not yet re-checked (SPEC 9: recorded before the hook answers).
    hints: kv::Store,
    work_subject: String,
    consumer: PullConsumer,
    /// Outbox of each stream as last read, by revision: a commit carries it forward without
    /// reading the entry again.
    outboxes: Mutex<HashMap<String, (u64, Vec<Event>)>>,
    /// Streams whose outbox this replica publishes.
    dirty: Mutex<BTreeSet<String>>,
    /// The entry this replica last wrote for a stream whose outbox is not yet empty, with its
    /// revision: the publisher takes the events from here and clears them with a
    /// compare-and-set on that revision, without reading the entry back (it reads only when
    /// another write came in between).
    written: Mutex<HashMap<String, (u64, Record)>>,
    /// `pending_events` sequence → (stream key, event id), until marked published.
    handed_out: Mutex<HashMap<i64, (String, String)>>,
    next_seq: AtomicI64,
    /// Work messages being attempted here, by local attempt number, to ack when the attempt is recorded.
    inflight: Mutex<HashMap<i64, (String, jetstream::Message)>>,
    /// Revisions this replica committed, so its own watcher does not announce them twice.
    local: Mutex<VecDeque<(String, u64)>>,
}

/// The layout of the buckets this release reads and writes. 0.1.0 wrote the same layout
/// without a marker, so a store without one is schema 1.
pub const SCHEMA_VERSION: u32 = 1;

/// `<S>_META` holds `schema`: refuses a store written by a newer release (changing nothing),
/// and marks an unmarked one with this release's schema.
async fn check_schema(js: &jetstream::Context, cfg: &NatsConfig) -> Result<(), StoreError> {
    let name = format!("{}_META", cfg.stream);
    let meta = match js.get_key_value(&name).await {
        Ok(kv) => kv,
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: name.clone(),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                num_replicas: cfg.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| backend(&format!("bucket {name}"), e))?,
    };
    let found = meta
        .get("schema")
        .await
        .map_err(|e| backend(&format!("bucket {name}"), e))?;
    match found {
        Some(v) => {
            let text = String::from_utf8_lossy(&v).to_string();
            let found: u32 = text.trim().parse().map_err(|_| {
                corrupt(
                    &format!("bucket {name}, key schema"),
                    format!("\"{text}\" is not a schema number"),
                )
            })?;
            if found > SCHEMA_VERSION {
                return Err(StoreError::Corrupt(format!(
                    "NATS JetStream bucket {name} says the store was written by a newer istream (store schema {found}); this release ({}) reads schema {SCHEMA_VERSION} and older; nothing was changed",
                    env!("CARGO_PKG_VERSION")
                )));
            }
        }
        None => {
            meta.create("schema", SCHEMA_VERSION.to_string().into())
                .await
                .map(|_| ())
                .or_else(|e| match e.kind() {
                    // Another replica marked it first.
                    kv::CreateErrorKind::AlreadyExists => Ok(()),
                    _ => Err(backend(&format!("bucket {name}"), e)),
                })?;
        }
    }
    Ok(())
}

fn backend(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("NATS JetStream {what}: {e}"))
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn short_hash(parts: &[&str]) -> String {
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..12])
}

/// Stream keys are `ns/name`, names `[a-z0-9]+([._-][a-z0-9]+)*`: valid key-value keys as
/// they are. Anything else (never produced by the engine) is refused rather than mangled.
fn check_key(key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty()
        && !key.starts_with('.')
        && !key.ends_with('.')
        && !key.contains("..")
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Backend(format!(
            "\"{key}\" cannot be a JetStream key"
        )))
    }
}

/// How long the server waits for an attempt's ack before handing the delivery to another
/// replica: longer than any attempt (the sink timeout) with room to record the result.
pub fn ack_wait(sink_timeout: Duration) -> Duration {
    sink_timeout * 2 + Duration::from_secs(5)
}

impl NatsStore {
    /// Creates or updates the buckets and the work queue. `ack_wait` bounds how long a
    /// delivery claimed by a replica that died stays invisible to the others.
    pub async fn open(
        client: async_nats::Client,
        cfg: &NatsConfig,
        ack_wait: Duration,
    ) -> Result<NatsStore, StoreError> {
        let js = jetstream::new(client);
        // Read before anything is created or reconfigured: a newer release's buckets are left
        // exactly as they are.
        check_schema(&js, cfg).await?;
        let bucket = |suffix: &str, max_age: Duration| kv::Config {
            bucket: format!("{}_{suffix}", cfg.stream),
            history: 1,
            max_age,
            storage: jetstream::stream::StorageType::File,
            num_replicas: cfg.replicas,
            ..Default::default()
        };
        let kv_open = |c: kv::Config| {
            let js = js.clone();
            async move {
                let name = c.bucket.clone();
                js.create_or_update_key_value(c)
                    .await
                    .map_err(|e| backend(&format!("bucket {name}"), e))
            }
        };
        let streams = kv_open(bucket("STREAMS", Duration::ZERO)).await?;
        let triggers = kv_open(bucket("TRIGGERS", Duration::ZERO)).await?;
        // No age limit (set again at every start, so a bucket made with one loses it): pending
        // and dead deliveries stay until settled or retried, settled ones until
        // `purge_settled` drops them after `[delivery] retention`.
        let deliveries = kv_open(bucket("DELIVERIES", Duration::ZERO)).await?;
        let hints = kv_open(bucket("HINTS", Duration::ZERO)).await?;
        let work_name = format!("{}_WORK", cfg.stream);
        let work_subject = format!("{}_work.deliveries", cfg.subject_prefix);
        js.create_or_update_stream(jetstream::stream::Config {
            name: work_name.clone(),
            subjects: vec![work_subject.clone()],
            retention: jetstream::stream::RetentionPolicy::WorkQueue,
            storage: jetstream::stream::StorageType::File,
            num_replicas: cfg.replicas,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|e| backend(&format!("stream {work_name}"), e))?;
        let stream = js
            .get_stream(&work_name)
            .await
            .map_err(|e| backend(&format!("stream {work_name}"), e))?;
        let consumer: PullConsumer = stream
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some("deliverer".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait,
                max_deliver: -1,
                max_ack_pending: 10_000,
                ..Default::default()
            })
            .await
            .map_err(|e| backend(&format!("consumer deliverer on {work_name}"), e))?;
        Ok(NatsStore {
            js,
            streams,
            triggers,
            deliveries,
            hints,
            work_subject,
            consumer,
            outboxes: Mutex::default(),
            dirty: Mutex::default(),
            written: Mutex::default(),
            handed_out: Mutex::default(),
            next_seq: AtomicI64::new(1),
            inflight: Mutex::default(),
            local: Mutex::default(),
        })
    }

    pub fn streams_bucket(&self) -> &kv::Store {
        &self.streams
    }

    /// The streams bucket's last revision: a watcher started later skips what is older.
    pub async fn last_revision(&self) -> Result<u64, StoreError> {
        self.streams
            .status()
            .await
            .map(|s| s.info.state.last_sequence)
            .map_err(|e| backend("bucket status", e))
    }

    /// Whether this replica committed `key` at `revision` (consumes the mark).
    pub fn committed_here(&self, key: &str, revision: u64) -> bool {
        let mut local = lock(&self.local);
        match local.iter().position(|(k, r)| k == key && *r == revision) {
            Some(i) => {
                local.remove(i);
                true
            }
            None => false,
        }
    }

    fn mark_local(&self, key: &str, revision: u64) {
        let mut local = lock(&self.local);
        local.push_back((key.to_string(), revision));
        if local.len() > 4096 {
            local.pop_front();
        }
    }

    /// Makes this replica publish `key`'s outbox (a replica that committed it died first).
    pub fn adopt_outbox(&self, key: &str) {
        lock(&self.dirty).insert(key.to_string());
    }

    async fn read(&self, key: &str) -> Result<Option<(Record, u64)>, StoreError> {
        check_key(key)?;
        match self.streams.entry(key).await {
            Ok(Some(e)) => {
                let rec: Record = serde_json::from_slice(&e.value)
                    .map_err(|x| corrupt(&format!("image stream {key}"), x))?;
                Ok(Some((rec, e.revision)))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(backend(&format!("read of {key}"), e)),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<(ImageStream, i64)>, StoreError> {
        let Some((rec, rev)) = self.read(key).await? else {
            lock(&self.outboxes).remove(key);
            return Ok(None);
        };
        lock(&self.outboxes).insert(key.to_string(), (rev, rec.outbox.clone()));
        Ok(rec.doc.map(|d| (d, rev as i64)))
    }

    /// The whole document: one stream is one entry here, so every scope reads all of it and
    /// every tag shares the stream's revision.
    pub async fn load(&self, key: &str) -> Result<Option<super::Loaded>, StoreError> {
        Ok(self.get(key).await?.map(|(doc, rev)| super::Loaded {
            tag_revs: doc.tags.keys().map(|t| (t.clone(), rev)).collect(),
            doc,
            rev,
        }))
    }

    pub async fn tag(
        &self,
        key: &str,
        tag: &str,
    ) -> Result<Option<(ImageStream, crate::model::Tag)>, StoreError> {
        Ok(self.get(key).await?.and_then(|(mut doc, _)| {
            let t = doc.tags.remove(tag)?;
            doc.tags.clear();
            Some((doc, t))
        }))
    }

    pub async fn keys(&self) -> Result<Vec<String>, StoreError> {
        let mut keys: Vec<String> = all_keys(&self.streams, "key listing").await?;
        keys.sort();
        Ok(keys)
    }

    pub async fn list(&self, namespace: Option<&str>) -> Result<Vec<ImageStream>, StoreError> {
        let mut out = Vec::new();
        for k in self.keys().await? {
            if namespace.is_some_and(|ns| !k.starts_with(&format!("{ns}/"))) {
                continue;
            }
            if let Some((rec, _)) = self.read(&k).await?
                && let Some(doc) = rec.doc
            {
                out.push(doc);
            }
        }
        Ok(out)
    }

    pub async fn commit(&self, c: &Commit) -> Result<i64, StoreError> {
        check_key(&c.key)?;
        let conflict = || StoreError::Conflict(c.key.clone());
        // The outbox to carry forward, and the revision to write over (a tombstone counts as
        // absent for the caller but is still an entry).
        let cached = lock(&self.outboxes).remove(&c.key);
        let (mut outbox, over) = match (c.expected_rev, cached) {
            (Some(r), Some((cr, ob))) if cr == r as u64 => (ob, Some(r as u64)),
            (expected, _) => match self.read(&c.key).await? {
                Some((rec, rev)) => {
                    let matches = match expected {
                        Some(r) => rec.doc.is_some() && rev == r as u64,
                        None => rec.doc.is_none(),
                    };
                    if !matches {
                        return Err(conflict());
                    }
                    (rec.outbox, Some(rev))
                }
                None if expected.is_none() => (Vec::new(), None),
                None => return Err(conflict()),
            },
        };
        outbox.extend(c.events.iter().cloned());
        let has_outbox = !outbox.is_empty();
        let rec = Record {
            doc: c.doc.clone(),
            outbox,
        };
        let rev = if rec.doc.is_none() && !has_outbox {
            let Some(over) = over else { return Ok(0) };
            self.streams
                .delete_expect_revision(&c.key, Some(over))
                .await
                .map_err(|e| match e.kind() {
                    kv::DeleteErrorKind::WrongLastRevision => conflict(),
                    _ => backend(&format!("delete of {}", c.key), e),
                })?;
            0
        } else {
            let body = serde_json::to_vec(&rec).map_err(|e| corrupt("image stream", e))?;
            match over {
                Some(r) => {
                    self.streams
                        .update(&c.key, body.into(), r)
                        .await
                        .map_err(|e| match e.kind() {
                            kv::UpdateErrorKind::WrongLastRevision => conflict(),
                            _ => backend(&format!("write of {}", c.key), e),
                        })?
                }
                None => self
                    .streams
                    .create(&c.key, body.into())
                    .await
                    .map_err(|e| match e.kind() {
                        kv::CreateErrorKind::AlreadyExists => conflict(),
                        _ => backend(&format!("write of {}", c.key), e),
                    })?,
            }
        };
        self.mark_local(&c.key, rev);
        if has_outbox {
            lock(&self.dirty).insert(c.key.clone());
            lock(&self.written).insert(c.key.clone(), (rev, rec));
        } else {
            lock(&self.written).remove(&c.key);
        }
        Ok(rev as i64)
    }

    /// The unpublished events of the streams this replica publishes, in commit order per stream.
    pub async fn pending_events(&self, limit: usize) -> Result<Vec<(i64, Event)>, StoreError> {
        let keys: Vec<String> = lock(&self.dirty).iter().cloned().collect();
        let mut out = Vec::new();
        for key in keys {
            if out.len() >= limit {
                break;
            }
            let cached = lock(&self.written).get(&key).map(|(_, r)| r.outbox.clone());
            let outbox = match cached {
                Some(outbox) => outbox,
                None => match self.read(&key).await? {
                    Some((rec, _)) => rec.outbox,
                    None => Vec::new(),
                },
            };
            if outbox.is_empty() {
                lock(&self.dirty).remove(&key);
                continue;
            }
            let mut handed = lock(&self.handed_out);
            for e in outbox {
                let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
                handed.insert(seq, (key.clone(), e.id.clone()));
                out.push((seq, e));
            }
        }
        Ok(out)
    }

    pub async fn outbox_depth(&self) -> Result<i64, StoreError> {
        Ok(lock(&self.dirty).len() as i64)
    }

    /// Removes published events from their streams' outboxes (CAS, re-read on conflict); an
    /// emptied tombstone is deleted.
    pub async fn mark_published(&self, seqs: &[i64]) -> Result<(), StoreError> {
        let mut by_key: HashMap<String, BTreeSet<String>> = HashMap::new();
        {
            let mut handed = lock(&self.handed_out);
            for s in seqs {
                if let Some((k, id)) = handed.remove(s) {
                    by_key.entry(k).or_default().insert(id);
                }
            }
        }
        for (key, ids) in by_key {
            let mut cached = lock(&self.written).remove(&key);
            for _ in 0..20 {
                let current = match cached.take() {
                    Some((rev, rec)) => Some((rec, rev)),
                    None => self.read(&key).await?,
                };
                let Some((mut rec, rev)) = current else {
                    break;
                };
                let before = rec.outbox.len();
                rec.outbox.retain(|e| !ids.contains(&e.id));
                if rec.outbox.len() == before {
                    break;
                }
                let res = if rec.doc.is_none() && rec.outbox.is_empty() {
                    self.streams
                        .delete_expect_revision(&key, Some(rev))
                        .await
                        .map(|_| 0)
                        .map_err(|e| match e.kind() {
                            kv::DeleteErrorKind::WrongLastRevision => None,
                            _ => Some(backend(&format!("delete of {key}"), e)),
                        })
                } else {
                    let body = serde_json::to_vec(&rec).map_err(|e| corrupt("image stream", e))?;
                    self.streams
                        .update(&key, body.into(), rev)
                        .await
                        .map_err(|e| match e.kind() {
                            kv::UpdateErrorKind::WrongLastRevision => None,
                            _ => Some(backend(&format!("write of {key}"), e)),
                        })
                };
                match res {
                    Ok(new_rev) => {
                        self.mark_local(&key, new_rev);
                        if rec.outbox.is_empty() {
                            lock(&self.dirty).remove(&key);
                        } else {
                            lock(&self.written).insert(key.clone(), (new_rev, rec));
                        }
                        break;
                    }
                    Err(None) => continue,
                    Err(Some(e)) => return Err(e),
                }
            }
        }
        Ok(())
    }

    async fn fired_state(&self, key: &str) -> Result<Option<(FiredState, u64)>, StoreError> {
        match self.triggers.entry(key).await {
            Ok(Some(e)) => Ok(Some((
                serde_json::from_slice(&e.value).map_err(|x| corrupt("trigger state", x))?,
                e.revision,
            ))),
            Ok(None) => Ok(None),
            Err(e) => Err(backend("trigger state read", e)),
        }
    }

    pub async fn last_fired(&self, trigger: &str, tag: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .fired_state(&short_hash(&[trigger, tag]))
            .await?
            .map(|(s, _)| s.digest))
    }

    async fn delivery_record(
        &self,
        key: &str,
    ) -> Result<Option<(DeliveryRecord, u64)>, StoreError> {
        match self.deliveries.entry(key).await {
            Ok(Some(e)) => Ok(Some((
                serde_json::from_slice(&e.value).map_err(|x| corrupt("delivery record", x))?,
                e.revision,
            ))),
            Ok(None) => Ok(None),
            Err(e) => Err(backend("delivery read", e)),
        }
    }

    /// Rewrites a delivery record with `f` (CAS; re-read on conflict).
    async fn update_record(
        &self,
        key: &str,
        mut f: impl FnMut(&mut DeliveryRecord) -> bool,
    ) -> Result<(), StoreError> {
        for _ in 0..20 {
            let Some((mut rec, rev)) = self.delivery_record(key).await? else {
                return Ok(());
            };
            if !f(&mut rec) {
                return Ok(());
            }
            let body = serde_json::to_vec(&rec).map_err(|e| corrupt("delivery record", e))?;
            match self.deliveries.update(key, body.into(), rev).await {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(backend("delivery write", e)),
            }
        }
        Err(StoreError::Conflict(format!("delivery {key}")))
    }

    async fn enqueue(&self, key: &str, msg_id: &str) -> Result<(), StoreError> {
        let body = serde_json::to_vec(&WorkItem { key: key.into() })
            .map_err(|e| corrupt("work item", e))?;
        let msg = jetstream::message::PublishMessage::build()
            .payload(body.into())
            .message_id(msg_id);
        self.js
            .send_publish(self.work_subject.clone(), msg)
            .await
            .map_err(|e| backend("work queue publish", e))?
            .await
            .map_err(|e| backend("work queue publish", e))?;
        Ok(())
    }

    pub async fn fire_due(
        &self,
        reqs: &[FireRequest],
        now_ms: i64,
    ) -> Result<Vec<FireOutcome>, StoreError> {
        let mut out = Vec::with_capacity(reqs.len());
        for r in reqs {
            out.push(self.fire_one(r, now_ms).await?);
        }
        Ok(out)
    }

    async fn fire_one(&self, r: &FireRequest, now_ms: i64) -> Result<FireOutcome, StoreError> {
        let digest = r.event.data.digest.clone().unwrap_or_default();
        let state_key = short_hash(&[&r.trigger, &r.tag]);
        for _ in 0..20 {
            let current = self.fired_state(&state_key).await?;
            if current.as_ref().is_some_and(|(s, _)| s.digest == digest) {
                return Ok(FireOutcome::Unchanged);
            }
            let initial_skip = current.is_none() && r.skip_initial;
            let mut delivery = None;
            if !initial_skip {
                // Record, then publish, then move the state: a crash before the state moves
                // means planning does it again (the record exists, the server drops the
                // duplicate publication within its window), never a state without a delivery.
                let dkey = short_hash(&[&r.trigger, &r.tag, &r.event.id]);
                let rec = DeliveryRecord {
                    id: new_delivery_id(now_ms),
                    trigger: r.trigger.clone(),
                    tag: r.tag.clone(),
                    digest: digest.clone(),
                    event: r.event.clone(),
                    state: DeliveryState::Pending,
                    attempts: 0,
                    next_at: now_ms,
                    created: now_ms,
                    last_error: None,
                };
                let body = serde_json::to_vec(&rec).map_err(|e| corrupt("delivery record", e))?;
                match self.deliveries.create(&dkey, body.into()).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                    Err(e) => return Err(backend("delivery write", e)),
                }
                self.enqueue(&dkey, &dkey).await?;
                delivery = Some(dkey);
            }
            let state = FiredState {
                trigger: r.trigger.clone(),
                tag: r.tag.clone(),
                digest: digest.clone(),
                delivery: delivery.clone(),
                fired_at: now_ms,
            };
            let body = serde_json::to_vec(&state).map_err(|e| corrupt("trigger state", e))?;
            let written = match &current {
                Some((_, rev)) => self
                    .triggers
                    .update(&state_key, body.into(), *rev)
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        (
                            e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                            e.to_string(),
                        )
                    }),
                None => self
                    .triggers
                    .create(&state_key, body.into())
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        (
                            e.kind() == kv::CreateErrorKind::AlreadyExists,
                            e.to_string(),
                        )
                    }),
            };
            match written {
                Ok(()) => {
                    // The older image's delivery, if still waiting, is superseded.
                    if let Some((old, _)) = current
                        && let Some(old_key) = old.delivery
                        && Some(&old_key) != delivery.as_ref()
                    {
                        self.update_record(&old_key, |d| supersede(d, &digest))
                            .await?;
                    }
                    return Ok(if initial_skip {
                        FireOutcome::Recorded
                    } else {
                        FireOutcome::Fired
                    });
                }
                // Another replica planned the same tag meanwhile: look again.
                Err((true, _)) => continue,
                Err((false, e)) => return Err(backend("trigger state write", e)),
            }
        }
        Err(StoreError::Conflict(format!(
            "trigger {} on {}",
            r.trigger, r.tag
        )))
    }

    pub async fn complete_and_claim(
        &self,
        done: &[Completion],
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        for d in done {
            self.complete(d, now_ms).await?;
        }
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.claim_due(now_ms, limit).await
    }

    /// Records an attempt, then settles its work message: record first, so a crash between
    /// the two redelivers a message whose record already says what happened.
    async fn complete(&self, d: &Completion, _now_ms: i64) -> Result<(), StoreError> {
        let Some((key, msg)) = lock(&self.inflight).remove(&d.id) else {
            return Ok(());
        };
        let mut state = d.state;
        self.update_record(&key, |r| {
            // A retry of an image that was superseded meanwhile stays superseded.
            if r.state == DeliveryState::Superseded && d.state == DeliveryState::Pending {
                state = DeliveryState::Superseded;
            } else {
                r.state = d.state;
            }
            r.attempts = d.attempts;
            r.next_at = d.next_at;
            if d.error.is_some() {
                r.last_error = d.error.clone();
            }
            true
        })
        .await?;
        let kind = match state {
            DeliveryState::Pending | DeliveryState::Inflight => {
                let delay = (d.next_at - chrono::Utc::now().timestamp_millis()).max(0);
                AckKind::Nak(Some(Duration::from_millis(delay as u64)))
            }
            DeliveryState::Dead => AckKind::Term,
            DeliveryState::Delivered | DeliveryState::Superseded => AckKind::Ack,
        };
        // A lost ack only means the server redelivers; the record makes that a no-op.
        if let Err(e) = msg.ack_with(kind).await {
            tracing::warn!(delivery = d.id, error = %e, "cannot settle a work message; it will be redelivered and skipped");
        }
        Ok(())
    }

    /// Pulls up to `limit` deliveries from the shared work queue without waiting.
    pub async fn claim_due(&self, _now_ms: i64, limit: usize) -> Result<Vec<Delivery>, StoreError> {
        let mut batch = self
            .consumer
            .fetch()
            .max_messages(limit)
            .messages()
            .await
            .map_err(|e| backend("work queue fetch", e))?;
        let mut out = Vec::new();
        while let Some(msg) = batch.next().await {
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "work queue fetch interrupted");
                    break;
                }
            };
            let item: WorkItem = match serde_json::from_slice(&msg.payload) {
                Ok(i) => i,
                Err(e) => {
                    tracing::error!(error = %e, "unreadable work message dropped");
                    let _ = msg.ack_with(AckKind::Term).await;
                    continue;
                }
            };
            let mut rec = self.delivery_record(&item.key).await?;
            if let Some((r, _)) = &mut rec {
                let state_key = short_hash(&[&r.trigger, &r.tag]);
                if let Some((st, _)) = self.fired_state(&state_key).await?
                    && is_stale(r, &item.key, &st)
                {
                    self.update_record(&item.key, |d| supersede(d, &st.digest))
                        .await?;
                    supersede(r, &st.digest);
                }
            }
            match rec {
                Some((rec, _))
                    if matches!(rec.state, DeliveryState::Pending | DeliveryState::Inflight) =>
                {
                    // Completions name the attempt by a local number: record ids are for display.
                    let mut d = rec.to_delivery();
                    d.id = self.next_seq.fetch_add(1, Ordering::Relaxed);
                    lock(&self.inflight).insert(d.id, (item.key, msg));
                    out.push(d);
                }
                // Finished (or expired) already: a redelivery after a crash, or superseded.
                _ => {
                    let _ = msg.ack().await;
                }
            }
        }
        Ok(out)
    }

    /// Deliveries may be queued by any replica: look again soon.
    pub async fn next_due(&self) -> Result<Option<i64>, StoreError> {
        Ok(Some(chrono::Utc::now().timestamp_millis() + 250))
    }

    /// The trigger's states, by tag.
    async fn fired_states(&self, trigger: &str) -> Result<HashMap<String, FiredState>, StoreError> {
        let keys: Vec<String> = all_keys(&self.triggers, "trigger state listing").await?;
        let mut out = HashMap::new();
        for k in keys {
            if let Some((st, _)) = self.fired_state(&k).await?
                && st.trigger == trigger
            {
                out.insert(st.tag.clone(), st);
            }
        }
        Ok(out)
    }

    /// The trigger's delivery records, newest first. A pending one that a later firing of
    /// the same tag left behind (its publication failed, say, while NATS elected a leader)
    /// is marked superseded here: the newer image went out instead.
    async fn records(&self, trigger: &str) -> Result<Vec<DeliveryRecord>, StoreError> {
        let keys: Vec<String> = all_keys(&self.deliveries, "delivery listing").await?;
        let states = self.fired_states(trigger).await?;
        let mut out = Vec::new();
        for k in keys {
            let Some((mut r, _)) = self.delivery_record(&k).await? else {
                continue;
            };
            if r.trigger != trigger {
                continue;
            }
            if let Some(st) = states.get(&r.tag)
                && is_stale(&r, &k, st)
            {
                let by = st.digest.clone();
                self.update_record(&k, |d| supersede(d, &by)).await?;
                supersede(&mut r, &by);
            }
            out.push(r);
        }
        out.sort_by_key(|r| std::cmp::Reverse(r.id));
        Ok(out)
    }

    pub async fn record_hints(&self, hints: &[super::Hint]) -> Result<(), StoreError> {
        for h in hints {
            let body = serde_json::to_vec(h).map_err(|e| corrupt("hint", e))?;
            self.hints
                .put(short_hash(&[&h.key()]), body.into())
                .await
                .map_err(|e| backend("hint write", e))?;
        }
        Ok(())
    }

    pub async fn pending_hints(&self) -> Result<Vec<super::Hint>, StoreError> {
        let mut out = Vec::new();
        for k in all_keys(&self.hints, "hint listing").await? {
            if let Ok(Some(v)) = self.hints.get(&k).await {
                out.push(serde_json::from_slice(&v).map_err(|e| corrupt("hint", e))?);
            }
        }
        Ok(out)
    }

    pub async fn drop_hint(&self, key: &str) -> Result<(), StoreError> {
        self.hints
            .delete(short_hash(&[key]))
            .await
            .map_err(|e| backend("hint delete", e))
    }

    /// Drops delivered and superseded records last written before `cutoff_ms`.
    pub async fn purge_settled(&self, cutoff_ms: i64) -> Result<usize, StoreError> {
        let mut n = 0;
        for k in all_keys(&self.deliveries, "delivery listing").await? {
            let entry = match self.deliveries.entry(&k).await {
                Ok(Some(e)) => e,
                Ok(None) => continue,
                Err(e) => return Err(backend("delivery read", e)),
            };
            let written_ms = (entry.created.unix_timestamp_nanos() / 1_000_000) as i64;
            let settled = serde_json::from_slice::<DeliveryRecord>(&entry.value).is_ok_and(|r| {
                matches!(
                    r.state,
                    DeliveryState::Delivered | DeliveryState::Superseded
                )
            });
            if settled && written_ms < cutoff_ms {
                match self
                    .deliveries
                    .delete_expect_revision(&k, Some(entry.revision))
                    .await
                {
                    Ok(()) => n += 1,
                    // Rewritten meanwhile (retried): it is no longer settled-and-old.
                    Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => {}
                    Err(e) => return Err(backend("delivery purge", e)),
                }
            }
        }
        Ok(n)
    }

    pub async fn deliveries(
        &self,
        trigger: &str,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        let mut recs = self.records(trigger).await?;
        recs.truncate(limit);
        Ok(recs.iter().map(DeliveryRecord::to_delivery).collect())
    }

    pub async fn summary(&self, trigger: &str) -> Result<TriggerSummary, StoreError> {
        let mut s = TriggerSummary::default();
        for r in self.records(trigger).await? {
            match r.state {
                DeliveryState::Pending | DeliveryState::Inflight => s.pending += 1,
                DeliveryState::Dead => s.dead += 1,
                DeliveryState::Delivered => s.delivered += 1,
                DeliveryState::Superseded => s.superseded += 1,
            }
        }
        for (tag, st) in self.fired_states(trigger).await? {
            s.last_fired.insert(tag, st.digest);
        }
        Ok(s)
    }

    pub async fn retry_dead(&self, trigger: &str, now_ms: i64) -> Result<usize, StoreError> {
        let mut n = 0;
        for r in self.records(trigger).await? {
            if r.state != DeliveryState::Dead {
                continue;
            }
            let key = short_hash(&[&r.trigger, &r.tag, &r.event.id]);
            self.update_record(&key, |d| {
                if d.state != DeliveryState::Dead {
                    return false;
                }
                d.state = DeliveryState::Pending;
                d.attempts = 0;
                d.next_at = now_ms;
                d.created = now_ms;
                true
            })
            .await?;
            self.enqueue(&key, &format!("{key}-retry-{now_ms}")).await?;
            n += 1;
        }
        Ok(n)
    }
}

/// Delivery ids (for display) order by creation across replicas without coordination: the
/// creation time in milliseconds and a random tail.
fn new_delivery_id(now_ms: i64) -> i64 {
    now_ms.max(0).saturating_mul(1_000) + fastrand::i64(0..1_000)
}

async fn all_keys(kv: &kv::Store, what: &str) -> Result<Vec<String>, StoreError> {
    kv.keys()
        .await
        .map_err(|e| backend(what, e))?
        .try_collect()
        .await
        .map_err(|e| backend(what, e))
}

fn is_stale(r: &DeliveryRecord, key: &str, st: &FiredState) -> bool {
    matches!(r.state, DeliveryState::Pending | DeliveryState::Inflight)
        && st.delivery.as_deref() != Some(key)
        && st.fired_at > r.created
}

/// Marks a still-waiting delivery superseded by `by`; false if it had settled already.
fn supersede(d: &mut DeliveryRecord, by: &str) -> bool {
    if matches!(d.state, DeliveryState::Pending | DeliveryState::Inflight) {
        d.state = DeliveryState::Superseded;
        d.last_error = Some(format!("superseded by {by}"));
        true
    } else {
        false
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
