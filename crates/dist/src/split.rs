//! Sub-groups: [`ProcessGroup::split`], bellows' `MPI_Comm_split` / `torch.distributed.new_group`.
//!
//! A split is collective over the parent group. Every rank first all-gathers `(color, key)` over the
//! parent (wire op `split`, so a rank that calls another collective instead is reported as a mismatch),
//! then every rank knows every group's members and its own place, with no further agreement needed.
//! The members of a group of two or more then meet again in the job's rendezvous store, under the key
//! prefix `<parent prefix>/split<n>/color<c>`, where `n` counts the parent's splits (the same count on
//! every rank, since splits are collective): repeated and nested splits never share keys.
//! The ring backend connects a new ring among the members; NCCL makes a new communicator from a
//! unique id published by the group's rank 0.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::comm::{connect_ring, Op, RingSpec};
use crate::error::Result;
use crate::group::{lock, Backend, ProcessGroup};
use crate::store::{StoreClient, StoreServer};

/// How a rank reaches the job's rendezvous store again after [`ProcessGroup::init`].
pub(crate) struct Rendezvous {
    /// The store's `host:port`.
    pub addr: String,
    /// The job token store clients present.
    pub token: String,
    /// Presented in ring hellos, as at init.
    pub job_hash: String,
    /// The group's collective and rendezvous timeout.
    pub timeout: Duration,
    /// Rank 0 hosts the store unless the launcher does; it lives as long as any group made from it.
    pub _server: Option<StoreServer>,
}

impl Rendezvous {
    /// A new client connection to the store.
    pub(crate) fn connect(&self) -> Result<StoreClient> {
        StoreClient::connect(&self.addr, &self.token, self.timeout)
    }
}

/// A group's place in the store: its key prefix, and how many splits it has made.
pub(crate) struct Scope {
    rendezvous: Arc<Rendezvous>,
    prefix: String,
    /// Held for a whole split, so that splits from several threads number and gather in one order.
    splits: Mutex<u64>,
}

impl Scope {
    pub(crate) fn new(rendezvous: Arc<Rendezvous>, prefix: String) -> Self {
        Scope {
            rendezvous,
            prefix,
            splits: Mutex::new(0),
        }
    }
}

impl ProcessGroup {
    /// Splits this group into sub-groups: ranks that pass the same `color` form one group, ordered by
    /// `key` and then by their rank here (like `MPI_Comm_split`). Returns this rank's sub-group.
    ///
    /// Collective: every rank of this group must call `split`, in the same order relative to the
    /// group's other collectives. The sub-group has the same backend, timeout and job token; its ranks
    /// are `0..world_size()` and [`ProcessGroup::members`] gives their global ranks, which errors name.
    /// A sub-group of one rank needs no connection and its collectives are the identity. This group is
    /// unaffected and stays usable; a sub-group may be split again.
    ///
    /// ```
    /// use bellows_dist::{run_local, DistConfig, ReduceOp};
    /// // World 4: even and odd ranks form two groups of two.
    /// let out = run_local(4, &DistConfig::default(), |pg| {
    ///     let sub = pg.split(pg.rank() % 2, pg.rank())?;
    ///     let mut v = [pg.rank() as f64];
    ///     sub.all_reduce(&mut v, ReduceOp::Sum)?;
    ///     Ok::<_, bellows_dist::Error>((sub.members().to_vec(), sub.rank(), v[0]))
    /// })?;
    /// assert_eq!(out[0].as_ref().unwrap(), &(vec![0, 2], 0, 2.0));
    /// assert_eq!(out[3].as_ref().unwrap(), &(vec![1, 3], 1, 4.0));
    /// # Ok::<(), bellows_dist::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`crate::Error::Mismatch`] or a peer error when ranks do not all call `split` (a rank that
    /// never calls it is named after the group's timeout); store, connection and timeout errors naming
    /// the global rank of the sub-group's peer; NCCL's own errors.
    pub fn split(&self, color: usize, key: usize) -> Result<ProcessGroup> {
        let Some(scope) = &self.scope else {
            // A group of one: its only sub-group is itself.
            return Ok(ProcessGroup::single_member(self.members[self.rank]));
        };
        let mut splits = scope.splits.lock().unwrap_or_else(|p| p.into_inner());
        let index = *splits;
        *splits += 1;
        // `as i64` keeps the bits; `as usize` below restores them.
        let table = self.gather_ids(&[color as i64, key as i64])?;
        let picks = same_color(&table, self.rank);
        let rank = picks
            .iter()
            .position(|&r| r == self.rank)
            .expect("a rank is always in the group of its own color");
        let members: Arc<[usize]> = picks.iter().map(|&r| self.members[r]).collect();
        if members.len() == 1 {
            return Ok(ProcessGroup::single_member(members[0]));
        }
        let rdv = &scope.rendezvous;
        let prefix = format!("{}/split{index}/color{color}", scope.prefix);
        let mut store = rdv.connect()?;
        let backend = match &self.backend {
            Backend::Ring(_) => {
                let spec = RingSpec {
                    rank,
                    members: &members,
                    job_hash: &rdv.job_hash,
                    timeout: rdv.timeout,
                    prefix: &prefix,
                };
                Backend::Ring(Mutex::new(connect_ring(&mut store, &spec)?))
            }
            #[cfg(feature = "cuda")]
            Backend::Nccl(c) => {
                Backend::Nccl(c.split(&mut store, &prefix, rank, &members, rdv.timeout)?)
            }
            Backend::Single => {
                unreachable!("a group with a rendezvous scope has two or more ranks")
            }
        };
        Ok(ProcessGroup {
            rank,
            world: members.len(),
            backend,
            members,
            scope: Some(Scope::new(rdv.clone(), prefix)),
        })
    }

    /// All-gathers `local` (the same length on every rank) under the wire op `split`: the
    /// agreement step of [`ProcessGroup::split`] and [`crate::HybridMesh::new`].
    pub(crate) fn gather_ids(&self, local: &[i64]) -> Result<Vec<i64>> {
        let mut out = vec![0i64; local.len() * self.world];
        match &self.backend {
            Backend::Single => out.copy_from_slice(local),
            Backend::Ring(r) => lock(r).all_gather_as(Op::Split, local, &mut out)?,
            #[cfg(feature = "cuda")]
            Backend::Nccl(c) => c.all_gather(local, &mut out)?,
        }
        Ok(out)
    }
}

/// The parent ranks whose color equals `rank`'s, ordered by key then parent rank;
/// `table` holds `[color, key]` for every parent rank.
fn same_color(table: &[i64], rank: usize) -> Vec<usize> {
    let color = |r: usize| table[2 * r];
    let key = |r: usize| table[2 * r + 1] as usize;
    let mut picks: Vec<usize> = (0..table.len() / 2)
        .filter(|&r| color(r) == color(rank))
        .collect();
    picks.sort_by_key(|&r| (key(r), r));
    picks
}

#[cfg(test)]
mod tests {
    use super::same_color;

    #[test]
    fn members_are_ordered_by_key_then_parent_rank() {
        // Parent ranks 0..5 as (color, key): color 7 holds 0, 2, 3, 4; color 1 holds 1.
        let table = [7, 5, 1, 0, 7, 1, 7, 1, 7, 0];
        assert_eq!(same_color(&table, 2), [4, 2, 3, 0]);
        assert_eq!(same_color(&table, 0), [4, 2, 3, 0]);
        assert_eq!(same_color(&table, 1), [1]);
        // Keys compare as unsigned after the round trip through i64.
        let big = [0, usize::MAX as i64, 0, 3];
        assert_eq!(same_color(&big, 0), [1, 0]);
    }
}
