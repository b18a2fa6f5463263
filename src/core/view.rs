//! What the API and `-o json` show of streams and tags (SPEC section 2): one shape, built here,
//! so the CLI, the API and the docs agree.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{Condition, HistoryEntry, ImageStream, TagSpec};

/// Scheduler state of one tag, when it is polled.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Schedule {
    pub last_checked: Option<DateTime<Utc>>,
    pub next_due: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TagView {
    pub namespace: String,
    pub stream: String,
    pub tag: String,
    pub digest: Option<String>,
    pub image: Option<String>,
    pub spec: TagSpec,
    pub spec_generation: i64,
    pub history: Vec<HistoryEntry>,
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checked: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_due: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_push: Option<DateTime<Utc>>,
    /// Policy tags: the repository tag the current image was chosen as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_tag: Option<String>,
    /// Policy tags: newer candidates waiting for `min_age`, with when they were first seen.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub held_back: std::collections::BTreeMap<String, crate::model::Seen>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamView {
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    pub created: DateTime<Utc>,
    pub tags: Vec<TagView>,
}

pub fn tag_view(s: &ImageStream, tag: &str, sched: Option<Schedule>) -> Option<TagView> {
    let t = s.tags.get(tag)?;
    Some(TagView {
        namespace: s.namespace.clone(),
        stream: s.name.clone(),
        tag: tag.to_string(),
        digest: t.current().map(|h| h.digest.to_string()),
        image: t.current().map(|h| h.image.clone()),
        spec: t.spec.clone(),
        spec_generation: t.spec_generation,
        history: t.history.clone(),
        conditions: t.conditions.clone(),
        last_checked: sched.and_then(|s| s.last_checked),
        next_due: sched.and_then(|s| s.next_due),
        last_push: t.last_push,
        source_tag: t.source_tag.clone(),
        held_back: t.seen.clone(),
    })
}

pub fn stream_view(s: &ImageStream, sched: impl Fn(&str) -> Option<Schedule>) -> StreamView {
    StreamView {
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        generation: s.generation,
        created: s.created,
        tags: s
            .tags
            .keys()
            .filter_map(|t| tag_view(s, t, sched(&format!("{}/{}:{}", s.namespace, s.name, t))))
            .collect(),
    }
}
