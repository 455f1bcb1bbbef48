//! Collectives on host memory: element types, chunking, and the TCP ring.

mod connect;
mod element;
mod ring;
mod wire;

use std::ops::Range;

pub(crate) use connect::{connect_ring, RingSpec};
pub use element::{DeviceElement, Element, ReduceOp};
pub(crate) use ring::Ring;
pub(crate) use wire::Op;

/// The chunk of a `len`-element buffer that rank `rank` of `world` owns in reduce-scatter.
///
/// The rule: the first `len % world` ranks get `len / world + 1` elements, the rest get `len / world`,
/// in rank order. So with `len < world` the last ranks get empty chunks.
///
/// ```
/// use bellows_dist::chunk_range;
/// assert_eq!((0..3).map(|r| chunk_range(10, 3, r)).collect::<Vec<_>>(), [0..4, 4..7, 7..10]);
/// assert_eq!(chunk_range(1, 3, 2), 1..1);
/// ```
///
/// # Panics
/// If `world == 0` (a group always has at least one rank).
pub fn chunk_range(len: usize, world: usize, rank: usize) -> Range<usize> {
    assert!(world > 0, "a group has at least one rank");
    let (base, extra) = (len / world, len % world);
    let start = rank * base + rank.min(extra);
    let size = base + usize::from(rank < extra);
    start.min(len)..(start + size).min(len)
}
