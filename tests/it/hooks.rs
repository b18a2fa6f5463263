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

/// How a request proves the secret, per sender (SPEC 9).
fn sign(source: &str, secret: &str, body: &[u8]) -> Vec<(&'static str, String)> {
    use hmac::Mac;
    let sha256 = || {
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        m.update(body);
        hex::encode(m.finalize().into_bytes())
    };
    match source {
        "ghcr" => vec![
            ("x-github-event", "package".into()),
            ("x-hub-signature-256", format!("sha256={}", sha256())),
        ],
        "gitea" => vec![
            ("x-gitea-event", "package".into()),
            ("x-gitea-signature", sha256()),
        ],
        "artifactory" => vec![("x-jfrog-event-auth", secret.into())],
        "nexus" => {
            let mut m = hmac::Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).unwrap();
            m.update(body);
            vec![
                ("x-nexus-webhook-id", "rm:repository:component".into()),
                (
                    "x-nexus-webhook-signature",
                    hex::encode(m.finalize().into_bytes()),
                ),
            ]
        }
        _ => vec![("authorization", format!("Bearer {secret}"))],
    }
}

async fn post_signed(url: &str, headers: &[(&str, String)], body: &[u8]) -> u16 {
    istream::registry::install_crypto();
    let mut r = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (k, v) in headers {
        r = r.header(*k, v);
    }
    r.send().await.unwrap().status().as_u16()
}

