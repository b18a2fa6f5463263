//! Latency and throughput of the outputs: figures, not assertions.
//! Run with `cargo bench --bench latency` (needs docker-registry and nats-server >= 2.10, as
//! `scripts/test.sh` installs; `ISTREAM_TEST_NATS` points at the latter).
//!
//! 1. events: change made (and committed) → event received, in-process (`watch` stream) and over JetStream,
//!    next to raw NATS publish → receive on the same server;
//! 2. triggers: tag change → webhook request received (p50/p99), and deliveries per second with
//!    the durable bookkeeping on, next to a plain HTTP POST loop to the same receiver;
//! 3. push: manifest PUT at the registry → trigger request received, with the registry's own
//!    notification delay for the same push; for manifest-only pushes to a tracked tag, and for
//!    real pushes (fresh blobs + manifest) to an `internal` registry that notifies of blob
//!    uploads and pulls too;
//! 4. burst: 100 identical notifications at once while the registry is slow: hook answer
//!    times and the registry requests the burst caused.
// Test and benchmark code: a failed unwrap is a failed run, which is what it should be.
#![allow(clippy::unwrap_used, unreachable_pub)]

#[path = "../tests/it/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use support::receiver::Receiver;
use support::*;

fn pct(mut v: Vec<Duration>, p: f64) -> f64 {
    v.sort();
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

fn report(name: &str, v: &[Duration]) {
    println!(
        "{name:<58} p50 {:>7.2} ms   p99 {:>7.2} ms   max {:>7.2} ms   (n={})",
        pct(v.to_vec(), 0.5),
        pct(v.to_vec(), 0.99),
        pct(v.to_vec(), 1.0),
        v.len()
    );
}

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    async fn tag(&self, source: &str, dest: &str) {
        let r = self
            .http
            .post(format!("{}/api/v1/namespaces/default/tag", self.base))
            .json(&serde_json::json!({"source": source, "dests": [dest]}))
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "tag {source} {dest}: {}",
            r.text().await.unwrap_or_default()
        );
    }
}

/// Two images in stream `app` (tags a and b) to flip `app:latest` between without a registry.
async fn two_images(e: &Engine, reg: &Registry) -> (String, String) {
    let push = Pusher::new(&reg.host);
    let da = push.image("bench/app", "a", "a").await;
    let db = push.image("bench/app", "b", "b").await;
    for (t, _) in [("a", &da), ("b", &db)] {
        let o = e.cli(&[
            "import-image",
            &format!("app:{t}"),
            &format!("--from={}/bench/app:{t}", reg.host),
            "--confirm",
        ]);
        assert!(o.status.success());
    }
    (da, db)
}

