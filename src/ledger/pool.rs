//! A small connection pool for `tokio-postgres`. Connections run on one dedicated I/O
//! thread, so a client can be used from any actix arbiter; broken connections (a
//! Postgres restart) are dropped and replaced on the next checkout. A checkout waits for
//! a free connection at most [`CHECKOUT_TIMEOUT`]; TCP keepalives notice a peer gone
//! without a word within about a minute; a statement runs at most [`STATEMENT_TIMEOUT`].

use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::{Client, NoTls};

use super::error::LedgerError;

/// How long a checkout waits to connect before it fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a checkout waits for a free connection before it fails: a database that
/// stalls (every connection held by a query that does not return) makes every caller
/// fail with a clear error after this, to retry, instead of waiting without end.
pub const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(30);
/// TCP keepalive on every connection: first probe after this much silence...
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// ...then one every this often, and the connection is dropped after this many unanswered.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;
/// Data sent and not acknowledged for this long breaks the connection (Linux).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest a statement runs (Postgres' `statement_timeout` on every connection): one
/// that waits on a lock a stalled session holds, or runs away, fails with a clear error
/// and frees its connection and its caller (an actor awaiting it held everything behind
/// it). Generous: a day's settlement plan reads far less. Migrations are not bounded.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(120);

struct Inner {
    url: String,
    idle: Mutex<Vec<Client>>,
    slots: Arc<Semaphore>,
    size: usize,
    checkout_timeout: Duration,
    statement_timeout: Duration,
    io: tokio::runtime::Handle,
}

/// Up to `size` connections to one database.
#[derive(Clone)]
pub struct Pool(Arc<Inner>);

/// A checked-out connection; it goes back to the pool on drop unless it broke.
pub struct Conn {
    client: Option<Client>,
    pool: Pool,
    _slot: OwnedSemaphorePermit,
}

impl Deref for Conn {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("present until drop")
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("present until drop")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            if !client.is_closed() {
                if let Ok(mut idle) = self.pool.0.idle.lock() {
                    idle.push(client);
                }
            }
        }
    }
}

/// The I/O thread shared by every pool of this process.
fn io_handle() -> tokio::runtime::Handle {
    static HANDLE: std::sync::OnceLock<tokio::runtime::Handle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name("ledger-io".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("building the ledger I/O runtime");
                    let _ = tx.send(rt.handle().clone());
                    rt.block_on(std::future::pending::<()>());
                })
                .expect("spawning the ledger I/O thread");
            rx.recv().expect("the ledger I/O thread starts")
        })
        .clone()
}

impl Pool {
    pub fn new(url: &str, size: usize) -> Self {
        Self::waiting_at_most(url, size, CHECKOUT_TIMEOUT)
    }

    /// A pool whose checkouts wait at most `checkout_timeout` for a free connection.
    pub fn waiting_at_most(url: &str, size: usize, checkout_timeout: Duration) -> Self {
        Self::bounded(url, size, checkout_timeout, STATEMENT_TIMEOUT)
    }

    /// A pool whose checkouts wait at most `checkout_timeout` and whose statements run at
    /// most `statement_timeout` (whole milliseconds, at least one).
    pub fn bounded(url: &str, size: usize, checkout_timeout: Duration, statement_timeout: Duration) -> Self {
        Pool(Arc::new(Inner {
            url: url.to_string(),
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(size.max(1))),
            size: size.max(1),
            checkout_timeout,
            statement_timeout,
            io: io_handle(),
        }))
    }

    /// The database URL this pool connects to.
    pub fn url(&self) -> &str {
        &self.0.url
    }

    /// A connection: an idle one that still works, or a new one.
    pub async fn get(&self) -> Result<Conn, LedgerError> {
        let waited = tokio::time::timeout(self.0.checkout_timeout, self.0.slots.clone().acquire_owned()).await;
        let slot = waited
            .map_err(|_| {
                LedgerError::Database(format!(
                    "no database connection free within {} s: all {} are held (a stalled database, or \
                     [database] pool_size too small for the load)",
                    self.0.checkout_timeout.as_secs(),
                    self.0.size
                ))
            })?
            .map_err(|_| LedgerError::Database("pool closed".into()))?;
        let reused = {
            let mut idle = self.0.idle.lock().map_err(|_| LedgerError::Database("pool lock poisoned".into()))?;
            idle.retain(|c| !c.is_closed());
            idle.pop()
        };
        let client = match reused {
            Some(c) => c,
            None => self.connect().await?,
        };
        Ok(Conn { client: Some(client), pool: self.clone(), _slot: slot })
    }

    async fn connect(&self) -> Result<Client, LedgerError> {
        let mut config: tokio_postgres::Config =
            self.0.url.parse().map_err(|e| LedgerError::Database(format!("the database URL: {e}")))?;
        // A peer gone without a word (a half-open connection: a host lost, a network cut)
        // is noticed within about a minute, not the kernel's two hours: the connection
        // breaks, its slot frees, and the next checkout connects again.
        config
            .keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .keepalives_interval(KEEPALIVE_INTERVAL)
            .keepalives_retries(KEEPALIVE_RETRIES)
            .tcp_user_timeout(TCP_USER_TIMEOUT);
        // Options the URL gave (`?options=…`) are kept; the bound goes after them.
        let bound = format!("-c statement_timeout={}", self.0.statement_timeout.as_millis().max(1));
        let options = match config.get_options() {
            Some(given) if !given.is_empty() => format!("{given} {bound}"),
            _ => bound,
        };
        config.options(&options);
        let connecting = self.0.io.spawn(async move {
            let (client, connection) =
                tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls)).await.map_err(|_| {
                    LedgerError::Database(format!("no connection within {} s", CONNECT_TIMEOUT.as_secs()))
                })??;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "database connection closed");
                }
            });
            Ok::<_, LedgerError>(client)
        });
        connecting.await.map_err(|e| LedgerError::Database(format!("connect task: {e}")))?
    }
}
