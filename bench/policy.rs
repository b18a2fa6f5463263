//! Policy benchmark: figures, not assertions. Run with `cargo bench --bench policy`.
//!
//! One policy check (list every tag of a repository with 10,000 tags, following `Link`
//! pagination, rank them with a semver range, resolve the winner) next to one plain
//! `tags/list` walk by a plain HTTP client, in the same run on the same registry.
// Benchmark code: a failed unwrap is a failed run.
#![allow(clippy::unwrap_used, unreachable_pub)]

#[path = "../tests/it/support/mod.rs"]
#[allow(unused_imports)]
mod support;

mod common;
use common::*;

use std::sync::Arc;
use std::time::Instant;

use istream::config::Config;
use istream::core::Engine;
use istream::model::{Cause, PolicySpec, StreamTagRef, TagFrom, TagSpec};
use istream::registry::RegistryClient;
use istream::store::Store;

/// Walks `tags/list` with `n=1000` pages, as any client would.
async fn plain_walk(host: &str, repo: &str) -> usize {
    let client = reqwest::Client::new();
    let mut url = format!("http://{host}/v2/{repo}/tags/list?n=1000");
    let mut n = 0;
    loop {
        let r = client.get(&url).send().await.unwrap();
        let next = r
            .headers()
            .get("link")
            .and_then(|v| v.to_str().ok())
            .and_then(|l| l.split(';').next())
            .map(|l| {
                l.trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string()
            });
        let v: serde_json::Value = r.json().await.unwrap();
        n += v["tags"].as_array().map_or(0, |a| a.len());
        match next {
            Some(p) => url = format!("http://{host}{p}"),
            None => return n,
        }
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    istream::memory::limit_arenas();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        istream::registry::install_crypto();
        let reg = support::Registry::start();
        let push = support::Pusher::new(&reg.host);
        let manifest = push.prepare("bench/many", "one image").await;
        let t0 = Instant::now();
        for i in 0..10_000 {
            let tag = format!("1.{}.{}", i / 100, i % 100);
            push.manifest(
                "bench/many",
                &tag,
                "application/vnd.docker.distribution.manifest.v2+json",
                &manifest,
            )
            .await;
        }
        println!("pushed 10,000 tags in {:.1}s", t0.elapsed().as_secs_f64());
        let dir = tempfile::tempdir().unwrap();
        let text = format!("[store]\npath = \"{}\"\n", dir.path().join("db").display());
        let config = Config::from_str(std::path::Path::new("bench.toml"), &text).unwrap();
        let store = Store::open_sqlite(&config.store.path).unwrap();
        let mut registry = RegistryClient::new(&config);
        registry.set_budget(0.0, 8);
        let (engine, _rx) = Engine::new(store, Arc::new(registry), &config, None);
        let spec = TagSpec::new(TagFrom::Policy(PolicySpec {
            repository: format!("{}/bench/many", reg.host),
            semver: Some(">=1.50, <2".into()),
            order: None,
            filter: None,
            extract: None,
            prerelease: false,
            min_age: None,
        }));
        let tag = StreamTagRef::parse("bench:latest", "default").unwrap();
        println!("{:>28}  {:>9}  {:>9}", "", "wall ms", "CPU ms");
        for round in 0..3 {
            let (c0, w0) = (cpu_seconds(), Instant::now());
            let n = plain_walk(&reg.host, "bench/many").await;
            let (pw, pc) = (w0.elapsed().as_secs_f64() * 1e3, (cpu_seconds() - c0) * 1e3);
            let (c0, w0) = (cpu_seconds(), Instant::now());
            let (s, err) = engine
                .check_policy(&tag, &spec, Cause::Schedule, round == 0)
                .await
                .unwrap();
            let (ew, ec) = (w0.elapsed().as_secs_f64() * 1e3, (cpu_seconds() - c0) * 1e3);
            assert!(err.is_none(), "{err:?}");
            let chosen = s.tags["latest"].source_tag.clone().unwrap_or_default();
            println!(
                "{:>28}  {pw:>9.1}  {pc:>9.1}",
                format!("plain tags/list walk ({n})")
            );
            println!(
                "{:>28}  {ew:>9.1}  {ec:>9.1}   (chose {chosen})",
                "istream policy check"
            );
        }
        println!("CPU ms are the whole process's (the registry is another process).");
    });
}
