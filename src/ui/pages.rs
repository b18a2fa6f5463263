//! The pages themselves: HTML from engine state, nothing else. Every value that came from a
//! user, a registry or a receiver is interpolated by maud, which escapes it.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};

use super::Session;
use super::timeline;
use crate::config::Verb;
use crate::model::{Cause, ImageStream, Tag, TagFrom};
use crate::trigger::TriggerView;

/// What a path segment may hold unencoded (RFC 3986 unreserved).
pub(super) const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn seg(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

pub(super) fn stream_href(namespace: &str, name: &str) -> String {
    format!("/ui/streams/{}/{}", seg(namespace), seg(name))
}

/// A rendered page and its status.
pub(super) struct Page(StatusCode, Markup);

impl IntoResponse for Page {
    fn into_response(self) -> Response {
        (
            self.0,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            self.1.into_string(),
        )
            .into_response()
    }
}

/// "3 min ago", as people read ages; the exact time is in the `<time>` element.
pub(super) fn age(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let s = (now - t).num_seconds();
    match s {
        i64::MIN..=-1 => "in the future".into(),
        0..=59 => format!("{s} s ago"),
        60..=3599 => format!("{} min ago", s / 60),
        3600..=86_399 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

fn when(t: DateTime<Utc>, now: DateTime<Utc>) -> Markup {
    let exact = t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    html! { time datetime=(exact) title=(exact) { (age(t, now)) } }
}

/// `sha256:0123456789ab`: enough to tell images apart; the full digest is in the title.
pub(super) fn short(digest: &str) -> &str {
    let end = digest.find(':').map_or(0, |i| i + 1) + 12;
    digest.get(..end).unwrap_or(digest)
}

fn digest(d: &str) -> Markup {
    html! { code.digest title=(d) { (short(d)) } }
}

fn layout(v: Option<&Session>, title: &str, live: Option<String>, main: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · istream" }
                link rel="stylesheet" href="/ui/assets/style.css";
                script src="/ui/assets/live.js" defer {}
            }
            body data-live=[live] {
                a.skip href="#main" { "Skip to content" }
                header {
                    nav aria-label="Main" {
                        a.brand href="/ui/" { "istream" }
                        a href="/ui/" { "Image streams" }
                        a href="/ui/triggers" { "Triggers" }
                        span #live-status role="status" aria-live="polite" {}
                        @if let Some(v) = v {
                            @if let Some(who) = &v.who {
                                form.logout method="post" action="/ui/logout" {
                                    input type="hidden" name="csrf" value=(v.csrf);
                                    span.who { "Token " (who) }
                                    button type="submit" { "Log out" }
                                }
                            }
                        }
                    }
                }
                main #main tabindex="-1" { (main) }
            }
        }
    }
}

pub(super) fn error_page(v: Option<&Session>, status: StatusCode, message: &str) -> Page {
    let title = status.canonical_reason().unwrap_or("Error");
    Page(
        status,
        layout(
            v,
            title,
            None,
            html! {
                h1 { (status.as_u16()) " " (title) }
                p.error { (message) }
                p { a href="/ui/" { "Back to the image streams" } }
            },
        ),
    )
}

pub(super) fn not_found_page(v: Option<&Session>, message: &str) -> Page {
    error_page(v, StatusCode::NOT_FOUND, message)
}

pub(super) fn login(status: StatusCode, next: &str, nonce: &str, error: Option<&str>) -> Page {
    Page(
        status,
        layout(
            None,
            "Log in",
            None,
            html! {
                h1 { "Log in" }
                p { "This engine asks for an API token (one of its " code { "[[api.token]]" } "). \
                     It is kept in a cookie for this browser session only; the page shows what \
                     the token's scopes allow." }
                @if let Some(e) = error { p.error role="alert" { (e) } }
                form.login method="post" action="/ui/login" {
                    input type="hidden" name="next" value=(next);
                    input type="hidden" name="nonce" value=(nonce);
                    label for="token" { "API token" }
                    input #token type="password" name="token" autocomplete="current-password" required autofocus;
                    button type="submit" { "Log in" }
                }
            },
        ),
    )
}