/// Every sender of SPEC 9, end to end against a real registry: its documented payload with its
/// proof moves a tracked tag (cause `push`); a forged proof is 401, a malformed body 400, and
/// neither moves anything. Hosts that cannot be reached from here (ghcr.io, ECR, Artifact
/// Registry) go to the local registry through `[[registry]] endpoint`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_push_source_moves_its_tag() {
    let reg = Registry::start();
    let h = reg.host.clone();
    let push = Pusher::new(&h);
    let fixture = |f: &str| {
        std::fs::read_to_string(format!(
            "{}/tests/data/hooks/{f}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    };
    // (source, fixture, the payload with the local host put in, the reference it names,
    //  the local repository behind it, the token variable)
    let gar_body = {
        let v: serde_json::Value = serde_json::from_str(&fixture("gar-pubsub-push.json")).unwrap();
        v.to_string()
    };
    let cases: Vec<(&str, String, String, &str)> = vec![
        (
            "ghcr",
            fixture("ghcr-package-published.json"),
            "ghcr.io/octo-org/app:v1".into(),
            "octo-org/app",
        ),
        (
            "gitea",
            fixture("gitea-package-created.json"),
            format!("{h}/team/gitea-app:v1"),
            "team/gitea-app",
        ),
        (
            "artifactory",
            fixture("artifactory-docker-pushed.json"),
            format!("{h}/docker-local/team/jfrog-app:v1"),
            "docker-local/team/jfrog-app",
        ),
        (
            "nexus",
            fixture("nexus-component-created.json"),
            format!("{h}/team/nexus-app:v1"),
            "team/nexus-app",
        ),
        (
            "acr",
            fixture("acr-push.json").replace("myregistry.azurecr.io", &h),
            format!("{h}/team/acr-app:v1"),
            "team/acr-app",
        ),
        (
            "ecr",
            fixture("ecr-image-action.json"),
            "123456789012.dkr.ecr.us-west-2.amazonaws.com/team/ecr-app:v1".into(),
            "team/ecr-app",
        ),
        (
            "gar",
            gar_body,
            "us-docker.pkg.dev/my-project/my-repo/gar-app:v1".into(),
            "my-project/my-repo/gar-app",
        ),
    ];
    let mut config = format!(
        "[hooks]\nghcr = {{ token_env = \"T_GHCR\" }}\ngitea = {{ token_env = \"T_GITEA\", registry = \"{h}\" }}\n\
         artifactory = {{ token_env = \"T_JF\", registry = \"{h}\" }}\nnexus = {{ token_env = \"T_NEXUS\", registry = \"{h}\" }}\n\
         acr = {{ token_env = \"T_ACR\" }}\necr = {{ token_env = \"T_ECR\" }}\ngar = {{ token_env = \"T_GAR\" }}\n\n"
    );
    for host in [
        "ghcr.io",
        "123456789012.dkr.ecr.us-west-2.amazonaws.com",
        "us-docker.pkg.dev",
    ] {
        config += &format!("[[registry]]\nhost = \"{host}\"\nendpoint = \"http://{h}\"\n\n");
    }
    let secrets = [
        ("ghcr", "T_GHCR", "gh-secret"),
        ("gitea", "T_GITEA", "gitea-secret"),
        ("artifactory", "T_JF", "jf-secret"),
        ("nexus", "T_NEXUS", "nexus-secret"),
        ("acr", "T_ACR", "acr-secret"),
        ("ecr", "T_ECR", "ecr-secret"),
        ("gar", "T_GAR", "gar-secret"),
    ];
    let env: Vec<(&str, &str)> = secrets.iter().map(|(_, k, v)| (*k, *v)).collect();
    let e = Engine::start_env(&config, &env);
    for (source, body, reference, repo) in &cases {
        let secret = secrets.iter().find(|s| s.0 == *source).unwrap().2;
        push.image(repo, "v1", "1").await;
        let name = format!("{source}:v1");
        e.import_new(&name, reference);
        let d2 = push.image(repo, "v1", "2").await;
        let url = if *source == "gar" {
            format!("{}/hooks/gar?token={secret}", e.url)
        } else {
            format!("{}/hooks/{source}", e.url)
        };
        // forged and malformed first: nothing moves
        let forged = sign(source, "not-the-secret", body.as_bytes());
        let forged_url = url.replace(secret, "not-the-secret");
        assert_eq!(
            post_signed(&forged_url, &forged, body.as_bytes()).await,
            401,
            "{source} forged"
        );
        let junk = b"{\"not\": [\"a payload\"";
        assert_eq!(
            post_signed(&url, &sign(source, secret, junk), junk).await,
            400,
            "{source} malformed"
        );
        assert_ne!(
            e.istag(&name).unwrap()["digest"],
            d2.as_str(),
            "{source}: moved by a bad request"
        );
        assert_eq!(
            post_signed(
                &url,
                &sign(source, secret, body.as_bytes()),
                body.as_bytes()
            )
            .await,
            200,
            "{source}"
        );
        let t = wait_for(&format!("the {source} push to move {name}"), || async {
            e.istag(&name).filter(|t| t["digest"] == d2.as_str())
        })
        .await;
        assert_eq!(t["history"][0]["cause"], "push", "{source}");
        assert!(
            t["conditions"].as_array().unwrap().is_empty(),
            "{source}: {t}"
        );
    }
    // Another GitHub event (a ping) is acknowledged and ignored.
    let ping = br#"{"zen":"Keep it logically awesome.","hook_id":1}"#;
    let mut headers = sign("ghcr", "gh-secret", ping);
    headers[0].1 = "ping".into();
    assert_eq!(
        post_signed(&format!("{}/hooks/ghcr", e.url), &headers, ping).await,
        200
    );
}

/// An internal registry creates a stream tag only once the re-check finds the image: a
/// notification for a repository that does not exist creates nothing, and no failure is
/// recorded anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_registry_creates_nothing_for_a_missing_image() {
    let reg = Registry::start();
    let e = Engine::start_env(
        &format!(
            "[hooks]\ntoken_env = \"T_HOOKS\"\n\n[[registry]]\nhost = \"{}\"\ninternal = true\n",
            reg.host
        ),
        &[("T_HOOKS", TOKEN)],
    );
    let body = serde_json::json!({"events": [{"action": "push", "target": {
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "repository": "nobody/here", "tag": "v1",
        "digest": "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "url": format!("http://{}/v2/nobody/here/manifests/sha256:0123", reg.host)}}]})
    .to_string();
    assert_eq!(
        post(&format!("{}/hooks/registry", e.url), Some(TOKEN), &body).await,
        200
    );
    wait_for("the re-checks to give up", || async {
        e.log
            .text()
            .lines()
            .find(|l| {
                l.contains("nobody/here") && (l.contains("not found") || l.contains("gave up"))
            })
            .map(str::to_string)
    })
    .await;
    // `nobody/here` would land in namespace `nobody`, stream `here`.
    let o = e.cli(&["-n", "nobody", "get", "is", "-o", "json"]);
    expect_code(&o, 0);
    let streams: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(streams, serde_json::json!([]), "nothing created");
}

/// SPEC 9: a hook that answered 2xx has its hint durably recorded. Killed (-9) right after the
/// answer, while the registry is down, the engine re-checks the hint at its next start and the
/// tag moves without a new notification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_hint_survives_a_crash() {
    let mut reg = Registry::start();
    let push = Pusher::new(&reg.host);
    push.image("team/durable", "latest", "1").await;
    let mut e = Engine::start_env("[hooks]\ntoken_env = \"T_HOOKS\"\n", &[("T_HOOKS", TOKEN)]);
    e.import_new("durable", &format!("{}/team/durable", reg.host));
    let d2 = push.image("team/durable", "latest", "2").await;
    reg.stop();
    let body = serde_json::json!({"events": [{"action": "push", "target": {
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "repository": "team/durable", "tag": "latest", "digest": d2,
        "url": format!("http://{}/v2/team/durable/manifests/{d2}", reg.host)}}]})
    .to_string();
    assert_eq!(
        post(&format!("{}/hooks/registry", e.url), Some(TOKEN), &body).await,
        200
    );
    e.kill();
    reg.restart();
    e.restart_after_crash();
    let t = wait_for(
        "the recorded hint to move the tag after the restart",
        || async { e.istag("durable").filter(|t| t["digest"] == d2.as_str()) },
    )
    .await;
    assert_eq!(t["history"][0]["cause"], "push");
    assert!(e.log.find("re-checking push hints").is_some());
}

/// A burst of identical notifications for one pushed tag (a registry retrying, several
/// endpoints, replays): one re-check, one change, one delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_identical_notifications_costs_one_check() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    push.image("team/burst", "latest", "1").await;
    let rx = Receiver::start().await;
    let e = Engine::start_env(
        &format!(
            "[hooks]\ntoken_env = \"T_HOOKS\"\n\n[[registry]]\nhost = \"{}\"\nfetch_details = false\n\n[[trigger]]\nname = \"b\"\non = [\"burst:latest\"]\nskip_initial = true\nwebhook = {{ url = \"{}/b\" }}\n",
            reg.host, rx.url
        ),
        &[("T_HOOKS", TOKEN)],
    );
    e.import_new("burst", &format!("{}/team/burst", reg.host));
    let d2 = push.image("team/burst", "latest", "2").await;
    let body = serde_json::json!({"events": [{"action": "push", "target": {
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "repository": "team/burst", "tag": "latest", "digest": d2,
        "url": format!("http://{}/v2/team/burst/manifests/{d2}", reg.host)}}]})
    .to_string();
    // The registry's log is read as it comes: the import's check must be counted first.
    wait_for("the import's check in the registry's log", || async {
        (reg.manifest_requests() > 0).then_some(())
    })
    .await;
    let before = reg.manifest_requests();
    let url = format!("{}/hooks/registry", e.url);
    let posts: Vec<_> = (0..50)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            tokio::spawn(async move { post(&url, Some(TOKEN), &body).await })
        })
        .collect();
    for p in posts {
        assert_eq!(p.await.unwrap(), 200);
    }
    wait_for("the coalesced re-checks to end", || async {
        e.log.find("push re-checks done")
    })
    .await;
    assert_eq!(e.istag("burst").unwrap()["digest"], d2.as_str());
    // The registry's log is read as it comes: wait for the check's line, then count.
    wait_for("the re-check in the registry's log", || async {
        (reg.manifest_requests() > before).then_some(())
    })
    .await;
    assert_eq!(reg.manifest_requests() - before, 1);
    // Every re-check task that started ran the registry check at most once, and one did.
    let runs: Vec<String> = e
        .log
        .text()
        .lines()
        .filter(|l| l.contains("push re-checks done"))
        .map(str::to_string)
        .collect();
    assert_eq!(
        runs.iter().filter(|l| l.contains("runs=1")).count(),
        1,
        "{runs:?}"
    );
    rx.wait_requests(1).await;
    assert_eq!(
        e.istag("burst").unwrap()["history"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(rx.count("/b"), 1);
    // The burst's hint is gone once re-checked: a restart has nothing to re-check.
    wait_for("the re-checked hint to be dropped", || async {
        e.log.find("push hint dropped")
    })
    .await;
    let mut e = e;
    e.restart();
    wait_for("the restarted engine to be ready", || async {
        (e.get("/readyz").await.status() == 200).then_some(())
    })
    .await;
    assert!(
        e.log.find("re-checking push hints").is_none(),
        "{}",
        e.log.text()
    );
}

/// A push re-check reads the manifest once: the GET that finds the new digest also feeds the
/// image details (no HEAD first, no second GET of the same manifest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_recheck_reads_the_manifest_once() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    push.image("team/once", "latest", "1").await;
    let e = Engine::start_env("[hooks]\ntoken_env = \"T_HOOKS\"\n", &[("T_HOOKS", TOKEN)]);
    e.import_new("once", &format!("{}/team/once", reg.host));
    let d2 = push.image("team/once", "latest", "2").await;
    wait_for("the import's requests in the registry's log", || async {
        (reg.manifest_requests() > 0).then_some(())
    })
    .await;
    let before = reg.manifest_requests();
    let body = serde_json::json!({"events": [{"action": "push", "target": {
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "repository": "team/once", "tag": "latest", "digest": d2,
        "url": format!("http://{}/v2/team/once/manifests/{d2}", reg.host)}}]})
    .to_string();
    assert_eq!(
        post(&format!("{}/hooks/registry", e.url), Some(TOKEN), &body).await,
        200
    );
    let t = wait_for("the push to move the tag", || async {
        e.istag("once").filter(|t| t["digest"] == d2.as_str())
    })
    .await;
    assert!(
        !t["history"][0]["details"]["layers"]
            .as_array()
            .unwrap()
            .is_empty(),
        "details recorded: {t}"
    );
    wait_for("the re-check in the registry's log", || async {
        (reg.manifest_requests() > before).then_some(())
    })
    .await;
    let line = wait_for("the re-checks to end", || async {
        e.log.find("push re-checks done")
    })
    .await;
    assert!(line.contains("runs=1"), "{line}");
    assert_eq!(reg.manifest_requests() - before, 1);
}

/// A re-check still looking for the image its notification named (the registry shows
/// another) stops when a notification for a newer image of the tag comes: the tag moves to
/// the newer image at once, not after the ~2 s of looks for the superseded one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_push_ends_the_looks_for_a_superseded_one() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    push.image("team/moving", "latest", "1").await;
    let e = Engine::start_env(
        &format!(
            "[hooks]\ntoken_env = \"T_HOOKS\"\n\n[[registry]]\nhost = \"{}\"\nfetch_details = false\n",
            reg.host
        ),
        &[("T_HOOKS", TOKEN)],
    );
    e.import_new("moving", &format!("{}/team/moving", reg.host));
    // The tag is at the third image already; the first notification names the second.
    let d2 = push.image("team/moving", "latest", "2").await;
    let d3 = push.image("team/moving", "latest", "3").await;
    let note = |d: &str| {
        serde_json::json!({"events": [{"action": "push", "target": {
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "repository": "team/moving", "tag": "latest", "digest": d,
            "url": format!("http://{}/v2/team/moving/manifests/{d}", reg.host)}}]})
        .to_string()
    };
    wait_for("the import's check in the registry's log", || async {
        (reg.manifest_requests() > 0).then_some(())
    })
    .await;
    let before = reg.manifest_requests();
    let url = format!("{}/hooks/registry", e.url);
    assert_eq!(post(&url, Some(TOKEN), &note(&d2)).await, 200);
    wait_for(
        "the re-check to look again for the second image",
        || async { e.log.find("looking again") },
    )
    .await;
    assert_eq!(post(&url, Some(TOKEN), &note(&d3)).await, 200);
    wait_for("the newer notification to end the looks", || async {
        e.log.find("supersedes this re-check")
    })
    .await;
    wait_for("the tag at the third image", || async {
        (e.istag("moving")?["digest"] == d3.as_str()).then_some(())
    })
    .await;
    wait_for("the re-checks to end", || async {
        e.log.find("push re-checks done")
    })
    .await;
    assert!(
        e.log.find("push re-check gave up").is_none(),
        "{}",
        e.log.text()
    );
    // Some looks, then one check for the newer image; not all 13 looks of ~2 s and a check.
    let looks = reg.manifest_requests() - before;
    assert!(looks < 13, "{looks} manifest requests");
}
