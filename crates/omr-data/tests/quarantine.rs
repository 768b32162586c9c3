//! Bad data loses nothing and stops nothing: 25 kinds of malformed record or image, across
//! parquet, JSONL and WebDataset sources, each run through the full training pipeline
//! (reader → decoder → processor → encoder) and checked to land in `quarantine.jsonl` with its
//! shard, row and reason, while every good record still comes through.

use omr_data::pipeline::{ProcessConfig, Processor};
use omr_data::quarantine::{Quarantine, QuarantineBudget, QuarantineEntry};
use omr_data::source::{self, SourceSpec};
use omr_data::synth::{synth_row, write_rows, RawImage, RawRow, Split, WriteOptions};
use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

/// CRC-32 (IEEE) for hand-made PNG chunks.
fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 3) as u8, 90]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn jpeg(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 251) as u8, (y % 241) as u8, 128])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

/// A small valid PNG whose IHDR claims 100000×100000 pixels (a decompression bomb header).
fn bomb_png() -> Vec<u8> {
    let mut b = png(8, 8);
    // IHDR data starts at 16: width, height (big-endian), then the CRC over type + data at 29.
    b[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    b[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let crc = crc32(&b[12..29]);
    b[29..33].copy_from_slice(&crc.to_be_bytes());
    b
}

fn bad_dicom() -> Vec<u8> {
    let mut b = vec![0u8; 128];
    b.extend_from_slice(b"DICM");
    b.extend_from_slice(&[0x02, 0x00, 0x10, 0x00, b'U', b'I', 0xFF, 0x7F, 1, 2, 3]);
    b
}

/// The processor: a tokenizer trained on a few synthetic rows, images up to 1 MP, 700 tokens.
fn processor(dir: &Path) -> Processor {
    omr_data::tiny::write_tiny_processor(dir, 40, 0, 600).unwrap();
    let cfg = std::fs::read_to_string(dir.join("preprocessor_config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["max_pixels"] = 1_000_000.into();
    v["size"]["longest_edge"] = 1_000_000.into();
    std::fs::write(dir.join("preprocessor_config.json"), v.to_string()).unwrap();
    Processor::from_model_dir(
        dir,
        &ProcessConfig {
            max_length: 700,
            ..Default::default()
        },
    )
    .unwrap()
}

type Case = (&'static str, Box<dyn Fn(&mut RawRow)>);

fn set_image(bytes: Vec<u8>) -> Box<dyn Fn(&mut RawRow)> {
    Box::new(move |r| {
        r.image = Some(RawImage {
            bytes: Some(bytes.clone()),
            path: Some("x.png".into()),
        })
    })
}

fn parquet_cases() -> Vec<Case> {
    let good_jpeg = jpeg(224, 224);
    let cut_jpeg = good_jpeg[..good_jpeg.len() / 2].to_vec();
    let good_png = png(64, 64);
    let cut_png = good_png[..good_png.len() - 30].to_vec();
    let path_only = |p: &'static str| -> Box<dyn Fn(&mut RawRow)> {
        Box::new(move |r| {
            r.image = Some(RawImage {
                bytes: None,
                path: Some(p.into()),
            })
        })
    };
    vec![
        (
            "image_undecodable",
            set_image(b"this is not an image at all".to_vec()),
        ),
        ("image_truncated", set_image(cut_jpeg)),
        ("image_truncated", set_image(cut_png)),
        (
            "image_empty",
            Box::new(|r| {
                r.image = Some(RawImage {
                    bytes: Some(Vec::new()),
                    path: None,
                })
            }),
        ),
        ("image_too_large", set_image(bomb_png())),
        ("image_bad_dimensions", set_image(png(600, 2))),
        ("image_missing", Box::new(|r| r.image = None)),
        ("image_not_found", path_only("images/missing.jpg")),
        ("path_escapes_root", path_only("../../etc/passwd")),
        ("path_escapes_root", path_only("/etc/passwd")),
        ("dicom_unreadable", set_image(bad_dicom())),
        ("missing_field", Box::new(|r| r.question = None)),
        ("missing_field", Box::new(|r| r.reasoning = None)),
        (
            "question_without_options",
            Box::new(|r| r.question = Some("What is shown?".into())),
        ),
        (
            "duplicate_option",
            Box::new(|r| r.question = Some("Which?\nA. left\nA. right\nB. none".into())),
        ),
        (
            "answer_not_an_option",
            Box::new(|r| r.answer = Some("Z".into())),
        ),
        ("empty_field", Box::new(|r| r.answer = Some("  ".into()))),
        (
            "trace_answer_mismatch",
            Box::new(|r| {
                let a = r.answer.clone().unwrap();
                let other = if a == "A" { "B" } else { "A" };
                r.answer = Some(other.into());
            }),
        ),
        (
            "malformed_trace",
            Box::new(|r| r.reasoning = Some("just some words, no tags".into())),
        ),
        // 25×28 merged patches = 700 image tokens: fits max_length alone, but not with the
        // system prompt before it, so a right cut would land inside the image.
        ("truncation_cuts_image", set_image(jpeg(784, 700))),
        // 30×30 merged patches = 900 image tokens > 700.
        ("too_many_image_tokens", set_image(jpeg(840, 840))),
    ]
}

fn jsonl_lines() -> Vec<(&'static str, Vec<u8>)> {
    let ok = |img: &str| {
        format!(
            r#"{{"image": "{img}", "conversations": [{{"from": "human", "value": "<image>\nWhich side?\nA. left\nB. right"}}, {{"from": "gpt", "value": "<think>The lesion is left.</think><answer>A</answer>"}}]}}"#
        )
        .into_bytes()
    };
    vec![
        ("", ok("img.jpg")),
        ("malformed_json", b"{\"image\": \"img.jpg\", \"conversations\": [".to_vec()),
        ("invalid_utf8", {
            let mut l = ok("img.jpg");
            l.splice(60..60, [0xFF, 0xFE]);
            l
        }),
        (
            "bad_conversation",
            br#"{"image": "img.jpg", "conversations": [{"from": "human", "value": "<image>\nhello"}]}"#.to_vec(),
        ),
        (
            "image_count_mismatch",
            br#"{"image": "img.jpg", "conversations": [{"from": "human", "value": "<image><image>\nTwo?"}, {"from": "gpt", "value": "yes"}]}"#.to_vec(),
        ),
        ("path_escapes_root", ok("../outside.jpg")),
        ("image_not_found", ok("nope.jpg")),
        ("", ok("img.jpg")),
    ]
}

fn run(
    p: &Arc<Processor>,
    spec: SourceSpec,
    q: &mut Quarantine,
) -> omr_data::validate::ValidateReport {
    let src = source::open(&spec).unwrap();
    let p2 = p.clone();
    omr_data::validate::validate(vec![src], move |s| p2.encode(s), p.image_token_id(), 2, q)
        .unwrap()
}

#[test]
fn every_kind_of_bad_record_is_quarantined_and_the_rest_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let proc_dir = tmp.path().join("processor");
    let p = Arc::new(processor(&proc_dir));

    // Parquet: good row, then each bad case followed by a good row.
    let root = tmp.path().join("pq");
    std::fs::create_dir_all(root.join("data")).unwrap();
    let cases = parquet_cases();
    let mut rows = Vec::new();
    let mut expected: Vec<(String, u64, &str)> = Vec::new();
    let shard = "data/train-00000-of-00001.parquet";
    for (i, (code, edit)) in cases.iter().enumerate() {
        rows.push(synth_row(Split::Train, 2 * i as u64, 9).unwrap().into_raw());
        let mut bad = synth_row(Split::Train, 2 * i as u64 + 1, 9)
            .unwrap()
            .into_raw();
        edit(&mut bad);
        expected.push((shard.to_string(), rows.len() as u64, code));
        rows.push(bad);
    }
    rows.push(synth_row(Split::Train, 999, 9).unwrap().into_raw());
    let opts = WriteOptions {
        rows_per_group: 5,
        ..Default::default()
    };
    write_rows(&root.join(shard), &rows, &opts).unwrap();

    // JSONL (LLaVA) with an image folder and a file outside it.
    let jroot = tmp.path().join("jsonl");
    std::fs::create_dir_all(&jroot).unwrap();
    std::fs::write(jroot.join("img.jpg"), jpeg(100, 80)).unwrap();
    std::fs::write(tmp.path().join("outside.jpg"), jpeg(100, 80)).unwrap();
    let mut text = Vec::new();
    let lines = jsonl_lines();
    for (i, (code, line)) in lines.iter().enumerate() {
        text.extend_from_slice(line);
        text.push(b'\n');
        if !code.is_empty() {
            expected.push(("train.jsonl".into(), i as u64, code));
        }
    }
    std::fs::write(jroot.join("train.jsonl"), text).unwrap();

    // WebDataset: a good sample, an image without its json, and a json without its image.
    let wroot = tmp.path().join("wds");
    std::fs::create_dir_all(&wroot).unwrap();
    let mut tar = tar::Builder::new(Vec::new());
    let meta = serde_json::json!({
        "question": "Which side?\nA. left\nB. right",
        "reasoning": "<think>It is left.</think><answer>A</answer>",
        "answer": "A"
    })
    .to_string();
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, data).unwrap();
    };
    add("s000.jpg", &jpeg(64, 64));
    add("s000.json", meta.as_bytes());
    add("s001.jpg", &jpeg(64, 64));
    add("s002.json", meta.as_bytes());
    std::fs::write(wroot.join("train-000.tar"), tar.into_inner().unwrap()).unwrap();

    let qpath = tmp.path().join("quarantine.jsonl");
    let budget = QuarantineBudget {
        max_bad: None,
        max_bad_fraction: None,
        min_seen: 0,
    };
    let mut q = Quarantine::new(Some(&qpath), budget).unwrap();
    let pq = run(&p, SourceSpec::local(&root, "train"), &mut q);
    let js = run(&p, SourceSpec::local(&jroot, "train"), &mut q);
    let wd = run(&p, SourceSpec::local(&wroot, "train"), &mut q);

    // Every good record made it through the full pipeline.
    assert_eq!(pq.good, cases.len() as u64 + 1, "{}", pq.render());
    assert_eq!(js.good, 2, "{}", js.render());
    assert_eq!(wd.good, 1, "{}", wd.render());
    assert_eq!(wd.bad, 2);

    let entries: Vec<QuarantineEntry> = std::fs::read_to_string(&qpath)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let got: BTreeMap<(String, u64), String> = entries
        .iter()
        .map(|e| ((e.shard.clone(), e.row), e.reason.clone()))
        .collect();
    for (shard, row, code) in &expected {
        assert_eq!(
            got.get(&(shard.clone(), *row)).map(String::as_str),
            Some(*code),
            "{shard} row {row}: {entries:#?}"
        );
    }
    let orphans = entries
        .iter()
        .filter(|e| e.reason == "orphan_member")
        .count();
    assert_eq!(orphans, 2);
    assert_eq!(
        entries.len(),
        expected.len() + 2,
        "nothing else was rejected: {entries:#?}"
    );
    assert!(entries
        .iter()
        .all(|e| !e.detail.is_empty() && !e.source.is_empty()));
    let kinds = expected.len() + 2;
    let codes: std::collections::BTreeSet<&str> =
        entries.iter().map(|e| e.reason.as_str()).collect();
    assert!(
        kinds >= 25 && codes.len() >= 20,
        "{kinds} kinds, {} distinct reasons",
        codes.len()
    );
    assert_eq!(q.bad as usize, entries.len());
}

#[test]
fn budget_decides_and_counts_are_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let p = Arc::new(processor(&tmp.path().join("processor")));
    let root = tmp.path().join("pq");
    std::fs::create_dir_all(root.join("data")).unwrap();
    let mut rows: Vec<RawRow> = (0..20)
        .map(|i| synth_row(Split::Train, i, 3).unwrap().into_raw())
        .collect();
    for r in rows.iter_mut().take(3) {
        r.answer = Some("Q".into());
    }
    write_rows(
        &root.join("data/train-00000-of-00001.parquet"),
        &rows,
        &WriteOptions::default(),
    )
    .unwrap();
    let spec = SourceSpec::local(&root, "train");
    let tight = QuarantineBudget {
        max_bad: Some(2),
        max_bad_fraction: None,
        min_seen: 0,
    };
    let mut q = Quarantine::new(None, tight).unwrap();
    let r = run(&p, spec.clone(), &mut q);
    assert!(r.over_budget);
    assert_eq!(
        (r.good, r.bad),
        (17, 3),
        "validation finishes the pass even over budget"
    );
    let frac = QuarantineBudget {
        max_bad: None,
        max_bad_fraction: Some(0.2),
        min_seen: 0,
    };
    let mut q = Quarantine::new(None, frac).unwrap();
    assert!(
        !run(&p, spec, &mut q).over_budget,
        "3/20 = 15% is within 20%"
    );
}
