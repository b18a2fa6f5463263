//! The one write path. Every change of a tag — manual import, `tag`, rollback, delete, a
//! scheduled check, a registry push, a declared stream applied at start — goes through
//! [`Engine::mutate`], which applies the change to the stream document, propagates it to
//! aliases, derives the events by comparing before and after, and commits document and events
//! in one store transaction. Sources never write the store themselves.

pub mod view;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, broadcast, mpsc};

use crate::config::{Config, DeclaredStream};
use crate::model::event::{IMPORT_FAILED, TAG_CHANGED, TAG_DELETED};
use crate::model::stream::Details;
use crate::model::{
    Cause, Digest, Event, EventData, HistoryEntry, ImageRef, ImageStream, RefError, StreamImageRef,
    StreamName, StreamTagRef, TagFrom, TagSpec,
};
use crate::registry::{Options, RegistryClient, RegistryError, Resolved};
use crate::store::{Commit, FireOutcome, FireRequest, Loaded, Scope, Store, StoreError, TagWrite};

/// Errors of the API operations. Import failures are not errors: they are outcomes recorded on
/// the tag. `BadRequest` is the caller's fault (HTTP 400), `NotFound` 404, `Conflict` 409.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<RefError> for CoreError {
    fn from(e: RefError) -> Self {
        CoreError::BadRequest(e.to_string())
    }
}

/// What happened to a tag an operation asked to import.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub tag: StreamTagRef,
    pub error: Option<RegistryError>,
}

/// Progress of a long import (`--all`), for clients that stream it.
#[derive(Debug, Clone)]
pub enum Progress {
    /// How many tags will be imported.
    Total(usize),
    /// One tag done.
    Done(Outcome),
}

#[derive(Debug, Clone, Default)]
pub struct ImportRequest {
    /// Receives progress of `--all` imports as they happen.
    pub progress: Option<mpsc::UnboundedSender<Progress>>,
    /// `[ns/]stream[:tag]`
    pub name: String,
    pub namespace: String,
    pub from: Option<String>,
    pub confirm: bool,
    pub all: bool,
    pub scheduled: bool,
    pub insecure: bool,
    pub platform: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Docker,
    Istag,
    Isimage,
}

#[derive(Debug, Clone, Default)]
pub struct TagRequest {
    pub namespace: String,
    pub source: String,
    pub source_kind: Option<SourceKind>,
    pub dests: Vec<String>,
    pub alias: bool,
    pub scheduled: bool,
    pub insecure: bool,
    pub platform: Option<String>,
    /// `tag REPOSITORY DEST --policy=...`: the source is a repository and DEST follows it.
    pub policy: Option<crate::model::PolicySpec>,
}

/// Messages to the scheduler: a stream's specs changed (re-read its tags), or a tag's digest
/// moved by another path (so its next check compares against the new digest).
#[derive(Debug, Clone)]
pub enum SpecChange {
    Stream(String),
}

pub struct Engine {
    store: Store,
    registry: Arc<RegistryClient>,
    instance: String,
    max_import_all: usize,
    /// `[history] max_entries` (0: keep all).
    max_history: usize,
    /// `[[forge]]` hosts (host, kind) for compare links, besides github.com and gitlab.com.
    forges: Vec<(String, String)>,
    /// Tag listings of policy repositories: one listing serves every policy tag of a
    /// repository that checks at about the same time.
    listings: std::sync::Mutex<
        std::collections::HashMap<String, Arc<tokio::sync::Mutex<Option<Listing>>>>,
    >,
    /// Committed events, for `watch` and in-process subscribers. Lagging receivers lose
    /// events; the outbox is the durable path.
    events: broadcast::Sender<Event>,
    /// Wakes the outbox publisher.
    outbox: Arc<Notify>,
    /// Tags whose current image changed, for the trigger planner.
    changed_tags: mpsc::UnboundedSender<String>,
    spec_changes: mpsc::UnboundedSender<SpecChange>,
    /// `registry/repository:tag` -> (stream key, tag) of the tags tracking it, so a push
    /// finds its tags without reading any stream whole. Built on first use, kept by `mutate`;
    /// it may hold stale extras (every hit is checked against the tag), never misses.
    tracking: std::sync::Mutex<Option<PushIndex>>,
    /// Set when replicas share a JetStream store: decides which tags this replica polls.
    cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The triggers, when the store fires them in the change's own transaction.
    fire_sink: std::sync::OnceLock<std::sync::Weak<dyn FireSink>>,
}

/// The triggers as the write path sees them. On a store that applies the firing rule in the
/// change's transaction (SQLite), a change of a watched tag fires there: in commit order,
/// with no planner round trip. The planner stays for start-up, JetStream and replicas.
pub trait FireSink: Send + Sync {
    /// What to fire for a committed `tag.changed` event (nothing when no trigger watches it).
    fn requests(&self, changed: &Event) -> Vec<FireRequest>;
    /// What the commit did with them.
    fn fired(&self, reqs: &[FireRequest], outcomes: &[FireOutcome]);
}

/// A repository's tags, and when the listing finished.
type Listing = (std::time::Instant, Result<Vec<String>, RegistryError>);

/// What a policy check decided.
enum PolicyChoice {
    /// Move to this repository tag's image.
    Move(String, ImageRef, Box<Resolved>),
    /// Keep the current image.
    Keep,
}

/// `registry/repository:tag` -> the (stream key, tag) pairs tracking it.
type PushIndex = std::collections::HashMap<String, BTreeSet<(String, String)>>;

/// The external references a stream's tags track by tag (digest references never move),
/// with the tag tracking each.
fn tracked_refs(s: &ImageStream) -> Vec<(String, String)> {
    // A policy tag tracks every tag of its repository: `registry/repo:*`.
    let policies = s.tags.iter().filter_map(|(name, t)| match &t.spec.from {
        TagFrom::Policy(p) => ImageRef::parse(&p.repository)
            .ok()
            .map(|r| (format!("{}/{}:*", r.registry, r.repository), name.clone())),
        _ => None,
    });
    let mut out: Vec<(String, String)> = policies.collect();
    out.extend(
        s.tags
            .iter()
            .filter_map(|(name, t)| match &t.spec.from {
                TagFrom::Image(r) => ImageRef::parse(r).ok().map(|r| (name, r)),
                _ => None,
            })
            .filter(|(_, r)| r.digest.is_none())
            .filter_map(|(name, r)| {
                r.tag
                    .as_ref()
                    .map(|t| (format!("{}/{}:{t}", r.registry, r.repository), name.clone()))
            }),
    );
    out
}

/// Keeps the newest `max` history entries of the tags a change touched (0: all).
pub(crate) fn trim_histories(before: Option<&ImageStream>, after: &mut ImageStream, max: usize) {
    if max == 0 {
        return;
    }
    for (name, t) in after.tags.iter_mut() {
        if before.and_then(|b| b.tags.get(name)) != Some(t) {
            t.history.truncate(max);
        }
    }
}