fn from_text(from: &TagFrom) -> String {
    match from {
        TagFrom::Image(s) => format!("image {s}"),
        TagFrom::Tag(s) => format!("tag {s}"),
        TagFrom::Digest(s) => format!("pinned to {s}"),
        TagFrom::Policy(p) => format!("newest tag of {} ({})", p.repository, p.describe()),
    }
}

fn last_change(s: &ImageStream) -> Option<DateTime<Utc>> {
    s.tags
        .values()
        .filter_map(|t| t.current().map(|h| h.created))
        .max()
}

pub(super) fn streams(v: &Session, streams: &[ImageStream], now: DateTime<Utc>) -> Page {
    let main = html! {
        h1 { "Image streams" }
        @if streams.is_empty() {
            p.empty { "No image streams yet. Start one with "
                code { "istream import-image NAME --from=REGISTRY/REPO:TAG --confirm" } "." }
        } @else {
            table.streams {
                caption.visually-hidden { "Image streams and their tags" }
                thead { tr {
                    th scope="col" { "Namespace" }
                    th scope="col" { "Stream" }
                    th scope="col" { "Tags" }
                    th scope="col" { "Last change" }
                    th scope="col" { "Failing imports" }
                } }
                tbody {
                    @for s in streams {
                        @let failing: Vec<&String> = s.tags.iter().filter(|(_, t)| t.import_error().is_some()).map(|(n, _)| n).collect();
                        tr.stream data-stream=(format!("{}/{}", s.namespace, s.name)) {
                            td { (s.namespace) }
                            th scope="row" { a href=(stream_href(&s.namespace, &s.name)) { (s.name) } }
                            td.num { (s.tags.len()) }
                            td { @if let Some(t) = last_change(s) { (when(t, now)) } @else { "never" } }
                            td.failing[!failing.is_empty()] {
                                @if failing.is_empty() { "none" } @else {
                                    (failing.len()) ": "
                                    @for (i, f) in failing.iter().enumerate() {
                                        @if i > 0 { ", " }
                                        a href=(format!("{}#tag-{}", stream_href(&s.namespace, &s.name), seg(f))) { (f) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Page(
        StatusCode::OK,
        layout(Some(v), "Image streams", Some("streams".into()), main),
    )
}

fn legend() -> Markup {
    html! {
        ul.legend aria-label="Causes" {
            @for c in [Cause::Import, Cause::Schedule, Cause::Push, Cause::Tag, Cause::Rollback] {
                li { svg.swatch width="12" height="12" viewBox="0 0 12 12" aria-hidden="true" {
                    circle class=(format!("cause-{}", c.as_str())) cx="6" cy="6" r="5" {}
                } " " (c.as_str()) }
            }
            li { svg.swatch width="12" height="12" viewBox="0 0 12 12" aria-hidden="true" {
                circle.ring cx="6" cy="6" r="5" {}
            } " current image" }
        }
    }
}

fn tag_section(name: &str, t: &Tag, now: DateTime<Utc>) -> Markup {
    let cur = t.current();
    let annotations = cur.and_then(|c| c.details.as_ref()).map(|d| &d.annotations);
    html! {
        section.tag id=(format!("tag-{name}")) aria-labelledby=(format!("h-tag-{name}")) {
            h2 id=(format!("h-tag-{name}")) { (name) }
            dl {
                dt { "From" } dd { (from_text(&t.spec.from)) }
                @if t.spec.scheduled || t.spec.alias {
                    dt { "Policy" } dd {
                        @if t.spec.scheduled { "scheduled" @if let Some(p) = &t.spec.schedule { " (" (p) ")" } }
                        @if t.spec.scheduled && t.spec.alias { ", " }
                        @if t.spec.alias { "alias" }
                    }
                }
                dt { "Current" } dd.current {
                    @if let Some(c) = cur {
                        (digest(c.digest.as_str())) " · " (when(c.created, now)) " · " (c.cause.as_str())
                        @if let Some(st) = &t.source_tag { " · as " code { (st) } }
                    } @else { "no image yet" }
                }
                @for c in &t.conditions {
                    dt { (c.kind) }
                    dd.condition.bad[c.status == "False"] {
                        (c.status) @if !c.reason.is_empty() { " · " (c.reason) }
                        @if !c.message.is_empty() { ": " span.message { (c.message) } }
                        " · " (when(c.time, now))
                    }
                }
                @if let Some(a) = annotations.filter(|a| !a.is_empty()) {
                    dt { "Annotations" } dd {
                        ul.annotations {
                            @for (k, val) in a { li { code { (k) } " = " span.annotation { (val) } } }
                        }
                    }
                }
            }
            (timeline::timeline(name, &t.history, now))
            @if !t.history.is_empty() {
                details.history {
                    summary { "History (" (t.history.len()) ")" }
                    table {
                        thead { tr {
                            th scope="col" { "When" } th scope="col" { "Image" }
                            th scope="col" { "Cause" } th scope="col" { "Generation" }
                        } }
                        tbody {
                            @for (i, h) in t.history.iter().enumerate() {
                                tr.current[i == 0] {
                                    td { (when(h.created, now)) }
                                    td { (digest(h.digest.as_str()))
                                        @if let Some(st) = &h.source_tag { " as " code { (st) } } }
                                    td { (h.cause.as_str()) @if i == 0 { " (current)" } }
                                    td.num { (h.generation) }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

pub(super) fn stream(v: &Session, s: &ImageStream, now: DateTime<Utc>) -> Page {
    let title = format!("{}/{}", s.namespace, s.name);
    let main = html! {
        p.crumbs { a href="/ui/" { "Image streams" } " / " (s.namespace) }
        h1 { (title) }
        p { (s.tags.len()) " tags · created " (when(s.created, now)) }
        (legend())
        @if s.tags.is_empty() { p.empty { "This stream has no tags." } }
        @for (name, t) in &s.tags { (tag_section(name, t, now)) }
    };
    Page(
        StatusCode::OK,
        layout(Some(v), &title, Some(format!("stream:{title}")), main),
    )
}

pub(super) fn triggers(v: &Session, views: &[TriggerView]) -> Page {
    let main = html! {
        h1 { "Triggers" }
        @if views.is_empty() {
            p.empty { "No triggers are declared. Add a " code { "[[trigger]]" } " to triggers.toml." }
        } @else {
            table.triggers {
                caption.visually-hidden { "Triggers and their deliveries" }
                thead { tr {
                    th scope="col" { "Trigger" } th scope="col" { "Sink" } th scope="col" { "Watches" }
                    th scope="col" { "Last fired for" } th scope="col" { "Pending" } th scope="col" { "Dead" }
                } }
                tbody {
                    @for t in views {
                        tr.trigger data-trigger=(t.name) {
                            th scope="row" { a href=(format!("/ui/triggers/{}", seg(&t.name))) { (t.name) }
                                @if t.paused { " " span.badge { "paused" } } }
                            td { (t.sink) }
                            td { @for (i, o) in t.on.iter().enumerate() { @if i > 0 { ", " } code { (o) } } }
                            td { @if t.last_fired.is_empty() { "never" }
                                @for (tag, d) in &t.last_fired { div { code { (tag) } " → " (digest(d)) } } }
                            td.num.pending { (t.pending) }
                            td.num.dead.bad[t.dead > 0] { (t.dead) }
                        }
                    }
                }
            }
        }
    };
    Page(
        StatusCode::OK,
        layout(Some(v), "Triggers", Some("triggers".into()), main),
    )
}

pub(super) fn trigger(
    v: &Session,
    t: &TriggerView,
    requeued: Option<usize>,
    now: DateTime<Utc>,
) -> Page {
    let may_retry = v.may("*", Verb::Admin);
    let main = html! {
        p.crumbs { a href="/ui/triggers" { "Triggers" } }
        h1 { (t.name) @if t.paused { " " span.badge { "paused" } } }
        @if let Some(n) = requeued {
            p.notice role="status" { "Re-queued " (n) " dead " (if n == 1 { "delivery" } else { "deliveries" }) "." }
        }
        dl {
            dt { "Sink" } dd { (t.sink) }
            dt { "Watches" } dd { @for (i, o) in t.on.iter().enumerate() { @if i > 0 { ", " } code { (o) } } }
            dt { "Counts" } dd {
                span.pending { (t.pending) " pending" } " · "
                span.dead { (t.dead) " dead" } " · "
                (t.delivered) " delivered · " (t.superseded) " superseded"
            }
            dt { "Last fired for" } dd { @if t.last_fired.is_empty() { "never" }
                @for (tag, d) in &t.last_fired { div { code { (tag) } " → " (digest(d)) } } }
        }
        @if may_retry {
            form.retry method="post" action=(format!("/ui/triggers/{}/retry", seg(&t.name))) {
                input type="hidden" name="csrf" value=(v.csrf);
                button #retry type="submit" disabled[t.dead == 0] { "Retry dead deliveries (" (t.dead) ")" }
            }
        }
        h2 { "Recent deliveries" }
        @if t.deliveries.is_empty() { p.empty { "None yet." } } @else {
            table.deliveries {
                thead { tr {
                    th scope="col" { "Id" } th scope="col" { "Tag" } th scope="col" { "Image" }
                    th scope="col" { "State" } th scope="col" { "Attempts" }
                    th scope="col" { "Next attempt" } th scope="col" { "Last error" }
                } }
                tbody {
                    @for d in &t.deliveries {
                        tr.delivery data-state=(d.state) title=(format!("event {}", d.event_id)) {
                            td.num { (d.id) }
                            td { code { (d.tag) } }
                            td { (digest(&d.digest)) }
                            td { span class=(format!("state state-{}", d.state)) { (d.state) } }
                            td.num { (d.attempts) }
                            td { @if let Some(n) = d.next_attempt { (when_next(n, now)) } @else { "—" } }
                            td.error { @if let Some(e) = &d.last_error { (e) } }
                        }
                    }
                }
            }
        }
    };
    Page(
        StatusCode::OK,
        layout(Some(v), &t.name, Some(format!("trigger:{}", t.name)), main),
    )
}

fn when_next(t: DateTime<Utc>, now: DateTime<Utc>) -> Markup {
    let exact = t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let s = (t - now).num_seconds();
    let text = if s <= 0 {
        "due now".to_string()
    } else if s < 60 {
        format!("in {s} s")
    } else if s < 3600 {
        format!("in {} min", s / 60)
    } else {
        format!("in {} h", s / 3600)
    };
    html! { time datetime=(exact) title=(exact) { (text) } }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_digests_and_ages() {
        assert_eq!(short("sha256:0123456789abcdef"), "sha256:0123456789ab");
        assert_eq!(short("sha256:01"), "sha256:01");
        let now = Utc::now();
        assert_eq!(age(now - chrono::Duration::seconds(5), now), "5 s ago");
        assert_eq!(age(now - chrono::Duration::minutes(3), now), "3 min ago");
        assert_eq!(age(now - chrono::Duration::days(2), now), "2 d ago");
    }

    #[test]
    fn names_are_escaped_and_links_encoded() {
        let m = html! { p { ("<script>alert(1)</script>") } };
        assert_eq!(
            m.into_string(),
            "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>"
        );
        assert_eq!(stream_href("ns", "a b/c"), "/ui/streams/ns/a%20b%2Fc");
    }
}
