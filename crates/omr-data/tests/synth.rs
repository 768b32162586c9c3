//! Synthetic OpenMedReason shards: determinism, HF layout and schema, answer balance, trace and
//! rubric consistency, decodable images, and the raw writer used to build malformed shards.
//!
//! The `datasets` golden below is the `huggingface` metadata that `datasets` 5.0.1 writes for
//! the seven OpenMedReason columns (`Dataset.from_dict(..., features=...).to_parquet(...)` with
//! `image: Image()`, strings as `Value("string")`, rubric lists as `[{...7 string fields}]`).
//! Manual cross-check (not run here; needs /work/venv-ref):
//! `python -c "import datasets; d = datasets.load_dataset('parquet', data_dir='OUT/data');
//! print(d, type(d['test'][0]['image']))"` prints both splits and a `PIL.JpegImagePlugin.JpegImageFile`.

use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use omr_data::synth::{
    corpus_texts, generate, hf_metadata, synth_row, synth_text, write_rows, Compression, RawImage,
    RawRow, Split, SynthConfig, WriteOptions, UNIT_FIELDS,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const DATASETS_GOLDEN: &str = r#"{"info": {"features": {"image": {"_type": "Image"}, "question": {"dtype": "string", "_type": "Value"}, "reasoning": {"dtype": "string", "_type": "Value"}, "answer": {"dtype": "string", "_type": "Value"}, "perception": {"feature": {"unit_id": {"dtype": "string", "_type": "Value"}, "topic": {"dtype": "string", "_type": "Value"}, "claim": {"dtype": "string", "_type": "Value"}, "source_quote": {"dtype": "string", "_type": "Value"}, "importance": {"dtype": "string", "_type": "Value"}, "presence_question": {"dtype": "string", "_type": "Value"}, "correctness_question": {"dtype": "string", "_type": "Value"}}, "_type": "List"}, "knowledge": {"feature": {"unit_id": {"dtype": "string", "_type": "Value"}, "topic": {"dtype": "string", "_type": "Value"}, "claim": {"dtype": "string", "_type": "Value"}, "source_quote": {"dtype": "string", "_type": "Value"}, "importance": {"dtype": "string", "_type": "Value"}, "presence_question": {"dtype": "string", "_type": "Value"}, "correctness_question": {"dtype": "string", "_type": "Value"}}, "_type": "List"}, "rationale": {"feature": {"unit_id": {"dtype": "string", "_type": "Value"}, "topic": {"dtype": "string", "_type": "Value"}, "claim": {"dtype": "string", "_type": "Value"}, "source_quote": {"dtype": "string", "_type": "Value"}, "importance": {"dtype": "string", "_type": "Value"}, "presence_question": {"dtype": "string", "_type": "Value"}, "correctness_question": {"dtype": "string", "_type": "Value"}}, "_type": "List"}}}}"#;

fn config(out: &Path, seed: u64) -> SynthConfig {
    SynthConfig {
        out: out.to_path_buf(),
        train: 150,
        test: 40,
        seed,
        rows_per_shard: 100,
        rows_per_group: 16,
        ..Default::default()
    }
}

/// Every file under `dir`, relative path → bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).expect("prefix").display().to_string();
                out.insert(rel, std::fs::read(&p).expect("read"));
            }
        }
    }
    out
}

