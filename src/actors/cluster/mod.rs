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
//!   holds the game's connection, which relays them unchanged, whole and in order
//!   ([`sequenced`]: numbered, and a lost one sent again).
//! - **Trust.** Each subject ends with the name of the server that publishes it, so NATS
//!   permissions per server ([`wire::Permissions`]) hold every server to its own name;
//!   what a message says about its sender is checked against its subject.
//! - **Shared state.** A node key holds one session in the whole network
//!   ([`Sessions`]). A node that fails a proof check is quarantined on every server; each
//!   server admits its share (1/N of the live servers) of every game's per-minute limits;
//!   a forwarded job's tokens are charged where it was admitted (with its `Done`, or, when
//!   the game left mid-answer, by a [`wire::Charge`] from the server that ran it).
//!   Suspensions are in the shared database already.
//! - **Money.** The server that runs a job bills it, as its own. One that its origin gives
//!   up before the answer came back whole (a lost event never sent again, the running
//!   server silent or restarted) is written off by the origin in the shared database
//!   ([`write_offs`]): the game, which got an error, is not charged, and the node is
//!   not paid. The running server writes off a job it stops because its origin went away
//!   (silent, restarted, or NATS lost): a dead origin cannot.
//! - **Failures.** NATS down: no other server is offered work or counted from that moment,
//!   and each server serves from its own nodes; jobs already crossing are given
//!   `peer_timeout_ms`. The client reconnects by itself and the adverts rebuild the table.
//!   A server silent for `peer_timeout_ms` is forgotten: the jobs it was running for others
//!   fail at their origin with a clear error and are cancelled on it, and the jobs it had forwarded
//!   are cancelled where they run.

pub mod charges;
pub mod peers;
pub mod relay;
pub mod sequenced;
pub mod wire;
pub mod write_offs;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::StreamExt;

use super::catalog::Catalog;
use super::completion_log::CompletionLog;
use super::distributor::Distributor;
use super::messages::{Job, LocalRoom, QuarantineNode, RecordUsage};
use super::sessions::Sessions;
use crate::crypto::identity::Address;
use crate::protocol::TaskId;
pub use peers::Peers;
use wire::{Advert, Charge, Quarantine, SessionClaim, Witness};

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
    Witness { task: u64, node: [u8; 20], completion_tokens: u32, output_hash: [u8; 32], sampled: bool },
    /// A session of node `address` opened here at `since_ms`: older ones elsewhere close.
    Claim { address: Address, since_ms: u64 },
    /// The game of `task`, forwarded here by `origin`, left after receiving `tokens`
    /// (prompt included): charged to its key's budget at `origin`, which admitted it.
    Charge { origin: String, task: TaskId, key_hash: String, tokens: usize },
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

/// The parts of this server the Cluster actor works with.
#[derive(Clone)]
pub struct ServerParts {
    pub peers: Arc<Peers>,
    pub distributor: Addr<Distributor>,
    pub catalog: Arc<Catalog>,
    pub completions: Arc<CompletionLog>,
    /// This server's Gateway (forwarded jobs' tokens are charged where they were admitted).
    pub usage: Recipient<RecordUsage>,
    /// The node sessions held here (one key, one session across the network).
    pub sessions: Arc<Sessions>,
    /// Where a forwarded job given up is written off.
    pub write_offs: Arc<write_offs::WriteOffs>,
}

pub struct Cluster {
    client: async_nats::Client,
    config: ClusterConfig,
    peers: Arc<Peers>,
    distributor: Addr<Distributor>,
    catalog: Arc<Catalog>,
    completions: Arc<CompletionLog>,
    usage: Recipient<RecordUsage>,
    sessions: Arc<Sessions>,
    /// Hang-up charges awaited from the servers running this one's forwarded jobs.
    charges: Arc<charges::AwaitedCharges>,
    /// Tells this process from another one configured with the same name.
    instance: u64,
    write_offs: Arc<write_offs::WriteOffs>,
}

impl Cluster {
    pub fn new(client: async_nats::Client, config: ClusterConfig, parts: ServerParts) -> Self {
        let ServerParts { peers, distributor, catalog, completions, usage, sessions, write_offs } = parts;
        let charges = Default::default();
        Self {
            client,
            config,
            peers,
            distributor,
            catalog,
            completions,
            usage,
            sessions,
            charges,
            instance: rand::random(),
            write_offs,
        }
    }

