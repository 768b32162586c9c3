//! LLaVA / ShareGPT and `messages` chat data: JSONL files (or JSON array files) plus an image
//! folder.
//!
//! Open scans each file once and keeps only the byte span of every record (16 bytes each), so
//! a 665K-record LLaVA file costs ~10 MB of index and no parsed JSON. A block is 256
//! consecutive records; reading one seeks to the block's first byte, reads its span and parses
//! those records only. JSON array files (`[{…}, {…}]`, how LLaVA ships its mixes) are indexed
//! the same way by a small scanner that tracks strings and nesting, so they are never parsed
//! whole. Rows count records (non-blank lines / array elements) from 0.
//!
//! Images are read at block time from the image root (`image_root`, else the JSONL file's own
//! folder), confined to it ([`Confined`]).

use super::paths::{self, Confined};
use super::records::{self, Record};
use super::{BlockInfo, Format, Source, SourceError};
use crate::quarantine::Reason;
use crate::sample::{ImageBytes, Origin, Sample};
use serde_json::Value;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Records per block: enough to amortize a seek, few enough that a block of decoded images
/// stays small.
pub const BLOCK_RECORDS: usize = 256;

/// How many leading records format detection looks at before giving up.
const SNIFF_RECORDS: usize = 16;

struct JsonFile {
    path: PathBuf,
    images: Confined,
    /// Byte span `[start, end)` of each record.
    spans: Vec<(u64, u64)>,
}

pub struct JsonlSource {
    name: String,
    format: Format,
    files: Vec<JsonFile>,
    shard_names: Vec<String>,
    blocks: Vec<BlockInfo>,
}

/// `.jsonl` / `.json` files of `split` under a folder: split-named files, else (folder not
/// split by name) every top-level `.jsonl`.
pub fn dir_files(dir: &Path, split: &str) -> Result<Vec<(String, PathBuf)>, SourceError> {
    let mut files = paths::split_files(dir, split, "jsonl")?;
    files.extend(paths::split_files(dir, split, "json")?);
    files.sort();
    if files.is_empty() {
        files = paths::split_or_all(dir, split, "jsonl")?;
    }
    Ok(files)
}

impl JsonlSource {
    /// Indexes `files`; `format` is `Llava`, `Messages` or `Auto` (decided by the first
    /// parseable record of the first file: `conversations` → LLaVA, `messages` → messages).
    pub fn open(
        name: &str,
        files: Vec<(String, PathBuf)>,
        format: Format,
        image_root: Option<&Path>,
    ) -> Result<Self, SourceError> {
        let mut shard_names = Vec::with_capacity(files.len());
        let mut indexed = Vec::with_capacity(files.len());
        let mut blocks = Vec::new();
        for (i, (shard, path)) in files.into_iter().enumerate() {
            let spans = index_file(&path)?;
            let mut first = 0;
            while first < spans.len() {
                let rows = BLOCK_RECORDS.min(spans.len() - first);
                blocks.push(BlockInfo {
                    shard: i,
                    first_row: first as u64,
                    rows,
                });
                first += rows;
            }
            let folder = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            let images = Confined::new(image_root.unwrap_or(&folder));
            shard_names.push(shard);
            indexed.push(JsonFile {
                path,
                images,
                spans,
            });
        }
        let format = match format {
            Format::Auto => sniff(&indexed)?,
            f => f,
        };
        Ok(JsonlSource {
            name: name.to_string(),
            format,
            files: indexed,
            shard_names,
            blocks,
        })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    fn record(&self, file: &JsonFile, bytes: &[u8], origin: Origin) -> Result<Sample, Reason> {
        let rec = parse_record(bytes)?;
        let conv = match self.format {
            Format::Messages => records::parse_messages(&rec)?,
            _ => records::parse_llava(&rec)?,
        };
        let placeholders = conv.placeholders();
        if placeholders != conv.image_paths.len() {
            return Err(Reason::ImageCountMismatch {
                placeholders,
                images: conv.image_paths.len(),
            });
        }
        let mut images = Vec::with_capacity(conv.image_paths.len());
        for p in &conv.image_paths {
            images.push(ImageBytes {
                bytes: file.images.read(p)?,
                path: Some(p.clone()),
            });
        }
        Ok(records::chat_sample(origin, conv, images, &rec))
    }
}

impl Source for JsonlSource {
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
        let file = &self.files[block.shard];
        let first = block.first_row as usize;
        let spans = &file.spans[first..first + block.rows];
        let (Some(&(start, _)), Some(&(_, end))) = (spans.first(), spans.last()) else {
            return Ok(Vec::new());
        };
        let shown = || file.path.display().to_string();
        let mut buf = vec![0u8; (end - start) as usize];
        let mut f = File::open(&file.path).map_err(|source| SourceError::Io {
            path: shown(),
            source,
        })?;
        f.seek(SeekFrom::Start(start))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|source| SourceError::Io {
                path: shown(),
                source,
            })?;
        let out = spans
            .iter()
            .enumerate()
            .map(|(k, &(s, e))| {
                let origin = Origin {
                    source: self.name.clone(),
                    shard: self.shard_names[block.shard].clone(),
                    row: (first + k) as u64,
                };
                let bytes = &buf[(s - start) as usize..(e - start) as usize];
                self.record(file, bytes, origin.clone())
                    .map_err(|r| (origin, r))
            })
            .collect();
        Ok(out)
    }
}

