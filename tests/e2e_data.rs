//! End to end through the `omr` binary: synthesise shards and the tiny processor, validate
//! them, render a sample, preprocess an image, and check the bad-data exit code (64) and the
//! quarantine file on a shard with broken records. What a user types, checked.

mod common;

use common::{ok, omr, s, synth};
use std::path::Path;

#[test]
fn synth_validate_render_preprocess() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    synth(&d, 96, 16, 1, 700);
    for f in [
        "data/train-00000-of-00001.parquet",
        "data/test-00000-of-00001.parquet",
        "README.md",
    ] {
        assert!(d.join(f).is_file(), "{f}");
    }
    let proc_dir = d.join("processor");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
    ] {
        assert!(proc_dir.join(f).is_file(), "{f}");
    }

    // Same seed, same bytes.
    let d2 = tmp.path().join("d2");
    synth(&d2, 96, 16, 1, 700);
    for f in [
        "data/train-00000-of-00001.parquet",
        "processor/tokenizer.json",
    ] {
        assert_eq!(
            std::fs::read(d.join(f)).unwrap(),
            std::fs::read(d2.join(f)).unwrap(),
            "{f}"
        );
    }

    let report = tmp.path().join("report.json");
    let q = tmp.path().join("q.jsonl");
    for split in ["train", "test"] {
        let out = ok(&[
            "data",
            "validate",
            "--model",
            s(&proc_dir),
            "--data",
            s(&d),
            "--split",
            split,
            "--quarantine",
            s(&q),
            "--report",
            s(&report),
            "--max-bad",
            "0",
        ]);
        assert!(out.contains("bad 0"), "{out}");
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        let n = if split == "train" { 96 } else { 16 };
        assert_eq!(r["good"], n);
        assert_eq!(
            r["image_tokens"]["max"], 64,
            "224×224 images under the tiny processor: 64 tokens"
        );
    }

    let out = ok(&[
        "data",
        "render",
        "--model",
        s(&proc_dir),
        "--data",
        s(&d),
        "--index",
        "5",
    ]);
    assert!(out.contains("<|image_pad|>×64"), "{out}");
    assert!(
        out.contains("⟦<think>") && out.contains("</answer><|im_end|>⟧"),
        "labels cover the trace: {out}"
    );

    // Preprocess one of the shard's images and check the safetensors layout.
    let img = tmp.path().join("x.png");
    std::fs::write(&img, png(300, 200)).unwrap();
    let px = tmp.path().join("px.safetensors");
    ok(&[
        "data",
        "preprocess",
        "--processor",
        s(&proc_dir),
        "--image",
        s(&img),
        "--out",
        s(&px),
    ]);
    let bytes = std::fs::read(&px).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let pv = st.tensor("pixel_values").unwrap();
    let grid = st.tensor("image_grid_thw").unwrap();
    // 300×200 → smart_resize (factor 28, max 50176 px) → 252×168 → 18×12 patches.
    assert_eq!(pv.shape(), &[216, 1176]);
    assert_eq!(grid.shape(), &[1, 3]);
    let g: Vec<i64> = grid
        .data()
        .chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(g, vec![1, 12, 18]);
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 77]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// One valid LLaVA record whose image is `a.png`.
const LLAVA_LINE: &str = r#"{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhich?\nA. x\nB. y"}, {"from": "gpt", "value": "<think>x</think><answer>A</answer>"}]}"#;

/// `DIR/j` holding the image `a.png` that `LLAVA_LINE` refers to; the JSONL is the test's.
fn llava_dir(dir: &Path) -> std::path::PathBuf {
    let j = dir.join("j");
    std::fs::create_dir_all(&j).unwrap();
    std::fs::write(j.join("a.png"), png(64, 64)).unwrap();
    j
}

#[test]
fn bad_data_over_budget_exits_64_and_names_every_record() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    synth(&d, 40, 0, 2, 600);
    // A LLaVA JSONL next to it with one good and two bad lines.
    let j = llava_dir(tmp.path());
    let good = LLAVA_LINE;
    let text = format!(
        "{good}\n{{not json\n{}\n",
        good.replace("a.png", "../../etc/passwd")
    );
    std::fs::write(j.join("train.jsonl"), text).unwrap();
    let q = tmp.path().join("q.jsonl");
    let proc_dir = d.join("processor");
    let args = [
        "data",
        "validate",
        "--model",
        s(&proc_dir),
        "--data",
        s(&j),
        "--quarantine",
        s(&q),
        "--max-bad",
        "1",
    ];
    let out = omr(&args);
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("budget exceeded") && stderr.contains("q.jsonl"),
        "{stderr}"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&q)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let got: Vec<(u64, &str)> = lines
        .iter()
        .map(|l| (l["row"].as_u64().unwrap(), l["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(got, vec![(1, "malformed_json"), (2, "path_escapes_root")]);
    // Within budget, the same data passes.
    let q2 = tmp.path().join("q2.jsonl");
    let out = omr(&[
        "data",
        "validate",
        "--model",
        s(&proc_dir),
        "--data",
        s(&j),
        "--quarantine",
        s(&q2),
        "--max-bad-fraction",
        "0.7",
    ]);
    assert_eq!(out.status.code(), Some(0));

    // Usage errors are exit 2 and say what is wrong.
    let out = omr(&[
        "data",
        "validate",
        "--model",
        s(&proc_dir),
        "--data",
        s(&tmp.path().join("nope")),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
    let out = omr(&[
        "data",
        "validate",
        "--model",
        s(&tmp.path().join("nomodel")),
        "--data",
        s(&d),
    ]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn weighted_mixture_of_parquet_and_jsonl_streams_in_proportion() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    synth(&d, 64, 0, 3, 600);
    let j = llava_dir(tmp.path());
    let line = LLAVA_LINE;
    std::fs::write(j.join("train.jsonl"), format!("{line}\n").repeat(10)).unwrap();
    let cfg = tmp.path().join("mix.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[sources]]\nname = \"omr\"\npath = {:?}\nweight = 3.0\n\n[[sources]]\nname = \"llava\"\npath = {:?}\nweight = 1.0\n\n[batch]\nbatch_size = 4\nmode = \"pad\"\n",
            s(&d),
            s(&j)
        ),
    )
    .unwrap();
    let q = tmp.path().join("q.jsonl");
    let out = ok(&[
        "data",
        "batches",
        "--config",
        s(&cfg),
        "--model",
        s(&d.join("processor")),
        "--steps",
        "8",
        "--quarantine",
        s(&q),
    ]);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("batch ")).count(),
        8,
        "{out}"
    );
    assert!(out.contains("omr") && out.contains("24 (75.0%)"), "{out}");
    assert!(out.contains("llava") && out.contains("8 (25.0%)"), "{out}");

    // A typo in the config is a usage error naming the key.
    std::fs::write(&cfg, "[[sources]]\npath = \"x\"\nwieght = 2.0\n").unwrap();
    let out = omr(&[
        "data",
        "batches",
        "--config",
        s(&cfg),
        "--model",
        s(&d.join("processor")),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wieght"));
}
