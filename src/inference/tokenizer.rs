//! Tokenizers of the Llama family, from GGUF metadata or a Hugging Face `tokenizer.json`:
//!
//! - byte-level BPE (`gpt2` in GGUF; SmolLM2, Llama 3): bytes mapped to printable
//!   characters, a pre-tokenizer regex chosen by `tokenizer.ggml.pre`, merges by rank;
//!   Qwen 2/3 and Phi-4-mini are of this kind, with their own regexes;
//! - SentencePiece-style BPE (`llama` in GGUF; Llama 2, TinyLlama, Mistral, Phi-3, Gemma):
//!   spaces as `▁`, merges by score (GGUF) or rank (tokenizer.json), byte fallback to
//!   `<0xXX>` tokens; Gemma adds no space in front of the text.
//!
//! Special tokens (control and user-defined) are matched literally before anything else,
//! so rendered chat templates tokenize as the model was trained. [`StreamDecoder`] turns
//! token ids into text chunks that never split a UTF-8 sequence.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use fancy_regex::Regex;

use super::error::{InferError, Result};
use super::gguf::{GgufFile, MetaValue};
use super::grammar::GrammarCompiler;

/// GPT-2's pre-tokenizer pattern.
pub const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Qwen 2/2.5/3's pre-tokenizer pattern: Llama 3's with one digit per pre-token.
pub const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's pre-tokenizer pattern.
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const SPM_SPACE: char = '▁';

#[derive(Debug, Clone, PartialEq)]
enum Style {
    ByteLevel,
    SentencePiece { add_space_prefix: bool },
}

/// How two adjacent symbols merge.
enum MergeRule {
    /// `(left id, right id) -> rank`, lower ranks merge first.
    Ranks(HashMap<(u32, u32), u32>),
    /// Merge when the concatenation is a token; higher scores merge first.
    Scores(Vec<f32>),
}

pub struct Tokenizer {
    style: Style,
    pre: Option<Regex>,
    split_digits: bool,
    /// Whole pre-tokens found in the vocabulary skip merging (Llama 3).
    ignore_merges: bool,
    vocab: HashMap<String, u32>,
    token_bytes: Vec<Vec<u8>>,
    merges: MergeRule,
    /// Finds literal special tokens in a text in one pass (`None`: the vocabulary has none);
    /// match `i` is the token `special_ids[i]`.
    specials: Option<AhoCorasick>,
    special_ids: Vec<u32>,
    /// Tokens that decode to nothing in generated text (control tokens).
    control: HashSet<u32>,
    byte_tokens: [Option<u32>; 256],
    unk: Option<u32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Extra end-of-turn tokens (`<|im_end|>`, `<|eot_id|>`, ...) that also stop generation.
    pub stop_tokens: Vec<u32>,
    pub add_bos: bool,
    /// Grammars compile against this vocabulary; built on first use.
    pub(crate) grammar_compiler:
        std::sync::OnceLock<std::result::Result<Arc<GrammarCompiler>, super::grammar::GrammarError>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("style", &self.style).field("vocab", &self.vocab.len()).finish()
    }
}

/// GPT-2's reversible map from bytes to printable characters.
fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).expect("byte values are chars")
        } else {
            next += 1;
            char::from_u32(next - 1).expect("256..324 are chars")
        };
    }
    table
}

fn parse_byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
}

fn pattern_for_pre(pre: &str) -> Result<(&'static str, bool)> {
    Ok(match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => (GPT2_PATTERN, true),
        "gpt-2" | "gpt2" | "default" | "olmo" | "jais" | "poro-chat" => (GPT2_PATTERN, false),
        "llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "pixtral" | "tekken" => (LLAMA3_PATTERN, false),
        "qwen2" | "deepseek-r1-qwen" => (QWEN2_PATTERN, false),
        other => {
            return Err(InferError::Tokenizer(format!(
                "unknown pre-tokenizer `{other}` (supported: smollm, gpt-2, llama3, qwen2 and their aliases)"
            )))
        }
    })
}

