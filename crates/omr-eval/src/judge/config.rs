//! The `[judge]` table of an eval config (`omr eval --config FILE`): which judge, and for the
//! HTTP judge where it is, how long to wait, how often to retry, how many requests at once,
//! and where the cache lives. Read from its own table only (other tables of the file belong
//! to other components); unknown keys are rejected naming the key and the file.

use super::JudgeError;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The `[judge]` table of an eval config.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JudgeConfig {
    /// `rules` (offline) or `http`; `omr eval --judge` overrides it.
    pub kind: String,
    pub url: Option<String>,
    pub model: Option<String>,
    /// Prefer the environment (`OMR_JUDGE_API_KEY`) to a key written in a file.
    pub api_key: Option<String>,
    pub timeout_s: f64,
    pub connect_timeout_s: f64,
    /// Retries after the first attempt, on 429, 5xx and transport failures.
    pub retries: u32,
    /// First backoff; doubles on each retry, capped at `max_backoff_s`.
    pub backoff_s: f64,
    pub max_backoff_s: f64,
    pub max_tokens: u32,
    /// Requests in flight at once.
    pub concurrency: usize,
    pub cache: bool,
    pub cache_dir: Option<PathBuf>,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        JudgeConfig {
            kind: "rules".into(),
            url: None,
            model: None,
            api_key: None,
            timeout_s: 120.0,
            connect_timeout_s: 10.0,
            retries: 4,
            backoff_s: 1.0,
            max_backoff_s: 30.0,
            max_tokens: 16,
            concurrency: 8,
            cache: true,
            cache_dir: None,
        }
    }
}

impl JudgeConfig {
    /// The `[judge]` table of a TOML file (other tables are left to their owners); the
    /// defaults when the file has none.
    pub fn from_toml_file(path: &Path) -> Result<JudgeConfig, JudgeError> {
        let bad = |d: String| JudgeError::Config(format!("{}: {d}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let Some(judge) = table.remove("judge") else {
            return Ok(JudgeConfig::default());
        };
        let cfg: JudgeConfig = judge
            .try_into()
            .map_err(|e: toml::de::Error| bad(format!("[judge]: {}", e.message())))?;
        cfg.check().map_err(|d| bad(format!("[judge]: {d}")))?;
        Ok(cfg)
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        if !matches!(self.kind.as_str(), "rules" | "http") {
            return Err(format!("kind = {:?}: use \"rules\" or \"http\"", self.kind));
        }
        for (k, v) in [
            ("timeout_s", self.timeout_s),
            ("connect_timeout_s", self.connect_timeout_s),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(format!("{k} must be a positive number of seconds, not {v}"));
            }
        }
        if !(self.backoff_s >= 0.0 && self.max_backoff_s >= 0.0) {
            return Err("backoff_s and max_backoff_s must be ≥ 0".into());
        }
        if self.concurrency == 0 || self.max_tokens == 0 {
            return Err("concurrency and max_tokens must be ≥ 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preset_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/eval/vllm-judge.toml");
        let c = JudgeConfig::from_toml_file(&p).unwrap();
        assert_eq!(c.kind, "http");
        assert_eq!(c.url.as_deref(), Some("http://localhost:8000/v1"));
        assert_eq!((c.retries, c.concurrency, c.cache), (4, 8, true));
    }
}
