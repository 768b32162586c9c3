//! Fixture builders for `tests/readers.rs`: OpenMedReason-shaped parquet written with arrow
//! directly, WebDataset tars, a fake Hugging Face cache, and a tiny HTTP server that answers
//! like the Hub for the two calls hf-hub makes (repo info, file resolve).
//!
//! Image bytes are short fake JPEG/PNG headers: readers carry bytes and never decode them.

// Each test binary uses its own subset of these builders.
#![allow(dead_code)]

pub mod check;

use arrow_array::builder::{NullBufferBuilder, OffsetBufferBuilder};
use arrow_array::{
    ArrayRef, BinaryArray, Int64Array, ListArray, RecordBatch, StringArray, StructArray,
};
use arrow_schema::{DataType, Field, Fields, Schema};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub fn jpeg(n: u8) -> Vec<u8> {
    vec![0xFF, 0xD8, 0xFF, 0xE0, b'j', n]
}

pub fn png(n: u8) -> Vec<u8> {
    vec![0x89, b'P', b'N', b'G', b'p', n]
}

pub const Q: &str = "Which finding is shown?\nA. Effusion\nB. Pneumothorax\nC. Normal\nD. Mass";

pub fn trace(letter: &str) -> String {
    format!("<think>The visceral pleural line is visible.</think><answer>{letter}</answer>")
}

/// One OpenMedReason row; `None` writes a null.
#[derive(Clone, Default)]
pub struct OmrRow {
    /// `None` → null struct; `Some((bytes, path))`.
    pub image: Option<(Option<Vec<u8>>, Option<String>)>,
    pub question: Option<String>,
    pub reasoning: Option<String>,
    pub answer: Option<String>,
    /// `(unit_id, claim, importance)`; `None` → null list.
    pub perception: Option<Vec<(String, String, String)>>,
    pub task_family: Option<String>,
    pub id: i64,
}

impl OmrRow {
    pub fn good(n: u8) -> Self {
        OmrRow {
            image: Some((Some(jpeg(n)), Some(format!("{n}.jpg")))),
            question: Some(Q.into()),
            reasoning: Some(trace("B")),
            answer: Some("B".into()),
            perception: Some(Vec::new()),
            task_family: Some("Diagnosis".into()),
            id: 100 + n as i64,
        }
    }
}

fn strings(v: Vec<Option<&str>>) -> ArrayRef {
    Arc::new(StringArray::from(v))
}

/// Writes OpenMedReason columns: `image` struct, `question`, `reasoning`, `answer`,
/// `perception` (list of a 3-field subset of the unit struct), `rationale` (always empty
/// lists), `task_family`, `id`, with at most `row_group` rows per row group.
pub fn write_omr_parquet(path: &Path, rows: &[OmrRow], row_group: usize) {
    let image_fields = Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ]);
    let mut image_nulls = NullBufferBuilder::new(rows.len());
    let mut bytes = Vec::new();
    let mut paths = Vec::new();
    for r in rows {
        image_nulls.append(r.image.is_some());
        let (b, p) = r.image.clone().unwrap_or((None, None));
        bytes.push(b);
        paths.push(p);
    }
    let image = StructArray::new(
        image_fields.clone(),
        vec![
            Arc::new(BinaryArray::from(
                bytes.iter().map(|b| b.as_deref()).collect::<Vec<_>>(),
            )),
            strings(paths.iter().map(|p| p.as_deref()).collect()),
        ],
        image_nulls.finish(),
    );
    let unit_fields = Fields::from(vec![
        Field::new("unit_id", DataType::Utf8, true),
        Field::new("claim", DataType::Utf8, true),
        Field::new("importance", DataType::Utf8, true),
    ]);
    let item = Arc::new(Field::new(
        "item",
        DataType::Struct(unit_fields.clone()),
        true,
    ));
    let mut offsets = OffsetBufferBuilder::<i32>::new(rows.len());
    let mut list_nulls = NullBufferBuilder::new(rows.len());
    let mut units: Vec<(String, String, String)> = Vec::new();
    for r in rows {
        list_nulls.append(r.perception.is_some());
        let u = r.perception.clone().unwrap_or_default();
        offsets.push_length(u.len());
        units.extend(u);
    }
    let col = |f: fn(&(String, String, String)) -> &str| -> ArrayRef {
        strings(units.iter().map(|u| Some(f(u))).collect())
    };
    let values = StructArray::new(
        unit_fields.clone(),
        vec![col(|u| &u.0), col(|u| &u.1), col(|u| &u.2)],
        None,
    );
    let perception = ListArray::new(
        item.clone(),
        offsets.finish(),
        Arc::new(values),
        list_nulls.finish(),
    );
    let mut empty = OffsetBufferBuilder::<i32>::new(rows.len());
    rows.iter().for_each(|_| empty.push_length(0));
    let rationale = ListArray::new(
        item.clone(),
        empty.finish(),
        Arc::new(StructArray::new_null(unit_fields, 0)),
        None,
    );
    let text =
        |f: fn(&OmrRow) -> &Option<String>| strings(rows.iter().map(|r| f(r).as_deref()).collect());
    let schema = Schema::new(vec![
        Field::new("image", DataType::Struct(image_fields), true),
        Field::new("question", DataType::Utf8, true),
        Field::new("reasoning", DataType::Utf8, true),
        Field::new("answer", DataType::Utf8, true),
        Field::new("perception", DataType::List(item.clone()), true),
        Field::new("rationale", DataType::List(item), true),
        Field::new("task_family", DataType::Utf8, true),
        Field::new("id", DataType::Int64, false),
    ]);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(image),
        text(|r| &r.question),
        text(|r| &r.reasoning),
        text(|r| &r.answer),
        Arc::new(perception),
        Arc::new(rationale),
        text(|r| &r.task_family),
        Arc::new(Int64Array::from(
            rows.iter().map(|r| r.id).collect::<Vec<_>>(),
        )),
    ];
    write_batch(
        path,
        RecordBatch::try_new(Arc::new(schema), columns).expect("batch"),
        row_group,
    );
}

