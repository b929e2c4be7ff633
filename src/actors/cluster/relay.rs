//! A job that crosses servers, from both ends: [`forward`] on the server that holds the
//! game's connection, [`serve`] on the one whose node runs it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Addr, Recipient};
use bytes::Bytes;
use futures_util::StreamExt;

use super::charges::AwaitedCharges;
use super::sequenced::{self, Reorder, SentEvents, LAST_ASK_GRACE, SEQ_HEADER};
use super::wire::{cancel_subject, job_subject, reply_subject, resend_subject, ForwardedJob, RemoteEvent, KEEPALIVE};
use super::write_offs::WriteOffs;
use super::Peers;
use crate::actors::catalog::Catalog;
use crate::actors::distributor::Distributor;
use crate::actors::error::ServeError;
use crate::actors::messages::{Billing, Job, JobEvent, JobRequest, RecordUsage, Submit};
use crate::protocol::TaskUsage;

/// How often a forwarding server checks that the server running its job is still there.
const LIVENESS_CHECK: Duration = Duration::from_millis(500);

/// When a cancellation is sent again.
const CANCEL_REPEAT: Duration = Duration::from_millis(500);

/// How long the events of a job whose game left are still read: a `Done` already on its
/// way is charged to the game like any other.
const HANG_UP_GRACE: Duration = Duration::from_secs(2);

/// The shortest silence after which a forwarded job is given up (the running server
/// sends an event, or a keepalive, every [`KEEPALIVE`]); longer when the peers' timeout is.
const SILENCE_FLOOR: Duration = Duration::from_secs(5);

/// What the origin of a forwarded job needs besides the job.
pub struct Forwarding {
    pub client: async_nats::Client,
    /// This server's name.
    pub origin: String,
    /// The process this server runs as ([`super::wire::Advert::instance`]).
    pub instance: u64,
    pub peers: Arc<Peers>,
    /// This server's Gateway: the game's tokens per minute are charged where it was admitted.
    pub usage: Recipient<RecordUsage>,
    /// Where a hang-up's charge from the running server is awaited.
    pub charges: Arc<AwaitedCharges>,
    /// Where an answer given up is written off.
    pub write_offs: Arc<WriteOffs>,
}

/// Tells `runner` to stop `task`: now, and once more a moment later (a cancel that
/// overtook the job itself on its way is not lost; a second one is ignored).
fn cancel(client: &async_nats::Client, subject: &str) {
    let (client, subject) = (client.clone(), subject.to_string());
    actix::spawn(async move {
        let _ = client.publish(subject.clone(), Bytes::new()).await;
        actix_web::rt::time::sleep(CANCEL_REPEAT).await;
        let _ = client.publish(subject, Bytes::new()).await;
    });
}

