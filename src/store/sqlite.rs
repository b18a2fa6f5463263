//! The embedded store: one SQLite file in WAL mode. A stream is a row (revision, generation),
//! each tag a row (its own revision, spec, conditions and current image) and each history
//! entry a row, so a change reads and writes the tags it touches and nothing that grows with
//! the stream or its history. The events of a change go into the outbox in the same
//! transaction, so a recorded change can never lose its event or its trigger deliveries.
//! Files of an earlier schema are upgraded in place at open, in one transaction.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use std::collections::BTreeMap;

use super::{
    Commit, Completion, Delivery, DeliveryState, FireOutcome, FireRequest, Loaded, Scope,
    StoreError, TriggerSummary, rules,
};
use crate::model::{Event, HistoryEntry, ImageStream, Tag, TagFrom};

pub struct SqliteStore {
    conn: Mutex<Connection>,
    pub(super) handoff: super::Handoff,
    /// Tells the checkpointer thread to stop when the store is dropped.
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Checkpoints the WAL from its own connection once a second, so no commit ever waits for a
/// checkpoint (SQLite's automatic one runs inside the committing transaction, with an fsync).
fn spawn_checkpointer(path: &Path, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let path = path.to_path_buf();
    let _ = std::thread::Builder::new()
        .name("istream-checkpoint".into())
        .spawn(move || {
            let Ok(conn) = Connection::open(&path) else {
                return;
            };
            let _ = conn.pragma_update(None, "busy_timeout", 5000);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_secs(1));
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(file = %path.display(), error = %e, "WAL checkpoint failed");
                }
            }
        });
}