pub fn write_batch(path: &Path, batch: RecordBatch, row_group: usize) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(row_group))
        .build();
    let file = std::fs::File::create(path).expect("create parquet");
    let mut w = ArrowWriter::try_new(file, batch.schema(), Some(props)).expect("writer");
    w.write(&batch).expect("write");
    w.close().expect("close");
}

/// A batch with the given `(name, array)` columns, all nullable.
pub fn batch(columns: Vec<(&str, ArrayRef)>) -> RecordBatch {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
        .collect();
    RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .expect("batch")
}

/// A tar of `(member name, bytes)` in the given order.
pub fn write_tar(path: &Path, members: &[(String, Vec<u8>)]) {
    let file = std::fs::File::create(path).expect("create tar");
    let mut b = tar::Builder::new(file);
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_slice())
            .expect("append");
    }
    b.into_inner().expect("finish").flush().expect("flush");
}

/// A fake Hub answering `GET /api/datasets/<id>/revision/main` with `info_json` and
/// `GET /datasets/<id>/resolve/main/<file>` with `file` (honouring `Range`), or `status`
/// to every request when it is not 200. Returns the endpoint and the count of file bodies
/// served.
pub fn fake_hub(
    status: u16,
    info_json: String,
    file: Vec<u8>,
    sha: String,
) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let downloads = Arc::new(AtomicUsize::new(0));
    let counter = downloads.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut request = String::new();
            // `Range: bytes=a-b` → (a, Some(b)); `bytes=a-` → (a, None).
            let mut range: (usize, Option<usize>) = (0, None);
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                if line == "\r\n" {
                    break;
                }
                if request.is_empty() {
                    request = line.clone();
                } else if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    let (a, b) = v.trim().split_once('-').unwrap_or(("0", ""));
                    range = (a.parse().unwrap_or(0), b.parse().ok());
                }
                line.clear();
            }
            let (code, headers, body) = if status != 200 {
                (
                    status,
                    String::new(),
                    b"{\"error\":\"Access to this dataset is restricted\"}".to_vec(),
                )
            } else if request.contains("/api/datasets/") {
                (
                    200,
                    "Content-Type: application/json\r\n".to_string(),
                    info_json.clone().into_bytes(),
                )
            } else if request.contains("/resolve/") {
                let start = range.0.min(file.len());
                let end = range.1.map_or(file.len(), |e| (e + 1).min(file.len()));
                if range.1.is_none() {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                let headers = format!(
                    "ETag: \"blob{}\"\r\nX-Repo-Commit: {sha}\r\nContent-Range: bytes {start}-{}/{}\r\n",
                    file.len(),
                    end.saturating_sub(1),
                    file.len()
                );
                (206, headers, file[start..end].to_vec())
            } else {
                (404, String::new(), Vec::new())
            };
            let head = format!(
                "HTTP/1.1 {code} X\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream
                .write_all(head.as_bytes())
                .and_then(|_| stream.write_all(&body));
        }
    });
    (endpoint, downloads)
}
