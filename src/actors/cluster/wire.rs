//! What servers say to each other over NATS, and on which subjects. JSON, like the node
//! protocol: small, readable with `nats sub`, and versioned by adding fields.
//!
//! **The last token of every subject is the server that publishes it**, so NATS itself can
//! hold each server to its own name: give every server its own NATS user with the
//! permissions of [`Permissions::of`] (`ludus cluster nats-user NAME` prints them),
//! and a server whose credentials leak cannot advertise, witness, reply or forward as
//! another, nor read another's jobs. What a message says about its sender is checked
//! against its subject.
//!
//! - `ludus.advert.<server>` — every `advert_interval_ms`: per model, the nodes serving it
//!   and the sequences they could start now.
//! - `ludus.job.<runner>.<origin>` — a job `origin` forwards to `runner`; its events come
//!   back, in order, on `ludus.reply.<origin>.<task>.<runner>`.
//! - `ludus.cancel.<runner>.<task>.<origin>` — the game that asked went away: stop the job.
//! - `ludus.resend.<runner>.<task>.<origin>` — events of the job went missing on the way:
//!   send them again from this number ([`super::sequenced`]).
//! - `ludus.quarantine.<server>` — a node failed a proof check here: no server gives it work.
//! - `ludus.witness.<server>` — a node finished a task here with this output (before the
//!   game is answered): if this server dies, the node's re-sent receipt is paid by another.
//! - `ludus.session.<server>` — a node key opened a session here at this time: any older
//!   session of that key on another server is closed (one key, one session).
//! - `ludus.charge.<origin>.<runner>` — the game of a job `origin` forwarded to `runner`
//!   left mid-answer: the tokens it received, charged to its per-minute budget where it
//!   was admitted (a finished job's usage comes back with its `Done`).

use serde::{Deserialize, Serialize};

use crate::actors::catalog::TokenLogprob;
use crate::actors::error::ServeError;
use crate::actors::messages::JobEvent;
use crate::protocol::{FinishReason, TaskId, TaskInput, TaskUsage};
use crate::task::SamplingParams;

/// What every server listens to (each subject's last token is its publisher).
pub const ANY_ADVERT: &str = "ludus.advert.*";
pub const ANY_QUARANTINE: &str = "ludus.quarantine.*";
pub const ANY_WITNESS: &str = "ludus.witness.*";
pub const ANY_SESSION: &str = "ludus.session.*";

/// Models one advert may name (a server's nodes choose model names: bounded).
pub const MAX_ADVERT_MODELS: usize = 1024;
/// Longest server name (it is part of subjects).
pub const MAX_NAME_LEN: usize = 64;

pub fn advert_subject(server: &str) -> String {
    format!("ludus.advert.{server}")
}

pub fn quarantine_subject(server: &str) -> String {
    format!("ludus.quarantine.{server}")
}

pub fn witness_subject(server: &str) -> String {
    format!("ludus.witness.{server}")
}

pub fn session_subject(server: &str) -> String {
    format!("ludus.session.{server}")
}

/// Where `origin` sends the jobs it forwards to `runner`.
pub fn job_subject(runner: &str, origin: &str) -> String {
    format!("ludus.job.{runner}.{origin}")
}

/// Where `runner` charges a game that left a job `origin` forwarded to it.
pub fn charge_subject(origin: &str, runner: &str) -> String {
    format!("ludus.charge.{origin}.{runner}")
}

/// Every charge for the games `origin` admitted.
pub fn charges_for(origin: &str) -> String {
    format!("ludus.charge.{origin}.*")
}

/// Every job forwarded to `runner`.
pub fn jobs_for(runner: &str) -> String {
    format!("ludus.job.{runner}.*")
}

/// Where `runner` sends the events of `task`, forwarded to it by `origin`.
pub fn reply_subject(origin: &str, task: TaskId, runner: &str) -> String {
    format!("ludus.reply.{origin}.{:016x}.{runner}", task.0)
}

/// Where `origin` cancels `task`, which it forwarded to `runner`.
pub fn cancel_subject(runner: &str, task: TaskId, origin: &str) -> String {
    format!("ludus.cancel.{runner}.{:016x}.{origin}", task.0)
}

