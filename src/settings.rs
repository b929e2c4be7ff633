//! Layered configuration: `config/default.toml` (compiled in), an optional file given
//! with `--config`, then environment variables `LUDUS__SECTION__KEY`. One typed
//! [`Settings`] comes out; every subsystem reads its own section.

use std::path::Path;

use serde::Deserialize;

const DEFAULTS: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
pub struct EngineSettings {
    pub max_batch: usize,
    pub max_context: usize,
    pub prefill_chunk: usize,
    pub device: String,
    pub dtype: String,
    pub quantize: String,
    /// How int4 prefill multiplies its unpacked weights on CPU: "auto" (timed once per
    /// process), "f32" or "bf16" ([`crate::inference::int4_prefill::Product`]).
    pub int4_prefill: String,
    /// A lone sequence's int4 decode step in one call on CPU ("on", the default) or through
    /// libtorch operation by operation ("off"): [`crate::inference::fused_decode`].
    pub fused_decode: String,
    pub threads: usize,
    /// Threads for a sequence decoded alone: a count (0 = `threads`) or measured (`auto`).
    pub single_sequence_threads: crate::inference::tune::Tunable,
    /// Measure at start-up what `auto` settings should be here (cached per machine and
    /// model file); false keeps the untuned defaults (int4, one thread per sequence).
    pub tune: bool,
    /// Formats `quantize = "auto"` may choose from, measured (those the device runs).
    pub tune_formats: Vec<String>,
    /// Where tunings are remembered ("" = `$XDG_CACHE_HOME/ludus/tune` or
    /// `~/.cache/ludus/tune`).
    pub tune_dir: std::path::PathBuf,
    /// Memory for prompt blocks kept for the next request that starts with them (0 = off).
    pub prefix_cache_mb: usize,
    /// Speculative decoding of a sequence decoded alone: `{ draft = "off" | "ngram" | "model", k }`.
    pub speculative: crate::inference::Speculation,
    /// The draft model of `speculative.draft = "model"` ("" = none): a model file or
    /// directory with the target's tokenizer.
    pub draft_model: std::path::PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServerSettings {
    pub bind: String,
    pub workers: usize,
    pub max_body_bytes: usize,
    pub shutdown_grace_s: u64,
    pub data_dir: std::path::PathBuf,
    /// The distributor's secp256k1 key file (default: `data_dir/distributor.key`).
    pub key_file: Option<std::path::PathBuf>,
    pub default_max_tokens: usize,
    pub max_tokens_limit: usize,
    /// Tokens a streamed answer may leave unread, per choice, before it is ended (KiB).
    pub stream_unread_kib: usize,
    /// Bearer token for `/admin/*`; empty = `data_dir/admin-token` (created on first start).
    #[serde(default)]
    pub admin_token: Secret,
    /// Failed API-key (or admin-token) checks allowed per client IP per minute.
    pub failed_auth_per_minute: u32,
    /// Node connections (`/ws/node` handshakes) allowed per client IP per minute; 0: no limit.
    pub node_connections_per_minute: u32,
    /// Node links one client IP may hold open at once; 0: no limit.
    pub node_links_per_address: u32,
    /// Reverse proxies whose forwarding headers name the client (addresses or CIDR ranges).
    pub trusted_proxies: Vec<String>,
    /// A client must send its request head within this time (slow-loris defence).
    pub client_request_timeout_ms: u64,
    /// A request body must arrive within this time (after its key was checked).
    pub client_body_timeout_ms: u64,
    /// Enables `POST /admin/chaos/panic/{actor}` (fault injection; never in production).
    pub chaos: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DistributorSettings {
    pub queue_capacity: usize,
    pub queue_timeout_ms: u64,
    pub max_attempts: usize,
    pub heartbeat_interval_ms: u64,
    pub node_timeout_ms: u64,
    pub models: Vec<String>,
    /// Model files whose tokenizer the server reads, by served name (`catalog`).
    pub model_files: std::collections::BTreeMap<String, std::path::PathBuf>,
    pub banned_nodes: Vec<String>,
    /// Nodes allowed each protected bundle's key, by the key file's name (without `.key`).
    pub bundle_nodes: std::collections::BTreeMap<String, Vec<String>>,
    /// Frames a node may send per second before its link is closed as a flood.
    pub max_node_frames_per_s: u32,
    /// Bytes queued for a node that is not reading before its link is closed.
    pub max_node_queue_bytes: usize,
    /// A running task with no token from its node for this long goes to another node.
    pub task_stall_timeout_ms: u64,
    /// Send a request to a node holding its prompt's prefix (else load-based only).
    pub prefix_routing: bool,
}

/// Several servers as one network (`actors::cluster`).
#[derive(Debug, Clone, Deserialize)]
pub struct ClusterSettings {
    /// Empty: this server works alone.
    pub nats_url: Secret,
    pub name: String,
    pub advert_interval_ms: u64,
    pub peer_timeout_ms: u64,
}

impl ClusterSettings {
    pub fn enabled(&self) -> bool {
        !self.nats_url.expose().trim().is_empty()
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClockSettings {
    pub block_time_ms: u64,
    pub epoch_time_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GamesSettings {
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
}

/// A secret from the configuration: never printed by `Debug`.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"<redacted>\"" })
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    /// Postgres URL; empty = a private cluster in `data_dir/postgres`.
    pub url: Secret,
    pub pool_size: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RegistrySettings {
    pub max_buffered_receipts: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PriceSettings {
    pub prompt_per_1k: crate::ledger::Units,
    pub completion_per_1k: crate::ledger::Units,
    #[serde(default)]
    pub models: std::collections::HashMap<String, crate::ledger::Price>,
}

impl PriceSettings {
    pub fn table(&self) -> crate::ledger::PriceTable {
        crate::ledger::PriceTable {
            default: crate::ledger::Price {
                prompt_per_1k: self.prompt_per_1k,
                completion_per_1k: self.completion_per_1k,
            },
            models: self.models.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct VerifierSettings {
    pub models: std::collections::BTreeMap<String, std::path::PathBuf>,
    pub pool_size: usize,
    /// Sampled tasks the pool may hold (queued or being checked) before the next ones
    /// wait in the check backlog.
    pub queue: usize,
    /// Checks the backlog may hold; past it a sampled task is left unchecked and unpaid.
    pub backlog_max: u64,
    /// How often each server looks for deferred checks it can run.
    pub backlog_poll_ms: u64,
    pub synchronous: bool,
    pub quality_check_rate: f64,
    pub first_tasks: u64,
    pub sample_rate: f64,
    pub suspect_below: i32,
    pub quarantine_s: u64,
    pub max_value_error: f32,
    pub min_index_overlap: f32,
    pub tie_margin_scale: f32,
}

impl VerifierSettings {
    pub fn tolerances(&self) -> crate::proof::Tolerances {
        crate::proof::Tolerances {
            max_value_error: self.max_value_error,
            min_index_overlap: self.min_index_overlap,
            tie_margin_scale: self.tie_margin_scale,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct SettlementSettings {
    /// The chain's JSON-RPC URL; empty = settlement off. A secret (providers put their API
    /// key in it): logged without its path, query or credentials, and never served.
    pub rpc_url: Secret,
    /// The settlement contract (`ludus chain deploy` prints it).
    pub contract: String,
    /// Hex key file of the contract's operator; empty = the server's identity key.
    pub operator_key: Option<std::path::PathBuf>,
    /// Share of each charge paid to the node, in basis points (the rest is the fee).
    pub node_share_bps: u32,
    /// Blocks (counting its own) before an epoch's post is final.
    pub confirmations: u64,
    pub retry_s: f64,
    pub poll_ms: u64,
    /// Re-read the games' escrow every this many block ticks.
    pub escrow_check_blocks: u64,
    /// At most one anchor transaction (block roots on chain) per this many seconds.
    pub anchor_interval_s: f64,
    /// A block waits at most this long for its nodes' confirmations before it is anchored.
    pub anchor_confirm_wait_s: f64,
    /// A post or anchor not mined for this long is signed again, same nonce, higher fees.
    pub replace_stuck_after_s: f64,
    /// The RPC URL nodes are told to claim through (`GET /v1/settlement`); empty = none is
    /// published, and nodes pass `ludus claim --rpc`.
    pub public_rpc_url: String,
}

impl SettlementSettings {
    pub fn enabled(&self) -> bool {
        !self.rpc_url.expose().trim().is_empty()
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    pub level: String,
    /// `text` or `json` (`--log-format` overrides).
    pub format: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub server: ServerSettings,
    pub distributor: DistributorSettings,
    pub games: GamesSettings,
    pub cluster: ClusterSettings,
    pub clock: ClockSettings,
    pub engine: EngineSettings,
    pub database: DatabaseSettings,
    pub registry: RegistrySettings,
    pub prices: PriceSettings,
    pub verifier: VerifierSettings,
    pub settlement: SettlementSettings,
    pub log: LogSettings,
}

impl Settings {
    /// Loads defaults, then `file` (when given), then `LUDUS__*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Self, config::ConfigError> {
        let mut builder =
            config::Config::builder().add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        builder
            .add_source(
                config::Environment::with_prefix("LUDUS").prefix_separator("__").separator("__").try_parsing(true),
            )
            .build()?
            .try_deserialize()
    }

    /// These settings with start-up tuning off (commands that measure or run one thing).
    pub fn untuned(&self) -> Self {
        let mut s = self.clone();
        s.engine.tune = false;
        s
    }

    pub fn engine_config(&self) -> crate::inference::EngineConfig {
        crate::inference::EngineConfig {
            max_batch: self.engine.max_batch,
            max_context: self.engine.max_context,
            prefill_chunk: self.engine.prefill_chunk,
            threads: self.engine.threads,
            // Untuned, a sequence alone gets one thread; start-up tuning may change it.
            single_sequence_threads: match self.engine.single_sequence_threads {
                crate::inference::tune::Tunable::Fixed(n) => n,
                crate::inference::tune::Tunable::Auto => 1,
            },
            prefix_cache_bytes: self.engine.prefix_cache_mb << 20,
            speculative: self.engine.speculative,
            draft_model: (!self.engine.draft_model.as_os_str().is_empty()).then(|| self.engine.draft_model.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_files_override() {
        let s = Settings::load(None).unwrap();
        assert_eq!(s.engine.max_batch, 16);
        assert_eq!(s.engine.device, "auto");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.toml");
        std::fs::write(&path, "[engine]\nmax_batch = 3\n").unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        assert_eq!(s.engine.max_batch, 3);
        assert_eq!(s.engine.prefill_chunk, 128, "unset keys keep their defaults");
        // The verifier's second replay cuts prompts as a node of the default does.
        assert_eq!(s.engine.prefill_chunk, crate::proof::verify::NODE_PREFILL_CHUNK);
        // A speculation table written before `timed` existed still loads, timed.
        std::fs::write(&path, "[engine]\nspeculative = { draft = \"ngram\", k = 2 }\n").unwrap();
        let s = Settings::load(Some(&path)).unwrap().engine.speculative;
        assert_eq!((s.draft, s.k, s.timed), (crate::inference::Draft::Ngram, 2, true));
        std::fs::write(&path, "[engine]\nspeculative = { draft = \"ngram\", k = 2, timed = false }\n").unwrap();
        assert!(!Settings::load(Some(&path)).unwrap().engine.speculative.timed);
        let alone: crate::inference::Speculation = serde_json::from_str(r#"{"draft": "ngram", "k": 3}"#).unwrap();
        assert!(alone.timed, "timed unless said otherwise");
    }

    #[test]
    fn secrets_never_print_and_prices_parse_per_model() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.toml");
        std::fs::write(
            &path,
            "[database]\nurl = \"postgres://u:hunter2@db/ludus\"\n\
             [prices.models.\"big\"]\nprompt_per_1k = \"5\"\ncompletion_per_1k = \"7\"\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.database.url.expose(), "postgres://u:hunter2@db/ludus");
        let table = s.prices.table();
        assert_eq!(table.for_model("big").completion_per_1k, crate::ledger::Units(7));
        assert_eq!(table.for_model("other"), table.default);
        std::fs::write(&path, "[prices]\nprompt_per_1k = \"1.5\"\n").unwrap();
        let err = Settings::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("not an amount"), "{err}");
    }

    #[test]
    fn a_bad_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[engine]\nmax_batch = \"lots\"\n").unwrap();
        let err = Settings::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("max_batch"), "{err}");
    }
}
