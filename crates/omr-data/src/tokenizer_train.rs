//! Trains a small Qwen2-style byte-level BPE tokenizer and writes it as an HF folder.
//!
//! Used for tiny end-to-end models and test fixtures where the real 151k-token Qwen
//! vocabulary would dwarf the model. The pipeline is Qwen2's, piece for piece: NFC
//! normalizer; the Qwen2 split regex (single digits, contractions, letter runs with one
//! leading non-letter) followed by byte-level mapping without prefix space; byte-level
//! decoder and post-processor; BPE with no unk token. The Qwen2-VL special tokens are added
//! after the learned vocabulary in Qwen's order (so `<|endoftext|>` has the first id after
//! the BPE tokens, as 151643 does in Qwen). `<think>`/`<answer>` stay ordinary text.
//!
//! The folder (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`,
//! `special_tokens_map.json`) loads with `AutoTokenizer.from_pretrained` as a
//! `Qwen2TokenizerFast`. Training is deterministic: merges are chosen by (count, then
//! smallest pair id) and ids are assigned in merge order, so the same corpus gives
//! byte-identical files (a test checks it against a committed fixture).

use crate::chat::qwen::{ENDOFTEXT, IM_END, QWEN2_VL_CHAT_TEMPLATE, QWEN2_VL_SPECIAL_TOKENS};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Qwen2's pre-tokenizer split pattern (from its `tokenizer.json`).
pub const QWEN2_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `model_max_length` written to `tokenizer_config.json` (Qwen2-VL's value).
pub const MODEL_MAX_LENGTH: usize = 32768;

/// Pairs seen fewer times are never merged: a merge learned from one occurrence is noise.
const MIN_FREQUENCY: u64 = 2;

/// 256 byte symbols + the special tokens: the smallest vocabulary that can encode anything.
pub const MIN_VOCAB_SIZE: usize = 256 + QWEN2_VL_SPECIAL_TOKENS.len();

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("vocab_size {0} is below the minimum {MIN_VOCAB_SIZE} (256 byte symbols + 14 special tokens)")]
    VocabTooSmall(usize),
    #[error("tokenizer training failed: {0}")]
    Tokenizers(String),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn tk(e: impl std::fmt::Display) -> TrainError {
    TrainError::Tokenizers(e.to_string())
}

/// Trains on `corpus` (one document per item) a tokenizer of at most `vocab_size` ids,
/// special tokens included (fewer when the corpus runs out of pairs seen twice), and writes
/// the HF folder to `out_dir` (created if missing).
pub fn train_tokenizer(
    corpus: impl Iterator<Item = String> + Send,
    vocab_size: usize,
    out_dir: &Path,
) -> Result<Tokenizer, TrainError> {
    if vocab_size < MIN_VOCAB_SIZE {
        return Err(TrainError::VocabTooSmall(vocab_size));
    }
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_normalizer(Some(NFC)).map_err(tk)?;
    let split = Split::new(
        SplitPattern::Regex(QWEN2_SPLIT_REGEX.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(tk)?;
    let byte_level = ByteLevel::new(false, false, false);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), byte_level.into()])));
    tokenizer.with_decoder(Some(byte_level));
    tokenizer.with_post_processor(Some(byte_level));

    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size - QWEN2_VL_SPECIAL_TOKENS.len())
        .min_frequency(MIN_FREQUENCY)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::from(trainer);
    tokenizer.train(&mut trainer, corpus).map_err(tk)?;
    let specials: Vec<AddedToken> = QWEN2_VL_SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    tokenizer.add_special_tokens(specials).map_err(tk)?;
    write_folder(&tokenizer, out_dir)?;
    Ok(tokenizer)
}

/// Writes `tokenizer.json` and the transformers side files for a Qwen2-style tokenizer.
pub fn write_folder(tokenizer: &Tokenizer, out_dir: &Path) -> Result<(), TrainError> {
    std::fs::create_dir_all(out_dir).map_err(|source| TrainError::Io {
        path: out_dir.into(),
        source,
    })?;
    let write = |name: &str, text: &str| {
        let path = out_dir.join(name);
        std::fs::write(&path, text).map_err(|source| TrainError::Io { path, source })
    };
    write("tokenizer.json", &tokenizer.to_string(true).map_err(tk)?)?;

    let mut decoder = Map::new();
    for t in QWEN2_VL_SPECIAL_TOKENS {
        let id = tokenizer
            .token_to_id(t)
            .ok_or_else(|| tk(format!("special token {t} has no id")))?;
        decoder.insert(
            id.to_string(),
            json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false,
                   "single_word": false, "special": true}),
        );
    }
    // Everything but <|endoftext|>, which is the pad token (as in Qwen2-VL's config).
    let additional: Vec<&str> = QWEN2_VL_SPECIAL_TOKENS[1..].to_vec();
    let config = json!({
        "add_prefix_space": false,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": additional,
        "bos_token": null,
        "chat_template": QWEN2_VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": false,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": null,
    });
    write("tokenizer_config.json", &pretty(&config)?)?;
    write("chat_template.jinja", QWEN2_VL_CHAT_TEMPLATE)?;
    let added = |t: &str| json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false});
    let map = json!({
        "additional_special_tokens": additional,
        "eos_token": added(IM_END),
        "pad_token": added(ENDOFTEXT),
    });
    write("special_tokens_map.json", &pretty(&map)?)?;
    Ok(())
}

/// Two-space indented JSON with sorted keys (serde_json's map is ordered), newline-terminated.
fn pretty(v: &Value) -> Result<String, TrainError> {
    Ok(serde_json::to_string_pretty(v).map_err(tk)? + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> impl Iterator<Item = String> + Send {
        (0..200).map(|i| {
            format!(
                "Case {i}: the left lung shows a nodule; the right lung is clear. Ünïcode 中文 {}",
                i % 7
            )
        })
    }

    #[test]
    fn trains_qwen_layout_deterministically() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let tok = train_tokenizer(corpus(), 400, a.path()).unwrap();
        train_tokenizer(corpus(), 400, b.path()).unwrap();
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "special_tokens_map.json",
        ] {
            let x = std::fs::read(a.path().join(f)).unwrap();
            let y = std::fs::read(b.path().join(f)).unwrap();
            assert!(
                x == y,
                "{f} differs between two trainings on the same corpus"
            );
        }
        // Special tokens come right after the learned vocabulary, in Qwen order.
        let n = tok.get_vocab_size(false) as u32;
        assert!(n <= 400 - 14 && n > 256);
        for (i, t) in QWEN2_VL_SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tok.token_to_id(t), Some(n + i as u32), "{t}");
        }
        // Special tokens are atomic; <think> is ordinary text; bytes round-trip.
        let text = "<|im_start|>user\n<think>ok</think> 中文 e\u{301}<|im_end|>";
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(enc.get_ids()[0], n + 1);
        assert_eq!(*enc.get_ids().last().unwrap(), n + 2);
        assert!(tok.token_to_id("<think>").is_none());
        // NFC folds e + combining acute into é.
        assert_eq!(
            tok.decode(enc.get_ids(), false).unwrap(),
            "<|im_start|>user\n<think>ok</think> 中文 é<|im_end|>"
        );
        assert!(matches!(
            train_tokenizer(corpus(), 100, a.path()),
            Err(TrainError::VocabTooSmall(100))
        ));
    }
}