/// Sends `job` to server `to` and relays its events to the game until the last one, the
/// game leaving (the other server is told to cancel), or `to` going silent (the game gets
/// a clear error, and `to` is told to cancel should it come back).
pub async fn forward(ctx: Forwarding, to: String, job: Job) {
    let Forwarding { client, origin, instance, peers, usage, charges, write_offs } = ctx;
    let task = job.id;
    // The most the job can count: whatever a server says, no more is charged to the game.
    let bound = u64::from(job.prompt.tokens).saturating_add(job.max_tokens as u64);
    let charge = |usage_of: &TaskUsage| {
        if !job.key_hash.is_empty() {
            let tokens = (usage_of.prompt_tokens.saturating_add(usage_of.completion_tokens) as u64).min(bound);
            usage.do_send(RecordUsage { key_hash: job.key_hash.clone(), tokens: tokens as usize });
        }
    };
    let (reply, stop) = (reply_subject(&origin, task, &to), cancel_subject(&to, task, &origin));
    let resend = resend_subject(&to, task, &origin);
    let ask_again = |request: String| {
        let (client, resend) = (client.clone(), resend.clone());
        actix::spawn(async move {
            let _ = client.publish(resend, request.into()).await;
        });
    };
    let fail = |job: &Job, e: ServeError| {
        let _ = job.events.send(JobEvent::Failed(e));
    };
    let mut events = match client.subscribe(reply.clone()).await {
        Ok(s) => s,
        Err(e) => return fail(&job, ServeError::Unavailable(format!("the cluster link failed: {e}"))),
    };
    let message = ForwardedJob {
        task,
        origin: origin.clone(),
        game: job.game.clone(),
        game_id: job.game_id,
        key_hash: job.key_hash.clone(),
        model: job.model.clone(),
        input: job.input.clone(),
        params: job.params.clone(),
        max_tokens: job.max_tokens,
        stop: job.stop.clone(),
        stream: job.stream,
        grammar_field: job.text.as_ref().and_then(|t| t.grammar_field()).map(str::to_string),
        origin_instance: Some(instance),
    };
    // The process it goes to: one heard under the same name as another process later is
    // a restart, which lost the job (its adverts alone would keep it "alive" for ever).
    // (The process that runs it names itself in its keepalives: a restart just before the
    // job was sent, not yet heard, is no loss.)
    let (mut runner, sent) = (peers.instance(&to), Instant::now());
    let payload = serde_json::to_vec(&message).expect("jobs serialize");
    if let Err(e) = client.publish(job_subject(&to, &origin), payload.into()).await {
        return fail(&job, ServeError::Unavailable(format!("could not reach server `{to}`: {e}")));
    }
    tracing::info!(task = %task, server = %to, model = %job.model, "job forwarded");
    let mut check = actix_web::rt::time::interval(LIVENESS_CHECK);
    // A message lost on NATS (a `Done` published while a link was down, or the job itself)
    // would hold the game until its balancer's timeout, its tokens held from its budget:
    // the running server speaks at least every KEEPALIVE, and silence ends the job.
    // (An older server sends no keepalive: its jobs keep only the liveness check.)
    let (silence, mut heard) = (peers.timeout().max(SILENCE_FLOOR), Instant::now());
    let keeps_alive = peers.keeps_alive(&to);
    // Numbered events are relayed in order, a missing one asked for again
    // ([`sequenced`]); `last_ask`: when a silent job was last asked for what it sent.
    let (mut order, mut last_ask) = (Reorder::default(), None::<Instant>);
    let mut relayed_whole = false;
    // Why the job was given up after it was sent, the game getting an error instead of
    // its answer: the answer is then written off, whatever the running server bills.
    let mut lost: Option<String> = None;
    // Ends the job with `error` before its end came through: the running server is told
    // to stop, and the game's tokens per minute are charged by a `Done` held behind a
    // hole (billed where it ran), or else by the hang-up charge that server sends.
    let give_up = |order: &Reorder, error: ServeError| {
        match order.held_done() {
            Some(usage) => charge(&usage),
            None if !job.key_hash.is_empty() => {
                charges.expect(task, &to, &job.key_hash, bound, Instant::now());
            }
            None => {}
        }
        cancel(&client, &stop);
        fail(&job, error);
    };
    'relay: loop {
        tokio::select! {
            message = events.next() => {
                let Some(message) = message else {
                    lost = Some("the cluster link closed".into());
                    fail(&job, ServeError::Unavailable(not_billed("the cluster link closed")));
                    cancel(&client, &stop);
                    break;
                };
                (heard, last_ask) = (Instant::now(), None);
                let event = match serde_json::from_slice::<RemoteEvent>(&message.payload) {
                    Ok(event) => event,
                    Err(e) => {
                        let reason = format!("server `{to}` sent a malformed event: {e}");
                        fail(&job, ServeError::Internal(not_billed(&reason)));
                        lost = Some(reason);
                        cancel(&client, &stop);
                        break;
                    }
                };
                let sent = match event {
                    RemoteEvent::Alive { instance, sent } => {
                        runner = Some(instance);
                        sent
                    }
                    event => {
                        let ready = match order.accept(sequenced::seq_of(&message), event, message.payload.len()) {
                            Ok(ready) => ready,
                            Err(e) => {
                                tracing::warn!(task = %task, server = %to, expected = e.expected, got = e.got,
                                    "a forwarded job's events came too far out of order; given up");
                                let reason = format!(
                                    "server `{to}` lost part of the answer on the way (event {} of {})", e.expected, e.got
                                );
                                give_up(&order, ServeError::NodeFailed(not_billed(&reason)));
                                lost = Some(reason);
                                break;
                            }
                        };
                        for (i, event) in ready.into_iter().enumerate() {
                            let ends = event.ends();
                            if let RemoteEvent::Done { usage, .. } = &event {
                                charge(usage);
                            }
                            // Those after the first waited behind a lost event, where the
                            // game could not read them: their burst is not the game's doing.
                            match event.for_game(task) {
                                Some(event) if i == 0 => { let _ = job.events.send(event); }
                                Some(event) => { let _ = job.events.send_released(event); }
                                None => {}
                            }
                            if ends {
                                relayed_whole = true;
                                break 'relay;
                            }
                        }
                        None
                    }
                };
                if order.missing(sent) {
                    if order.stalled() {
                        tracing::warn!(task = %task, server = %to, "events of a forwarded job never came again; given up");
                        let reason = format!("server `{to}` lost part of the answer on the way and could not send it again");
                        give_up(&order, ServeError::NodeFailed(not_billed(&reason)));
                        lost = Some(reason);
                        break;
                    }
                    if let Some(request) = order.ask(Instant::now()) {
                        tracing::info!(task = %task, server = %to, %request, "events of a forwarded job went missing; asked again");
                        ask_again(request);
                    }
                }
            }
            _ = job.events.closed() => {
                cancel(&client, &stop);
                // A `Done` held behind a hole was counted as relayed there: no hang-up
                // charge follows it, so it is charged here.
                if let Some(usage) = order.held_done() {
                    charge(&usage);
                    break;
                }
                // The runner charges what the game received (`Charge`), unless a `Done`
                // already on its way arrives first: that one is charged here.
                if !job.key_hash.is_empty() && !charges.expect(task, &to, &job.key_hash, bound, Instant::now()) {
                    tracing::warn!(task = %task, server = %to, "too many hang-up charges awaited; this one is not");
                }
                if let Some(done) = done_within(&mut events, HANG_UP_GRACE).await {
                    charges.forget(task);
                    charge(&done);
                }
                break;
            }
            _ = check.tick() => {
                if !peers.alive(&to, Instant::now()) {
                    tracing::warn!(task = %task, server = %to, "the server running a forwarded job went silent");
                    let reason = format!("server `{to}`, which was running it, stopped answering");
                    fail(&job, ServeError::NodeFailed(not_billed(&reason)));
                    lost = Some(reason);
                    cancel(&client, &stop);
                    break;
                }
                if runner.is_some_and(|runner| peers.restarted(&to, runner, sent)) {
                    tracing::warn!(task = %task, server = %to, "the server running a forwarded job restarted");
                    let reason = format!("server `{to}`, which was running it, restarted");
                    fail(&job, ServeError::NodeFailed(not_billed(&reason)));
                    lost = Some(reason);
                    cancel(&client, &stop);
                    break;
                }
                if keeps_alive && heard.elapsed() >= silence && last_ask.is_none() {
                    // Its last events (its `Done`) may be what was lost: asked for once
                    // more before the job is given up.
                    last_ask = Some(Instant::now());
                    ask_again(order.ask_now(Instant::now()));
                    continue;
                }
                if keeps_alive && heard.elapsed() >= silence && last_ask.is_some_and(|at| at.elapsed() >= LAST_ASK_GRACE) {
                    tracing::warn!(task = %task, server = %to, silent_ms = heard.elapsed().as_millis() as u64,
                        "a forwarded job fell silent; given up");
                    // Should the job still run there, its server charges what it made once
                    // cancelled: that charge is awaited, as for a game that left. (A `Done`
                    // lost on the way, and not sent again, was billed there and is not
                    // charged here.)
                    let reason = format!("server `{to}`, which was running it, sent nothing for {} s", silence.as_secs());
                    give_up(&order, ServeError::NodeFailed(not_billed(&reason)));
                    lost = Some(reason);
                    break;
                }
            }
        }
    }
    // Everything came: the running server need not keep the events for asking again
    // (an older one no longer listens; nothing is cancelled by this).
    if relayed_whole {
        let _ = client.publish(stop, Bytes::new()).await;
    }
    if let Some(reason) = lost {
        peers.undelivered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A `Done` held behind the hole may name another task: the answer produced again
        // there under a new id (its first node failed a synchronous check), billed by it.
        if let Some(billed) = order.held_done_task().filter(|&billed| billed != task) {
            write_offs.record(billed, &origin, &reason);
        }
        write_offs.record(task, &origin, &reason);
    }
    let _ = events.unsubscribe().await;
}

