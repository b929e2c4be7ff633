//! The settlement state machine, driven by the Settlement actor: plan an epoch from the
//! ledger, sign its post, store the signed transaction, broadcast it, and confirm it —
//! each step persisted in Postgres, so any step can be interrupted (crash, RPC outage,
//! database restart) and resumed without posting twice or skipping an epoch.
//!
//! ```text
//!            plan (receipts → epoch, charges, payouts, root)
//!   (none) ─────────────────────────────────────────────▶ planned
//!   planned ── sign, store tx, broadcast ───────────────▶ sent(tx)
//!   sent ──── mined, enough confirmations ──────────────▶ confirmed
//!   sent ──── reverted / nonce taken by another tx ─────▶ planned (signed again)
//!   sent ──── unknown to the node, nonce unused ────────▶ sent (same bytes re-broadcast)
//!   planned ─ estimate reverts (escrow shrank) ─────────▶ (discarded; planned anew)
//! ```
//!
//! Block anchors (the Merkle roots of consecutive registry blocks, see
//! [`crate::ledger::anchors`]) go through the same states, at most one per
//! `anchor_interval` and before any epoch is planned, since the contract refuses an epoch
//! over a block it has not anchored. Anchors and epochs share the operator's nonce
//! without clashing because at most one of them is open at a time: an open anchor is
//! finished before an epoch is looked at, and a new anchor is planned only when no epoch
//! is open.
//!
//! Only the holder of a Postgres advisory lock (on a connection of its own) runs it; the
//! contract adds its own guard: epochs and anchors are accepted only in order, each once.

use std::time::Duration;

use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;

use crate::chain::{ChainError, SettlementClient, TxStatus};
use crate::ledger::epochs::{Epoch, EpochStatus};
use crate::ledger::escrow::escrow_action;
use crate::ledger::pool::Conn;
use crate::ledger::{LedgerError, Store, Units};

/// Advisory lock key of the settlement runner ("ludusset").
pub const SETTLEMENT_LOCK: i64 = 0x6c75_6475_7373_6574;

/// How settlement runs.
#[derive(Debug, Clone)]
pub struct SettlerConfig {
    pub rpc_url: String,
    pub contract: Address,
    /// Share of each charge paid to the node, in basis points.
    pub node_share_bps: u32,
    /// Blocks (counting the one it is in) before a post counts as final.
    pub confirmations: u64,
    pub epoch_time: Duration,
    /// At most one anchor transaction per this interval (one before each epoch besides).
    pub anchor_interval: Duration,
    /// A block waits at most this long for its nodes' confirmations before it is anchored.
    pub anchor_confirm_wait: Duration,
    /// A post or anchor not mined for this long is signed again with higher fees.
    pub replace_after: Duration,
}

impl Settler {
    /// An error's text with the RPC URL (a secret: it often holds a provider key) shown
    /// only as its scheme, host and port; HTTP client errors quote the URL they failed on.
    pub fn scrub(&self, error: &dyn std::fmt::Display) -> String {
        let url = self.config.rpc_url.trim_end_matches('/');
        let text = error.to_string();
        if url.is_empty() {
            return text;
        }
        text.replace(url, &crate::chain::redacted_url(url))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The chain and the ledger disagree about a posted epoch: needs an operator.
    #[error("ledger and chain disagree: {0}")]
    Diverged(String),
}

/// What one run ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Another server holds the settlement lock.
    Standby,
    /// Nothing open: every epoch is confirmed.
    Idle,
    /// A post is on its way (in the mempool, or waiting for confirmations).
    Waiting,
}

/// A run's result: where it stopped, and whether it planned (or found nothing to plan).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub progress: Progress,
    pub planned: bool,
}

enum Step {
    /// The epoch moved on: look again.
    Again,
    Wait,
}

/// What became of a stored, broadcast transaction.
enum Fate {
    Final {
        block: u64,
        gas_used: u64,
    },
    /// Pending, or mined with too few confirmations yet.
    Wait,
    /// It can never be mined (reverted, or its nonce went to another transaction).
    Lost,
    /// Not mined for `replace_after`: signed again with higher fees.
    Stuck,
}

