//! The test harness: real services on free loopback ports, started per test and stopped on
//! drop — Debian's `docker-registry`, `nats-server` (>= 2.10), the `istream` binary itself —
//! plus a helper that pushes images over the registry API and a recording HTTP receiver that
//! stands in for a CI system. Waits poll for conditions with generous deadlines.

#![allow(dead_code)]

pub mod browser;
pub mod proxy;
pub mod receiver;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::Digest as _;

pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `f` until it returns Some, or panics naming `what` after `DEADLINE`.
pub async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > DEADLINE {
            panic!("timed out after {DEADLINE:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Collects a child's stderr lines and lets tests wait for one.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    pub fn follow(&self, stream: impl std::io::Read + Send + 'static) {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
    }

    pub fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }

    pub fn find(&self, needle: &str) -> Option<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains(needle))
            .cloned()
    }

    pub fn wait_line(&self, needle: &str, child: &mut Child) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.find(needle) {
                return l;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "process exited ({status}) before logging {needle:?}:\n{}",
                    self.text()
                );
            }
            if start.elapsed() > DEADLINE {
                panic!("timed out waiting for {needle:?} in log:\n{}", self.text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A real CNCF distribution registry (Debian's `docker-registry`).
pub struct Registry {
    child: Child,
    pub dir: tempfile::TempDir,
    pub host: String,
    pub log: Log,
}

#[derive(Default)]
pub struct RegistryOptions {
    /// `notifications.endpoints` target URL and bearer token.
    pub notify: Option<(String, String)>,
    /// htpasswd basic auth (user, bcrypt line).
    pub htpasswd: Option<String>,
    /// Log every request (for counting checks).
    pub access_log: bool,
    /// A second notification endpoint without auth (to time the registry's own delay).
    pub second_notify: Option<String>,
    /// Notify of everything, as distribution's default does: blob uploads and pulls too.
    pub notify_everything: bool,
}

impl Registry {
    pub fn start() -> Registry {
        Registry::start_with(RegistryOptions::default())
    }

    pub fn start_with(o: RegistryOptions) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: {}\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:0\n  secret: test\n",
            !o.access_log,
            dir.path().join("data").display()
        );
        if let Some(line) = &o.htpasswd {
            let p = dir.path().join("htpasswd");
            std::fs::write(&p, format!("{line}\n")).unwrap();
            cfg += &format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                p.display()
            );
        }
        if let Some((url, token)) = &o.notify {
            let filter = if o.notify_everything {
                ""
            } else {
                "      ignoredmediatypes:\n        - application/octet-stream\n      ignore:\n        actions:\n          - pull\n"
            };
            cfg += &format!(
                "notifications:\n  endpoints:\n    - name: istream\n      url: {url}\n      headers:\n        Authorization: [\"Bearer {token}\"]\n      timeout: 2s\n      threshold: 5\n      backoff: 200ms\n{filter}"
            );
            if let Some(url2) = &o.second_notify {
                cfg += &format!(
                    "    - name: timer\n      url: {url2}\n      timeout: 2s\n      threshold: 5\n      backoff: 200ms\n{filter}"
                );
            }
        }
        let path = dir.path().join("config.yml");
        std::fs::write(&path, cfg).unwrap();
        let (child, log, addr) = spawn_registry(&path);
        Registry {
            child,
            dir,
            host: addr,
            log,
        }
    }

    /// Stops the registry process (its data stays), for outage tests.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        let path = self.dir.path().join("config.yml");
        let cfg = std::fs::read_to_string(&path)
            .unwrap()
            .replace("addr: 127.0.0.1:0", &format!("addr: {}", self.host));
        std::fs::write(&path, cfg).unwrap();
        let (child, log, _) = spawn_registry(&path);
        self.child = child;
        self.log = log;
    }

    /// Number of manifest requests the registry logged (needs `access_log`).
    pub fn manifest_requests(&self) -> usize {
        self.log
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| {
                l.contains("response completed")
                    && l.contains("/manifests/")
                    && (l.contains("http.request.method=HEAD")
                        || l.contains("http.request.method=GET"))
            })
            .count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `docker-registry serve CONFIG` and waits for the address it listens on.
