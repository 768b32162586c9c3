//! Conversation → `(input_ids, labels)` for SFT, and prompt ids for generation.
//!
//! Steps of [`Encoder::encode`]:
//! 1. Render the whole conversation with the model's template (no generation prompt).
//! 2. Find each assistant turn as a character span without knowing the template: render the
//!    conversation up to turn k with `add_generation_prompt=true` (ends right where the
//!    assistant's text starts) and up to and including turn k (ends after the turn). Both
//!    must be prefixes of the full text, or the template rewrites earlier turns (e.g. drops
//!    old reasoning) and spans cannot be trusted: `TemplateError`. The learned part of a turn
//!    runs to the end of its last end-of-turn marker (`eos_token`, `<|im_end|>` for Qwen), so
//!    the newline a template puts after `<|im_end|>` is not learned; without a marker, up to
//!    the turn's trailing whitespace.
//! 3. Tokenize the full text once (so ids equal transformers' `apply_chat_template(…,
//!    tokenize=True)`) and label every token whose byte range overlaps a span (what
//!    transformers' `char_to_token` masks do); everything else is -100.
//! 4. Expand the i-th `<|image_pad|>` token to `image_token_counts[i]` copies (never labelled).
//! 5. Enforce `max_length` (see [`Truncation`]); at least one label must survive.
//!
//! Labels are aligned with `input_ids` (HF convention: the shift happens in the loss).

use super::messages::ContentStyle;
use super::template::{ChatTemplate, RenderOptions};
use super::{qwen, ChatError};
use crate::quarantine::Reason;
use crate::sample::{Message, Role};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use tokenizers::Tokenizer;

/// Label of a position that takes no loss.
pub const IGNORE: i64 = -100;

/// What to do with a sample longer than `max_length`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    /// Cut tokens from the end, unless the cut would remove any image token
    /// (`TruncationCutsImage`: the vision features would no longer match the placeholders).
    #[default]
    Right,
    /// Reject every over-long sample (`TooLong`).
    Reject,
}

/// The `[data.chat]`-style settings of the encoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncodeConfig {
    /// Longest sequence, image tokens included.
    pub max_length: usize,
    pub truncation: Truncation,
    /// Marker that closes an assistant turn and is learned with it; unset = the tokenizer
    /// config's `eos_token` (`<|im_end|>` for Qwen2-VL).
    pub end_of_turn: Option<String>,
    /// Placeholder token the template writes once per image.
    pub image_token: String,
    pub content_style: ContentStyle,
    /// Extra template variables, e.g. `add_vision_id = true`.
    pub template_kwargs: BTreeMap<String, serde_json::Value>,
}

impl Default for EncodeConfig {
    fn default() -> Self {
        EncodeConfig {
            // Qwen2-VL SFT recipes use 2k–8k; 4096 fits one 1-megapixel image plus a long trace.
            max_length: 4096,
            truncation: Truncation::Right,
            end_of_turn: None,
            image_token: qwen::IMAGE_PAD.to_string(),
            content_style: ContentStyle::Parts,
            template_kwargs: BTreeMap::new(),
        }
    }
}

/// Tokenizer + chat template + settings: turns conversations into training sequences.
pub struct Encoder {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    cfg: EncodeConfig,
    image_id: u32,
    vision_end_id: Option<u32>,
    end_of_turn: Option<String>,
}

impl Encoder {
    /// Loads `tokenizer.json` and the chat template of a model or tokenizer folder.
    pub fn from_model_dir(dir: &Path, cfg: EncodeConfig) -> Result<Self, ChatError> {
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| ChatError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let template = ChatTemplate::from_model_dir(dir)?;
        Self::new(tokenizer, template, cfg, &path)
    }

