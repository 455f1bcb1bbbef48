//! The CPU ring: collectives over TCP where each rank sends to `rank + 1` and receives from `rank - 1`.
//!
//! All-reduce is reduce-scatter followed by all-gather (Patarasuk & Yuan, "Bandwidth optimal all-reduce
//! algorithms for clusters of workstations", 2009): each rank sends and receives `2 (w - 1) / w` of the
//! buffer. Chunks are cut into segments of [`SEGMENT_BYTES`] that are forwarded as soon as they are
//! reduced, so the steps pipeline.
//!
//! Ranks here are positions in the ring (group ranks); errors and abort messages name the *global*
//! ranks of [`Ring::members`], so a sub-group's failure points at the process a user can find.
//!
//! Determinism: chunk `c` (see [`chunk_range`]) is reduced exactly once, along the ring starting at rank
//! `c + 1`: `((x[c+1] + x[c+2]) + ...) + x[c]`, then copied to every rank. Every rank therefore ends with
//! the same bits, and a rerun with the same inputs gives the same bits.

use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::wire::{lock, send_abort, send_loop, Call, Io, Op, SendEnd};
use super::{chunk_range, Element, ReduceOp};
use crate::error::{Error, Result};

/// Segment size for pipelining, in bytes.
pub(crate) const SEGMENT_BYTES: usize = 256 << 10;

/// A connected ring of `world >= 2` ranks.
pub(crate) struct Ring {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// The global rank of each ring position, for error messages.
    members: Vec<usize>,
    next: TcpStream,
    prev: TcpStream,
    seq: u64,
    broken: Option<String>,
    buf: Vec<u8>,
}

/// Segments of `range` for values of `T`; at least one (possibly empty) so every step exchanges a message
/// and ranks with mismatched sizes are caught by the header check.
fn segments<T: Element>(range: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    let per = (SEGMENT_BYTES / T::SIZE).max(1);
    let n = range.len().div_ceil(per).max(1);
    (0..n).map(move |i| {
        let start = (range.start + i * per).min(range.end);
        start..(start + per).min(range.end)
    })
}

impl Ring {
    /// `members[i]` is the global rank at ring position `i`; `members.len()` is the ring's size.
    pub(crate) fn new(
        rank: usize,
        members: Vec<usize>,
        timeout: Duration,
        next: TcpStream,
        prev: TcpStream,
    ) -> Self {
        let _ = next.set_nodelay(true);
        let _ = prev.set_nodelay(true);
        Ring {
            rank,
            world: members.len(),
            timeout,
            members,
            next,
            prev,
            seq: 0,
            broken: None,
            buf: Vec::new(),
        }
    }

    /// The global rank of the next ring position.
    fn next_global(&self) -> usize {
        self.members[(self.rank + 1) % self.world]
    }

    /// The global rank of the previous ring position.
    fn prev_global(&self) -> usize {
        self.members[(self.rank + self.world - 1) % self.world]
    }

    fn global(&self) -> usize {
        self.members[self.rank]
    }

    /// Runs one collective: `body` queues sends and performs receives; on failure the ring aborts
    /// (tells the next rank, shuts both sockets) and stays broken.
    fn exchange<R>(
        &mut self,
        op: Op,
        dtype: u8,
        total: usize,
        body: impl FnOnce(&mut Io) -> Result<R>,
    ) -> Result<R> {
        if let Some(first) = &self.broken {
            return Err(Error::Broken {
                rank: self.global(),
                first: first.clone(),
            });
        }
        self.seq += 1;
        let call = Call {
            op,
            dtype,
            seq: self.seq,
            total: total as u64,
            rank: self.global(),
            prev: self.prev_global(),
            next: self.next_global(),
            deadline: Instant::now() + self.timeout,
            timeout: self.timeout,
        };
        let stop = AtomicBool::new(false);
        let send_error = Mutex::new(None);
        let (tx, rx) = std::sync::mpsc::channel();
        let (next, prev, buf) = (&self.next, &self.prev, &mut self.buf);
        let (result, end) = std::thread::scope(|s| {
            let sender = s.spawn(|| send_loop(call, next, rx, &stop, &send_error));
            let mut io = Io::new(call, tx, prev, buf, &send_error);
            let result = body(&mut io);
            if result.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            io.close();
            drop(io);
            (result, sender.join().unwrap_or(SendEnd::Failed))
        });
        let result = match (result, end) {
            (Ok(r), SendEnd::Clean) => return Ok(r),
            (Ok(_), SendEnd::Failed) => {
                Err(lock(&send_error).take().unwrap_or_else(|| Error::Peer {
                    op: op.name(),
                    rank: call.rank,
                    peer: call.next,
                    message: "send failed".into(),
                }))
            }
            (Err(e), _) => Err(e),
        };
        let text = result
            .as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default();
        if matches!(end, SendEnd::Clean) {
            send_abort(
                &call,
                &self.next,
                &format!("rank {} failed: {text}", call.rank),
            );
        }
        let _ = self.next.shutdown(Shutdown::Both);
        let _ = self.prev.shutdown(Shutdown::Both);
        self.broken = Some(text);
        result
    }

    /// In-place all-reduce.
    pub(crate) fn all_reduce<T: Element>(&mut self, data: &mut [T], op: ReduceOp) -> Result<()> {
        let (r, w, n) = (self.rank, self.world, data.len());
        self.exchange(Op::AllReduce, T::DTYPE, n, |io| {
            reduce_scatter_phase(io, data, r, w, op)?;
            all_gather_phase(io, data, r, w, |c| chunk_range(n, w, c))
        })
    }

