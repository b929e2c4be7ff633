//! Start-up tuning: what decodes fastest on this machine, measured in a few seconds the first
//! time a model runs here and remembered per CPU model, core count, thread setting, model
//! file and Ludus version.
//!
//! Two choices depend on the CPU more than on anything a default can know (issue 20's table:
//! one thread per sequence is right on an AMD EPYC and halves batch-1 speed on an Intel Xeon;
//! int4's kernel beats int8's on one and not the other):
//!
//! - **threads for a sequence decoded alone** ([`super::EngineConfig::single_sequence_threads`]):
//!   1, 2, 4, … up to the engine's threads, each timed at batch 1;
//! - **the storage format** when `quantize = "auto"`: among the formats that meet the quality
//!   bar on this device ([`candidates`]: int4 and int8 on CPU), the one with the best
//!   geometric mean of batch-1 and batch-8 decode rates. The bar: a proof calibration row
//!   with no honest rejection and greedy agreement with f32 of at least 0.85 on the
//!   evaluation text (docs/lightweight-models.md: int8 0.876, int4 0.968). Quality follows
//!   the format's arithmetic, not the CPU, so it is measured once there, not at each start.
//!
//! [`decide`] is a pure function of the measured rates: a larger format or more threads must
//! beat the smaller choice by [`MARGIN`] to be taken (int4 keeps memory for the KV cache,
//! fewer threads leave cores to the game). Settings given explicitly are never tuned.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::engine::{Engine, EngineConfig, Event, GenerateRequest};
use super::error::{InferError, Result};
use super::sampling::SamplingParams;
use super::{Model, Quantization};

/// How much faster a larger format, or more threads, must be to be chosen.
pub const MARGIN: f64 = 1.05;
/// Tokens timed per sequence in each measurement (after one untimed warm-up run).
const TIMED_TOKENS: usize = 16;
/// The batch whose aggregate rate stands for serving many games at once.
const WIDE_BATCH: usize = 8;
/// The prompt every measurement decodes after (short: tuning times decoding, not prefill).
const PROMPT: &str = "Once upon a time, in a village at the edge of the forest, a knight";

/// A setting given as a number or left to start-up tuning (`"auto"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tunable {
    #[default]
    Auto,
    Fixed(usize),
}

impl std::str::FromStr for Tunable {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            n => n.parse().map(Self::Fixed).map_err(|_| format!("`{s}` is neither a count nor auto")),
        }
    }
}

