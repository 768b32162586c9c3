//! The non-weight files of an export: tokenizer, image/video processor, generation config and
//! chat template, copied byte for byte from the base model folder.
//!
//! The chat template is where copies go wrong: transformers ≥ 4.43 processors read
//! `chat_template.jinja` (or the legacy `chat_template.json`), tokenizers read the
//! `chat_template` entry of `tokenizer_config.json`, and vLLM / TGI read either. An export must
//! work with every reader, so when the base has a template in any of these places the export has
//! both `chat_template.jinja` and a `chat_template` entry in `tokenizer_config.json`.

use super::{py_json, write_atomic};
use crate::{ModelError, Result};
use serde_json::Value;
use std::path::Path;

/// Files copied when present, in this order.
pub const PROCESSOR_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
];

const JINJA: &str = "chat_template.jinja";
const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

/// Copies the tokenizer / processor / template files of `base_dir` into `out_dir` and
/// completes the chat template (see the module docs). Returns the names of the files written,
/// in [`PROCESSOR_FILES`] order; absent files are skipped and logged.
pub fn copy_processor_files(base_dir: &Path, out_dir: &Path) -> Result<Vec<String>> {
    if !base_dir.is_dir() {
        return Err(ModelError::io(
            base_dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "base model folder not found"),
        ));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| ModelError::io(out_dir, e))?;
    let template = find_template(base_dir)?;
    let mut written = Vec::new();
    let mut skipped = Vec::new();
    for name in PROCESSOR_FILES {
        let from = base_dir.join(name);
        if !from.is_file() {
            skipped.push(*name);
            continue;
        }
        let mut bytes = std::fs::read(&from).map_err(|e| ModelError::io(&from, e))?;
        if *name == TOKENIZER_CONFIG {
            if let Some(t) = &template {
                bytes = with_template(&from, bytes, t)?;
            }
        }
        write_atomic(&out_dir.join(name), &bytes)?;
        written.push(name.to_string());
    }
    if let Some(t) = &template {
        if !written.iter().any(|w| w == JINJA) {
            write_atomic(&out_dir.join(JINJA), t.as_bytes())?;
            written.push(JINJA.into());
        }
        if !written.iter().any(|w| w == TOKENIZER_CONFIG) {
            tracing::warn!(
                "{}: no {TOKENIZER_CONFIG}; writing one that holds only the chat template",
                base_dir.display()
            );
            let v = serde_json::json!({ "chat_template": t });
            let path = out_dir.join(TOKENIZER_CONFIG);
            write_atomic(&path, (py_json(&v, false, &path)? + "\n").as_bytes())?;
            written.push(TOKENIZER_CONFIG.into());
        }
    }
    if !base_dir.join("tokenizer.json").is_file() && !base_dir.join(TOKENIZER_CONFIG).is_file() {
        tracing::warn!(
            "{} has neither tokenizer.json nor {TOKENIZER_CONFIG}: the export has no tokenizer; \
             copy it from the base model on the Hub before serving",
            base_dir.display()
        );
    }
    if !skipped.is_empty() {
        tracing::info!(
            "not in {} (skipped): {}",
            base_dir.display(),
            skipped.join(", ")
        );
    }
    Ok(written)
}

/// The base model's chat template: `chat_template.jinja`, else `chat_template.json`, else the
/// `chat_template` entry of `tokenizer_config.json` (the order transformers' processor uses).
/// A list of named templates gives the one named `default`.
pub fn find_template(base_dir: &Path) -> Result<Option<String>> {
    let jinja = base_dir.join(JINJA);
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| ModelError::io(&jinja, e));
    }
    for file in ["chat_template.json", TOKENIZER_CONFIG] {
        let path = base_dir.join(file);
        if !path.is_file() {
            continue;
        }
        let v = read_json(&path)?;
        match v.get("chat_template") {
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) => return Ok(Some(s.clone())),
            Some(Value::Array(named)) => {
                let default = named.iter().find_map(|e| {
                    (e.get("name")? == "default").then(|| e.get("template")?.as_str())?
                });
                match default {
                    Some(s) => return Ok(Some(s.to_string())),
                    None => {
                        return Err(ModelError::config(
                            &path,
                            "`chat_template` is a list without a template named `default`; \
                             add one or write chat_template.jinja",
                        ))
                    }
                }
            }
            Some(_) => {
                return Err(ModelError::config(
                    &path,
                    "`chat_template` is neither a string nor a list of {name, template}",
                ))
            }
        }
    }
    Ok(None)
}

