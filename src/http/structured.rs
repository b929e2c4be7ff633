//! Structured output and tool calls on the OpenAI wire: `response_format`, `tools` and
//! `tool_choice` become one grammar ([`crate::inference::grammar`]) that every node samples
//! under and the server checks each token against, plus a system message that shows the
//! model its tools.
//!
//! The tool convention (docs/game-developers.md, "Tools"): a call is the whole answer, one
//! JSON object `{"name": "<function>", "arguments": {…}}`, keys in that order, compact
//! separators. The grammar allows only the listed functions with their parameter schemas.
//! An assistant message that made a call is shown to the model as that same object; a
//! `tool` message is rendered by the model's chat template with the `tool` role.

use serde_json::{json, Map, Value};

use super::errors::ApiError;

/// What the grammar may allow besides a tool call.
#[derive(Debug, Clone, PartialEq)]
pub struct Structured {
    /// Lark grammar text for the sampler (`None`: free text).
    pub grammar: Option<String>,
    /// The request field a grammar error is reported under.
    pub field: &'static str,
    /// The functions the answer may call (empty: none; tools absent or `tool_choice` `none`).
    pub functions: Vec<String>,
    /// Shows the model its tools; prepended to the conversation.
    pub tools_prompt: Option<String>,
}

/// How JSON is laid out under a grammar: no free whitespace (a small model cannot pad an
/// answer with newlines until `max_tokens`), `", "` and `": "` as separators.
fn layout() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

/// A JSON schema with the layout applied, as a `%json` Lark rule body.
fn json_rule(mut schema: Map<String, Value>) -> String {
    schema.insert("x-guidance".into(), layout());
    format!("%json {}", Value::Object(schema))
}

fn schema_object(value: &Value, param: &str) -> Result<Map<String, Value>, ApiError> {
    match value {
        Value::Object(map) => Ok(map.clone()),
        _ => Err(ApiError::invalid(param, format!("`{param}` must be a JSON schema object"))),
    }
}

/// `response_format`: the answer's own grammar rule, if any.
fn response_format(obj: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    let Some(format) = obj.get("response_format").filter(|v| !v.is_null()) else { return Ok(None) };
    let kind = format.get("type").and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid("response_format", "`response_format.type` must be `text`, `json_object` or `json_schema`")
    })?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(json_rule(Map::from_iter([("type".to_string(), json!("object"))])))),
        "json_schema" => {
            let spec = format.get("json_schema").and_then(Value::as_object).ok_or_else(|| {
                ApiError::invalid("response_format", "`response_format.json_schema` must be an object")
            })?;
            match spec.get("name") {
                Some(Value::String(name)) if !name.is_empty() && name.len() <= 64 => {}
                _ => {
                    return Err(ApiError::invalid(
                        "response_format",
                        "`response_format.json_schema.name` must be a string of 1 to 64 characters",
                    ))
                }
            }
            let schema = schema_object(
                spec.get("schema").unwrap_or(&json!({"type": "object"})),
                "response_format.json_schema.schema",
            )?;
            Ok(Some(json_rule(schema)))
        }
        other => Err(ApiError::invalid(
            "response_format",
            format!("`response_format.type` must be `text`, `json_object` or `json_schema`, got `{other}`"),
        )),
    }
}

/// One function a game offers.
#[derive(Debug, Clone, PartialEq)]
struct Function {
    name: String,
    description: String,
    parameters: Map<String, Value>,
}

fn functions(obj: &Map<String, Value>) -> Result<Vec<Function>, ApiError> {
    let list = match obj.get("tools") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(ApiError::invalid("tools", "`tools` must be an array")),
    };
    if list.len() > 64 {
        return Err(ApiError::invalid("tools", "`tools` takes at most 64 functions"));
    }
    let mut out: Vec<Function> = Vec::with_capacity(list.len());
    for (i, tool) in list.iter().enumerate() {
        let param = format!("tools[{i}]");
        if tool.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::invalid(&param, format!("`{param}.type` must be `function`")));
        }
        let function = tool
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| ApiError::invalid(&param, format!("`{param}.function` must be an object")))?;
        let name = function.get("name").and_then(Value::as_str).unwrap_or_default();
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid_name {
            return Err(ApiError::invalid(
                &format!("{param}.function.name"),
                format!("`{param}.function.name` must be 1 to 64 letters, digits, `_` or `-`"),
            ));
        }
        if out.iter().any(|f| f.name == name) {
            return Err(ApiError::invalid(
                &format!("{param}.function.name"),
                format!("`{param}.function.name`: `{name}` is listed twice"),
            ));
        }
        let parameters = match function.get("parameters") {
            None | Some(Value::Null) => Map::from_iter([("type".to_string(), json!("object"))]),
            Some(p) => schema_object(p, &format!("{param}.function.parameters"))?,
        };
        let description = function.get("description").and_then(Value::as_str).unwrap_or_default().to_string();
        out.push(Function { name: name.to_string(), description, parameters });
    }
    Ok(out)
}

