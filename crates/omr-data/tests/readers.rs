//! Readers end to end on tiny datasets built in temp folders: exact block and row counts,
//! sample contents, one malformed record of every kind a reader rejects (right reason, right
//! row, the other rows still read), path confinement, file-level errors, and Hub resolution
//! from the cache (offline) and from a fake Hub server on localhost (online).

#[path = "readers_fixtures/mod.rs"]
mod fixtures;

use arrow_array::{ArrayRef, Int64Array, LargeBinaryArray, LargeStringArray, StringArray};
use fixtures::*;
use omr_data::source::hub::{self, HubEnv};
use omr_data::source::{self, BlockInfo, Format, Source, SourceError, SourceSpec};
use omr_data::{Content, Message, Origin, Reason, Role, Sample};
use serde_json::json;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

type Row = Result<Sample, (Origin, Reason)>;

fn read_all(src: &dyn Source) -> Vec<Row> {
    let mut rows = Vec::new();
    for i in 0..src.blocks().len() {
        let block = src.read_block(i).expect("block reads");
        assert_eq!(block.len(), src.blocks()[i].rows, "block {i} row count");
        rows.extend(block);
    }
    rows
}

/// `(row, reason code)` of every rejected record; also checks every entry's origin row is its
/// position (rows are read in order, none skipped).
fn failures(rows: &[Row]) -> Vec<(u64, &'static str)> {
    rows.iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let row = match r {
                Ok(s) => s.origin.row,
                Err((o, _)) => o.row,
            };
            assert_eq!(row, i as u64, "origin row of entry {i}");
            r.as_ref().err().map(|(o, reason)| (o.row, reason.code()))
        })
        .collect()
}

fn ok(rows: &[Row], i: usize) -> &Sample {
    match &rows[i] {
        Ok(s) => s,
        Err((o, r)) => panic!("row {i} ({o}) failed: {r}"),
    }
}

fn err(rows: &[Row], i: usize) -> &Reason {
    match &rows[i] {
        Err((_, r)) => r,
        Ok(_) => panic!("row {i} was expected to fail"),
    }
}

fn blocks(src: &dyn Source) -> Vec<(usize, u64, usize)> {
    src.blocks()
        .iter()
        .map(|b: &BlockInfo| (b.shard, b.first_row, b.rows))
        .collect()
}

fn text(t: &str) -> Content {
    Content::Text { text: t.into() }
}

