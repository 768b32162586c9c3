//! `[data]` section of a run config: the sources of a (weighted) mixture and one struct per
//! data component, each with `deny_unknown_fields` so a typo fails at start-up naming the key.
//!
//! ```toml
//! [[sources]]
//! path = "runs/demo/data/data"
//! split = "train"
//! weight = 3.0
//!
//! [[sources]]
//! path = "data/vqa-rad"          # LLaVA JSONL + images
//! weight = 1.0
//!
//! [loader]
//! seed = 0
//!
//! [batch]
//! batch_size = 4
//! mode = "pack"
//! max_length = 2048
//! ```

use crate::batcher::BatchConfig;
use crate::loader::LoaderConfig;
use crate::pipeline::ProcessConfig;
use crate::quarantine::QuarantineBudget;
use crate::source::SourceSpec;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub sources: Vec<SourceSpec>,
    #[serde(default)]
    pub loader: LoaderConfig,
    #[serde(default)]
    pub process: ProcessConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub quarantine: QuarantineBudget,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl DataConfig {
    pub fn from_toml_str(text: &str, path: &str) -> Result<DataConfig, ConfigError> {
        let cfg: DataConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks what serde cannot (non-empty sources, weights, batch size); `path` names the file.
    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let cfg = self;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.into(),
            message,
        };
        if cfg.sources.is_empty() {
            return Err(invalid(
                "no [[sources]]: add at least one data source".into(),
            ));
        }
        for (i, s) in cfg.sources.iter().enumerate() {
            if !(s.weight.is_finite() && s.weight >= 0.0) {
                return Err(invalid(format!(
                    "sources[{i}].weight = {} must be a finite number ≥ 0",
                    s.weight
                )));
            }
        }
        if cfg.sources.iter().all(|s| s.weight == 0.0) {
            return Err(invalid("every source has weight 0".into()));
        }
        if cfg.batch.batch_size == 0 {
            return Err(invalid("batch.batch_size must be at least 1".into()));
        }
        Ok(())
    }

    pub fn from_file(path: &Path) -> Result<DataConfig, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: p.clone(),
            source,
        })?;
        Self::from_toml_str(&text, &p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_mixture_and_rejects_unknown_keys() {
        let ok = "[[sources]]\npath = \"a\"\nweight = 3.0\n[[sources]]\nhub = \"org/x\"\nsplit = \"test\"\n[batch]\nmode = \"pack\"\n";
        let c = DataConfig::from_toml_str(ok, "c.toml").unwrap();
        assert_eq!(c.sources.len(), 2);
        assert_eq!(c.sources[1].weight, 1.0);
        assert_eq!(c.batch.mode, crate::collate::CollateMode::Pack);
        let typo = "[[sources]]\npath = \"a\"\nwieght = 3.0\n";
        let e = DataConfig::from_toml_str(typo, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("wieght") && e.contains("c.toml"), "{e}");
        let e = DataConfig::from_toml_str("[loader]\nseed = 1\nsources = []\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.toml"), "{e}");
        let neg = "[[sources]]\npath = \"a\"\nweight = -1.0\n";
        assert!(DataConfig::from_toml_str(neg, "c.toml")
            .unwrap_err()
            .to_string()
            .contains("weight"));
    }
}
