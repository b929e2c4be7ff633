//! OpenAI wire format: parsing and validating `/v1/chat/completions` and `/v1/completions`
//! bodies into a [`ValidRequest`] (every error names its field), and building responses
//! and stream chunks. Unknown fields are ignored, as OpenAI does.

use serde_json::{json, Map, Value};

use super::answer_json::WholeAnswer;
use super::errors::ApiError;
use crate::actors::catalog::TokenLogprob;
use crate::inference::logprobs::MAX_TOP_LOGPROBS;
use crate::inference::sampling::MAX_LOGIT_BIAS;
use crate::inference::{ChatMessage, SamplingParams};
use crate::protocol::{FinishReason, TaskInput, TaskUsage};

/// Which endpoint a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// A request that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub endpoint: Endpoint,
    pub model: String,
    pub input: TaskInput,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Choices to generate (`n`, 1 to [`MAX_CHOICES`]).
    pub n: usize,
    /// `response_format`, `tools`, `tool_choice` (the grammar is also in `params`).
    pub structured: super::structured::Structured,
}

/// Limits applied while validating.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub default_max_tokens: usize,
    pub max_tokens_limit: usize,
}

/// Most choices (`n`) one request may ask for.
pub const MAX_CHOICES: usize = 8;

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

fn number(obj: &Map<String, Value>, field: &str) -> Result<Option<f64>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(ApiError::invalid(field, format!("`{field}` must be a number, not {}", type_name(other)))),
    }
}

fn ranged(obj: &Map<String, Value>, field: &str, lo: f64, hi: f64) -> Result<Option<f32>, ApiError> {
    match number(obj, field)? {
        Some(v) if !(lo..=hi).contains(&v) => {
            Err(ApiError::invalid(field, format!("`{field}` must be between {lo} and {hi}, got {v}")))
        }
        other => Ok(other.map(|v| v as f32)),
    }
}

fn positive_int(obj: &Map<String, Value>, field: &str) -> Result<Option<u64>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if v > 0 => Ok(Some(v)),
            _ => Err(ApiError::invalid(field, format!("`{field}` must be a positive integer, got {n}"))),
        },
        Some(other) => Err(ApiError::invalid(field, format!("`{field}` must be an integer, not {}", type_name(other)))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn content_text(value: &Value, param: &str) -> Result<String, ApiError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                (Some("text"), Some(t)) => Ok(t.to_string()),
                _ => Err(ApiError::invalid(
                    param,
                    format!("`{param}` parts must be {{\"type\": \"text\", \"text\": ...}}"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|t| t.join("")),
        Value::Null => Ok(String::new()),
        other => Err(ApiError::invalid(param, format!("`{param}` must be a string, not {}", type_name(other)))),
    }
}

fn messages(obj: &Map<String, Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let list = match obj.get("messages") {
        Some(Value::Array(list)) => list,
        None | Some(Value::Null) => return Err(ApiError::invalid("messages", "`messages` is required")),
        Some(other) => {
            return Err(ApiError::invalid("messages", format!("`messages` must be an array, not {}", type_name(other))))
        }
    };
    if list.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must not be empty"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role_param = format!("messages[{i}].role");
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::invalid(&role_param, format!("`{role_param}` must be a string")))?;
            if !ROLES.contains(&role) {
                return Err(ApiError::invalid(
                    &role_param,
                    format!("`{role_param}` must be one of {ROLES:?}, got `{role}`"),
                ));
            }
            let mut content =
                content_text(m.get("content").unwrap_or(&Value::Null), &format!("messages[{i}].content"))?;
            // A call the assistant made is shown to the model in the tool convention.
            if let (Some(calls), "assistant") = (m.get("tool_calls").filter(|c| !c.is_null()), role) {
                let calls = super::structured::call_text(calls, &format!("messages[{i}].tool_calls"))?;
                content = if content.is_empty() { calls } else { format!("{content}\n{calls}") };
            }
            Ok(ChatMessage::new(if role == "developer" { "system" } else { role }, &content))
        })
        .collect()
}