fn open_err(spec: &SourceSpec) -> SourceError {
    match source::open(spec) {
        Ok(_) => panic!("open was expected to fail"),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------- parquet

fn omr_rows() -> Vec<OmrRow> {
    let g = OmrRow::good;
    let path_only = |p: &str| Some((None, Some(p.to_string())));
    vec![
        OmrRow {
            perception: Some(vec![
                ("p1".into(), "Absent lung markings".into(), "core".into()),
                (
                    "p2".into(),
                    "Visible pleural line".into(),
                    "supporting".into(),
                ),
            ]),
            ..g(0)
        },
        OmrRow {
            question: None,
            ..g(1)
        },
        OmrRow {
            image: None,
            ..g(2)
        },
        OmrRow {
            image: path_only("imgs/side.jpg"),
            ..g(3)
        },
        OmrRow {
            image: path_only("imgs/missing.jpg"),
            ..g(4)
        },
        OmrRow {
            image: path_only("../outside.jpg"),
            ..g(5)
        },
        OmrRow {
            question: Some("Which finding is shown?".into()),
            ..g(6)
        },
        OmrRow {
            question: Some("Q\nA. x\nB. y\nA) z".into()),
            ..g(7)
        },
        OmrRow {
            answer: Some("F".into()),
            ..g(8)
        },
        OmrRow {
            answer: Some("C".into()),
            ..g(9)
        },
        OmrRow {
            reasoning: Some("The answer is B".into()),
            ..g(10)
        },
        OmrRow {
            reasoning: None,
            ..g(11)
        },
        OmrRow {
            answer: Some(" b ".into()),
            perception: None,
            task_family: None,
            ..g(12)
        },
    ]
}

fn omr_dataset(dir: &Path) {
    write_omr_parquet(
        &dir.join("data/train-00000-of-00001.parquet"),
        &omr_rows(),
        4,
    );
    write_omr_parquet(
        &dir.join("data/test-00000-of-00001.parquet"),
        &[OmrRow::good(7), OmrRow::good(8)],
        10,
    );
    std::fs::create_dir_all(dir.join("imgs")).expect("mkdir");
    std::fs::write(dir.join("imgs/side.jpg"), jpeg(33)).expect("write");
    std::fs::write(dir.parent().expect("parent").join("outside.jpg"), jpeg(44)).expect("write");
}

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

fn write_lines(path: &Path, lines: &[Vec<u8>]) {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    std::fs::write(path, out).expect("write jsonl");
}

fn line(v: serde_json::Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

fn image_folder(dir: &Path) {
    std::fs::create_dir_all(dir.join("images")).expect("mkdir");
    std::fs::write(dir.join("images/a.jpg"), jpeg(1)).expect("write");
    std::fs::write(dir.join("images/b.png"), png(2)).expect("write");
    let outside = dir.parent().expect("parent").join("secret.jpg");
    std::fs::write(&outside, jpeg(9)).expect("write");
    std::os::unix::fs::symlink(&outside, dir.join("images/link.jpg")).expect("symlink");
}

fn llava(image: serde_json::Value, turns: serde_json::Value) -> Vec<u8> {
    line(json!({"id": "x", "image": image, "conversations": turns}))
}

fn turns(human: &str, gpt: &str) -> serde_json::Value {
    json!([{"from": "human", "value": human}, {"from": "gpt", "value": gpt}])
}

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

// ---------------------------------------------------------------- WebDataset

fn member(name: &str, data: Vec<u8>) -> (String, Vec<u8>) {
    (name.to_string(), data)
}

fn omr_json(answer: &str) -> Vec<u8> {
    line(
        json!({"question": Q, "reasoning": trace("B"), "answer": answer, "task_family": "Diagnosis",
                "knowledge": [{"unit_id": "k1", "claim": "Pneumothorax shows no lung markings"}]}),
    )
}

#[test]
fn webdataset_groups_orphans_blocks_and_truncation() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("wds");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut m = vec![
        member("000.jpg", jpeg(0)),
        member("000.json", omr_json("B")),
        member(
            "001.json",
            llava(json!("ignored.jpg"), turns("<image>\nWhat?", "A.")),
        ),
        member("001.png", png(1)),
        member("002.jpg", jpeg(2)),
        member(
            "002.json",
            line(
                json!({"messages": [{"role": "user", "content": "<image> ?"},
                                                   {"role": "assistant", "content": "ok"}]}),
            ),
        ),
        member("003.jpg", jpeg(3)),
        member("004.json", omr_json("B")),
        member("005.jpg", jpeg(5)),
        member("005.json", omr_json("Z")),
        member("006.jpg", jpeg(6)),
        member("006.json", b"not json".to_vec()),
        member("007.a.jpg", jpeg(7)),
        member("007.b.jpg", jpeg(8)),
        member("007.json", llava(json!(null), turns("<image>", "x"))),
    ];
    for k in 8..70 {
        m.push(member(&format!("{k:03}.txt"), b"caption".to_vec()));
        m.push(member(&format!("{k:03}.jpg"), jpeg(k as u8)));
        m.push(member(&format!("{k:03}.json"), omr_json("B")));
    }
    write_tar(&dir.join("train-000000.tar"), &m);
    write_tar(
        &dir.join("test-000000.tar"),
        &[member("a.jpg", jpeg(1)), member("a.json", omr_json("B"))],
    );

    let src = source::open(&SourceSpec::local(&dir, "train")).expect("opens");
    assert_eq!(src.shards(), ["train-000000.tar"]);
    assert_eq!(blocks(src.as_ref()), [(0, 0, 64), (0, 64, 6)]);
    let rows = read_all(src.as_ref());
    assert_eq!(
        failures(&rows),
        [
            (3, "orphan_member"),
            (4, "orphan_member"),
            (5, "answer_not_an_option"),
            (6, "malformed_json"),
            (7, "image_count_mismatch"),
        ]
    );
    assert_eq!(err(&rows, 3), &Reason::OrphanMember("003.jpg".into()));
    assert_eq!(err(&rows, 4), &Reason::OrphanMember("004.json".into()));
    let s = ok(&rows, 0);
    assert_eq!(
        (s.images[0].bytes.clone(), s.images[0].path.as_deref()),
        (jpeg(0), Some("000.jpg"))
    );
    assert_eq!(s.mcq.as_ref().map(|m| m.answer.as_str()), Some("B"));
    assert_eq!(s.messages[1], Message::text(Role::Assistant, trace("B")));
    assert_eq!(
        s.meta.get("task_family").map(String::as_str),
        Some("Diagnosis")
    );
    assert_eq!(
        s.rubric.as_ref().map(|r| r.knowledge[0].unit_id.as_str()),
        Some("k1")
    );
    assert_eq!(
        ok(&rows, 1).images[0].bytes,
        png(1),
        "tar members, not JSON paths, are the images"
    );
    assert_eq!(
        ok(&rows, 2).messages[0].content,
        [Content::Image, text("?")]
    );
    assert_eq!(ok(&rows, 69).images[0].bytes, jpeg(69));
    assert_eq!(
        source::open(&SourceSpec::local(&dir, "test"))
            .expect("test")
            .len(),
        1
    );

    let whole = std::fs::read(dir.join("train-000000.tar")).expect("read");
    let cut = tmp.path().join("cut.tar");
    std::fs::write(&cut, &whole[..whole.len() / 2 + 100]).expect("write");
    let e = open_err(&SourceSpec::local(&cut, "train"));
    assert!(
        e.to_string().contains("cut.tar") && e.to_string().contains("truncated"),
        "{e}"
    );
}

// ---------------------------------------------------------------- open()

#[test]
fn open_rejects_bad_specs_and_missing_data() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut both = SourceSpec::local(tmp.path(), "train");
    both.hub = Some("org/name".into());
    assert!(matches!(open_err(&both), SourceError::BadSpec(_)));
    let mut neither = SourceSpec::local(tmp.path(), "train");
    neither.path = None;
    assert!(matches!(open_err(&neither), SourceError::BadSpec(_)));

    let missing = tmp.path().join("nope");
    let e = open_err(&SourceSpec::local(&missing, "train"));
    assert!(
        matches!(e, SourceError::Io { ref path, .. } if path.contains("nope")),
        "{e}"
    );

    let dir = tmp.path().join("omr");
    omr_dataset(&dir);
    let e = open_err(&SourceSpec::local(&dir, "validation"));
    assert!(
        matches!(e, SourceError::NoFiles { ref split, .. } if split == "validation"),
        "{e}"
    );

    let notes = tmp.path().join("notes");
    std::fs::create_dir_all(&notes).expect("mkdir");
    std::fs::write(notes.join("readme.txt"), "hi").expect("write");
    assert!(matches!(
        open_err(&SourceSpec::local(&notes, "train")),
        SourceError::UnknownFormat(_)
    ));
    assert!(matches!(
        open_err(&SourceSpec::local(notes.join("readme.txt"), "train")),
        SourceError::UnknownFormat(_)
    ));
}

// ---------------------------------------------------------------- Hub

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const TRAIN: &str = "data/train-00000-of-00001.parquet";

/// A cache laid out as huggingface_hub leaves it: the snapshot file is a relative symlink
/// into `blobs/`.
fn fake_cache(hf_home: &Path) {
    let repo = hf_home.join("hub/datasets--org--omr");
    std::fs::create_dir_all(repo.join("blobs")).expect("mkdir");
    write_omr_parquet(
        &repo.join("blobs/abc123"),
        &[OmrRow::good(1), OmrRow::good(2), OmrRow::good(3)],
        2,
    );
    std::fs::create_dir_all(repo.join("snapshots").join(SHA).join("data")).expect("mkdir");
    std::os::unix::fs::symlink(
        "../../../blobs/abc123",
        repo.join("snapshots").join(SHA).join(TRAIN),
    )
    .expect("symlink");
    std::fs::create_dir_all(repo.join("refs")).expect("mkdir");
    std::fs::write(repo.join("refs/main"), SHA).expect("write");
}

fn hub_spec(revision: Option<&str>) -> SourceSpec {
    let mut spec = SourceSpec::local("unused", "train");
    spec.path = None;
    spec.hub = Some("org/omr".into());
    spec.revision = revision.map(str::to_string);
    spec
}

#[test]
fn hub_offline_reads_the_cache() {
    let tmp = tempfile::tempdir().expect("tempdir");
    fake_cache(tmp.path());
    let env = HubEnv {
        hf_home: Some(tmp.path().to_path_buf()),
        offline: true,
        ..HubEnv::default()
    };
    let src = hub::open(&hub_spec(None), &env).expect("offline cache resolves");
    assert_eq!(src.shards(), [TRAIN]);
    assert_eq!(blocks(&src), [(0, 0, 2), (0, 2, 1)]);
    let rows = read_all(&src);
    assert_eq!(failures(&rows), []);
    assert_eq!(ok(&rows, 2).origin.shard, TRAIN);
    assert_eq!(ok(&rows, 0).origin.source, "org/omr:train");
    assert_eq!(
        hub::open(&hub_spec(Some(SHA)), &env)
            .expect("commit as revision")
            .len(),
        3
    );

    let e = hub::open(&hub_spec(Some("v2")), &env)
        .err()
        .expect("unknown revision");
    assert!(e.to_string().contains("revision `v2`"), "{e}");
    let mut test = hub_spec(None);
    test.split = "test".into();
    assert!(matches!(
        hub::open(&test, &env).err(),
        Some(SourceError::NoFiles { .. })
    ));

    let empty = tempfile::tempdir().expect("tempdir");
    let env = HubEnv {
        hf_home: Some(empty.path().to_path_buf()),
        offline: true,
        ..HubEnv::default()
    };
    let e = hub::open(&hub_spec(None), &env).err().expect("empty cache");
    assert!(matches!(e, SourceError::Hub(_)));
    assert!(
        e.to_string().contains("HF_HUB_OFFLINE")
            && e.to_string().contains("not in the local cache"),
        "{e}"
    );
}

fn proxied() -> bool {
    [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ]
    .iter()
    .any(|k| std::env::var_os(k).is_some())
}

#[test]
fn hub_online_downloads_once_then_serves_the_cache() {
    if proxied() {
        eprintln!("skipped: a proxy is set and ureq would send localhost requests through it");
        return;
    }
    let mut file = Vec::new();
    let staging = tempfile::tempdir().expect("tempdir");
    write_omr_parquet(
        &staging.path().join("x.parquet"),
        &[OmrRow::good(5), OmrRow::good(6)],
        10,
    );
    file.extend(std::fs::read(staging.path().join("x.parquet")).expect("read"));
    let info = json!({"sha": SHA, "siblings": [{"rfilename": ".gitattributes"}, {"rfilename": "README.md"},
        {"rfilename": TRAIN}, {"rfilename": "data/test-00000-of-00001.parquet"}]});
    let (endpoint, downloads) = fake_hub(200, info.to_string(), file, SHA.into());
    let home = tempfile::tempdir().expect("tempdir");
    let env = HubEnv {
        hf_home: Some(home.path().to_path_buf()),
        endpoint: Some(endpoint),
        token: Some("hf_test".into()),
        ..HubEnv::default()
    };
    let src = hub::open(&hub_spec(None), &env).expect("online open");
    assert_eq!(src.shards(), [TRAIN]);
    assert_eq!(read_all(&src).iter().filter(|r| r.is_ok()).count(), 2);
    assert_eq!(downloads.load(Ordering::SeqCst), 1);
    hub::open(&hub_spec(None), &env).expect("second open");
    assert_eq!(
        downloads.load(Ordering::SeqCst),
        1,
        "cached file is not downloaded again"
    );
    let offline = HubEnv {
        offline: true,
        endpoint: None,
        ..env
    };
    assert_eq!(
        hub::open(&hub_spec(None), &offline)
            .expect("offline after download")
            .len(),
        2
    );
}

#[test]
fn hub_gated_dataset_explains_terms_and_token() {
    if proxied() {
        eprintln!("skipped: a proxy is set and ureq would send localhost requests through it");
        return;
    }
    let home = tempfile::tempdir().expect("tempdir");
    for status in [401u16, 403] {
        let (endpoint, _) = fake_hub(status, String::new(), Vec::new(), SHA.into());
        let env = HubEnv {
            hf_home: Some(home.path().to_path_buf()),
            endpoint: Some(endpoint),
            ..HubEnv::default()
        };
        let e = hub::open(&hub_spec(None), &env).err().expect("denied");
        let msg = e.to_string();
        assert!(matches!(e, SourceError::Hub(_)), "{msg}");
        assert!(
            msg.contains(&format!("HTTP {status}")) && msg.contains("accept the dataset terms"),
            "{msg}"
        );
        assert!(msg.contains("HF_TOKEN is not set"), "{msg}");
    }
}
