//! A tag's history as an SVG timeline, drawn on the server: one mark per history entry at its
//! time, coloured by cause (CSS classes `cause-*`), the current image ringed, and a dashed arc
//! from an earlier mark to the entry that went back to the same image (a rollback, or a
//! registry tag moved back). Each mark is focusable and carries its digest, cause and time as
//! its `<title>`, so the drawing reads by hover, by keyboard and by screen reader.

use chrono::{DateTime, Utc};
use maud::{Markup, html};

use crate::model::HistoryEntry;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 64.0;
const PAD: f64 = 18.0;
const AXIS_Y: f64 = 40.0;
/// The shortest span drawn, so a fresh tag's marks spread along the axis.
const MIN_SPAN_SECS: i64 = 60;
/// Marks closer than this are pushed apart: every image stays a mark of its own, even when
/// several changes came within seconds.
const MIN_GAP: f64 = 22.0;

/// Where each entry goes along x, oldest at the left and now at the right edge; marks keep
/// their order in time and at least `MIN_GAP` (or an even share of the width) between them.
fn xs(history: &[HistoryEntry], now: DateTime<Utc>) -> Vec<f64> {
    let oldest = history.iter().map(|h| h.created).min().unwrap_or(now);
    let end = now.max(history.iter().map(|h| h.created).max().unwrap_or(now));
    let span = (end - oldest).num_milliseconds().max(MIN_SPAN_SECS * 1000) as f64;
    let left = PAD;
    let right = WIDTH - PAD;
    let mut x: Vec<f64> = history
        .iter()
        .map(|h| {
            let f = 1.0 - (end - h.created).num_milliseconds() as f64 / span;
            left + f.clamp(0.0, 1.0) * (right - left)
        })
        .collect();
    if x.len() < 2 {
        return x;
    }
    let gap = MIN_GAP.min((right - left) / (x.len() - 1) as f64);
    // Newest first: each older mark at least `gap` left of the newer one.
    for i in 1..x.len() {
        x[i] = x[i].min(x[i - 1] - gap);
    }
    // Pushed past the left edge: shift right, keeping the gaps, then never past the right.
    let under = left - x[x.len() - 1];
    if under > 0.0 {
        for (i, v) in x.iter_mut().enumerate() {
            *v = (*v + under).min(right - gap * i as f64);
        }
    }
    x
}

/// For each entry (newest first), the index of the next older entry with the same digest:
/// the image this entry went back to.
fn returns(history: &[HistoryEntry]) -> Vec<Option<usize>> {
    (0..history.len())
        .map(|i| (i + 1..history.len()).find(|&j| history[j].digest == history[i].digest))
        .collect()
}