/// The schema this release writes. 1: one JSON document per stream (istream 0.1); 2: a row
/// per stream, per tag and per history entry.
pub const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS streams (
    key TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    rev INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tags (
    stream TEXT NOT NULL,
    tag TEXT NOT NULL,
    rev INTEGER NOT NULL,
    -- the same-stream tag this one copies or follows, and whether it follows (an alias)
    source TEXT,
    alias INTEGER NOT NULL DEFAULT 0,
    -- the tag with its current and previous history entries
    doc TEXT NOT NULL,
    PRIMARY KEY (stream, tag)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_source ON tags(stream, source) WHERE source IS NOT NULL;
CREATE TABLE IF NOT EXISTS history (
    stream TEXT NOT NULL,
    tag TEXT NOT NULL,
    seq INTEGER NOT NULL,
    entry TEXT NOT NULL,
    PRIMARY KEY (stream, tag, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hints (
    key TEXT PRIMARY KEY,
    hint TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event TEXT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox(published, seq);
CREATE TABLE IF NOT EXISTS trigger_state (
    trigger TEXT NOT NULL,
    tag TEXT NOT NULL,
    digest TEXT NOT NULL,
    fired_at TEXT NOT NULL,
    PRIMARY KEY (trigger, tag)
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    trigger TEXT NOT NULL,
    tag TEXT NOT NULL,
    digest TEXT NOT NULL,
    event TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at INTEGER NOT NULL,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_at);
CREATE INDEX IF NOT EXISTS deliveries_trigger ON deliveries(trigger, state);
CREATE INDEX IF NOT EXISTS deliveries_tag ON deliveries(trigger, tag, state);
";

fn db_err(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// The schema a file holds: its `user_version`, or 1 for istream 0.1's files (which set none
/// but have the document table), or 0 for a new file.
fn schema_of(c: &Connection) -> Result<i64, rusqlite::Error> {
    let v: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if v != 0 {
        return Ok(v);
    }
    let has_doc: bool = c.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('streams') WHERE name = 'doc'",
        [],
        |r| r.get(0),
    )?;
    Ok(if has_doc { 1 } else { 0 })
}

/// The same-stream tag a spec copies or follows.
fn same_stream_source(t: &Tag) -> Option<&str> {
    match &t.spec.from {
        TagFrom::Tag(src) if !src.contains(':') => Some(src),
        _ => None,
    }
}

/// What a tag row carries of its history: the current entry and the one before it (events
/// and deliveries name the previous image); the rest lives in `history` rows only.
fn recent(t: &Tag) -> Tag {
    Tag {
        history: t.history.iter().take(2).cloned().collect(),
        ..t.clone()
    }
}

fn insert_tag(
    tx: &Connection,
    stream: &str,
    name: &str,
    rev: i64,
    t: &Tag,
) -> Result<(), StoreError> {
    let doc = serde_json::to_string(&recent(t)).map_err(json_err)?;
    tx.prepare_cached(
        "INSERT INTO tags(stream, tag, rev, source, alias, doc) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(stream, tag) DO UPDATE SET rev = ?3, source = ?4, alias = ?5, doc = ?6",
    )
    .and_then(|mut st| {
        st.execute(params![
            stream,
            name,
            rev,
            same_stream_source(t),
            t.spec.alias,
            doc
        ])
    })
    .map_err(db_err)?;
    Ok(())
}

fn delete_tag(tx: &Connection, stream: &str, name: &str) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM tags WHERE stream = ?1 AND tag = ?2",
        params![stream, name],
    )
    .map_err(db_err)?;
    tx.execute(
        "DELETE FROM history WHERE stream = ?1 AND tag = ?2",
        params![stream, name],
    )
    .map_err(db_err)?;
    Ok(())
}

/// Appends entries (given newest first) after the tag's newest one.
fn append_history(
    tx: &Connection,
    stream: &str,
    name: &str,
    newest_first: &[HistoryEntry],
) -> Result<(), StoreError> {
    let top: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(seq), 0) FROM history WHERE stream = ?1 AND tag = ?2",
            params![stream, name],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    let mut st = tx
        .prepare_cached("INSERT INTO history(stream, tag, seq, entry) VALUES (?1, ?2, ?3, ?4)")
        .map_err(db_err)?;
    for (i, e) in newest_first.iter().rev().enumerate() {
        let json = serde_json::to_string(e).map_err(json_err)?;
        st.execute(params![stream, name, top + 1 + i as i64, json])
            .map_err(db_err)?;
    }
    Ok(())
}

/// Converts a schema-1 file in place, inside the caller's transaction: either all of it is
/// converted or (after a crash) none, and the next start converts it again.
fn upgrade_from_1(tx: &Connection, path: &Path) -> Result<(usize, usize), StoreError> {
    let bad = |what: String| StoreError::Corrupt(format!("{}: {what}", path.display()));
    tx.execute_batch("ALTER TABLE streams RENAME TO streams_v1;")
        .map_err(db_err)?;
    tx.execute_batch(SCHEMA).map_err(db_err)?;
    let rows: Vec<(String, i64, String)> = {
        let mut st = tx
            .prepare("SELECT key, rev, doc FROM streams_v1 ORDER BY key")
            .map_err(db_err)?;
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(db_err)?
            .collect::<Result<_, _>>()
            .map_err(db_err)?
    };
    let crash_at = std::env::var("ISTREAM_TEST_CRASH_IN_UPGRADE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let (mut streams, mut tags) = (0, 0);
    for (key, rev, doc) in rows {
        if crash_at == Some(streams) {
            // Fault injection for the upgrade test: die as kill -9 would, mid-transaction.
            std::process::abort();
        }
        let s: ImageStream = serde_json::from_str(&doc).map_err(|e| {
            bad(format!(
                "image stream {key} is not a schema-1 document: {e}"
            ))
        })?;
        tx.execute(
            "INSERT INTO streams(key, namespace, name, rev, generation, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![key, s.namespace, s.name, rev, s.generation, s.created.to_rfc3339()],
        )
        .map_err(db_err)?;
        for (name, t) in &s.tags {
            insert_tag(tx, &key, name, 1, t)?;
            append_history(tx, &key, name, &t.history)?;
            tags += 1;
        }
        streams += 1;
    }
    tx.execute_batch("DROP TABLE streams_v1;").map_err(db_err)?;
    Ok((streams, tags))
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Backend(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let at = |e: rusqlite::Error| StoreError::Backend(format!("{}: {e}", path.display()));
        let mut conn = Connection::open(path)
            .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        conn.pragma_update(None, "busy_timeout", 5000).map_err(at)?;
        // Read before anything is written: a newer release's file is left exactly as it is.
        let found = schema_of(&conn).map_err(at)?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::Backend(format!(
                "{} was written by a newer istream (store schema {found}); this release ({}) reads schema {SCHEMA_VERSION} and older; nothing was changed",
                path.display(),
                env!("CARGO_PKG_VERSION")
            )));
        }
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(at)?;
        // NORMAL in WAL mode is durable against process crashes (the case SPEC 7 is about);
        // only an OS crash can lose the last transactions.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(at)?;
        let tx = conn.transaction().map_err(at)?;
        match found {
            0 => tx.execute_batch(SCHEMA).map_err(at)?,
            1 => {
                let (streams, tags) = upgrade_from_1(&tx, path)?;
                tracing::info!(
                    file = %path.display(), from = 1, to = SCHEMA_VERSION, streams, tags,
                    "store upgraded from schema 1 (a document per stream) to schema 2 (a row per tag)"
                );
            }
            _ => {}
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(at)?;
        // Attempts cut short by a crash are attempted again (at least once).
        tx.execute(
            "UPDATE deliveries SET state = 'pending' WHERE state = 'inflight'",
            [],
        )
        .map_err(at)?;
        tx.commit().map_err(at)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        spawn_checkpointer(path, stop.clone());
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            handoff: Default::default(),
            stop,
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stream's own record, without tags.
    fn stream_row(c: &Connection, key: &str) -> Result<Option<(ImageStream, i64)>, StoreError> {
        let row: Option<(String, String, i64, i64, String)> = c
            .prepare_cached(
                "SELECT namespace, name, rev, generation, created FROM streams WHERE key = ?1",
            )
            .and_then(|mut st| {
                st.query_row([key], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
                .optional()
            })
            .map_err(db_err)?;
        let Some((namespace, name, rev, generation, created)) = row else {
            return Ok(None);
        };
        let created = chrono::DateTime::parse_from_rfc3339(&created)
            .map_err(|e| StoreError::Corrupt(format!("stream {key} created \"{created}\": {e}")))?
            .with_timezone(&chrono::Utc);
        Ok(Some((
            ImageStream {
                namespace,
                name,
                generation,
                created,
                tags: Default::default(),
            },
            rev,
        )))
    }

    /// One tag row: revision, same-stream source, and the tag with its current entry.
    fn tag_row(c: &Connection, key: &str, tag: &str) -> Result<Option<(i64, Tag)>, StoreError> {
        let row: Option<(i64, String)> = c
            .prepare_cached("SELECT rev, doc FROM tags WHERE stream = ?1 AND tag = ?2")
            .and_then(|mut st| {
                st.query_row([key, tag], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(db_err)?;
        row.map(|(rev, doc)| Ok((rev, serde_json::from_str(&doc).map_err(json_err)?)))
            .transpose()
    }

    fn all_tag_rows(c: &Connection, key: &str) -> Result<Vec<(String, i64, Tag)>, StoreError> {
        let mut st = c
            .prepare_cached("SELECT tag, rev, doc FROM tags WHERE stream = ?1 ORDER BY tag")
            .map_err(db_err)?;
        let rows = st
            .query_map([key], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(db_err)?;
        let mut out = Vec::new();
        for r in rows {
            let (name, rev, doc) = r.map_err(db_err)?;
            out.push((name, rev, serde_json::from_str(&doc).map_err(json_err)?));
        }
        Ok(out)
    }

    fn full_history(c: &Connection, key: &str, tag: &str) -> Result<Vec<HistoryEntry>, StoreError> {
        let mut st = c
            .prepare_cached(
                "SELECT entry FROM history WHERE stream = ?1 AND tag = ?2 ORDER BY seq DESC",
            )
            .map_err(db_err)?;
        let rows = st
            .query_map([key, tag], |r| r.get::<_, String>(0))
            .map_err(db_err)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(serde_json::from_str(&r.map_err(db_err)?).map_err(json_err)?);
        }
        Ok(out)
    }

    pub fn get(&self, key: &str) -> Result<Option<(ImageStream, i64)>, StoreError> {
        Ok(self.load(key, &Scope::All)?.map(|l| (l.doc, l.rev)))
    }

    pub fn load(&self, key: &str, scope: &Scope) -> Result<Option<Loaded>, StoreError> {
        let c = self.conn();
        let Some((mut doc, rev)) = Self::stream_row(&c, key)? else {
            return Ok(None);
        };
        let mut tag_revs = BTreeMap::new();
        match scope {
            Scope::All | Scope::Heads => {
                for (name, trev, mut t) in Self::all_tag_rows(&c, key)? {
                    if *scope == Scope::All {
                        t.history = Self::full_history(&c, key, &name)?;
                    }
                    tag_revs.insert(name.clone(), trev);
                    doc.tags.insert(name, t);
                }
            }
            Scope::Tags(names) => {
                // The alias closure: the tags a loaded tag copies from, and those following it.
                let mut todo: Vec<String> = names.clone();
                let mut followers = c
                    .prepare_cached("SELECT tag FROM tags WHERE stream = ?1 AND source = ?2")
                    .map_err(db_err)?;
                while let Some(name) = todo.pop() {
                    if tag_revs.contains_key(&name) {
                        continue;
                    }
                    let Some((trev, t)) = Self::tag_row(&c, key, &name)? else {
                        continue;
                    };
                    if let Some(src) = same_stream_source(&t) {
                        todo.push(src.to_string());
                    }
                    let rows = followers
                        .query_map([key, name.as_str()], |r| r.get::<_, String>(0))
                        .map_err(db_err)?;
                    for f in rows {
                        todo.push(f.map_err(db_err)?);
                    }
                    tag_revs.insert(name.clone(), trev);
                    doc.tags.insert(name, t);
                }
            }
        }
        Ok(Some(Loaded { doc, rev, tag_revs }))
    }

    /// One page of stream `key`'s tags with their heads: the first `limit` tags named after
    /// `after`, in name order (None: no such stream).
    pub fn head_page(
        &self,
        key: &str,
        after: &str,
        limit: usize,
    ) -> Result<Option<ImageStream>, StoreError> {
        let c = self.conn();
        let Some((mut doc, _)) = Self::stream_row(&c, key)? else {
            return Ok(None);
        };
        let mut st = c
            .prepare_cached(
                "SELECT tag, doc FROM tags WHERE stream = ?1 AND tag > ?2 ORDER BY tag LIMIT ?3",
            )
            .map_err(db_err)?;
        let rows = st
            .query_map(rusqlite::params![key, after, limit as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(db_err)?;
        for r in rows {
            let (name, t) = r.map_err(db_err)?;
            doc.tags
                .insert(name, serde_json::from_str(&t).map_err(json_err)?);
        }
        Ok(Some(doc))
    }

    pub fn tag(&self, key: &str, tag: &str) -> Result<Option<(ImageStream, Tag)>, StoreError> {
        let c = self.conn();
        let Some((doc, _)) = Self::stream_row(&c, key)? else {
            return Ok(None);
        };
        let Some((_, mut t)) = Self::tag_row(&c, key, tag)? else {
            return Ok(None);
        };
        t.history = Self::full_history(&c, key, tag)?;
        Ok(Some((doc, t)))
    }

    pub fn list(&self, namespace: Option<&str>) -> Result<Vec<ImageStream>, StoreError> {
        let keys: Vec<String> = {
            let c = self.conn();
            let mut stmt = c
                .prepare_cached(
                    "SELECT key FROM streams WHERE ?1 IS NULL OR namespace = ?1 ORDER BY key",
                )
                .map_err(db_err)?;
            stmt.query_map([namespace], |r| r.get::<_, String>(0))
                .map_err(db_err)?
                .collect::<Result<_, _>>()
                .map_err(db_err)?
        };
        let mut out = Vec::new();
        for k in keys {
            if let Some((doc, _)) = self.get(&k)? {
                out.push(doc);
            }
        }
        Ok(out)
    }

    pub fn keys(&self) -> Result<Vec<String>, StoreError> {
        let c = self.conn();
        let mut stmt = c
            .prepare_cached("SELECT key FROM streams ORDER BY key")
            .map_err(db_err)?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(db_err)?;
        rows.map(|r| r.map_err(db_err)).collect()
    }

    pub fn commit(&self, commit: &Commit) -> Result<i64, StoreError> {
        self.commit_firing(commit, &[], 0).map(|(rev, _)| rev)
    }

    /// `commit`, with the firing rule applied to `fire` in the same transaction: a trigger
    /// fires for the change exactly when the change is committed, in commit order.
    pub fn commit_firing(
        &self,
        commit: &Commit,
        fire: &[FireRequest],
        now_ms: i64,
    ) -> Result<(i64, Vec<FireOutcome>), StoreError> {
        let mut c = self.conn();
        let tx = c.transaction().map_err(db_err)?;
        let key = commit.key.as_str();
        let conflict = || StoreError::Conflict(commit.key.clone());
        let cur: Option<i64> = tx
            .query_row("SELECT rev FROM streams WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db_err)?;
        if cur != commit.expected_rev {
            return Err(conflict());
        }
        let mut rev = cur.unwrap_or(0);
        match (&commit.doc, &commit.tags) {
            (None, _) => {
                for table in [
                    "streams WHERE key",
                    "tags WHERE stream",
                    "history WHERE stream",
                ] {
                    tx.execute(&format!("DELETE FROM {table} = ?1"), [key])
                        .map_err(db_err)?;
                }
            }
            (Some(doc), tags) => {
                if cur.is_none() || commit.meta_changed || tags.is_none() {
                    rev += 1;
                    tx.execute(
                        "INSERT INTO streams(key, namespace, name, rev, generation, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT(key) DO UPDATE SET rev = ?4, generation = ?5, created = ?6",
                        params![key, doc.namespace, doc.name, rev, doc.generation, doc.created.to_rfc3339()],
                    )
                    .map_err(db_err)?;
                }
                match tags {
                    None => {
                        // The whole stream replaces what is stored.
                        tx.execute("DELETE FROM tags WHERE stream = ?1", [key])
                            .map_err(db_err)?;
                        tx.execute("DELETE FROM history WHERE stream = ?1", [key])
                            .map_err(db_err)?;
                        for (name, t) in &doc.tags {
                            insert_tag(&tx, key, name, 1, t)?;
                            append_history(&tx, key, name, &t.history)?;
                            trim_history(&tx, key, name, commit.max_history)?;
                        }
                    }
                    Some(writes) => {
                        for w in writes {
                            let cur_tag: Option<i64> = tx
                                .prepare_cached(
                                    "SELECT rev FROM tags WHERE stream = ?1 AND tag = ?2",
                                )
                                .and_then(|mut st| {
                                    st.query_row([key, w.name.as_str()], |r| r.get(0))
                                        .optional()
                                })
                                .map_err(db_err)?;
                            if cur_tag != w.expected_rev {
                                return Err(conflict());
                            }
                            match &w.tag {
                                None => delete_tag(&tx, key, &w.name)?,
                                Some(t) => {
                                    insert_tag(&tx, key, &w.name, cur_tag.unwrap_or(0) + 1, t)?;
                                    if let Some(h) = &w.head_update {
                                        let json = serde_json::to_string(h).map_err(json_err)?;
                                        tx.execute(
                                            "UPDATE history SET entry = ?3 WHERE stream = ?1 AND tag = ?2
                                             AND seq = (SELECT MAX(seq) FROM history WHERE stream = ?1 AND tag = ?2)",
                                            params![key, w.name, json],
                                        )
                                        .map_err(db_err)?;
                                    }
                                    if !w.new_entries.is_empty() {
                                        append_history(&tx, key, &w.name, &w.new_entries)?;
                                        trim_history(&tx, key, &w.name, commit.max_history)?;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        let mut seqs = Vec::with_capacity(commit.events.len());
        for e in &commit.events {
            let json = serde_json::to_string(e).map_err(json_err)?;
            tx.prepare_cached("INSERT INTO outbox(event) VALUES (?1)")
                .and_then(|mut st| st.execute([json]))
                .map_err(db_err)?;
            seqs.push(tx.last_insert_rowid());
        }
        let fired = fire_in(&tx, fire, now_ms)?;
        tx.commit().map_err(db_err)?;
        // Still holding the connection: handed over in commit order.
        if !seqs.is_empty() {
            self.handoff.offer(true, || {
                seqs.into_iter()
                    .zip(commit.events.iter().cloned())
                    .collect()
            });
        }
        Ok((rev, fired))
    }

    pub fn pending_events(&self, limit: usize) -> Result<Vec<(i64, Event)>, StoreError> {
        let c = self.conn();
        let mut stmt = c
            .prepare_cached(
                "SELECT seq, event FROM outbox WHERE published = 0 ORDER BY seq LIMIT ?1",
            )
            .map_err(db_err)?;
        let rows = stmt
            .query_map([limit as i64], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(db_err)?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, json) = row.map_err(db_err)?;
            out.push((seq, serde_json::from_str(&json).map_err(json_err)?));
        }
        Ok(out)
    }

    pub fn outbox_depth(&self) -> Result<i64, StoreError> {
        self.conn()
            .query_row("SELECT COUNT(*) FROM outbox WHERE published = 0", [], |r| {
                r.get(0)
            })
            .map_err(db_err)
    }

    pub fn mark_published(&self, seqs: &[i64]) -> Result<(), StoreError> {
        let mut c = self.conn();
        let tx = c.transaction().map_err(db_err)?;
        for s in seqs {
            tx.execute("UPDATE outbox SET published = 1 WHERE seq = ?1", [s])
                .map_err(db_err)?;
        }
        // Published events are kept for a while for inspection, then dropped.
        if let Some(max) = seqs.iter().max() {
            tx.execute(
                "DELETE FROM outbox WHERE published = 1 AND seq < ?1",
                [max - 10_000],
            )
            .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    pub fn last_fired(&self, trigger: &str, tag: &str) -> Result<Option<String>, StoreError> {
        self.conn()
            .query_row(
                "SELECT digest FROM trigger_state WHERE trigger = ?1 AND tag = ?2",
                [trigger, tag],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)
    }

    /// Applies the firing rule to each request atomically: compares the tag's image with the
    /// last one the trigger fired for, records the new one, supersedes pending deliveries of
    /// older images and queues a delivery (none for a first image under `skip_initial`).
    pub fn fire_due(
        &self,
        reqs: &[FireRequest],
        now_ms: i64,
    ) -> Result<Vec<FireOutcome>, StoreError> {
        let mut c = self.conn();
        let tx = c.transaction().map_err(db_err)?;
        let out = fire_in(&tx, reqs, now_ms)?;
        tx.commit().map_err(db_err)?;
        Ok(out)
    }

    /// Records finished attempts and claims up to `limit` due deliveries, in one transaction
    /// (the deliverer's whole bookkeeping for one turn of its loop).
    pub fn complete_and_claim(
        &self,
        done: &[Completion],
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        if !done.is_empty() {
            let mut c = self.conn();
            let tx = c.transaction().map_err(db_err)?;
            for d in done {
                update_delivery_in(&tx, d, now_ms)?;
            }
            tx.commit().map_err(db_err)?;
        }
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.claim_due(now_ms, limit)
    }

    /// Claims up to `limit` due deliveries (state `inflight`) and returns them, in one
    /// transaction: two claimers never get the same one. The index picks the candidates,
    /// `rules::claim` decides. A crash leaves them `inflight`; `open` puts them back to `pending`.
    pub fn claim_due(&self, now_ms: i64, limit: usize) -> Result<Vec<Delivery>, StoreError> {
        let mut c = self.conn();
        let tx = c.transaction().map_err(db_err)?;
        let candidates = {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT id, trigger, tag, digest, event, state, attempts, next_at, created, last_error
                     FROM deliveries WHERE state = 'pending' AND next_at <= ?1
                     ORDER BY next_at, id LIMIT ?2",
                )
                .map_err(db_err)?;
            let rows = stmt
                .query_map(params![now_ms, limit as i64], row_to_delivery)
                .map_err(db_err)?;
            let mut v = Vec::new();
            for r in rows {
                v.push(r.map_err(db_err)??);
            }
            v
        };
        let mut out = Vec::with_capacity(candidates.len());
        for mut d in candidates {
            if rules::claim(d.state, d.next_at, now_ms) != rules::Claim::Now {
                continue;
            }
            tx.prepare_cached(
                "UPDATE deliveries SET state = 'inflight', updated = ?2 WHERE id = ?1",
            )
            .and_then(|mut st| st.execute(params![d.id, now_ms]))
            .map_err(db_err)?;
            d.state = DeliveryState::Inflight;
            out.push(d);
        }
        tx.commit().map_err(db_err)?;
        Ok(out)
    }

    /// The earliest `next_at` of a pending delivery, to sleep until then.
    pub fn next_due(&self) -> Result<Option<i64>, StoreError> {
        self.conn()
            .query_row(
                "SELECT MIN(next_at) FROM deliveries WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )
            .map_err(db_err)
    }

    pub fn deliveries(&self, trigger: &str, limit: usize) -> Result<Vec<Delivery>, StoreError> {
        let c = self.conn();
        let mut stmt = c
            .prepare_cached(
                "SELECT id, trigger, tag, digest, event, state, attempts, next_at, created, last_error
                 FROM deliveries WHERE trigger = ?1 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(db_err)?;
        let rows = stmt
            .query_map(params![trigger, limit as i64], row_to_delivery)
            .map_err(db_err)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r.map_err(db_err)??);
        }
        Ok(out)
    }

    pub fn summary(&self, trigger: &str) -> Result<TriggerSummary, StoreError> {
        let c = self.conn();
        let count = |state: &str| -> Result<i64, StoreError> {
            c.query_row(
                "SELECT COUNT(*) FROM deliveries WHERE trigger = ?1 AND state = ?2",
                [trigger, state],
                |r| r.get(0),
            )
            .map_err(db_err)
        };
        let mut s = TriggerSummary {
            pending: count("pending")? + count("inflight")?,
            dead: count("dead")?,
            delivered: count("delivered")?,
            superseded: count("superseded")?,
            last_fired: Default::default(),
        };
        let mut stmt = c
            .prepare_cached("SELECT tag, digest FROM trigger_state WHERE trigger = ?1 ORDER BY tag")
            .map_err(db_err)?;
        let rows = stmt
            .query_map([trigger], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(db_err)?;
        for r in rows {
            let (t, d) = r.map_err(db_err)?;
            s.last_fired.insert(t, d);
        }
        Ok(s)
    }

    pub fn record_hints(&self, hints: &[super::Hint]) -> Result<(), StoreError> {
        let mut c = self.conn();
        let tx = c.transaction().map_err(db_err)?;
        for h in hints {
            let json = serde_json::to_string(h).map_err(json_err)?;
            tx.prepare_cached(
                "INSERT INTO hints(key, hint) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET hint = ?2",
            )
            .and_then(|mut st| st.execute(params![h.key(), json]))
            .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    pub fn pending_hints(&self) -> Result<Vec<super::Hint>, StoreError> {
        let c = self.conn();
        let mut st = c
            .prepare_cached("SELECT hint FROM hints ORDER BY key")
            .map_err(db_err)?;
        let rows = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(db_err)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(serde_json::from_str(&r.map_err(db_err)?).map_err(json_err)?);
        }
        Ok(out)
    }

    pub fn drop_hint(&self, key: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM hints WHERE key = ?1", [key])
            .map_err(db_err)?;
        Ok(())
    }

    /// Drops the deliveries `rules::purgeable` names (settled before `cutoff_ms`).
    pub fn purge_settled(&self, cutoff_ms: i64) -> Result<usize, StoreError> {
        let mut c = self.conn();
        let tx = c.transaction().map_err(db_err)?;
        let old: Vec<(i64, String, i64)> = {
            let mut st = tx
                .prepare_cached("SELECT id, state, updated FROM deliveries WHERE updated < ?1")
                .map_err(db_err)?;
            st.query_map([cutoff_ms], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(db_err)?
                .collect::<Result<_, _>>()
                .map_err(db_err)?
        };
        let mut n = 0;
        for (id, state, updated) in old {
            if rules::purgeable(parse_state(&state)?, updated, cutoff_ms) {
                n += tx
                    .execute("DELETE FROM deliveries WHERE id = ?1", [id])
                    .map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)?;
        Ok(n)
    }

    pub fn retry_dead(&self, trigger: &str, now_ms: i64) -> Result<usize, StoreError> {
        let mut c = self.conn();
        let tx = c.transaction().map_err(db_err)?;
        let dead: Vec<(i64, String)> = {
            let mut st = tx
                .prepare_cached(
                    "SELECT id, state FROM deliveries WHERE trigger = ?1 AND state = 'dead'",
                )
                .map_err(db_err)?;
            st.query_map([trigger], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(db_err)?
                .collect::<Result<_, _>>()
                .map_err(db_err)?
        };
        let mut n = 0;
        for (id, state) in dead {
            if let Some(next) = rules::retry(parse_state(&state)?) {
                n += tx
                    .execute(
                        "UPDATE deliveries SET state = ?2, attempts = 0, next_at = ?3, created = ?3, updated = ?3
                         WHERE id = ?1",
                        params![id, next.as_str(), now_ms],
                    )
                    .map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)?;
        Ok(n)
    }
}

fn parse_state(s: &str) -> Result<DeliveryState, StoreError> {
    DeliveryState::parse(s).ok_or_else(|| StoreError::Corrupt(format!("delivery state \"{s}\"")))
}

type RowResult = Result<Delivery, StoreError>;

fn row_to_delivery(r: &rusqlite::Row) -> rusqlite::Result<RowResult> {
    let event: String = r.get(4)?;
    let state: String = r.get(5)?;
    Ok((|| {
        Ok(Delivery {
            id: r.get(0).map_err(db_err)?,
            trigger: r.get(1).map_err(db_err)?,
            tag: r.get(2).map_err(db_err)?,
            digest: r.get(3).map_err(db_err)?,
            event: serde_json::from_str(&event).map_err(json_err)?,
            state: parse_state(&state)?,
            attempts: r.get(6).map_err(db_err)?,
            next_at: r.get(7).map_err(db_err)?,
            created: r.get(8).map_err(db_err)?,
            last_error: r.get(9).map_err(db_err)?,
        })
    })())
}

fn update_delivery_in(c: &Connection, d: &Completion, now_ms: i64) -> Result<(), StoreError> {
    let found: Option<(String, bool)> = c
        .prepare_cached(
            "SELECT state, EXISTS (SELECT 1 FROM deliveries d2
                 WHERE d2.trigger = d.trigger AND d2.tag = d.tag AND d2.id > d.id)
             FROM deliveries d WHERE id = ?1",
        )
        .and_then(|mut st| {
            st.query_row([d.id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(db_err)?;
    let Some((current, newer)) = found else {
        return Ok(());
    };
    let state = rules::after_attempt(parse_state(&current)?, d.state, newer);
    c.prepare_cached(
        "UPDATE deliveries SET state = ?2, attempts = ?3, next_at = ?4,
         last_error = COALESCE(?5, last_error), updated = ?6 WHERE id = ?1",
    )
    .and_then(|mut st| {
        st.execute(params![
            d.id,
            state.as_str(),
            d.attempts,
            d.next_at,
            d.error,
            now_ms
        ])
    })
    .map_err(db_err)?;
    Ok(())
}

/// `[history] max_entries`: keeps the newest `max` entries of a tag (0: all).
fn trim_history(tx: &Connection, stream: &str, tag: &str, max: usize) -> Result<(), StoreError> {
    if max == 0 {
        return Ok(());
    }
    tx.prepare_cached(
        "DELETE FROM history WHERE stream = ?1 AND tag = ?2 AND seq <= (SELECT MAX(seq) FROM history WHERE stream = ?1 AND tag = ?2) - ?3",
    )
    .and_then(|mut st| st.execute(params![stream, tag, max as i64]))
    .map_err(db_err)?;
    Ok(())
}

/// The firing rule for each request, in `tx` (see `SqliteStore::fire_due`).
fn fire_in(
    tx: &rusqlite::Transaction,
    reqs: &[FireRequest],
    now_ms: i64,
) -> Result<Vec<FireOutcome>, StoreError> {
    let mut out = Vec::with_capacity(reqs.len());
    let fired_at = chrono::Utc::now().to_rfc3339();
    for r in reqs {
        let digest = r.event.data.digest.clone().unwrap_or_default();
        let last: Option<String> = tx
            .query_row(
                "SELECT digest FROM trigger_state WHERE trigger = ?1 AND tag = ?2",
                [&r.trigger, &r.tag],
                |row| row.get(0),
            )
            .optional()
            .map_err(db_err)?;
        let outcome = rules::fire(last.as_deref(), &digest, r.skip_initial);
        if outcome == FireOutcome::Unchanged {
            out.push(outcome);
            continue;
        }
        tx.execute(
            "INSERT INTO trigger_state(trigger, tag, digest, fired_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(trigger, tag) DO UPDATE SET digest = ?3, fired_at = ?4",
            params![r.trigger, r.tag, digest, fired_at],
        )
        .map_err(db_err)?;
        if outcome == FireOutcome::Recorded {
            out.push(outcome);
            continue;
        }
        let waiting: Vec<(i64, String)> = {
            let mut st = tx
                .prepare_cached(
                    "SELECT id, state FROM deliveries WHERE trigger = ?1 AND tag = ?2
                     AND state IN ('pending', 'inflight')",
                )
                .map_err(db_err)?;
            st.query_map([&r.trigger, &r.tag], |row| Ok((row.get(0)?, row.get(1)?)))
                .map_err(db_err)?
                .collect::<Result<_, _>>()
                .map_err(db_err)?
        };
        for (id, state) in waiting {
            if let Some(note) = rules::supersede(parse_state(&state)?, &digest) {
                tx.execute(
                    "UPDATE deliveries SET state = 'superseded', updated = ?2, last_error = ?3 WHERE id = ?1",
                    params![id, now_ms, note],
                )
                .map_err(db_err)?;
            }
        }
        let json = serde_json::to_string(&r.event).map_err(json_err)?;
        tx.execute(
            "INSERT INTO deliveries(trigger, tag, digest, event, state, attempts, next_at, created, updated)
             VALUES (?1, ?2, ?3, ?4, 'pending', 0, ?5, ?5, ?5)",
            params![r.trigger, r.tag, digest, json, now_ms],
        )
        .map_err(db_err)?;
        out.push(FireOutcome::Fired);
    }
    Ok(out)
}
