//! Settlement on a real chain (anvil from npm) with a real Postgres: a full day of
//! receipts settled in one post and claimed by every node, the contract's refusals,
//! gas per post independent of the task count, a server killed between "sent" and
//! "confirmed", `ludus claim`, and a game suspended for overspending until it tops up.

use std::future::IntoFuture;
use std::process::Command;
use std::time::Duration;

use alloy::primitives::{Address, FixedBytes, U256};
use alloy::providers::{DynProvider, Provider};
use alloy::signers::local::PrivateKeySigner;
use ludus::actors::settler::{Progress, Settler, SettlerConfig};
use ludus::chain::anvil::Anvil;
use ludus::chain::client::{contract_error, provider_for, wait_receipt};
use ludus::chain::contracts::Settlement;
use ludus::chain::deploy::{deploy, mint_and_deposit, token_balance, DeployPlan, Deployment};
use ludus::chain::{ChainError, SettlementClient};
use ludus::crypto::identity::Identity;
use ludus::crypto::merkle;
use ludus::crypto::merkle::payout_leaf;
use ludus::ledger::undelivered::WriteOff;
use ludus::ledger::{Receipt, Store, Units};
use ludus::protocol::receipt::confirmation_message;

use super::cluster::{wait_for, Cluster};
use super::database::{block_on, fresh_database, numbers, open, small_receipt};
use super::registry::try_chat;

const SHARE_BPS: u128 = 9_000;

/// Anvil's account `i` as a key file the CLI can read.
pub fn key_file(dir: &std::path::Path, signer: &PrivateKeySigner, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{}\n", hex::encode(signer.to_bytes()))).unwrap();
    path
}

pub fn rpc(anvil: &Anvil, method: &'static str, params: serde_json::Value) -> serde_json::Value {
    let p = provider_for(&anvil.url, anvil.keys[0].clone()).unwrap();
    block_on(async move { p.raw_request::<_, serde_json::Value>(method.into(), params).await.unwrap() })
}

pub fn deploy_default(anvil: &Anvil) -> Deployment {
    let plan = DeployPlan {
        token: None,
        operator: anvil.keys[1].address(),
        treasury: anvil.keys[9].address(),
        withdrawal_delay_s: 3600,
    };
    block_on(deploy(&anvil.url, anvil.keys[0].clone(), &plan)).expect("deploy")
}

pub fn fund(anvil: &Anvil, d: &Deployment, game: &PrivateKeySigner, amount: u128) {
    block_on(mint_and_deposit(&anvil.url, d, anvil.keys[0].clone(), game.clone(), Units(amount))).expect("fund");
}

/// Commits `count` receipts (task ids from `first`) in blocks of `per_block`, spread over
/// `nodes` and `games`, and has each node confirm its blocks (signed, as nodes do).
pub fn record_day(store: &Store, nodes: &[Identity], games: &[i64], first: u64, count: u64, per_block: u64) {
    let tasks: Vec<u64> = (first..first + count).collect();
    for chunk in tasks.chunks(per_block as usize) {
        let receipts: Vec<Receipt> = chunk
            .iter()
            .map(|&t| Receipt {
                task: t,
                game_id: games[(t % games.len() as u64) as usize],
                node: nodes[((t * 7) % nodes.len() as u64) as usize].address.to_string(),
                model: "fake".into(),
                prompt_tokens: 10,
                completion_tokens: (t % 50) as u32,
                price: Units(1_000_000_000_000 + (t as u128 % 977) * 1_000_000),
                latency_ms: 5,
                output_hash: [1; 32],
                receipt_hash: ludus::crypto::identity::keccak(&t.to_be_bytes()),
                signature: vec![0; 65],
                signed_bytes: Vec::new(),
                witnessed: true,
                sampled: false,
            })
            .collect();
        let outcome = block_on(store.commit_block(&receipts, "0x00000000000000000000000000000000000000ee")).unwrap();
        for ack in outcome.acks {
            let node = nodes.iter().find(|n| n.address.to_string() == ack.node).unwrap();
            let root = merkle::task_root(&ack.tasks);
            let count = ack.tasks.len() as u32;
            let signature = node.sign(&confirmation_message(ack.block, &root, count, &[]));
            block_on(store.confirm_block(&ack.node, ack.block, root, count, &[], &signature)).unwrap();
        }
    }
}

/// Runs the settler until nothing is open (automine: a post is mined at once).
fn settle(settler: &Settler) -> u32 {
    let mut runs = 0;
    let mut plan = true;
    loop {
        runs += 1;
        assert!(runs < 50, "settlement did not finish");
        let outcome = block_on(settler.run(plan)).expect("settlement run");
        if outcome.planned {
            plan = false;
        }
        match outcome.progress {
            Progress::Idle => return runs,
            Progress::Waiting => std::thread::sleep(Duration::from_millis(50)),
            Progress::Standby => panic!("another settler holds the lock"),
        }
    }
}

/// A settler for `d` on `anvil`: daily epochs, hourly anchors, one confirmation.
fn settler_config(anvil: &Anvil, d: &Deployment) -> SettlerConfig {
    SettlerConfig {
        rpc_url: anvil.url.clone(),
        contract: d.settlement,
        node_share_bps: SHARE_BPS as u32,
        confirmations: 1,
        epoch_time: Duration::from_secs(86_400),
        anchor_interval: Duration::from_secs(3600),
        anchor_confirm_wait: Duration::ZERO,
        replace_after: Duration::from_secs(600),
    }
}

fn reverted(result: Result<impl std::fmt::Debug, alloy::contract::Error>, what: &str) -> String {
    match result.map_err(|e| contract_error(what, e)) {
        Err(ChainError::Reverted(reason)) => reason,
        other => panic!("{what}: expected a revert, got {other:?}"),
    }
}

fn receipt_gas(p: &DynProvider, hash: &str) -> u64 {
    let hash: FixedBytes<32> = hash.parse().unwrap();
    block_on(async { p.get_transaction_receipt(hash).await.unwrap().unwrap().gas_used })
}