/// One record's bytes → JSON object.
pub(crate) fn parse_record(bytes: &[u8]) -> Result<Record, Reason> {
    let text = std::str::from_utf8(bytes).map_err(|_| Reason::InvalidUtf8)?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(rec)) => Ok(rec),
        Ok(_) => Err(Reason::MalformedJson("record is not a JSON object".into())),
        Err(e) => Err(Reason::MalformedJson(e.to_string())),
    }
}

fn sniff(files: &[JsonFile]) -> Result<Format, SourceError> {
    let Some(file) = files.first() else {
        return Ok(Format::Llava);
    };
    let shown = || file.path.display().to_string();
    let mut f = File::open(&file.path).map_err(|source| SourceError::Io {
        path: shown(),
        source,
    })?;
    for &(s, e) in file.spans.iter().take(SNIFF_RECORDS) {
        let mut buf = vec![0u8; (e - s) as usize];
        f.seek(SeekFrom::Start(s))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|source| SourceError::Io {
                path: shown(),
                source,
            })?;
        let Ok(rec) = parse_record(&buf) else {
            continue;
        };
        if rec.contains_key("conversations") {
            return Ok(Format::Llava);
        }
        if rec.contains_key("messages") {
            return Ok(Format::Messages);
        }
    }
    Err(SourceError::UnknownFormat(format!(
        "{} (no `conversations` or `messages` in its first records)",
        shown()
    )))
}

/// Record spans of a JSONL file, or of a JSON array file (first non-space byte `[`).
fn index_file(path: &Path) -> Result<Vec<(u64, u64)>, SourceError> {
    let shown = || path.display().to_string();
    let file = File::open(path).map_err(|source| SourceError::Io {
        path: shown(),
        source,
    })?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let first = loop {
        let buf = r.fill_buf().map_err(|source| SourceError::Io {
            path: shown(),
            source,
        })?;
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(p) => break Some(buf[p]),
            None if buf.is_empty() => break None,
            None => {
                let n = buf.len();
                r.consume(n);
            }
        }
    };
    r.seek(SeekFrom::Start(0))
        .map_err(|source| SourceError::Io {
            path: shown(),
            source,
        })?;
    let spans = if first == Some(b'[') {
        array_spans(r)
    } else {
        line_spans(r)
    };
    spans.map_err(|e| match e {
        ScanError::Io(source) => SourceError::Io {
            path: shown(),
            source,
        },
        ScanError::Syntax(detail) => SourceError::Schema {
            path: shown(),
            detail,
        },
    })
}

enum ScanError {
    Io(std::io::Error),
    Syntax(String),
}

