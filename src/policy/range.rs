//! Version ranges in the npm/Flux syntax over the `semver` crate's versions (which has only
//! Cargo's range syntax): comparators `=`, `>`, `>=`, `<`, `<=`, `~1.2` (and `~>`), `^1.2`,
//! wildcards `1.x`, `1.*`, `*`, bare partial versions (`1.2` is `1.2.x`), hyphen ranges
//! `1.2 - 2.3`; comparators joined by spaces or `,` are ANDed, ranges joined by `||` ORed.
//! Pre-releases match only a comparator with a pre-release of the same version, as in npm,
//! unless the caller includes them. Checked against node-semver's own test table
//! (tests/fixtures/semver).

use semver::{Prerelease, Version};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Comparator {
    op: Op,
    v: Version,
    /// A lower bound from a partial version (`2.x`, `~1.2`): with pre-releases included it
    /// starts below them (`>=2.0.0-0`), as npm's `includePrerelease` does.
    partial_floor: bool,
}

impl Comparator {
    fn test(&self, v: &Version, include_pre: bool) -> bool {
        if include_pre && self.partial_floor && self.op == Op::Ge && self.v.pre.is_empty() {
            return v >= &floor(self.v.major, self.v.minor, self.v.patch);
        }
        match self.op {
            Op::Lt => v < &self.v,
            Op::Le => v <= &self.v,
            Op::Gt => v > &self.v,
            Op::Ge => v >= &self.v,
            Op::Eq => v == &self.v,
        }
    }
}

/// A parsed range: alternatives (ORed) of comparator sets (ANDed); an empty set is any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    sets: Vec<Vec<Comparator>>,
}

/// A partial version: missing or wildcard parts are None.
struct Partial {
    major: Option<u64>,
    minor: Option<u64>,
    patch: Option<u64>,
    pre: Prerelease,
}

fn v(major: u64, minor: u64, patch: u64, pre: &Prerelease) -> Version {
    Version {
        major,
        minor,
        patch,
        pre: pre.clone(),
        build: semver::BuildMetadata::EMPTY,
    }
}

/// `X.0.0-0`: below every pre-release of X.0.0, so `<2.0.0-0` excludes 2.0.0-rc.1.
fn floor(major: u64, minor: u64, patch: u64) -> Version {
    v(
        major,
        minor,
        patch,
        &Prerelease::new("0").expect("0 is a pre-release"),
    )
}

fn parse_partial(s: &str) -> Result<Partial, String> {
    let s = s.trim_start_matches(['v', 'V', '=']);
    let s = s.split('+').next().unwrap_or(s);
    let (core, pre) = match s.split_once('-') {
        Some((c, p)) => (c, p),
        None => (s, ""),
    };
    let pre = if pre.is_empty() {
        Prerelease::EMPTY
    } else {
        Prerelease::new(pre).map_err(|e| format!("pre-release \"{pre}\": {e}"))?
    };
    let mut parts = [None, None, None];
    let fields: Vec<&str> = if core.is_empty() {
        Vec::new()
    } else {
        core.split('.').collect()
    };
    if fields.len() > 3 {
        return Err(format!("\"{s}\" has more than three parts"));
    }
    let mut wild = false;
    for (i, f) in fields.iter().enumerate() {
        if matches!(*f, "x" | "X" | "*") {
            wild = true;
            continue;
        }
        if wild {
            return Err(format!("\"{s}\": a number after a wildcard"));
        }
        parts[i] = Some(
            f.parse::<u64>()
                .map_err(|_| format!("\"{f}\" in \"{s}\" is not a number"))?,
        );
    }
    Ok(Partial {
        major: parts[0],
        minor: parts[1],
        patch: parts[2],
        pre,
    })
}

