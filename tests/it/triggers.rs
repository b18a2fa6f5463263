//! Image change triggers against a local receiver standing in for CI: exact requests per sink,
//! retries, dead deliveries, superseding, aliases, skip_initial, and a crash mid-delivery.

use std::time::{Duration, Instant};

use hmac::Mac;

use crate::support::receiver::Receiver;
use crate::support::*;

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(body);
    format!("sha256={}", hex::encode(m.finalize().into_bytes()))
}

const FAST: &str =
    "[delivery]\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\nmax_attempts = 4\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sink_sends_its_exact_request() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    let d1 = push.image("team/app", "latest", "1").await;
    let rx = Receiver::start().await;
    let u = &rx.url;
    let e = Engine::start_env(
        &format!(
            "{FAST}
[[trigger]]
name = \"hook\"
on = [\"app:latest\"]
webhook = {{ url = \"{u}/hooks/app\", secret_env = \"T_HOOK_SECRET\", headers = {{ X-Extra = \"1\" }} }}

[[trigger]]
name = \"gh\"
on = [\"app:latest\"]
github = {{ repo = \"acme/app\", event_type = \"base-image-changed\", token_env = \"T_GH\", api_url = \"{u}/gh\" }}

[[trigger]]
name = \"ghwf\"
on = [\"app:latest\"]
github = {{ repo = \"acme/app\", workflow = \"build.yml\", ref = \"main\", token_env = \"T_GH\", api_url = \"{u}/gh\" }}

[[trigger]]
name = \"gl\"
on = [\"app:latest\"]
gitlab = {{ project = \"acme/app\", ref = \"main\", token_env = \"T_GL\", api_url = \"{u}/gl\" }}

[[trigger]]
name = \"jk\"
on = [\"app:latest\"]
jenkins = {{ job_url = \"{u}/job/app\", user = \"bot\", token_env = \"T_JK\" }}
"
        ),
        &[("T_HOOK_SECRET", "s3cr3t-hook"), ("T_GH", "gh-token-123"), ("T_GL", "gl-token-456"), ("T_JK", "jk-token-789")],
    );
    e.import_new("app", &format!("{}/team/app", reg.host));
    let reqs = rx.wait_requests(5).await;
    let t = e.istag("app:latest").unwrap();
    let event_id = t["history"][0]["id"].as_str().unwrap().to_string();
    for r in &reqs {
        assert_eq!(r.method, "POST");
        assert_eq!(
            r.header("idempotency-key").as_deref(),
            Some(event_id.as_str()),
            "{}",
            r.path
        );
    }
    let by = |p: &str| {
        reqs.iter().find(|r| r.path == p).unwrap_or_else(|| {
            panic!(
                "no request to {p}: {:?}",
                reqs.iter().map(|r| &r.path).collect::<Vec<_>>()
            )
        })
    };

    let w = by("/hooks/app");
    assert_eq!(
        w.header("content-type").as_deref(),
        Some("application/cloudevents+json"),
        "structured mode of the CloudEvents HTTP binding"
    );
    let ce = w.json();
    assert_eq!(ce["specversion"], "1.0");
    assert_eq!(ce["type"], "io.istream.tag.changed");
    assert_eq!(ce["id"], event_id.as_str());
    assert_eq!(ce["subject"], "default/app:latest");
    assert_eq!(ce["datacontenttype"], "application/json");
    assert!(
        ce["source"].as_str().unwrap().starts_with("istream://")
            && ce["source"].as_str().unwrap().ends_with("/default/app")
    );
    assert_eq!(ce["data"]["digest"], d1.as_str());
    assert_eq!(ce["data"]["previous"], serde_json::Value::Null);
    assert_eq!(
        ce["data"]["image"],
        format!("{}/team/app@{d1}", reg.host).as_str()
    );
    assert_eq!(ce["data"]["cause"], "import");
    assert_eq!(ce["data"]["namespace"], "default");
    assert_eq!(ce["data"]["stream"], "app");
    assert_eq!(ce["data"]["tag"], "latest");
    assert_eq!(
        w.header("x-istream-signature-256").unwrap(),
        hmac_hex("s3cr3t-hook", &w.body)
    );
    assert_eq!(w.header("x-extra").as_deref(), Some("1"));

    let g = by("/gh/repos/acme/app/dispatches");
    assert_eq!(
        g.header("authorization").as_deref(),
        Some("Bearer gh-token-123")
    );
    assert_eq!(g.json()["event_type"], "base-image-changed");
    assert_eq!(g.json()["client_payload"]["digest"], d1.as_str());

    let wf = by("/gh/repos/acme/app/actions/workflows/build.yml/dispatches");
    assert_eq!(wf.json()["ref"], "main");
    assert_eq!(wf.json()["inputs"]["digest"], d1.as_str());

    let gl = by("/gl/api/v4/projects/acme%2Fapp/trigger/pipeline");
    assert!(
        gl.header("content-type")
            .unwrap()
            .starts_with("application/x-www-form-urlencoded")
    );
    let form = gl.form();
    let get = |k: &str| form.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
    assert_eq!(get("token").as_deref(), Some("gl-token-456"));
    assert_eq!(get("ref").as_deref(), Some("main"));
    assert_eq!(
        get("variables[ISTREAM_DIGEST]").as_deref(),
        Some(d1.as_str())
    );
    assert_eq!(
        get("variables[ISTREAM_TAG]").as_deref(),
        Some("default/app:latest")
    );
    assert!(get("variables[ISTREAM_IMAGE]").unwrap().ends_with(&d1));

    let j = by("/job/app/buildWithParameters");
    use base64::Engine as _;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("bot:jk-token-789")
    );
    assert_eq!(j.header("authorization").as_deref(), Some(basic.as_str()));
    assert!(j.form().contains(&("ISTREAM_DIGEST".into(), d1.clone())));

    // the same image never fires twice, also not after a restart
    expect_code(&e.cli(&["import-image", "app"]), 0);
    let mut e = e;
    e.restart();
    // The planner has looked at every watched tag again: had it fired, the delivery would
    // now be queued, so wait for the deliverer to have had its turn too.
    wait_for("start-up planning after the restart", || async {
        e.log.find("start-up trigger planning done")
    })
    .await;
    let o = e.cli(&["triggers", "-o", "json"]);
    let all: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for t in all.as_array().unwrap() {
        assert_eq!(t["pending"], 0, "nothing queued again: {t}");
    }
    assert_eq!(rx.requests().len(), 5);
    // secrets never reach the log
    for s in [
        "s3cr3t-hook",
        "gh-token-123",
        "gl-token-456",
        "jk-token-789",
    ] {
        assert!(!e.log.text().contains(s), "secret {s} in the log");
    }
}

/// Both modes of the CloudEvents HTTP binding, read back by the CloudEvents SDK for Python.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_follow_the_cloudevents_http_binding() {
    let reg = Registry::start();
    let d1 = Pusher::new(&reg.host).image("team/ce", "latest", "1").await;
    let rx = Receiver::start().await;
    let u = &rx.url;
    let e = Engine::start(&format!(
        "{FAST}
[[trigger]]
name = \"structured\"
on = [\"ce:latest\"]
webhook = {{ url = \"{u}/structured\" }}

[[trigger]]
name = \"binary\"
on = [\"ce:latest\"]
webhook = {{ url = \"{u}/binary\", mode = \"binary\" }}

[[trigger]]
name = \"templated\"
on = [\"ce:latest\"]
webhook = {{ url = \"{u}/templated\", body_template = '{{\"d\": \"{{{{ data.digest }}}}\"}}' }}
"
    ));
    e.import_new("ce", &format!("{}/team/ce", reg.host));
    let reqs = rx.wait_requests(3).await;
    let by = |p: &str| reqs.iter().find(|r| r.path == p).unwrap().clone();
    let (st, bin, tpl) = (by("/structured"), by("/binary"), by("/templated"));
    let id = e.istag("ce:latest").unwrap()["history"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();

    assert_eq!(
        st.header("content-type").as_deref(),
        Some("application/cloudevents+json")
    );
    assert_eq!(
        bin.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(bin.header("ce-specversion").as_deref(), Some("1.0"));
    assert_eq!(bin.header("ce-id").as_deref(), Some(id.as_str()));
    assert_eq!(
        bin.header("ce-type").as_deref(),
        Some("io.istream.tag.changed")
    );
    assert_eq!(
        bin.header("ce-subject").as_deref(),
        Some("default/ce:latest")
    );
    assert!(bin.header("ce-source").unwrap().starts_with("istream://"));
    assert!(bin.header("ce-time").is_some());
    assert_eq!(bin.json()["digest"], d1.as_str(), "binary body is the data");
    assert_eq!(
        tpl.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(tpl.json()["d"], d1.as_str());

    use base64::Engine as _;
    let lines: String = [&st, &bin]
        .iter()
        .map(|r| {
            let headers: serde_json::Map<String, serde_json::Value> = r
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap().into()))
                .collect();
            let b64 = base64::engine::general_purpose::STANDARD.encode(&r.body);
            serde_json::json!({"headers": headers, "body": b64}).to_string() + "\n"
        })
        .collect();
    let out = run_python("cloudevents_check.py", &[], lines.as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(read.len(), 2);
    for r in &read {
        assert_eq!(r["attributes"]["id"], id.as_str(), "{r}");
        assert_eq!(r["attributes"]["type"], "io.istream.tag.changed");
        assert_eq!(r["attributes"]["specversion"], "1.0");
        assert_eq!(r["attributes"]["subject"], "default/ce:latest");
        assert_eq!(r["data"]["digest"], d1.as_str(), "{r}");
        assert_eq!(r["data"]["tag"], "latest");
    }
    assert_eq!(read[0]["attributes"]["time"], read[1]["attributes"]["time"]);
}

async fn trigger_json(e: &Engine, name: &str) -> serde_json::Value {
    let o = e.cli(&["triggers", name, "-o", "json"]);
    expect_code(&o, 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_honour_retry_after_then_dead_and_retry() {
    let reg = Registry::start();
    Pusher::new(&reg.host).image("a/app", "latest", "1").await;
    let rx = Receiver::start().await;
    rx.script(&[(500, &[]), (429, &[("retry-after", "1")]), (200, &[])]);
    let rx2 = Receiver::start().await;
    rx2.script(&[(404, &[])]);
    let e = Engine::start(&format!(
        "{FAST}
[[trigger]]
name = \"flaky\"
on = [\"app:latest\"]
webhook = {{ url = \"{}/x\" }}

[[trigger]]
name = \"gone\"
on = [\"app:latest\"]
webhook = {{ url = \"{}/missing\" }}
",
        rx.url, rx2.url
    ));
    e.import_new("app", &format!("{}/a/app", reg.host));
    let reqs = rx.wait_requests(3).await;
    let keys: Vec<_> = reqs.iter().map(|r| r.header("idempotency-key")).collect();
    assert!(
        keys.windows(2).all(|w| w[0] == w[1]),
        "one change, one key: {keys:?}"
    );
    let flaky = wait_for("flaky delivered", || async {
        let t = trigger_json(&e, "flaky").await;
        (t["delivered"] == 1).then_some(t)
    })
    .await;
    assert_eq!(flaky["deliveries"][0]["attempts"], 3);

    // a permanent 404 is dead at once, shown, and `triggers retry` delivers it
    let gone = wait_for("dead delivery", || async {
        let t = trigger_json(&e, "gone").await;
        (t["dead"] == 1).then_some(t)
    })
    .await;
    assert_eq!(gone["deliveries"][0]["attempts"], 1);
    assert!(
        gone["deliveries"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("404")
    );
    let o = e.cli(&["triggers"]);
    expect_code(&o, 0);
    assert!(
        stdout(&o).contains("gone") && stdout(&o).contains("DEAD"),
        "{}",
        stdout(&o)
    );
    let o = e.cli(&["triggers", "retry", "gone"]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("Re-queued 1"), "{}", stdout(&o));
    rx2.wait_requests(2).await;
    wait_for("retried delivery delivered", || async {
        (trigger_json(&e, "gone").await["delivered"] == 1).then_some(())
    })
    .await;
    expect_code(&e.cli(&["triggers", "retry", "nope"]), 1);
    // the delivery counters moved
    let metrics = e.get("/metrics").await.text().await.unwrap();
    for line in [
        "istream_deliveries_total{trigger=\"flaky\",result=\"retry\"} 2",
        "istream_deliveries_total{trigger=\"flaky\",result=\"delivered\"} 1",
        "istream_deliveries_total{trigger=\"gone\",result=\"dead\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let reg = Registry::start();
    Pusher::new(&reg.host).image("a/app", "latest", "1").await;
    let rx = Receiver::start().await;
    rx.script(&[(503, &[("retry-after", "2")])]);
    let e = Engine::start(&format!(
        "{FAST}\n[[trigger]]\nname = \"t\"\non = [\"app:latest\"]\nwebhook = {{ url = \"{}/x\" }}\n",
        rx.url
    ));
    e.import_new("app", &format!("{}/a/app", reg.host));
    rx.wait_requests(1).await;
    let first = Instant::now();
    rx.wait_requests(2).await;
    assert!(
        first.elapsed() >= Duration::from_millis(1500),
        "retried after {:?}, before Retry-After: 2",
        first.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_image_supersedes_pending_and_aliases_fire() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    push.image("a/py", "3.6", "1").await;
    let rx = Receiver::start().await;
    // the first delivery waits out a long Retry-After, so the next image supersedes it
    rx.script(&[(503, &[("retry-after", "30")])]);
    let e = Engine::start(&format!(
        "{FAST}
[[stream]]
name = \"py\"
tags = [
  {{ name = \"3.6\", from.image = \"{}/a/py:3.6\" }},
  {{ name = \"latest\", from.tag = \"3.6\", alias = true }},
]

[[trigger]]
name = \"t\"
on = [\"py:latest\"]
webhook = {{ url = \"{}/x\" }}
",
        reg.host, rx.url
    ));
    rx.wait_requests(1).await;
    let d2 = push.image("a/py", "3.6", "2").await;
    expect_code(&e.cli(&["import-image", "py:3.6"]), 0);
    assert_eq!(
        e.istag("py:latest").unwrap()["digest"],
        d2.as_str(),
        "the alias follows"
    );
    let reqs = rx.wait_requests(2).await;
    assert_eq!(reqs[1].json()["data"]["digest"], d2.as_str());
    assert_eq!(reqs[1].json()["subject"], "default/py:latest");
    let t = wait_for("superseded recorded", || async {
        let t = trigger_json(&e, "t").await;
        (t["superseded"] == 1 && t["delivered"] == 1).then_some(t)
    })
    .await;
    assert_eq!(t["last_fired"]["default/py:latest"], d2.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_initial_records_the_first_image_only() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    push.image("a/app", "latest", "1").await;
    let rx = Receiver::start().await;
    let cfg = format!(
        "{FAST}
[[stream]]
name = \"app\"
tags = [ {{ name = \"latest\", from.image = \"{}/a/app\" }} ]

[[trigger]]
name = \"t\"
on = [\"app:latest\"]
skip_initial = true
webhook = {{ url = \"{}/x\" }}
",
        reg.host, rx.url
    );
    let e = Engine::start(&cfg);
    let t = wait_for("first image recorded", || async {
        let t = trigger_json(&e, "t").await;
        (t["last_fired"]["default/app:latest"].is_string()).then_some(t)
    })
    .await;
    assert_eq!(t["pending"], 0);
    let d2 = push.image("a/app", "latest", "2").await;
    expect_code(&e.cli(&["import-image", "app"]), 0);
    let reqs = rx.wait_requests(1).await;
    assert_eq!(reqs[0].json()["data"]["digest"], d2.as_str());
    assert_eq!(reqs.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_delivery_loses_nothing() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    let rx = Receiver::start().await;
    rx.set_delay(Duration::from_millis(300));
    let n = 12;
    let mut cfg = String::from("[delivery]\nconcurrency = 2\ninitial_backoff = \"100ms\"\n");
    for i in 0..n {
        push.image(&format!("a/s{i}"), "latest", "1").await;
        cfg += &format!(
            "\n[[trigger]]\nname = \"t{i}\"\non = [\"s{i}:latest\"]\nwebhook = {{ url = \"{}/t{i}\", timeout = \"5s\" }}\n",
            rx.url
        );
    }
    let mut e = Engine::start(&cfg);
    for i in 0..n {
        e.import_new(&format!("s{i}"), &format!("{}/a/s{i}", reg.host));
    }
    rx.wait_requests(2).await;
    e.restart_after_crash();
    rx.set_delay(Duration::ZERO);
    // duplicates (at least once) carry the same key as their original
    rx.wait_each_delivered_once_or_more(n).await;
}

/// SPEC 10: Buildkite, CircleCI and Azure Pipelines requests exactly as listed, and Standard
/// Webhooks signatures that the reference library (standardwebhooks, PyPI) verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_ci_systems_and_standard_webhooks() {
    let reg = Registry::start();
    let d1 = Pusher::new(&reg.host).image("team/ci", "latest", "1").await;
    let rx = Receiver::start().await;
    let u = &rx.url;
    // The key of a Standard Webhooks secret is base64; `whsec_` is the usual prefix.
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let e = Engine::start_env(
        &format!(
            "{FAST}
[[trigger]]
name = \"bk\"
on = [\"ci:latest\"]
buildkite = {{ org = \"acme\", pipeline = \"app\", token_env = \"T_BK\", api_url = \"{u}/bk\" }}

[[trigger]]
name = \"cc\"
on = [\"ci:latest\"]
circleci = {{ project_slug = \"gh/acme/app\", branch = \"release\", token_env = \"T_CC\", api_url = \"{u}/cc\" }}

[[trigger]]
name = \"az\"
on = [\"ci:latest\"]
azure = {{ organization = \"acme\", project = \"web\", pipeline_id = 42, token_env = \"T_AZ\", api_url = \"{u}/az\" }}

[[trigger]]
name = \"sw\"
on = [\"ci:latest\"]
webhook = {{ url = \"{u}/sw\", secret_env = \"T_SW\", signature = \"standard\" }}
"
        ),
        &[("T_BK", "bk-token"), ("T_CC", "cc-token"), ("T_AZ", "az-token"), ("T_SW", secret)],
    );
    e.import_new("ci", &format!("{}/team/ci", reg.host));
    let reqs = rx.wait_requests(4).await;
    let by = |p: &str| {
        reqs.iter()
            .find(|r| r.path == p)
            .unwrap_or_else(|| {
                panic!(
                    "no {p}: {:?}",
                    reqs.iter().map(|r| &r.path).collect::<Vec<_>>()
                )
            })
            .clone()
    };
    let id = e.istag("ci").unwrap()["history"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let image = format!("{}/team/ci@{d1}", reg.host);

    let bk = by("/bk/v2/organizations/acme/pipelines/app/builds");
    assert_eq!(
        bk.header("authorization").as_deref(),
        Some("Bearer bk-token")
    );
    assert_eq!(bk.header("idempotency-key").as_deref(), Some(id.as_str()));
    let b = bk.json();
    assert_eq!(
        (b["commit"].as_str(), b["branch"].as_str()),
        (Some("HEAD"), Some("main"))
    );
    assert!(b["message"].is_string());
    assert_eq!(b["env"]["ISTREAM_DIGEST"], d1.as_str());
    assert_eq!(b["env"]["ISTREAM_IMAGE"], image.as_str());
    assert_eq!(b["env"]["ISTREAM_TAG"], "default/ci:latest");

    let cc = by("/cc/api/v2/project/gh/acme/app/pipeline");
    assert_eq!(cc.header("circle-token").as_deref(), Some("cc-token"));
    let c = cc.json();
    assert_eq!(c["branch"], "release");
    assert_eq!(c["parameters"]["istream_digest"], d1.as_str());
    assert_eq!(c["parameters"]["istream_image"], image.as_str());
    assert_eq!(c["parameters"]["istream_tag"], "default/ci:latest");

    let az = by("/az/acme/web/_apis/pipelines/42/runs");
    assert_eq!(az.query, "api-version=7.1");
    use base64::Engine as _;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(":az-token")
    );
    assert_eq!(az.header("authorization").as_deref(), Some(basic.as_str()));
    let a = az.json();
    assert_eq!(
        a["resources"]["repositories"]["self"]["refName"],
        "refs/heads/main"
    );
    assert_eq!(a["templateParameters"]["istream_digest"], d1.as_str());
    assert_eq!(a["templateParameters"]["istream_tag"], "default/ci:latest");

    let sw = by("/sw");
    assert_eq!(sw.header("webhook-id").as_deref(), Some(id.as_str()));
    assert!(sw.header("webhook-signature").unwrap().starts_with("v1,"));
    assert!(sw.header("x-istream-signature-256").is_none());
    let check = |body: &[u8]| {
        let headers: serde_json::Map<String, serde_json::Value> = sw
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().into()))
            .collect();
        let input = serde_json::json!({"headers": headers, "body": String::from_utf8_lossy(body)});
        run_python(
            "standardwebhooks_check.py",
            &[secret],
            input.to_string().as_bytes(),
        )
    };
    let ok = check(&sw.body);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let verified: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(verified["data"]["digest"], d1.as_str());
    let mut tampered = sw.body.clone();
    tampered[10] ^= 1;
    assert!(
        !check(&tampered).status.success(),
        "a changed body must not verify"
    );
}

/// SPEC 10: `triggers test` sends one delivery now, marked as a test, and records nothing;
/// it exits 0 on 2xx and 1 otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_test_sends_one_marked_delivery() {
    let reg = Registry::start();
    Pusher::new(&reg.host).image("team/tt", "latest", "1").await;
    let ok = Receiver::start().await;
    let bad = Receiver::start().await;
    bad.script(&[(503, &[])]);
    let e = Engine::start(&format!(
        "{FAST}
[[trigger]]
name = \"good\"
on = [\"tt:latest\"]
skip_initial = true
webhook = {{ url = \"{}/good\" }}

[[trigger]]
name = \"broken\"
on = [\"tt:latest\"]
skip_initial = true
webhook = {{ url = \"{}/broken\" }}
",
        ok.url, bad.url
    ));
    e.import_new("tt", &format!("{}/team/tt", reg.host));
    let o = e.cli(&["triggers", "test", "good"]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("HTTP 200"), "{}", stdout(&o));
    let r = ok.wait_requests(1).await;
    assert_eq!(r[0].header("x-istream-test").as_deref(), Some("true"));
    assert_eq!(r[0].json()["data"]["test"], true);
    assert_eq!(r[0].json()["subject"], "default/tt:latest");
    let o = e.cli(&["triggers", "test", "broken", "--tag", "default/tt:latest"]);
    expect_code(&o, 1);
    assert!(stderr(&o).contains("503"), "{}", stderr(&o));
    // nothing recorded: no deliveries, the first image still only recorded (skip_initial)
    for name in ["good", "broken"] {
        let t = trigger_json(&e, name).await;
        assert_eq!(
            (
                t["pending"].as_i64(),
                t["delivered"].as_i64(),
                t["dead"].as_i64()
            ),
            (Some(0), Some(0), Some(0)),
            "{t}"
        );
    }
    expect_code(&e.cli(&["triggers", "test", "nope"]), 1);
    expect_code(&e.cli(&["triggers", "test"]), 2);
    assert_eq!(ok.requests().len(), 1);
}
