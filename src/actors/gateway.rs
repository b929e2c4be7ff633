//! The Gateway: authenticates bearer keys against the registry's `api_keys` (stored
//! hashed), rejects suspended games and keys over their per-minute limits (this server's
//! share of them when several servers form one network), turns an
//! admitted request into a [`Job`] and submits it to the Distributor.
//!
//! Key lookups are cached for [`KEY_CACHE_TTL`], so a suspension or a new key takes
//! effect within seconds without a database round trip per request; while the database
//! is unreachable, cached keys keep working (stale) and unknown ones get a 503.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use rand::RngCore;

use super::cluster::Peers;
use super::distributor::Distributor;
use super::error::ServeError;
use super::messages::*;
use super::rate_limit::Bucket;
use crate::ledger::games::{GameStatus, SuspendedBy};
use crate::ledger::{hash_key, KeyInfo, Store};
use crate::protocol::TaskId;

/// Messages that may wait in the mailbox before `send` callers wait (do_send never does).
const MAILBOX_CAPACITY: usize = 65_536;
/// How long a key lookup (found or not) is trusted.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(2);
/// Cached lookups kept at most (unknown keys included); the cache is cleared beyond.
const KEY_CACHE_MAX: usize = 100_000;

struct KeyLimits {
    requests: Bucket,
    tokens: Bucket,
    /// Servers in the network when the buckets were sized (each admits its share).
    servers: usize,
}

pub struct Gateway {
    store: Store,
    distributor: Addr<Distributor>,
    keys: HashMap<String, (Option<KeyInfo>, Instant)>,
    limits: HashMap<String, KeyLimits>,
    next_task: AtomicU64,
    /// The other servers of the network: this one admits 1/N of each key's limits.
    peers: Arc<Peers>,
    /// Bytes of tokens a request may leave unread per choice before its job is ended
    /// ([`super::job_events`]).
    unread_limit: usize,
}

impl Gateway {
    pub fn new(store: Store, distributor: Addr<Distributor>, peers: Arc<Peers>, unread_limit: usize) -> Self {
        // Task ids start at a random base so they stay unique across restarts.
        let base = rand::rng().next_u64() & 0xffff_ffff_0000_0000;
        Self {
            store,
            distributor,
            keys: HashMap::new(),
            limits: HashMap::new(),
            next_task: AtomicU64::new(base),
            peers,
            unread_limit,
        }
    }

    /// The key's record: from the cache when fresh, else from the database.
    fn resolve(&mut self, bearer: Option<String>) -> ResponseActFuture<Self, Result<KeyInfo, ServeError>> {
        let Some(key) = bearer else { return Box::pin(fut::ready(Err(ServeError::Unauthorized))) };
        let hash = hash_key(&key);
        if let Some((info, at)) = self.keys.get(&hash) {
            if at.elapsed() < KEY_CACHE_TTL {
                return Box::pin(fut::ready(info.clone().ok_or(ServeError::Unauthorized)));
            }
        }
        let store = self.store.clone();
        let lookup_hash = hash.clone();
        Box::pin(async move { store.lookup_key(&lookup_hash).await }.into_actor(self).map(move |found, this, _| {
            match found {
                Ok(info) => {
                    if this.keys.len() >= KEY_CACHE_MAX {
                        this.keys.clear();
                    }
                    this.keys.insert(hash, (info.clone(), Instant::now()));
                    info.ok_or(ServeError::Unauthorized)
                }
                // Database down: a key seen before keeps working.
                Err(e) => match this.keys.get(&hash) {
                    Some((Some(info), _)) => Ok(info.clone()),
                    _ => Err(ServeError::Unavailable(e.to_string())),
                },
            }
        }))
    }

    /// The key's buckets, sized for this server's share of its limits.
    fn limits(&mut self, info: &KeyInfo, now: Instant) -> &mut KeyLimits {
        let servers = self.peers.limit_share(now);
        let (rpm, tpm) = (info.requests_per_minute, info.tokens_per_minute);
        let limits = self.limits.entry(info.hash.clone()).or_insert_with(|| KeyLimits {
            requests: Bucket::per_minute_share(rpm, servers, now),
            tokens: Bucket::per_minute_share(tpm, servers, now),
            servers,
        });
        if limits.servers != servers {
            limits.requests = limits.requests.reshared(rpm, servers, now);
            limits.tokens = limits.tokens.reshared(tpm, servers, now);
            limits.servers = servers;
        }
        limits
    }

    /// Counts a request against the key's requests per minute as soon as its key is known,
    /// before its body is read, parsed and tokenized: a key over its limits (or sending
    /// thousands of requests at once) costs the server a lookup, not a 512 KB body each. A
    /// completion is refused, too, while the key's tokens per minute are spent.
    fn count(&mut self, info: &KeyInfo, count: CountAs) -> Result<(), ServeError> {
        let now = Instant::now();
        let limits = self.limits(info, now);
        if count == CountAs::Completion {
            limits.tokens.check_positive(now).map_err(|retry_after| tokens_refused(info, retry_after))?;
        }
        if count != CountAs::Nothing {
            limits.requests.take(1.0, now).map_err(|retry_after| requests_refused(info, retry_after))?;
        }
        Ok(())
    }

