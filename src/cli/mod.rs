//! The `ludus` command line: argument types (clap) and one module per subcommand.
//! `main.rs` parses, sets up logging and calls [`run`].

mod bench;
mod chain;
mod cluster;
mod distill;
mod games;
mod generate;
mod inspect;
mod load;
mod logging;
mod model;
mod progress;
mod receipts;
mod runtime;
mod serve;
mod speculation;
mod verify;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use logging::init_logging;
pub use runtime::resolve_quantization;

use crate::inference::model::{parse_dtype, DeviceChoice};
use crate::settings::Settings;

#[derive(Debug, Parser)]
#[command(name = "ludus", version, about = "LLM inference for games on a decentralized compute network")]
pub struct Cli {
    /// Configuration file layered over config/default.toml.
    #[arg(long, global = true, env = "LUDUS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log lines as `text` (for people) or `json` (one object per line, for log
    /// pipelines). Default: [log] format in the config (text).
    #[arg(long, global = true, env = "LUDUS_LOG_FORMAT", value_parser = ["text", "json"])]
    pub log_format: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a completion locally with a model file.
    Generate(generate::GenerateArgs),
    /// Print the token ids of a text as a JSON array.
    Tokenize {
        /// Model file or directory whose tokenizer to use.
        #[arg(long)]
        model: PathBuf,
        /// The text to tokenize.
        #[arg(long)]
        text: String,
        /// Add the model's BOS token when it asks for one.
        #[arg(long)]
        add_special: bool,
    },
    /// Model tools.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Run the gateway, distributor and node websocket endpoint.
    Serve,
    /// Run a compute node connected to a distributor.
    Node(serve::NodeArgs),
    /// Manage node and distributor keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Manage games and their API keys.
    #[command(subcommand)]
    Games(GamesCommand),
    /// Serve plus local nodes with the default model on loopback, ready for curl.
    Demo(serve::DemoArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Check a stored proof of inference offline against a reference model.
    Verify(verify::VerifyArgs),
    /// Settlement contract tools for operators.
    #[command(subcommand)]
    Chain(chain::ChainCommand),
    /// Tools for running several servers as one network over NATS.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Claim this node's payouts for every settled epoch not claimed yet.
    Claim(chain::ClaimArgs),
    /// Check one task's receipt against its block root anchored on chain (trusting no server).
    VerifyReceipt(receipts::VerifyReceiptArgs),
    /// Train a smaller student model on a teacher's output distributions (distillation).
    Distill(distill::DistillArgs),
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Print a server's NATS user, with permissions that let it publish only under its own
    /// name, for nats-server's `authorization { users = [ … ] }` block.
    NatsUser(cluster::NatsUserArgs),
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a secp256k1 key file (mode 0600) and print its address.
    New {
        /// Where to write the key file (never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the address of a key file.
    Address {
        /// The key file.
        path: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum GamesCommand {
    /// Create a game and print its API key once.
    Add(games::GamesAddArgs),
    /// List games with their status, escrow and key count (JSON).
    List,
    /// Suspend a game: its keys get 403 with the reason.
    Suspend {
        /// The game's name.
        name: String,
        /// Shown to the game's clients in every refusal.
        #[arg(long, default_value = "suspended by the operator")]
        reason: String,
    },
    /// Reactivate a suspended game.
    Resume {
        /// The game's name.
        name: String,
    },
    /// Set the wallet (0x…) a game keeps its escrow in on the settlement contract.
    SetWallet {
        /// The game's name.
        name: String,
        /// The wallet address, 0x followed by 40 hex digits.
        wallet: String,
    },
    /// Add an API key to a game and print it once (rotation: add one, deploy it, revoke
    /// the old one).
    AddKey(games::GamesAddKeyArgs),
    /// List a game's keys: id, limits, when made and revoked (JSON; never the keys).
    Keys {
        /// The game's name.
        name: String,
    },
    /// Revoke a game's key: servers refuse it within seconds.
    RevokeKey {
        /// The game's name.
        name: String,
        /// The key's id from `keys` (8 or more of its hex digits), or the key itself.
        key: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Print architecture, sizes and tensor types of a GGUF file or safetensors directory.
    Inspect {
        /// A .gguf file or a safetensors model directory.
        path: PathBuf,
        /// Memory budget to plan against (e.g. 8GiB, 512MiB): prints weights + KV cache
        /// for each quantization and context, and what fits.
        #[arg(long)]
        budget: Option<String>,
        /// Context length (tokens per sequence) for the plan. Default: the config's
        /// engine.max_context, capped by the model's.
        #[arg(long)]
        context: Option<u64>,
        /// Sequences served at once (KV-cache slots) for the plan.
        #[arg(long, default_value_t = 1)]
        batch: u64,
    },
    /// Measure what decodes fastest here (threads for a sequence alone; int4 or int8 when
    /// --quantize is auto) and remember it for this machine and model: what `ludus node`
    /// does on its first start, done again now. Prints the figures as JSON.
    Tune {
        /// A .gguf file, a safetensors model directory or a protected bundle.
        path: PathBuf,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Write a random-weight model of a real model's shape (GGUF, tiny tokenizer): for
    /// benchmarks and hardware checks of shapes whose weights you do not have.
    Synth {
        /// Shape: smollm2-135m, llama3-8b, or tiny.
        #[arg(long, default_value = "smollm2-135m")]
        shape: String,
        /// Storage of the 2-D weights: f32, f16, q8_0, q4_0 or q4_1.
        #[arg(long, default_value = "q4_1")]
        dtype: String,
        /// Where to write the .gguf file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Protect a model: fold norms, rotate the residual stream, permute heads and FFN
    /// units, encrypt. Writes the bundle directory and a new key file (mode 0600).
    Protect {
        /// The model to protect (.gguf file or safetensors directory).
        input: PathBuf,
        /// Directory to write the protected bundle to.
        #[arg(long)]
        out: PathBuf,
        /// Where to write the bundle's key (keep it in the distributor's key store).
        #[arg(long)]
        key_out: PathBuf,
        /// Name the bundle is served under (default: the input's name).
        #[arg(long)]
        name: Option<String>,
    },
}

/// Device and dtype flags shared by the commands that run a model.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// auto (CUDA when present), cpu, cuda or cuda:N. Default: the config's engine.device.
    #[arg(long)]
    pub device: Option<DeviceChoice>,
    /// f32, bf16 or f16. Default: f32 on CPU, bf16 on CUDA.
    #[arg(long, value_parser = parse_dtype)]
    pub dtype: Option<tch::Kind>,
    /// How linear layers are stored: none, int8 (CPU only), int4, or auto (on CPU the
    /// faster of int4 and int8 as measured here at start-up; int4 on CUDA).
    /// Default: the config's engine.quantize.
    #[arg(long)]
    pub quantize: Option<String>,
    /// libtorch threads (0 = all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Key file of a protected model bundle (hex, 32 bytes).
    #[arg(long)]
    pub model_key: Option<PathBuf>,
    /// Threads when decoding a single sequence (0 = --threads), or auto (measured at
    /// start-up). Default: the config's engine.single_sequence_threads.
    #[arg(long)]
    pub single_sequence_threads: Option<crate::inference::tune::Tunable>,
    /// Speculative decoding of a sequence decoded alone: off, ngram (drafts from what
    /// followed the last few tokens earlier in the prompt or answer) or model (a draft
    /// model's greedy tokens, --draft-model); the kept tokens are the ones the model
    /// draws. Default: the config's engine.speculative.draft.
    #[arg(long)]
    pub draft: Option<crate::inference::Draft>,
    /// The draft model of --draft model: a model file or directory with the target's
    /// tokenizer (a `ludus distill` student, or a smaller sibling). Default: the config's
    /// engine.draft_model.
    #[arg(long)]
    pub draft_model: Option<PathBuf>,
    /// Tokens drafted per pass at most (1..=16). Default: the config's engine.speculative.k.
    #[arg(long)]
    pub draft_tokens: Option<usize>,
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Generate(args) => generate::run(&settings, args),
        Command::Tokenize { model, text, add_special } => model::tokenize(&model, &text, add_special),
        Command::Model(ModelCommand::Synth { shape, dtype, out }) => model::synth(&shape, &dtype, &out),
        Command::Model(ModelCommand::Protect { input, out, key_out, name }) => {
            model::protect(&input, &out, &key_out, name)
        }
        Command::Model(ModelCommand::Tune { path, runtime }) => runtime.tune(&settings, &path),
        Command::Model(ModelCommand::Inspect { path, budget, context, batch }) => {
            let budget = budget
                .map(|b| crate::inference::memory_plan::parse_bytes(&b))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let workload = crate::inference::memory_plan::Workload {
                batch,
                context: context.unwrap_or(settings.engine.max_context as u64),
                prefix_cache_bytes: (settings.engine.prefix_cache_mb as u64) << 20,
            };
            let tunings = runtime::tune_cache(&settings).for_model(&path);
            inspect::run(&path, budget.map(|b| (b, workload)), tunings)
        }
        Command::Bench(bench::BenchCommand::Load(args)) => load::run(&settings, args),
        Command::Bench(cmd) => bench::run(&settings, cmd),
        Command::Serve => serve::serve(settings),
        Command::Node(args) => serve::node(settings, args),
        Command::Games(GamesCommand::Add(args)) => games::games_add(&settings, args),
        Command::Games(GamesCommand::List) => games::games_list(&settings),
        Command::Games(GamesCommand::Suspend { name, reason }) => {
            games::games_set_status(&settings, &name, Some(&reason))
        }
        Command::Games(GamesCommand::Resume { name }) => games::games_set_status(&settings, &name, None),
        Command::Games(GamesCommand::SetWallet { name, wallet }) => games::games_set_wallet(&settings, &name, &wallet),
        Command::Games(GamesCommand::AddKey(args)) => games::games_add_key(&settings, args),
        Command::Games(GamesCommand::Keys { name }) => games::games_keys(&settings, &name),
        Command::Games(GamesCommand::RevokeKey { name, key }) => games::games_revoke_key(&settings, &name, &key),
        Command::Chain(cmd) => chain::run(cmd),
        Command::Cluster(ClusterCommand::NatsUser(args)) => cluster::nats_user(args),
        Command::Claim(args) => chain::claim(args),
        Command::VerifyReceipt(args) => receipts::verify_receipt(args),
        Command::Distill(args) => distill::run(args),
        Command::Keys(KeysCommand::New { out }) => model::new_node_key(&out),
        Command::Keys(KeysCommand::Address { path }) => {
            println!("{}", crate::crypto::identity::Identity::load(&path)?.address);
            Ok(())
        }
        Command::Demo(args) => serve::demo(settings, args),
        Command::Verify(args) => {
            if !verify::run(args)? {
                anyhow::bail!("the proof was rejected");
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every subcommand says what it does and every flag what it is for (`--help` is the
    /// manual), recursively.
    fn undocumented(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                out.push(format!("{path} {id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            let name = format!("{path} {}", sub.get_name());
            if sub.get_about().is_none() && sub.get_long_about().is_none() {
                out.push(format!("{name} (no description)"));
            }
            undocumented(sub, &name, out);
        }
    }

    #[test]
    fn every_command_and_flag_has_help() {
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        undocumented(&cmd, "ludus", &mut missing);
        assert!(missing.is_empty(), "undocumented in --help: {missing:#?}");
    }
}
