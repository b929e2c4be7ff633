//! `ludus distill` end to end on CPU: a small student learns a tiny teacher's
//! distributions (its held-out KL to the teacher drops well below the untrained
//! student's), the result loads in the engine, a second run resumes from the checkpoint,
//! and bad input gets a clear error.

use ludus::inference::tiny_model::TinySpec;
use ludus::inference::Model;

use super::helpers::{assert_success, fixtures, tiny};

fn prompts(dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(fixtures().join("../eval/village.txt")).unwrap();
    let lines: Vec<&str> = text.split_inclusive(['.', '?', '!']).map(str::trim).filter(|s| s.len() > 20).collect();
    assert!(lines.len() > 20);
    let path = dir.join("prompts.txt");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn student_config(dir: &std::path::Path, vocab: usize) -> std::path::PathBuf {
    let path = dir.join("student.json");
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": vocab, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true
    });
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

fn distill(
    teacher: &std::path::Path,
    config: &std::path::Path,
    prompts: &std::path::Path,
    out: &std::path::Path,
    steps: usize,
) -> std::process::Output {
    crate::cluster::ludus()
        .args(["distill", "--device", "cpu", "--checkpoint-every", "40", "--steps", &steps.to_string()])
        .arg("--teacher")
        .arg(teacher)
        .arg("--student-config")
        .arg(config)
        .arg("--prompts")
        .arg(prompts)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn a_student_learns_the_teacher_resumes_and_loads_in_the_engine() {
    let teacher = tiny(&TinySpec::default());
    let vocab = Model::load(&teacher.gguf, tch::Device::Cpu, None).unwrap().llama.config.vocab_size;
    let dir = tempfile::tempdir().unwrap();
    let (prompts, config, out) = (prompts(dir.path()), student_config(dir.path(), vocab), dir.path().join("run"));

    let first = distill(&teacher.gguf, &config, &prompts, &out, 120);
    assert_success(&first, "distill");
    let report: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    let before = report["before"]["kl_to_teacher"].as_f64().unwrap();
    let after = report["after"]["kl_to_teacher"].as_f64().unwrap();
    eprintln!("held-out KL {before:.3} -> {after:.3}");
    assert!(after < before * 0.7, "held-out KL to the teacher went from {before} to {after}");
    assert_eq!(report["resumed_from_step"], 0);
    assert_eq!(report["steps"], 120);

    // The student is a model like any other.
    let generated = crate::cluster::ludus()
        .args(["generate", "--quantize", "none", "--prompt", "The mill", "--max-tokens", "6", "--model"])
        .arg(out.join("student.gguf"))
        .output()
        .unwrap();
    assert_success(&generated, "generate with the student");

    // Started again with more steps, the run continues from its checkpoint.
    let second = distill(&teacher.gguf, &config, &prompts, &out, 160);
    assert_success(&second, "resumed distill");
    let report: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(report["resumed_from_step"], 120);
    assert_eq!(report["steps"], 160);
    assert_eq!(report["before"]["kl_to_teacher"].as_f64().unwrap(), before, "the untrained baseline is kept");
}

#[test]
fn a_student_with_another_vocabulary_is_refused_clearly() {
    let teacher = tiny(&TinySpec::default());
    let dir = tempfile::tempdir().unwrap();
    let (prompts, config, out) = (prompts(dir.path()), student_config(dir.path(), 1000), dir.path().join("run"));
    let run = distill(&teacher.gguf, &config, &prompts, &out, 10);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("vocab_size (1000) must equal the teacher's"), "{err}");
}

/// Across families: a Llama-architecture student learns Gemma 3 270M (its 262k-token
/// SentencePiece vocabulary and chat template come along); a student config of another
/// family is refused with the reason.
#[test]
fn a_llama_student_learns_a_gemma_teacher_and_other_student_families_are_refused() {
    let teacher = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/gemma-3-270m-q4_k_m.gguf");
    if !super::helpers::required_tool("Gemma 3 270M (scripts/setup --test)", teacher.is_file()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (prompts, config, out) = (prompts(dir.path()), student_config(dir.path(), 262_144), dir.path().join("run"));
    let run = distill(&teacher, &config, &prompts, &out, 40);
    assert_success(&run, "distill from Gemma 3");
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let before = report["before"]["kl_to_teacher"].as_f64().unwrap();
    let after = report["after"]["kl_to_teacher"].as_f64().unwrap();
    eprintln!("Gemma 3 270M -> Llama student, held-out KL {before:.3} -> {after:.3}");
    assert!(after < before * 0.9, "held-out KL to the teacher went from {before} to {after}");
    let student = Model::load(&out.join("student.gguf"), tch::Device::Cpu, None).unwrap();
    assert_eq!(student.llama.config.family, ludus::inference::config::Family::Llama);
    let gemma_text = ludus::inference::model_text::ModelText::load(&teacher).unwrap();
    let text = "The blacksmith's forge";
    assert_eq!(student.tokenizer.encode(text, true).unwrap(), gemma_text.tokenizer.encode(text, true).unwrap());

    let qwen = dir.path().join("qwen-student.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["model_type"] = "qwen2".into();
    std::fs::write(&qwen, json.to_string()).unwrap();
    let refused = distill(&teacher, &qwen, &prompts, &dir.path().join("run2"), 5);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("the student is a qwen2 model") && err.contains("model_type `llama`"), "{err}");
}
