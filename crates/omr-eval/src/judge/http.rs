//! The LLM judge: an OpenAI-compatible `POST {url}/chat/completions` endpoint (a vLLM or
//! SGLang server, or a hosted API) asked one rubric question per request.
//!
//! Notable choices:
//! - Settings come from the `[judge]` table (`config.rs`), each with an environment fallback:
//!   `url` ← `OMR_JUDGE_URL`, `model` ← `OMR_JUDGE_MODEL`, `api_key` ← `OMR_JUDGE_API_KEY`,
//!   then `OPENAI_API_KEY` (no key: no `Authorization` header, as a local vLLM wants),
//!   `cache_dir` ← `OMR_JUDGE_CACHE`, else `$XDG_CACHE_HOME/omr/judge` or
//!   `~/.cache/omr/judge`. `url` is the base the OpenAI clients take (`http://host:8000/v1`);
//!   a bare `http://host:port` gets `/v1`, a URL already ending in `/chat/completions` is
//!   used as it is.
//! - Greedy (`temperature` 0) and short (`max_tokens`): the prompt asks for a single number.
//! - Timeouts (connect and whole request) and retries with exponential backoff on HTTP 429,
//!   5xx and transport failures (timeouts, refused connections), honouring `Retry-After`.
//!   Other 4xx fail at once: a wrong key or model name does not get better by asking again.
//! - The reply is parsed strictly: after trimming (and dropping a leading `<think>…</think>`
//!   block that reasoning models emit, and one trailing period) it must be exactly one of the
//!   allowed answers; anything else is an error naming the item and the unit, never a guess.
//! - Every parsed reply is cached on disk by sha256(model, prompt) (`cache.rs`): a rerun of
//!   the same evaluation sends zero requests.
//! - Pairwise preference asks twice with the traces swapped and keeps a verdict only when both
//!   orders agree (else a tie), which cancels the judge's position bias.

use super::cache::Cache;
pub use super::config::JudgeConfig;
use super::prompt;
use super::{Judge, JudgeError, PairRef, Preference, Stats, TraceRef};
use crate::pkr::{Axis, Correctness, Presence};
use omr_data::sample::RubricUnit;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub struct HttpJudge {
    endpoint: String,
    model: String,
    api_key: Option<String>,
    cfg: JudgeConfig,
    agent: ureq::Agent,
    cache: Option<Cache>,
    requests: AtomicUsize,
    cache_hits: AtomicUsize,
}

