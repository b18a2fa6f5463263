//! CloudEvents 1.0 envelopes (structured JSON mode) for everything the engine announces, and the
//! NATS subject each goes to. The event id of a tag change is the id of its history entry, so
//! every re-publication of one change carries the same id (JetStream de-duplicates on it).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub const TAG_CHANGED: &str = "io.istream.tag.changed";
pub const IMPORT_FAILED: &str = "io.istream.import.failed";
pub const TAG_DELETED: &str = "io.istream.tag.deleted";
pub const TRIGGER_DELIVERED: &str = "io.istream.trigger.delivered";
pub const TRIGGER_DEAD: &str = "io.istream.trigger.dead";

/// A CloudEvent as published and as delivered to webhooks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub subject: String,
    pub time: DateTime<Utc>,
    pub datacontenttype: String,
    pub data: EventData,
}

/// The payload: a tag and its image. Fields not relevant to an event type are null/absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventData {
    pub namespace: String,
    pub stream: String,
    pub tag: String,
    pub digest: Option<String>,
    pub previous: Option<String>,
    pub image: Option<String>,
    pub generation: i64,
    pub cause: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// Set on the delivery `istream triggers test` sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<bool>,
    /// `tag.changed`: the previous pull spec (null for a first image).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub previous_image: Option<Option<String>>,
    /// `tag.changed`: what the new image says of itself (SPEC 10), when it could be fetched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platforms: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<crate::model::stream::LayerChanges>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compare_url: Option<String>,
    /// `tag.changed` of a policy tag: the repository tag the new image was chosen as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_tag: Option<String>,
}

/// A field that is present, null or not (`Some(None)` for null), as against absent (`None`,
/// by `default`): an event read back from the outbox says "no previous image" as it was sent.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

impl EventData {
    /// Fills the SPEC 10 fields of a `tag.changed` event from the entry that became current.
    pub fn explain(&mut self, entry: &crate::model::HistoryEntry, previous_image: Option<&str>) {
        self.previous_image = Some(previous_image.map(str::to_string));
        self.source_tag = entry.source_tag.clone();
        let platforms = entry
            .details
            .as_ref()
            .map(|d| d.platforms.clone())
            .filter(|p| !p.is_empty())
            .or_else(|| Some(entry.platforms.clone()).filter(|p| !p.is_empty()));
        self.platforms = platforms;
        if let Some(d) = &entry.details {
            self.annotations = Some(d.annotations.clone()).filter(|a| !a.is_empty());
            self.layers = d.layer_changes;
            self.compare_url = d.compare_url.clone();
        }
    }
}

impl EventData {
    /// Data naming a tag, every other field empty.
    pub fn for_tag(namespace: &str, stream: &str, tag: &str) -> EventData {
        EventData {
            namespace: namespace.into(),
            stream: stream.into(),
            tag: tag.into(),
            digest: None,
            previous: None,
            image: None,
            generation: 0,
            cause: None,
            reason: None,
            message: None,
            trigger: None,
            test: None,
            previous_image: None,
            annotations: None,
            platforms: None,
            layers: None,
            compare_url: None,
            source_tag: None,
        }
    }
}

impl Event {
    pub fn new(
        kind: &str,
        id: String,
        instance: &str,
        time: DateTime<Utc>,
        data: EventData,
    ) -> Event {
        Event {
            specversion: "1.0".into(),
            id,
            source: format!("istream://{instance}/{}/{}", data.namespace, data.stream),
            kind: kind.into(),
            subject: format!("{}/{}:{}", data.namespace, data.stream, data.tag),
            time,
            datacontenttype: "application/json".into(),
            data,
        }
    }

    /// The NATS subject: tag changes on `<prefix>.<ns>.<stream>.<tag>`, every other type under
    /// `<prefix>._status.<kind>.<ns>.<stream>.<tag>`, which no tag subject can match because
    /// `_status` is not a valid namespace.
    pub fn subject(&self, prefix: &str) -> String {
        let tail = format!(
            "{}.{}.{}",
            encode_token(&self.data.namespace),
            encode_token(&self.data.stream),
            encode_token(&self.data.tag)
        );
        if self.kind == TAG_CHANGED {
            format!("{prefix}.{tail}")
        } else {
            let short = self
                .kind
                .trim_start_matches("io.istream.")
                .replace('.', "_");
            format!("{prefix}._status.{short}.{tail}")
        }
    }
}

/// Percent-encodes `%`, `.`, `*`, `>` and whitespace so a name is exactly one subject token.
pub fn encode_token(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' | '.' | '*' | '>' => out.push_str(&format!("%{:02X}", c as u32)),
            c if c.is_whitespace() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(tag: &str) -> EventData {
        EventData {
            digest: Some("sha256:x".into()),
            cause: Some("import".into()),
            generation: 1,
            ..EventData::for_tag("default", "python", tag)
        }
    }

    #[test]
    fn subjects() {
        let e = Event::new(TAG_CHANGED, "1".into(), "h", Utc::now(), data("3.6"));
        assert_eq!(e.subject("istream"), "istream.default.python.3%2E6");
        assert_eq!(e.subject, "default/python:3.6");
        assert_eq!(e.source, "istream://h/default/python");
        let e = Event::new(TAG_DELETED, "2".into(), "h", Utc::now(), data("latest"));
        assert_eq!(
            e.subject("istream"),
            "istream._status.tag_deleted.default.python.latest"
        );
        assert_eq!(encode_token("a%b*c>d e"), "a%25b%2Ac%3Ed%20e");
    }

    #[test]
    fn previous_image_survives_a_round_trip() {
        // The outbox stores events as JSON; a first image's explicit null must come back as
        // null (the drain path publishes what it reads), an absent field as absent.
        for prev in [None, Some(None), Some(Some("reg/a@sha256:y".to_string()))] {
            let mut d = data("1");
            d.previous_image = prev.clone();
            let e = Event::new(TAG_CHANGED, "1".into(), "h", Utc::now(), d);
            let back: Event = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
            assert_eq!(back.data.previous_image, prev);
        }
    }
}