fn spawn_registry(config: &Path) -> (Child, Log, String) {
    let mut child = Command::new(registry_bin())
        .arg("serve")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("docker-registry runs (apt-get install docker-registry; scripts/test.sh does it)");
    let log = Log::default();
    log.follow(child.stderr.take().unwrap());
    let line = log.wait_line("listening on ", &mut child);
    let addr = line
        .split("listening on ")
        .nth(1)
        .unwrap()
        .split(['"', ' '])
        .next()
        .unwrap()
        .to_string();
    (child, log, addr)
}

fn registry_bin() -> PathBuf {
    std::env::var_os("ISTREAM_TEST_REGISTRY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("docker-registry"))
}

pub fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

/// Pushes blobs and manifests over the distribution API, as `docker push` would.
pub struct Pusher {
    http: reqwest::Client,
    pub host: String,
    auth: Option<(String, String)>,
}

impl Pusher {
    pub fn new(host: &str) -> Pusher {
        istream::registry::install_crypto();
        Pusher {
            http: reqwest::Client::new(),
            host: host.to_string(),
            auth: None,
        }
    }

    pub fn with_basic(host: &str, user: &str, pass: &str) -> Pusher {
        istream::registry::install_crypto();
        Pusher {
            http: reqwest::Client::new(),
            host: host.to_string(),
            auth: Some((user.into(), pass.into())),
        }
    }

    fn req(&self, m: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let r = self.http.request(m, url);
        match &self.auth {
            Some((u, p)) => r.basic_auth(u, Some(p)),
            None => r,
        }
    }

    /// PUT that the registry must answer with 201 Created.
    async fn put_created(&self, url: String, content_type: &str, body: &[u8], what: &str) {
        let r = self
            .req(reqwest::Method::PUT, url)
            .header("content-type", content_type)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            201,
            "{what}: {}",
            r.text().await.unwrap_or_default()
        );
    }

    pub async fn blob(&self, repo: &str, data: &[u8]) -> String {
        let d = sha256(data);
        let url = format!("http://{}/v2/{repo}/blobs/uploads/", self.host);
        let r = self.req(reqwest::Method::POST, url).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 202, "blob upload start in {repo}");
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let loc = if loc.starts_with('/') {
            format!("http://{}{loc}", self.host)
        } else {
            loc
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        self.put_created(
            format!("{loc}{sep}digest={d}"),
            "application/octet-stream",
            data,
            &format!("blob upload to {repo}"),
        )
        .await;
        d
    }

    pub async fn manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> String {
        let url = format!("http://{}/v2/{repo}/manifests/{reference}", self.host);
        self.put_created(
            url,
            media_type,
            body,
            &format!("manifest PUT {repo}:{reference}"),
        )
        .await;
        sha256(body)
    }

    /// Uploads the blobs of an image and returns its manifest, so a push is one manifest PUT.
    pub async fn prepare(&self, repo: &str, seed: &str) -> Vec<u8> {
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Labels":{{"seed":"{seed}"}}}},"rootfs":{{"type":"layers","diff_ids":[]}}}}"#
        );
        let layer = format!("layer {seed}");
        let cd = self.blob(repo, config.as_bytes()).await;
        let ld = self.blob(repo, layer.as_bytes()).await;
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","size":{},"digest":"{cd}"}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":{},"digest":"{ld}"}}]}}"#,
            config.len(),
            layer.len()
        )
        .into_bytes()
    }

    /// A small single-platform image whose content depends on `seed`; returns its digest.
    pub async fn image(&self, repo: &str, tag: &str, seed: &str) -> String {
        self.image_manifest(repo, tag, seed, "linux", "amd64").await
    }

    async fn image_manifest(
        &self,
        repo: &str,
        reference: &str,
        seed: &str,
        os: &str,
        arch: &str,
    ) -> String {
        let config = format!(
            r#"{{"architecture":"{arch}","os":"{os}","config":{{"Labels":{{"seed":"{seed}"}}}},"rootfs":{{"type":"layers","diff_ids":[]}}}}"#
        );
        let layer = format!("layer {seed} {os}/{arch}");
        let cd = self.blob(repo, config.as_bytes()).await;
        let ld = self.blob(repo, layer.as_bytes()).await;
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","size":{},"digest":"{cd}"}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":{},"digest":"{ld}"}}]}}"#,
            config.len(),
            layer.len()
        );
        self.manifest(
            repo,
            reference,
            "application/vnd.docker.distribution.manifest.v2+json",
            m.as_bytes(),
        )
        .await
    }

    /// Pushes an OCI image with these labels (config) and annotations (manifest) and layers.
    pub async fn annotated_image(
        &self,
        repo: &str,
        tag: &str,
        labels: serde_json::Value,
        annotations: serde_json::Value,
        layers: &[&str],
    ) -> String {
        let config = serde_json::json!({"architecture": "amd64", "os": "linux",
            "config": {"Labels": labels}, "rootfs": {"type": "layers", "diff_ids": []}})
        .to_string();
        let cd = self.blob(repo, config.as_bytes()).await;
        let mut descs = Vec::new();
        for l in layers {
            let d = self.blob(repo, l.as_bytes()).await;
            descs.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": l.len(), "digest": d}));
        }
        let m = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": config.len(), "digest": cd},
            "layers": descs, "annotations": annotations})
        .to_string();
        self.manifest(
            repo,
            tag,
            "application/vnd.oci.image.manifest.v1+json",
            m.as_bytes(),
        )
        .await
    }

    /// An OCI index with one image per (os, arch, seed); returns (index digest, children).
    pub async fn index(
        &self,
        repo: &str,
        tag: &str,
        platforms: &[(&str, &str, &str)],
    ) -> (String, Vec<String>) {
        let mut children = Vec::new();
        let mut entries = Vec::new();
        for (os, arch, seed) in platforms {
            let d = self
                .image_manifest(repo, &format!("{seed}-{os}-{arch}"), seed, os, arch)
                .await;
            let size = self
                .http
                .head(format!("http://{}/v2/{repo}/manifests/{d}", self.host))
                .header(
                    "accept",
                    "application/vnd.docker.distribution.manifest.v2+json",
                )
                .send()
                .await
                .unwrap()
                .content_length()
                .unwrap_or(0);
            entries.push(format!(
                r#"{{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","size":{size},"digest":"{d}","platform":{{"architecture":"{arch}","os":"{os}"}}}}"#
            ));
            children.push(d);
        }
        let idx = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
            entries.join(",")
        );
        let d = self
            .manifest(
                repo,
                tag,
                "application/vnd.oci.image.index.v1+json",
                idx.as_bytes(),
            )
            .await;
        (d, children)
    }
}

