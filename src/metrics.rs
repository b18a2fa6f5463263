//! Prometheus metrics, one place that counts each observable occurrence. Every name starts
//! with `istream_`; counters are declared without `_total`, which the encoder appends.

use std::sync::OnceLock;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::model::Event;

type Labels = Vec<(&'static str, String)>;

struct Metrics {
    registry: Registry,
    tag_changes: Family<Labels, Counter>,
    import_failures: Family<Labels, Counter>,
    checks: Family<Labels, Counter>,
    events_published: Family<Labels, Counter>,
    outbox_depth: Gauge,
    scheduled_tags: Gauge,
    deliveries: Family<Labels, Counter>,
    delivery_latency: Histogram,
    hooks: Family<Labels, Counter>,
    rate_limit_pauses: Family<Labels, Counter>,
}

fn m() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let mut registry = Registry::with_prefix("istream");
        let tag_changes = Family::<Labels, Counter>::default();
        registry.register("tag_changes", "Tag changes by cause", tag_changes.clone());
        let import_failures = Family::<Labels, Counter>::default();
        registry.register(
            "import_failures",
            "Failed imports by reason",
            import_failures.clone(),
        );
        let checks = Family::<Labels, Counter>::default();
        registry.register(
            "registry_checks",
            "Registry digest checks by registry and result",
            checks.clone(),
        );
        let events_published = Family::<Labels, Counter>::default();
        registry.register(
            "events_published",
            "Events published by bus and type",
            events_published.clone(),
        );
        let outbox_depth = Gauge::default();
        registry.register(
            "outbox_depth",
            "Events recorded but not yet published",
            outbox_depth.clone(),
        );
        let scheduled_tags = Gauge::default();
        registry.register(
            "scheduled_tags",
            "Tags the scheduler polls",
            scheduled_tags.clone(),
        );
        let deliveries = Family::<Labels, Counter>::default();
        registry.register(
            "deliveries",
            "Trigger delivery attempts by trigger and result",
            deliveries.clone(),
        );
        let delivery_latency = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        registry.register(
            "delivery_seconds",
            "Duration of one delivery request",
            delivery_latency.clone(),
        );
        let hooks = Family::<Labels, Counter>::default();
        registry.register(
            "hook_requests",
            "Registry notifications by source and result",
            hooks.clone(),
        );
        let rate_limit_pauses = Family::<Labels, Counter>::default();
        registry.register(
            "rate_limit_pauses",
            "Registry answers that paused a host",
            rate_limit_pauses.clone(),
        );
        Metrics {
            registry,
            tag_changes,
            import_failures,
            checks,
            events_published,
            outbox_depth,
            scheduled_tags,
            deliveries,
            delivery_latency,
            hooks,
            rate_limit_pauses,
        }
    })
}

/// The reasons an import can fail with (`RegistryError::reason`).
const REASONS: [&str; 7] = [
    "NotFound",
    "Unauthorized",
    "RateLimited",
    "Unreachable",
    "InvalidResponse",
    "Unsupported",
    "NoMatch",
];

/// Creates every metric family with its known label values at zero, so that dashboards and
/// alerts (`rate(istream_import_failures_total[5m]) > 0`) exist before the first occurrence.
pub fn init(config: &crate::config::Config) {
    use crate::model::event::{
        IMPORT_FAILED, TAG_CHANGED, TAG_DELETED, TRIGGER_DEAD, TRIGGER_DELIVERED,
    };
    let m = m();
    for cause in ["import", "schedule", "push", "tag", "rollback"] {
        zero(&m.tag_changes, vec![("cause", cause.to_string())]);
    }
    for reason in REASONS {
        zero(&m.import_failures, vec![("reason", reason.to_string())]);
    }
    for r in &config.registries {
        for result in std::iter::once("ok").chain(REASONS) {
            zero(
                &m.checks,
                vec![("registry", r.host.clone()), ("result", result.to_string())],
            );
        }
        zero(&m.rate_limit_pauses, vec![("registry", r.host.clone())]);
    }
    let bus = if config.nats.is_some() {
        "nats"
    } else {
        "inprocess"
    };
    for kind in [
        TAG_CHANGED,
        IMPORT_FAILED,
        TAG_DELETED,
        TRIGGER_DELIVERED,
        TRIGGER_DEAD,
    ] {
        zero(
            &m.events_published,
            vec![("bus", bus.to_string()), ("type", kind.to_string())],
        );
    }
    for t in &config.triggers {
        for result in ["delivered", "retry", "dead"] {
            zero(
                &m.deliveries,
                vec![("trigger", t.name.clone()), ("result", result.to_string())],
            );
        }
    }
    for source in crate::hooks::SOURCES {
        for result in ["accepted", "unauthorized", "malformed"] {
            zero(
                &m.hooks,
                vec![
                    ("source", source.to_string()),
                    ("result", result.to_string()),
                ],
            );
        }
    }
}

/// A counter at zero for these labels (the family then shows it).
fn zero(f: &Family<Labels, Counter>, labels: Labels) {
    let _ = f.get_or_create(&labels);
}

pub fn tag_event(e: &Event) {
    match e.kind.as_str() {
        crate::model::event::TAG_CHANGED => {
            m().tag_changes
                .get_or_create(&vec![("cause", e.data.cause.clone().unwrap_or_default())])
                .inc();
        }
        crate::model::event::IMPORT_FAILED => {
            m().import_failures
                .get_or_create(&vec![("reason", e.data.reason.clone().unwrap_or_default())])
                .inc();
        }
        _ => {}
    }
}

pub fn registry_check(registry: &str, failure: Option<&str>) {
    let result = failure.unwrap_or("ok").to_string();
    if failure == Some("RateLimited") {
        m().rate_limit_pauses
            .get_or_create(&vec![("registry", registry.to_string())])
            .inc();
    }
    m().checks
        .get_or_create(&vec![
            ("registry", registry.to_string()),
            ("result", result),
        ])
        .inc();
}

pub fn event_published(bus: &'static str, kind: &str) {
    m().events_published
        .get_or_create(&vec![("bus", bus.to_string()), ("type", kind.to_string())])
        .inc();
}

pub fn outbox_depth(n: i64) {
    m().outbox_depth.set(n);
}

pub fn scheduled_tags(n: usize) {
    m().scheduled_tags.set(n as i64);
}

pub fn delivery(trigger: &str, result: &str, seconds: f64) {
    m().deliveries
        .get_or_create(&vec![
            ("trigger", trigger.to_string()),
            ("result", result.to_string()),
        ])
        .inc();
    m().delivery_latency.observe(seconds);
}

pub fn hook(source: &str, result: &str) {
    m().hooks
        .get_or_create(&vec![
            ("source", source.to_string()),
            ("result", result.to_string()),
        ])
        .inc();
}

pub fn render() -> String {
    let mut out = String::new();
    let _ = encode(&mut out, &m().registry);
    out
}