/// What a change did to each tag, for stores that keep tags apart: the tags that differ,
/// with the history entries they gained and the current entry when it was rewritten in place.
pub(crate) fn tag_writes(
    before: Option<&ImageStream>,
    after: &ImageStream,
    revs: &BTreeMap<String, i64>,
) -> Vec<TagWrite> {
    let none = BTreeMap::new();
    let old_tags = before.map_or(&none, |b| &b.tags);
    let mut out = Vec::new();
    for (name, t) in &after.tags {
        let old = old_tags.get(name);
        if old == Some(t) {
            continue;
        }
        let known: BTreeSet<&str> = old
            .map(|o| o.history.iter().map(|h| h.id.as_str()).collect())
            .unwrap_or_default();
        let new_entries = t
            .history
            .iter()
            .take_while(|h| !known.contains(h.id.as_str()))
            .cloned()
            .collect();
        let head_update = old
            .and_then(|o| o.history.first())
            .and_then(|oh| t.history.iter().find(|h| h.id == oh.id && *h != oh))
            .cloned();
        out.push(TagWrite {
            name: name.clone(),
            expected_rev: revs.get(name).copied(),
            tag: Some(t.clone()),
            new_entries,
            head_update,
        });
    }
    for name in old_tags.keys().filter(|n| !after.tags.contains_key(*n)) {
        out.push(TagWrite {
            name: name.clone(),
            expected_rev: revs.get(name).copied(),
            tag: None,
            new_entries: Vec::new(),
            head_update: None,
        });
    }
    out
}

/// Records a registry answer on a tag, unless the tag was deleted or re-specced meanwhile
/// (then the answer is stale and dropped).
fn apply_result(
    s: &mut ImageStream,
    tag: &str,
    spec: &TagSpec,
    result: &Result<(ImageRef, Resolved), RegistryError>,
    cause: Cause,
    details: Option<&Details>,
) {
    let generation = s.generation;
    let Some(t) = s.tags.get_mut(tag) else {
        return;
    };
    if &t.spec != spec {
        return;
    }
    match result {
        Ok((r, res)) => {
            let image = r.pull_spec(&res.digest);
            if res.unchanged {
                t.succeed();
            } else {
                let changed = t.record(HistoryEntry {
                    digest: res.digest.clone(),
                    image,
                    created: now(),
                    generation: t.spec_generation,
                    cause,
                    id: new_id(),
                    media_type: res.media_type.clone(),
                    platforms: res.platforms.clone(),
                    details: details.cloned(),
                    source_tag: None,
                });
                if !changed {
                    t.succeed();
                }
                if cause == Cause::Push {
                    t.last_push = Some(now());
                }
            }
        }
        Err(e) => {
            t.fail(e.reason(), &e.to_string(), now(), generation);
        }
    }
}

/// The receiving ends of the engine's notifications, handed to the components that run.
pub struct EngineReceivers {
    pub changed_tags: mpsc::UnboundedReceiver<String>,
    pub spec_changes: mpsc::UnboundedReceiver<SpecChange>,
}

fn now() -> DateTime<Utc> {
    Utc::now()
}

impl Engine {
    /// `cluster`: the replica set, when replicas share a JetStream store.
    pub fn new(
        store: Store,
        registry: Arc<RegistryClient>,
        config: &Config,
        cluster: Option<Arc<crate::cluster::Cluster>>,
    ) -> (Arc<Engine>, EngineReceivers) {
        let (events, _) = broadcast::channel(4096);
        let (ct_tx, ct_rx) = mpsc::unbounded_channel();
        let (sc_tx, sc_rx) = mpsc::unbounded_channel();
        (
            Arc::new(Engine {
                store,
                registry,
                instance: config.server.instance.clone(),
                max_import_all: config.schedule.max_import_all,
                max_history: config.history_max_entries,
                forges: config.forges.clone(),
                listings: Default::default(),
                events,
                outbox: Arc::new(Notify::new()),
                changed_tags: ct_tx,
                spec_changes: sc_tx,
                tracking: std::sync::Mutex::new(None),
                cluster,
                fire_sink: std::sync::OnceLock::new(),
            }),
            EngineReceivers {
                changed_tags: ct_rx,
                spec_changes: sc_rx,
            },
        )
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Lets changes fire `sink`'s triggers as they commit (see `FireSink`); set before the
    /// planner's start-up pass, so no change falls between the two.
    pub fn set_fire_sink(&self, sink: std::sync::Weak<dyn FireSink>) {
        let _ = self.fire_sink.set(sink);
    }

    pub fn registry(&self) -> &RegistryClient {
        &self.registry
    }

    /// This engine's name in event sources.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The replica set, when replicas share a JetStream store.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.as_ref()
    }

    /// Committed events as they happen (lagging receivers lose some; the outbox is durable).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// What wakes the outbox publisher.
    pub fn outbox_wake(&self) -> Arc<Notify> {
        self.outbox.clone()
    }

    /// A change another replica committed, as the watcher saw it: its events go to local
    /// subscribers, a spec change re-reads the stream's schedule, tags whose image moved are
    /// planned for triggers here.
    pub(crate) fn remote_change(
        &self,
        events: Vec<Event>,
        spec_changed: Option<&str>,
        changed_tags: Vec<String>,
    ) {
        for e in events {
            let _ = self.events.send(e);
        }
        if let Some(key) = spec_changed {
            let _ = self.spec_changes.send(SpecChange::Stream(key.to_string()));
        }
        for t in changed_tags {
            let _ = self.changed_tags.send(t);
        }
    }

    /// Applies `f` to the stream (created empty when `create` and absent), propagates alias
    /// changes, and commits the result with its events; retries on concurrent changes. `f`
    /// sees the tags `scope` names (with their alias closure) and may change only those.
    /// Returns the stream as committed (the loaded tags), or NotFound.
    pub async fn mutate<F>(
        &self,
        name: &StreamName,
        create: bool,
        scope: Scope,
        f: F,
    ) -> Result<ImageStream, CoreError>
    where
        F: Fn(&mut ImageStream) -> Result<(), CoreError>,
    {
        self.mutate_from(name, create, scope, None, f).await
    }

