//! Readers end to end on tiny datasets built in temp folders: exact block and row counts,
//! sample contents, one malformed record of every kind a reader rejects (right reason, right
//! row, the other rows still read), path confinement, file-level errors, and Hub resolution
//! from the cache (offline) and from a fake Hub server on localhost (online).

#[path = "readers_fixtures/mod.rs"]
mod fixtures;

use arrow_array::{ArrayRef, Int64Array, LargeBinaryArray, LargeStringArray, StringArray};
use fixtures::check::*;
use fixtures::*;
use omr_data::source::{self, Format, SourceError, SourceSpec};
use omr_data::{Content, Message, Reason, Role};
use serde_json::json;
use std::sync::Arc;

// ---------------------------------------------------------------- parquet

#[test]
fn parquet_row_groups_samples_and_bad_rows() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("omr");
    omr_dataset(&dir);
    let src = source::open(&SourceSpec::local(&dir, "train")).expect("opens");
    assert_eq!(src.shards(), ["data/train-00000-of-00001.parquet"]);
    assert_eq!(
        blocks(src.as_ref()),
        [(0, 0, 4), (0, 4, 4), (0, 8, 4), (0, 12, 1)]
    );
    assert_eq!(src.len(), 13);
    let rows = read_all(src.as_ref());
    assert_eq!(
        failures(&rows),
        [
            (1, "missing_field"),
            (2, "image_missing"),
            (4, "image_not_found"),
            (5, "path_escapes_root"),
            (6, "question_without_options"),
            (7, "duplicate_option"),
            (8, "answer_not_an_option"),
            (9, "trace_answer_mismatch"),
            (10, "malformed_trace"),
            (11, "missing_field"),
        ]
    );
    assert_eq!(err(&rows, 1), &Reason::MissingField("question".into()));
    assert_eq!(err(&rows, 11), &Reason::MissingField("reasoning".into()));
    assert_eq!(
        err(&rows, 9),
        &Reason::TraceAnswerMismatch {
            trace: "B".into(),
            answer: "C".into()
        }
    );

    let s = ok(&rows, 0);
    assert_eq!(s.origin.source, format!("{}:train", dir.display()));
    assert_eq!(s.origin.shard, "data/train-00000-of-00001.parquet");
    assert_eq!(s.images.len(), 1);
    assert_eq!(s.images[0].bytes, jpeg(0));
    assert_eq!(s.images[0].path.as_deref(), Some("0.jpg"));
    assert_eq!(
        s.messages,
        [
            Message {
                role: Role::User,
                content: vec![Content::Image, text(Q)]
            },
            Message::text(Role::Assistant, trace("B")),
        ]
    );
    let mcq = s.mcq.as_ref().expect("mcq");
    assert_eq!(mcq.answer, "B");
    assert_eq!(mcq.options.len(), 4);
    assert_eq!(mcq.options[3], ("D".to_string(), "Mass".to_string()));
    assert_eq!(s.reasoning.as_deref(), Some(trace("B").as_str()));
    let rubric = s.rubric.as_ref().expect("rubric");
    assert_eq!(rubric.perception.len(), 2);
    assert_eq!(rubric.perception[1].claim, "Visible pleural line");
    assert_eq!(rubric.perception[1].importance, "supporting");
    assert_eq!(
        rubric.perception[1].topic, "",
        "missing struct field reads as empty"
    );
    assert!(rubric.knowledge.is_empty() && rubric.rationale.is_empty());
    assert_eq!(
        s.meta.get("task_family").map(String::as_str),
        Some("Diagnosis")
    );
    assert_eq!(s.meta.get("id").map(String::as_str), Some("100"));

    let from_path = ok(&rows, 3);
    assert_eq!(from_path.images[0].bytes, jpeg(33));
    let last = ok(&rows, 12);
    assert_eq!(last.mcq.as_ref().expect("mcq").answer, "B");
    assert_eq!(
        last.rubric, None,
        "empty or null rubric lists give no rubric"
    );
    assert!(!last.meta.contains_key("task_family"));

    let test = source::open(&SourceSpec::local(&dir, "test")).expect("test split");
    assert_eq!(
        (test.shards().len(), test.len(), test.blocks().len()),
        (1, 2, 1)
    );
    let single = source::open(&SourceSpec::local(
        dir.join("data/test-00000-of-00001.parquet"),
        "ignored",
    ))
    .expect("single file");
    assert_eq!(single.shards(), ["test-00000-of-00001.parquet"]);
}

