//! The documents: image streams in `<S>_STREAMS` with their outboxes (commit by
//! compare-and-set, publication, listing), and push hints in `<S>_HINTS`.

use super::*;

impl NatsStore {
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
    pub async fn load(&self, key: &str) -> Result<Option<crate::store::Loaded>, StoreError> {
        Ok(self.get(key).await?.map(|(doc, rev)| crate::store::Loaded {
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
