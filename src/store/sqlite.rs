//! The embedded store: one SQLite file in WAL mode. A stream is one JSON document with a
//! revision for compare-and-set; the events of a change go into the outbox in the same
//! transaction, so a recorded change can never lose its event or its trigger deliveries.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use super::{
    Commit, Completion, Delivery, DeliveryState, FireOutcome, FireRequest, StoreError,
    TriggerSummary,
};
use crate::model::{Event, ImageStream};

pub struct SqliteStore {
    conn: Mutex<Connection>,
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

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS streams (
    key TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    rev INTEGER NOT NULL,
    doc TEXT NOT NULL
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

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Backend(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err)?;
        // NORMAL in WAL mode is durable against process crashes (the case SPEC 7 is about);
        // only an OS crash can lose the last transactions.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db_err)?;
        conn.pragma_update(None, "busy_timeout", 5000)
            .map_err(db_err)?;
        conn.execute_batch(SCHEMA)
            .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
        // Attempts cut short by a crash are attempted again (at least once).
        conn.execute(
            "UPDATE deliveries SET state = 'pending' WHERE state = 'inflight'",
            [],
        )
        .map_err(db_err)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        spawn_checkpointer(path, stop.clone());
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            stop,
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, key: &str) -> Result<Option<(ImageStream, i64)>, StoreError> {
        let c = self.conn();
        let row: Option<(String, i64)> = c
            .query_row("SELECT doc, rev FROM streams WHERE key = ?1", [key], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(db_err)?;
        row.map(|(doc, rev)| Ok((serde_json::from_str(&doc).map_err(json_err)?, rev)))
            .transpose()
    }

    pub fn list(&self, namespace: Option<&str>) -> Result<Vec<ImageStream>, StoreError> {
        let c = self.conn();
        let mut out = Vec::new();
        let mut stmt = c
            .prepare_cached(
                "SELECT doc FROM streams WHERE ?1 IS NULL OR namespace = ?1 ORDER BY key",
            )
            .map_err(db_err)?;
        let rows = stmt
            .query_map([namespace], |r| r.get::<_, String>(0))
            .map_err(db_err)?;
        for doc in rows {
            out.push(serde_json::from_str(&doc.map_err(db_err)?).map_err(json_err)?);
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
        let mut c = self.conn();
        let tx = c.transaction().map_err(db_err)?;
        let cur: Option<i64> = tx
            .query_row(
                "SELECT rev FROM streams WHERE key = ?1",
                [&commit.key],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
        if cur != commit.expected_rev {
            return Err(StoreError::Conflict(commit.key.clone()));
        }
        let rev = cur.unwrap_or(0) + 1;
        match &commit.doc {
            Some(doc) => {
                let json = serde_json::to_string(doc).map_err(json_err)?;
                tx.execute(
                    "INSERT INTO streams(key, namespace, rev, doc) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(key) DO UPDATE SET rev = ?3, doc = ?4",
                    params![commit.key, doc.namespace, rev, json],
                )
                .map_err(db_err)?;
            }
            None => {
                tx.execute("DELETE FROM streams WHERE key = ?1", [&commit.key])
                    .map_err(db_err)?;
            }
        }
        for e in &commit.events {
            let json = serde_json::to_string(e).map_err(json_err)?;
            tx.execute("INSERT INTO outbox(event) VALUES (?1)", [json])
                .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        Ok(rev)
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
            if last.as_deref() == Some(digest.as_str()) {
                out.push(FireOutcome::Unchanged);
                continue;
            }
            tx.execute(
                "INSERT INTO trigger_state(trigger, tag, digest, fired_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(trigger, tag) DO UPDATE SET digest = ?3, fired_at = ?4",
                params![r.trigger, r.tag, digest, fired_at],
            )
            .map_err(db_err)?;
            if last.is_none() && r.skip_initial {
                out.push(FireOutcome::Recorded);
                continue;
            }
            tx.execute(
                "UPDATE deliveries SET state = 'superseded', updated = ?3,
                 last_error = 'superseded by ' || ?4
                 WHERE trigger = ?1 AND tag = ?2 AND state = 'pending'",
                params![r.trigger, r.tag, now_ms, digest],
            )
            .map_err(db_err)?;
            let json = serde_json::to_string(&r.event).map_err(json_err)?;
            tx.execute(
                "INSERT INTO deliveries(trigger, tag, digest, event, state, attempts, next_at, created, updated)
                 VALUES (?1, ?2, ?3, ?4, 'pending', 0, ?5, ?5, ?5)",
                params![r.trigger, r.tag, digest, json, now_ms],
            )
            .map_err(db_err)?;
            out.push(FireOutcome::Fired);
        }
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
        {
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
    /// statement: two claimers never get the same one. A crash leaves them `inflight`; `open`
    /// puts them back to `pending`.
    pub fn claim_due(&self, now_ms: i64, limit: usize) -> Result<Vec<Delivery>, StoreError> {
        let c = self.conn();
        let mut stmt = c
            .prepare_cached(
                "UPDATE deliveries SET state = 'inflight', updated = ?1
                 WHERE id IN (SELECT id FROM deliveries WHERE state = 'pending' AND next_at <= ?1
                              ORDER BY next_at, id LIMIT ?2)
                 RETURNING id, trigger, tag, digest, event, state, attempts, next_at, created, last_error",
            )
            .map_err(db_err)?;
        let rows = stmt
            .query_map(params![now_ms, limit as i64], row_to_delivery)
            .map_err(db_err)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r.map_err(db_err)??);
        }
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

    pub fn retry_dead(&self, trigger: &str, now_ms: i64) -> Result<usize, StoreError> {
        self.conn()
            .execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_at = ?2, created = ?2, updated = ?2
                 WHERE trigger = ?1 AND state = 'dead'",
                params![trigger, now_ms],
            )
            .map_err(db_err)
    }
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
            state: DeliveryState::parse(&state)
                .ok_or_else(|| StoreError::Corrupt(format!("delivery state \"{state}\"")))?,
            attempts: r.get(6).map_err(db_err)?,
            next_at: r.get(7).map_err(db_err)?,
            created: r.get(8).map_err(db_err)?,
            last_error: r.get(9).map_err(db_err)?,
        })
    })())
}

fn update_delivery_in(c: &Connection, d: &Completion, now_ms: i64) -> Result<(), StoreError> {
    // A delivery that must be retried while a newer image of its tag was queued meanwhile is
    // superseded instead: an old image never reaches CI after a newer one.
    c.prepare_cached(
        "UPDATE deliveries SET state = CASE
            WHEN ?2 = 'pending' AND (state = 'superseded' OR EXISTS (SELECT 1 FROM deliveries d2
                 WHERE d2.trigger = deliveries.trigger AND d2.tag = deliveries.tag AND d2.id > deliveries.id))
            THEN 'superseded' ELSE ?2 END,
         attempts = ?3, next_at = ?4, last_error = COALESCE(?5, last_error), updated = ?6 WHERE id = ?1",
    )
    .and_then(|mut st| st.execute(params![d.id, d.state.as_str(), d.attempts, d.next_at, d.error, now_ms]))
    .map_err(db_err)?;
    Ok(())
}