fn prompt(obj: &Map<String, Value>) -> Result<String, ApiError> {
    match obj.get("prompt") {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::Array(items)) if items.len() == 1 => match &items[0] {
            Value::String(s) if !s.is_empty() => Ok(s.clone()),
            _ => Err(ApiError::invalid("prompt", "`prompt` must be a non-empty string")),
        },
        Some(Value::Array(_)) => Err(ApiError::invalid(
            "prompt",
            "`prompt` must hold exactly one string (one prompt per request; `n` asks for several answers)",
        )),
        None | Some(Value::Null) => Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(Value::String(_)) => Err(ApiError::invalid("prompt", "`prompt` must not be empty")),
        Some(other) => Err(ApiError::invalid("prompt", format!("`prompt` must be a string, not {}", type_name(other)))),
    }
}

/// `logit_bias`: `{"token id": bias}`, at most [`MAX_LOGIT_BIAS`] entries, each bias in
/// [−100, 100]. (Ids past the model's vocabulary are refused where the server holds it.)
fn logit_bias(obj: &Map<String, Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    let map = match obj.get("logit_bias") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("`logit_bias` must be an object, not {}", type_name(other)),
            ))
        }
    };
    if map.len() > MAX_LOGIT_BIAS {
        return Err(ApiError::invalid("logit_bias", format!("`logit_bias` takes at most {MAX_LOGIT_BIAS} tokens")));
    }
    let mut out: Vec<(u32, f32)> = map
        .iter()
        .map(|(token, bias)| {
            let id = token.parse::<u32>().map_err(|_| {
                ApiError::invalid("logit_bias", format!("`logit_bias` keys must be token ids, got `{token}`"))
            })?;
            match bias.as_f64() {
                Some(b) if (-100.0..=100.0).contains(&b) => Ok((id, b as f32)),
                _ => {
                    Err(ApiError::invalid("logit_bias", format!("`logit_bias[{token}]` must be between -100 and 100")))
                }
            }
        })
        .collect::<Result<_, _>>()?;
    out.sort_by_key(|&(id, _)| id);
    if let Some(w) = out.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(ApiError::invalid("logit_bias", format!("`logit_bias` lists token {} twice", w[0].0)));
    }
    Ok(out)
}

fn stop(obj: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let stops = match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| ApiError::invalid("stop", "`stop` must hold strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ApiError::invalid(
                "stop",
                format!("`stop` must be a string or an array, not {}", type_name(other)),
            ))
        }
    };
    if stops.len() > 4 || stops.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(ApiError::invalid("stop", "`stop` takes up to 4 non-empty sequences of at most 256 bytes"));
    }
    Ok(stops)
}

