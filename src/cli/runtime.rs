//! Starting an engine from the command line's runtime flags ([`RuntimeArgs`]) and the
//! settings' `[engine]` section: device, dtype, quantization, threads, a bundle's key.

use super::{progress, RuntimeArgs};
use crate::inference::model::parse_dtype;
use crate::inference::tune::{self, Plan, Tunable, TuneCache, TuneKey, Tuning};
use crate::inference::{int4_prefill, Quantization};
use crate::inference::{Engine, Model};
use crate::settings::Settings;

/// `auto` picks the device's default ([`Quantization::default_for`]).
pub fn resolve_quantization(choice: &str, device: tch::Device) -> anyhow::Result<Quantization> {
    match choice {
        "auto" | "" => Ok(Quantization::default_for(device)),
        other => other.parse().map_err(|e: String| anyhow::anyhow!("{e}; or auto")),
    }
}

impl RuntimeArgs {
    /// No flag given: everything from the settings.
    pub fn unset() -> Self {
        Self {
            device: None,
            dtype: None,
            quantize: None,
            threads: None,
            model_key: None,
            single_sequence_threads: None,
            draft: None,
            draft_model: None,
            draft_tokens: None,
        }
    }

    /// Loads a model and starts an engine with the settings' engine section.
    pub fn start_engine(
        &self,
        settings: &Settings,
        path: &std::path::Path,
        max_batch: Option<usize>,
    ) -> anyhow::Result<Engine> {
        let key = match &self.model_key {
            Some(file) => Some(crate::inference::protect::read_key_file(file)?),
            None => None,
        };
        self.start_engine_with_key(settings, path, max_batch, key)
    }

    /// Like [`Self::start_engine`], with a protected bundle's key given directly (nodes
    /// receive it from the distributor and never store it). Settings left `auto` are
    /// tuned at start-up ([`crate::inference::tune`]) unless `engine.tune` is off.
    pub fn start_engine_with_key(
        &self,
        settings: &Settings,
        path: &std::path::Path,
        max_batch: Option<usize>,
        key: Option<[u8; 32]>,
    ) -> anyhow::Result<Engine> {
        let threads = self.threads.unwrap_or(settings.engine.threads);
        if threads > 0 {
            tch::set_num_threads(threads as i32);
        }
        let device = self.device(settings)?;
        let dtype = self.dtype(settings)?;
        if let Some(product) =
            int4_prefill::Product::parse(&settings.engine.int4_prefill).map_err(anyhow::Error::msg)?
        {
            int4_prefill::prefer(product);
        }
        crate::inference::fused_decode::set_enabled(
            crate::inference::fused_decode::parse_setting(&settings.engine.fused_decode).map_err(anyhow::Error::msg)?,
        );
        let mut load = |quantization| load_model(path, device, dtype, quantization, key.as_ref());
        let single = self.single_sequence_threads.unwrap_or(settings.engine.single_sequence_threads);
        let tuning = match self.tuning_plan(settings, device, threads)? {
            Some(plan) => tuned(settings, path, device, dtype, &plan, &mut load),
            None => None,
        };
        let quantization = match &tuning {
            Some(t) => t.quantization,
            None => self.quantization(settings, device)?,
        };
        let model = load(quantization)?;
        let mut config = settings.engine_config();
        config.threads = threads;
        if let Some(draft) = self.draft {
            config.speculative.draft = draft;
        }
        if let Some(k) = self.draft_tokens {
            config.speculative.k = k;
        }
        if let Some(path) = &self.draft_model {
            config.draft_model = Some(path.clone());
        }
        config.single_sequence_threads = match (single, &tuning) {
            (Tunable::Fixed(n), _) => n,
            (Tunable::Auto, Some(t)) => t.single_sequence_threads,
            (Tunable::Auto, None) => 1,
        };
        if let Some(b) = max_batch {
            config.max_batch = b;
        }
        let fused = model.llama.fused_decode().map_err(str::to_string);
        let mut engine = Engine::start(model, config)?;
        let mut chosen: Vec<String> = tuning.map(|t| t.reason).into_iter().collect();
        if quantization == Quantization::Int4 && !device.is_cuda() && int4_prefill::layout().is_some() {
            // Decided now (a few tens of ms), not on the first prompt, and said with the rest.
            let (product, why) = int4_prefill::choice();
            chosen.push(format!("int4 prefill in {product} ({why})"));
        }
        match fused {
            Ok(()) => chosen.push("fused decode for a lone sequence".into()),
            Err(why) => tracing::debug!(%why, "a lone sequence decodes through libtorch"),
        }
        engine.tuning = (!chosen.is_empty()).then(|| chosen.join("; "));
        Ok(engine)
    }

    /// `ludus model tune`: measures now (whatever is remembered), remembers, prints.
    pub fn tune(&self, settings: &Settings, path: &std::path::Path) -> anyhow::Result<()> {
        let threads = self.threads.unwrap_or(settings.engine.threads);
        if threads > 0 {
            tch::set_num_threads(threads as i32);
        }
        let (device, dtype) = (self.device(settings)?, self.dtype(settings)?);
        let forced = Settings {
            engine: crate::settings::EngineSettings { tune: true, ..settings.engine.clone() },
            ..settings.clone()
        };
        let Some(plan) = self.tuning_plan(&forced, device, threads)? else {
            anyhow::bail!(
                "nothing to tune: on CUDA, or with one format to choose from (--quantize, or \
                 engine.tune_formats) and --single-sequence-threads given, every choice is made"
            );
        };
        let key = match &self.model_key {
            Some(file) => Some(crate::inference::protect::read_key_file(file)?),
            None => None,
        };
        let cache = tune_cache(settings);
        let tune_key = TuneKey::new(path, device, dtype, &plan)?;
        let _lock = cache.lock()?;
        let tuning =
            tune::measure(&plan, &mut |quantization| load_model(path, device, dtype, quantization, key.as_ref()))?;
        cache.store(&tune_key, &tuning)?;
        eprintln!("{}", tuning.reason);
        let report = serde_json::json!({"tuning": tuning, "cache": cache.dir, "cpu": tune::cpu_model()});
        println!("{}", serde_json::to_string_pretty(&report)?);
        Ok(())
    }