/// The `istream serve` binary with a config in a temp dir.
pub struct Engine {
    child: Option<Child>,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub url: String,
    pub log: Log,
    config: String,
    env: Vec<(String, String)>,
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The engine under test; `ISTREAM_TEST_BIN` runs another build (an older release, to make
/// upgrade fixtures with).
pub fn bin() -> String {
    std::env::var("ISTREAM_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_istream").to_string())
}

impl Engine {
    /// Starts the engine with `extra` appended to a config that has `[server]` and `[store]`.
    pub fn start(extra: &str) -> Engine {
        Engine::start_env(extra, &[])
    }

    pub fn start_env(extra: &str, env: &[(&str, &str)]) -> Engine {
        Engine::start_on(0, extra, env)
    }

    /// Starts on a given port (0: any free one).
    pub fn start_on(port: u16, extra: &str, env: &[(&str, &str)]) -> Engine {
        Engine::start_prepared(port, extra, env, |_| {})
    }

    /// Starts after `prepare` has put files into the engine's directory (a store to open).
    pub fn start_prepared(
        port: u16,
        extra: &str,
        env: &[(&str, &str)],
        prepare: impl FnOnce(&Path),
    ) -> Engine {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        prepare(&dir);
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[store]\npath = \"{}\"\n\n{extra}\n",
            dir.join("istream.db").display()
        );
        let mut e = Engine {
            child: None,
            dir,
            _tmp: Some(tmp),
            url: String::new(),
            log: Log::default(),
            config,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        e.spawn();
        e
    }

    fn spawn(&mut self) {
        let cfg = self.dir.join("triggers.toml");
        std::fs::write(&cfg, &self.config).unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(&cfg)
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd.env("RUST_LOG", "info,istream=debug");
        // Tests talk to loopback registries only; anything else is refused before a lookup.
        cmd.env(
            "ISTREAM_SERVER__ALLOWED_REGISTRIES",
            "[\"127.0.0.1:*\", \"localhost:*\"]",
        );
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let log = Log::default();
        log.follow(child.stderr.take().unwrap());
        let line = log.wait_line("istream listening on ", &mut child);
        let scheme = if line.contains("listening on https://") {
            "https"
        } else {
            "http"
        };
        let rest = line.split("://").nth(1).unwrap();
        let addr: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        self.url = format!("{scheme}://{addr}");
        self.child = Some(child);
        self.log = log;
    }

