//! What operators and scripts rely on: `import-image --all` with paginated tag lists, JSON
//! logs, completions and the man page.

use std::process::Command;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_all_takes_latest_then_versions_descending() {
    let reg = Registry::start();
    let push = Pusher::new(&reg.host);
    for t in ["1.0", "1.2", "2.0", "latest", "beta"] {
        push.image("a/app", t, t).await;
    }
    let e = Engine::start("[schedule]\nmax_import_all = 3\n");
    let o = e.cli(&[
        "import-image",
        "app",
        &format!("--from={}/a/app", reg.host),
        "--all",
    ]);
    expect_code(&o, 1);
    assert!(stderr(&o).contains("--confirm"), "{}", stderr(&o));
    let o = e.cli(&[
        "import-image",
        "app",
        &format!("--from={}/a/app", reg.host),
        "--all",
        "--confirm",
    ]);
    expect_code(&o, 0);
    let out = stdout(&o);
    assert!(
        out.contains("importing 3 tags")
            && out.contains("[1/3] app:latest sha256:")
            && out.contains("[3/3]"),
        "{out}"
    );
    assert!(
        stdout(&o).contains("3 of 3 tags imported"),
        "{}",
        stdout(&o)
    );
    let is: serde_json::Value =
        serde_json::from_slice(&e.cli(&["get", "is", "app", "-o", "json"]).stdout).unwrap();
    let mut tags: Vec<&str> = is["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tag"].as_str().unwrap())
        .collect();
    tags.sort();
    assert_eq!(tags, vec!["1.2", "2.0", "latest"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_lists_are_followed_across_pages() {
    use axum::http::{HeaderMap, StatusCode, Uri};
    let digest = format!("sha256:{}", "cd".repeat(32));
    let dg = digest.clone();
    let app = axum::Router::new().fallback(move |uri: Uri| {
        let dg = dg.clone();
        async move {
            let mut h = HeaderMap::new();
            if uri.path().ends_with("/tags/list") {
                let (tags, next) = match uri.query().unwrap_or("") {
                    q if q.contains("last=b") => (vec!["c"], None),
                    _ => (
                        vec!["a", "b"],
                        Some("</v2/p/app/tags/list?n=2&last=b>; rel=\"next\""),
                    ),
                };
                if let Some(n) = next {
                    h.insert("link", n.parse().unwrap());
                }
                return (
                    StatusCode::OK,
                    h,
                    serde_json::json!({"name": "p/app", "tags": tags}).to_string(),
                );
            }
            h.insert("docker-content-digest", dg.parse().unwrap());
            (StatusCode::OK, h, String::new())
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = l.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(l, app).await });
    let e = Engine::start("");
    expect_code(
        &e.cli(&[
            "import-image",
            "app",
            &format!("--from={host}/p/app"),
            "--all",
            "--confirm",
        ]),
        0,
    );
    let is: serde_json::Value =
        serde_json::from_slice(&e.cli(&["get", "is", "app", "-o", "json"]).stdout).unwrap();
    assert_eq!(is["tags"].as_array().unwrap().len(), 3, "{is}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_line_by_line() {
    let reg = Registry::start();
    Pusher::new(&reg.host).image("a/app", "latest", "1").await;
    let e = Engine::start_env("", &[("ISTREAM_LOG_FORMAT", "json")]);
    e.import_new("app", &format!("{}/a/app", reg.host));
    wait_for("the change logged", || async { e.log.find("tag changed") }).await;
    let text = e.log.text();
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
    let change = text.lines().find(|l| l.contains("tag changed")).unwrap();
    let v: serde_json::Value = serde_json::from_str(change).unwrap();
    assert_eq!(v["subject"], "default/app:latest");
    assert!(v["digest"].as_str().unwrap().starts_with("sha256:"));
}

#[test]
fn completions_and_man_page_generate() {
    for shell in ["bash", "zsh", "fish"] {
        let o = Command::new(bin())
            .args(["completion", shell])
            .output()
            .unwrap();
        expect_code(&o, 0);
        assert!(stdout(&o).contains("import-image"), "{shell}");
    }
    let o = Command::new(bin())
        .args(["completion", "tcsh"])
        .output()
        .unwrap();
    expect_code(&o, 2);
    let o = Command::new(bin()).arg("man").output().unwrap();
    expect_code(&o, 0);
    assert!(stdout(&o).contains(".TH istream"));
}

#[test]
fn bad_config_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("triggers.toml");
    std::fs::write(&cfg, "[server]\nlisten = \"127.0.0.1:0\"\n\n[[trigger]]\nname = \"t\"\non = [\"p:latest\"]\nwebhook = { url = \"http://127.0.0.1:9/x\", secret_env = \"ISTREAM_T_UNSET\" }\n").unwrap();
    let o = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .env_remove("ISTREAM_T_UNSET")
        .output()
        .unwrap();
    expect_code(&o, 1);
    let err = stderr(&o);
    assert!(
        err.contains("triggers.toml:7")
            && err.contains("trigger[0].webhook.secret_env")
            && err.contains("ISTREAM_T_UNSET"),
        "{err}"
    );
    // the CLI's own variables never break start-up; `__` overrides apply
    std::fs::write(&cfg, "[store]\npath = \"x.db\"\n").unwrap();
    let o = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("ISTREAM_SERVER", "http://127.0.0.1:1")
        .env("ISTREAM_TOKEN", "t")
        .env("ISTREAM_SERVER__LISTEN", "not-an-address")
        .current_dir(dir.path())
        .output()
        .unwrap();
    expect_code(&o, 1);
    assert!(
        stderr(&o).contains("ISTREAM_SERVER__LISTEN") || stderr(&o).contains("server.listen"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn deploy_configs_start_the_engine() {
    let k8s = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/istream.yaml"
    ))
    .unwrap();
    let embedded: String = k8s
        .split("triggers.toml: |\n")
        .nth(1)
        .unwrap()
        .lines()
        .take_while(|l| l.starts_with("    "))
        .map(|l| format!("{}\n", &l[4..]))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let k8s_cfg = dir.path().join("k8s.toml");
    std::fs::write(&k8s_cfg, embedded).unwrap();
    let compose_cfg =
        std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/istream.toml"));
    for cfg in [compose_cfg, k8s_cfg] {
        let mut child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("ISTREAM_API_TOKEN", "t1")
            .env("ISTREAM_HOOK_TOKEN", "t2")
            // loopback only, and no name lookups: the files name compose/k8s hosts
            .env("ISTREAM_SERVER__LISTEN", "127.0.0.1:0")
            .env(
                "ISTREAM_STORE__PATH",
                dir.path().join("db").display().to_string(),
            )
            .env("ISTREAM_NATS__URL", "nats://127.0.0.1:1")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let log = Log::default();
        log.follow(child.stderr.take().unwrap());
        log.wait_line("istream listening on", &mut child);
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Issue 15: SIGTERM stops accepting, lets the request in flight finish (its import is
/// recorded and answered), then exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_request_in_flight() {
    // A registry that answers slowly (and uselessly: the import fails, recorded as such).
    let slow = receiver::Receiver::start().await;
    slow.set_delay(std::time::Duration::from_millis(1500));
    let host = slow.url.trim_start_matches("http://").to_string();
    let mut e = Engine::start("");
    let url = e.url.clone();
    let from = format!("--from={host}/slow/app:1");
    let cli = std::thread::spawn(move || {
        Command::new(bin())
            .args([
                "--server",
                &url,
                "import-image",
                "slow:1",
                &from,
                "--confirm",
            ])
            .output()
            .unwrap()
    });
    wait_for("the import to reach the registry", || async {
        (slow.len() > 0).then_some(())
    })
    .await;
    e.stop();
    let out = cli.join().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("invalid response") || err.contains("InvalidResponse"),
        "the client got the import's answer, not a dropped connection: {err}"
    );
    assert!(e.log.find("shutting down").is_some());
    // The import finished before the exit: its failure is on the tag.
    e.restart();
    let t = e.istag("slow:1").unwrap();
    assert_eq!(t["conditions"][0]["reason"], "InvalidResponse", "{t}");
}
