//! Payload parsers, one per source. Each returns the pushed `registry/repo:tag`s it names;
//! pulls, deletes, blob events and digest-only pushes are ignored. Input is untrusted: every
//! shape error is a message naming the field, never a panic.

use serde::Deserialize;

use crate::model::ImageRef;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    pub registry: String,
    pub repository: String,
    pub tag: String,
    /// The digest the notification names, when it names one (a hint, never recorded as is).
    pub digest: Option<String>,
}

pub fn parse(source: &str, body: &[u8]) -> Result<Vec<Push>, String> {
    let pushes = match source {
        "registry" => distribution(body)?,
        "harbor" => harbor(body)?,
        "dockerhub" => dockerhub(body)?,
        "quay" => quay(body)?,
        other => return Err(format!("unknown source {other}")),
    };
    // Validate through the reference parser so a hostile name cannot reach the store.
    pushes
        .into_iter()
        .map(|p| {
            let r = ImageRef::parse(&format!("{}/{}:{}", p.registry, p.repository, p.tag))
                .map_err(|e| e.to_string())?;
            // A malformed digest hint is dropped, not fatal: the re-check decides anyway.
            let digest = p.digest.filter(|d| crate::model::Digest::parse(d).is_ok());
            Ok(Push {
                registry: r.registry,
                repository: r.repository,
                tag: r.tag.unwrap_or(p.tag),
                digest,
            })
        })
        .collect()
}

fn json<'a, T: Deserialize<'a>>(body: &'a [u8], what: &str) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("not a {what} payload: {e}"))
}

fn host_of_url(u: &str) -> Option<String> {
    let u = reqwest::Url::parse(u).ok()?;
    let host = u.host_str()?;
    Some(match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    })
}

#[derive(Deserialize)]
struct Envelope {
    events: Vec<DistEvent>,
}

#[derive(Deserialize)]
struct DistEvent {
    action: String,
    target: Option<DistTarget>,
    request: Option<DistRequest>,
}

#[derive(Deserialize)]
struct DistTarget {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    repository: Option<String>,
    url: Option<String>,
    tag: Option<String>,
    digest: Option<String>,
}

#[derive(Deserialize)]
struct DistRequest {
    host: Option<String>,
}

fn distribution(body: &[u8]) -> Result<Vec<Push>, String> {
    let env: Envelope = json(body, "distribution notification")?;
    let mut out = Vec::new();
    for e in env.events {
        if e.action != "push" {
            continue;
        }
        let Some(t) = e.target else { continue };
        let is_manifest = t
            .media_type
            .as_deref()
            .is_none_or(|m| m.contains("manifest") || m.contains("index"));
        let (Some(repo), Some(tag)) = (t.repository, t.tag) else {
            continue;
        };
        if !is_manifest || tag.is_empty() {
            continue;
        }
        let host = t
            .url
            .as_deref()
            .and_then(host_of_url)
            .or(e.request.and_then(|r| r.host))
            .ok_or("push event names no registry host (target.url or request.host)")?;
        out.push(Push {
            registry: host,
            repository: repo,
            tag,
            digest: t.digest,
        });
    }
    Ok(out)
}

#[derive(Deserialize)]
struct HarborResource {
    digest: Option<String>,
    tag: Option<String>,
    resource_url: Option<String>,
}

#[derive(Deserialize)]
struct HarborData {
    resources: Option<Vec<HarborResource>>,
    repository: Option<HarborRepo>,
}

#[derive(Deserialize)]
struct HarborRepo {
    repo_full_name: Option<String>,
}

#[derive(Deserialize)]
struct HarborDefault {
    #[serde(rename = "type")]
    kind: String,
    event_data: HarborData,
}

#[derive(Deserialize)]
struct HarborCloudEvent {
    #[serde(rename = "type")]
    kind: String,
    data: HarborData,
}