impl Tokenizer {
    /// Builds the tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let model = file
            .get_str("tokenizer.ggml.model")
            .ok_or_else(|| InferError::MissingMetadata("tokenizer.ggml.model".into()))?;
        let strings = |key: &str| -> Result<Vec<String>> {
            let arr =
                file.require(key)?.as_array().ok_or_else(|| InferError::Tokenizer(format!("{key} is not an array")))?;
            arr.iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| InferError::Tokenizer(format!("{key} holds a non-string")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<u64> = file
            .get("tokenizer.ggml.token_type")
            .and_then(MetaValue::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        let id = |key: &str| file.get_u64(key).map(|v| v as u32);
        let (style, pre, split_digits, merges) = match model {
            "gpt2" => {
                let (pattern, digits) = pattern_for_pre(file.get_str("tokenizer.ggml.pre").unwrap_or("default"))?;
                let merges = strings("tokenizer.ggml.merges")?;
                (Style::ByteLevel, Some(pattern), digits, Some(merges))
            }
            "llama" => {
                let add_space_prefix =
                    file.get("tokenizer.ggml.add_space_prefix").and_then(MetaValue::as_bool).unwrap_or(true);
                (Style::SentencePiece { add_space_prefix }, None, false, None)
            }
            other => {
                return Err(InferError::Tokenizer(format!("tokenizer model `{other}` is not supported (gpt2, llama)")))
            }
        };
        let merge_rule = match merges {
            Some(list) => (list, Vec::new()),
            None => {
                let scores = file
                    .get("tokenizer.ggml.scores")
                    .and_then(MetaValue::as_array)
                    .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect::<Vec<_>>())
                    .ok_or_else(|| InferError::MissingMetadata("tokenizer.ggml.scores".into()))?;
                (Vec::new(), scores)
            }
        };
        let specials: Vec<u32> =
            types.iter().enumerate().filter(|(_, &t)| t == 3 || t == 4).map(|(i, _)| i as u32).collect();
        let control: HashSet<u32> = types.iter().enumerate().filter(|(_, &t)| t == 3).map(|(i, _)| i as u32).collect();
        let add_bos_default = matches!(style, Style::SentencePiece { .. });
        let add_bos = file.get("tokenizer.ggml.add_bos_token").and_then(MetaValue::as_bool).unwrap_or(add_bos_default);
        let mut tok = Self::build(style, pre, split_digits, tokens, merge_rule, &specials, control)?;
        tok.bos = id("tokenizer.ggml.bos_token_id");
        tok.eos = id("tokenizer.ggml.eos_token_id");
        tok.unk = id("tokenizer.ggml.unknown_token_id").or(tok.unk);
        tok.add_bos = add_bos;
        tok.ignore_merges = pre == Some(LLAMA3_PATTERN);
        tok.find_stop_tokens(id("tokenizer.ggml.eot_token_id"));
        Ok(tok)
    }

    /// Builds a tokenizer from a Hugging Face model directory (`tokenizer.json`, and
    /// `tokenizer_config.json` for BOS/EOS).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&path).map_err(|e| InferError::io(&path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| InferError::format(&path, e.to_string()))?;
        let model = &json["model"];
        if model["type"].as_str().unwrap_or("BPE") != "BPE" {
            return Err(InferError::Tokenizer(format!("{}: only BPE tokenizers are supported", path.display())));
        }
        let vocab_map = model["vocab"].as_object().ok_or_else(|| InferError::format(&path, "model.vocab missing"))?;
        let mut added: Vec<(String, u32, bool)> = Vec::new();
        for t in json["added_tokens"].as_array().into_iter().flatten() {
            if let (Some(content), Some(id)) = (t["content"].as_str(), t["id"].as_u64()) {
                added.push((content.to_string(), id as u32, t["special"].as_bool().unwrap_or(true)));
            }
        }
        let size = vocab_map
            .values()
            .filter_map(|v| v.as_u64())
            .chain(added.iter().map(|a| a.1 as u64))
            .max()
            .map_or(0, |m| m as usize + 1);
        let mut tokens = vec![String::new(); size];
        for (s, id) in vocab_map {
            let id = id.as_u64().ok_or_else(|| InferError::format(&path, "vocab ids must be integers"))?;
            tokens[id as usize] = s.clone();
        }
        for (s, id, _) in &added {
            tokens[*id as usize] = s.clone();
        }
        let merges: Vec<String> = model["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| match m {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Array(pair) => {
                    Some(format!("{} {}", pair.first()?.as_str()?, pair.get(1)?.as_str()?))
                }
                _ => None,
            })
            .collect();
        let pre_json = json["pre_tokenizer"].to_string();
        let byte_level = pre_json.contains("ByteLevel") || json["decoder"].to_string().contains("ByteLevel");
        let style = if byte_level {
            Style::ByteLevel
        } else {
            let norm = json["normalizer"].to_string();
            let add_space_prefix =
                norm.contains("Prepend") || (pre_json.contains("Metaspace") && !pre_json.contains("\"never\""));
            Style::SentencePiece { add_space_prefix }
        };
        let split_pattern = find_split_regex(&json["pre_tokenizer"]);
        let pattern = byte_level.then(|| split_pattern.unwrap_or_else(|| GPT2_PATTERN.to_string()));
        let split_digits = pre_json.contains("\"Digits\"") && pre_json.contains("\"individual_digits\":true");
        let specials: Vec<u32> = added.iter().map(|a| a.1).collect();
        let control: HashSet<u32> = added.iter().filter(|a| a.2).map(|a| a.1).collect();
        let mut tok =
            Self::build_owned(style.clone(), pattern, split_digits, tokens, (merges, Vec::new()), &specials, control)?;
        tok.ignore_merges = model["ignore_merges"].as_bool().unwrap_or(false);
        let config: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let token_id = |v: &serde_json::Value| {
            let s = v.as_str().or_else(|| v["content"].as_str())?;
            tok.vocab.get(s).copied()
        };
        tok.bos = token_id(&config["bos_token"]);
        tok.eos = token_id(&config["eos_token"]);
        tok.unk = token_id(&config["unk_token"]).or(tok.unk);
        let post = json["post_processor"].to_string();
        let bos_in_post = tok.bos.is_some_and(|_| config["bos_token"].as_str().is_some_and(|b| post.contains(b)));
        tok.add_bos =
            config["add_bos_token"].as_bool().unwrap_or(bos_in_post || matches!(style, Style::SentencePiece { .. }));
        tok.find_stop_tokens(None);
        Ok(tok)
    }

    fn build(
        style: Style,
        pattern: Option<&str>,
        split_digits: bool,
        tokens: Vec<String>,
        merges: (Vec<String>, Vec<f32>),
        specials: &[u32],
        control: HashSet<u32>,
    ) -> Result<Self> {
        Self::build_owned(style, pattern.map(str::to_string), split_digits, tokens, merges, specials, control)
    }

    fn build_owned(
        style: Style,
        pattern: Option<String>,
        split_digits: bool,
        tokens: Vec<String>,
        (merges, scores): (Vec<String>, Vec<f32>),
        specials: &[u32],
        control: HashSet<u32>,
    ) -> Result<Self> {
        let pre = match pattern {
            Some(p) => Some(Regex::new(&p).map_err(|e| InferError::Tokenizer(format!("pre-tokenizer regex: {e}")))?),
            None => None,
        };
        let mut vocab = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            vocab.entry(t.clone()).or_insert(i as u32);
        }
        let char_to_byte: HashMap<char, u8> = byte_to_char().iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        let special_set: HashSet<u32> = specials.iter().copied().collect();
        let mut byte_tokens = [None; 256];
        let token_bytes = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if special_set.contains(&(i as u32)) {
                    // SentencePiece's decoder turns `▁` into a space in added tokens too
                    // (Gemma's runs of spaces); control tokens stay as written.
                    return match style {
                        Style::SentencePiece { .. } if !control.contains(&(i as u32)) => {
                            t.replace(SPM_SPACE, " ").into_bytes()
                        }
                        _ => t.as_bytes().to_vec(),
                    };
                }
                match style {
                    Style::ByteLevel => t.chars().map(|c| char_to_byte.get(&c).copied().unwrap_or(b'?')).collect(),
                    Style::SentencePiece { .. } => match parse_byte_token(t) {
                        Some(b) => {
                            byte_tokens[b as usize].get_or_insert(i as u32);
                            vec![b]
                        }
                        None => t.replace(SPM_SPACE, " ").into_bytes(),
                    },
                }
            })
            .collect();
        let merges = if merges.is_empty() && !scores.is_empty() {
            MergeRule::Scores(scores)
        } else {
            let mut ranks = HashMap::with_capacity(merges.len());
            for (rank, m) in merges.iter().enumerate() {
                let (a, b) =
                    m.split_once(' ').ok_or_else(|| InferError::Tokenizer(format!("malformed merge `{m}`")))?;
                if let (Some(&a), Some(&b)) = (vocab.get(a), vocab.get(b)) {
                    ranks.entry((a, b)).or_insert(rank as u32);
                }
            }
            MergeRule::Ranks(ranks)
        };
        // One id per string (the lowest, where a vocabulary lists a string twice).
        let mut by_text: Vec<(&str, u32)> =
            specials.iter().map(|&i| (tokens[i as usize].as_str(), i)).filter(|(s, _)| !s.is_empty()).collect();
        by_text.sort_unstable();
        by_text.dedup_by_key(|(s, _)| *s);
        let special_ids = by_text.iter().map(|&(_, id)| id).collect();
        // Leftmost first, and the longest of those starting there, as Hugging Face splits
        // added tokens. One automaton finds them all in one pass over a text: searching for
        // each special in turn cost (specials found × specials × text length), minutes for a
        // half-megabyte prompt of `<|im_end|>` (Gemma 3 lists 6,414 specials).
        let specials = if by_text.is_empty() {
            None
        } else {
            let finder = AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(by_text.iter().map(|&(s, _)| s))
                .map_err(|e| InferError::Tokenizer(format!("special tokens: {e}")))?;
            Some(finder)
        };
        let unk = vocab.get("<unk>").copied();
        Ok(Self {
            style,
            pre,
            split_digits,
            ignore_merges: false,
            vocab,
            token_bytes,
            merges,
            specials,
            special_ids,
            control,
            byte_tokens,
            unk,
            bos: None,
            eos: None,
            stop_tokens: Vec::new(),
            add_bos: false,
            grammar_compiler: std::sync::OnceLock::new(),
        })
    }

    fn find_stop_tokens(&mut self, eot: Option<u32>) {
        let mut stops: Vec<u32> = self.eos.into_iter().chain(eot).collect();
        for name in ["<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<|end|>", "<end_of_turn>"]
        {
            if let Some(&id) = self.vocab.get(name) {
                // Older Gemma GGUF files type `<end_of_turn>` as an ordinary token; it still
                // ends the turn (llama.cpp overrides the type the same way).
                if self.control.contains(&id) || Some(id) == self.eos || name == "<end_of_turn>" {
                    stops.push(id);
                }
            }
        }
        stops.sort_unstable();
        stops.dedup();
        self.stop_tokens = stops;
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// The token's text as stored in the vocabulary's byte form.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    pub fn is_control(&self, id: u32) -> bool {
        self.control.contains(&id)
    }

    /// Encodes `text`; special-token strings in it become their ids. Adds BOS when the
    /// tokenizer asks for it and `add_special` is true.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            ids.extend(self.bos);
        }
        let mut plain_from = 0;
        let mut at_start = true;
        for found in self.specials.iter().flat_map(|finder| finder.find_iter(text)) {
            let plain = &text[plain_from..found.start()];
            if !plain.is_empty() {
                self.encode_plain(plain, at_start, &mut ids)?;
            }
            ids.push(self.special_ids[found.pattern().as_usize()]);
            plain_from = found.end();
            at_start = false;
        }
        let plain = &text[plain_from..];
        if !plain.is_empty() {
            self.encode_plain(plain, at_start, &mut ids)?;
        }
        Ok(ids)
    }

    fn encode_plain(&self, text: &str, at_start: bool, ids: &mut Vec<u32>) -> Result<()> {
        match &self.style {
            Style::ByteLevel => {
                let table = byte_to_char();
                let pre = self.pre.as_ref().expect("byte-level tokenizers always have a pre-tokenizer");
                for piece in split_digits(text, self.split_digits) {
                    for m in pre.find_iter(piece) {
                        let m = m.map_err(|e| InferError::Tokenizer(format!("pre-tokenizer failed: {e}")))?;
                        let mapped: String = m.as_str().bytes().map(|b| table[b as usize]).collect();
                        self.bpe(&mapped, ids);
                    }
                }
            }
            Style::SentencePiece { add_space_prefix } => {
                let mut normalized = String::with_capacity(text.len() + 3);
                if *add_space_prefix && at_start {
                    normalized.push(SPM_SPACE);
                }
                normalized.extend(text.chars().map(|c| if c == ' ' { SPM_SPACE } else { c }));
                self.bpe(&normalized, ids);
            }
        }
        Ok(())
    }

    /// Rank of merging `left` and `right` (lower first), with the merged token's id.
    fn merge_rank(&self, left: &str, right: &str) -> Option<(i64, u32)> {
        let merged = [left, right].concat();
        let id = *self.vocab.get(&merged)?;
        match &self.merges {
            MergeRule::Ranks(ranks) => {
                let pair = (*self.vocab.get(left)?, *self.vocab.get(right)?);
                ranks.get(&pair).map(|&r| (r as i64, id))
            }
            // Higher score first; scores are compared through their bits made monotonic.
            MergeRule::Scores(scores) => {
                let s = scores.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY);
                let bits = s.to_bits() as i32;
                let ordered = if bits < 0 { !bits ^ i32::MIN } else { bits } as i64;
                Some((-ordered, id))
            }
        }
    }

    /// Byte-pair merging of one pre-token, in O(n log n) with a heap of candidate pairs.
    fn bpe(&self, word: &str, ids: &mut Vec<u32>) {
        if let Some(&id) = self.vocab.get(word) {
            if self.ignore_merges || word.chars().nth(1).is_none() {
                ids.push(id);
                return;
            }
        }
        // Symbols are byte ranges of `word`, one char each at first.
        let start: Vec<usize> = word.char_indices().map(|(i, _)| i).collect();
        let n = start.len();
        let mut end: Vec<usize> = start.iter().skip(1).copied().chain([word.len()]).collect();
        let mut prev: Vec<Option<usize>> = (0..n).map(|i| i.checked_sub(1)).collect();
        let mut next: Vec<Option<usize>> = (0..n).map(|i| (i + 1 < n).then_some(i + 1)).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<Reverse<(i64, usize, usize, usize)>>,
                    l: usize,
                    r: usize,
                    start: &[usize],
                    end: &[usize]| {
            if let Some((rank, _)) = self.merge_rank(&word[start[l]..end[l]], &word[start[r]..end[r]]) {
                heap.push(Reverse((rank, start[l], l, end[r])));
            }
        };
        for i in 0..n.saturating_sub(1) {
            push(&mut heap, i, i + 1, &start, &end);
        }
        while let Some(Reverse((_, _, l, right_end))) = heap.pop() {
            let Some(r) = next[l] else { continue };
            if !alive[l] || !alive[r] || end[r] != right_end {
                continue;
            }
            end[l] = end[r];
            alive[r] = false;
            next[l] = next[r];
            if let Some(nr) = next[r] {
                prev[nr] = Some(l);
            }
            if let Some(p) = prev[l] {
                push(&mut heap, p, l, &start, &end);
            }
            if let Some(nr) = next[l] {
                push(&mut heap, l, nr, &start, &end);
            }
        }
        let mut i = Some(0);
        while let Some(s) = i {
            let piece = &word[start[s]..end[s]];
            match self.vocab.get(piece) {
                Some(&id) => ids.push(id),
                None => {
                    for b in piece.bytes() {
                        ids.extend(self.byte_tokens[b as usize].or(self.unk));
                    }
                }
            }
            i = next[s];
        }
    }

    /// Decodes ids into text; control tokens are skipped when `skip_special` is set.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if skip_special && self.is_control(id) {
                continue;
            }
            bytes.extend_from_slice(self.token_bytes(id));
        }
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if matches!(self.style, Style::SentencePiece { add_space_prefix: true }) && text.starts_with(' ') {
            text.remove(0);
        }
        text
    }
}

