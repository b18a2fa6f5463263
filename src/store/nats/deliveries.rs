//! Trigger state and the work queue: firing (publish to `<S>_WORK`, then record in
//! `<S>_TRIGGERS`), claiming and completing deliveries, their records in `<S>_DELIVERIES`,
//! summaries, retries and retention.

use super::*;

impl NatsStore {
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
        f: impl Fn(&mut DeliveryRecord) -> bool,
    ) -> Result<(), StoreError> {
        use crate::retry::{Cas, compare_and_set};
        let f = &f;
        let done = compare_and_set(20, || async move {
            let Some((mut rec, rev)) = self.delivery_record(key).await? else {
                return Ok(Cas::Done(()));
            };
            if !f(&mut rec) {
                return Ok(Cas::Done(()));
            }
            let body = serde_json::to_vec(&rec).map_err(|e| corrupt("delivery record", e))?;
            match self.deliveries.update(key, body.into(), rev).await {
                Ok(_) => Ok(Cas::Done(())),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(Cas::Conflict),
                Err(e) => Err(backend("delivery write", e)),
            }
        })
        .await?;
        done.ok_or_else(|| StoreError::Conflict(format!("delivery {key}")))
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
        use crate::retry::{Cas, compare_and_set};
        let (digest, state_key) = (&digest, &state_key);
        let done = compare_and_set(20, || async move {
            let current = self.fired_state(state_key).await?;
            let outcome = rules::fire(
                current.as_ref().map(|(s, _)| s.digest.as_str()),
                digest,
                r.skip_initial,
            );
            if outcome == FireOutcome::Unchanged {
                return Ok(Cas::Done(outcome));
            }
            let initial_skip = outcome == FireOutcome::Recorded;
            let mut delivery = None;
            if !initial_skip {
                // Record, then publish, then move the state: a crash before the state moves
                // means planning does it again (the record exists, the server drops the
                // duplicate publication within its window), never a state without a delivery.
                let dkey = short_hash(&[&r.trigger, &r.tag, &r.event.id]);
                let rec = DeliveryRecord {
                    id: self.new_delivery_id(now_ms),
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
                        self.update_record(&old_key, |d| supersede(d, digest))
                            .await?;
                    }
                    Ok(Cas::Done(outcome))
                }
                // Another replica planned the same tag meanwhile: look again.
                Err((true, _)) => Ok(Cas::Conflict),
                Err((false, e)) => Err(backend("trigger state write", e)),
            }
        })
        .await?;
        done.ok_or_else(|| StoreError::Conflict(format!("trigger {} on {}", r.trigger, r.tag)))
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
        // Whether the trigger fired a newer image of the tag matters only to a retry.
        let fired = match d.state {
            DeliveryState::Pending => match self.delivery_record(&key).await? {
                Some((r, _)) => self
                    .fired_state(&short_hash(&[&r.trigger, &r.tag]))
                    .await?
                    .map(|(st, _)| st),
                None => None,
            },
            _ => None,
        };
        let state = Mutex::new(d.state);
        self.update_record(&key, |r| {
            let newer = fired.as_ref().is_some_and(|st| newer_fired(r, &key, st));
            r.state = rules::after_attempt(r.state, d.state, newer);
            *lock(&state) = r.state;
            r.attempts = d.attempts;
            r.next_at = d.next_at;
            if d.error.is_some() {
                r.last_error = d.error.clone();
            }
            true
        })
        .await?;
        let state = *lock(&state);
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
    pub async fn claim_due(&self, now_ms: i64, limit: usize) -> Result<Vec<Delivery>, StoreError> {
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
                    && newer_fired(r, &item.key, &st)
                    && supersede(r, &st.digest)
                {
                    self.update_record(&item.key, |d| supersede(d, &st.digest))
                        .await?;
                }
            }
            let Some((rec, _)) = rec else {
                // Expired or purged: nothing to attempt.
                let _ = msg.ack().await;
                continue;
            };
            match rules::claim(rec.state, rec.next_at, now_ms) {
                rules::Claim::Now => {
                    // Completions name the delivery by its record id, as in every listing.
                    let clash = {
                        let mut inflight = lock(&self.inflight);
                        match inflight.get_mut(&rec.id) {
                            // The server redelivered a message whose attempt is still running
                            // here: the attempt settles the newest delivery of it.
                            Some((k, held)) if *k == item.key => {
                                *held = msg;
                                None
                            }
                            // Two replicas minted one id in the same millisecond: later.
                            Some(_) => Some(msg),
                            None => {
                                out.push(rec.to_delivery());
                                inflight.insert(rec.id, (item.key, msg));
                                None
                            }
                        }
                    };
                    if let Some(msg) = clash {
                        let _ = msg.ack_with(AckKind::Nak(None)).await;
                    }
                }
                rules::Claim::Later(ms) => {
                    let _ = msg
                        .ack_with(AckKind::Nak(Some(Duration::from_millis(ms as u64))))
                        .await;
                }
                // Settled already: a redelivery after a crash, or superseded.
                rules::Claim::Never => {
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
                && newer_fired(&r, &k, st)
                && supersede(&mut r, &st.digest)
            {
                self.update_record(&k, |d| supersede(d, &st.digest)).await?;
            }
            out.push(r);
        }
        out.sort_by_key(|r| std::cmp::Reverse(r.id));
        Ok(out)
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
            let purgeable = serde_json::from_slice::<DeliveryRecord>(&entry.value)
                .is_ok_and(|r| rules::purgeable(r.state, written_ms, cutoff_ms));
            if purgeable {
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
                let Some(next) = rules::retry(d.state) else {
                    return false;
                };
                d.state = next;
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

impl NatsStore {
    /// Delivery ids order by creation across replicas without coordination, as SQLite's row
    /// ids do within one file: the creation time in milliseconds and a random tail, strictly
    /// increasing within this process.
    fn new_delivery_id(&self, now_ms: i64) -> i64 {
        let candidate = now_ms.max(0).saturating_mul(1_000) + fastrand::i64(0..1_000);
        let prev = self
            .last_delivery_id
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
                Some(candidate.max(p + 1))
            })
            .unwrap_or(candidate);
        candidate.max(prev + 1)
    }
}

/// The trigger fired for the tag again after `r` was created (the work of `rules::supersede`
/// that SQLite does at firing time, done here where the record is next read).
fn newer_fired(r: &DeliveryRecord, key: &str, st: &FiredState) -> bool {
    st.delivery.as_deref() != Some(key) && st.fired_at > r.created
}

/// `rules::supersede` applied to a record; false if it is left alone.
fn supersede(d: &mut DeliveryRecord, by: &str) -> bool {
    match rules::supersede(d.state, by) {
        Some(note) => {
            d.state = DeliveryState::Superseded;
            d.last_error = Some(note);
            true
        }
        None => false,
    }
}