async fn events(reg: &Registry) {
    println!("== events: change recorded -> event received");
    let nats = Nats::start();
    // raw NATS baseline
    let client = async_nats::connect(&nats.url).await.unwrap();
    let mut sub = client.subscribe("bench.raw").await.unwrap();
    client.flush().await.unwrap();
    let mut raw = Vec::new();
    for _ in 0..300 {
        let t0 = Instant::now();
        client.publish("bench.raw", "x".into()).await.unwrap();
        client.flush().await.unwrap();
        sub.next().await.unwrap();
        raw.push(t0.elapsed());
    }
    report("raw NATS publish -> receive (baseline)", &raw);

    let e = Engine::start(&format!("[nats]\nurl = \"{}\"\n", nats.url));
    let (da, db) = two_images(&e, reg).await;
    let api = Api {
        http: reqwest::Client::new(),
        base: e.url.clone(),
    };
    let mut js_sub = client
        .subscribe("istream.default.app.latest")
        .await
        .unwrap();
    client.flush().await.unwrap();
    // in-process: the watch stream
    let watch = reqwest::Client::new()
        .get(format!(
            "{}/api/v1/watch?namespace=default&stream=app&tag=latest",
            e.url
        ))
        .send()
        .await
        .unwrap();
    let mut body = watch.bytes_stream();
    // Latency from the change's own timestamp (set when it is recorded) to arrival.
    let since = |payload: &[u8]| -> Duration {
        let ev: serde_json::Value = serde_json::from_slice(payload).unwrap();
        let t: chrono::DateTime<chrono::Utc> = ev["time"].as_str().unwrap().parse().unwrap();
        (chrono::Utc::now() - t).to_std().unwrap_or_default()
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    tokio::spawn(async move {
        let mut buf = String::new();
        while let Some(Ok(chunk)) = body.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(i) = buf.find("\n\n") {
                let ev: String = buf.drain(..i + 2).collect();
                if let Some(data) = ev.lines().find_map(|l| l.strip_prefix("data:")) {
                    let _ = tx.send(since(data.trim().as_bytes()));
                }
            }
        }
    });
    // The JetStream subject is read by its own task, so each arrival is timed when it
    // happens, not after the SSE event has been awaited.
    type Arrival = (Duration, Instant, chrono::DateTime<chrono::Utc>);
    let (js_tx, mut js_rx) = tokio::sync::mpsc::unbounded_channel::<Arrival>();
    tokio::spawn(async move {
        while let Some(m) = js_sub.next().await {
            let _ = js_tx.send((since(&m.payload), Instant::now(), chrono::Utc::now()));
        }
    });
    // The engine logs "tag changed" right after the commit: its timestamp is when the change
    // was recorded (the event's own `time` is taken before the store's write).
    let committed = |log: &str| -> Vec<chrono::DateTime<chrono::Utc>> {
        log.lines()
            .filter(|l| l.contains("tag changed") && l.contains("subject=default/app:latest"))
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect()
    };
    let before = committed(&e.log.text()).len();
    let mut arrivals = Vec::new();
    let (mut inproc, mut js, mut call) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..300 {
        let src = format!("app@{}", if i % 2 == 0 { &da } else { &db });
        let t0 = Instant::now();
        api.tag(&src, "app:latest").await;
        inproc.push(
            tokio::time::timeout(DEADLINE, rx.recv())
                .await
                .unwrap()
                .unwrap(),
        );
        let (lat, at, wall) = tokio::time::timeout(DEADLINE, js_rx.recv())
            .await
            .unwrap()
            .unwrap();
        js.push(lat);
        call.push(at - t0);
        arrivals.push(wall);
    }
    let commits = committed(&e.log.text());
    let from_commit: Vec<Duration> = commits[before..]
        .iter()
        .zip(&arrivals)
        .map(|(c, a)| (*a - *c).to_std().unwrap_or_default())
        .collect();
    report("change made -> watch (SSE) event, in-process", &inproc);
    report("change made -> JetStream event (acked publish)", &js);
    report("change committed (log) -> JetStream event", &from_commit);
    report("API tag call -> JetStream event (for reference)", &call);
}

