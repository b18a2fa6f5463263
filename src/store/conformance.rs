//! Behaviour every store must have, run against each implementation: by the unit tests for
//! SQLite and by the integration tests (which start a nats-server) for JetStream.

use super::*;
use crate::model::*;
use chrono::Utc;

fn event(tag: &str, digest: &str) -> Event {
    Event::new(
        model_event::TAG_CHANGED,
        uuid::Uuid::now_v7().to_string(),
        "test",
        Utc::now(),
        EventData {
            digest: Some(digest.into()),
            cause: Some("import".into()),
            generation: 1,
            ..EventData::for_tag("default", "s", tag)
        },
    )
}

use crate::model::event as model_event;

/// Panics at the first difference from the expected behaviour.
pub async fn behaviour(store: Store) {
    let doc = ImageStream::new("default", "s", Utc::now());
    // create requires "must not exist"
    let rev = store
        .commit(Commit {
            key: "default/s".into(),
            expected_rev: None,
            doc: Some(doc.clone()),
            events: vec![event("a", "d1")],
            ..Default::default()
        })
        .await
        .unwrap();
    let again = store
        .commit(Commit {
            key: "default/s".into(),
            expected_rev: None,
            doc: Some(doc.clone()),
            events: vec![],
            ..Default::default()
        })
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))));
    // stale revision conflicts, current succeeds
    let stale = store
        .commit(Commit {
            key: "default/s".into(),
            expected_rev: Some(rev + 5),
            doc: Some(doc.clone()),
            events: vec![],
            ..Default::default()
        })
        .await;
    assert!(matches!(stale, Err(StoreError::Conflict(_))));
    let rev2 = store
        .commit(Commit {
            key: "default/s".into(),
            expected_rev: Some(rev),
            doc: Some(doc.clone()),
            events: vec![event("a", "d2")],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(rev2 > rev);
    assert_eq!(store.get("default/s").await.unwrap().unwrap().1, rev2);
    assert_eq!(store.list(Some("default")).await.unwrap().len(), 1);
    assert_eq!(store.list(Some("other")).await.unwrap().len(), 0);
    // outbox in order
    let pending = store.pending_events(10).await.unwrap();
    assert_eq!(pending.len(), 2);
    assert_eq!(pending[0].1.data.digest.as_deref(), Some("d1"));
    store.mark_published(vec![pending[0].0]).await.unwrap();
    assert_eq!(store.pending_events(10).await.unwrap().len(), 1);
    // trigger bookkeeping: supersede pending
    let req = |d: &str, skip| FireRequest {
        trigger: "t".into(),
        tag: "default/s:a".into(),
        event: event("a", d),
        skip_initial: skip,
    };
    assert_eq!(
        store.fire_due(vec![req("d1", false)], 0).await.unwrap(),
        vec![FireOutcome::Fired]
    );
    assert_eq!(
        store.fire_due(vec![req("d1", false)], 0).await.unwrap(),
        vec![FireOutcome::Unchanged],
        "never twice"
    );
    assert_eq!(
        store.fire_due(vec![req("d2", false)], 0).await.unwrap(),
        vec![FireOutcome::Fired]
    );
    let other = FireRequest {
        trigger: "u".into(),
        ..req("d2", true)
    };
    assert_eq!(
        store.fire_due(vec![other], 0).await.unwrap(),
        vec![FireOutcome::Recorded],
        "skip_initial"
    );
    assert_eq!(
        store
            .last_fired("t", "default/s:a")
            .await
            .unwrap()
            .as_deref(),
        Some("d2")
    );
    let due = store.claim_due(1, 10).await.unwrap();
    assert!(
        store.claim_due(1, 10).await.unwrap().is_empty(),
        "claimed once"
    );
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].digest, "d2");
    let sum = store.summary("t").await.unwrap();
    assert_eq!(
        (sum.pending, sum.superseded),
        (1, 1),
        "in flight counts as pending"
    );
    let dead = Completion {
        id: due[0].id,
        state: DeliveryState::Dead,
        attempts: 3,
        next_at: 0,
        error: Some("404".into()),
    };
    store.complete_and_claim(vec![dead], 1, 0).await.unwrap();
    assert_eq!(store.summary("t").await.unwrap().dead, 1);
    assert_eq!(store.retry_dead("t", 2).await.unwrap(), 1);
    assert_eq!(store.summary("t").await.unwrap().pending, 1);
    let again = store.claim_due(3, 10).await.unwrap();
    assert_eq!(again.len(), 1, "a re-queued delivery is claimable");
    let ok = Completion {
        id: again[0].id,
        state: DeliveryState::Delivered,
        attempts: 1,
        next_at: 0,
        error: None,
    };
    store.complete_and_claim(vec![ok], 4, 0).await.unwrap();
    let sum = store.summary("t").await.unwrap();
    assert_eq!((sum.pending, sum.dead, sum.delivered), (0, 0, 1));
    assert!(store.claim_due(5, 10).await.unwrap().is_empty());
    // delete (a store may move the revision when it publishes, so read it again)
    let rev3 = store.get("default/s").await.unwrap().unwrap().1;
    store
        .commit(Commit {
            key: "default/s".into(),
            expected_rev: Some(rev3),
            doc: None,
            events: vec![],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(store.get("default/s").await.unwrap().is_none());
}