#[test]
fn parquet_large_types_plain_binary_and_reasoning_trace() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("train").join("part0.parquet");
    let large = |v: Vec<Option<&str>>| -> ArrayRef { Arc::new(LargeStringArray::from(v)) };
    let images: Vec<Option<&[u8]>> = vec![Some(&[1, 2, 3]), Some(&[])];
    write_batch(
        &path,
        batch(vec![
            ("image", Arc::new(LargeBinaryArray::from(images))),
            ("question", large(vec![Some(Q), Some(Q)])),
            (
                "reasoning_trace",
                large(vec![Some(&trace("D")), Some(&trace("D"))]),
            ),
            ("answer", large(vec![Some("D"), Some("D")])),
            (
                "modality",
                Arc::new(StringArray::from(vec![Some("CT"), None])),
            ),
        ]),
        100,
    );
    let src = source::open(&SourceSpec::local(tmp.path(), "train")).expect("opens");
    let rows = read_all(src.as_ref());
    let s = ok(&rows, 0);
    assert_eq!(
        (s.images[0].bytes.as_slice(), s.images[0].path.as_deref()),
        (&[1u8, 2, 3][..], None)
    );
    assert_eq!(s.reasoning.as_deref(), Some(trace("D").as_str()));
    assert_eq!(s.meta.get("modality").map(String::as_str), Some("CT"));
    assert_eq!(err(&rows, 1), &Reason::ImageEmpty);
}

#[test]
fn parquet_file_level_errors_name_file_and_column() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let strs = |v: &str| -> ArrayRef { Arc::new(StringArray::from(vec![Some(v)])) };
    let bin: ArrayRef = Arc::new(arrow_array::BinaryArray::from(vec![Some(&b"x"[..])]));
    let no_answer = tmp.path().join("a/data/train-0.parquet");
    write_batch(
        &no_answer,
        batch(vec![
            ("image", bin.clone()),
            ("question", strs(Q)),
            ("reasoning", strs("r")),
        ]),
        10,
    );
    let e = open_err(&SourceSpec::local(tmp.path().join("a"), "train"));
    assert!(matches!(e, SourceError::Schema { .. }), "{e}");
    assert!(
        e.to_string().contains("train-0.parquet") && e.to_string().contains("`answer`"),
        "{e}"
    );

    let int_question = tmp.path().join("b/train.parquet");
    let ints: ArrayRef = Arc::new(Int64Array::from(vec![Some(1)]));
    write_batch(
        &int_question,
        batch(vec![
            ("image", bin),
            ("question", ints),
            ("reasoning", strs("r")),
            ("answer", strs("A")),
        ]),
        10,
    );
    let e = open_err(&SourceSpec::local(tmp.path().join("b"), "train"));
    assert!(
        e.to_string().contains("train.parquet") && e.to_string().contains("`question` is Int64"),
        "{e}"
    );

    std::fs::create_dir_all(tmp.path().join("c/data")).expect("mkdir");
    std::fs::write(
        tmp.path().join("c/data/train-0.parquet"),
        b"PAR1 this is not parquet",
    )
    .expect("write");
    let e = open_err(&SourceSpec::local(tmp.path().join("c"), "train"));
    assert!(
        matches!(e, SourceError::Parquet { ref path, .. } if path.ends_with("train-0.parquet")),
        "{e}"
    );
}

// ---------------------------------------------------------------- JSONL / JSON

