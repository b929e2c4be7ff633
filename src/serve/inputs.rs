//! What `ludus serve` reads before any actor runs: the registry database, the
//! distributor's identity, the admin token, the model key store, the node allow- and
//! ban-lists, and the tokenizers of the models it accounts for. Each one that is wrong
//! stops the start with the setting it came from; file and model reads run on blocking
//! threads, never on the event loop.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::sync::Arc;

use crate::actors::catalog::Catalog;
use crate::crypto::identity::{Address, Identity};
use crate::ledger::cluster::PrivateCluster;
use crate::ledger::Store;
use crate::settings::Settings;

/// Runs blocking `f` on a blocking thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    actix_web::rt::task::spawn_blocking(f).await.map_err(io::Error::other)?
}

/// The registry database: the configured URL, or the data directory's private cluster.
pub async fn open_store(settings: &Settings) -> io::Result<(Store, Option<PrivateCluster>)> {
    let (url, cluster) = if settings.database.url.is_empty() {
        let data_dir = settings.server.data_dir.clone();
        let (cluster, url) =
            blocking(move || PrivateCluster::for_data_dir(&data_dir).map_err(io::Error::other)).await?;
        (url, Some(cluster))
    } else {
        (settings.database.url.expose().to_string(), None)
    };
    let store = Store::open(&url, settings.database.pool_size)
        .await
        .map_err(|e| io::Error::other(format!("registry database: {e}")))?;
    Ok((store, cluster))
}

/// The distributor's key (`[server] key_file`, else `data_dir/distributor.key`, created
/// on first use).
pub fn identity(s: &Settings) -> io::Result<Arc<Identity>> {
    let key_file = s.server.key_file.clone().unwrap_or_else(|| s.server.data_dir.join("distributor.key"));
    let identity = Identity::load_or_create(&key_file).map_err(io::Error::other)?;
    tracing::info!(address = %identity.address, key = %key_file.display(), "distributor identity (nodes may pin it)");
    Ok(Arc::new(identity))
}

/// The admin token's hash: from the config, else `data_dir/admin-token` (created, 0600).
pub fn admin_token_hash(settings: &Settings) -> io::Result<String> {
    if !settings.server.admin_token.is_empty() {
        return Ok(crate::ledger::hash_key(settings.server.admin_token.expose()));
    }
    let path = settings.server.data_dir.join("admin-token");
    let token = match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => {
            let token = format!("ludus-admin-{}", hex::encode(rand::random::<[u8; 24]>()));
            std::fs::create_dir_all(&settings.server.data_dir)?;
            let mut options = std::fs::OpenOptions::new();
            std::os::unix::fs::OpenOptionsExt::mode(options.write(true).create(true).truncate(true), 0o600);
            std::io::Write::write_all(&mut options.open(&path)?, format!("{token}\n").as_bytes())?;
            tracing::info!(path = %path.display(), "created the admin token");
            token
        }
    };
    Ok(crate::ledger::hash_key(&token))
}

/// The text sides of the models this server accounts for (`[distributor] model_files`
/// and the verifier's reference models), read on a blocking thread. A name in both is
/// read from the verifier's reference: the tokens counted, and the context jobs are cut
/// to, are then the ones proofs are checked against.
pub async fn load_catalog(s: &Settings) -> io::Result<Catalog> {
    let mut files = s.distributor.model_files.clone();
    files.extend(s.verifier.models.clone());
    let catalog = blocking(move || Catalog::load(&files).map_err(io::Error::other)).await?;
    tracing::info!(models = ?catalog.names(), "the server counts prompt tokens and makes the text of these models itself");
    Ok(catalog)
}

/// `[distributor] banned_nodes`, parsed.
pub fn banned_nodes(s: &Settings) -> io::Result<Arc<HashSet<Address>>> {
    let mut banned = HashSet::new();
    for a in &s.distributor.banned_nodes {
        banned.insert(a.parse::<Address>().map_err(|e| io::Error::other(format!("distributor.banned_nodes: {e}")))?);
    }
    Ok(Arc::new(banned))
}

