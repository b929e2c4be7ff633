//! The Cluster actor: several `ludus serve` processes as one network, over NATS
//! (`[cluster] nats_url`). Optional: without it the server works alone, exactly as before.
//!
//! - **Adverts.** Every `advert_interval_ms` each server publishes, per model, the nodes it
//!   holds and the sequences they could start ([`wire::Advert`]); every server keeps the
//!   others' in [`Peers`].
//! - **Forwarding.** A job that arrives where no node can take it goes to the server with
//!   the most room for its model ([`relay::forward`]). That server runs it as its own
//!   ([`relay::serve`]): it counts the prompt, makes the text, checks the proof, records the
//!   receipt and bills, as for any request. Events stream back over NATS to the server that
//!   holds the game's connection, which relays them unchanged.
//! - **Shared state.** A node that fails a proof check is quarantined on every server; each
//!   server admits its share (1/N of the live servers) of every game's per-minute limits.
//!   Suspensions are in the shared database already.
//! - **Failures.** NATS down: no other server is offered work or counted from that moment,
//!   and each server serves from its own nodes; jobs already crossing are given
//!   `peer_timeout_ms`. The client reconnects by itself and the adverts rebuild the table.
//!   A server silent for `peer_timeout_ms` is forgotten: the jobs it was running for others
//!   fail at their origin with a clear error and are cancelled on it, and the jobs it had forwarded
//!   are cancelled where they run.

pub mod peers;
pub mod relay;
pub mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::StreamExt;

use super::catalog::Catalog;
use super::completion_log::CompletionLog;
use super::distributor::Distributor;
use super::messages::{Job, LocalRoom, QuarantineNode, RecordUsage};
pub use peers::Peers;
use wire::{Advert, Quarantine, Witness};

/// What the rest of the server asks of the network.
#[derive(Message)]
#[rtype(result = "()")]
pub enum Outbound {
    /// Run `job` on server `to` and relay its events.
    Forward { job: Box<Job>, to: String },
    /// A node failed a proof check here: quarantine it everywhere.
    Quarantine { address: String, duration: Duration },
    /// A node finished `task` here with this output; answered once the other servers
    /// have been told (or after [`WITNESS_FLUSH_TIMEOUT`]).
    Witness { task: u64, node: [u8; 20], completion_tokens: u32, output_hash: [u8; 32] },
}

/// Longest a game's answer waits for its completion to reach the other servers.
pub const WITNESS_FLUSH_TIMEOUT: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This server's name (a NATS subject token, [`wire::valid_name`]).
    pub name: String,
    pub advert_interval: Duration,
    /// Largest `max_tokens` a forwarded job may ask (this server's own limit).
    pub max_tokens_limit: usize,
}

pub struct Cluster {
    client: async_nats::Client,
    config: ClusterConfig,
    peers: Arc<Peers>,
    distributor: Addr<Distributor>,
    catalog: Arc<Catalog>,
    completions: Arc<CompletionLog>,
    /// This server's Gateway (forwarded jobs' tokens are charged where they were admitted).
    usage: Recipient<RecordUsage>,
    /// Tells this process from another one configured with the same name.
    instance: u64,
}

impl Cluster {
    pub fn new(
        client: async_nats::Client,
        config: ClusterConfig,
        peers: Arc<Peers>,
        distributor: Addr<Distributor>,
        catalog: Arc<Catalog>,
        completions: Arc<CompletionLog>,
        usage: Recipient<RecordUsage>,
    ) -> Self {
        Self { client, config, peers, distributor, catalog, completions, usage, instance: rand::random() }
    }

