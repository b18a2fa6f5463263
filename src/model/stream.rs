//! The image stream document: spec and status of every tag, as stored and as the API shows it.
//! The rules that keep history and generations right live here as pure functions, so the core
//! and both stores share one definition of them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::reference::Digest;

/// Where a tag comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TagFrom {
    /// An external image reference (tag or digest).
    Image(String),
    /// Another stream tag, `[ns/]stream:tag`.
    Tag(String),
    /// A stream image `[ns/]stream@digest`: a pin.
    Digest(String),
    /// The newest tag of an external repository that matches a policy (SPEC 8).
    Policy(PolicySpec),
}

/// `from.policy`: which tag of `repository` a policy tag follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySpec {
    pub repository: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub semver: Option<String>,
    /// `numerical` or `alphabetical`, instead of `semver`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extract: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prerelease: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_age: Option<String>,
}

impl PolicySpec {
    /// `semver >=3.12, <4`, `numerical`, ... as `describe` says it.
    pub fn describe(&self) -> String {
        let mut s = match (&self.semver, &self.order) {
            (Some(r), _) => format!("semver {r}"),
            (None, Some(o)) => format!("{o} order"),
            (None, None) => "no order".into(),
        };
        if let Some(f) = &self.filter {
            s += &format!(", filter {f}");
        }
        if let Some(e) = &self.extract {
            s += &format!(", extract {e}");
        }
        if self.prerelease {
            s += ", pre-releases included";
        }
        if let Some(a) = &self.min_age {
            s += &format!(", min age {a}");
        }
        s
    }
}

/// When istream first saw a candidate of a policy tag with its digest (for `min_age`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub digest: Digest,
    pub first_seen: DateTime<Utc>,
}

impl TagFrom {
    pub fn kind(&self) -> &'static str {
        match self {
            TagFrom::Image(_) => "image",
            TagFrom::Tag(_) => "tag",
            TagFrom::Digest(_) => "digest",
            TagFrom::Policy(_) => "policy",
        }
    }
    pub fn name(&self) -> &str {
        match self {
            TagFrom::Image(s) | TagFrom::Tag(s) | TagFrom::Digest(s) => s,
            TagFrom::Policy(p) => &p.repository,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagSpec {
    pub from: TagFrom,
    #[serde(default)]
    pub alias: bool,
    #[serde(default)]
    pub scheduled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    #[serde(default)]
    pub insecure: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
}

impl TagSpec {
    /// A spec from `from` with every policy off.
    pub fn new(from: TagFrom) -> TagSpec {
        TagSpec {
            from,
            alias: false,
            scheduled: false,
            schedule: None,
            insecure: false,
            platform: None,
        }
    }
}

/// Why a history entry was added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cause {
    Import,
    Schedule,
    Push,
    Tag,
    Rollback,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Import => "import",
            Cause::Schedule => "schedule",
            Cause::Push => "push",
            Cause::Tag => "tag",
            Cause::Rollback => "rollback",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub digest: Digest,
    /// Pull spec `registry/repo@digest`.
    pub image: String,
    pub created: DateTime<Utc>,
    pub generation: i64,
    pub cause: Cause,
    /// Stable id of this change; the event id of the change it records.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// `os/arch[/variant]` of each manifest when the image is an index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
    /// What the image is (annotations, layers), fetched when it became current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
    /// For a policy tag: the repository tag this image was chosen as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_tag: Option<String>,
}

/// An image's annotations, platforms and layers (SPEC 10).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Details {
    /// OCI annotations of the manifest or index and the config's `org.opencontainers.image.*`
    /// labels, keyed without that prefix; annotations win.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// `os/arch[/variant]` of every manifest of an index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
    /// The layers of the image (of the tracked platform, for an index).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<Layer>,
    /// Against the previous image, when it is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_changes: Option<LayerChanges>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compare_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    pub digest: String,
    pub size: i64,
}

/// `{"added": N, "removed": N, "size_delta": BYTES}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerChanges {
    pub added: usize,
    pub removed: usize,
    pub size_delta: i64,
}

impl Details {
    /// Layers added and removed against `previous`'s, and the change in total size.
    pub fn compare_layers(&mut self, previous: &[Layer]) {
        let had: std::collections::BTreeSet<&str> =
            previous.iter().map(|l| l.digest.as_str()).collect();
        let has: std::collections::BTreeSet<&str> =
            self.layers.iter().map(|l| l.digest.as_str()).collect();
        self.layer_changes = Some(LayerChanges {
            added: has.difference(&had).count(),
            removed: had.difference(&has).count(),
            size_delta: self.layers.iter().map(|l| l.size).sum::<i64>()
                - previous.iter().map(|l| l.size).sum::<i64>(),
        });
    }

