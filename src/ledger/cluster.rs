//! A private Postgres cluster for `ludus demo`, `ludus serve` without a `database.url`,
//! and the tests: the system's `initdb`/`pg_ctl` (Debian's `postgresql` package) run on a
//! data directory, listening on a free loopback port only, with no Unix socket.
//!
//! Private means private: every connection needs the password generated at `initdb`
//! (scram-sha-256), kept in the cluster directory (0600, in a 0700 directory) — other local
//! accounts cannot reach the ledger, read the ticket secret or rewrite receipts. A cluster
//! directory without that file was not made by Ludus, and is never joined.
//!
//! A cluster that is already running in the directory is reused (its port is read from
//! `postmaster.pid`), so several processes on one machine share it. As root, the server
//! runs as the unprivileged `postgres` user, since Postgres refuses to run as root; when
//! that user cannot reach the data directory, the cluster lives in a directory with a random
//! name under /var/tmp/ludus-postgres (recorded in `data_dir/postgres.location`), which
//! must be owned by that user: nobody can plant a cluster there in advance.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::error::LedgerError;

/// Where Debian and Ubuntu put the server binaries (not on PATH).
const SEARCH_DIRS: &[&str] = &["/usr/lib/postgresql"];
/// The superuser and database of a private cluster.
pub const PRIVATE_USER: &str = "ludus";
/// The superuser's password, in the cluster directory.
const PASSWORD_FILE: &str = "ludus.password";
/// Where clusters go that the `postgres` user could not run in the data directory.
const MOVED_BASE: &str = "/var/tmp/ludus-postgres";

/// A private cluster this process started or found running.
#[derive(Debug)]
pub struct PrivateCluster {
    pub data_dir: PathBuf,
    pub port: u16,
    bin_dir: PathBuf,
    run_as: Option<(u32, u32)>,
    /// The superuser's password (generated at `initdb`).
    password: String,
    /// This process started it (and stops it in [`PrivateCluster::stop`]).
    pub started_here: bool,
}

fn cluster_err(message: impl Into<String>) -> LedgerError {
    LedgerError::Cluster(message.into())
}

/// The directory holding `initdb` and `pg_ctl`: PATH first, then the newest Debian version.
pub fn find_bin_dir() -> Result<PathBuf, LedgerError> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                // Follow symlinks to the real directory, which also holds createdb & co.
                let real =
                    std::fs::canonicalize(dir.join("initdb")).ok().and_then(|p| p.parent().map(Path::to_path_buf));
                return Ok(real.unwrap_or(dir));
            }
        }
    }
    let mut found: Vec<(u32, PathBuf)> = Vec::new();
    for base in SEARCH_DIRS {
        for entry in std::fs::read_dir(base).into_iter().flatten().flatten() {
            let bin = entry.path().join("bin");
            let version = entry.file_name().to_string_lossy().parse::<u32>().unwrap_or(0);
            if bin.join("initdb").is_file() {
                found.push((version, bin));
            }
        }
    }
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or_else(|| {
        cluster_err(
            "no Postgres server binaries (initdb, pg_ctl) found: install them with \
             `sudo apt-get install postgresql` (scripts/setup does), or set database.url",
        )
    })
}

/// uid and gid of the `postgres` user, when this process runs as root.
fn unprivileged_user() -> Result<Option<(u32, u32)>, LedgerError> {
    if !running_as_root() {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| cluster_err(format!("/etc/passwd: {e}")))?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() > 3 && fields[0] == "postgres" {
            let uid = fields[2].parse().map_err(|_| cluster_err("bad uid for postgres in /etc/passwd"))?;
            let gid = fields[3].parse().map_err(|_| cluster_err("bad gid for postgres in /etc/passwd"))?;
            return Ok(Some((uid, gid)));
        }
    }
    Err(cluster_err(
        "running as root, and Postgres refuses to: create the `postgres` user (Debian's postgresql package does)",
    ))
}