    fn device(&self, settings: &Settings) -> anyhow::Result<tch::Device> {
        let device = match self.device {
            Some(d) => d,
            None => settings.engine.device.parse().map_err(anyhow::Error::msg)?,
        };
        device.resolve().map_err(Into::into)
    }

    fn dtype(&self, settings: &Settings) -> anyhow::Result<Option<tch::Kind>> {
        Ok(match (self.dtype, settings.engine.dtype.as_str()) {
            (Some(k), _) => Some(k),
            (None, "") => None,
            (None, s) => Some(parse_dtype(s).map_err(anyhow::Error::msg)?),
        })
    }

    /// The format asked for, `auto` untuned.
    fn quantization(&self, settings: &Settings, device: tch::Device) -> anyhow::Result<Quantization> {
        resolve_quantization(self.quantize.as_deref().unwrap_or(&settings.engine.quantize), device)
    }

    /// What start-up tuning should measure: the formats open to choose from (all that meet
    /// the bar under `auto`, else the one asked for) and the thread counts for a sequence
    /// alone. None when tuning is off, on CUDA, or when there is nothing to choose.
    pub fn tuning_plan(
        &self,
        settings: &Settings,
        device: tch::Device,
        threads: usize,
    ) -> anyhow::Result<Option<Plan>> {
        if !settings.engine.tune || device.is_cuda() {
            return Ok(None);
        }
        let threads = if threads > 0 { threads } else { tch::get_num_threads().max(1) as usize };
        let formats = match self.quantize.as_deref().unwrap_or(&settings.engine.quantize) {
            "auto" | "" => {
                let allowed: Vec<Quantization> = settings
                    .engine
                    .tune_formats
                    .iter()
                    .map(|f| f.parse().map_err(|e: String| anyhow::anyhow!("engine.tune_formats: {e}")))
                    .collect::<anyhow::Result<_>>()?;
                tune::candidates(device, &allowed)
            }
            _ => vec![self.quantization(settings, device)?],
        };
        let single_sequence_threads =
            match self.single_sequence_threads.unwrap_or(settings.engine.single_sequence_threads) {
                Tunable::Auto => tune::thread_candidates(threads),
                Tunable::Fixed(0) => vec![threads],
                Tunable::Fixed(n) => vec![n],
            };
        let plan = Plan { formats, single_sequence_threads, threads };
        Ok((plan.formats.len() > 1 || plan.single_sequence_threads.len() > 1).then_some(plan))
    }
}

/// The tuning for this machine and model: remembered, or measured now (and remembered).
/// None leaves the untuned defaults: tuning that cannot run (a key, a lock, a measurement
/// that fails) is logged and never stops a node from starting.
fn tuned(
    settings: &Settings,
    path: &std::path::Path,
    device: tch::Device,
    dtype: Option<tch::Kind>,
    plan: &Plan,
    load: &mut dyn FnMut(Quantization) -> crate::inference::error::Result<Model>,
) -> Option<Tuning> {
    let untuned = |what: &str, e: &dyn std::fmt::Display| {
        tracing::warn!(error = %e, "tuning: {what}; starting with the untuned defaults");
    };
    let cache = tune_cache(settings);
    let key =
        TuneKey::new(path, device, dtype, plan).map_err(|e| untuned("cannot identify the model file", &e)).ok()?;
    // Processes starting together measure one at a time; the later ones read the result.
    let _lock = cache.lock().map_err(|e| untuned("cannot lock the tuning cache", &e)).ok()?;
    if let Some(tuning) = cache.load(&key) {
        tracing::info!(reason = %tuning.reason, "tuning: remembered for this machine and model");
        return Some(tuning);
    }
    tracing::info!(formats = ?plan.formats, threads = ?plan.single_sequence_threads, "tuning: measuring, once for this machine and model");
    let tuning = tune::measure(plan, load).map_err(|e| untuned("the measurement failed", &e)).ok()?;
    tracing::info!(reason = %tuning.reason, secs = tuning.seconds, "tuning: chosen");
    if let Err(e) = cache.store(&key, &tuning) {
        tracing::warn!(error = %e, "tuning: cannot remember the result; it will be measured again");
    }
    Some(tuning)
}

/// The settings' tuning cache (`engine.tune_dir`, or the user's cache directory).
pub fn tune_cache(settings: &Settings) -> TuneCache {
    let dir = &settings.engine.tune_dir;
    TuneCache::at((!dir.as_os_str().is_empty()).then_some(dir.as_path()))
}

/// Loads `path` in one format, with a progress bar on a terminal and a log line.
fn load_model(
    path: &std::path::Path,
    device: tch::Device,
    dtype: Option<tch::Kind>,
    quantization: Quantization,
    key: Option<&[u8; 32]>,
) -> crate::inference::error::Result<Model> {
    let started = std::time::Instant::now();
    let bar = progress::bar(&format!("loading ({quantization})"));
    let model = Model::load_with_progress(path, device, dtype, quantization, key, &mut progress::callback(&bar))?;
    bar.finish_and_clear();
    tracing::info!(
        model = %model.name, ?device, kind = ?model.llama.kind, %quantization,
        weight_mib = model.llama.model_bytes() / (1 << 20), secs = started.elapsed().as_secs_f32(),
        "model loaded"
    );
    Ok(model)
}
