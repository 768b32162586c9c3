//! How the ranks of a job find each other: every rank connects to rank 0 at `MASTER_ADDR:
//! MASTER_PORT`, then to every other rank (the mesh that large sums take).
//!
//! 1. Each rank other than 0 listens on a port of its own (any free one), connects to rank 0
//!    and says hello: `OMRDP02\n`, its rank, the world (u64 each), the 32-byte fingerprint of
//!    its config and its port (u64).
//! 2. Rank 0 waits for every rank, refuses a mismatch (world, duplicate rank, fingerprint) on
//!    the rank that sent it with an error frame, and answers the others with the table of
//!    every rank's address: the one it saw the rank connect from, or "rank 0's host" for a
//!    rank on its own node (which reached it over loopback).
//! 3. Rank r connects to ranks 1 … r−1 at their addresses and says `OMRMS01\n`, its rank and
//!    the fingerprint; it accepts ranks r+1 … W−1 on its port.

use super::link::Link;
use super::tcp::{io_internal, Peer};
use super::{decode, encode, Launch};
use crate::error::{Result, TrainError};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

const HELLO: &[u8; 8] = b"OMRDP02\n";
const MESH_HELLO: &[u8; 8] = b"OMRMS01\n";

/// Where a rank listens: its address (`None`: the host of rank 0) and port.
type Address = (Option<IpAddr>, u16);

pub fn connect(launch: &Launch, fingerprint: [u8; 32], wait: Duration) -> Result<Link> {
    let deadline = Instant::now() + wait;
    let mut peers: Vec<Option<Peer>> = (0..launch.world).map(|_| None).collect();
    if launch.rank == 0 {
        for p in hub(launch, fingerprint, wait, deadline)? {
            let r = p.rank();
            peers[r] = Some(p);
        }
    } else {
        let listener = TcpListener::bind(("0.0.0.0", 0)).map_err(io_internal)?;
        let port = listener.local_addr().map_err(io_internal)?.port();
        let (root, table) = worker(launch, fingerprint, port, wait, deadline)?;
        peers[0] = Some(root);
        for p in mesh(launch, fingerprint, &table, &listener, wait, deadline)? {
            let r = p.rank();
            peers[r] = Some(p);
        }
    }
    for p in peers.iter_mut().flatten() {
        p.set_timeout(launch.timeout)?;
    }
    let mut link = Link::new(launch.rank, peers);
    if let Some(dir) = &launch.shm {
        link.use_shared_memory(dir)?;
    }
    Ok(link)
}

/// Rank 0: listens on `MASTER_PORT` until every other rank said hello with the same world and
/// fingerprint, then answers each with the table of addresses (or the first mismatch with an
/// error frame).
fn hub(
    launch: &Launch,
    fingerprint: [u8; 32],
    wait: Duration,
    deadline: Instant,
) -> Result<Vec<Peer>> {
    let listener = TcpListener::bind(("0.0.0.0", launch.port)).map_err(|e| {
        TrainError::Usage(format!(
            "rank 0 cannot listen on port {} ({e}): another job on this node may use it; set \
             MASTER_PORT to a free port",
            launch.port
        ))
    })?;
    let mut peers: Vec<Option<Peer>> = (1..launch.world).map(|_| None).collect();
    let mut table: Vec<Address> = vec![(None, 0); launch.world];
    while peers.iter().any(Option::is_none) {
        let (stream, from) = accept(&listener, deadline, || {
            let missing: Vec<String> = (1..launch.world)
                .filter(|r| peers[r - 1].is_none())
                .map(|r| r.to_string())
                .collect();
            format!(
                "rank 0 waited {} s on port {} for ranks {} to connect: did they start, and \
                 do they see rank 0 at MASTER_ADDR?",
                wait.as_secs(),
                launch.port,
                missing.join(", ")
            )
        })?;
        let mut peer = Peer::new(0, stream, wait)?;
        let mut hello = [0u8; 8 + 8 + 8 + 32 + 8];
        peer.rx.read_raw(&mut hello)?;
        if &hello[..8] != HELLO {
            return Err(TrainError::Usage(format!(
                "something that is not an omr rank of this version connected to MASTER_PORT \
                 {}: set MASTER_PORT to a port no other program uses, and run one omr binary \
                 on every rank",
                peer.local_port()
            )));
        }
        let (rank, world) = (word(&hello, 8) as usize, word(&hello, 16));
        peer.set_rank(rank);
        let refusal = if world != launch.world as u64 {
            Some(format!(
                "rank {rank} was launched with a world of {world}, rank 0 with {}",
                launch.world
            ))
        } else if rank == 0 || rank >= launch.world || peers[rank - 1].is_some() {
            Some(format!("two processes of this job both have rank {rank}"))
        } else if hello[24..56] != fingerprint {
            Some(format!(
                "rank {rank} has another config than rank 0 (the resolved configs differ): \
                 every rank must run the same config file and --set overrides"
            ))
        } else {
            None
        };
        if let Some(why) = refusal {
            peer.tx.write_error(&why);
            return Err(TrainError::Usage(why));
        }
        let ip = from.ip();
        table[rank] = ((!ip.is_loopback()).then_some(ip), word(&hello, 56) as u16);
        peers[rank - 1] = Some(peer);
    }
    let table = encode(&table)?;
    let mut peers: Vec<Peer> = peers.into_iter().flatten().collect();
    for p in &mut peers {
        p.tx.write_values(&table)?;
    }
    Ok(peers)
}