#[test]
fn llava_jsonl_blocks_contents_and_bad_lines() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("llava");
    image_folder(&dir);
    let mcq_reply = "<think>Air without markings.</think><answer>B</answer>";
    let mut lines = vec![
        line(
            json!({"id": "s0", "source": "vqa-rad", "image": "images/a.jpg",
                    "conversations": turns("<image>\nWhat is shown?", "A chest X-ray.")}),
        ),
        llava(
            json!(["images/a.jpg", "images/b.png"]),
            json!([
            {"from": "system", "value": "You are a radiologist."},
            {"from": "human", "value": "Compare <image> and <image>"},
            {"from": "gpt", "value": "Same."}]),
        ),
        llava(
            json!("images/a.jpg"),
            turns(&format!("<image>\n{Q}"), mcq_reply),
        ),
        b"{\"conversations\": [".to_vec(),
        b"{\"conversations\": \"\xff\xfe\"}".to_vec(),
        llava(json!(null), json!([{"from": "human", "value": "hi"}])),
        llava(
            json!(null),
            json!([{"from": "doctor", "value": "hi"}, {"from": "gpt", "value": "x"}]),
        ),
        llava(json!(null), json!([])),
        llava(json!("images/a.jpg"), turns("<image> vs <image>", "x")),
        llava(json!("images/none.jpg"), turns("<image>", "x")),
        llava(json!("../secret.jpg"), turns("<image>", "x")),
        llava(json!("/etc/passwd"), turns("<image>", "x")),
        llava(json!("images/link.jpg"), turns("<image>", "x")),
        line(json!({"image": "images/a.jpg"})),
        Vec::new(),
    ];
    for i in 0..290 {
        lines.push(llava(
            json!(null),
            turns(&format!("text-only question {i}"), "answer"),
        ));
    }
    write_lines(&dir.join("train.jsonl"), &lines);
    let src = source::open(&SourceSpec::local(dir.join("train.jsonl"), "train")).expect("opens");
    assert_eq!(
        blocks(src.as_ref()),
        [(0, 0, 256), (0, 256, 48)],
        "blank line is not a record"
    );
    let rows = read_all(src.as_ref());
    assert_eq!(
        failures(&rows),
        [
            (3, "malformed_json"),
            (4, "invalid_utf8"),
            (5, "bad_conversation"),
            (6, "bad_conversation"),
            (7, "bad_conversation"),
            (8, "image_count_mismatch"),
            (9, "image_not_found"),
            (10, "path_escapes_root"),
            (11, "path_escapes_root"),
            (12, "path_escapes_root"),
            (13, "missing_field"),
        ]
    );
    assert_eq!(
        err(&rows, 8),
        &Reason::ImageCountMismatch {
            placeholders: 2,
            images: 1
        }
    );
    assert_eq!(
        err(&rows, 11),
        &Reason::PathEscapesRoot("/etc/passwd".into())
    );

    let s = ok(&rows, 0);
    assert_eq!(s.images[0].bytes, jpeg(1));
    assert_eq!(
        s.messages,
        [
            Message {
                role: Role::User,
                content: vec![Content::Image, text("What is shown?")]
            },
            Message::text(Role::Assistant, "A chest X-ray."),
        ]
    );
    assert_eq!((s.mcq.clone(), s.reasoning.clone()), (None, None));
    assert_eq!(s.meta.get("id").map(String::as_str), Some("s0"));
    assert_eq!(s.meta.get("source").map(String::as_str), Some("vqa-rad"));
    let multi = ok(&rows, 1);
    assert_eq!(
        multi
            .images
            .iter()
            .map(|i| i.bytes.clone())
            .collect::<Vec<_>>(),
        [jpeg(1), png(2)]
    );
    assert_eq!(
        multi.messages[0],
        Message::text(Role::System, "You are a radiologist.")
    );
    assert_eq!(
        multi.messages[1].content,
        [text("Compare"), Content::Image, text("and"), Content::Image]
    );
    let mcq = ok(&rows, 2);
    assert_eq!(mcq.mcq.as_ref().map(|m| m.answer.as_str()), Some("B"));
    assert_eq!(mcq.reasoning.as_deref(), Some(mcq_reply));
    assert_eq!(
        ok(&rows, 303).messages[0].content,
        [text("text-only question 289")]
    );
}