/// `tool_choice`: which functions the answer may (or must) call.
enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

fn choice(obj: &Map<String, Value>, functions: &[Function]) -> Result<Choice, ApiError> {
    let default = if functions.is_empty() { Choice::None } else { Choice::Auto };
    let choice = match obj.get("tool_choice") {
        None | Some(Value::Null) => default,
        Some(Value::String(s)) => match s.as_str() {
            "none" => Choice::None,
            "auto" => Choice::Auto,
            "required" => Choice::Required,
            other => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("`tool_choice` must be `none`, `auto`, `required` or a function, got `{other}`"),
                ))
            }
        },
        Some(Value::Object(o)) => {
            let name = o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str).ok_or_else(|| {
                ApiError::invalid(
                    "tool_choice",
                    "`tool_choice` must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                )
            })?;
            if !functions.iter().any(|f| f.name == name) {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("`tool_choice` names `{name}`, which is not among `tools`"),
                ));
            }
            Choice::Named(name.to_string())
        }
        Some(_) => return Err(ApiError::invalid("tool_choice", "`tool_choice` must be a string or an object")),
    };
    if functions.is_empty() && !matches!(choice, Choice::None) {
        return Err(ApiError::invalid("tool_choice", "`tool_choice` needs `tools`"));
    }
    Ok(choice)
}

/// The Lark rules of a call to one of `functions`: rule `call`, one alternative per
/// function, each the convention's exact text around that function's own `%json` rule
/// (so that `$ref`s in its parameters resolve against the parameters themselves).
fn call_rules(functions: &[&Function]) -> String {
    let names: Vec<String> = (0..functions.len()).map(|i| format!("call_{i}")).collect();
    let mut rules = format!("call: {}\n", names.join(" | "));
    for (i, f) in functions.iter().enumerate() {
        // Names are [A-Za-z0-9_-]: nothing to escape in the literal.
        rules.push_str(&format!(
            "call_{i}: \"{{\\\"name\\\": \\\"{}\\\", \\\"arguments\\\": \" args_{i} \"}}\"\nargs_{i}: {}\n",
            f.name,
            json_rule(f.parameters.clone())
        ));
    }
    rules
}

/// The system text that shows the model its tools and the call convention.
fn tools_prompt(functions: &[Function]) -> String {
    let mut text = String::from(
        "You can call functions. To call one, answer with only a JSON object: \
         {\"name\": \"<function name>\", \"arguments\": {<arguments>}}.\nFunctions:",
    );
    for f in functions {
        let line =
            json!({"name": f.name, "description": f.description, "parameters": Value::Object(f.parameters.clone())});
        text.push('\n');
        text.push_str(&line.to_string());
    }
    text
}

/// Reads `response_format`, `tools` and `tool_choice`.
pub fn parse(obj: &Map<String, Value>) -> Result<Structured, ApiError> {
    let answer = response_format(obj)?;
    let functions = functions(obj)?;
    let choice = choice(obj, &functions)?;
    let tools_prompt = (!functions.is_empty()).then(|| tools_prompt(&functions));
    let calls: Vec<&Function> = match &choice {
        Choice::None => Vec::new(),
        Choice::Named(name) => functions.iter().filter(|f| &f.name == name).collect(),
        Choice::Auto | Choice::Required => functions.iter().collect(),
    };
    let grammar = match (&choice, answer) {
        (Choice::None, None) => None,
        (Choice::None, Some(rule)) => Some(format!("start: {rule}\n")),
        (Choice::Required | Choice::Named(_), _) => Some(format!("start: call\n{}", call_rules(&calls))),
        // Free text may not open with `{`: an answer that does is a call.
        (Choice::Auto, None) => {
            Some(format!("start: call | text\ntext: TEXT\nTEXT: /[^{{\\s](.|\\n)*/\n{}", call_rules(&calls)))
        }
        // Either a call or an answer in the format: a JSON answer could spell a call, and
        // the game could not tell which it got.
        (Choice::Auto, Some(_)) => {
            return Err(ApiError::invalid(
                "tool_choice",
                "`tool_choice` `auto` cannot be combined with a JSON `response_format`: use `required`, a named function, or `none`",
            ))
        }
    };
    let field = if functions.is_empty() { "response_format" } else { "tools" };
    let functions = calls.iter().map(|f| f.name.clone()).collect();
    Ok(Structured { grammar, field, functions, tools_prompt })
}

