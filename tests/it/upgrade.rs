//! Upgrades lose nothing (SPEC 11): a store written by the previous release (schema 1, one JSON
//! document per stream, kept in tests/fixtures/store-v1/) opens in this release, is converted in
//! place at start, and shows the same streams, tags, histories, conditions, trigger state,
//! deliveries and unpublished events; a crash halfway through the upgrade leaves a store the
//! next start upgrades; a store from a newer release is refused and left untouched. The same for
//! the JetStream store: buckets written by 0.1.0 (tests/fixtures/store-v1-nats/, nats-server's
//! `-sd` directory) open with the same content and are marked schema 1 in `<S>_META`; a newer
//! schema there is refused before any bucket is created or reconfigured.

use std::path::{Path, PathBuf};

use crate::support::receiver::Receiver;
use crate::support::*;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1")
}

/// The triggers the fixture was made with; the upgraded engine is started with the same ones
/// (sinks on closed ports and an hour of backoff, so nothing moves while the test looks).
/// The fixtures' deliveries are as old as the fixtures: `max_age` (the longest allowed) keeps
/// their pending ones from going dead as "too old" when the first start retries them.
fn fixture_triggers(dead_url: &str, ok_url: &str) -> String {
    format!(
        "[nats]\nurl = \"nats://127.0.0.1:9\"\n\n\
         [delivery]\ninitial_backoff = \"1h\"\nmax_backoff = \"2h\"\nmax_attempts = 50\nmax_age = \"366d\"\n\n\
         [[trigger]]\nname = \"dead\"\non = [\"app:latest\"]\nwebhook = {{ url = \"{dead_url}/gone\" }}\n\n\
         [[trigger]]\nname = \"waiting\"\non = [\"app:latest\", \"lib:1\"]\nwebhook = {{ url = \"http://127.0.0.1:9/never\" }}\n\n\
         [[trigger]]\nname = \"ok\"\non = [\"app:latest\"]\nwebhook = {{ url = \"{ok_url}/ok\" }}\n"
    )
}

/// What both fixtures hold, made through the CLI of the release under `e`: two streams, a
/// history of two, an alias, a copy, a failed import (condition), a pin (rollback), and
/// deliveries delivered, dead, pending and superseded.
async fn fixture_scenario(
    e: &Engine,
    reg: &Registry,
    push: &Pusher,
    gone: &Receiver,
    ok: &Receiver,
) {
    let h = &reg.host;
    e.import_new("app", &format!("{h}/team/app"));
    e.import_new("lib:1", &format!("{h}/team/lib:1"));
    ok.wait_requests(1).await;
    gone.wait_requests(1).await;
    // a second image: history of two, a superseded delivery on "waiting"
    push.image("team/app", "latest", "2").await;
    expect_code(&e.cli(&["import-image", "app"]), 0);
    ok.wait_requests(2).await;
    // an alias and a copy in another stream, a failed import (condition), a rollback
    expect_code(&e.cli(&["tag", "--alias", "app:latest", "app:stable"]), 0);
    expect_code(&e.cli(&["tag", "app:latest", "lib:copy"]), 0);
    expect_code(
        &e.cli(&["tag", &format!("{h}/team/missing:1"), "lib:broken"]),
        1,
    );
    let first = e.istag("app:latest").unwrap()["history"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    expect_code(&e.cli(&["tag", &format!("app@{first}"), "app:pinned"]), 0);
}

/// Makes the fixture with the release before schema 2 (run on that release's code:
/// `cargo test --test it make_store_v1_fixture -- --ignored`). Kept to show how it was made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "makes tests/fixtures/store-v1 with the previous release"]
async fn make_store_v1_fixture() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    push.image("team/app", "latest", "1").await;
    push.image("team/lib", "1", "1").await;
    let gone = Receiver::start().await;
    gone.script(&[(404, &[]), (404, &[]), (404, &[])]);
    let ok = Receiver::start().await;
    let mut e = Engine::start(&fixture_triggers(&gone.url, &ok.url));
    fixture_scenario(&e, &reg, &push, &gone, &ok).await;
    let _ = wait_for("three deliveries at ok", || async {
        (ok.requests().len() >= 2).then_some(())
    })
    .await;
    e.kill();
    let dir = fixture_dir();
    std::fs::create_dir_all(&dir).unwrap();
    // The WAL holds the newest transactions: copy all three files, as a user's disk has them.
    for f in ["istream.db", "istream.db-wal", "istream.db-shm"] {
        let src = e.dir.join(f);
        if src.exists() {
            std::fs::copy(&src, dir.join(f)).unwrap();
        }
    }
}