pub(super) fn timeline(tag: &str, history: &[HistoryEntry], now: DateTime<Utc>) -> Markup {
    if history.is_empty() {
        return html! { p.empty { "No image yet." } };
    }
    let x = xs(history, now);
    let back = returns(history);
    let label = format!(
        "History of {tag}: {} image{}, newest at the right",
        history.len(),
        if history.len() == 1 { "" } else { "s" }
    );
    let first = history
        .iter()
        .map(|h| h.created)
        .min()
        .unwrap_or(now)
        .format("%Y-%m-%d %H:%M")
        .to_string();
    html! {
        svg.timeline viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="group" aria-label=(label)
            xmlns="http://www.w3.org/2000/svg" {
            line.axis x1=(PAD) y1=(AXIS_Y) x2=(WIDTH - PAD) y2=(AXIS_Y) {}
            text.axis-label x=(PAD) y=(HEIGHT - 4.0) { (first) }
            text.axis-label x=(WIDTH - PAD) y=(HEIGHT - 4.0) text-anchor="end" { "now" }
            @for (i, to) in back.iter().enumerate() {
                @if let Some(j) = to {
                    path.return-arc d=(format!(
                        "M {:.1} {AXIS_Y} Q {:.1} {:.1} {:.1} {AXIS_Y}",
                        x[*j], (x[*j] + x[i]) / 2.0, AXIS_Y - 34.0, x[i]
                    )) {}
                }
            }
            @for (i, h) in history.iter().enumerate().rev() {
                @let cause = h.cause.as_str();
                @let when = h.created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                @let went_back = back[i].is_some();
                @let title = format!(
                    "{}{} · {cause}{} · {when} · generation {}",
                    if i == 0 { "current: " } else { "" },
                    h.digest,
                    if went_back { " (back to an earlier image)" } else { "" },
                    h.generation
                );
                g class=(format!("mark cause-{cause}{}{}", if i == 0 { " current" } else { "" }, if went_back { " return" } else { "" }))
                    tabindex="0" role="img" aria-label=(title) data-digest=(h.digest.as_str()) data-cause=(cause) {
                    title { (title) }
                    @if i == 0 { circle.ring cx=(format!("{:.1}", x[i])) cy=(AXIS_Y) r="10" {} }
                    @if went_back {
                        rect x=(format!("{:.1}", x[i] - 6.0)) y=(AXIS_Y - 6.0) width="12" height="12"
                            transform=(format!("rotate(45 {:.1} {AXIS_Y})", x[i])) {}
                    } @else {
                        circle cx=(format!("{:.1}", x[i])) cy=(AXIS_Y) r="6" {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Cause, Digest};

    fn entry(d: char, secs_ago: i64, cause: Cause, now: DateTime<Utc>) -> HistoryEntry {
        HistoryEntry {
            digest: Digest::parse(&format!("sha256:{}", d.to_string().repeat(64))).unwrap(),
            image: format!("r/x@sha256:{}", d.to_string().repeat(64)),
            created: now - chrono::Duration::seconds(secs_ago),
            generation: 1,
            cause,
            id: format!("id-{d}-{secs_ago}"),
            media_type: None,
            platforms: vec![],
            details: None,
            source_tag: None,
        }
    }

    #[test]
    fn one_mark_per_entry_current_ringed_and_returns_drawn() {
        let now = Utc::now();
        // Newest first: back to `a` (a rollback), then `b`, then the first `a`.
        let h = vec![
            entry('a', 10, Cause::Rollback, now),
            entry('b', 3600, Cause::Schedule, now),
            entry('a', 7200, Cause::Import, now),
        ];
        let svg = timeline("latest", &h, now).into_string();
        assert_eq!(svg.matches("<g class=\"mark").count(), 3);
        assert_eq!(svg.matches(" current").count(), 1);
        assert_eq!(svg.matches("class=\"return-arc\"").count(), 1);
        assert!(svg.contains("cause-rollback current return"));
        assert!(svg.contains(&format!("sha256:{}", "b".repeat(64))));
        // Oldest at the left, newest at the right.
        let x = xs(&h, now);
        assert!(x[2] < x[1] && x[1] < x[0], "{x:?}");
        assert!(x.iter().all(|v| (PAD..=WIDTH - PAD).contains(v)));
    }

    #[test]
    fn changes_seconds_apart_stay_separate_marks_within_the_frame() {
        let now = Utc::now();
        for n in [2usize, 5, 40, 500] {
            let h: Vec<HistoryEntry> = (0..n)
                .map(|i| entry('a', i as i64, Cause::Import, now))
                .collect();
            let x = xs(&h, now);
            let gap = MIN_GAP.min((WIDTH - 2.0 * PAD) / (n - 1) as f64);
            for w in x.windows(2) {
                assert!(w[0] - w[1] >= gap - 1e-9, "n={n}: {w:?}");
            }
            assert!(
                x.iter()
                    .all(|v| (PAD - 1e-9..=WIDTH - PAD + 1e-9).contains(v)),
                "n={n}: {x:?}"
            );
        }
    }

    #[test]
    fn empty_history_and_future_times_do_not_break_the_drawing() {
        let now = Utc::now();
        assert!(
            timeline("t", &[], now)
                .into_string()
                .contains("No image yet")
        );
        let h = vec![entry('c', -3600, Cause::Push, now)];
        let x = xs(&h, now);
        assert!((PAD..=WIDTH - PAD).contains(&x[0]));
    }
}
