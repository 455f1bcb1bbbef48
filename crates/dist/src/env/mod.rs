//! Rank and world size from the launcher's environment: read in exactly one place.
//!
//! Sources are detected in this order (the first that matches wins):
//!
//! | source | detected by | rank / world / local / node | master |
//! |---|---|---|---|
//! | [`EnvSource::Bellows`] | `BELLOWS_JOB_TOKEN` | `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `NODE_RANK` (all required) | `MASTER_ADDR`, `MASTER_PORT` (required) |
//! | [`EnvSource::Torchrun`] | `TORCHELASTIC_RUN_ID` or `GROUP_RANK`, or a bare `RANK`/`WORLD_SIZE` | `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `GROUP_RANK` | `MASTER_ADDR`, `MASTER_PORT` (default 29500) |
//! | [`EnvSource::Kubeflow`] | `PET_NNODES`, `PET_NPROC_PER_NODE` or `PET_NODE_RANK` | `PET_NODE_RANK` (else `RANK`, the pod index) × `PET_NPROC_PER_NODE` + `LOCAL_RANK` | `MASTER_ADDR`/`PET_MASTER_ADDR`, `MASTER_PORT`/`PET_MASTER_PORT` (default 23456) |
//! | [`EnvSource::OpenMpi`] | `OMPI_COMM_WORLD_RANK` | `OMPI_COMM_WORLD_RANK`/`SIZE`/`LOCAL_RANK`/`LOCAL_SIZE`; node = rank / local size | `MASTER_ADDR` (127.0.0.1 when all ranks are local), `MASTER_PORT` (default 29500) |
//! | [`EnvSource::Slurm`] | `SLURM_PROCID` | `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_NODEID`, `SLURM_TASKS_PER_NODE` | `MASTER_ADDR` else the first host of `SLURM_JOB_NODELIST`; `MASTER_PORT` else 15000 + last 4 digits of `SLURM_JOB_ID` |
//! | [`EnvSource::Single`] | none of the above | 0 / 1 | 127.0.0.1:29500 (unused) |
//!
//! Empty values count as unset. Every inconsistency is an [`Error::Env`] naming the variable.

mod slurm;

use crate::error::{Error, Result};
use crate::mesh::NodePlacement;

/// Which launcher the rank and world size came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvSource {
    /// No launcher: one process.
    Single,
    /// `bellows launch` (see [`crate::launch`]).
    Bellows,
    /// torchrun / torch.distributed.run, or a bare `RANK`/`WORLD_SIZE` environment.
    Torchrun,
    /// Slurm `srun`.
    Slurm,
    /// A Kubeflow PyTorchJob / TrainJob pod.
    Kubeflow,
    /// OpenMPI `mpirun`.
    OpenMpi,
}

/// Where this process sits in the job; built by [`DistEnv::from_env`] and nowhere else from env vars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes in the job (>= 1).
    pub world_size: usize,
    /// Rank on this node, `0..local_world_size`.
    pub local_rank: usize,
    /// Processes on this node.
    pub local_world_size: usize,
    /// Index of this node.
    pub node_rank: usize,
    /// Host of the rendezvous store.
    pub master_addr: String,
    /// Port the launcher advertised (see [`DistEnv::store_port`] for the port the store uses).
    pub master_port: u16,
    /// Which launcher these values came from.
    pub source: EnvSource,
    /// Per-job secret that store clients must present (`BELLOWS_JOB_TOKEN`; `None` outside bellows launch).
    pub job_token: Option<String>,
}

