//! The Verifier pool: a `SyncArbiter` of threads, each holding f32 reference copies of
//! the models it checks (CPU work never runs on an async arbiter). A `VerifyTask` is a
//! finished task with its proof; the verdict ([`crate::proof::verify`]) goes to the
//! Registry (books, reputation) and the Distributor (quarantine). Rejected proofs are kept
//! in `data_dir/proofs/rejected/` for `ludus verify`. A `VerifyDelivered` is the tokens a
//! node delivered and then failed before its proof ([`crate::proof::delivered`]); its
//! verdict goes to the Registry, which quarantines a node that fails it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;

use super::messages::{DeliveryChecked, VerificationDone};
use crate::crypto::identity::Address;
use crate::inference::{Model, Quantization, SamplingParams};
use crate::ledger::Outcome;
use crate::proof::logprob_check;
use crate::proof::steering::Evidence;
use crate::proof::structure;
use crate::proof::verify::{node_breaks, verify_claimed};
use crate::proof::{Format, Proof, StoredProof, Tolerances};
use crate::protocol::{TaskId, TaskInput};

/// A finished task to check.
#[derive(Message)]
#[rtype(result = "()")]
pub struct VerifyTask {
    pub task: TaskId,
    pub node: Address,
    pub model: String,
    pub input: TaskInput,
    pub params: SamplingParams,
    /// Tokens of an earlier node before a failover: this node's prompt ended with them.
    pub prefix: Vec<u32>,
    /// The completion this node produced (after `prefix`).
    pub completion: Vec<u32>,
    /// The log probabilities it reported for `completion` (empty when none were asked for).
    pub logprobs: Vec<crate::inference::logprobs::TokenLogprobs>,
    /// The challenge the distributor issued.
    pub challenge: [u8; 32],
    pub proof: Option<Box<Proof>>,
    pub report: Vec<Recipient<VerificationDone>>,
    /// Held while the task is in the pool (queued or being checked), when counted.
    pub slot: Option<PoolSlot>,
}

/// Tokens a node delivered and then failed before its proof, to check without a proof;
/// the verdict goes to `report`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct VerifyDelivered {
    pub check: super::delivery_check::DeliveredCheck,
    pub report: Recipient<DeliveryChecked>,
}

/// How many tasks the verifier pool holds, queued or being checked. Completion hands a
/// sampled task to the pool only below `[verifier] queue` of them; past that, the task
/// waits in the check backlog (`super::check_backlog`).
#[derive(Clone, Default)]
pub struct PoolLoad(Arc<AtomicUsize>);

impl PoolLoad {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Counts one more task until the returned slot is dropped (with its task).
    pub fn enter(&self) -> PoolSlot {
        self.0.fetch_add(1, Ordering::Relaxed);
        PoolSlot(self.0.clone())
    }
}

/// One task counted in a [`PoolLoad`]; dropped with the task once it is checked (or refused).
pub struct PoolSlot(Arc<AtomicUsize>);

impl Drop for PoolSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Verifier {
    /// Unquantized references, loaded at start; quantized copies are added on first use.
    models: HashMap<(String, Quantization), Model>,
    /// Where each reference came from, and its bundle key, for loading quantized copies.
    sources: HashMap<String, (PathBuf, Option<[u8; 32]>)>,
    tol: Tolerances,
    rejected_dir: PathBuf,
}

impl Verifier {
    /// Loads every reference model (f32, CPU); bundles take their key from `keys` (key id → hex).
    pub fn load(
        references: &BTreeMap<String, PathBuf>,
        keys: &BTreeMap<String, String>,
        tol: Tolerances,
        rejected_dir: PathBuf,
    ) -> anyhow::Result<Self> {
        let mut models = HashMap::new();
        let mut sources = HashMap::new();
        for (name, path) in references {
            let key = if crate::inference::protect::is_bundle(path) {
                let manifest = crate::inference::protect::read_manifest(path)?;
                let hex_key = keys.get(&manifest.key_id).ok_or_else(|| {
                    anyhow::anyhow!("verifier model {name}: no key {} in the model key store", manifest.key_id)
                })?;
                Some(<[u8; 32]>::try_from(hex::decode(hex_key)?).map_err(|_| anyhow::anyhow!("bad key length"))?)
            } else {
                None
            };
            let model = Model::load_with_key(path, tch::Device::Cpu, Some(tch::Kind::Float), key.as_ref())
                .map_err(|e| anyhow::anyhow!("verifier model {name} ({}): {e}", path.display()))?;
            models.insert((name.clone(), Quantization::None), model);
            sources.insert(name.clone(), (path.clone(), key));
        }
        Ok(Self { models, sources, tol, rejected_dir })
    }

