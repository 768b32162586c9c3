//! LoRA: low-rank adapters on linear layers selected by name pattern, exported in PEFT's
//! layout and mergeable into the base weights.
//!
//! The adapter of module `m` is two parameters in the same store as the base, named as PEFT
//! names them without the `base_model.model.` prefix: `m.lora_A.weight` (r, in) and
//! `m.lora_B.weight` (out, r). Adding LoRA freezes every base parameter; `B` starts at zero so
//! the adapted model computes exactly what the base does.

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::linear::Ctx;
use crate::params::{param_shapes, Params};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    /// Module patterns. A pattern without a dot matches the last name component
    /// (`q_proj`); one with dots matches the whole module path, `*` standing for any run of
    /// characters (`model.layers.*.mlp.down_proj`, `visual.merger.*`). `all-linear` selects
    /// every linear layer of the language model.
    pub targets: Vec<String>,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }
}

#[derive(Clone)]
pub struct LoraAdapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f64,
}

impl LoraAdapter {
    /// An adapter from its tensors (tests of the fused units against this op).
    #[cfg(test)]
    pub(crate) fn from_parts(a: Tensor, b: Tensor, scale: f64, dropout: f64) -> LoraAdapter {
        LoraAdapter {
            a,
            b,
            scale,
            dropout,
        }
    }

    /// The adapter of module `name` if the store has one.
    pub fn load(params: &Params, name: &str) -> Result<Option<LoraAdapter>> {
        let (ka, kb) = (
            format!("{name}.lora_A.weight"),
            format!("{name}.lora_B.weight"),
        );
        if !params.contains(&ka) {
            return Ok(None);
        }
        let cfg = params.lora.as_ref().ok_or_else(|| {
            ModelError::Input(format!("{ka} exists but the model has no LoRA config"))
        })?;
        Ok(Some(LoraAdapter {
            a: params.get(&ka)?,
            b: params.get(&kb)?,
            scale: cfg.scale(),
            dropout: cfg.dropout,
        }))
    }

    /// A, B and the scale when this forward draws no dropout mask (no dropout configured, or
    /// `ctx` without a dropout seed): what a layer run as one op ([`crate::block`]) needs.
    pub fn without_dropout(&self, ctx: &Ctx) -> Option<crate::block::Adapter> {
        (!self.draws_dropout(ctx)).then(|| crate::block::Adapter {
            a: self.a.clone(),
            b: self.b.clone(),
            scale: self.scale,
        })
    }

    /// Whether this forward draws a dropout mask (then `dropout_mask` returns one).
    pub fn draws_dropout(&self, ctx: &Ctx) -> bool {
        ctx.dropout_seed.is_some() && self.dropout > 0.0
    }

