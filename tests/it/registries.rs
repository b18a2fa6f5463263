//! The registries people really use, reached from loopback: Docker Hub short names through a
//! `[[registry]] endpoint` standing in for Docker Hub, a pull-through cache with a repository
//! prefix, Docker Hub's real API host seen at an HTTPS proxy, and HTTP(S)_PROXY / NO_PROXY for
//! registries and sinks.

use crate::support::proxy::Proxy;
use crate::support::receiver::Receiver;
use crate::support::*;

/// Loopback plus Docker Hub, for the tests that name docker.io.
const ALLOW_HUB: &str = "[\"127.0.0.1:*\", \"localhost:*\", \"docker.io\"]";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_hub_short_names_import_through_an_endpoint() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    let d = push.image("library/python", "3.12", "hub").await;
    let dq = push.image("quaycache/org/app", "1", "quay").await;
    let h = &reg.host;
    let e = Engine::start(&format!(
        "[[registry]]\nhost = \"docker.io\"\nendpoint = \"http://{h}\"\n\n\
         [[registry]]\nhost = \"quay.io\"\nendpoint = \"http://{h}/quaycache\"\n"
    ));
    e.import_new("python:3.12", "python:3.12");
    let t = e.istag("python:3.12").unwrap();
    assert_eq!(t["digest"], d.as_str());
    assert_eq!(
        t["image"],
        format!("docker.io/library/python@{d}").as_str(),
        "pull specs keep Docker Hub's name, not the endpoint's"
    );
    e.import_new("app:1", "quay.io/org/app:1");
    let t = e.istag("app:1").unwrap();
    assert_eq!(t["digest"], dq.as_str());
    assert_eq!(t["image"], format!("quay.io/org/app@{dq}").as_str());
    // A tag the mirror lacks: NotFound names Docker Hub's reference, not the mirror's.
    let o = e.cli(&["import-image", "python:9", "--from=python:9", "--confirm"]);
    expect_code(&o, 1);
    assert!(
        stderr(&o).contains("docker.io/library/python"),
        "{}",
        stderr(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_hub_requests_go_to_registry_1_docker_io() {
    let proxy = Proxy::start().await;
    let e = Engine::start_env(
        "",
        &[
            ("HTTPS_PROXY", proxy.url.as_str()),
            ("ISTREAM_SERVER__ALLOWED_REGISTRIES", ALLOW_HUB),
        ],
    );
    // The proxy refuses the tunnel, so the import fails; what matters is where it went.
    let o = e.cli(&[
        "import-image",
        "python:3.12",
        "--from=docker.io/library/python:3.12",
        "--confirm",
    ]);
    expect_code(&o, 1);
    let seen = proxy.seen();
    assert!(!seen.is_empty(), "no request reached the proxy");
    for s in &seen {
        assert_eq!(
            (s.method.as_str(), s.target.as_str()),
            ("CONNECT", "registry-1.docker.io:443"),
            "{seen:?}"
        );
    }
    let t = e.istag("python:3.12").unwrap();
    assert_eq!(t["conditions"][0]["reason"], "Unreachable", "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registries_and_sinks_honour_http_proxy_and_no_proxy() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    let d = push.image("team/app", "latest", "1").await;
    let rx = Receiver::start().await;
    let proxy = Proxy::start().await;
    let trigger = format!(
        "[[trigger]]\nname = \"hook\"\non = [\"app:latest\"]\nwebhook = {{ url = \"{}/built\" }}\n",
        rx.url
    );
    let e = Engine::start_env(&trigger, &[("HTTP_PROXY", proxy.url.as_str())]);
    e.import_new("app", &format!("{}/team/app", reg.host));
    assert_eq!(e.istag("app").unwrap()["digest"], d.as_str());
    rx.wait_requests(1).await;
    let seen = proxy.seen();
    let manifest = format!("http://{}/v2/team/app/manifests/latest", reg.host);
    assert!(
        seen.iter()
            .any(|s| s.target == manifest && s.method == "HEAD"),
        "registry request not proxied: {seen:?}"
    );
    let hook = seen
        .iter()
        .find(|s| s.target == format!("{}/built", rx.url))
        .unwrap_or_else(|| panic!("sink request not proxied: {seen:?}"));
    assert_eq!(hook.method, "POST");
    assert!(hook.header("idempotency-key").is_some());
    drop(e);

    // NO_PROXY as curl reads it: listed hosts go direct.
    let before = proxy.seen().len();
    let e = Engine::start_env(
        &trigger,
        &[
            ("HTTP_PROXY", proxy.url.as_str()),
            ("NO_PROXY", "127.0.0.1,localhost"),
        ],
    );
    e.import_new("app", &format!("{}/team/app", reg.host));
    rx.wait_requests(2).await;
    assert_eq!(proxy.seen().len(), before, "{:?}", &proxy.seen()[before..]);
}