/// `tokenizer_config.json` bytes with a `chat_template` entry: unchanged when it has one,
/// else re-written the way transformers writes it (`ensure_ascii=False`).
fn with_template(path: &Path, bytes: Vec<u8>, template: &str) -> Result<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(&bytes).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let Value::Object(map) = &mut v else {
        return Err(ModelError::config(path, "not a JSON object"));
    };
    if map.get("chat_template").is_some_and(|t| !t.is_null()) {
        return Ok(bytes);
    }
    map.insert("chat_template".into(), template.into());
    Ok((py_json(&v, false, path)? + "\n").into_bytes())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "{% for m in messages %}{{ m['content'] }}{% endfor %}";

    fn base(files: &[(&str, String)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn read(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(name)).unwrap()
    }

    #[test]
    fn template_from_tokenizer_config_gets_a_jinja_file() {
        let gen = "{\n  \"eos_token_id\": [151645, 151643]\n}\n".to_string();
        let tok = serde_json::json!({"chat_template": T, "eos_token": "<|im_end|>"}).to_string();
        let b = base(&[
            ("generation_config.json", gen.clone()),
            ("tokenizer_config.json", tok.clone()),
            ("tokenizer.json", "{}".into()),
        ]);
        let out = tempfile::tempdir().unwrap();
        let written = copy_processor_files(b.path(), out.path()).unwrap();
        assert_eq!(
            written,
            [
                "generation_config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "chat_template.jinja"
            ]
        );
        assert_eq!(
            read(out.path(), "generation_config.json"),
            gen,
            "byte for byte"
        );
        assert_eq!(read(out.path(), "tokenizer_config.json"), tok, "unchanged");
        assert_eq!(read(out.path(), "chat_template.jinja"), T);
    }

    #[test]
    fn template_from_jinja_or_json_enters_tokenizer_config() {
        let tok = r#"{"eos_token": "<|im_end|>", "model_max_length": 32768}"#.to_string();
        let legacy = serde_json::json!({ "chat_template": T }).to_string();
        for file in [
            ("chat_template.jinja", T.to_string()),
            ("chat_template.json", legacy),
        ] {
            let b = base(&[file.clone(), ("tokenizer_config.json", tok.clone())]);
            let out = tempfile::tempdir().unwrap();
            let written = copy_processor_files(b.path(), out.path()).unwrap();
            assert!(written.contains(&file.0.to_string()), "{written:?}");
            assert!(written.contains(&"chat_template.jinja".to_string()));
            let cfg: Value =
                serde_json::from_str(&read(out.path(), "tokenizer_config.json")).unwrap();
            assert_eq!(cfg["chat_template"], T);
            assert_eq!(cfg["model_max_length"], 32768, "other entries kept");
            assert_eq!(read(out.path(), "chat_template.jinja"), T);
        }
    }

    #[test]
    fn no_tokenizer_config_still_gets_the_template_entry() {
        let b = base(&[("chat_template.jinja", T.into())]);
        let out = tempfile::tempdir().unwrap();
        let written = copy_processor_files(b.path(), out.path()).unwrap();
        assert_eq!(written, ["chat_template.jinja", "tokenizer_config.json"]);
        let cfg: Value = serde_json::from_str(&read(out.path(), "tokenizer_config.json")).unwrap();
        assert_eq!(cfg["chat_template"], T);
    }

    #[test]
    fn no_template_and_no_tokenizer_is_not_an_error() {
        let b = base(&[("preprocessor_config.json", "{}".into())]);
        let out = tempfile::tempdir().unwrap();
        assert_eq!(
            copy_processor_files(b.path(), out.path()).unwrap(),
            ["preprocessor_config.json"]
        );
        assert!(!out.path().join("chat_template.jinja").exists());
    }

    #[test]
    fn named_templates_use_default_and_bad_ones_name_the_file() {
        let named = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "x"},
            {"name": "default", "template": T}]});
        let b = base(&[("tokenizer_config.json", named.to_string())]);
        assert_eq!(find_template(b.path()).unwrap().as_deref(), Some(T));
        let b = base(&[("tokenizer_config.json", r#"{"chat_template": 3}"#.into())]);
        let e = find_template(b.path()).unwrap_err().to_string();
        assert!(e.contains("tokenizer_config.json"), "{e}");
    }
}
