//! Policy tags (SPEC 8): which tags of a repository are candidates, and in what order. A
//! policy is compiled once from its spec (`from.policy`); the engine lists the repository,
//! ranks the tags with it and moves the tag (`core::Engine::check_policy`).

pub mod range;

use std::cmp::Ordering;
use std::time::Duration;

use crate::model::{ImageRef, PolicySpec};

enum Order {
    Semver(range::Range),
    Numerical,
    Alphabetical,
}

/// A compiled policy.
pub struct Policy {
    pub repository: ImageRef,
    order: Order,
    filter: Option<regex::Regex>,
    extract: Option<String>,
    prerelease: bool,
    pub min_age: Duration,
}

impl Policy {
    /// Checks and compiles a spec; the error names the key at fault.
    pub fn compile(spec: &PolicySpec) -> Result<Policy, (&'static str, String)> {
        let repository =
            ImageRef::parse(&spec.repository).map_err(|e| ("repository", e.to_string()))?;
        if spec.repository.contains('@')
            || spec
                .repository
                .rsplit('/')
                .next()
                .is_some_and(|last| last.contains(':'))
        {
            return Err((
                "repository",
                format!(
                    "\"{}\" must name a repository, without tag or digest",
                    spec.repository
                ),
            ));
        }
        let order = match (&spec.semver, spec.order.as_deref()) {
            (Some(r), None) => Order::Semver(
                range::Range::parse(r).map_err(|e| ("semver", format!("\"{r}\": {e}")))?,
            ),
            (None, Some("numerical")) => Order::Numerical,
            (None, Some("alphabetical")) => Order::Alphabetical,
            (None, Some(o)) => {
                return Err((
                    "order",
                    format!("\"{o}\" must be \"numerical\" or \"alphabetical\""),
                ));
            }
            _ => return Err(("semver", "give exactly one of semver and order".into())),
        };
        let filter = match &spec.filter {
            Some(f) => Some(regex::Regex::new(f).map_err(|e| {
                (
                    "filter",
                    format!("\"{f}\" is not a regular expression: {e}"),
                )
            })?),
            None => None,
        };
        if spec.extract.is_some() && filter.is_none() {
            return Err((
                "extract",
                "extract needs a filter whose groups it uses".into(),
            ));
        }
        let min_age = match &spec.min_age {
            Some(a) => {
                let d = humantime::parse_duration(a).map_err(|e| {
                    (
                        "min_age",
                        format!("\"{a}\" is not a duration like 24h: {e}"),
                    )
                })?;
                if d > crate::config::MAX_DURATION {
                    return Err((
                        "min_age",
                        format!("\"{a}\" is longer than the 366 days maximum"),
                    ));
                }
                d
            }
            None => Duration::ZERO,
        };
        Ok(Policy {
            repository: ImageRef {
                tag: None,
                digest: None,
                ..repository
            },
            order,
            filter,
            extract: spec.extract.clone(),
            prerelease: spec.prerelease,
            min_age,
        })
    }

    /// The string a tag is compared by (the `extract` template over the filter's groups), or
    /// None when the tag is no candidate.
    fn key(&self, tag: &str) -> Option<String> {
        let key = match &self.filter {
            Some(re) => {
                let caps = re.captures(tag)?;
                match &self.extract {
                    Some(t) => {
                        let mut out = String::new();
                        caps.expand(t, &mut out);
                        out
                    }
                    None => tag.to_string(),
                }
            }
            None => tag.to_string(),
        };
        let ok = match &self.order {
            Order::Semver(r) => range::parse_version(&key).is_some_and(|v| {
                (self.prerelease || v.pre.is_empty()) && r.matches(&v, self.prerelease)
            }),
            Order::Numerical => key.parse::<f64>().is_ok_and(f64::is_finite),
            Order::Alphabetical => !key.is_empty(),
        };
        ok.then_some(key)
    }

    fn cmp_keys(&self, a: &str, b: &str) -> Ordering {
        match &self.order {
            Order::Semver(_) => range::parse_version(a).cmp(&range::parse_version(b)),
            Order::Numerical => a
                .parse::<f64>()
                .unwrap_or(f64::MIN)
                .total_cmp(&b.parse::<f64>().unwrap_or(f64::MIN)),
            Order::Alphabetical => a.cmp(b),
        }
    }