fn running_as_root() -> bool {
    // The owner of /proc/self is this process's effective uid.
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("/proc/self exists on Linux")) == 0
}

/// Whether every ancestor of `dir` lets others through (the `postgres` user must reach it).
fn traversable_by_others(dir: &Path) -> bool {
    dir.ancestors().skip(1).all(|a| std::fs::metadata(a).map(|m| m.permissions().mode() & 0o001 != 0).unwrap_or(false))
}

/// The port of a cluster running in `data_dir`, from `postmaster.pid` (line 4), if the
/// process in it is alive.
fn running_port(data_dir: &Path) -> Option<u16> {
    let pid_file = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let mut lines = pid_file.lines();
    let pid: u32 = lines.next()?.trim().parse().ok()?;
    let port: u16 = lines.nth(2)?.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(port)
}

/// The password of the cluster in `dir`; a cluster without one was not made by Ludus (or by
/// a version that used trust authentication) and is not used.
fn read_password(dir: &Path) -> Result<String, LedgerError> {
    match std::fs::read_to_string(dir.join(PASSWORD_FILE)) {
        Ok(password) if !password.trim().is_empty() => Ok(password.trim().to_string()),
        _ => Err(cluster_err(format!(
            "the Postgres cluster in {} has no {PASSWORD_FILE}: it was not created by this version of Ludus \
             (older ones let every local user in). Refusing to use it: remove that directory to start a new \
             ledger, or set database.url",
            dir.display()
        ))),
    }
}

/// Where the cluster of `data_dir` lives when the `postgres` user cannot reach it: a random
/// directory under [`MOVED_BASE`], chosen once and recorded in `data_dir/postgres.location`.
fn moved_location(data_dir: &Path) -> Result<PathBuf, LedgerError> {
    let record = data_dir.with_extension("location");
    let io = |e: std::io::Error| cluster_err(format!("{}: {e}", record.display()));
    if let Ok(text) = std::fs::read_to_string(&record) {
        let path = PathBuf::from(text.trim());
        if path.parent() == Some(Path::new(MOVED_BASE)) {
            return Ok(path);
        }
        return Err(cluster_err(format!("{} names {}, outside {MOVED_BASE}", record.display(), path.display())));
    }
    // The base is root's, readable and traversable by all (the postgres user included).
    std::fs::create_dir_all(MOVED_BASE)
        .and_then(|_| std::fs::set_permissions(MOVED_BASE, std::fs::Permissions::from_mode(0o755)))
        .map_err(|e| cluster_err(format!("{MOVED_BASE}: {e}")))?;
    let base = std::fs::symlink_metadata(MOVED_BASE).map_err(|e| cluster_err(format!("{MOVED_BASE}: {e}")))?;
    if std::os::unix::fs::MetadataExt::uid(&base) != 0 || !base.is_dir() {
        return Err(cluster_err(format!("{MOVED_BASE} is not a directory owned by root; refusing to use it")));
    }
    let path = Path::new(MOVED_BASE).join(hex::encode(rand::random::<[u8; 16]>()));
    if let Some(parent) = record.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    std::fs::write(&record, format!("{}\n", path.display())).map_err(io)?;
    Ok(path)
}

fn free_port() -> Result<u16, LedgerError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| cluster_err(format!("no free port: {e}")))?;
    Ok(listener.local_addr().map_err(|e| cluster_err(e.to_string()))?.port())
}

