//! Bad input of every kind gets a clear error or condition and changes nothing.

use std::time::{Duration, Instant};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_arguments_are_usage_errors() {
    let e = Engine::start("");
    for args in [
        vec!["import-image", "Python:3", "--from=x/y", "--confirm"],
        vec!["import-image", "python:-bad", "--from=x/y", "--confirm"],
        vec!["import-image", "python", "--from=UPPER/Case", "--confirm"],
        vec!["import-image", "python", "--from=x@sha256:abc", "--confirm"],
        vec!["tag", "python:3.6"],
        vec!["tag", "python@sha256:zz", "python:latest"],
        vec!["tag", "--alias", "a:1", "b:2"],
        vec!["tag", "--scheduled", "python:3.6", "python:latest"],
        vec!["describe", "foo/bar"],
        vec!["get", "pods"],
        vec!["import-image", "python", "--from=x/y", "--platform=linux"],
        vec!["nonsense"],
    ] {
        let o = e.cli(&args);
        expect_code(&o, 2);
        let err = stderr(&o);
        assert!(
            err.lines().count() >= 1 && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    // nothing was created
    let o = e.cli(&["get", "is", "-o", "json"]);
    assert_eq!(stdout(&o).trim(), "[]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_things_and_cycles_fail_with_exit_1() {
    let reg = Registry::start();
    Pusher::new(&reg.host).image("a/b", "latest", "x").await;
    let e = Engine::start("");
    let o = e.cli(&["describe", "is/nope"]);
    expect_code(&o, 1);
    assert!(stderr(&o).contains("nope"));
    expect_code(&e.cli(&["tag", "nope:1", "p:2"]), 1);
    e.import_new("p:1", &format!("{}/a/b", reg.host));
    expect_code(&e.cli(&["tag", "--alias", "p:1", "p:latest"]), 0);
    let o = e.cli(&["tag", "--alias", "p:latest", "p:1"]);
    expect_code(&o, 1);
    assert!(stderr(&o).contains("cycle"), "{}", stderr(&o));
    expect_code(&e.cli(&["tag", "-d", "p:nope"]), 1);
    let o = e.cli(&["tag", "p@sha256:ffff", "p:x"]);
    expect_code(&o, 1);
    // and the engine is unreachable: says where it tried and how to start one
    let o = std::process::Command::new(bin())
        .args(["get", "is"])
        .env("ISTREAM_SERVER", "http://127.0.0.1:9")
        .output()
        .unwrap();
    expect_code(&o, 1);
    assert!(
        stderr(&o).contains("http://127.0.0.1:9") && stderr(&o).contains("istream serve"),
        "{}",
        stderr(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_imports_keep_the_image_and_set_the_condition() {
    let mut reg = Registry::start();
    let push = Pusher::new(&reg.host);
    let d1 = push.image("a/b", "latest", "one").await;
    let e = Engine::start("");
    let h = reg.host.clone();
    e.import_new("b", &format!("{h}/a/b"));

    // 404: tag now points at a missing repository
    let o = e.cli(&["import-image", "b", &format!("--from={h}/a/missing")]);
    expect_code(&o, 1);
    assert!(stderr(&o).contains("NotFound"), "{}", stderr(&o));
    let t = e.istag("b").unwrap();
    assert_eq!(
        t["digest"],
        d1.as_str(),
        "a failed import never moves a tag"
    );
    assert_eq!(t["conditions"][0]["type"], "ImportSuccess");
    assert_eq!(t["conditions"][0]["status"], "False");
    assert_eq!(t["conditions"][0]["reason"], "NotFound");

    // registry down: Unreachable, still the same image
    expect_code(
        &e.cli(&["import-image", "b", &format!("--from={h}/a/b")]),
        0,
    );
    assert!(
        e.istag("b").unwrap()["conditions"]
            .as_array()
            .unwrap()
            .is_empty(),
        "success clears the condition"
    );
    reg.stop();
    let o = e.cli(&["import-image", "b"]);
    expect_code(&o, 1);
    let t = e.istag("b").unwrap();
    assert_eq!(t["conditions"][0]["reason"], "Unreachable");
    assert_eq!(t["digest"], d1.as_str());
}

/// A registry stub answering each manifest request with a scripted fault.
async fn stub_registry(fault: &'static str) -> String {
    use axum::http::{HeaderMap, StatusCode};
    let app = axum::Router::new().fallback(move || async move {
        let mut h = HeaderMap::new();
        match fault {
            "500" => (StatusCode::INTERNAL_SERVER_ERROR, h, "boom".to_string()),
            "401" => {
                h.insert("www-authenticate", "Basic realm=\"x\"".parse().unwrap());
                (StatusCode::UNAUTHORIZED, h, String::new())
            }
            "garbage-digest" => {
                h.insert("docker-content-digest", "sha256:nothex".parse().unwrap());
                (StatusCode::OK, h, String::new())
            }
            "slow" => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                (StatusCode::OK, h, String::new())
            }
            "huge" => (
                StatusCode::OK,
                h,
                format!(
                    "{{\"schemaVersion\":2,\"pad\":\"{}\"}}",
                    "x".repeat(5 << 20)
                ),
            ),
            _ => (StatusCode::OK, h, "{not json".to_string()),
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    addr.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_faults_map_to_reasons() {
    let e = Engine::start("");
    for (fault, reason) in [
        ("500", "InvalidResponse"),
        ("401", "Unauthorized"),
        ("garbage-digest", "InvalidResponse"),
        ("no-digest-garbage-body", "InvalidResponse"),
        ("huge", "InvalidResponse"),
    ] {
        let host = stub_registry(fault).await;
        let name = format!("s{}:x", fault.len());
        let o = e.cli(&[
            "import-image",
            &name,
            &format!("--from={host}/r/x:1"),
            "--confirm",
        ]);
        expect_code(&o, 1);
        let t = e.istag(&name).unwrap();
        assert_eq!(t["digest"], serde_json::Value::Null, "{fault}");
        assert_eq!(t["conditions"][0]["reason"], reason, "{fault}: {t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_api_bodies_get_4xx() {
    istream::registry::install_crypto();
    let e = Engine::start("");
    // No pooling: the server closes a connection after refusing an oversized body.
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let big = "x".repeat(2 << 20);
    for path in [
        "/api/v1/namespaces/default/import",
        "/api/v1/namespaces/default/tag",
    ] {
        for body in [
            "",
            "{",
            "[]",
            "{\"name\": 5}",
            "{\"source\": \"a\", \"dests\": \"b\"}",
            "{\"unknown\": 1}",
            big.as_str(),
        ] {
            let r = c
                .post(format!("{}{path}", e.url))
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await;
            let s = match r {
                Ok(r) => r.status().as_u16(),
                // refused before it was read: the server may close while we still write
                Err(err) if body.len() > 1000 && err.is_request() => 413,
                Err(err) => panic!("{path}: {err}"),
            };
            assert!((400..500).contains(&s), "{path} with {:.20}: {s}", body);
            if body.len() > 1000 {
                assert_eq!(s, 413);
            }
        }
    }
    for path in [
        "/api/v1/namespaces/Bad_NS/imagestreams",
        "/api/v1/namespaces/default/imagestreamtags/a:b:c",
        "/api/v1/namespaces/default/imagestreamimages/x@md5:1",
        "/api/v1/namespaces/default/imagestreams/%00",
        "/api/v1/nope",
    ] {
        let s = c
            .get(format!("{}{path}", e.url))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        assert!((400..500).contains(&s), "{path}: {s}");
    }
    assert_eq!(e.get("/healthz").await.status().as_u16(), 200);
    assert_eq!(e.cli(&["get", "is", "-o", "json"]).stdout, b"[]\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registries_outside_the_allow_list_are_never_contacted() {
    let e = Engine::start_env(
        "",
        &[("ISTREAM_SERVER__ALLOWED_REGISTRIES", "[\"127.0.0.1:*\"]")],
    );
    // docker.io is not allowed: refused before any lookup or request
    let o = e.cli(&["import-image", "py", "--from=python:3", "--confirm"]);
    expect_code(&o, 1);
    let t = e.istag("py").unwrap();
    assert_eq!(t["conditions"][0]["reason"], "Unsupported");
    assert!(
        t["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("allowed_registries")
    );
}

/// A registry that answers every connection with a status line and then one header byte
/// every 200 ms, forever.
async fn trickling_registry() -> String {
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                if s.write_all(b"HTTP/1.1 200 OK\r\nX-Slow: ").await.is_err() {
                    return;
                }
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if s.write_all(b"a").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_registry_times_out_and_the_engine_keeps_serving() {
    let host = trickling_registry().await;
    let e = Engine::start(&format!(
        "[[registry]]\nhost = \"{host}\"\ntimeout = \"2s\"\n"
    ));
    let started = Instant::now();
    let o = e.cli(&[
        "import-image",
        "slow:x",
        &format!("--from={host}/r/x:1"),
        "--confirm",
    ]);
    expect_code(&o, 1);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "gave up after {:?}",
        started.elapsed()
    );
    let t = e.istag("slow:x").unwrap();
    assert_eq!(t["conditions"][0]["reason"], "Unreachable", "{t}");
    assert!(e.get("/healthz").await.status().is_success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_or_huge_request_headers_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let e = Engine::start("");
    let addr = e.url.trim_start_matches("http://").to_string();
    // Headers that never end: the engine closes the connection.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Meanwhile everyone else is served.
    assert!(e.get("/healthz").await.status().is_success());
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(25), slow.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "a connection with unfinished headers stayed open"
    );
    // 100 KB of headers: refused with 431.
    istream::registry::install_crypto();
    let r = reqwest::Client::new()
        .get(format!("{}/healthz", e.url))
        .header("x-big", "a".repeat(100 * 1024))
        .send()
        .await;
    match r {
        Ok(r) => assert_eq!(r.status().as_u16(), 431),
        // the server may close while the client still writes
        Err(err) => assert!(err.is_request() || err.is_connect(), "{err}"),
    }
    assert!(e.get("/healthz").await.status().is_success());
}
