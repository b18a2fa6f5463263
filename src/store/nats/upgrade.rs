//! Converts the buckets of an earlier layout in place at start (SPEC 11). Schema 1 kept each
//! stream as one document (with its outbox) in `<S>_STREAMS`; schema 2 keeps a small head
//! there and a record per tag and per history entry beside it. Each stream is converted on
//! its own: its tags and history are written first, then its entry is replaced by the head
//! with one compare-and-set, so a stream is either still whole in the old layout or complete
//! in the new one. A crash part way leaves the marker at 1 and the next start converts what
//! is left (records a crashed attempt wrote for a stream still in the old layout are purged
//! first). The marker moves to 2 when every stream is converted. Trigger state, deliveries,
//! the work queue and hints keep their layout.

use super::documents::{self, HEAD_V, Head, Meta, TagRecord};
use super::*;

/// Test hook: the process aborts after converting this many streams (a crash mid-upgrade).
const CRASH_AFTER: &str = "ISTREAM_TEST_CRASH_UPGRADE_AFTER";

impl NatsStore {
    pub(super) async fn upgrade(&self, meta: &kv::Store, from: u32) -> Result<(), StoreError> {
        let keys = all_keys(&self.streams, "key listing").await?;
        let crash_after: Option<usize> =
            std::env::var(CRASH_AFTER).ok().and_then(|v| v.parse().ok());
        if !keys.is_empty() {
            tracing::info!(
                from_schema = from,
                to_schema = SCHEMA_VERSION,
                streams = keys.len(),
                release = env!("CARGO_PKG_VERSION"),
                "upgrading the JetStream store in place"
            );
        }
        let mut converted = 0usize;
        for key in &keys {
            if self.convert_v1(key).await? {
                converted += 1;
                if crash_after == Some(converted) {
                    tracing::error!(converted, "{CRASH_AFTER}: aborting mid-upgrade");
                    std::process::abort();
                }
            }
        }
        meta.put("schema", SCHEMA_VERSION.to_string().into())
            .await
            .map_err(|e| backend("bucket META, key schema", e))?;
        if !keys.is_empty() {
            tracing::info!(
                from_schema = from,
                to_schema = SCHEMA_VERSION,
                converted,
                "JetStream store upgraded"
            );
        }
        Ok(())
    }

    /// Converts one stream; false when it is already converted (or gone).
    async fn convert_v1(&self, key: &str) -> Result<bool, StoreError> {
        let (rev, Some(value)) = documents::entry(&self.streams, key, key).await? else {
            return Ok(false);
        };
        let probe: serde_json::Value = serde_json::from_slice(&value)
            .map_err(|e| corrupt(&format!("image stream {key}"), e))?;
        if probe.get("v").and_then(|v| v.as_u64()) == Some(u64::from(HEAD_V)) {
            return Ok(false);
        }
        let old: RecordV1 = serde_json::from_value(probe)
            .map_err(|e| corrupt(&format!("image stream {key} (schema 1)"), e))?;
        let mut head = Head {
            v: HEAD_V,
            outbox: old.outbox,
            ..Default::default()
        };
        documents::purge(&self.tags, &format!("{}.*", documents::token(key)), key).await?;
        documents::purge(&self.history, &format!("{}.>", documents::token(key)), key).await?;
        if let Some(doc) = &old.doc {
            head.meta = Some(Meta::of(doc, 1));
            for (name, t) in &doc.tags {
                let what = format!("tag {key}:{name}");
                let inc = documents::new_inc();
                let puts = t.history.iter().rev().enumerate().map(|(i, e)| {
                    let hk = documents::history_key(key, name, &inc, i as u64 + 1);
                    let body = serde_json::to_vec(e);
                    let what = &what;
                    async move {
                        let body = body.map_err(|e| corrupt(what, e))?;
                        self.history
                            .put(&hk, body.into())
                            .await
                            .map_err(|e| backend(&format!("history write of {what}"), e))
                    }
                });
                futures_util::future::try_join_all(puts).await?;
                let rec = TagRecord {
                    name: name.clone(),
                    tag: documents::recent(t),
                    inc,
                    lo: 1,
                    hi: t.history.len() as u64,
                };
                let body = serde_json::to_vec(&rec).map_err(|e| corrupt(&what, e))?;
                self.tags
                    .put(documents::tag_key(key, name), body.into())
                    .await
                    .map_err(|e| backend(&format!("write of {what}"), e))?;
                if let Some(src) = documents::same_stream_source(t) {
                    head.links
                        .entry(src.to_string())
                        .or_default()
                        .insert(name.clone());
                }
            }
        }
        let body = serde_json::to_vec(&head).map_err(|e| corrupt("image stream", e))?;
        match self.streams.update(key, body.into(), rev).await {
            Ok(_) => Ok(true),
            // Another replica converted it meanwhile.
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(e) => Err(backend(&format!("write of {key}"), e)),
        }
    }
}
