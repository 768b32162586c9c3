//! Qwen2-VL / Qwen2.5-VL `config.json`, read as the Hub ships it.
//!
//! Two forms exist: transformers 4.x writes text fields at the top level with
//! `rope_scaling: {type: "mrope", mrope_section}` and `rope_theta`; transformers 5.x nests them in
//! `text_config` with `rope_parameters: {rope_type, rope_theta, mrope_section}`. Each field is
//! looked up in `text_config` first and then at the top level, so both forms (and the 4.5x
//! files that write both) give the same [`ModelConfig`]. The raw JSON is kept for export, which
//! writes it back with only the dtype changed.

use crate::error::{ModelError, Result};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `qwen2_vl`: LayerNorm vision blocks, QuickGELU MLP, full attention everywhere.
    Qwen2Vl,
    /// `qwen2_5_vl`: RMSNorm vision blocks, SwiGLU MLP, window attention.
    Qwen25Vl,
}

impl Arch {
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Qwen2Vl => "qwen2_vl",
            Arch::Qwen25Vl => "qwen2_5_vl",
        }
    }
    pub fn architecture(self) -> &'static str {
        match self {
            Arch::Qwen2Vl => "Qwen2VLForConditionalGeneration",
            Arch::Qwen25Vl => "Qwen2_5_VLForConditionalGeneration",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Rotary frequency sections for (temporal, height, width); sums to `head_dim / 2`.
    pub mrope_section: Vec<usize>,
    pub max_position_embeddings: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    /// Width of the vision blocks (`hidden_size` in 2.5, `embed_dim` in Qwen2-VL).
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    /// Output width of the patch merger (the language model's hidden size).
    pub out_hidden_size: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    pub in_channels: usize,
    /// Window side in pixels (2.5 only); `None` means full attention in every block.
    pub window_size: Option<usize>,
    pub fullatt_block_indexes: Vec<usize>,
    pub tokens_per_second: f64,
}

impl VisionConfig {
    /// Input width of one patch row of `pixel_values`: C·T·P·P.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub tie_word_embeddings: bool,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    /// `eos_token_id` of config.json (int or list); generation also reads generation_config.json.
    pub eos_token_ids: Vec<u32>,
    /// The file as read, written back by export.
    pub raw: Value,
}