impl DistEnv {
    /// One process: rank 0 of 1.
    pub fn single() -> Self {
        DistEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".to_string(),
            master_port: 29500,
            source: EnvSource::Single,
            job_token: None,
        }
    }

    /// Reads the process environment (see the module docs for the variables).
    ///
    /// # Errors
    /// [`Error::Env`] naming the variable when a value is missing, malformed or inconsistent.
    ///
    /// ```
    /// let env = bellows_dist::DistEnv::from_env().unwrap();
    /// assert!(env.rank < env.world_size);
    /// ```
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// The testable core of [`DistEnv::from_env`]: `get` returns a variable's value.
    ///
    /// # Errors
    /// As for [`DistEnv::from_env`].
    ///
    /// ```
    /// use bellows_dist::{DistEnv, EnvSource};
    /// let vars = [("SLURM_PROCID", "3"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "1"),
    ///     ("SLURM_NODEID", "1"), ("SLURM_TASKS_PER_NODE", "2(x4)"),
    ///     ("SLURM_JOB_NODELIST", "gpu[01-04]"), ("SLURM_JOB_ID", "123456")];
    /// let env = DistEnv::from_vars(|k| vars.iter().find(|v| v.0 == k).map(|v| v.1.to_string())).unwrap();
    /// assert_eq!((env.rank, env.world_size, env.source), (3, 8, EnvSource::Slurm));
    /// assert_eq!((env.master_addr.as_str(), env.master_port), ("gpu01", 18456));
    /// ```
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let v = Vars(&get);
        let env = if v.has("BELLOWS_JOB_TOKEN") {
            bellows(&v)?
        } else if v.has("TORCHELASTIC_RUN_ID") || v.has("GROUP_RANK") {
            torchrun(&v)?
        } else if v.has("PET_NNODES") || v.has("PET_NPROC_PER_NODE") || v.has("PET_NODE_RANK") {
            kubeflow(&v)?
        } else if v.has("OMPI_COMM_WORLD_RANK") {
            openmpi(&v)?
        } else if v.has("SLURM_PROCID") {
            slurm(&v)?
        } else if v.has("RANK") || v.has("WORLD_SIZE") {
            torchrun(&v)?
        } else {
            return Ok(Self::single());
        };
        env.check()?;
        Ok(env)
    }

    /// Where this rank runs (node, slot, ranks on the node), for [`crate::HybridMesh::new`].
    ///
    /// Whether every node runs the same number of ranks cannot be seen from one rank's variables (Slurm
    /// allows `SLURM_TASKS_PER_NODE=2,1`); `HybridMesh::new` checks the whole job's placements.
    ///
    /// ```
    /// use bellows_dist::DistEnv;
    /// let vars = [("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2"),
    ///     ("GROUP_RANK", "1"), ("MASTER_ADDR", "node0")];
    /// let env = DistEnv::from_vars(|k| vars.iter().find(|v| v.0 == k).map(|v| v.1.to_string()))?;
    /// let p = env.placement();
    /// assert_eq!((p.node_rank, p.local_rank, p.local_world_size), (1, 1, 2));
    /// # Ok::<(), bellows_dist::Error>(())
    /// ```
    pub fn placement(&self) -> NodePlacement {
        NodePlacement {
            node_rank: self.node_rank,
            local_rank: self.local_rank,
            local_world_size: self.local_world_size,
        }
    }

    /// The port the bellows rendezvous store listens on.
    ///
    /// This is `master_port`, except under torchrun where torchrun's own agent store already holds
    /// `MASTER_PORT`: there it is `master_port + 1` (wrapping to 1 above 65535 is refused by `check`).
    pub fn store_port(&self) -> u16 {
        match self.source {
            EnvSource::Torchrun => self.master_port.saturating_add(1),
            _ => self.master_port,
        }
    }

    /// Whether rank 0 must host the store (false under `bellows launch`, whose launcher hosts it).
    pub fn rank0_hosts_store(&self) -> bool {
        self.source != EnvSource::Bellows
    }

    fn check(&self) -> Result<()> {
        let (rank_var, world_var, lrank_var, lworld_var) = self.var_names();
        if self.world_size == 0 {
            return Err(Error::env(world_var, "must be >= 1, got 0"));
        }
        if self.rank >= self.world_size {
            let msg = format!("{} is not < {world_var}={}", self.rank, self.world_size);
            return Err(Error::env(rank_var, msg));
        }
        if self.local_world_size == 0 || self.local_world_size > self.world_size {
            let msg = format!(
                "{} must be in 1..={} ({world_var})",
                self.local_world_size, self.world_size
            );
            return Err(Error::env(lworld_var, msg));
        }
        if self.local_rank >= self.local_world_size {
            let msg = format!(
                "{} is not < {lworld_var}={}",
                self.local_rank, self.local_world_size
            );
            return Err(Error::env(lrank_var, msg));
        }
        if self.master_port == 0 {
            return Err(Error::env("MASTER_PORT", "must be in 1..=65535, got 0"));
        }
        if self.source == EnvSource::Torchrun && self.master_port == u16::MAX {
            return Err(Error::env(
                "MASTER_PORT",
                "65535 leaves no port for the bellows store (MASTER_PORT + 1)",
            ));
        }
        Ok(())
    }

    fn var_names(&self) -> (&'static str, &'static str, &'static str, &'static str) {
        match self.source {
            EnvSource::Slurm => (
                "SLURM_PROCID",
                "SLURM_NTASKS",
                "SLURM_LOCALID",
                "SLURM_TASKS_PER_NODE",
            ),
            EnvSource::OpenMpi => (
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE",
            ),
            EnvSource::Kubeflow => (
                "PET_NODE_RANK",
                "PET_NNODES",
                "LOCAL_RANK",
                "PET_NPROC_PER_NODE",
            ),
            _ => ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
        }
    }
}