/// Where `origin` asks `runner` for the events of `task` again, from a number.
pub fn resend_subject(runner: &str, task: TaskId, origin: &str) -> String {
    format!("ludus.resend.{runner}.{:016x}.{origin}", task.0)
}

/// The server that published on `subject`: its last token.
pub fn publisher(subject: &str) -> &str {
    subject.rsplit('.').next().unwrap_or_default()
}

/// The NATS permissions of server `name`: it publishes only subjects that end with its
/// name, and reads only the broadcasts and what is addressed to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

impl Permissions {
    pub fn of(name: &str) -> Self {
        Self {
            publish: vec![
                advert_subject(name),
                quarantine_subject(name),
                witness_subject(name),
                session_subject(name),
                format!("ludus.job.*.{name}"),
                format!("ludus.reply.*.*.{name}"),
                format!("ludus.cancel.*.*.{name}"),
                format!("ludus.resend.*.*.{name}"),
                format!("ludus.charge.*.{name}"),
            ],
            subscribe: vec![
                ANY_ADVERT.into(),
                ANY_QUARANTINE.into(),
                ANY_WITNESS.into(),
                ANY_SESSION.into(),
                jobs_for(name),
                format!("ludus.reply.{name}.*.*"),
                format!("ludus.cancel.{name}.*.*"),
                format!("ludus.resend.{name}.*.*"),
                charges_for(name),
            ],
        }
    }

    /// This server's user for nats-server's `authorization { users = [ … ] }` block.
    /// `password` is what nats-server checks against: a hash of [`nats_password_hash`]
    /// (or, where the config file is as secret as the server's own, the password itself).
    pub fn nats_user(&self, user: &str, password: &str) -> String {
        let list = |subjects: &[String]| subjects.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
        format!(
            "{{ user: \"{user}\", password: \"{password}\", permissions: {{ publish: {{ allow: [{}] }}, subscribe: {{ allow: [{}] }} }} }}",
            list(&self.publish),
            list(&self.subscribe)
        )
    }
}

/// bcrypt cost of [`nats_password_hash`]: what `nats server passwd` uses. nats-server pays
/// it once per connection (tens of milliseconds), never per message.
pub const NATS_PASSWORD_COST: u32 = 11;

/// `password` as nats-server's config should hold it: a bcrypt hash, in the `$2a$` form
/// nats-server recognizes, so that whoever reads that file learns no server's
/// credentials (and nats-server stops warning of plaintext passwords).
pub fn nats_password_hash(password: &str) -> String {
    let salt: [u8; 16] = rand::random();
    bcrypt::hash_with_salt(password, NATS_PASSWORD_COST, salt)
        .expect("NATS_PASSWORD_COST is within bcrypt's range")
        .format_for_version(bcrypt::Version::TwoA)
}

/// A server name is one NATS subject token: letters, digits, `-` and `_`, at most
/// [`MAX_NAME_LEN`] of them.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One server's room, per model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Advert {
    pub server: String,
    /// Random per process: two servers given one name are told apart (and reported).
    pub instance: u64,
    /// It sends [`RemoteEvent::Alive`] for the jobs it runs for others (absent from an
    /// older server, whose forwarded jobs are then given no silence deadline).
    #[serde(default)]
    pub keepalive: bool,
    pub models: Vec<ModelRoom>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRoom {
    pub model: String,
    /// Live nodes serving it.
    pub nodes: usize,
    /// Sequences they could start now (free slots less the jobs already queued).
    pub free: usize,
}

/// A job one server hands to another: the request as the first one validated it, and who
/// pays. The receiving server counts the prompt, makes the text, checks the proof and
/// bills, exactly as for a request of its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardedJob {
    pub task: TaskId,
    /// The server that forwarded it (checked against the subject's last token).
    pub origin: String,
    pub game: String,
    pub game_id: i64,
    pub key_hash: String,
    pub model: String,
    pub input: TaskInput,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub stream: bool,
    /// The request field a grammar came from (`response_format` or `tools`): a refusal
    /// names the field the game wrote.
    #[serde(default)]
    pub grammar_field: Option<String>,
    /// The process the origin runs as ([`Advert::instance`]): the job is cancelled once
    /// the origin is heard as another process (it restarted under its name; nobody reads
    /// the rest). Absent from an older server.
    #[serde(default)]
    pub origin_instance: Option<u64>,
}

