//! Process groups, rendezvous and collectives for bellows: the `torch.distributed` + `torchrun` layer.
//!
//! [`DistEnv`] reads rank and world size from whichever launcher started us (bellows, torchrun, Slurm,
//! Kubeflow, OpenMPI) in exactly one place. [`ProcessGroup::init`] meets the other ranks through a small
//! TCP key-value [`store`] and connects a backend: a deterministic TCP ring on host memory (always), or
//! NCCL (feature `cuda`). [`ProcessGroup::split`] makes sub-groups and [`HybridMesh`] the two groups
//! of hybrid sharding (shard inside a node, replicate across nodes). [`launch`] is the library behind
//! `bellows launch`.
//!
//! This crate depends on no other bellows crate; burn appears only in the host-staged tensor helpers.
//!
//! ```
//! use bellows_dist::{DistConfig, DistEnv, ProcessGroup, ReduceOp};
//! let env = DistEnv::from_env()?;                   // world 1 when no launcher is present
//! let pg = ProcessGroup::init(&env, &DistConfig::default(), "job-hash")?;
//! let mut grads = vec![0.5f32; 4];
//! pg.all_reduce(&mut grads, ReduceOp::Mean)?;
//! # Ok::<(), bellows_dist::Error>(())
//! ```
//!
//! # Guarantees and limits
//! * Every collective and every rendezvous step fails after `DistConfig::timeout_secs` without progress;
//!   errors name the op, this rank and the peer. A peer that exits is detected from its closed connection
//!   at once, and the failure travels round the ring as an abort message, so every rank fails fast.
//! * CPU all-reduce results are bitwise identical on every rank (see the determinism note on the ring).
//! * When a rank *hangs* (alive but silent), the ranks next to it name it; in worlds above 3 ranks further
//!   away may name the neighbour that timed out instead of the hung rank.
//! * After a failed collective the group is broken for good: make a new one (e.g. restart via `launch`).
//! * Sub-groups have their own connections: a failure in one breaks only that group. Errors from any
//!   group name global ranks.
//! * Under torchrun the store listens on `MASTER_PORT + 1`, because torchrun's own store holds `MASTER_PORT`.
//! * The NCCL backend stages host buffers through the GPU; it is compile-checked here (no GPU on CI).
#![warn(missing_docs)]

mod comm;
mod config;
mod env;
mod error;
mod group;
pub mod launch;
mod local;
mod mesh;
#[cfg(feature = "cuda")]
pub mod nccl;
mod split;
pub mod store;
mod tensor;

pub use comm::{chunk_range, DeviceElement, Element, ReduceOp};
pub use config::{BackendKind, DistConfig, Strategy};
pub use env::{DistEnv, EnvSource};
pub use error::{Error, Result};
pub use group::ProcessGroup;
pub use local::run_local;
pub use mesh::{HybridMesh, NodePlacement};
pub use tensor::{all_reduce_tensor, broadcast_tensor};

#[cfg(test)]
mod tests {
    /// The public handles can be shared across threads (the trainer keeps one group per process).
    #[test]
    fn public_handles_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<crate::ProcessGroup>();
        assert_send_sync::<crate::HybridMesh>();
        assert_send_sync::<crate::store::StoreServer>();
        assert_send_sync::<crate::DistEnv>();
        assert_send_sync::<crate::DistConfig>();
        fn assert_send<T: Send>() {}
        assert_send::<crate::store::StoreClient>();
    }
}
