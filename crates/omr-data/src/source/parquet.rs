//! HF datasets parquet, as OpenMedReason ships it: one block per row group.
//!
//! Open reads every file's footer once (row groups, schema) and checks the columns, so a wrong
//! file stops the run at start-up naming the file and column rather than failing every row.
//! A block read opens the file, projects only the columns the sample needs and decodes one
//! row group: memory holds one row group of images, never a whole file.
//!
//! Columns: `image` (HF `Image` struct `{bytes, path}`, or plain binary), `question`,
//! `reasoning` (or `reasoning_trace`), `answer`; optional rubric lists `perception` /
//! `knowledge` / `rationale`; every other string, integer or boolean column becomes a tag in
//! `Sample::meta` (`task_family`, `modality`, `id`, …).

use super::columns::{list_values, scalar_string, BinCol, RubricCol, StrCol};
use super::paths::Confined;
use super::records::{self, OmrText, RUBRIC_AXES};
use super::{BlockInfo, Source, SourceError};
use crate::quarantine::Reason;
use crate::sample::{ImageBytes, Origin, Rubric, Sample};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, Fields, Schema};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;

/// Which columns of one file feed a sample, checked at open.
#[derive(Debug)]
struct Layout {
    /// Top-level columns to decode, as parquet root indices.
    roots: Vec<usize>,
    reasoning: String,
    rubric: Vec<&'static str>,
    tags: Vec<String>,
}

struct Shard {
    path: PathBuf,
    metadata: ArrowReaderMetadata,
    layout: Layout,
}

/// An opened set of parquet files.
pub struct ParquetSource {
    name: String,
    images: Confined,
    shard_names: Vec<String>,
    shards: Vec<Shard>,
    blocks: Vec<BlockInfo>,
    /// Row group index within its file, per block.
    row_groups: Vec<usize>,
}

impl ParquetSource {
    /// Opens `files` (`(shard name, path)`, already in their final order); image paths that
    /// a row names instead of embedding bytes are resolved inside `images`.
    pub fn open_files(
        name: &str,
        images: Confined,
        files: Vec<(String, PathBuf)>,
    ) -> Result<Self, SourceError> {
        let mut shard_names = Vec::with_capacity(files.len());
        let mut shards = Vec::with_capacity(files.len());
        let mut blocks = Vec::new();
        let mut row_groups = Vec::new();
        for (i, (shard_name, path)) in files.into_iter().enumerate() {
            let shown = path.display().to_string();
            let file = File::open(&path).map_err(|source| SourceError::Io {
                path: shown.clone(),
                source,
            })?;
            let metadata =
                ArrowReaderMetadata::load(&file, ArrowReaderOptions::new()).map_err(|e| {
                    SourceError::Parquet {
                        path: shown.clone(),
                        detail: e.to_string(),
                    }
                })?;
            let layout = layout(metadata.schema()).map_err(|detail| SourceError::Schema {
                path: shown,
                detail,
            })?;
            let mut first_row = 0u64;
            for (g, rg) in metadata.metadata().row_groups().iter().enumerate() {
                let rows = rg.num_rows().max(0) as u64;
                blocks.push(BlockInfo {
                    shard: i,
                    first_row,
                    rows: rows as usize,
                });
                row_groups.push(g);
                first_row += rows;
            }
            shard_names.push(shard_name);
            shards.push(Shard {
                path,
                metadata,
                layout,
            });
        }
        Ok(ParquetSource {
            name: name.to_string(),
            images,
            shard_names,
            shards,
            blocks,
            row_groups,
        })
    }

    /// Decodes row group `rg` of `shard` with only the needed columns.
    fn read_row_group(
        &self,
        shard: &Shard,
        rg: usize,
        rows: usize,
    ) -> Result<Vec<RecordBatch>, SourceError> {
        let shown = || shard.path.display().to_string();
        let err = |e: &dyn std::fmt::Display| SourceError::Parquet {
            path: shown(),
            detail: format!("row group {rg}: {e}"),
        };
        let file = File::open(&shard.path).map_err(|source| SourceError::Io {
            path: shown(),
            source,
        })?;
        let mask = ProjectionMask::roots(
            shard.metadata.parquet_schema(),
            shard.layout.roots.iter().copied(),
        );
        let reader =
            ParquetRecordBatchReaderBuilder::new_with_metadata(file, shard.metadata.clone())
                .with_projection(mask)
                .with_row_groups(vec![rg])
                .with_batch_size(rows.max(1))
                .build()
                .map_err(|e| err(&e))?;
        let batches = reader.collect::<Result<Vec<_>, _>>().map_err(|e| err(&e))?;
        let got: usize = batches.iter().map(RecordBatch::num_rows).sum();
        if got != rows {
            return Err(err(&format!(
                "footer says {rows} rows but {got} were decoded"
            )));
        }
        Ok(batches)
    }

