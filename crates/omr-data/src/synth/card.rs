//! `README.md` dataset card for a generated set, in the shape the Hub writes: YAML front matter
//! with `license`, `configs` (`data_files` per split) and `dataset_info` (features, splits,
//! sizes), then a short human description. The feature list mirrors `write::hf_schema` and is
//! laid out the way `datasets`' `DatasetInfo._to_yaml_dict` dumps it (`list:` of struct fields).

use super::tasks::catalogue;
use super::write::{TAG_COLUMNS, UNIT_FIELDS};
use super::{ShardReport, Split, SynthConfig};

/// Renders the card. `files` are the shards written (for row counts and sizes).
pub(crate) fn render(cfg: &SynthConfig, files: &[ShardReport]) -> String {
    let splits: Vec<Split> = [Split::Train, Split::Test]
        .into_iter()
        .filter(|s| files.iter().any(|f| f.split == *s))
        .collect();
    let sum = |s: Split, f: fn(&ShardReport) -> u64| {
        files.iter().filter(|r| r.split == s).map(f).sum::<u64>()
    };
    let mut y = String::from("---\nlicense: cc-by-4.0\nlanguage:\n- en\npretty_name: Synthetic OpenMedReason-format set\n");
    y += "tags:\n- synthetic\n- medical\n- multiple-choice\ntask_categories:\n- visual-question-answering\n";
    y += "configs:\n- config_name: default\n  data_files:\n";
    for s in &splits {
        y += &format!("  - split: {0}\n    path: data/{0}-*\n", s.as_str());
    }
    y += "dataset_info:\n  features:\n  - name: image\n    dtype: image\n";
    for c in ["question", "reasoning", "answer"] {
        y += &format!("  - name: {c}\n    dtype: string\n");
    }
    for c in ["perception", "knowledge", "rationale"] {
        y += &format!("  - name: {c}\n    list:\n");
        for f in UNIT_FIELDS {
            y += &format!("    - name: {f}\n      dtype: string\n");
        }
    }
    for c in TAG_COLUMNS {
        y += &format!("  - name: {c}\n    dtype: string\n");
    }
    y += "  splits:\n";
    for &s in &splits {
        y += &format!(
            "  - name: {}\n    num_bytes: {}\n    num_examples: {}\n",
            s.as_str(),
            sum(s, |r| r.arrow_bytes),
            sum(s, |r| r.rows)
        );
    }
    let download: u64 = files.iter().map(|r| r.file_bytes).sum();
    let dataset: u64 = files.iter().map(|r| r.arrow_bytes).sum();
    y += &format!("  download_size: {download}\n  dataset_size: {dataset}\n---\n\n");

    let (w, h) = cfg.image_size;
    let jitter = if cfg.size_jitter > 0 {
        format!(" ± {} px per side", cfg.size_jitter)
    } else {
        String::new()
    };
    y += &format!(
        "# Synthetic OpenMedReason-format dataset\n\n\
         **Everything here is synthetic**: procedurally drawn images and templated text made by \
         `omr data synth --out <dir> --train {} --test {} --seed {}`. It is not medical data and \
         must not be used for any clinical purpose. It exists to test and demonstrate the `omr` \
         training pipeline end to end without access to the gated OpenMedReason corpus; the same \
         seed always gives byte-identical files.\n\n\
         ## Format\n\n\
         Same layout and schema as OpenMedReason: `image` (JPEG bytes, {w}×{h}{jitter}; \
         radiographs are one-channel JPEGs), `question` (vignette, stem and lettered options \
         `A. …` or `A) …` on their own lines), `reasoning` (`<think>…</think><answer>X</answer>`), \
         `answer` (the option letter), and the rubric lists `perception`, `knowledge`, \
         `rationale` (filled on `test`, empty on `train`). Three extra tag columns follow them: \
         `task_family`, `task` and `modality`.\n\n\
         The correct letter is uniform over the options and the option texts are the full answer \
         set of each task in shuffled order, so the question text alone is at chance: the image \
         is needed.\n\n\
         ## Tasks\n\n| task | family | modality |\n|---|---|---|\n",
        cfg.train, cfg.test, cfg.seed
    );
    for (task, family, modality) in catalogue() {
        y += &format!("| `{task}` | {family} | {modality} |\n");
    }
    y
}
