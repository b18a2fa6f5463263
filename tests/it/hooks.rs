//! Registry push notifications: a real registry notifying the engine moves the tag and fires
//! the trigger with no polling; bad and unauthenticated calls change nothing.

use crate::support::receiver::Receiver;
use crate::support::*;

const TOKEN: &str = "hook-secret-42";

async fn post(url: &str, auth: Option<&str>, body: &str) -> u16 {
    istream::registry::install_crypto();
    let mut r = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(a) = auth {
        r = r.bearer_auth(a);
    }
    r.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_moves_the_tag_and_fires_the_trigger() {
    let rx = Receiver::start().await;
    let e = Engine::start_env(
        &format!(
            "[hooks]\ntoken_env = \"T_HOOKS\"\n\n[[trigger]]\nname = \"deploy\"\non = [\"app:latest\"]\nskip_initial = true\nwebhook = {{ url = \"{}/deploy\" }}\n",
            rx.url
        ),
        &[("T_HOOKS", TOKEN)],
    );
    let reg = Registry::start_with(RegistryOptions {
        notify: Some((format!("{}/hooks/registry", e.url), TOKEN.into())),
        ..Default::default()
    });
    let push = Pusher::new(&reg.host);
    push.image("team/app", "latest", "1").await;
    expect_code(
        &e.cli(&["tag", &format!("{}/team/app", reg.host), "app:latest"]),
        0,
    );

    let d2 = push.image("team/app", "latest", "2").await;
    // Regression: distribution notifies before it links the tag, so the first HEAD may still
    // see the old image; the engine must look again instead of dropping the push.
    let t = wait_for("the push to move the tag", || async {
        e.istag("app").filter(|t| t["digest"] == d2.as_str())
    })
    .await;
    assert_eq!(t["history"][0]["cause"], "push");
    assert!(t["last_push"].is_string());
    assert_eq!(t["spec"]["scheduled"], false, "no polling involved");
    let reqs = rx.wait_requests(1).await;
    assert_eq!(reqs[0].json()["data"]["digest"], d2.as_str());
    assert_eq!(reqs[0].json()["data"]["cause"], "push");

    // unauthenticated, malformed and unknown calls change nothing
    let hook = format!("{}/hooks/registry", e.url);
    let sample = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/distribution-notification.json"
    ))
    .unwrap();
    let body = serde_json::from_str::<serde_json::Value>(&sample).unwrap()["body"].to_string();
    assert_eq!(post(&hook, None, &body).await, 401);
    assert_eq!(post(&hook, Some("wrong"), &body).await, 401);
    assert_eq!(post(&hook, Some(TOKEN), "{not json").await, 400);
    assert_eq!(
        post(&hook, Some(TOKEN), &body).await,
        200,
        "unknown repositories are accepted and ignored"
    );
    let big = "x".repeat(2 << 20);
    assert_eq!(post(&hook, Some(TOKEN), &big).await, 413);
    assert_eq!(
        post(&format!("{}/hooks/nope", e.url), Some(TOKEN), "{}").await,
        404
    );
    assert_eq!(
        e.istag("app").unwrap()["history"].as_array().unwrap().len(),
        2
    );
    assert_eq!(
        e.get("/healthz").await.status().as_u16(),
        200,
        "still serving"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_registry_pushes_create_streams() {
    let port = free_port();
    let reg = Registry::start_with(RegistryOptions {
        notify: Some((
            format!("http://127.0.0.1:{port}/hooks/registry"),
            TOKEN.into(),
        )),
        ..Default::default()
    });
    let e = Engine::start_on(
        port,
        &format!(
            "[hooks]\ntoken_env = \"T_HOOKS\"\n\n[[registry]]\nhost = \"{}\"\ninternal = true\n",
            reg.host
        ),
        &[("T_HOOKS", TOKEN)],
    );
    // a real push to the internal registry creates stream "web" in namespace "team"
    let d = Pusher::new(&reg.host).image("team/web", "v1", "1").await;
    let t = wait_for("stream created by push", || async {
        e.istag("team/web:v1").filter(|t| t["digest"] == d.as_str())
    })
    .await;
    assert_eq!(t["namespace"], "team");
    assert_eq!(t["history"][0]["cause"], "push");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quay_and_harbor_payloads_trigger_a_recheck() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    push.image("org/app", "1.0", "1").await;
    let e = Engine::start_env("[hooks]\ntoken_env = \"T_HOOKS\"\n", &[("T_HOOKS", TOKEN)]);
    expect_code(
        &e.cli(&["tag", &format!("{}/org/app:1.0", reg.host), "app:1.0"]),
        0,
    );
    let d2 = push.image("org/app", "1.0", "2").await;
    let quay = serde_json::json!({"repository": "org/app", "namespace": "org", "name": "app", "docker_url": format!("{}/org/app", reg.host), "homepage": "https://quay.io/repository/org/app", "updated_tags": ["1.0"]});
    // Quay cannot set headers: the token may come as a query parameter
    let quay_url = |t: &str| format!("{}/hooks/quay?token={t}", e.url);
    assert_eq!(post(&quay_url("wrong"), None, &quay.to_string()).await, 401);
    assert_eq!(post(&quay_url(TOKEN), None, &quay.to_string()).await, 200);
    wait_for("quay push re-checked", || async {
        e.istag("app:1.0").filter(|t| t["digest"] == d2.as_str())
    })
    .await;
    let d3 = push.image("org/app", "1.0", "3").await;
    let harbor = serde_json::json!({"type": "PUSH_ARTIFACT", "occur_at": 1, "operator": "admin", "event_data": {"resources": [{"digest": d3, "tag": "1.0", "resource_url": format!("{}/org/app:1.0", reg.host)}], "repository": {"name": "app", "namespace": "org", "repo_full_name": "org/app", "repo_type": "private"}}});
    assert_eq!(
        post(
            &format!("{}/hooks/harbor", e.url),
            Some(TOKEN),
            &harbor.to_string()
        )
        .await,
        200
    );
    wait_for("harbor push re-checked", || async {
        e.istag("app:1.0").filter(|t| t["digest"] == d3.as_str())
    })
    .await;
}
