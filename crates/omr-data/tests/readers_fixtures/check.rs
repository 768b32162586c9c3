//! Assertions and JSONL builders shared by the reader tests: read every block, list failures,
//! pick rows, write LLaVA lines.

use omr_data::source::{self, BlockInfo, Source, SourceError, SourceSpec};
use omr_data::{Content, Origin, Reason, Sample};
use serde_json::json;
use std::path::Path;

use super::*;

pub type Row = Result<Sample, (Origin, Reason)>;

pub fn read_all(src: &dyn Source) -> Vec<Row> {
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
pub fn failures(rows: &[Row]) -> Vec<(u64, &'static str)> {
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

pub fn ok(rows: &[Row], i: usize) -> &Sample {
    match &rows[i] {
        Ok(s) => s,
        Err((o, r)) => panic!("row {i} ({o}) failed: {r}"),
    }
}

pub fn err(rows: &[Row], i: usize) -> &Reason {
    match &rows[i] {
        Err((_, r)) => r,
        Ok(_) => panic!("row {i} was expected to fail"),
    }
}

pub fn blocks(src: &dyn Source) -> Vec<(usize, u64, usize)> {
    src.blocks()
        .iter()
        .map(|b: &BlockInfo| (b.shard, b.first_row, b.rows))
        .collect()
}

pub fn text(t: &str) -> Content {
    Content::Text { text: t.into() }
}

pub fn open_err(spec: &SourceSpec) -> SourceError {
    match source::open(spec) {
        Ok(_) => panic!("open was expected to fail"),
        Err(e) => e,
    }
}

pub fn write_lines(path: &Path, lines: &[Vec<u8>]) {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    std::fs::write(path, out).expect("write jsonl");
}

pub fn line(v: serde_json::Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

pub fn image_folder(dir: &Path) {
    std::fs::create_dir_all(dir.join("images")).expect("mkdir");
    std::fs::write(dir.join("images/a.jpg"), jpeg(1)).expect("write");
    std::fs::write(dir.join("images/b.png"), png(2)).expect("write");
    let outside = dir.parent().expect("parent").join("secret.jpg");
    std::fs::write(&outside, jpeg(9)).expect("write");
    std::os::unix::fs::symlink(&outside, dir.join("images/link.jpg")).expect("symlink");
}

pub fn llava(image: serde_json::Value, turns: serde_json::Value) -> Vec<u8> {
    line(json!({"id": "x", "image": image, "conversations": turns}))
}

pub fn turns(human: &str, gpt: &str) -> serde_json::Value {
    json!([{"from": "human", "value": human}, {"from": "gpt", "value": gpt}])
}

pub fn omr_rows() -> Vec<OmrRow> {
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

pub fn omr_dataset(dir: &Path) {
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