fn harbor(body: &[u8]) -> Result<Vec<Push>, String> {
    let v: serde_json::Value = json(body, "Harbor")?;
    let (kind, data): (String, HarborData) = if v.get("specversion").is_some() {
        let e: HarborCloudEvent = json(body, "Harbor CloudEvents")?;
        (e.kind, e.data)
    } else {
        let e: HarborDefault = json(body, "Harbor")?;
        (e.kind, e.event_data)
    };
    if !(kind == "PUSH_ARTIFACT" || kind == "harbor.artifact.pushed") {
        return Ok(Vec::new());
    }
    let full = data.repository.and_then(|r| r.repo_full_name);
    let mut out = Vec::new();
    for r in data.resources.unwrap_or_default() {
        let (Some(tag), Some(url)) = (r.tag, r.resource_url) else {
            continue;
        };
        // resource_url is "host[:port]/project/repo:tag"
        let (host, path) = url
            .split_once('/')
            .ok_or_else(|| format!("resource_url \"{url}\" has no registry host"))?;
        let repo = full.clone().unwrap_or_else(|| {
            path.rsplit_once(':')
                .map(|(p, _)| p)
                .unwrap_or(path)
                .to_string()
        });
        if !tag.is_empty() {
            out.push(Push {
                registry: host.to_string(),
                repository: repo,
                tag,
                digest: r.digest,
            });
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
struct HubPayload {
    push_data: HubPush,
    repository: HubRepo,
}

#[derive(Deserialize)]
struct HubPush {
    tag: String,
}

#[derive(Deserialize)]
struct HubRepo {
    repo_name: String,
}

fn dockerhub(body: &[u8]) -> Result<Vec<Push>, String> {
    let p: HubPayload = json(body, "Docker Hub")?;
    Ok(vec![Push {
        registry: "docker.io".into(),
        repository: p.repository.repo_name,
        tag: p.push_data.tag,
        digest: None,
    }])
}

#[derive(Deserialize)]
struct QuayPayload {
    docker_url: String,
    #[serde(default)]
    updated_tags: Vec<String>,
}

fn quay(body: &[u8]) -> Result<Vec<Push>, String> {
    let p: QuayPayload = json(body, "Quay")?;
    let (host, repo) = p
        .docker_url
        .split_once('/')
        .ok_or_else(|| format!("docker_url \"{}\" has no registry host", p.docker_url))?;
    Ok(p.updated_tags
        .into_iter()
        .map(|tag| Push {
            registry: host.to_string(),
            repository: repo.to_string(),
            tag,
            digest: None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distribution_sample_from_a_real_registry() {
        let sample: serde_json::Value = serde_json::from_str(include_str!(
            "../../tests/data/distribution-notification.json"
        ))
        .unwrap();
        let body = serde_json::to_vec(&sample["body"]).unwrap();
        let p = parse("registry", &body).unwrap();
        assert_eq!(
            p,
            vec![Push {
                registry: "127.0.0.1:5002".into(),
                repository: "notif/r0000".into(),
                tag: "latest".into(),
                digest: Some(
                    "sha256:d2278186ef96ef0df6b5987f1ebc61e7b7d54574659cbc0f70d6300f3a6e186d"
                        .into()
                ),
            }]
        );
    }

    #[test]
    fn harbor_both_formats() {
        let default = br#"{"type":"PUSH_ARTIFACT","occur_at":1680000000,"operator":"admin","event_data":{"resources":[{"digest":"sha256:x","tag":"v1","resource_url":"harbor.example.com/library/app:v1"}],"repository":{"date_created":1,"name":"app","namespace":"library","repo_full_name":"library/app","repo_type":"private"}}}"#;
        assert_eq!(
            parse("harbor", default).unwrap(),
            vec![Push {
                registry: "harbor.example.com".into(),
                repository: "library/app".into(),
                tag: "v1".into(),
                digest: None, // "sha256:x" is no digest: the hint is dropped
            }]
        );
        let ce = br#"{"specversion":"1.0","id":"1","source":"/projects/1/webhook/policies/1","type":"harbor.artifact.pushed","datacontenttype":"application/json","data":{"resources":[{"digest":"sha256:x","tag":"v2","resource_url":"harbor.example.com:8443/library/app:v2"}],"repository":{"name":"app","namespace":"library","repo_full_name":"library/app","repo_type":"private"}}}"#;
        assert_eq!(
            parse("harbor", ce).unwrap()[0].registry,
            "harbor.example.com:8443"
        );
        let pull = br#"{"type":"PULL_ARTIFACT","event_data":{"resources":[]}}"#;
        assert!(parse("harbor", pull).unwrap().is_empty());
    }

    #[test]
    fn dockerhub_and_quay() {
        let hub = br#"{"callback_url":"https://registry.hub.docker.com/u/svendowideit/testhook/hook/2141b5bi5i5b02bec211i4eeih0242eg11000a/","push_data":{"pushed_at":1417566161,"pusher":"trustedbuilder","tag":"latest"},"repository":{"name":"testhook","namespace":"svendowideit","repo_name":"svendowideit/testhook","status":"Active"}}"#;
        assert_eq!(
            parse("dockerhub", hub).unwrap()[0].repository,
            "svendowideit/testhook"
        );
        let official = br#"{"push_data":{"tag":"3"},"repository":{"repo_name":"python"}}"#;
        assert_eq!(
            parse("dockerhub", official).unwrap()[0].repository,
            "library/python"
        );
        let quay = br#"{"repository":"mynamespace/repository","namespace":"mynamespace","name":"repository","docker_url":"quay.io/mynamespace/repository","homepage":"https://quay.io/repository/mynamespace/repository","updated_tags":["latest","1.0"]}"#;
        let q = parse("quay", quay).unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!(
            q[1],
            Push {
                registry: "quay.io".into(),
                repository: "mynamespace/repository".into(),
                tag: "1.0".into(),
                digest: None,
            }
        );
    }

    #[test]
    fn malformed_bodies_are_errors() {
        for src in ["registry", "harbor", "dockerhub", "quay"] {
            assert!(parse(src, b"not json").is_err());
            assert!(parse(src, b"{}").is_err() || parse(src, b"{}").unwrap().is_empty());
        }
        let bad_name = br#"{"events":[{"action":"push","target":{"repository":"../../etc","tag":"x","url":"http://r:5000/v2/x"}}]}"#;
        assert!(parse("registry", bad_name).is_err());
    }
}
