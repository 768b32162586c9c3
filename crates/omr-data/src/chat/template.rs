//! A model's chat template, loaded the way transformers finds it and rendered the way
//! `apply_chat_template(…, tokenize=False)` renders it, byte for byte.
//!
//! Where the template comes from (first found wins): `chat_template.jinja`, then
//! `chat_template.json` (`{"chat_template": …}`, the processor file), then the
//! `chat_template` key of `tokenizer_config.json` (a string, or a list of `{name, template}`
//! of which `default` is used).
//!
//! The engine reproduces transformers 4.57's Jinja2 environment (`ImmutableSandboxedEnvironment`
//! with `trim_blocks`, `lstrip_blocks`, `loopcontrols`, no `keep_trailing_newline`, a
//! `json.dumps` `tojson`, `raise_exception`, `strftime_now`) on minijinja, sandboxed: no
//! loader (so no `include`/`import` of files), a fuel limit on instructions and the default
//! recursion limit. Python string/dict methods (`.strip()`, `.startswith()`, `.items()`, …)
//! come from minijinja-contrib's pycompat callback. The render context is the one
//! `apply_chat_template` builds: `messages`, `tools` and `documents` (None), the special tokens
//! of `tokenizer_config.json` (`eos_token`, `pad_token`, `additional_special_tokens`, …) and
//! any extra keyword (`add_vision_id`, `enable_thinking`, …).
//!
//! transformers' `{% generation %}…{% endgeneration %}` tag (it only records where assistant
//! text is and renders its body unchanged) is rewritten to `{% if true %}…{% endif %}`, a
//! block tag with the same whitespace behaviour, because minijinja has no custom tags.

use super::messages::{messages_value, ContentStyle};
use super::ChatError;
use super::{pyjson, python};
use crate::quarantine::Reason;
use crate::sample::Message;
use minijinja::value::Serde;
use minijinja::{AutoEscape, Environment, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Instructions one render may execute. A long multi-image conversation through the
/// Qwen2-VL template takes a few thousand; this bounds a hostile or runaway template.
pub const DEFAULT_FUEL: u64 = 5_000_000;

const TEMPLATE_NAME: &str = "chat_template";

/// Keys of `tokenizer_config.json` that transformers passes to the template
/// (`PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES`).
const SPECIAL_TOKEN_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// Per-render switches: `apply_chat_template`'s `add_generation_prompt` and `**kwargs`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RenderOptions {
    pub add_generation_prompt: bool,
    /// Extra template variables (`add_vision_id`, `enable_thinking`, …); they override
    /// special-token variables of the same name, as in transformers. Objects nested in them
    /// reach the template with sorted keys (serde_json maps are ordered).
    pub extra: BTreeMap<String, serde_json::Value>,
    pub content_style: ContentStyle,
}

