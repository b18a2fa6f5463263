//! Scheduler benchmark: figures, not assertions. Run with `cargo bench --bench scheduler`.
//!
//! Starts a local docker-registry, measures its own manifest `HEAD` rate with a plain HTTP load
//! loop at 8 connections (the physical limit here), then, each scenario in a fresh process on a
//! new store (SQLite, then JetStream on a new nats-server; `ISTREAM_BENCH_STORES=sqlite`
//! for one), for 10,000 declared scheduled tags in one stream and in 100 streams (and
//! 4,000 in one stream, for memory):
//! - start-up as `serve` does it (apply declared streams, import every tag) until every tag has
//!   an image;
//! - steady checks per second with every tag due at once (budget lifted, 8 in flight), next to
//!   the registry's own rate, and CPU seconds per 1,000 checks; peak RSS of the process;
//! - per-change store cost (p50/p99 of recording a new digest) in a 1-tag and a 10,000-tag
//!   stream.
// Test and benchmark code: a failed unwrap is a failed run, which is what it should be.
#![allow(clippy::unwrap_used, unreachable_pub)]

#[path = "../tests/it/support/mod.rs"]
#[allow(unused_imports)]
mod support;

mod common;
use common::*;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use istream::config::Config;
use istream::core::Engine;
use istream::model::{Cause, Digest, TagFrom, TagSpec};
use istream::registry::RegistryClient;
use istream::scheduler::{CHECKS, Scheduler};
use istream::store::Store;

fn peak_rss_mb() -> f64 {
    rss_field("VmHWM:")
}

