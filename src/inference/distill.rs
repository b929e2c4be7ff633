//! Knowledge distillation: trains a smaller Llama student on a teacher's temperature-
//! softened next-token distributions (KL divergence, optionally plus the plain next-token
//! loss), with tch autograd and Adam, on CPU or CUDA. The student is saved as a GGUF file
//! with the teacher's tokenizer, which the engine loads like any model; checkpoints hold
//! the optimizer state too, so a run resumes where it stopped.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::config::LlamaConfig;
use super::error::{InferError, Result};
use super::eval;
use super::gguf::{write_file, F32Tensor, GgufFile, MetaValue};
use super::kv_cache::KvCache;
use super::llama::{Llama, LogitsFor};
use super::model::Model;
use super::weights::WeightSource;

/// Training settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DistillConfig {
    pub steps: usize,
    pub learning_rate: f64,
    /// Softmax temperature applied to both models' logits.
    pub temperature: f64,
    /// Weight of the plain next-token loss added to the KL term (0 = KL only).
    pub next_token_weight: f64,
    /// Longest training sequence, in tokens.
    pub max_tokens: usize,
    pub seed: i64,
}

/// Where a run stands, saved beside each checkpoint.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunState {
    pub step: usize,
    pub config: DistillConfig,
    pub losses: Vec<f64>,
}

/// KL to the teacher, greedy agreement and perplexity on held-out text.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct HeldOut {
    pub kl_to_teacher: f64,
    pub greedy_agreement: f64,
    pub perplexity: f64,
}

/// The student's parameters by GGUF tensor name, each a leaf that requires grad.
pub struct Student {
    pub config: LlamaConfig,
    pub params: BTreeMap<String, Tensor>,
}

fn tensor_names(c: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (d, f, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let mut out = vec![("token_embd.weight".to_string(), vec![c.vocab_size, d])];
    for i in 0..c.num_layers {
        let n = |leaf: &str| format!("blk.{i}.{leaf}.weight");
        out.push((n("attn_norm"), vec![d]));
        out.push((n("attn_q"), vec![c.num_heads * hd, d]));
        out.push((n("attn_k"), vec![c.num_kv_heads * hd, d]));
        out.push((n("attn_v"), vec![c.num_kv_heads * hd, d]));
        out.push((n("attn_output"), vec![d, c.num_heads * hd]));
        out.push((n("ffn_norm"), vec![d]));
        out.push((n("ffn_gate"), vec![f, d]));
        out.push((n("ffn_up"), vec![f, d]));
        out.push((n("ffn_down"), vec![d, f]));
    }
    out.push(("output_norm.weight".to_string(), vec![d]));
    if !c.tie_word_embeddings {
        out.push(("output.weight".to_string(), vec![c.vocab_size, d]));
    }
    out
}

impl Student {
    /// A fresh student: norms at 1, matrices from N(0, 0.02²), seeded.
    pub fn init(config: LlamaConfig, seed: i64, device: Device) -> Result<Self> {
        tch::manual_seed(seed);
        let mut params = BTreeMap::new();
        for (name, shape) in tensor_names(&config) {
            let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            let t = if shape.len() == 1 {
                Tensor::f_ones(&dims, (Kind::Float, device))?
            } else {
                Tensor::f_randn(&dims, (Kind::Float, device))?.f_mul_scalar(0.02)?
            };
            params.insert(name, t.set_requires_grad(true));
        }
        Ok(Self { config, params })
    }

    /// Loads a student checkpoint (a GGUF this module wrote).
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let source = WeightSource::open(path)?;
        let config = source.config()?;
        let mut params = BTreeMap::new();
        for (name, shape) in tensor_names(&config) {
            let t = source.tensor(&name, &shape, &config)?.f_to_device(device)?;
            params.insert(name, t.set_requires_grad(true));
        }
        Ok(Self { config, params })
    }

    /// A `Llama` over the current parameters (rebuilt each step: the fused projections
    /// are part of that step's graph).
    fn model(&self, device: Device) -> Result<Llama> {
        let tensors: HashMap<String, Tensor> =
            self.params.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
        let source = WeightSource::Memory { path: PathBuf::from("student"), config: self.config.clone(), tensors };
        Llama::load(&source, device, Kind::Float)
    }

    /// Writes the student as GGUF: `llama.*` hyper-parameters, the teacher's tokenizer
    /// metadata, f32 tensors (Q and K permuted the way llama.cpp stores them).
    pub fn save(&self, path: &Path, tokenizer: &BTreeMap<String, MetaValue>) -> Result<()> {
        let c = &self.config;
        let mut meta = tokenizer.clone();
        let u = |v: usize| MetaValue::U32(v as u32);
        meta.insert("general.architecture".into(), MetaValue::Str("llama".into()));
        meta.insert("general.name".into(), MetaValue::Str("ludus-distilled-student".into()));
        meta.insert("llama.block_count".into(), u(c.num_layers));
        meta.insert("llama.context_length".into(), u(c.max_position_embeddings));
        meta.insert("llama.embedding_length".into(), u(c.hidden_size));
        meta.insert("llama.feed_forward_length".into(), u(c.intermediate_size));
        meta.insert("llama.attention.head_count".into(), u(c.num_heads));
        meta.insert("llama.attention.head_count_kv".into(), u(c.num_kv_heads));
        meta.insert("llama.attention.key_length".into(), u(c.head_dim));
        meta.insert("llama.vocab_size".into(), u(c.vocab_size));
        meta.insert("llama.attention.layer_norm_rms_epsilon".into(), MetaValue::F32(c.rms_norm_eps as f32));
        meta.insert("llama.rope.freq_base".into(), MetaValue::F32(c.rope_theta as f32));
        let mut tensors: Vec<F32Tensor> = Vec::new();
        for (name, shape) in tensor_names(c) {
            let t = self.params[&name].f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?;
            let mut values = Vec::<f32>::try_from(&t.f_flatten(0, -1)?)?;
            if name.ends_with("attn_q.weight") {
                values = super::tiny_model::permute_rotary(&values, shape[0], shape[1], c.num_heads);
            } else if name.ends_with("attn_k.weight") {
                values = super::tiny_model::permute_rotary(&values, shape[0], shape[1], c.num_kv_heads);
            }
            tensors.push((name, shape, values));
        }
        let tmp = path.with_extension("gguf.part");
        write_file(&tmp, &meta, &tensors)?;
        std::fs::rename(&tmp, path).map_err(|e| InferError::io(path, e))
    }
}

