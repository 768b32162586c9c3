//! Unit tests of the encoder on the committed fixture tokenizer (Qwen2-VL template, vocab
//! 1000; tests/fixtures/chat/tokenizer): hand-checked label masks, image expansion and every
//! length outcome.

use super::*;
use crate::sample::Content;
use std::path::PathBuf;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat/tokenizer")
}

fn encoder(max_length: usize, truncation: Truncation) -> Encoder {
    let cfg = EncodeConfig {
        max_length,
        truncation,
        ..Default::default()
    };
    Encoder::from_model_dir(&fixture(), cfg).unwrap()
}

fn enc_pad_id() -> u32 {
    encoder(16, Truncation::Right)
        .tokenizer()
        .token_to_id("<|image_pad|>")
        .unwrap()
}

fn user(parts: Vec<Content>) -> Message {
    Message {
        role: Role::User,
        content: parts,
    }
}

fn text(t: &str) -> Content {
    Content::Text { text: t.into() }
}

const TRACE: &str = "<think>The left lower lobe is dense.</think><answer>B</answer>";

/// user(image, question) → assistant(trace) → user(text) → assistant("Yes.")
fn two_turns() -> Vec<Message> {
    vec![
        user(vec![Content::Image, text("Which lobe?")]),
        Message::text(Role::Assistant, TRACE),
        user(vec![text("Sure?")]),
        Message::text(Role::Assistant, "Yes."),
    ]
}

/// Maximal runs of labelled positions, decoded.
fn labelled_runs(enc: &Encoder, ids: &[u32], labels: &[i64]) -> Vec<String> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        if labels[i] == IGNORE {
            i += 1;
            continue;
        }
        let j = (i..ids.len())
            .find(|&j| labels[j] == IGNORE)
            .unwrap_or(ids.len());
        runs.push(enc.tokenizer().decode(&ids[i..j], false).unwrap());
        i = j;
    }
    runs
}

#[test]
fn two_turn_label_mask_by_hand() {
    let enc = encoder(4096, Truncation::Right);
    let (ids, labels) = enc.encode(&two_turns(), &[4]).unwrap();
    assert_eq!(ids.len(), labels.len());
    // Exactly each assistant text plus its <|im_end|>, nothing of the headers or newlines.
    assert_eq!(
        labelled_runs(&enc, &ids, &labels),
        [format!("{TRACE}<|im_end|>"), "Yes.<|im_end|>".into()]
    );
    // The decoded whole is the rendered template with the placeholder repeated 4 times.
    let text = enc.render(&two_turns()).unwrap();
    let expanded = text.replace("<|image_pad|>", &"<|image_pad|>".repeat(4));
    assert_eq!(enc.tokenizer().decode(&ids, false).unwrap(), expanded);
    // What precedes each learned run is the `assistant\n` header; what follows, "\n".
    let im_end = enc.tokenizer().token_to_id("<|im_end|>").unwrap();
    for (p, _) in ids
        .iter()
        .enumerate()
        .filter(|(p, &t)| t == im_end && labels[*p] != IGNORE)
    {
        assert_eq!(
            enc.tokenizer().decode(&ids[p + 1..p + 2], false).unwrap(),
            "\n"
        );
        assert_eq!(labels[p + 1], IGNORE);
    }
    let first = labels.iter().position(|&l| l != IGNORE).unwrap();
    assert!(enc
        .tokenizer()
        .decode(&ids[..first], false)
        .unwrap()
        .ends_with("<|im_start|>assistant\n"));
    // Labels equal ids where learned.
    assert!(labels
        .iter()
        .zip(&ids)
        .all(|(&l, &t)| l == IGNORE || l == t as i64));
}

#[test]
fn images_expand_to_their_token_counts() {
    let enc = encoder(4096, Truncation::Right);
    let msgs = vec![
        user(vec![Content::Image, text("then"), Content::Image]),
        Message::text(Role::Assistant, "Both."),
    ];
    let (ids, labels) = enc.encode(&msgs, &[3, 5]).unwrap();
    let pad = enc.tokenizer().token_to_id("<|image_pad|>").unwrap();
    let start = enc.tokenizer().token_to_id("<|vision_start|>").unwrap();
    let end = enc.tokenizer().token_to_id("<|vision_end|>").unwrap();
    let runs: Vec<(usize, usize)> = ids
        .iter()
        .enumerate()
        .filter(|(p, &t)| t == pad && (*p == 0 || ids[p - 1] != pad))
        .map(|(p, _)| (p, ids[p..].iter().take_while(|&&t| t == pad).count()))
        .collect();
    assert_eq!(runs.iter().map(|r| r.1).collect::<Vec<_>>(), [3, 5]);
    for (p, n) in runs {
        assert_eq!((ids[p - 1], ids[p + n]), (start, end));
        assert!(labels[p..p + n].iter().all(|&l| l == IGNORE));
    }
    assert_eq!(
        enc.encode(&msgs, &[3]),
        Err(Reason::ImageCountMismatch {
            placeholders: 2,
            images: 1
        })
    );
    assert_eq!(
        enc.encode(&msgs, &[3, 5, 7]),
        Err(Reason::ImageCountMismatch {
            placeholders: 2,
            images: 3
        })
    );
    // A literal placeholder typed into user text counts as one too.
    let sneaky = vec![
        user(vec![text("<|image_pad|>")]),
        Message::text(Role::Assistant, "x"),
    ];
    assert_eq!(
        enc.encode(&sneaky, &[]),
        Err(Reason::ImageCountMismatch {
            placeholders: 1,
            images: 0
        })
    );
}

