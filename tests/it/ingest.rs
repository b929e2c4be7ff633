//! Block commits at the store level, on a real Postgres: every field stored exactly as
//! given (binary COPY), the rules the dropped foreign keys used to check still hold, a
//! batch's refusals and duplicates counted, and two commits racing for the same tasks
//! record each task once with dense block numbers.

use std::collections::BTreeMap;

use ludus::ledger::{Receipt, Store, Units};

use super::database::{block_on, fresh_database, numbers, open, small_receipt};

const SERVER: &str = "0x00000000000000000000000000000000000000ee";

fn node(i: u8) -> String {
    format!("0x{}", hex::encode([i; 20]))
}

/// Every rule the foreign keys on `receipts` checked, as counts of rows that break it.
fn broken_references(store: &Store) -> Vec<i64> {
    numbers(
        store,
        "SELECT (SELECT count(*) FROM receipts r WHERE NOT EXISTS (SELECT 1 FROM blocks b WHERE b.number = r.block)),
                (SELECT count(*) FROM receipts r WHERE NOT EXISTS (SELECT 1 FROM games g WHERE g.id = r.game_id)),
                (SELECT count(*) FROM receipts r WHERE NOT EXISTS (SELECT 1 FROM nodes n WHERE n.address = r.node_address))",
    )
}

/// A node that failed a task can still sign a receipt for it and re-send it; ahead of the
/// receipt of the node that finished the task, in the same block, it used to be kept as
/// "the first one sent", then refused as never witnessed: neither was recorded, and the
/// honest node was never paid.
#[test]
fn a_receipt_the_server_never_saw_finish_does_not_shadow_the_one_it_did() {
    let store = open(&fresh_database());
    let (game, _) = block_on(store.add_game("g", 100, 100_000)).unwrap();
    let mut failed = small_receipt(7, game, &node(5));
    failed.witnessed = false;
    let finished = small_receipt(7, game, &node(6));
    let outcome = block_on(store.commit_block(&[failed, finished], SERVER)).unwrap();
    assert_eq!((outcome.recorded, outcome.duplicates, outcome.refused), (1, 0, 0), "{outcome:?}");
    assert_eq!(numbers(&store, &format!("SELECT count(*) FROM receipts WHERE node_address = '{}'", node(6))), vec![1]);
}