impl PrivateCluster {
    /// Starts (creating it if needed) or joins the cluster in `data_dir`. As root, a
    /// `data_dir` the `postgres` user cannot reach is moved under /var/tmp/ludus-postgres.
    pub fn ensure(data_dir: &Path) -> Result<Self, LedgerError> {
        let bin_dir = find_bin_dir()?;
        let run_as = unprivileged_user()?;
        let mut data_dir = std::path::absolute(data_dir).map_err(|e| cluster_err(e.to_string()))?;
        if let Some((uid, _)) = run_as.filter(|_| !traversable_by_others(&data_dir)) {
            let moved = moved_location(&data_dir)?;
            tracing::info!(wanted = %data_dir.display(), used = %moved.display(),
                "the postgres user cannot reach the data directory; using one it can");
            // Ours, or nothing: a directory someone else made there is never used.
            if let Ok(meta) = std::fs::symlink_metadata(&moved) {
                if !meta.is_dir() || std::os::unix::fs::MetadataExt::uid(&meta) != uid {
                    return Err(cluster_err(format!(
                        "{} is not a directory owned by the postgres user; refusing to use it",
                        moved.display()
                    )));
                }
            }
            data_dir = moved;
        }
        let mut cluster = Self { data_dir, port: 0, bin_dir, run_as, password: String::new(), started_here: false };
        if cluster.data_dir.join("PG_VERSION").exists() {
            cluster.password = read_password(&cluster.data_dir)?;
        }
        if let Some(port) = running_port(&cluster.data_dir) {
            cluster.port = port;
            tracing::info!(dir = %cluster.data_dir.display(), port, "joined the running private Postgres cluster");
            return Ok(cluster);
        }
        if !cluster.data_dir.join("PG_VERSION").exists() {
            cluster.init()?;
        }
        cluster.start()?;
        Ok(cluster)
    }

