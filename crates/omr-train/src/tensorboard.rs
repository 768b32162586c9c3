//! A TensorBoard event-file writer for scalars, so `tensorboard --logdir RUN/tb` works without
//! TensorFlow or a Python process next to the trainer.
//!
//! The format is TFRecord framing around protobuf `Event`s: each record is the payload length
//! (u64 LE), the masked CRC-32C of those 8 bytes, the payload, and the masked CRC-32C of the
//! payload. The first record names the format (`file_version: "brain.Event:2"`). The messages
//! below declare only the fields we write, with the field numbers of TensorFlow's
//! `event.proto` / `summary.proto`; readers skip what they do not know, so that is enough.
//!
//! Two choices matter to readers: `simple_value` sits in a protobuf `oneof`, so it is declared
//! `optional` here and a scalar equal to 0.0 is still written (a plain proto3 float would be
//! left out, and TensorBoard would drop the point); and a resumed run starts a new file with a
//! `SessionLog::START` at its first step, which tells TensorBoard to discard the stopped run's
//! points from that step on, in files that sort earlier.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum TbError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

type Result<T> = std::result::Result<T, TbError>;

/// `tensorflow.Event`. In the .proto, `file_version`, `summary` and `session_log` are one
/// `oneof what`; on the wire that is the same as three optional fields, at most one set.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
    #[prost(message, optional, tag = "7")]
    pub session_log: Option<SessionLog>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`: only the scalar member of its `oneof value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// `tensorflow.SessionLog`; `status` is the `SessionStatus` enum, an int32 on the wire.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionLog {
    #[prost(int32, tag = "1")]
    pub status: i32,
}

/// `SessionLog.SessionStatus.START`.
pub const SESSION_START: i32 = 1;

/// The masked CRC-32C of TFRecord framing: rotated right by 15 bits plus a constant, so that a
/// CRC computed over data that itself holds CRCs does not collapse.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
        .rotate_right(15)
        .wrapping_add(0xa282_ead8)
}

pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` if needed and a new file `events.out.tfevents.<unix secs>.<host>.<pid>.omr`
    /// in it (with `.1`, `.2`… appended if a file of that name exists, e.g. two writers within
    /// one second of one process), and writes the file-version record.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| TbError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let base = format!(
            "events.out.tfevents.{now}.{}.{}.omr",
            hostname(),
            std::process::id()
        );
        let mut n = 0u32;
        let (path, file) = loop {
            let name = if n == 0 {
                base.clone()
            } else {
                format!("{base}.{n}")
            };
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(source) => return Err(TbError::Io { path, source }),
            }
        };
        let mut w = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        w.write_event(&Event {
            wall_time: unix_now(),
            file_version: Some("brain.Event:2".into()),
            ..Default::default()
        })?;
        w.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One scalar point. TensorBoard stores `simple_value` as f32, so `value` is rounded to it.
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: u64, wall_time: f64) -> Result<()> {
        self.write_event(&Event {
            wall_time,
            step: i64::try_from(step).unwrap_or(i64::MAX),
            summary: Some(Summary {
                value: vec![SummaryValue {
                    tag: tag.into(),
                    simple_value: Some(value as f32),
                }],
            }),
            ..Default::default()
        })
    }

    /// Marks a (re)start at `step`: TensorBoard discards points at `step` and later that it read
    /// from earlier files of the same directory (those of the run that stopped).
    pub fn add_session_start(&mut self, step: u64, wall_time: f64) -> Result<()> {
        self.write_event(&Event {
            wall_time,
            step: i64::try_from(step).unwrap_or(i64::MAX),
            session_log: Some(SessionLog {
                status: SESSION_START,
            }),
            ..Default::default()
        })
    }

    /// Hands buffered records to the OS, so a running TensorBoard sees them.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|source| TbError::Io {
            path: self.path.clone(),
            source,
        })
    }

    fn write_event(&mut self, event: &Event) -> Result<()> {
        let data = prost::Message::encode_to_vec(event);
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        record.extend_from_slice(&data);
        record.extend_from_slice(&masked_crc32c(&data).to_le_bytes());
        self.out.write_all(&record).map_err(|source| TbError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// Seconds since the Unix epoch, the `wall_time` TensorBoard expects.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The host name for the file name (TensorBoard's convention, to tell writers apart on shared
/// storage), reduced to file-name-safe characters.
fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_' || *c == '.')
        .collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}