#[test]
fn a_commit_stores_every_field_exactly_and_counts_refusals_and_duplicates() {
    let store = open(&fresh_database());
    let (game, _) = block_on(store.add_game("g", 100, 100_000)).unwrap();
    let signed: Vec<u8> = (0..274u32).map(|i| (i * 7) as u8).collect();
    let exact = Receipt {
        task: u64::MAX,
        game_id: game,
        node: node(1),
        model: "mödel\twith\\odd\nbytes".into(),
        prompt_tokens: 123_456,
        completion_tokens: 7,
        price: Units(u128::MAX),
        latency_ms: -1,
        output_hash: [0xa5; 32],
        receipt_hash: [0x5a; 32],
        signature: vec![0, 1, 2, 0xff],
        signed_bytes: signed.clone(),
        witnessed: true,
        sampled: false,
    };
    let plain = small_receipt(42, game, &node(2));
    let unknown_game = small_receipt(43, game + 1000, &node(2));
    let mut unwitnessed = small_receipt(44, game, &node(2));
    unwitnessed.witnessed = false;
    let mut again_other_node = exact.clone();
    again_other_node.node = node(3);
    let batch = vec![exact.clone(), plain.clone(), unknown_game, unwitnessed, again_other_node];
    let outcome = block_on(store.commit_block(&batch, SERVER)).unwrap();
    assert_eq!((outcome.recorded, outcome.duplicates, outcome.refused), (2, 0, 2), "{outcome:?}");
    assert_eq!(outcome.block, Some(1));

    let row = block_on(async {
        let conn = store.conn().await.unwrap();
        conn.query_one(
            "SELECT task_id, block, game_id, node_address, model, prompt_tokens, completion_tokens,
                    price_units::text, latency_ms, output_hash, receipt_hash, node_signature, signed_bytes
             FROM receipts WHERE task_id = -1",
            &[],
        )
        .await
        .unwrap()
    });
    assert_eq!(row.get::<_, i64>(0), -1, "u64::MAX bit for bit");
    assert_eq!(row.get::<_, i64>(1), 1);
    assert_eq!(row.get::<_, i64>(2), game);
    assert_eq!(row.get::<_, String>(3), node(1), "the first receipt of a task wins");
    assert_eq!(row.get::<_, String>(4), exact.model);
    assert_eq!((row.get::<_, i32>(5), row.get::<_, i32>(6)), (123_456, 7));
    assert_eq!(row.get::<_, String>(7), u128::MAX.to_string());
    assert_eq!(row.get::<_, i32>(8), -1);
    assert_eq!(row.get::<_, Vec<u8>>(9), vec![0xa5; 32]);
    assert_eq!(row.get::<_, Vec<u8>>(10), vec![0x5a; 32]);
    assert_eq!(row.get::<_, Vec<u8>>(11), vec![0, 1, 2, 0xff]);
    assert_eq!(row.get::<_, Option<Vec<u8>>>(12), Some(signed));
    let no_bytes = numbers(&store, "SELECT count(*) FROM receipts WHERE task_id = 42 AND signed_bytes IS NULL");
    assert_eq!(no_bytes, vec![1], "no signed bytes kept: NULL");
    // Prices of many sizes read back exactly.
    let prices: Vec<u128> = vec![0, 1, 9_999, 10_000, 10_001, 123_450_006, 10u128.pow(20), 10u128.pow(20) + 1];
    let batch: Vec<Receipt> = prices
        .iter()
        .enumerate()
        .map(|(i, p)| Receipt { price: Units(*p), ..small_receipt(1000 + i as u64, game, &node(4)) })
        .collect();
    block_on(store.commit_block(&batch, SERVER)).unwrap();
    let stored: Vec<u128> = block_on(async {
        let conn = store.conn().await.unwrap();
        let rows = conn.query("SELECT price_units::text FROM receipts WHERE block = 2 ORDER BY task_id", &[]).await;
        rows.unwrap().iter().map(|r| r.get::<_, String>(0).parse().unwrap()).collect()
    });
    assert_eq!(stored, prices);

    // The same batch again: all duplicates or refused, no block number taken.
    let again = block_on(store.commit_block(&[exact, plain], SERVER)).unwrap();
    assert_eq!((again.recorded, again.duplicates, again.block), (0, 2, None));
    assert_eq!(numbers(&store, "SELECT last_block FROM block_counter"), vec![2]);
    assert_eq!(broken_references(&store), vec![0, 0, 0]);
    // Each node's task count (what the verification policy reads after a restart).
    assert_eq!(block_on(store.node_standing(&node(4), 1_000)).unwrap().0, prices.len() as u64);
    assert_eq!(block_on(store.node_standing(&node(4), 3)).unwrap().0, 3);
    assert_eq!(block_on(store.node_standing(&node(9), 3)).unwrap(), (0, 10_000), "a node never seen");
}

#[test]
fn commits_racing_for_the_same_tasks_record_each_once_in_dense_blocks() {
    let store = open(&fresh_database());
    let (game, _) = block_on(store.add_game("g", 100, 100_000)).unwrap();
    // Four servers at once, each with 2,000 receipts, every task sent by two of them.
    let batches: Vec<Vec<Receipt>> = (0..4u64)
        .map(|s| (0..2_000u64).map(|i| small_receipt(1 + (s * 1_000 + i) % 4_000, game, &node(5))).collect())
        .collect();
    let outcomes = block_on(async {
        let runs = batches.iter().map(|b| store.commit_block(b, SERVER));
        futures_util::future::join_all(runs).await
    });
    let mut blocks = Vec::new();
    let mut recorded = 0;
    for o in outcomes {
        let o = o.expect("a racing commit succeeds");
        recorded += o.recorded;
        blocks.extend(o.block);
        assert_eq!(o.recorded + o.duplicates, 2_000, "every receipt recorded here or found there: {o:?}");
    }
    let distinct: std::collections::BTreeSet<u64> = batches.iter().flatten().map(|r| r.task).collect();
    assert_eq!(recorded, distinct.len(), "each task recorded exactly once");
    assert_eq!(numbers(&store, "SELECT count(*), count(DISTINCT task_id) FROM receipts"), vec![recorded as i64; 2]);
    blocks.sort_unstable();
    let expected: Vec<u64> = (1..=blocks.len() as u64).collect();
    assert_eq!(blocks, expected, "block numbers dense");
    let per_block: BTreeMap<i64, i64> = block_on(async {
        let conn = store.conn().await.unwrap();
        let rows = conn.query("SELECT b.number, b.receipt_count::bigint, (SELECT count(*) FROM receipts r WHERE r.block = b.number) FROM blocks b", &[]).await;
        rows.unwrap()
            .iter()
            .map(|r| {
                assert_eq!(r.get::<_, i64>(1), r.get::<_, i64>(2), "block {} counts its receipts", r.get::<_, i64>(0));
                (r.get(0), r.get(1))
            })
            .collect()
    });
    assert_eq!(per_block.values().sum::<i64>(), recorded as i64);
    assert_eq!(broken_references(&store), vec![0, 0, 0]);
}