    /// SIGTERM and wait: a clean stop.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let start = Instant::now();
            while c.try_wait().ok().flatten().is_none() && start.elapsed() < DEADLINE {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `kill -9`: a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same store with `extra` appended to the config.
    pub fn restart_with(&mut self, extra: &str) {
        self.stop();
        self.config.push_str(extra);
        self.spawn();
    }

    /// Starts again with the same config and store, on a new port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn restart_after_crash(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs the CLI against this engine.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .env("ISTREAM_SERVER", &self.url)
            .env_remove("ISTREAM_NAMESPACE")
            .env_remove("ISTREAM_TOKEN")
            .output()
            .unwrap()
    }

    /// `import-image NAME --from=FROM --confirm`, which must succeed.
    #[track_caller]
    pub fn import_new(&self, name: &str, from: &str) {
        expect_code(
            &self.cli(&["import-image", name, &format!("--from={from}"), "--confirm"]),
            0,
        );
    }

    /// `get istag NAME -o json`, parsed; None when it fails.
    pub fn istag(&self, name: &str) -> Option<serde_json::Value> {
        let o = self.cli(&["get", "istag", name, "-o", "json"]);
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).unwrap())
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        istream::registry::install_crypto();
        reqwest::get(format!("{}{path}", self.url)).await.unwrap()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts an exit code, showing the output when it differs.
#[track_caller]
pub fn expect_code(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
}

/// The Python of the test venv (scripts/test.sh installs it with the `cloudevents` package):
/// an independent implementation to check what the engine sends.
pub fn venv_python() -> PathBuf {
    let p = std::env::var_os("ISTREAM_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    assert!(
        p.exists(),
        "{} missing: run ./scripts/test.sh, which makes the test venv",
        p.display()
    );
    p
}

/// Runs `tests/data/<script>` with the test venv's Python, `input` on its stdin.
pub fn run_python(script: &str, args: &[&str], input: &[u8]) -> Output {
    use std::io::Write as _;
    let mut child = Command::new(venv_python())
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data")
                .join(script),
        )
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// `nats-server` >= 2.10: `$ISTREAM_TEST_NATS`, else the one scripts/test.sh installs.
pub fn nats_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ISTREAM_TEST_NATS") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/nats-server");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("nats-server")
}

/// A real NATS server with JetStream on free ports.
pub struct Nats {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub url: String,
    pub port: u16,
    bin: PathBuf,
}

impl Nats {
    pub fn start() -> Nats {
        Nats::start_bin(nats_bin(), None)
    }

    pub fn start_bin(bin: PathBuf, port: Option<u16>) -> Nats {
        let dir = tempfile::tempdir().unwrap();
        let mut n = Nats {
            child: None,
            dir,
            url: String::new(),
            port: port.unwrap_or(0),
            bin,
        };
        n.spawn();
        n
    }