/// What the game reads when its answer is given up: the reason, and that it pays nothing.
fn not_billed(reason: &str) -> String {
    format!("{reason}; this answer is not billed")
}

/// The usage of a `Done` that arrives on `events` within `grace` (other events skipped;
/// `None` at a failure, a malformed event or the end of the wait).
async fn done_within(events: &mut async_nats::Subscriber, grace: Duration) -> Option<TaskUsage> {
    let wait = async {
        while let Some(message) = events.next().await {
            match serde_json::from_slice::<RemoteEvent>(&message.payload).ok()? {
                RemoteEvent::Done { usage, .. } => return Some(usage),
                event if event.ends() => return None,
                _ => {}
            }
        }
        None
    };
    actix_web::rt::time::timeout(grace, wait).await.ok().flatten()
}

/// What a server needs to run others' jobs.
#[derive(Clone)]
pub struct Serving {
    pub client: async_nats::Client,
    pub distributor: Addr<Distributor>,
    pub catalog: Arc<Catalog>,
    pub max_tokens_limit: usize,
    pub peers: Arc<Peers>,
    /// This server's name.
    pub name: String,
    /// The process this server runs as ([`super::wire::Advert::instance`]).
    pub instance: u64,
    /// Where a job that can no longer reach its game is written off.
    pub write_offs: Arc<WriteOffs>,
}