/// Typed access to the variables; empty values count as unset.
struct Vars<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Vars<'_> {
    fn get(&self, k: &str) -> Option<String> {
        (self.0)(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }
    fn has(&self, k: &str) -> bool {
        self.get(k).is_some()
    }
    fn req(&self, k: &str) -> Result<String> {
        self.get(k)
            .ok_or_else(|| Error::env(k, "is required but not set"))
    }
    fn usize_opt(&self, k: &str) -> Result<Option<usize>> {
        match self.get(k) {
            None => Ok(None),
            Some(s) => s
                .parse::<usize>()
                .map(Some)
                .map_err(|_| Error::env(k, format!("expected a non-negative integer, got {s:?}"))),
        }
    }
    fn usize_req(&self, k: &str) -> Result<usize> {
        self.usize_opt(k)?
            .ok_or_else(|| Error::env(k, "is required but not set"))
    }
    fn port_opt(&self, k: &str) -> Result<Option<u16>> {
        match self.get(k) {
            None => Ok(None),
            Some(s) => match s.parse::<u16>() {
                Ok(p) if p > 0 => Ok(Some(p)),
                _ => Err(Error::env(
                    k,
                    format!("expected a port in 1..=65535, got {s:?}"),
                )),
            },
        }
    }
}

fn bellows(v: &Vars) -> Result<DistEnv> {
    Ok(DistEnv {
        rank: v.usize_req("RANK")?,
        world_size: v.usize_req("WORLD_SIZE")?,
        local_rank: v.usize_req("LOCAL_RANK")?,
        local_world_size: v.usize_req("LOCAL_WORLD_SIZE")?,
        node_rank: v.usize_req("NODE_RANK")?,
        master_addr: v.req("MASTER_ADDR")?,
        master_port: v
            .port_opt("MASTER_PORT")?
            .ok_or_else(|| Error::env("MASTER_PORT", "is required but not set"))?,
        source: EnvSource::Bellows,
        job_token: v.get("BELLOWS_JOB_TOKEN"),
    })
    .and_then(|e| check_layout(e, "NODE_RANK"))
}

