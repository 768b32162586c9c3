//! WebDataset tar shards: `key.jpg|jpeg|png|dcm|…` + `key.json` members, one sample per key.
//!
//! Open walks each tar's headers only (the reader seeks past member bodies) and records, per
//! sample, where its members' bytes lie; it also checks every member lies inside the file, so
//! a shard cut short by a failed copy stops the run at start-up naming the file. A block is 64
//! consecutive samples; reading one seeks straight to its members.
//!
//! Keys follow WebDataset: the member path up to the first dot of its file name
//! (`a/b/0001.seg.png` → key `a/b/0001`). Members of a sample are adjacent in the tar. The
//! `.json` member holds OpenMedReason fields (`question`, `reasoning`, `answer`, rubric…), a
//! LLaVA `conversations` list or a `messages` list; its images are the sample's image members
//! in tar order (paths inside the JSON are ignored). Other members (`.txt`, `.cls`) are skipped.
//! An image without a `.json`, or a `.json` without an image, is a row of its own that fails
//! with [`Reason::OrphanMember`].

use super::jsonl::parse_record;
use super::paths;
use super::records::{self, OmrText, Record, RUBRIC_AXES};
use super::{BlockInfo, Source, SourceError};
use crate::quarantine::Reason;
use crate::sample::{ImageBytes, Origin, Sample};
use serde_json::Value;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Samples per block.
pub const BLOCK_SAMPLES: usize = 64;

/// Member extensions (last dot-segment, lower case) that are images.
const IMAGE_EXTS: &[&str] = &["jpg", "jpeg", "png", "dcm", "webp", "bmp", "tif", "tiff"];

#[derive(Clone, Debug)]
struct Member {
    name: String,
    offset: u64,
    size: u64,
}

#[derive(Debug, Default)]
struct Group {
    key: String,
    json: Option<Member>,
    images: Vec<Member>,
}

struct TarShard {
    path: PathBuf,
    groups: Vec<Group>,
}

pub struct WdsSource {
    name: String,
    shards: Vec<TarShard>,
    shard_names: Vec<String>,
    blocks: Vec<BlockInfo>,
}

/// `*.tar` shards of `split` in a folder: `<split>-*.tar` when the folder is split by name,
/// else every top-level tar.
pub fn dir_files(dir: &Path, split: &str) -> Result<Vec<(String, PathBuf)>, SourceError> {
    paths::split_or_all(dir, split, "tar")
}

impl WdsSource {
    pub fn open(name: &str, files: Vec<(String, PathBuf)>) -> Result<Self, SourceError> {
        let mut shards = Vec::with_capacity(files.len());
        let mut shard_names = Vec::with_capacity(files.len());
        let mut blocks = Vec::new();
        for (i, (shard, path)) in files.into_iter().enumerate() {
            let groups = index_tar(&path)?;
            let mut first = 0;
            while first < groups.len() {
                let rows = BLOCK_SAMPLES.min(groups.len() - first);
                blocks.push(BlockInfo {
                    shard: i,
                    first_row: first as u64,
                    rows,
                });
                first += rows;
            }
            shard_names.push(shard);
            shards.push(TarShard { path, groups });
        }
        Ok(WdsSource {
            name: name.to_string(),
            shards,
            shard_names,
            blocks,
        })
    }
}

impl Source for WdsSource {
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
        let io = |source| SourceError::Io {
            path: shard.path.display().to_string(),
            source,
        };
        let first = block.first_row as usize;
        let groups = &shard.groups[first..first + block.rows];
        let mut bytes = BlockBytes::load(&shard.path, groups).map_err(io)?;
        let mut out = Vec::with_capacity(block.rows);
        for (k, g) in groups.iter().enumerate() {
            let origin = Origin {
                source: self.name.clone(),
                shard: self.shard_names[block.shard].clone(),
                row: (first + k) as u64,
            };
            let row = match (&g.json, g.images.first()) {
                (Some(json), Some(_)) => {
                    let json = bytes.member(json).map_err(io)?;
                    let mut images = Vec::with_capacity(g.images.len());
                    for m in &g.images {
                        let data = bytes.member(m).map_err(io)?;
                        images.push(ImageBytes {
                            bytes: data,
                            path: Some(m.name.clone()),
                        });
                    }
                    sample(&json, images, origin.clone())
                }
                (Some(m), None) => Err(Reason::OrphanMember(m.name.clone())),
                (None, Some(m)) => Err(Reason::OrphanMember(m.name.clone())),
                (None, None) => Err(Reason::OrphanMember(g.key.clone())),
            };
            out.push(row.map_err(|r| (origin, r)));
        }
        Ok(out)
    }
}

/// The bytes of one block's members. Members of consecutive samples are adjacent in a tar, so
/// the block is normally one read of one contiguous span (twice as fast as a seek and
/// read per member); when skipped members (large `.npy`, …) would make that span more than
/// twice what is needed, members are read one by one instead.
enum BlockBytes {
    Span { start: u64, data: Vec<u8> },
    PerMember(File),
}