    /// The candidate tags, best first (ties: the lexically greater tag first).
    pub fn rank(&self, tags: &[String]) -> Vec<String> {
        let mut c: Vec<(String, String)> = tags
            .iter()
            .filter_map(|t| self.key(t).map(|k| (k, t.clone())))
            .collect();
        c.sort_by(|(ka, ta), (kb, tb)| self.cmp_keys(kb, ka).then_with(|| tb.cmp(ta)));
        c.into_iter().map(|(_, t)| t).collect()
    }

    /// Whether tag `a` ranks below tag `b` (both candidates).
    pub fn lower(&self, a: &str, b: &str) -> bool {
        match (self.key(a), self.key(b)) {
            (Some(ka), Some(kb)) => self.cmp_keys(&ka, &kb) == Ordering::Less,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(semver: Option<&str>, order: Option<&str>) -> PolicySpec {
        PolicySpec {
            repository: "docker.io/library/python".into(),
            semver: semver.map(str::to_string),
            order: order.map(str::to_string),
            filter: None,
            extract: None,
            prerelease: false,
            min_age: None,
        }
    }

    fn tags(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ranks_by_each_order() {
        let all = tags(&[
            "3.11.9",
            "3.12.7",
            "3.12.10",
            "v3.13.0",
            "3.14.0rc1",
            "3.14.0-rc.1",
            "latest",
            "4.0.0",
            "3.12",
        ]);
        let p = Policy::compile(&spec(Some(">=3.12, <4"), None)).unwrap();
        assert_eq!(
            p.rank(&all),
            tags(&["v3.13.0", "3.12.10", "3.12.7", "3.12"])
        );
        let mut with_pre = spec(Some(">=3.12 <4"), None);
        with_pre.prerelease = true;
        let p = Policy::compile(&with_pre).unwrap();
        assert_eq!(
            p.rank(&all)[0],
            "3.14.0-rc.1",
            "pre-releases only when asked for"
        );
        let n = Policy::compile(&spec(None, Some("numerical"))).unwrap();
        assert_eq!(
            n.rank(&tags(&["9", "10", "latest", "2.5"])),
            tags(&["10", "9", "2.5"])
        );
        let a = Policy::compile(&spec(None, Some("alphabetical"))).unwrap();
        assert_eq!(a.rank(&tags(&["b", "c", "a"]))[0], "c");
    }

    #[test]
    fn filter_and_extract() {
        let mut s = spec(Some(">=3.12, <4"), None);
        s.filter = Some(r"^(?P<v>\d+\.\d+\.\d+)-slim$".into());
        s.extract = Some("$v".into());
        let p = Policy::compile(&s).unwrap();
        let t = tags(&[
            "3.12.7-slim",
            "3.12.8",
            "3.12.6-slim",
            "3.13.1-slim-bookworm",
        ]);
        assert_eq!(p.rank(&t), tags(&["3.12.7-slim", "3.12.6-slim"]));
        assert!(p.lower("3.12.6-slim", "3.12.7-slim"));
    }

    #[test]
    fn bad_policies_name_the_key() {
        for (s, key) in [
            (spec(None, None), "semver"),
            (spec(Some(">=1"), Some("numerical")), "semver"),
            (spec(None, Some("random")), "order"),
            (spec(Some(">=banana"), None), "semver"),
            (
                PolicySpec {
                    filter: Some("(".into()),
                    ..spec(Some("*"), None)
                },
                "filter",
            ),
            (
                PolicySpec {
                    extract: Some("$1".into()),
                    ..spec(Some("*"), None)
                },
                "extract",
            ),
            (
                PolicySpec {
                    min_age: Some("soon".into()),
                    ..spec(Some("*"), None)
                },
                "min_age",
            ),
            (
                PolicySpec {
                    repository: "python:3".into(),
                    ..spec(Some("*"), None)
                },
                "repository",
            ),
        ] {
            assert_eq!(Policy::compile(&s).err().map(|e| e.0), Some(key), "{s:?}");
        }
    }
}
