//! Scale-out: replicas sharing the JetStream store act as one engine — the store behaves like
//! SQLite, each scheduled check runs once per period across replicas, a killed replica loses
//! no delivery, concurrent tags on two replicas are all recorded, and a NATS node may fail.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::support::receiver::Receiver;
use crate::support::*;

fn shared(nats_url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ISTREAM_STORE__KIND", "nats".to_string()),
        ("ISTREAM_NATS__URL", nats_url.to_string()),
    ]
}

fn replica(extra: &str, env: &[(&'static str, String)]) -> Engine {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Engine::start_env(extra, &env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_store_behaves_like_sqlite() {
    let nats = Nats::start();
    let cfg = istream::config::NatsConfig::with_url(&nats.url);
    let store = istream::store::Store::connect_nats(&cfg).await.unwrap();
    istream::store::conformance::behaviour(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_cut_short_after_its_head_write_is_completed_by_the_next_replica() {
    let nats = Nats::start();
    let cfg = istream::config::NatsConfig::with_url(&nats.url);
    let first = istream::store::Store::connect_nats(&cfg).await.unwrap();
    let second = istream::store::Store::connect_nats(&cfg).await.unwrap();
    istream::store::conformance::unapplied_writes_roll_forward(first, second).await;
}

/// A registry logging every request, holding `app:v1`, and a nats-server.
async fn counting_registry_with_app_v1() -> (Registry, Nats) {
    let reg = Registry::start_with(RegistryOptions {
        access_log: true,
        ..Default::default()
    });
    Pusher::new(&reg.host).image("app", "v1", "1").await;
    (reg, Nats::start())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_check_each_tag_once_per_period() {
    let (reg, nats) = counting_registry_with_app_v1().await;
    let (streams, per_stream) = (10, 30);
    // 150 checks/s are needed: the config lifts the per-replica budget for this registry.
    let cfg = scheduled_tags_config(&reg.host, "2s", streams, per_stream);
    let env = shared(&nats.url);
    let replicas: Vec<Engine> = (0..3).map(|_| replica(&cfg, &env)).collect();
    // Every tag imported, as any replica sees it.
    for r in &replicas {
        r.wait_tags_with_image(streams * per_stream).await;
    }
    // Measure the steady state: every replica sees the other two, and the imports each one
    // ran at start are over (one period later). Then ten periods: a measurement window, not a
    // wait for a condition.
    for r in &replicas {
        wait_for("three members seen by every replica", || async {
            r.log
                .find("cluster membership changed replicas=3")
                .map(|_| ())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = reg.manifest_requests();
    let window = Duration::from_secs(20);
    tokio::time::sleep(window).await;
    let checks = reg.manifest_requests() - before;
    let expected = streams * per_stream * 10;
    eprintln!(
        "3 replicas, 300 tags, 2 s period, 20 s: {checks} manifest requests (one check per tag per period: {expected}; one per replica: {})",
        expected * 3
    );
    assert!(
        checks * 4 >= expected * 3 && checks * 4 <= expected * 5,
        "{checks} checks in 20 s for 300 tags at a 2 s period; expected about {expected}"
    );
}

fn deliveries_config(rx: &Receiver, n: usize) -> String {
    let mut cfg = String::from(
        "[delivery]\nconcurrency = 2\ninitial_backoff = \"100ms\"\ntimeout = \"2s\"\n",
    );
    for i in 0..n {
        cfg += &format!(
            "\n[[trigger]]\nname = \"t{i}\"\non = [\"s{i}:latest\"]\nwebhook = {{ url = \"{}/t{i}\", timeout = \"2s\" }}\n",
            rx.url
        );
    }
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_replica_loses_no_delivery() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    let rx = Receiver::start().await;
    rx.set_delay(Duration::from_millis(300));
    let nats = Nats::start();
    let n = 12;
    for i in 0..n {
        push.image(&format!("a/s{i}"), "latest", "1").await;
    }
    let cfg = deliveries_config(&rx, n);
    let env = shared(&nats.url);
    let mut a = replica(&cfg, &env);
    let b = replica(&cfg, &env);
    for i in 0..n {
        a.import_new(&format!("s{i}"), &format!("{}/a/s{i}", reg.host));
    }
    rx.wait_requests(2).await;
    a.kill();
    rx.set_delay(Duration::ZERO);
    rx.wait_each_delivered_once_or_more(n).await;
    // The survivor's view: nothing pending, nothing dead.
    wait_for("all deliveries recorded as delivered", || async {
        let v: serde_json::Value = b.get("/api/v1/triggers").await.json().await.ok()?;
        let all = v.as_array()?;
        all.iter()
            .all(|t| t["pending"] == 0 && t["dead"] == 0 && t["delivered"] == 1)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tags_on_two_replicas_are_all_recorded() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    let n = 8;
    let mut digests = BTreeSet::new();
    for i in 0..n {
        digests.insert(push.image("app", &format!("v{i}"), &format!("{i}")).await);
    }
    let nats = Nats::start();
    let env = shared(&nats.url);
    let a = replica("", &env);
    let b = replica("", &env);
    let (ua, ub) = (a.url.clone(), b.url.clone());
    let host = reg.host.clone();
    let runs: Vec<_> = (0..n)
        .map(|i| {
            let url = if i % 2 == 0 { ua.clone() } else { ub.clone() };
            let src = format!("{host}/app:v{i}");
            std::thread::spawn(move || {
                std::process::Command::new(bin())
                    .args(["tag", &src, "app:latest"])
                    .env("ISTREAM_SERVER", url)
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for r in runs {
        expect_code(&r.join().unwrap(), 0);
    }
    for e in [&a, &b] {
        let t = e.istag("app:latest").unwrap();
        let hist: Vec<String> = t["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["digest"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(hist.len(), n, "every tag recorded once: {hist:?}");
        assert_eq!(hist.iter().cloned().collect::<BTreeSet<_>>(), digests);
    }
    // Each change published once, in the order the history records (newest first there).
    let hist: Vec<String> = a.istag("app:latest").unwrap()["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["digest"].as_str().unwrap().to_string())
        .collect();
    let published = published_digests(&nats.url, "istream.default.app.latest", n).await;
    let newest_first: Vec<String> = published.iter().rev().cloned().collect();
    assert_eq!(
        newest_first, hist,
        "events in the order of the history, once each"
    );
}

/// The digests of the `tag.changed` events on `subject` in the events stream, oldest first,
/// once at least `n` are there.
async fn published_digests(url: &str, subject: &str, n: usize) -> Vec<String> {
    let client = async_nats::connect(istream::bus::server_addrs(url).unwrap())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    wait_for("every change published", || async {
        let stream = js.get_stream("ISTREAM").await.ok()?;
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                filter_subject: subject.into(),
                ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .ok()?;
        let mut msgs = consumer.fetch().max_messages(1000).messages().await.ok()?;
        let mut out = Vec::new();
        while let Some(Ok(m)) = msgs.next().await {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).ok()?;
            out.push(v["data"]["digest"].as_str()?.to_string());
        }
        (out.len() >= n).then_some(out)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_node_lost_mid_run_loses_nothing() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    let rx = Receiver::start().await;
    let mut cluster = NatsCluster::start();
    cluster.wait_ready().await;
    let cfg = format!(
        "[nats]\nreplicas = 3\n\n[delivery]\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\nmax_attempts = 50\ntimeout = \"2s\"\n\n[[trigger]]\nname = \"deploy\"\non = [\"app:latest\"]\nwebhook = {{ url = \"{}/deploy\", timeout = \"2s\" }}\n",
        rx.url
    );
    let env = vec![
        ("ISTREAM_STORE__KIND", "nats".to_string()),
        ("ISTREAM_NATS__URL", cluster.urls()),
    ];
    let a = replica(&cfg, &env);
    let b = replica(&cfg, &env);
    let mut pushed = Vec::new();
    let rounds = 8;
    for i in 0..rounds {
        if i == rounds / 2 {
            cluster.stop_node(0);
        }
        pushed.push(push.image("app", "latest", &format!("{i}")).await);
        let e = if i % 2 == 0 { &a } else { &b };
        let src = format!("--from={}/app:latest", reg.host);
        // A command may fail while the cluster elects new leaders; the user retries. What
        // was acknowledged must never be lost.
        let deadline = Instant::now() + DEADLINE;
        loop {
            let o = e.cli(&["import-image", "app", &src, "--confirm"]);
            if o.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "import kept failing: {}",
                stderr(&o)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let hist: Vec<String> = wait_for("the history as every replica sees it", || async {
        let t = b.istag("app:latest")?;
        let h: Vec<String> = t["history"]
            .as_array()?
            .iter()
            .filter_map(|h| h["digest"].as_str().map(str::to_string))
            .collect();
        (h.len() == rounds).then_some(h)
    })
    .await;
    let mut want: Vec<String> = pushed.clone();
    want.reverse();
    assert_eq!(hist, want, "every change recorded, in order");
    let published = published_digests(&cluster.urls(), "istream.default.app.latest", rounds).await;
    assert_eq!(published, pushed, "every change published once, in order");
    // Every delivery settled: delivered, or superseded by a newer image as the firing rule
    // allows; the newest image reaches CI.
    let last = std::sync::Mutex::new(serde_json::Value::Null);
    let settled = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Ok(v) = a
                .get("/api/v1/triggers/deploy")
                .await
                .json::<serde_json::Value>()
                .await
            {
                let done =
                    v["pending"] == 0 && v["dead"] == 0 && v["delivered"].as_i64() >= Some(1);
                *last.lock().unwrap() = v;
                if done {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "deliveries not settled: {}\nlog of a:\n{}",
        last.lock().unwrap(),
        a.log.text()
    );
    let newest = pushed.last().unwrap().clone();
    wait_for("the newest image delivered", || async {
        rx.requests()
            .iter()
            .any(|r| r.json()["data"]["digest"] == newest.as_str())
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_deploy_config_starts_a_replica() {
    let nats = Nats::start();
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/scale-out/istream.toml");
    let mut child = std::process::Command::new(bin())
        .args(["serve", "--config", cfg])
        .env("ISTREAM_API_TOKEN", "t1")
        .env("ISTREAM_HOOK_TOKEN", "t2")
        // loopback and one node here; the file names the compose hosts and three replicas
        .env("ISTREAM_SERVER__LISTEN", "127.0.0.1:0")
        .env("ISTREAM_NATS__URL", &nats.url)
        .env("ISTREAM_NATS__REPLICAS", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = Log::default();
    log.follow(child.stderr.take().unwrap());
    let line = log.wait_line("istream listening on", &mut child);
    assert!(line.contains("store=\"nats\""), "{line}");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_share_is_taken_over() {
    let (reg, nats) = counting_registry_with_app_v1().await;
    let tags = 60;
    let cfg = scheduled_tags_config(&reg.host, "2s", 1, tags);
    let env = shared(&nats.url);
    let mut a = replica(&cfg, &env);
    let b = replica(&cfg, &env);
    wait_for("both replicas members", || async {
        b.log
            .find("cluster membership changed replicas=2")
            .map(|_| ())
    })
    .await;
    a.kill();
    // The member key expires after 5 s; then every tag is b's and due within one period.
    wait_for("the dead replica dropped from the member list", || async {
        b.log
            .text()
            .lines()
            .rev()
            .find(|l| l.contains("cluster membership changed"))
            .filter(|l| l.contains("replicas=1"))
            .map(|_| ())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // one period for the moved tags to come due
    let before = reg.manifest_requests();
    let window = Duration::from_secs(6);
    tokio::time::sleep(window).await;
    let checks = reg.manifest_requests() - before;
    // Three periods of 60 tags: 180 when b checks them all, 90 if a's half were lost.
    assert!(
        (150..=230).contains(&checks),
        "{checks} checks in 6 s by the survivor for 60 tags at 2 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_nats_is_not_ready_until_it_is_back() {
    let mut nats = Nats::start();
    let e = replica("", &shared(&nats.url));
    wait_for("ready", || async {
        e.get("/readyz").await.status().is_success().then_some(())
    })
    .await;
    nats.stop();
    wait_for("not ready without NATS", || async {
        (e.get("/readyz").await.status().as_u16() == 503).then_some(())
    })
    .await;
    nats.restart();
    wait_for("ready again", || async {
        e.get("/readyz").await.status().is_success().then_some(())
    })
    .await;
    expect_code(&e.cli(&["get", "is"]), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_on_one_replica_sees_changes_made_on_another() {
    let reg = Registry::start();
    let nats = Nats::start();
    let env = shared(&nats.url);
    let a = replica("", &env);
    let b = replica("", &env);
    let (mut child, rx) = watch_lines(&b.url, "w");
    let (line, pushed) = change_until_watched(&reg, &a, "w", &rx).await;
    let ev: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(ev["type"], "io.istream.tag.changed");
    assert!(
        pushed.contains(&ev["data"]["digest"].as_str().unwrap().to_string()),
        "{line}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_one_replica_moves_a_tag_made_on_another() {
    let nats = Nats::start();
    let mut env = shared(&nats.url);
    env.push(("T_HOOKS", "hook-secret".into()));
    let cfg = "[hooks]\ntoken_env = \"T_HOOKS\"\n";
    let a = replica(cfg, &env);
    let b = replica(cfg, &env);
    // The registry notifies b only; the tag is made through a.
    let reg = Registry::start_with(RegistryOptions {
        notify: Some((format!("{}/hooks/registry", b.url), "hook-secret".into())),
        ..Default::default()
    });
    let push = Pusher::new(&reg.host);
    push.image("team/app", "latest", "1").await;
    // A push of an untracked repository makes b build its push index now, before the tag
    // exists: b must then learn of the tag from a's change.
    push.image("team/other", "latest", "0").await;
    wait_for("b to ignore the untracked push", || async {
        b.log
            .find("push for an untracked repository ignored")
            .map(|_| ())
    })
    .await;
    expect_code(
        &a.cli(&["tag", &format!("{}/team/app", reg.host), "app:latest"]),
        0,
    );
    let d2 = push.image("team/app", "latest", "2").await;
    let t = wait_for("the push through b to move the tag made on a", || async {
        a.istag("app").filter(|t| t["digest"] == d2.as_str())
    })
    .await;
    assert_eq!(t["history"][0]["cause"], "push");
}
