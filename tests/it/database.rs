//! Postgres for the tests: one throwaway private cluster per test process (started on
//! first use with the system's initdb/pg_ctl, removed when the process exits), and a
//! fresh database per test.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use ludus::ledger::cluster::PrivateCluster;
use ludus::ledger::{Receipt, Store, Units};

static CLUSTER: OnceLock<PrivateCluster> = OnceLock::new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

pub fn shared_cluster() -> &'static PrivateCluster {
    CLUSTER.get_or_init(|| PrivateCluster::throwaway().expect("a private Postgres cluster (run scripts/setup)"))
}

/// The URL of a new, empty database on the shared cluster.
pub fn fresh_database() -> String {
    let cluster = shared_cluster();
    let name = format!("test_{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
    cluster.create_database(&name).expect("createdb");
    cluster.url(&name)
}

/// Runs a future to completion on a throwaway runtime, on its own thread (so it works
/// from synchronous tests and from inside an actix System alike).
pub fn block_on<F: Future + Send>(f: F) -> F::Output
where
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f))
            .join()
            .expect("the database call panicked")
    })
}

pub fn open(url: &str) -> Store {
    block_on(Store::open(url, 4)).expect("open the registry database")
}

/// One row of numbers from a SQL query returning bigints.
pub fn numbers(store: &Store, sql: &str) -> Vec<i64> {
    block_on(async {
        let conn = store.conn().await.unwrap();
        let rows = conn.query(sql, &[]).await.unwrap();
        rows.first().map(|r| (0..r.len()).map(|i| r.get::<_, i64>(i)).collect()).unwrap_or_default()
    })
}

/// The first text column of every row of a SQL query (NULL as "").
pub fn texts(store: &Store, sql: &str) -> Vec<String> {
    block_on(async {
        let conn = store.conn().await.unwrap();
        let rows = conn.query(sql, &[]).await.unwrap();
        rows.iter().map(|r| r.get::<_, Option<String>>(0).unwrap_or_default()).collect()
    })
}

/// A minimal receipt of `task` for `game`, served by `node` (1 + 1 tokens, price 5).
pub fn small_receipt(task: u64, game: i64, node: &str) -> Receipt {
    Receipt {
        task,
        game_id: game,
        node: node.to_string(),
        model: "fake".into(),
        prompt_tokens: 1,
        completion_tokens: 1,
        price: Units(5),
        latency_ms: 1,
        output_hash: [0; 32],
        receipt_hash: ludus::crypto::identity::keccak(&task.to_be_bytes()),
        signature: vec![0; 65],
        signed_bytes: Vec::new(),
        witnessed: true,
        sampled: false,
    }
}