    /// The forge's compare page between two revisions of the source repository, for
    /// github.com, gitlab.com and the configured `[[forge]]` hosts.
    pub fn set_compare_url(&mut self, previous: Option<&Details>, forges: &[(String, String)]) {
        let (Some(source), Some(new), Some(old)) = (
            self.annotations.get("source"),
            self.annotations.get("revision"),
            previous.and_then(|p| p.annotations.get("revision")),
        ) else {
            return;
        };
        if new == old {
            return;
        }
        let url = source.trim_end_matches('/').trim_end_matches(".git");
        let Some(rest) = url.strip_prefix("https://") else {
            return;
        };
        let host = rest.split('/').next().unwrap_or("");
        let kind = match host {
            "github.com" => "github",
            "gitlab.com" => "gitlab",
            h => match forges.iter().find(|(fh, _)| fh == h) {
                Some((_, k)) => k.as_str(),
                None => return,
            },
        };
        self.compare_url = Some(match kind {
            "gitlab" => format!("{url}/-/compare/{old}...{new}"),
            _ => format!("{url}/compare/{old}...{new}"),
        });
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: String,
    pub status: String,
    pub reason: String,
    pub message: String,
    pub time: DateTime<Utc>,
    pub generation: i64,
}

pub const IMPORT_SUCCESS: &str = "ImportSuccess";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tag {
    pub spec: TagSpec,
    /// Stream generation of the last spec change.
    pub spec_generation: i64,
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Hash of the `triggers.toml` declaration last applied to this tag, if declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declared: Option<String>,
    /// When a registry push last moved this tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_push: Option<DateTime<Utc>>,
    /// Policy tags: the repository tag the current image was chosen as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_tag: Option<String>,
    /// Policy tags with `min_age`: candidates newer than the current one, as first seen.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub seen: BTreeMap<String, Seen>,
}

impl Tag {
    pub fn current(&self) -> Option<&HistoryEntry> {
        self.history.first()
    }

    pub fn current_digest(&self) -> Option<&Digest> {
        self.current().map(|h| &h.digest)
    }

    pub fn import_error(&self) -> Option<&Condition> {
        self.conditions
            .iter()
            .find(|c| c.kind == IMPORT_SUCCESS && c.status == "False")
    }

    /// Records an image as current: a new entry when the digest differs; the same digest from a
    /// new pull spec updates the current entry instead. Any new entry clears the import error.
    /// Returns true when the current digest changed.
    pub fn record(&mut self, entry: HistoryEntry) -> bool {
        if let Some(cur) = self.history.first_mut()
            && cur.digest == entry.digest
        {
            if cur.image != entry.image {
                cur.image = entry.image;
            }
            if entry.media_type.is_some() {
                cur.media_type = entry.media_type;
                cur.platforms = entry.platforms;
            }
            return false;
        }
        self.history.insert(0, entry);
        self.conditions.retain(|c| c.kind != IMPORT_SUCCESS);
        true
    }

    /// Sets `ImportSuccess=False`, keeping the image. An identical failure (same reason and
    /// message) is not rewritten, so repeated failed polls do not churn the store.
    /// Returns true when the condition changed.
    pub fn fail(
        &mut self,
        reason: &str,
        message: &str,
        now: DateTime<Utc>,
        generation: i64,
    ) -> bool {
        if let Some(c) = self.import_error()
            && c.reason == reason
            && c.message == message
        {
            return false;
        }
        self.conditions.retain(|c| c.kind != IMPORT_SUCCESS);
        self.conditions.push(Condition {
            kind: IMPORT_SUCCESS.into(),
            status: "False".into(),
            reason: reason.into(),
            message: message.into(),
            time: now,
            generation,
        });
        true
    }

    /// Clears an import error after a successful import that found no new image.
    pub fn succeed(&mut self) -> bool {
        let before = self.conditions.len();
        self.conditions.retain(|c| c.kind != IMPORT_SUCCESS);
        before != self.conditions.len()
    }

