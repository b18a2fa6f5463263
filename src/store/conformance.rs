//! Behaviour every store must have, run against each implementation: by the unit tests for
//! SQLite and by the integration tests (which start a nats-server) for JetStream.

// A test suite: a failed unwrap is a failed check.
#![allow(clippy::unwrap_used)]

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
    // Ids mean the same in every store: the id claimed is the id listed, and ids grow with
    // creation.
    let listed = store.deliveries("t", 10).await.unwrap();
    let digests: Vec<&str> = listed.iter().map(|d| d.digest.as_str()).collect();
    assert_eq!(digests, ["d2", "d1"], "newest first");
    assert_eq!(listed[0].id, due[0].id, "claimed under its listed id");
    assert!(listed[0].id > listed[1].id, "ids grow with creation");
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
    // Retention: settled ones go after the cutoff, nothing else does.
    let far_future = Utc::now().timestamp_millis() + 3_600_000;
    assert_eq!(
        store.purge_settled(0).await.unwrap(),
        0,
        "nothing is that old"
    );
    let purged = store.purge_settled(far_future).await.unwrap();
    assert_eq!(purged, 2, "the delivered and the superseded one");
    let sum = store.summary("t").await.unwrap();
    assert_eq!((sum.delivered, sum.superseded), (0, 0));
    assert_eq!(sum.last_fired.len(), 1, "trigger state is not a delivery");
    assert!(store.claim_due(5, 10).await.unwrap().is_empty());
    // A retry of an image after a newer one fired is superseded: it never follows the newer.
    let req_b = |d: &str| FireRequest {
        trigger: "t".into(),
        tag: "default/s:b".into(),
        event: event("b", d),
        skip_initial: false,
    };
    store.fire_due(vec![req_b("e1")], 10).await.unwrap();
    let first = store.claim_due(10, 10).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(
        store.fire_due(vec![req_b("e2")], 11).await.unwrap(),
        vec![FireOutcome::Fired]
    );
    let retry = Completion {
        id: first[0].id,
        state: DeliveryState::Pending,
        attempts: 1,
        next_at: 12,
        error: Some("503".into()),
    };
    let next = store.complete_and_claim(vec![retry], 20, 10).await.unwrap();
    let digests: Vec<&str> = next.iter().map(|d| d.digest.as_str()).collect();
    assert_eq!(digests, ["e2"], "only the newer image is attempted");
    let sum = store.summary("t").await.unwrap();
    assert_eq!((sum.pending, sum.superseded), (1, 1));
    per_tag_changes(&store).await;
    big_changes(&store).await;
    firing_commits(&store).await;
    // push hints: recorded (a repeat replaces), listed, dropped
    let hint = |tag: &str| Hint {
        registry: "r.example".into(),
        repository: "a/b".into(),
        tag: tag.into(),
        digest: None,
    };
    store
        .record_hints(vec![hint("1"), hint("2"), hint("1")])
        .await
        .unwrap();
    let mut keys: Vec<String> = store
        .pending_hints()
        .await
        .unwrap()
        .iter()
        .map(Hint::key)
        .collect();
    keys.sort();
    assert_eq!(keys, vec!["r.example/a/b:1", "r.example/a/b:2"]);
    store.drop_hint("r.example/a/b:1").await.unwrap();
    assert_eq!(store.pending_hints().await.unwrap(), vec![hint("2")]);
    store.drop_hint("r.example/a/b:2").await.unwrap();
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

