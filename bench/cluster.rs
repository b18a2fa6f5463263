//! Scale-out benchmark: figures, not assertions. Run with `cargo bench --bench cluster`.
//!
//! - Per-change cost of the JetStream store against the SQLite store: one writer doing what
//!   the engine's write path does (read the stream, write it back compare-and-set with one
//!   event), changes per second and latency percentiles; the outbox is drained after each
//!   change, outside the timing, as the publisher would.
//! - Scheduled checks per second with one, two and three `istream serve` replicas sharing
//!   one nats-server, 2,000 tags due every second (more than the registry serves), beside
//!   the registry's own manifest HEAD rate measured with a plain HTTP loop in the same run.
// Test and benchmark code: a failed unwrap is a failed run, which is what it should be.
#![allow(clippy::unwrap_used, unreachable_pub)]

#[path = "../tests/it/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::time::{Duration, Instant};

use chrono::Utc;
use istream::model::{Event, EventData, ImageStream, event::TAG_CHANGED};
use istream::store::{Commit, Store};

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

async fn per_change(store: Store, n: usize) -> (f64, f64, f64) {
    let key = "default/bench";
    let doc = ImageStream::new("default", "bench", Utc::now());
    store
        .commit(Commit {
            key: key.into(),
            expected_rev: None,
            doc: Some(doc),
            events: vec![],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut lat = Vec::with_capacity(n);
    let mut busy = Duration::ZERO;
    for i in 0..n {
        let t = Instant::now();
        let (mut doc, rev) = store.get(key).await.unwrap().unwrap();
        doc.generation += 1;
        let event = Event::new(
            TAG_CHANGED,
            uuid::Uuid::now_v7().to_string(),
            "bench",
            Utc::now(),
            EventData {
                digest: Some(format!("sha256:{:064x}", i)),
                cause: Some("import".into()),
                generation: doc.generation,
                ..EventData::for_tag("default", "bench", "latest")
            },
        );
        store
            .commit(Commit {
                key: key.into(),
                expected_rev: Some(rev),
                doc: Some(doc),
                events: vec![event],
                ..Default::default()
            })
            .await
            .unwrap();
        let took = t.elapsed();
        busy += took;
        lat.push(took.as_secs_f64() * 1000.0);
        let pending = store.pending_events(256).await.unwrap();
        store
            .mark_published(pending.into_iter().map(|(s, _)| s).collect())
            .await
            .unwrap();
    }
    lat.sort_by(f64::total_cmp);
    (
        n as f64 / busy.as_secs_f64(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
    )
}

async fn registry_rate(host: &str, secs: u64) -> f64 {
    istream::registry::install_crypto();
    let client = reqwest::Client::new();
    let url = format!("http://{host}/v2/app/manifests/v1");
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, u) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < stop {
                let r = c
                    .head(&u)
                    .header("accept", "application/vnd.oci.image.manifest.v1+json")
                    .send()
                    .await;
                if r.is_ok() {
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

async fn checks_per_second(reg: &support::Registry, replicas: usize, tags: usize) -> f64 {
    let nats = support::Nats::start();
    let cfg = support::scheduled_tags_config(&reg.host, "1s", tags / 100, 100);
    let env = [
        ("ISTREAM_STORE__KIND", "nats"),
        ("ISTREAM_NATS__URL", nats.url.as_str()),
        ("RUST_LOG", "warn,istream::serve=info,istream::cluster=info"),
    ];
    let engines: Vec<support::Engine> = (0..replicas)
        .map(|_| support::Engine::start_env(&cfg, &env))
        .collect();
    engines[0].wait_tags_with_image(tags).await;
    // Measure once every replica sees all the others, and the imports each ran at start are
    // over (one period later).
    for e in &engines {
        support::wait_for("every replica a member", || async {
            e.log
                .find(&format!("cluster membership changed replicas={replicas}"))
                .map(|_| ())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let window = Duration::from_secs(10);
    let before = reg.manifest_requests();
    tokio::time::sleep(window).await;
    let n = reg.manifest_requests() - before;
    drop(engines);
    n as f64 / window.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_default()
    );
    let n = 2000;
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::open_sqlite(&dir.path().join("bench.db")).unwrap();
    let (rate, p50, p99) = per_change(sqlite, n).await;
    println!(
        "per change, SQLite store:    {rate:>7.0} changes/s  p50 {p50:.3} ms  p99 {p99:.3} ms"
    );
    let nats = support::Nats::start();
    let js = Store::connect_nats(&istream::config::NatsConfig::with_url(&nats.url))
        .await
        .unwrap();
    let (jrate, jp50, jp99) = per_change(js, n).await;
    println!(
        "per change, JetStream store: {jrate:>7.0} changes/s  p50 {jp50:.3} ms  p99 {jp99:.3} ms  ({:.1}x the SQLite cost per change)",
        rate / jrate
    );
    drop(nats);

    let reg = support::Registry::start_with(support::RegistryOptions {
        access_log: true,
        ..Default::default()
    });
    let push = support::Pusher::new(&reg.host);
    push.image("app", "v1", "1").await;
    let base = registry_rate(&reg.host, 5).await;
    println!("registry baseline (plain HTTP loop, 8 connections): HEAD {base:.0}/s");
    let tags = 2000;
    for replicas in 1..=3 {
        let rate = checks_per_second(&reg, replicas, tags).await;
        println!(
            "{replicas} replica(s), {tags} tags due every 1 s: {rate:>6.0} checks/s ({:.2}x the registry baseline)",
            rate / base
        );
    }
}