/// Resident now (not the high-water mark).
fn rss_mb() -> f64 {
    rss_field("VmRSS:")
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

/// The config of a scenario: `n` declared scheduled tags, in one stream or in streams of 100.
/// `store` is `sqlite` or a NATS URL (the JetStream store).
fn config_text(db: &str, store: &str, host: &str, n: usize, one_stream: bool) -> String {
    let per_stream = if one_stream { n } else { 100 };
    let mut text = if store == "sqlite" {
        format!("[store]\npath = \"{db}\"\n")
    } else {
        format!("[store]\nkind = \"nats\"\n[nats]\nurl = \"{store}\"\n")
    };
    text += "[schedule]\ninterval = \"1h\"\n";
    for s in 0..n.div_ceil(per_stream) {
        text += &format!("[[stream]]\nname = \"s{s}\"\nnamespace = \"bench\"\ntags = [\n");
        for t in 0..per_stream.min(n - s * per_stream) {
            text += &format!(
                "  {{ name = \"t{t}\", from.image = \"{host}/bench/app:latest\", scheduled = true }},\n"
            );
        }
        text += "]\n";
    }
    text
}

async fn open(text: &str, nats: bool) -> (Arc<Engine>, Scheduler, Config) {
    let config = Config::from_str(std::path::Path::new("bench.toml"), text).unwrap();
    let store = if nats {
        Store::connect_nats(config.nats.as_ref().unwrap())
            .await
            .unwrap()
    } else {
        Store::open_sqlite(&config.store.path).unwrap()
    };
    let mut registry = RegistryClient::new(&config);
    registry.set_budget(0.0, 8);
    let (engine, rx) = Engine::new(store, Arc::new(registry), &config, None);
    let (sched, _) = Scheduler::new(
        engine.clone(),
        config.schedule.interval.clone(),
        rx.spec_changes,
    );
    (engine, sched, config)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn child(mode: &str, db: &str, store: &str, host: &str, n: usize, one_stream: bool) {
    let base = rss_mb();
    let mut text = config_text(db, store, host, n, one_stream);
    if mode == "change" {
        // The store's cost, not the registry's: no image details are fetched for the changes.
        text += &format!("[[registry]]\nhost = \"{host}\"\nfetch_details = false\n");
    }
    let (engine, sched, config) = open(&text, store != "sqlite").await;
    // As `serve` does: the publisher drains the outbox while changes are made (to the
    // in-process bus here: the store's cost, not the network's).
    let publisher = tokio_util::sync::CancellationToken::new();
    tokio::spawn(istream::bus::run_publisher(
        engine.store().clone(),
        Arc::new(istream::bus::Bus::InProcess),
        engine.outbox_wake(),
        publisher.clone(),
    ));
    let after_config = rss_mb();
    match mode {
        "run" => {
            // Start-up as `serve` does it: apply the declared streams, import what is new.
            let cpu0 = cpu_seconds();
            let t0 = Instant::now();
            let to_import = engine.apply_declared(&config.streams).await.unwrap();
            istream::memory::trim();
            let after_apply = rss_mb();
            let peak_apply = peak_rss_mb();
            engine.import_specs(to_import).await;
            istream::memory::trim();
            let startup = t0.elapsed().as_secs_f64();
            let after_import = rss_mb();
            let peak_import = peak_rss_mb();
            // From here the high-water mark is the steady phase's own (the figure reported
            // stays the whole process's: the larger of the two).
            let _ = std::fs::write("/proc/self/clear_refs", "5");
            let startup_cpu = cpu_seconds() - cpu0;
            // Steady state: every tag due at once (period 1 h), none changes.
            let cancel = tokio_util::sync::CancellationToken::new();
            let cpu1 = cpu_seconds();
            let t1 = Instant::now();
            let task = tokio::spawn(sched.without_start_spread().run(cancel.clone()));
            let mut peak_loaded = None;
            while CHECKS.load(Ordering::Relaxed) < n as u64 {
                if peak_loaded.is_none() && CHECKS.load(Ordering::Relaxed) > 0 {
                    // The scheduler has read the store and its first checks are back.
                    peak_loaded = Some(peak_rss_mb());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let peak_checks = peak_rss_mb();
            let peak = peak_checks.max(peak_import);
            let secs = t1.elapsed().as_secs_f64();
            let cpu = cpu_seconds() - cpu1;
            cancel.cancel();
            let _ = task.await;
            let before_trim = rss_mb();
            // `serve` trims once a minute (istream::memory); steady RSS is after that.
            istream::memory::trim();
            eprintln!("rss MB after checks before trim {before_trim:.1}");
            eprintln!(
                "rss MB: base {base:.1}, config {after_config:.1}, applied {after_apply:.1} (peak {peak_apply:.1}), imported {after_import:.1} (peak {peak_import:.1}), scheduler loaded (peak {:.1}), after checks {:.1} (peak {peak_checks:.1})",
                peak_loaded.unwrap_or_default(),
                rss_mb(),
            );
            println!(
                "{{\"startup\":{startup},\"startup_cpu\":{startup_cpu},\"secs\":{secs},\"cpu\":{cpu},\"rss_mb\":{peak},\"steady_rss_mb\":{}}}",
                rss_mb()
            );
        }
        _ => {
            // Per-change store cost: one tag of the stream moves between two images.
            let to_import = engine.apply_declared(&config.streams).await.unwrap();
            engine.import_specs(to_import).await;
            let tag = istream::model::StreamTagRef::parse("bench/s0:t0", "bench").unwrap();
            let spec = TagSpec {
                scheduled: true,
                ..TagSpec::new(TagFrom::Image(format!("{host}/bench/app:latest")))
            };
            let r = istream::model::ImageRef::parse(&format!("{host}/bench/app:latest")).unwrap();
            let mut times = Vec::new();
            // 300 warm-up changes (the start-up's WAL is checkpointed meanwhile), then 3,000.
            for i in 0..3300u32 {
                let res = istream::registry::Resolved {
                    digest: Digest::parse(&format!("sha256:{:064x}", i % 2 + 1)).unwrap(),
                    media_type: None,
                    platforms: vec![],
                    unchanged: false,
                    manifest: None,
                };
                let t0 = Instant::now();
                engine
                    .record_import(
                        &tag,
                        &spec,
                        Ok((r.clone(), res)),
                        Cause::Schedule,
                        false,
                        None,
                    )
                    .await
                    .unwrap();
                if i >= 300 {
                    times.push(t0.elapsed().as_secs_f64() * 1000.0);
                }
            }
            times.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!(
                "{{\"p50\":{},\"p99\":{}}}",
                percentile(&times, 0.5),
                percentile(&times, 0.99)
            );
        }
    }
}

/// Runs one scenario in a fresh process (peak RSS is per process) on a new store (a new
/// SQLite file, or a new nats-server for `nats`).
async fn run_child(
    mode: &str,
    store: &str,
    host: &str,
    n: usize,
    one_stream: bool,
) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db").display().to_string();
    let nats = (store == "nats").then(support::Nats::start);
    let store = nats
        .as_ref()
        .map_or("sqlite".to_string(), |n| n.url.clone());
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "--child",
            mode,
            &db,
            &store,
            host,
            &n.to_string(),
            if one_stream { "one" } else { "many" },
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // Where the memory went (the child's own breakdown), for the reader of the figures.
    for l in String::from_utf8_lossy(&out.stderr).lines() {
        if l.starts_with("rss MB: ") {
            println!(
                "        {n} tags, {}: {l}",
                if one_stream {
                    "one stream"
                } else {
                    "streams of 100"
                }
            );
        }
    }
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
    // As `istream serve` does (see istream::memory).
    istream::memory::limit_arenas();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if args.get(1).map(String::as_str) == Some("--child") {
        rt.block_on(child(
            &args[2],
            &args[3],
            &args[4],
            &args[5],
            args[6].parse().unwrap(),
            args[7] == "one",
        ));
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
        println!("registry baseline (plain HTTP loop, 8 connections): HEAD {plain:.0}/s; HEAD with If-None-Match {cond:.0}/s (INM: what a check sends)");
        println!("RSS in MB; peak is the process high-water mark (start-up included), steady is after the trim serve runs once a minute");
        println!();
        let stores: Vec<String> = std::env::var("ISTREAM_BENCH_STORES")
            .unwrap_or_else(|_| "sqlite,nats".into())
            .split(',')
            .map(str::to_string)
            .collect();
        for store in &stores {
            println!("store: {store}");
            println!(
                "{:>6}  {:>14}  {:>10}  {:>9}  {:>8}  {:>8}  {:>8}  {:>9}  {:>10}  {:>12}",
                "tags", "in streams of", "start-up s", "checks/s", "to HEAD", "to INM", "CPU s/1k", "peak RSS", "steady RSS", "start CPU s"
            );
            let mut rows = Vec::new();
            // `ISTREAM_BENCH_SHAPES=4000` (tags in one stream) runs only that shape's row.
            let only: Option<usize> = std::env::var("ISTREAM_BENCH_SHAPES").ok().and_then(|v| v.parse().ok());
            for (n, one) in [(10_000, true), (10_000, false), (4_000, true)] {
                if only.is_some_and(|o| o != n || !one) {
                    continue;
                }
                let r = run_child("run", store, &reg.host, n, one).await;
                let rate = n as f64 / r["secs"].as_f64().unwrap();
                let cpu_per_k = r["cpu"].as_f64().unwrap() / n as f64 * 1000.0;
                println!(
                    "{n:>6}  {:>14}  {:>10.2}  {rate:>9.0}  {:>8.2}  {:>8.2}  {cpu_per_k:>8.3}  {:>9.1}  {:>10.1}  {:>12.2}",
                    if one { n.to_string() } else { "100".into() },
                    r["startup"].as_f64().unwrap(),
                    rate / plain,
                    rate / cond,
                    r["rss_mb"].as_f64().unwrap(),
                    r["steady_rss_mb"].as_f64().unwrap(),
                    r["startup_cpu"].as_f64().unwrap(),
                );
                rows.push((r, rate));
            }
            if only.is_some() {
                continue;
            }
            let (one, many) = (&rows[0], &rows[1]);
            println!(
                "one stream / 100 streams: start-up {:.2}x, checks/s {:.2}x, RSS {:.2}x",
                one.0["startup"].as_f64().unwrap() / many.0["startup"].as_f64().unwrap(),
                one.1 / many.1,
                one.0["rss_mb"].as_f64().unwrap() / many.0["rss_mb"].as_f64().unwrap()
            );
            println!();
            println!("per-change store cost (record_import of a new digest, 3,000 changes after 300 warm-up; details off):");
            println!("{:>22}  {:>9}  {:>9}", "stream", "p50 ms", "p99 ms");
            for n in [1, 10_000] {
                let r = run_child("change", store, &reg.host, n, true).await;
                println!(
                    "{:>22}  {:>9.3}  {:>9.3}",
                    format!("1 of {n} tags"),
                    r["p50"].as_f64().unwrap(),
                    r["p99"].as_f64().unwrap()
                );
            }
            println!();
        }
        // The registry's rate again: a baseline that moved during the run says so.
        let plain_after = baseline(&reg.host, None, 5).await;
        let cond_after = baseline(&reg.host, Some(&digest), 5).await;
        println!("registry baseline again at the end: HEAD {plain_after:.0}/s; HEAD with If-None-Match {cond_after:.0}/s");
    });
}
