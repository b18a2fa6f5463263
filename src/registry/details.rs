//! What a change is: the new image's OCI annotations and `org.opencontainers.image.*` labels,
//! the platforms of an index, and its layers against the previous image (SPEC 10). Fetched
//! only when a digest changed — one `GET` of the manifest (and of the tracked platform's
//! manifest for an index) and one of the config blob — through the host's budget; anything
//! missing, huge or malformed leaves the field out, never fails the change.

use std::collections::BTreeMap;

use reqwest::Method;

use super::{RegistryClient, RegistryError};
use crate::model::stream::{Details, Layer};
use crate::model::{Digest, ImageRef};

/// Config blobs above this are not read (a real one is a few KiB).
const MAX_CONFIG_BYTES: usize = 1 << 20;
const OCI_PREFIX: &str = "org.opencontainers.image.";

#[derive(serde::Deserialize)]
struct Manifest {
    manifests: Option<Vec<Child>>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
struct Child {
    digest: String,
    platform: Option<super::PlatformDoc>,
}

#[derive(serde::Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    size: i64,
}

#[derive(serde::Deserialize)]
struct ConfigBlob {
    config: Option<ConfigSection>,
}

#[derive(serde::Deserialize)]
struct ConfigSection {
    #[serde(rename = "Labels")]
    labels: Option<BTreeMap<String, String>>,
}

fn strip(key: &str) -> String {
    key.strip_prefix(OCI_PREFIX).unwrap_or(key).to_string()
}

impl RegistryClient {
    /// Details of the image `digest` of `r`'s repository; `platform` picks the child of an
    /// index whose layers are compared (default: linux/amd64, else the first).
    pub async fn details(
        &self,
        r: &ImageRef,
        digest: &Digest,
        manifest: Option<&[u8]>,
        platform: Option<&str>,
        insecure: bool,
    ) -> Result<Details, RegistryError> {
        let fetched;
        let top = match manifest {
            Some(m) => m,
            None => {
                fetched = self
                    .get_v2(r, "manifests", digest.as_str(), insecure)
                    .await?;
                &fetched[..]
            }
        };
        let top: Manifest = serde_json::from_slice(top).map_err(|e| self.invalid(r, e))?;
        let mut details = Details::default();
        for (k, v) in &top.annotations {
            details.annotations.insert(strip(k), v.clone());
        }
        let image = match &top.manifests {
            Some(children) => {
                details.platforms = children
                    .iter()
                    .filter_map(|c| c.platform.as_ref().map(super::PlatformDoc::name))
                    .collect();
                let want = platform.unwrap_or("linux/amd64");
                let child = children
                    .iter()
                    .find(|c| c.platform.as_ref().is_some_and(|p| p.name() == want))
                    .or_else(|| children.first());
                match child {
                    Some(c) => {
                        let body = self.get_v2(r, "manifests", &c.digest, insecure).await?;
                        let m: Manifest =
                            serde_json::from_slice(&body).map_err(|e| self.invalid(r, e))?;
                        for (k, v) in &m.annotations {
                            details
                                .annotations
                                .entry(strip(k))
                                .or_insert_with(|| v.clone());
                        }
                        m
                    }
                    None => return Ok(details),
                }
            }
            None => top,
        };
        details.layers = image
            .layers
            .unwrap_or_default()
            .into_iter()
            .map(|l| Layer {
                digest: l.digest,
                size: l.size,
            })
            .collect();
        if let Some(cfg) = image.config
            && let Ok(body) = self.get_v2(r, "blobs", &cfg.digest, insecure).await
            // A real config is a few KiB; anything huge is not read as one.
            && body.len() <= MAX_CONFIG_BYTES
            && let Ok(c) = serde_json::from_slice::<ConfigBlob>(&body)
        {
            for (k, v) in c.config.and_then(|c| c.labels).unwrap_or_default() {
                if let Some(short) = k.strip_prefix(OCI_PREFIX) {
                    // Annotations win over labels.
                    details.annotations.entry(short.to_string()).or_insert(v);
                }
            }
        }
        Ok(details)
    }

    fn invalid(&self, r: &ImageRef, e: serde_json::Error) -> RegistryError {
        RegistryError::InvalidResponse {
            registry: r.registry.clone(),
            what: format!("{}/{} manifest", r.registry, r.repository),
            detail: format!("not a JSON manifest: {e}"),
        }
    }

    /// `GET /v2/<repository>/<kind>/<reference>` (kind `manifests` or `blobs`) through the
    /// host's endpoint and budget, like every other request of the client.
    async fn get_v2(
        &self,
        r: &ImageRef,
        kind: &str,
        reference: &str,
        insecure: bool,
    ) -> Result<Vec<u8>, RegistryError> {
        let host = self.host(&r.registry);
        self.check_allowed(&host)?;
        let what = format!("{}/{} {kind} {reference}", r.registry, r.repository);
        let path = format!(
            "/v2/{}/{kind}/{reference}",
            host.endpoint.repository(&r.repository)
        );
        let reply = self
            .send(&host, r, Method::GET, &path, insecure, None, &what)
            .await?;
        Ok(reply.body)
    }
}