    /// `postgres://ludus:PASSWORD@127.0.0.1:PORT/DATABASE` (a secret).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{PRIVATE_USER}:{}@127.0.0.1:{}/{database}", self.password, self.port)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd.env_remove("PGDATA").env("LC_ALL", "C").env("PGPASSWORD", &self.password);
        cmd
    }

    fn run(&self, mut cmd: Command, what: &str) -> Result<(), LedgerError> {
        let out = cmd.output().map_err(|e| cluster_err(format!("{what}: {e}")))?;
        if !out.status.success() {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            let tail: String =
                log.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            return Err(cluster_err(format!(
                "{what} failed ({}): {}{}\n{tail}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            )));
        }
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.join("server.log")
    }

    fn init(&mut self) -> Result<(), LedgerError> {
        let io = |e: std::io::Error| cluster_err(format!("{}: {e}", self.data_dir.display()));
        std::fs::create_dir_all(&self.data_dir).map_err(io)?;
        if std::fs::read_dir(&self.data_dir).map_err(io)?.next().is_some() {
            return Err(cluster_err(format!(
                "{} is not empty and holds no Postgres cluster; refusing to create one there",
                self.data_dir.display()
            )));
        }
        std::fs::set_permissions(&self.data_dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&self.data_dir, Some(uid), Some(gid))
                .map_err(|e| cluster_err(format!("chown {}: {e}", self.data_dir.display())))?;
        }
        tracing::info!(dir = %self.data_dir.display(), "creating a private Postgres cluster");
        self.password = hex::encode(rand::random::<[u8; 24]>());
        // initdb wants an empty directory: the password file waits beside it until then.
        let pwfile = self.data_dir.with_extension(format!("pw-{}", rand::random::<u32>()));
        self.write_private(&pwfile, &self.password)?;
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(&self.data_dir).args(["-U", PRIVATE_USER, "--auth=scram-sha-256", "-E", "UTF8"]);
        cmd.arg(format!("--pwfile={}", pwfile.display())).arg("--no-instructions");
        let made = self.run(cmd, "initdb");
        let _ = std::fs::remove_file(&pwfile);
        made?;
        self.write_private(&self.data_dir.join(PASSWORD_FILE), &self.password)?;
        // Loopback TCP only; no Unix socket (its directory may not be writable).
        let conf = "\n# ludus private cluster\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n\
                    max_connections = 200\nshared_buffers = 128MB\n";
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data_dir.join("postgresql.conf"))
            .map_err(|e| cluster_err(e.to_string()))?;
        std::io::Write::write_all(&mut file, conf.as_bytes()).map_err(|e| cluster_err(e.to_string()))
    }

    /// Writes `text` to a new file readable by the cluster's user only.
    fn write_private(&self, path: &Path, text: &str) -> Result<(), LedgerError> {
        let io = |e: std::io::Error| cluster_err(format!("{}: {e}", path.display()));
        let mut options = std::fs::OpenOptions::new();
        std::os::unix::fs::OpenOptionsExt::mode(options.write(true).create_new(true), 0o600);
        std::io::Write::write_all(&mut options.open(path).map_err(io)?, format!("{text}\n").as_bytes()).map_err(io)?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io)?;
        }
        Ok(())
    }

    fn start(&mut self) -> Result<(), LedgerError> {
        let mut last = None;
        for _ in 0..5 {
            let port = free_port()?;
            let mut cmd = self.command("pg_ctl");
            cmd.arg("-D").arg(&self.data_dir).arg("-l").arg(self.log_path());
            cmd.args(["-w", "-t", "60", "-o", &format!("-p {port}"), "start"]);
            match self.run(cmd, "pg_ctl start") {
                Ok(()) => {
                    self.port = port;
                    self.started_here = true;
                    tracing::info!(dir = %self.data_dir.display(), port, "private Postgres cluster started");
                    return Ok(());
                }
                // Another process may have taken the port between our probe and the start.
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried at least once"))
    }

    /// Creates `database` unless it exists.
    pub fn create_database(&self, database: &str) -> Result<(), LedgerError> {
        let mut cmd = self.command("createdb");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", PRIVATE_USER, database]);
        match self.run(cmd, "createdb") {
            Err(LedgerError::Cluster(m)) if m.contains("already exists") => Ok(()),
            other => other,
        }
    }

    /// Stops the cluster (fast: running transactions roll back, committed data stays).
    pub fn stop(&self) -> Result<(), LedgerError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D").arg(&self.data_dir).args(["-m", "fast", "-w", "stop"]);
        self.run(cmd, "pg_ctl stop")
    }

    /// Starts a cluster that was stopped, on its old port (tests restart Postgres under load).
    pub fn restart_on_same_port(&self) -> Result<(), LedgerError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D").arg(&self.data_dir).arg("-l").arg(self.log_path());
        cmd.args(["-w", "-t", "60", "-o", &format!("-p {}", self.port), "start"]);
        self.run(cmd, "pg_ctl start")
    }

    /// Stops the cluster and deletes its directory when process `pid` exits, from a small
    /// watcher process (for throwaway clusters: tests and benches).
    pub fn remove_when_process_exits(&self, pid: u32) -> Result<(), LedgerError> {
        let script = format!(
            "while [ -d /proc/{pid} ]; do sleep 1; done; '{}' -D '{}' -m immediate stop >/dev/null 2>&1; rm -rf '{}'",
            self.bin_dir.join("pg_ctl").display(),
            self.data_dir.display(),
            self.data_dir.display()
        );
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script]).stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd.process_group(0).spawn().map_err(|e| cluster_err(format!("watcher: {e}")))?;
        Ok(())
    }

    /// The private cluster of a data directory (`data_dir/postgres`) with its `ludus`
    /// database: what `ludus serve`, `games` and `demo` use when no URL is configured.
    pub fn for_data_dir(data_dir: &Path) -> Result<(Self, String), LedgerError> {
        let cluster = Self::ensure(&data_dir.join("postgres"))?;
        cluster.create_database("ludus")?;
        let url = cluster.url("ludus");
        Ok((cluster, url))
    }

    /// A fresh throwaway cluster in a new directory under the system temp dir, removed when
    /// this process exits.
    pub fn throwaway() -> Result<Self, LedgerError> {
        let dir = std::env::temp_dir().join(format!("ludus-pg-{}-{}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir).map_err(|e| cluster_err(format!("{}: {e}", dir.display())))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| cluster_err(e.to_string()))?;
        let cluster = Self::ensure(&dir)?;
        cluster.remove_when_process_exits(std::process::id())?;
        Ok(cluster)
    }
}