    /// The dropout mask of this forward for module `name`, scaled by 1/keep; `None` when no
    /// dropout applies. x: (…, I)
    fn dropout_mask(
        &self,
        x: &Tensor,
        name: &str,
        ctx: &Ctx,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(seed) = ctx.dropout_seed.filter(|_| self.draws_dropout(ctx)) else {
            return Ok(None);
        };
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ crate::params::fnv1a(name.as_bytes()));
        let keep = 1.0 - self.dropout;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.random::<f64>() < keep {
                    (1.0 / keep) as f32
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Some(
            Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?,
        ))
    }

    /// x: (…, I) → (…, O) = scale · dropout(x) Aᵀ Bᵀ, added to `base` = x Wᵀ (+ b).
    /// Trainable base: plain candle ops. Frozen base: one fused op whose backward computes the
    /// gradients of x, A and B and nothing for W, and whose graph keeps only the output.
    pub fn forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        name: &str,
        ctx: &Ctx,
    ) -> candle_core::Result<Tensor> {
        use crate::ops::{matmul_nt, matmul_t};
        let mask = self.dropout_mask(x, name, ctx)?;
        let base_trainable = w.track_op() || bias.is_some_and(|b| b.track_op());
        if base_trainable {
            let xd = match &mask {
                Some(m) => x.mul(m)?,
                None => x.clone(),
            };
            // B scaled (O × r) rather than the (…, O) output: one pass less over it.
            return crate::ops::linear(x, w, bias)?.add(&matmul_t(
                &matmul_t(&xd, &self.a)?,
                &(&self.b * self.scale)?,
            )?);
        }
        let (xv, a) = (x.detach(), self.a.detach());
        let bs = (self.b.detach() * self.scale)?; // scale · B
        let xd = match &mask {
            Some(m) => xv.mul(m)?,
            None => xv.clone(),
        };
        // Base and adapter added in the op's forward: no copy of their sum.
        let base = crate::ops::linear(&xv, w, bias)?;
        let delta = matmul_t(&matmul_t(&xd, &a)?, &bs)?;
        let (w, scale) = (w.clone(), self.scale);
        crate::ops::attach_sum3([x, &self.a, &self.b], base, delta, move |g| {
            let (o, i) = w.dims2()?;
            let n = g.elem_count() / o;
            let g2 = g.reshape((n, o))?;
            let gb = g2.matmul(&bs)?; // g (scale · B): (N, r)
            let through_lora = match &mask {
                // Only the LoRA path saw the dropout mask.
                Some(m) => gb.matmul(&a)?.mul(&m.reshape((n, i))?)?,
                None => gb.matmul(&a)?,
            };
            let gx = matmul_nt(&g2, &w)?.add(&through_lora)?; // (N, I)
            let xd2 = xd.reshape((n, i))?;
            let ga = gb.t()?.matmul(&xd2)?; // (r, I)
            let h = xd2.matmul(&a.t()?)?; // (N, r)
            let gbw = (g2.t()?.matmul(&h)? * scale)?; // (O, r)
            Ok((Some(gx.reshape(xv.shape())?), Some(ga), Some(gbw)))
        })
    }
}

/// Every linear module of the model (module path, (out, in)).
pub fn linear_modules(cfg: &ModelConfig) -> Vec<(String, (usize, usize))> {
    param_shapes(cfg)
        .into_iter()
        .filter(|(n, s)| s.len() == 2 && n.ends_with(".weight") && !n.contains("embed_tokens"))
        .map(|(n, s)| (n.trim_end_matches(".weight").to_string(), (s[0], s[1])))
        .collect()
}

fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// Whether module `name` is selected by `targets`.
pub fn selects(targets: &[String], name: &str) -> bool {
    targets.iter().any(|t| {
        if t == "all-linear" {
            name.starts_with("model.layers.")
        } else if t.contains('.') {
            glob(t, name)
        } else {
            glob(t, name.rsplit('.').next().unwrap_or(name))
        }
    })
}

/// Adds adapters to every selected module, freezes all base parameters, and returns the
/// selected module names. `A` is drawn like PEFT's default (Kaiming-uniform, a = √5, i.e.
/// U(±1/√in)) from a ChaCha stream keyed by (seed, module); `B` is zero.
pub fn apply(
    params: &mut Params,
    cfg: &ModelConfig,
    lora: &LoraConfig,
    seed: u64,
) -> Result<Vec<String>> {
    if lora.r == 0 {
        return Err(ModelError::Input("LoRA rank r must be positive".into()));
    }
    let chosen: Vec<(String, (usize, usize))> = linear_modules(cfg)
        .into_iter()
        .filter(|(n, _)| selects(&lora.targets, n))
        .collect();
    if chosen.is_empty() {
        return Err(ModelError::Input(format!(
            "LoRA targets {:?} match no linear layer (examples: q_proj, v_proj, \
             model.layers.*.mlp.down_proj, visual.merger.*, all-linear)",
            lora.targets
        )));
    }
    params.set_trainable(|_| true, false);
    params.lora = Some(lora.clone());
    for (name, (out, inp)) in &chosen {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ crate::params::fnv1a(name.as_bytes()));
        let bound = 1.0 / (*inp as f64).sqrt();
        let a: Vec<f32> = (0..lora.r * inp)
            .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
            .collect();
        let a = Tensor::from_vec(a, (lora.r, *inp), &Device::Cpu)?;
        let b = Tensor::zeros((*out, lora.r), DType::F32, &Device::Cpu)?;
        params.insert(format!("{name}.lora_A.weight"), &a, true)?;
        params.insert(format!("{name}.lora_B.weight"), &b, true)?;
    }
    Ok(chosen.into_iter().map(|(n, _)| n).collect())
}

