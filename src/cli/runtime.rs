//! Starting an engine from the command line's runtime flags ([`RuntimeArgs`]) and the
//! settings' `[engine]` section: device, dtype, quantization, threads, a bundle's key.

use super::{progress, RuntimeArgs};
use crate::inference::model::parse_dtype;
use crate::inference::Quantization;
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
    /// receive it from the distributor and never store it).
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
        let device = match self.device {
            Some(d) => d,
            None => settings.engine.device.parse().map_err(anyhow::Error::msg)?,
        };
        let device = device.resolve()?;
        let dtype = match (self.dtype, settings.engine.dtype.as_str()) {
            (Some(k), _) => Some(k),
            (None, "") => None,
            (None, s) => Some(parse_dtype(s).map_err(anyhow::Error::msg)?),
        };
        let quantization = resolve_quantization(self.quantize.as_deref().unwrap_or(&settings.engine.quantize), device)?;
        let started = std::time::Instant::now();
        let bar = progress::bar(&format!("loading ({quantization})"));
        let model =
            Model::load_with_progress(path, device, dtype, quantization, key.as_ref(), &mut progress::callback(&bar))?;
        bar.finish_and_clear();
        tracing::info!(
            model = %model.name, ?device, kind = ?model.llama.kind, %quantization,
            weight_mib = model.llama.model_bytes() / (1 << 20), secs = started.elapsed().as_secs_f32(),
            "model loaded"
        );
        let mut config = settings.engine_config();
        config.threads = threads;
        if let Some(t) = self.single_sequence_threads {
            config.single_sequence_threads = t;
        }
        if let Some(b) = max_batch {
            config.max_batch = b;
        }
        Ok(Engine::start(model, config)?)
    }
}