    /// The reference for `name` stored as `quantization`, loaded on first use.
    fn reference(&mut self, name: &str, quantization: Quantization) -> Result<Option<&Model>, String> {
        let key = (name.to_string(), quantization);
        if !self.models.contains_key(&key) {
            let Some((path, bundle_key)) = self.sources.get(name) else { return Ok(None) };
            let started = std::time::Instant::now();
            // In the format's own default dtype (bf16 for int4), as an honest node runs it.
            let model = Model::load_quantized(path, tch::Device::Cpu, None, quantization, bundle_key.as_ref())
                .map_err(|e| format!("cannot load the {quantization} reference of {name}: {e}"))?;
            tracing::info!(model = name, %quantization, secs = started.elapsed().as_secs_f32(), "verifier loaded a quantized reference");
            self.models.insert(key.clone(), model);
        }
        Ok(self.models.get(&key))
    }

    /// Vocabulary size of each reference model (token ids at or above it are invalid).
    pub fn vocab_sizes(&self) -> HashMap<String, usize> {
        self.models.iter().map(|((name, _), model)| (name.clone(), model.llama.config.vocab_size)).collect()
    }

    /// The verdict and why, and for a verified task the near-ties it was forgiven.
    /// Whatever the node controls and gets wrong fails; a check this verifier cannot run
    /// is `Unverifiable` (unpaid, no penalty) — never verified.
    fn check(&mut self, t: &VerifyTask) -> (Outcome, String, Option<Evidence>) {
        use Outcome::{Failed, Unverifiable, Verified};
        if t.proof.is_none() && !self.sources.contains_key(&t.model) {
            return (Unverifiable, "no reference model for this task's model".into(), None);
        }
        // The same checks the server ran before paying (`Completion`): here too, so that a
        // proof is judged whole wherever it is checked (`ludus verify`'s twin, the pool).
        let expected = structure::Expected {
            task: t.task.0,
            node: t.node,
            challenge: &t.challenge,
            model: &t.model,
            prompt_tokens: None,
            completion: &t.completion,
        };
        let proof = match (structure::fault(t.proof.as_deref(), &expected), t.proof.as_deref()) {
            (None, Some(proof)) => proof,
            (fault, _) => return (Failed, fault.unwrap_or_else(|| "no proof".into()), None),
        };
        let format = match crate::proof::Format::declared_by(proof) {
            Ok(format) => format,
            Err(e) => return (Failed, e.to_string(), None),
        };
        // Every reference this check may need: the format's own, and those of the stricter
        // formats its claim is compared with.
        for quantization in std::iter::once(format).chain(format.stricter().iter().copied()).map(Format::reference) {
            match self.reference(&t.model, quantization) {
                Ok(Some(_)) => {}
                Ok(None) => return (Unverifiable, "no reference model for this task's model".into(), None),
                // A format this verifier cannot run earns nothing (never a free pass).
                Err(e) => return (Unverifiable, format!("cannot be checked here: {e}"), None),
            }
        }
        let model = &self.models[&(t.model.clone(), format.reference())];
        let vocab = model.llama.config.vocab_size;
        if let Some(bad) = t.completion.iter().find(|&&id| id as usize >= vocab) {
            return (Failed, format!("token id {bad} is outside the model's vocabulary of {vocab}"), None);
        }
        let prompt = match &t.input {
            TaskInput::Chat(messages) => model.chat_prompt(messages),
            TaskInput::Text(text) => model.completion_prompt(text),
        };
        let mut prompt = match prompt {
            Ok(p) => p,
            Err(e) => return (Unverifiable, format!("cannot tokenize the task: {e}"), None),
        };
        let breaks = node_breaks(model, &t.input, &prompt);
        prompt.extend_from_slice(&t.prefix);
        let models = &self.models;
        let reference = |q| models.get(&(t.model.clone(), q));
        let prefix = t.prefix.len();
        let (completion, params) = (&t.completion, &t.params);
        let checked =
            match verify_claimed(&reference, proof, &prompt, prefix, completion, params, &self.tol, Some(&breaks)) {
                Ok(c) if c.accepted() => c,
                Ok(c) => return (Failed, c.reasons(), None),
                Err(e) => return (Unverifiable, format!("verifier error: {e}"), None),
            };
        let verdict = &checked.verdict;
        let mut detail = format!(
            "{format}: value error {:.4} (prompt {:.4}, answer {:.4}, mean {:.4}), overlap {:.3}, {} near-ties",
            verdict.worst_value_error,
            verdict.worst_prompt_value_error,
            verdict.worst_answer_value_error,
            verdict.mean_value_error,
            verdict.worst_index_overlap,
            verdict.near_ties
        );
        if verdict.replayed_as_the_node_ran_it {
            detail.push_str(&format!(
                ", replayed as the node ran it (the first replay: {})",
                verdict.first_replay_refused.join("; ")
            ));
        }
        // The numbers a game read besides the text: checked on the same reference.
        if t.params.logprobs.is_some() {
            match logprob_check::worst_deviation(model, &prompt, prefix, &t.completion, &t.params, &t.logprobs) {
                Ok(Ok(worst)) => match logprob_check::judge(worst, format, self.tol.tie_margin_scale) {
                    Some(reason) => return (Failed, reason, None),
                    None => detail.push_str(&format!(", log probabilities within {worst:.3}")),
                },
                Ok(Err(reason)) => return (Failed, reason, None),
                Err(e) => return (Unverifiable, format!("verifier error: {e}"), None),
            }
        }
        (Verified, detail, Some(Evidence::of(verdict, format)))
    }