/// Base weights with every adapter folded in (`W + scale · B A`), adapter tensors dropped:
/// what a full export writes after `--merge-lora`.
pub fn merged(params: &Params) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    let scale = params.lora.as_ref().map(LoraConfig::scale).unwrap_or(1.0);
    for (name, var) in params.iter() {
        if name.contains(".lora_A.") || name.contains(".lora_B.") {
            continue;
        }
        let mut t = var.as_tensor().detach();
        if let Some(module) = name.strip_suffix(".weight") {
            if let (Some(a), Some(b)) = (
                params.var(&format!("{module}.lora_A.weight")),
                params.var(&format!("{module}.lora_B.weight")),
            ) {
                let delta = (b.as_tensor().matmul(a.as_tensor())? * scale)?;
                t = (t + delta.to_dtype(var.dtype())?)?;
            }
        }
        out.insert(name.to_string(), t);
    }
    Ok(out)
}

/// PEFT's adapter tensors: `base_model.model.{module}.lora_{A,B}.weight`.
pub fn adapter_tensors(params: &Params) -> Vec<(String, Tensor)> {
    params
        .iter()
        .filter(|(n, _)| n.contains(".lora_A.") || n.contains(".lora_B."))
        .map(|(n, v)| (format!("base_model.model.{n}"), v.as_tensor().detach()))
        .collect()
}

/// PEFT's `adapter_config.json` for the adapters in `params`. `target_modules` is a regex
/// that PEFT full-matches against module paths; it accepts the transformers ≥4.52 in-memory
/// prefixes (`model.language_model.`, `model.visual.`) as well as the checkpoint ones, so the
/// adapter attaches to exactly the modules that were trained.
pub fn adapter_config(params: &Params, base_model: &str) -> Result<serde_json::Value> {
    let lora = params
        .lora
        .as_ref()
        .ok_or_else(|| ModelError::Input("the model has no LoRA adapters".into()))?;
    let mut modules: Vec<String> = params
        .iter()
        .filter_map(|(n, _)| n.strip_suffix(".lora_A.weight").map(str::to_string))
        .collect();
    modules.sort();
    let alternatives: Vec<String> = modules
        .iter()
        .map(|m| {
            let esc = m.replace('.', r"\.");
            if let Some(rest) = esc.strip_prefix(r"model\.") {
                format!(r"model\.(?:language_model\.)?{rest}")
            } else if let Some(rest) = esc.strip_prefix(r"visual\.") {
                format!(r"(?:model\.)?visual\.{rest}")
            } else {
                esc
            }
        })
        .collect();
    Ok(serde_json::json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": lora.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": format!("^(?:{})$", alternatives.join("|")),
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": false
    }))
}

/// Writes PEFT's adapter folder: `adapter_model.safetensors` and `adapter_config.json`.
pub fn save_adapter(params: &Params, out: &std::path::Path, base_model: &str) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    let tensors: std::collections::HashMap<String, Tensor> =
        adapter_tensors(params).into_iter().collect();
    let path = out.join("adapter_model.safetensors");
    candle_core::safetensors::save(&tensors, &path).map_err(|e| ModelError::Safetensors {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let cfg = adapter_config(params, base_model)?;
    let path = out.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&cfg).expect("JSON value serializes") + "\n";
    std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))
}