fn read(path: &Path) -> (Vec<RecordBatch>, BTreeMap<String, String>, Vec<i64>) {
    let b = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).expect("open"))
        .expect("parquet");
    let kv = b
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kv| {
            kv.iter()
                .map(|k| (k.key.clone(), k.value.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    let groups = b
        .metadata()
        .row_groups()
        .iter()
        .map(|g| g.num_rows())
        .collect();
    (
        b.build()
            .expect("reader")
            .map(|r| r.expect("batch"))
            .collect(),
        kv,
        groups,
    )
}

fn strings(b: &RecordBatch, col: &str) -> Vec<Option<String>> {
    let a = b.column_by_name(col).expect("column").as_string::<i32>();
    (0..a.len())
        .map(|i| a.is_valid(i).then(|| a.value(i).to_string()))
        .collect()
}

#[test]
fn same_seed_gives_byte_identical_files() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let report = generate(&config(a.path(), 7)).expect("generate a");
    generate(&config(b.path(), 7)).expect("generate b");
    generate(&config(c.path(), 8)).expect("generate c");
    let (sa, sb, sc) = (snapshot(a.path()), snapshot(b.path()), snapshot(c.path()));
    assert_eq!(sa.keys().collect::<Vec<_>>(), sb.keys().collect::<Vec<_>>());
    assert!(sa == sb, "same seed must give byte-identical files");
    assert_ne!(
        sa["data/train-00000-of-00002.parquet"],
        sc["data/train-00000-of-00002.parquet"]
    );
    assert_eq!(report.files.iter().map(|f| f.rows).sum::<u64>(), 190);
    // Rerunning into the same folder overwrites in place with the same bytes.
    generate(&config(a.path(), 7)).expect("regenerate");
    assert!(snapshot(a.path()) == sb);
}

#[test]
fn layout_and_card_follow_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    generate(&config(dir.path(), 1)).expect("generate");
    let names: Vec<String> = snapshot(dir.path()).into_keys().collect();
    assert_eq!(
        names,
        [
            "README.md",
            "data/test-00000-of-00001.parquet",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet"
        ]
    );
    let card = std::fs::read_to_string(dir.path().join("README.md")).unwrap();
    assert!(card.starts_with("---\nlicense: cc-by-4.0\n"));
    for needle in [
        "  - split: train\n    path: data/train-*\n",
        "  - split: test\n    path: data/test-*\n",
        "  - name: image\n    dtype: image\n",
        "  - name: perception\n    list:\n    - name: unit_id\n      dtype: string\n",
        "  - name: train\n    num_bytes: ",
        "    num_examples: 150\n",
        "    num_examples: 40\n",
        "synthetic",
        "`task_family`",
    ] {
        assert!(card.contains(needle), "card lacks {needle:?}");
    }
    // A stray parquet file from another run would be read as data: refuse.
    std::fs::write(dir.path().join("data/train-00002-of-00003.parquet"), b"old").unwrap();
    let err = generate(&config(dir.path(), 1)).expect_err("stale shard must be refused");
    assert!(
        err.to_string().contains("train-00002-of-00003.parquet"),
        "{err}"
    );
}

#[test]
fn schema_and_metadata_match_datasets() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SynthConfig {
        compression: Compression::Zstd,
        ..config(dir.path(), 2)
    };
    generate(&cfg).expect("generate");
    let (batches, kv, groups) = read(&dir.path().join("data/train-00001-of-00002.parquet"));
    assert_eq!(groups, [16, 16, 16, 2]);
    let schema = batches[0].schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(
        names,
        [
            "image",
            "question",
            "reasoning",
            "answer",
            "perception",
            "knowledge",
            "rationale",
            "task_family",
            "task",
            "modality"
        ]
    );
    let DataType::Struct(img) = schema.field(0).data_type() else {
        panic!("image is not a struct")
    };
    assert_eq!(
        (img[0].name().as_str(), img[0].data_type()),
        ("bytes", &DataType::Binary)
    );
    assert_eq!(
        (img[1].name().as_str(), img[1].data_type()),
        ("path", &DataType::Utf8)
    );
    for i in [1, 2, 3, 7, 8, 9] {
        assert_eq!(schema.field(i).data_type(), &DataType::Utf8);
    }
    for i in [4, 5, 6] {
        let DataType::List(el) = schema.field(i).data_type() else {
            panic!("rubric column is not a list")
        };
        let DataType::Struct(u) = el.data_type() else {
            panic!("list element is not a struct")
        };
        assert_eq!(
            u.iter().map(|f| f.name().as_str()).collect::<Vec<_>>(),
            UNIT_FIELDS
        );
        assert!(u.iter().all(|f| f.data_type() == &DataType::Utf8));
    }
    // The seven OpenMedReason columns carry exactly what `datasets` writes; tags append.
    let core = WriteOptions {
        tag_columns: false,
        ..Default::default()
    };
    assert_eq!(hf_metadata(&core), DATASETS_GOLDEN);
    let tags = r#", "task_family": {"dtype": "string", "_type": "Value"}, "task": {"dtype": "string", "_type": "Value"}, "modality": {"dtype": "string", "_type": "Value"}}}}"#;
    assert_eq!(
        kv["huggingface"],
        format!("{}{tags}", &DATASETS_GOLDEN[..DATASETS_GOLDEN.len() - 3])
    );
    assert!(kv.contains_key("ARROW:schema"));
}