    /// A NATS client that connects in the background and reconnects forever (quickly: a
    /// restarted NATS is rejoined within about a second); while the link is down no other
    /// server is offered work, so jobs stay local until it is back.
    ///
    /// A user and password in the URL (`nats://user:password@host:port`, this server's own
    /// NATS user: `ludus cluster nats-user`) are sent at connect; async-nats would not read
    /// them from the URL by itself.
    /// When the link comes back, every node session held here is claimed again (claims
    /// made while it was down were not heard).
    pub async fn connect(
        url: &str,
        name: &str,
        peers: Arc<Peers>,
        sessions: Arc<Sessions>,
    ) -> Result<async_nats::Client, String> {
        let address = url.parse::<async_nats::ServerAddr>().map_err(|e| format!("cluster.nats_url: {e}"))?;
        warn_if_open(&address);
        let options = match (address.username(), address.password()) {
            (Some(user), Some(password)) => {
                async_nats::ConnectOptions::with_user_and_password(percent_decoded(user)?, percent_decoded(password)?)
            }
            (Some(_), None) => return Err("cluster.nats_url has a user but no password".into()),
            (None, Some(_)) => return Err("cluster.nats_url has a password but no user".into()),
            (None, None) => async_nats::ConnectOptions::new(),
        };
        options
            .name(format!("ludus-{name}"))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 250).min(1000)))
            .event_callback(move |event| {
                let (peers, sessions) = (peers.clone(), sessions.clone());
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            peers.link_restored();
                            sessions.claim_all();
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
            let subject = wire::advert_subject(&name);
            let advert = Advert { server: name, instance, keepalive: true, models };
            let payload = serde_json::to_vec(&advert).expect("adverts serialize");
            if let Err(e) = client.publish(subject, payload.into()).await {
                tracing::debug!(error = %e, "advert not sent");
            }
        }));
    }

    /// Runs `on_message` with the publisher (the subject's last token) and the payload of
    /// every message of `subject` while the actor lives (the client subscribes again by
    /// itself after a reconnect).
    fn listen(
        &self,
        ctx: &mut Context<Self>,
        subject: String,
        mut on_message: impl FnMut(&str, bytes::Bytes) + 'static,
    ) {
        let client = self.client.clone();
        ctx.spawn(fut::wrap_future(async move {
            let mut messages = match client.subscribe(subject.clone()).await {
                Ok(s) => s,
                Err(e) => return tracing::error!(error = %e, %subject, "cannot subscribe to the cluster's subject"),
            };
            while let Some(message) = messages.next().await {
                on_message(wire::publisher(&message.subject), message.payload);
            }
        }));
    }

    /// Listens to the other servers' adverts.
    fn listen_adverts(&self, ctx: &mut Context<Self>) {
        let (peers, me, instance) = (self.peers.clone(), self.config.name.clone(), self.instance);
        self.listen(ctx, wire::ANY_ADVERT.into(), move |publisher, payload| {
            match serde_json::from_slice::<Advert>(&payload) {
                Ok(advert) if advert.server != publisher => tracing::warn!(
                    %publisher,
                    named = %advert.server.chars().take(wire::MAX_NAME_LEN).collect::<String>(),
                    "advert naming another server than its publisher ignored"
                ),
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
            name: self.config.name.clone(),
            instance: self.instance,
            write_offs: self.write_offs.clone(),
        };
        self.listen(ctx, wire::jobs_for(&self.config.name), move |publisher, payload| {
            actix::spawn(relay::serve(serving.clone(), publisher.to_string(), payload));
        });
    }

    /// Remembers the completions other servers saw (their nodes' receipts may come here).
    fn listen_witnesses(&self, ctx: &mut Context<Self>) {
        let (completions, me) = (self.completions.clone(), self.config.name.clone());
        self.listen(ctx, wire::ANY_WITNESS.into(), move |publisher, payload| {
            let Ok(w) = serde_json::from_slice::<Witness>(&payload) else { return };
            if w.server != publisher {
                return tracing::warn!(%publisher, "witness naming another server than its publisher ignored");
            }
            let node = hex::decode(&w.node).ok().and_then(|n| <[u8; 20]>::try_from(n).ok());
            let hash = hex::decode(&w.output_hash).ok().and_then(|h| <[u8; 32]>::try_from(h).ok());
            if let (Some(node), Some(hash), true) = (node, hash, w.server != me) {
                completions.record_peer(w.task, node, w.completion_tokens, hash, w.sampled);
            }
        });
    }

    /// Applies the quarantines other servers announce (a day at most, whatever a notice
    /// says).
    fn listen_quarantines(&self, ctx: &mut Context<Self>) {
        let distributor = self.distributor.clone();
        self.listen(ctx, wire::ANY_QUARANTINE.into(), move |publisher, payload| {
            let Ok(q) = serde_json::from_slice::<Quarantine>(&payload) else { return };
            // A node address, written as this server writes it (the table is keyed by it);
            // anything else would only fill the table.
            let Ok(address) = q.address.parse::<crate::crypto::identity::Address>() else {
                tracing::debug!(%publisher, "a quarantine notice without a node address; ignored");
                return;
            };
            tracing::debug!(%publisher, node = %address, "quarantine announced");
            let duration = Duration::from_secs(q.seconds.min(86_400));
            distributor.do_send(QuarantineNode { address: address.to_string(), duration, announce: false });
        });
    }
}

/// Says at start when the cluster's NATS looks open to anyone who can reach it: every
/// message on it is trusted as a server's (adverts, forwarded jobs, tokens, quarantines,
/// charges), and it carries prompts. `docs/operations.md` shows the locked-down setup.
fn warn_if_open(address: &async_nats::ServerAddr) {
    if !address.has_user_pass() {
        tracing::warn!(
            "cluster.nats_url has no user: unless the NATS server itself refuses strangers, anyone who can \
             reach it can pose as a server of this network (run `ludus cluster nats-user`)"
        );
    }
    let loopback = matches!(address.host(), "localhost" | "127.0.0.1" | "::1");
    if !address.tls_required() && !loopback {
        tracing::warn!(
            host = address.host(),
            "cluster.nats_url is not tls://: prompts, tokens and credentials cross the network in clear"
        );
    }
}

impl Cluster {
    /// Charges the games this server admitted for the tokens of forwarded jobs they left
    /// mid-answer, as counted where the job ran: only a charge this server awaits (see
    /// [`charges`]), from the server the job went to, for its key, capped at what the job
    /// could count.
    fn listen_charges(&self, ctx: &mut Context<Self>) {
        let (usage, charges) = (self.usage.clone(), self.charges.clone());
        self.listen(ctx, wire::charges_for(&self.config.name), move |publisher, payload| {
            let c = match serde_json::from_slice::<Charge>(&payload) {
                Ok(c) => c,
                Err(e) => return tracing::warn!(%publisher, error = %e, "malformed charge ignored"),
            };
            match charges.take(c.task, publisher, &c.key_hash, Instant::now()) {
                Some(bound) => {
                    let tokens = c.tokens.min(bound);
                    usage.do_send(RecordUsage { key_hash: c.key_hash, tokens: tokens as usize });
                    tracing::info!(%publisher, task = %c.task, tokens,
                        "a game that left a forwarded job charged for the tokens it received");
                }
                None => tracing::warn!(%publisher, task = %c.task,
                    "a charge for no hang-up this server awaits from that server ignored"),
            }
        });
    }

    /// Closes this server's session of a node key that opened a newer one on another
    /// server; claims it again when this one is the newer (so the other closes its own).
    fn listen_sessions(&self, ctx: &mut Context<Self>) {
        let (sessions, me, client) = (self.sessions.clone(), self.config.name.clone(), self.client.clone());
        self.listen(ctx, wire::ANY_SESSION.into(), move |publisher, payload| {
            if publisher == me {
                return;
            }
            let Ok(claim) = serde_json::from_slice::<SessionClaim>(&payload) else {
                return tracing::warn!(%publisher, "malformed session claim ignored");
            };
            let Ok(address) = claim.address.parse::<Address>() else { return };
            if let Some(since_ms) = sessions.claimed_elsewhere(address, claim.since_ms, publisher, &me) {
                publish_claim(&client, &me, address, since_ms);
            }
        });
    }
}

/// A URL's user or password as written before percent-encoding (`%40` is `@`).
fn percent_decoded(part: &str) -> Result<String, String> {
    let bytes = part.as_bytes();
    let (mut out, mut i) = (Vec::with_capacity(bytes.len()), 0);
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = part
                .get(i + 1..i + 3)
                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(hex.ok_or("cluster.nats_url: a `%` in the user or password is not followed by two hex digits")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "cluster.nats_url: the user or password is not UTF-8 once decoded".to_string())
}

/// Claims node `address`'s session on this server (`me`) to the others.
fn publish_claim(client: &async_nats::Client, me: &str, address: Address, since_ms: u64) {
    let (client, subject) = (client.clone(), wire::session_subject(me));
    let payload =
        serde_json::to_vec(&SessionClaim { address: address.to_string(), since_ms }).expect("claims serialize");
    actix::spawn(async move {
        if let Err(e) = client.publish(subject, payload.into()).await {
            tracing::warn!(error = %e, node = %address, "session not claimed on the cluster");
        }
    });
}

impl Actor for Cluster {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.listen_sessions(ctx);
        // After a restart: claims heard while this actor was down were missed.
        self.sessions.claim_all();
        self.listen_adverts(ctx);
        self.listen_jobs(ctx);
        self.listen_quarantines(ctx);
        self.listen_witnesses(ctx);
        self.listen_charges(ctx);
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
                    instance: self.instance,
                    peers: self.peers.clone(),
                    usage: self.usage.clone(),
                    charges: self.charges.clone(),
                    write_offs: self.write_offs.clone(),
                };
                // Not tied to this actor: a restart never cuts a game's stream.
                actix::spawn(relay::forward(forwarding, to, *job));
            }
            Outbound::Quarantine { address, duration } => {
                let notice = Quarantine { address, seconds: duration.as_secs() };
                let (client, subject) = (self.client.clone(), wire::quarantine_subject(&self.config.name));
                actix::spawn(async move {
                    let payload = serde_json::to_vec(&notice).expect("notices serialize");
                    if let Err(e) = client.publish(subject, payload.into()).await {
                        tracing::warn!(error = %e, node = %notice.address, "quarantine not announced to the cluster");
                    }
                });
            }
            Outbound::Witness { task, node, completion_tokens, output_hash, sampled } => {
                let witness = Witness {
                    server: self.config.name.clone(),
                    task,
                    node: hex::encode(node),
                    completion_tokens,
                    output_hash: hex::encode(output_hash),
                    sampled,
                };
                let (client, subject) = (self.client.clone(), wire::witness_subject(&self.config.name));
                // Flushed: NATS has it (and hands it to every server) before the game is told.
                return Box::pin(async move {
                    let payload = serde_json::to_vec(&witness).expect("witnesses serialize");
                    let told = async {
                        client.publish(subject, payload.into()).await.ok()?;
                        client.flush().await.ok()
                    };
                    if actix_web::rt::time::timeout(WITNESS_FLUSH_TIMEOUT, told).await.ok().flatten().is_none() {
                        tracing::warn!(task = %format!("{task:016x}"), "completion not confirmed to the cluster in time");
                    }
                });
            }
            Outbound::Claim { address, since_ms } => publish_claim(&self.client, &self.config.name, address, since_ms),
            Outbound::Charge { origin, task, key_hash, tokens } => {
                let charge = Charge { task, key_hash, tokens: tokens as u64 };
                let (client, subject) = (self.client.clone(), wire::charge_subject(&origin, &self.config.name));
                actix::spawn(async move {
                    let payload = serde_json::to_vec(&charge).expect("charges serialize");
                    if let Err(e) = client.publish(subject, payload.into()).await {
                        tracing::warn!(error = %e, task = %charge.task, %origin, "a forwarded hang-up's charge not sent");
                    }
                });
            }
        }
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use super::percent_decoded;

    #[test]
    fn url_credentials_are_percent_decoded_and_bad_escapes_refused() {
        assert_eq!(percent_decoded("p%40ss%2Fw0rd").unwrap(), "p@ss/w0rd");
        assert_eq!(percent_decoded("plain-hex-0a1b").unwrap(), "plain-hex-0a1b");
        assert!(percent_decoded("bad%4").unwrap_err().contains("two hex digits"));
        assert!(percent_decoded("bad%zz").is_err());
        assert!(percent_decoded("bad%+1").is_err(), "a sign is not a hex digit");
        assert!(percent_decoded("%ff").unwrap_err().contains("UTF-8"));
    }
}
