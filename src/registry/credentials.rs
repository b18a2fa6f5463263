//! Where registry credentials come from: `[[registry]] username`/`password_env`, else a docker
//! `config.json` (`auths` entries and credential helpers, `docker-credential-<name> get`), the
//! one named by `docker_config` or the user's own (`$DOCKER_CONFIG` or `~/.docker`).

use std::path::PathBuf;

use base64::Engine as _;

use crate::config::{RegistryConfig, Secret};

#[derive(Debug, Clone)]
pub(super) struct Credentials {
    pub username: String,
    pub password: Secret,
}

pub(super) fn lookup(host: &str, cfg: Option<&RegistryConfig>) -> Option<Credentials> {
    if let Some(c) = cfg
        && let (Some(u), Some(p)) = (&c.username, &c.password)
    {
        return Some(Credentials {
            username: u.clone(),
            password: p.clone(),
        });
    }
    let path = cfg
        .and_then(|c| c.docker_config.clone())
        .or_else(default_docker_config)?;
    from_docker_config(&path, host)
}

fn default_docker_config() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

fn from_docker_config(path: &std::path::Path, host: &str) -> Option<Credentials> {
    let text = std::fs::read_to_string(path).ok()?;
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
        && let Some(c) = from_helper(h, &keys[0])
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

fn from_helper(helper: &str, server: &str) -> Option<Credentials> {
    use std::io::Write;
    if !helper
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    {
        return None;
    }
    let mut child = std::process::Command::new(format!("docker-credential-{helper}"))
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| tracing::warn!(helper, error = %e, "credential helper failed to start"))
        .ok()?;
    child.stdin.take()?.write_all(server.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
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

    #[test]
    fn docker_config_auths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:s3cret");
        std::fs::write(
            &p,
            format!(r#"{{"auths":{{"reg.example:5000":{{"auth":"{auth}"}}}}}}"#),
        )
        .unwrap();
        let c = from_docker_config(&p, "reg.example:5000").unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.expose()),
            ("bob", "s3cret")
        );
        assert!(from_docker_config(&p, "other").is_none());
    }
}
