//! The guides' examples are code: every fenced block marked `bash example` or `python
//! example` in docs/game-developers.md runs here against a live server and must succeed.

use std::process::Command;

use super::cluster::Cluster;

/// (language, code) of every block whose info string is `<language> example`.
fn examples(markdown: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start().strip_prefix("```")) {
            (None, Some(info)) => {
                // Blocks that are not marked as examples are read to their end and skipped.
                let lang = info.trim().strip_suffix(" example").unwrap_or("skip");
                current = Some((lang.to_string(), String::new()));
            }
            (Some(_), Some(_)) => {
                let (lang, code) = current.take().unwrap();
                if lang != "skip" {
                    out.push((lang, code));
                }
            }
            (Some((_, code)), None) => {
                code.push_str(line);
                code.push('\n');
            }
            (None, None) => {}
        }
    }
    out
}

#[test]
fn every_example_in_the_game_developer_guide_runs() {
    let Some(python) = super::helpers::python_with_openai() else { return };
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/game-developers.md")).unwrap();
    let blocks = examples(&guide);
    assert!(blocks.iter().filter(|(l, _)| l == "bash").count() >= 3, "{blocks:?}");
    assert!(blocks.iter().filter(|(l, _)| l == "python").count() >= 2, "{blocks:?}");
    let mut cluster = Cluster::start("");
    cluster.add_node(&["--fake-engine", "6:1"]);
    cluster.wait_nodes("fake", 1);
    for (i, (lang, code)) in blocks.iter().enumerate() {
        let mut cmd = match lang.as_str() {
            "bash" => {
                let mut c = Command::new("bash");
                c.args(["-euo", "pipefail", "-c", code]);
                c
            }
            "python" => {
                let mut c = Command::new(&python);
                c.args(["-c", code]);
                c
            }
            other => panic!("example {i} in an unknown language `{other}`"),
        };
        let out = cmd
            .env("LUDUS_URL", format!("http://{}", cluster.addr))
            .env("LUDUS_KEY", &cluster.key)
            .env("LUDUS_MODEL", "fake")
            .output()
            .unwrap();
        super::helpers::assert_success(&out, &format!("example {i} ({lang}):\n{code}"));
        assert!(!out.stdout.is_empty() || !out.stderr.is_empty(), "example {i} printed nothing");
    }
}