#[test]
fn json_array_file_is_indexed_without_parsing_it_whole() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mix");
    image_folder(&dir);
    let records = json!([
        {"id": 1, "image": "images/a.jpg", "conversations": [
            {"from": "human", "value": "<image>\nTricky ], \"quoted\" {text}"},
            {"from": "gpt", "value": "[not, an, array]"}]},
        {"id": 2, "conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]},
        {"id": 3, "conversations": [{"from": "user", "value": "q"}]}
    ]);
    std::fs::write(
        dir.join("mix.json"),
        serde_json::to_string_pretty(&records).expect("json"),
    )
    .expect("write");
    let src = source::open(&SourceSpec::local(dir.join("mix.json"), "train")).expect("opens");
    assert_eq!(blocks(src.as_ref()), [(0, 0, 3)]);
    let rows = read_all(src.as_ref());
    assert_eq!(failures(&rows), [(2, "bad_conversation")]);
    assert_eq!(
        ok(&rows, 0).messages[0].content,
        [Content::Image, text("Tricky ], \"quoted\" {text}")]
    );
    assert_eq!(
        ok(&rows, 0).messages[1],
        Message::text(Role::Assistant, "[not, an, array]")
    );
    assert_eq!(ok(&rows, 0).meta.get("id").map(String::as_str), Some("1"));

    std::fs::write(dir.join("cut.json"), br#"[{"conversations": []}, {"conv"#).expect("write");
    let e = open_err(&SourceSpec::local(dir.join("cut.json"), "train"));
    assert!(
        matches!(e, SourceError::Schema { ref path, .. } if path.ends_with("cut.json")),
        "{e}"
    );
}

#[test]
fn messages_jsonl_parts_placeholders_and_bad_records() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("msgs");
    image_folder(&dir);
    let a = |content: serde_json::Value| json!({"role": "assistant", "content": content});
    let lines = vec![
        line(json!({"messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
            a(json!("Normal."))], "images": ["images/a.jpg"]})),
        line(
            json!({"messages": [{"role": "user", "content": "<image>\nWhat?"}, a(json!("X."))],
                    "images": ["images/b.png"]}),
        ),
        line(json!({"messages": [
            {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image", "image": "images/b.png"}]},
            a(json!([{"type": "text", "text": "Fine."}]))]})),
        line(
            json!({"messages": [{"role": "user", "content": [{"type": "video"}]}, a(json!("x"))]}),
        ),
        line(
            json!({"messages": [{"role": "user", "content": [{"type": "image"}]}, a(json!("x"))],
                    "images": ["images/a.jpg", "images/b.png"]}),
        ),
        line(json!({"messages": [{"role": "tool", "content": "x"}, a(json!("x"))]})),
    ];
    write_lines(&dir.join("train.jsonl"), &lines);
    let src =
        source::open(&SourceSpec::local(&dir, "train")).expect("folder with train.jsonl opens");
    assert_eq!(src.shards(), ["train.jsonl"]);
    let rows = read_all(src.as_ref());
    assert_eq!(
        failures(&rows),
        [
            (3, "bad_conversation"),
            (4, "image_count_mismatch"),
            (5, "bad_conversation")
        ]
    );
    assert_eq!(
        err(&rows, 4),
        &Reason::ImageCountMismatch {
            placeholders: 1,
            images: 2
        }
    );
    let s = ok(&rows, 0);
    assert_eq!(s.messages[0].content, [Content::Image, text("Describe.")]);
    assert_eq!(s.images[0].bytes, jpeg(1));
    assert_eq!(
        ok(&rows, 1).messages[0].content,
        [Content::Image, text("What?")]
    );
    let inline = ok(&rows, 2);
    assert_eq!(inline.images[0].path.as_deref(), Some("images/b.png"));
    assert_eq!(inline.messages[0].content, [text("Look:"), Content::Image]);

    // Forcing the other JSON format makes every record fail on its missing field.
    let mut forced = SourceSpec::local(dir.join("train.jsonl"), "train");
    forced.format = Format::Llava;
    let rows = read_all(source::open(&forced).expect("opens").as_ref());
    assert!(rows
        .iter()
        .all(|r| matches!(r, Err((_, Reason::MissingField(f))) if f == "conversations")));
}

#[test]
fn image_root_confines_paths() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let root = tmp.path().join("root");
    image_folder(&root);
    std::fs::create_dir_all(&data).expect("mkdir");
    write_lines(
        &data.join("train.jsonl"),
        &[
            llava(json!("images/a.jpg"), turns("<image>", "x")),
            llava(
                json!(root.join("images/b.png").display().to_string()),
                turns("<image>", "x"),
            ),
            llava(
                json!("images/../../data/train.jsonl"),
                turns("<image>", "x"),
            ),
        ],
    );
    let mut spec = SourceSpec::local(data.join("train.jsonl"), "train");
    spec.image_root = Some(root.clone());
    let rows = read_all(source::open(&spec).expect("opens").as_ref());
    assert_eq!(ok(&rows, 0).images[0].bytes, jpeg(1));
    assert_eq!(
        ok(&rows, 1).images[0].bytes,
        png(2),
        "absolute path inside the root is allowed"
    );
    assert_eq!(failures(&rows), [(2, "path_escapes_root")]);
}