    fn spawn(&mut self) {
        let ports_dir = self.dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).unwrap();
        let port = if self.port == 0 {
            "-1".to_string()
        } else {
            self.port.to_string()
        };
        let child = Command::new(&self.bin)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &port,
                "-m",
                "-1",
                "--ports_file_dir",
            ])
            .arg(&ports_dir)
            .arg("-sd")
            .arg(self.dir.path().join("js"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server runs (scripts/test.sh installs it)");
        let start = Instant::now();
        let ports = loop {
            let file = std::fs::read_dir(&ports_dir)
                .ok()
                .and_then(|mut d| d.next())
                .and_then(|e| e.ok())
                .map(|e| e.path());
            if let Some(f) = file
                && let Ok(text) = std::fs::read_to_string(&f)
                && text.contains("nats")
            {
                break text;
            }
            if start.elapsed() > DEADLINE {
                panic!("nats-server did not write its ports file");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let v: serde_json::Value = serde_json::from_str(&ports).unwrap();
        self.url = v["nats"][0].as_str().unwrap().to_string();
        self.port = self.url.rsplit(':').next().unwrap().parse().unwrap();
        self.child = Some(child);
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits for the server to exit (after a signal sent by the caller).
    pub fn wait(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// Starts again on the same port and JetStream directory.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `istream watch STREAM -o json` against `url`: the process and its output lines.
pub fn watch_lines(url: &str, stream: &str) -> (Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = Command::new(bin())
        .args(["watch", stream, "-o", "json"])
        .env("ISTREAM_SERVER", url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Imports new images of `a/<stream>` into `<stream>` through `importer` until `watch` prints a
/// line (the watcher may connect after the first changes); returns the line and every digest
/// pushed.
pub async fn change_until_watched(
    registry: &Registry,
    importer: &Engine,
    stream: &str,
    watch: &std::sync::mpsc::Receiver<String>,
) -> (String, Vec<String>) {
    let push = Pusher::new(&registry.host);
    let pushed = Mutex::new(Vec::new());
    let line = wait_for("a watch line", || {
        let (push, pushed) = (&push, &pushed);
        async move {
            let seed = pushed.lock().unwrap().len().to_string();
            let d = push.image(&format!("a/{stream}"), "latest", &seed).await;
            pushed.lock().unwrap().push(d);
            let _ = importer.cli(&[
                "import-image",
                stream,
                &format!("--from={}/a/{stream}", registry.host),
                "--confirm",
            ]);
            watch.recv_timeout(Duration::from_millis(300)).ok()
        }
    })
    .await;
    (line, pushed.into_inner().unwrap())
}

/// Config for many scheduled tags: `streams` declared streams `s0…` of `per_stream` tags
/// `t0…`, all polling `<host>/app:v1` every `interval`, with `host`'s request budget lifted.
pub fn scheduled_tags_config(
    host: &str,
    interval: &str,
    streams: usize,
    per_stream: usize,
) -> String {
    let mut cfg = format!(
        "[schedule]\ninterval = \"{interval}\"\n\n[[registry]]\nhost = \"{host}\"\nmax_requests_per_second = 0\n"
    );
    for s in 0..streams {
        cfg += &format!("\n[[stream]]\nname = \"s{s}\"\ntags = [\n");
        for t in 0..per_stream {
            cfg += &format!(
                "  {{ name = \"t{t}\", from.image = \"{host}/app:v1\", scheduled = true }},\n"
            );
        }
        cfg += "]\n";
    }
    cfg
}

impl Engine {
    /// Waits until `n` tags of namespace `default` point at an image, as this engine sees it.
    pub async fn wait_tags_with_image(&self, n: usize) {
        wait_for(&format!("{n} tags imported"), || async {
            let body: serde_json::Value = self
                .get("/api/v1/namespaces/default/imagestreamtags")
                .await
                .json()
                .await
                .ok()?;
            let have = body
                .as_array()?
                .iter()
                .filter(|t| t["digest"].is_string())
                .count();
            (have == n).then_some(())
        })
        .await
    }
}

/// Three nats-server processes routed into one JetStream cluster (`istream-test`).
pub struct NatsCluster {
    nodes: Vec<(Option<Child>, Vec<String>)>,
    _dir: tempfile::TempDir,
    pub client_ports: Vec<u16>,
}

impl NatsCluster {
    pub fn start() -> NatsCluster {
        let dir = tempfile::tempdir().unwrap();
        let client_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::new();
        for i in 0..3 {
            let args = vec![
                "-js".to_string(),
                "-n".into(),
                format!("n{i}"),
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                client_ports[i].to_string(),
                "-sd".into(),
                dir.path().join(format!("n{i}")).display().to_string(),
                "--cluster_name".into(),
                "istream-test".into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{}", route_ports[i]),
                "--routes".into(),
                routes.clone(),
            ];
            nodes.push((None, args));
        }
        let mut c = NatsCluster {
            nodes,
            _dir: dir,
            client_ports,
        };
        for i in 0..3 {
            c.start_node(i);
        }
        c
    }

    fn start_node(&mut self, i: usize) {
        let child = Command::new(nats_bin())
            .args(&self.nodes[i].1)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server runs (scripts/test.sh installs it)");
        self.nodes[i].0 = Some(child);
    }

    /// Client URLs of every node, comma-separated, as `[nats] url` takes them.
    pub fn urls(&self) -> String {
        self.client_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until JetStream has a meta leader (`/healthz?js-enabled-only` is not enough for
    /// replicated streams, so ask the API through a real client).
    pub async fn wait_ready(&self) {
        let urls = self.urls();
        wait_for("a JetStream meta leader in the NATS cluster", || {
            let urls = urls.clone();
            async move {
                let addrs = istream::bus::server_addrs(&urls).ok()?;
                let client = async_nats::connect(addrs).await.ok()?;
                let js = async_nats::jetstream::new(client);
                js.query_account().await.ok().map(|_| ())
            }
        })
        .await;
    }

    pub fn stop_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.stop_node(i);
        }
    }
}