#[test]
fn a_full_day_settles_in_one_post_and_every_node_claims_exactly_its_payout() {
    let anvil = Anvil::start(None).expect("anvil (run scripts/setup)");
    let d = deploy_default(&anvil);
    let store = open(&fresh_database());
    let game_keys: Vec<PrivateKeySigner> = (2..7).map(|i| anvil.keys[i].clone()).collect();
    let mut games = Vec::new();
    for (i, key) in game_keys.iter().enumerate() {
        let name = format!("game{i}");
        let (id, _) = block_on(store.add_game(&name, 1000, 1_000_000)).unwrap();
        block_on(store.set_game_wallet(&name, &format!("{:#x}", key.address()))).unwrap();
        fund(&anvil, &d, key, 10u128.pow(24));
        games.push(id);
    }
    let nodes: Vec<Identity> = (0..50).map(|_| Identity::generate()).collect();
    // A day: 10,000 receipts over 40 blocks, every node confirming its blocks.
    record_day(&store, &nodes, &games, 1, 10_000, 250);
    // Not payable: a task its node disputes, and a block one node never confirmed.
    let extra: Vec<u64> = (20_001..20_011).collect();
    record_unconfirmed(&store, &nodes[0], games[0], &extra);

    let config = settler_config(&anvil, &d);
    let settler = Settler::new(store.clone(), config.clone(), anvil.keys[1].clone());
    settle(&settler);

    // The post: one epoch, its root and totals equal to the ledger's and to a
    // recomputation from the receipts here.
    let epoch = block_on(store.epoch(1)).unwrap().expect("epoch 1");
    assert_eq!(epoch.status, ludus::books::EpochStatus::Confirmed);
    assert_eq!(epoch.task_count, 10_000, "only confirmed receipts settle");
    let mut expected: std::collections::BTreeMap<String, u128> = Default::default();
    let mut charged = vec![0u128; games.len()];
    for t in 1..=10_000u64 {
        let price = 1_000_000_000_000 + (t as u128 % 977) * 1_000_000;
        *expected.entry(nodes[((t * 7) % 50) as usize].address.to_string()).or_default() += price;
        charged[(t % 5) as usize] += price;
    }
    let expected: Vec<(String, u128)> = expected.into_iter().map(|(n, s)| (n, s * SHARE_BPS / 10_000)).collect();
    let payouts = block_on(store.epoch_payouts(1)).unwrap();
    assert_eq!(payouts.len(), 50);
    assert_eq!(payouts.iter().map(|(n, a)| (n.clone(), a.0)).collect::<Vec<_>>(), expected);
    let leaves: Vec<[u8; 32]> =
        expected.iter().map(|(n, a)| payout_leaf(&n.parse::<Address>().unwrap().0 .0, *a)).collect();
    assert_eq!(epoch.payout_root, merkle::root(&leaves));
    let chain = block_on(SettlementClient::connect(&anvil.url, d.settlement, anvil.keys[1].clone())).unwrap();
    let posted = block_on(chain.posted_epoch(1)).unwrap().expect("posted");
    assert_eq!(posted.payout_root, epoch.payout_root, "on-chain root = ledger root");
    assert_eq!(posted.payout_total, epoch.payout_total);
    assert_eq!(posted.charge_total.0, charged.iter().sum::<u128>());
    assert_eq!(block_on(chain.last_epoch()).unwrap(), 1);
    // Each game paid its charge out of escrow.
    let escrows =
        block_on(chain.available_escrows(&game_keys.iter().map(|k| k.address()).collect::<Vec<_>>())).unwrap();
    for (i, escrow) in escrows.iter().enumerate() {
        assert_eq!(escrow.0, 10u128.pow(24) - charged[i], "game {i}");
    }
    // The contract's leaf is ours.
    let relayer = provider_for(&anvil.url, anvil.keys[8].clone()).unwrap();
    let contract = Settlement::new(d.settlement, relayer.clone());
    let (n0, a0) = &expected[0];
    let their_leaf = block_on(contract.payoutLeaf(n0.parse().unwrap(), U256::from(*a0)).call().into_future()).unwrap();
    assert_eq!(their_leaf.0, leaves[0]);

    // Before any claim: an inflated amount, and another node's proof, are refused.
    let own_proof: Vec<FixedBytes<32>> =
        block_on(store.payout_claims(n0)).unwrap()[0].proof.iter().map(|h| h.parse().unwrap()).collect();
    let (n1, a1) = &expected[1];
    let r = block_on(
        contract
            .claim(
                1,
                n1.parse().unwrap(),
                U256::from(*a1 + 1),
                block_on(store.payout_claims(n1)).unwrap()[0].proof.iter().map(|h| h.parse().unwrap()).collect(),
            )
            .call()
            .into_future(),
    );
    assert!(reverted(r, "inflated claim").contains("InvalidProof"));
    let r = block_on(contract.claim(1, n1.parse().unwrap(), U256::from(*a1), own_proof).call().into_future());
    assert!(reverted(r, "someone else's proof").contains("InvalidProof"));
    // Every node claims (relayed by an account with gas); each gets exactly its payout.
    let mut claim_gas = 0;
    for (i, (node, amount)) in expected.iter().enumerate() {
        let address: Address = node.parse().unwrap();
        let mut claims = block_on(store.payout_claims(node)).unwrap();
        assert_eq!(claims.len(), 1);
        if i == 0 {
            // A claim the contract refuses (an epoch it never saw) is left out, reported;
            // the good one goes through (the batch used to revert whole).
            claims.push(ludus::books::PayoutClaim { epoch: 9, amount: Units(1), proof: vec![] });
        }
        let report = block_on(ludus::chain::claim::claim_all(&relayer, d.settlement, address, &claims)).unwrap();
        if i == 0 {
            assert_eq!(report.refused.len(), 1, "{report:?}");
            assert!(report.refused[0].0 == 9 && report.refused[0].1.contains("UnknownEpoch"), "{report:?}");
        }
        assert_eq!(report.total.0, *amount);
        claim_gas = receipt_gas(&relayer, report.tx_hash.as_deref().unwrap());
        assert_eq!(block_on(token_balance(&anvil.url, d.token, address)).unwrap(), U256::from(*amount));
    }
    // A second claim, a wrong amount, a wrong proof: all refused.
    let address: Address = n0.parse().unwrap();
    let claims = block_on(store.payout_claims(n0)).unwrap();
    let again = block_on(ludus::chain::claim::claim_all(&relayer, d.settlement, address, &claims)).unwrap();
    assert!(again.claimed.is_empty() && again.already_claimed == vec![1]);
    let proof: Vec<FixedBytes<32>> = claims[0].proof.iter().map(|h| h.parse().unwrap()).collect();
    let r = block_on(contract.claim(1, address, U256::from(*a0), proof.clone()).call().into_future());
    assert!(reverted(r, "second claim").contains("AlreadyClaimed"));
    // Only the operator posts, and epoch 1 cannot be posted again.
    let stranger = Settlement::new(d.settlement, provider_for(&anvil.url, anvil.keys[5].clone()).unwrap());
    let (b1, b2) = (epoch.last_block + 1, epoch.last_block);
    let r =
        block_on(stranger.postEpoch(2, b1, b2, FixedBytes([7; 32]), U256::ZERO, vec![], vec![]).call().into_future());
    assert!(reverted(r, "non-operator post").contains("NotOperator"));
    let r = block_on(stranger.anchorBlocks(b1, vec![FixedBytes([7; 32])]).call().into_future());
    assert!(reverted(r, "non-operator anchor").contains("NotOperator"));
    let operator = Settlement::new(d.settlement, provider_for(&anvil.url, anvil.keys[1].clone()).unwrap());
    let r =
        block_on(operator.postEpoch(1, 1, b2, FixedBytes([7; 32]), U256::ZERO, vec![], vec![]).call().into_future());
    assert!(reverted(r, "second post of epoch 1").contains("EpochOutOfOrder"));
    // The day is tied to its blocks: an epoch must start right after the last settled
    // block, and may not settle a block the chain has not anchored.
    let anchored = block_on(contract.lastAnchoredBlock().call().into_future()).unwrap();
    assert_eq!(anchored, epoch.last_block, "every block the epoch settled was anchored first");
    let r = block_on(
        operator.postEpoch(2, b1 + 1, b1 + 1, FixedBytes([7; 32]), U256::ZERO, vec![], vec![]).call().into_future(),
    );
    assert!(reverted(r, "a gap before the epoch's blocks").contains("BlockRangeOutOfOrder"));
    let r =
        block_on(operator.postEpoch(2, b1, b1, FixedBytes([7; 32]), U256::ZERO, vec![], vec![]).call().into_future());
    let refusal = reverted(r, "an epoch over an unanchored block");
    assert!(refusal.contains("BlocksNotAnchored"), "{refusal}");
    let r = block_on(operator.anchorBlocks(b1 + 1, vec![FixedBytes([7; 32])]).call().into_future());
    assert!(reverted(r, "an anchor that skips a block").contains("AnchorOutOfOrder"));
    let r = block_on(operator.anchorBlocks(1, vec![FixedBytes([7; 32])]).call().into_future());
    assert!(reverted(r, "a block anchored twice").contains("AnchorOutOfOrder"));
    let r = block_on(operator.anchorBlocks(b1, vec![]).call().into_future());
    assert!(reverted(r, "an empty anchor").contains("NoBlocks"));
    // Fees: charges not paid out.
    let fees = block_on(contract.fees().call().into_future()).unwrap();
    assert_eq!(fees, U256::from(epoch.charge_total.0 - epoch.payout_total.0));

    // Gas per post does not grow with tasks: 100 tasks vs 5,000 tasks, same 5 games.
    record_day(&store, &nodes, &games, 30_001, 100, 100);
    settle(&settler);
    record_day(&store, &nodes, &games, 40_001, 5_000, 500);
    settle(&settler);
    let (e2, e3) = (block_on(store.epoch(2)).unwrap().unwrap(), block_on(store.epoch(3)).unwrap().unwrap());
    assert_eq!((e2.task_count, e3.task_count), (100, 5_000));
    let (g1, g2, g3) = (epoch.gas_used.unwrap(), e2.gas_used.unwrap(), e3.gas_used.unwrap());
    assert!(g3.abs_diff(g2) * 100 <= g2, "gas per post must not grow with tasks: {g2} for 100, {g3} for 5000");
    // Deposit gas, for the report.
    let depositor = provider_for(&anvil.url, anvil.keys[2].clone()).unwrap();
    let token =
        ludus::chain::contracts::LudusTestToken::new(d.token, provider_for(&anvil.url, anvil.keys[0].clone()).unwrap());
    let wait = |p: &DynProvider, hash| {
        let p = p.clone();
        block_on(async move { wait_receipt(&p, hash, Duration::from_secs(30)).await.unwrap() })
    };
    let minter = provider_for(&anvil.url, anvil.keys[0].clone()).unwrap();
    let hash =
        block_on(async { *token.mint(anvil.keys[2].address(), U256::from(10u64)).send().await.unwrap().tx_hash() });
    wait(&minter, hash);
    let t2 = ludus::chain::contracts::LudusTestToken::new(d.token, depositor.clone());
    let hash = block_on(async { *t2.approve(d.settlement, U256::from(10u64)).send().await.unwrap().tx_hash() });
    wait(&depositor, hash);
    let s2 = Settlement::new(d.settlement, depositor.clone());
    let hash = block_on(async { *s2.deposit(U256::from(10u64)).send().await.unwrap().tx_hash() });
    let deposit_gas = wait(&depositor, hash).gas_used;
    eprintln!(
        "GAS REPORT: post epoch 1 (10,000 tasks, 50 nodes, 5 games) {g1}; epoch 2 (100 tasks) {g2}; \
         epoch 3 (5,000 tasks) {g3}; claim (one epoch) {claim_gas}; deposit {deposit_gas}"
    );
    // The unconfirmed receipts are still unsettled, owed by their game.
    assert_eq!(numbers(&store, "SELECT count(*) FROM receipts WHERE epoch IS NULL"), vec![10]);
}

