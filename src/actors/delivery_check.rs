//! The tokens a node delivered without a proof, checked ([`crate::proof::delivered`]): those
//! of a task it failed before its `Done` (a streamed answer's game has read them), and
//! those of a hang-up it never proved.
//!
//! Every such check is written to the check backlog in Postgres before it runs
//! ([`super::check_backlog`], kind `delivered`), so once written a crash loses none, and
//! any server holding the model's reference runs it. During a database outage it runs from
//! memory instead, and is written once the database is back. Before either, it is written
//! ahead to the check log ([`super::check_log`]) until Postgres holds the check or its
//! verdict, so a crash during an outage replays it at the next start. Failures are in the node's
//! hands, so a node with [`PER_NODE_WAITING`] of them waiting (across servers) gets no
//! work until a hold runs out, and has at most [`PER_NODE_QUEUED`] queued (the tasks it
//! had in flight when the hold came); past that, or with the backlog full, the check is
//! recorded `unverifiable` with the reason, and the node is checked on every task until
//! one is verified
//! (`Policy::check_until_verified`; neither a reconnect nor a server restart clears it:
//! a joining node's mark is read back from the ledger, `Store::owes_a_verified_task`).
//! The backlog's drain loops, one per verifier thread, bound how much of the pool these
//! checks take.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::check_backlog::DeferDelivered;
use super::check_log::CheckKind;
use super::completion::Verification;
use super::messages::Job;
use crate::crypto::identity::Address;
use crate::inference::SamplingParams;
use crate::proof::Format;
use crate::protocol::{TaskId, TaskInput};

/// Delivered-token checks one node may have waiting, on every server together, before it
/// is held out of work. An honest node fails a task now and then; one that fails faster
/// than the verifiers keep up waits for them.
pub const PER_NODE_WAITING: u64 = 32;

/// A node's delivered-token checks queued at most (across servers), held out of work from
/// [`PER_NODE_WAITING`] on: room for the tasks it had in flight when the hold came.
pub const PER_NODE_QUEUED: u64 = 8 * PER_NODE_WAITING;

/// Tasks one node is given at once, whatever capacity it claims: once its failures fill
/// [`PER_NODE_WAITING`] and it is held, the checks of every task it still has fit in
/// [`PER_NODE_QUEUED`], with a hold's worth to spare (tasks handed to it while the hold
/// travels). A node claiming 4,096 could fail the rest after their games read them, and
/// only the first 256 were checked.
pub const MAX_TASKS_AT_ONCE: usize = (PER_NODE_QUEUED - 2 * PER_NODE_WAITING) as usize;

/// Tokens a node delivered for a task and then failed before its proof (its `Done` never
/// came). Its JSON is what the check backlog stores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveredCheck {
    pub task: TaskId,
    #[serde(with = "address_text")]
    pub node: Address,
    pub model: String,
    pub input: TaskInput,
    pub params: SamplingParams,
    /// Tokens earlier nodes generated before this one took the task.
    pub prefix: Vec<u32>,
    /// The node's own tokens, as the server relayed them.
    pub delivered: Vec<u32>,
    /// The format the node's proofs for this model declared on its link: the check is held
    /// to it alone. `None`: to the widest margin of each reference's formats.
    #[serde(with = "declared_format")]
    pub format: Option<Format>,
    /// The node's log probabilities of `delivered`, as the game read them, when it asked
    /// for them: checked on the reference like a proved task's (empty in checks written
    /// before they were carried).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<crate::task::TokenLogprobs>,
}