/// A tool call read back from an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments object as JSON text.
    pub arguments: String,
}

/// The call an answer makes, if it is a whole call to one of `functions` in the
/// convention's layout (`{"name": "…", "arguments": {…}}`). The arguments are the answer's
/// own bytes, as they are streamed.
pub fn tool_call(text: &str, functions: &[String]) -> Option<ToolCall> {
    let (name, at) = call_head(text)?;
    if !functions.contains(&name) {
        return None;
    }
    let arguments = text[at..].trim_end().strip_suffix('}')?.trim_end();
    let parsed: Value = serde_json::from_str(arguments).ok()?;
    parsed.is_object().then(|| ToolCall { name, arguments: arguments.to_string() })
}

/// How an assistant message that made calls is shown to the model: the convention's text.
pub fn call_text(calls: &Value, param: &str) -> Result<String, ApiError> {
    let list = calls
        .as_array()
        .filter(|l| !l.is_empty())
        .ok_or_else(|| ApiError::invalid(param, format!("`{param}` must be a non-empty array")))?;
    let mut texts = Vec::with_capacity(list.len());
    for (i, call) in list.iter().enumerate() {
        let function = call
            .get("function")
            .ok_or_else(|| ApiError::invalid(param, format!("`{param}[{i}].function` is required")))?;
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid(param, format!("`{param}[{i}].function.name` must be a string")))?;
        let arguments: Value = match function.get("arguments") {
            Some(Value::String(s)) => serde_json::from_str(s)
                .map_err(|e| ApiError::invalid(param, format!("`{param}[{i}].function.arguments` is not JSON: {e}")))?,
            Some(v @ Value::Object(_)) => v.clone(),
            _ => {
                return Err(ApiError::invalid(
                    param,
                    format!("`{param}[{i}].function.arguments` must be a JSON object as a string"),
                ))
            }
        };
        // Key order as the grammar writes it.
        texts.push(format!("{{\"name\": {}, \"arguments\": {}}}", json!(name), arguments));
    }
    Ok(texts.join("\n"))
}

/// Streams an answer that may be a tool call: plain text passes through as content; a call
/// is sent as OpenAI streams one — its id and name first, then the arguments in pieces.
#[derive(Debug, Default)]
pub struct CallStream {
    /// The functions a call may name.
    functions: Vec<String>,
    /// Text received so far while it may still be a call.
    text: String,
    /// How many bytes of the arguments were sent.
    sent: usize,
    mode: Mode,
}

#[derive(Debug, Default, PartialEq)]
enum Mode {
    #[default]
    Undecided,
    Content,
    /// A call: the arguments start at this byte of `text`.
    Call {
        arguments_at: usize,
    },
}

/// What to send for a piece of an answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    Content(String),
    CallStart { name: String },
    Arguments(String),
}

impl CallStream {
    pub fn new(functions: &[String]) -> Self {
        Self { functions: functions.to_vec(), ..Self::default() }
    }

    /// The deltas a new piece of text releases.
    pub fn push(&mut self, piece: &str) -> Vec<Delta> {
        if self.mode == Mode::Content {
            return vec![Delta::Content(piece.to_string())];
        }
        self.text.push_str(piece);
        let mut out = Vec::new();
        if self.mode == Mode::Undecided {
            let trimmed = self.text.trim_start();
            if trimmed.is_empty() {
                return out;
            }
            if !trimmed.starts_with('{') {
                self.mode = Mode::Content;
                return vec![Delta::Content(std::mem::take(&mut self.text))];
            }
            let Some((name, at)) = call_head(&self.text) else { return out };
            if !self.functions.contains(&name) {
                self.mode = Mode::Content;
                return vec![Delta::Content(std::mem::take(&mut self.text))];
            }
            self.mode = Mode::Call { arguments_at: at };
            self.sent = at;
            out.push(Delta::CallStart { name });
        }
        // Hold back a closing brace at the end: it may be the call's own.
        let end = if self.text.ends_with('}') { self.text.len() - 1 } else { self.text.len() };
        if end > self.sent {
            out.push(Delta::Arguments(self.text[self.sent..end].to_string()));
            self.sent = end;
        }
        out
    }