    /// `mutate`, its first try on `first`: the stream as the caller loaded it with `scope`
    /// (a stale one fails the compare-and-set and is loaded again).
    async fn mutate_from<F>(
        &self,
        name: &StreamName,
        create: bool,
        scope: Scope,
        mut first: Option<Loaded>,
        f: F,
    ) -> Result<ImageStream, CoreError>
    where
        F: Fn(&mut ImageStream) -> Result<(), CoreError>,
    {
        let mut tries = crate::retry::CasLoop::new(20);
        while tries.next().await {
            let loaded = match first.take() {
                Some(l) => Some(l),
                None => self.store.load(&name.key(), scope.clone()).await?,
            };
            let (before, rev, tag_revs) = match loaded {
                Some(l) => (Some(l.doc), Some(l.rev), l.tag_revs),
                None if create => (None, None, BTreeMap::new()),
                None => {
                    return Err(CoreError::NotFound(format!(
                        "image stream {name} not found"
                    )));
                }
            };
            let mut after = before
                .clone()
                .unwrap_or_else(|| ImageStream::new(&name.namespace, &name.name, now()));
            f(&mut after)?;
            propagate_aliases(before.as_ref(), &mut after);
            if before.as_ref() == Some(&after) {
                return Ok(after);
            }
            trim_histories(before.as_ref(), &mut after, self.max_history);
            let events = self.diff_events(before.as_ref(), Some(&after));
            let specs_changed = before
                .as_ref()
                .is_none_or(|b| b.generation != after.generation);
            let commit = Commit {
                key: name.key(),
                expected_rev: rev,
                tags: Some(tag_writes(before.as_ref(), &after, &tag_revs)),
                meta_changed: before
                    .as_ref()
                    .is_none_or(|b| b.generation != after.generation || b.created != after.created),
                max_history: self.max_history,
                doc: Some(after.clone()),
                events: events.clone(),
            };
            let sink = self
                .fire_sink
                .get()
                .and_then(std::sync::Weak::upgrade)
                .filter(|_| self.store.fires_in_commit());
            let fire: Vec<FireRequest> = sink.as_ref().map_or_else(Vec::new, |s| {
                events
                    .iter()
                    .filter(|e| e.kind == TAG_CHANGED)
                    .flat_map(|e| s.requests(e))
                    .collect()
            });
            let now_ms = Utc::now().timestamp_millis();
            match self.store.commit_firing(commit, fire, now_ms).await {
                Ok((_, fired)) => {
                    if specs_changed {
                        self.index_stream(Some(&after));
                    }
                    let fired_here = match (&sink, fired) {
                        (Some(s), Some((reqs, outcomes))) => {
                            s.fired(&reqs, &outcomes);
                            true
                        }
                        _ => false,
                    };
                    self.announce(&name.key(), events, specs_changed, fired_here);
                    return Ok(after);
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(CoreError::Conflict(format!(
            "image stream {name} kept changing concurrently; try again"
        )))
    }

    /// Whether this replica does the periodic work for `key` (always, without a cluster).
    pub fn owns(&self, key: &str) -> bool {
        self.cluster.as_ref().is_none_or(|c| c.owns(key))
    }

    /// Adds a stream's tracked references to the push index (when the index is built).
    pub fn index_stream(&self, doc: Option<&ImageStream>) {
        let mut guard = self.tracking.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(index), Some(doc)) = (guard.as_mut(), doc) {
            for (r, tag) in tracked_refs(doc) {
                index.entry(r).or_default().insert((doc.key(), tag));
            }
        }
    }

    /// The tags (stream key, tag) that may track `reference` (with `any_tag`: any tag of its
    /// repository, `reference` ending in `:`), building the index on first use.
    async fn tags_tracking(
        &self,
        reference: &str,
        any_tag: bool,
    ) -> Result<Vec<(String, String)>, CoreError> {
        let built = self
            .tracking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if !built {
            let mut index = PushIndex::default();
            for key in self.store.keys().await? {
                // A page at a time, as the scheduler reads: no stream is held whole.
                let mut pages = self.store.head_pages(&key, crate::store::HEAD_PAGE);
                while let Some(page) = pages.recv().await {
                    for (r, tag) in tracked_refs(&page?) {
                        index.entry(r).or_default().insert((key.clone(), tag));
                    }
                }
            }
            let mut guard = self.tracking.lock().unwrap_or_else(|e| e.into_inner());
            match guard.as_mut() {
                // built concurrently meanwhile: merge, extras are harmless
                Some(existing) => {
                    for (k, v) in index {
                        existing.entry(k).or_default().extend(v);
                    }
                }
                None => *guard = Some(index),
            }
        }
        let guard = self.tracking.lock().unwrap_or_else(|e| e.into_inner());
        let Some(index) = guard.as_ref() else {
            return Ok(Vec::new());
        };
        if any_tag {
            // Rare (a digest-only notification): a scan of the index, not of the store.
            return Ok(index
                .iter()
                .filter(|(r, _)| r.starts_with(reference))
                .flat_map(|(_, s)| s.iter().cloned())
                .collect());
        }
        Ok(index
            .get(reference)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default())
    }

    /// `fired`: the change's transaction fired its triggers; the planner has nothing to do.
    /// The tags the push index names for `reference` (see `tags_tracking`), each with its
    /// stream loaded for a change of that tag; tags gone meanwhile are left out.
    async fn load_tracking(
        &self,
        reference: &str,
        any_tag: bool,
    ) -> Result<Vec<(StreamTagRef, Loaded)>, CoreError> {
        let mut out = Vec::new();
        for (key, name) in self.tags_tracking(reference, any_tag).await? {
            if let Some(l) = self
                .store
                .load(&key, Scope::Tags(vec![name.clone()]))
                .await?
            {
                let st = StreamTagRef::new(StreamName::new(&l.doc.namespace, &l.doc.name)?, &name)?;
                out.push((st, l));
            }
        }
        Ok(out)
    }

    fn announce(&self, stream_key: &str, events: Vec<Event>, specs_changed: bool, fired: bool) {
        for e in &events {
            if e.kind == TAG_CHANGED && !fired {
                let _ = self.changed_tags.send(e.subject.clone());
            }
            tracing::info!(
                event = %e.kind, subject = %e.subject,
                digest = e.data.digest.as_deref().unwrap_or(""),
                cause = e.data.cause.as_deref().unwrap_or(""),
                reason = e.data.reason.as_deref().unwrap_or(""),
                "tag {}", match e.kind.as_str() { TAG_CHANGED => "changed", TAG_DELETED => "deleted", _ => "import failed" }
            );
            crate::metrics::tag_event(e);
            let _ = self.events.send(e.clone());
        }
        // A store that hands its events to the publisher wakes it itself when it did not.
        if !events.is_empty() && !self.store.hands_off() {
            self.outbox.notify_one();
        }
        if specs_changed {
            let _ = self
                .spec_changes
                .send(SpecChange::Stream(stream_key.to_string()));
        }
    }

    fn diff_events(&self, before: Option<&ImageStream>, after: Option<&ImageStream>) -> Vec<Event> {
        let mut out = Vec::new();
        let stream = after.or(before).expect("one side exists");
        let data = |tag: &str| EventData::for_tag(&stream.namespace, &stream.name, tag);
        if let Some(after) = after {
            for (name, t) in &after.tags {
                let old = before.and_then(|b| b.tags.get(name));
                let prev = old.and_then(|o| o.current_digest());
                if let Some(cur) = t.current()
                    && Some(&cur.digest) != prev
                {
                    let mut d = data(name);
                    d.digest = Some(cur.digest.to_string());
                    d.previous = prev.map(|p| p.to_string());
                    d.image = Some(cur.image.clone());
                    d.generation = cur.generation;
                    d.cause = Some(cur.cause.as_str().into());
                    d.explain(cur, old.and_then(|o| o.current()).map(|h| h.image.as_str()));
                    out.push(Event::new(
                        TAG_CHANGED,
                        cur.id.clone(),
                        &self.instance,
                        cur.created,
                        d,
                    ));
                }
                if let Some(c) = t.import_error()
                    && old.and_then(|o| o.import_error()) != Some(c)
                {
                    let mut d = data(name);
                    d.digest = t.current_digest().map(|x| x.to_string());
                    d.image = t.current().map(|h| h.image.clone());
                    d.generation = c.generation;
                    d.reason = Some(c.reason.clone());
                    d.message = Some(c.message.clone());
                    out.push(Event::new(
                        IMPORT_FAILED,
                        new_id(),
                        &self.instance,
                        c.time,
                        d,
                    ));
                }
            }
        }
        if let Some(before) = before {
            for (name, t) in &before.tags {
                if after.is_none_or(|a| !a.tags.contains_key(name)) {
                    let mut d = data(name);
                    d.previous = t.current_digest().map(|x| x.to_string());
                    d.generation = after.map(|a| a.generation).unwrap_or(before.generation);
                    out.push(Event::new(TAG_DELETED, new_id(), &self.instance, now(), d));
                }
            }
        }
        out
    }

    pub async fn get_stream(&self, name: &StreamName) -> Result<ImageStream, CoreError> {
        self.store
            .get(&name.key())
            .await?
            .map(|(d, _)| d)
            .ok_or_else(|| CoreError::NotFound(format!("image stream {name} not found")))
    }

    /// The stream with only `tag` in it, with its whole history: reading one tag costs what
    /// the tag holds, not what the stream does.
    pub async fn get_tag(&self, tag: &StreamTagRef) -> Result<ImageStream, CoreError> {
        let key = tag.stream.key();
        match self.store.tag(&key, &tag.tag).await? {
            Some((mut doc, t)) => {
                doc.tags.insert(tag.tag.clone(), t);
                Ok(doc)
            }
            None => self
                .store
                .load(&key, Scope::Tags(Vec::new()))
                .await?
                .map(|l| l.doc)
                .ok_or_else(|| {
                    CoreError::NotFound(format!("image stream {} not found", tag.stream))
                }),
        }
    }

    /// The tags of a policy repository, listed once for all policy tags checking it now.
    async fn list_coalesced(
        &self,
        repo: &ImageRef,
        insecure: bool,
    ) -> Result<Vec<String>, RegistryError> {
        let key = format!("{}/{}", repo.registry, repo.repository);
        // Only a listing finished after this check began answers it: checks that arrive
        // together share one, a later check (after a push, say) lists again.
        let started = std::time::Instant::now();
        let slot = self
            .listings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .clone();
        let mut guard = slot.lock().await;
        if let Some((at, res)) = &*guard
            && *at >= started
        {
            return res.clone();
        }
        let res = self.registry.list_tags(repo, insecure).await;
        crate::metrics::registry_check(&repo.registry, res.as_ref().err().map(|e| e.reason()));
        // Stamped with when it finished: the checks waiting for it meanwhile share it.
        *guard = Some((std::time::Instant::now(), res.clone()));
        res
    }

    /// A policy tag's check (SPEC 8): list the repository, rank its tags, take the best one
    /// that is not lower than the current choice and, with `min_age`, that istream has seen
    /// with its digest long enough (a tag without an image takes the best at once); resolve
    /// it by `HEAD` and record the move, or `NoMatch`, or nothing. `set_spec` also makes
    /// `spec` the tag's spec (`tag --policy`).
    pub async fn check_policy(
        &self,
        tag: &StreamTagRef,
        spec: &TagSpec,
        cause: Cause,
        set_spec: bool,
    ) -> Result<(ImageStream, Option<RegistryError>), CoreError> {
        let TagFrom::Policy(ps) = &spec.from else {
            return Err(CoreError::BadRequest(format!("{tag} is not a policy tag")));
        };
        let policy = crate::policy::Policy::compile(ps)
            .map_err(|(k, e)| CoreError::BadRequest(format!("policy {k}: {e}")))?;
        let loaded = self
            .store
            .load(&tag.stream.key(), Scope::Tags(vec![tag.tag.clone()]))
            .await?;
        let current = loaded
            .as_ref()
            .and_then(|l| l.doc.tags.get(&tag.tag).cloned());
        // The choice so far counts only under the same policy.
        let same_policy = current.as_ref().is_some_and(|c| c.spec.from == spec.from);
        let cur_source = current
            .as_ref()
            .filter(|_| same_policy)
            .and_then(|c| c.source_tag.clone());
        let cur_digest = current.as_ref().and_then(|c| c.current_digest().cloned());
        let has_image = cur_digest.is_some();
        let mut seen = current
            .as_ref()
            .filter(|_| same_policy)
            .map(|c| c.seen.clone())
            .unwrap_or_default();
        let now = Utc::now();
        let min_age = chrono::Duration::from_std(policy.min_age).unwrap_or(chrono::Duration::MAX);
        let what = format!(
            "{}/{}",
            policy.repository.registry, policy.repository.repository
        );
        let decided: Result<PolicyChoice, RegistryError> = async {
            let tags = self
                .list_coalesced(&policy.repository, spec.insecure)
                .await?;
            let ranked = policy.rank(&tags);
            if ranked.is_empty() {
                return Err(RegistryError::NoMatch {
                    what: what.clone(),
                    detail: ps.describe(),
                });
            }
            // Never lower on its own: a current choice that vanished upstream stays.
            let candidates: Vec<&String> = ranked
                .iter()
                .filter(|c| cur_source.as_ref().is_none_or(|cs| !policy.lower(c, cs)))
                .collect();
            seen.retain(|t, _| candidates.contains(&t));
            for c in candidates {
                let r = policy.repository.with_tag(c);
                let opts = Options {
                    insecure: spec.insecure,
                    platform: spec.platform.as_deref(),
                    known: None,
                    want_platforms: true,
                    read_manifest: false,
                };
                let res = self.registry.resolve(&r, opts).await?;
                if cur_source.as_deref() == Some(c.as_str())
                    && cur_digest.as_ref() == Some(&res.digest)
                {
                    seen.remove(c.as_str());
                    return Ok(PolicyChoice::Keep);
                }
                let first_seen = match seen.get(c.as_str()) {
                    Some(s) if s.digest == res.digest => s.first_seen,
                    _ => now,
                };
                if !has_image || now - first_seen >= min_age {
                    seen.remove(c.as_str());
                    return Ok(PolicyChoice::Move(c.clone(), r, Box::new(res)));
                }
                seen.insert(
                    c.clone(),
                    crate::model::Seen {
                        digest: res.digest.clone(),
                        first_seen,
                    },
                );
            }
            Ok(PolicyChoice::Keep)
        }
        .await;
        let err = decided.as_ref().err().cloned();
        let details = match &decided {
            Ok(PolicyChoice::Move(_, r, res)) => {
                let image_spec = TagSpec::new(TagFrom::Image(r.to_string()));
                let res = Ok((r.clone(), (**res).clone()));
                self.explain(tag, &image_spec, &res, loaded.as_ref()).await
            }
            _ => None,
        };
        let stream = self
            .mutate_from(
                &tag.stream,
                true,
                Scope::Tags(vec![tag.tag.clone()]),
                loaded,
                |s| {
                    if set_spec {
                        s.set_spec(&tag.tag, spec.clone());
                    }
                    let generation = s.generation;
                    let Some(t) = s.tags.get_mut(&tag.tag) else {
                        return Ok(());
                    };
                    if &t.spec != spec {
                        return Ok(()); // re-specced meanwhile: this answer is stale
                    }
                    t.seen = seen.clone();
                    match &decided {
                        Ok(PolicyChoice::Move(source, r, res)) => {
                            let changed = t.record(HistoryEntry {
                                digest: res.digest.clone(),
                                image: r.pull_spec(&res.digest),
                                created: now,
                                generation: t.spec_generation,
                                cause,
                                id: new_id(),
                                media_type: res.media_type.clone(),
                                platforms: res.platforms.clone(),
                                details: details.clone(),
                                source_tag: Some(source.clone()),
                            });
                            if !changed {
                                t.succeed();
                            }
                            t.source_tag = Some(source.clone());
                        }
                        Ok(PolicyChoice::Keep) => {
                            t.succeed();
                        }
                        Err(e) => {
                            t.fail(e.reason(), &e.to_string(), now, generation);
                        }
                    }
                    Ok(())
                },
            )
            .await?;
        Ok((stream, err))
    }

    /// The details of an image about to become current (SPEC 10): fetched only when the
    /// registry answered a digest other than the tag's current one, within a few seconds;
    /// anything that goes wrong leaves them out (logged) and the change goes on without them.
    async fn explain(
        &self,
        tag: &StreamTagRef,
        spec: &TagSpec,
        result: &Result<(ImageRef, Resolved), RegistryError>,
        loaded: Option<&Loaded>,
    ) -> Option<Details> {
        const FETCH_WITHIN: std::time::Duration = std::time::Duration::from_secs(3);
        let Ok((r, res)) = result else { return None };
        if res.unchanged || !self.registry.fetch_details(&r.registry) {
            return None;
        }
        let previous = match loaded {
            // The caller's read of the tag: not read again.
            Some(l) => l.doc.tags.get(&tag.tag).and_then(|t| t.current().cloned()),
            None => self
                .store
                .load(&tag.stream.key(), Scope::Tags(vec![tag.tag.clone()]))
                .await
                .ok()
                .flatten()
                .and_then(|l| l.doc.tags.get(&tag.tag).and_then(|t| t.current().cloned())),
        };
        if previous.as_ref().is_some_and(|p| p.digest == res.digest) {
            return None;
        }
        let fetch = self.registry.details(
            r,
            &res.digest,
            res.manifest.as_deref(),
            spec.platform.as_deref(),
            spec.insecure,
        );
        let mut d = match tokio::time::timeout(FETCH_WITHIN, fetch).await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                tracing::warn!(tag = %tag, error = %e, "image details not fetched; the change is recorded without them");
                return None;
            }
            Err(_) => {
                tracing::warn!(tag = %tag, "image details not fetched within 3 s; the change is recorded without them");
                return None;
            }
        };
        tracing::debug!(tag = %tag, digest = res.digest.as_str(), "image details fetched");
        if let Some(prev) = previous.as_ref().and_then(|p| p.details.as_ref()) {
            d.compare_layers(&prev.layers);
        }
        d.set_compare_url(
            previous.as_ref().and_then(|p| p.details.as_ref()),
            &self.forges,
        );
        Some(d)
    }