    /// Status and per-minute limits of a choice of a request [`Gateway::count`] counted;
    /// holds `reserve` tokens (a job's prompt and max_tokens) from the key's budget. A
    /// request's first choice is admitted while its key's tokens per minute are not spent,
    /// and its later ones go with it. A request is one request whatever its `n`, as
    /// OpenAI counts it: each choice taking one more could never pass on a key whose
    /// per-minute share is below `n`, and each try spent the share its other requests
    /// needed (its choices' tokens are held all the same).
    fn check(&mut self, info: &KeyInfo, reserve: usize, first_choice: bool) -> Result<(), ServeError> {
        served(info)?;
        let now = Instant::now();
        let limits = self.limits(info, now);
        if first_choice {
            limits.tokens.check_positive(now).map_err(|retry_after| tokens_refused(info, retry_after))?;
        }
        // Usage is only known once a job ends: without the hold, any number of requests
        // sent together would each find the budget whole.
        limits.tokens.hold(reserve as f64);
        Ok(())
    }
}

fn tokens_refused(info: &KeyInfo, retry_after: Duration) -> ServeError {
    ServeError::RateLimited { what: format!("{} tokens per minute", info.tokens_per_minute), retry_after }
}

fn requests_refused(info: &KeyInfo, retry_after: Duration) -> ServeError {
    ServeError::RateLimited { what: format!("{} requests per minute", info.requests_per_minute), retry_after }
}

/// Whether the key's game is served (active), or why not.
pub fn served(info: &KeyInfo) -> Result<(), ServeError> {
    if info.status == GameStatus::Active {
        return Ok(());
    }
    let reason = info.status_reason.clone().unwrap_or_else(|| format!("status {}", info.status));
    if info.suspended_by == Some(SuspendedBy::Escrow) {
        return Err(ServeError::EscrowShort { game: info.game.clone(), reason });
    }
    Err(ServeError::Suspended { game: info.game.clone(), reason })
}

impl Actor for Gateway {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
    }
}

impl Supervised for Gateway {
    fn restarting(&mut self, _: &mut Self::Context) {
        tracing::warn!("gateway restarting; rate-limit state kept");
    }
}

impl Handler<Admit> for Gateway {
    type Result = ResponseActFuture<Self, Result<Admitted, ServeError>>;

    /// Checks the game and the limits of a key `Authenticate` resolved, then submits the job.
    fn handle(&mut self, msg: Admit, ctx: &mut Self::Context) -> Self::Result {
        let Admit { key, stream, model, input, prompt, prompt_ids, text, params, max_tokens, stop, first_choice } = msg;
        let reserve = (prompt.tokens as usize).saturating_add(max_tokens);
        let submitted = self.check(&key, reserve, first_choice).map(|()| {
            let reservation =
                TokenReservation { key_hash: key.hash.clone(), tokens: reserve, release: ctx.address().recipient() };
            let (events, rx) = super::job_events::channel(self.unread_limit);
            let id = TaskId(self.next_task.fetch_add(1, Ordering::Relaxed));
            let billing = Billing { game: key.game, game_id: key.game_id, key_hash: key.hash.clone() };
            let request = JobRequest { model, input, prompt, prompt_ids, text, params, max_tokens, stop, stream };
            let job = Job::new(id, billing, request, events);
            (job, Admitted { id, key_hash: key.hash, events: rx, reservation })
        });
        let distributor = self.distributor.clone();
        Box::pin(
            async move {
                let (job, admitted) = submitted?;
                distributor
                    .send(Submit(job))
                    .await
                    .map_err(|e| ServeError::Internal(format!("distributor unavailable: {e}")))??;
                Ok(admitted)
            }
            .into_actor(self),
        )
    }
}

impl Handler<Authenticate> for Gateway {
    type Result = ResponseActFuture<Self, Result<KeyInfo, ServeError>>;

    fn handle(&mut self, msg: Authenticate, _: &mut Self::Context) -> Self::Result {
        let count = msg.count;
        Box::pin(self.resolve(msg.bearer).map(move |info, this, _| {
            let info = info?;
            if count == CountAs::Completion {
                // A game that is not served is told so, not that it is over its limits.
                served(&info)?;
            }
            this.count(&info, count)?;
            Ok(info)
        }))
    }
}

impl Handler<RecordUsage> for Gateway {
    type Result = ();

    /// Charges a finished job's tokens to its key's per-minute budget.
    fn handle(&mut self, msg: RecordUsage, _: &mut Self::Context) {
        if let Some(limits) = self.limits.get_mut(&msg.key_hash) {
            limits.tokens.spend(msg.tokens as f64, Instant::now());
        }
    }
}

impl Handler<ReleaseTokens> for Gateway {
    type Result = ();

    /// Gives back the tokens an admitted job held (its real usage comes by `RecordUsage`).
    fn handle(&mut self, msg: ReleaseTokens, _: &mut Self::Context) {
        if let Some(limits) = self.limits.get_mut(&msg.key_hash) {
            limits.tokens.release(msg.tokens as f64);
        }
    }
}

impl Handler<super::supervisor::InjectPanic> for Gateway {
    type Result = ();

    fn handle(&mut self, _: super::supervisor::InjectPanic, _: &mut Self::Context) {
        panic!("fault injection: Gateway told to panic");
    }
}
