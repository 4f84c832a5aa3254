//! The table of every metric name, parsed from the very file the crate's
//! docs include (`docs/metrics.md`, the module `observability`), so that the
//! docs and the tests cannot drift apart.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use metrics::{SharedString, Unit};
use metrics_util::debugging::{DebugValue, Snapshotter};
use metrics_util::CompositeKey;

/// The doc source itself.
pub const TABLE: &str = include_str!("../../docs/metrics.md");

/// A metric's type, as the table's second column says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One row: the type and the label names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub kind: Kind,
    pub labels: BTreeSet<String>,
}

/// Every row of the table, by metric name. Panics on a malformed row, so
/// that a typo in the docs fails the tests.
pub fn rows() -> BTreeMap<String, Row> {
    let mut rows = BTreeMap::new();
    for line in TABLE.lines() {
        let Some(rest) = line.strip_prefix("| `llm_resilience_") else {
            continue;
        };
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "", name, type, labels, meaning, ""
        assert_eq!(cells.len(), 6, "a row has four cells: {line}");
        let name = cells[1].trim_matches('`').to_owned();
        assert!(
            rest.starts_with(&name["llm_resilience_".len()..])
                && name.len() > "llm_resilience_".len()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "bad metric name {name:?} in: {line}"
        );
        let kind = match cells[2] {
            "counter" => Kind::Counter,
            "gauge" => Kind::Gauge,
            "histogram" => Kind::Histogram,
            other => panic!("unknown metric type {other:?} in: {line}"),
        };
        let labels = cells[3]
            .split(',')
            .map(|l| l.trim().trim_matches('`').to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        let prev = rows.insert(name.clone(), Row { kind, labels });
        assert!(prev.is_none(), "{name} is in the table twice");
    }
    assert!(rows.len() > 10, "the table parsed to {} rows", rows.len());
    rows
}

/// What a recorder saw: per metric name, the type and label names of every
/// series, and whether any series carries a value (a counter above zero, a
/// histogram with a sample, a gauge that was set).
#[derive(Debug, Default)]
pub struct Seen {
    pub series: BTreeMap<String, Vec<(Kind, BTreeSet<String>, String)>>,
    pub nonzero: BTreeSet<String>,
}

pub fn read(snapshotter: &Snapshotter) -> Seen {
    read_snapshot(&snapshotter.snapshot().into_vec())
}

/// [`read`] of a snapshot already taken (a snapshot drains the counters).
pub fn read_snapshot(
    snapshot: &[(CompositeKey, Option<Unit>, Option<SharedString>, DebugValue)],
) -> Seen {
    let mut seen = Seen::default();
    for (key, _, _, value) in snapshot {
        let key = key.key();
        let name = key.name().to_owned();
        let labels = key.labels().map(|l| l.key().to_owned()).collect();
        let values: Vec<_> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let (kind, nonzero) = match value {
            DebugValue::Counter(n) => (Kind::Counter, *n > 0),
            DebugValue::Gauge(_) => (Kind::Gauge, true),
            DebugValue::Histogram(v) => (Kind::Histogram, !v.is_empty()),
        };
        if nonzero {
            seen.nonzero.insert(name.clone());
        }
        seen.series
            .entry(name)
            .or_default()
            .push((kind, labels, values.join(",")));
    }
    seen
}

/// Every series `seen` has a name in the table, with the table's type and
/// labels; and every row whose name starts with one of `prefixes` was
/// emitted with a value.
pub fn check(seen: &Seen, prefixes: &[&str]) {
    let rows = rows();
    for (name, series) in &seen.series {
        let row = rows
            .get(name)
            .unwrap_or_else(|| panic!("{name} is emitted but not in docs/metrics.md"));
        for (kind, labels, values) in series {
            assert_eq!(
                *kind, row.kind,
                "{name}{{{values}}}: the table says {row:?}"
            );
            assert_eq!(
                labels, &row.labels,
                "{name}{{{values}}}: the table says {row:?}"
            );
        }
    }
    for name in rows.keys() {
        if prefixes.iter().any(|p| name.starts_with(p)) {
            assert!(
                seen.nonzero.contains(name),
                "{name} is in the table but was not emitted; seen: {:?}",
                seen.series.keys().collect::<Vec<_>>()
            );
        }
    }
}
