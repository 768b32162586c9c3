//! A compact, human view of one encoded sample (`omr data render`).
//!
//! The decoded text is printed as it is (newlines kept, special tokens spelled out), learned
//! tokens inside `⟦…⟧`, and runs of the image placeholder collapsed to `<|image_pad|>×N`, so a
//! 1000-token image takes one line and the loss mask can be read at a glance:
//!
//! ```text
//! <|im_start|>user
//! <|vision_start|><|image_pad|>×64<|vision_end|>Which lobe?<|im_end|>
//! <|im_start|>assistant
//! ⟦<think>…</think><answer>B</answer><|im_end|>⟧
//! ```
//!
//! Text is decoded run by run (not token by token) so multi-byte characters split across
//! byte-level tokens come out whole.

use super::encode::IGNORE;
use tokenizers::Tokenizer;

/// Renders ids with their mask. `ids` and `labels` are (T,); a label other than -100 marks a
/// learned position.
pub fn render_debug(tokenizer: &Tokenizer, image_id: u32, ids: &[u32], labels: &[i64]) -> String {
    let image_token = tokenizer
        .id_to_token(image_id)
        .unwrap_or_else(|| format!("<id {image_id}>"));
    let learned = |i: usize| labels.get(i).is_some_and(|&l| l != IGNORE);
    let mut out = String::new();
    let mut i = 0;
    while i < ids.len() {
        // A maximal run of equal mask state.
        let state = learned(i);
        let mut j = i;
        while j < ids.len() && learned(j) == state {
            j += 1;
        }
        if state {
            out.push('⟦');
        }
        push_run(&mut out, tokenizer, image_id, &image_token, &ids[i..j]);
        if state {
            out.push('⟧');
        }
        i = j;
    }
    out
}

/// Decodes one run, collapsing consecutive image placeholders.
fn push_run(
    out: &mut String,
    tokenizer: &Tokenizer,
    image_id: u32,
    image_token: &str,
    ids: &[u32],
) {
    let mut i = 0;
    while i < ids.len() {
        let is_image = ids[i] == image_id;
        let mut j = i;
        while j < ids.len() && (ids[j] == image_id) == is_image {
            j += 1;
        }
        if is_image {
            out.push_str(image_token);
            if j - i > 1 {
                out.push_str(&format!("×{}", j - i));
            }
        } else {
            match tokenizer.decode(&ids[i..j], false) {
                Ok(text) => out.push_str(&text),
                Err(_) => out.push_str(&format!("<undecodable {:?}>", &ids[i..j])),
            }
        }
        i = j;
    }
}
