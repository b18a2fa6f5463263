//! Scheduler benchmark: figures, not assertions. Run with `cargo bench --bench scheduler`.
//!
//! Starts a local docker-registry, measures its own manifest `HEAD` rate with a plain HTTP load
//! loop at 8 connections (the physical limit here), then, each scenario in a fresh process:
//! - checks per second for N = 1,000 and 10,000 scheduled tags all due at once, per-registry
//!   budget lifted, 8 requests in flight, and CPU seconds per 1,000 checks;
//! - peak RSS with 4,000 and 100,000 scheduled tags and CPU use while they are idle.

#[path = "../tests/it/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::Utc;
use istream::config::Config;
use istream::core::Engine;
use istream::model::{Cause, Digest, HistoryEntry, TagFrom, TagSpec};
use istream::registry::RegistryClient;
use istream::scheduler::{CHECKS, Scheduler};
use istream::store::{Commit, Store};

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// The registry's own rate: 8 tasks doing manifest HEADs back to back for `secs`.
async fn baseline(host: &str, etag: Option<&str>, secs: u64) -> f64 {
    istream::registry::install_crypto();
    let client = reqwest::Client::new();
    let url = format!("http://{host}/v2/bench/app/manifests/latest");
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, u, e) = (
            client.clone(),
            url.clone(),
            etag.map(|x| format!("\"{x}\"")),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < stop {
                let mut r = c.head(&u).header("accept", ACCEPT);
                if let Some(e) = &e {
                    r = r.header("if-none-match", e);
                }
                if r.send().await.is_ok() {
                    n += 1;
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / secs as f64
}

fn open(db: &str, interval: &str) -> (Arc<Engine>, Scheduler) {
    let text = format!("[store]\npath = \"{db}\"\n[schedule]\ninterval = \"{interval}\"\n");
    let config = Config::from_str(std::path::Path::new("bench.toml"), &text).unwrap();
    let store = Store::open_sqlite(&config.store.path).unwrap();
    let mut registry = RegistryClient::new(&config);
    registry.set_budget(0.0, 8);
    let (engine, rx) = Engine::new(store, Arc::new(registry), &config);
    let (sched, _) = Scheduler::new(
        engine.clone(),
        config.schedule.interval.clone(),
        rx.spec_changes,
    );
    (engine, sched)
}

/// Writes `n` scheduled tags (100 per stream) that already know the current digest.
async fn build(db: &str, host: &str, n: usize, digest: &str) {
    let store = Store::open_sqlite(std::path::Path::new(db)).unwrap();
    let digest = Digest::parse(digest).unwrap();
    let per_stream = 100;
    for s in 0..n.div_ceil(per_stream) {
        let mut doc = istream::model::ImageStream::new("bench", &format!("s{s}"), Utc::now());
        for t in 0..per_stream.min(n - s * per_stream) {
            let spec = TagSpec {
                from: TagFrom::Image(format!("{host}/bench/app:latest")),
                alias: false,
                scheduled: true,
                schedule: None,
                insecure: false,
                platform: None,
            };
            let tag = doc.set_spec(&format!("t{t}"), spec);
            tag.record(HistoryEntry {
                digest: digest.clone(),
                image: format!("{host}/bench/app@{digest}"),
                created: Utc::now(),
                generation: 1,
                cause: Cause::Import,
                id: istream::core::new_id(),
                media_type: None,
                platforms: vec![],
            });
        }
        store
            .commit(Commit {
                key: doc.key(),
                expected_rev: None,
                doc: Some(doc),
                events: vec![],
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

async fn child(mode: &str, db: &str, n: usize) {
    match mode {
        "checks" => {
            let (_e, sched) = open(db, "1h");
            let cancel = tokio_util::sync::CancellationToken::new();
            let cpu0 = cpu_seconds();
            let t0 = Instant::now();
            let task = tokio::spawn(sched.without_start_spread().run(cancel.clone()));
            while CHECKS.load(Ordering::Relaxed) < n as u64 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let secs = t0.elapsed().as_secs_f64();
            let cpu = cpu_seconds() - cpu0;
            cancel.cancel();
            let _ = task.await;
            println!("{{\"n\":{n},\"secs\":{secs},\"cpu\":{cpu}}}");
        }
        _ => {
            let (_e, sched) = open(db, "24h");
            let cancel = tokio_util::sync::CancellationToken::new();
            let task = tokio::spawn(sched.run(cancel.clone()));
            tokio::time::sleep(Duration::from_secs(3)).await;
            let cpu0 = cpu_seconds();
            tokio::time::sleep(Duration::from_secs(5)).await;
            let idle_cpu_pct = (cpu_seconds() - cpu0) / 5.0 * 100.0;
            let rss = peak_rss_mb();
            cancel.cancel();
            let _ = task.await;
            println!(
                "{{\"n\":{n},\"rss_mb\":{rss},\"idle_cpu_pct\":{idle_cpu_pct},\"checks\":{}}}",
                CHECKS.load(Ordering::Relaxed)
            );
        }
    }
}

/// Runs one scenario in a fresh process (peak RSS is per process), on a store built first.
async fn run_child(mode: &str, host: &str, n: usize, digest: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db").display().to_string();
    build(&db, host, n, digest).await;
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--child", mode, &db, &n.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rfind(|l| l.starts_with('{'))
        .unwrap_or_else(|| {
            panic!(
                "child {mode} {n} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str(line).unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if args.get(1).map(String::as_str) == Some("--child") {
        rt.block_on(child(&args[2], &args[3], args[4].parse().unwrap()));
        return;
    }
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it,
    // and a benchmark is no test: do nothing then.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    rt.block_on(async {
        let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())).unwrap_or_default();
        println!("machine: {} cores, {cpu}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));
        let reg = support::Registry::start();
        let digest = support::Pusher::new(&reg.host).image("bench/app", "latest", "bench").await;
        let plain = baseline(&reg.host, None, 5).await;
        let cond = baseline(&reg.host, Some(&digest), 5).await;
        println!("registry baseline (plain HTTP loop, 8 connections): HEAD {plain:.0}/s; HEAD with If-None-Match {cond:.0}/s");
        println!();
        println!("{:>8}  {:>10}  {:>14}  {:>16}", "tags", "checks/s", "ratio to HEAD", "CPU s/1000 chk");
        for n in [1000, 10_000] {
            let r = run_child("checks", &reg.host, n, &digest).await;
            let rate = n as f64 / r["secs"].as_f64().unwrap();
            let cpu_per_k = r["cpu"].as_f64().unwrap() / n as f64 * 1000.0;
            println!("{n:>8}  {rate:>10.0}  {:>14.2}  {cpu_per_k:>16.3}", rate / plain);
        }
        println!();
        println!("{:>8}  {:>12}  {:>14}", "tags", "peak RSS MB", "idle CPU %");
        for n in [4000, 100_000] {
            let r = run_child("rss", &reg.host, n, &digest).await;
            println!("{n:>8}  {:>12.1}  {:>14.2}", r["rss_mb"].as_f64().unwrap(), r["idle_cpu_pct"].as_f64().unwrap());
        }
    });
}