    /// Resolves an external reference for a tag spec, listing platforms when asked to.
    pub async fn resolve(
        &self,
        spec: &TagSpec,
        known: Option<&Digest>,
    ) -> Result<(ImageRef, Resolved), RegistryError> {
        self.resolve_with(spec, known, false).await
    }

    /// `resolve`; `read_manifest`: GET at once (a push the registry announced, details on),
    /// saving the HEAD that would only say the digest changed.
    async fn resolve_with(
        &self,
        spec: &TagSpec,
        known: Option<&Digest>,
        read_manifest: bool,
    ) -> Result<(ImageRef, Resolved), RegistryError> {
        let r = match &spec.from {
            TagFrom::Image(s) => ImageRef::parse(s).map_err(|e| RegistryError::Unsupported {
                what: s.clone(),
                detail: e.why,
            })?,
            other => {
                return Err(RegistryError::Unsupported {
                    what: other.name().to_string(),
                    detail: "not an external image".into(),
                });
            }
        };
        let opts = Options {
            insecure: spec.insecure,
            platform: spec.platform.as_deref(),
            known,
            want_platforms: known.is_none(),
            read_manifest: read_manifest
                && spec.platform.is_none()
                && self.registry.fetch_details(&r.registry),
        };
        let res = self.registry.resolve(&r, opts).await;
        crate::metrics::registry_check(&r.registry, res.as_ref().err().map(|e| e.reason()));
        res.map(|x| (r, x))
    }

