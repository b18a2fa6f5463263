//! Replicas sharing one JetStream store (`store.kind = "nats"`) act as one engine.
//!
//! Membership: each replica heartbeats a random id into the key-value bucket `<S>_MEMBERS`,
//! whose entries expire after [`MEMBER_TTL`]; every replica lists the live ids each
//! [`HEARTBEAT`]. Ownership: a tag (or stream) belongs to the member with the highest
//! `sha256(member, key)` (rendezvous hashing), so all replicas agree on the owner from the
//! member list alone, and when a member joins or leaves only its share moves. The owner runs
//! the tag's scheduled checks, plans triggers for changes other replicas made, and publishes
//! outbox events a dead replica left behind. Correctness never rests on ownership — writes are
//! compare-and-set, deliveries go through a work queue, events carry de-duplicating ids — so
//! two replicas briefly disagreeing about the member list costs a duplicate check, not a lost
//! or doubled change. See ARCHITECTURE.md for the failure cases.
//!
//! The watcher follows the streams bucket so that each replica learns of changes made by the
//! others: the scheduler reloads streams whose specs changed, the push index learns new
//! tracked references, `watch` clients see every replica's events, and the owner plans
//! triggers.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use futures_util::{StreamExt, TryStreamExt};
use sha2::Digest as _;
use tokio_util::sync::CancellationToken;

use crate::config::NatsConfig;
use crate::core::Engine;
use crate::store::StoreError;
use crate::store::nats::{Head, NatsStore};

/// How often a replica renews its membership and re-reads the member list.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a silent replica stays a member (its share waits at most this long, plus one
/// period of the tags it owned).
pub const MEMBER_TTL: Duration = Duration::from_secs(5);
/// How long an outbox may stay unpublished before its owner publishes it in place of the
/// replica that committed it.
const OUTBOX_ADOPT_AFTER: Duration = Duration::from_secs(5);

pub struct Cluster {
    me: String,
    js: jetstream::Context,
    config: kv::Config,
    /// Re-created when a heartbeat fails: the bucket is in memory and does not survive a
    /// restart of a single nats-server.
    kv: std::sync::Mutex<kv::Store>,
    members: RwLock<Vec<String>>,
}

fn score(member: &str, key: &str) -> [u8; 8] {
    let mut h = sha2::Sha256::new();
    h.update(member.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    let d = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

/// The member owning `key` (rendezvous hashing).
pub fn owner<'a>(members: &'a [String], key: &str) -> Option<&'a str> {
    members
        .iter()
        .max_by_key(|m| score(m, key))
        .map(String::as_str)
}

impl Cluster {
    /// Joins: creates the members bucket if needed, announces this replica and reads the
    /// member list once, so ownership is right before the scheduler starts.
    pub async fn join(
        client: async_nats::Client,
        cfg: &NatsConfig,
    ) -> Result<Arc<Cluster>, StoreError> {
        let js = jetstream::new(client);
        let config = kv::Config {
            bucket: format!("{}_MEMBERS", cfg.stream),
            history: 1,
            max_age: MEMBER_TTL,
            storage: jetstream::stream::StorageType::Memory,
            num_replicas: cfg.replicas,
            ..Default::default()
        };
        let kv = open_bucket(&js, &config).await?;
        let cluster = Arc::new(Cluster {
            me: uuid::Uuid::new_v4().simple().to_string(),
            js,
            config,
            kv: std::sync::Mutex::new(kv),
            members: RwLock::new(Vec::new()),
        });
        cluster.beat().await?;
        Ok(cluster)
    }

    pub fn id(&self) -> &str {
        &self.me
    }

