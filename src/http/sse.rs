//! Server-sent events for `stream: true`: one `data:` line per chunk, the finish chunk,
//! the usage chunk when asked for, then `data: [DONE]`. An error after the stream began
//! is sent as an `error` object (OpenAI's SDKs raise it) before `[DONE]`.

use actix_web::web::Bytes;
use actix_web::HttpResponse;

use super::errors::ApiError;
use super::openai::ResponseMeta;
use super::structured::CallStream;
use crate::actors::messages::Admitted;
use crate::actors::{JobEvent, ServeError};

fn event(value: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

const DONE: &str = "data: [DONE]\n\n";

struct StreamState {
    admitted: Admitted,
    /// The first event, already received before the headers went out.
    pending: Option<JobEvent>,
    meta: ResponseMeta,
    include_usage: bool,
    first: bool,
    finished: bool,
    /// Set when the answer may be a tool call.
    calls: Option<CallStream>,
}

/// The streaming response for an admitted job. Dropping it (the game hung up) drops the
/// job's channel, which cancels the task on its node.
pub fn stream_response(
    admitted: Admitted,
    first_event: JobEvent,
    meta: ResponseMeta,
    include_usage: bool,
    tools: bool,
) -> HttpResponse {
    let calls = tools.then(CallStream::default);
    let state =
        StreamState { admitted, pending: Some(first_event), meta, include_usage, first: true, finished: false, calls };
    let body = futures_util::stream::unfold(state, |mut st| async move {
        if st.finished {
            return None;
        }
        let next = match st.pending.take() {
            Some(pending) => Some(pending),
            None => st.admitted.events.recv().await,
        };
        let bytes = match next {
            Some(JobEvent::Text(text)) => match st.calls.as_mut() {
                Some(calls) => {
                    let mut out = Vec::new();
                    for delta in calls.push(&text) {
                        out.extend_from_slice(&event(&st.meta.call_chunk(&delta, st.first)));
                        st.first = false;
                    }
                    Bytes::from(out)
                }
                None => {
                    let chunk = st.meta.chunk(Some(&text), st.first, None);
                    st.first = false;
                    event(&chunk)
                }
            },
            // Never sent to streams (their text is already out); nothing to emit.
            Some(JobEvent::Reset) => Bytes::new(),
            Some(JobEvent::Done { finish_reason, usage }) => {
                st.finished = true;
                super::metrics::count_tokens(&usage);
                let mut out = Vec::new();
                let mut is_call = false;
                if let Some(calls) = st.calls.as_mut() {
                    for delta in calls.finish() {
                        out.extend_from_slice(&event(&st.meta.call_chunk(&delta, st.first)));
                        st.first = false;
                    }
                    is_call = calls.is_call() && finish_reason == crate::protocol::FinishReason::Stop;
                }
                if is_call {
                    out.extend_from_slice(&event(&st.meta.call_finish_chunk()));
                } else {
                    out.extend_from_slice(&event(&st.meta.chunk(None, st.first, Some(finish_reason))));
                }
                if st.include_usage {
                    out.extend_from_slice(&event(&st.meta.usage_chunk(usage)));
                }
                out.extend_from_slice(DONE.as_bytes());
                Bytes::from(out)
            }
            Some(JobEvent::Failed(e)) => {
                st.finished = true;
                Bytes::from([event(&ApiError::from(e).body()).to_vec(), DONE.as_bytes().to_vec()].concat())
            }
            None => {
                st.finished = true;
                let e = ApiError::from(ServeError::Internal("the job ended without a result".into()));
                Bytes::from([event(&e.body()).to_vec(), DONE.as_bytes().to_vec()].concat())
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
