//! Token ids → the text a reader sees: incremental UTF-8 decoding, stop sequences cut, and
//! text that could still start a stop sequence held back until it cannot. A pure function
//! of (tokenizer, stop sequences, ids), so the engine that generates and the server that
//! relays produce the same text from the same ids: the game reads what the server made from
//! the ids the proof of inference covers, never a node's own text.

use super::tokenizer::{StreamDecoder, Tokenizer};

/// The text of one sequence, token by token.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    decoder: StreamDecoder,
    text: String,
    released: usize,
    stop: Vec<String>,
    max_stop_len: usize,
    stopped: bool,
}

impl TextStream {
    pub fn new(stop: &[String]) -> Self {
        let stop: Vec<String> = stop.iter().filter(|s| !s.is_empty()).cloned().collect();
        let max_stop_len = stop.iter().map(String::len).max().unwrap_or(0);
        Self { stop, max_stop_len, ..Self::default() }
    }

    /// A fresh stream with the same stop sequences (an answer produced again).
    pub fn restarted(&self) -> Self {
        Self::new(&self.stop)
    }

    /// Adds one token; returns the text released now, and whether a stop sequence ends
    /// the sequence here (its text is cut just before the stop sequence). End-of-sequence
    /// tokens add no text.
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> (String, bool) {
        if tokenizer.stop_tokens.contains(&token) {
            self.stopped = true;
        } else {
            let piece = self.decoder.push(tokenizer, token);
            self.text.push_str(&piece);
        }
        // A stop sequence can only start in text not yet released (see `releasable`).
        let unreleased = &self.text[self.released..];
        let hit = self.stop.iter().filter_map(|s| unreleased.find(s.as_str())).min();
        let release_to = match hit {
            Some(pos) => self.released + pos,
            None => self.released + releasable(unreleased, &self.stop, self.max_stop_len),
        };
        let text = self.text[self.released..release_to].to_string();
        self.released = release_to;
        if hit.is_some() {
            self.text.truncate(release_to);
            self.decoder.finish();
            self.stopped = true;
        }
        (text, hit.is_some())
    }

    /// Whether the sequence has ended: a stop sequence or an end-of-sequence token.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The text still held back, released at the end of the sequence.
    pub fn finish(&mut self) -> String {
        let mut tail = self.text[self.released..].to_string();
        tail.push_str(&self.decoder.finish());
        self.released = self.text.len();
        tail
    }
}

/// How much of `text` can be released: all but the longest suffix that starts a stop sequence.
fn releasable(text: &str, stops: &[String], max_stop_len: usize) -> usize {
    if max_stop_len == 0 {
        return text.len();
    }
    let lowest = text.len().saturating_sub(max_stop_len - 1);
    for start in (lowest..text.len()).filter(|&i| text.is_char_boundary(i)) {
        let suffix = &text[start..];
        if stops.iter().any(|s| s.starts_with(suffix)) {
            return start;
        }
    }
    text.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_sequence_prefixes_are_held_back() {
        let stops = vec!["END".to_string()];
        assert_eq!(releasable("hello E", &stops, 3), 6);
        assert_eq!(releasable("hello EN", &stops, 3), 6);
        assert_eq!(releasable("hello EX", &stops, 3), 8);
        assert_eq!(releasable("hello", &[], 0), 5);
        assert_eq!(releasable("hé", &["éx".to_string()], 3), 1);
    }
}