    pub fn members(&self) -> Vec<String> {
        self.members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether this replica owns `key`. A replica that cannot see itself in the member list
    /// (cut off from NATS) owns nothing: the others carry on without it.
    pub fn owns(&self, key: &str) -> bool {
        let members = self.members.read().unwrap_or_else(|e| e.into_inner());
        owner(&members, key) == Some(self.me.as_str())
    }

    fn bucket(&self) -> kv::Store {
        self.kv.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn beat(&self) -> Result<(), StoreError> {
        let err = |e: String| StoreError::Backend(format!("NATS JetStream membership: {e}"));
        let kv = self.bucket();
        kv.put(&self.me, Vec::<u8>::new().into())
            .await
            .map_err(|e| err(e.to_string()))?;
        let mut members: Vec<String> = kv
            .keys()
            .await
            .map_err(|e| err(e.to_string()))?
            .try_collect()
            .await
            .map_err(|e| err(e.to_string()))?;
        members.sort();
        let changed = {
            let mut cur = self.members.write().unwrap_or_else(|e| e.into_inner());
            let changed = *cur != members;
            *cur = members.clone();
            changed
        };
        if changed {
            tracing::info!(replicas = members.len(), me = %self.me, "cluster membership changed");
        }
        Ok(())
    }

    /// Heartbeats until cancelled, then leaves so the others take over at once.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.beat().await {
                tracing::warn!(error = %e, "cluster heartbeat failed; this replica's share moves to the others until it is back");
                self.members
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear();
                if let Ok(kv) = open_bucket(&self.js, &self.config).await {
                    *self.kv.lock().unwrap_or_else(|e| e.into_inner()) = kv;
                }
            }
        }
        let _ = self.bucket().delete(&self.me).await;
    }
}

async fn open_bucket(
    js: &jetstream::Context,
    config: &kv::Config,
) -> Result<kv::Store, StoreError> {
    js.create_or_update_key_value(config.clone())
        .await
        .map_err(|e| StoreError::Backend(format!("NATS JetStream bucket {}: {e}", config.bucket)))
}

/// What the watcher remembers of a stream, to tell what a new revision changed: its
/// generation, and the digest of each tag as the heads' tag writes showed it.
#[derive(PartialEq, Default)]
struct Seen {
    generation: Option<i64>,
    digests: BTreeMap<String, String>,
}