    /// The verdict on a failed node's delivered tokens: `Verified` when one format's
    /// reference explains them, `Failed` when none does, `Unverifiable` when a reference
    /// that might have could not be loaded (never a pass, never the node's fault).
    fn check_delivered(&mut self, t: &super::delivery_check::DeliveredCheck) -> (Outcome, String, Option<Evidence>) {
        use Outcome::{Failed, Unverifiable, Verified};
        let Some(base) = self.models.get(&(t.model.clone(), Quantization::None)) else {
            return (Unverifiable, "no reference model for this task's model".into(), None);
        };
        if t.delivered.is_empty() {
            return (Unverifiable, "no delivered token to check".into(), None);
        }
        let vocab = base.llama.config.vocab_size;
        if let Some(bad) = t.delivered.iter().find(|&&id| id as usize >= vocab) {
            return (Failed, format!("token id {bad} is outside the model's vocabulary of {vocab}"), None);
        }
        let prompt = match &t.input {
            TaskInput::Chat(messages) => base.chat_prompt(messages),
            TaskInput::Text(text) => base.completion_prompt(text),
        };
        let references = match t.format {
            Some(format) => vec![(format.reference(), format, self.tol.for_format(format))],
            None => crate::proof::delivered::references(&self.tol),
        };
        let mut prompt = match prompt {
            Ok(p) => p,
            Err(e) => return (Unverifiable, format!("cannot tokenize the task: {e}"), None),
        };
        prompt.extend_from_slice(&t.prefix);
        let mut rejections = Vec::new();
        let mut unchecked = Vec::new();
        // Of the references that explain the tokens, the one that makes them look most
        // honest gives the steering record its evidence: an honest f32 node's tokens may
        // fit int4's reference too, with near-ties int4's own nodes rarely show.
        let mut best: Option<(f64, String, Evidence)> = None;
        let scale = self.tol.tie_margin_scale;
        for (quantization, format, limits) in references {
            let model = match self.reference(&t.model, quantization) {
                Ok(Some(model)) => model,
                Ok(None) => return (Unverifiable, "no reference model for this task's model".into(), None),
                Err(e) => {
                    unchecked.push(e);
                    continue;
                }
            };
            let checked = crate::proof::delivered::check_tokens(
                model,
                &prompt,
                t.prefix.len(),
                &t.delivered,
                &t.params,
                limits,
                format,
            );
            match checked {
                Ok(v) if v.accepted => {
                    let detail =
                        format!("{} delivered tokens fit the {format} reference, {} near-ties", v.tokens, v.near_ties);
                    // Its near-ties count towards the node's steering record, judged as
                    // for a proof of this format.
                    let evidence = Evidence::of(&v, format);
                    match delivered_logprobs(model, &prompt, t, format, scale) {
                        Ok(within) => {
                            let detail = within.map_or(detail.clone(), |within| format!("{detail}, {within}"));
                            let excess = evidence.task.excess();
                            if best.as_ref().is_none_or(|(least, ..)| excess < *least) {
                                best = Some((excess, detail, evidence));
                            }
                            // Within an honest node's bounds: no reference can do better.
                            if excess <= 0.0 {
                                break;
                            }
                        }
                        Err(Ok(reason)) => rejections.push(format!("{format}: {reason}")),
                        Err(Err(e)) => unchecked.push(format!("{format}: {e}")),
                    }
                }
                Ok(v) => rejections.push(format!("{format}: {}", v.reasons.join("; "))),
                Err(e) => unchecked.push(format!("{format}: verifier error: {e}")),
            }
        }
        if let Some((_, detail, evidence)) = best {
            return (Verified, detail, Some(evidence));
        }
        if !unchecked.is_empty() {
            let detail = format!("could not be checked against every format: {}", unchecked.join("; "));
            return (Unverifiable, detail, None);
        }
        (Failed, format!("delivered tokens no format explains: {}", rejections.join(" | ")), None)
    }