impl ModelConfig {
    /// The vision placeholder ids (image, video, vision start and end): what a completion must
    /// never hold (generation suppresses them; the forward would take them for image tokens).
    pub fn vision_ids(&self) -> [u32; 4] {
        [
            self.image_token_id,
            self.video_token_id,
            self.vision_start_token_id,
            self.vision_end_token_id,
        ]
    }

    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let raw: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_value(raw, path)
    }

    /// Parses a config value; `origin` names it in errors.
    pub fn from_value(raw: Value, origin: &Path) -> Result<ModelConfig> {
        let err = |msg: String| ModelError::config(origin, msg);
        let model_type = raw.get("model_type").and_then(Value::as_str).unwrap_or("");
        let arch = match model_type {
            "qwen2_5_vl" => Arch::Qwen25Vl,
            "qwen2_vl" => Arch::Qwen2Vl,
            other => {
                return Err(err(format!(
                    "unsupported model_type `{other}`: this trainer supports `qwen2_5_vl` \
                     (Qwen2.5-VL) and `qwen2_vl` (Qwen2-VL)"
                )))
            }
        };
        let f = Fields {
            top: &raw,
            text: raw.get("text_config").filter(|v| v.is_object()),
            origin,
        };
        let vision_raw = raw
            .get("vision_config")
            .filter(|v| v.is_object())
            .ok_or_else(|| err("no `vision_config` object".into()))?;
        let v = Fields {
            top: vision_raw,
            text: None,
            origin,
        };

        let hidden_size: usize = f.req("hidden_size")?;
        let num_attention_heads: usize = f.req("num_attention_heads")?;
        let head_dim = f
            .opt::<usize>("head_dim")?
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        let rope = f.rope()?;
        let text = TextConfig {
            vocab_size: f.req("vocab_size")?,
            hidden_size,
            intermediate_size: f.req("intermediate_size")?,
            num_hidden_layers: f.req("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: f.opt("num_key_value_heads")?.unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: f.opt("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: rope.0,
            mrope_section: rope.1,
            max_position_embeddings: f.opt("max_position_embeddings")?.unwrap_or(32768),
        };
        let act: String = f.opt("hidden_act")?.unwrap_or_else(|| "silu".into());
        if act != "silu" {
            return Err(err(format!(
                "text hidden_act `{act}` is not supported (Qwen2 uses silu)"
            )));
        }

        let vision = match arch {
            Arch::Qwen25Vl => VisionConfig {
                depth: v.req("depth")?,
                hidden_size: v.req("hidden_size")?,
                intermediate_size: v.req("intermediate_size")?,
                num_heads: v.req("num_heads")?,
                out_hidden_size: v.opt("out_hidden_size")?.unwrap_or(hidden_size),
                patch_size: v.opt("patch_size")?.unwrap_or(14),
                spatial_merge_size: v.opt("spatial_merge_size")?.unwrap_or(2),
                temporal_patch_size: v.opt("temporal_patch_size")?.unwrap_or(2),
                in_channels: in_channels(&v)?,
                window_size: Some(v.opt("window_size")?.unwrap_or(112)),
                fullatt_block_indexes: v.opt("fullatt_block_indexes")?.unwrap_or_default(),
                tokens_per_second: v.opt("tokens_per_second")?.unwrap_or(4.0),
            },
            Arch::Qwen2Vl => {
                let embed_dim: usize = v.req("embed_dim")?;
                let mlp_ratio: f64 = v.opt("mlp_ratio")?.unwrap_or(4.0);
                VisionConfig {
                    depth: v.req("depth")?,
                    hidden_size: embed_dim,
                    intermediate_size: (embed_dim as f64 * mlp_ratio) as usize,
                    num_heads: v.req("num_heads")?,
                    out_hidden_size: v.opt("hidden_size")?.unwrap_or(hidden_size),
                    patch_size: v.opt("patch_size")?.unwrap_or(14),
                    spatial_merge_size: v.opt("spatial_merge_size")?.unwrap_or(2),
                    temporal_patch_size: v.opt("temporal_patch_size")?.unwrap_or(2),
                    in_channels: in_channels(&v)?,
                    window_size: None,
                    fullatt_block_indexes: Vec::new(),
                    tokens_per_second: 1.0,
                }
            }
        };
        let vact: String = v.opt("hidden_act")?.unwrap_or_else(|| match arch {
            Arch::Qwen25Vl => "silu".into(),
            Arch::Qwen2Vl => "quick_gelu".into(),
        });
        let expected_act = match arch {
            Arch::Qwen25Vl => "silu",
            Arch::Qwen2Vl => "quick_gelu",
        };
        if vact != expected_act {
            return Err(err(format!(
                "vision hidden_act `{vact}` is not supported for {model_type} (expected {expected_act})"
            )));
        }

        let eos_token_ids = match f.any("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().map(|x| x as u32))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| err("`eos_token_id` must be an integer or a list of them".into()))?,
            Some(x) => vec![x
                .as_u64()
                .ok_or_else(|| err("`eos_token_id` must be an integer or a list of them".into()))?
                as u32],
        };
        let cfg = ModelConfig {
            arch,
            text,
            vision,
            // transformers decides from the text config (5.x nests it; 4.57 writes Qwen2-VL's
            // only there); absent everywhere means untied.
            tie_word_embeddings: f.opt("tie_word_embeddings")?.unwrap_or(false),
            image_token_id: f.opt("image_token_id")?.unwrap_or(151655),
            video_token_id: f.opt("video_token_id")?.unwrap_or(151656),
            vision_start_token_id: f.opt("vision_start_token_id")?.unwrap_or(151652),
            vision_end_token_id: f.opt("vision_end_token_id")?.unwrap_or(151653),
            eos_token_ids,
            raw,
        };
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let t = &self.text;
        let v = &self.vision;
        let nonzero = [
            ("vocab_size", t.vocab_size),
            ("hidden_size", t.hidden_size),
            ("num_hidden_layers", t.num_hidden_layers),
            ("num_attention_heads", t.num_attention_heads),
            ("num_key_value_heads", t.num_key_value_heads),
            ("head_dim", t.head_dim),
            ("vision_config.depth", v.depth),
            ("vision_config.num_heads", v.num_heads),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.spatial_merge_size", v.spatial_merge_size),
        ];
        if let Some((k, _)) = nonzero.iter().find(|(_, x)| *x == 0) {
            return Err(format!("`{k}` must be positive"));
        }
        if !t.num_attention_heads.is_multiple_of(t.num_key_value_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                t.num_attention_heads, t.num_key_value_heads
            ));
        }
        if !t.head_dim.is_multiple_of(2) || t.mrope_section.len() != 3 {
            return Err("mrope_section must have 3 entries and head_dim must be even".into());
        }
        if t.mrope_section.iter().sum::<usize>() != t.head_dim / 2 {
            return Err(format!(
                "mrope_section {:?} must sum to head_dim/2 = {}",
                t.mrope_section,
                t.head_dim / 2
            ));
        }
        if !v.hidden_size.is_multiple_of(v.num_heads) || !v.head_dim().is_multiple_of(4) {
            return Err(format!(
                "vision hidden size {} must split into {} heads whose dim is a multiple of 4",
                v.hidden_size, v.num_heads
            ));
        }
        if let Some(w) = v.window_size {
            let unit = v.spatial_merge_size * v.patch_size;
            if w < unit || w % unit != 0 {
                return Err(format!(
                    "vision window_size {w} must be a positive multiple of patch_size·spatial_merge_size = {unit}"
                ));
            }
        }
        if let Some(i) = v.fullatt_block_indexes.iter().find(|&&i| i >= v.depth) {
            return Err(format!(
                "fullatt_block_indexes entry {i} is not a block (depth {})",
                v.depth
            ));
        }
        if v.out_hidden_size != t.hidden_size {
            return Err(format!(
                "the vision merger outputs {} features but the language model is {} wide",
                v.out_hidden_size, t.hidden_size
            ));
        }
        Ok(())
    }

    /// Token ids at or after which `input_ids` are out of range.
    pub fn vocab_size(&self) -> usize {
        self.text.vocab_size
    }
}

