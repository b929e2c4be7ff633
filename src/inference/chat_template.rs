//! Chat templates: the model's own Jinja template (GGUF `tokenizer.chat_template` or
//! `tokenizer_config.json`), rendered with minijinja the way Hugging Face renders it
//! (trim_blocks, lstrip_blocks, Python string methods); ChatML when the model has none.

use minijinja::{Environment, ErrorKind};

use super::error::{InferError, Result};
use super::tokenizer::Tokenizer;

/// The fallback template: ChatML.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

pub use crate::task::ChatMessage;

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source` (or ChatML when `None`).
    pub fn new(source: Option<&str>, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.unwrap_or(CHATML).to_string())
            .map_err(|e| InferError::Template(format!("the model's chat template does not compile: {e}")))?;
        Ok(Self { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// Renders a conversation; with `add_generation_prompt` the text ends where the
    /// assistant's answer begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        if messages.is_empty() {
            return Err(InferError::InvalidRequest("messages must not be empty".into()));
        }
        let template = self.env.get_template("chat").map_err(|e| InferError::Template(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| InferError::Template(format!("rendering failed: {e}")))
    }
}

/// Where `prompt`, the rendered and tokenized `messages`, has its message boundaries that
/// other requests are likely to share: the end of the leading system messages (a game's
/// persona) and the start of the last message (what a player just said). The prefill is
/// cut there ([`super::engine::GenerateRequest::breaks`]) so that the prefix cache keeps
/// the shared part whole.
///
/// Each is where `prompt` parts from the tokens of the conversation up to that point,
/// rendered without a generation prompt. That depends on the conversation alone, so two
/// requests sharing a persona are cut at the same place, whatever the template; a
/// template that renders a prefix otherwise (or fails to) only gives an earlier cut, or
/// none. Ascending, inside the prompt.
pub fn message_breaks(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
    prompt: &[u32],
) -> Vec<usize> {
    let system = messages.iter().take_while(|m| m.role == "system").count();
    let mut breaks: Vec<usize> = [system, messages.len().saturating_sub(1)]
        .into_iter()
        .filter(|&k| k > 0 && k < messages.len())
        .filter_map(|k| {
            let text = template.render(&messages[..k], false).ok()?;
            let ids = tokenizer.encode(&text, false).ok()?;
            Some(ids.iter().zip(prompt).take_while(|(a, b)| a == b).count())
        })
        .filter(|&at| at > 0 && at < prompt.len())
        .collect();
    breaks.sort_unstable();
    breaks.dedup();
    breaks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_fallback_renders_the_generation_prompt() {
        let t = ChatTemplate::new(None, "", "").unwrap();
        let text = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(text, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ bos_token }}{{ messages[0]['content'].strip() }}";
        let t = ChatTemplate::new(Some(src), "<s>", "</s>").unwrap();
        assert_eq!(t.render(&[ChatMessage::new("user", "  x  ")], false).unwrap(), "<s>x");
        let err = t.render(&[ChatMessage::new("system", "x")], false).unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
        assert!(t.render(&[], false).is_err());
    }
}
