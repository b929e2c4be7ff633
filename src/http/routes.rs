//! Route table and handlers. [`configure`] registers everything; the server and the
//! tests (`actix_web::test`) share it.

use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;

use super::errors::ApiError;
use super::node_ws;
use super::openai::{parse_request, Answer, Endpoint, ResponseMeta, ValidRequest};
use super::registry_api;
use super::server::AppState;
use super::settlement_api;
use super::sse::stream_response;
use crate::actors::catalog::JobText;
use crate::actors::messages::{Admit, Admitted, Authenticate, CountAs, ListModels};
use crate::actors::{JobEvent, ServeError};
use crate::inference::SamplingParams;
use crate::protocol::{TaskId, TaskUsage};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/chat/completions", web::post().to(chat_completions))
        .route("/v1/completions", web::post().to(completions))
        .route("/v1/models", web::get().to(models))
        .route("/v1/usage", web::get().to(registry_api::usage))
        .route("/admin/blocks/{number}", web::get().to(registry_api::block))
        .route("/admin/nodes", web::get().to(registry_api::nodes))
        .route("/v1/settlement", web::get().to(settlement_api::info))
        .route("/v1/settlement/payouts/{address}", web::get().to(settlement_api::payouts))
        .route("/v1/receipts/{task}/proof", web::get().to(settlement_api::receipt_proof))
        .route("/admin/epochs", web::get().to(settlement_api::epochs))
        .route("/admin/anchors", web::get().to(settlement_api::anchors))
        .route("/admin/settle", web::post().to(settlement_api::settle))
        .route("/admin/chaos/panic/{actor}", web::post().to(super::chaos_api::panic))
        .route("/ws/node", web::get().to(node_ws::upgrade))
        .route("/metrics", web::get().to(super::metrics::metrics))
        .route("/dashboard", web::get().to(super::dashboard::page))
        .route("/admin/dashboard", web::get().to(super::dashboard::data))
        .route("/health", web::get().to(health));
}

async fn chat_completions(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    complete(req, body, state, Endpoint::Chat).await
}

async fn completions(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    complete(req, body, state, Endpoint::Completions).await
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ServeError::Internal(e.to_string()).into()
}

