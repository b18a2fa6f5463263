//! The scale-out store: the same behaviour as the SQLite store, kept in NATS JetStream so that
//! several replicas share it. No consensus of our own — JetStream's does the work:
//!
//! - `<S>_STREAMS` (key-value, history 1): one small *head* per image stream, `ns/name` → the
//!   stream's own record (generation, created), its *outbox* (the events of changes not yet
//!   published), the same-stream links between tags, and the tag writes of the latest changes
//!   (`pending`). Every change is one compare-and-set of the head: the change, its events and
//!   the tag writes it makes are one write, so two replicas never overwrite each other's change
//!   and the outbox cannot lose an event between the commit and the publication.
//! - `<S>_TAGS` (key-value): one record per tag (spec, status, conditions, the two newest
//!   history entries), `<stream>.<tag>`. A committed change applies its pending writes here
//!   right after the head's write; whoever next reads or changes the stream applies any that a
//!   crash left behind (each write is a compare-and-set on the record's revision before the
//!   change, so applying twice or late changes nothing). A check that finds the known digest
//!   touches none of this; a change writes what it changed, whatever the stream's size.
//! - `<S>_HISTORY` (key-value): one entry per history entry, `<stream>.<tag>.<incarnation>.<seq>`.
//! - `<S>_SPILL` (key-value): a change too big for the head (thousands of tags or events at
//!   once) in chunks, written before the head that names them, kept until its events are
//!   published.
//! - A deleted stream leaves a tombstone head holding the `tag.deleted` events until they are
//!   published.
//! - `<S>_META` (key-value): `schema`, the layout version; read first at every start, so a
//!   newer release's buckets are refused untouched and an older layout is converted in place
//!   (`upgrade`).
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

mod deliveries;
mod documents;
mod upgrade;
mod watch;

pub use documents::{Head, Pending};

use super::{
    Commit, Completion, Delivery, DeliveryState, FireOutcome, FireRequest, StoreError, TagWrite,
    TriggerSummary, rules,
};
use crate::config::NatsConfig;
use crate::model::{Event, ImageStream};

/// What one `<S>_STREAMS` entry held in schema 1: the whole stream as one document.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RecordV1 {
    /// None: a tombstone, kept until its outbox is published.
    doc: Option<ImageStream>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    outbox: Vec<Event>,
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

/// An event handed to the publisher: its stream, its id, and the spilled change holding it.
struct HandedOut {
    key: String,
    id: String,
    spill: Option<String>,
    /// Published, not yet marked: the stream's next commit drops it from the head's outbox
    /// (a write it makes anyway), so the marker's own write is mostly not needed.
    published: bool,
}

/// The body of a work message: which delivery record to attempt.
#[derive(Serialize, Deserialize)]
struct WorkItem {
    key: String,
}

pub struct NatsStore {
    js: jetstream::Context,
    streams: kv::Store,
    tags: kv::Store,
    history: kv::Store,
    triggers: kv::Store,
    deliveries: kv::Store,
    /// Push hints not yet re-checked (SPEC 9: recorded before the hook answers).
    hints: kv::Store,
    work_subject: String,
    consumer: PullConsumer,
    /// The head of each stream as this replica last read or wrote it, with its revision: a
    /// commit or the publisher writes over it without reading it again (a compare-and-set
    /// that fails reads it then). Heads are small: no tags, no history.
    heads: Mutex<HashMap<String, (u64, Head)>>,
    /// Changes of one stream made here go one at a time (they would only fail each other's
    /// compare-and-set of the head); other streams' changes go side by side.
    locks: Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
    /// Pending tag writes (tag key, revision before the write) known to be applied.
    applied: Mutex<std::collections::HashSet<(String, u64)>>,
    /// Spilled changes whose tag writes are known to be applied, and the events of each
    /// spilled change published so far.
    spills_applied: Mutex<std::collections::HashSet<String>>,
    spill_published: Mutex<HashMap<String, std::collections::HashSet<String>>>,
    spill: kv::Store,
    /// Streams whose outbox this replica publishes.
    dirty: Mutex<BTreeSet<String>>,
    /// `pending_events` sequence → the event handed out, until marked published.
    handed_out: Mutex<HashMap<i64, HandedOut>>,
    pub(in crate::store) handoff: super::Handoff,
    next_seq: AtomicI64,
    last_delivery_id: AtomicI64,
    /// Work messages being attempted here, by local attempt number, to ack when the attempt is recorded.
    inflight: Mutex<HashMap<i64, (String, jetstream::Message)>>,
    /// Revisions this replica committed, so its own watcher does not announce them twice.
    local: Mutex<VecDeque<(String, u64)>>,
    /// Tests: commits stop after the head's write, as if the process died there.
    stop_after_head: std::sync::atomic::AtomicBool,
}

/// The layout of the buckets this release reads and writes: 2, a head per stream and a record
/// per tag and per history entry. Schema 1 (0.1.0, without a marker, and 0.2.0) kept each
/// stream as one document; it is converted at start (`upgrade`).
pub const SCHEMA_VERSION: u32 = 2;

/// `<S>_META` holds `schema`: refuses a store written by a newer release (changing nothing).
/// Returns the bucket, and the schema found (1 when unmarked).
async fn check_schema(
    js: &jetstream::Context,
    cfg: &NatsConfig,
) -> Result<(kv::Store, u32), StoreError> {
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
    let schema = match found {
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
            found
        }
        None => 1,
    };
    Ok((meta, schema))
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
        let (meta, schema) = check_schema(&js, cfg).await?;
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
        let tags = kv_open(bucket("TAGS", Duration::ZERO)).await?;
        let history = kv_open(bucket("HISTORY", Duration::ZERO)).await?;
        let spill = kv_open(bucket("SPILL", Duration::ZERO)).await?;
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
        let store = NatsStore {
            js,
            streams,
            tags,
            history,
            triggers,
            deliveries,
            hints,
            work_subject,
            consumer,
            heads: Mutex::default(),
            locks: Mutex::default(),
            applied: Mutex::default(),
            spills_applied: Mutex::default(),
            spill_published: Mutex::default(),
            spill,
            dirty: Mutex::default(),
            handed_out: Mutex::default(),
            handoff: Default::default(),
            next_seq: AtomicI64::new(1),
            last_delivery_id: AtomicI64::new(0),
            inflight: Mutex::default(),
            local: Mutex::default(),
            stop_after_head: Default::default(),
        };
        if schema < SCHEMA_VERSION {
            store.upgrade(&meta, schema).await?;
        }
        Ok(store)
    }
}

impl NatsStore {
    /// Tests: makes every later commit stop right after its head is written (the tag writes
    /// are left for the next reader, as after a crash at that point).
    #[doc(hidden)]
    pub fn stop_after_head_write(&self, on: bool) {
        self.stop_after_head.store(on, Ordering::Relaxed);
    }
}

async fn all_keys(kv: &kv::Store, what: &str) -> Result<Vec<String>, StoreError> {
    kv.keys()
        .await
        .map_err(|e| backend(what, e))?
        .try_collect()
        .await
        .map_err(|e| backend(what, e))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