fn torchrun(v: &Vars) -> Result<DistEnv> {
    let rank = v.usize_req("RANK")?;
    let world_size = v.usize_req("WORLD_SIZE")?;
    let local_rank = v.usize_opt("LOCAL_RANK")?.unwrap_or(rank);
    let local_world_size = v.usize_opt("LOCAL_WORLD_SIZE")?.unwrap_or(world_size);
    let node_rank = v.usize_opt("GROUP_RANK")?.unwrap_or(0);
    if let Some(groups) = v.usize_opt("GROUP_WORLD_SIZE")? {
        if groups * local_world_size != world_size {
            let msg = format!(
                "{groups} nodes x LOCAL_WORLD_SIZE={local_world_size} != WORLD_SIZE={world_size}"
            );
            return Err(Error::env("GROUP_WORLD_SIZE", msg));
        }
    }
    let master_addr = match v.get("MASTER_ADDR") {
        Some(a) => a,
        None if local_world_size == world_size => "127.0.0.1".to_string(),
        None => {
            return Err(Error::env(
                "MASTER_ADDR",
                "is required when ranks span several nodes",
            ))
        }
    };
    let env = DistEnv {
        rank,
        world_size,
        local_rank,
        local_world_size,
        node_rank,
        master_addr,
        master_port: v.port_opt("MASTER_PORT")?.unwrap_or(29500),
        source: EnvSource::Torchrun,
        job_token: None,
    };
    check_layout(env, "GROUP_RANK")
}

fn kubeflow(v: &Vars) -> Result<DistEnv> {
    let nnodes = match v.get("PET_NNODES") {
        None => 1,
        Some(s) => {
            let (lo, hi) = s.split_once(':').unwrap_or((&s, &s));
            match (lo.parse::<usize>(), hi.parse::<usize>()) {
                (Ok(a), Ok(b)) if a == b && a > 0 => a,
                _ => {
                    return Err(Error::env(
                        "PET_NNODES",
                        format!("expected a fixed node count like 2 or 2:2, got {s:?}"),
                    ))
                }
            }
        }
    };
    let nproc = v.usize_opt("PET_NPROC_PER_NODE")?.unwrap_or(1);
    let node_rank = match v.usize_opt("PET_NODE_RANK")? {
        Some(n) => n,
        None => v.usize_opt("RANK")?.unwrap_or(0),
    };
    let local_rank = match v.usize_opt("LOCAL_RANK")? {
        Some(l) => l,
        None if nproc == 1 => 0,
        None => {
            let msg = format!("is required when PET_NPROC_PER_NODE={nproc}: start the pod's processes with bellows launch or torchrun");
            return Err(Error::env("LOCAL_RANK", msg));
        }
    };
    if node_rank >= nnodes {
        return Err(Error::env(
            "PET_NODE_RANK",
            format!("{node_rank} is not < PET_NNODES={nnodes}"),
        ));
    }
    let master_addr = v
        .get("MASTER_ADDR")
        .or_else(|| v.get("PET_MASTER_ADDR"))
        .ok_or_else(|| {
            Error::env(
                "MASTER_ADDR",
                "is required (neither MASTER_ADDR nor PET_MASTER_ADDR is set)",
            )
        })?;
    let master_port = match v.port_opt("MASTER_PORT")? {
        Some(p) => p,
        None => v.port_opt("PET_MASTER_PORT")?.unwrap_or(23456),
    };
    Ok(DistEnv {
        rank: node_rank * nproc + local_rank,
        world_size: nnodes * nproc,
        local_rank,
        local_world_size: nproc,
        node_rank,
        master_addr,
        master_port,
        source: EnvSource::Kubeflow,
        job_token: None,
    })
}

fn openmpi(v: &Vars) -> Result<DistEnv> {
    let rank = v.usize_req("OMPI_COMM_WORLD_RANK")?;
    let world_size = v.usize_req("OMPI_COMM_WORLD_SIZE")?;
    let local_rank = v.usize_req("OMPI_COMM_WORLD_LOCAL_RANK")?;
    let local_world_size = v.usize_req("OMPI_COMM_WORLD_LOCAL_SIZE")?;
    let master_addr = match v.get("MASTER_ADDR") {
        Some(a) => a,
        None if local_world_size == world_size => "127.0.0.1".to_string(),
        None => {
            return Err(Error::env(
                "MASTER_ADDR",
                "is required when OpenMPI ranks span several nodes",
            ))
        }
    };
    Ok(DistEnv {
        rank,
        world_size,
        local_rank,
        local_world_size,
        node_rank: rank / local_world_size.max(1),
        master_addr,
        master_port: v.port_opt("MASTER_PORT")?.unwrap_or(29500),
        source: EnvSource::OpenMpi,
        job_token: None,
    })
}

