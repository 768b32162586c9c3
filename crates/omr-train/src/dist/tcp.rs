//! The hub of [`super::Group`] over TCP: rank 0 holds a connection to every other rank; the
//! others hold one, to rank 0.
//!
//! Wire format, little-endian: a rendezvous hello `OMRDP01\n`, rank (u64), world (u64), the
//! 32-byte fingerprint; then frames, each a tag byte (0 absent, 1 data, 2 error text) and for
//! data and error a u64 length and the bytes.

use super::Launch;
use crate::error::{Result, TrainError};
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

// Values travel as their in-memory bytes, which are the little-endian ones of the wire format.
#[cfg(target_endian = "big")]
compile_error!("omr's data-parallel wire format assumes a little-endian machine");

const MAGIC: &[u8; 8] = b"OMRDP01\n";
/// No frame is larger: a length beyond it means the stream is not ours.
const MAX_FRAME: u64 = 1 << 40;

pub enum Link {
    /// Rank 0: the other ranks, in rank order.
    Hub(Vec<Peer>),
    /// Any other rank: rank 0.
    Worker(Peer),
}

pub struct Peer {
    rank: usize,
    timeout: Duration,
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
}

impl Link {
    pub fn connect(launch: &Launch, fingerprint: [u8; 32], wait: Duration) -> Result<Link> {
        if launch.rank == 0 {
            hub(launch, fingerprint, wait).map(Link::Hub)
        } else {
            worker(launch, fingerprint, wait).map(Link::Worker)
        }
    }

    /// Rank 0 folds the `len` values of ranks 0, 1, … in order with `add` (a rank without
    /// values is skipped; the first with values starts the sum) and sends the result to every
    /// rank. Values travel as their bytes, read straight into the vectors that hold them.
    /// From [`PARALLEL_BYTES`] on, rank 0 reads from and writes to its peers all at once, a
    /// thread each, so that the copies through the sockets overlap.
    pub fn reduce<T: bytemuck::Pod + Send + Sync>(
        &mut self,
        own: Option<Vec<T>>,
        len: usize,
        add: fn(&mut [T], &[T]),
    ) -> Result<Option<Vec<T>>> {
        match self {
            Link::Worker(hub) => {
                hub.write_values(own.as_deref())?;
                hub.read_values(len, None)
            }
            Link::Hub(peers)
                if peers.len() > 1 && len * std::mem::size_of::<T>() >= PARALLEL_BYTES =>
            {
                let received = on_each(peers, |p| p.read_values::<T>(len, None))?;
                let mut acc = own;
                for next in received.into_iter().flatten() {
                    match &mut acc {
                        None => acc = Some(next),
                        Some(a) => add(a, &next),
                    }
                }
                on_each(peers, |p| p.write_values(acc.as_deref()))?;
                Ok(acc)
            }
            Link::Hub(peers) => {
                let mut acc = own;
                let mut scratch = None;
                for p in peers.iter_mut() {
                    match &mut acc {
                        None => acc = p.read_values(len, None)?,
                        Some(a) => {
                            if let Some(next) = p.read_values(len, scratch.take())? {
                                add(a, &next);
                                scratch = Some(next);
                            }
                        }
                    }
                }
                for p in peers.iter_mut() {
                    p.write_values(acc.as_deref())?;
                }
                Ok(acc)
            }
        }
    }

    pub fn gather(&mut self, own: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        match self {
            Link::Worker(hub) => {
                hub.write_values(Some(&own))?;
                Ok(Vec::new())
            }
            Link::Hub(peers) => {
                let mut all = vec![own];
                for p in peers.iter_mut() {
                    all.push(p.read_bytes()?.unwrap_or_default());
                }
                Ok(all)
            }
        }
    }

    pub fn broadcast(&mut self, own: Vec<u8>) -> Result<Vec<u8>> {
        match self {
            Link::Worker(hub) => Ok(hub.read_bytes()?.unwrap_or_default()),
            Link::Hub(peers) => {
                for p in peers.iter_mut() {
                    p.write_values(Some(&own))?;
                }
                Ok(own)
            }
        }
    }
}

/// Messages from this many bytes on are exchanged with all peers at once.
pub const PARALLEL_BYTES: usize = 1 << 20;

/// `f` on every peer at once, a scoped thread each; the results in rank order, or the first
/// rank's error.
fn on_each<R: Send>(
    peers: &mut [Peer],
    f: impl Fn(&mut Peer) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = peers.iter_mut().map(|p| s.spawn(move || f(p))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(TrainError::Internal("a socket thread panicked".into()))
                })
            })
            .collect()
    })
}