/// A session of node `address` opened at `since_ms` (milliseconds since the Unix epoch)
/// on the server that publishes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionClaim {
    pub address: String,
    pub since_ms: u64,
}

/// A node that failed a check somewhere, and for how long nobody gives it work.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Quarantine {
    pub address: String,
    pub seconds: u64,
}

/// Tokens a game received of a job forwarded for it before it left: charged to the
/// per-minute token budget of its key on the server that admitted it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Charge {
    pub task: TaskId,
    pub key_hash: String,
    /// Prompt tokens plus the completion tokens delivered.
    pub tokens: u64,
}

/// A completion a server saw: what a re-sent receipt must match to be paid elsewhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Witness {
    pub server: String,
    pub task: u64,
    /// The node's address, hex.
    pub node: String,
    pub completion_tokens: u32,
    /// Hex of the output hash.
    pub output_hash: String,
    /// The task was picked for a proof check: its receipt, re-sent to another server, is
    /// paid there only once verified (absent from servers before this field: not picked).
    #[serde(default)]
    pub sampled: bool,
}

/// A [`JobEvent`] on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteEvent {
    Text(String),
    Logprobs(TokenLogprob),
    Reset,
    Done {
        finish_reason: FinishReason,
        usage: TaskUsage,
        /// The task billed, when not the forwarded one (a re-run); absent from an older server.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        task: Option<TaskId>,
    },
    Failed(ServeError),
    /// The job is still held (queued, generating, or waiting for its verdict), by the
    /// process `instance` ([`Advert::instance`]): sent every [`KEEPALIVE`] to an origin
    /// that understands it, which gives a job up after silence (a lost final event, a lost
    /// job) or once that process is gone. Never relayed to the game.
    Alive {
        instance: u64,
        /// How many events of the job it has sent ([`super::sequenced`]): fewer received
        /// means some were lost. Absent from an older server.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sent: Option<u64>,
    },
}

/// How often the server running a forwarded job says it still holds it.
pub const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(1);

impl RemoteEvent {
    /// The last event of a job.
    pub fn ends(&self) -> bool {
        matches!(self, Self::Done { .. } | Self::Failed(_))
    }
}

impl From<JobEvent> for RemoteEvent {
    fn from(event: JobEvent) -> Self {
        match event {
            JobEvent::Text(t) => Self::Text(t),
            JobEvent::Logprobs(l) => Self::Logprobs(l),
            JobEvent::Reset => Self::Reset,
            JobEvent::Done { finish_reason, usage, task } => Self::Done { finish_reason, usage, task: Some(task) },
            JobEvent::Failed(e) => Self::Failed(e),
        }
    }
}

