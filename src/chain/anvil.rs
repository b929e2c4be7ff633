//! A local anvil chain (from the npm package `@foundry-rs/anvil-linux-amd64`, installed
//! by `scripts/setup`) for `ludus demo` and the tests: started on a free loopback port,
//! its funded development keys read from the file anvil writes, stopped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alloy::signers::local::PrivateKeySigner;

use super::error::ChainError;

/// How long anvil may take to answer its first request.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The anvil binary: `$LUDUS_ANVIL`, else `.ludus/anvil` (linked by `scripts/setup`),
/// else `anvil` on the PATH.
pub fn find_anvil() -> Result<PathBuf, ChainError> {
    if let Some(path) = std::env::var_os("LUDUS_ANVIL").map(PathBuf::from).filter(|p| p.exists()) {
        return Ok(path);
    }
    let linked = Path::new(".ludus/anvil");
    if linked.exists() {
        return Ok(linked.to_path_buf());
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("anvil"))
        .find(|p| p.exists());
    on_path.ok_or_else(|| {
        ChainError::Config("anvil not found: run scripts/setup (it installs it from npm) or set LUDUS_ANVIL".into())
    })
}

/// A running anvil.
pub struct Anvil {
    child: Child,
    pub url: String,
    pub port: u16,
    /// The funded development accounts' keys, in anvil's order.
    pub keys: Vec<PrivateKeySigner>,
    _dir: tempfile::TempDir,
}

impl Anvil {
    /// Starts anvil; `block_time_s` mines on an interval, otherwise every transaction
    /// is mined at once.
    pub fn start(block_time_s: Option<u64>) -> Result<Self, ChainError> {
        Self::start_with_state(block_time_s, None)
    }

    /// Like [`Anvil::start`], keeping the chain in `state` (loaded at start, written
    /// every second) so a restarted demo finds its contracts and balances again.
    pub fn start_with_state(block_time_s: Option<u64>, state: Option<&Path>) -> Result<Self, ChainError> {
        let bin = find_anvil()?;
        let dir = tempfile::tempdir().map_err(|e| ChainError::Config(format!("temp dir: {e}")))?;
        let config = dir.path().join("anvil.json");
        let port = free_port()?;
        let mut cmd = Command::new(&bin);
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string(), "--silent", "--config-out"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(s) = block_time_s {
            cmd.args(["--block-time", &s.to_string()]);
        }
        if let Some(path) = state {
            cmd.arg("--state").arg(path).args(["--state-interval", "1"]);
        }
        let child = cmd.spawn().map_err(|e| ChainError::Config(format!("starting {}: {e}", bin.display())))?;
        let mut anvil = Anvil { child, url: format!("http://127.0.0.1:{port}"), port, keys: Vec::new(), _dir: dir };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = anvil.child.try_wait().ok().flatten() {
                return Err(ChainError::Config(format!("anvil exited at start ({status})")));
            }
            if let Ok(text) = std::fs::read_to_string(&config) {
                if let Ok(keys) = parse_keys(&text) {
                    if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                        anvil.keys = keys;
                        return Ok(anvil);
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(ChainError::Config(format!("anvil did not start within {} s", START_TIMEOUT.as_secs())));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops anvil (its chain is gone).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        self.stop();
    }
}

fn parse_keys(text: &str) -> Result<Vec<PrivateKeySigner>, String> {
    #[derive(serde::Deserialize)]
    struct Config {
        private_keys: Vec<String>,
    }
    let config: Config = serde_json::from_str(text).map_err(|e| e.to_string())?;
    config.private_keys.iter().map(|k| k.parse::<PrivateKeySigner>().map_err(|e| e.to_string())).collect()
}

fn free_port() -> Result<u16, ChainError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| ChainError::Config(format!("port: {e}")))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| ChainError::Config(format!("port: {e}")))
}