/// Adam, over the student's parameters by name.
pub struct Adam {
    lr: f64,
    step: i64,
    moments: BTreeMap<String, (Tensor, Tensor)>,
}

impl Adam {
    pub fn new(lr: f64, student: &Student) -> Result<Self> {
        let mut moments = BTreeMap::new();
        for (name, p) in &student.params {
            moments.insert(name.clone(), (p.f_zeros_like()?, p.f_zeros_like()?));
        }
        Ok(Self { lr, step: 0, moments })
    }

    /// One update from the gradients in `student`, which it then clears.
    pub fn step(&mut self, student: &mut Student) -> Result<()> {
        let (b1, b2, eps) = (0.9, 0.999, 1e-8);
        self.step += 1;
        let c1 = 1.0 - f64::powi(b1, self.step as i32);
        let c2 = 1.0 - f64::powi(b2, self.step as i32);
        let _guard = tch::no_grad_guard();
        for (name, p) in student.params.iter_mut() {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let (m, v) = self.moments.get_mut(name).expect("a moment per parameter");
            *m = m.f_mul_scalar(b1)?.f_add(&g.f_mul_scalar(1.0 - b1)?)?;
            *v = v.f_mul_scalar(b2)?.f_add(&g.f_square()?.f_mul_scalar(1.0 - b2)?)?;
            let update = m.f_div_scalar(c1)?.f_div(&v.f_div_scalar(c2)?.f_sqrt()?.f_add_scalar(eps)?)?;
            let _ = p.f_sub_(&update.f_mul_scalar(self.lr)?)?;
            let mut g = g;
            let _ = g.f_zero_()?;
        }
        Ok(())
    }

    /// The moments as tensors named `m.<param>` / `v.<param>`, plus the step count.
    fn state(&self) -> Result<Vec<F32Tensor>> {
        let mut out = Vec::new();
        for (name, (m, v)) in &self.moments {
            for (prefix, t) in [("m", m), ("v", v)] {
                let t = t.f_to_device(Device::Cpu)?.f_contiguous()?;
                let shape = t.size().iter().map(|&d| d as usize).collect();
                out.push((format!("{prefix}.{name}"), shape, Vec::<f32>::try_from(&t.f_flatten(0, -1)?)?));
            }
        }
        out.push(("adam.step".into(), vec![1], vec![self.step as f32]));
        Ok(out)
    }

    fn restore(&mut self, file: &GgufFile, device: Device) -> Result<()> {
        for (name, (m, v)) in self.moments.iter_mut() {
            for (prefix, slot) in [("m", m), ("v", v)] {
                let (values, shape) = file.tensor_f32(&format!("{prefix}.{name}"))?;
                let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
                *slot = Tensor::f_from_slice(&values)?.f_reshape(&dims)?.f_to_device(device)?;
            }
        }
        self.step = file.tensor_f32("adam.step")?.0.first().copied().unwrap_or(0.0) as i64;
        Ok(())
    }
}