/// Runs a job server `publisher` forwarded, as a request of this server's own, and sends
/// its events back in order until the last one or a cancellation.
pub async fn serve(ctx: Serving, publisher: String, payload: Bytes) {
    let forwarded = match serde_json::from_slice::<ForwardedJob>(&payload) {
        Ok(f) if f.origin == publisher => f,
        Ok(_) => return tracing::warn!(%publisher, "forwarded job naming another origin than its publisher ignored"),
        Err(e) => return tracing::warn!(error = %e, "malformed forwarded job ignored"),
    };
    let task = forwarded.task;
    // An origin of a release before keepalives never asks for events again: nothing is
    // kept for it, and nothing lingers.
    let mut replies = Replies {
        client: ctx.client.clone(),
        subject: reply_subject(&publisher, task, &ctx.name),
        sent: SentEvents::new(forwarded.origin_instance.is_some()),
        instance: ctx.instance,
    };
    // Subscribed before the job starts: a cancellation, or a request for events again,
    // cannot slip past.
    let subscribed = futures_util::future::try_join(
        ctx.client.subscribe(cancel_subject(&ctx.name, task, &publisher)),
        ctx.client.subscribe(resend_subject(&ctx.name, task, &publisher)),
    );
    let (mut cancel, mut resend) = match subscribed.await {
        Ok(both) => both,
        Err(e) => {
            replies.send(RemoteEvent::Failed(ServeError::Unavailable(format!("the cluster link failed: {e}")))).await;
            return;
        }
    };
    let (events, mut rx) = crate::actors::job_events::unlimited();
    let (origin, origin_instance) = (forwarded.origin.clone(), forwarded.origin_instance);
    match admit(&ctx, forwarded, events).await {
        Ok(job) => match ctx.distributor.send(Submit(job)).await {
            Ok(Ok(())) => {
                ctx.peers.served_for_others.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(task = %task, %origin, "running a job forwarded by another server")
            }
            Ok(Err(e)) => {
                replies.send(RemoteEvent::Failed(e)).await;
                return linger(&mut replies, &mut resend, &mut cancel, ctx.peers.timeout()).await;
            }
            Err(e) => {
                replies.send(RemoteEvent::Failed(ServeError::Internal(format!("distributor unavailable: {e}")))).await;
                return linger(&mut replies, &mut resend, &mut cancel, ctx.peers.timeout()).await;
            }
        },
        Err(e) => {
            replies.send(RemoteEvent::Failed(e)).await;
            return linger(&mut replies, &mut resend, &mut cancel, ctx.peers.timeout()).await;
        }
    }
    let (mut check, started) = (actix_web::rt::time::interval(LIVENESS_CHECK), std::time::Instant::now());
    // Origins of this release (they name their process) give a silent job up: told every
    // KEEPALIVE that this one holds it. An older origin would take the word for a
    // malformed event.
    let (mut keepalive, keeps_alive) = (actix_web::rt::time::interval(KEEPALIVE), origin_instance.is_some());
    // Why the answer can no longer reach its game, when this server stops the job for it
    // (not when its origin cancels it: the origin decides then): written off here too, for
    // an origin that died cannot.
    let mut unreachable: Option<String> = None;
    let finished = loop {
        tokio::select! {
            _ = keepalive.tick(), if keeps_alive => {
                if !replies.alive().await {
                    unreachable = Some("the cluster link failed while the job ran".into());
                    break false;
                }
            }
            Some(request) = resend.next() => replies.again(&request.payload).await,
            _ = check.tick() => {
                // Its server is gone: nobody can read the rest; dropping `rx` cancels the job.
                // (An origin not heard of yet is given the peers' timeout: this server may
                // have started after its last advert.)
                let heard_long_enough = started.elapsed() >= ctx.peers.timeout();
                if heard_long_enough && !ctx.peers.alive(&origin, std::time::Instant::now()) {
                    tracing::warn!(task = %task, %origin, "the server that forwarded a job went silent; cancelling it");
                    unreachable = Some(format!("server `{origin}`, which held the game's connection, went silent"));
                    break false;
                }
                // Restarted under its name: its adverts say "alive", but the process that
                // holds the game's connection is gone; the rest would be billed unread.
                if origin_instance.is_some_and(|instance| ctx.peers.restarted(&origin, instance, started)) {
                    tracing::warn!(task = %task, %origin, "the server that forwarded a job restarted; cancelling it");
                    unreachable = Some(format!("server `{origin}`, which held the game's connection, restarted"));
                    break false;
                }
            }
            event = rx.recv() => {
                let event = event.map_or_else(
                    || RemoteEvent::Failed(ServeError::Internal("the job ended without a result".into())),
                    RemoteEvent::from,
                );
                let ends = event.ends();
                // NATS gone: nobody can read the rest; dropping `rx` cancels the job.
                if !replies.send(event).await {
                    unreachable = Some("the cluster link failed while the job ran".into());
                    break false;
                }
                if ends {
                    break true;
                }
            }
            _ = cancel.next() => {
                tracing::info!(task = %task, "forwarded job cancelled by its server");
                // A `Done` already here was counted as relayed (no hang-up charge follows
                // it): it goes on, for the origin to charge the game by it.
                while let Some(event) = rx.try_recv() {
                    if matches!(event, JobEvent::Done { .. }) {
                        replies.send(RemoteEvent::from(event)).await;
                    }
                }
                break false;
            }
        }
    };
    if let Some(reason) = unreachable {
        ctx.peers.undelivered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ctx.write_offs.record(task, &ctx.name, &reason);
    }
    // Its last events may be lost on the way: they stay to be asked for again a while.
    if finished {
        drop(rx);
        linger(&mut replies, &mut resend, &mut cancel, ctx.peers.timeout()).await;
    }
    let _ = cancel.unsubscribe().await;
    let _ = resend.unsubscribe().await;
}