    /// Whether the scheduler should poll this tag: scheduled, from an external image by tag.
    pub fn is_polled(&self) -> bool {
        self.spec.scheduled
            && match &self.spec.from {
                TagFrom::Image(r) => !r.contains('@'),
                TagFrom::Policy(_) => true,
                _ => false,
            }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageStream {
    pub namespace: String,
    pub name: String,
    /// Increases on every spec change.
    pub generation: i64,
    pub created: DateTime<Utc>,
    pub tags: BTreeMap<String, Tag>,
}

impl ImageStream {
    pub fn new(namespace: &str, name: &str, now: DateTime<Utc>) -> ImageStream {
        ImageStream {
            namespace: namespace.into(),
            name: name.into(),
            generation: 0,
            created: now,
            tags: BTreeMap::new(),
        }
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Sets a tag's spec, bumping generations when it changed. Returns the tag.
    pub fn set_spec(&mut self, tag: &str, spec: TagSpec) -> &mut Tag {
        let changed = self.tags.get(tag).map(|t| t.spec != spec).unwrap_or(true);
        if changed {
            self.generation += 1;
        }
        let generation = self.generation;
        let t = self.tags.entry(tag.to_string()).or_insert_with(|| Tag {
            spec: spec.clone(),
            spec_generation: generation,
            history: Vec::new(),
            conditions: Vec::new(),
            declared: None,
            last_push: None,
            source_tag: None,
            seen: BTreeMap::new(),
        });
        if changed {
            t.spec = spec;
            t.spec_generation = generation;
        }
        t
    }

    /// The tags that alias `tag` (directly or through other aliases), in dependency order.
    pub fn aliases_of(&self, tag: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut frontier = vec![tag.to_string()];
        while let Some(src) = frontier.pop() {
            for (name, t) in &self.tags {
                if t.spec.alias
                    && matches!(&t.spec.from, TagFrom::Tag(s) if s == &src)
                    && name != tag
                    && !out.contains(name)
                {
                    out.push(name.clone());
                    frontier.push(name.clone());
                }
            }
        }
        out
    }

    /// Finds a unique history image by digest prefix (`algo:hexprefix`) across all tags.
    pub fn find_image(&self, prefix: &str) -> Result<&HistoryEntry, String> {
        let mut found: Vec<&HistoryEntry> = Vec::new();
        for t in self.tags.values() {
            for h in &t.history {
                if h.digest.as_str().starts_with(prefix)
                    && !found.iter().any(|f| f.digest == h.digest)
                {
                    found.push(h);
                }
            }
        }
        match found.len() {
            0 => Err(format!(
                "no image in stream {} matches {prefix}",
                self.key()
            )),
            1 => Ok(found[0]),
            n => Err(format!(
                "{prefix} is ambiguous in stream {}: {n} images match; give more of the digest",
                self.key()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(d: char, image: &str) -> HistoryEntry {
        HistoryEntry {
            digest: Digest::parse(&format!("sha256:{}", d.to_string().repeat(64))).unwrap(),
            image: image.into(),
            created: Utc::now(),
            generation: 1,
            cause: Cause::Import,
            id: "x".into(),
            media_type: None,
            platforms: vec![],
            details: None,
            source_tag: None,
        }
    }

    #[test]
    fn history_rules() {
        let mut s = ImageStream::new("default", "python", Utc::now());
        let t = s.set_spec("3.6", TagSpec::new(TagFrom::Image("a/b:1".into())));
        assert!(t.record(entry('a', "r/a@1")));
        assert!(t.fail("NotFound", "gone", Utc::now(), 1));
        assert!(
            !t.fail("NotFound", "gone", Utc::now(), 1),
            "identical failure is not rewritten"
        );
        // same digest, new pull spec: current entry updated, no new entry
        assert!(!t.record(entry('a', "r2/a@1")));
        assert_eq!(t.history.len(), 1);
        assert_eq!(t.history[0].image, "r2/a@1");
        assert!(
            t.import_error().is_some(),
            "same image does not clear by itself"
        );
        assert!(t.record(entry('b', "r/b")));
        assert_eq!(t.history.len(), 2);
        assert!(t.import_error().is_none(), "a new entry clears the failure");
    }

    #[test]
    fn generations() {
        let mut s = ImageStream::new("default", "python", Utc::now());
        s.set_spec("a", TagSpec::new(TagFrom::Image("x".into())));
        s.set_spec("b", TagSpec::new(TagFrom::Image("y".into())));
        s.set_spec("a", TagSpec::new(TagFrom::Image("x".into())));
        assert_eq!(s.generation, 2);
        assert_eq!(s.tags["a"].spec_generation, 1);
        assert_eq!(s.tags["b"].spec_generation, 2);
    }

    #[test]
    fn alias_chain() {
        let mut s = ImageStream::new("default", "p", Utc::now());
        s.set_spec("src", TagSpec::new(TagFrom::Image("x".into())));
        let mut a = TagSpec::new(TagFrom::Tag("src".into()));
        a.alias = true;
        s.set_spec("latest", a);
        let mut b = TagSpec::new(TagFrom::Tag("latest".into()));
        b.alias = true;
        s.set_spec("stable", b);
        assert_eq!(s.aliases_of("src"), vec!["latest", "stable"]);
    }
}
