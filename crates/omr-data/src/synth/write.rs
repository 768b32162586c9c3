//! Parquet writer for the OpenMedReason / Hugging Face `datasets` layout, from raw rows whose
//! every field may be null, so tests can build deliberately broken shards with the same code
//! that writes good ones.
//!
//! Schema (all fields nullable, as pyarrow writes them):
//! `image: struct<bytes: binary, path: string>`, `question`, `reasoning`, `answer: string`,
//! `perception`, `knowledge`, `rationale: list<element: struct<unit_id, topic, claim,
//! source_quote, importance, presence_question, correctness_question: string>>`, then
//! optionally the tags `task_family`, `task`, `modality: string`. The list child is named
//! `element`, the Parquet-compliant name pyarrow ≥ 13 writes. The `huggingface` key-value
//! metadata is byte-for-byte what `datasets` 5.0.1 writes (Python `json.dumps` spacing, key
//! order as in the schema), checked against a file written by `datasets` itself.

use super::SynthError;
use crate::sample::RubricUnit;
use arrow_array::builder::{NullBufferBuilder, OffsetBufferBuilder};
use arrow_array::{ArrayRef, BinaryArray, ListArray, RecordBatch, StringArray, StructArray};
use arrow_schema::{DataType, Field, Fields, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression as PqCompression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

pub use crate::sample::UNIT_FIELDS;
/// Tag columns written after the OpenMedReason columns when `WriteOptions::tag_columns`.
pub const TAG_COLUMNS: [&str; 3] = ["task_family", "task", "modality"];

/// An HF `Image` value: `{bytes, path}`, either part may be null.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawImage {
    pub bytes: Option<Vec<u8>>,
    pub path: Option<String>,
}

/// One row as written; `None` writes a null. Build good rows with `SynthRow::into_raw` and
/// break them field by field for bad-data tests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RawRow {
    pub image: Option<RawImage>,
    pub question: Option<String>,
    pub reasoning: Option<String>,
    pub answer: Option<String>,
    pub perception: Option<Vec<RubricUnit>>,
    pub knowledge: Option<Vec<RubricUnit>>,
    pub rationale: Option<Vec<RubricUnit>>,
    pub task_family: Option<String>,
    pub task: Option<String>,
    pub modality: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// pyarrow's (and so `datasets`') default.
    #[default]
    Snappy,
    Zstd,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteOptions {
    /// Rows per parquet row group (the readers' block size).
    pub rows_per_group: usize,
    pub compression: Compression,
    /// Append `task_family`, `task`, `modality`.
    pub tag_columns: bool,
    /// Name of the trace column: `reasoning`, or `reasoning_trace` as one OpenMedReason
    /// snippet spells it.
    pub reasoning_column: String,
    /// Columns to leave out entirely (for missing-column tests).
    pub omit_columns: Vec<String>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            rows_per_group: 64,
            compression: Compression::Snappy,
            tag_columns: true,
            reasoning_column: "reasoning".into(),
            omit_columns: Vec::new(),
        }
    }
}

/// What one written file holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenFile {
    pub rows: usize,
    /// Size of the parquet file on disk.
    pub file_bytes: u64,
    /// In-memory Arrow size of the data (the `num_bytes` HF records for a split).
    pub arrow_bytes: u64,
}

enum Col {
    Image,
    Text(fn(&RawRow) -> Option<&str>),
    Units(fn(&RawRow) -> Option<&[RubricUnit]>),
}

/// The columns in file order: (name, kind), after renames and omissions.
fn columns(opts: &WriteOptions) -> Vec<(String, Col)> {
    let mut cols: Vec<(String, Col)> = vec![
        ("image".into(), Col::Image),
        ("question".into(), Col::Text(|r| r.question.as_deref())),
        (
            opts.reasoning_column.clone(),
            Col::Text(|r| r.reasoning.as_deref()),
        ),
        ("answer".into(), Col::Text(|r| r.answer.as_deref())),
        ("perception".into(), Col::Units(|r| r.perception.as_deref())),
        ("knowledge".into(), Col::Units(|r| r.knowledge.as_deref())),
        ("rationale".into(), Col::Units(|r| r.rationale.as_deref())),
    ];
    if opts.tag_columns {
        cols.push((
            "task_family".into(),
            Col::Text(|r| r.task_family.as_deref()),
        ));
        cols.push(("task".into(), Col::Text(|r| r.task.as_deref())));
        cols.push(("modality".into(), Col::Text(|r| r.modality.as_deref())));
    }
    cols.retain(|(name, _)| !opts.omit_columns.contains(name));
    cols
}

fn image_fields() -> Fields {
    Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ])
}

fn unit_fields() -> Fields {
    UNIT_FIELDS
        .iter()
        .map(|n| Field::new(*n, DataType::Utf8, true))
        .collect()
}

fn element_field() -> Arc<Field> {
    Arc::new(Field::new("element", DataType::Struct(unit_fields()), true))
}

fn data_type(col: &Col) -> DataType {
    match col {
        Col::Image => DataType::Struct(image_fields()),
        Col::Text(_) => DataType::Utf8,
        Col::Units(_) => DataType::List(element_field()),
    }
}