#[test]
fn unused_escrow_comes_back_only_after_the_withdrawal_delay() {
    let anvil = Anvil::start(None).expect("anvil");
    let d = deploy_default(&anvil);
    let game = anvil.keys[4].clone();
    fund(&anvil, &d, &game, 1_000);
    let p = provider_for(&anvil.url, game.clone()).unwrap();
    let contract = Settlement::new(d.settlement, p.clone());
    let mined = |hash| assert!(block_on(wait_receipt(&p, hash, Duration::from_secs(30))).unwrap().status());
    let r = block_on(contract.withdraw().call().into_future());
    assert!(reverted(r, "withdraw without a request").contains("NothingToWithdraw"));
    mined(block_on(async { *contract.requestWithdrawal(U256::from(600u64)).send().await.unwrap().tx_hash() }));
    // A requested amount no longer counts for settlement, though it is still held.
    assert_eq!(block_on(contract.availableEscrow(game.address()).call().into_future()).unwrap(), U256::from(400u64));
    assert_eq!(block_on(contract.escrowOf(game.address()).call().into_future()).unwrap(), U256::from(1_000u64));
    let r = block_on(contract.withdraw().call().into_future());
    assert!(reverted(r, "withdraw before the delay").contains("WithdrawalNotReady"));
    rpc(&anvil, "evm_increaseTime", serde_json::json!([3601]));
    rpc(&anvil, "evm_mine", serde_json::json!([]));
    mined(block_on(async { *contract.withdraw().send().await.unwrap().tx_hash() }));
    assert_eq!(block_on(token_balance(&anvil.url, d.token, game.address())).unwrap(), U256::from(600u64));
    assert_eq!(block_on(contract.escrowOf(game.address()).call().into_future()).unwrap(), U256::from(400u64));
    assert_eq!(block_on(contract.availableEscrow(game.address()).call().into_future()).unwrap(), U256::from(400u64));
}

/// Receipts committed but never confirmed by their node.
/// A game that withdraws between planning and posting makes the post revert
/// (`EscrowShort`): the plan is discarded and the epoch planned again at the next try from
/// the escrow now. It used to wait for the next boundary, a day of every node's pay.
#[test]
fn a_post_that_would_overdraw_an_escrow_is_planned_again_at_once() {
    let anvil = Anvil::start(None).expect("anvil (run scripts/setup)");
    let d = deploy_default(&anvil);
    let store = open(&fresh_database());
    let game_key = anvil.keys[2].clone();
    let (game, _) = block_on(store.add_game("withdrawer", 1000, 1_000_000)).unwrap();
    block_on(store.set_game_wallet("withdrawer", &format!("{:#x}", game_key.address()))).unwrap();
    // Escrow for about three of the ten tasks (each ~1e12 units).
    fund(&anvil, &d, &game_key, 3_500_000_000_000);
    let nodes: Vec<Identity> = (0..3).map(|_| Identity::generate()).collect();
    record_day(&store, &nodes, &[game], 1, 10, 5);
    let config = settler_config(&anvil, &d);
    let settler = Settler::new(store.clone(), config, anvil.keys[1].clone());
    // Anchor the blocks, nothing planned yet.
    while matches!(block_on(settler.run(false)).unwrap().progress, Progress::Waiting) {
        std::thread::sleep(Duration::from_millis(50));
    }
    // A plan made while the escrow covered everything (the game withdrew since).
    let anchored = block_on(store.last_anchored_block()).unwrap();
    let contract = format!("{:#x}", d.settlement);
    let budgets = [(game, Units(u128::MAX / 4))];
    let stale = block_on(store.plan_epoch(&contract, &budgets, SHARE_BPS as u32, anchored)).unwrap().unwrap();
    assert_eq!(stale.task_count, 10);
    block_on(store.record_settlement_attempt()).unwrap();
    let now = std::time::SystemTime::now();
    assert!(!block_on(settler.is_due(now)).unwrap());
    let reverted = block_on(settler.run(false)).expect_err("the post reverts");
    assert!(format!("{reverted:?}").contains("EscrowShort"), "{reverted:?}");
    assert!(block_on(store.epoch(stale.number)).unwrap().is_none(), "the plan is discarded");
    assert!(block_on(settler.is_due(now)).unwrap(), "the epoch is due again at once");
    // The next try plans within the escrow and posts.
    settle(&settler);
    let epoch = block_on(store.epoch(stale.number)).unwrap().expect("planned again");
    assert_eq!(epoch.status, ludus::books::EpochStatus::Confirmed);
    assert!(epoch.task_count >= 1 && epoch.task_count < 10, "{} tasks", epoch.task_count);
}