/// Copies the fixture (database, WAL and shared-memory files) into `dir`.
fn copy_fixture(dir: &Path) {
    for entry in std::fs::read_dir(fixture_dir()).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("istream.db") {
            std::fs::copy(&p, dir.join(&name)).unwrap();
        }
    }
}

/// Runs `istream serve` on `dir` until it exits by itself (a refused or crashing start).
fn serve_until_exit(dir: &Path, extra: &str, env: &[(&str, &str)]) -> std::process::Output {
    let cfg = dir.join("triggers.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\npath = \"{}\"\n\n{extra}\n",
            dir.join("istream.db").display()
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(bin());
    cmd.arg("serve").arg("--config").arg(&cfg).current_dir(dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.wait_with_output().unwrap()
}

fn schema_of(db: &Path) -> (i64, bool) {
    let c = rusqlite::Connection::open(db).unwrap();
    let v: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    let has_doc: bool = c
        .query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('streams') WHERE name = 'doc'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    (v, has_doc)
}

/// What the fixture holds, as the CLI and the API show it after the upgrade.
async fn assert_fixture_content(e: &Engine) {
    assert_fixture_state(e).await;
    // The unpublished events (NATS was never reachable) are still waiting in the outbox.
    wait_for(
        "the fixture's 7 unpublished events in the outbox",
        || async {
            let m = e.get("/metrics").await.text().await.unwrap();
            m.lines()
                .find(|l| l.starts_with("istream_outbox_depth"))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .filter(|n| *n >= 7.0)
        },
    )
    .await;
}

/// Streams, tags, histories, conditions and trigger state of either fixture.
async fn assert_fixture_state(e: &Engine) {
    let app = e.istag("app:latest").unwrap();
    let h = app["history"].as_array().unwrap();
    assert_eq!(h.len(), 2, "{app}");
    assert!(h.iter().all(|x| x["cause"] == "import"));
    let pinned = e.istag("app:pinned").unwrap();
    assert_eq!(pinned["history"][0]["cause"], "rollback");
    assert_eq!(
        pinned["digest"], h[1]["digest"],
        "the pin is the first image"
    );
    let stable = e.istag("app:stable").unwrap();
    assert_eq!(stable["spec"]["alias"], true);
    assert_eq!(stable["digest"], app["digest"]);
    let broken = e.istag("lib:broken").unwrap();
    assert_eq!(broken["conditions"][0]["reason"], "NotFound", "{broken}");
    assert_eq!(broken["digest"], serde_json::Value::Null);
    assert_eq!(e.istag("lib:copy").unwrap()["digest"], app["digest"]);
    assert_eq!(
        e.istag("lib:1").unwrap()["history"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let o = e.cli(&["triggers", "-o", "json"]);
    expect_code(&o, 0);
    let t: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let by = |n: &str| {
        t.as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == n)
            .unwrap()
            .clone()
    };
    let (dead, waiting, ok) = (by("dead"), by("waiting"), by("ok"));
    assert_eq!(dead["dead"], 2, "{dead}");
    assert_eq!(
        (waiting["pending"].as_i64(), waiting["superseded"].as_i64()),
        (Some(2), Some(1)),
        "{waiting}"
    );
    assert_eq!(ok["delivered"], 2, "{ok}");
    assert_eq!(
        ok["last_fired"]["default/app:latest"], app["digest"],
        "trigger state kept: {ok}"
    );
    assert_eq!(waiting["last_fired"].as_object().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_1_store_is_upgraded_with_nothing_lost() {
    let gone = Receiver::start().await;
    gone.script(&[(404, &[])]);
    let ok = Receiver::start().await;
    let mut e = Engine::start_prepared(0, &fixture_triggers(&gone.url, &ok.url), &[], copy_fixture);
    let line = e.log.find("store upgraded").expect("the upgrade is logged");
    assert!(line.contains("from=1") && line.contains("to=2"), "{line}");
    assert_eq!(schema_of(&e.dir.join("istream.db")), (2, false));
    assert_fixture_content(&e).await;
    // A second start on the upgraded store: nothing to upgrade, the same content.
    e.restart();
    assert!(e.log.find("store upgraded").is_none());
    assert_fixture_content(&e).await;
    // Had the planner fired again, its delivery would be queued once it has swept.
    wait_for("the start-up trigger planning", || async {
        e.log.find("start-up trigger planning done")
    })
    .await;
    let o = e.cli(&["triggers", "ok", "-o", "json"]);
    let t: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        t[0]["pending"], 0,
        "nothing re-fired after the upgrade: {t}"
    );
    assert_eq!(ok.requests().len(), 0, "nothing re-fired after the upgrade");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_halfway_through_the_upgrade_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    let gone = Receiver::start().await;
    let ok = Receiver::start().await;
    let cfg = fixture_triggers(&gone.url, &ok.url);
    // Dies (abort, as kill -9) after converting one of the two streams, inside the upgrade.
    let out = serve_until_exit(dir.path(), &cfg, &[("ISTREAM_TEST_CRASH_IN_UPGRADE", "1")]);
    assert!(!out.status.success());
    assert_eq!(
        schema_of(&dir.path().join("istream.db")),
        (0, true),
        "the crashed upgrade left the schema-1 store as it was"
    );
    let e = Engine::start_prepared(0, &cfg, &[], |d| {
        for f in std::fs::read_dir(dir.path()).unwrap() {
            let p = f.unwrap().path();
            if p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("istream.db")
            {
                std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
            }
        }
    });
    assert!(e.log.find("store upgraded").is_some());
    assert_fixture_content(&e).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_and_corrupt_stores_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("istream.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch("CREATE TABLE future (x); PRAGMA user_version = 99;")
            .unwrap();
    }
    let before = std::fs::read(&db).unwrap();
    let out = serve_until_exit(dir.path(), "", &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("schema 99") && err.contains("schema 2") && err.contains("istream.db"),
        "{err}"
    );
    assert_eq!(std::fs::read(&db).unwrap(), before, "nothing written");
    assert!(!dir.path().join("istream.db-wal").exists());

    std::fs::write(&db, b"this is not a database, it only has the name of one").unwrap();
    let out = serve_until_exit(dir.path(), "", &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("istream.db"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// `[history] max_entries` keeps the newest entries of each tag, the current one always.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_retention_keeps_the_newest_entries() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    let e = Engine::start("[history]\nmax_entries = 2\n");
    let mut digests = Vec::new();
    for seed in ["1", "2", "3"] {
        digests.push(push.image("team/kept", "latest", seed).await);
        if seed == "1" {
            e.import_new("kept", &format!("{}/team/kept", reg.host));
        } else {
            expect_code(&e.cli(&["import-image", "kept"]), 0);
        }
    }
    let t = e.istag("kept").unwrap();
    let h: Vec<&str> = t["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["digest"].as_str().unwrap())
        .collect();
    assert_eq!(h, vec![digests[2].as_str(), digests[1].as_str()]);
    // the dropped image can no longer be rolled back to
    let o = e.cli(&["tag", &format!("kept@{}", digests[0]), "kept:old"]);
    expect_code(&o, 1);
}

fn nats_fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1-nats")
}

fn on_nats(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ISTREAM_STORE__KIND", "nats".to_string()),
        ("ISTREAM_NATS__URL", url.to_string()),
    ]
}

fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Copies a JetStream store directory (what nats-server keeps under `-sd`).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

/// Makes tests/fixtures/store-v1-nats with the previous release's binary, the same content
/// as the SQLite fixture on the JetStream store:
/// `ISTREAM_TEST_BIN=<istream 0.1.0> cargo test --test it make_store_v1_nats_fixture -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "makes tests/fixtures/store-v1-nats with the previous release"]
async fn make_store_v1_nats_fixture() {
    let mut nats = Nats::start();
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    push.image("team/app", "latest", "1").await;
    push.image("team/lib", "1", "1").await;
    let gone = Receiver::start().await;
    gone.script(&[(404, &[]), (404, &[]), (404, &[])]);
    let ok = Receiver::start().await;
    let env = on_nats(&nats.url);
    let mut e = Engine::start_env(&fixture_triggers(&gone.url, &ok.url), &env_refs(&env));
    fixture_scenario(&e, &reg, &push, &gone, &ok).await;
    gone.wait_requests(2).await;
    e.stop();
    // A clean stop of the server, so everything it acknowledged is in its files.
    let pid = nats.pid();
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    nats.wait();
    let dir = nats_fixture_dir();
    let _ = std::fs::remove_dir_all(&dir);
    copy_tree(&nats.dir.path().join("js"), &dir.join("js"));
}

/// A nats-server whose JetStream directory starts as the fixture's.
fn nats_with_fixture() -> Nats {
    let mut nats = Nats::start();
    nats.stop();
    let js = nats.dir.path().join("js");
    let _ = std::fs::remove_dir_all(&js);
    copy_tree(&nats_fixture_dir().join("js"), &js);
    nats.restart();
    nats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_store_of_the_previous_release_opens_with_nothing_lost() {
    let nats = nats_with_fixture();
    let gone = Receiver::start().await;
    gone.script(&[(404, &[])]);
    let ok = Receiver::start().await;
    let env = on_nats(&nats.url);
    let mut e = Engine::start_env(&fixture_triggers(&gone.url, &ok.url), &env_refs(&env));
    assert_fixture_state(&e).await;
    e.log
        .find("upgrading the JetStream store in place from_schema=1 to_schema=2 streams=2")
        .expect("the upgrade is logged");
    // The store is marked with this release's schema now, and each stream is a head with a
    // record per tag beside it.
    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let meta = js.get_key_value("ISTREAM_META").await.unwrap();
    assert_eq!(meta.get("schema").await.unwrap().unwrap().as_ref(), b"2");
    let tags = js.get_key_value("ISTREAM_TAGS").await.unwrap();
    let keys: Vec<String> = futures_util::TryStreamExt::try_collect(tags.keys().await.unwrap())
        .await
        .unwrap();
    assert!(keys.contains(&"default/app.latest".to_string()), "{keys:?}");
    e.restart();
    assert_fixture_state(&e).await;
    wait_for("the start-up trigger planning", || async {
        e.log.find("start-up trigger planning done")
    })
    .await;
    assert_eq!(ok.requests().len(), 0, "nothing re-fired after the upgrade");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_store_of_a_newer_release_is_refused_untouched() {
    let nats = Nats::start();
    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let meta = js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "ISTREAM_META".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    meta.put("schema", "99".into()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = on_nats(&nats.url);
    let out = serve_until_exit(dir.path(), "", &env_refs(&env));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ISTREAM_META") && err.contains("schema 99") && err.contains("schema 2"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(meta.get("schema").await.unwrap().unwrap().as_ref(), b"99");
    assert!(
        js.get_key_value("ISTREAM_STREAMS").await.is_err(),
        "nothing was created next to a newer store"
    );
}

/// A crash (the process aborts) after the first of the fixture's two streams is converted: the
/// next start converts the rest, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_upgrade_that_crashed_half_way_completes_at_the_next_start() {
    let nats = nats_with_fixture();
    let dir = tempfile::tempdir().unwrap();
    let mut env = on_nats(&nats.url);
    env.push(("ISTREAM_TEST_CRASH_UPGRADE_AFTER", "1".to_string()));
    let out = serve_until_exit(dir.path(), "", &env_refs(&env));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("aborting mid-upgrade"), "{err}");
    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let meta = js.get_key_value("ISTREAM_META").await.unwrap();
    assert!(
        meta.get("schema").await.unwrap().is_none(),
        "the store is not marked upgraded until every stream is"
    );
    let gone = Receiver::start().await;
    gone.script(&[(404, &[])]);
    let ok = Receiver::start().await;
    let env = on_nats(&nats.url);
    let e = Engine::start_env(&fixture_triggers(&gone.url, &ok.url), &env_refs(&env));
    assert_fixture_state(&e).await;
    e.log
        .find("upgrading the JetStream store in place from_schema=1 to_schema=2 streams=2")
        .expect("the second start upgrades what is left");
    e.log
        .find("JetStream store upgraded from_schema=1 to_schema=2 converted=1")
        .expect("one stream was left");
    assert_eq!(meta.get("schema").await.unwrap().unwrap().as_ref(), b"2");
}
