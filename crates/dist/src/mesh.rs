//! The two-level mesh of hybrid sharding (HSDP): shard inside a node, replicate across nodes.

use std::collections::HashMap;

use crate::error::Result;
use crate::group::ProcessGroup;

/// Where one rank runs: which node, and which slot on that node.
///
/// [`crate::DistEnv::placement`] reads it from the launcher; [`NodePlacement::contiguous`] builds the
/// usual node-by-node numbering (useful to simulate nodes on one machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePlacement {
    /// Index of the node, `0..nodes`.
    pub node_rank: usize,
    /// Slot on the node, `0..local_world_size`.
    pub local_rank: usize,
    /// Ranks on this node.
    pub local_world_size: usize,
}

impl NodePlacement {
    /// Rank `rank` of a job numbered node by node, `local_world_size` ranks per node: node
    /// `rank / local_world_size`, slot `rank % local_world_size` (node 0, slot `rank` when
    /// `local_world_size` is 0, which [`HybridMesh::new`] then rejects).
    ///
    /// ```
    /// use bellows_dist::NodePlacement;
    /// let p = NodePlacement::contiguous(5, 4);
    /// assert_eq!((p.node_rank, p.local_rank, p.local_world_size), (1, 1, 4));
    /// ```
    pub fn contiguous(rank: usize, local_world_size: usize) -> Self {
        NodePlacement {
            node_rank: rank.checked_div(local_world_size).unwrap_or(0),
            local_rank: rank.checked_rem(local_world_size).unwrap_or(rank),
            local_world_size,
        }
    }
}

/// The process groups of hybrid sharding: `shard` holds the ranks of this node (parameters,
/// gradients and optimizer state are sharded among them), `replicate` holds this rank's peers with
/// the same slot on every node (they keep identical shards).
///
/// With `N` nodes of `L` ranks, `shard` has `L` ranks and its rank is the slot (`local_rank`);
/// `replicate` has `N` ranks and its rank is the node. The gradient step of HSDP is a
/// reduce-scatter in `shard` followed by an all-reduce of the shard in `replicate`. On one node,
/// `replicate` is a group of one (identity collectives); with one rank per node, so is `shard`.
///
/// ```
/// use bellows_dist::{chunk_range, run_local, DistConfig, HybridMesh, NodePlacement, ReduceOp};
/// // 2 nodes x 2 ranks: rank r holds gradient [r; 4].
/// let out = run_local(4, &DistConfig::default(), |pg| {
///     let mesh = HybridMesh::new(&pg, NodePlacement::contiguous(pg.rank(), 2))?;
///     let grad = vec![pg.rank() as f64; 4];
///     let mut shard = vec![0.0; chunk_range(4, 2, mesh.shard.rank()).len()];
///     mesh.shard.reduce_scatter(&grad, &mut shard, ReduceOp::Sum)?;
///     mesh.replicate.all_reduce(&mut shard, ReduceOp::Sum)?;
///     Ok::<_, bellows_dist::Error>(shard)
/// })?;
/// // Every rank holds its half of 0 + 1 + 2 + 3.
/// assert!(out.iter().all(|r| r.as_ref().unwrap() == &vec![6.0, 6.0]));
/// # Ok::<(), bellows_dist::Error>(())
/// ```
#[derive(Debug)]
pub struct HybridMesh {
    /// The ranks of this node, ordered by slot.
    pub shard: ProcessGroup,
    /// The ranks with this rank's slot, one per node, ordered by node.
    pub replicate: ProcessGroup,
}