/// An epoch is planned while games keep playing. The settler anchors the blocks ready
/// before it plans; it used to anchor until none was left, and under steady play a new
/// block is ready every block time, sooner than an anchor confirms: the day's epoch was
/// never planned, nobody was charged and no node was paid.
#[test]
fn an_epoch_is_planned_while_games_keep_playing() {
    let anvil = Anvil::start(None).expect("anvil (run scripts/setup)");
    let d = deploy_default(&anvil);
    let store = open(&fresh_database());
    let game_key = anvil.keys[2].clone();
    let (game, _) = block_on(store.add_game("player", 1000, 1_000_000)).unwrap();
    block_on(store.set_game_wallet("player", &format!("{:#x}", game_key.address()))).unwrap();
    fund(&anvil, &d, &game_key, 1_000_000_000_000_000);
    let nodes: Vec<Identity> = (0..2).map(|_| Identity::generate()).collect();
    record_day(&store, &nodes, &[game], 1, 10, 5);
    let settler = Settler::new(store.clone(), settler_config(&anvil, &d), anvil.keys[1].clone());
    let mut next_task = 11;
    let mut runs = 0;
    while !block_on(settler.run(true)).expect("settlement run").planned {
        runs += 1;
        assert!(runs < 20, "no epoch planned in {runs} runs while blocks kept coming");
        // Games play on: a block is committed and confirmed before the settler looks again.
        record_day(&store, &nodes, &[game], next_task, 2, 2);
        next_task += 2;
    }
    let epoch = block_on(store.epoch(1)).unwrap().expect("epoch 1 planned");
    let anchored = block_on(store.last_anchored_block()).unwrap();
    assert!(epoch.task_count >= 10, "{} tasks", epoch.task_count);
    assert!(epoch.last_block <= anchored, "the epoch covers only anchored blocks");
}

/// While an epoch's post is not on chain, its charges are still owed: the chain's escrow
/// holds them until the post is mined. They used to drop out of what a game owes at
/// planning, so an escrow check in that window counted the same escrow twice (and resumed a
/// game suspended for a shortfall). Once mined (confirmed or not), the escrow paid them.
#[test]
fn an_open_epochs_charges_are_owed_until_its_post_is_on_chain() {
    let store = open(&fresh_database());
    let (game, _) = block_on(store.add_game("owing", 1000, 1_000_000)).unwrap();
    block_on(store.set_game_wallet("owing", &format!("0x{:040x}", 0x0e))).unwrap();
    let nodes = [Identity::generate()];
    record_day(&store, &nodes, &[game], 1, 6, 3);
    let owed_with =
        |posted: u64| block_on(store.game_balances(posted)).unwrap().iter().find(|g| g.game_id == game).unwrap().owed;
    let owed = || owed_with(0);
    let before = owed();
    assert!(before > Units::ZERO);
    // A budget for some of the tasks: the epoch charges part, the rest stays unsettled.
    let budget = Units(before.0 / 2);
    let epoch = block_on(store.plan_epoch("0x00000000000000000000000000000000000000cc", &[(game, budget)], 9_000, 2))
        .unwrap()
        .expect("an epoch");
    let charged = epoch.charges.iter().map(|(_, a)| a.0).sum::<u128>();
    assert!(charged > 0 && charged < before.0, "charged {charged} of {before}");
    assert_eq!(owed(), before, "planned: its charges still owed");
    // Mined, not yet confirmed: the chain's escrow paid them already (counted twice, an
    // honest game would be suspended for a day's charges it paid).
    assert_eq!(owed_with(epoch.number), Units(before.0 - charged), "on chain: paid from the escrow");
    // What counts is the chain's view, read with the escrows: the ledger's confirmation
    // changes nothing (a lagging chain view still holding them counts them).
    block_on(store.mark_epoch_confirmed(epoch.number, 1, 1)).unwrap();
    assert_eq!(owed_with(epoch.number), Units(before.0 - charged), "confirmed: the escrow paid them");
    assert_eq!(owed(), before, "a chain view before the post still holds them");
}

/// An answer the network failed to deliver (a job forwarded to another server, given up
/// by the one holding the game's connection) is written off: its receipt, recorded before
/// or after the write-off, is not owed, not in the game's usage or the block's charges,
/// not payable to its node, and never settled. It used to be billed where it ran while the
/// game read a 502.
#[test]
fn an_answer_written_off_is_neither_charged_nor_paid() {
    let store = open(&fresh_database());
    let (game, _) = block_on(store.add_game("lost", 1000, 1_000_000)).unwrap();
    block_on(store.set_game_wallet("lost", &format!("0x{:040x}", 0x1e))).unwrap();
    let nodes = [Identity::generate(), Identity::generate()];
    // Task 3 written off before its receipt is on the books, task 5 after.
    let first = block_on(store.record_undelivered(3, "a", "server `b`, which was running it, stopped answering"));
    assert_eq!(first.unwrap(), WriteOff { new: true, settled_in: None });
    record_day(&store, &nodes, &[game], 1, 6, 3);
    assert!(block_on(store.record_undelivered(5, "a", "server `b` lost part of the answer\0")).unwrap().new);
    assert!(!block_on(store.record_undelivered(5, "c", "again")).unwrap().new, "a task is written off once");
    assert_eq!(block_on(store.undelivered(5)).unwrap().as_deref(), Some("server `b` lost part of the answer\u{fffd}"));
    assert_eq!(block_on(store.undelivered(4)).unwrap(), None);
    let price = |tasks: &[u64]| -> u128 {
        let list = tasks.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        let sql = format!("SELECT (sum(price_units) / 1000000)::bigint FROM receipts WHERE task_id IN ({list})");
        numbers(&store, &sql)[0] as u128 * 1_000_000
    };
    let (delivered, lost) = (price(&[1, 2, 4, 6]), price(&[3, 5]));
    assert!(lost > 0 && delivered > 0);
    let owed = block_on(store.game_balances(0)).unwrap().iter().find(|g| g.game_id == game).unwrap().owed;
    assert_eq!(owed, Units(delivered), "owed: the delivered answers only");
    let usage = block_on(store.usage(game, 1)).unwrap();
    assert_eq!(
        (usage.iter().map(|d| d.tasks).sum::<i64>(), usage.iter().map(|d| d.charges.0).sum::<u128>()),
        (4, delivered)
    );
    let blocks: u128 = (1..=2).map(|b| block_on(store.block_report(b)).unwrap().expect("a block").charges.0).sum();
    assert_eq!(blocks, delivered, "the blocks' charges");
    let payable: u128 = block_on(store.node_reports()).unwrap().iter().map(|n| n.payable.0).sum();
    assert_eq!(payable, delivered, "payable to the nodes");
    let contract = "0x00000000000000000000000000000000000000cc";
    let epoch = block_on(store.plan_epoch(contract, &[(game, Units(u128::MAX / 8))], SHARE_BPS as u32, 2))
        .unwrap()
        .expect("an epoch");
    assert_eq!(epoch.task_count, 4);
    assert_eq!(epoch.charge_total, Units(delivered));
    assert!(epoch.payout_total.0 <= delivered * SHARE_BPS / 10_000, "{:?}", epoch.payout_total);
    assert!(epoch.payout_total.0 + 2 > delivered * SHARE_BPS / 10_000, "{:?}", epoch.payout_total);
    // A game auditing its receipts sees which were written off.
    let proof = |task| block_on(store.receipt_proof(task)).unwrap().expect("a receipt");
    assert_eq!(proof(3).written_off.as_deref(), Some("server `b`, which was running it, stopped answering"));
    assert_eq!(proof(4).written_off, None);
    let unsettled = "SELECT min(task_id), max(task_id), count(*) FROM receipts WHERE epoch IS NULL";
    assert_eq!(numbers(&store, unsettled), vec![3, 5, 2], "(first, last, count) left unsettled");
    // Too late: a receipt settled before its write-off was charged and paid, and the
    // books keep saying so.
    let late = block_on(store.record_undelivered(4, "a", "too late")).unwrap();
    assert_eq!(late, WriteOff { new: true, settled_in: Some(epoch.number) });
    assert_eq!(proof(4).written_off, None, "settled: charged and paid");
    let payable: u128 = block_on(store.node_reports()).unwrap().iter().map(|n| n.payable.0).sum();
    assert_eq!(payable, delivered, "the settled receipt still counts");
    let usage = block_on(store.usage(game, 1)).unwrap();
    assert_eq!(usage.iter().map(|d| d.tasks).sum::<i64>(), 4);
}