pub struct Settler {
    store: Store,
    config: SettlerConfig,
    signer: PrivateKeySigner,
    chain: tokio::sync::OnceCell<SettlementClient>,
    lock: tokio::sync::Mutex<Option<Conn>>,
    standby_logged: std::sync::atomic::AtomicBool,
    /// The contract's withdrawal delay was compared with the epoch length.
    delay_checked: std::sync::atomic::AtomicBool,
    /// When anchoring last looked for blocks to anchor.
    last_anchor_look: std::sync::Mutex<Option<std::time::Instant>>,
    /// The last block committed when the due epoch first looked: it is anchored (as far as
    /// its blocks are ready) before the epoch is planned. Anchoring "until nothing is left"
    /// never ended while games played: a new block is ready every block time, sooner than
    /// an anchor confirms.
    epoch_anchor_target: std::sync::Mutex<Option<u64>>,
    /// The transaction followed now (one is open at a time) and since when it waits to be
    /// mined.
    waiting_since: std::sync::Mutex<Option<([u8; 32], std::time::Instant)>>,
    /// The nonce of the open transaction and those it replaced: any of them may be the
    /// one mined. In memory: after a restart, one of them mined is adopted from the
    /// chain's state instead.
    replaced: std::sync::Mutex<(u64, Vec<[u8; 32]>)>,
}

/// How long the settlement lock's connection may take to answer that it is alive.
const LOCK_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

fn address_of(wallet: &str) -> Result<Address, SettleError> {
    wallet.parse().map_err(|_| SettleError::Ledger(LedgerError::Corrupt(format!("wallet `{wallet}`"))))
}

impl Settler {
    pub fn new(store: Store, config: SettlerConfig, signer: PrivateKeySigner) -> Self {
        Self {
            store,
            config,
            signer,
            chain: tokio::sync::OnceCell::new(),
            lock: tokio::sync::Mutex::new(None),
            standby_logged: Default::default(),
            delay_checked: Default::default(),
            last_anchor_look: Default::default(),
            epoch_anchor_target: Default::default(),
            waiting_since: Default::default(),
            replaced: Default::default(),
        }
    }

    pub fn config(&self) -> &SettlerConfig {
        &self.config
    }

    /// The chain client, connected (and checked) on first use.
    async fn chain(&self) -> Result<&SettlementClient, SettleError> {
        let chain = self
            .chain
            .get_or_try_init(|| {
                SettlementClient::connect(&self.config.rpc_url, self.config.contract, self.signer.clone())
            })
            .await?;
        Ok(chain)
    }

