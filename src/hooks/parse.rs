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

/// What a notification says: the pushes it names, and why any of its events could not be used
/// (one bad event never spoils the others; the sender gets 2xx and the reasons are logged).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub pushes: Vec<Push>,
    pub skipped: Vec<String>,
}

/// Fails only when the body as a whole is not the source's format.
pub fn parse(source: &str, body: &[u8]) -> Result<Parsed, String> {
    let pushes = match source {
        "registry" => distribution(body)?,
        "harbor" => harbor(body)?,
        "dockerhub" => dockerhub(body)?,
        "quay" => quay(body)?,
        other => return Err(format!("unknown source {other}")),
    };
    // Validate through the reference parser so a hostile name cannot reach the store.
    let mut out = Parsed::default();
    for p in pushes {
        let p = match p {
            Ok(p) => p,
            Err(why) => {
                out.skipped.push(why);
                continue;
            }
        };
        let r = match ImageRef::parse(&format!("{}/{}:{}", p.registry, p.repository, p.tag)) {
            Ok(r) => r,
            Err(e) => {
                out.skipped.push(e.to_string());
                continue;
            }
        };
        // A malformed digest hint is dropped, not fatal: the re-check decides anyway.
        let digest = p.digest.filter(|d| crate::model::Digest::parse(d).is_ok());
        out.pushes.push(Push {
            registry: r.registry,
            repository: r.repository,
            tag: r.tag.unwrap_or(p.tag),
            digest,
        });
    }
    Ok(out)
}

/// One event of a notification: a push, or why it cannot be used.
type Item = Result<Push, String>;

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