/// Follows every change of the streams bucket (see the module docs) until cancelled,
/// re-subscribing after errors.
pub async fn run_watcher(
    engine: Arc<Engine>,
    store: Arc<NatsStore>,
    cluster: Arc<Cluster>,
    start_rev: u64,
    cancel: CancellationToken,
) {
    let mut state = WatchState {
        start_rev,
        ..Default::default()
    };
    loop {
        if let Err(e) = watch_once(&engine, &store, &cluster, &cancel, &mut state).await {
            tracing::warn!(error = %e, "watching the streams bucket failed; resuming");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[derive(Default)]
struct WatchState {
    seen: HashMap<String, Seen>,
    outbox_since: HashMap<String, Instant>,
    /// Ids of events already passed to local `watch` clients.
    recent: HashSet<String>,
    recent_order: VecDeque<String>,
    /// Spilled changes already read.
    spills_seen: HashSet<String>,
    /// The bucket's last revision before the scheduler and planner read the store at start:
    /// older entries are what they read themselves.
    start_rev: u64,
}

impl WatchState {
    fn remember(&mut self, id: &str) -> bool {
        if !self.recent.insert(id.to_string()) {
            return false;
        }
        self.recent_order.push_back(id.to_string());
        if self.recent_order.len() > 16_384
            && let Some(old) = self.recent_order.pop_front()
        {
            self.recent.remove(&old);
        }
        true
    }
}

async fn watch_once(
    engine: &Arc<Engine>,
    store: &Arc<NatsStore>,
    cluster: &Arc<Cluster>,
    cancel: &CancellationToken,
    st: &mut WatchState,
) -> Result<(), String> {
    let kv = store.streams_bucket();
    let start_rev = st.start_rev;
    let mut watch = kv
        .watch_with_history(">")
        .await
        .map_err(|e| e.to_string())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let entry = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tick.tick() => {
                adopt_outboxes(engine, store, cluster, st);
                continue;
            }
            e = watch.next() => match e {
                Some(Ok(e)) => e,
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("watch ended".into()),
            },
        };
        let key = entry.key.clone();
        let initial = entry.revision <= start_rev;
        let local = store.committed_here(&key, entry.revision);
        let head = match entry.operation {
            kv::Operation::Put => match serde_json::from_slice::<Head>(&entry.value) {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(stream = %key, error = %e, "unreadable entry in the streams bucket ignored");
                    continue;
                }
            },
            _ => None,
        };
        match head
            .as_ref()
            .filter(|h| !h.outbox.is_empty() || !h.spill.is_empty())
        {
            Some(_) => {
                st.outbox_since
                    .entry(key.clone())
                    .or_insert_with(Instant::now);
            }
            None => {
                st.outbox_since.remove(&key);
            }
        }
        // A change too big for the head is in spill chunks: read each once.
        let (mut spilled_writes, mut spilled_events) = (Vec::new(), Vec::new());
        if let Some(h) = &head {
            for sp in &h.spill {
                if !st.spills_seen.insert(sp.id.clone()) {
                    continue;
                }
                match store.spilled(&key, sp).await {
                    Ok((w, e)) => {
                        spilled_writes.extend(w);
                        spilled_events.extend(e);
                    }
                    Err(e) => {
                        tracing::warn!(stream = %key, error = %e, "cannot read a spilled change")
                    }
                }
            }
            if st.spills_seen.len() > 4096 {
                st.spills_seen.clear();
            }
        }
        let mut events = Vec::new();
        if let Some(h) = &head {
            for e in spilled_events.iter().chain(&h.outbox) {
                let fresh = st.remember(&e.id);
                if fresh && !local && !initial {
                    events.push(e.clone());
                }
            }
        }
        engine.remote_change(events, None, Vec::new());
        let Some((head, meta)) = head.as_ref().and_then(|h| Some((h, h.meta.as_ref()?))) else {
            st.seen.remove(&key);
            continue;
        };
        let seen = st.seen.entry(key.clone()).or_default();
        let old_generation = seen.generation.replace(meta.generation);
        // The tags this revision wrote, with their digests after it.
        let mut moved = Vec::new();
        let writes: Vec<&crate::store::nats::Pending> =
            head.pending.iter().chain(&spilled_writes).collect();
        for p in &writes {
            let digest = p
                .record
                .as_ref()
                .and_then(|r| r.tag.current_digest())
                .map(|d| d.to_string());
            let before = match &digest {
                Some(d) => seen.digests.insert(p.tag.clone(), d.clone()),
                None => seen.digests.remove(&p.tag),
            };
            if digest.is_some() && before != digest {
                moved.push(p.tag.clone());
            }
        }
        if initial || local {
            continue;
        }
        if old_generation != Some(meta.generation) {
            // The tags written with the new generation carry the specs that changed.
            let mut doc = crate::model::ImageStream::new(&meta.namespace, &meta.name, meta.created);
            doc.generation = meta.generation;
            for p in &writes {
                if let Some(r) = &p.record {
                    doc.tags.insert(p.tag.clone(), r.tag.clone());
                }
            }
            engine.index_stream(Some(&doc));
            engine.remote_change(Vec::new(), Some(&key), Vec::new());
        }
        for tag in moved {
            let tag_key = format!("{key}:{tag}");
            if cluster.owns(&tag_key) {
                engine.remote_change(Vec::new(), None, vec![tag_key]);
            }
        }
    }
}

/// Publishes outboxes left unpublished too long by whichever replica committed them.
fn adopt_outboxes(engine: &Engine, store: &NatsStore, cluster: &Cluster, st: &WatchState) {
    let mut adopted = false;
    for (key, since) in &st.outbox_since {
        if since.elapsed() >= OUTBOX_ADOPT_AFTER && cluster.owns(key) {
            store.adopt_outbox(key);
            adopted = true;
        }
    }
    if adopted {
        engine.outbox_wake().notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_is_shared_and_moves_only_the_leavers_share() {
        let three: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let keys: Vec<String> = (0..3000).map(|i| format!("default/s:t{i}")).collect();
        let mut count: HashMap<&str, usize> = HashMap::new();
        for k in &keys {
            *count.entry(owner(&three, k).unwrap()).or_default() += 1;
        }
        for m in ["a", "b", "c"] {
            assert!((800..1200).contains(&count[m]), "{count:?}");
        }
        let two: Vec<String> = vec!["a".into(), "c".into()];
        for k in &keys {
            let before = owner(&three, k).unwrap();
            let after = owner(&two, k).unwrap();
            if before != "b" {
                assert_eq!(before, after, "only b's share moves");
            }
        }
        assert_eq!(owner(&[], "x"), None);
    }
}