/// The events of one forwarded job, numbered, on their way back to its origin.
struct Replies {
    client: async_nats::Client,
    subject: String,
    sent: SentEvents,
    /// The process this server runs as, for keepalives.
    instance: u64,
}

impl Replies {
    /// Numbers `event`, keeps it and sends it (`false`: NATS is gone).
    async fn send(&mut self, event: RemoteEvent) -> bool {
        let (seq, payload) = self.sent.push(&event);
        self.publish(seq, payload).await
    }

    async fn publish(&self, seq: u64, payload: Bytes) -> bool {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(SEQ_HEADER, seq.to_string().as_str());
        self.client.publish_with_headers(self.subject.clone(), headers, payload).await.is_ok()
    }

    /// A keepalive: this process holds the job and has sent this many events.
    async fn alive(&self) -> bool {
        let event = RemoteEvent::Alive { instance: self.instance, sent: Some(self.sent.count()) };
        let payload = serde_json::to_vec(&event).expect("events serialize");
        self.client.publish(self.subject.clone(), payload.into()).await.is_ok()
    }

    /// Answers a request for events again ([`sequenced::parse_request`]): those asked
    /// that are still kept, unless the same was answered a moment ago.
    async fn again(&mut self, request: &[u8]) {
        let Some((from, to)) = sequenced::parse_request(request) else { return };
        if !self.sent.answer(from, Instant::now()) {
            return;
        }
        tracing::info!(subject = %self.subject, from, ?to, sent = self.sent.count(), "events of a forwarded job sent again");
        for (seq, payload) in self.sent.range(from, to) {
            if !self.publish(seq, payload).await {
                return;
            }
        }
    }
}