    fn row(
        &self,
        batch: &RecordBatch,
        layout: &Layout,
        i: usize,
        origin: Origin,
    ) -> Result<Sample, Reason> {
        let text = |name: &str| {
            batch
                .column_by_name(name)
                .and_then(|c| StrCol::new(c.as_ref()))
        };
        let (question, reasoning, answer) =
            (text("question"), text(&layout.reasoning), text("answer"));
        let fields = OmrText {
            question: question.as_ref().and_then(|c| c.get(i)),
            reasoning: reasoning.as_ref().and_then(|c| c.get(i)),
            answer: answer.as_ref().and_then(|c| c.get(i)),
        };
        let (mcq, trace) = records::check_omr(&fields)?;
        let image = batch.column_by_name("image").ok_or(Reason::ImageMissing)?;
        let image = self.image(image.as_ref(), i)?;
        let mut rubric = Rubric::default();
        for axis in &layout.rubric {
            let units = batch
                .column_by_name(axis)
                .and_then(|c| list_values(c.as_ref(), i))
                .map(|v| RubricCol::new(v.as_ref()).units())
                .unwrap_or_default();
            match *axis {
                "perception" => rubric.perception = units,
                "knowledge" => rubric.knowledge = units,
                _ => rubric.rationale = units,
            }
        }
        let mut meta = BTreeMap::new();
        for tag in &layout.tags {
            if let Some(v) = batch
                .column_by_name(tag)
                .and_then(|c| scalar_string(c.as_ref(), i))
            {
                meta.insert(tag.clone(), v);
            }
        }
        Ok(records::omr_sample(
            origin,
            image,
            mcq,
            trace,
            records::rubric_if_any(rubric),
            meta,
        ))
    }

    /// HF `Image` value of row `i`: embedded bytes, else the file its `path` names.
    fn image(&self, col: &dyn Array, i: usize) -> Result<ImageBytes, Reason> {
        if col.is_null(i) {
            return Err(Reason::ImageMissing);
        }
        let (bytes, path) = match col.data_type() {
            DataType::Struct(_) => {
                let s = arrow_array::cast::AsArray::as_struct(col);
                let bytes = s
                    .column_by_name("bytes")
                    .and_then(|c| BinCol::new(c.as_ref()));
                let path = s
                    .column_by_name("path")
                    .and_then(|c| StrCol::new(c.as_ref()));
                let b = bytes.and_then(|b| b.get(i).map(<[u8]>::to_vec));
                (b, path.and_then(|p| p.get(i).map(str::to_string)))
            }
            _ => (
                BinCol::new(col).and_then(|b| b.get(i).map(<[u8]>::to_vec)),
                None,
            ),
        };
        match (bytes, path) {
            (Some(b), path) if !b.is_empty() => Ok(ImageBytes { bytes: b, path }),
            (_, Some(p)) if !p.is_empty() => {
                let bytes = self.images.read(&p)?;
                Ok(ImageBytes {
                    bytes,
                    path: Some(p),
                })
            }
            // Zero bytes and nowhere else to look: the record had an image that is empty.
            (Some(_), _) => Err(Reason::ImageEmpty),
            _ => Err(Reason::ImageMissing),
        }
    }
}

impl Source for ParquetSource {
    fn name(&self) -> &str {
        &self.name
    }
    fn shards(&self) -> &[String] {
        &self.shard_names
    }
    fn blocks(&self) -> &[BlockInfo] {
        &self.blocks
    }

