//! Who may do what: registry credentials (htpasswd basic auth on a real registry, a bearer
//! token service like Docker Hub's), API tokens with scopes, and what `/metrics` shows.

use std::sync::{Arc, Mutex};

use crate::support::*;

/// bcrypt of "s3cret" (cost 5), for the registry's htpasswd.
const HTPASSWD: &str = "ci:$2b$05$abcdefghijklmnopqrstuuLK7U1u6pVRmL7L1BBM2aS35PSZnDXlK";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_registry_needs_configured_credentials() {
    let reg = Registry::start_with(RegistryOptions {
        htpasswd: Some(HTPASSWD.into()),
        ..Default::default()
    });
    let d = Pusher::with_basic(&reg.host, "ci", "s3cret")
        .image("priv/app", "latest", "1")
        .await;
    let anon = Engine::start("");
    let o = anon.cli(&[
        "import-image",
        "app",
        &format!("--from={}/priv/app", reg.host),
        "--confirm",
    ]);
    expect_code(&o, 1);
    assert_eq!(
        anon.istag("app").unwrap()["conditions"][0]["reason"],
        "Unauthorized"
    );
    let e = Engine::start_env(
        &format!(
            "[[registry]]\nhost = \"{}\"\nusername = \"ci\"\npassword_env = \"T_REG_PW\"\n",
            reg.host
        ),
        &[("T_REG_PW", "s3cret")],
    );
    e.import_new("app", &format!("{}/priv/app", reg.host));
    assert_eq!(e.istag("app").unwrap()["digest"], d.as_str());
    let o = e.cli(&["describe", "is/app"]);
    assert!(!stdout(&o).contains("s3cret") && !e.log.text().contains("s3cret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_flow_caches_tokens_per_scope() {
    use axum::http::{HeaderMap, StatusCode};
    let token_calls: Arc<Mutex<Vec<String>>> = Arc::default();
    let calls = token_calls.clone();
    let digest = format!("sha256:{}", "ab".repeat(32));
    let dg = digest.clone();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = l.local_addr().unwrap().to_string();
    let realm = format!("http://{host}/token");
    let app = axum::Router::new()
        .route(
            "/token",
            axum::routing::get(move |q: axum::extract::RawQuery| {
                let calls = calls.clone();
                async move {
                    calls.lock().unwrap().push(q.0.unwrap_or_default());
                    axum::Json(serde_json::json!({"token": "tok-123", "expires_in": 300}))
                }
            }),
        )
        .fallback(move |h: HeaderMap| {
            let (dg, realm) = (dg.clone(), realm.clone());
            async move {
                let mut out = HeaderMap::new();
                if h.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer tok-123") {
                    out.insert("www-authenticate", format!("Bearer realm=\"{realm}\",service=\"stub\",scope=\"repository:lib/app:pull\"").parse().unwrap());
                    return (StatusCode::UNAUTHORIZED, out);
                }
                out.insert("docker-content-digest", dg.parse().unwrap());
                out.insert("content-type", "application/vnd.docker.distribution.manifest.v2+json".parse().unwrap());
                (StatusCode::OK, out)
            }
        });
    tokio::spawn(async move { axum::serve(l, app).await });
    let e = Engine::start("");
    e.import_new("app", &format!("{host}/lib/app"));
    expect_code(&e.cli(&["import-image", "app"]), 0);
    assert_eq!(e.istag("app").unwrap()["digest"], digest.as_str());
    let calls = token_calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "the token is cached: {calls:?}");
    assert!(
        calls[0].contains("scope=repository%3Alib%2Fapp%3Apull")
            && calls[0].contains("service=stub"),
        "{calls:?}"
    );
}

/// method, path, bearer token, JSON body, expected status
type Case<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    Option<&'a serde_json::Value>,
    u16,
);