/// The comparators one token stands for (an empty list: any version).
fn desugar(token: &str) -> Result<Vec<Comparator>, String> {
    let (op, rest) = ["~>", ">=", "<=", ">", "<", "=", "~", "^"]
        .iter()
        .find_map(|p| token.strip_prefix(p).map(|r| (*p, r)))
        .unwrap_or(("", token));
    let p = parse_partial(rest)?;
    let partial = p.patch.is_none();
    let c = |op, v| Comparator {
        op,
        v,
        partial_floor: partial,
    };
    let none = Prerelease::EMPTY;
    Ok(match (op, p.major, p.minor, p.patch) {
        ("" | "=", None, ..) => vec![],
        ("" | "=", Some(ma), None, _) => vec![
            c(Op::Ge, v(ma, 0, 0, &none)),
            c(Op::Lt, floor(ma + 1, 0, 0)),
        ],
        ("" | "=", Some(ma), Some(mi), None) => {
            vec![
                c(Op::Ge, v(ma, mi, 0, &none)),
                c(Op::Lt, floor(ma, mi + 1, 0)),
            ]
        }
        ("" | "=", Some(ma), Some(mi), Some(pa)) => vec![c(Op::Eq, v(ma, mi, pa, &p.pre))],
        ("~" | "~>", None, ..) => vec![],
        ("~" | "~>", Some(ma), None, _) => vec![
            c(Op::Ge, v(ma, 0, 0, &none)),
            c(Op::Lt, floor(ma + 1, 0, 0)),
        ],
        ("~" | "~>", Some(ma), Some(mi), pa) => vec![
            c(Op::Ge, v(ma, mi, pa.unwrap_or(0), &p.pre)),
            c(Op::Lt, floor(ma, mi + 1, 0)),
        ],
        ("^", None, ..) => vec![],
        ("^", Some(ma), mi, pa) if ma > 0 => vec![
            c(Op::Ge, v(ma, mi.unwrap_or(0), pa.unwrap_or(0), &p.pre)),
            c(Op::Lt, floor(ma + 1, 0, 0)),
        ],
        ("^", Some(_), None, _) => vec![c(Op::Ge, v(0, 0, 0, &none)), c(Op::Lt, floor(1, 0, 0))],
        ("^", Some(_), Some(mi), pa) if mi > 0 => vec![
            c(Op::Ge, v(0, mi, pa.unwrap_or(0), &p.pre)),
            c(Op::Lt, floor(0, mi + 1, 0)),
        ],
        ("^", Some(_), Some(_), None) => {
            vec![c(Op::Ge, v(0, 0, 0, &none)), c(Op::Lt, floor(0, 1, 0))]
        }
        ("^", Some(_), Some(_), Some(pa)) => {
            vec![
                c(Op::Ge, v(0, 0, pa, &p.pre)),
                c(Op::Lt, floor(0, 0, pa + 1)),
            ]
        }
        (">", None, ..) => vec![c(Op::Lt, floor(0, 0, 0))],
        (">", Some(ma), None, _) => vec![c(Op::Ge, v(ma + 1, 0, 0, &none))],
        (">", Some(ma), Some(mi), None) => vec![c(Op::Ge, v(ma, mi + 1, 0, &none))],
        (">", Some(ma), Some(mi), Some(pa)) => vec![c(Op::Gt, v(ma, mi, pa, &p.pre))],
        (">=", None, ..) => vec![],
        (">=", Some(ma), mi, pa) => {
            vec![c(Op::Ge, v(ma, mi.unwrap_or(0), pa.unwrap_or(0), &p.pre))]
        }
        ("<", None, ..) => vec![c(Op::Lt, floor(0, 0, 0))],
        ("<", Some(ma), None, _) => vec![c(Op::Lt, floor(ma, 0, 0))],
        ("<", Some(ma), Some(mi), None) => vec![c(Op::Lt, floor(ma, mi, 0))],
        ("<", Some(ma), Some(mi), Some(pa)) => vec![c(Op::Lt, v(ma, mi, pa, &p.pre))],
        ("<=", None, ..) => vec![],
        ("<=", Some(ma), None, _) => vec![c(Op::Lt, floor(ma + 1, 0, 0))],
        ("<=", Some(ma), Some(mi), None) => vec![c(Op::Lt, floor(ma, mi + 1, 0))],
        ("<=", Some(ma), Some(mi), Some(pa)) => vec![c(Op::Le, v(ma, mi, pa, &p.pre))],
        _ => return Err(format!("\"{token}\" is not a comparator")),
    })
}

