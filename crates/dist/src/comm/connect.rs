//! Building the ring: every rank listens, publishes its address in the store, connects to `rank + 1`
//! and accepts `rank - 1`. Both ends exchange a hello with the rank and job hash; anything else that
//! connects to the listener is dropped.
//!
//! Hellos carry ring positions; errors name global ranks (`RingSpec::members`).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::ring::Ring;
use crate::error::{Error, Result};
use crate::store::StoreClient;

const MAGIC: &[u8; 4] = b"BLWR";
/// The longest job hash accepted in a ring hello.
const MAX_HASH: usize = 1024;

/// Everything needed to join a ring.
pub(crate) struct RingSpec<'a> {
    /// This process's position in the ring, `0..members.len()`.
    pub rank: usize,
    /// The global rank at each ring position (`0..world` for a whole job); at least two.
    pub members: &'a [usize],
    pub job_hash: &'a str,
    pub timeout: Duration,
    /// Store key prefix for this group's addresses.
    pub prefix: &'a str,
}

fn io_err(what: &'static str, addr: impl ToString) -> impl FnOnce(std::io::Error) -> Error {
    let addr = addr.to_string();
    move |source| Error::Io { what, addr, source }
}

impl RingSpec<'_> {
    fn world(&self) -> usize {
        self.members.len()
    }

    /// The global rank at ring position `pos`.
    fn global(&self, pos: usize) -> usize {
        self.members[pos]
    }
}

/// Connects this rank into the ring; `spec.members.len() >= 2`.
pub(crate) fn connect_ring(store: &mut StoreClient, spec: &RingSpec) -> Result<Ring> {
    let deadline = Instant::now() + spec.timeout;
    let ip = store.local_ip().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let listener = TcpListener::bind((ip, 0)).map_err(io_err("bind ring listener on", ip))?;
    let local = listener
        .local_addr()
        .map_err(io_err("read address of ring listener on", ip))?;
    store.set(
        &format!("{}/addr/{}", spec.prefix, spec.rank),
        local.to_string().as_bytes(),
    )?;

    let next = (spec.rank + 1) % spec.world();
    let prev = (spec.rank + spec.world() - 1) % spec.world();
    let (me, next_global) = (spec.global(spec.rank), spec.global(next));
    let next_addr = store
        .get(&format!("{}/addr/{next}", spec.prefix), spec.timeout)
        .map_err(|e| match e {
            Error::StoreTimeout { secs, .. } => Error::Timeout {
                op: "init",
                rank: me,
                peer: next_global,
                secs,
            },
            e => e,
        })?;
    let next_addr: SocketAddr =
        String::from_utf8_lossy(&next_addr)
            .parse()
            .map_err(|_| Error::Store {
                addr: store.addr().to_string(),
                message: format!("rank {next_global} published an invalid ring address"),
            })?;
    let mut out = connect_with_retry(next_addr, deadline, me, next_global)?;
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&(spec.rank as u32).to_le_bytes());
    hello.extend_from_slice(&(spec.job_hash.len() as u32).to_le_bytes());
    hello.extend_from_slice(spec.job_hash.as_bytes());
    out.set_write_timeout(Some(spec.timeout))
        .map_err(io_err("configure ring connection to", next_addr))?;
    out.write_all(&hello).map_err(|e| Error::Peer {
        op: "init",
        rank: me,
        peer: next_global,
        message: format!("sending hello to {next_addr} failed: {e}"),
    })?;

    let inbound = accept_prev(&listener, spec, prev, deadline)?;
    Ok(Ring::new(
        spec.rank,
        spec.members.to_vec(),
        spec.timeout,
        out,
        inbound,
    ))
}

fn connect_with_retry(
    addr: SocketAddr,
    deadline: Instant,
    rank: usize,
    peer: usize,
) -> Result<TcpStream> {
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::Peer {
                    op: "init",
                    rank,
                    peer,
                    message: format!("cannot connect to {addr}: {e}"),
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Accepts connections until one presents a valid hello from ring position `prev`; strangers are dropped.
fn accept_prev(
    listener: &TcpListener,
    spec: &RingSpec,
    prev: usize,
    deadline: Instant,
) -> Result<TcpStream> {
    listener
        .set_nonblocking(true)
        .map_err(io_err("configure ring listener", "local"))?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                match read_hello(&stream, deadline) {
                    Some((rank, hash)) if rank == prev && hash == spec.job_hash => {
                        return Ok(stream)
                    }
                    Some((rank, hash)) if rank == prev => {
                        return Err(Error::JobHashMismatch {
                            rank: spec.global(spec.rank),
                            peer: spec.global(prev),
                            ours: spec.job_hash.into(),
                            theirs: hash,
                        })
                    }
                    _ => continue,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(Error::Timeout {
                        op: "init",
                        rank: spec.global(spec.rank),
                        peer: spec.global(prev),
                        secs: spec.timeout.as_secs_f64(),
                    });
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => {
                return Err(Error::Peer {
                    op: "init",
                    rank: spec.global(spec.rank),
                    peer: spec.global(prev),
                    message: format!("accept failed: {e}"),
                })
            }
        }
    }
}

fn read_hello(mut s: &TcpStream, deadline: Instant) -> Option<(usize, String)> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .clamp(Duration::from_millis(10), Duration::from_secs(10));
    s.set_read_timeout(Some(left)).ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    if &head[..4] != MAGIC {
        return None;
    }
    let rank = u32::from_le_bytes(head[4..8].try_into().ok()?) as usize;
    let len = u32::from_le_bytes(head[8..12].try_into().ok()?) as usize;
    if len > MAX_HASH {
        return None;
    }
    let mut hash = vec![0u8; len];
    s.read_exact(&mut hash).ok()?;
    Some((rank, String::from_utf8(hash).ok()?))
}
