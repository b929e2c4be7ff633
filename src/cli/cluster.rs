//! `ludus cluster nats-user NAME`: the NATS user of one server of a network, with the
//! permissions that hold it to its own name ([`wire::Permissions`]), and the
//! `[cluster]` lines that server needs.

use clap::Args;

use crate::actors::cluster::wire;

#[derive(Debug, Args)]
pub struct NatsUserArgs {
    /// The server's `[cluster] name` (also its NATS user name).
    pub name: String,
    /// Where the servers reach nats-server (for the printed `nats_url`).
    #[arg(long, default_value = "127.0.0.1:4222")]
    pub nats: String,
}

/// Prints the user block for nats-server's `authorization { users = [ … ] }` on stdout,
/// holding a bcrypt hash of a fresh random password, and the server's `[cluster]` table,
/// with the password itself in `nats_url`, on stderr.
pub fn nats_user(args: NatsUserArgs) -> anyhow::Result<()> {
    if !wire::valid_name(&args.name) {
        anyhow::bail!(
            "`{}` cannot be a server name: use letters, digits, `-` and `_` (at most {} of them)",
            args.name,
            wire::MAX_NAME_LEN
        );
    }
    let nats = args.nats.strip_prefix("nats://").unwrap_or(&args.nats);
    if nats.contains("://") || nats.contains('@') || nats.is_empty() {
        anyhow::bail!("--nats takes HOST:PORT (the scheme and the credentials are added), got `{}`", args.nats);
    }
    let password = hex::encode(rand::random::<[u8; 24]>());
    let hash = wire::nats_password_hash(&password);
    println!("{}", wire::Permissions::of(&args.name).nats_user(&args.name, &hash));
    eprintln!(
        "# in server `{0}`'s config (nats_url is a secret):\n[cluster]\nname = \"{0}\"\nnats_url = \"nats://{0}:{password}@{1}\"",
        args.name, nats
    );
    Ok(())
}