/// `A - B`: from A (missing parts 0) to B (a partial B includes all of it).
fn hyphen(lo: &str, hi: &str) -> Result<Vec<Comparator>, String> {
    let mut out = desugar(&format!(">={lo}"))?;
    let h = parse_partial(hi)?;
    out.extend(match (h.major, h.minor, h.patch) {
        (None, ..) => vec![],
        _ if h.patch.is_some() => desugar(&format!("<={hi}"))?,
        _ => desugar(&format!("<={hi}"))?,
    });
    Ok(out)
}

impl Range {
    pub fn parse(input: &str) -> Result<Range, String> {
        let text = input.replace(',', " ");
        let mut sets = Vec::new();
        for alt in text.split("||") {
            let alt = alt.trim();
            let tokens: Vec<&str> = alt.split_whitespace().collect();
            let mut set = Vec::new();
            if let [lo, "-", hi] = tokens.as_slice() {
                set.extend(hyphen(lo, hi)?);
            } else {
                // An operator may stand apart from its version: `>= 1.0`, `~ 1.0`.
                let mut i = 0;
                while i < tokens.len() {
                    let t = tokens[i];
                    let is_op = ["~>", ">=", "<=", ">", "<", "=", "~", "^"].contains(&t);
                    if is_op && i + 1 < tokens.len() {
                        set.extend(desugar(&format!("{t}{}", tokens[i + 1]))?);
                        i += 2;
                    } else {
                        set.extend(desugar(t)?);
                        i += 1;
                    }
                }
            }
            sets.push(set);
        }
        Ok(Range { sets })
    }

    /// Whether `v` is in the range; pre-releases only as npm allows them, or all of them
    /// with `include_pre`.
    pub fn matches(&self, v: &Version, include_pre: bool) -> bool {
        self.sets.iter().any(|set| {
            set.iter().all(|c| c.test(v, include_pre))
                && (v.pre.is_empty()
                    || include_pre
                    || set.iter().any(|c| {
                        !c.v.pre.is_empty()
                            && c.v.pre.as_str() != "0"
                            && (c.v.major, c.v.minor, c.v.patch) == (v.major, v.minor, v.patch)
                    }))
        })
    }
}

/// A tag read as a version: a leading `v`, partial versions (`1.2` = `1.2.0`), build
/// metadata ignored; anything else is not a version.
pub fn parse_version(tag: &str) -> Option<Version> {
    let p = parse_partial(tag).ok()?;
    if tag.is_empty() || tag.contains(['x', 'X', '*']) && !tag.contains('-') {
        return None;
    }
    let major = p.major?;
    // a partial with a pre-release (`1.2-rc1`) is not a version
    if !p.pre.is_empty() && p.patch.is_none() {
        return None;
    }
    Some(v(major, p.minor.unwrap_or(0), p.patch.unwrap_or(0), &p.pre))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// node-semver's range-include/range-exclude tables (tests/fixtures/semver).
    #[test]
    fn agrees_with_node_semver() {
        let table = include_str!("../../tests/fixtures/semver/node-semver-ranges.tsv");
        let mut failures = Vec::new();
        let mut n = 0;
        for line in table.lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = line.split('\t').collect();
            let (range, version, include, expected) = (f[0], f[1], f[2] == "1", f[3] == "1");
            let got = match (Range::parse(range), parse_version(version)) {
                (Ok(r), Some(v)) => r.matches(&v, include),
                _ => false,
            };
            if got != expected {
                failures.push(format!(
                    "{range:?} {version:?} include_pre={include}: got {got}"
                ));
            }
            n += 1;
        }
        assert!(
            failures.is_empty(),
            "{} of {n} differ:\n{}",
            failures.len(),
            failures.join("\n")
        );
        assert_eq!(n, 176);
    }

    #[test]
    fn tag_versions() {
        assert_eq!(parse_version("v1.2"), Some(Version::new(1, 2, 0)));
        assert_eq!(parse_version("3"), Some(Version::new(3, 0, 0)));
        assert!(parse_version("latest").is_none());
        assert!(parse_version("3.12-slim").is_none());
        assert!(parse_version("1.2.3-rc.1").is_some_and(|v| !v.pre.is_empty()));
        assert!(Range::parse(">=1 <2 || ^3.1").is_ok());
        assert!(Range::parse(">=banana").is_err());
    }
}
