//! Parity of the chat module with transformers 4.57.1, on fixtures written by
//! `scripts/fixtures/make_chat_fixtures.py` (see tests/fixtures/chat/README.md):
//! - every golden conversation renders byte for byte as `apply_chat_template(…, tokenize=False)`
//!   with each stored template (Qwen2-VL, Qwen2.5-VL, Qwen2-VL with `{% generation %}` tags);
//! - our tokenizer gives transformers' `AutoTokenizer` ids on the fixture strings;
//! - our labels are exactly transformers' assistant mask (from the `generation` template)
//!   plus the `<|im_end|>` closing each assistant turn;
//! - training the fixture tokenizer again reproduces the committed files byte for byte.

use omr_data::chat::{ChatError, ChatTemplate, ContentStyle, EncodeConfig, Encoder, RenderOptions};
use omr_data::sample::{Content, Message, Role};
use omr_data::tokenizer_train::train_tokenizer;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
];

fn fix() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The golden file twice: as serde_json (convenient) and as a minijinja value (keeps the key
/// order of every message object, as Python dicts do).
fn golden(name: &str) -> (serde_json::Value, minijinja::Value) {
    let text = read(&fix().join(name));
    (
        serde_json::from_str(&text).unwrap(),
        serde_json::from_str(&text).unwrap(),
    )
}

/// A model folder with the fixture tokenizer and `template` as its `chat_template.jinja`.
fn model_dir(template: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fix().join("tokenizer").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("chat_template.jinja"), template).unwrap();
    dir
}

/// HF messages → our `Message`s (string content becomes one text part).
fn to_messages(v: &serde_json::Value) -> Vec<Message> {
    let arr = v.as_array().unwrap();
    arr.iter()
        .map(|m| {
            let role: Role = serde_json::from_value(m["role"].clone()).unwrap();
            let content = match &m["content"] {
                serde_json::Value::String(s) => vec![Content::Text { text: s.clone() }],
                parts => serde_json::from_value(parts.clone()).unwrap(),
            };
            Message { role, content }
        })
        .collect()
}

fn style(case: &serde_json::Value) -> Option<ContentStyle> {
    match case["our_style"].as_str() {
        Some("parts") => Some(ContentStyle::Parts),
        Some("string_if_text_only") => Some(ContentStyle::StringIfTextOnly),
        _ => None,
    }
}

