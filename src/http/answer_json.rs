//! A whole (non-streamed) answer's JSON, written straight to bytes. A choice's log
//! probabilities are the bulk of it (`n × max_tokens × (1 + top_logprobs)` entries, up to
//! 688,128 at `n` 8, 4,096 tokens and 20 alternatives): built as a `serde_json::Value`
//! tree first, every entry was a map of four values and every byte of a token's text a
//! number of its own, several times the bytes written, on the HTTP worker that serves the
//! other connections. Here they are written from the answers as they are
//! ([`WholeAnswer`]; `docs/benchmarks.md` has the figures), and the route writes them on
//! a blocking thread. The bytes are the same as the tree's: same keys, same order, each
//! log probability widened to f64 as `json!` widens it (a stream's chunks still go
//! through `json!`, and a game comparing the two must find the same numbers).

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

use crate::actors::catalog::TokenLogprob;

/// OpenAI's `logprobs` object of a choice or chunk: `{"content": [...]}`. A token that
/// adds nothing to the text (an end of sequence) has `"bytes": null`, as OpenAI documents
/// for a token with no bytes representation.
pub struct Logprobs<'a>(pub &'a [TokenLogprob]);

impl Serialize for Logprobs<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry("content", &Content(self.0))?;
        map.end()
    }
}

struct Content<'a>(&'a [TokenLogprob]);

impl Serialize for Content<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(Entry))
    }
}

/// One token: `{"token", "logprob", "bytes", "top_logprobs": [...]}`.
struct Entry<'a>(&'a TokenLogprob);

impl Serialize for Entry<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = self.0;
        let mut map = s.serialize_map(Some(4))?;
        map.serialize_entry("token", &e.token)?;
        map.serialize_entry("logprob", &f64::from(e.logprob))?;
        map.serialize_entry("bytes", &Bytes(&e.bytes))?;
        map.serialize_entry("top_logprobs", &Top(&e.top))?;
        map.end()
    }
}

/// One alternative: `{"token", "logprob", "bytes"}`.
struct Top<'a>(&'a [(String, Vec<u8>, f32)]);

impl Serialize for Top<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|(token, bytes, logprob)| Alternative { token, bytes, logprob: *logprob }))
    }
}

struct Alternative<'a> {
    token: &'a str,
    bytes: &'a [u8],
    logprob: f32,
}

impl Serialize for Alternative<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(3))?;
        map.serialize_entry("token", self.token)?;
        map.serialize_entry("logprob", &f64::from(self.logprob))?;
        map.serialize_entry("bytes", &Bytes(self.bytes))?;
        map.end()
    }
}

/// A token's text as bytes, `null` when it adds none.
struct Bytes<'a>(&'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_empty() {
            s.serialize_none()
        } else {
            s.collect_seq(self.0)
        }
    }
}

/// A whole response: its `body` (`id`, `choices`, `usage`, …) with each choice's
/// `"logprobs"` left `null`, and the log probabilities themselves beside it, written in
/// their place when the response is serialized.
#[derive(Debug)]
pub struct WholeAnswer {
    pub body: Value,
    /// By position in `body["choices"]`: `None` leaves that choice's `logprobs` as it is.
    logprobs: Vec<Option<Vec<TokenLogprob>>>,
}

impl WholeAnswer {
    pub fn new(body: Value, logprobs: Vec<Option<Vec<TokenLogprob>>>) -> Self {
        Self { body, logprobs }
    }

    /// The response as one `Value` (for tests and small answers; the route writes bytes).
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

impl Serialize for WholeAnswer {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let Value::Object(fields) = &self.body else { return self.body.serialize(s) };
        let mut map = s.serialize_map(Some(fields.len()))?;
        for (key, value) in fields {
            match value {
                Value::Array(choices) if key == "choices" => {
                    map.serialize_entry(key, &Choices { choices, logprobs: &self.logprobs })?
                }
                _ => map.serialize_entry(key, value)?,
            }
        }
        map.end()
    }
}

struct Choices<'a> {
    choices: &'a [Value],
    logprobs: &'a [Option<Vec<TokenLogprob>>],
}

impl Serialize for Choices<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            self.choices
                .iter()
                .enumerate()
                .map(|(i, choice)| Choice { choice, logprobs: self.logprobs.get(i).and_then(|l| l.as_deref()) }),
        )
    }
}

struct Choice<'a> {
    choice: &'a Value,
    logprobs: Option<&'a [TokenLogprob]>,
}

impl Serialize for Choice<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (Some(logprobs), Value::Object(fields)) = (self.logprobs, self.choice) else {
            return self.choice.serialize(s);
        };
        let mut map = s.serialize_map(Some(fields.len()))?;
        for (key, value) in fields {
            if key == "logprobs" {
                map.serialize_entry(key, &Logprobs(logprobs))?;
            } else {
                map.serialize_entry(key, value)?;
            }
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(token: &str, bytes: &[u8], logprob: f32) -> TokenLogprob {
        TokenLogprob {
            token: token.into(),
            bytes: bytes.to_vec(),
            logprob,
            top: vec![(token.into(), bytes.to_vec(), logprob), ("Hi".into(), b"Hi".to_vec(), -1.5)],
        }
    }

    /// What the route wrote before: the same object built with `json!`.
    fn as_tree(entries: &[TokenLogprob]) -> Value {
        let bytes = |b: &[u8]| if b.is_empty() { Value::Null } else { json!(b) };
        let content: Vec<Value> = entries
            .iter()
            .map(|e| {
                let top: Vec<Value> = e
                    .top
                    .iter()
                    .map(|(token, b, logprob)| json!({"token": token, "logprob": logprob, "bytes": bytes(b)}))
                    .collect();
                json!({"token": e.token, "logprob": e.logprob, "bytes": bytes(&e.bytes), "top_logprobs": top})
            })
            .collect();
        json!({"content": content})
    }

    #[test]
    fn log_probabilities_are_written_as_the_tree_wrote_them_byte_for_byte() {
        // -0.1 is not an f32: written as f32 it would read "-0.1", as the tree's f64 it reads
        // "-0.10000000149011612"; a game comparing a stream with a whole answer needs one.
        let entries = [entry("Hi", b"Hi", -0.1), entry("<|im_end|>", b"", -2.75), entry("\u{e9}", "é".as_bytes(), 0.0)];
        let direct = serde_json::to_string(&Logprobs(&entries)).unwrap();
        assert_eq!(direct, serde_json::to_string(&as_tree(&entries)).unwrap());
        assert!(direct.contains(r#""bytes":null"#) && direct.contains("-0.10000000149011612"), "{direct}");
    }

    #[test]
    fn each_choices_log_probabilities_land_in_its_place_and_nothing_else_moves() {
        let body = json!({"id": "x", "choices": [
            {"index": 0, "logprobs": null, "finish_reason": "stop"},
            {"index": 2, "logprobs": null, "finish_reason": "length"},
        ], "usage": {"total_tokens": 3}, "failed_choices": [{"index": 1}]});
        let whole = WholeAnswer::new(body.clone(), vec![None, Some(vec![entry("a", b"a", -1.0)])]);
        let written: Value = serde_json::from_slice(&serde_json::to_vec(&whole).unwrap()).unwrap();
        assert_eq!(written, whole.to_value());
        assert!(written["choices"][0]["logprobs"].is_null());
        assert_eq!(written["choices"][1]["logprobs"], as_tree(&[entry("a", b"a", -1.0)]));
        let mut rest = written.clone();
        rest["choices"][1]["logprobs"] = Value::Null;
        assert_eq!(rest, body);
    }
}