    fn keep_rejected(&self, t: &VerifyTask) {
        let Some(proof) = t.proof.as_deref() else { return };
        let stored = StoredProof {
            proof: proof.clone(),
            input: t.input.clone(),
            params: t.params.clone(),
            prefix: t.prefix.clone(),
            completion: t.completion.clone(),
        };
        let path = self.rejected_dir.join(format!("{}.json", t.task));
        let written = private_dir(&self.rejected_dir).and_then(|()| {
            // Rejections are the nodes' doing: the directory keeps the latest few.
            if let Err(e) = prune_oldest(&self.rejected_dir, MAX_REJECTED_KEPT - 1) {
                tracing::warn!(dir = %self.rejected_dir.display(), error = %e, "could not prune rejected proofs");
            }
            // The proof holds the game's prompt: readable by the server's user only.
            let mut options = std::fs::OpenOptions::new();
            std::os::unix::fs::OpenOptionsExt::mode(options.write(true).create(true).truncate(true), 0o600);
            std::io::Write::write_all(
                &mut options.open(&path)?,
                &serde_json::to_vec_pretty(&stored).unwrap_or_default(),
            )
        });
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "could not keep a rejected proof");
        }
    }
}

/// Rejected proofs kept on disk (each up to a node's largest frame, about 1 MiB).
const MAX_REJECTED_KEPT: usize = 1000;

/// Deletes the oldest files of `dir` (by modification time) until `keep` are left.
fn prune_oldest(dir: &std::path::Path, keep: usize) -> std::io::Result<()> {
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.metadata().ok().filter(|m| m.is_file())?.modified().ok()?, e.path())))
        .collect();
    if files.len() <= keep {
        return Ok(());
    }
    files.sort();
    for (_, path) in &files[..files.len() - keep] {
        // Another verifier thread may have pruned it already.
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Creates `dir` (and its parents) with mode 0700, and makes it 0700 if it existed.
fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

impl Actor for Verifier {
    type Context = SyncContext<Self>;
}

impl Handler<VerifyTask> for Verifier {
    type Result = ();

    /// Checks one task and reports the verdict.
    fn handle(&mut self, t: VerifyTask, _: &mut Self::Context) {
        let started = std::time::Instant::now();
        // A panic on one task (a node's input the replay did not expect) must not kill this
        // thread of the pool for good, leaving every later task unchecked: that task is
        // reported unverifiable (unpaid), and the thread goes on.
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.check(&t)));
        let (outcome, detail, evidence) = checked.unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            (Outcome::Unverifiable, format!("the verifier failed on this task: {what}"), None)
        });
        let evidence = evidence.map(Arc::new);
        let ms = started.elapsed().as_millis() as u64;
        match outcome {
            Outcome::Verified => tracing::debug!(task = %t.task, node = %t.node, ms, %detail, "proof verified"),
            Outcome::Failed => {
                tracing::warn!(task = %t.task, node = %t.node, ms, %detail, "proof REJECTED");
                self.keep_rejected(&t);
            }
            Outcome::Unverifiable => {
                tracing::warn!(task = %t.task, node = %t.node, ms, %detail, "proof could not be checked; task unpaid")
            }
        }
        for r in &t.report {
            r.do_send(VerificationDone {
                task: t.task,
                node: t.node,
                outcome,
                detail: detail.clone(),
                evidence: evidence.clone(),
            });
        }
    }
}