#[test]
fn rows_are_consistent_images_decode_and_rubric_is_test_only() {
    let dir = tempfile::tempdir().unwrap();
    generate(&config(dir.path(), 3)).expect("generate");
    for (file, split) in [
        ("train-00000-of-00002.parquet", Split::Train),
        ("test-00000-of-00001.parquet", Split::Test),
    ] {
        let (batches, _, _) = read(&dir.path().join("data").join(file));
        let mut row = 0u64;
        for b in &batches {
            let (q, r, a) = (
                strings(b, "question"),
                strings(b, "reasoning"),
                strings(b, "answer"),
            );
            let img = b.column_by_name("image").unwrap().as_struct();
            let (bytes, paths) = (
                img.column(0).as_binary::<i32>(),
                img.column(1).as_string::<i32>(),
            );
            for i in 0..b.num_rows() {
                let (q, r, a) = (
                    q[i].clone().unwrap(),
                    r[i].clone().unwrap(),
                    a[i].clone().unwrap(),
                );
                let letters: Vec<&str> = q.lines().skip(1).map(|l| &l[..1]).collect();
                assert!(
                    (4..=5).contains(&letters.len())
                        && letters
                            .iter()
                            .enumerate()
                            .all(|(k, l)| *l == ["A", "B", "C", "D", "E"][k]),
                    "{q}"
                );
                assert!(
                    letters.contains(&a.as_str()),
                    "answer {a} not an option of {q}"
                );
                assert!(
                    r.starts_with("<think>")
                        && r.ends_with(&format!("</think><answer>{a}</answer>")),
                    "{r}"
                );
                assert!(
                    r.contains(&format!("option {a}.")),
                    "trace must name the answer letter: {r}"
                );
                let words = r.split_whitespace().count();
                assert!((20..=70).contains(&words), "trace has {words} words: {r}");
                let decoded = image::load_from_memory(bytes.value(i)).expect("JPEG decodes");
                assert_eq!((decoded.width(), decoded.height()), (224, 224));
                assert_eq!(
                    paths.value(i),
                    format!("synth_{}_{row:06}.jpg", split.as_str())
                );
                // The file holds exactly what the in-memory generator makes.
                let mem = synth_row(split, row, 3).unwrap();
                assert_eq!(
                    (mem.question.as_str(), mem.answer.as_str()),
                    (q.as_str(), a.as_str())
                );
                assert_eq!(mem.image.unwrap().jpeg, bytes.value(i));
                row += 1;
            }
            for col in ["perception", "knowledge", "rationale"] {
                let lists = b.column_by_name(col).unwrap().as_list::<i32>();
                assert_eq!(lists.null_count(), 0, "{col} lists must be empty, not null");
                for (i, trace) in r.iter().enumerate() {
                    let units = lists.value(i);
                    let units = units.as_struct();
                    match split {
                        Split::Train => assert_eq!(units.len(), 0, "train {col} must be empty"),
                        Split::Test => {
                            assert!(!units.is_empty(), "test {col} must be filled");
                            let quote = units.column(3).as_string::<i32>();
                            let importance = units.column(4).as_string::<i32>();
                            let ids = units.column(0).as_string::<i32>();
                            for k in 0..units.len() {
                                assert!(
                                    trace.as_deref().unwrap().contains(quote.value(k)),
                                    "quote not in trace"
                                );
                                assert!(["core", "supporting"].contains(&importance.value(k)));
                                assert_eq!(&ids.value(k)[1..], (k + 1).to_string());
                            }
                            assert!((0..units.len()).any(|k| importance.value(k) == "core"));
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn answer_letters_are_balanced_and_text_alone_is_at_chance() {
    // Text only (no drawing) so many rows are cheap.
    let rows: Vec<_> = (0..4000).map(|i| synth_text(Split::Train, i, 11)).collect();
    let mut by_k: BTreeMap<usize, BTreeMap<String, usize>> = BTreeMap::new();
    let mut by_task: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    for r in &rows {
        *by_k
            .entry(r.options.len())
            .or_default()
            .entry(r.answer.clone())
            .or_default() += 1;
        let text = r
            .options
            .iter()
            .find(|(l, _)| *l == r.answer)
            .map(|(_, t)| t.clone())
            .unwrap();
        *by_task.entry(&r.task).or_default().entry(text).or_default() += 1;
    }
    // Chi-square against uniform; critical values at p = 0.001 for 3 and 4 degrees of freedom.
    for (k, counts) in &by_k {
        let n: usize = counts.values().sum();
        let e = n as f64 / *k as f64;
        let chi2: f64 = counts.values().map(|&c| (c as f64 - e).powi(2) / e).sum();
        assert_eq!(
            counts.len(),
            *k,
            "every letter must be the answer sometimes"
        );
        assert!(
            chi2 < [0.0, 0.0, 0.0, 0.0, 16.27, 18.47][*k],
            "letters unbalanced for {k} options: {counts:?} chi2 {chi2}"
        );
    }
    assert_eq!(by_task.len(), 18, "every task is drawn");
    for (task, counts) in &by_task {
        let k = rows.iter().find(|r| r.task == *task).unwrap().options.len();
        let n: usize = counts.values().sum();
        let top = *counts.values().max().unwrap() as f64 / n as f64;
        assert_eq!(
            counts.len(),
            k,
            "{task}: every option text must be correct sometimes"
        );
        assert!(
            top < 1.0 / k as f64 + 0.12,
            "{task}: one answer text dominates ({counts:?})"
        );
    }
    // Same stem, different answers: the question text does not give the answer away.
    let mut stems: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in &rows {
        let stem = r
            .question
            .lines()
            .next()
            .unwrap()
            .split_once(". ")
            .map(|(_, s)| s.to_string())
            .unwrap();
        let text = r
            .options
            .iter()
            .find(|(l, _)| *l == r.answer)
            .unwrap()
            .1
            .clone();
        stems
            .entry(format!("{}|{stem}", r.task))
            .or_default()
            .insert(text);
    }
    assert!(stems.values().filter(|answers| answers.len() > 1).count() >= 18);
}

#[test]
fn corpus_texts_are_the_rows_questions_and_traces() {
    let texts: Vec<String> = corpus_texts(3, 2, 5).collect();
    assert_eq!(texts.len(), 10);
    let r = synth_text(Split::Test, 1, 5);
    assert_eq!((&texts[8], &texts[9]), (&r.question, &r.reasoning));
    assert!(texts
        .iter()
        .skip(1)
        .step_by(2)
        .all(|t| t.starts_with("<think>")));
}

#[test]
fn write_rows_builds_malformed_shards() {
    let dir = tempfile::tempdir().unwrap();
    let good = synth_row(Split::Test, 0, 4).unwrap().into_raw();
    let rows = vec![
        good.clone(),
        RawRow {
            question: None,
            ..good.clone()
        },
        RawRow {
            answer: Some("Z".into()),
            ..good.clone()
        },
        RawRow {
            image: Some(RawImage {
                bytes: Some(b"not a jpeg".to_vec()),
                path: Some("x.jpg".into()),
            }),
            ..good.clone()
        },
        RawRow {
            image: None,
            perception: None,
            ..good.clone()
        },
        RawRow::default(),
    ];
    let path = dir.path().join("bad.parquet");
    let opts = WriteOptions {
        rows_per_group: 4,
        reasoning_column: "reasoning_trace".into(),
        omit_columns: vec!["modality".into()],
        ..Default::default()
    };
    let written = write_rows(&path, &rows, &opts).expect("write");
    assert_eq!(written.rows, 6);
    let (batches, kv, groups) = read(&path);
    assert_eq!(groups, [4, 2]);
    assert!(
        kv["huggingface"].contains(r#""reasoning_trace": {"dtype""#)
            && !kv["huggingface"].contains("modality")
    );
    assert!(
        batches[0].column_by_name("modality").is_none()
            && batches[0].column_by_name("reasoning").is_none()
    );
    let q: Vec<Option<String>> = batches
        .iter()
        .flat_map(|x| strings(x, "question"))
        .collect();
    assert_eq!(
        q.iter().map(Option::is_none).collect::<Vec<_>>(),
        [false, true, false, false, false, true]
    );
    let a: Vec<Option<String>> = batches.iter().flat_map(|x| strings(x, "answer")).collect();
    assert_eq!(a[2].as_deref(), Some("Z"));
    let (b, i) = at(&batches, 3);
    let img = b.column_by_name("image").unwrap().as_struct();
    assert!(image::load_from_memory(img.column(0).as_binary::<i32>().value(i)).is_err());
    for row in [4, 5] {
        let (b, i) = at(&batches, row);
        assert!(
            b.column_by_name("image").unwrap().is_null(i),
            "missing images are null structs"
        );
        assert!(b.column_by_name("perception").unwrap().is_null(i));
    }
    let (b, i) = at(&batches, 4);
    assert!(!b
        .column_by_name("knowledge")
        .unwrap()
        .as_list::<i32>()
        .value(i)
        .is_empty());
}

/// The batch holding global row `row` and the row's index inside it.
fn at(batches: &[RecordBatch], mut row: usize) -> (&RecordBatch, usize) {
    for b in batches {
        if row < b.num_rows() {
            return (b, row);
        }
        row -= b.num_rows();
    }
    panic!("row out of range")
}

#[test]
fn bad_configs_are_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let base = config(dir.path(), 0);
    for cfg in [
        SynthConfig {
            rows_per_group: 0,
            ..base.clone()
        },
        SynthConfig {
            rows_per_shard: 0,
            ..base.clone()
        },
        SynthConfig {
            image_size: (8, 224),
            ..base.clone()
        },
        SynthConfig {
            size_jitter: 112,
            ..base.clone()
        },
        SynthConfig {
            train: 0,
            test: 0,
            ..base.clone()
        },
    ] {
        let err = generate(&cfg).expect_err("config must be refused");
        assert!(err.to_string().starts_with("invalid synth config"), "{err}");
    }
    assert!(
        !dir.path().join("data").exists(),
        "nothing is written for a bad config"
    );
}