impl RemoteEvent {
    /// The event for the game of forwarded job `forwarded` (`None`: a keepalive, the
    /// relay's own).
    pub fn for_game(self, forwarded: TaskId) -> Option<JobEvent> {
        Some(match self {
            RemoteEvent::Text(t) => JobEvent::Text(t),
            RemoteEvent::Logprobs(l) => JobEvent::Logprobs(l),
            RemoteEvent::Reset => JobEvent::Reset,
            RemoteEvent::Done { finish_reason, usage, task } => {
                JobEvent::Done { finish_reason, usage, task: task.unwrap_or(forwarded) }
            }
            RemoteEvent::Failed(e) => JobEvent::Failed(e),
            RemoteEvent::Alive { .. } => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn events_survive_the_wire_and_names_are_subject_tokens() {
        let events = [
            RemoteEvent::Text("héllo".into()),
            RemoteEvent::Done {
                finish_reason: FinishReason::Length,
                usage: TaskUsage { prompt_tokens: 3, completion_tokens: 4 },
                task: Some(TaskId(9)),
            },
            RemoteEvent::Failed(ServeError::QueueFull { model: "m".into(), retry_after: Duration::from_millis(1500) }),
            RemoteEvent::Alive { instance: 7, sent: Some(3) },
        ];
        for event in events {
            let back: RemoteEvent = serde_json::from_slice(&serde_json::to_vec(&event).unwrap()).unwrap();
            assert_eq!(back, event);
        }
        assert!(valid_name("eu-west_1"));
        for bad in ["", "a.b", "a b", "a*", "a>", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?} must be refused");
        }
        assert_eq!(reply_subject("a", TaskId(255), "b"), "ludus.reply.a.00000000000000ff.b");
    }

    #[test]
    fn an_older_servers_advert_reads_as_sending_no_keepalive() {
        let old: Advert = serde_json::from_str(r#"{"server": "b", "instance": 7, "models": []}"#).unwrap();
        assert!(!old.keepalive, "its jobs must not be given up for a silence it cannot help");
        let new = Advert { keepalive: true, ..old };
        let back: Advert = serde_json::from_slice(&serde_json::to_vec(&new).unwrap()).unwrap();
        assert!(back.keepalive);
    }

    #[test]
    fn a_witness_carries_the_pick_and_one_from_an_older_server_reads_as_not_picked() {
        let w = Witness {
            server: "a".into(),
            task: 7,
            node: "0b".repeat(20),
            completion_tokens: 3,
            output_hash: "0c".repeat(32),
            sampled: true,
        };
        let back: Witness = serde_json::from_slice(&serde_json::to_vec(&w).unwrap()).unwrap();
        assert_eq!(back, w);
        let mut older = serde_json::to_value(&w).unwrap();
        older.as_object_mut().unwrap().remove("sampled");
        assert!(!serde_json::from_value::<Witness>(older).unwrap().sampled);
    }

    /// Every subject a server publishes is inside its own publish permissions and inside
    /// the subscriptions of the servers it is meant for, and outside another's publish
    /// permissions: NATS can hold each server to its name.
    #[test]
    fn each_server_may_publish_only_under_its_own_name() {
        fn matches(pattern: &str, subject: &str) -> bool {
            let (p, s): (Vec<_>, Vec<_>) = (pattern.split('.').collect(), subject.split('.').collect());
            if p.last() == Some(&">") {
                return s.len() >= p.len() && p[..p.len() - 1].iter().zip(&s).all(|(p, s)| *p == "*" || p == s);
            }
            p.len() == s.len() && p.iter().zip(&s).all(|(p, s)| *p == "*" || p == s)
        }
        let allowed = |list: &[String], subject: &str| list.iter().any(|p| matches(p, subject));
        let (a, b) = (Permissions::of("a"), Permissions::of("b"));
        let task = TaskId(7);
        // (subject a publishes, who must be able to read it)
        let sent_by_a = [
            (advert_subject("a"), "b"),
            (quarantine_subject("a"), "b"),
            (witness_subject("a"), "b"),
            (session_subject("a"), "b"),
            (job_subject("b", "a"), "b"),
            (reply_subject("b", task, "a"), "b"),
            (cancel_subject("b", task, "a"), "b"),
            (resend_subject("b", task, "a"), "b"),
            (charge_subject("b", "a"), "b"),
        ];
        for (subject, reader) in &sent_by_a {
            assert_eq!(publisher(subject), "a");
            assert!(allowed(&a.publish, subject), "a may publish {subject}");
            assert!(!allowed(&b.publish, subject), "b must not publish {subject}");
            assert_eq!(*reader, "b");
            assert!(allowed(&b.subscribe, subject), "b reads {subject}");
        }
        let private = [
            job_subject("b", "c"),
            reply_subject("b", task, "c"),
            cancel_subject("b", task, "c"),
            resend_subject("b", task, "c"),
            charge_subject("b", "c"),
        ];
        for private in private {
            assert!(!allowed(&a.subscribe, &private), "a must not read {private}");
        }
        let user = a.nats_user("ludus-a", "pw");
        assert!(user.contains(r#"publish: { allow: ["ludus.advert.a""#), "{user}");
    }

    #[test]
    fn a_nats_password_hash_is_salted_bcrypt_that_only_its_password_matches() {
        let (one, two) = (nats_password_hash("secret-1"), nats_password_hash("secret-1"));
        assert!(one.starts_with(&format!("$2a${NATS_PASSWORD_COST}$")), "{one}");
        assert_ne!(one, two, "every hash has its own salt");
        assert!(!one.contains("secret-1"));
        assert!(bcrypt::verify("secret-1", &one).unwrap());
        assert!(bcrypt::verify("secret-1", &two).unwrap());
        assert!(!bcrypt::verify("secret-2", &one).unwrap());
    }
}
