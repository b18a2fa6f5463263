//! Policy tags (SPEC 8) against a real registry: the newest matching tag wins, never a lower
//! one on its own, `NoMatch` when nothing matches, `min_age` holds a move back, filters and
//! extracts, declared policy tags imported at start, a push re-evaluating them.

use crate::support::receiver::Receiver;
use crate::support::*;

async fn delete_manifest(host: &str, repo: &str, digest: &str) {
    istream::registry::install_crypto();
    let r = reqwest::Client::new()
        .delete(format!("http://{host}/v2/{repo}/manifests/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202, "DELETE {repo}@{digest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_tag_follows_the_newest_matching_tag() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    let h = &reg.host;
    let mut d = std::collections::HashMap::new();
    for t in [
        "3.11.9",
        "3.12.6",
        "3.12.7",
        "latest",
        "4.0.0",
        "3.12.8-rc.1",
    ] {
        d.insert(t, push.image("library/python", t, t).await);
    }
    let e = Engine::start("");
    let repo = format!("{h}/library/python");
    let o = e.cli(&["tag", &repo, "py:3", "--policy=semver:>=3.12 <4"]);
    expect_code(&o, 0);
    let t = e.istag("py:3").unwrap();
    assert_eq!(t["digest"], d["3.12.7"].as_str(), "{t}");
    assert_eq!(t["source_tag"], "3.12.7");
    assert_eq!(t["history"][0]["source_tag"], "3.12.7");
    assert_eq!(
        t["history"][0]["image"],
        format!("{repo}@{}", d["3.12.7"]).as_str()
    );
    assert_eq!(t["spec"]["from"]["policy"]["semver"], ">=3.12 <4");
    assert_eq!(t["spec"]["from"]["policy"]["repository"], repo.as_str());
    let o = e.cli(&["describe", "istag/py:3"]);
    assert!(
        stdout(&o).contains(&format!(
            "follows the newest tag of {repo} matching semver >=3.12 <4 (now 3.12.7)"
        )),
        "{}",
        stdout(&o)
    );

    // a newer version: the next check moves to it
    let d9 = push.image("library/python", "3.12.9", "3.12.9").await;
    expect_code(&e.cli(&["import-image", "py:3"]), 0);
    let t = e.istag("py:3").unwrap();
    assert_eq!(
        (t["digest"].as_str(), t["source_tag"].as_str()),
        (Some(d9.as_str()), Some("3.12.9"))
    );
    assert_eq!(t["history"][0]["cause"], "import");

    // it vanishes upstream: the tag keeps its image, no error, never a lower version
    delete_manifest(h, "library/python", &d9).await;
    expect_code(&e.cli(&["import-image", "py:3"]), 0);
    let t = e.istag("py:3").unwrap();
    assert_eq!(t["digest"], d9.as_str());
    assert!(t["conditions"].as_array().unwrap().is_empty(), "{t}");

    // nothing matches: NoMatch, exit 1
    let o = e.cli(&["tag", &repo, "py:5", "--policy=semver:>=5"]);
    expect_code(&o, 1);
    let t = e.istag("py:5").unwrap();
    assert_eq!(t["conditions"][0]["reason"], "NoMatch", "{t}");
    assert_eq!(t["digest"], serde_json::Value::Null);

    // min_age: the first pick is immediate, a newer candidate waits
    expect_code(
        &e.cli(&[
            "tag",
            &repo,
            "py:aged",
            "--policy=semver:>=3.12 <4",
            "--min-age=1h",
        ]),
        0,
    );
    assert_eq!(e.istag("py:aged").unwrap()["source_tag"], "3.12.7");
    push.image("library/python", "3.12.10", "3.12.10").await;
    expect_code(&e.cli(&["import-image", "py:aged"]), 0);
    let t = e.istag("py:aged").unwrap();
    assert_eq!(t["source_tag"], "3.12.7", "held back by min_age: {t}");
    assert!(t["held_back"]["3.12.10"]["first_seen"].is_string(), "{t}");
    let o = e.cli(&["describe", "istag/py:aged"]);
    assert!(
        stdout(&o).contains("Held back") && stdout(&o).contains("3.12.10"),
        "{}",
        stdout(&o)
    );

    // pre-releases only when asked; numerical order
    expect_code(
        &e.cli(&[
            "tag",
            &repo,
            "py:rc",
            "--policy=semver:>=3.12.8-0 <3.13",
            "--prerelease",
        ]),
        0,
    );
    assert_eq!(e.istag("py:rc").unwrap()["source_tag"], "3.12.10");

    // a rollback pins it; running the policy command again restores it
    let pinned = d["3.12.7"].clone();
    expect_code(&e.cli(&["tag", &format!("py@{pinned}"), "py:3"]), 0);
    assert!(e.istag("py:3").unwrap()["spec"]["from"]["digest"].is_string());
    expect_code(
        &e.cli(&["tag", &repo, "py:3", "--policy=semver:>=3.12 <4"]),
        0,
    );
    let t = e.istag("py:3").unwrap();
    assert_eq!(t["source_tag"], "3.12.10");
    assert!(t["spec"]["from"]["policy"].is_object());

    // bad policies are bad usage
    expect_code(
        &e.cli(&["tag", &repo, "py:x", "--policy=semver:>=banana"]),
        2,
    );
    expect_code(&e.cli(&["tag", &repo, "py:x", "--policy=newest"]), 2);
    expect_code(&e.cli(&["tag", &repo, "py:x", "--filter=.*"]), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_policy_tags_with_filter_and_extract() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    let h = &reg.host;
    for t in [
        "3.12.6-slim",
        "3.12.7-slim",
        "3.12.8",
        "3.13.0-slim-bookworm",
    ] {
        push.image("library/python", t, t).await;
    }
    let want = push
        .image("library/python", "3.12.9-slim", "3.12.9-slim")
        .await;
    let e = Engine::start(&format!(
        "[[stream]]\nname = \"python\"\ntags = [\n  {{ name = \"3-slim\", from.policy = {{ repository = \"{h}/library/python\", semver = \">=3.12, <4\", filter = '^(?P<v>\\d+\\.\\d+\\.\\d+)-slim$', extract = \"$v\" }} }},\n]\n"
    ));
    let t = wait_for("the declared policy tag's first pick", || async {
        e.istag("python:3-slim").filter(|t| t["digest"].is_string())
    })
    .await;
    assert_eq!(t["digest"], want.as_str());
    assert_eq!(t["source_tag"], "3.12.9-slim");
    // a bad declared policy is refused at start, naming the key
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("triggers.toml");
    std::fs::write(
        &cfg,
        format!("[[stream]]\nname = \"p\"\ntags = [{{ name = \"x\", from.policy = {{ repository = \"{h}/a\", semver = \">=banana\" }} }}]\n"),
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("triggers.toml:3") && err.contains("from.policy.semver"),
        "{err}"
    );
}

/// A push to the repository re-evaluates its policy tags (no polling involved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_re_evaluates_policy_tags() {
    const TOKEN: &str = "policy-hook";
    let rx = Receiver::start().await;
    let e = Engine::start_env(
        &format!(
            "[hooks]\ntoken_env = \"T_HOOKS\"\n\n[[trigger]]\nname = \"t\"\non = [\"base:1\"]\nwebhook = {{ url = \"{}/x\" }}\n",
            rx.url
        ),
        &[("T_HOOKS", TOKEN)],
    );
    let reg = Registry::start_with(RegistryOptions {
        notify: Some((format!("{}/hooks/registry", e.url), TOKEN.into())),
        ..Default::default()
    });
    let push = Pusher::new(&reg.host);
    push.image("team/base", "1.0.0", "1").await;
    let repo = format!("{}/team/base", reg.host);
    expect_code(&e.cli(&["tag", &repo, "base:1", "--policy=semver:^1"]), 0);
    assert_eq!(e.istag("base:1").unwrap()["source_tag"], "1.0.0");
    let d = push.image("team/base", "1.1.0", "2").await;
    let t = wait_for("the push to move the policy tag", || async {
        e.istag("base:1").filter(|t| t["digest"] == d.as_str())
    })
    .await;
    assert_eq!(t["source_tag"], "1.1.0");
    assert_eq!(t["history"][0]["cause"], "push");
    // the change's event names the chosen tag
    let reqs = rx.wait_requests(2).await;
    let last = reqs
        .iter()
        .map(|r| r.json())
        .find(|j| j["data"]["digest"] == d.as_str())
        .unwrap();
    assert_eq!(last["data"]["source_tag"], "1.1.0");
}

/// A scheduled policy tag is re-listed on its schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_policy_tag_moves_by_itself() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    push.image("team/sched", "1", "1").await;
    let e = Engine::start("[schedule]\ninterval = \"1s\"\n");
    let repo = format!("{}/team/sched", reg.host);
    expect_code(
        &e.cli(&["tag", &repo, "s:n", "--policy=numerical", "--scheduled"]),
        0,
    );
    let d = push.image("team/sched", "10", "10").await;
    let t = wait_for("the scheduled check to move the policy tag", || async {
        e.istag("s:n").filter(|t| t["digest"] == d.as_str())
    })
    .await;
    assert_eq!(t["source_tag"], "10");
    assert_eq!(t["history"][0]["cause"], "schedule");
}

/// The listing follows `Link` pagination (1,001 tags: two pages of 1,000), and `platform`
/// tracks one platform's manifest of the winning index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_span_pages_and_platforms_are_tracked() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    let manifest = push.prepare("team/paged", "one").await;
    for i in 0..1001 {
        push.manifest(
            "team/paged",
            &format!("1.0.{i}"),
            "application/vnd.docker.distribution.manifest.v2+json",
            &manifest,
        )
        .await;
    }
    let e = Engine::start("");
    let repo = format!("{}/team/paged", reg.host);
    expect_code(&e.cli(&["tag", &repo, "paged:1", "--policy=semver:^1"]), 0);
    assert_eq!(
        e.istag("paged:1").unwrap()["source_tag"],
        "1.0.1000",
        "the newest tag is on the second page"
    );

    let (_, children) = push
        .index(
            "team/multi",
            "2.0.0",
            &[("linux", "amd64", "a"), ("linux", "arm64", "a")],
        )
        .await;
    let multi = format!("{}/team/multi", reg.host);
    expect_code(
        &e.cli(&[
            "tag",
            &multi,
            "multi:2",
            "--policy=semver:2.x",
            "--platform=linux/arm64",
        ]),
        0,
    );
    let t = e.istag("multi:2").unwrap();
    assert_eq!(t["digest"], children[1].as_str(), "the arm64 manifest: {t}");
    assert_eq!(t["spec"]["platform"], "linux/arm64");
}