/// Any other rank: connects to rank 0 (retrying until the deadline, since rank 0 may start
/// later), says hello and waits for rank 0's table of addresses.
fn worker(
    launch: &Launch,
    fingerprint: [u8; 32],
    port: u16,
    wait: Duration,
    deadline: Instant,
) -> Result<(Peer, Vec<Address>)> {
    let stream = dial(&launch.addr, launch.port, deadline, |e| {
        format!(
            "rank {} could not reach rank 0 at {}:{} in {} s ({e}): is MASTER_ADDR rank 0's \
             host, and did rank 0 start?",
            launch.rank,
            launch.addr,
            launch.port,
            wait.as_secs()
        )
    })?;
    let mut root = Peer::new(0, stream, wait)?;
    let mut hello = HELLO.to_vec();
    hello.extend((launch.rank as u64).to_le_bytes());
    hello.extend((launch.world as u64).to_le_bytes());
    hello.extend(fingerprint);
    hello.extend(u64::from(port).to_le_bytes());
    root.tx.write_raw(&hello)?;
    let table: Vec<Address> = decode(&root.rx.read_bytes()?)?;
    if table.len() != launch.world {
        return Err(TrainError::Internal(format!(
            "rank 0 sent {} addresses for a world of {}",
            table.len(),
            launch.world
        )));
    }
    Ok((root, table))
}

/// Rank r's connections to ranks 1 … W−1 but itself: it dials the lower ones and accepts the
/// higher ones (which dial it), so no two ranks wait on each other.
fn mesh(
    launch: &Launch,
    fingerprint: [u8; 32],
    table: &[Address],
    listener: &TcpListener,
    wait: Duration,
    deadline: Instant,
) -> Result<Vec<Peer>> {
    let me = launch.rank;
    let mut peers = Vec::with_capacity(launch.world - 2);
    for (r, &(ip, port)) in table.iter().enumerate().take(me).skip(1) {
        let host = ip.map_or(launch.addr.clone(), |ip| ip.to_string());
        let stream = dial(&host, port, deadline, |e| {
            format!(
                "rank {me} could not reach rank {r} at {host}:{port} ({e}): the ranks of a job \
                 connect to each other on ports the system picks, so a firewall between the \
                 nodes must let them through"
            )
        })?;
        let mut peer = Peer::new(r, stream, wait)?;
        let mut hello = MESH_HELLO.to_vec();
        hello.extend((me as u64).to_le_bytes());
        hello.extend(fingerprint);
        peer.tx.write_raw(&hello)?;
        peers.push(peer);
    }
    let mut higher: Vec<bool> = vec![false; launch.world];
    for _ in me + 1..launch.world {
        let (stream, _) = accept(listener, deadline, || {
            let missing: Vec<String> = (me + 1..launch.world)
                .filter(|&r| !higher[r])
                .map(|r| r.to_string())
                .collect();
            format!(
                "rank {me} waited for ranks {} to connect to it: they reached rank 0, so a \
                 firewall between the nodes may block the ports the system picks",
                missing.join(", ")
            )
        })?;
        let mut peer = Peer::new(launch.world, stream, wait)?;
        let mut hello = [0u8; 8 + 8 + 32];
        peer.rx.read_raw(&mut hello)?;
        let rank = word(&hello, 8) as usize;
        if &hello[..8] != MESH_HELLO
            || hello[16..] != fingerprint
            || rank <= me
            || rank >= launch.world
            || higher[rank]
        {
            return Err(TrainError::Usage(format!(
                "something that is not a rank of this job connected to rank {me}'s port {}",
                peer.local_port()
            )));
        }
        higher[rank] = true;
        peer.set_rank(rank);
        peers.push(peer);
    }
    Ok(peers)
}

/// The next connection to `listener`, or an error (`why`) at the deadline.
fn accept(
    listener: &TcpListener,
    deadline: Instant,
    why: impl Fn() -> String,
) -> Result<(TcpStream, std::net::SocketAddr)> {
    listener.set_nonblocking(true).map_err(io_internal)?;
    loop {
        match listener.accept() {
            Ok((stream, from)) => {
                stream.set_nonblocking(false).map_err(io_internal)?;
                return Ok((stream, from));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(TrainError::Collective {
                        message: why(),
                        timed_out: true,
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(io_internal(e)),
        }
    }
}

/// A connection to `host:port`, retried until the deadline; then an error (`why`).
fn dial(
    host: &str,
    port: u16,
    deadline: Instant,
    why: impl Fn(std::io::Error) -> String,
) -> Result<TcpStream> {
    loop {
        match TcpStream::connect((host, port)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => {
                return Err(TrainError::Collective {
                    message: why(e),
                    timed_out: true,
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn word(bytes: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(w)
}