/// After a job's last event: says every [`KEEPALIVE`] how many events were sent (an
/// origin missing the last ones asks for them at once) and answers requests for them,
/// until the origin has them all (it says so on the cancel subject) or would have given
/// the job up (`peer_timeout`, at least [`SILENCE_FLOOR`], and the last request's grace).
async fn linger(
    replies: &mut Replies,
    resend: &mut async_nats::Subscriber,
    cancel: &mut async_nats::Subscriber,
    peer_timeout: Duration,
) {
    if !replies.sent.keeps() {
        return;
    }
    let until = Instant::now() + peer_timeout.max(SILENCE_FLOOR) + LAST_ASK_GRACE * 2;
    let deadline = actix_web::rt::time::sleep_until(until.into());
    tokio::pin!(deadline);
    let mut keepalive = actix_web::rt::time::interval(KEEPALIVE);
    loop {
        tokio::select! {
            () = &mut deadline => return,
            _ = cancel.next() => return,
            _ = keepalive.tick() => {
                if !replies.alive().await {
                    return;
                }
            }
            request = resend.next() => match request {
                Some(request) => replies.again(&request.payload).await,
                None => return,
            },
        }
    }
}

/// The job for a forwarded request: checked against this server's own bounds, its prompt
/// counted and its text made here (this server bills it).
async fn admit(
    ctx: &Serving,
    f: ForwardedJob,
    events: crate::actors::job_events::EventSender,
) -> Result<Job, ServeError> {
    f.params.validate().map_err(|e| ServeError::Rejected(e.to_string()))?;
    if f.max_tokens == 0 || f.max_tokens > ctx.max_tokens_limit {
        return Err(ServeError::Rejected(format!("max_tokens must be 1..={}", ctx.max_tokens_limit)));
    }
    // Counted off this thread, which the Gateway, Distributor and Completion share.
    let (catalog, model, input) = (ctx.catalog.clone(), f.model.clone(), f.input.clone());
    let (prompt, prompt_ids) = tokio::task::spawn_blocking(move || catalog.count(&model, &input))
        .await
        .map_err(|e| ServeError::Internal(e.to_string()))??;
    let max_tokens = ctx.catalog.fit(&f.model, prompt, f.max_tokens)?;
    let (catalog, model, params, stop) = (ctx.catalog.clone(), f.model.clone(), f.params.clone(), f.stop.clone());
    let field = if f.grammar_field.as_deref() == Some("tools") { "tools" } else { "response_format" };
    let text = tokio::task::spawn_blocking(move || catalog.job_text(&model, &params, &stop, field))
        .await
        .map_err(|e| ServeError::Internal(e.to_string()))?
        .map_err(|refusal| ServeError::Rejected(refusal.message))?;
    let billing = Billing { game: f.game, game_id: f.game_id, key_hash: f.key_hash };
    let request = JobRequest {
        model: f.model,
        input: f.input,
        prompt,
        prompt_ids,
        text,
        params: f.params,
        max_tokens,
        stop: f.stop,
        stream: f.stream,
    };
    let mut job = Job::new(f.task, billing, request, events);
    job.origin = Some(f.origin);
    Ok(job)
}