impl Peer {
    fn new(rank: usize, stream: TcpStream, timeout: Duration) -> Result<Peer> {
        stream.set_nodelay(true).map_err(io_internal)?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(io_internal)?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(io_internal)?;
        let reader = BufReader::with_capacity(1 << 20, stream.try_clone().map_err(io_internal)?);
        Ok(Peer {
            rank,
            timeout,
            reader,
            writer: BufWriter::with_capacity(1 << 20, stream),
        })
    }

    fn set_timeout(&mut self, timeout: Duration) -> Result<()> {
        self.timeout = timeout;
        let s = self.writer.get_ref();
        s.set_read_timeout(Some(timeout)).map_err(io_internal)?;
        s.set_write_timeout(Some(timeout)).map_err(io_internal)
    }

    /// A frame of `values` (as their bytes), or the absent frame for None.
    fn write_values<T: bytemuck::Pod>(&mut self, values: Option<&[T]>) -> Result<()> {
        let r = match values {
            None => self.writer.write_all(&[0]),
            Some(v) => self.write_tagged(1, bytemuck::cast_slice(v)),
        };
        r.and_then(|_| self.writer.flush())
            .map_err(|e| self.lost(e))
    }

    /// `len` values (into `reuse` when given), or None for a rank that has none.
    fn read_values<T: bytemuck::Pod>(
        &mut self,
        len: usize,
        reuse: Option<Vec<T>>,
    ) -> Result<Option<Vec<T>>> {
        let Some(bytes) = self.read_header()? else {
            return Ok(None);
        };
        let want = (len * std::mem::size_of::<T>()) as u64;
        if bytes != want {
            return Err(TrainError::Collective {
                message: format!(
                    "rank {} sent {bytes} bytes where {want} were expected: the ranks run \
                     different models or configs",
                    self.rank
                ),
                timed_out: false,
            });
        }
        let mut v = reuse.unwrap_or_default();
        v.resize(len, T::zeroed());
        self.reader
            .read_exact(bytemuck::cast_slice_mut(&mut v))
            .map_err(|e| self.lost(e))?;
        Ok(Some(v))
    }

    fn write_error(&mut self, text: &str) {
        // Best effort: the rank learns why before its connection closes.
        let _ = self
            .write_tagged(2, text.as_bytes())
            .and_then(|_| self.writer.flush());
    }

    fn write_tagged(&mut self, tag: u8, b: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(&[tag])?;
        self.writer.write_all(&(b.len() as u64).to_le_bytes())?;
        self.writer.write_all(b)
    }

    /// A frame of any length: its bytes, or None for the absent frame.
    fn read_bytes(&mut self) -> Result<Option<Vec<u8>>> {
        let Some(len) = self.read_header()? else {
            return Ok(None);
        };
        let mut bytes = vec![0u8; len as usize];
        self.reader
            .read_exact(&mut bytes)
            .map_err(|e| self.lost(e))?;
        Ok(Some(bytes))
    }

    /// A frame's tag and length: None for the absent frame, the length of a data frame. An
    /// error frame (rank 0 refusing this rank) becomes that error.
    fn read_header(&mut self) -> Result<Option<u64>> {
        let mut tag = [0u8; 1];
        self.reader.read_exact(&mut tag).map_err(|e| self.lost(e))?;
        if tag[0] == 0 {
            return Ok(None);
        }
        let mut len = [0u8; 8];
        self.reader.read_exact(&mut len).map_err(|e| self.lost(e))?;
        let len = u64::from_le_bytes(len);
        if tag[0] > 2 || len > MAX_FRAME {
            return Err(TrainError::Collective {
                message: format!(
                    "rank {} sent something that is not an omr frame (tag {}, length {len})",
                    self.rank, tag[0]
                ),
                timed_out: false,
            });
        }
        if tag[0] == 2 {
            let mut text = vec![0u8; len as usize];
            self.reader
                .read_exact(&mut text)
                .map_err(|e| self.lost(e))?;
            return Err(TrainError::Usage(
                String::from_utf8_lossy(&text).into_owned(),
            ));
        }
        Ok(Some(len))
    }