async fn triggers(reg: &Registry) {
    println!("== triggers: tag change -> request at the receiver");
    let rx = Receiver::start().await;
    // baseline: a plain POST loop, one at a time, then 32 at once
    let http = reqwest::Client::new();
    let mut base = Vec::new();
    for _ in 0..300 {
        let t0 = Instant::now();
        http.post(format!("{}/base", rx.url))
            .body("{}")
            .send()
            .await
            .unwrap();
        base.push(t0.elapsed());
    }
    report("plain HTTP POST to the receiver (baseline)", &base);
    let n = 4000;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..32 {
        let (http, url) = (http.clone(), rx.url.clone());
        tasks.push(tokio::spawn(async move {
            for _ in (w..n).step_by(32) {
                http.post(format!("{url}/base"))
                    .body("{}")
                    .send()
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let base_rate = n as f64 / t0.elapsed().as_secs_f64();
    println!(
        "{:<58} {base_rate:>8.0} requests/s",
        "plain HTTP POST loop, 32 in flight (baseline)"
    );

    let e = Engine::start(&format!(
        "[[trigger]]\nname = \"lat\"\non = [\"app:latest\"]\nwebhook = {{ url = \"{}/lat\" }}\n",
        rx.url
    ));
    let (da, db) = two_images(&e, reg).await;
    let api = Api {
        http: http.clone(),
        base: e.url.clone(),
    };
    let count = |rx: &Receiver, p: &str| rx.count(p);
    let mut lat = Vec::new();
    for i in 0..300 {
        let before = count(&rx, "/lat");
        let src = format!("app@{}", if i % 2 == 0 { &da } else { &db });
        let t0 = Instant::now();
        api.tag(&src, "app:latest").await;
        while count(&rx, "/lat") <= before {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        lat.push(t0.elapsed());
    }
    report("API tag call -> webhook request received", &lat);
    drop(e);

    // throughput: a trigger on 2000 tags that never fired; at start it fires for each
    let tags = 2000;
    let mut e = Engine::start("");
    let (da, _) = two_images(&e, reg).await;
    for i in 0..tags {
        api_tag(&e, &format!("app@{da}"), &format!("app:t{i}")).await;
    }
    e.stop();
    let on: Vec<String> = (0..tags).map(|i| format!("\"app:t{i}\"")).collect();
    let cfg = format!(
        "[[trigger]]\nname = \"bulk\"\non = [{}]\nwebhook = {{ url = \"{}/bulk\" }}\n",
        on.join(","),
        rx.url
    );
    let t0 = Instant::now();
    e.restart_with(&cfg);
    let mut first = None;
    while count(&rx, "/bulk") < tags {
        if first.is_none() && count(&rx, "/bulk") > 0 {
            first = Some((Instant::now(), count(&rx, "/bulk")));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let rate = tags as f64 / t0.elapsed().as_secs_f64();
    if let Some((t1, n1)) = first {
        let steady = (tags - n1) as f64 / t1.elapsed().as_secs_f64();
        println!(
            "{:<58} {steady:>8.0} deliveries/s (first to last request)",
            "deliveries sustained, durable bookkeeping (SQLite)"
        );
    }
    println!(
        "{:<58} {rate:>8.0} deliveries/s (ratio {:.2} to the POST loop)",
        "  the same from engine start (spawn, plan 2000 tags)",
        rate / base_rate
    );
}

async fn api_tag(e: &Engine, src: &str, dest: &str) {
    Api {
        http: reqwest::Client::new(),
        base: e.url.clone(),
    }
    .tag(src, dest)
    .await
}

/// 200 pushes, each timed from its manifest PUT (the push's last request) to the trigger's
/// request at the receiver, next to the registry's own PUT → webhook delay for the same push.
/// `internal`: pushes to an `internal` registry that notifies of everything (blob uploads and
/// pulls too, distribution's default) and uploads fresh blobs per push, as `docker push`
/// does; else a tracked tag on a registry notifying of manifests only, blobs uploaded ahead.
async fn push(internal: bool, everything: bool, details: bool) {
    println!(
        "== push: 2 blob uploads + manifest PUT per push; {}; registry notifying of {}{}",
        if internal {
            "internal registry (stream tag created by the first push)"
        } else {
            "tracked tag"
        },
        if everything {
            "every event (blob uploads and pulls too, distribution's default)"
        } else {
            "manifest pushes only"
        },
        if details {
            ""
        } else {
            "; fetch_details = false"
        }
    );
    let rx = Receiver::start().await;
    let notified = Receiver::start().await;
    let port = free_port();
    let reg = Registry::start_with(RegistryOptions {
        notify: Some((
            format!("http://127.0.0.1:{port}/hooks/registry"),
            "bench-token".into(),
        )),
        second_notify: Some(format!("{}/notified", notified.url)),
        notify_everything: everything,
        ..Default::default()
    });
    let (repo, watched) = if internal {
        ("bench/real", "bench/real:latest")
    } else {
        ("bench/push", "app:latest")
    };
    let e = Engine::start_on(
        port,
        // The registry is our own: lift the default politeness budget (20 requests/s) that
        // would otherwise pace 200 pushes in a row.
        &format!(
            "[hooks]\ntoken_env = \"T_HOOK\"\n\n[[registry]]\nhost = \"{}\"\nmax_requests_per_second = 0\ninternal = {internal}\nfetch_details = {details}\n\n[[trigger]]\nname = \"push\"\non = [\"{watched}\"]\nwebhook = {{ url = \"{}/push\" }}\n",
            reg.host, rx.url
        ),
        &[("T_HOOK", "bench-token")],
    );
    let pusher = Pusher::new(&reg.host);
    pusher.image(repo, "latest", "0").await;
    if internal {
        // The first push creates the stream tag (and fires the trigger once).
        let r0 = rx.len();
        let deadline = Instant::now() + DEADLINE;
        while rx.len() == r0 {
            assert!(
                Instant::now() < deadline,
                "the first push never reached the receiver"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    } else {
        let o = e.cli(&["tag", &format!("{}/{repo}", reg.host), watched]);
        assert!(o.status.success());
    }
    let (mut total, mut notify, mut whole, mut put) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // The slowest push (PUT -> trigger) and when its PUT started, to show what happened then.
    let mut slowest: Option<(Duration, chrono::DateTime<chrono::Utc>, usize)> = None;
    let trace = std::env::var("ISTREAM_BENCH_TRACE").is_ok();
    let pushes: usize = std::env::var("ISTREAM_BENCH_PUSHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    for i in 1..=pushes {
        let (n_before, r_before) = (notified.len(), rx.len());
        // Blob uploads first, as a client pushes (the manifest-only registry is not told of
        // them), then the manifest PUT that moves the tag.
        let started = Instant::now();
        let manifest = pusher.prepare(repo, &i.to_string()).await;
        let t0 = Instant::now();
        let wall = chrono::Utc::now();
        pusher
            .manifest(
                repo,
                "latest",
                "application/vnd.docker.distribution.manifest.v2+json",
                &manifest,
            )
            .await;
        put.push(t0.elapsed());
        let digest = sha256(&manifest);
        if trace && i + 3 > pushes {
            println!(
                "    | push {i}: manifest PUT started {wall:?}, answered after {:?}",
                t0.elapsed()
            );
        }
        let mut got_notify = None;
        loop {
            if got_notify.is_none() && notified.any_since(n_before, digest.as_bytes()) {
                got_notify = Some(t0.elapsed());
            }
            if rx.len() > r_before {
                let took = t0.elapsed();
                if slowest.is_none_or(|(d, _, _)| took > d) {
                    slowest = Some((took, wall, i));
                }
                total.push(took);
                whole.push(started.elapsed());
                break;
            }
            if t0.elapsed() > DEADLINE {
                panic!("push {i} never reached the receiver");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        while got_notify.is_none() {
            if notified.any_since(n_before, digest.as_bytes()) {
                got_notify = Some(t0.elapsed());
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        notify.extend(got_notify);
    }
    report(
        "registry's own notification delay (manifest PUT -> webhook with its digest)",
        &notify,
    );
    report("manifest PUT answered (the registry's own PUT time)", &put);
    report("manifest PUT -> trigger request received", &total);
    report(
        "first blob upload -> trigger request received (whole push)",
        &whole,
    );
    let log = e.log.text();
    if trace {
        let lines: Vec<&str> = log.lines().collect();
        for l in &lines[lines.len().saturating_sub(60)..] {
            println!("    | {}", &l[..l.len().min(220)]);
        }
        let reg_log = reg.log.text();
        let lines: Vec<&str> = reg_log
            .lines()
            .filter(|l| l.contains("response completed"))
            .collect();
        for l in &lines[lines.len().saturating_sub(14)..] {
            println!("    R {}", registry_request(l));
        }
    }
    if trace && let Some((took, at, i)) = slowest {
        // Everything the engine logged while the slowest push was under way.
        let until = at + chrono::Duration::from_std(took).unwrap_or_default();
        println!("    slowest: push {i}, {took:?} from its PUT at {at:?}");
        for l in log.lines().filter(|l| {
            l.split_whitespace()
                .next()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .is_some_and(|t| t >= at && t <= until)
        }) {
            println!("    S {}", &l[..l.len().min(220)]);
        }
        // And the registry's requests from istream that finished meanwhile, with their times.
        for l in reg.log.text().lines().filter(|l| {
            l.contains("response completed")
                && l.contains("useragent=istream")
                && l.split("time=\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .is_some_and(|t| t >= at && t <= until)
        }) {
            println!("    S registry {}", registry_request(l));
        }
    }
    let failed = log.matches("import.failed").count() + log.matches("ImportSuccess=False").count();
    println!(
        "  failed imports logged: {failed}; re-checks that had to look again: {}",
        log.matches("looking again").count()
    );
}

/// A registry access-log line as "time method uri user-agent took duration".
fn registry_request(l: &str) -> String {
    let field = |k: &str| {
        l.split(k)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("")
    };
    format!(
        "{} {} {} {} took {}",
        field("time=\""),
        field("http.request.method="),
        field("http.request.uri="),
        field("http.request.useragent="),
        field("http.response.duration=")
    )
}

/// 100 POSTs of `body` to `url` at once, each on its own connection (as 100 registry
/// notifier goroutines would send them); their answer times.
async fn hundred_at_once(url: &str, body: &str) -> Vec<Duration> {
    // A client of its own: no idle connection left by an earlier round.
    let http = reqwest::Client::new();
    let posts: Vec<_> = (0..100)
        .map(|_| {
            let (http, url, body) = (http.clone(), url.to_string(), body.to_string());
            tokio::spawn(async move {
                let t0 = Instant::now();
                let r = http
                    .post(url)
                    .bearer_auth("bench-token")
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 200);
                t0.elapsed()
            })
        })
        .collect();
    let mut answers = Vec::new();
    for p in posts {
        answers.push(p.await.unwrap());
    }
    answers
}

/// A TCP forwarder that holds each chunk from the client for `delay`: a slow registry.
async fn slow_forwarder(upstream: String, delay: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        tokio::time::sleep(delay).await;
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
                up.abort();
            });
        }
    });
    addr
}

/// 100 notifications for one pushed tag at once while the registry answers slowly (300 ms):
/// how fast the hooks answer, and how many registry requests the burst costs.
async fn burst() {
    println!("== burst: 100 identical notifications for one tag, registry answering in ~300 ms");
    let reg = Registry::start();
    let slow = slow_forwarder(reg.host.clone(), Duration::from_millis(300)).await;
    let rx = Receiver::start().await;
    let e = Engine::start_env(
        &format!(
            "[hooks]\ntoken_env = \"T_HOOK\"\n\n[[registry]]\nhost = \"{slow}\"\nmax_requests_per_second = 0\nfetch_details = false\n\n[[trigger]]\nname = \"b\"\non = [\"burst:latest\"]\nskip_initial = true\nwebhook = {{ url = \"{}/b\" }}\n",
            rx.url
        ),
        &[("T_HOOK", "bench-token")],
    );
    let pusher = Pusher::new(&reg.host);
    pusher.image("bench/burst", "latest", "1").await;
    let o = e.cli(&["tag", &format!("{slow}/bench/burst"), "burst:latest"]);
    assert!(o.status.success());
    let d2 = pusher.image("bench/burst", "latest", "2").await;
    let body = serde_json::json!({"events": [{"action": "push", "target": {
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "repository": "bench/burst", "tag": "latest", "digest": d2,
        "url": format!("http://{slow}/v2/bench/burst/manifests/{d2}")}}]})
    .to_string();
    let url = format!("{}/hooks/registry", e.url);
    // Baseline, same client, same route, same moment: 100 notifications of a blob upload at
    // once (authenticated and parsed, nothing recorded), each on a fresh connection.
    let blob = serde_json::json!({"events": [{"action": "push", "target": {
        "mediaType": "application/octet-stream", "repository": "bench/burst",
        "digest": d2, "url": format!("http://{slow}/v2/bench/burst/blobs/{d2}")}}]})
    .to_string();
    let base = hundred_at_once(&url, &blob).await;
    report("baseline: 100 ignored (blob) notifications at once", &base);
    let before = reg.manifest_requests();
    let answers = hundred_at_once(&url, &body).await;
    let deadline = Instant::now() + DEADLINE;
    while e.log.find("push re-checks done").is_none() || rx.len() == 0 {
        assert!(Instant::now() < deadline, "the burst never moved the tag");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while reg.manifest_requests() == before {
        assert!(Instant::now() < deadline, "no check in the registry's log");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    report("hook answer time (100 at once)", &answers);
    println!(
        "  registry manifest requests caused: {}; trigger requests: {}; {}",
        reg.manifest_requests() - before,
        rx.len(),
        e.log.find("push re-checks done").unwrap_or_default().trim()
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it,
    // and a benchmark is no test: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    istream::registry::install_crypto();
    rt.block_on(async {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            })
            .unwrap_or_default();
        println!(
            "machine: {} cores, {cpu}",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        );
        // `cargo bench --bench latency -- push burst` runs only those parts.
        let parts = ["events", "triggers", "push", "burst"];
        let asked: Vec<String> = std::env::args()
            .filter(|a| parts.contains(&a.as_str()))
            .collect();
        let run = |p: &str| asked.is_empty() || asked.iter().any(|a| a == p);
        let reg = Registry::start();
        if run("events") {
            events(&reg).await;
        }
        if run("triggers") {
            triggers(&reg).await;
        }
        if run("push") {
            for (internal, everything, details) in [
                (false, false, true),
                (false, true, true),
                (true, false, true),
                (true, true, true),
                (true, true, false),
            ] {
                push(internal, everything, details).await;
            }
        }
        if run("burst") {
            burst().await;
        }
    });
}