/// One post names every game it charges (about 8,000 gas each), so an epoch charges at
/// most `MAX_GAMES_PER_EPOCH`: the games whose oldest receipt is oldest, the others in the
/// next epoch. With no bound, enough games made the post too big for a block, and every
/// later plan only added games: settlement stopped for good.
#[test]
fn an_epoch_charges_a_bounded_number_of_games_and_the_rest_follow() {
    let store = open(&fresh_database());
    let games: Vec<i64> = (0..3)
        .map(|i| {
            let name = format!("many{i}");
            let (game, _) = block_on(store.add_game(&name, 1000, 1_000_000)).unwrap();
            block_on(store.set_game_wallet(&name, &format!("0x{:040x}", 0x100 + i))).unwrap();
            game
        })
        .collect();
    // The last game played first (block 1); the others from block 2.
    record_day(&store, &[Identity::generate()], &games[2..], 1, 2, 2);
    record_day(&store, &[Identity::generate()], &games, 3, 6, 6);
    let budgets: Vec<(i64, Units)> = games.iter().map(|&g| (g, Units(u128::MAX / 8))).collect();
    let contract = "0x00000000000000000000000000000000000000cc";
    let plan = || block_on(store.plan_epoch_of_at_most(contract, &budgets, 9_000, 2, 2)).unwrap().expect("an epoch");
    let charged = |epoch: &ludus::ledger::epochs::Epoch| {
        let mut ids: Vec<i64> = epoch
            .charges
            .iter()
            .map(|(wallet, _)| {
                let i = i64::from_str_radix(wallet.trim_start_matches("0x"), 16).unwrap() - 0x100;
                games[i as usize]
            })
            .collect();
        ids.sort();
        ids
    };
    let first = plan();
    assert_eq!(charged(&first), vec![games[0], games[2]], "the oldest receipt first, then the lowest id");
    block_on(store.mark_epoch_confirmed(first.number, 1, 1)).unwrap();
    let second = plan();
    assert_eq!(charged(&second), vec![games[1]], "the game left over is charged next");
    assert_eq!(first.task_count + second.task_count, 8, "every task settled once");
    assert_eq!(ludus::ledger::epochs::MAX_GAMES_PER_EPOCH, 1_000);
}