fn in_channels(v: &Fields) -> Result<usize> {
    Ok(v.opt("in_channels")?.or(v.opt("in_chans")?).unwrap_or(3))
}

/// Field lookup with the 5.x `text_config` taking precedence over the 4.x top level.
struct Fields<'a> {
    top: &'a Value,
    text: Option<&'a Value>,
    origin: &'a Path,
}

impl Fields<'_> {
    fn any(&self, key: &str) -> Option<&Value> {
        self.text
            .and_then(|t| t.get(key))
            .filter(|v| !v.is_null())
            .or_else(|| self.top.get(key).filter(|v| !v.is_null()))
    }

    fn opt<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.any(key) {
            None => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| ModelError::config(self.origin, format!("field `{key}` = {v}: {e}"))),
        }
    }

    fn req<T: DeserializeOwned>(&self, key: &str) -> Result<T> {
        self.opt(key)?.ok_or_else(|| {
            ModelError::config(self.origin, format!("required field `{key}` is missing"))
        })
    }

    /// (rope_theta, mrope_section) from `rope_parameters` (5.x) or `rope_scaling` +
    /// `rope_theta` (4.x). Only the default rotary (what "mrope" means) is supported.
    fn rope(&self) -> Result<(f64, Vec<usize>)> {
        let params = self
            .any("rope_parameters")
            .or_else(|| self.any("rope_scaling"))
            .filter(|p| p.is_object());
        let err = |msg: String| ModelError::config(self.origin, msg);
        let Some(p) = params else {
            return Err(err(
                "no `rope_scaling` (4.x) or `rope_parameters` (5.x) with `mrope_section`".into(),
            ));
        };
        let kind = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if !matches!(kind, "default" | "mrope") {
            return Err(err(format!(
                "rope type `{kind}` is not supported (only default/mrope)"
            )));
        }
        let section: Vec<usize> = p
            .get("mrope_section")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| err("rope settings have no integer list `mrope_section`".into()))?;
        let theta = match p.get("rope_theta").and_then(Value::as_f64) {
            Some(t) => t,
            None => self.opt("rope_theta")?.unwrap_or(1_000_000.0),
        };
        Ok((theta, section))
    }
}
