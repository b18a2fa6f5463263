//! Upgrades lose nothing (SPEC 11): a store written by the previous release (schema 1, one JSON
//! document per stream, kept in tests/fixtures/store-v1/) opens in this release, is converted in
//! place at start, and shows the same streams, tags, histories, conditions, trigger state,
//! deliveries and unpublished events; a crash halfway through the upgrade leaves a store the
//! next start upgrades; a store from a newer release is refused and left untouched.

use std::path::{Path, PathBuf};

use crate::support::receiver::Receiver;
use crate::support::*;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1")
}

/// The triggers the fixture was made with; the upgraded engine is started with the same ones
/// (sinks on closed ports and an hour of backoff, so nothing moves while the test looks).
fn fixture_triggers(dead_url: &str, ok_url: &str) -> String {
    format!(
        "[nats]\nurl = \"nats://127.0.0.1:9\"\n\n\
         [delivery]\ninitial_backoff = \"1h\"\nmax_backoff = \"2h\"\nmax_attempts = 50\n\n\
         [[trigger]]\nname = \"dead\"\non = [\"app:latest\"]\nwebhook = {{ url = \"{dead_url}/gone\" }}\n\n\
         [[trigger]]\nname = \"waiting\"\non = [\"app:latest\", \"lib:1\"]\nwebhook = {{ url = \"http://127.0.0.1:9/never\" }}\n\n\
         [[trigger]]\nname = \"ok\"\non = [\"app:latest\"]\nwebhook = {{ url = \"{ok_url}/ok\" }}\n"
    )
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