/// Creates a stream as a whole, with the events given.
async fn create(store: &Store, key: &str, doc: ImageStream, events: Vec<Event>) {
    store
        .commit(Commit {
            key: key.into(),
            expected_rev: None,
            doc: Some(doc),
            events,
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Publishes whatever is in the outbox; returns how many events that was.
async fn drain(store: &Store) -> usize {
    let pending = store.pending_events(100_000).await.unwrap();
    let n = pending.len();
    store
        .mark_published(pending.into_iter().map(|(s, _)| s).collect())
        .await
        .unwrap();
    n
}

/// A change of thousands of tags with thousands of events at once (a big stream created,
/// deleted): committed whole, every event published once.
async fn big_changes(store: &Store) {
    drain(store).await;
    let key = "default/big";
    let n = 3000u32;
    let mut s = ImageStream::new("default", "big", Utc::now());
    let mut events = Vec::new();
    for i in 0..n {
        let name = format!("t{i}");
        s.set_spec(
            &name,
            TagSpec::new(TagFrom::Image(format!("r.example/big:{name}"))),
        );
        s.tags.get_mut(&name).unwrap().record(entry(i));
        events.push(event(&name, &format!("d{i}")));
    }
    create(store, key, s, events).await;
    let l = store.load(key, Scope::Heads).await.unwrap().unwrap();
    assert_eq!(l.doc.tags.len(), n as usize);
    let (_, t) = store.tag(key, "t17").await.unwrap().unwrap();
    assert_eq!(t.history, vec![entry(17)]);
    // read a page at a time (the scheduler's read): every tag once, with its head, in pages
    // no bigger than asked
    let mut pages = store.head_pages(key, 256);
    let mut seen = BTreeMap::new();
    let mut count = 0;
    while let Some(page) = pages.recv().await {
        let page = page.unwrap();
        assert!(page.tags.len() <= 256 && !page.tags.is_empty());
        assert_eq!(
            (page.namespace.as_str(), page.name.as_str()),
            ("default", "big")
        );
        count += 1;
        for (name, t) in page.tags {
            assert!(seen.insert(name, t).is_none(), "a tag in two pages");
        }
    }
    assert_eq!(seen.len(), n as usize);
    assert_eq!(count, (n as usize).div_ceil(256));
    assert_eq!(seen["t17"].history, vec![entry(17)]);
    assert!(store.head_pages("default/none", 256).recv().await.is_none());
    let pending = store.pending_events(100_000).await.unwrap();
    let ids: std::collections::BTreeSet<&str> =
        pending.iter().map(|(_, e)| e.id.as_str()).collect();
    assert_eq!(ids.len(), n as usize, "every event of the big change, once");
    assert_eq!(drain(store).await, n as usize);
    assert_eq!(
        drain(store).await,
        0,
        "published means gone from the outbox"
    );
    // a change of one tag after it is cheap and ordinary
    change(store, key, Scope::Tags(vec!["t5".into()]), 0, |d| {
        d.tags.get_mut("t5").unwrap().record(entry(n + 5));
    })
    .await
    .unwrap();
    let (_, t) = store.tag(key, "t5").await.unwrap().unwrap();
    assert_eq!(t.history, vec![entry(n + 5), entry(5)]);
    // deleting it: a tombstone holds its thousands of events until they are published
    let rev = store.get(key).await.unwrap().unwrap().1;
    let gone: Vec<Event> = (0..n).map(|i| event(&format!("t{i}"), "gone")).collect();
    store
        .commit(Commit {
            key: key.into(),
            expected_rev: Some(rev),
            doc: None,
            events: gone,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(store.get(key).await.unwrap().is_none());
    assert_eq!(drain(store).await, n as usize, "the deletions");
    assert_eq!(drain(store).await, 0);
}

fn entry(n: u32) -> HistoryEntry {
    HistoryEntry {
        digest: Digest::parse(&format!("sha256:{:064x}", n)).unwrap(),
        image: format!("r.example/p@sha256:{:064x}", n),
        created: chrono::DateTime::from_timestamp(1_700_000_000 + i64::from(n), 0).unwrap(),
        generation: 1,
        cause: Cause::Import,
        id: format!("id-{n}"),
        media_type: None,
        platforms: vec![],
        details: None,
        source_tag: None,
    }
}

/// A change as the engine makes it: load the tags it needs, change them, commit what differs.
async fn change(
    store: &Store,
    key: &str,
    scope: Scope,
    max_history: usize,
    f: impl Fn(&mut ImageStream),
) -> Result<i64, StoreError> {
    let l = store.load(key, scope).await?.expect("stream exists");
    let mut after = l.doc.clone();
    f(&mut after);
    crate::core::trim_histories(Some(&l.doc), &mut after, max_history);
    store
        .commit(Commit {
            key: key.into(),
            expected_rev: Some(l.rev),
            tags: Some(crate::core::tag_writes(Some(&l.doc), &after, &l.tag_revs)),
            meta_changed: l.doc.generation != after.generation,
            max_history,
            doc: Some(after),
            events: vec![],
        })
        .await
}

/// Tags change one by one: a change loads a tag with its alias closure, writes what differs,
/// keeps the rest (and every history entry) as it was, and trims history when asked to.
async fn per_tag_changes(store: &Store) {
    let key = "default/p";
    let mut s = ImageStream::new("default", "p", Utc::now());
    s.set_spec("a", TagSpec::new(TagFrom::Image("r.example/p:a".into())));
    let mut alias = TagSpec::new(TagFrom::Tag("a".into()));
    alias.alias = true;
    s.set_spec("b", alias);
    s.set_spec("c", TagSpec::new(TagFrom::Image("r.example/p:c".into())));
    s.tags.get_mut("a").unwrap().record(entry(1));
    s.tags.get_mut("b").unwrap().record(entry(1));
    create(store, key, s, Vec::new()).await;
    // b's closure holds its source a
    let l = store
        .load(key, Scope::Tags(vec!["b".into()]))
        .await
        .unwrap()
        .unwrap();
    assert!(l.doc.tags.contains_key("a") && l.doc.tags.contains_key("b"));
    // a change of c alone
    change(store, key, Scope::Tags(vec!["c".into()]), 0, |d| {
        d.tags.get_mut("c").unwrap().record(entry(2));
    })
    .await
    .unwrap();
    let (_, c) = store.tag(key, "c").await.unwrap().unwrap();
    assert_eq!(c.history, vec![entry(2)]);
    let (_, a) = store.tag(key, "a").await.unwrap().unwrap();
    assert_eq!(
        a.history,
        vec![entry(1)],
        "untouched tags keep their history"
    );
    // a stale read of c conflicts
    let stale = store
        .load(key, Scope::Tags(vec!["c".into()]))
        .await
        .unwrap()
        .unwrap();
    change(store, key, Scope::Tags(vec!["c".into()]), 0, |d| {
        d.tags.get_mut("c").unwrap().record(entry(3));
    })
    .await
    .unwrap();
    let mut late = stale.doc.clone();
    late.tags.get_mut("c").unwrap().record(entry(4));
    let res = store
        .commit(Commit {
            key: key.into(),
            expected_rev: Some(stale.rev),
            tags: Some(crate::core::tag_writes(
                Some(&stale.doc),
                &late,
                &stale.tag_revs,
            )),
            doc: Some(late),
            ..Default::default()
        })
        .await;
    assert!(matches!(res, Err(StoreError::Conflict(_))), "{res:?}");
    // history: every entry kept, newest first; then trimmed to the newest two
    let (_, c) = store.tag(key, "c").await.unwrap().unwrap();
    assert_eq!(c.history, vec![entry(3), entry(2)]);
    for n in 5..8 {
        change(store, key, Scope::Tags(vec!["a".into()]), 2, |d| {
            d.tags.get_mut("a").unwrap().record(entry(n));
        })
        .await
        .unwrap();
    }
    let (_, a) = store.tag(key, "a").await.unwrap().unwrap();
    assert_eq!(
        a.history,
        vec![entry(7), entry(6)],
        "max_entries keeps the newest"
    );
    // the whole stream, read back, has every tag
    let (full, _) = store.get(key).await.unwrap().unwrap();
    assert_eq!(full.tags.len(), 3);
    assert_eq!(full.tags["c"].history.len(), 2);
    // deleting one tag leaves the others
    change(store, key, Scope::Tags(vec!["c".into()]), 0, |d| {
        d.tags.remove("c");
    })
    .await
    .unwrap();
    assert!(store.tag(key, "c").await.unwrap().is_none());
    assert!(store.tag(key, "a").await.unwrap().is_some());
}

/// JetStream: a change whose head was written but whose tag writes were not (the process died
/// in between) is completed by the next replica that reads or changes the stream.
pub async fn unapplied_writes_roll_forward(first: Store, second: Store) {
    let Store::Nats(n) = &first else {
        panic!("a JetStream store is needed")
    };
    let key = "default/crash";
    let mut s = ImageStream::new("default", "crash", Utc::now());
    s.set_spec("a", TagSpec::new(TagFrom::Image("r.example/p:a".into())));
    s.set_spec("b", TagSpec::new(TagFrom::Image("r.example/p:b".into())));
    s.tags.get_mut("a").unwrap().record(entry(1));
    create(&first, key, s, Vec::new()).await;
    n.stop_after_head_write(true);
    change(&first, key, Scope::Tags(vec!["a".into()]), 0, |d| {
        d.tags.get_mut("a").unwrap().record(entry(2));
    })
    .await
    .unwrap();
    // Another replica: the change is there, history and all.
    let (_, a) = second.tag(key, "a").await.unwrap().unwrap();
    assert_eq!(a.history, vec![entry(2), entry(1)]);
    let l = second
        .load(key, Scope::Tags(vec!["a".into()]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l.doc.tags["a"].history[0], entry(2));
    // It changes the stream on from there (another tag, then the same one).
    change(&second, key, Scope::Tags(vec!["b".into()]), 0, |d| {
        d.tags.get_mut("b").unwrap().record(entry(3));
    })
    .await
    .unwrap();
    change(&second, key, Scope::Tags(vec!["a".into()]), 0, |d| {
        d.tags.get_mut("a").unwrap().record(entry(4));
    })
    .await
    .unwrap();
    let (full, _) = second.get(key).await.unwrap().unwrap();
    assert_eq!(full.tags["a"].history, vec![entry(4), entry(2), entry(1)]);
    assert_eq!(full.tags["b"].history, vec![entry(3)]);
    n.stop_after_head_write(false);
}

/// A change that fires its triggers in its own transaction (SQLite) fires exactly when it
/// commits: a change that conflicts fires nothing. JetStream commits the change alone.
async fn firing_commits(store: &Store) {
    let req = |d: &str| FireRequest {
        trigger: "cf".into(),
        tag: "default/f:a".into(),
        event: event("a", d),
        skip_initial: false,
    };
    let commit = |expected_rev| Commit {
        key: "default/f".into(),
        expected_rev,
        doc: Some(ImageStream::new("default", "f", Utc::now())),
        events: vec![],
        ..Default::default()
    };
    let (rev, fired) = store
        .commit_firing(commit(None), vec![req("d1")], 0)
        .await
        .unwrap();
    if !store.fires_in_commit() {
        assert!(fired.is_none());
        assert_eq!(store.last_fired("cf", "default/f:a").await.unwrap(), None);
        return;
    }
    let (reqs, outcomes) = fired.unwrap();
    assert_eq!(reqs.len(), 1);
    assert_eq!(outcomes, vec![FireOutcome::Fired]);
    let stale = store
        .commit_firing(commit(Some(rev + 7)), vec![req("d2")], 0)
        .await;
    assert!(matches!(stale, Err(StoreError::Conflict(_))));
    assert_eq!(
        store
            .last_fired("cf", "default/f:a")
            .await
            .unwrap()
            .as_deref(),
        Some("d1"),
        "a conflicting change fires nothing"
    );
    let (_, again) = store
        .commit_firing(commit(Some(rev)), vec![req("d1")], 0)
        .await
        .unwrap();
    assert_eq!(again.unwrap().1, vec![FireOutcome::Unchanged]);
    let due = store.claim_due(1, 10).await.unwrap();
    assert!(due.iter().any(|d| d.trigger == "cf" && d.digest == "d1"));
}
