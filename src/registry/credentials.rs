//! Where registry credentials come from: `[[registry]] username`/`password_env`, else a docker
//! `config.json` (`auths` entries and credential helpers, `docker-credential-<name> get`), the
//! one named by `docker_config` or the user's own (`$DOCKER_CONFIG` or `~/.docker`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::config::{RegistryConfig, Secret};

#[derive(Debug, Clone)]
pub(super) struct Credentials {
    pub username: String,
    pub password: Secret,
}

/// How long a credential helper may take before its registry is tried without credentials.
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);
/// Looked-up credentials are reused this long (a rotated password is picked up after it).
const CACHE_FOR: Duration = Duration::from_secs(300);

/// Where one host's credentials come from, and the last lookup. Nothing here runs at
/// construction: the docker config and its helpers are read on the first 401 that needs them,
/// off the runtime's threads and with a timeout, so a slow helper delays only its own host.
pub(super) struct Source {
    host: String,
    fixed: Option<Credentials>,
    docker_config: Option<PathBuf>,
    cache: tokio::sync::Mutex<Option<(Option<Credentials>, Instant)>>,
}

impl Source {
    pub(super) fn new(host: &str, cfg: Option<&RegistryConfig>) -> Source {
        let fixed = cfg.and_then(|c| match (&c.username, &c.password) {
            (Some(u), Some(p)) => Some(Credentials {
                username: u.clone(),
                password: p.clone(),
            }),
            _ => None,
        });
        Source {
            host: host.to_string(),
            fixed,
            docker_config: cfg
                .and_then(|c| c.docker_config.clone())
                .or_else(default_docker_config),
            cache: tokio::sync::Mutex::new(None),
        }
    }

    pub(super) async fn get(&self) -> Option<Credentials> {
        if let Some(f) = &self.fixed {
            return Some(f.clone());
        }
        let path = self.docker_config.clone()?;
        let mut cache = self.cache.lock().await;
        if let Some((c, at)) = &*cache
            && at.elapsed() < CACHE_FOR
        {
            return c.clone();
        }
        let found = from_docker_config(&path, &self.host).await;
        *cache = Some((found.clone(), Instant::now()));
        found
    }
}

fn default_docker_config() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

async fn from_docker_config(path: &std::path::Path, host: &str) -> Option<Credentials> {
    let text = tokio::fs::read_to_string(path).await.ok()?;
    let doc: serde_json::Value = match serde_json::from_str(&text) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "docker config is not JSON; ignoring it");
            return None;
        }
    };
    // Docker Hub is stored under its legacy index URL.
    let keys: Vec<String> = if host == "docker.io" {
        vec![
            "https://index.docker.io/v1/".into(),
            "docker.io".into(),
            "index.docker.io".into(),
            "registry-1.docker.io".into(),
        ]
    } else {
        vec![
            host.to_string(),
            format!("https://{host}"),
            format!("http://{host}"),
        ]
    };
    let helper = keys
        .iter()
        .find_map(|k| doc["credHelpers"][k].as_str())
        .or_else(|| doc["credsStore"].as_str());
    if let Some(h) = helper
        && let Some(c) = from_helper(h, &keys[0]).await
    {
        return Some(c);
    }
    let auth = keys.iter().find_map(|k| doc["auths"][k]["auth"].as_str())?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (u, p) = decoded.split_once(':')?;
    Some(Credentials {
        username: u.into(),
        password: Secret::new(p.into()),
    })
}

async fn from_helper(helper: &str, server: &str) -> Option<Credentials> {
    if !helper
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    {
        return None;
    }
    let program = format!("docker-credential-{helper}");
    run_helper(std::path::Path::new(&program), server, HELPER_TIMEOUT).await
}

/// Runs `<program> get` with the server on stdin, as docker does; a helper that fails, hangs
/// past `timeout` (it is killed) or answers nonsense gives no credentials.
async fn run_helper(
    program: &std::path::Path,
    server: &str,
    timeout: Duration,
) -> Option<Credentials> {
    use tokio::io::AsyncWriteExt as _;
    let shown = program.display().to_string();
    let mut child = tokio::process::Command::new(program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(
            |e| tracing::warn!(helper = %shown, error = %e, "credential helper failed to start"),
        )
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let run = async {
        stdin.write_all(server.as_bytes()).await.ok()?;
        drop(stdin);
        child.wait_with_output().await.ok()
    };
    let out = match tokio::time::timeout(timeout, run).await {
        Ok(out) => out?,
        Err(_) => {
            tracing::warn!(helper = %shown, server, ?timeout, "credential helper timed out; trying without credentials");
            return None;
        }
    };
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(Credentials {
        username: v["Username"].as_str()?.to_string(),
        password: Secret::new(v["Secret"].as_str()?.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn docker_config_auths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:s3cret");
        std::fs::write(
            &p,
            format!(r#"{{"auths":{{"reg.example:5000":{{"auth":"{auth}"}}}}}}"#),
        )
        .unwrap();
        let c = from_docker_config(&p, "reg.example:5000").await.unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.expose()),
            ("bob", "s3cret")
        );
        assert!(from_docker_config(&p, "other").await.is_none());
    }

    /// Issue 15: a helper that hangs no longer holds a runtime thread; it is killed after the
    /// timeout and the registry is tried without credentials.
    #[tokio::test]
    async fn a_hanging_helper_times_out() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let helper = dir.path().join("docker-credential-hang");
        std::fs::write(&helper, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let t = Instant::now();
        let got = run_helper(&helper, "reg.example", Duration::from_millis(300)).await;
        assert!(got.is_none());
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let ok = dir.path().join("docker-credential-ok");
        std::fs::write(
            &ok,
            "#!/bin/sh\nread s\necho \"{\\\"Username\\\":\\\"u\\\",\\\"Secret\\\":\\\"$s\\\"}\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&ok, std::fs::Permissions::from_mode(0o755)).unwrap();
        let c = run_helper(&ok, "reg.example", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.expose()),
            ("u", "reg.example")
        );
    }
}