/// A transaction that waits too long to be mined (the chain's base fee rose above its fee
/// cap) is signed again at its nonce with higher fees, stored first, and the replacement
/// settles it. It used to be broadcast again as it was, for ever, and settlement waited
/// with it: anchors and epochs take turns on one open transaction.
#[test]
fn a_transaction_stuck_unmined_is_replaced_with_higher_fees() {
    let anvil = Anvil::start(None).expect("anvil (run scripts/setup)");
    let d = deploy_default(&anvil);
    let store = open(&fresh_database());
    let (game, _) = block_on(store.add_game("stuck", 1000, 1_000_000)).unwrap();
    record_day(&store, &[Identity::generate()], &[game], 1, 4, 2);
    let config = SettlerConfig { replace_after: Duration::from_millis(500), ..settler_config(&anvil, &d) };
    let settler = Settler::new(store.clone(), config, anvil.keys[1].clone());
    // Nothing is mined: the anchor waits in the mempool.
    rpc(&anvil, "evm_setAutomine", serde_json::json!([false]));
    assert_eq!(block_on(settler.run(false)).unwrap().progress, Progress::Waiting);
    let stored = || block_on(store.open_anchor()).unwrap().and_then(|a| a.sent).expect("a sent anchor");
    let first = stored();
    assert_eq!(block_on(settler.run(false)).unwrap().progress, Progress::Waiting, "pending, not stuck yet");
    assert_eq!(stored().hash, first.hash);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(block_on(settler.run(false)).unwrap().progress, Progress::Waiting);
    let replacement = stored();
    assert_ne!(replacement.hash, first.hash, "replaced");
    assert_eq!(replacement.nonce, first.nonce, "at the same nonce");
    // The chain mines again: the replacement (its fees are higher) is the one mined.
    rpc(&anvil, "evm_setAutomine", serde_json::json!([true]));
    rpc(&anvil, "evm_mine", serde_json::json!([]));
    let mut runs = 0;
    while block_on(settler.run(false)).unwrap().progress != Progress::Idle {
        runs += 1;
        assert!(runs < 50, "the anchor was never confirmed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(block_on(store.last_anchored_block()).unwrap(), 2);
    let p = provider_for(&anvil.url, anvil.keys[0].clone()).unwrap();
    let mined = |hash: [u8; 32]| block_on(p.get_transaction_receipt(FixedBytes(hash))).unwrap().is_some();
    assert!(mined(replacement.hash) && !mined(first.hash), "only the replacement was mined");
}

fn record_unconfirmed(store: &Store, node: &Identity, game: i64, tasks: &[u64]) {
    let receipts: Vec<Receipt> = tasks.iter().map(|&t| small_receipt(t, game, &node.address.to_string())).collect();
    block_on(store.commit_block(&receipts, "0x00000000000000000000000000000000000000ee")).unwrap();
}

/// A cluster whose server settles on `anvil` (operator: anvil's account 1).
pub fn settling_cluster(anvil: &Anvil, extra: &str) -> (Cluster, Deployment, std::path::PathBuf) {
    settling_cluster_via(anvil, &anvil.url, extra)
}

/// Like [`settling_cluster`], the server reaching the chain at `rpc_url` (a relay).
fn settling_cluster_via(anvil: &Anvil, rpc_url: &str, extra: &str) -> (Cluster, Deployment, std::path::PathBuf) {
    let keys = tempfile::tempdir().unwrap().keep();
    let deployer = key_file(&keys, &anvil.keys[0], "deployer.key");
    let operator = key_file(&keys, &anvil.keys[1], "operator.key");
    // Deployed through the CLI, as an operator would.
    let out = crate::cluster::ludus()
        .args(["chain", "deploy", "--rpc", &anvil.url, "--key", deployer.to_str().unwrap(), "--test-token"])
        .args(["--operator", &format!("{:#x}", anvil.keys[1].address()), "--withdrawal-delay", "60"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let d: Deployment = serde_json::from_slice(&out.stdout).unwrap();
    let cluster = Cluster::start(&format!(
        "[settlement]\nrpc_url = \"{}\"\ncontract = \"{:#x}\"\noperator_key = \"{}\"\nconfirmations = 1\n\
         retry_s = 0.3\npoll_ms = 100\nescrow_check_blocks = 1\nanchor_interval_s = 0.3\npublic_rpc_url = \"{}\"\n{extra}",
        rpc_url,
        d.settlement,
        operator.display(),
        anvil.url
    ));
    (cluster, d, keys)
}

pub fn ludus(cluster: &Cluster, args: &[&str]) -> std::process::Output {
    crate::cluster::ludus().arg("--config").arg(&cluster.config).args(args).output().unwrap()
}

/// Registers `game`'s address as the test game's wallet (through the CLI) and deposits
/// `escrow` into it.
pub fn give_wallet(cluster: &Cluster, anvil: &Anvil, d: &Deployment, game: &PrivateKeySigner, escrow: u128) {
    let out = ludus(cluster, &["games", "set-wallet", "testgame", &format!("{:#x}", game.address())]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    fund(anvil, d, game, escrow);
}

pub fn admin_post(cluster: &Cluster, path: &str) -> u16 {
    let token = std::fs::read_to_string(cluster.dir.path().join("data/admin-token")).unwrap();
    super::cluster::raw(
        &cluster.addr,
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\n\r\n", token.trim())
            .as_bytes(),
    )
    .status
}

fn epoch_status(store: &Store, n: i64) -> Option<(String, Option<String>)> {
    block_on(async {
        let conn = store.conn().await.unwrap();
        conn.query_opt("SELECT status, tx_hash FROM epochs WHERE number = $1", &[&n])
            .await
            .unwrap()
            .map(|r| (r.get(0), r.get(1)))
    })
}

/// How many transactions the operator (anvil's account 1) has had mined.
pub fn operator_nonce(anvil: &Anvil) -> u64 {
    let p = provider_for(&anvil.url, anvil.keys[0].clone()).unwrap();
    let operator = anvil.keys[1].address();
    block_on(async move { p.get_transaction_count(operator).latest().await.unwrap() })
}

/// Waits until every committed block is anchored on chain (and the anchor confirmed).
pub fn wait_anchored(store: &Store) {
    wait_for("every block to be anchored", Duration::from_secs(30), || {
        let p = block_on(store.anchor_progress()).unwrap();
        p.last_anchored_block == p.last_committed_block
    });
}

/// Anchors the ledger holds, checked against the chain: consecutive ids, each starting
/// right after the one before, each on chain exactly as planned. Returns how many.
pub fn anchors_match_the_chain(store: &Store, chain: &SettlementClient) -> u64 {
    let count = block_on(chain.anchor_count()).unwrap();
    let mut next_block = 1;
    for id in 1..=count {
        let a =
            block_on(store.anchor(id)).unwrap().unwrap_or_else(|| panic!("anchor {id} is on chain, not in the ledger"));
        assert_eq!(a.first_block, next_block, "anchor {id} starts right after the one before");
        assert_eq!(
            block_on(chain.posted_anchor(id)).unwrap(),
            Some((a.root, a.first_block, a.last_block)),
            "anchor {id}"
        );
        next_block = a.last_block + 1;
    }
    assert!(block_on(store.anchor(count + 1))
        .unwrap()
        .is_none_or(|a| a.status != ludus::ledger::epochs::EpochStatus::Confirmed));
    count
}

pub fn chats(cluster: &Cluster, n: usize, store: &Store, confirmed_total: i64) {
    for _ in 0..n {
        try_chat(&cluster.addr, &cluster.key, "fake").expect("200");
    }
    wait_for("the nodes to confirm their receipts", Duration::from_secs(30), || {
        numbers(store, "SELECT count(*) FILTER (WHERE confirmation = 'confirmed') FROM receipts")
            == vec![confirmed_total]
    });
}

#[test]
fn a_server_killed_between_sent_and_confirmed_posts_each_epoch_exactly_once_and_nodes_claim() {
    let anvil = Anvil::start(None).expect("anvil");
    let (mut cluster, d, keys) = settling_cluster(&anvil, "");
    let game = anvil.keys[2].clone();
    give_wallet(&cluster, &anvil, &d, &game, 10u128.pow(22));
    cluster.add_node(&["--fake-engine", "3:1"]);
    cluster.add_node(&["--fake-engine", "3:1"]);
    cluster.wait_nodes("fake", 2);
    let store = cluster.store();
    let nonce = || operator_nonce(&anvil);
    let chain = block_on(SettlementClient::connect(&anvil.url, d.settlement, anvil.keys[1].clone())).unwrap();

    // Epoch 1: the signed post is lost with the server (killed, and dropped from the
    // mempool); the restarted server re-broadcasts the same stored transaction.
    chats(&cluster, 8, &store, 8);
    wait_anchored(&store);
    rpc(&anvil, "evm_setAutomine", serde_json::json!([false]));
    assert_eq!(admin_post(&cluster, "/admin/settle"), 202);
    wait_for("epoch 1 to be sent", Duration::from_secs(30), || {
        epoch_status(&store, 1).is_some_and(|(s, _)| s == "sent")
    });
    let (_, tx1) = epoch_status(&store, 1).unwrap();
    let in_mempool = |tx: &str| !rpc(&anvil, "eth_getTransactionByHash", serde_json::json!([tx])).is_null();
    wait_for("the post to reach anvil's mempool", Duration::from_secs(10), || in_mempool(tx1.as_deref().unwrap()));
    cluster.kill_server();
    rpc(&anvil, "anvil_dropAllTransactions", serde_json::json!([]));
    assert!(!in_mempool(tx1.as_deref().unwrap()), "the post is lost");
    rpc(&anvil, "evm_setAutomine", serde_json::json!([true]));
    assert_eq!(block_on(chain.last_epoch()).unwrap(), 0, "nothing posted yet");
    cluster.restart_server();
    wait_for("epoch 1 to be confirmed", Duration::from_secs(30), || {
        epoch_status(&store, 1).is_some_and(|(s, _)| s == "confirmed")
    });
    assert_eq!(epoch_status(&store, 1).unwrap().1, tx1, "the same transaction, not a second one");
    assert_eq!(block_on(chain.last_epoch()).unwrap(), 1);
    let anchors = anchors_match_the_chain(&store, &chain);
    assert_eq!(nonce(), anchors + 1, "the operator sent its anchors and exactly one post");
    cluster.wait_nodes("fake", 2);

    // Epoch 2: the post is still in the mempool when the server dies; the restarted
    // server waits for it instead of signing another.
    chats(&cluster, 6, &store, 14);
    wait_anchored(&store);
    rpc(&anvil, "evm_setAutomine", serde_json::json!([false]));
    assert_eq!(admin_post(&cluster, "/admin/settle"), 202);
    wait_for("epoch 2 to be sent", Duration::from_secs(30), || {
        epoch_status(&store, 2).is_some_and(|(s, _)| s == "sent")
    });
    let tx2 = epoch_status(&store, 2).unwrap().1.unwrap();
    wait_for("the post to reach anvil's mempool", Duration::from_secs(10), || in_mempool(&tx2));
    cluster.kill_server();
    cluster.restart_server();
    cluster.wait_nodes("fake", 2);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(epoch_status(&store, 2).unwrap().0, "sent", "still waiting for the pending post");
    rpc(&anvil, "evm_setAutomine", serde_json::json!([true]));
    rpc(&anvil, "evm_mine", serde_json::json!([]));
    wait_for("epoch 2 to be confirmed", Duration::from_secs(30), || {
        epoch_status(&store, 2).is_some_and(|(s, _)| s == "confirmed")
    });
    assert_eq!(block_on(chain.last_epoch()).unwrap(), 2);
    let anchors = anchors_match_the_chain(&store, &chain);
    assert_eq!(nonce(), anchors + 2, "one transaction per epoch and per anchor, across two crashes");
    assert_eq!(epoch_status(&store, 2).unwrap().1.unwrap(), tx2);
    assert_eq!(numbers(&store, "SELECT count(*) FROM receipts WHERE epoch IS NULL"), vec![0]);
    for n in 1..=2u64 {
        let e = block_on(store.epoch(n)).unwrap().unwrap();
        assert_eq!(block_on(chain.posted_epoch(n)).unwrap().unwrap().payout_root, e.payout_root, "epoch {n}");
    }

    // `ludus claim` for node 0, its gas paid by another account: both epochs at once.
    let node_key = cluster.dir.path().join("node0.key");
    let node = Identity::load(&node_key).unwrap().address.to_string();
    let epochs_paid = block_on(store.payout_claims(&node)).unwrap().len();
    let owed: u128 = block_on(store.payout_claims(&node)).unwrap().iter().map(|c| c.amount.0).sum();
    assert!(owed > 0 && epochs_paid >= 1);
    let gas_key = key_file(&keys, &anvil.keys[8], "gas.key");
    let claim = |gas: Option<&std::path::Path>| {
        let server = format!("http://{}", cluster.addr);
        let mut args = vec!["claim", "--key", node_key.to_str().unwrap(), "--server", &server];
        if let Some(g) = gas {
            args.extend(["--gas-key", g.to_str().unwrap()]);
        }
        ludus(&cluster, &args)
    };
    // The node's own address has no gas money: a clear error saying what to do.
    let out = claim(None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--gas-key"), "{}", String::from_utf8_lossy(&out.stderr));
    let claim = |expect_claims: usize| {
        let out = claim(Some(&gas_key));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        // Before claiming, the node checked its own tasks against the chain's anchors.
        let checked: usize = err
            .split("checked ")
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no task check reported: {err}"));
        assert!(checked >= 1, "{err}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["claimed"].as_array().unwrap().len(), expect_claims, "{report}");
        report
    };
    let report = claim(epochs_paid);
    assert_eq!(report["total"], owed.to_string());
    assert_eq!(block_on(token_balance(&anvil.url, d.token, node.parse().unwrap())).unwrap(), U256::from(owed));
    let report = claim(0);
    assert_eq!(report["already_claimed"].as_array().unwrap().len(), epochs_paid);
    assert_eq!(block_on(token_balance(&anvil.url, d.token, node.parse().unwrap())).unwrap(), U256::from(owed));
}

#[test]
fn a_game_that_overspends_its_escrow_is_suspended_naming_the_shortfall_and_recovers_after_a_deposit() {
    let anvil = Anvil::start(None).expect("anvil");
    let (mut cluster, d, _keys) = settling_cluster(&anvil, "");
    let game = anvil.keys[3].clone();
    give_wallet(&cluster, &anvil, &d, &game, 1);
    cluster.add_node(&["--fake-engine", "3:1"]);
    cluster.wait_nodes("fake", 1);
    let store = cluster.store();
    try_chat(&cluster.addr, &cluster.key, "fake").expect("the first request is served");
    let body = r#"{"model": "fake", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}"#;
    let mut refusal = None;
    wait_for("the game to be suspended", Duration::from_secs(30), || {
        let r = cluster.post("/v1/chat/completions", body);
        if r.status == 402 {
            refusal = Some(r.json());
            true
        } else {
            false
        }
    });
    let refusal = refusal.unwrap();
    let message = refusal["error"]["message"].as_str().unwrap();
    assert_eq!(refusal["error"]["code"], "escrow_shortfall", "{refusal}");
    assert!(message.contains("escrow shortfall of"), "{message}");
    assert!(message.contains(&format!("{:#x}", game.address())), "{message}");
    let owed: u128 = block_on(store.game_balances(0)).unwrap().iter().find(|g| g.name == "testgame").unwrap().owed.0;
    let short: u128 = message.split("shortfall of ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(short >= 1 && short < owed, "shortfall {short} of a debt of {owed} against an escrow of 1");
    // Settling now can charge nothing: the escrow covers none of the tasks.
    assert_eq!(admin_post(&cluster, "/admin/settle"), 202);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(numbers(&store, "SELECT count(*) FROM epochs"), vec![0]);
    // A deposit lifts the suspension; the debt is then settled.
    fund(&anvil, &d, &game, 10u128.pow(20));
    wait_for("the game to be served again", Duration::from_secs(30), || {
        cluster.post("/v1/chat/completions", body).status == 200
    });
    wait_for("all receipts confirmed", Duration::from_secs(30), || {
        let n = numbers(&store, "SELECT count(*) FILTER (WHERE confirmation <> 'confirmed'), count(*) FROM receipts");
        n[0] == 0 && n[1] >= 2
    });
    assert_eq!(admin_post(&cluster, "/admin/settle"), 202);
    wait_for("the epoch to be confirmed", Duration::from_secs(30), || {
        epoch_status(&store, 1).is_some_and(|(s, _)| s == "confirmed")
    });
    let charged: Vec<i64> = numbers(&store, "SELECT (SELECT sum(amount) FROM charges)::bigint, (SELECT sum(price_units) FROM receipts WHERE epoch = 1)::bigint");
    assert_eq!(charged[0], charged[1]);
    let chain = block_on(SettlementClient::connect(&anvil.url, d.settlement, anvil.keys[1].clone())).unwrap();
    let escrow = block_on(chain.available_escrows(&[game.address()])).unwrap()[0].0;
    assert_eq!(escrow, 1 + 10u128.pow(20) - charged[0] as u128);
}

/// A TCP relay to the chain that can be cut: while down it refuses new connections and
/// has closed the open ones (an RPC outage as the server sees it).
struct Switch {
    addr: String,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Switch {
    fn start(upstream: &str) -> Self {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>> = Default::default();
        let (upstream, up2, open2) = (upstream.trim_start_matches("http://").to_string(), up.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !up2.load(std::sync::atomic::Ordering::SeqCst) {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(&upstream) else { continue };
                open2.lock().unwrap().extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Self { addr, up, open }
    }

    fn set(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            for c in self.open.lock().unwrap().drain(..) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

#[test]
fn an_rpc_outage_delays_settlement_but_never_doubles_or_skips_a_post() {
    let anvil = Anvil::start(None).expect("anvil");
    let switch = Switch::start(&anvil.url);
    let (mut cluster, d, _keys) = settling_cluster_via(&anvil, &switch.addr, "");
    let game = anvil.keys[2].clone();
    give_wallet(&cluster, &anvil, &d, &game, 10u128.pow(22));
    cluster.add_node(&["--fake-engine", "3:1"]);
    cluster.wait_nodes("fake", 1);
    let store = cluster.store();
    let chain = block_on(SettlementClient::connect(&anvil.url, d.settlement, anvil.keys[1].clone())).unwrap();
    let nonce = || operator_nonce(&anvil);

    // Down before planning: nothing happens until the chain is back, then one post.
    chats(&cluster, 5, &store, 5);
    switch.set(false);
    assert_eq!(admin_post(&cluster, "/admin/settle"), 202);
    wait_for("a failed settlement step", Duration::from_secs(20), || {
        cluster.server.log_text().contains("settlement step failed; retrying")
    });
    assert_eq!(numbers(&store, "SELECT count(*) FROM epochs"), vec![0], "nothing planned without the chain");
    switch.set(true);
    wait_for("epoch 1 to be confirmed", Duration::from_secs(30), || {
        epoch_status(&store, 1).is_some_and(|(s, _)| s == "confirmed")
    });
    let anchors = anchors_match_the_chain(&store, &chain);
    assert_eq!((block_on(chain.last_epoch()).unwrap(), nonce()), (1, anchors + 1));

    // Down while blocks are committed: anchoring waits, then catches up without a gap
    // or a second anchor of any block.
    switch.set(false);
    chats(&cluster, 3, &store, 8);
    std::thread::sleep(Duration::from_secs(1));
    let during = block_on(store.anchor_progress()).unwrap();
    assert!(during.last_anchored_block < during.last_committed_block, "nothing anchored without the chain: {during:?}");
    switch.set(true);
    wait_anchored(&store);
    let anchors = anchors_match_the_chain(&store, &chain);
    assert_eq!(nonce(), anchors + 1, "each block anchored once, after the outage");

    // Down between sent and confirmed: mined meanwhile, confirmed once it is back.
    chats(&cluster, 4, &store, 12);
    wait_anchored(&store);
    rpc(&anvil, "evm_setAutomine", serde_json::json!([false]));
    assert_eq!(admin_post(&cluster, "/admin/settle"), 202);
    wait_for("epoch 2 to be sent", Duration::from_secs(30), || {
        epoch_status(&store, 2).is_some_and(|(s, _)| s == "sent")
    });
    let tx2 = epoch_status(&store, 2).unwrap().1.unwrap();
    wait_for("the post to reach anvil", Duration::from_secs(10), || {
        !rpc(&anvil, "eth_getTransactionByHash", serde_json::json!([tx2])).is_null()
    });
    switch.set(false);
    rpc(&anvil, "evm_mine", serde_json::json!([]));
    rpc(&anvil, "evm_setAutomine", serde_json::json!([true]));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(epoch_status(&store, 2).unwrap().0, "sent", "the server cannot see the chain");
    switch.set(true);
    wait_for("epoch 2 to be confirmed", Duration::from_secs(30), || {
        epoch_status(&store, 2).is_some_and(|(s, _)| s == "confirmed")
    });
    assert_eq!(epoch_status(&store, 2).unwrap().1.unwrap(), tx2);
    let anchors = anchors_match_the_chain(&store, &chain);
    assert_eq!((block_on(chain.last_epoch()).unwrap(), nonce()), (2, anchors + 2));
}

#[test]
fn of_two_servers_on_one_database_one_settles_and_the_other_takes_over_when_it_dies() {
    let anvil = Anvil::start(None).expect("anvil");
    let (mut first, d, keys) = settling_cluster(&anvil, "");
    let game = anvil.keys[2].clone();
    give_wallet(&first, &anvil, &d, &game, 10u128.pow(22));
    wait_for("the first server to take the lock", Duration::from_secs(20), || {
        first.server.log_text().contains("holding the settlement lock")
    });
    let operator_key = keys.join("operator.key");
    let mut second = Cluster::start_with_database(
        &format!(
            "[settlement]\nrpc_url = \"{}\"\ncontract = \"{:#x}\"\noperator_key = \"{}\"\nconfirmations = 1\n\
             retry_s = 0.3\npoll_ms = 100\nescrow_check_blocks = 1\npublic_rpc_url = \"{}\"\n",
            anvil.url,
            d.settlement,
            operator_key.display(),
            anvil.url
        ),
        &first.db_url,
    );
    wait_for("the second server to stand by", Duration::from_secs(20), || {
        second.server.log_text().contains("another server holds the settlement lock")
    });
    assert!(!second.server.log_text().contains("holding the settlement lock"));
    second.add_node(&["--fake-engine", "3:1"]);
    second.wait_nodes("fake", 1);
    let store = second.store();
    for _ in 0..4 {
        try_chat(&second.addr, &first.key, "fake").expect("200");
    }
    wait_for("confirmations", Duration::from_secs(30), || {
        numbers(&store, "SELECT count(*) FILTER (WHERE confirmation = 'confirmed') FROM receipts") == vec![4]
    });
    // The standby cannot settle; the holder dies; the standby takes over and settles.
    assert_eq!(admin_post(&second, "/admin/settle"), 202);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(numbers(&store, "SELECT count(*) FROM epochs"), vec![0]);
    first.kill_server();
    wait_for("the second server to take the lock", Duration::from_secs(20), || {
        second.server.log_text().contains("holding the settlement lock")
    });
    assert_eq!(admin_post(&second, "/admin/settle"), 202);
    wait_for("epoch 1 to be confirmed", Duration::from_secs(30), || {
        epoch_status(&store, 1).is_some_and(|(s, _)| s == "confirmed")
    });
    let chain = block_on(SettlementClient::connect(&anvil.url, d.settlement, anvil.keys[1].clone())).unwrap();
    assert_eq!(block_on(chain.last_epoch()).unwrap(), 1);
}

#[test]
fn committed_contract_artifacts_match_the_sources() {
    let out = Command::new("scripts/contracts").arg("--check").output().expect("scripts/contracts");
    assert!(
        out.status.success(),
        "stale or uncompilable contracts:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The operator's RPC URL often carries a provider's API key: the server logs it as scheme,
/// host and port only (its own chain errors included, which quote the URL), and serves only
/// `public_rpc_url` — none here.
#[test]
fn the_operators_rpc_url_is_never_logged_or_served() {
    const SECRET: &str = "sekrit-provider-key";
    let cluster = Cluster::start(&format!(
        "[settlement]\nrpc_url = \"http://127.0.0.1:9/v3/{SECRET}?apikey={SECRET}\"\ncontract = \"0x{}\"\n\
         retry_s = 0.2\nescrow_check_blocks = 1\n[clock]\nblock_time_ms = 200\nepoch_time_s = 1\n",
        "c0".repeat(20)
    ));
    // A game with a wallet: its escrow is read from the (unreachable) chain every block.
    block_on(cluster.store().set_game_wallet("testgame", &format!("0x{}", "ab".repeat(20)))).unwrap();
    let (status, body) = cluster.get("/v1/settlement");
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(info["rpc_url"].is_null(), "no public RPC URL is configured: {info}");
    let (status, body) = cluster.get(&format!("/v1/settlement/payouts/0x{}", "12".repeat(20)));
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains(SECRET), "{body}");
    wait_for("a failed chain call in the log", Duration::from_secs(30), || {
        cluster.server.log_text().contains("failed;")
    });
    let log = cluster.server.log_text();
    assert!(log.contains("http://127.0.0.1:9/…"), "the URL is logged redacted: {log}");
    assert!(!log.contains(SECRET), "the RPC URL's key reached the log:\n{log}");
}

/// A game used to walk away from a day of usage: spend during the epoch, ask for all of its
/// escrow back (`availableEscrow` drops to 0, so settlement charged nothing), withdraw after
/// the delay — and the nodes were never paid. Now settlement charges the usage before the
/// request from the whole escrow, the nodes claim, and the game gets back only the rest.
#[test]
fn a_game_that_asks_for_its_escrow_back_still_pays_for_what_it_used() {
    let anvil = Anvil::start(None).expect("anvil");
    let (mut cluster, d, keys) = settling_cluster(&anvil, "");
    let game = anvil.keys[2].clone();
    let escrow = 10u128.pow(22);
    give_wallet(&cluster, &anvil, &d, &game, escrow);
    cluster.add_node(&["--fake-engine", "3:1"]);
    cluster.wait_nodes("fake", 1);
    let store = cluster.store();
    chats(&cluster, 6, &store, 6);
    let owed = numbers(&store, "SELECT sum(price_units)::bigint FROM receipts")[0] as u128;
    assert!(owed > 0);

    // The game asks for everything back.
    let p = provider_for(&anvil.url, game.clone()).unwrap();
    let contract = Settlement::new(d.settlement, p.clone());
    let hash = block_on(async { *contract.requestWithdrawal(U256::from(escrow)).send().await.unwrap().tx_hash() });
    assert!(block_on(wait_receipt(&p, hash, Duration::from_secs(30))).unwrap().status());
    assert_eq!(block_on(contract.availableEscrow(game.address()).call().into_future()).unwrap(), U256::ZERO);

    // Settlement still charges what it used.
    assert_eq!(admin_post(&cluster, "/admin/settle"), 202);
    wait_for("epoch 1 to be confirmed", Duration::from_secs(30), || {
        epoch_status(&store, 1).is_some_and(|(s, _)| s == "confirmed")
    });
    let epoch = block_on(store.epoch(1)).unwrap().unwrap();
    assert_eq!(epoch.charge_total.0, owed, "the usage before the request was charged in full");
    let left = block_on(contract.escrowOf(game.address()).call().into_future()).unwrap();
    assert_eq!(left, U256::from(escrow - owed));

    // The node claims its payout.
    let node_key = cluster.dir.path().join("node0.key");
    let gas_key = key_file(&keys, &anvil.keys[8], "gas.key");
    let server = format!("http://{}", cluster.addr);
    let out = ludus(
        &cluster,
        &["claim", "--key", node_key.to_str().unwrap(), "--server", &server, "--gas-key", gas_key.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["claimed"].as_array().unwrap().len(), 1, "{report}");

    // After the delay, the game gets back what is left, not what it asked for.
    let delay = block_on(contract.withdrawalDelay().call().into_future()).unwrap();
    rpc(&anvil, "evm_increaseTime", serde_json::json!([delay + 1]));
    rpc(&anvil, "evm_mine", serde_json::json!([]));
    let before = block_on(token_balance(&anvil.url, d.token, game.address())).unwrap();
    let hash = block_on(async { *contract.withdraw().send().await.unwrap().tx_hash() });
    assert!(block_on(wait_receipt(&p, hash, Duration::from_secs(30))).unwrap().status());
    let after = block_on(token_balance(&anvil.url, d.token, game.address())).unwrap();
    assert_eq!(after - before, U256::from(escrow - owed));
    cluster.kill_server();
}