impl BlockBytes {
    fn load(path: &Path, groups: &[Group]) -> std::io::Result<Self> {
        let members = || groups.iter().flat_map(|g| g.json.iter().chain(&g.images));
        let start = members().map(|m| m.offset).min().unwrap_or(0);
        let end = members().map(|m| m.offset + m.size).max().unwrap_or(0);
        let needed: u64 = members().map(|m| m.size).sum();
        let mut f = File::open(path)?;
        if end - start > 2 * needed + (1 << 20) {
            return Ok(BlockBytes::PerMember(f));
        }
        let mut data = vec![0u8; (end - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut data)?;
        Ok(BlockBytes::Span { start, data })
    }

    fn member(&mut self, m: &Member) -> std::io::Result<Vec<u8>> {
        match self {
            BlockBytes::Span { start, data } => {
                let a = (m.offset - *start) as usize;
                Ok(data[a..a + m.size as usize].to_vec())
            }
            BlockBytes::PerMember(f) => {
                let mut buf = vec![0u8; m.size as usize];
                f.seek(SeekFrom::Start(m.offset))?;
                f.read_exact(&mut buf)?;
                Ok(buf)
            }
        }
    }
}

fn opt_str<'a>(rec: &'a Record, key: &str) -> Result<Option<&'a str>, Reason> {
    match rec.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(Reason::WrongType {
            field: key.into(),
            expected: "string".into(),
        }),
    }
}

/// One sample from its `.json` bytes and its image members.
fn sample(json: &[u8], mut images: Vec<ImageBytes>, origin: Origin) -> Result<Sample, Reason> {
    let rec = parse_record(json)?;
    let conv = if rec.contains_key("conversations") {
        Some(records::parse_llava(&rec)?)
    } else if rec.contains_key("messages") {
        Some(records::parse_messages(&rec)?)
    } else {
        None
    };
    if let Some(conv) = conv {
        let placeholders = conv.placeholders();
        if placeholders != images.len() {
            return Err(Reason::ImageCountMismatch {
                placeholders,
                images: images.len(),
            });
        }
        return Ok(records::chat_sample(origin, conv, images, &rec));
    }
    if !rec.contains_key("question") {
        return Err(Reason::MissingField(
            "question` (or `conversations` / `messages`".into(),
        ));
    }
    let reasoning = match opt_str(&rec, "reasoning")? {
        Some(r) => Some(r),
        None => opt_str(&rec, "reasoning_trace")?,
    };
    let text = OmrText {
        question: opt_str(&rec, "question")?,
        reasoning,
        answer: opt_str(&rec, "answer")?,
    };
    let (mcq, trace) = records::check_omr(&text)?;
    if images.len() != 1 {
        return Err(Reason::ImageCountMismatch {
            placeholders: 1,
            images: images.len(),
        });
    }
    let rubric = records::json_rubric(&rec)?;
    let mut skip = vec![
        "question",
        "reasoning",
        "reasoning_trace",
        "answer",
        "image",
        "images",
    ];
    skip.extend(RUBRIC_AXES);
    let meta = records::scalar_meta(&rec, &skip);
    Ok(records::omr_sample(
        origin,
        images.remove(0),
        mcq,
        trace,
        rubric,
        meta,
    ))
}

/// Header scan of one tar: member positions grouped by key, in tar order.
fn index_tar(path: &Path) -> Result<Vec<Group>, SourceError> {
    let shown = || path.display().to_string();
    let corrupt = |detail: String| SourceError::Schema {
        path: shown(),
        detail,
    };
    let file = File::open(path).map_err(|source| SourceError::Io {
        path: shown(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| SourceError::Io {
            path: shown(),
            source,
        })?
        .len();
    let mut archive = tar::Archive::new(file);
    let entries = archive
        .entries_with_seek()
        .map_err(|e| corrupt(format!("not a readable tar ({e})")))?;
    let mut groups: Vec<Group> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| {
            corrupt(format!(
                "truncated or corrupt tar ({e}); re-create the shard"
            ))
        })?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .map_err(|e| corrupt(format!("bad member name ({e})")))?
            .to_string_lossy()
            .into_owned();
        let member = Member {
            name: name.clone(),
            offset: entry.raw_file_position(),
            size: entry.size(),
        };
        if member.offset.saturating_add(member.size) > len {
            return Err(corrupt(format!(
                "truncated tar: member {name} needs {} bytes but the file has {len}; re-create the shard",
                member.offset.saturating_add(member.size)
            )));
        }
        let (dir, base) = name
            .rsplit_once('/')
            .map_or(("", name.as_str()), |(d, b)| (d, b));
        // `._x` (macOS resource forks) and other hidden files are not samples.
        if base.starts_with('.') {
            continue;
        }
        let (stem, ext) = base.split_once('.').unwrap_or((base, ""));
        let key = if dir.is_empty() {
            stem.to_string()
        } else {
            format!("{dir}/{stem}")
        };
        let ext = ext.to_ascii_lowercase();
        let last = ext.rsplit('.').next().unwrap_or("");
        let is_json = ext == "json";
        let is_image = IMAGE_EXTS.contains(&last);
        if !is_json && !is_image {
            continue;
        }
        if groups.last().is_none_or(|g| g.key != key) {
            groups.push(Group {
                key,
                ..Group::default()
            });
        }
        let Some(g) = groups.last_mut() else { continue };
        if is_json {
            if g.json.is_none() {
                g.json = Some(member);
            }
        } else {
            g.images.push(member);
        }
    }
    Ok(groups)
}