/// A compiled chat template plus the variables transformers would pass along with it.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// Where the template was read from (file and key), for error messages.
    origin: String,
    /// Special-token variables from the tokenizer config, e.g. `eos_token = "<|im_end|>"`.
    special_tokens: BTreeMap<String, Value>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Loads the template of a model or tokenizer folder, with the special-token variables of
    /// its `tokenizer_config.json` (filled from `special_tokens_map.json` where missing).
    pub fn from_model_dir(dir: &Path) -> Result<Self, ChatError> {
        let (source, origin) = find_template(dir)?;
        let mut special = BTreeMap::new();
        for file in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(file);
            if path.is_file() {
                for (k, v) in special_tokens_of(&read_json(&path)?) {
                    special.entry(k).or_insert(v);
                }
            }
        }
        Self::compile(source, origin, special)
    }

    /// A template from its text; `special_tokens` are the variables `eos_token`, … as strings
    /// (or lists of strings for `additional_special_tokens`).
    pub fn from_source(
        source: &str,
        special_tokens: &BTreeMap<String, serde_json::Value>,
    ) -> Result<Self, ChatError> {
        let special = special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(Serde(v))))
            .collect();
        Self::compile(source.to_string(), "(inline template)".into(), special)
    }

    fn compile(
        source: String,
        origin: String,
        special_tokens: BTreeMap<String, Value>,
    ) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .keep_trailing_newline(false)
                .build()
                .map_err(|e| ChatError::Syntax {
                    origin: origin.clone(),
                    message: e.to_string(),
                })?,
        );
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_fuel(Some(DEFAULT_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python::python_formatter);
        env.add_filter("tojson", pyjson::tojson);
        env.add_function("raise_exception", python::raise_exception);
        env.add_function("strftime_now", python::strftime_now);
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(&source))
            .map_err(|e| ChatError::Syntax {
                origin: origin.clone(),
                message: format!("{e:#}"),
            })?;
        Ok(ChatTemplate {
            env,
            source,
            origin,
            special_tokens,
        })
    }

    /// The template text as loaded (before the `generation`-tag rewrite).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from, e.g. `/models/x/chat_template.json (key chat_template)`.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Value of a special-token variable (`eos_token`, …) when it is a string.
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens.get(name).and_then(|v| v.as_str())
    }

    /// Renders a conversation of our own [`Message`]s.
    pub fn render(&self, messages: &[Message], opts: &RenderOptions) -> Result<String, Reason> {
        self.render_value(messages_value(messages, opts.content_style), opts)
    }

    /// Renders an HF `messages` value as it is (see [`super::messages::messages_from_json`]).
    pub fn render_value(&self, messages: Value, opts: &RenderOptions) -> Result<String, Reason> {
        let mut ctx: BTreeMap<String, Value> = self.special_tokens.clone();
        for (k, v) in &opts.extra {
            ctx.insert(k.clone(), Value::from(Serde(v)));
        }
        ctx.insert("messages".into(), messages);
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(opts.add_generation_prompt),
        );
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Reason::TemplateError(format!("{}: {e}", self.origin)))?;
        tmpl.render(Value::from(ctx))
            .map_err(|e| Reason::TemplateError(render_error_text(&e)))
    }
}

/// The error text with its causes but without minijinja's multi-line source excerpt.
fn render_error_text(e: &minijinja::Error) -> String {
    let mut msg = match e.detail() {
        Some(detail) if e.kind() == minijinja::ErrorKind::InvalidOperation => detail.to_string(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        msg.push_str(&format!(" (template line {line})"));
    }
    msg
}

fn read_json(path: &Path) -> Result<serde_json::Value, ChatError> {
    let text = std::fs::read_to_string(path).map_err(|source| ChatError::Io {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ChatError::Json {
        path: path.into(),
        source,
    })
}

/// Finds the template text following transformers' precedence; the error names every place
/// looked at.
fn find_template(dir: &Path) -> Result<(String, String), ChatError> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let text = std::fs::read_to_string(&jinja).map_err(|source| ChatError::Io {
            path: jinja.clone(),
            source,
        })?;
        return Ok((text, jinja.display().to_string()));
    }
    for file in ["chat_template.json", "tokenizer_config.json"] {
        let path = dir.join(file);
        if !path.is_file() {
            continue;
        }
        let json = read_json(&path)?;
        match json.get("chat_template") {
            None | Some(serde_json::Value::Null) => continue,
            Some(t) => {
                let text = template_from_field(t).map_err(|what| ChatError::BadField {
                    path: path.clone(),
                    what: format!("`chat_template` {what}"),
                })?;
                return Ok((text, format!("{} (key chat_template)", path.display())));
            }
        }
    }
    Err(ChatError::NoTemplate { dir: dir.into() })
}

/// A `chat_template` field: a string, or named templates of which `default` is used.
fn template_from_field(v: &serde_json::Value) -> Result<String, String> {
    match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Array(items) => {
            let mut names = Vec::new();
            for item in items {
                let name = item.get("name").and_then(|n| n.as_str());
                let template = item.get("template").and_then(|t| t.as_str());
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(t.to_string()),
                    (Some(n), Some(_)) => names.push(n.to_string()),
                    _ => return Err("has an entry without string `name` and `template`".into()),
                }
            }
            Err(format!(
                "has no template named `default` (found: {})",
                names.join(", ")
            ))
        }
        _ => Err("must be a string or a list of {name, template}".into()),
    }
}