fn distribution(body: &[u8]) -> Result<Vec<Item>, String> {
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
            .or(e.request.and_then(|r| r.host));
        out.push(match host {
            Some(host) => Ok(Push {
                registry: host,
                repository: repo,
                tag,
                digest: t.digest,
            }),
            None => Err(format!(
                "push of {repo}:{tag} names no registry host (target.url or request.host)"
            )),
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

fn harbor(body: &[u8]) -> Result<Vec<Item>, String> {
    let v: serde_json::Value = json(body, "Harbor")?;
    let (kind, data): (String, HarborData) = if v.get("specversion").is_some() {
        let e: HarborCloudEvent = json(body, "Harbor CloudEvents")?;
        (e.kind, e.data)
    } else {
        let e: HarborDefault = json(body, "Harbor")?;
        (e.kind, e.event_data)
    };
    // Harbor 2 says PUSH_ARTIFACT (or harbor.artifact.pushed as a CloudEvent), Harbor 1.x pushImage.
    if !matches!(
        kind.as_str(),
        "PUSH_ARTIFACT" | "harbor.artifact.pushed" | "pushImage"
    ) {
        return Ok(Vec::new());
    }
    let full = data.repository.and_then(|r| r.repo_full_name);
    let mut out = Vec::new();
    for r in data.resources.unwrap_or_default() {
        let tag = r.tag.unwrap_or_default();
        // Pushed by digest: Harbor puts the digest in `tag` and `@digest` in resource_url.
        // No tag was pushed, so there is nothing to re-check.
        let by_digest =
            tag.contains(':') || r.resource_url.as_deref().is_some_and(|u| u.contains('@'));
        if tag.is_empty() || by_digest {
            continue;
        }
        let Some(url) = r.resource_url else {
            out.push(Err(format!("push of tag {tag} has no resource_url")));
            continue;
        };
        // resource_url is "host[:port]/project/repo:tag"
        let Some((host, path)) = url.split_once('/') else {
            out.push(Err(format!("resource_url \"{url}\" has no registry host")));
            continue;
        };
        let repo = full.clone().unwrap_or_else(|| {
            path.rsplit_once(':')
                .map(|(p, _)| p)
                .unwrap_or(path)
                .to_string()
        });
        out.push(Ok(Push {
            registry: host.to_string(),
            repository: repo,
            tag,
            digest: r.digest,
        }));
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

fn dockerhub(body: &[u8]) -> Result<Vec<Item>, String> {
    let p: HubPayload = json(body, "Docker Hub")?;
    Ok(vec![Ok(Push {
        registry: "docker.io".into(),
        repository: p.repository.repo_name,
        tag: p.push_data.tag,
        digest: None,
    })])
}

#[derive(Deserialize)]
struct QuayPayload {
    docker_url: String,
    #[serde(default)]
    updated_tags: Vec<String>,
}

fn quay(body: &[u8]) -> Result<Vec<Item>, String> {
    let p: QuayPayload = json(body, "Quay")?;
    let (host, repo) = p
        .docker_url
        .split_once('/')
        .ok_or_else(|| format!("docker_url \"{}\" has no registry host", p.docker_url))?;
    Ok(p.updated_tags
        .into_iter()
        .map(|tag| {
            Ok(Push {
                registry: host.to_string(),
                repository: repo.to_string(),
                tag,
                digest: None,
            })
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
        let p = parse("registry", &body).unwrap().pushes;
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
            parse("harbor", default).unwrap().pushes,
            vec![Push {
                registry: "harbor.example.com".into(),
                repository: "library/app".into(),
                tag: "v1".into(),
                digest: None, // "sha256:x" is no digest: the hint is dropped
            }]
        );
        let ce = br#"{"specversion":"1.0","id":"1","source":"/projects/1/webhook/policies/1","type":"harbor.artifact.pushed","datacontenttype":"application/json","data":{"resources":[{"digest":"sha256:x","tag":"v2","resource_url":"harbor.example.com:8443/library/app:v2"}],"repository":{"name":"app","namespace":"library","repo_full_name":"library/app","repo_type":"private"}}}"#;
        assert_eq!(
            parse("harbor", ce).unwrap().pushes[0].registry,
            "harbor.example.com:8443"
        );
        let pull = br#"{"type":"PULL_ARTIFACT","event_data":{"resources":[]}}"#;
        assert!(parse("harbor", pull).unwrap().pushes.is_empty());
    }

    /// Harbor 1.x `pushImage` (fixture: zulip/zulip
    /// zerver/webhooks/harbor/fixtures/push_image.json at 256b678, with its type as Harbor 1.x
    /// sends it), and a push by digest as Harbor 2 reports it (goharbor/harbor#20939,
    /// bluebrown/kobold#44): the digest in `tag`, nothing to re-check, no error.
    #[test]
    fn harbor_1x_and_push_by_digest() {
        let v1 = include_bytes!("../../tests/data/harbor-1x-push-image.json");
        let p = parse("harbor", v1).unwrap();
        assert_eq!(p.pushes.len(), 1);
        assert_eq!(p.pushes[0].registry, "harbor.example.com");
        assert_eq!(p.pushes[0].repository, "example/test");
        assert_eq!(p.pushes[0].tag, "latest");
        let by_digest = br#"{"type":"PUSH_ARTIFACT","occur_at":1680501893,"operator":"harbor-jobservice","event_data":{"resources":[{"digest":"sha256:954b378c375d852eb3c63ab88978f640b4348b01c1b3456a024a81536dafbbf4","tag":"sha256:954b378c375d852eb3c63ab88978f640b4348b01c1b3456a024a81536dafbbf4","resource_url":"localhost/harbor/alpine@sha256:954b378c375d852eb3c63ab88978f640b4348b01c1b3456a024a81536dafbbf4"},{"digest":"sha256:954b378c375d852eb3c63ab88978f640b4348b01c1b3456a024a81536dafbbf4","tag":"3.20","resource_url":"localhost/harbor/alpine:3.20"}],"repository":{"date_created":1680501893,"name":"alpine","namespace":"harbor","repo_full_name":"harbor/alpine","repo_type":"private"}}}"#;
        let p = parse("harbor", by_digest).unwrap();
        assert_eq!(p.skipped, Vec::<String>::new());
        assert_eq!(p.pushes.len(), 1, "only the tagged resource: {p:?}");
        assert_eq!(p.pushes[0].tag, "3.20");
    }

    #[test]
    fn dockerhub_and_quay() {
        let hub = br#"{"callback_url":"https://registry.hub.docker.com/u/svendowideit/testhook/hook/2141b5bi5i5b02bec211i4eeih0242eg11000a/","push_data":{"pushed_at":1417566161,"pusher":"trustedbuilder","tag":"latest"},"repository":{"name":"testhook","namespace":"svendowideit","repo_name":"svendowideit/testhook","status":"Active"}}"#;
        assert_eq!(
            parse("dockerhub", hub).unwrap().pushes[0].repository,
            "svendowideit/testhook"
        );
        let official = br#"{"push_data":{"tag":"3"},"repository":{"repo_name":"python"}}"#;
        assert_eq!(
            parse("dockerhub", official).unwrap().pushes[0].repository,
            "library/python"
        );
        let quay = br#"{"repository":"mynamespace/repository","namespace":"mynamespace","name":"repository","docker_url":"quay.io/mynamespace/repository","homepage":"https://quay.io/repository/mynamespace/repository","updated_tags":["latest","1.0"]}"#;
        let q = parse("quay", quay).unwrap().pushes;
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
            assert!(parse(src, b"{}").is_err() || parse(src, b"{}").unwrap().pushes.is_empty());
        }
        // One unusable event is skipped with its reason; the others still count.
        let bad_name = br#"{"events":[{"action":"push","target":{"repository":"../../etc","tag":"x","url":"http://r:5000/v2/x"}},{"action":"push","target":{"repository":"ok/app","tag":"1","url":"http://r:5000/v2/ok/app/manifests/1"}}]}"#;
        let p = parse("registry", bad_name).unwrap();
        assert_eq!(p.skipped.len(), 1, "{p:?}");
        assert!(p.skipped[0].contains("../../etc"), "{p:?}");
        assert_eq!(p.pushes.len(), 1);
        assert_eq!(p.pushes[0].repository, "ok/app");
    }
}