/// Queues `job`'s tokens `own` (those before it other nodes made; those after it the game
/// never read) for a check as `node`'s, when the model has a reference. `format` is the
/// one the node's proofs declared on its link, if any.
pub fn check_delivered(v: &Verification, node: Address, job: &Job, own: Range<usize>, format: Option<Format>) {
    let own = own.start..own.end.min(job.emitted.len());
    if own.is_empty() || !v.models.contains(&job.model) {
        return;
    }
    let check = DeliveredCheck {
        task: job.id,
        node,
        model: job.model.clone(),
        input: job.input.clone(),
        params: job.params.clone(),
        prefix: job.emitted[..own.start].to_vec(),
        logprobs: job.emitted_logprobs.get(own.clone()).map(<[_]>::to_vec).unwrap_or_default(),
        delivered: job.emitted[own].to_vec(),
        format,
    };
    // Written ahead: until Postgres holds the check or its verdict, a crash replays it.
    match encode(&check) {
        Ok(bytes) => v.checks.owe(CheckKind::Delivered, check.task.0, check.node.0, &bytes),
        // Not expected (plain data); the check still runs, only a crash would lose it.
        Err(e) => tracing::error!(task = %check.task, error = %e, "a delivered-token check could not be written ahead"),
    }
    v.backlog.do_send(DeferDelivered(check));
}

/// The stored form of a delivered-token check (one line of JSON).
pub fn encode(c: &DeliveredCheck) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(c)
}

/// A stored delivered-token check read back; `None` when it is damaged.
pub fn decode(bytes: &[u8]) -> Option<DeliveredCheck> {
    serde_json::from_slice(bytes).ok()
}

/// A node's address as its `0x…` text.
mod address_text {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    use crate::crypto::identity::Address;

    pub fn serialize<S: Serializer>(address: &Address, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(address)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Address, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

/// A declared format as a proof names it: (`quantization`, `dtype`).
mod declared_format {
    use serde::{de::Error, Deserialize, Deserializer, Serialize, Serializer};

    use crate::proof::Format;

    pub fn serialize<S: Serializer>(format: &Option<Format>, s: S) -> Result<S::Ok, S::Error> {
        format.map(|f| (f.quantization_field(), f.dtype_field())).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Format>, D::Error> {
        let fields = Option::<(String, String)>::deserialize(d)?;
        fields
            .map(|(quantization, dtype)| Format::declared(&quantization, &dtype).map_err(D::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(format: Option<Format>) -> DeliveredCheck {
        DeliveredCheck {
            task: TaskId(11),
            node: Address([7; 20]),
            model: "m".into(),
            input: TaskInput::Text("Once\nupon".into()),
            params: SamplingParams { temperature: 0.7, seed: 5, ..Default::default() },
            prefix: vec![1, 2],
            delivered: vec![3, 4, 5],
            format,
            logprobs: vec![crate::task::TokenLogprobs { logprob: -0.5, top: vec![(3, -0.5), (9, -1.5)] }; 3],
        }
    }

    /// What the backlog stores reads back as the same check, declared format included;
    /// a damaged one (an unknown format, a bad address) does not read back at all.
    #[test]
    fn a_stored_delivered_check_reads_back_the_same_and_a_damaged_one_not_at_all() {
        for format in [None, Some(Format::Int4), Some(Format::Bf16), Some(Format::F32), Some(Format::Int8)] {
            let bytes = encode(&check(format)).unwrap();
            assert!(!bytes.contains(&b'\n'));
            assert_eq!(decode(&bytes), Some(check(format)));
        }
        // Written before checks carried log probabilities: read back without them.
        let mut older: serde_json::Value = serde_json::from_slice(&encode(&check(None)).unwrap()).unwrap();
        older.as_object_mut().unwrap().remove("logprobs");
        let older = decode(&serde_json::to_vec(&older).unwrap()).expect("an older check reads back");
        assert_eq!(older, DeliveredCheck { logprobs: Vec::new(), ..check(None) });
        let mut damaged: serde_json::Value = serde_json::from_slice(&encode(&check(None)).unwrap()).unwrap();
        damaged["format"] = serde_json::json!(["int3", ""]);
        assert_eq!(decode(&serde_json::to_vec(&damaged).unwrap()), None, "an unknown format");
        damaged["format"] = serde_json::Value::Null;
        damaged["node"] = "0x12".into();
        assert_eq!(decode(&serde_json::to_vec(&damaged).unwrap()), None, "a bad address");
    }
}