impl std::fmt::Display for Tunable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl<'de> Deserialize<'de> for Tunable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Tunable;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a count or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Tunable, E> {
                usize::try_from(v).map(Tunable::Fixed).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Tunable, E> {
                usize::try_from(v).map(Tunable::Fixed).map_err(|_| E::custom(format!("{v} is negative")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Tunable, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Decode rates of one format, as measured here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FormatRates {
    pub quantization: Quantization,
    /// Batch-1 tokens/s for each thread count tried.
    pub batch1: Vec<(usize, f64)>,
    /// Aggregate tokens/s of [`WIDE_BATCH`] sequences (0 when not measured).
    pub batch8: f64,
}

impl FormatRates {
    /// The fewest threads within [`MARGIN`] of the fastest batch-1 rate, and that rate.
    fn best_batch1(&self) -> (usize, f64) {
        let fastest = self.batch1.iter().map(|&(_, r)| r).fold(0.0, f64::max);
        let mut by_threads = self.batch1.clone();
        by_threads.sort_by_key(|&(t, _)| t);
        by_threads.into_iter().find(|&(_, r)| r * MARGIN >= fastest).unwrap_or((1, 0.0))
    }

    /// One figure to compare formats by: the geometric mean of batch 1 and batch 8.
    fn score(&self) -> f64 {
        let (_, b1) = self.best_batch1();
        if self.batch8 > 0.0 {
            (b1 * self.batch8).sqrt()
        } else {
            b1
        }
    }
}

/// What start-up tuning chose, and the figures it chose on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tuning {
    pub quantization: Quantization,
    pub single_sequence_threads: usize,
    /// Why, in one line (logged, shown by `ludus model inspect`, sent in heartbeats).
    pub reason: String,
    pub rates: Vec<FormatRates>,
    /// Seconds the measurement took.
    pub seconds: f64,
}

/// The formats of `allowed` that `device` runs (int8: CPU with fbgemm only), in order;
/// int4 when none is left.
pub fn candidates(device: tch::Device, allowed: &[Quantization]) -> Vec<Quantization> {
    let runs = |q: &Quantization| *q != Quantization::Int8 || (!device.is_cuda() && super::fbgemm::available());
    let mut out: Vec<Quantization> = Vec::new();
    for q in allowed.iter().filter(|q| runs(q)) {
        if !out.contains(q) {
            out.push(*q);
        }
    }
    if out.is_empty() {
        out.push(Quantization::Int4);
    }
    out
}

/// Thread counts to try for a sequence decoded alone: 1, 2, 4, … and `threads` itself.
pub fn thread_candidates(threads: usize) -> Vec<usize> {
    let mut out: Vec<usize> =
        std::iter::successors(Some(1usize), |t| Some(t * 2)).take_while(|&t| t < threads).collect();
    out.push(threads.max(1));
    out.dedup();
    out
}

/// The choice the measured `rates` call for (`rates` in [`candidates`] order, smallest
/// format first): a later format must beat the best earlier one by [`MARGIN`].
pub fn decide(rates: &[FormatRates]) -> Option<(Quantization, usize, String)> {
    let mut best = rates.iter().find(|r| r.score() > 0.0)?;
    for r in rates {
        if r.score() > best.score() * MARGIN {
            best = r;
        }
    }
    let (threads, b1) = best.best_batch1();
    let others: Vec<String> = rates
        .iter()
        .filter(|r| r.quantization != best.quantization)
        .map(|r| format!("{} {:.2}x", r.quantization, r.score() / best.score()))
        .collect();
    let mut reason = format!(
        "{} at {b1:.1} tok/s alone with {threads} thread{}",
        best.quantization,
        if threads == 1 { "" } else { "s" }
    );
    if best.batch8 > 0.0 {
        reason.push_str(&format!(", {:.1} tok/s at batch {WIDE_BATCH}", best.batch8));
    }
    if !others.is_empty() {
        reason.push_str(&format!(" (others measured relative to it: {})", others.join(", ")));
    }
    let one = best.batch1.iter().find(|&&(t, _)| t == 1).map(|&(_, r)| r);
    if let (Some(one), true) = (one, threads > 1) {
        reason.push_str(&format!("; {threads} threads decode a sequence alone {:.2}x as fast as 1", b1 / one));
    }
    Some((best.quantization, threads, reason))
}

/// When one batch of requests started and ended.
#[derive(Debug, Clone, Copy)]
pub struct BatchTiming {
    /// Milliseconds to the earliest first token.
    pub first_ms: f64,
    /// Milliseconds until the last sequence finished.
    pub total_ms: f64,
    pub generated: usize,
}

impl BatchTiming {
    /// Aggregate decode rate once every sequence had its first token.
    pub fn decode_tokens_per_s(&self, batch: usize) -> f64 {
        (self.generated.saturating_sub(batch)) as f64 / ((self.total_ms - self.first_ms).max(1e-3) / 1e3)
    }
}

/// Runs `batch` greedy requests of exactly `tokens` tokens each (or until `grammar` ends
/// them) on `engine` at once and times them.
pub fn timed_batch(
    engine: &Engine,
    prompt: &[u32],
    batch: usize,
    tokens: usize,
    grammar: Option<&Arc<str>>,
) -> Result<BatchTiming> {
    let started = Instant::now();
    let mut streams = Vec::new();
    for i in 0..batch {
        let params = SamplingParams { seed: i as u64, grammar: grammar.cloned(), ..SamplingParams::greedy() };
        // A grammar keeps the answer going by itself (its string is long).
        let min_tokens = if grammar.is_some() { 0 } else { tokens };
        let request =
            GenerateRequest { prompt: prompt.to_vec(), params, max_tokens: tokens, min_tokens, ..Default::default() };
        streams.push(engine.submit(request)?);
    }
    let (mut first_ms, mut total_ms, mut generated) = (f64::MAX, 0f64, 0usize);
    for mut rx in streams {
        while let Some(event) = rx.blocking_recv() {
            match event {
                Event::Done(done) => {
                    first_ms = first_ms.min(done.timings.time_to_first_token_ms);
                    generated += done.completion_tokens;
                    break;
                }
                Event::Error(e) | Event::Rejected(e) => return Err(InferError::Tuning(e)),
                _ => {}
            }
        }
        total_ms = total_ms.max(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(BatchTiming { first_ms, total_ms, generated })
}

/// What to measure: the formats (each loaded by `load`), the thread counts for a sequence
/// alone, and the engine's threads for batches.
pub struct Plan {
    pub formats: Vec<Quantization>,
    pub single_sequence_threads: Vec<usize>,
    pub threads: usize,
}

/// Measures every format of `plan`, one loaded at a time (a node sized for one format
/// never holds two), and decides. A format that fails to load or run is left out with a
/// warning; none measured is an error. The caller loads the chosen format.
pub fn measure(plan: &Plan, load: &mut dyn FnMut(Quantization) -> Result<Model>) -> Result<Tuning> {
    let started = Instant::now();
    let mut rates = Vec::new();
    for &q in &plan.formats {
        match load(q).and_then(|model| measure_format(model, q, plan)) {
            Ok(r) => {
                tracing::info!(quantization = %q, batch1 = ?r.batch1, batch8 = r.batch8, "tuning: measured");
                rates.push(r);
            }
            Err(e) => tracing::warn!(quantization = %q, error = %e, "tuning: this format could not be measured"),
        }
    }
    let (quantization, single_sequence_threads, reason) =
        decide(&rates).ok_or_else(|| InferError::Tuning("no format could be measured".into()))?;
    Ok(Tuning { quantization, single_sequence_threads, reason, rates, seconds: started.elapsed().as_secs_f64() })
}

/// One format's rates: batch 1 for every thread count (one short-lived engine each, over
/// the same weights), and, when there are formats to compare, the wide batch with the
/// engine's threads.
fn measure_format(mut model: Model, quantization: Quantization, plan: &Plan) -> Result<FormatRates> {
    let prompt = model.tokenizer.encode(PROMPT, false)?;
    let mut rates = FormatRates { quantization, batch1: Vec::new(), batch8: 0.0 };
    for (i, &single) in plan.single_sequence_threads.iter().enumerate() {
        let config = EngineConfig {
            max_batch: WIDE_BATCH,
            max_context: prompt.len() + TIMED_TOKENS + 8,
            prefill_chunk: prompt.len(),
            threads: plan.threads,
            single_sequence_threads: single,
            prefix_cache_bytes: 0,
            speculative: crate::inference::Speculation::OFF,
            draft_model: None,
        };
        let engine = Engine::start(model, config)?;
        let run = |batch| timed_batch(&engine, &prompt, batch, TIMED_TOKENS, None);
        // The first run is untimed (its steps allocate and pick kernels); of the two timed
        // ones the faster counts, as the one less disturbed by whatever else ran.
        let rate = |batch| -> Result<f64> {
            let (a, b) = (run(batch)?, run(batch)?);
            Ok(a.decode_tokens_per_s(batch).max(b.decode_tokens_per_s(batch)))
        };
        let measured = run(1).and_then(|_| {
            let one = rate(1)?;
            let wide = if i == 0 && plan.formats.len() > 1 { Some(rate(WIDE_BATCH)?) } else { None };
            Ok((one, wide))
        });
        model = engine.into_model().ok_or(InferError::EngineStopped)?;
        let (one, wide) = measured?;
        rates.batch1.push((single, one));
        if let Some(wide) = wide {
            rates.batch8 = wide;
        }
    }
    Ok(rates)
}

/// What a tuning holds for: change any of it and the machine is measured again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuneKey {
    pub cpu: String,
    pub logical_cores: usize,
    pub threads: usize,
    pub device: String,
    /// The dtype asked for (None: the format's default).
    pub dtype: Option<String>,
    /// Variables that change which kernels libtorch picks.
    pub kernel_env: Vec<(String, String)>,
    /// The model file (or bundle directory), canonical, with its size and modification time.
    pub model: PathBuf,
    pub model_bytes: u64,
    pub model_modified_s: u64,
    /// The formats and thread counts that were open to choose from.
    pub formats: Vec<Quantization>,
    pub single_sequence_threads: Vec<usize>,
    pub ludus: String,
}

impl TuneKey {
    pub fn new(model: &Path, device: tch::Device, dtype: Option<tch::Kind>, plan: &Plan) -> Result<Self> {
        let canonical = model.canonicalize().map_err(|e| InferError::io(model, e))?;
        let (model_bytes, model_modified_s) = file_identity(&canonical)?;
        Ok(Self {
            cpu: cpu_model(),
            logical_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            threads: plan.threads,
            device: format!("{device:?}"),
            dtype: dtype.map(|k| format!("{k:?}")),
            kernel_env: ["ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"]
                .iter()
                .filter_map(|v| Some((v.to_string(), std::env::var(v).ok()?)))
                .collect(),
            model: canonical,
            model_bytes,
            model_modified_s,
            formats: plan.formats.clone(),
            single_sequence_threads: plan.single_sequence_threads.clone(),
            ludus: env!("CARGO_PKG_VERSION").to_string(),
        })
    }

    fn file_name(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("{}.json", hex::encode(&Sha256::digest(&json)[..8]))
    }
}

/// Size and modification time of a file, or of a directory's files summed (a bundle).
fn file_identity(path: &Path) -> Result<(u64, u64)> {
    let io = |e| InferError::io(path, e);
    let meta = std::fs::metadata(path).map_err(io)?;
    let modified = |m: &std::fs::Metadata| {
        m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs())
    };
    if !meta.is_dir() {
        return Ok((meta.len(), modified(&meta)));
    }
    let (mut bytes, mut latest) = (0, 0);
    for entry in std::fs::read_dir(path).map_err(io)? {
        let meta = entry.map_err(io)?.metadata().map_err(io)?;
        bytes += meta.len();
        latest = latest.max(modified(&meta));
    }
    Ok((bytes, latest))
}

/// The CPU's model name (`/proc/cpuinfo`), or the architecture where there is none.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Tunings remembered on disk, one JSON file per [`TuneKey`].
pub struct TuneCache {
    pub dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    key: TuneKey,
    tuning: Tuning,
}

impl TuneCache {
    /// `dir`, or `$XDG_CACHE_HOME/ludus/tune`, `~/.cache/ludus/tune`, `.ludus/tune`.
    pub fn at(dir: Option<&Path>) -> Self {
        let dir = dir.map(Path::to_path_buf).unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .map_or_else(|| PathBuf::from(".ludus/tune"), |c| c.join("ludus/tune"))
        });
        Self { dir }
    }

    /// The tuning stored for `key`, if any (a file for another key, or unreadable, is none).
    pub fn load(&self, key: &TuneKey) -> Option<Tuning> {
        let text = std::fs::read(self.dir.join(key.file_name())).ok()?;
        let stored: Stored = serde_json::from_slice(&text).ok()?;
        (stored.key == *key).then_some(stored.tuning)
    }

    /// Stores `tuning` for `key` (written whole to a temporary file, then renamed).
    pub fn store(&self, key: &TuneKey, tuning: &Tuning) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| InferError::io(&self.dir, e))?;
        let path = self.dir.join(key.file_name());
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let json = serde_json::to_vec_pretty(&Stored { key: key.clone(), tuning: tuning.clone() })
            .map_err(|e| InferError::Tuning(e.to_string()))?;
        std::fs::write(&tmp, json).map_err(|e| InferError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| InferError::io(&path, e))
    }

    /// Every tuning remembered for `model` (on any machine or setting), as JSON objects for
    /// `ludus model inspect`.
    pub fn for_model(&self, model: &Path) -> Vec<serde_json::Value> {
        let Ok(model) = model.canonicalize() else { return Vec::new() };
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        entries
            .filter_map(|e| std::fs::read(e.ok()?.path()).ok())
            .filter_map(|text| serde_json::from_slice::<Stored>(&text).ok())
            .filter(|s| s.key.model == model)
            .map(|s| {
                serde_json::json!({"cpu": s.key.cpu, "threads": s.key.threads, "ludus": s.key.ludus,
                    "quantization": s.tuning.quantization, "single_sequence_threads": s.tuning.single_sequence_threads,
                    "reason": s.tuning.reason, "rates": s.tuning.rates})
            })
            .collect()
    }

    /// Holds the cache's lock until dropped: processes starting together measure one at a
    /// time (measurements side by side would disturb each other), and the later ones find
    /// the first one's result.
    pub fn lock(&self) -> Result<File> {
        std::fs::create_dir_all(&self.dir).map_err(|e| InferError::io(&self.dir, e))?;
        let path = self.dir.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| InferError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                tracing::info!(lock = %path.display(), "tuning: waiting for another process's measurement");
                file.lock().map_err(|e| InferError::io(&path, e))?;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(InferError::io(&path, e)),
        }
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates(q: Quantization, batch1: &[(usize, f64)], batch8: f64) -> FormatRates {
        FormatRates { quantization: q, batch1: batch1.to_vec(), batch8 }
    }

    #[test]
    fn the_fastest_format_wins_only_by_a_margin_and_fewer_threads_win_ties() {
        use Quantization::{Int4, Int8};
        // int8 faster at both batch sizes: chosen, with the thread count that is clearly faster.
        let (q, t, reason) =
            decide(&[rates(Int4, &[(1, 40.0), (2, 45.0)], 130.0), rates(Int8, &[(1, 37.0), (2, 48.0)], 150.0)])
                .unwrap();
        assert_eq!((q, t), (Int8, 2), "{reason}");
        assert!(reason.contains("int4 0.") && reason.contains("1.30x as fast as 1"), "{reason}");
        // Within the margin, the smaller format and the fewer threads stay.
        let (q, t, _) =
            decide(&[rates(Int4, &[(1, 44.0), (2, 45.0)], 140.0), rates(Int8, &[(1, 45.0), (2, 46.0)], 142.0)])
                .unwrap();
        assert_eq!((q, t), (Int4, 1));
        // One format (threads only): no batch-8 figure to speak of.
        let (_, _, reason) = decide(&[rates(Int4, &[(1, 30.0), (2, 33.5)], 0.0)]).unwrap();
        assert_eq!(
            reason,
            "int4 at 33.5 tok/s alone with 2 threads; 2 threads decode a sequence alone 1.12x as fast as 1"
        );
        // A format that could not be measured is not chosen; none measured, no choice.
        let (q, _, _) = decide(&[rates(Int4, &[], 0.0), rates(Int8, &[(1, 10.0)], 30.0)]).unwrap();
        assert_eq!(q, Int8);
        assert!(decide(&[]).is_none());
    }

    #[test]
    fn candidates_keep_the_allowed_formats_the_device_runs() {
        use Quantization::{Int4, Int8, None as Dense};
        assert_eq!(candidates(tch::Device::Cuda(0), &[Int4, Int8]), vec![Int4]);
        assert_eq!(candidates(tch::Device::Cuda(0), &[Int8]), vec![Int4], "int4 when nothing else runs");
        assert_eq!(candidates(tch::Device::Cpu, &[Int4, Int4, Dense]), vec![Int4, Dense]);
        let int8 = if crate::inference::fbgemm::available() { vec![Int8, Int4] } else { vec![Int4] };
        assert_eq!(candidates(tch::Device::Cpu, &[Int8, Int4]), int8);
    }

    #[test]
    fn thread_candidates_double_up_to_the_engine_threads() {
        assert_eq!(thread_candidates(1), vec![1]);
        assert_eq!(thread_candidates(2), vec![1, 2]);
        assert_eq!(thread_candidates(6), vec![1, 2, 4, 6]);
        assert_eq!(thread_candidates(0), vec![1]);
    }

    #[test]
    fn tunable_reads_a_count_or_auto_and_refuses_the_rest() {
        assert_eq!("auto".parse::<Tunable>(), Ok(Tunable::Auto));
        assert_eq!("3".parse::<Tunable>(), Ok(Tunable::Fixed(3)));
        assert!("-1".parse::<Tunable>().unwrap_err().contains("neither a count nor auto"));
        let parsed: Vec<Tunable> = serde_json::from_str(r#"["auto", 2, "4"]"#).unwrap();
        assert_eq!(parsed, vec![Tunable::Auto, Tunable::Fixed(2), Tunable::Fixed(4)]);
        assert!(serde_json::from_str::<Tunable>("-2").is_err());
    }

    #[test]
    fn a_stored_tuning_is_found_only_under_its_own_key() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TuneCache::at(Some(dir.path()));
        let model = dir.path().join("m.gguf");
        std::fs::write(&model, b"weights").unwrap();
        let plan = Plan { formats: vec![Quantization::Int4], single_sequence_threads: vec![1, 2], threads: 2 };
        let key = TuneKey::new(&model, tch::Device::Cpu, None, &plan).unwrap();
        assert!(cache.load(&key).is_none());
        let (quantization, single_sequence_threads, reason) =
            decide(&[rates(Quantization::Int4, &[(1, 10.0), (2, 20.0)], 50.0)]).unwrap();
        let tuning = Tuning { quantization, single_sequence_threads, reason, rates: vec![], seconds: 1.0 };
        let _lock = cache.lock().unwrap();
        cache.store(&key, &tuning).unwrap();
        assert_eq!(cache.load(&key), Some(tuning));
        // Another model file (a new size), or another thread setting: measured again.
        std::fs::write(&model, b"other weights").unwrap();
        assert!(cache.load(&TuneKey::new(&model, tch::Device::Cpu, None, &plan).unwrap()).is_none());
        assert!(cache.load(&TuneKey { dtype: Some("BFloat16".into()), ..key.clone() }).is_none());
        assert!(cache.load(&TuneKey { threads: 4, ..key.clone() }).is_none());
    }
}