    /// The deltas left at the end of the answer; `complete` when it ended as a whole
    /// answer (not cut at its length), so that a call's closing brace is its own.
    pub fn finish(&mut self, complete: bool) -> Vec<Delta> {
        match self.mode {
            Mode::Content => Vec::new(),
            Mode::Undecided => {
                let text = std::mem::take(&mut self.text);
                if text.is_empty() {
                    Vec::new()
                } else {
                    vec![Delta::Content(text)]
                }
            }
            Mode::Call { .. } => {
                // The closing brace of the call object is not part of the arguments.
                let body = self.text.trim_end();
                let end = match body.strip_suffix('}') {
                    Some(inner) if complete => inner.len(),
                    _ => self.text.len(),
                }
                .max(self.sent);
                let rest = self.text[self.sent..end].to_string();
                self.sent = end;
                if rest.is_empty() {
                    Vec::new()
                } else {
                    vec![Delta::Arguments(rest)]
                }
            }
        }
    }

    /// Whether the answer turned out to be a whole call: one a whole (non-streamed) answer
    /// shows as `tool_calls` too. A call a `stop` sequence cut short began as one, but its
    /// arguments are no JSON: it ends as text does (`stop`), not as `tool_calls`.
    pub fn is_call(&self) -> bool {
        matches!(self.mode, Mode::Call { .. }) && tool_call(&self.text, &self.functions).is_some()
    }
}