/// The distillation loss on one sequence: T² · KL(teacher_T ‖ student_T) per position,
/// plus `next_token_weight` × the student's next-token cross-entropy.
fn loss(student: &Llama, teacher_log_probs_t: &Tensor, tokens: &[u32], cfg: &DistillConfig) -> Result<Tensor> {
    let mut cache = KvCache::new(&student.config, 1, tokens.len(), student.device, Kind::Float)?;
    let logits = student.prefill(&mut cache, 0, tokens, 0, LogitsFor::All)?.logits; // [n, vocab]
    let t = cfg.temperature;
    let student_log_t = logits.f_div_scalar(t)?.f_log_softmax(-1, Kind::Float)?;
    let teacher_p = teacher_log_probs_t.f_exp()?;
    let kl = teacher_p.f_mul(&teacher_log_probs_t.f_sub(&student_log_t)?)?.f_sum_dim_intlist(-1, false, Kind::Float)?;
    let mut total = kl.f_mean(Kind::Float)?.f_mul_scalar(t * t)?;
    if cfg.next_token_weight > 0.0 && tokens.len() > 1 {
        let n = tokens.len() as i64;
        let targets: Vec<i64> = tokens[1..].iter().map(|&x| x as i64).collect();
        let targets = Tensor::f_from_slice(&targets)?.f_to_device(student.device)?;
        let ce = logits.f_narrow(0, 0, n - 1)?.cross_entropy_for_logits(&targets);
        total = total.f_add(&ce.f_mul_scalar(cfg.next_token_weight)?)?;
    }
    Ok(total)
}

/// The teacher's log-probabilities at temperature `t`, without a graph.
fn teacher_targets(teacher: &Llama, tokens: &[u32], t: f64, device: Device) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let mut cache = KvCache::new(&teacher.config, 1, tokens.len(), teacher.device, teacher.kind)?;
    let logits = teacher.prefill(&mut cache, 0, tokens, 0, LogitsFor::All)?.logits;
    Ok(logits.f_to_kind(Kind::Float)?.f_div_scalar(t)?.f_log_softmax(-1, Kind::Float)?.f_to_device(device)?)
}

/// Held-out quality of `student` against `teacher` on `texts`.
pub fn held_out(teacher: &Model, student: &Student, texts: &[Vec<u32>], device: Device) -> Result<HeldOut> {
    let _guard = tch::no_grad_guard();
    let model = student.model(device)?;
    let (mut kl, mut agree, mut n, mut nll_tokens, mut log_ppl) = (0.0, 0.0, 0usize, 0usize, 0.0);
    for tokens in texts.iter().filter(|t| t.len() >= 2) {
        let a = eval::agreement(&teacher.llama, &model, tokens, tokens.len())?;
        kl += a.kl * a.positions as f64;
        agree += a.greedy * a.positions as f64;
        n += a.positions;
        let ppl = eval::perplexity(&model, tokens, tokens.len())?;
        log_ppl += ppl.ln() * (tokens.len() - 1) as f64;
        nll_tokens += tokens.len() - 1;
    }
    if n == 0 {
        return Err(InferError::InvalidRequest("no held-out prompt has two tokens".into()));
    }
    Ok(HeldOut {
        kl_to_teacher: kl / n as f64,
        greedy_agreement: agree / n as f64,
        perplexity: (log_ppl / nll_tokens as f64).exp(),
    })
}

/// Paths inside a run's output directory.
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn student(&self) -> PathBuf {
        self.0.join("student.gguf")
    }
    pub fn optimizer(&self) -> PathBuf {
        self.0.join("optimizer.gguf")
    }
    pub fn state(&self) -> PathBuf {
        self.0.join("state.json")
    }
    pub fn report(&self) -> PathBuf {
        self.0.join("report.json")
    }
}

/// Everything a run needs.
pub struct Run<'a> {
    pub teacher: &'a Model,
    pub student_config: LlamaConfig,
    pub train: Vec<Vec<u32>>,
    pub held_out: Vec<Vec<u32>>,
    pub out: RunDir,
    pub config: DistillConfig,
    pub device: Device,
    pub checkpoint_every: usize,
}

/// What a finished run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub resumed_from_step: usize,
    pub steps: usize,
    pub before: HeldOut,
    pub after: HeldOut,
    pub final_loss: f64,
    pub student_parameters: usize,
    pub teacher_parameters: usize,
    pub student: PathBuf,
}