    /// Takes (or re-checks) the settlement lock on a dedicated connection. A broken
    /// connection released the lock in Postgres, so it is taken again, or lost to another.
    async fn hold_lock(&self) -> Result<bool, SettleError> {
        let mut held = self.lock.lock().await;
        if let Some(conn) = held.as_ref() {
            // Bounded: a half-open connection's check could hang, and settlement with it.
            let alive = tokio::time::timeout(LOCK_CHECK_TIMEOUT, conn.execute("SELECT 1", &[])).await;
            if !conn.is_closed() && matches!(alive, Ok(Ok(_))) {
                return Ok(true);
            }
            tracing::warn!("the settlement lock's connection broke; taking the lock again");
            *held = None;
        }
        let conn = self.store.dedicated_conn().await?;
        let got: bool = conn
            .query_one("SELECT pg_try_advisory_lock($1)", &[&SETTLEMENT_LOCK])
            .await
            .map_err(LedgerError::from)?
            .get(0);
        if got {
            tracing::info!("holding the settlement lock: this server settles");
            *held = Some(conn);
        } else if !self.standby_logged.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::info!("another server holds the settlement lock: standing by");
        }
        Ok(got)
    }

    /// Whether an epoch is due: no planning attempt since the last epoch boundary
    /// (boundaries are multiples of the epoch length since the Unix epoch, e.g. 00:00 UTC
    /// daily). This catches up on a boundary missed while no server was running.
    pub async fn is_due(&self, now: std::time::SystemTime) -> Result<bool, SettleError> {
        let last = self.store.last_settlement_attempt().await?;
        Ok(last < crate::actors::clock::last_boundary(now, self.config.epoch_time))
    }

    /// Moves settlement as far as it can go now: finishes an open anchor or epoch, anchors
    /// the blocks ready for it (once per `anchor_interval`, and before each epoch those
    /// committed when it fell due),
    /// and plans a new epoch when `plan` is set and nothing older is open.
    pub async fn run(&self, plan: bool) -> Result<Outcome, SettleError> {
        if !self.hold_lock().await? {
            // Whoever holds the lock now anchors for the epoch; this server looks again
            // when it holds it back.
            *self.epoch_anchor_target.lock().expect("not poisoned") = None;
            return Ok(Outcome { progress: Progress::Standby, planned: false });
        }
        let mut planned = false;
        let mut anchored_all = false;
        loop {
            if let Some(anchor) = self.store.open_anchor().await? {
                match self.advance_anchor(anchor).await? {
                    Step::Again => continue,
                    Step::Wait => return Ok(Outcome { progress: Progress::Waiting, planned }),
                }
            }
            if let Some(epoch) = self.store.open_epoch().await? {
                match self.advance(epoch).await? {
                    Step::Again => continue,
                    Step::Wait => return Ok(Outcome { progress: Progress::Waiting, planned }),
                }
            }
            let epoch_next = plan && !planned;
            // A due epoch has the blocks committed when it first looked anchored (those
            // ready), then is planned.
            let anchor_now = if epoch_next { self.epoch_blocks_unanchored().await? } else { self.anchor_due() };
            if !anchored_all && anchor_now {
                if self.plan_anchor().await?.is_some() {
                    continue;
                }
                anchored_all = true;
            }
            if epoch_next {
                planned = true;
                let epoch = self.plan().await?;
                // Planned (or nothing to plan): the next due epoch looks afresh. A plan that
                // failed keeps the target, so its retry anchors nothing more first.
                *self.epoch_anchor_target.lock().expect("not poisoned") = None;
                if epoch.is_some() {
                    continue;
                }
            }
            return Ok(Outcome { progress: Progress::Idle, planned });
        }
    }

    /// Whether blocks committed when the due epoch first looked are still unanchored.
    async fn epoch_blocks_unanchored(&self) -> Result<bool, SettleError> {
        let known = *self.epoch_anchor_target.lock().expect("not poisoned");
        let target = match known {
            Some(target) => target,
            None => {
                let target = self.store.last_block().await?;
                *self.epoch_anchor_target.lock().expect("not poisoned") = Some(target);
                target
            }
        };
        Ok(self.store.last_anchored_block().await? < target)
    }

    /// Whether `anchor_interval` has passed since anchoring last looked for blocks.
    fn anchor_due(&self) -> bool {
        let last = self.last_anchor_look.lock().expect("not poisoned");
        // A tenth of slack: the actor's timer firing a hair early must not skip a turn.
        last.is_none_or(|t| t.elapsed() >= self.config.anchor_interval.mul_f64(0.9))
    }

    /// Plans an anchor over the blocks ready for one, if any.
    async fn plan_anchor(&self) -> Result<Option<crate::ledger::anchors::Anchor>, SettleError> {
        let chain = self.chain().await?;
        *self.last_anchor_look.lock().expect("not poisoned") = Some(std::time::Instant::now());
        let contract = format!("{:#x}", chain.contract_address());
        let anchor = self
            .store
            .plan_anchor(&contract, crate::ledger::anchors::MAX_BLOCKS_PER_ANCHOR, self.config.anchor_confirm_wait)
            .await?;
        if let Some(a) = &anchor {
            tracing::info!(anchor = a.id, first_block = a.first_block, last_block = a.last_block, "anchor planned");
        }
        Ok(anchor)
    }

    /// Moves an open anchor on: signs, stores and broadcasts it, or follows it on chain.
    async fn advance_anchor(&self, anchor: crate::ledger::anchors::Anchor) -> Result<Step, SettleError> {
        let chain = self.chain().await?;
        let id = anchor.id;
        match anchor.status {
            EpochStatus::Confirmed => Ok(Step::Again),
            EpochStatus::Planned => {
                let on_chain = chain.last_anchored_block().await?;
                if on_chain >= anchor.last_block {
                    return self.adopt_anchor(&anchor).await;
                }
                if on_chain + 1 != anchor.first_block {
                    return Err(SettleError::Diverged(format!(
                        "the contract's last anchored block is {on_chain} but the ledger's next anchor starts at {}; \
                         was the contract replaced?",
                        anchor.first_block
                    )));
                }
                let sent = chain.sign_anchor(anchor.first_block, &anchor.roots).await?;
                self.store.mark_anchor_sent(id, &sent).await?;
                tracing::info!(anchor = id, blocks = anchor.roots.len(), tx = %format!("0x{}", hex::encode(sent.hash)), nonce = sent.nonce, "anchor signed and stored; broadcasting");
                chain.broadcast(&sent.raw).await?;
                Ok(Step::Wait)
            }
            EpochStatus::Sent => {
                let sent = anchor
                    .sent
                    .clone()
                    .ok_or_else(|| LedgerError::Corrupt(format!("anchor {id} is sent but has no transaction")))?;
                match self.follow(&sent).await? {
                    Fate::Final { block, gas_used } => {
                        self.store.mark_anchor_confirmed(id, block, gas_used).await?;
                        tracing::info!(
                            anchor = id,
                            last_block = anchor.last_block,
                            block,
                            gas_used,
                            "blocks anchored on chain"
                        );
                        Ok(Step::Again)
                    }
                    Fate::Wait => Ok(Step::Wait),
                    Fate::Stuck => {
                        if let Some(by) = self.sign_again(&format!("anchor {id}"), &sent).await? {
                            self.store.replace_anchor_tx(id, &sent, &by).await?;
                            chain.broadcast(&by.raw).await?;
                        }
                        Ok(Step::Wait)
                    }
                    Fate::Lost => {
                        if chain.last_anchored_block().await? >= anchor.last_block {
                            return self.adopt_anchor(&anchor).await;
                        }
                        tracing::warn!(anchor = id, "the anchor's transaction can never be mined; signing it again");
                        self.store.mark_anchor_unsent(id).await?;
                        Ok(Step::Again)
                    }
                }
            }
        }
    }

    /// The chain already holds anchor `id`: accept it only if it is exactly ours.
    async fn adopt_anchor(&self, anchor: &crate::ledger::anchors::Anchor) -> Result<Step, SettleError> {
        let chain = self.chain().await?;
        match chain.posted_anchor(anchor.id).await? {
            Some(posted) if posted == (anchor.root, anchor.first_block, anchor.last_block) => {
                self.store.mark_anchor_confirmed(anchor.id, 0, 0).await?;
                tracing::warn!(anchor = anchor.id, "the anchor was already on chain, as planned: marked confirmed");
                Ok(Step::Again)
            }
            other => Err(SettleError::Diverged(format!(
                "anchor {} on chain is {other:?}, the ledger planned blocks {}..={} with root 0x{}: settlement stopped",
                anchor.id,
                anchor.first_block,
                anchor.last_block,
                hex::encode(anchor.root)
            ))),
        }
    }

    /// Where a stored, broadcast transaction stands; broadcasts the same bytes again when
    /// the chain has forgotten them and their nonce is still free.
    async fn follow(&self, sent: &crate::ledger::epochs::SentTx) -> Result<Fate, SettleError> {
        let chain = self.chain().await?;
        match chain.tx_status(sent.hash).await? {
            TxStatus::Mined { success: true, block, gas_used, confirmations } => {
                if confirmations < self.config.confirmations {
                    return Ok(Fate::Wait);
                }
                Ok(Fate::Final { block, gas_used })
            }
            TxStatus::Mined { success: false, .. } => Ok(Fate::Lost),
            TxStatus::Pending if self.waited_too_long(sent) => Ok(Fate::Stuck),
            TxStatus::Pending => Ok(Fate::Wait),
            TxStatus::Unknown => {
                if chain.mined_nonce().await? > sent.nonce {
                    // Our nonce went to another transaction: one this one replaced (then
                    // followed as it, confirmations and all), or a stranger to the ledger.
                    let replaced = self.replaced.lock().expect("not poisoned").clone();
                    let replaced = if replaced.0 == sent.nonce { replaced.1 } else { Vec::new() };
                    for hash in replaced {
                        if let TxStatus::Mined { success: true, block, gas_used, confirmations } =
                            chain.tx_status(hash).await?
                        {
                            if confirmations < self.config.confirmations {
                                return Ok(Fate::Wait);
                            }
                            return Ok(Fate::Final { block, gas_used });
                        }
                    }
                    return Ok(Fate::Lost);
                }
                if self.waited_too_long(sent) {
                    return Ok(Fate::Stuck);
                }
                tracing::warn!(
                    tx = %format!("0x{}", hex::encode(sent.hash)),
                    "the chain does not know a stored transaction; broadcasting the same bytes again"
                );
                chain.broadcast(&sent.raw).await?;
                Ok(Fate::Wait)
            }
        }
    }

    /// Whether `sent` has waited to be mined for `replace_after` (counted from when this
    /// server first followed it).
    fn waited_too_long(&self, sent: &crate::ledger::epochs::SentTx) -> bool {
        let mut since = self.waiting_since.lock().expect("not poisoned");
        match *since {
            Some((hash, at)) if hash == sent.hash => at.elapsed() >= self.config.replace_after,
            _ => {
                *since = Some((sent.hash, std::time::Instant::now()));
                false
            }
        }
    }

    /// `stuck`, signed again with higher fees; the caller stores it (only over `stuck`)
    /// before it is broadcast. Whichever of the two is mined settles it: the replaced one
    /// is followed too. `None` when its fee cap is twice today's estimate already (it waits
    /// for something else than its fees): it is broadcast again as it is.
    async fn sign_again(
        &self,
        what: &str,
        stuck: &crate::ledger::epochs::SentTx,
    ) -> Result<Option<crate::ledger::epochs::SentTx>, SettleError> {
        let chain = self.chain().await?;
        let Some(by) = chain.sign_replacement(stuck).await? else {
            tracing::warn!(what, tx = %format!("0x{}", hex::encode(stuck.hash)), "a transaction waits to be mined, its fees twice the estimate already; broadcasting it again");
            chain.broadcast(&stuck.raw).await?;
            *self.waiting_since.lock().expect("not poisoned") = None;
            return Ok(None);
        };
        {
            let mut replaced = self.replaced.lock().expect("not poisoned");
            if replaced.0 != stuck.nonce {
                *replaced = (stuck.nonce, Vec::new());
            }
            replaced.1.push(stuck.hash);
        }
        tracing::warn!(what, stuck = %format!("0x{}", hex::encode(stuck.hash)), by = %format!("0x{}", hex::encode(by.hash)),
            nonce = stuck.nonce, waited_s = self.config.replace_after.as_secs(),
            "a transaction waited too long to be mined; replacing it with higher fees");
        Ok(Some(by))
    }

    /// Plans the next epoch against the escrow on chain now; updates suspensions.
    async fn plan(&self) -> Result<Option<Epoch>, SettleError> {
        let chain = self.chain().await?;
        self.store.assign_internal_wallets(&format!("{:#x}", chain.operator())).await?;
        self.check_withdrawal_delay(chain).await;
        let escrows = self.escrows().await?;
        // What a game used before it asked for its escrow back is charged from the whole
        // escrow: a withdrawal request does not shield it (the delay spans a settlement).
        let balances = self.escrow_balances(&escrows).await?;
        let budgets: Vec<(i64, Units)> = escrows.iter().zip(&balances).map(|((g, _), b)| (g.game_id, *b)).collect();
        let contract = format!("{:#x}", chain.contract_address());
        // Only blocks the chain holds: the contract refuses an epoch over any other.
        let anchored = self.store.last_anchored_block().await?;
        let epoch = self.store.plan_epoch(&contract, &budgets, self.config.node_share_bps, anchored).await?;
        if epoch.as_ref().is_some_and(|e| e.charges.len() >= crate::ledger::epochs::MAX_GAMES_PER_EPOCH) {
            // More games to charge than one post names: the attempt is not recorded, so the
            // next epoch is due as soon as this one is confirmed, not at the next boundary.
            tracing::info!("an epoch charges as many games as one post may name; the next follows it");
        } else {
            self.store.record_settlement_attempt().await?;
        }
        match &epoch {
            Some(e) => tracing::info!(
                epoch = e.number, tasks = e.task_count, games = e.charges.len(), charges = %e.charge_total,
                payouts = %e.payout_total, "epoch planned"
            ),
            None => tracing::info!("epoch due, but nothing to settle"),
        }
        self.apply_escrows(&escrows).await?;
        Ok(epoch)
    }

    /// The whole escrow of each game in `escrows` (zero without a wallet).
    async fn escrow_balances(
        &self,
        escrows: &[(crate::ledger::escrow::GameBalance, Units)],
    ) -> Result<Vec<Units>, SettleError> {
        let chain = self.chain().await?;
        let mut out = vec![Units::ZERO; escrows.len()];
        let wallets: Vec<(usize, Address)> = escrows
            .iter()
            .enumerate()
            .filter_map(|(i, (g, _))| g.wallet.as_deref().map(|w| address_of(w).map(|a| (i, a))))
            .collect::<Result<_, _>>()?;
        let balances = chain.escrow_balances(&wallets.iter().map(|(_, a)| *a).collect::<Vec<_>>()).await?;
        for ((i, _), balance) in wallets.iter().zip(balances) {
            out[*i] = balance;
        }
        Ok(out)
    }

    /// Warns (once) when the contract lets a game withdraw sooner than two epochs after
    /// asking: its usage of the epoch it asked in might not be settled by then.
    async fn check_withdrawal_delay(&self, chain: &SettlementClient) {
        if self.delay_checked.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let wanted = 2 * self.config.epoch_time.as_secs();
        match chain.withdrawal_delay().await {
            Ok(delay) if delay < wanted => tracing::error!(
                delay_s = delay, wanted_s = wanted,
                "the contract's withdrawal delay is shorter than two epochs: a game could withdraw escrow \
                 before the usage it owes is settled; deploy with `ludus chain deploy --withdrawal-delay {wanted}` or more"
            ),
            Ok(_) => {}
            Err(e) => {
                self.delay_checked.store(false, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %self.scrub(&e), "could not read the contract's withdrawal delay");
            }
        }
    }

    /// Every game settlement tracks, with the escrow available to it on chain (zero
    /// without a wallet).
    async fn escrows(&self) -> Result<Vec<(crate::ledger::escrow::GameBalance, Units)>, SettleError> {
        let chain = self.chain().await?;
        // One block for both reads: a post mined between them would count its charges
        // twice (owed, and gone from the escrow) or not at all.
        let block = chain.head_block().await?;
        let posted = chain.last_epoch_at(block).await?;
        let games = self.store.game_balances(posted).await?;
        let with_wallet: Vec<(usize, Address)> = games
            .iter()
            .enumerate()
            .filter_map(|(i, g)| g.wallet.as_deref().map(|w| address_of(w).map(|a| (i, a))))
            .collect::<Result<_, _>>()?;
        let wallets: Vec<Address> = with_wallet.iter().map(|(_, a)| *a).collect();
        let amounts = chain.available_escrows_at(&wallets, block).await?;
        let mut available = vec![Units::ZERO; games.len()];
        for ((i, _), amount) in with_wallet.iter().zip(amounts) {
            available[*i] = amount;
        }
        Ok(games.into_iter().zip(available).collect())
    }

    async fn apply_escrows(&self, escrows: &[(crate::ledger::escrow::GameBalance, Units)]) -> Result<(), SettleError> {
        for (game, available) in escrows {
            let action = escrow_action(game, *available);
            if let crate::ledger::escrow::EscrowAction::Suspend(reason) = &action {
                tracing::warn!(game = %game.name, %reason, "suspending a game");
            } else if action == crate::ledger::escrow::EscrowAction::Resume {
                tracing::info!(game = %game.name, escrow = %available, "escrow covers the debt again: game resumed");
            }
            self.store.apply_escrow(game.game_id, *available, &action).await?;
        }
        Ok(())
    }

    /// Reads every game's escrow and suspends or resumes games (between epochs too).
    pub async fn check_escrows(&self) -> Result<(), SettleError> {
        if !self.hold_lock().await? {
            return Ok(());
        }
        let escrows = self.escrows().await?;
        self.apply_escrows(&escrows).await
    }

    async fn advance(&self, epoch: Epoch) -> Result<Step, SettleError> {
        let chain = self.chain().await?;
        let n = epoch.number;
        match epoch.status {
            EpochStatus::Confirmed => Ok(Step::Again),
            EpochStatus::Planned => {
                let last = chain.last_epoch().await?;
                if last >= n {
                    return self.adopt_posted(&epoch).await;
                }
                if last + 1 != n {
                    return Err(SettleError::Diverged(format!(
                        "the contract's last epoch is {last} but the ledger's next is {n}; was the contract replaced?"
                    )));
                }
                let charges: Vec<(Address, Units)> =
                    epoch.charges.iter().map(|(w, a)| Ok((address_of(w)?, *a))).collect::<Result<_, SettleError>>()?;
                let blocks = (epoch.first_block, epoch.last_block);
                let sent = match chain.sign_post(n, blocks, epoch.payout_root, epoch.payout_total, &charges).await {
                    Ok(sent) => sent,
                    Err(ChainError::Reverted(reason)) => {
                        // Escrow changed since planning: settle again from the current state.
                        tracing::warn!(epoch = n, %reason, "the planned post would revert; planning the epoch again");
                        self.store.discard_planned_epoch(n).await?;
                        // A game's escrow shrank since planning (it withdrew): plan again at
                        // the next try from the escrow now, not at the next boundary (a day
                        // of every node's pay). Other reverts (a paused contract) would recur
                        // at once: they wait for the boundary as before. A wallet short of
                        // gas money or a provider's rate limit is no revert
                        // ([`crate::chain::client::contract_error`]): the same plan is retried.
                        if reason.contains("EscrowShort") {
                            self.store.forget_settlement_attempt().await?;
                        }
                        return Err(SettleError::Chain(ChainError::Reverted(reason)));
                    }
                    Err(e) => return Err(e.into()),
                };
                // Stored first: from here on, this exact transaction is the epoch's post.
                self.store.mark_epoch_sent(&epoch, &sent).await?;
                tracing::info!(epoch = n, tx = %format!("0x{}", hex::encode(sent.hash)), nonce = sent.nonce, "epoch post signed and stored; broadcasting");
                chain.broadcast(&sent.raw).await?;
                Ok(Step::Wait)
            }
            EpochStatus::Sent => {
                let sent = epoch
                    .sent
                    .clone()
                    .ok_or_else(|| LedgerError::Corrupt(format!("epoch {n} is sent but has no transaction")))?;
                match self.follow(&sent).await? {
                    Fate::Final { block, gas_used } => {
                        self.store.mark_epoch_confirmed(n, block, gas_used).await?;
                        tracing::info!(epoch = n, block, gas_used, "epoch posted and confirmed on chain");
                        Ok(Step::Again)
                    }
                    Fate::Wait => Ok(Step::Wait),
                    Fate::Stuck => {
                        if let Some(by) = self.sign_again(&format!("epoch {n}"), &sent).await? {
                            self.store.replace_epoch_tx(n, &sent, &by).await?;
                            chain.broadcast(&by.raw).await?;
                        }
                        Ok(Step::Wait)
                    }
                    Fate::Lost => {
                        if chain.last_epoch().await? >= n {
                            return self.adopt_posted(&epoch).await;
                        }
                        tracing::warn!(epoch = n, "the epoch's post can never be mined; signing it again");
                        self.store.mark_epoch_unsent(n).await?;
                        Ok(Step::Again)
                    }
                }
            }
        }
    }

    /// The chain already has epoch `n`: accept it only if it is exactly ours.
    async fn adopt_posted(&self, epoch: &Epoch) -> Result<Step, SettleError> {
        let chain = self.chain().await?;
        let posted = chain.posted_epoch(epoch.number).await?;
        match posted {
            Some(p) if p.payout_root == epoch.payout_root && p.payout_total == epoch.payout_total => {
                self.store.mark_epoch_confirmed(epoch.number, 0, 0).await?;
                tracing::warn!(epoch = epoch.number, "the epoch was already on chain, as planned: marked confirmed");
                Ok(Step::Again)
            }
            other => Err(SettleError::Diverged(format!(
                "epoch {} on chain is {other:?}, the ledger planned root 0x{} total {}: settlement stopped",
                epoch.number,
                hex::encode(epoch.payout_root),
                epoch.payout_total
            ))),
        }
    }
}