/// `{"name": "X", "arguments": ` → (X, the byte where the arguments start).
fn call_head(text: &str) -> Option<(String, usize)> {
    // The call is the whole answer: text before it makes the answer text, as a stream
    // decides at its first character (a whole answer used to drop the text and call).
    let start = text.len() - text.trim_start().len();
    if !text[start..].starts_with('{') {
        return None;
    }
    let rest = &text[start + 1..];
    let after_key = rest.trim_start().strip_prefix("\"name\"")?.trim_start().strip_prefix(':')?.trim_start();
    // The name is a JSON string of a listed function: no escapes.
    let name_body = after_key.strip_prefix('"')?;
    let close = name_body.find('"')?;
    let name = name_body[..close].to_string();
    let after_name = name_body[close + 1..].trim_start().strip_prefix(',')?.trim_start();
    let after_args_key = after_name.strip_prefix("\"arguments\"")?.trim_start().strip_prefix(':')?;
    let args = after_args_key.trim_start();
    // Wait for the arguments' first byte, so that nothing but the head is consumed.
    if args.is_empty() {
        return None;
    }
    Some((name, text.len() - args.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_call_streams_as_its_name_then_its_arguments_in_pieces() {
        let mut s = CallStream::new(&["draw_sword".to_string()]);
        let mut deltas = Vec::new();
        for piece in ["{\"na", "me\": \"draw", "_sword\", \"argu", "ments\": {\"hand", "\": \"lé", "ft\"}", "}"] {
            deltas.extend(s.push(piece));
        }
        deltas.extend(s.finish(true));
        assert!(s.is_call());
        assert_eq!(deltas[0], Delta::CallStart { name: "draw_sword".into() });
        let args: String = deltas[1..]
            .iter()
            .map(|d| match d {
                Delta::Arguments(a) => a.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(args, "{\"hand\": \"léft\"}");
        assert!(deltas.len() > 2, "arguments come in pieces: {deltas:?}");
    }

    #[test]
    fn a_call_cut_short_by_a_stop_sequence_is_not_a_whole_call() {
        let functions = ["count".to_string()];
        let mut s = CallStream::new(&functions);
        let mut deltas = s.push("{\"name\": \"count\", \"arguments\": {\"n\": 123");
        deltas.extend(s.finish(true));
        assert_eq!(deltas[0], Delta::CallStart { name: "count".into() });
        assert!(!s.is_call(), "its arguments are no JSON object");
        // As a whole answer shows the same text: not a call.
        assert!(tool_call("{\"name\": \"count\", \"arguments\": {\"n\": 123", &functions).is_none());
    }

    #[test]
    fn plain_text_streams_as_content() {
        let mut s = CallStream::new(&["wave".to_string()]);
        assert_eq!(s.push("Hel"), vec![Delta::Content("Hel".into())]);
        assert_eq!(s.push("lo"), vec![Delta::Content("lo".into())]);
        assert!(s.finish(true).is_empty());
        assert!(!s.is_call());
        // A call to a function nobody offered is text, not a call.
        let mut s = CallStream::new(&["wave".to_string()]);
        let deltas = s.push("{\"name\": \"delete_save\", \"arguments\": {}}");
        assert!(matches!(&deltas[..], [Delta::Content(_)]) && !s.is_call(), "{deltas:?}");
        // Cut at its length, the arguments keep their last brace.
        let mut s = CallStream::new(&["wave".to_string()]);
        let mut args: Vec<Delta> = s.push("{\"name\": \"wave\", \"arguments\": {\"a\": {\"b\": 1}");
        args.extend(s.finish(false));
        let text: String =
            args.iter().filter_map(|d| if let Delta::Arguments(a) = d { Some(a.as_str()) } else { None }).collect();
        assert_eq!(text, "{\"a\": {\"b\": 1}");
    }

    #[test]
    fn the_call_convention_reads_back() {
        let wave = ["wave".to_string()];
        let call = tool_call("{\"name\": \"wave\", \"arguments\": {\"times\": 2}}", &wave).unwrap();
        assert_eq!(call, ToolCall { name: "wave".into(), arguments: "{\"times\": 2}".into() });
        assert_eq!(tool_call("Hello there", &wave), None);
        let after_words = "Sure! {\"name\": \"wave\", \"arguments\": {\"times\": 2}}";
        assert_eq!(tool_call(after_words, &wave), None, "text, as its stream shows it");
        assert!(tool_call(" \n{\"name\": \"wave\", \"arguments\": {}}", &wave).is_some());
        assert_eq!(tool_call("{\"name\": \"wave\"}", &wave), None);
        assert_eq!(tool_call("{\"name\": \"jump\", \"arguments\": {}}", &wave), None, "not offered");
        let history =
            json!([{"id": "c1", "type": "function", "function": {"name": "wave", "arguments": "{\"times\": 2}"}}]);
        assert_eq!(
            call_text(&history, "messages[1].tool_calls").unwrap(),
            "{\"name\": \"wave\", \"arguments\": {\"times\":2}}"
        );
        let bad = json!([{"id": "c1", "type": "function", "function": {"name": "wave", "arguments": 5}}]);
        let err = call_text(&bad, "messages[1].tool_calls").unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[1].tool_calls"));
    }

    #[test]
    fn bad_tool_requests_name_their_field() {
        let tools = json!([{"type": "function", "function": {"name": "wave", "parameters": {"type": "object"}}}]);
        let err = |v: Value| parse(&obj(v)).unwrap_err().param.unwrap_or_default();
        assert_eq!(
            err(json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "jump"}}})),
            "tool_choice"
        );
        assert_eq!(err(json!({"tools": tools, "tool_choice": "sometimes"})), "tool_choice");
        assert_eq!(err(json!({"tool_choice": "required"})), "tool_choice");
        assert_eq!(
            err(json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]})),
            "tools[0].function.name"
        );
        assert_eq!(err(json!({"tools": [{"type": "retrieval"}]})), "tools[0]");
        assert_eq!(err(json!({"response_format": {"type": "xml"}})), "response_format");
        assert_eq!(
            err(json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}})),
            "response_format"
        );
        assert_eq!(
            err(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": true}}})),
            "response_format.json_schema.schema"
        );
    }

    #[test]
    fn the_grammar_follows_the_choice() {
        let tools = json!([{"type": "function", "function": {"name": "wave"}}, {"type": "function", "function": {"name": "bow"}}]);
        let auto = parse(&obj(json!({"tools": tools}))).unwrap();
        assert_eq!(auto.functions, vec!["wave", "bow"]);
        assert!(auto.grammar.as_deref().unwrap().contains("start: call | text"));
        let none = parse(&obj(json!({"tools": tools, "tool_choice": "none"}))).unwrap();
        assert!(none.functions.is_empty() && none.grammar.is_none() && none.tools_prompt.is_some());
        let mixed = parse(&obj(json!({"tools": tools, "response_format": {"type": "json_object"}})));
        assert_eq!(mixed.unwrap_err().param.as_deref(), Some("tool_choice"));
        let named =
            parse(&obj(json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "bow"}}})))
                .unwrap();
        let g = named.grammar.unwrap();
        assert!(g.contains("bow") && !g.contains("wave"), "{g}");
        let plain = parse(&obj(json!({}))).unwrap();
        assert_eq!(
            plain,
            Structured { grammar: None, field: "response_format", functions: vec![], tools_prompt: None }
        );
    }
}