    /// Records the result of resolving `tag`'s external image, unless its spec changed since.
    /// `loaded`: the stream as the caller loaded it for this tag, if it did (it is not read
    /// again for the details comparison, and the change starts from it).
    pub async fn record_import(
        &self,
        tag: &StreamTagRef,
        spec: &TagSpec,
        result: Result<(ImageRef, Resolved), RegistryError>,
        cause: Cause,
        create: bool,
        loaded: Option<Loaded>,
    ) -> Result<(ImageStream, Option<RegistryError>), CoreError> {
        let err = result.as_ref().err().cloned();
        let details = self.explain(tag, spec, &result, loaded.as_ref()).await;
        let stream = self
            .mutate_from(
                &tag.stream,
                create,
                Scope::Tags(vec![tag.tag.clone()]),
                loaded,
                |s| {
                    apply_result(s, &tag.tag, spec, &result, cause, details.as_ref());
                    Ok(())
                },
            )
            .await?;
        Ok((stream, err))
    }

    /// `import-image`: creates or updates the tag's spec from `--from`, then imports it.
    pub async fn import_image(&self, req: &ImportRequest) -> Result<Vec<Outcome>, CoreError> {
        let tag = StreamTagRef::parse(&req.name, &req.namespace)?;
        if let Some(p) = &req.platform {
            crate::config::check_platform(p).map_err(CoreError::BadRequest)?;
        }
        // `--all` without `--from` re-imports every tag; otherwise one tag is all it needs.
        let scope = if req.all && req.from.is_none() {
            Scope::Heads
        } else {
            Scope::Tags(vec![tag.tag.clone()])
        };
        let existing = self
            .store
            .load(&tag.stream.key(), scope)
            .await?
            .map(|l| l.doc);
        if existing.is_none() && !req.confirm {
            return Err(CoreError::NotFound(format!(
                "image stream {} does not exist; pass --confirm to create it",
                tag.stream
            )));
        }
        if req.all {
            return self.import_all(&tag, req, existing.as_ref()).await;
        }
        let spec = match (
            &req.from,
            existing.as_ref().and_then(|s| s.tags.get(&tag.tag)),
        ) {
            (Some(from), old) => {
                ImageRef::parse(from)?;
                let old = old.map(|t| &t.spec);
                TagSpec {
                    from: TagFrom::Image(from.clone()),
                    alias: false,
                    scheduled: req.scheduled || old.is_some_and(|o| o.scheduled),
                    schedule: old.and_then(|o| o.schedule.clone()),
                    insecure: req.insecure || old.is_some_and(|o| o.insecure),
                    platform: req
                        .platform
                        .clone()
                        .or_else(|| old.and_then(|o| o.platform.clone())),
                }
            }
            (None, Some(t)) if matches!(t.spec.from, TagFrom::Policy(_)) => {
                let (_, error) = self
                    .check_policy(&tag, &t.spec, Cause::Import, false)
                    .await?;
                return Ok(vec![Outcome { tag, error }]);
            }
            (None, Some(t)) => {
                let TagFrom::Image(_) = &t.spec.from else {
                    return Err(CoreError::BadRequest(format!(
                        "tag {tag} comes from {} {}, not from an external image; nothing to import",
                        t.spec.from.kind(),
                        t.spec.from.name()
                    )));
                };
                let mut s = t.spec.clone();
                s.scheduled |= req.scheduled;
                s.insecure |= req.insecure;
                if req.platform.is_some() {
                    s.platform = req.platform.clone();
                }
                s
            }
            (None, None) => {
                return Err(CoreError::NotFound(format!(
                    "tag {tag} does not exist; pass --from=<image> to import it"
                )));
            }
        };
        let outcome = self.set_and_import(&tag, spec, Cause::Import).await?;
        Ok(vec![outcome])
    }

    /// Sets a tag's spec to an external image and imports it, recording the result.
    async fn set_and_import(
        &self,
        tag: &StreamTagRef,
        spec: TagSpec,
        cause: Cause,
    ) -> Result<Outcome, CoreError> {
        // Resolve first, then set the spec and record the image in one change: concurrent
        // `tag` commands for one tag are then each recorded, in the order they commit.
        let result = self.resolve(&spec, None).await;
        let err = result.as_ref().err().cloned();
        let details = self.explain(tag, &spec, &result, None).await;
        self.mutate(&tag.stream, true, Scope::Tags(vec![tag.tag.clone()]), |s| {
            s.set_spec(&tag.tag, spec.clone());
            apply_result(s, &tag.tag, &spec, &result, cause, details.as_ref());
            Ok(())
        })
        .await?;
        Ok(Outcome {
            tag: tag.clone(),
            error: err,
        })
    }