fn kwargs(case: &serde_json::Value) -> BTreeMap<String, serde_json::Value> {
    case["kwargs"]
        .as_object()
        .map(|o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

#[test]
fn render_parity_with_transformers() {
    let (json, mj) = golden("golden_render.json");
    let mut checked = 0;
    for template in json["templates"].as_array().unwrap() {
        let name = template.as_str().unwrap();
        let dir = model_dir(&read(&fix().join(format!("{name}.jinja"))));
        let tmpl = ChatTemplate::from_model_dir(dir.path()).unwrap();
        for (i, case) in json["cases"].as_array().unwrap().iter().enumerate() {
            let want = case["expected"][name].as_str().unwrap();
            let mut opts = RenderOptions {
                add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
                extra: kwargs(case),
                ..Default::default()
            };
            let messages = mj
                .get_attr("cases")
                .unwrap()
                .get_item(&i.into())
                .unwrap()
                .get_attr("messages")
                .unwrap();
            let got = tmpl.render_value(messages, &opts).unwrap();
            assert_eq!(got, want, "template {name}, case {}", case["name"]);
            // The same conversation through our own Message type.
            if let Some(s) = style(case) {
                opts.content_style = s;
                let got = tmpl.render(&to_messages(&case["messages"]), &opts).unwrap();
                assert_eq!(
                    got, want,
                    "template {name}, case {} via Message",
                    case["name"]
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} renders checked");
}

#[test]
fn qwen_template_const_is_the_fixture() {
    let fixture = read(&fix().join("qwen2_vl.jinja"));
    assert_eq!(omr_data::chat::qwen::QWEN2_VL_CHAT_TEMPLATE, fixture);
    assert_eq!(read(&fix().join("tokenizer/chat_template.jinja")), fixture);
}

#[test]
fn token_ids_match_transformers() {
    let (json, _) = golden("golden_tokens.json");
    let tok = tokenizers::Tokenizer::from_file(fix().join("tokenizer/tokenizer.json")).unwrap();
    for case in json["strings"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(
            tok.encode(text, false).unwrap().get_ids(),
            want.as_slice(),
            "{text:?}"
        );
    }
}

/// Positions of `<|im_end|>` tokens that close an assistant turn (the turn's header decodes
/// to `assistant\n`).
fn assistant_ends(tok: &tokenizers::Tokenizer, ids: &[u32]) -> Vec<usize> {
    let (start, end) = (
        tok.token_to_id("<|im_start|>").unwrap(),
        tok.token_to_id("<|im_end|>").unwrap(),
    );
    let mut out = Vec::new();
    for (s, _) in ids.iter().enumerate().filter(|(_, &t)| t == start) {
        let e = s + ids[s..].iter().position(|&t| t == end).unwrap();
        if tok
            .decode(&ids[s + 1..e], false)
            .unwrap()
            .starts_with("assistant\n")
        {
            out.push(e);
        }
    }
    out
}

#[test]
fn labels_are_transformers_assistant_mask_plus_im_end() {
    let (json, _) = golden("golden_tokens.json");
    let dir = model_dir(&read(&fix().join("qwen2_vl_generation.jinja")));
    let mut checked = 0;
    for case in json["encode"].as_array().unwrap() {
        let Some(content_style) = style(case) else {
            continue;
        };
        let cfg = EncodeConfig {
            max_length: 1 << 20,
            content_style,
            template_kwargs: kwargs(case),
            ..Default::default()
        };
        let enc = Encoder::from_model_dir(dir.path(), cfg).unwrap();
        let messages = to_messages(&case["messages"]);
        let counts = vec![1; messages.iter().map(Message::image_count).sum()];
        let (ids, labels) = enc.encode(&messages, &counts).unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        assert_eq!(ids, want_ids, "case {}", case["name"]);
        let mask: Vec<u8> = serde_json::from_value(case["assistant_masks"].clone()).unwrap();
        let mut want: Vec<bool> = mask.iter().map(|&m| m == 1).collect();
        for e in assistant_ends(enc.tokenizer(), &ids) {
            want[e] = true;
        }
        let got: Vec<bool> = labels.iter().map(|&l| l != -100).collect();
        assert_eq!(
            got,
            want,
            "case {}: {}",
            case["name"],
            enc.render_debug(&ids, &labels)
        );
        for (l, id) in labels.iter().zip(&ids) {
            assert!(*l == -100 || *l == *id as i64);
        }
        checked += 1;
    }
    assert!(checked >= 6, "only {checked} encode cases checked");
}

#[test]
fn template_file_precedence_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let err = ChatTemplate::from_model_dir(p).unwrap_err();
    assert!(
        matches!(err, ChatError::NoTemplate { .. })
            && err.to_string().contains(&p.display().to_string())
    );
    let named = |names: &[&str]| {
        let list: Vec<_> = names
            .iter()
            .map(|n| serde_json::json!({"name": n, "template": format!("T-{n}")}))
            .collect();
        serde_json::json!({ "chat_template": list, "eos_token": {"content": "</e>", "special": true} }).to_string()
    };
    std::fs::write(p.join("tokenizer_config.json"), named(&["tool_use"])).unwrap();
    let err = ChatTemplate::from_model_dir(p).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer_config.json")
            && err.contains("default")
            && err.contains("tool_use"),
        "{err}"
    );
    std::fs::write(
        p.join("tokenizer_config.json"),
        named(&["tool_use", "default"]),
    )
    .unwrap();
    let t = ChatTemplate::from_model_dir(p).unwrap();
    assert_eq!(
        t.render(&[], &RenderOptions::default()).unwrap(),
        "T-default"
    );
    assert_eq!(t.special_token("eos_token"), Some("</e>"));
    std::fs::write(
        p.join("chat_template.json"),
        r#"{"chat_template": "from json"}"#,
    )
    .unwrap();
    assert_eq!(
        ChatTemplate::from_model_dir(p).unwrap().source(),
        "from json"
    );
    std::fs::write(p.join("chat_template.jinja"), "from jinja{{ eos_token }}\n").unwrap();
    let t = ChatTemplate::from_model_dir(p).unwrap();
    assert_eq!(
        t.render(&[], &RenderOptions::default()).unwrap(),
        "from jinja</e>"
    );
    std::fs::write(p.join("chat_template.jinja"), "{% if %}").unwrap();
    let err = ChatTemplate::from_model_dir(p).unwrap_err().to_string();
    assert!(
        err.contains("chat_template.jinja") && err.contains("does not compile"),
        "{err}"
    );
}

/// The committed tokenizer is what `train_tokenizer` makes of the committed corpus, byte for
/// byte. `OMR_REGEN_FIXTURES=1` rewrites it.
#[test]
fn tokenizer_fixture() {
    let corpus = read(&fix().join("corpus.txt"));
    let out = tempfile::tempdir().unwrap();
    let lines: Vec<String> = corpus.lines().map(String::from).collect();
    let tok = train_tokenizer(lines.into_iter(), 1000, out.path()).unwrap();
    assert_eq!(tok.get_vocab_size(true), 1000);
    let target = fix().join("tokenizer");
    if std::env::var_os("OMR_REGEN_FIXTURES").is_some() {
        std::fs::create_dir_all(&target).unwrap();
        for f in TOKENIZER_FILES {
            std::fs::copy(out.path().join(f), target.join(f)).unwrap();
        }
    }
    for f in TOKENIZER_FILES {
        let want = std::fs::read(target.join(f)).unwrap_or_else(|e| {
            panic!(
                "{f}: {e}; generate it with OMR_REGEN_FIXTURES=1 (tests/fixtures/chat/README.md)"
            )
        });
        assert!(
            std::fs::read(out.path().join(f)).unwrap() == want,
            "{f} differs from the committed fixture"
        );
    }
}
