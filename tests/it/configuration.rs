//! The configuration reference (docs/configuration.md) and the defaults
//! (config/default.toml) list the same settings with the same defaults.

use std::collections::BTreeSet;

const DEFAULTS: &str = include_str!("../../config/default.toml");
const REFERENCE: &str = include_str!("../../docs/configuration.md");

fn looks_like_value(v: &str) -> bool {
    v.starts_with('"')
        || v.starts_with('[')
        || v.starts_with('{')
        || v == "true"
        || v == "false"
        || v.chars().next().is_some_and(|c| c.is_ascii_digit())
}

fn is_key(k: &str) -> bool {
    // Lower case, digits after the first letter (`int4_prefill`, which both this test and
    // the generator once skipped, so its row was missing and its comment went to the next).
    k.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && k.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// (section, key, default or "unset") from the TOML, commented-out example keys as unset.
fn from_defaults() -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    let mut section = String::new();
    for line in DEFAULTS.lines().map(str::trim) {
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let (commented, body) = match line.strip_prefix('#') {
            Some(rest) => (true, rest.trim()),
            None => (false, line),
        };
        let Some((k, v)) = body.split_once(" = ") else { continue };
        let (k, v) = (k.trim(), v.trim());
        if section.is_empty() || !is_key(k) || (commented && !looks_like_value(v)) {
            continue;
        }
        out.insert((section.clone(), k.to_string(), if commented { "unset".into() } else { v.to_string() }));
    }
    out
}

/// The same triples from the reference's tables.
fn from_reference() -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    let mut section = String::new();
    for line in REFERENCE.lines() {
        if let Some(s) = line.strip_prefix("## `[").and_then(|l| l.strip_suffix("]`")) {
            section = s.to_string();
            continue;
        }
        let cells: Vec<&str> = line.split(" | ").collect();
        if section.is_empty() || cells.len() < 3 || !cells[0].starts_with("| `") {
            continue;
        }
        let key = cells[0].trim_start_matches("| `").trim_end_matches('`');
        let default = if cells[1].starts_with("unset") {
            "unset".to_string()
        } else {
            cells[1].trim_start_matches('`').trim_end_matches('`').to_string()
        };
        out.insert((section.clone(), key.to_string(), default));
    }
    out
}

#[test]
fn the_reference_lists_every_setting() {
    let (defaults, reference) = (from_defaults(), from_reference());
    assert!(defaults.len() > 50, "{defaults:?}");
    let missing: Vec<_> = defaults.difference(&reference).collect();
    let stale: Vec<_> = reference.difference(&defaults).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/configuration.md is out of step with config/default.toml (run scripts/config-reference):\n\
         missing from the reference: {missing:#?}\nnot in the defaults: {stale:#?}"
    );
    // And the defaults are what the program loads.
    ludus::settings::Settings::load(None).expect("the defaults load");
}