    async fn import_all(
        &self,
        tag: &StreamTagRef,
        req: &ImportRequest,
        existing: Option<&ImageStream>,
    ) -> Result<Vec<Outcome>, CoreError> {
        let mut outcomes = Vec::new();
        let report = |p: Progress| {
            if let Some(tx) = &req.progress {
                let _ = tx.send(p);
            }
        };
        let Some(from) = &req.from else {
            // Re-import every tag of the stream that comes from an external image.
            let s = existing.ok_or_else(|| {
                CoreError::NotFound(format!("image stream {} not found", tag.stream))
            })?;
            let imported: Vec<(&String, &crate::model::Tag)> = s
                .tags
                .iter()
                .filter(|(_, t)| matches!(t.spec.from, TagFrom::Image(_)))
                .collect();
            report(Progress::Total(imported.len()));
            for (name, t) in imported {
                let tr = StreamTagRef::new(tag.stream.clone(), name)?;
                let result = self.resolve(&t.spec, None).await;
                let (_, err) = self
                    .record_import(&tr, &t.spec, result, Cause::Import, false, None)
                    .await?;
                let o = Outcome {
                    tag: tr,
                    error: err,
                };
                report(Progress::Done(o.clone()));
                outcomes.push(o);
            }
            return Ok(outcomes);
        };
        let base = ImageRef::parse(from)?;
        let mut tags = match self.registry.list_tags(&base, req.insecure).await {
            Ok(t) => t,
            Err(e) => {
                return Ok(vec![Outcome {
                    tag: tag.clone(),
                    error: Some(e),
                }]);
            }
        };
        sort_tags_for_import(&mut tags);
        tags.truncate(self.max_import_all);
        report(Progress::Total(tags.len()));
        for t in tags {
            let tr = StreamTagRef::new(tag.stream.clone(), &t)?;
            let spec = TagSpec {
                scheduled: req.scheduled,
                insecure: req.insecure,
                platform: req.platform.clone(),
                ..TagSpec::new(TagFrom::Image(base.with_tag(&t).to_string()))
            };
            let o = self.set_and_import(&tr, spec, Cause::Import).await?;
            report(Progress::Done(o.clone()));
            outcomes.push(o);
        }
        Ok(outcomes)
    }

    /// `tag SOURCE DEST...`
    pub async fn tag(&self, req: &TagRequest) -> Result<Vec<Outcome>, CoreError> {
        if req.dests.is_empty() {
            return Err(CoreError::BadRequest(
                "tag needs at least one destination".into(),
            ));
        }
        let dests = req
            .dests
            .iter()
            .map(|d| StreamTagRef::parse(d, &req.namespace))
            .collect::<Result<Vec<_>, _>>()?;
        let kind = req
            .source_kind
            .unwrap_or_else(|| infer_source_kind(&req.source));
        if kind != SourceKind::Docker && (req.scheduled || req.insecure || req.platform.is_some()) {
            return Err(CoreError::BadRequest(
                "--scheduled, --insecure and --platform apply only to external images".into(),
            ));
        }
        if req.alias && kind != SourceKind::Istag {
            return Err(CoreError::BadRequest(
                "--alias needs a stream tag as the source".into(),
            ));
        }
        if let Some(p) = &req.platform {
            crate::config::check_platform(p).map_err(CoreError::BadRequest)?;
        }
        if let Some(policy) = &req.policy {
            // `tag REPOSITORY DEST --policy=...`: the source names the repository.
            let policy = crate::model::PolicySpec {
                repository: req.source.clone(),
                ..policy.clone()
            };
            crate::policy::Policy::compile(&policy)
                .map_err(|(k, e)| CoreError::BadRequest(format!("policy {k}: {e}")))?;
            let spec = TagSpec {
                scheduled: req.scheduled,
                insecure: req.insecure,
                platform: req.platform.clone(),
                ..TagSpec::new(TagFrom::Policy(policy))
            };
            let mut outcomes = Vec::new();
            for d in &dests {
                let (_, error) = self.check_policy(d, &spec, Cause::Tag, true).await?;
                outcomes.push(Outcome {
                    tag: d.clone(),
                    error,
                });
            }
            return Ok(outcomes);
        }
        match kind {
            SourceKind::Docker => {
                ImageRef::parse(&req.source)?;
                let mut outcomes = Vec::new();
                for d in &dests {
                    let spec = TagSpec {
                        scheduled: req.scheduled,
                        insecure: req.insecure,
                        platform: req.platform.clone(),
                        ..TagSpec::new(TagFrom::Image(req.source.clone()))
                    };
                    let existing = self
                        .store
                        .load(&d.stream.key(), Scope::Tags(vec![d.tag.clone()]))
                        .await?;
                    let spec = match existing.as_ref().and_then(|l| l.doc.tags.get(&d.tag)) {
                        // keep a custom schedule set in config across CLI re-tagging
                        Some(t) if t.spec.from == spec.from && spec.scheduled => TagSpec {
                            schedule: t.spec.schedule.clone(),
                            ..spec
                        },
                        _ => spec,
                    };
                    outcomes.push(self.set_and_import(d, spec, Cause::Tag).await?);
                }
                Ok(outcomes)
            }
            SourceKind::Istag => {
                let src = StreamTagRef::parse(&req.source, &req.namespace)?;
                let src_stream = self
                    .store
                    .load(&src.stream.key(), Scope::Tags(vec![src.tag.clone()]))
                    .await?
                    .ok_or_else(|| {
                        CoreError::NotFound(format!("image stream {} not found", src.stream))
                    })?
                    .doc;
                let src_tag = src_stream
                    .tags
                    .get(&src.tag)
                    .ok_or_else(|| CoreError::NotFound(format!("stream tag {src} not found")))?;
                if !req.alias && src_tag.current().is_none() {
                    return Err(CoreError::BadRequest(format!(
                        "stream tag {src} has no image yet; nothing to copy (use --alias to follow it)"
                    )));
                }
                for d in &dests {
                    if req.alias && d.stream != src.stream {
                        return Err(CoreError::BadRequest(format!(
                            "--alias works only within one stream: {src} and {d} are in different streams"
                        )));
                    }
                    if *d == src {
                        return Err(CoreError::BadRequest(format!(
                            "cannot tag {src} onto itself"
                        )));
                    }
                }
                let mut outcomes = Vec::new();
                for d in &dests {
                    let from = if d.stream == src.stream {
                        TagFrom::Tag(src.tag.clone())
                    } else {
                        TagFrom::Tag(src.to_string())
                    };
                    let spec = TagSpec {
                        alias: req.alias,
                        ..TagSpec::new(from)
                    };
                    let src_tag_name = src.tag.clone();
                    let same_stream = d.stream == src.stream;
                    let entry = src_tag.current().cloned();
                    let mut scope = vec![d.tag.clone()];
                    if same_stream {
                        scope.push(src_tag_name.clone());
                    }
                    self.mutate(&d.stream, true, Scope::Tags(scope), |s| {
                        if req.alias && alias_cycle(s, &d.tag, &src_tag_name) {
                            return Err(CoreError::BadRequest(format!(
                                "aliasing {d} to {src} would make a cycle of aliases"
                            )));
                        }
                        // Within one stream take the source's image as it is now in this
                        // document (it may have moved since the read above).
                        let entry = if same_stream {
                            s.tags.get(&src_tag_name).and_then(|t| t.current().cloned())
                        } else {
                            entry.clone()
                        };
                        let t = s.set_spec(&d.tag, spec.clone());
                        if let Some(e) = entry {
                            t.record(HistoryEntry {
                                created: now(),
                                generation: t.spec_generation,
                                cause: Cause::Tag,
                                id: new_id(),
                                ..e
                            });
                        }
                        Ok(())
                    })
                    .await?;
                    outcomes.push(Outcome {
                        tag: d.clone(),
                        error: None,
                    });
                }
                Ok(outcomes)
            }
            SourceKind::Isimage => {
                let src = StreamImageRef::parse(&req.source, &req.namespace)?;
                let src_stream = self.get_stream(&src.stream).await?;
                let entry = src_stream
                    .find_image(&src.digest_prefix)
                    .map_err(CoreError::NotFound)?
                    .clone();
                let mut outcomes = Vec::new();
                for d in &dests {
                    let spec =
                        TagSpec::new(TagFrom::Digest(format!("{}@{}", src.stream, entry.digest)));
                    let entry = entry.clone();
                    self.mutate(&d.stream, true, Scope::Tags(vec![d.tag.clone()]), |s| {
                        let t = s.set_spec(&d.tag, spec.clone());
                        t.record(HistoryEntry {
                            created: now(),
                            generation: t.spec_generation,
                            cause: Cause::Rollback,
                            id: new_id(),
                            ..entry.clone()
                        });
                        Ok(())
                    })
                    .await?;
                    outcomes.push(Outcome {
                        tag: d.clone(),
                        error: None,
                    });
                }
                Ok(outcomes)
            }
        }
    }