/// The HF `datasets` feature of a column, in `json.dumps` form.
fn feature_json(col: &Col) -> String {
    const VALUE: &str = r#"{"dtype": "string", "_type": "Value"}"#;
    match col {
        Col::Image => r#"{"_type": "Image"}"#.to_string(),
        Col::Text(_) => VALUE.to_string(),
        Col::Units(_) => {
            let inner = UNIT_FIELDS
                .iter()
                .map(|n| format!("\"{n}\": {VALUE}"))
                .collect::<Vec<_>>()
                .join(", ");
            format!(r#"{{"feature": {{{inner}}}, "_type": "List"}}"#)
        }
    }
}

/// The `huggingface` metadata value for the columns `opts` selects.
pub fn hf_metadata(opts: &WriteOptions) -> String {
    let feats = columns(opts)
        .iter()
        .map(|(n, c)| format!("\"{n}\": {}", feature_json(c)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(r#"{{"info": {{"features": {{{feats}}}}}}}"#)
}

/// Arrow schema (with the `huggingface` schema metadata) for the columns `opts` selects.
pub fn hf_schema(opts: &WriteOptions) -> Schema {
    let fields: Vec<Field> = columns(opts)
        .iter()
        .map(|(n, c)| Field::new(n.clone(), data_type(c), true))
        .collect();
    Schema::new_with_metadata(
        fields,
        HashMap::from([("huggingface".to_string(), hf_metadata(opts))]),
    )
}

fn text_array<'a>(values: impl Iterator<Item = Option<&'a str>>) -> ArrayRef {
    Arc::new(values.collect::<StringArray>())
}

fn image_array(rows: &[RawRow]) -> Result<ArrayRef, SynthError> {
    let bytes: BinaryArray = rows
        .iter()
        .map(|r| r.image.as_ref().and_then(|i| i.bytes.as_deref()))
        .collect();
    let paths = text_array(
        rows.iter()
            .map(|r| r.image.as_ref().and_then(|i| i.path.as_deref())),
    );
    let mut nulls = NullBufferBuilder::new(rows.len());
    rows.iter().for_each(|r| nulls.append(r.image.is_some()));
    Ok(Arc::new(StructArray::try_new(
        image_fields(),
        vec![Arc::new(bytes), paths],
        nulls.finish(),
    )?))
}

fn units_array(
    rows: &[RawRow],
    get: fn(&RawRow) -> Option<&[RubricUnit]>,
) -> Result<ArrayRef, SynthError> {
    let all: Vec<&RubricUnit> = rows
        .iter()
        .flat_map(|r| get(r).unwrap_or_default())
        .collect();
    let field = |f: fn(&RubricUnit) -> &str| text_array(all.iter().map(|u| Some(f(u))));
    let children = vec![
        field(|u| &u.unit_id),
        field(|u| &u.topic),
        field(|u| &u.claim),
        field(|u| &u.source_quote),
        field(|u| &u.importance),
        field(|u| &u.presence_question),
        field(|u| &u.correctness_question),
    ];
    let values = StructArray::try_new(unit_fields(), children, None)?;
    let mut offsets = OffsetBufferBuilder::<i32>::new(rows.len());
    let mut nulls = NullBufferBuilder::new(rows.len());
    for r in rows {
        offsets.push_length(get(r).map_or(0, <[RubricUnit]>::len));
        nulls.append(get(r).is_some());
    }
    Ok(Arc::new(ListArray::try_new(
        element_field(),
        offsets.finish(),
        Arc::new(values),
        nulls.finish(),
    )?))
}

/// One record batch of `rows` in the schema `opts` selects.
pub fn record_batch(rows: &[RawRow], opts: &WriteOptions) -> Result<RecordBatch, SynthError> {
    let mut arrays = Vec::new();
    for (_, col) in columns(opts) {
        arrays.push(match col {
            Col::Image => image_array(rows)?,
            Col::Text(get) => text_array(rows.iter().map(get)),
            Col::Units(get) => units_array(rows, get)?,
        });
    }
    Ok(RecordBatch::try_new(Arc::new(hf_schema(opts)), arrays)?)
}

/// Writes `rows` to `path` as one parquet file in row groups of `opts.rows_per_group`.
pub fn write_rows(
    path: &Path,
    rows: &[RawRow],
    opts: &WriteOptions,
) -> Result<WrittenFile, SynthError> {
    if opts.rows_per_group == 0 {
        return Err(SynthError::Config(
            "rows_per_group must be at least 1".into(),
        ));
    }
    let batch = record_batch(rows, opts)?;
    let arrow_bytes = batch
        .columns()
        .iter()
        .map(|a| a.to_data().get_slice_memory_size().unwrap_or(0) as u64)
        .sum();
    let compression = match opts.compression {
        Compression::Snappy => PqCompression::SNAPPY,
        Compression::Zstd => PqCompression::ZSTD(ZstdLevel::default()),
    };
    let props = WriterProperties::builder()
        .set_compression(compression)
        .set_max_row_group_row_count(Some(opts.rows_per_group))
        // JPEG bytes neither repeat nor compress: a dictionary would only cost time.
        .set_column_dictionary_enabled(
            ColumnPath::from(vec!["image".to_string(), "bytes".to_string()]),
            false,
        )
        .set_key_value_metadata(Some(vec![KeyValue::new(
            "huggingface".to_string(),
            hf_metadata(opts),
        )]))
        .build();
    let io = |source| SynthError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::create(path).map_err(io)?;
    let pq = |e: parquet::errors::ParquetError| SynthError::Parquet {
        path: path.display().to_string(),
        detail: e.to_string(),
    };
    let mut writer =
        ArrowWriter::try_new(std::io::BufWriter::new(file), batch.schema(), Some(props))
            .map_err(pq)?;
    // Writing in row-group-sized slices keeps the writer's buffers at one group.
    let mut start = 0;
    while start < rows.len() {
        let len = opts.rows_per_group.min(rows.len() - start);
        writer.write(&batch.slice(start, len)).map_err(pq)?;
        start += len;
    }
    let out = writer.into_inner().map_err(pq)?;
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    let file_bytes = file.metadata().map_err(io)?.len();
    Ok(WrittenFile {
        rows: rows.len(),
        file_bytes,
        arrow_bytes,
    })
}
