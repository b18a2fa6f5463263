//! Events: the exact CloudEvent on the exact subject, JetStream replay, the outbox across a NATS
//! outage, the version check, and `istream watch` on the embedded default.

use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;

use crate::support::*;

fn nats_config(url: &str) -> String {
    format!("[nats]\nurl = \"{url}\"\nsubject_prefix = \"istream\"\n")
}

async fn stream_events(url: &str) -> Vec<(String, serde_json::Value)> {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("ISTREAM").await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut msgs = consumer
        .fetch()
        .max_messages(1000)
        .expires(Duration::from_millis(500))
        .messages()
        .await
        .unwrap();
    while let Some(Ok(m)) = msgs.next().await {
        out.push((
            m.subject.to_string(),
            serde_json::from_slice(&m.payload).unwrap(),
        ));
        let _ = m.ack().await;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_get_the_exact_cloudevent_and_can_replay() {
    let reg = Registry::start();
    let d1 = Pusher::new(&reg.host).image("a/py", "3.6", "1").await;
    let nats = Nats::start();
    let e = Engine::start(&nats_config(&nats.url));
    let client = async_nats::connect(&nats.url).await.unwrap();
    let mut sub = client.subscribe("istream.default.py.>").await.unwrap();
    client.flush().await.unwrap();
    e.import_new("py:3.6", &format!("{}/a/py:3.6", reg.host));
    let msg = tokio::time::timeout(DEADLINE, sub.next())
        .await
        .expect("event arrives")
        .unwrap();
    assert_eq!(msg.subject.as_str(), "istream.default.py.3%2E6");
    let ev: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    let t = e.istag("py:3.6").unwrap();
    assert_eq!(ev["specversion"], "1.0");
    assert_eq!(ev["type"], "io.istream.tag.changed");
    assert_eq!(ev["id"], t["history"][0]["id"]);
    assert_eq!(ev["subject"], "default/py:3.6");
    assert_eq!(ev["datacontenttype"], "application/json");
    assert_eq!(ev["time"], t["history"][0]["created"]);
    assert_eq!(
        ev["data"],
        serde_json::json!({
            "namespace": "default", "stream": "py", "tag": "3.6", "digest": d1, "previous": null,
            "image": format!("{}/a/py@{d1}", reg.host), "generation": t["history"][0]["generation"], "cause": "import",
            "previous_image": null
        })
    );
    assert_eq!(
        msg.headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.to_string()),
        ev["id"].as_str().map(str::to_string)
    );

    // replay from the JetStream stream
    let replay = stream_events(&nats.url).await;
    assert_eq!(replay.len(), 1);
    assert_eq!(replay[0].1, ev);

    // a failed import is its own event type, on a subject no tag subject can match
    let mut status = client.subscribe("istream._status.>").await.unwrap();
    client.flush().await.unwrap();
    let _ = e.cli(&[
        "import-image",
        "py:3.6",
        &format!("--from={}/a/missing", reg.host),
    ]);
    let m = tokio::time::timeout(DEADLINE, status.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        m.subject.as_str(),
        "istream._status.import_failed.default.py.3%2E6"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_loses_nothing_and_duplicates_nothing() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    push.image("a/app", "latest", "0").await;
    let mut nats = Nats::start();
    let e = Engine::start(&nats_config(&nats.url));
    e.import_new("app", &format!("{}/a/app", reg.host));
    wait_for("first event in the stream", || async {
        (stream_events(&nats.url).await.len() == 1).then_some(())
    })
    .await;

    nats.stop();
    let mut digests = Vec::new();
    for i in 1..=3 {
        digests.push(push.image("a/app", "latest", &i.to_string()).await);
        expect_code(&e.cli(&["import-image", "app"]), 0);
    }
    assert_eq!(
        e.istag("app").unwrap()["digest"],
        digests[2].as_str(),
        "the engine keeps importing"
    );
    nats.restart();
    let events = wait_for("all four events", || async {
        let ev = stream_events(&nats.url).await;
        (ev.len() >= 4).then_some(ev)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let events = {
        let again = stream_events(&nats.url).await;
        if again.len() > events.len() {
            again
        } else {
            events
        }
    };
    assert_eq!(
        events.len(),
        4,
        "no duplicates: {:?}",
        events.iter().map(|e| &e.1["id"]).collect::<Vec<_>>()
    );
    let got: Vec<&str> = events[1..]
        .iter()
        .map(|e| e.1["data"]["digest"].as_str().unwrap())
        .collect();
    assert_eq!(
        got,
        digests.iter().map(String::as_str).collect::<Vec<_>>(),
        "in order"
    );
}

#[test]
fn nats_older_than_2_10_is_refused_clearly() {
    let old =
        std::env::var("ISTREAM_TEST_OLD_NATS").unwrap_or_else(|_| "/usr/sbin/nats-server".into());
    let version = Command::new(&old)
        .arg("--version")
        .output()
        .expect("Debian's nats-server (scripts/test.sh installs it)");
    let v = String::from_utf8_lossy(&version.stdout);
    assert!(v.contains("v2.9"), "{old} should be Debian's 2.9: {v}");
    let nats = Nats::start_bin(old.into(), None);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("triggers.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[store]\npath = \"{}\"\n{}",
            dir.path().join("db").display(),
            nats_config(&nats.url)
        ),
    )
    .unwrap();
    let o = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    expect_code(&o, 1);
    let err = stderr(&o);
    assert!(err.contains("2.10") && err.contains("2.9"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_changes_on_the_embedded_default() {
    let reg = Registry::start();
    let e = Engine::start("");
    let (mut child, rx) = watch_lines(&e.url, "w");
    let (line, pushed) = change_until_watched(&reg, &e, "w", &rx).await;
    let ev: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(ev["type"], "io.istream.tag.changed");
    let digest = ev["data"]["digest"].as_str().unwrap().to_string();
    assert!(pushed.contains(&digest), "{line}");
    let _ = child.kill();
    let _ = child.wait();
}

/// SPEC 10: a change's event says what changed — previous image, OCI annotations merged with
/// the config's labels, layers against the previous image, the forge's compare page — also
/// recorded on the history entry; an index lists its platforms; `fetch_details = false` skips
/// it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_explain_the_change() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    let rx = receiver::Receiver::start().await;
    let e = Engine::start(&format!(
        "[[trigger]]\nname = \"hook\"\non = [\"app:latest\", \"multi:latest\"]\nwebhook = {{ url = \"{}/x\" }}\n",
        rx.url
    ));
    let base = "layer: the base";
    let a = push.annotated_image(
        "acme/app",
        "latest",
        serde_json::json!({"org.opencontainers.image.revision": "aaa111", "org.opencontainers.image.source": "https://github.com/acme/app", "maintainer": "ops"}),
        serde_json::json!({"org.opencontainers.image.version": "1.0"}),
        &[base],
    )
    .await;
    e.import_new("app", &format!("{}/acme/app", reg.host));
    rx.wait_requests(1).await;
    let extra = "layer: the app, version two";
    let b = push.annotated_image(
        "acme/app",
        "latest",
        serde_json::json!({"org.opencontainers.image.revision": "bbb222", "org.opencontainers.image.source": "https://github.com/acme/app"}),
        serde_json::json!({"org.opencontainers.image.version": "2.0", "org.opencontainers.image.revision": "bbb222"}),
        &[base, extra],
    )
    .await;
    expect_code(&e.cli(&["import-image", "app"]), 0);
    let reqs = rx.wait_requests(2).await;
    let ev = reqs
        .iter()
        .map(|r| r.json())
        .find(|j| j["data"]["digest"] == b.as_str())
        .unwrap();
    let d = &ev["data"];
    assert_eq!(d["previous"], a.as_str());
    assert_eq!(
        d["previous_image"],
        format!("{}/acme/app@{a}", reg.host).as_str()
    );
    assert_eq!(d["annotations"]["version"], "2.0");
    assert_eq!(d["annotations"]["revision"], "bbb222");
    assert_eq!(d["annotations"]["source"], "https://github.com/acme/app");
    assert!(
        d["annotations"].get("maintainer").is_none(),
        "only OCI labels: {d}"
    );
    assert_eq!(d["layers"]["added"], 1, "{d}");
    assert_eq!(d["layers"]["removed"], 0);
    assert_eq!(d["layers"]["size_delta"], extra.len());
    assert_eq!(
        d["compare_url"],
        "https://github.com/acme/app/compare/aaa111...bbb222"
    );
    let first = reqs
        .iter()
        .map(|r| r.json())
        .find(|j| j["data"]["digest"] == a.as_str())
        .unwrap();
    assert_eq!(first["data"]["previous_image"], serde_json::Value::Null);
    assert!(
        first["data"].get("layers").is_none(),
        "no previous image, no layer comparison"
    );
    // recorded with the history entry
    let t = e.istag("app").unwrap();
    assert_eq!(
        t["history"][0]["details"]["annotations"]["revision"],
        "bbb222"
    );

    // an index lists its platforms
    push.index(
        "acme/multi",
        "latest",
        &[("linux", "amd64", "m1"), ("linux", "arm64", "m1")],
    )
    .await;
    e.import_new("multi", &format!("{}/acme/multi", reg.host));
    let reqs = rx.wait_requests(3).await;
    let m = reqs
        .iter()
        .map(|r| r.json())
        .find(|j| j["data"]["stream"] == "multi")
        .unwrap();
    assert_eq!(
        m["data"]["platforms"],
        serde_json::json!(["linux/amd64", "linux/arm64"])
    );

    // fetch_details = false: the change, without details
    let off = Engine::start(&format!(
        "[[registry]]\nhost = \"{}\"\nfetch_details = false\n",
        reg.host
    ));
    off.import_new("app", &format!("{}/acme/app", reg.host));
    let t = off.istag("app").unwrap();
    assert_eq!(t["digest"], b.as_str());
    assert!(t["history"][0].get("details").is_none(), "{t}");
}
