//! Server-sent events for `stream: true`: one `data:` line per chunk, the finish chunk,
//! the usage chunk when asked for, then `data: [DONE]`. An error after the stream began
//! is sent as an `error` object (OpenAI's SDKs raise it) before `[DONE]`.

use actix_web::web::Bytes;
use actix_web::HttpResponse;

use super::errors::ApiError;
use super::openai::ResponseMeta;
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
}

/// The streaming response for an admitted job. Dropping it (the game hung up) drops the
/// job's channel, which cancels the task on its node.
pub fn stream_response(
    admitted: Admitted,
    first_event: JobEvent,
    meta: ResponseMeta,
    include_usage: bool,
) -> HttpResponse {
    let state = StreamState { admitted, pending: Some(first_event), meta, include_usage, first: true, finished: false };
    let body = futures_util::stream::unfold(state, |mut st| async move {
        if st.finished {
            return None;
        }
        let next = match st.pending.take() {
            Some(pending) => Some(pending),
            None => st.admitted.events.recv().await,
        };
        let bytes = match next {
            Some(JobEvent::Text(text)) => {
                let chunk = st.meta.chunk(Some(&text), st.first, None);
                st.first = false;
                event(&chunk)
            }
            // Never sent to streams (their text is already out); nothing to emit.
            Some(JobEvent::Reset) => Bytes::new(),
            Some(JobEvent::Done { finish_reason, usage }) => {
                st.finished = true;
                super::metrics::count_tokens(&usage);
                let mut out = event(&st.meta.chunk(None, st.first, Some(finish_reason))).to_vec();
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