/// Finds the first `Split` regex of a `tokenizer.json` pre-tokenizer.
fn find_split_regex(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::Object(map) => {
            if map.get("type").and_then(|t| t.as_str()) == Some("Split") {
                if let Some(re) = map.get("pattern").and_then(|p| p.get("Regex")).and_then(|r| r.as_str()) {
                    return Some(re.to_string());
                }
            }
            map.values().find_map(find_split_regex)
        }
        serde_json::Value::Array(items) => items.iter().find_map(find_split_regex),
        _ => None,
    }
}

/// Splits `text` so that every numeric character stands alone (HF's `Digits` with
/// `individual_digits`), or returns it whole.
fn split_digits(text: &str, split: bool) -> Vec<&str> {
    if !split {
        return vec![text];
    }
    let mut pieces = Vec::new();
    let mut begin = 0;
    for (i, c) in text.char_indices() {
        if c.is_numeric() {
            if begin < i {
                pieces.push(&text[begin..i]);
            }
            pieces.push(&text[i..i + c.len_utf8()]);
            begin = i + c.len_utf8();
        }
    }
    if begin < text.len() {
        pieces.push(&text[begin..]);
    }
    pieces
}

/// Incremental detokenizer: feeds token ids, yields text that never ends inside a UTF-8
/// sequence (incomplete bytes wait for the next token).
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// Adds one token; returns the text that became complete.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        if tokenizer.is_control(id) {
            return String::new();
        }
        self.pending.extend_from_slice(tokenizer.token_bytes(id));
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) => match e.error_len() {
                // Invalid (not merely incomplete) bytes: emit them as U+FFFD now.
                Some(_) => self.pending.len(),
                None => e.valid_up_to(),
            },
        };
        let out: Vec<u8> = self.pending.drain(..valid).collect();
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Whatever is left at the end of the stream.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SentencePiece-style vocabulary: specials, 256 byte tokens, then pieces whose
    /// scores favour longer merges.
    fn spm() -> Tokenizer {
        spm_with(&[])
    }

    /// [`spm`] with `extra` special tokens after its pieces (ids from 277 on).
    fn spm_with(extra: &[&str]) -> Tokenizer {
        let mut tokens = vec!["<unk>".to_string(), "<s>".to_string(), "</s>".to_string()];
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        let pieces = [
            "▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "hell", "hello", "▁hello", "▁w", "or", "ld", "▁wor",
            "▁world",
        ];
        let first_piece = tokens.len();
        tokens.extend(pieces.iter().map(|p| p.to_string()));
        let first_extra = tokens.len() as u32;
        tokens.extend(extra.iter().map(|p| p.to_string()));
        let specials: Vec<u32> = [1, 2].into_iter().chain((0..extra.len() as u32).map(|i| first_extra + i)).collect();
        let scores: Vec<f32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| if i >= first_piece { t.chars().count() as f32 } else { 0.0 })
            .collect();
        let control: HashSet<u32> = specials.iter().copied().collect();
        let mut tok = Tokenizer::build(
            Style::SentencePiece { add_space_prefix: true },
            None,
            false,
            tokens,
            (Vec::new(), scores),
            &specials,
            control,
        )
        .unwrap();
        tok.bos = Some(1);
        tok.eos = Some(2);
        tok.add_bos = true;
        tok
    }

    #[test]
    fn sentencepiece_merges_by_score_and_falls_back_to_bytes() {
        let tok = spm();
        let ids = tok.encode("hello world", true).unwrap();
        let pieces: Vec<String> =
            ids.iter().map(|&i| String::from_utf8_lossy(tok.token_bytes(i)).into_owned()).collect();
        assert_eq!(ids[0], 1, "BOS first");
        assert_eq!(pieces[1..], [" hello", " world"]);
        assert_eq!(tok.decode(&ids, true), "hello world");
        // 'é' is not a piece: its two UTF-8 bytes become <0xC3><0xA9>.
        let ids = tok.encode("hé", false).unwrap();
        let c3 = tok.token_id("<0xC3>").unwrap();
        let a9 = tok.token_id("<0xA9>").unwrap();
        assert_eq!(&ids[ids.len() - 2..], &[c3, a9]);
        assert_eq!(tok.decode(&ids, true), "hé");
        // Special tokens in the text are matched literally.
        let ids = tok.encode("hello</s>", false).unwrap();
        assert_eq!(ids.last(), Some(&2));
    }

    /// Special tokens are found leftmost first, the longest of those starting together, and
    /// a string the vocabulary lists twice is its lower id; the text between them is encoded
    /// as plain text, the first piece as the start of the text.
    #[test]
    fn special_tokens_match_leftmost_then_longest() {
        let tok = spm_with(&["<x>", "<x>y", "<x>"]);
        let (x, xy) = (tok.token_id("<x>y").unwrap() - 1, tok.token_id("<x>y").unwrap());
        let specials = [1, 2, x, xy, xy + 1];
        let ids = tok.encode("hello<x>y<x><x>yworld</s>", false).unwrap();
        let found: Vec<u32> = ids.iter().copied().filter(|id| specials.contains(id)).collect();
        assert_eq!(found, [xy, x, xy, 2]);
        assert_eq!(ids.first(), tok.encode("hello", false).unwrap().first(), "the text's start keeps its space");
        assert_eq!(tok.encode("<x>", false).unwrap(), [x]);
        // Thousands of specials in one prompt cost one pass, and none is lost.
        let many = "<x>y, ".repeat(20_000);
        let ids = tok.encode(&many, false).unwrap();
        assert_eq!(ids.iter().filter(|&&id| id == xy).count(), 20_000);
    }

    #[test]
    fn digits_split_one_by_one_when_asked() {
        assert_eq!(split_digits("ab12 c3", true), vec!["ab", "1", "2", " c", "3"]);
        assert_eq!(split_digits("ab12", false), vec!["ab12"]);
    }

    #[test]
    fn unknown_pre_tokenizers_are_named() {
        let err = pattern_for_pre("qwen9").unwrap_err().to_string();
        assert!(err.contains("qwen9"), "{err}");
    }
}
