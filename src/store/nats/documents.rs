//! The documents: each image stream as a head in `<S>_STREAMS` (with its outbox and the tag
//! writes of its latest changes), each tag as a record in `<S>_TAGS`, each history entry in
//! `<S>_HISTORY`; commit by compare-and-set of the head, publication, listing; push hints in
//! `<S>_HINTS`.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};

use super::*;
use crate::model::{HistoryEntry, Tag, TagFrom};
use crate::store::{Loaded, Scope};

/// A head (mostly its unpublished events) stays well inside NATS's default 1 MiB message limit.
const MAX_HEAD_BYTES: usize = 768 * 1024;

/// Marks a schema-2 head; a schema-1 entry (a whole document) has no `v`.
pub(super) const HEAD_V: u32 = 2;

/// One `<S>_STREAMS` entry.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Head {
    pub v: u32,
    /// None: a tombstone, kept until its outbox is published.
    pub meta: Option<Meta>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbox: Vec<Event>,
    /// The tag writes committed with this head, which may not all be applied to `<S>_TAGS` and
    /// `<S>_HISTORY` yet (a crash right after the head's write): whoever reads the stream or
    /// writes the head next applies them first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<Pending>,
    /// Same-stream links: tag → the tags whose spec copies or follows it (a change loads them
    /// with it, as aliases follow their source).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub links: BTreeMap<String, BTreeSet<String>>,
    /// Changes too big for the head (their tag writes and events), in `<S>_SPILL` chunks,
    /// until their events are published.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spill: Vec<Spill>,
}

/// A change kept in `<S>_SPILL`, keys `<stream>.<id>.<n>` for `n` in `0..chunks`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spill {
    pub id: String,
    pub chunks: u32,
    pub events: u32,
}

/// One `<S>_SPILL` entry.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct SpillChunk {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<Pending>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Event>,
}

/// The stream's own record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    pub created: DateTime<Utc>,
    /// The stream's revision: moves when the record itself changes, not when a tag does, so
    /// changes of different tags commit side by side.
    pub rev: i64,
}

/// One tag's write in a change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    pub tag: String,
    /// The record's revision before the write (0: absent); the write is a compare-and-set on
    /// it, so it lands once, and never over a later one.
    pub base: u64,
    /// The record after the write; None deletes the tag and its history.
    pub record: Option<TagRecord>,
    /// History entries written: (seq, entry).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<(u64, HistoryEntry)>,
    /// History seqs dropped by retention: `from..to`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop: Option<(u64, u64)>,
}

/// One `<S>_TAGS` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TagRecord {
    pub name: String,
    /// The tag with its two newest history entries (events and deliveries name the previous
    /// image); the others live in `<S>_HISTORY` only.
    pub tag: Tag,
    /// Names this tag's history entries apart from those of an earlier tag of the same name.
    pub inc: String,
    /// History seqs held: `lo..=hi` (none when `hi < lo`).
    pub lo: u64,
    pub hi: u64,
}

