//! Arbitrary bytes through the OpenAI request parser and validator, as a game's HTTP body
//! reaches it: it must answer with a request or a field-named 400, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ludus::http::openai::{parse_request, Endpoint, RequestLimits};

fuzz_target!(|data: &[u8]| {
    let limits = RequestLimits { default_max_tokens: 256, max_tokens_limit: 4096 };
    for endpoint in [Endpoint::Chat, Endpoint::Completions] {
        let _ = parse_request(data, endpoint, limits);
    }
});