    /// Reduce-scatter: `out` receives this rank's chunk (see [`chunk_range`]) of the reduction of `input`.
    pub(crate) fn reduce_scatter<T: Element>(
        &mut self,
        input: &[T],
        out: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let (r, w, n) = (self.rank, self.world, input.len());
        let mut work = input.to_vec();
        self.exchange(Op::ReduceScatter, T::DTYPE, n, |io| {
            reduce_scatter_phase(io, &mut work, r, w, op)
        })?;
        out.copy_from_slice(&work[chunk_range(n, w, r)]);
        Ok(())
    }

    /// All-gather of equal-length blocks: `out[i * len..(i + 1) * len]` is rank `i`'s `local`.
    pub(crate) fn all_gather<T: Element>(&mut self, local: &[T], out: &mut [T]) -> Result<()> {
        self.all_gather_as(Op::AllGather, local, out)
    }

    /// [`Self::all_gather`] under another op id, so that a peer calling a different collective is
    /// reported as a mismatch naming the op this rank is in (e.g. `split`).
    pub(crate) fn all_gather_as<T: Element>(
        &mut self,
        op: Op,
        local: &[T],
        out: &mut [T],
    ) -> Result<()> {
        let (r, w, len) = (self.rank, self.world, local.len());
        out[r * len..(r + 1) * len].copy_from_slice(local);
        self.exchange(op, T::DTYPE, len, |io| {
            all_gather_phase(io, out, r, w, |c| c * len..(c + 1) * len)
        })
    }

    /// Pipelined chain broadcast from `root` along the ring.
    pub(crate) fn broadcast<T: Element>(&mut self, data: &mut [T], root: usize) -> Result<()> {
        self.broadcast_as(Op::Broadcast, data, root)
    }

    /// Broadcast of a byte vector whose length only the root knows.
    pub(crate) fn broadcast_bytes(&mut self, data: &mut Vec<u8>, root: usize) -> Result<()> {
        let mut len = [data.len() as u64 as i64];
        self.broadcast_as(Op::BroadcastLen, &mut len, root)?;
        let len = usize::try_from(len[0]).map_err(|_| Error::InvalidArgument {
            op: "broadcast",
            rank: self.global(),
            message: format!("root sent a negative length {}", len[0]),
        })?;
        data.resize(len, 0);
        self.broadcast_as(Op::Broadcast, data, root)
    }

    /// A full synchronisation: a one-value all-reduce (every rank hears from every other).
    pub(crate) fn barrier(&mut self) -> Result<()> {
        let (r, w) = (self.rank, self.world);
        let mut token = [0u8];
        self.exchange(Op::Barrier, u8::DTYPE, 1, |io| {
            reduce_scatter_phase(io, &mut token, r, w, ReduceOp::Sum)?;
            all_gather_phase(io, &mut token, r, w, |c| chunk_range(1, w, c))
        })
    }

    fn broadcast_as<T: Element>(&mut self, op: Op, data: &mut [T], root: usize) -> Result<()> {
        let (r, w, n) = (self.rank, self.world, data.len());
        let forward = (r + 1) % w != root;
        self.exchange(op, T::DTYPE, n, |io| {
            for seg in segments::<T>(0..n) {
                if r != root {
                    let bytes = io.recv::<T>(seg.len())?;
                    T::decode(bytes, &mut data[seg.clone()]);
                }
                if r == root || forward {
                    io.send(&data[seg])?;
                }
            }
            Ok(())
        })
    }
}

/// After this, chunk `rank` of `data` holds the full reduction (divided by `w` for Mean).
fn reduce_scatter_phase<T: Element>(
    io: &mut Io,
    data: &mut [T],
    r: usize,
    w: usize,
    op: ReduceOp,
) -> Result<()> {
    let n = data.len();
    // Step s sends chunk r-1-s and receives chunk r-2-s, so the last step receives chunk r.
    for seg in segments::<T>(chunk_range(n, w, (r + w - 1) % w)) {
        io.send(&data[seg])?;
    }
    for s in 0..w - 1 {
        let c = (r + 2 * w - 2 - s) % w;
        for seg in segments::<T>(chunk_range(n, w, c)) {
            let bytes = io.recv::<T>(seg.len())?;
            T::reduce(&mut data[seg.clone()], bytes, op);
            if s < w - 2 {
                io.send(&data[seg])?;
            }
        }
    }
    if op == ReduceOp::Mean {
        T::divide(&mut data[chunk_range(n, w, r)], w);
    }
    Ok(())
}

/// Starting with chunk `r` final on rank `r`, circulates every chunk to every rank.
fn all_gather_phase<T: Element>(
    io: &mut Io,
    data: &mut [T],
    r: usize,
    w: usize,
    chunk: impl Fn(usize) -> Range<usize>,
) -> Result<()> {
    for seg in segments::<T>(chunk(r)) {
        io.send(&data[seg])?;
    }
    for s in 0..w - 1 {
        let c = (r + 2 * w - 1 - s) % w;
        for seg in segments::<T>(chunk(c)) {
            let bytes = io.recv::<T>(seg.len())?;
            T::decode(bytes, &mut data[seg.clone()]);
            if s < w - 2 {
                io.send(&data[seg])?;
            }
        }
    }
    Ok(())
}