async fn api(
    e: &Engine,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> u16 {
    istream::registry::install_crypto();
    let c = reqwest::Client::new();
    let mut r = c.request(method.parse().unwrap(), format!("{}{path}", e.url));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    r.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tokens_and_scopes() {
    let reg = Registry::start();
    Pusher::new(&reg.host).image("a/app", "latest", "1").await;
    let hash = sha256(b"reader-token");
    let e = Engine::start_env(
        &format!(
            "[[api.token]]\nname = \"team-a\"\ntoken_env = \"T_TEAM_A\"\nscopes = [\"team-a:tag\", \"team-a:import\", \"team-a:read\"]\n\n[[api.token]]\nname = \"reader\"\nsha256 = \"{}\"\nscopes = [\"*:read\"]\n",
            hash.trim_start_matches("sha256:")
        ),
        &[("T_TEAM_A", "team-a-token")],
    );
    let import =
        serde_json::json!({"name": "app", "from": format!("{}/a/app", reg.host), "confirm": true});
    let tag = serde_json::json!({"source": "team-a/app:latest", "dests": ["team-b/app:latest"]});
    let (import_a, import_b) = (
        "/api/v1/namespaces/team-a/import",
        "/api/v1/namespaces/team-b/import",
    );
    let stream = "/api/v1/namespaces/team-a/imagestreams/app";
    // In order: the allowed import must come before the reads of what it made.
    let cases: [Case; 11] = [
        ("POST", import_a, None, Some(&import), 401),
        ("POST", import_a, Some("wrong"), Some(&import), 401),
        ("POST", import_a, Some("reader-token"), Some(&import), 403),
        ("POST", import_b, Some("team-a-token"), Some(&import), 403),
        ("POST", import_a, Some("team-a-token"), Some(&import), 200),
        ("GET", stream, Some("reader-token"), None, 200),
        ("GET", stream, None, None, 401),
        // no tag right in team-b
        (
            "POST",
            "/api/v1/namespaces/team-a/tag",
            Some("team-a-token"),
            Some(&tag),
            403,
        ),
        (
            "DELETE",
            "/api/v1/namespaces/team-a/imagestreamtags/app:latest",
            Some("reader-token"),
            None,
            403,
        ),
        (
            "POST",
            "/api/v1/triggers/x/retry",
            Some("reader-token"),
            None,
            403,
        ),
        ("GET", "/healthz", None, None, 200),
    ];
    for (method, path, token, body, want) in cases {
        assert_eq!(
            api(&e, method, path, token, body.cloned()).await,
            want,
            "{method} {path} with {token:?}"
        );
    }
    // the CLI sends --token / ISTREAM_TOKEN
    let o = std::process::Command::new(bin())
        .args(["get", "istag", "app:latest", "-n", "team-a", "-o", "json"])
        .env("ISTREAM_SERVER", &e.url)
        .env("ISTREAM_TOKEN", "reader-token")
        .output()
        .unwrap();
    expect_code(&o, 0);
    let o = std::process::Command::new(bin())
        .args(["get", "istag", "app:latest", "-n", "team-a"])
        .env("ISTREAM_SERVER", &e.url)
        .output()
        .unwrap();
    expect_code(&o, 1);
    assert!(stderr(&o).contains("token"), "{}", stderr(&o));
    // health needs no token
    assert_eq!(api(&e, "GET", "/readyz", None, None).await, 200);
    assert!(!e.log.text().contains("team-a-token") && !e.log.text().contains("reader-token"));
}

/// Issue 15: every family exists from the start, with its known label values at zero, so an
/// alert on import failures can be written before the first one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_family_is_there_from_the_start() {
    let e = Engine::start(
        "[[registry]]\nhost = \"127.0.0.1:9\"\n\n[[trigger]]\nname = \"t\"\non = [\"a:latest\"]\nwebhook = { url = \"http://127.0.0.1:9/x\" }\n",
    );
    let text = e.get("/metrics").await.text().await.unwrap();
    for family in [
        "istream_tag_changes",
        "istream_import_failures",
        "istream_registry_checks",
        "istream_events_published",
        "istream_outbox_depth",
        "istream_scheduled_tags",
        "istream_deliveries",
        "istream_delivery_seconds",
        "istream_hook_requests",
        "istream_rate_limit_pauses",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing:\n{text}"
        );
    }
    for line in [
        "istream_import_failures_total{reason=\"NotFound\"} 0",
        "istream_tag_changes_total{cause=\"push\"} 0",
        "istream_registry_checks_total{registry=\"127.0.0.1:9\",result=\"Unreachable\"} 0",
        "istream_deliveries_total{trigger=\"t\",result=\"dead\"} 0",
        "istream_hook_requests_total{source=\"harbor\",result=\"accepted\"} 0",
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_changes() {
    let reg = Registry::start();
    Pusher::new(&reg.host).image("a/app", "latest", "1").await;
    let e = Engine::start("");
    e.import_new("app", &format!("{}/a/app", reg.host));
    let r = e.get("/metrics").await;
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("openmetrics")
    );
    let text = r.text().await.unwrap();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        assert!(line.starts_with("istream_"), "{line}");
    }
    assert!(
        text.contains("istream_tag_changes_total{cause=\"import\"} 1"),
        "{text}"
    );
    assert!(text.contains("istream_registry_checks_total{"), "{text}");
    assert!(text.trim_end().ends_with("# EOF"));
    let spec = e
        .get("/api/v1/openapi.json")
        .await
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(spec["openapi"], "3.0.3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let ca = dir.path().join("ca.pem");
    let run = |args: &[&str]| {
        let o = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("openssl makes test certificates");
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-days",
            "1",
            "-subj",
            "/CN=istream test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-subj",
            "/CN=localhost",
            "-keyout",
            "key.pem",
            "-out",
            "leaf.csr",
        ],
    ]
    .concat());
    std::fs::write(
        dir.path().join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "cert.pem",
    ]);
    // TLS keys through environment overrides of [server]
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    let e = Engine::start_env(
        "",
        &[
            ("ISTREAM_SERVER__TLS_CERT_FILE", &c),
            ("ISTREAM_SERVER__TLS_KEY_FILE", &k),
        ],
    );
    assert!(e.url.starts_with("https://"), "{}", e.url);
    // the CLI trusts the engine through --certificate-authority
    let o = std::process::Command::new(bin())
        .args(["get", "is", "-o", "json", "--certificate-authority"])
        .arg(&ca)
        .env("ISTREAM_SERVER", &e.url)
        .output()
        .unwrap();
    expect_code(&o, 0);
    assert_eq!(stdout(&o).trim(), "[]");
    // without it the certificate is not trusted, and plain HTTP gets no answer
    let o = std::process::Command::new(bin())
        .args(["get", "is"])
        .env("ISTREAM_SERVER", &e.url)
        .output()
        .unwrap();
    expect_code(&o, 1);
    let plain = e.url.replace("https://", "http://");
    let o = std::process::Command::new(bin())
        .args(["get", "is"])
        .env("ISTREAM_SERVER", &plain)
        .output()
        .unwrap();
    expect_code(&o, 1);
}
