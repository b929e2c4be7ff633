//! The Gateway: authenticates bearer keys (stored hashed, see [`super::game_store`]),
//! rejects suspended games and keys over their per-minute limits, turns an admitted
//! request into a [`Job`] and submits it to the Distributor.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use rand::RngCore;
use tokio::sync::mpsc::unbounded_channel;

use super::distributor::Distributor;
use super::error::ServeError;
use super::game_store::GameStore;
use super::messages::*;
use super::rate_limit::Bucket;
use crate::protocol::TaskId;

/// Messages that may wait in the mailbox before `send` callers wait (do_send never does).
const MAILBOX_CAPACITY: usize = 65_536;
struct KeyLimits {
    requests: Bucket,
    tokens: Bucket,
}

pub struct Gateway {
    store: Arc<GameStore>,
    distributor: Addr<Distributor>,
    limits: HashMap<String, KeyLimits>,
    next_task: AtomicU64,
}

impl Gateway {
    pub fn new(store: Arc<GameStore>, distributor: Addr<Distributor>) -> Self {
        // Task ids start at a random base so they stay unique across restarts.
        let base = rand::rng().next_u64() & 0xffff_ffff_0000_0000;
        Self { store, distributor, limits: HashMap::new(), next_task: AtomicU64::new(base) }
    }
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
    type Result = ResponseFuture<Result<Admitted, ServeError>>;

    /// Checks the key, the game and the limits, then submits the job.
    fn handle(&mut self, msg: Admit, _: &mut Self::Context) -> Self::Result {
        let checked = (|| {
            let key = msg.bearer.as_deref().ok_or(ServeError::Unauthorized)?;
            let info = self
                .store
                .lookup(key)
                .map_err(|e| ServeError::Internal(e.to_string()))?
                .ok_or(ServeError::Unauthorized)?;
            if info.suspended {
                return Err(ServeError::Suspended(info.game));
            }
            let now = Instant::now();
            let limits = self.limits.entry(info.hash.clone()).or_insert_with(|| KeyLimits {
                requests: Bucket::per_minute(info.requests_per_minute, now),
                tokens: Bucket::per_minute(info.tokens_per_minute, now),
            });
            limits.tokens.check_positive(now).map_err(|retry_after| ServeError::RateLimited {
                what: format!("{} tokens per minute", info.tokens_per_minute),
                retry_after,
            })?;
            limits.requests.take(1.0, now).map_err(|retry_after| ServeError::RateLimited {
                what: format!("{} requests per minute", info.requests_per_minute),
                retry_after,
            })?;
            Ok(info)
        })();
        let info = match checked {
            Ok(info) => info,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let (events, rx) = unbounded_channel();
        let id = TaskId(self.next_task.fetch_add(1, Ordering::Relaxed));
        let job = Job {
            id,
            game: info.game,
            key_hash: info.hash.clone(),
            model: msg.model,
            input: msg.input,
            params: msg.params,
            max_tokens: msg.max_tokens,
            stop: msg.stop,
            events,
            received: Instant::now(),
            queued_at: Instant::now(),
            failed_nodes: Vec::new(),
            emitted: Vec::new(),
        };
        let distributor = self.distributor.clone();
        Box::pin(async move {
            distributor
                .send(Submit(job))
                .await
                .map_err(|e| ServeError::Internal(format!("distributor unavailable: {e}")))??;
            Ok(Admitted { id, key_hash: info.hash, events: rx })
        })
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