impl HttpJudge {
    /// Resolves the settings (config first, then `env`, see the module doc).
    pub fn new(
        cfg: &JudgeConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<HttpJudge, JudgeError> {
        cfg.check().map_err(JudgeError::Config)?;
        let nonempty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        let url = nonempty(cfg.url.clone())
            .or_else(|| nonempty(env("OMR_JUDGE_URL")))
            .ok_or_else(|| {
                JudgeError::Config(
                    "no judge URL: set `url` in the [judge] table or OMR_JUDGE_URL (e.g. http://localhost:8000/v1)".into(),
                )
            })?;
        let model = nonempty(cfg.model.clone())
            .or_else(|| nonempty(env("OMR_JUDGE_MODEL")))
            .ok_or_else(|| {
                JudgeError::Config(
                    "no judge model: set `model` in the [judge] table or OMR_JUDGE_MODEL".into(),
                )
            })?;
        let api_key = nonempty(cfg.api_key.clone())
            .or_else(|| nonempty(env("OMR_JUDGE_API_KEY")))
            .or_else(|| nonempty(env("OPENAI_API_KEY")));
        let cache = cfg.cache.then(|| {
            let dir = cfg
                .cache_dir
                .clone()
                .or_else(|| nonempty(env("OMR_JUDGE_CACHE")).map(PathBuf::from))
                .unwrap_or_else(|| {
                    let base = nonempty(env("XDG_CACHE_HOME"))
                        .map(PathBuf::from)
                        .or_else(|| nonempty(env("HOME")).map(|h| Path::new(&h).join(".cache")))
                        .unwrap_or_else(|| PathBuf::from(".cache"));
                    base.join("omr").join("judge")
                });
            Cache::new(dir)
        });
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs_f64(cfg.connect_timeout_s))
            .timeout(Duration::from_secs_f64(cfg.timeout_s))
            .build();
        Ok(HttpJudge {
            endpoint: endpoint(&url),
            model,
            api_key,
            cfg: cfg.clone(),
            agent,
            cache,
            requests: AtomicUsize::new(0),
            cache_hits: AtomicUsize::new(0),
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn cache_dir(&self) -> Option<&Path> {
        self.cache.as_ref().map(Cache::dir)
    }

    pub fn concurrency(&self) -> usize {
        self.cfg.concurrency
    }

    /// Asks `user` and returns the parsed answer: from the cache if it is there, else from
    /// the endpoint (then cached).
    fn ask<T>(
        &self,
        user: &str,
        parse: impl Fn(&str) -> Result<T, JudgeError>,
    ) -> Result<T, JudgeError> {
        let key = Cache::key(&self.model, prompt::SYSTEM, user);
        if let Some(cache) = &self.cache {
            if let Some(reply) = cache.get(&key) {
                if let Ok(v) = parse(&reply) {
                    self.cache_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(v);
                }
            }
        }
        let reply = self.complete(user)?;
        let v = parse(&reply)?;
        if let Some(cache) = &self.cache {
            cache.put(&key, &self.model, &reply)?;
        }
        Ok(v)
    }

    /// One chat completion, with retries: the reply's `choices[0].message.content`.
    fn complete(&self, user: &str) -> Result<String, JudgeError> {
        let body = serde_json::json!({
            "model": self.model,
            "messages": [
                {"role": "system", "content": prompt::SYSTEM},
                {"role": "user", "content": user},
            ],
            "temperature": 0,
            "max_tokens": self.cfg.max_tokens,
        })
        .to_string();
        let attempts = self.cfg.retries + 1;
        let mut last: Option<JudgeError> = None;
        let mut retry_after = 0.0;
        for attempt in 0..attempts {
            if attempt > 0 {
                std::thread::sleep(self.backoff(attempt, retry_after));
                retry_after = 0.0;
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            let mut req = self
                .agent
                .post(&self.endpoint)
                .set("Content-Type", "application/json");
            if let Some(k) = &self.api_key {
                req = req.set("Authorization", &format!("Bearer {k}"));
            }
            match req.send_string(&body) {
                Ok(resp) => match resp.into_string() {
                    Ok(text) => return self.content(&text),
                    Err(e) => {
                        last = Some(self.transport(format!("reading the reply: {e}"), attempt + 1))
                    }
                },
                Err(ureq::Error::Status(status, resp)) => {
                    let after = resp
                        .header("Retry-After")
                        .and_then(|s| s.trim().parse::<f64>().ok())
                        .filter(|s| s.is_finite() && *s >= 0.0);
                    retry_after = after.unwrap_or(0.0);
                    let text = resp.into_string().unwrap_or_default();
                    let err = JudgeError::Http {
                        url: self.endpoint.clone(),
                        status,
                        hint: hint(status, after),
                        body: excerpt(&text),
                    };
                    if !(status == 429 || status >= 500) {
                        return Err(err);
                    }
                    last = Some(err);
                }
                Err(ureq::Error::Transport(t)) => {
                    last = Some(self.transport(t.to_string(), attempt + 1))
                }
            }
        }
        Err(match last.expect("at least one attempt") {
            JudgeError::Transport { url, detail, .. } => JudgeError::Transport {
                url,
                detail,
                attempts,
            },
            other => other,
        })
    }

    fn transport(&self, detail: String, attempts: u32) -> JudgeError {
        JudgeError::Transport {
            url: self.endpoint.clone(),
            detail,
            attempts,
        }
    }

    /// `backoff_s · 2^(attempt−1)`, capped; a server's `Retry-After` (seconds) when longer.
    fn backoff(&self, attempt: u32, retry_after: f64) -> Duration {
        let exp = self.cfg.backoff_s * 2f64.powi(attempt as i32 - 1);
        Duration::from_secs_f64(exp.max(retry_after).min(self.cfg.max_backoff_s))
    }

    fn content(&self, text: &str) -> Result<String, JudgeError> {
        let bad = |detail: String| JudgeError::BadResponse {
            url: self.endpoint.clone(),
            detail,
        };
        #[derive(Deserialize)]
        struct Completion {
            choices: Vec<Choice>,
        }
        #[derive(Deserialize)]
        struct Choice {
            message: Message,
        }
        #[derive(Deserialize)]
        struct Message {
            content: Option<String>,
        }
        let c: Completion =
            serde_json::from_str(text).map_err(|e| bad(format!("{e}: {}", excerpt(text))))?;
        let choice = c
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| bad("no choices".into()))?;
        choice
            .message
            .content
            .ok_or_else(|| bad("choices[0].message.content is null".into()))
    }
}

impl Judge for HttpJudge {
    fn describe(&self) -> String {
        format!("http:{}@{}", self.model, self.endpoint)
    }

    fn stats(&self) -> Stats {
        Stats {
            requests: self.requests.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
        }
    }

    fn presence(
        &self,
        t: &TraceRef,
        axis: Axis,
        unit: &RubricUnit,
    ) -> Result<Presence, JudgeError> {
        let prompt = prompt::presence(t, axis, unit);
        self.ask(&prompt, |reply| {
            prompt::parse_presence(reply)
                .ok_or_else(|| unparsable(t, unit, "presence", "0, 1 or 2", reply))
        })
    }

    fn correctness(
        &self,
        t: &TraceRef,
        axis: Axis,
        unit: &RubricUnit,
    ) -> Result<Correctness, JudgeError> {
        let prompt = prompt::correctness(t, axis, unit);
        self.ask(&prompt, |reply| {
            prompt::parse_correctness(reply)
                .ok_or_else(|| unparsable(t, unit, "correctness", "-1, 0 or 1", reply))
        })
    }

    fn prefer(&self, p: &PairRef) -> Result<Option<Preference>, JudgeError> {
        let ask = |first: &str, second: &str| {
            let prompt = prompt::pair(p, first, second);
            self.ask(&prompt, |reply| {
                prompt::parse_preference(reply).ok_or_else(|| JudgeError::Unparsable {
                    item: p.item.to_string(),
                    unit: "pairwise".into(),
                    question: "preference",
                    expected: "A, B or TIE",
                    reply: excerpt(reply),
                })
            })
        };
        let ab = ask(p.a, p.b)?;
        let ba = ask(p.b, p.a)?;
        Ok(Some(match (ab, ba) {
            (Preference::A, Preference::B) => Preference::A,
            (Preference::B, Preference::A) => Preference::B,
            _ => Preference::Tie,
        }))
    }
}

/// `{url}/chat/completions`; a bare `scheme://host[:port]` gets `/v1` first.
fn endpoint(url: &str) -> String {
    let u = url.trim().trim_end_matches('/');
    if u.ends_with("/chat/completions") {
        return u.to_string();
    }
    let after_scheme = u.split_once("://").map_or(u, |(_, rest)| rest);
    if after_scheme.contains('/') {
        format!("{u}/chat/completions")
    } else {
        format!("{u}/v1/chat/completions")
    }
}

fn unparsable(
    t: &TraceRef,
    unit: &RubricUnit,
    question: &'static str,
    expected: &'static str,
    reply: &str,
) -> JudgeError {
    JudgeError::Unparsable {
        item: t.item.to_string(),
        unit: unit.unit_id.clone(),
        question,
        expected,
        reply: excerpt(reply),
    }
}

fn hint(status: u16, retry_after: Option<f64>) -> String {
    match (status, retry_after) {
        (429 | 503, Some(s)) => format!(" (retry after {s} s)"),
        (401 | 403, _) => " (check OMR_JUDGE_API_KEY / OPENAI_API_KEY)".into(),
        (404, _) => " (check the judge url and model name)".into(),
        _ => String::new(),
    }
}

fn excerpt(s: &str) -> String {
    const MAX: usize = 300;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            endpoint("http://h:8000/v1"),
            "http://h:8000/v1/chat/completions"
        );
        assert_eq!(
            endpoint("http://h:8000/v1/"),
            "http://h:8000/v1/chat/completions"
        );
        assert_eq!(
            endpoint("http://h:8000"),
            "http://h:8000/v1/chat/completions"
        );
        assert_eq!(
            endpoint("https://api.example.com/openai/v1/chat/completions"),
            "https://api.example.com/openai/v1/chat/completions"
        );
    }

    #[test]
    fn config_table_and_env_fallbacks() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("eval.toml");
        std::fs::write(
            &f,
            "[judge]\nkind = \"http\"\nmodel = \"judge-7b\"\nretries = 1\n\n[other]\nx = 1\n",
        )
        .unwrap();
        let cfg = JudgeConfig::from_toml_file(&f).unwrap();
        assert_eq!((cfg.kind.as_str(), cfg.retries), ("http", 1));
        let env = |k: &str| match k {
            "OMR_JUDGE_URL" => Some("http://127.0.0.1:9/v1".to_string()),
            "OMR_JUDGE_MODEL" => Some("ignored".to_string()),
            "OPENAI_API_KEY" => Some("sk-x".to_string()),
            "HOME" => Some("/home/u".to_string()),
            _ => None,
        };
        let j = HttpJudge::new(&cfg, &env).unwrap();
        assert_eq!(
            j.describe(),
            "http:judge-7b@http://127.0.0.1:9/v1/chat/completions"
        );
        assert_eq!(j.api_key.as_deref(), Some("sk-x"));
        assert_eq!(j.cache_dir(), Some(Path::new("/home/u/.cache/omr/judge")));
        let err = HttpJudge::new(&JudgeConfig::default(), &|_| None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("OMR_JUDGE_URL"), "{err}");

        std::fs::write(&f, "[judge]\nurl = \"x\"\ntimeout = 5\n").unwrap();
        let err = JudgeConfig::from_toml_file(&f).unwrap_err().to_string();
        assert!(
            err.contains("eval.toml") && err.contains("timeout"),
            "{err}"
        );
        std::fs::write(&f, "[judge]\nkind = \"llm\"\n").unwrap();
        let err = JudgeConfig::from_toml_file(&f).unwrap_err().to_string();
        assert!(err.contains("kind"), "{err}");
    }
}