    fn read_block(&self, i: usize) -> Result<Vec<Result<Sample, (Origin, Reason)>>, SourceError> {
        let block = self.block(i)?;
        let shard = &self.shards[block.shard];
        let batches = self.read_row_group(shard, self.row_groups[i], block.rows)?;
        let mut out = Vec::with_capacity(block.rows);
        let mut row = block.first_row;
        for batch in &batches {
            for r in 0..batch.num_rows() {
                let origin = Origin {
                    source: self.name.clone(),
                    shard: self.shard_names[block.shard].clone(),
                    row,
                };
                out.push(
                    self.row(batch, &shard.layout, r, origin.clone())
                        .map_err(|reason| (origin, reason)),
                );
                row += 1;
            }
        }
        Ok(out)
    }
}

fn is_text(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}
fn is_binary(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView
    )
}

/// Checks the columns of one file and decides what to decode.
fn layout(schema: &Schema) -> Result<Layout, String> {
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let find = |name: &str| schema.fields().iter().position(|f| f.name() == name);
    let missing = |name: &str| {
        format!(
            "missing required column `{name}` (columns: {})",
            names.join(", ")
        )
    };
    let wrong =
        |name: &str, t: &DataType, want: &str| format!("column `{name}` is {t}, expected {want}");
    let mut roots = Vec::new();

    let image = find("image").ok_or_else(|| missing("image"))?;
    match schema.field(image).data_type() {
        DataType::Struct(fields) => {
            check_image_struct(fields).map_err(|d| format!("column `image`: {d}"))?
        }
        t if is_binary(t) => {}
        t => {
            return Err(wrong(
                "image",
                t,
                "an HF Image struct {bytes, path} or binary",
            ))
        }
    }
    roots.push(image);
    let reasoning = ["reasoning", "reasoning_trace"]
        .into_iter()
        .find(|n| find(n).is_some())
        .ok_or_else(|| missing("reasoning` or `reasoning_trace"))?;
    for name in ["question", reasoning, "answer"] {
        let idx = find(name).ok_or_else(|| missing(name))?;
        let t = schema.field(idx).data_type();
        if !is_text(t) {
            return Err(wrong(name, t, "string"));
        }
        roots.push(idx);
    }
    let mut rubric = Vec::new();
    for axis in RUBRIC_AXES {
        let Some(idx) = find(axis) else { continue };
        let t = schema.field(idx).data_type();
        let item = match t {
            DataType::Null => continue,
            DataType::List(f) | DataType::LargeList(f) => f.data_type(),
            _ => return Err(wrong(axis, t, "a list of rubric-unit structs")),
        };
        match item {
            DataType::Null => continue,
            DataType::Struct(fields) => {
                if let Some(f) = fields
                    .iter()
                    .find(|f| !is_text(f.data_type()) && *f.data_type() != DataType::Null)
                {
                    return Err(format!(
                        "column `{axis}`: field `{}` is {}, expected string",
                        f.name(),
                        f.data_type()
                    ));
                }
            }
            _ => return Err(wrong(axis, t, "a list of rubric-unit structs")),
        }
        rubric.push(axis);
        roots.push(idx);
    }
    let taken = [
        "image",
        "question",
        "answer",
        "reasoning",
        "reasoning_trace",
    ];
    let mut tags = Vec::new();
    for (idx, f) in schema.fields().iter().enumerate() {
        if taken.contains(&f.name().as_str()) || RUBRIC_AXES.contains(&f.name().as_str()) {
            continue;
        }
        if is_text(f.data_type())
            || f.data_type().is_integer()
            || *f.data_type() == DataType::Boolean
        {
            tags.push(f.name().clone());
            roots.push(idx);
        }
    }
    roots.sort_unstable();
    Ok(Layout {
        roots,
        reasoning: reasoning.to_string(),
        rubric,
        tags,
    })
}

fn check_image_struct(fields: &Fields) -> Result<(), String> {
    let bytes = fields
        .iter()
        .find(|f| f.name() == "bytes")
        .ok_or("struct has no `bytes` field")?;
    if !is_binary(bytes.data_type()) {
        return Err(format!(
            "field `bytes` is {}, expected binary",
            bytes.data_type()
        ));
    }
    if let Some(path) = fields.iter().find(|f| f.name() == "path") {
        if !is_text(path.data_type()) {
            return Err(format!(
                "field `path` is {}, expected string",
                path.data_type()
            ));
        }
    }
    Ok(())
}