/// A key-value token for any name: `[A-Za-z0-9_/-]` as they are, every other byte as `=XX`,
/// so a stream or tag name is one token of a key and a prefix selects exactly its records.
pub(super) fn token(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'/' {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

pub(super) fn tag_key(stream: &str, tag: &str) -> String {
    format!("{}.{}", token(stream), token(tag))
}

pub(super) fn history_key(stream: &str, tag: &str, inc: &str, seq: u64) -> String {
    format!("{}.{}.{inc}.{seq}", token(stream), token(tag))
}

/// The same-stream tag a spec copies or follows.
pub(super) fn same_stream_source(t: &Tag) -> Option<&str> {
    match &t.spec.from {
        TagFrom::Tag(src) if !src.contains(':') => Some(src),
        _ => None,
    }
}

pub(super) fn recent(t: &Tag) -> Tag {
    Tag {
        history: t.history.iter().take(2).cloned().collect(),
        ..t.clone()
    }
}

/// A fresh incarnation name for a tag's history keys.
pub(super) fn new_inc() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

impl Meta {
    pub(super) fn of(doc: &ImageStream, rev: i64) -> Meta {
        Meta {
            namespace: doc.namespace.clone(),
            name: doc.name.clone(),
            generation: doc.generation,
            created: doc.created,
            rev,
        }
    }

    fn stream(&self) -> ImageStream {
        ImageStream {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            generation: self.generation,
            created: self.created,
            tags: Default::default(),
        }
    }
}

/// Reads one entry: (raw revision, value) with delete markers as revision and no value.
pub(super) async fn entry(
    kv: &kv::Store,
    key: &str,
    what: &str,
) -> Result<(u64, Option<Bytes>), StoreError> {
    match kv.entry(key).await {
        Ok(Some(e)) if e.operation == kv::Operation::Put => Ok((e.revision, Some(e.value))),
        Ok(Some(e)) => Ok((e.revision, None)),
        Ok(None) => Ok((0, None)),
        Err(e) => Err(backend(&format!("read of {what}"), e)),
    }
}

/// Every live entry whose key matches `pattern` (wildcards allowed), with its revision: one
/// ordered consumer over the bucket's stream, ended when it has delivered all.
pub(super) async fn scan(
    kv: &kv::Store,
    pattern: &str,
    what: &str,
) -> Result<Vec<(String, u64, Bytes)>, StoreError> {
    let mut out = Vec::new();
    let mut scan = Scan::open(kv, pattern, what).await?;
    while let Some(e) = scan.next().await? {
        out.push(e);
    }
    Ok(out)
}

/// `scan` an entry at a time, for readers that must not hold every entry at once.
pub(super) struct Scan<'a> {
    kv: &'a kv::Store,
    what: &'a str,
    msgs: Option<jetstream::consumer::pull::Ordered>,
}

impl<'a> Scan<'a> {
    pub(super) async fn open(
        kv: &'a kv::Store,
        pattern: &str,
        what: &'a str,
    ) -> Result<Scan<'a>, StoreError> {
        use jetstream::consumer::{DeliverPolicy, pull};
        let err = |e: &dyn std::fmt::Display| backend(&format!("listing of {what}"), e);
        let consumer = kv
            .stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: format!("{}{pattern}", kv.prefix),
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(|e| err(&e))?;
        let msgs = if consumer.cached_info().num_pending == 0 {
            None
        } else {
            Some(consumer.messages().await.map_err(|e| err(&e))?)
        };
        Ok(Scan { kv, what, msgs })
    }

    /// The next live entry (key, revision, value), or None when all were delivered.
    pub(super) async fn next(&mut self) -> Result<Option<(String, u64, Bytes)>, StoreError> {
        let what = self.what;
        let err = |e: &dyn std::fmt::Display| backend(&format!("listing of {what}"), e);
        while let Some(msgs) = self.msgs.as_mut() {
            // Ordered delivery on loopback is fast; a scan that stops short of its count saw an
            // entry purged under it, and is failed rather than returned incomplete.
            let next = tokio::time::timeout(Duration::from_secs(10), msgs.next()).await;
            let m = match next {
                Ok(Some(m)) => m.map_err(|e| err(&e))?,
                Ok(None) => {
                    self.msgs = None;
                    break;
                }
                Err(_) => return Err(err(&"no complete answer within 10 s; try again")),
            };
            let info = m.info().map_err(|e| err(&e))?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            if pending == 0 {
                self.msgs = None;
            }
            let deleted = m
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some();
            if !deleted {
                let key = m
                    .subject
                    .strip_prefix(self.kv.prefix.as_str())
                    .unwrap_or(&m.subject)
                    .to_string();
                return Ok(Some((key, seq, m.payload.clone())));
            }
        }
        Ok(None)
    }
}

/// Removes every message of the subjects `pattern` matches, markers too (a dropped history
/// entry or a deleted tag leaves nothing behind).
pub(super) async fn purge(kv: &kv::Store, pattern: &str, what: &str) -> Result<(), StoreError> {
    kv.stream
        .purge()
        .filter(format!("{}{pattern}", kv.prefix))
        .await
        .map(|_| ())
        .map_err(|e| backend(&format!("purge of {what}"), e))
}

fn parse_head(key: &str, value: &[u8]) -> Result<Head, StoreError> {
    let head: Head =
        serde_json::from_slice(value).map_err(|x| corrupt(&format!("image stream {key}"), x))?;
    if head.v != HEAD_V {
        return Err(corrupt(
            &format!("image stream {key}"),
            "an entry of the schema-1 layout (each stream one document) after the upgrade: is a replica of an older release still running?",
        ));
    }
    Ok(head)
}

impl NatsStore {
    /// The stream's head and its revision (the raw revision of a deleted entry, with None).
    async fn head(&self, key: &str) -> Result<(u64, Option<Head>), StoreError> {
        check_key(key)?;
        let (rev, value) = entry(&self.streams, key, key).await?;
        let head = value.map(|v| parse_head(key, &v)).transpose()?;
        let mut heads = lock(&self.heads);
        match &head {
            Some(h) => heads.insert(key.to_string(), (rev, h.clone())),
            None => heads.remove(key),
        };
        Ok((rev, head))
    }

    async fn head_cached(&self, key: &str) -> Result<(u64, Option<Head>), StoreError> {
        if let Some((rev, h)) = lock(&self.heads).get(key) {
            return Ok((*rev, Some(h.clone())));
        }
        self.head(key).await
    }

