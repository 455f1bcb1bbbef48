//! Which chunks each rank reads in an epoch, and how many batches every rank yields.
//!
//! Every rank computes the same plan from the same inputs (chunk sizes, seed, epoch, world size),
//! so no communication is needed:
//!
//! 1. Chunk order: natural order, or (train split with `shuffle = "seeded"`) a permutation drawn
//!    from `seed` and `epoch`.
//! 2. Assignment: in that order each chunk goes to the rank that so far holds the fewest *units*
//!    (ties to the lowest rank). A unit is a padded row (pad mode) or a token (pack mode), so ranks
//!    get near-equal work even when chunks differ in size. Ranks never share a chunk.
//! 3. Step count: `steps = min over ranks of floor(units_r / units_per_batch)`. Every rank yields
//!    exactly `steps` batches in the epoch and drops the rest of its share (the remainder is dropped,
//!    never wrapped, so no row is seen twice in one epoch; with shuffling a different remainder is
//!    dropped each epoch).
//!
//! After a change of world size in the middle of an epoch, [`reshard`](crate::reshard) replaces
//! this plan for the rest of that epoch only ([`EpochRemainder`](crate::EpochRemainder)).

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Derives an independent stream seed from the user seed and a few coordinates (SplitMix64 finaliser).
pub(crate) fn mix_seed(parts: &[u64]) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    for &p in parts {
        h ^= p
            .wrapping_add(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(h << 6)
            .wrapping_add(h >> 2);
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
    }
    h
}

/// Purpose tags for [`mix_seed`], so different random streams never coincide.
pub(crate) const TAG_CHUNK_ORDER: u64 = 1;
pub(crate) const TAG_ROW_SHUFFLE: u64 = 2;
pub(crate) const TAG_RESHARD_SHUFFLE: u64 = 3;

/// One rank's share of one epoch.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct EpochPlan {
    /// Chunk ids this rank reads, in order.
    pub chunks: Vec<usize>,
    /// Batches every rank yields this epoch.
    pub steps: u64,
    /// Units held by the smallest rank (for error messages).
    pub min_units: u64,
}

/// Plans `epoch` for `rank` of `world`. `units[c]` is chunk c's size in units.
pub(crate) fn plan_epoch(
    units: &[u64],
    units_per_batch: u64,
    shuffled: Option<u64>,
    epoch: u64,
    rank: usize,
    world: usize,
) -> EpochPlan {
    let mut order: Vec<usize> = (0..units.len()).collect();
    if let Some(seed) = shuffled {
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[seed, epoch, TAG_CHUNK_ORDER]));
        order.shuffle(&mut rng);
    }
    let mut held = vec![0u64; world];
    let mut mine = Vec::new();
    for c in order {
        let (r, _) = held
            .iter()
            .enumerate()
            .min_by_key(|&(i, &u)| (u, i))
            .expect("world >= 1");
        held[r] += units[c];
        if r == rank {
            mine.push(c);
        }
    }
    let min_units = held.iter().copied().min().unwrap_or(0);
    EpochPlan {
        chunks: mine,
        steps: min_units / units_per_batch.max(1),
        min_units,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn ranks_get_disjoint_chunks_covering_all_and_equal_steps() {
        let units = [10, 3, 7, 7, 1, 20, 5, 9];
        for world in 1..=4 {
            let plans: Vec<_> = (0..world)
                .map(|r| plan_epoch(&units, 4, Some(7), 3, r, world))
                .collect();
            let mut all: Vec<usize> = plans.iter().flat_map(|p| p.chunks.clone()).collect();
            all.sort();
            assert_eq!(all, (0..units.len()).collect::<Vec<_>>());
            assert!(plans.iter().all(|p| p.steps == plans[0].steps));
            for p in &plans {
                let u: u64 = p.chunks.iter().map(|&c| units[c]).sum();
                assert!(u >= p.steps * 4);
            }
        }
    }

    #[test]
    fn order_depends_on_epoch_and_seed_only() {
        let units = vec![1; 50];
        let a = plan_epoch(&units, 1, Some(1), 0, 0, 1).chunks;
        let b = plan_epoch(&units, 1, Some(1), 1, 0, 1).chunks;
        let c = plan_epoch(&units, 1, Some(1), 0, 0, 1).chunks;
        assert_ne!(a, b);
        assert_eq!(a, c);
        assert_eq!(
            plan_epoch(&units, 1, None, 5, 0, 1).chunks,
            (0..50).collect::<Vec<_>>()
        );
    }
}
