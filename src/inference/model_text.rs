//! A model's text side without its weights: its served name, tokenizer and chat template,
//! read from the same paths [`super::Model`] loads (a GGUF file's metadata, a Hugging Face
//! directory, a protected bundle's tokenizer — no key needed). The server holds one per
//! model it sells, to count prompt tokens itself and to make the text games read from the
//! token ids nodes return.

use std::path::Path;
use std::sync::Arc;

use super::chat_template::{ChatMessage, ChatTemplate};
use super::config::LlamaConfig;
use super::error::{InferError, Result};
use super::gguf::GgufFile;
use super::model::model_name;
use super::tokenizer::Tokenizer;

#[derive(Clone)]
pub struct ModelText {
    pub name: String,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Arc<ChatTemplate>,
    /// Tokens one sequence holds in all, prompt and answer (`max_position_embeddings`), when
    /// the model's configuration can be read: past it the model has no positions, and no
    /// proof of an answer there can be checked.
    pub context: Option<usize>,
}

impl std::fmt::Debug for ModelText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelText").field("name", &self.name).finish_non_exhaustive()
    }
}

impl ModelText {
    /// Reads the tokenizer and chat template of a `.gguf` file, a Hugging Face directory or a
    /// protected bundle (weights are not read).
    pub fn load(path: &Path) -> Result<Self> {
        let (name, tokenizer, template, config) = if crate::inference::protect::is_bundle(path) {
            let manifest = crate::inference::protect::read_manifest(path)?;
            let (tokenizer, template) = if path.join("tokenizer.gguf").exists() {
                let g = GgufFile::open(path.join("tokenizer.gguf"))?;
                (Tokenizer::from_gguf(&g)?, g.get_str("tokenizer.chat_template").map(str::to_string))
            } else {
                (Tokenizer::from_hf_dir(path)?, hf_chat_template(path))
            };
            (manifest.name, tokenizer, template, Ok(manifest.config))
        } else if path.is_dir() {
            let config = LlamaConfig::from_hf_json(&path.join("config.json"));
            (model_name(path), Tokenizer::from_hf_dir(path)?, hf_chat_template(path), config)
        } else if path.exists() {
            let g = GgufFile::open(path)?;
            let template = g.get_str("tokenizer.chat_template").map(str::to_string);
            (model_name(path), Tokenizer::from_gguf(&g)?, template, LlamaConfig::from_gguf(&g))
        } else {
            let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory");
            return Err(InferError::io(path, missing));
        };
        let text = |id: Option<u32>| {
            id.map(|i| String::from_utf8_lossy(tokenizer.token_bytes(i)).into_owned()).unwrap_or_default()
        };
        let template = ChatTemplate::new(template.as_deref(), &text(tokenizer.bos), &text(tokenizer.eos))?;
        let context = match config {
            Ok(c) if c.max_position_embeddings > 0 => Some(c.max_position_embeddings),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the model's configuration: its context is not known here");
                None
            }
        };
        Ok(Self { name, tokenizer: Arc::new(tokenizer), template: Arc::new(template), context })
    }

    /// Renders and tokenizes a conversation, ready for generation.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.template.render(messages, true)?;
        self.tokenizer.encode(&text, false)
    }

    /// Tokenizes a plain completion prompt (with BOS when the model wants one).
    pub fn completion_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(prompt, true)
    }
}

fn hf_chat_template(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    match &json["chat_template"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) => {
            items.iter().find(|t| t["name"] == "default").and_then(|t| t["template"].as_str()).map(str::to_string)
        }
        _ => None,
    }
    .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok())
}