/// Trains (resuming from the output directory's checkpoint when there is one), saves
/// checkpoints every `checkpoint_every` steps and at the end, and writes the report.
/// `progress(step, steps, loss)` is called after every step.
pub fn run(r: Run<'_>, progress: &mut dyn FnMut(usize, usize, f64)) -> Result<Report> {
    std::fs::create_dir_all(&r.out.0).map_err(|e| InferError::io(&r.out.0, e))?;
    if r.train.is_empty() {
        return Err(InferError::InvalidRequest("no training prompts".into()));
    }
    if r.student_config.vocab_size != r.teacher.llama.config.vocab_size {
        return Err(InferError::InvalidRequest(format!(
            "the student's vocab_size ({}) must equal the teacher's ({}): they share the tokenizer",
            r.student_config.vocab_size, r.teacher.llama.config.vocab_size
        )));
    }
    let tokenizer_meta = match WeightSource::open(&r.teacher.path)? {
        WeightSource::Gguf(g) => g.metadata.into_iter().filter(|(k, _)| k.starts_with("tokenizer.")).collect(),
        _ => {
            return Err(InferError::InvalidRequest("the teacher must be a GGUF file (its tokenizer is copied)".into()))
        }
    };
    let (mut student, mut adam, mut state) = if r.out.state().exists() {
        let text = std::fs::read_to_string(r.out.state()).map_err(|e| InferError::io(r.out.state(), e))?;
        let state: RunState =
            serde_json::from_str(&text).map_err(|e| InferError::format(r.out.state(), e.to_string()))?;
        let student = Student::load(&r.out.student(), r.device)?;
        let shape = |c: &LlamaConfig| {
            (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim)
        };
        if shape(&student.config) != shape(&r.student_config) {
            return Err(InferError::InvalidRequest(format!(
                "{} holds a run of another student shape; use another --out",
                r.out.0.display()
            )));
        }
        let mut adam = Adam::new(r.config.learning_rate, &student)?;
        adam.restore(&GgufFile::open(r.out.optimizer())?, r.device)?;
        (student, adam, state)
    } else {
        let student = Student::init(r.student_config.clone(), r.config.seed, r.device)?;
        let adam = Adam::new(r.config.learning_rate, &student)?;
        (student, adam, RunState { step: 0, config: r.config.clone(), losses: Vec::new() })
    };
    let resumed_from_step = state.step;
    let before = if resumed_from_step == 0 {
        held_out(r.teacher, &student, &r.held_out, r.device)?
    } else {
        let path = r.out.0.join("before.json");
        let text = std::fs::read_to_string(&path).map_err(|e| InferError::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| InferError::format(&path, e.to_string()))?
    };
    if resumed_from_step == 0 {
        let json = serde_json::to_vec_pretty(&before).unwrap_or_default();
        std::fs::write(r.out.0.join("before.json"), json)
            .map_err(|e| InferError::io(r.out.0.join("before.json"), e))?;
    }
    let checkpoint = |student: &Student, adam: &Adam, state: &RunState| -> Result<()> {
        student.save(&r.out.student(), &tokenizer_meta)?;
        let tmp = r.out.optimizer().with_extension("gguf.part");
        write_file(&tmp, &BTreeMap::new(), &adam.state()?)?;
        std::fs::rename(&tmp, r.out.optimizer()).map_err(|e| InferError::io(r.out.optimizer(), e))?;
        let json = serde_json::to_vec_pretty(state).unwrap_or_default();
        std::fs::write(r.out.state(), json).map_err(|e| InferError::io(r.out.state(), e))
    };
    while state.step < r.config.steps {
        let tokens = &r.train[state.step % r.train.len()];
        let tokens = &tokens[..tokens.len().min(r.config.max_tokens)];
        if tokens.len() < 2 {
            state.step += 1;
            continue;
        }
        let target = teacher_targets(&r.teacher.llama, tokens, r.config.temperature, r.device)?;
        let model = student.model(r.device)?;
        let l = loss(&model, &target, tokens, &r.config)?;
        l.backward();
        drop(model);
        adam.step(&mut student)?;
        let value = l.f_double_value(&[])?;
        state.losses.push(value);
        state.step += 1;
        progress(state.step, r.config.steps, value);
        if r.checkpoint_every > 0 && state.step % r.checkpoint_every == 0 {
            checkpoint(&student, &adam, &state)?;
        }
    }
    checkpoint(&student, &adam, &state)?;
    let after = held_out(r.teacher, &student, &r.held_out, r.device)?;
    let report = Report {
        resumed_from_step,
        steps: state.step,
        before,
        after,
        final_loss: state.losses.last().copied().unwrap_or(f64::NAN),
        student_parameters: student.config.num_parameters(),
        teacher_parameters: r.teacher.llama.config.num_parameters(),
        student: r.out.student(),
    };
    let json = serde_json::to_vec_pretty(&report).unwrap_or_default();
    std::fs::write(r.out.report(), json).map_err(|e| InferError::io(r.out.report(), e))?;
    Ok(report)
}