/// Parses and validates a request body.
pub fn parse_request(body: &[u8], endpoint: Endpoint, limits: RequestLimits) -> Result<ValidRequest, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(ApiError::bad_json)?;
    let Value::Object(obj) = value else {
        return Err(ApiError::bad_json("expected a JSON object"));
    };
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(ApiError::invalid("model", "`model` is required"))
        }
        Some(other) => {
            return Err(ApiError::invalid("model", format!("`model` must be a string, not {}", type_name(other))))
        }
    };
    let structured = super::structured::parse(&obj)?;
    if endpoint == Endpoint::Completions && structured.tools_prompt.is_some() {
        return Err(ApiError::invalid("tools", "`tools` needs /v1/chat/completions"));
    }
    let input = match endpoint {
        Endpoint::Chat => {
            let mut messages = messages(&obj)?;
            if let Some(tools) = &structured.tools_prompt {
                // Shown as (or in front of) the system message.
                match messages.first_mut() {
                    Some(first) if first.role == "system" => first.content = format!("{}\n\n{tools}", first.content),
                    _ => messages.insert(0, ChatMessage::new("system", tools)),
                }
            }
            TaskInput::Chat(messages)
        }
        Endpoint::Completions => TaskInput::Text(prompt(&obj)?),
    };
    let max_tokens = positive_int(&obj, "max_completion_tokens")?.or(positive_int(&obj, "max_tokens")?);
    let max_tokens = max_tokens.map_or(limits.default_max_tokens, |v| v as usize);
    if max_tokens > limits.max_tokens_limit {
        let param = if obj.contains_key("max_completion_tokens") { "max_completion_tokens" } else { "max_tokens" };
        return Err(ApiError::invalid(param, format!("`{param}` must be at most {}", limits.max_tokens_limit)));
    }
    let n = positive_int(&obj, "n")?.unwrap_or(1);
    if n > MAX_CHOICES as u64 {
        return Err(ApiError::invalid("n", format!("`n` must be at most {MAX_CHOICES}")));
    }
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => rand::random::<u64>(),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => {
            n.as_u64().unwrap_or_else(|| n.as_i64().unwrap_or(0) as u64)
        }
        Some(_) => return Err(ApiError::invalid("seed", "`seed` must be an integer")),
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(ApiError::invalid("stream", format!("`stream` must be a boolean, not {}", type_name(other))))
        }
    };
    let include_usage =
        obj.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool).unwrap_or(false);
    if let Some(user) = obj.get("user") {
        if !user.is_string() && !user.is_null() {
            return Err(ApiError::invalid("user", "`user` must be a string"));
        }
    }
    let logprobs = match obj.get("logprobs") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) if endpoint == Endpoint::Chat => true,
        // The legacy endpoint's `logprobs` is a count; 0 asks for nothing.
        Some(Value::Number(n)) if endpoint == Endpoint::Completions && n.as_u64() == Some(0) => false,
        Some(Value::Bool(true)) | Some(Value::Number(_)) if endpoint == Endpoint::Completions => {
            return Err(ApiError::invalid("logprobs", "`logprobs` is supported on /v1/chat/completions only"))
        }
        Some(_) => return Err(ApiError::invalid("logprobs", "`logprobs` must be a boolean")),
    };
    let top_logprobs = match obj.get("top_logprobs") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(k) if k as usize <= MAX_TOP_LOGPROBS => k as usize,
            _ => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("`top_logprobs` must be an integer from 0 to {MAX_TOP_LOGPROBS}"),
                ))
            }
        },
        Some(_) => return Err(ApiError::invalid("top_logprobs", "`top_logprobs` must be an integer")),
    };
    if top_logprobs > 0 && !logprobs {
        return Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs: true`"));
    }
    let params = SamplingParams {
        temperature: ranged(&obj, "temperature", 0.0, 2.0)?.unwrap_or(1.0),
        top_p: match ranged(&obj, "top_p", 0.0, 1.0)? {
            Some(p) if p <= 0.0 => return Err(ApiError::invalid("top_p", "`top_p` must be greater than 0")),
            other => other.unwrap_or(1.0),
        },
        presence_penalty: ranged(&obj, "presence_penalty", -2.0, 2.0)?.unwrap_or(0.0),
        frequency_penalty: ranged(&obj, "frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0),
        seed,
        grammar: structured.grammar.as_deref().map(std::sync::Arc::from),
        logit_bias: logit_bias(&obj)?,
        logprobs: logprobs.then_some(top_logprobs),
        ..SamplingParams::default()
    };
    Ok(ValidRequest {
        endpoint,
        model,
        input,
        params,
        max_tokens,
        stop: stop(&obj)?,
        stream,
        include_usage,
        n: n as usize,
        structured,
    })
}

fn finish(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage_json(usage: TaskUsage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens.saturating_add(usage.completion_tokens),
    })
}

/// One choice's whole answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub text: String,
    pub finish: FinishReason,
    /// Its tokens' log probabilities (when asked for).
    pub logprobs: Vec<TokenLogprob>,
}

/// OpenAI's `logprobs` object of a stream chunk ([`super::answer_json::Logprobs`] as a
/// `Value`).
pub fn logprobs_json(entries: &[TokenLogprob]) -> Value {
    serde_json::to_value(super::answer_json::Logprobs(entries)).unwrap_or(Value::Null)
}

/// Identifiers and timestamps shared by a response and its chunks.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
    /// OpenAI's `system_fingerprint`: names the serving stack (this release and the model),
    /// so that a game can tell a seeded answer will repeat.
    pub fingerprint: String,
}

/// The `system_fingerprint` of answers from `model` on this release.
pub fn fingerprint(model: &str) -> String {
    let digest = crate::crypto::identity::keccak(format!("{}:{model}", env!("CARGO_PKG_VERSION")).as_bytes());
    format!("fp_{}", hex::encode(&digest[..5]))
}

impl ResponseMeta {
    /// The id of choice `index`'s tool call.
    pub fn call_id(&self, index: usize) -> String {
        format!("call_{}_{index}", self.id.rsplit('-').next().unwrap_or(&self.id))
    }

    /// A whole (non-streamed) response: one choice per answer, each with its index. With
    /// `tools`, an answer that is a whole call comes back as `tool_calls` (finish reason
    /// `tool_calls`); with `logprobs`, each choice of a chat carries its tokens' log
    /// probabilities, written in place when the answer is ([`WholeAnswer`]).
    pub fn full(
        &self,
        answers: Vec<(usize, Answer)>,
        usage: TaskUsage,
        functions: &[String],
        logprobs: bool,
    ) -> WholeAnswer {
        let mut choice_logprobs = Vec::with_capacity(answers.len());
        let choices: Vec<Value> = answers
            .into_iter()
            .map(|(index, a)| {
                let (text, reason) = (&a.text, a.finish);
                let chat = self.endpoint == Endpoint::Chat;
                // Written in place of the `null`s below.
                choice_logprobs.push((logprobs && chat).then_some(a.logprobs));
                let call =
                    (reason == FinishReason::Stop).then(|| super::structured::tool_call(text, functions)).flatten();
                match (self.endpoint, call) {
                    (Endpoint::Chat, Some(call)) => {
                        json!({"index": index, "logprobs": null, "finish_reason": "tool_calls",
                        "message": {"role": "assistant", "content": null, "tool_calls": [{
                            "id": self.call_id(index), "type": "function",
                            "function": {"name": call.name, "arguments": call.arguments},
                        }]}})
                    }
                    (Endpoint::Chat, None) => json!({"index": index, "logprobs": null, "finish_reason": finish(reason),
                        "message": {"role": "assistant", "content": text}}),
                    (Endpoint::Completions, _) => {
                        json!({"index": index, "text": text, "logprobs": null, "finish_reason": finish(reason)})
                    }
                }
            })
            .collect();
        let object = if self.endpoint == Endpoint::Chat { "chat.completion" } else { "text_completion" };
        let body = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint,
            "choices": choices,
            "usage": usage_json(usage),
        });
        WholeAnswer::new(body, choice_logprobs)
    }

    /// One stream chunk of choice `index`: text (`Some`) and/or the finish reason.
    pub fn chunk(&self, index: usize, text: Option<&str>, first: bool, reason: Option<FinishReason>) -> Value {
        let reason = reason.map(finish);
        match self.endpoint {
            Endpoint::Chat => {
                let mut delta = Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint,
                       "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": reason}]})
            }
            Endpoint::Completions => {
                json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint,
                       "choices": [{"index": index, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": reason}]})
            }
        }
    }

    /// One stream chunk of choice `index`'s tool call: its head (`name`) or a piece of its
    /// arguments.
    pub fn call_chunk(&self, index: usize, delta: &super::structured::Delta, first: bool) -> Value {
        use super::structured::Delta;
        let call = match delta {
            Delta::CallStart { name } => json!({"index": 0, "id": self.call_id(index), "type": "function",
                                                "function": {"name": name, "arguments": ""}}),
            Delta::Arguments(piece) => json!({"index": 0, "function": {"arguments": piece}}),
            Delta::Content(text) => return self.chunk(index, Some(text), first, None),
        };
        let mut delta = Map::new();
        if first {
            delta.insert("role".into(), "assistant".into());
            delta.insert("content".into(), Value::Null);
        }
        delta.insert("tool_calls".into(), json!([call]));
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint,
               "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": null}]})
    }

    /// The last chunk of choice `index`'s streamed tool call.
    pub fn call_finish_chunk(&self, index: usize) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint,
               "choices": [{"index": index, "delta": {}, "logprobs": null, "finish_reason": "tool_calls"}]})
    }

    /// The usage chunk sent before `[DONE]` when `stream_options.include_usage` is set.
    pub fn usage_chunk(&self, usage: TaskUsage) -> Value {
        let object = if self.endpoint == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint, "choices": [], "usage": usage_json(usage)})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RequestLimits = RequestLimits { default_max_tokens: 256, max_tokens_limit: 4096 };

    fn parse(body: &str) -> Result<ValidRequest, ApiError> {
        parse_request(body.as_bytes(), Endpoint::Chat, LIMITS)
    }

    #[test]
    fn a_full_request_parses_and_unknown_fields_are_ignored() {
        let r = parse(r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"}]}],
            "max_completion_tokens":9,"temperature":0.5,"top_p":0.9,"n":1,"stop":"END","seed":5,"presence_penalty":0.1,
            "frequency_penalty":-0.1,"user":"u1","stream":true,"stream_options":{"include_usage":true},"logit_bias":{},"whatever":[1]}"#).unwrap();
        assert_eq!(r.max_tokens, 9);
        assert_eq!(r.stop, vec!["END"]);
        assert_eq!(r.params.seed, 5);
        assert!(r.stream && r.include_usage);
        assert_eq!(
            r.input,
            TaskInput::Chat(vec![ChatMessage::new("system", "be brief"), ChatMessage::new("user", "hi")])
        );
    }

    #[test]
    fn every_error_names_its_field() {
        let cases = [
            (r#"{"messages":[{"role":"user","content":"x"}]}"#, Some("model")),
            (r#"{"model":"m","messages":[]}"#, Some("messages")),
            (r#"{"model":"m","messages":"hi"}"#, Some("messages")),
            (r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#, Some("messages[0].role")),
            (r#"{"model":"m","messages":[{"role":"user","content":5}]}"#, Some("messages[0].content")),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#, Some("temperature")),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}"#, Some("temperature")),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#, Some("max_tokens")),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":100000}"#, Some("max_tokens")),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":9}"#, Some("n")),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":0}"#, Some("n")),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]}"#, Some("stop")),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"seed":1.5}"#, Some("seed")),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#, Some("stream")),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_p":0}"#, Some("top_p")),
            ("not json", None),
            ("[1,2]", None),
        ];
        for (body, param) in cases {
            let err = parse(body).unwrap_err();
            assert_eq!(err.status, 400, "{body}");
            assert_eq!(err.param.as_deref(), param, "{body}: {}", err.message);
        }
        let err = parse_request(br#"{"model":"m","prompt":["a","b"]}"#, Endpoint::Completions, LIMITS).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("prompt"));
    }

    #[test]
    fn logit_bias_is_read_sorted_and_bounded() {
        let body =
            |bias: &str| format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],"logit_bias":{bias}}}"#);
        let r = parse(&body(r#"{"42": -100, "7": 2.5}"#)).unwrap();
        assert_eq!(parse(&body(r#"{"7": 1, "007": 1}"#)).unwrap_err().param.as_deref(), Some("logit_bias"));
        assert_eq!(r.params.logit_bias, vec![(7, 2.5), (42, -100.0)]);
        for bad in [r#"{"x": 1}"#, r#"{"5": 101}"#, r#"{"5": "high"}"#, "[1]"] {
            assert_eq!(parse(&body(bad)).unwrap_err().param.as_deref(), Some("logit_bias"), "{bad}");
        }
        let many: Vec<String> = (0..=MAX_LOGIT_BIAS).map(|i| format!("\"{i}\": 1")).collect();
        assert_eq!(parse(&body(&format!("{{{}}}", many.join(",")))).unwrap_err().param.as_deref(), Some("logit_bias"));
    }

    #[test]
    fn a_token_that_adds_no_text_has_null_bytes() {
        let entry = |token: &str, bytes: &[u8]| TokenLogprob {
            token: token.into(),
            bytes: bytes.to_vec(),
            logprob: -0.5,
            top: vec![(token.into(), bytes.to_vec(), -0.5), ("Hi".into(), b"Hi".to_vec(), -1.5)],
        };
        let v = logprobs_json(&[entry("Hi", b"Hi"), entry("<|im_end|>", b"")]);
        let content = v["content"].as_array().unwrap();
        assert_eq!(content[0]["bytes"], json!([72, 105]));
        assert_eq!(content[0]["top_logprobs"][1]["bytes"], json!([72, 105]));
        assert!(content[1]["bytes"].is_null(), "{v}");
        assert_eq!(content[1]["token"], "<|im_end|>");
        assert!(content[1]["top_logprobs"][0]["bytes"].is_null(), "{v}");
        assert_eq!(content[1]["top_logprobs"][1]["bytes"], json!([72, 105]));
    }

    #[test]
    fn the_fingerprint_is_stable_per_model_and_in_every_answer() {
        assert_eq!(fingerprint("a"), fingerprint("a"));
        assert_ne!(fingerprint("a"), fingerprint("b"));
        let meta = ResponseMeta {
            id: "chatcmpl-1".into(),
            created: 0,
            model: "a".into(),
            endpoint: Endpoint::Chat,
            fingerprint: fingerprint("a"),
        };
        let usage = TaskUsage { prompt_tokens: 1, completion_tokens: 1 };
        let choices = [(0, Answer { text: "hi".into(), finish: FinishReason::Stop, logprobs: Vec::new() })];
        for v in [
            meta.full(choices.to_vec(), usage, &[], false).to_value(),
            meta.chunk(0, Some("h"), true, None),
            meta.usage_chunk(usage),
        ] {
            assert_eq!(v["system_fingerprint"], fingerprint("a"), "{v}");
        }
    }
}
