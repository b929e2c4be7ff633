//! `ludus games …`: the operator's commands for games and their API keys, run against the
//! registry database (the private cluster is started for the command when needed).

use clap::Args;

use crate::ledger::Store;
use crate::serve::open_store;
use crate::settings::Settings;

/// A key's per-minute limits, from the command line or else `[games]` in the config.
#[derive(Debug, Args)]
pub struct KeyLimitArgs {
    /// Requests per minute allowed for the key (default: [games] in the config).
    #[arg(long)]
    pub rpm: Option<u32>,
    /// Tokens per minute allowed for the key.
    #[arg(long)]
    pub tpm: Option<u32>,
}

impl KeyLimitArgs {
    /// (requests, tokens) per minute.
    fn resolve(&self, settings: &Settings) -> (u32, u32) {
        (self.rpm.unwrap_or(settings.games.requests_per_minute), self.tpm.unwrap_or(settings.games.tokens_per_minute))
    }
}

#[derive(Debug, Args)]
pub struct GamesAddArgs {
    /// The game's name (letters, digits, '-' and '_').
    pub name: String,
    #[command(flatten)]
    pub limits: KeyLimitArgs,
    /// The wallet (0x…) the game keeps its escrow in on the settlement contract.
    #[arg(long)]
    pub wallet: Option<String>,
}

/// Runs `f` against the registry database (the private cluster is stopped afterwards
/// if this command had to start it).
fn with_store<T>(settings: &Settings, f: impl AsyncFnOnce(Store) -> anyhow::Result<T>) -> anyhow::Result<T> {
    actix_web::rt::System::new().block_on(async move {
        let (store, cluster) = open_store(settings).await?;
        let result = f(store).await;
        if let Some(cluster) = cluster.filter(|c| c.started_here) {
            cluster.stop()?;
        }
        result
    })
}

pub fn games_add(settings: &Settings, args: GamesAddArgs) -> anyhow::Result<()> {
    let (rpm, tpm) = args.limits.resolve(settings);
    if let Some(w) = &args.wallet {
        crate::ledger::games::normalize_wallet(w)?;
    }
    let (id, key) = with_store(settings, async |store| {
        let (id, key) = store.add_game(&args.name, rpm, tpm).await?;
        if let Some(w) = &args.wallet {
            store.set_game_wallet(&args.name, w).await?;
        }
        Ok((id, key))
    })?;
    eprintln!("created game `{}` (id {id}); its API key (shown once, stored hashed):", args.name);
    println!("{key}");
    Ok(())
}

pub fn games_list(settings: &Settings) -> anyhow::Result<()> {
    let games = with_store(settings, async |store| Ok(store.list_games().await?))?;
    println!("{}", serde_json::to_string_pretty(&games)?);
    Ok(())
}

/// `ludus games set-wallet NAME 0x…`.
pub fn games_set_wallet(settings: &Settings, name: &str, wallet: &str) -> anyhow::Result<()> {
    let wallet = with_store(settings, async |store| Ok(store.set_game_wallet(name, wallet).await?))?;
    eprintln!("game `{name}` keeps its escrow at {wallet}; deposit with the settlement contract's deposit()");
    Ok(())
}

/// `ludus games suspend NAME --reason …` and `ludus games resume NAME`.
pub fn games_set_status(settings: &Settings, name: &str, suspend: Option<&str>) -> anyhow::Result<()> {
    use crate::ledger::games::GameStatus;
    let status = if suspend.is_some() { GameStatus::Suspended } else { GameStatus::Active };
    with_store(settings, async |store| Ok(store.set_game_status(name, status, suspend).await?))?;
    eprintln!("game `{name}` is now {status} (keys take it up within seconds)");
    Ok(())
}

#[derive(Debug, Args)]
pub struct GamesAddKeyArgs {
    /// The game's name.
    pub name: String,
    #[command(flatten)]
    pub limits: KeyLimitArgs,
}

/// `ludus games add-key NAME`: a further key for the game, printed once. Rotation: add a
/// key, deploy it to the game's servers, then revoke the old one.
pub fn games_add_key(settings: &Settings, args: GamesAddKeyArgs) -> anyhow::Result<()> {
    let (rpm, tpm) = args.limits.resolve(settings);
    let (key, id) = with_store(settings, async |store| Ok(store.add_key(&args.name, rpm, tpm).await?))?;
    eprintln!("added key {id} to game `{}`; the key (shown once, stored hashed):", args.name);
    println!("{key}");
    Ok(())
}

/// `ludus games keys NAME`: the game's keys as JSON (ids, limits, dates; never a key).
pub fn games_keys(settings: &Settings, name: &str) -> anyhow::Result<()> {
    let keys = with_store(settings, async |store| Ok(store.list_keys(name).await?))?;
    println!("{}", serde_json::to_string_pretty(&keys)?);
    Ok(())
}

/// `ludus games revoke-key NAME KEY_OR_ID`.
pub fn games_revoke_key(settings: &Settings, name: &str, key_or_id: &str) -> anyhow::Result<()> {
    let revoked = with_store(settings, async |store| Ok(store.revoke_key(name, key_or_id).await?))?;
    eprintln!(
        "revoked key {} of game `{name}` (servers refuse it within seconds); {} active key(s) left",
        revoked.id, revoked.active_left
    );
    if revoked.active_left == 0 {
        eprintln!("the game has no key left: `ludus games add-key {name}` makes one");
    }
    Ok(())
}
