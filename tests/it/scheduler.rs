//! Scheduled imports against a real registry: changes are picked up within a period, outages
//! set the condition and recover, and `Retry-After` pauses the whole registry.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_tags_follow_the_registry_and_survive_outages() {
    let mut reg = Registry::start();
    let push = Pusher::new(&reg.host);
    let d1 = push.image("a/app", "latest", "1").await;
    let e = Engine::start("[schedule]\ninterval = \"1s\"\n");
    expect_code(
        &e.cli(&[
            "tag",
            &format!("{}/a/app", reg.host),
            "app:latest",
            "--scheduled",
        ]),
        0,
    );
    assert_eq!(e.istag("app").unwrap()["digest"], d1.as_str());

    let d2 = push.image("a/app", "latest", "2").await;
    let t = wait_for("scheduled import of the new image", || async {
        e.istag("app").filter(|t| t["digest"] == d2.as_str())
    })
    .await;
    assert_eq!(t["history"][0]["cause"], "schedule");
    assert!(
        t["last_checked"].is_string() && t["next_due"].is_string(),
        "{t}"
    );
    let o = e.cli(&["describe", "istag/app:latest"]);
    assert!(
        stdout(&o).contains("Last Checked:") && stdout(&o).contains("Next Check:"),
        "{}",
        stdout(&o)
    );

    // the registry goes away: the tag keeps its image and gets the condition
    reg.stop();
    let t = wait_for("Unreachable condition", || async {
        e.istag("app")
            .filter(|t| t["conditions"][0]["reason"] == "Unreachable")
    })
    .await;
    assert_eq!(t["digest"], d2.as_str());
    assert_eq!(t["history"].as_array().unwrap().len(), 2);
    // it comes back: the condition clears within about a period
    reg.restart();
    wait_for("condition cleared", || async {
        e.istag("app")
            .filter(|t| t["conditions"].as_array().is_some_and(|c| c.is_empty()))
    })
    .await;
    assert_eq!(e.istag("app").unwrap()["digest"], d2.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_references_are_never_polled() {
    let reg = Registry::start_with(RegistryOptions {
        access_log: true,
        ..Default::default()
    });
    let d1 = Pusher::new(&reg.host).image("a/app", "latest", "1").await;
    let e = Engine::start("[schedule]\ninterval = \"1s\"\n");
    expect_code(
        &e.cli(&[
            "tag",
            &format!("{}/a/app@{d1}", reg.host),
            "app:pinned",
            "--scheduled",
        ]),
        0,
    );
    let after_import = wait_for("the import in the access log", || async {
        let n = reg.manifest_requests();
        (n > 0).then_some(n)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        reg.manifest_requests(),
        after_import,
        "a digest reference is not polled"
    );
    assert!(e.istag("app:pinned").unwrap()["next_due"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_pauses_the_registry() {
    use axum::http::StatusCode;
    let seen: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let s2 = seen.clone();
    let app = axum::Router::new().fallback(move || {
        let seen = s2.clone();
        async move {
            seen.lock().unwrap().push(Instant::now());
            (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "2")],
                "slow down",
            )
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = l.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(l, app).await });
    let e = Engine::start("[schedule]\ninterval = \"1s\"\n");
    let o = e.cli(&["tag", &format!("{host}/a/b"), "b:latest", "--scheduled"]);
    expect_code(&o, 1);
    assert_eq!(
        e.istag("b").unwrap()["conditions"][0]["reason"],
        "RateLimited"
    );
    let times = wait_for("a second request", || async {
        let t = seen.lock().unwrap().clone();
        (t.len() >= 3).then_some(t)
    })
    .await;
    for w in times.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(1900),
            "a request came {gap:?} after a Retry-After: 2"
        );
    }
}

/// A stream declared with more tags than one change applies (parts of 256): every tag gets its
/// image and is polled, and an alias declared in a later part follows a tag of the first part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_declared_with_hundreds_of_tags_is_applied_whole() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    let d1 = push.image("a/big", "latest", "1").await;
    let mut cfg = format!(
        "[schedule]\ninterval = \"1s\"\n\n[[registry]]\nhost = \"{}\"\nmax_requests_per_second = 0\n\n[[stream]]\nname = \"big\"\ntags = [\n",
        reg.host
    );
    for i in 0..600 {
        cfg += &format!(
            "  {{ name = \"t{i:03}\", from.image = \"{}/a/big:latest\", scheduled = true }},\n",
            reg.host
        );
    }
    cfg += "  { name = \"zz-latest\", from.tag = \"t000\", alias = true },\n]\n";
    let e = Engine::start(&cfg);
    for t in [
        "big:t000",
        "big:t255",
        "big:t256",
        "big:t599",
        "big:zz-latest",
    ] {
        wait_for(&format!("{t} imported"), || async {
            e.istag(t).filter(|j| j["digest"] == d1.as_str())
        })
        .await;
    }
    // Every part is polled: a new image reaches the last tag and, through t000, the alias.
    let d2 = push.image("a/big", "latest", "2").await;
    for t in ["big:t599", "big:zz-latest"] {
        wait_for(&format!("{t} follows the registry"), || async {
            e.istag(t).filter(|j| j["digest"] == d2.as_str())
        })
        .await;
    }
    let o = e.cli(&["get", "is", "big", "-o", "json"]);
    expect_code(&o, 0);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["tags"].as_array().map(Vec::len), Some(601), "{s}");
}
