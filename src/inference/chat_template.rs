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

/// A persona shorter than this is not cut out: it saves less prefill than the pass it adds
/// to a cold prompt costs.
pub const MIN_PERSONA_CUT: usize = 32;

/// Where `prompt`, the rendered and tokenized `messages`, ends its leading system messages
/// (a game's persona), the one boundary that thousands of requests share. The prefill is
/// cut there ([`super::engine::GenerateRequest::breaks`]) so that the prefix cache keeps the
/// persona whole; empty when there is no such boundary worth a cut.
///
/// The cut is where `prompt` parts from the tokens of the system messages rendered alone,
/// without a generation prompt: that depends on the persona alone, so two requests sharing
/// it are cut at the same place, whatever the template. It is kept only when that render
/// is (all but its last two tokens, which may merge with what follows) a prefix of
/// `prompt`, and at least [`MIN_PERSONA_CUT`] tokens long: a template that renders a
/// lone system message as nothing but its start (Gemma's and Mistral's fold the persona
/// into the first user turn) would otherwise cut after the BOS token, adding a pass to
/// every cold prompt for nothing and parting the node's chunk names from the distributor's
/// block names. The start of later messages is not cut: it moves with every turn of a
/// conversation, and a cut there would stop the next turn reusing this one's whole blocks.
pub fn persona_breaks(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
    prompt: &[u32],
) -> Vec<usize> {
    let system = messages.iter().take_while(|m| m.role == "system").count();
    if system == 0 || system == messages.len() {
        return Vec::new();
    }
    let Ok(text) = template.render(&messages[..system], false) else { return Vec::new() };
    let Ok(ids) = tokenizer.encode(&text, false) else { return Vec::new() };
    let at = ids.iter().zip(prompt).take_while(|(a, b)| a == b).count();
    if ids.len() - at <= 2 && at >= MIN_PERSONA_CUT && at < prompt.len() {
        vec![at]
    } else {
        Vec::new()
    }
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