/// `[distributor] task_stall_timeout_ms`: at least a second, or nodes would lose tasks
/// between two tokens.
pub fn task_stall_timeout(s: &Settings) -> io::Result<std::time::Duration> {
    match s.distributor.task_stall_timeout_ms {
        ms if ms >= 1000 => Ok(std::time::Duration::from_millis(ms)),
        ms => Err(io::Error::other(format!("distributor.task_stall_timeout_ms must be at least 1000 (got {ms})"))),
    }
}

/// `[server] stream_unread_kib`, in bytes: at least 64 KiB (about 40 tokens with 20 log
/// probabilities each), or a game reading as it should could have its stream ended by a
/// burst of tokens.
pub fn stream_unread_limit(s: &Settings) -> io::Result<usize> {
    match s.server.stream_unread_kib {
        kib if kib >= 64 => Ok(kib.saturating_mul(1024)),
        kib => Err(io::Error::other(format!("server.stream_unread_kib must be at least 64 (got {kib})"))),
    }
}

/// The distributor's model key store (`data_dir/model-keys/*.key`: hex, 32 bytes each).
pub struct ModelKeys {
    /// Key id → hex key.
    pub keys: Arc<BTreeMap<String, String>>,
    /// Key id → the file's name (without `.key`).
    pub names: BTreeMap<String, String>,
}

impl ModelKeys {
    /// Reads every `*.key` file in `dir`; a missing directory is an empty store.
    pub fn load(dir: &std::path::Path) -> io::Result<Self> {
        let (mut keys, mut names) = (BTreeMap::new(), BTreeMap::new());
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_none_or(|e| e != "key") {
                    continue;
                }
                let key =
                    crate::inference::protect::read_key_file(&path).map_err(|e| io::Error::other(e.to_string()))?;
                let id = crate::inference::protect::key_id(&key);
                let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                keys.insert(id.clone(), hex::encode(key));
                names.insert(id, name);
            }
        }
        tracing::info!(keys = keys.len(), dir = %dir.display(), "model key store loaded");
        Ok(Self { keys: Arc::new(keys), names })
    }

    /// `[distributor] bundle_nodes` by key id: a name without a key file, or an address
    /// that is not one, stops the start with the reason.
    pub fn bundle_nodes(
        &self,
        config: &BTreeMap<String, Vec<String>>,
    ) -> io::Result<HashMap<String, (String, HashSet<Address>)>> {
        let mut out = HashMap::new();
        for (id, name) in &self.names {
            out.insert(id.clone(), (name.clone(), HashSet::new()));
        }
        for (name, nodes) in config {
            let Some(id) = self.names.iter().find(|(_, n)| *n == name).map(|(id, _)| id) else {
                return Err(io::Error::other(format!(
                    "distributor.bundle_nodes: no key file `{name}.key` in data_dir/model-keys"
                )));
            };
            for node in nodes {
                let address = node.parse::<Address>().map_err(|e| {
                    io::Error::other(format!("distributor.bundle_nodes.{name}: `{node}` is not a node address: {e}"))
                })?;
                out.get_mut(id).expect("every key id is in the table").1.insert(address);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_timeout_under_a_second_is_refused_by_name() {
        let mut s = Settings::load(None).unwrap();
        assert_eq!(task_stall_timeout(&s).unwrap(), std::time::Duration::from_secs(60), "the default");
        s.distributor.task_stall_timeout_ms = 999;
        let e = task_stall_timeout(&s).unwrap_err().to_string();
        assert!(e.contains("task_stall_timeout_ms must be at least 1000 (got 999)"), "{e}");
    }

    #[test]
    fn a_stream_unread_limit_under_64_kib_is_refused_by_name() {
        let mut s = Settings::load(None).unwrap();
        assert_eq!(stream_unread_limit(&s).unwrap(), 1 << 20, "the default");
        s.server.stream_unread_kib = 63;
        let e = stream_unread_limit(&s).unwrap_err().to_string();
        assert!(e.contains("stream_unread_kib must be at least 64 (got 63)"), "{e}");
    }
}