/// Reads the body, refusing more than `limit` bytes before buffering them.
async fn read_body(req: &HttpRequest, mut payload: web::Payload, limit: usize) -> Result<web::Bytes, ApiError> {
    let declared =
        req.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit));
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_json(format!("could not read the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

pub fn bearer(req: &HttpRequest) -> Option<String> {
    let value = req.headers().get("authorization")?.to_str().ok()?;
    let key = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?.trim();
    (!key.is_empty()).then(|| key.to_string())
}

async fn complete(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
    endpoint: Endpoint,
) -> Result<HttpResponse, ApiError> {
    let ip = state.trusted_proxies.client_ip(&req);
    let attempt = state.auth_throttle.check(ip)?;
    let Some(bearer) = bearer(&req) else {
        attempt.failed();
        return Err(ServeError::Unauthorized.into());
    };
    // The key is resolved, and the request counted against its limits, before a byte of
    // the body is read: without a valid key, nobody gets the server to buffer anything, nor
    // a game that is not served (suspended, removed) or over its limits to parse and count
    // a prompt. Admit checks the status again, and the tokens budget.
    let authenticate = Authenticate { bearer: Some(bearer), count: CountAs::Completion };
    let key = match state.gateway.send(authenticate).await.map_err(internal)? {
        Ok(key) => key,
        Err(e) => {
            if matches!(e, ServeError::Unauthorized) {
                attempt.failed();
            }
            return Err(e.into());
        }
    };
    // The key is known: the attempt is over (a stream must not hold it for its life).
    drop(attempt);
    // A body trickled in holds memory: it has a deadline, like the request head.
    let body = actix_web::rt::time::timeout(state.body_timeout, read_body(&req, body, state.max_body_bytes))
        .await
        .map_err(|_| ApiError::body_timeout(state.body_timeout))??;
    let valid = parse_request(&body, endpoint, state.request_limits)?;
    // The server counts the prompt itself, on a blocking thread: tokenizing a long prompt
    // on this worker would hold the other connections it serves (games' and nodes').
    let (catalog, model, input) = (state.catalog.clone(), valid.model.clone(), valid.input.clone());
    let (prompt, prompt_ids) = web::block(move || catalog.count(&model, &input)).await.map_err(internal)??;
    let max_tokens = state.catalog.fit(&valid.model, prompt, valid.max_tokens)?;
    let text = job_text(&state, &valid).await?;
    // `n` choices are `n` tasks admitted together (each checked against the game's limits
    // and billed), with seeds seed, seed + 1, …: they run side by side, in one batch where
    // one node takes them. Dropping the admitted jobs (an error below) cancels them.
    let mut choices = Vec::with_capacity(valid.n);
    for i in 0..valid.n {
        let admit = Admit {
            key: key.clone(),
            stream: valid.stream,
            model: valid.model.clone(),
            text: text.clone(),
            prompt,
            prompt_ids: prompt_ids.clone(),
            input: valid.input.clone(),
            params: SamplingParams { seed: valid.params.seed.wrapping_add(i as u64), ..valid.params.clone() },
            max_tokens,
            stop: valid.stop.clone(),
            first_choice: i == 0,
        };
        choices.push(state.gateway.send(admit).await.map_err(internal)??);
    }
    let prefix = if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" };
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let fingerprint = super::openai::fingerprint(&valid.model);
    let meta =
        ResponseMeta { id: format!("{prefix}-{}", choices[0].id), created, model: valid.model, endpoint, fingerprint };
    // A game that leaves before its answer (a stream's first token, or the whole answer)
    // drops its jobs, which frees their nodes, or their places in the queue: actix-web
    // would not notice until it wrote the response, and the node would prefill and start
    // a task the game had left, billed.
    let socket = req.conn_data::<super::disconnect::PeerSocket>().copied();
    if valid.stream {
        // Hold the headers until the first event of any choice, so a failure before any
        // token (no node, queue timeout) gets its real status and Retry-After instead of a
        // 200. Not until every choice's: meanwhile one choice could run to its end (billed)
        // while another waited out the queue, and the game got an error for the request and
        // never read the answer it paid for. A later choice's failure ends the stream with
        // an error event (the others are cancelled, billed for what the game read).
        let first = tokio::select! {
            first = first_of_any(&mut choices) => first,
            () = super::disconnect::gone(socket) => {
                tracing::info!(task = %meta.id, "the game closed its connection before its stream began");
                return Err(ApiError::client_gone());
            }
        };
        let (at, first) = first.ok_or_else(|| internal("the job ended without a result"))?;
        if let JobEvent::Failed(e) = first {
            return Err(e.into());
        }
        let mut first = Some(first);
        let streams =
            choices.into_iter().enumerate().map(|(i, c)| (c, if i == at { first.take() } else { None })).collect();
        let logprobs = valid.params.logprobs.is_some();
        return Ok(stream_response(streams, meta, valid.include_usage, &valid.structured.functions, logprobs));
    }
    let answers = tokio::select! {
        answers = futures_util::future::join_all(choices.iter_mut().map(whole_answer)) => answers,
        () = super::disconnect::gone(socket) => {
            tracing::info!(task = %meta.id, "the game closed its connection before its answer was ready");
            return Err(ApiError::client_gone());
        }
    };
    // Each finished choice is billed (its receipt is on the books). When some choices
    // failed (one waited out the queue), the game gets those that finished rather than an
    // error for a request it pays for: the answer lists them with their indexes, and the
    // failed ones under `failed_choices`. Only when none finished is it an error.
    let (mut done, mut failed) = (Vec::with_capacity(answers.len()), Vec::new());
    let (mut total, mut billed) = (TaskUsage::default(), None);
    for (index, answer) in answers.into_iter().enumerate() {
        match answer {
            Ok((answer, usage, task)) => {
                billed.get_or_insert(task);
                super::metrics::count_tokens(&usage);
                total.prompt_tokens += usage.prompt_tokens;
                total.completion_tokens += usage.completion_tokens;
                done.push((index, answer));
            }
            Err(e) => failed.push((index, e)),
        }
    }
    if done.is_empty() {
        let (_, first) = failed.into_iter().next().ok_or_else(|| internal("a request with no choice"))?;
        return Err(first);
    }
    // The answer is named by the task billed for its lowest-numbered finished choice: a
    // game that audits it (`ludus verify-receipt`) finds the receipt it paid, also when
    // the answer was produced again after its first node failed a check.
    let mut meta = meta;
    if let Some(task) = billed {
        meta.id = format!("{prefix}-{task}");
    }
    let logprobs = valid.params.logprobs.is_some();
    let finished = done.len();
    let mut whole = meta.full(done, total, &valid.structured.functions, logprobs);
    if !failed.is_empty() {
        tracing::info!(task = %meta.id, failed = failed.len(), finished, "choices failed; answered with those that finished");
        whole.body["failed_choices"] = failed_choices(&failed);
    }
    // Tens of megabytes with `n`, long answers and `top_logprobs`: written off the worker.
    let body = web::block(move || serde_json::to_vec(&whole)).await.map_err(internal)?.map_err(internal)?;
    Ok(HttpResponse::Ok().content_type(actix_web::http::header::ContentType::json()).body(body))
}

/// `[{"index", "error": {…}}]`: the choices of a whole answer that failed, each with the
/// error it would have had alone.
fn failed_choices(failed: &[(usize, ApiError)]) -> serde_json::Value {
    failed.iter().map(|(index, e)| serde_json::json!({"index": index, "error": e.body()["error"]})).collect()
}

/// One job's answer to its end, its usage, and the task billed for it.
async fn whole_answer(admitted: &mut Admitted) -> Result<(Answer, TaskUsage, TaskId), ApiError> {
    let (mut text, mut logprobs) = (String::new(), Vec::new());
    while let Some(event) = admitted.events.recv().await {
        match event {
            JobEvent::Text(t) => text.push_str(&t),
            JobEvent::Logprobs(lp) => logprobs.push(lp),
            JobEvent::Reset => {
                text.clear();
                logprobs.clear();
            }
            JobEvent::Done { finish_reason, usage, task } => {
                return Ok((Answer { text, finish: finish_reason, logprobs }, usage, task))
            }
            JobEvent::Failed(e) => return Err(e.into()),
        }
    }
    Err(internal("the job ended without a result"))
}

/// The first event of any of `choices`, with the choice's index (`None`: one ended
/// without any).
async fn first_of_any(choices: &mut [Admitted]) -> Option<(usize, JobEvent)> {
    std::future::poll_fn(|cx| {
        for (i, choice) in choices.iter_mut().enumerate() {
            if let std::task::Poll::Ready(event) = choice.events.poll_recv(cx) {
                return std::task::Poll::Ready(event.map(|e| (i, e)));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// The text the game will read, made by the server from the ids nodes return
/// ([`crate::actors::catalog::Catalog::job_text`]); a grammar is compiled off the worker
/// thread (a big schema takes milliseconds).
async fn job_text(state: &AppState, valid: &ValidRequest) -> Result<Option<JobText>, ApiError> {
    let (catalog, field) = (state.catalog.clone(), valid.structured.field);
    let (model, params, stop) = (valid.model.clone(), valid.params.clone(), valid.stop.clone());
    let made = if params.grammar.is_some() {
        web::block(move || catalog.job_text(&model, &params, &stop, field)).await.map_err(internal)?
    } else {
        catalog.job_text(&model, &params, &stop, field)
    };
    made.map_err(|refusal| ApiError::invalid(refusal.field, refusal.message))
}

async fn models(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let list = state.distributor.send(ListModels).await.map_err(internal)?;
    let data: Vec<_> = list
        .into_iter()
        .map(|(id, nodes)| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "ludus", "nodes": nodes}))
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({"object": "list", "data": data})))
}

/// Liveness for load balancers: the current block, and the servers of the network this
/// one sees (itself included; 1 when it works alone).
async fn health(state: web::Data<AppState>) -> HttpResponse {
    let block = state.clock.send(crate::actors::clock::CurrentBlock).await.ok();
    let servers = state.peers.servers(std::time::Instant::now());
    HttpResponse::Ok().json(serde_json::json!({"status": "ok", "block": block, "servers": servers}))
}
