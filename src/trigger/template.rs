//! Webhook body templates: the CloudEvent's fields by path, `{{ data.digest }}`,
//! `{{ subject }}`, `{{ id }}`, substituted as raw text (strings unquoted; JSON for objects).
//! Small on purpose: a body is a few fields in the receiver's shape, not a program.

use crate::model::Event;

/// Checks that every `{{ ... }}` is closed and names a known field.
pub fn check(tpl: &str) -> Result<(), String> {
    let sample = Event::new(
        crate::model::event::TAG_CHANGED,
        "id".into(),
        "i",
        chrono::Utc::now(),
        crate::model::EventData::for_tag("n", "s", "t"),
    );
    render(tpl, &sample).map(|_| ())
}

pub fn render(tpl: &str, e: &Event) -> Result<String, String> {
    let doc = serde_json::to_value(e).map_err(|x| x.to_string())?;
    let mut out = String::with_capacity(tpl.len() + 128);
    let mut rest = tpl;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("unclosed '{{{{' at byte {}", tpl.len() - rest.len() + start))?;
        let path = after[..end].trim();
        let mut v = &doc;
        for part in path.split('.') {
            v = v.get(part).ok_or_else(|| {
                format!("unknown field \"{path}\" (try data.digest, data.image, subject, id)")
            })?;
        }
        match v {
            serde_json::Value::String(s) => out.push_str(s),
            serde_json::Value::Null => out.push_str("null"),
            other => out.push_str(&other.to_string()),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_checks() {
        assert!(check(r#"{"text": "{{ subject }} is now {{ data.digest }}"}"#).is_ok());
        assert!(check("{{ data.nope }}").is_err());
        assert!(check("{{ subject").is_err());
    }
}
