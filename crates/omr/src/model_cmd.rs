//! `omr model forward | init | export` and `omr generate`: the model crate from the command
//! line, so anyone can compare our logits with transformers on their own inputs, make a tiny
//! model from scratch, re-export a checkpoint, or talk to a model about an image.

use crate::exit::Tag;
use crate::Result;
use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use omr_data::chat::{EncodeConfig, Encoder};
use omr_data::image::{DecodeLimits, ImageProcessor};
use omr_data::{Content, Message, Role};
use omr_model::generate::{generate, SamplingConfig};
use omr_model::pretrained::{self, SaveOptions};
use omr_model::tiny::{TinySpec, TokenIds};
use omr_model::{Ctx, Input, Qwen2VL};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum ModelCmd {
    /// Logits for inputs saved by transformers' processor (input_ids, attention_mask and
    /// optionally pixel_values, image_grid_thw) → OUT with `logits` (B, T, V) f32.
    Forward(ForwardArgs),
    /// A tiny Qwen2.5-VL with seeded weights, written as an HF folder next to a processor.
    Init(InitArgs),
    /// Loads a model folder / Hub id and writes it in transformers' layout.
    Export(ExportArgs),
}

#[derive(Args)]
pub struct ForwardArgs {
    #[arg(long)]
    model: String,
    #[arg(long)]
    inputs: PathBuf,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct InitArgs {
    /// Folder with tokenizer.json (+ processor files), e.g. runs/demo/data/processor.
    #[arg(long)]
    processor: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
pub struct ExportArgs {
    #[arg(long)]
    model: String,
    #[arg(long)]
    out: PathBuf,
    /// float32 | bfloat16 | float16
    #[arg(long, default_value = "bfloat16")]
    dtype: String,
    #[arg(long, default_value = omr_model::export::DEFAULT_MAX_SHARD)]
    max_shard_size: String,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Model folder or Hub id; it must hold the tokenizer and preprocessor files too.
    #[arg(long)]
    model: String,
    #[arg(long)]
    image: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(cmd: ModelCmd) -> Result<()> {
    match cmd {
        ModelCmd::Forward(a) => forward(a),
        ModelCmd::Init(a) => init(a),
        ModelCmd::Export(a) => export(a),
    }
}

fn forward(a: ForwardArgs) -> Result<()> {
    let dev = Device::Cpu;
    let m = pretrained::load(&a.model, DType::F32, &dev).usage()?;
    let t = candle_core::safetensors::load(&a.inputs, &dev)
        .with_context(|| format!("reading {}", a.inputs.display()))
        .usage()?;
    let rows = |k: &str| -> anyhow::Result<Vec<Vec<u32>>> {
        let x = t
            .get(k)
            .with_context(|| format!("{}: no `{k}` tensor", a.inputs.display()))?;
        Ok(x.to_dtype(DType::I64)?
            .to_vec2::<i64>()?
            .into_iter()
            .map(|r| r.into_iter().map(|v| v as u32).collect())
            .collect())
    };
    let ids = rows("input_ids").usage()?;
    let mask = match t.get("attention_mask") {
        Some(_) => rows("attention_mask").usage()?,
        None => ids.iter().map(|r| vec![1; r.len()]).collect(),
    };
    let (pixels, grids) = match (t.get("pixel_values"), t.get("image_grid_thw")) {
        (Some(p), Some(_)) => {
            let g = rows("image_grid_thw").usage()?;
            let g = g
                .iter()
                .map(|r| [r[0] as usize, r[1] as usize, r[2] as usize])
                .collect();
            (Some(p.to_dtype(DType::F32)?), g)
        }
        (None, None) => (None, Vec::new()),
        _ => {
            return Err(anyhow::anyhow!(
                "pixel_values and image_grid_thw go together"
            ))
            .usage()
        }
    };
    let input = Input::padded(ids, &mask, pixels, grids).usage()?;
    let model = Qwen2VL::new(&m.config, &m.params)?;
    let logits = model.forward(&input, &Ctx::default()).usage()?;
    let out: HashMap<String, Tensor> = [("logits".to_string(), logits.clone())].into();
    candle_core::safetensors::save(&out, &a.out)?;
    println!("wrote logits {:?} to {}", logits.dims(), a.out.display());
    Ok(())
}

fn init(a: InitArgs) -> Result<()> {
    let ids = TokenIds::from_tokenizer_dir(&a.processor).usage()?;
    let spec = TinySpec::default();
    let (cfg, params) = spec.build(&ids, a.seed, &Device::Cpu)?;
    let opts = SaveOptions {
        base_dir: Some(&a.processor),
        dtype: DType::F32,
        max_shard_bytes: u64::MAX,
    };
    pretrained::save(&a.out, &cfg, &pretrained::base_tensors(&params), &opts)?;
    if !a.out.join("generation_config.json").exists() {
        let gen = serde_json::json!({
            "bos_token_id": ids.bos,
            "eos_token_id": ids.eos,
            "pad_token_id": ids.bos,
            "transformers_version": "4.57.1"
        });
        std::fs::write(
            a.out.join("generation_config.json"),
            serde_json::to_string_pretty(&gen)? + "\n",
        )?;
    }
    let (n, _) = params.counts();
    println!(
        "tiny Qwen2.5-VL ({n} parameters, seed {}) written to {}",
        a.seed,
        a.out.display()
    );
    Ok(())
}

fn export(a: ExportArgs) -> Result<()> {
    let dtype = match a.dtype.as_str() {
        "float32" | "f32" => DType::F32,
        "bfloat16" | "bf16" => DType::BF16,
        "float16" | "f16" => DType::F16,
        other => {
            return Err(anyhow::anyhow!(
                "--dtype {other}: use float32, bfloat16 or float16"
            ))
            .usage()
        }
    };
    let max = omr_model::export::parse_size(&a.max_shard_size).usage()?;
    let m = pretrained::load(&a.model, DType::F32, &Device::Cpu).usage()?;
    let opts = SaveOptions {
        base_dir: Some(&m.dir),
        dtype,
        max_shard_bytes: max,
    };
    pretrained::save(
        &a.out,
        &m.config,
        &pretrained::base_tensors(&m.params),
        &opts,
    )?;
    println!("exported {} to {}", m.dir.display(), a.out.display());
    Ok(())
}

pub fn generate_cmd(a: GenerateArgs) -> Result<()> {
    let dev = Device::Cpu;
    let m = pretrained::load(&a.model, DType::F32, &dev).usage()?;
    let encoder = Encoder::from_model_dir(&m.dir, EncodeConfig::default())
        .with_context(|| format!("{}: tokenizer / chat template", m.dir.display()))
        .usage()?;
    let mut content = Vec::new();
    let mut pixels = None;
    let mut grids = Vec::new();
    let mut counts = Vec::new();
    if let Some(path) = &a.image {
        let proc = ImageProcessor::from_dir(&m.dir)
            .with_context(|| format!("{}: preprocessor_config.json", m.dir.display()))
            .usage()?;
        let bytes = std::fs::read(path)
            .with_context(|| path.display().to_string())
            .usage()?;
        let (p, _) = proc
            .process_bytes(&bytes, &DecodeLimits::default())
            .map_err(|r| anyhow::anyhow!("{}: {r:?}", path.display()))
            .usage()?;
        let n = p.pixel_values.len() / p.patch_dim;
        counts.push(proc.num_image_tokens(p.grid_thw));
        grids.push(p.grid_thw.map(|x| x as usize));
        pixels = Some(Tensor::from_vec(p.pixel_values, (n, p.patch_dim), &dev)?);
        content.push(Content::Image);
    }
    content.push(Content::Text {
        text: a.prompt.clone(),
    });
    let messages = [Message {
        role: Role::User,
        content,
    }];
    let ids = encoder
        .encode_prompt(&messages, &counts)
        .map_err(|r| anyhow::anyhow!("cannot encode the prompt: {r:?}"))
        .usage()?;
    let input = Input::padded(vec![ids.clone()], &[vec![1; ids.len()]], pixels, grids).usage()?;
    let model = Qwen2VL::new(&m.config, &m.params)?;
    let cfg = SamplingConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        eos_token_ids: omr_model::generate::eos_ids(&m.dir, &m.config.eos_token_ids),
        keep_logits: false,
        suppress_tokens: Vec::new(),
    };
    let t = std::time::Instant::now();
    let out = generate(&model, &input, &cfg).usage()?;
    let c = &out[0];
    let text = encoder
        .tokenizer()
        .decode(&c.tokens, true)
        .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
    println!("{text}");
    eprintln!(
        "{} prompt tokens, {} new tokens in {:.2}s ({:?})",
        ids.len(),
        c.tokens.len(),
        t.elapsed().as_secs_f64(),
        c.finish
    );
    Ok(())
}