    /// `tag -d`: removes tags and their history.
    pub async fn delete_tags(
        &self,
        namespace: &str,
        dests: &[String],
    ) -> Result<Vec<StreamTagRef>, CoreError> {
        let mut out = Vec::new();
        for d in dests {
            let t = StreamTagRef::parse(d, namespace)?;
            self.mutate(&t.stream, false, Scope::Tags(vec![t.tag.clone()]), |s| {
                if s.tags.remove(&t.tag).is_none() {
                    return Err(CoreError::NotFound(format!("stream tag {t} not found")));
                }
                Ok(())
            })
            .await
            .map_err(|e| match e {
                CoreError::NotFound(_) => CoreError::NotFound(format!("stream tag {t} not found")),
                e => e,
            })?;
            out.push(t);
        }
        Ok(out)
    }

    /// Deletes a whole stream (API `DELETE /streams/{ns}/{name}`).
    pub async fn delete_stream(&self, name: &StreamName) -> Result<(), CoreError> {
        let mut tries = crate::retry::CasLoop::new(20);
        while tries.next().await {
            let Some((doc, rev)) = self.store.get(&name.key()).await? else {
                return Err(CoreError::NotFound(format!(
                    "image stream {name} not found"
                )));
            };
            let events = self.diff_events(Some(&doc), None);
            match self
                .store
                .commit(Commit {
                    key: name.key(),
                    expected_rev: Some(rev),
                    doc: None,
                    events: events.clone(),
                    ..Default::default()
                })
                .await
            {
                Ok(_) => {
                    self.announce(&name.key(), events, true, false);
                    return Ok(());
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(CoreError::Conflict(format!(
            "image stream {name} kept changing concurrently"
        )))
    }

    /// Applies the streams declared in `triggers.toml` (`kubectl apply` rule): a declared tag
    /// is created, or its spec replaced when its declaration changed since last applied.
    /// Returns the tags that need an import (new or changed declarations from an image).
    pub async fn apply_declared(
        &self,
        declared: &[DeclaredStream],
    ) -> Result<Vec<(StreamTagRef, TagSpec)>, CoreError> {
        /// Declared tags applied per change: a stream declared with thousands of tags is
        /// applied a part at a time (each part a change of its own, and a restart re-applies
        /// whatever a crash left undone), never loaded or written whole.
        const PART: usize = 256;
        let mut to_import = Vec::new();
        for ds in declared {
            let mut changed: Vec<(StreamTagRef, TagSpec)> = Vec::new();
            for part in ds.tags.chunks(PART) {
                let names = part.iter().map(|dt| dt.name.clone()).collect();
                let stream = self
                    .mutate(&ds.name, true, Scope::Tags(names), |s| {
                        for dt in part {
                            let current = s.tags.get(&dt.name);
                            if current.is_some_and(|t| t.declared.as_deref() == Some(&dt.hash)) {
                                continue;
                            }
                            let t = s.set_spec(&dt.name, dt.spec.clone());
                            t.declared = Some(dt.hash.clone());
                        }
                        // Declared copies and pins take their image now.
                        for dt in part {
                            resolve_local_spec(s, &dt.name);
                        }
                        Ok(())
                    })
                    .await;
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(stream = %ds.name, error = %e, "cannot apply declared stream");
                        break;
                    }
                };
                for dt in part {
                    if let Some(t) = stream.tags.get(&dt.name)
                        && matches!(t.spec.from, TagFrom::Image(_) | TagFrom::Policy(_))
                        && t.declared.as_deref() == Some(&dt.hash)
                    {
                        let imported_at_gen = t.history.first().map(|h| h.generation).unwrap_or(-1);
                        let failed_at_gen = t.import_error().map(|c| c.generation).unwrap_or(-1);
                        if imported_at_gen < t.spec_generation && failed_at_gen < t.spec_generation
                        {
                            changed.push((
                                StreamTagRef::new(ds.name.clone(), &dt.name)?,
                                t.spec.clone(),
                            ));
                        }
                    }
                }
            }
            to_import.extend(changed);
        }
        Ok(to_import)
    }

    /// Imports a set of tags, as after `apply_declared`: concurrently, so start-up takes as
    /// long as the registries' budgets allow (each host's request rate and concurrency still
    /// bound what reaches it), whether the tags are in one stream or many.
    pub async fn import_specs(&self, tags: Vec<(StreamTagRef, TagSpec)>) {
        use futures_util::StreamExt as _;
        /// Imports in flight at once; the per-host budgets queue the rest of the work.
        const AT_ONCE: usize = 64;
        // Both stores keep tags apart, so every tag is its own import, whatever its stream.
        futures_util::stream::iter(tags)
            .for_each_concurrent(AT_ONCE, |(tag, spec)| async move {
                let done = if matches!(spec.from, TagFrom::Policy(_)) {
                    self.check_policy(&tag, &spec, Cause::Import, false).await
                } else {
                    let result = self.resolve(&spec, None).await;
                    self.record_import(&tag, &spec, result, Cause::Import, false, None)
                        .await
                };
                if let Err(e) = done {
                    tracing::error!(tag = %tag, error = %e, "cannot record import");
                }
            })
            .await;
    }

    /// A push announced by a registry: every tag tracking `registry/repo:tag` (every tracked
    /// tag of the repository when `tag` is empty) is re-checked (the notification is a hint)
    /// and moved with cause `push`. A failed re-check records nothing: the registry may not
    /// have linked the tag yet, and a push that succeeded must never leave
    /// `ImportSuccess=False` (the caller looks again). `create_in` (an internal registry) gets
    /// a tag only once the re-check found the image. Returns the tags checked with the digest
    /// the registry answered (None: the re-check failed).
    pub async fn pushed(
        &self,
        registry: &str,
        repository: &str,
        tag: &str,
        create_in: Option<StreamTagRef>,
    ) -> Result<Vec<(StreamTagRef, Option<Digest>)>, CoreError> {
        let mut targets: Vec<(StreamTagRef, TagSpec, Loaded)> = Vec::new();
        let wanted = format!("{registry}/{repository}:{tag}");
        // Policy tags of the repository re-evaluate on any push to it.
        let mut done = Vec::new();
        // The index may hold stale extras: each tag must still follow what was pushed.
        for (st, l) in self
            .load_tracking(&format!("{registry}/{repository}:*"), false)
            .await?
        {
            if let Some(t) = l.doc.tags.get(&st.tag)
                && let TagFrom::Policy(p) = &t.spec.from
                && ImageRef::parse(&p.repository)
                    .is_ok_and(|r| r.registry == registry && r.repository == repository)
            {
                let (stream, err) = self.check_policy(&st, &t.spec, Cause::Push, false).await?;
                let seen = if err.is_some() {
                    None
                } else {
                    stream
                        .tags
                        .get(&st.tag)
                        .and_then(|t| t.current_digest().cloned())
                };
                done.push((st, seen));
            }
        }
        for (st, l) in self.load_tracking(&wanted, tag.is_empty()).await? {
            if let Some(t) = l.doc.tags.get(&st.tag)
                && let TagFrom::Image(r) = &t.spec.from
                && let Ok(r) = ImageRef::parse(r)
                && r.registry == registry
                && r.repository == repository
                && r.digest.is_none()
                && (tag.is_empty() || r.tag.as_deref() == Some(tag))
            {
                targets.push((st, t.spec.clone(), l));
            }
        }
        // The loaded stream goes with its tag: the change starts from it (no second read).
        targets.sort_by(|a, b| a.0.cmp(&b.0));
        targets.dedup_by(|a, b| a.0 == b.0);
        if targets.is_empty()
            && done.is_empty()
            && !tag.is_empty()
            && let Some(dest) = create_in
        {
            let spec = TagSpec::new(TagFrom::Image(wanted.clone()));
            let result = self.resolve_with(&spec, None, true).await;
            let seen = result.as_ref().ok().map(|(_, r)| r.digest.clone());
            if result.is_ok() {
                let details = self.explain(&dest, &spec, &result, None).await;
                self.mutate(
                    &dest.stream,
                    true,
                    Scope::Tags(vec![dest.tag.clone()]),
                    |s| {
                        if !s.tags.contains_key(&dest.tag) {
                            s.set_spec(&dest.tag, spec.clone());
                            apply_result(
                                s,
                                &dest.tag,
                                &spec,
                                &result,
                                Cause::Push,
                                details.as_ref(),
                            );
                        }
                        Ok(())
                    },
                )
                .await?;
            }
            done.push((dest, seen));
            return Ok(done);
        }
        for (t, spec, loaded) in targets {
            let result = self.resolve_with(&spec, None, true).await;
            let seen = result.as_ref().ok().map(|(_, r)| r.digest.clone());
            if result.is_ok() {
                self.record_import(&t, &spec, result, Cause::Push, false, Some(loaded))
                    .await?;
            }
            done.push((t, seen));
        }
        Ok(done)
    }
}

/// Fills tags that copy or pin from within the stream and have no image yet.
fn resolve_local_spec(s: &mut ImageStream, tag: &str) {
    let Some(t) = s.tags.get(tag) else { return };
    if t.current().is_some() {
        return;
    }
    let entry = match &t.spec.from {
        TagFrom::Tag(src) if !src.contains(':') => {
            s.tags.get(src).and_then(|x| x.current().cloned())
        }
        TagFrom::Digest(d) => d
            .split_once('@')
            .and_then(|(_, dg)| s.find_image(dg).ok().cloned()),
        _ => None,
    };
    if let (Some(e), Some(t)) = (entry, s.tags.get_mut(tag)) {
        t.record(HistoryEntry {
            created: now(),
            generation: t.spec_generation,
            cause: Cause::Tag,
            id: new_id(),
            ..e
        });
    }
}

/// Whether making `dest` an alias of `src` would close a loop.
fn alias_cycle(s: &ImageStream, dest: &str, src: &str) -> bool {
    let mut cur = src.to_string();
    let mut seen = BTreeSet::new();
    loop {
        if cur == dest {
            return true;
        }
        if !seen.insert(cur.clone()) {
            return true;
        }
        match s.tags.get(&cur) {
            Some(t) if t.spec.alias => match &t.spec.from {
                TagFrom::Tag(next) => cur = next.clone(),
                _ => return false,
            },
            _ => return false,
        }
    }
}

/// Gives every alias the current image of its source when the source changed.
fn propagate_aliases(before: Option<&ImageStream>, after: &mut ImageStream) {
    let changed: Vec<String> = after
        .tags
        .iter()
        .filter(|(name, t)| {
            let old = before
                .and_then(|b| b.tags.get(*name))
                .and_then(|o| o.current_digest());
            t.current_digest().is_some() && t.current_digest() != old
        })
        .map(|(n, _)| n.clone())
        .collect();
    let mut done: BTreeMap<String, ()> = BTreeMap::new();
    for src in changed {
        for alias in after.aliases_of(&src) {
            if done.contains_key(&alias) {
                continue;
            }
            // The alias's own source (which may itself be an alias) has its image by now,
            // because aliases_of walks the chain outward.
            let TagFrom::Tag(direct) = after.tags[&alias].spec.from.clone() else {
                continue;
            };
            let Some(entry) = after.tags.get(&direct).and_then(|t| t.current().cloned()) else {
                continue;
            };
            let t = after.tags.get_mut(&alias).expect("alias exists");
            if t.current_digest() == Some(&entry.digest) {
                continue;
            }
            t.record(HistoryEntry {
                generation: t.spec_generation,
                id: new_id(),
                ..entry
            });
            done.insert(alias, ());
        }
    }
}

pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// `oc tag` source inference: registry host → external; `@` → stream image; `name:tag` →
/// stream tag; otherwise external image.
pub fn infer_source_kind(source: &str) -> SourceKind {
    let first = source.split('/').next().unwrap_or("");
    let has_registry = source.contains('/')
        && (first.contains('.') || first.contains(':') || first == "localhost");
    if has_registry {
        SourceKind::Docker
    } else if source.contains('@') {
        SourceKind::Isimage
    } else if source.contains(':') {
        SourceKind::Istag
    } else {
        SourceKind::Docker
    }
}

/// `latest` first, then version-like tags by version descending, then the rest by name.
pub fn sort_tags_for_import(tags: &mut [String]) {
    fn version(t: &str) -> Option<Vec<u64>> {
        let t = t.strip_prefix('v').unwrap_or(t);
        let parts: Option<Vec<u64>> = t.split(['.', '-', '_']).map(|p| p.parse().ok()).collect();
        parts.filter(|p| !p.is_empty())
    }
    tags.sort_by(|a, b| {
        let rank = |t: &str| {
            if t == "latest" {
                0
            } else if version(t).is_some() {
                1
            } else {
                2
            }
        };
        rank(a)
            .cmp(&rank(b))
            .then_with(|| match (version(a), version(b)) {
                (Some(va), Some(vb)) => vb.cmp(&va),
                _ => a.cmp(b),
            })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_kinds() {
        assert_eq!(
            infer_source_kind("127.0.0.1:5000/centos/python"),
            SourceKind::Docker
        );
        assert_eq!(
            infer_source_kind("docker.io/library/python:3.6"),
            SourceKind::Docker
        );
        assert_eq!(infer_source_kind("python@sha256:abc"), SourceKind::Isimage);
        assert_eq!(infer_source_kind("python:3.6"), SourceKind::Istag);
        assert_eq!(infer_source_kind("centos/python"), SourceKind::Docker);
    }

    #[test]
    fn import_all_order() {
        let mut t: Vec<String> = ["a", "1.2", "latest", "1.10", "2", "beta"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        sort_tags_for_import(&mut t);
        assert_eq!(t, vec!["latest", "2", "1.10", "1.2", "a", "beta"]);
    }
}