#[test]
fn truncation_outcomes() {
    let msgs = two_turns();
    let full = encoder(4096, Truncation::Right)
        .encode(&msgs, &[4])
        .unwrap()
        .0
        .len();
    // Fits: unchanged.
    let (ids, _) = encoder(full, Truncation::Right)
        .encode(&msgs, &[4])
        .unwrap();
    assert_eq!(ids.len(), full);
    // Cut inside the last assistant turn: kept prefix, labels of the first turn survive.
    let enc = encoder(full - 3, Truncation::Right);
    let (ids, labels) = enc.encode(&msgs, &[4]).unwrap();
    assert_eq!(ids.len(), full - 3);
    assert_eq!(
        labelled_runs(&enc, &ids, &labels)[0],
        format!("{TRACE}<|im_end|>")
    );
    // Reject mode refuses the same sample.
    assert_eq!(
        encoder(full - 3, Truncation::Reject).encode(&msgs, &[4]),
        Err(Reason::TooLong {
            tokens: full,
            max_length: full - 3
        })
    );
    // Image tokens alone over the limit.
    assert_eq!(
        encoder(100, Truncation::Right).encode(&msgs, &[101]),
        Err(Reason::TooManyImageTokens {
            image_tokens: 101,
            max_length: 100
        })
    );
    // A cut that would fall inside (or just after the pads of) an image.
    let late_image = vec![
        user(vec![text("First look.")]),
        Message::text(Role::Assistant, "Ok."),
        user(vec![text("Now this:"), Content::Image]),
        Message::text(Role::Assistant, "Done."),
    ];
    let (ids, _) = encoder(4096, Truncation::Right)
        .encode(&late_image, &[50])
        .unwrap();
    let n = ids.len();
    let pad = enc_pad_id();
    let last_pad = ids.iter().rposition(|&t| t == pad).unwrap();
    // Inside the pads, or right after them but before <|vision_end|>: refused.
    for max_length in [last_pad - 5, last_pad + 1] {
        assert_eq!(
            encoder(max_length, Truncation::Right).encode(&late_image, &[50]),
            Err(Reason::TruncationCutsImage {
                tokens: n,
                max_length
            })
        );
    }
    // Keeping the whole image block is fine; the first turn's labels survive.
    let (ids, labels) = encoder(last_pad + 2, Truncation::Right)
        .encode(&late_image, &[50])
        .unwrap();
    assert_eq!(ids.len(), last_pad + 2);
    assert!(labels.iter().any(|&l| l != IGNORE));
    // Cutting everything after the first user turn leaves nothing to learn.
    let long_user = vec![
        user(vec![text(&"very long question ".repeat(40))]),
        Message::text(Role::Assistant, "Short."),
    ];
    assert_eq!(
        encoder(60, Truncation::Right).encode(&long_user, &[]),
        Err(Reason::NoSupervisedTokens)
    );
    assert_eq!(
        encoder(4096, Truncation::Right).encode(&msgs[..1], &[4]),
        Err(Reason::NoSupervisedTokens)
    );
}

#[test]
fn prompt_encoding_ends_with_generation_header() {
    let enc = encoder(4096, Truncation::Right);
    let ids = enc.encode_prompt(&two_turns()[..3], &[4]).unwrap();
    let text = enc.tokenizer().decode(&ids, false).unwrap();
    assert!(
        text.ends_with("Sure?<|im_end|>\n<|im_start|>assistant\n"),
        "{text}"
    );
    // Prompts are never cut.
    let n = ids.len();
    assert_eq!(
        encoder(n - 1, Truncation::Right).encode_prompt(&two_turns()[..3], &[4]),
        Err(Reason::TooLong {
            tokens: n,
            max_length: n - 1
        })
    );
}

#[test]
fn prefix_unstable_template_is_a_template_error() {
    // Drops the text of every assistant turn but the last (like templates that strip old
    // reasoning): spans of earlier turns cannot be located.
    let src = "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and not loop.last %}[...]{% else %}{{ m.content[0].text }}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::copy(
        fixture().join("tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .unwrap();
    std::fs::write(dir.path().join("chat_template.jinja"), src).unwrap();
    let enc = Encoder::from_model_dir(dir.path(), EncodeConfig::default()).unwrap();
    let msgs = vec![
        two_turns()[1].clone(),
        two_turns()[2].clone(),
        two_turns()[3].clone(),
    ];
    let msgs = [vec![user(vec![text("Q")])], msgs].concat();
    match enc.encode(&msgs, &[]) {
        Err(Reason::TemplateError(m)) => assert!(m.contains("prefix-stable"), "{m}"),
        other => panic!("expected a TemplateError, got {other:?}"),
    }
    // With a single assistant turn the same template is stable and works.
    assert!(enc.encode(&msgs[..2], &[]).is_ok());
}

#[test]
fn debug_view_is_compact() {
    let enc = encoder(4096, Truncation::Right);
    let (ids, labels) = enc.encode(&two_turns(), &[64]).unwrap();
    let view = enc.render_debug(&ids, &labels);
    assert!(
        view.contains("<|vision_start|><|image_pad|>×64<|vision_end|>Which lobe?"),
        "{view}"
    );
    assert!(
        view.contains(&format!("assistant\n⟦{TRACE}<|im_end|>⟧\n")),
        "{view}"
    );
    assert!(view.ends_with("⟦Yes.<|im_end|>⟧\n"), "{view}");
    assert_eq!(view.matches('⟦').count(), 2);
}

#[test]
fn encoder_can_be_shared_across_loader_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Encoder>();
}

#[test]
fn missing_image_token_is_a_load_error() {
    let cfg = EncodeConfig {
        image_token: "<image>".into(),
        ..Default::default()
    };
    let err = Encoder::from_model_dir(&fixture(), cfg)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("<image>") && err.contains("tokenizer.json"),
        "{err}"
    );
}