    fn stream_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = lock(&self.locks);
        if locks.len() > 1024 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(key.to_string()).or_default().clone()
    }

    async fn tag_record(
        &self,
        stream: &str,
        tag: &str,
    ) -> Result<(u64, Option<TagRecord>), StoreError> {
        let what = format!("tag {stream}:{tag}");
        let (rev, value) = entry(&self.tags, &tag_key(stream, tag), &what).await?;
        let rec = value
            .map(|v| serde_json::from_slice::<TagRecord>(&v).map_err(|x| corrupt(&what, x)))
            .transpose()?;
        Ok((rev, rec))
    }

    /// Lands one pending write (idempotent: a write that another applied, or one overtaken by
    /// a later write, changes nothing).
    async fn apply(&self, stream: &str, p: &Pending) -> Result<(), StoreError> {
        let tk = tag_key(stream, &p.tag);
        if lock(&self.applied).contains(&(tk.clone(), p.base)) {
            return Ok(());
        }
        let what = format!("tag {stream}:{}", p.tag);
        if let Some(rec) = &p.record {
            let writes = p.entries.iter().map(|(seq, e)| {
                let key = history_key(stream, &p.tag, &rec.inc, *seq);
                let body = serde_json::to_vec(e).map(Bytes::from);
                let what = &what;
                async move {
                    let body = body.map_err(|e| corrupt("history entry", e))?;
                    self.history
                        .put(&key, body)
                        .await
                        .map_err(|e| backend(&format!("history write of {what}"), e))
                }
            });
            futures_util::future::try_join_all(writes).await?;
            if let Some((from, to)) = p.drop {
                for seq in from..to {
                    let key = history_key(stream, &p.tag, &rec.inc, seq);
                    purge(&self.history, &key, &what).await?;
                }
            }
            let body = serde_json::to_vec(rec).map_err(|e| corrupt(&what, e))?;
            match self.tags.update(&tk, body.into(), p.base).await {
                Ok(_) => {}
                // Applied already (by another replica, or by this one before a retry).
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                Err(e) => return Err(backend(&format!("write of {what}"), e)),
            }
        } else if p.base != 0 {
            match self.tags.delete_expect_revision(&tk, Some(p.base)).await {
                Ok(_) => {}
                Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => {}
                Err(e) => return Err(backend(&format!("delete of {what}"), e)),
            }
            purge(&self.history, &format!("{tk}.>"), &what).await?;
        }
        let mut applied = lock(&self.applied);
        if applied.len() > 65_536 {
            applied.clear();
        }
        applied.insert((tk, p.base));
        Ok(())
    }

    /// Applies the head's pending writes, its spilled ones included.
    async fn settle(&self, stream: &str, head: &Head) -> Result<(), StoreError> {
        for p in &head.pending {
            self.apply(stream, p).await?;
        }
        self.settle_spills(stream, head).await
    }

    /// Applies the tag writes of the head's spilled changes (once per change and replica).
    async fn settle_spills(&self, stream: &str, head: &Head) -> Result<(), StoreError> {
        for sp in &head.spill {
            if lock(&self.spills_applied).contains(&sp.id) {
                continue;
            }
            let (pending, _) = self.spilled(stream, sp).await?;
            for group in pending.chunks(32) {
                futures_util::future::try_join_all(group.iter().map(|p| self.apply(stream, p)))
                    .await?;
            }
            let mut done = lock(&self.spills_applied);
            if done.len() > 4096 {
                done.clear();
            }
            done.insert(sp.id.clone());
        }
        Ok(())
    }

    /// A spilled change's tag writes and events.
    pub async fn spilled(
        &self,
        stream: &str,
        sp: &Spill,
    ) -> Result<(Vec<Pending>, Vec<Event>), StoreError> {
        let what = format!("change {} of {stream}", sp.id);
        let (mut pending, mut events) = (Vec::new(), Vec::new());
        for n in 0..sp.chunks {
            let key = format!("{}.{}.{n}", token(stream), sp.id);
            let (_, Some(v)) = entry(&self.spill, &key, &what).await? else {
                return Err(corrupt(
                    &what,
                    format!("chunk {n} of {} is missing", sp.chunks),
                ));
            };
            let chunk: SpillChunk = serde_json::from_slice(&v).map_err(|e| corrupt(&what, e))?;
            pending.extend(chunk.pending);
            events.extend(chunk.events);
        }
        Ok((pending, events))
    }

    /// Writes a big change's tag writes and events as chunks of at most ~256 KiB.
    async fn write_spill(
        &self,
        stream: &str,
        pending: Vec<Pending>,
        events: Vec<Event>,
    ) -> Result<Spill, StoreError> {
        const CHUNK: usize = 256 * 1024;
        let id = new_inc();
        let n_events = events.len() as u32;
        let mut chunks: Vec<Vec<u8>> = Vec::new();
        let mut cur = SpillChunk::default();
        let mut size = 0;
        let items = pending
            .into_iter()
            .map(|p| (Some(p), None))
            .chain(events.into_iter().map(|e| (None, Some(e))));
        for (p, e) in items {
            let len = match (&p, &e) {
                (Some(p), _) => serde_json::to_vec(p).map(|v| v.len()),
                (_, Some(e)) => serde_json::to_vec(e).map(|v| v.len()),
                _ => Ok(0),
            }
            .map_err(|x| corrupt("spilled change", x))?;
            if size + len > CHUNK && size > 0 {
                chunks.push(serde_json::to_vec(&cur).map_err(|x| corrupt("spilled change", x))?);
                cur = SpillChunk::default();
                size = 0;
            }
            size += len;
            cur.pending.extend(p);
            cur.events.extend(e);
        }
        chunks.push(serde_json::to_vec(&cur).map_err(|x| corrupt("spilled change", x))?);
        let count = chunks.len() as u32;
        let what = format!("change {id} of {stream}");
        futures_util::future::try_join_all(chunks.into_iter().enumerate().map(|(n, body)| {
            let key = format!("{}.{id}.{n}", token(stream));
            let what = &what;
            async move {
                self.spill
                    .put(&key, body.into())
                    .await
                    .map_err(|e| backend(&format!("write of {what}"), e))
            }
        }))
        .await?;
        Ok(Spill {
            id,
            chunks: count,
            events: n_events,
        })
    }

    /// The live head of a stream with its pending writes applied (None: no such stream).
    async fn live_head(&self, key: &str) -> Result<Option<Head>, StoreError> {
        let (_, head) = self.head(key).await?;
        let Some(head) = head.filter(|h| h.meta.is_some()) else {
            return Ok(None);
        };
        self.settle(key, &head).await?;
        Ok(Some(head))
    }

    /// The whole history of the tags given (one tag, or every tag of the stream), newest
    /// first: one listing of the history bucket, whatever the number of tags.
    async fn histories(
        &self,
        stream: &str,
        recs: &[&TagRecord],
        every_tag: bool,
    ) -> Result<HashMap<String, Vec<HistoryEntry>>, StoreError> {
        let what = format!("history of {stream}");
        let wanted: HashMap<String, &TagRecord> =
            recs.iter().map(|r| (token(&r.name), *r)).collect();
        let pattern = match (every_tag, recs) {
            (false, [r]) => format!("{}.{}.{}.*", token(stream), token(&r.name), r.inc),
            _ => format!("{}.>", token(stream)),
        };
        let prefix = format!("{}.", token(stream));
        let mut by_tag: HashMap<String, BTreeMap<u64, HistoryEntry>> = HashMap::new();
        for (key, _, value) in scan(&self.history, &pattern, &what).await? {
            let mut parts = key.strip_prefix(&prefix).unwrap_or_default().split('.');
            let (Some(tag), Some(inc), Some(seq)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (Some(rec), Ok(seq)) = (wanted.get(tag), seq.parse::<u64>()) else {
                continue;
            };
            // Entries of an earlier tag of that name, or dropped by retention, are not its history.
            if inc != rec.inc || !(rec.lo..=rec.hi).contains(&seq) {
                continue;
            }
            let e: HistoryEntry = serde_json::from_slice(&value).map_err(|x| corrupt(&what, x))?;
            by_tag.entry(rec.name.clone()).or_default().insert(seq, e);
        }
        Ok(by_tag
            .into_iter()
            .map(|(t, m)| (t, m.into_values().rev().collect()))
            .collect())
    }

    /// Every tag record of a stream.
    async fn all_tags(&self, stream: &str) -> Result<Vec<(u64, TagRecord)>, StoreError> {
        let what = format!("tags of {stream}");
        scan(&self.tags, &format!("{}.*", token(stream)), &what)
            .await?
            .into_iter()
            .map(|(_, rev, v)| {
                serde_json::from_slice::<TagRecord>(&v)
                    .map(|r| (rev, r))
                    .map_err(|x| corrupt(&what, x))
            })
            .collect()
    }

    pub async fn get(&self, key: &str) -> Result<Option<(ImageStream, i64)>, StoreError> {
        Ok(self.load(key, &Scope::All).await?.map(|l| (l.doc, l.rev)))
    }

    /// The stream's record with the tags `scope` names (their alias closure included).
    pub async fn load(&self, key: &str, scope: &Scope) -> Result<Option<Loaded>, StoreError> {
        let Some(head) = self.live_head(key).await? else {
            return Ok(None);
        };
        let Some(meta) = &head.meta else {
            return Ok(None);
        };
        let mut doc = meta.stream();
        let mut tag_revs = BTreeMap::new();
        match scope {
            Scope::All | Scope::Heads => {
                let recs = self.all_tags(key).await?;
                let mut histories = if *scope == Scope::All && !recs.is_empty() {
                    let refs: Vec<&TagRecord> = recs.iter().map(|(_, r)| r).collect();
                    self.histories(key, &refs, true).await?
                } else {
                    HashMap::new()
                };
                for (rev, rec) in recs {
                    let mut t = rec.tag;
                    if *scope == Scope::All {
                        t.history = histories.remove(&rec.name).unwrap_or_default();
                    }
                    tag_revs.insert(rec.name.clone(), rev as i64);
                    doc.tags.insert(rec.name, t);
                }
            }
            Scope::Tags(names) => {
                let mut todo: Vec<String> = names.clone();
                let mut seen = BTreeSet::new();
                while let Some(name) = todo.pop() {
                    if !seen.insert(name.clone()) {
                        continue;
                    }
                    if let Some(followers) = head.links.get(&name) {
                        todo.extend(followers.iter().cloned());
                    }
                    let (rev, Some(rec)) = self.tag_record(key, &name).await? else {
                        continue;
                    };
                    if let Some(src) = same_stream_source(&rec.tag) {
                        todo.push(src.to_string());
                    }
                    tag_revs.insert(name.clone(), rev as i64);
                    doc.tags.insert(name, rec.tag);
                }
            }
        }
        Ok(Some(Loaded {
            doc,
            rev: meta.rev,
            tag_revs,
        }))
    }

    /// The tags of stream `key` with their heads, `page` at a time (partial streams), sent to
    /// `tx` as the records arrive: a reader of a big stream holds a page, never all of it.
    pub async fn head_pages(
        &self,
        key: &str,
        page: usize,
        tx: &tokio::sync::mpsc::Sender<Result<ImageStream, StoreError>>,
    ) -> Result<(), StoreError> {
        let Some(head) = self.live_head(key).await? else {
            return Ok(());
        };
        let Some(meta) = &head.meta else {
            return Ok(());
        };
        let what = format!("tags of {key}");
        let mut scan = Scan::open(&self.tags, &format!("{}.*", token(key)), &what).await?;
        let mut doc = meta.stream();
        while let Some((_, _, v)) = scan.next().await? {
            let rec: TagRecord = serde_json::from_slice(&v).map_err(|x| corrupt(&what, x))?;
            doc.tags.insert(rec.name, rec.tag);
            if doc.tags.len() >= page
                && tx
                    .send(Ok(std::mem::replace(&mut doc, meta.stream())))
                    .await
                    .is_err()
            {
                return Ok(());
            }
        }
        if !doc.tags.is_empty() {
            let _ = tx.send(Ok(doc)).await;
        }
        Ok(())
    }

    pub async fn tag(
        &self,
        key: &str,
        tag: &str,
    ) -> Result<Option<(ImageStream, Tag)>, StoreError> {
        let Some(head) = self.live_head(key).await? else {
            return Ok(None);
        };
        let Some(meta) = &head.meta else {
            return Ok(None);
        };
        let (_, Some(rec)) = self.tag_record(key, tag).await? else {
            return Ok(None);
        };
        let mut histories = self.histories(key, &[&rec], false).await?;
        let mut t = rec.tag.clone();
        t.history = histories.remove(&rec.name).unwrap_or_default();
        Ok(Some((meta.stream(), t)))
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
            if let Some((doc, _)) = self.get(&k).await? {
                out.push(doc);
            }
        }
        Ok(out)
    }

    pub async fn commit(&self, c: &Commit) -> Result<i64, StoreError> {
        check_key(&c.key)?;
        let stream_lock = self.stream_lock(&c.key);
        let _one_at_a_time = stream_lock.lock().await;
        use crate::retry::{Cas, compare_and_set};
        let done = compare_and_set(50, || async move {
            match self.try_commit(c).await {
                Err(StoreError::Conflict(k)) if k.is_empty() => {
                    // Another replica wrote the head between our read and write: read again.
                    lock(&self.heads).remove(&c.key);
                    Ok(Cas::Conflict)
                }
                Ok(rev) => Ok(Cas::Done(rev)),
                Err(e) => Err(e),
            }
        })
        .await?;
        done.ok_or_else(|| StoreError::Conflict(c.key.clone()))
    }

    /// One attempt; `Conflict("")` means the head moved under it (retry).
    async fn try_commit(&self, c: &Commit) -> Result<i64, StoreError> {
        let key = c.key.as_str();
        let conflict = || StoreError::Conflict(c.key.clone());
        let (head_rev, old) = self.head_cached(key).await?;
        if let Some(h) = &old {
            // Writes are dropped from the head below, so they must have landed first.
            self.settle(key, h).await?;
        }
        let live = old.as_ref().and_then(|h| h.meta.as_ref());
        match (c.expected_rev, live) {
            (None, None) => {}
            (Some(r), Some(m)) if m.rev == r => {}
            _ => return Err(conflict()),
        }
        let mut head = old.clone().unwrap_or_default();
        head.v = HEAD_V;
        head.pending.clear();
        // Spilled changes without events are done once applied (settled above).
        let finished: Vec<String> = head
            .spill
            .iter()
            .filter(|sp| sp.events == 0)
            .map(|sp| sp.id.clone())
            .collect();
        head.spill.retain(|sp| sp.events > 0);
        if live.is_none() {
            head.links.clear();
            // A new stream starts clean of what a deleted one of the same name left behind
            // (a name never used has no entry at all, and nothing to clean).
            if head_rev != 0 {
                purge(&self.tags, &format!("{}.*", token(key)), key).await?;
                purge(&self.history, &format!("{}.>", token(key)), key).await?;
            }
        }
        let mut deleted_all = false;
        match &c.doc {
            None => {
                head.meta = None;
                head.links.clear();
                deleted_all = true;
            }
            Some(doc) => {
                let rev = match live {
                    Some(m) if !c.meta_changed && c.tags.is_some() => m.rev,
                    Some(m) => m.rev + 1,
                    None => 1,
                };
                head.meta = Some(Meta::of(doc, rev));
                let writes: Vec<TagWrite> = match &c.tags {
                    Some(w) => w.clone(),
                    None => self.whole_doc_writes(key, doc, live.is_some()).await?,
                };
                // The tags' current records, read side by side (none to read in a new stream).
                let fresh = live.is_none();
                let mut pendings: Vec<Option<Pending>> = Vec::with_capacity(writes.len());
                for group in writes.chunks(32) {
                    let reads = group
                        .iter()
                        .map(|w| self.pending_for(key, w, c.tags.is_some(), c.max_history, fresh));
                    pendings.extend(futures_util::future::try_join_all(reads).await?);
                }
                for (w, p) in writes.iter().zip(pendings) {
                    let Some(p) = p else { return Err(conflict()) };
                    for followers in head.links.values_mut() {
                        followers.remove(&w.name);
                    }
                    if let Some(src) = p.record.as_ref().and_then(|r| same_stream_source(&r.tag)) {
                        head.links
                            .entry(src.to_string())
                            .or_default()
                            .insert(w.name.clone());
                    }
                    head.pending.push(p);
                }
                head.links.retain(|_, f| !f.is_empty());
            }
        }
        // Events this replica has published leave the outbox with this write. The new ones are
        // handed straight to this replica's publisher only when nothing before them in the
        // outbox is someone else's to publish: per-tag order holds across replicas.
        let handable = {
            let handed = lock(&self.handed_out);
            let mine: HashMap<&str, bool> = handed
                .values()
                .filter(|h| h.key == *key && h.spill.is_none())
                .map(|h| (h.id.as_str(), h.published))
                .collect();
            if !mine.is_empty() {
                head.outbox
                    .retain(|e| mine.get(e.id.as_str()) != Some(&true));
            }
            !c.events.is_empty()
                && head.spill.iter().all(|sp| sp.events == 0)
                && head.outbox.iter().all(|e| mine.contains_key(e.id.as_str()))
        };
        head.outbox.extend(c.events.iter().cloned());
        // Write the head: the change is committed when this lands.
        // The tag writes of a change moved to spill chunks, still in hand to apply.
        let mut spilled: Vec<Pending> = Vec::new();
        let mut spill_written = false;
        let new_rev = if head.meta.is_none() && head.outbox.is_empty() && head.spill.is_empty() {
            if old.is_some() {
                match self
                    .streams
                    .delete_expect_revision(key, Some(head_rev))
                    .await
                {
                    Ok(()) => {}
                    Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => {
                        return Err(StoreError::Conflict(String::new()));
                    }
                    Err(e) => return Err(backend(&format!("delete of {key}"), e)),
                }
            }
            0
        } else {
            let mut body = serde_json::to_vec(&head).map_err(|e| corrupt("image stream", e))?;
            if body.len() > MAX_HEAD_BYTES {
                // A big change (thousands of tags or events) goes to spill chunks, written
                // before the head that names them: still one compare-and-set commits it.
                spill_written = true;
                let events = head.outbox.split_off(head.outbox.len() - c.events.len());
                spilled = std::mem::take(&mut head.pending);
                head.spill
                    .push(self.write_spill(key, spilled.clone(), events).await?);
                body = serde_json::to_vec(&head).map_err(|e| corrupt("image stream", e))?;
            }
            if body.len() > MAX_HEAD_BYTES {
                // Back-pressure, not loss: the change fails (whoever made it retries) until
                // the publisher has caught up.
                return Err(StoreError::Backend(format!(
                    "image stream {key} has {} events not yet published; changes wait until they are (is NATS reachable?)",
                    head.outbox.len() - c.events.len()
                )));
            }
            match self.streams.update(key, body.into(), head_rev).await {
                Ok(r) => r,
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    return Err(StoreError::Conflict(String::new()));
                }
                Err(e) => return Err(backend(&format!("write of {key}"), e)),
            }
        };
        self.mark_local(key, new_rev);
        {
            let mut heads = lock(&self.heads);
            if new_rev == 0 {
                heads.remove(key);
            } else {
                heads.insert(key.to_string(), (new_rev, head.clone()));
            }
        }
        if !head.outbox.is_empty() || !head.spill.is_empty() {
            lock(&self.dirty).insert(key.to_string());
        }
        // Still under the stream's lock: handed over in this stream's commit order.
        if !c.events.is_empty() {
            self.handoff.offer(handable && !spill_written, || {
                let mut handed = lock(&self.handed_out);
                c.events
                    .iter()
                    .map(|e| {
                        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
                        let h = HandedOut {
                            key: key.to_string(),
                            id: e.id.clone(),
                            spill: None,
                            published: false,
                        };
                        handed.insert(seq, h);
                        (seq, e.clone())
                    })
                    .collect()
            });
        }
        if self.stop_after_head.load(Ordering::Relaxed) {
            return Ok(head.meta.map_or(0, |m| m.rev));
        }
        // Land the tag writes now; a failure here is repaired by the next reader or writer.
        let applied = async {
            let writes: Vec<&Pending> = head.pending.iter().chain(&spilled).collect();
            for group in writes.chunks(32) {
                futures_util::future::try_join_all(group.iter().map(|p| self.apply(key, p)))
                    .await?;
            }
            if !spilled.is_empty()
                && let Some(sp) = head.spill.last()
            {
                lock(&self.spills_applied).insert(sp.id.clone());
            }
            self.settle_spills(key, &head).await
        }
        .await;
        if let Err(e) = &applied {
            tracing::warn!(stream = key, error = %e, "a committed change's tag writes are not all applied yet; the next read applies them");
        }
        let mut finished = finished;
        if applied.is_ok() && new_rev != 0 && head.spill.iter().any(|sp| sp.events == 0) {
            // A big change without events is done now that it is applied: take it off the
            // head at once (if another write came first, that write took it off).
            let mut lighter = head.clone();
            finished.extend(
                lighter
                    .spill
                    .iter()
                    .filter(|sp| sp.events == 0)
                    .map(|sp| sp.id.clone()),
            );
            lighter.spill.retain(|sp| sp.events > 0);
            lighter.pending.clear();
            let body = serde_json::to_vec(&lighter).map_err(|e| corrupt("image stream", e))?;
            if let Ok(r) = self.streams.update(key, body.into(), new_rev).await {
                self.mark_local(key, r);
                lock(&self.heads).insert(key.to_string(), (r, lighter));
            }
        }
        for id in &finished {
            if let Err(e) = purge(&self.spill, &format!("{}.{id}.*", token(key)), key).await {
                tracing::warn!(stream = key, error = %e, "a finished change's spill chunks stay behind");
            }
        }
        if deleted_all {
            let cleaned = async {
                purge(&self.tags, &format!("{}.*", token(key)), key).await?;
                purge(&self.history, &format!("{}.>", token(key)), key).await
            };
            if let Err(e) = cleaned.await {
                tracing::warn!(stream = key, error = %e, "records of a deleted stream not purged yet; a new stream of that name purges them");
            }
        }
        Ok(head.meta.map_or(0, |m| m.rev))
    }

    /// A commit without per-tag writes replaces the stream: every tag it has, and deletes for
    /// the stored tags it has not.
    async fn whole_doc_writes(
        &self,
        key: &str,
        doc: &ImageStream,
        exists: bool,
    ) -> Result<Vec<TagWrite>, StoreError> {
        let mut writes: Vec<TagWrite> = doc
            .tags
            .iter()
            .map(|(name, t)| TagWrite {
                name: name.clone(),
                expected_rev: None,
                // The record keeps the newest entries as any tag write does (heads readers
                // such as the scheduler see the current image); all of them go to history.
                tag: Some(recent(t)),
                new_entries: t.history.clone(),
                head_update: None,
            })
            .collect();
        if exists {
            for (_, rec) in self.all_tags(key).await? {
                if !doc.tags.contains_key(&rec.name) {
                    writes.push(TagWrite {
                        name: rec.name,
                        expected_rev: None,
                        tag: None,
                        new_entries: Vec::new(),
                        head_update: None,
                    });
                }
            }
        }
        Ok(writes)
    }

    /// The pending write for one tag of a change (None: the tag moved since it was loaded).
    /// With `check` false (a whole-stream replacement) it writes over whatever is there, and
    /// the tag's history starts over.
    async fn pending_for(
        &self,
        key: &str,
        w: &TagWrite,
        check: bool,
        max_history: usize,
        fresh: bool,
    ) -> Result<Option<Pending>, StoreError> {
        let (base, cur) = if fresh {
            (0, None)
        } else {
            self.tag_record(key, &w.name).await?
        };
        let cur_rev = cur.as_ref().map(|_| base as i64);
        if check && cur_rev != w.expected_rev {
            return Ok(None);
        }
        let cur = if check { cur } else { None };
        let Some(t) = &w.tag else {
            return Ok(Some(Pending {
                tag: w.name.clone(),
                base,
                record: None,
                entries: Vec::new(),
                drop: None,
            }));
        };
        let (inc, lo, mut hi) = match &cur {
            Some(r) => (r.inc.clone(), r.lo, r.hi),
            None => (new_inc(), 1, 0),
        };
        let mut entries = Vec::new();
        if let Some(h) = &w.head_update
            && hi >= lo
        {
            entries.push((hi, h.clone()));
        }
        for e in w.new_entries.iter().rev() {
            hi += 1;
            entries.push((hi, e.clone()));
        }
        let mut new_lo = lo;
        if max_history > 0 && hi + 1 > lo + max_history as u64 {
            new_lo = hi + 1 - max_history as u64;
        }
        let drop = (new_lo > lo).then_some((lo, new_lo));
        entries.retain(|(seq, _)| *seq >= new_lo);
        Ok(Some(Pending {
            tag: w.name.clone(),
            base,
            record: Some(TagRecord {
                name: w.name.clone(),
                tag: recent(t),
                inc,
                lo: new_lo,
                hi,
            }),
            entries,
            drop,
        }))
    }

    /// The unpublished events of the streams this replica publishes, in commit order per stream.
    pub async fn pending_events(&self, limit: usize) -> Result<Vec<(i64, Event)>, StoreError> {
        let keys: Vec<String> = lock(&self.dirty).iter().cloned().collect();
        let mut out = Vec::new();
        for key in keys {
            if out.len() >= limit {
                break;
            }
            let (outbox, spills) = match self.head_cached(&key).await? {
                (_, Some(h)) => (h.outbox, h.spill),
                (_, None) => (Vec::new(), Vec::new()),
            };
            if outbox.is_empty() && spills.iter().all(|sp| sp.events == 0) {
                lock(&self.dirty).remove(&key);
                continue;
            }
            // Spilled changes first: they were committed before anything still in the outbox.
            let mut events: Vec<(Option<String>, Event)> = Vec::new();
            for sp in spills.iter().filter(|sp| sp.events > 0) {
                let (_, evs) = self.spilled(&key, sp).await?;
                events.extend(evs.into_iter().map(|e| (Some(sp.id.clone()), e)));
            }
            events.extend(outbox.into_iter().map(|e| (None, e)));
            let mut handed = lock(&self.handed_out);
            for (spill, e) in events {
                let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
                handed.insert(
                    seq,
                    HandedOut {
                        key: key.clone(),
                        id: e.id.clone(),
                        spill,
                        published: false,
                    },
                );
                out.push((seq, e));
            }
        }
        Ok(out)
    }

    /// The publisher's acknowledgement of handed-out events, before `mark_published`.
    pub fn note_published(&self, seqs: &[i64]) {
        let mut handed = lock(&self.handed_out);
        for s in seqs {
            if let Some(h) = handed.get_mut(s) {
                h.published = true;
            }
        }
    }

    pub fn unhand(&self, seqs: &[i64]) {
        let mut handed = lock(&self.handed_out);
        for s in seqs {
            handed.remove(s);
        }
    }

    pub async fn outbox_depth(&self) -> Result<i64, StoreError> {
        Ok(lock(&self.dirty).len() as i64)
    }

    /// Removes published events from their streams' outboxes (CAS, re-read on conflict), and
    /// the landed tag writes with them; an emptied tombstone is deleted.
    pub async fn mark_published(&self, seqs: &[i64]) -> Result<(), StoreError> {
        let mut by_key: HashMap<String, BTreeSet<String>> = HashMap::new();
        {
            let mut handed = lock(&self.handed_out);
            let mut spilled = lock(&self.spill_published);
            for s in seqs {
                if let Some(HandedOut {
                    key: k, id, spill, ..
                }) = handed.remove(s)
                {
                    match spill {
                        Some(sp) => {
                            spilled.entry(sp).or_default().insert(id);
                            by_key.entry(k).or_default();
                        }
                        None => {
                            by_key.entry(k).or_default().insert(id);
                        }
                    }
                }
            }
        }
        for (key, ids) in by_key {
            let stream_lock = self.stream_lock(&key);
            let _one_at_a_time = stream_lock.lock().await;
            let (key, ids) = (&key, &ids);
            crate::retry::compare_and_set(20, || async move {
                use crate::retry::Cas;
                let (rev, Some(mut head)) = self.head_cached(key).await? else {
                    lock(&self.dirty).remove(key);
                    return Ok(Cas::Done(()));
                };
                let before = (head.outbox.len(), head.spill.len());
                head.outbox.retain(|e| !ids.contains(&e.id));
                let published: Vec<String> = {
                    let spilled = lock(&self.spill_published);
                    head.spill
                        .iter()
                        .filter(|sp| spilled.get(&sp.id).is_some_and(|p| p.len() >= sp.events as usize))
                        .map(|sp| sp.id.clone())
                        .collect()
                };
                if (head.outbox.len(), head.spill.len() - published.len()) == before {
                    return Ok(Cas::Done(()));
                }
                self.settle(key, &head).await?;
                head.pending.clear();
                head.spill.retain(|sp| !published.contains(&sp.id));
                let res = if head.meta.is_none() && head.outbox.is_empty() && head.spill.is_empty() {
                    self.streams
                        .delete_expect_revision(key, Some(rev))
                        .await
                        .map(|_| 0)
                        .map_err(|e| match e.kind() {
                            kv::DeleteErrorKind::WrongLastRevision => None,
                            _ => Some(backend(&format!("delete of {key}"), e)),
                        })
                } else {
                    let body = serde_json::to_vec(&head).map_err(|e| corrupt("image stream", e))?;
                    self.streams
                        .update(key, body.into(), rev)
                        .await
                        .map_err(|e| match e.kind() {
                            kv::UpdateErrorKind::WrongLastRevision => None,
                            _ => Some(backend(&format!("write of {key}"), e)),
                        })
                };
                match res {
                    Ok(new_rev) => {
                        self.mark_local(key, new_rev);
                        for id in &published {
                            lock(&self.spill_published).remove(id);
                            let chunks = format!("{}.{id}.*", token(key));
                            if let Err(e) = purge(&self.spill, &chunks, key).await {
                                tracing::warn!(stream = %key, error = %e, "a published change's spill chunks stay behind");
                            }
                        }
                        let empty = head.outbox.is_empty() && head.spill.is_empty();
                        let mut heads = lock(&self.heads);
                        if new_rev == 0 {
                            heads.remove(key);
                        } else {
                            heads.insert(key.clone(), (new_rev, head));
                        }
                        if empty {
                            lock(&self.dirty).remove(key);
                        }
                        Ok(Cas::Done(()))
                    }
                    Err(None) => {
                        lock(&self.heads).remove(key);
                        Ok(Cas::Conflict)
                    }
                    Err(Some(e)) => Err(e),
                }
            })
            .await?;
        }
        Ok(())
    }

    pub async fn record_hints(&self, hints: &[crate::store::Hint]) -> Result<(), StoreError> {
        for h in hints {
            let body = serde_json::to_vec(h).map_err(|e| corrupt("hint", e))?;
            self.hints
                .put(short_hash(&[&h.key()]), body.into())
                .await
                .map_err(|e| backend("hint write", e))?;
        }
        Ok(())
    }

    pub async fn pending_hints(&self) -> Result<Vec<crate::store::Hint>, StoreError> {
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
}