    /// `source` names where the tokenizer came from, for error messages.
    pub fn new(
        mut tokenizer: Tokenizer,
        template: ChatTemplate,
        cfg: EncodeConfig,
        source: &Path,
    ) -> Result<Self, ChatError> {
        // Length is handled here, image-aware; a truncation/padding block left in a
        // tokenizer.json would otherwise cut or pad silently.
        tokenizer
            .with_truncation(None)
            .map_err(|e| ChatError::Tokenizer {
                path: source.into(),
                message: e.to_string(),
            })?;
        tokenizer.with_padding(None);
        let image_id =
            tokenizer
                .token_to_id(&cfg.image_token)
                .ok_or_else(|| ChatError::MissingToken {
                    path: source.into(),
                    token: cfg.image_token.clone(),
                    hint:
                        "set `image_token` in the encoder config to the model's image placeholder"
                            .into(),
                })?;
        let end_of_turn = cfg
            .end_of_turn
            .clone()
            .or_else(|| template.special_token("eos_token").map(String::from));
        Ok(Encoder {
            vision_end_id: tokenizer.token_to_id(qwen::VISION_END),
            tokenizer,
            template,
            cfg,
            image_id,
            end_of_turn,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }
    pub fn config(&self) -> &EncodeConfig {
        &self.cfg
    }

    fn opts(&self, add_generation_prompt: bool) -> RenderOptions {
        RenderOptions {
            add_generation_prompt,
            extra: self.cfg.template_kwargs.clone(),
            content_style: self.cfg.content_style,
        }
    }

    /// The full rendered text of a training conversation.
    pub fn render(&self, messages: &[Message]) -> Result<String, Reason> {
        self.template.render(messages, &self.opts(false))
    }

    /// Training ids and labels; `image_token_counts[i]` is the number of vision tokens of the
    /// i-th image (`grid_t·grid_h·grid_w / merge²`). ids: (T,), labels: (T,).
    pub fn encode(
        &self,
        messages: &[Message],
        image_token_counts: &[usize],
    ) -> Result<(Vec<u32>, Vec<i64>), Reason> {
        if !messages.iter().any(|m| m.role == Role::Assistant) {
            return Err(Reason::NoSupervisedTokens);
        }
        let full = self.render(messages)?;
        let spans = self.assistant_spans(messages, &full)?;
        let tokens = self.tokenize(&full)?;
        let labels = label_tokens(tokens.get_ids(), tokens.get_offsets(), &spans);
        let (mut ids, mut labels) =
            self.expand_images(tokens.get_ids(), &labels, image_token_counts)?;
        self.fit_length(&mut ids, &mut labels, image_token_counts, true)?;
        if labels.iter().all(|&l| l == IGNORE) {
            return Err(Reason::NoSupervisedTokens);
        }
        Ok((ids, labels))
    }

    /// Prompt ids for generation (GRPO rollouts, eval): the conversation with the generation
    /// prompt appended, images expanded. Never truncated: a cut prompt loses the assistant
    /// header, so an over-long prompt is `TooLong`.
    pub fn encode_prompt(
        &self,
        messages: &[Message],
        image_token_counts: &[usize],
    ) -> Result<Vec<u32>, Reason> {
        let text = self.template.render(messages, &self.opts(true))?;
        let tokens = self.tokenize(&text)?;
        let labels = vec![IGNORE; tokens.get_ids().len()];
        let (mut ids, mut labels) =
            self.expand_images(tokens.get_ids(), &labels, image_token_counts)?;
        self.fit_length(&mut ids, &mut labels, image_token_counts, false)?;
        Ok(ids)
    }

    /// Compact view of a sequence and its mask (see [`super::debug::render_debug`]).
    pub fn render_debug(&self, ids: &[u32], labels: &[i64]) -> String {
        super::debug::render_debug(&self.tokenizer, self.image_id, ids, labels)
    }

    /// Byte spans of `full` that are learned: each assistant turn's text + end-of-turn marker.
    fn assistant_spans(
        &self,
        messages: &[Message],
        full: &str,
    ) -> Result<Vec<Range<usize>>, Reason> {
        let mut spans = Vec::new();
        for (k, m) in messages.iter().enumerate() {
            if m.role != Role::Assistant {
                continue;
            }
            let before = self.template.render(&messages[..k], &self.opts(true))?;
            let through = self.template.render(&messages[..=k], &self.opts(false))?;
            if !through.starts_with(&before) || !full.starts_with(&through) {
                return Err(Reason::TemplateError(format!(
                    "chat template is not prefix-stable at message {k} (assistant): rendering the \
                     conversation up to a turn does not start the full rendering, so assistant \
                     text cannot be located; templates that rewrite earlier turns (e.g. drop old \
                     reasoning) or need a non-assistant first message are not supported for SFT"
                )));
            }
            let turn = &through[before.len()..];
            let end = match self.end_of_turn.as_deref().filter(|s| !s.is_empty()) {
                Some(marker) => match turn.rfind(marker) {
                    Some(at) => at + marker.len(),
                    None => turn.trim_end().len(),
                },
                None => turn.trim_end().len(),
            };
            if end > 0 {
                spans.push(before.len()..before.len() + end);
            }
        }
        Ok(spans)
    }

    /// Token ids with byte offsets into `text`, no special tokens added (as transformers).
    fn tokenize(&self, text: &str) -> Result<tokenizers::Encoding, Reason> {
        self.tokenizer
            .encode(text, false)
            .map_err(|e| Reason::TokenizerError(e.to_string()))
    }

    /// Replaces the i-th image placeholder by `counts[i]` copies (labels -100).
    fn expand_images(
        &self,
        ids: &[u32],
        labels: &[i64],
        counts: &[usize],
    ) -> Result<(Vec<u32>, Vec<i64>), Reason> {
        let placeholders = ids.iter().filter(|&&t| t == self.image_id).count();
        if placeholders != counts.len() {
            return Err(Reason::ImageCountMismatch {
                placeholders,
                images: counts.len(),
            });
        }
        if let Some(i) = counts.iter().position(|&c| c == 0) {
            return Err(Reason::BadConversation(format!(
                "image {i} would expand to 0 tokens"
            )));
        }
        let total = ids.len() - placeholders + counts.iter().sum::<usize>();
        let (mut out_ids, mut out_labels) = (Vec::with_capacity(total), Vec::with_capacity(total));
        let mut next = counts.iter();
        for (&id, &label) in ids.iter().zip(labels) {
            if id == self.image_id {
                let n = next.next().copied().unwrap_or(0);
                out_ids.extend(std::iter::repeat_n(id, n));
                out_labels.extend(std::iter::repeat_n(IGNORE, n));
            } else {
                out_ids.push(id);
                out_labels.push(label);
            }
        }
        Ok((out_ids, out_labels))
    }

    /// Applies `max_length`: image tokens alone too many → `TooManyImageTokens`; otherwise
    /// over-long → cut from the right (training, `Truncation::Right`, when no image token
    /// is cut) or `TooLong` / `TruncationCutsImage`.
    fn fit_length(
        &self,
        ids: &mut Vec<u32>,
        labels: &mut Vec<i64>,
        counts: &[usize],
        may_cut: bool,
    ) -> Result<(), Reason> {
        let max_length = self.cfg.max_length;
        let image_tokens: usize = counts.iter().sum();
        if image_tokens > max_length {
            return Err(Reason::TooManyImageTokens {
                image_tokens,
                max_length,
            });
        }
        let tokens = ids.len();
        if tokens <= max_length {
            return Ok(());
        }
        if !may_cut || self.cfg.truncation == Truncation::Reject {
            return Err(Reason::TooLong { tokens, max_length });
        }
        if self.last_image_end(ids) > max_length {
            return Err(Reason::TruncationCutsImage { tokens, max_length });
        }
        ids.truncate(max_length);
        labels.truncate(max_length);
        Ok(())
    }

    /// One past the last image token, its closing `<|vision_end|>` included (0 without
    /// images): a cut must not fall before it.
    fn last_image_end(&self, ids: &[u32]) -> usize {
        match ids.iter().rposition(|&t| t == self.image_id) {
            None => 0,
            Some(last) => match ids.get(last + 1) {
                Some(&t) if Some(t) == self.vision_end_id => last + 2,
                _ => last + 1,
            },
        }
    }
}

/// Labels tokens whose byte range overlaps a span (`spans` sorted, disjoint).
fn label_tokens(ids: &[u32], offsets: &[(usize, usize)], spans: &[Range<usize>]) -> Vec<i64> {
    let mut labels = vec![IGNORE; ids.len()];
    let mut s = 0;
    for (i, &(start, end)) in offsets.iter().enumerate() {
        while s < spans.len() && spans[s].end <= start {
            s += 1;
        }
        if let Some(span) = spans.get(s) {
            if start < span.end && end > span.start {
                labels[i] = ids[i] as i64;
            }
        }
    }
    labels
}

#[cfg(test)]
#[path = "encode_tests.rs"]
mod tests;
