//! The one table of tensor-name aliases.
//!
//! Canonical names are the Hub checkpoint names that transformers 4.x `save_pretrained` writes
//! for Qwen2-VL / Qwen2.5-VL: `model.embed_tokens.weight`, `model.layers.{i}.…`,
//! `model.norm.weight`, `visual.…`, `lm_head.weight`. transformers ≥ 4.52 keeps the language
//! model and the vision tower under `model.` in memory, and transformers 5.x writes those names
//! to disk: `model.language_model.…` and `model.visual.…`; `lm_head` stays where it was.
//! Loading maps every alias to its canonical name here; export writes canonical names, which
//! every transformers version reads (4.52+ and 5.x convert them back on load).

use std::borrow::Cow;

/// `(alias prefix, canonical prefix)`, checked in order; the first match wins.
pub const ALIASES: &[(&str, &str)] = &[
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
];

/// The canonical name of `name`: an alias prefix replaced, anything else returned as is.
pub fn canonical(name: &str) -> Cow<'_, str> {
    for (alias, canon) in ALIASES {
        if let Some(rest) = name.strip_prefix(alias) {
            return Cow::Owned(format!("{canon}{rest}"));
        }
    }
    Cow::Borrowed(name)
}

/// The transformers ≥ 4.52 in-memory / 5.x on-disk name of canonical `name` (the inverse of
/// [`canonical`]); names outside the aliased prefixes (`lm_head.weight`) are returned as is.
pub fn nested(name: &str) -> Cow<'_, str> {
    // `visual.` is checked first: a canonical `model.` name never starts with `visual.`, and
    // the vision tower must not land under `model.language_model.`.
    for (alias, canon) in ALIASES.iter().rev() {
        if let Some(rest) = name.strip_prefix(canon) {
            return Cow::Owned(format!("{alias}{rest}"));
        }
    }
    Cow::Borrowed(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAIRS: &[(&str, &str)] = &[
        (
            "model.embed_tokens.weight",
            "model.language_model.embed_tokens.weight",
        ),
        (
            "model.layers.3.self_attn.q_proj.weight",
            "model.language_model.layers.3.self_attn.q_proj.weight",
        ),
        ("model.norm.weight", "model.language_model.norm.weight"),
        (
            "visual.patch_embed.proj.weight",
            "model.visual.patch_embed.proj.weight",
        ),
        (
            "visual.blocks.0.attn.qkv.weight",
            "model.visual.blocks.0.attn.qkv.weight",
        ),
        (
            "visual.merger.mlp.0.weight",
            "model.visual.merger.mlp.0.weight",
        ),
        ("lm_head.weight", "lm_head.weight"),
    ];

    #[test]
    fn aliases_round_trip() {
        for (canon, alias) in PAIRS {
            assert_eq!(canonical(alias), *canon, "{alias}");
            assert_eq!(canonical(canon), *canon, "canonical names are fixed points");
            assert_eq!(nested(canon), *alias, "{canon}");
            assert_eq!(canonical(&nested(canon)), *canon);
            assert_eq!(nested(&canonical(alias)), *alias);
        }
    }

    #[test]
    fn unrelated_names_are_borrowed_unchanged() {
        for n in [
            "lm_head.weight",
            "base_model.model.x",
            "visual_extra.w",
            "modelx.y",
        ] {
            assert!(matches!(canonical(n), Cow::Borrowed(_)), "{n}");
            assert_eq!(canonical(n), n);
        }
    }
}
