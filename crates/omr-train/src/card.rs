//! The model card (`README.md`) written next to an exported checkpoint, in the Hugging Face
//! format: YAML front matter (base model, datasets, licence, tags, `model-index` eval results)
//! and a markdown body (data provenance, training facts, evaluation, how to load it, and a
//! prominent "not for clinical use" section).
//!
//! Every string scalar in the front matter is written as a YAML double-quoted scalar with
//! JSON-style escapes, and every non-printable character escaped, so no dataset name, path or
//! metric can break the YAML: the front matter is valid whatever the strings hold. In the body,
//! strings are flattened to one line and table pipes and `<` escaped. Rendering is a pure
//! function of the struct, so the same run writes the same bytes.

use std::fmt::Write;

/// Tags every card carries, before the caller's own.
const BASE_TAGS: [&str; 3] = ["medical", "vision-language", "omr"];

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelCard {
    /// Name shown as the title and in `model-index`.
    pub model_name: String,
    /// Hub id (or local folder) the loading snippet reads; empty for a placeholder.
    pub repo_id: String,
    /// Hub id of the model fine-tuned, e.g. `Qwen/Qwen2.5-VL-3B-Instruct` (a local path is
    /// named in the body only: the YAML `base_model` must be a Hub id).
    pub base_model: String,
    pub datasets: Vec<DatasetInfo>,
    /// SPDX-like identifier, lowercased: `apache-2.0`, `cc-by-4.0`, or `other`.
    pub license: String,
    /// Extra tags; `medical`, `vision-language` and `omr` are always added.
    pub tags: Vec<String>,
    /// Usually `image-text-to-text`.
    pub pipeline_tag: String,
    /// Training recipe, e.g. `SFT`.
    pub recipe: String,
    /// Key facts in display order: steps, learning rate, LoRA, seed, omr version…
    pub training: Vec<(String, String)>,
    pub eval: Vec<EvalResult>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct DatasetInfo {
    /// Hub id or local path. Only hub-like ids (`owner/name`) go into the YAML `datasets`.
    pub id: String,
    pub licence: String,
    /// Where it came from, e.g. "synthetic shards made by `omr data synth --seed 0`".
    pub provenance: String,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct EvalResult {
    /// Task type, e.g. `visual-question-answering`.
    pub task: String,
    pub dataset: String,
    pub split: String,
    /// Metric type, e.g. `accuracy`.
    pub metric: String,
    pub value: f64,
}

impl ModelCard {
    pub fn render(&self) -> String {
        let mut s = String::new();
        self.front_matter(&mut s);
        self.body(&mut s);
        s
    }

    fn front_matter(&self, s: &mut String) {
        let q = yaml_str;
        *s += "---\n";
        if is_hub_id(self.base_model.trim()) {
            *s += &format!("base_model: {}\n", q(self.base_model.trim()));
        }
        let ids = self.datasets.iter().map(|d| d.id.trim());
        let hub_ids: Vec<&str> = ids.filter(|id| is_hub_id(id)).collect();
        if !hub_ids.is_empty() {
            *s += "datasets:\n";
            hub_ids
                .iter()
                .for_each(|id| *s += &format!("- {}\n", q(id)));
        }
        *s += &format!("license: {}\ntags:\n", q(&self.license_id()));
        self.all_tags()
            .iter()
            .for_each(|t| *s += &format!("- {}\n", q(t)));
        *s += &format!("pipeline_tag: {}\n", q(&self.pipeline_tag));
        *s += "library_name: \"transformers\"\n";
        if !self.eval.is_empty() {
            *s += &format!(
                "model-index:\n- name: {}\n  results:\n",
                q(&self.model_name)
            );
            for e in &self.eval {
                let (d, m) = (q(&e.dataset), q(&e.metric));
                *s += &format!(
                    "  - task:\n      type: {}\n    dataset:\n      name: {d}\n      type: {d}\n      \
                     split: {}\n    metrics:\n    - type: {m}\n      value: {}\n      name: {m}\n",
                    q(&e.task),
                    q(&e.split),
                    yaml_f64(e.value)
                );
            }
        }
        *s += "---\n";
    }

    fn body(&self, s: &mut String) {
        let name = inline(&self.model_name);
        let base = inline(&self.base_model);
        let base_link = if is_hub_id(self.base_model.trim()) {
            format!(
                "[{base}](https://huggingface.co/{})",
                self.base_model.trim()
            )
        } else {
            format!("`{base}`")
        };
        let recipe = inline(&self.recipe);
        *s += &format!(
            "\n# {name}\n\n{name} is a vision-language model (images and text in, text out) \
             fine-tuned from {base_link} by {recipe} with omr, a trainer for medical \
             vision-language models, for research on medical image understanding.\n\n"
        );
        *s +=
            "## Not for clinical use\n\n> **This model is for research only. It is not a medical \
               device and has not been clinically validated. Its outputs can be wrong, incomplete \
               or biased, and must not be used for diagnosis, treatment or any other decision \
               about a patient.**\n\n## Training data\n\n";
        if self.datasets.is_empty() {
            *s += "No dataset recorded.\n";
        }
        for d in &self.datasets {
            let (id, prov, lic) = (code(&d.id), inline(&d.provenance), inline(&d.licence));
            *s += &format!("- `{id}`: {prov} (licence: {lic})\n");
        }
        *s += &format!(
            "\n## Training procedure\n\n| setting | value |\n|---|---|\n| recipe | {recipe} |\n\
             | base model | {base} |\n"
        );
        for (k, v) in &self.training {
            *s += &format!("| {} | {} |\n", inline(k), inline(v));
        }
        *s += "\n## Evaluation\n\n";
        if self.eval.is_empty() {
            *s += "No evaluation recorded.\n";
        } else {
            *s += "| task | dataset | split | metric | value |\n|---|---|---|---|---|\n";
        }
        for e in &self.eval {
            let cells = [&e.task, &e.dataset, &e.split, &e.metric].map(|c| inline(c));
            *s += &format!("| {} | {} |\n", cells.join(" | "), table_f64(e.value));
        }
        let repo = match self.repo_id.trim() {
            "" => "path/to/this/folder",
            r => r,
        };
        *s += &format!(
            "\n## How to use\n\n```python\n\
             from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration\n\n\
             model_id = {}\n\
             model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_id, \
             torch_dtype=\"auto\", device_map=\"auto\")\n\
             processor = AutoProcessor.from_pretrained(model_id)\n```\n",
            json_str(repo)
        );
    }

    /// The licence as written in the front matter: trimmed, lowercased, `other` when empty.
    fn license_id(&self) -> String {
        let l = self.license.trim().to_lowercase();
        if l.is_empty() {
            "other".into()
        } else {
            l
        }
    }

    /// The base tags then the caller's, first occurrence kept.
    fn all_tags(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let extra = self.tags.iter().map(|t| t.trim());
        for t in BASE_TAGS.into_iter().chain(extra) {
            if !t.is_empty() && !out.iter().any(|o| o == t) {
                out.push(t.to_string());
            }
        }
        out
    }
}

/// A YAML double-quoted scalar. JSON's escapes are YAML's; on top of them every character that
/// YAML does not allow raw or would fold as a line break (C0/C1 controls, DEL, U+2028/9,
/// U+FEFF, U+FFFE/F) is written `\uXXXX`.
fn yaml_str(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control()
                || matches!(
                    c,
                    '\u{2028}' | '\u{2029}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}'
                ) =>
            {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A YAML float: always with a dot and never an exponent (YAML 1.1 parsers read `1e-7` as a
/// string), the non-finite ones in YAML's spelling.
fn yaml_f64(v: f64) -> String {
    if v.is_nan() {
        ".nan".into()
    } else if v.is_infinite() {
        if v > 0.0 { ".inf" } else { "-.inf" }.into()
    } else {
        let d = v.to_string();
        if d.contains('.') {
            d
        } else {
            d + ".0"
        }
    }
}

/// Four decimals, or four significant digits for values that would print as 0.0000 or long.
fn table_f64(v: f64) -> String {
    if v == 0.0 || !v.is_finite() || (1e-3..1e4).contains(&v.abs()) {
        format!("{v:.4}")
    } else {
        format!("{v:.3e}")
    }
}

/// A Python string literal (JSON's escapes are Python's).
fn json_str(v: &str) -> String {
    serde_json::Value::String(v.to_string()).to_string()
}

/// One line of markdown: line breaks flattened, table pipes and HTML openers escaped.
fn inline(v: &str) -> String {
    flat(v).replace('|', "\\|").replace('<', "&lt;")
}

/// Text inside single backticks: one line, backticks replaced by a quote.
fn code(v: &str) -> String {
    flat(v).replace('`', "'")
}

/// Control characters and line separators become single spaces; trimmed.
fn flat(v: &str) -> String {
    v.split(|c: char| c.is_control() || c == '\u{2028}' || c == '\u{2029}')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `owner/name` with the characters the Hub allows: what may go into YAML `datasets` and a link.
fn is_hub_id(id: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!(id.split_once('/'), Some((o, n)) if ok(o) && ok(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &str =
        "a \"quoted\": b\nc: 'd' # e\\f\t| <img src=x> `g` \u{85}\u{2028}\u{7f}\u{1b}[0m 🩻";

    fn card() -> ModelCard {
        ModelCard {
            model_name: "omr-qwen2.5-vl-3b-sft".into(),
            repo_id: "omr-trainer/omr-qwen2.5-vl-3b-sft".into(),
            base_model: "Qwen/Qwen2.5-VL-3B-Instruct".into(),
            datasets: vec![
                DatasetInfo {
                    id: "I4Health/OpenMedReason".into(),
                    licence: "cc-by-4.0".into(),
                    provenance: "Hub, split train".into(),
                },
                DatasetInfo {
                    id: "/data/shards".into(),
                    licence: "cc0-1.0".into(),
                    provenance: "synthetic shards made by `omr data synth --seed 0`".into(),
                },
                DatasetInfo {
                    id: HOSTILE.into(),
                    licence: HOSTILE.into(),
                    provenance: HOSTILE.into(),
                },
            ],
            license: " Apache-2.0 ".into(),
            tags: vec!["omr".into(), "sft".into(), HOSTILE.into()],
            pipeline_tag: "image-text-to-text".into(),
            recipe: "SFT".into(),
            training: vec![
                ("steps".into(), "500".into()),
                ("learning rate".into(), "1e-5 (cosine, warmup 3%)".into()),
                (HOSTILE.into(), HOSTILE.into()),
            ],
            eval: vec![
                EvalResult {
                    task: "visual-question-answering".into(),
                    dataset: "VQA-RAD".into(),
                    split: "test".into(),
                    metric: "accuracy".into(),
                    value: 0.5,
                },
                EvalResult {
                    task: HOSTILE.into(),
                    dataset: HOSTILE.into(),
                    split: HOSTILE.into(),
                    metric: HOSTILE.into(),
                    value: 1e-7,
                },
            ],
        }
    }

    fn front_matter(text: &str) -> &str {
        let rest = text.strip_prefix("---\n").expect("front matter first");
        &rest[..rest.find("\n---\n").expect("front matter closed")]
    }

    #[test]
    fn card_structure() {
        let text = card().render();
        let fm = front_matter(&text);
        // Every line is a key, a list item or an indented mapping: no string broke out.
        for line in fm.lines() {
            let t = line.trim_start();
            let key = t.trim_start_matches("- ");
            let ok = key.split_once(": ").is_some_and(|(k, v)| {
                !k.contains(['"', ' '])
                    && (v.starts_with('"') && v.ends_with('"') || v.parse::<f64>().is_ok())
            }) || key.ends_with(':') && !key.contains(' ')
                || t.starts_with("- \"") && t.ends_with('"');
            assert!(ok, "unexpected front-matter line {line:?}");
        }
        assert_eq!(
            fm.lines().filter(|l| l.starts_with("- \"")).count(),
            1 + 5,
            "datasets + tags"
        );
        assert!(fm.contains("license: \"apache-2.0\""));
        assert!(fm.contains("base_model: \"Qwen/Qwen2.5-VL-3B-Instruct\""));
        assert!(
            fm.contains("datasets:\n- \"I4Health/OpenMedReason\"\nlicense"),
            "local paths stay out"
        );
        assert!(fm.contains("tags:\n- \"medical\"\n- \"vision-language\"\n- \"omr\"\n- \"sft\"\n"));
        assert!(fm.contains("library_name: \"transformers\""));
        assert!(fm.contains("      value: 0.5\n") && fm.contains("      value: 0.0000001\n"));
        let quoted = yaml_str(HOSTILE);
        assert_eq!(
            quoted,
            "\"a \\\"quoted\\\": b\\nc: 'd' # e\\\\f\\t| <img src=x> `g` \\u0085\\u2028\\u007f\\u001b[0m 🩻\""
        );
        assert_eq!(
            fm.matches(&quoted).count(),
            1 + 5 + 1,
            "tag, eval strings, metric name"
        );
        // The body: one line per string, the safety section, the snippet.
        let body = &text[fm.len() + 8..];
        assert!(body.contains("\n## Not for clinical use\n"));
        assert!(body.contains("must not be used for diagnosis, treatment"));
        assert!(body.contains("model_id = \"omr-trainer/omr-qwen2.5-vl-3b-sft\""));
        assert!(body.contains("| steps | 500 |"));
        assert!(body.contains("| VQA-RAD | test | accuracy | 0.5000 |"));
        // HTML is escaped, except inside the dataset id's code span, where it is literal text.
        assert_eq!(body.matches("<img").count(), 1);
        assert!(body.contains("- `a \"quoted\": b c: 'd' # e\\f | <img src=x> 'g' [0m 🩻`: "));
        let flat = inline(HOSTILE);
        assert!(
            !flat.contains(['\n', '\u{85}', '\u{2028}', '\u{1b}']),
            "{flat}"
        );
        assert!(body.contains(&format!("| {flat} | {flat} |")));
    }

    #[test]
    fn card_defaults_and_numbers() {
        let text = ModelCard::default().render();
        let fm = front_matter(&text);
        assert!(fm.contains("license: \"other\"") && !fm.contains("model-index"));
        assert!(!fm.contains("base_model") && !fm.contains("datasets"));
        assert!(text.contains("model_id = \"path/to/this/folder\""));
        assert_eq!(yaml_f64(1.0), "1.0");
        assert_eq!(
            (table_f64(0.5), table_f64(1e-7)),
            ("0.5000".into(), "1.000e-7".into())
        );
        assert_eq!(yaml_f64(f64::NAN), ".nan");
        assert_eq!(yaml_f64(f64::NEG_INFINITY), "-.inf");
        assert!(is_hub_id("a-b/c_d.e") && !is_hub_id("/data/x") && !is_hub_id("a/b/c"));
        assert!(!is_hub_id("../x") && !is_hub_id("a/ b"));
    }

    /// The rendered card is committed as tests/fixtures/optim/card.md, which
    /// `make_optim_fixtures.py check-card` parses with PyYAML and huggingface_hub;
    /// `OMR_REGEN_FIXTURES=1` rewrites it.
    #[test]
    fn card_golden() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/optim/card.md");
        let text = card().render();
        if std::env::var_os("OMR_REGEN_FIXTURES").is_some() {
            std::fs::write(path, &text).unwrap();
        }
        assert_eq!(std::fs::read_to_string(path).unwrap(), text);
    }
}
