//! Server-sent events for `stream: true`: one `data:` line per chunk, each choice's finish
//! chunk, the usage chunk when asked for, then `data: [DONE]`. With `n` > 1 the choices'
//! chunks interleave as their tokens arrive, each naming its `index`. An error after the
//! stream began is sent as an `error` object (OpenAI's SDKs raise it) before `[DONE]`.

use std::task::Poll;

use actix_web::web::Bytes;
use actix_web::HttpResponse;

use super::errors::ApiError;
use super::openai::{logprobs_json, ResponseMeta};
use super::structured::CallStream;
use crate::actors::catalog::TokenLogprob;
use crate::actors::messages::Admitted;
use crate::actors::{JobEvent, ServeError};
use crate::protocol::{FinishReason, TaskUsage};

fn event(value: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

const DONE: &str = "data: [DONE]\n\n";

/// One choice of the answer being streamed.
struct Choice {
    admitted: Admitted,
    /// Its first event, when it was received before the headers went out.
    pending: Option<JobEvent>,
    first: bool,
    finished: bool,
    /// Set when the answer may be a tool call.
    calls: Option<CallStream>,
    /// Log probabilities of tokens whose text is not out yet.
    logprobs: Vec<TokenLogprob>,
}

struct StreamState {
    choices: Vec<Choice>,
    meta: ResponseMeta,
    include_usage: bool,
    /// The game asked for log probabilities.
    with_logprobs: bool,
    usage: TaskUsage,
    /// The choice polled first next time (so that no choice starves the others).
    turn: usize,
    finished: bool,
}

impl StreamState {
    /// The next event of any unfinished choice, with its index; `None` when all finished.
    async fn next(&mut self) -> Option<(usize, Option<JobEvent>)> {
        if let Some(i) = self.choices.iter().position(|c| c.pending.is_some()) {
            return Some((i, self.choices[i].pending.take()));
        }
        let n = self.choices.len();
        std::future::poll_fn(|cx| {
            let mut open = false;
            for k in 0..n {
                let i = (self.turn + k) % n;
                let choice = &mut self.choices[i];
                if choice.finished {
                    continue;
                }
                open = true;
                if let Poll::Ready(event) = choice.admitted.events.poll_recv(cx) {
                    self.turn = (i + 1) % n;
                    return Poll::Ready(Some((i, event)));
                }
            }
            if open {
                Poll::Pending
            } else {
                Poll::Ready(None)
            }
        })
        .await
    }

    /// The bytes for choice `i`'s `event`.
    fn bytes(&mut self, i: usize, next: Option<JobEvent>) -> Bytes {
        let meta = &self.meta;
        let with_logprobs = self.with_logprobs;
        let choice = &mut self.choices[i];
        // Pending log probabilities ride on the next chunk of their choice.
        let attach = |mut chunk: serde_json::Value, logprobs: &mut Vec<TokenLogprob>| {
            if with_logprobs && !logprobs.is_empty() {
                chunk["choices"][0]["logprobs"] = logprobs_json(&std::mem::take(logprobs));
            }
            chunk
        };
        match next {
            Some(JobEvent::Logprobs(lp)) => {
                choice.logprobs.push(lp);
                Bytes::new()
            }
            Some(JobEvent::Text(text)) => match choice.calls.as_mut() {
                Some(calls) => {
                    let mut out = Vec::new();
                    for delta in calls.push(&text) {
                        let chunk = attach(meta.call_chunk(i, &delta, choice.first), &mut choice.logprobs);
                        out.extend_from_slice(&event(&chunk));
                        choice.first = false;
                    }
                    Bytes::from(out)
                }
                None => {
                    let chunk = attach(meta.chunk(i, Some(&text), choice.first, None), &mut choice.logprobs);
                    choice.first = false;
                    event(&chunk)
                }
            },
            // Never sent to streams (their text is already out); nothing to emit.
            Some(JobEvent::Reset) => Bytes::new(),
            Some(JobEvent::Done { finish_reason, usage, .. }) => {
                choice.finished = true;
                super::metrics::count_tokens(&usage);
                self.usage.prompt_tokens += usage.prompt_tokens;
                self.usage.completion_tokens += usage.completion_tokens;
                let mut out = Vec::new();
                let mut is_call = false;
                if let Some(calls) = choice.calls.as_mut() {
                    for delta in calls.finish(finish_reason == FinishReason::Stop) {
                        out.extend_from_slice(&event(&meta.call_chunk(i, &delta, choice.first)));
                        choice.first = false;
                    }
                    is_call = calls.is_call() && finish_reason == FinishReason::Stop;
                }
                let last = if is_call {
                    meta.call_finish_chunk(i)
                } else {
                    meta.chunk(i, None, choice.first, Some(finish_reason))
                };
                out.extend_from_slice(&event(&attach(last, &mut choice.logprobs)));
                if self.choices.iter().all(|c| c.finished) {
                    self.finished = true;
                    if self.include_usage {
                        out.extend_from_slice(&event(&self.meta.usage_chunk(self.usage)));
                    }
                    out.extend_from_slice(DONE.as_bytes());
                }
                Bytes::from(out)
            }
            Some(JobEvent::Failed(e)) => {
                // One failed choice ends the answer; dropping the others cancels them.
                self.finished = true;
                Bytes::from([event(&ApiError::from(e).body()).to_vec(), DONE.as_bytes().to_vec()].concat())
            }
            None => {
                self.finished = true;
                let e = ApiError::from(ServeError::Internal("the job ended without a result".into()));
                Bytes::from([event(&e.body()).to_vec(), DONE.as_bytes().to_vec()].concat())
            }
        }
    }
}

/// The streaming response for admitted jobs, one per choice, each with its first event if
/// it came before the headers went out. Dropping it (the game hung up) drops the jobs'
/// channels, which cancels their tasks on their nodes.
pub fn stream_response(
    admitted: Vec<(Admitted, Option<JobEvent>)>,
    meta: ResponseMeta,
    include_usage: bool,
    functions: &[String],
    with_logprobs: bool,
) -> HttpResponse {
    let choices = admitted
        .into_iter()
        .map(|(admitted, first_event)| Choice {
            admitted,
            pending: first_event,
            first: true,
            finished: false,
            calls: (!functions.is_empty()).then(|| CallStream::new(functions)),
            logprobs: Vec::new(),
        })
        .collect();
    let state = StreamState {
        choices,
        meta,
        include_usage,
        with_logprobs,
        usage: TaskUsage::default(),
        turn: 0,
        finished: false,
    };
    let body = futures_util::stream::unfold(state, |mut st| async move {
        if st.finished {
            return None;
        }
        let bytes = match st.next().await {
            Some((i, event)) => st.bytes(i, event),
            None => {
                st.finished = true;
                Bytes::from(DONE)
            }
        };
        Some((Ok::<_, actix_web::Error>(bytes), st))
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body)
}
