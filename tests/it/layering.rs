//! The dependency table of `docs/architecture.md`, enforced: every top-level module of
//! `src/` has a row, and imports only the modules its row names. The table is read from
//! the document itself, so the two cannot drift apart.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `module → modules it may use`, from the table under `## Dependencies`.
fn allowed_table(doc: &str) -> BTreeMap<String, BTreeSet<String>> {
    let section = doc.split("## Dependencies").nth(1).expect("docs/architecture.md has a `## Dependencies` section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut table = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let [module, uses] = cells[..] else { panic!("a table row with two cells: {line}") };
        let names = |cell: &str| -> BTreeSet<String> {
            cell.split(',')
                .map(|c| c.trim().trim_matches('`').to_string())
                .filter(|c| !c.is_empty() && c != "—")
                .collect()
        };
        table.insert(module.trim_matches('`').to_string(), names(uses));
    }
    table
}

/// The crate's top-level modules a source file refers to (`crate::name`), comments aside.
fn imports(source: &str, top_level: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in source.lines().filter(|l| !l.trim_start().starts_with("//")) {
        for (at, _) in line.match_indices("crate::") {
            if line[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
                continue; // `ludus_crate::`, not ours
            }
            let rest = &line[at + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if top_level.contains(&name) {
                found.insert(name);
            }
        }
    }
    found
}

fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            files.extend(rust_files(&p));
        } else if p.extension().is_some_and(|e| e == "rs") {
            files.push(p);
        }
    }
    files
}

/// Top-level modules of `src/` (a directory with `mod.rs`, or a file), except the roots.
fn top_level_modules() -> BTreeMap<String, PathBuf> {
    let src = root().join("src");
    let mut modules = BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap().flatten() {
        let p = entry.path();
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        if p.is_dir() || (p.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main") {
            modules.insert(name, p);
        }
    }
    modules
}

/// Every import a module makes that its row does not allow, as `module → name (file)`.
fn violations(
    table: &BTreeMap<String, BTreeSet<String>>,
    sources: &[(String, String, String)],
    top_level: &BTreeSet<String>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (module, file, source) in sources {
        let Some(allowed) = table.get(module) else {
            out.push(format!("`{module}` has no row in docs/architecture.md's dependency table"));
            continue;
        };
        for name in imports(source, top_level) {
            if name != *module && !allowed.contains(&name) {
                out.push(format!("{module} → {name} ({file})"));
            }
        }
    }
    out
}

#[test]
fn every_module_imports_only_what_the_architecture_table_allows() {
    let doc = std::fs::read_to_string(root().join("docs/architecture.md")).unwrap();
    let table = allowed_table(&doc);
    let modules = top_level_modules();
    assert!(modules.len() >= 12 && table.len() >= 12, "found {} modules and {} table rows", modules.len(), table.len());
    let top_level: BTreeSet<String> = modules.keys().cloned().collect();
    let mut sources = Vec::new();
    for (module, path) in &modules {
        for file in rust_files(path) {
            let source = std::fs::read_to_string(&file).unwrap();
            sources.push((module.clone(), file.strip_prefix(root()).unwrap().display().to_string(), source));
        }
    }
    let broken = violations(&table, &sources, &top_level);
    assert!(broken.is_empty(), "imports the table forbids:\n{}", broken.join("\n"));
    for row in table.keys() {
        assert!(modules.contains_key(row), "the table names `{row}`, which src/ does not have");
    }
}

#[test]
fn the_layering_check_catches_a_forbidden_import_and_ignores_comments() {
    let table = allowed_table(
        "## Dependencies\n\n| module | may use |\n|---|---|\n| `crypto` | — |\n| `actors` | `crypto` |\n",
    );
    let top_level: BTreeSet<String> = ["crypto", "actors", "http"].map(String::from).into();
    let sources = vec![
        ("crypto".to_string(), "src/crypto/a.rs".to_string(), "use crate::actors::Gateway;\n".to_string()),
        ("crypto".to_string(), "src/crypto/b.rs".to_string(), "//! see `crate::actors`\nuse super::x;\n".to_string()),
        ("actors".to_string(), "src/actors/c.rs".to_string(), "let x = crate::crypto::keccak(b);\n".to_string()),
        ("http".to_string(), "src/http/d.rs".to_string(), "use crate::crypto::x;\n".to_string()),
    ];
    assert_eq!(
        violations(&table, &sources, &top_level),
        vec![
            "crypto → actors (src/crypto/a.rs)".to_string(),
            "`http` has no row in docs/architecture.md's dependency table".to_string()
        ]
    );
}