impl HybridMesh {
    /// Builds both groups from `world` (normally the job's group), given where this rank runs.
    ///
    /// Collective over `world`: every rank calls it with its own placement. The placements are
    /// all-gathered and checked before any group is made, so every rank returns the same error: all
    /// ranks must report the same `local_world_size`, it must divide the world size, and the
    /// `(node_rank, local_rank)` pairs must fill the `nodes x local_world_size` grid exactly once.
    /// Ranks need not be numbered node by node.
    ///
    /// # Errors
    /// [`crate::Error::InvalidArgument`] (op `hybrid_mesh`) naming the global rank whose placement
    /// does not fit; the errors of [`ProcessGroup::split`].
    pub fn new(world: &ProcessGroup, at: NodePlacement) -> Result<Self> {
        let mine = [at.node_rank, at.local_rank, at.local_world_size].map(|v| v as i64);
        let table: Vec<[usize; 3]> = world
            .gather_ids(&mine)?
            .chunks_exact(3)
            .map(|c| [c[0] as usize, c[1] as usize, c[2] as usize])
            .collect();
        if let Some(problem) = check_grid(&table, world.members()) {
            return Err(world.invalid("hybrid_mesh", problem));
        }
        let shard = world.split(at.node_rank, at.local_rank)?;
        let replicate = world.split(at.local_rank, at.node_rank)?;
        Ok(HybridMesh { shard, replicate })
    }
}

/// Why the placements `table[r] = [node, slot, local_world]` (rank `r` of a group whose global ranks
/// are `members`) do not form a full grid, or `None` if they do.
fn check_grid(table: &[[usize; 3]], members: &[usize]) -> Option<String> {
    let world = table.len();
    let local = table[0][2];
    if local == 0 {
        return Some(format!("rank {} reports local_world_size 0", members[0]));
    }
    if let Some(r) = (0..world).find(|&r| table[r][2] != local) {
        return Some(format!(
            "rank {} reports local_world_size {} but rank {} reports {local}: every node must run the \
             same number of ranks",
            members[r], table[r][2], members[0]
        ));
    }
    if !world.is_multiple_of(local) {
        return Some(format!(
            "world size {world} is not a multiple of local_world_size {local}"
        ));
    }
    let nodes = world / local;
    let mut seen = HashMap::new();
    for (r, &[node, slot, _]) in table.iter().enumerate() {
        if node >= nodes || slot >= local {
            return Some(format!(
                "rank {} is on node {node}, slot {slot}: outside the grid of {nodes} nodes x {local} ranks",
                members[r]
            ));
        }
        if let Some(first) = seen.insert((node, slot), r) {
            return Some(format!(
                "ranks {} and {} both claim node {node}, slot {slot}",
                members[first], members[r]
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::check_grid;

    fn grid(places: &[[usize; 3]]) -> Option<String> {
        let members: Vec<usize> = (10..10 + places.len()).collect();
        check_grid(places, &members)
    }

    #[test]
    fn full_grids_pass_in_any_rank_order() {
        assert_eq!(grid(&[[0, 0, 2], [0, 1, 2], [1, 0, 2], [1, 1, 2]]), None);
        // Round-robin (Slurm `--distribution=cyclic`): rank r on node r % 2.
        assert_eq!(grid(&[[0, 0, 2], [1, 0, 2], [0, 1, 2], [1, 1, 2]]), None);
        assert_eq!(grid(&[[0, 0, 1]]), None);
    }

    #[test]
    fn bad_layouts_name_the_global_rank_at_fault() {
        let uneven = grid(&[[0, 0, 2], [0, 1, 2], [1, 0, 1]]).expect("uneven nodes");
        assert!(
            uneven.contains("rank 12 reports local_world_size 1 but rank 10 reports 2"),
            "{uneven}"
        );
        let indivisible = grid(&[[0, 0, 2], [0, 1, 2], [1, 0, 2]]).expect("3 % 2");
        assert!(
            indivisible.contains("world size 3 is not a multiple of local_world_size 2"),
            "{indivisible}"
        );
        let twice = grid(&[[0, 0, 2], [0, 0, 2], [1, 0, 2], [1, 1, 2]]).expect("same slot");
        assert!(
            twice.contains("ranks 10 and 11 both claim node 0, slot 0"),
            "{twice}"
        );
        let outside = grid(&[[0, 0, 2], [0, 1, 2], [2, 0, 2], [1, 1, 2]]).expect("node 2 of 2");
        assert!(
            outside.contains("rank 12 is on node 2, slot 0"),
            "{outside}"
        );
        let zero = grid(&[[0, 0, 0], [0, 1, 0]]).expect("zero");
        assert!(zero.contains("local_world_size 0"), "{zero}");
    }
}