    /// A NATS client that connects in the background and reconnects forever (quickly: a
    /// restarted NATS is rejoined within about a second); while the link is down no other
    /// server is offered work, so jobs stay local until it is back.
    pub async fn connect(url: &str, name: &str, peers: Arc<Peers>) -> Result<async_nats::Client, String> {
        async_nats::ConnectOptions::new()
            .name(format!("ludus-{name}"))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 250).min(1000)))
            .event_callback(move |event| {
                let peers = peers.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            peers.link_restored();
                            tracing::info!("joined the cluster's NATS")
                        }
                        async_nats::Event::Disconnected => {
                            peers.link_lost();
                            tracing::warn!("lost the cluster's NATS: serving from this server's nodes only");
                        }
                        other => tracing::info!(event = %other, "cluster NATS event"),
                    }
                }
            })
            .connect(url)
            .await
            .map_err(|e| format!("cluster.nats_url: {e}"))
    }

    /// Publishes this server's room (and marks the link down, should its event have been
    /// missed).
    fn advertise(&mut self, ctx: &mut Context<Self>) {
        let state = self.client.connection_state();
        tracing::debug!(?state, "cluster link state");
        if state != async_nats::connection::State::Connected {
            self.peers.link_lost();
        }
        let (client, distributor, name) = (self.client.clone(), self.distributor.clone(), self.config.name.clone());
        let instance = self.instance;
        ctx.spawn(fut::wrap_future(async move {
            let Ok(models) = distributor.send(LocalRoom).await else { return };
            let advert = Advert { server: name, instance, models };
            let payload = serde_json::to_vec(&advert).expect("adverts serialize");
            if let Err(e) = client.publish(wire::ADVERT_SUBJECT, payload.into()).await {
                tracing::debug!(error = %e, "advert not sent");
            }
        }));
    }

    /// Runs `on_message` on every message of `subject` while the actor lives (the client
    /// subscribes again by itself after a reconnect).
    fn listen(&self, ctx: &mut Context<Self>, subject: String, mut on_message: impl FnMut(bytes::Bytes) + 'static) {
        let client = self.client.clone();
        ctx.spawn(fut::wrap_future(async move {
            let mut messages = match client.subscribe(subject.clone()).await {
                Ok(s) => s,
                Err(e) => return tracing::error!(error = %e, %subject, "cannot subscribe to the cluster's subject"),
            };
            while let Some(message) = messages.next().await {
                on_message(message.payload);
            }
        }));
    }

    /// Listens to the other servers' adverts.
    fn listen_adverts(&self, ctx: &mut Context<Self>) {
        let (peers, me, instance) = (self.peers.clone(), self.config.name.clone(), self.instance);
        self.listen(ctx, wire::ADVERT_SUBJECT.into(), move |payload| {
            match serde_json::from_slice::<Advert>(&payload) {
                Ok(advert) if advert.server == me && advert.instance != instance => tracing::error!(
                    name = %me,
                    "another server uses this server's [cluster] name: jobs and replies go astray; give each its own"
                ),
                Ok(advert) if advert.server != me && wire::valid_name(&advert.server) => {
                    peers.heard(advert, Instant::now())
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "malformed advert ignored"),
            }
        });
    }

    /// Runs the jobs other servers forward here, each on its own task (one slow job never
    /// holds up the next).
    fn listen_jobs(&self, ctx: &mut Context<Self>) {
        let serving = relay::Serving {
            client: self.client.clone(),
            distributor: self.distributor.clone(),
            catalog: self.catalog.clone(),
            max_tokens_limit: self.config.max_tokens_limit,
            peers: self.peers.clone(),
        };
        self.listen(ctx, wire::job_subject(&self.config.name), move |payload| {
            actix::spawn(relay::serve(serving.clone(), payload));
        });
    }

    /// Remembers the completions other servers saw (their nodes' receipts may come here).
    fn listen_witnesses(&self, ctx: &mut Context<Self>) {
        let (completions, me) = (self.completions.clone(), self.config.name.clone());
        self.listen(ctx, wire::WITNESS_SUBJECT.into(), move |payload| {
            let Ok(w) = serde_json::from_slice::<Witness>(&payload) else { return };
            let node = hex::decode(&w.node).ok().and_then(|n| <[u8; 20]>::try_from(n).ok());
            let hash = hex::decode(&w.output_hash).ok().and_then(|h| <[u8; 32]>::try_from(h).ok());
            if let (Some(node), Some(hash), true) = (node, hash, w.server != me) {
                completions.record_peer(w.task, node, w.completion_tokens, hash);
            }
        });
    }

    /// Applies the quarantines other servers announce (a day at most, whatever a notice
    /// says).
    fn listen_quarantines(&self, ctx: &mut Context<Self>) {
        let distributor = self.distributor.clone();
        self.listen(ctx, wire::QUARANTINE_SUBJECT.into(), move |payload| {
            if let Ok(q) = serde_json::from_slice::<Quarantine>(&payload) {
                let duration = Duration::from_secs(q.seconds.min(86_400));
                distributor.do_send(QuarantineNode { address: q.address, duration, announce: false });
            }
        });
    }
}

impl Actor for Cluster {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.listen_adverts(ctx);
        self.listen_jobs(ctx);
        self.listen_quarantines(ctx);
        self.listen_witnesses(ctx);
        self.advertise(ctx);
        ctx.run_interval(self.config.advert_interval, |this, ctx| this.advertise(ctx));
        tracing::info!(name = %self.config.name, "cluster on: forwarding jobs between servers over NATS");
    }
}

impl Supervised for Cluster {
    fn restarting(&mut self, _: &mut Self::Context) {
        tracing::warn!("cluster actor restarting; forwarded jobs in flight keep running");
    }
}

impl Handler<Outbound> for Cluster {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: Outbound, _: &mut Self::Context) -> Self::Result {
        match msg {
            Outbound::Forward { job, to } => {
                let forwarding = relay::Forwarding {
                    client: self.client.clone(),
                    origin: self.config.name.clone(),
                    peers: self.peers.clone(),
                    usage: self.usage.clone(),
                };
                // Not tied to this actor: a restart never cuts a game's stream.
                actix::spawn(relay::forward(forwarding, to, *job));
            }
            Outbound::Quarantine { address, duration } => {
                let notice = Quarantine { address, seconds: duration.as_secs() };
                let client = self.client.clone();
                actix::spawn(async move {
                    let payload = serde_json::to_vec(&notice).expect("notices serialize");
                    if let Err(e) = client.publish(wire::QUARANTINE_SUBJECT, payload.into()).await {
                        tracing::warn!(error = %e, node = %notice.address, "quarantine not announced to the cluster");
                    }
                });
            }
            Outbound::Witness { task, node, completion_tokens, output_hash } => {
                let witness = Witness {
                    server: self.config.name.clone(),
                    task,
                    node: hex::encode(node),
                    completion_tokens,
                    output_hash: hex::encode(output_hash),
                };
                let client = self.client.clone();
                // Flushed: NATS has it (and hands it to every server) before the game is told.
                return Box::pin(async move {
                    let payload = serde_json::to_vec(&witness).expect("witnesses serialize");
                    let told = async {
                        client.publish(wire::WITNESS_SUBJECT, payload.into()).await.ok()?;
                        client.flush().await.ok()
                    };
                    if actix_web::rt::time::timeout(WITNESS_FLUSH_TIMEOUT, told).await.ok().flatten().is_none() {
                        tracing::warn!(task = %format!("{task:016x}"), "completion not confirmed to the cluster in time");
                    }
                });
            }
        }
        Box::pin(async {})
    }
}
