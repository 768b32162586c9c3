//! The framing of [`super::Group`]'s connections: one TCP stream per pair of ranks, each split
//! into a reading half ([`Rx`]) and a writing half ([`Tx`]) that may work in two threads at
//! once.
//!
//! Frames, little-endian: a tag byte (1 data, 2 error text), a u64 length and the bytes.
//! Values travel as their in-memory bytes.

use crate::error::{Result, TrainError};
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

// Values travel as their in-memory bytes, which are the little-endian ones of the wire format.
#[cfg(target_endian = "big")]
compile_error!("omr's data-parallel wire format assumes a little-endian machine");

/// No frame is larger: a length beyond it means the stream is not ours.
const MAX_FRAME: u64 = 1 << 40;

/// The rank at the other end, for messages.
#[derive(Clone, Copy, Debug)]
pub struct Who {
    pub rank: usize,
    pub timeout: Duration,
}

/// A connection to one other rank.
pub struct Peer {
    pub rx: Rx,
    pub tx: Tx,
}

pub struct Rx {
    who: Who,
    reader: BufReader<TcpStream>,
}

pub struct Tx {
    who: Who,
    writer: BufWriter<TcpStream>,
}

impl Peer {
    pub fn new(rank: usize, stream: TcpStream, timeout: Duration) -> Result<Peer> {
        stream.set_nodelay(true).map_err(io_internal)?;
        let who = Who { rank, timeout };
        let reader = BufReader::with_capacity(1 << 20, stream.try_clone().map_err(io_internal)?);
        let mut peer = Peer {
            rx: Rx { who, reader },
            tx: Tx {
                who,
                writer: BufWriter::with_capacity(1 << 20, stream),
            },
        };
        peer.set_timeout(timeout)?;
        Ok(peer)
    }

    pub fn rank(&self) -> usize {
        self.rx.who.rank
    }

    /// Once the rendezvous learnt who connected.
    pub fn set_rank(&mut self, rank: usize) {
        self.rx.who.rank = rank;
        self.tx.who.rank = rank;
    }

    pub fn set_timeout(&mut self, timeout: Duration) -> Result<()> {
        self.rx.who.timeout = timeout;
        self.tx.who.timeout = timeout;
        let s = self.tx.writer.get_ref();
        s.set_read_timeout(Some(timeout)).map_err(io_internal)?;
        s.set_write_timeout(Some(timeout)).map_err(io_internal)
    }

    pub fn local_port(&self) -> u16 {
        self.tx
            .writer
            .get_ref()
            .local_addr()
            .map_or(0, |a| a.port())
    }
}

impl Tx {
    /// A data frame of `values`, as their bytes.
    pub fn write_values<T: bytemuck::Pod>(&mut self, values: &[T]) -> Result<()> {
        self.write_tagged(1, bytemuck::cast_slice(values))
            .and_then(|_| self.writer.flush())
            .map_err(|e| self.who.lost(e))
    }

    /// Bytes outside any frame (the rendezvous hellos).
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer
            .write_all(bytes)
            .and_then(|_| self.writer.flush())
            .map_err(|e| self.who.lost(e))
    }

    /// Best effort: the rank learns why before its connection closes.
    pub fn write_error(&mut self, text: &str) {
        let _ = self
            .write_tagged(2, text.as_bytes())
            .and_then(|_| self.writer.flush());
    }

    fn write_tagged(&mut self, tag: u8, b: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(&[tag])?;
        self.writer.write_all(&(b.len() as u64).to_le_bytes())?;
        self.writer.write_all(b)
    }
}

impl Rx {
    /// A data frame of exactly `out.len()` values, read straight into `out`.
    pub fn read_into<T: bytemuck::Pod>(&mut self, out: &mut [T]) -> Result<()> {
        let bytes = self.read_header()?;
        let want = std::mem::size_of_val(out) as u64;
        if bytes != want {
            return Err(TrainError::Collective {
                message: format!(
                    "rank {} sent {bytes} bytes where {want} were expected: the ranks run \
                     different models or configs",
                    self.who.rank
                ),
                timed_out: false,
            });
        }
        self.read_raw(bytemuck::cast_slice_mut(out))
    }

    /// A data frame of any length.
    pub fn read_bytes(&mut self) -> Result<Vec<u8>> {
        let len = self.read_header()?;
        let mut bytes = vec![0u8; len as usize];
        self.read_raw(&mut bytes)?;
        Ok(bytes)
    }

    /// Bytes outside any frame (the rendezvous hellos).
    pub fn read_raw(&mut self, out: &mut [u8]) -> Result<()> {
        self.reader.read_exact(out).map_err(|e| self.who.lost(e))
    }

    /// A frame's tag and length: the length of a data frame. An error frame (rank 0 refusing
    /// this rank) becomes that error.
    fn read_header(&mut self) -> Result<u64> {
        let mut head = [0u8; 9];
        self.read_raw(&mut head)?;
        let mut len = [0u8; 8];
        len.copy_from_slice(&head[1..]);
        let (tag, len) = (head[0], u64::from_le_bytes(len));
        if !(1..=2).contains(&tag) || len > MAX_FRAME {
            return Err(TrainError::Collective {
                message: format!(
                    "rank {} sent something that is not an omr frame (tag {tag}, length {len})",
                    self.who.rank
                ),
                timed_out: false,
            });
        }
        if tag == 2 {
            let mut text = vec![0u8; len as usize];
            self.read_raw(&mut text)?;
            return Err(TrainError::Usage(
                String::from_utf8_lossy(&text).into_owned(),
            ));
        }
        Ok(len)
    }
}

impl Who {
    /// What a failed read or write means for the job.
    pub fn lost(&self, e: std::io::Error) -> TrainError {
        let timed_out = matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
        let message = if timed_out {
            format!(
                "no word from rank {} in {} s: it is stuck or far behind (raise \
                 OMR_DIST_TIMEOUT_S if rank 0's checkpoint writes take longer)",
                self.rank,
                self.timeout.as_secs()
            )
        } else {
            format!(
                "rank {} is gone ({e}): it stopped or was killed, and its own log says why",
                self.rank
            )
        };
        TrainError::Collective { message, timed_out }
    }
}

pub fn io_internal(e: std::io::Error) -> TrainError {
    TrainError::Internal(format!("socket setup: {e}"))
}