/// The log probabilities a failed node reported with its delivered tokens (the game read
/// them), held to `format`'s tie margin as a proved task's are: `Ok(None)` when none were
/// asked for (or carried, in a check written before they were), `Ok(Some(how close))`,
/// `Err(Ok(why they fail))`, or `Err(Err(why they could not be checked))`.
fn delivered_logprobs(
    model: &Model,
    prompt: &[u32],
    t: &super::delivery_check::DeliveredCheck,
    format: Format,
    scale: f32,
) -> Result<Option<String>, Result<String, String>> {
    if t.params.logprobs.is_none() || t.logprobs.is_empty() {
        return Ok(None);
    }
    if t.logprobs.len() != t.delivered.len() {
        // Made by this server from what it relayed: not the node's doing.
        return Err(Err(format!("{} log probabilities kept for {} tokens", t.logprobs.len(), t.delivered.len())));
    }
    match logprob_check::worst_deviation(model, prompt, t.prefix.len(), &t.delivered, &t.params, &t.logprobs) {
        Ok(Ok(worst)) => match logprob_check::judge(worst, format, scale) {
            Some(reason) => Err(Ok(reason)),
            None => Ok(Some(format!("log probabilities within {worst:.3}"))),
        },
        Ok(Err(reason)) => Err(Ok(reason)),
        Err(e) => Err(Err(format!("verifier error on log probabilities: {e}"))),
    }
}

impl Handler<VerifyDelivered> for Verifier {
    type Result = ();

    /// Checks a failed node's delivered tokens and reports the verdict (a panic is
    /// reported unverifiable, and the thread goes on).
    fn handle(&mut self, VerifyDelivered { check: t, report }: VerifyDelivered, _: &mut Self::Context) {
        let started = std::time::Instant::now();
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.check_delivered(&t)));
        let (outcome, detail, evidence) = checked
            .unwrap_or_else(|_| (Outcome::Unverifiable, "the verifier failed on these tokens: a panic".into(), None));
        let ms = started.elapsed().as_millis() as u64;
        let tokens = t.delivered.len();
        match outcome {
            Outcome::Failed => {
                tracing::warn!(task = %t.task, node = %t.node, tokens, ms, %detail, "delivered tokens REJECTED")
            }
            _ => tracing::info!(task = %t.task, node = %t.node, tokens, ms, outcome = outcome.as_str(), %detail,
                "a failed node's delivered tokens checked"),
        }
        let evidence = evidence.map(std::sync::Arc::new);
        report.do_send(DeliveryChecked { task: t.task, node: t.node, tokens, outcome, detail, evidence });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The load counts exactly the slots alive: one per task in the pool, released when
    /// the task is dropped (checked, or refused by a full pool).
    #[test]
    fn the_pool_load_counts_live_slots_and_returns_to_zero() {
        let load = PoolLoad::default();
        let (a, b) = (load.enter(), load.enter());
        assert_eq!(load.get(), 2);
        drop(a);
        assert_eq!(load.get(), 1);
        let shared = load.clone();
        drop(b);
        assert_eq!((load.get(), shared.get()), (0, 0));
    }

    /// The rejected-proof directory keeps the newest files and drops the oldest.
    #[test]
    fn pruning_keeps_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = std::time::SystemTime::now() - std::time::Duration::from_secs(100);
        for i in 0..5u64 {
            let path = dir.path().join(format!("{i}.json"));
            std::fs::write(&path, b"{}").unwrap();
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(t0 + std::time::Duration::from_secs(i)).unwrap();
        }
        prune_oldest(dir.path(), 2).unwrap();
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["3.json", "4.json"]);
        prune_oldest(dir.path(), 2).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