/// Non-blank lines, without their `\n` / `\r\n`.
fn line_spans(mut r: impl BufRead) -> Result<Vec<(u64, u64)>, ScanError> {
    let mut spans = Vec::new();
    let mut line = Vec::new();
    let mut pos = 0u64;
    loop {
        line.clear();
        let n = r.read_until(b'\n', &mut line).map_err(ScanError::Io)?;
        if n == 0 {
            return Ok(spans);
        }
        let content = line.iter().rposition(|b| !b.is_ascii_whitespace());
        let lead = line.iter().position(|b| !b.is_ascii_whitespace());
        if let (Some(a), Some(b)) = (lead, content) {
            spans.push((pos + a as u64, pos + b as u64 + 1));
        }
        pos += n as u64;
    }
}

/// Elements of a top-level JSON array. Strings (with escapes) and nesting are tracked so that
/// commas and brackets inside values do not split records; the elements themselves are
/// validated later, when their block is parsed.
fn array_spans(mut r: impl BufRead) -> Result<Vec<(u64, u64)>, ScanError> {
    let syntax = |pos: u64, why: &str| {
        ScanError::Syntax(format!("not a valid JSON array at byte {pos}: {why}"))
    };
    let mut spans = Vec::new();
    let (mut depth, mut in_str, mut esc, mut opened, mut closed) =
        (0u32, false, false, false, false);
    let mut start: Option<u64> = None;
    let mut last = 0u64;
    let mut pos = 0u64;
    loop {
        let buf = r.fill_buf().map_err(ScanError::Io)?;
        if buf.is_empty() {
            break;
        }
        for &b in buf {
            let here = pos;
            pos += 1;
            if closed {
                if !b.is_ascii_whitespace() {
                    return Err(syntax(here, "data after the closing `]`"));
                }
                continue;
            }
            if !opened {
                if b == b'[' {
                    opened = true;
                }
                continue;
            }
            if in_str {
                match (esc, b) {
                    (true, _) => esc = false,
                    (false, b'\\') => esc = true,
                    (false, b'"') => in_str = false,
                    _ => {}
                }
                last = here;
                continue;
            }
            if b.is_ascii_whitespace() {
                continue;
            }
            match b {
                b',' if depth == 0 => match start.take() {
                    Some(s) => spans.push((s, last + 1)),
                    None => return Err(syntax(here, "empty element")),
                },
                b']' if depth == 0 => {
                    if let Some(s) = start.take() {
                        spans.push((s, last + 1));
                    }
                    closed = true;
                }
                b'}' | b']' => {
                    depth = depth
                        .checked_sub(1)
                        .ok_or_else(|| syntax(here, "unbalanced `}`"))?
                }
                _ => {
                    if depth == 0 && start.is_none() {
                        start = Some(here);
                    }
                    match b {
                        b'"' => in_str = true,
                        b'{' | b'[' => depth += 1,
                        _ => {}
                    }
                }
            }
            last = here;
        }
        let n = buf.len();
        r.consume(n);
    }
    if !closed {
        return Err(syntax(pos, "unterminated (file cut short?)"));
    }
    Ok(spans)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_scanner() {
        let text = br#" [ {"a": "x,]\"}"}, {"b": [1, {"c": 2}]} ,3 ] "#;
        let spans = array_spans(&text[..]).ok().expect("scans");
        let got: Vec<&str> = spans
            .iter()
            .map(|&(s, e)| std::str::from_utf8(&text[s as usize..e as usize]).expect("utf8"))
            .collect();
        assert_eq!(got, [r#"{"a": "x,]\"}"}"#, r#"{"b": [1, {"c": 2}]}"#, "3"]);
        assert!(array_spans(&br#"[{"a": 1}"#[..]).is_err());
        assert!(array_spans(&b"[1] x"[..]).is_err());
    }

    #[test]
    fn line_scanner() {
        let text = b"{\"a\":1}\r\n\n  \n{\"b\":2}";
        let spans = line_spans(&text[..]).ok().expect("scans");
        assert_eq!(spans, [(0, 7), (13, 20)]);
    }
}
