//! `ludus distill`: trains a smaller Llama student on a teacher (see
//! [`crate::inference::distill`]), with a progress bar, checkpoints and a held-out report.

use std::path::PathBuf;

use clap::Args;

use crate::inference::config::LlamaConfig;
use crate::inference::distill::{self, DistillConfig, Run, RunDir};
use crate::inference::{DeviceChoice, Model};

#[derive(Debug, Args)]
pub struct DistillArgs {
    /// The teacher: a GGUF model file (its tokenizer is copied into the student).
    #[arg(long)]
    pub teacher: PathBuf,
    /// The student's shape: a Hugging Face style config.json (hidden_size,
    /// intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
    /// vocab_size equal to the teacher's, max_position_embeddings, ...).
    #[arg(long)]
    pub student_config: PathBuf,
    /// Training text, one prompt per line (blank lines skipped).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Output directory: student.gguf, optimizer.gguf, state.json, report.json. A run
    /// started again with the same directory resumes from its last checkpoint.
    #[arg(long)]
    pub out: PathBuf,
    /// Total optimizer steps (one prompt each).
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Softmax temperature for both models (higher = softer targets).
    #[arg(long, default_value_t = 2.0)]
    pub temperature: f64,
    /// Weight of the plain next-token loss added to the KL (0 = KL only).
    #[arg(long, default_value_t = 0.0)]
    pub next_token_weight: f64,
    /// Longest training sequence in tokens.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Prompts kept out of training for the report (taken from the end of the file).
    #[arg(long, default_value_t = 8)]
    pub held_out: usize,
    /// Save a checkpoint every N steps (0 = only at the end).
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
    /// Seed of the student's initialization.
    #[arg(long, default_value_t = 7)]
    pub seed: i64,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

pub fn run(args: DistillArgs) -> anyhow::Result<()> {
    let device = args.device.resolve()?;
    let teacher = Model::load(&args.teacher, device, Some(tch::Kind::Float))?;
    let student_config = LlamaConfig::from_hf_json(&args.student_config)?;
    if student_config.family != crate::inference::config::Family::Llama {
        anyhow::bail!(
            "{}: the student is a {} model; students are built and saved as Llama-architecture \
             models (model_type `llama`). A teacher of any family works: the student takes its tokenizer",
            args.student_config.display(),
            student_config.family
        );
    }
    let text = std::fs::read_to_string(&args.prompts)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.prompts.display()))?;
    let mut prompts = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        prompts.push(teacher.tokenizer.encode(line, true)?);
    }
    if prompts.len() <= args.held_out {
        anyhow::bail!(
            "{} has {} prompts; need more than --held-out {}",
            args.prompts.display(),
            prompts.len(),
            args.held_out
        );
    }
    let held_out = prompts.split_off(prompts.len() - args.held_out);
    let config = DistillConfig {
        steps: args.steps,
        learning_rate: args.lr,
        temperature: args.temperature,
        next_token_weight: args.next_token_weight,
        max_tokens: args.max_tokens.max(2),
        seed: args.seed,
    };
    let bar = super::progress::bar("distilling");
    let report = distill::run(
        Run {
            teacher: &teacher,
            student_config,
            train: prompts,
            held_out,
            out: RunDir(args.out.clone()),
            config,
            device,
            checkpoint_every: args.checkpoint_every,
        },
        &mut |step, steps, loss| {
            bar.set_length(steps as u64);
            bar.set_position(step as u64);
            bar.set_message(format!("distilling (loss {loss:.3})"));
        },
    )?;
    bar.finish_and_clear();
    eprintln!(
        "held-out KL to the teacher {:.4} -> {:.4}, greedy agreement {:.3} -> {:.3}; student in {}",
        report.before.kl_to_teacher,
        report.after.kl_to_teacher,
        report.before.greedy_agreement,
        report.after.greedy_agreement,
        report.student.display()
    );
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