fn slurm(v: &Vars) -> Result<DistEnv> {
    let rank = v.usize_req("SLURM_PROCID")?;
    let world_size = match v.usize_opt("SLURM_NTASKS")? {
        Some(n) => n,
        None => v
            .usize_req("SLURM_NPROCS")
            .map_err(|_| Error::env("SLURM_NTASKS", "is required but not set"))?,
    };
    let local_rank = v.usize_req("SLURM_LOCALID")?;
    let node_rank = v.usize_req("SLURM_NODEID")?;
    let local_world_size = match v.get("SLURM_TASKS_PER_NODE") {
        Some(spec) => {
            let per_node = slurm::tasks_per_node(&spec).ok_or_else(|| {
                Error::env("SLURM_TASKS_PER_NODE", format!("cannot parse {spec:?}"))
            })?;
            if per_node.iter().sum::<usize>() != world_size {
                let msg = format!(
                    "{spec:?} adds up to {} tasks but SLURM_NTASKS={world_size}",
                    per_node.iter().sum::<usize>()
                );
                return Err(Error::env("SLURM_TASKS_PER_NODE", msg));
            }
            *per_node.get(node_rank).ok_or_else(|| {
                Error::env(
                    "SLURM_NODEID",
                    format!("{node_rank} is out of range for SLURM_TASKS_PER_NODE={spec:?}"),
                )
            })?
        }
        None => v.usize_opt("SLURM_NTASKS_PER_NODE")?.ok_or_else(|| {
            Error::env(
                "SLURM_TASKS_PER_NODE",
                "is required (nor is SLURM_NTASKS_PER_NODE set)",
            )
        })?,
    };
    let master_addr = match v.get("MASTER_ADDR") {
        Some(a) => a,
        None => {
            let (var, list) = match v.get("SLURM_JOB_NODELIST") {
                Some(l) => ("SLURM_JOB_NODELIST", l),
                None => (
                    "SLURM_NODELIST",
                    v.req("SLURM_NODELIST").map_err(|_| {
                        Error::env(
                            "SLURM_JOB_NODELIST",
                            "is required when MASTER_ADDR is not set",
                        )
                    })?,
                ),
            };
            slurm::first_host(&list)
                .ok_or_else(|| Error::env(var, format!("cannot parse host list {list:?}")))?
        }
    };
    let master_port = match v.port_opt("MASTER_PORT")? {
        Some(p) => p,
        None => {
            let id = v.get("SLURM_JOB_ID").ok_or_else(|| {
                Error::env("SLURM_JOB_ID", "is required when MASTER_PORT is not set")
            })?;
            slurm::port_from_job_id(&id).ok_or_else(|| {
                Error::env(
                    "SLURM_JOB_ID",
                    format!("expected a numeric job id, got {id:?}"),
                )
            })?
        }
    };
    Ok(DistEnv {
        rank,
        world_size,
        local_rank,
        local_world_size,
        node_rank,
        master_addr,
        master_port,
        source: EnvSource::Slurm,
        job_token: None,
    })
}

/// For launchers that number ranks node by node with equal nodes: `rank == node * local_world + local_rank`.
fn check_layout(e: DistEnv, node_var: &str) -> Result<DistEnv> {
    if e.local_world_size > 0 && e.local_rank < e.local_world_size && e.rank < e.world_size {
        let expected = e.node_rank * e.local_world_size + e.local_rank;
        if expected != e.rank {
            let msg = format!(
                "{node_var}={} x LOCAL_WORLD_SIZE={} + LOCAL_RANK={} = {expected}, but RANK={}",
                e.node_rank, e.local_world_size, e.local_rank, e.rank
            );
            return Err(Error::env(node_var, msg));
        }
    }
    Ok(e)
}

#[cfg(test)]
mod tests;