    /// What a failed read or write means for the job.
    fn lost(&self, e: std::io::Error) -> TrainError {
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

fn io_internal(e: std::io::Error) -> TrainError {
    TrainError::Internal(format!("socket setup: {e}"))
}

/// Rank 0: listens on `MASTER_PORT` until every other rank said hello with the same world and
/// fingerprint, then answers each with an empty data frame (or the first mismatch with an
/// error frame).
fn hub(launch: &Launch, fingerprint: [u8; 32], wait: Duration) -> Result<Vec<Peer>> {
    let listener = TcpListener::bind(("0.0.0.0", launch.port)).map_err(|e| {
        TrainError::Usage(format!(
            "rank 0 cannot listen on port {} ({e}): another job on this node may use it; set \
             MASTER_PORT to a free port",
            launch.port
        ))
    })?;
    listener.set_nonblocking(true).map_err(io_internal)?;
    let deadline = Instant::now() + wait;
    let mut peers: Vec<Option<Peer>> = (1..launch.world).map(|_| None).collect();
    while peers.iter().any(Option::is_none) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<String> = (1..launch.world)
                        .filter(|r| peers[r - 1].is_none())
                        .map(|r| r.to_string())
                        .collect();
                    return Err(TrainError::Collective {
                        message: format!(
                            "rank 0 waited {} s on port {} for ranks {} to connect: did they \
                             start, and do they see rank 0 at MASTER_ADDR?",
                            wait.as_secs(),
                            launch.port,
                            missing.join(", ")
                        ),
                        timed_out: true,
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => return Err(io_internal(e)),
        };
        stream.set_nonblocking(false).map_err(io_internal)?;
        let mut peer = Peer::new(0, stream, wait)?;
        let (rank, world, theirs) = read_hello(&mut peer)?;
        peer.rank = rank;
        let refusal = if world != launch.world as u64 {
            Some(format!(
                "rank {rank} was launched with a world of {world}, rank 0 with {}",
                launch.world
            ))
        } else if rank == 0 || rank >= launch.world || peers[rank - 1].is_some() {
            Some(format!("two processes of this job both have rank {rank}"))
        } else if theirs != fingerprint {
            Some(format!(
                "rank {rank} has another config than rank 0 (the resolved configs differ): \
                 every rank must run the same config file and --set overrides"
            ))
        } else {
            None
        };
        if let Some(why) = refusal {
            peer.write_error(&why);
            return Err(TrainError::Usage(why));
        }
        peers[rank - 1] = Some(peer);
    }
    let mut peers: Vec<Peer> = peers.into_iter().flatten().collect();
    for p in &mut peers {
        p.write_values::<u8>(Some(&[]))?;
        p.set_timeout(launch.timeout)?;
    }
    Ok(peers)
}

fn read_hello(peer: &mut Peer) -> Result<(usize, u64, [u8; 32])> {
    let mut hello = [0u8; 8 + 8 + 8 + 32];
    peer.reader
        .read_exact(&mut hello)
        .map_err(|e| peer.lost(e))?;
    if &hello[..8] != MAGIC {
        return Err(TrainError::Usage(format!(
            "something that is not an omr rank connected to MASTER_PORT {}: set MASTER_PORT to \
             a port no other program uses",
            peer.writer.get_ref().local_addr().map_or(0, |a| a.port())
        )));
    }
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&hello[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let mut fp = [0u8; 32];
    fp.copy_from_slice(&hello[24..]);
    Ok((word(8) as usize, word(16), fp))
}

/// Any other rank: connects to rank 0 (retrying until `wait`, since rank 0 may start later),
/// says hello and waits for rank 0's answer.
fn worker(launch: &Launch, fingerprint: [u8; 32], wait: Duration) -> Result<Peer> {
    let deadline = Instant::now() + wait;
    let stream = loop {
        match TcpStream::connect((launch.addr.as_str(), launch.port)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                return Err(TrainError::Collective {
                    message: format!(
                        "rank {} could not reach rank 0 at {}:{} in {} s ({e}): is MASTER_ADDR \
                         rank 0's host, and did rank 0 start?",
                        launch.rank,
                        launch.addr,
                        launch.port,
                        wait.as_secs()
                    ),
                    timed_out: true,
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let mut hub = Peer::new(0, stream, wait)?;
    let mut hello = MAGIC.to_vec();
    hello.extend((launch.rank as u64).to_le_bytes());
    hello.extend((launch.world as u64).to_le_bytes());
    hello.extend(fingerprint);
    hub.writer
        .write_all(&hello)
        .and_then(|_| hub.writer.flush())
        .map_err(|e| hub.lost(e))?;
    if hub.read_bytes()?.is_none() {
        return Err(TrainError::Internal(
            "rank 0 answered the hello with nothing".into(),
        ));
    }
    hub.set_timeout(launch.timeout)?;
    Ok(hub)
}