/// The special-token variables transformers adds to the template context: the seven named
/// tokens when set, `additional_special_tokens` when non-empty, and `extra_special_tokens`
/// (a map of name → token). Token values may be strings or AddedToken objects.
fn special_tokens_of(config: &serde_json::Value) -> Vec<(String, Value)> {
    let token_str = |v: &serde_json::Value| -> Option<String> {
        match v {
            serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
            serde_json::Value::Object(o) => {
                o.get("content").and_then(|c| c.as_str()).map(String::from)
            }
            _ => None,
        }
    };
    let mut out = Vec::new();
    for key in SPECIAL_TOKEN_KEYS {
        if let Some(s) = config.get(key).and_then(token_str) {
            out.push((key.to_string(), Value::from(s)));
        }
    }
    if let Some(serde_json::Value::Array(list)) = config.get("additional_special_tokens") {
        let toks: Vec<Value> = list.iter().filter_map(token_str).map(Value::from).collect();
        if !toks.is_empty() {
            out.push(("additional_special_tokens".into(), Value::from(toks)));
        }
    }
    if let Some(serde_json::Value::Object(extra)) = config.get("extra_special_tokens") {
        for (k, v) in extra {
            if let Some(s) = token_str(v) {
                out.push((k.clone(), Value::from(s)));
            }
        }
    }
    out
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` (any `-`/`+` whitespace markers kept)
/// to `{% if true %}` / `{% endif %}`. Text inside `{% raw %}` blocks is left alone.
pub fn rewrite_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    let mut in_raw = false;
    while let Some(open) = rest.find("{%") {
        out.push_str(&rest[..open]);
        let tag = &rest[open..];
        let Some(close) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let whole = &tag[..close + 2];
        let inner = &whole[2..close];
        let lead = inner.len() - inner.trim_start_matches(['-', '+']).len();
        let body = &inner[lead..];
        let trail = inner.len() - inner.trim_end_matches(['-', '+']).len();
        let word = body[..body.len() - trail].trim();
        let replacement = match word {
            "raw" => {
                in_raw = true;
                None
            }
            "endraw" => {
                in_raw = false;
                None
            }
            "generation" if !in_raw => Some("if true"),
            "endgeneration" if !in_raw => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                out.push_str("{%");
                out.push_str(&inner[..lead]);
                out.push(' ');
                out.push_str(r);
                out.push(' ');
                out.push_str(&inner[inner.len() - trail..]);
                out.push_str("%}");
            }
            None => out.push_str(whole),
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_rewritten() {
        let src = "a{% generation %}b{%- endgeneration -%}c{% raw %}{% generation %}{% endraw %}";
        assert_eq!(
            rewrite_generation_tags(src),
            "a{% if true %}b{%- endif -%}c{% raw %}{% generation %}{% endraw %}"
        );
    }

    #[test]
    fn python_env_features() {
        let special = BTreeMap::from([("eos_token".to_string(), serde_json::json!("</s>"))]);
        let t = ChatTemplate::from_source(
            "{% for m in messages %}{{ m['content'].strip().upper() }}|{{ m | tojson }}{% endfor %}\n  {% if x %}\n{{ eos_token }}{% endif %}\n",
            &special,
        )
        .unwrap();
        let msgs = super::super::messages::messages_from_json(
            r#"[{"role": "user", "content": "  é<b>\n "}]"#,
        )
        .unwrap();
        let opts = RenderOptions {
            extra: BTreeMap::from([("x".to_string(), serde_json::json!(true))]),
            ..Default::default()
        };
        // trim_blocks eats the newline after each block tag, lstrip_blocks the indent before
        // `{% if %}`, and the template's final newline is dropped (checked against jinja2).
        assert_eq!(
            t.render_value(msgs, &opts).unwrap(),
            "É<B>|{\"role\": \"user\", \"content\": \"  é<b>\\n \"}</s>"
        );
        let boom =
            ChatTemplate::from_source("{{ raise_exception('no system role') }}", &BTreeMap::new())
                .unwrap();
        let err = boom.render(&[], &RenderOptions::default()).unwrap_err();
        assert!(err.to_string().contains("no system role"), "{err}");
    }

    #[test]
    fn fuel_stops_runaway_templates() {
        let t = ChatTemplate::from_source(
            "{% for i in range(5000) %}{% for j in range(5000) %}{% endfor %}{% endfor %}",
            &BTreeMap::new(),
        )
        .unwrap();
        match t.render(&[], &RenderOptions::default()) {
            Err(Reason::TemplateError(m)) => assert!(m.contains("fuel"), "{m}"),
            other => panic!("expected the fuel limit to stop it, got {other:?}"),
        }
    }

    #[test]
    fn no_file_access() {
        let t = ChatTemplate::from_source("{% include '/etc/passwd' %}", &BTreeMap::new()).unwrap();
        assert!(t.render(&[], &RenderOptions::default()).is_err());
    }
}
