//! [`ProcessGroup`]: identity plus collectives, behind one backend enum.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::comm::{chunk_range, connect_ring, Element, ReduceOp, Ring, RingSpec};
use crate::config::{BackendKind, DistConfig};
use crate::env::DistEnv;
use crate::error::{Error, Result};
use crate::split::{Rendezvous, Scope};
use crate::store::{StoreClient, StoreServer};

/// The store token used when the launcher did not provide one (`BELLOWS_JOB_TOKEN`).
const DEFAULT_TOKEN: &str = "bellows";
/// How much longer than rank 0 the other ranks wait for rank 0's rendezvous verdict.
const VERDICT_SLACK: Duration = Duration::from_secs(5);

pub(crate) enum Backend {
    Single,
    Ring(Mutex<Ring>),
    #[cfg(feature = "cuda")]
    Nccl(crate::nccl::NcclComm),
}

/// A process group: this process's rank and world size, and collectives over all ranks.
///
/// [`ProcessGroup::init`] makes the group of the whole job; [`ProcessGroup::split`] and
/// [`crate::HybridMesh`] make sub-groups of it, whose ranks are renumbered `0..world_size()`
/// ([`ProcessGroup::members`] maps them back). Errors always name *global* ranks (the job's `RANK`).
///
/// Every rank must call the same collectives in the same order with the same lengths and element type;
/// a mismatch is detected and reported as [`Error::Mismatch`]. Collectives from several threads are
/// serialised by an internal lock, which only helps if every rank issues them in the same order.
/// After any collective fails the group is broken: later calls return [`Error::Broken`].
/// Element types: `f32`, `f64`, `i32`, `i64`, `u8` (see [`Element`]).
///
/// ```
/// use bellows_dist::{ProcessGroup, ReduceOp};
/// let pg = ProcessGroup::single();
/// let mut grads = vec![1.0f32, 2.0];
/// pg.all_reduce(&mut grads, ReduceOp::Mean).unwrap();
/// assert_eq!(grads, [1.0, 2.0]);
/// ```
pub struct ProcessGroup {
    pub(crate) rank: usize,
    pub(crate) world: usize,
    pub(crate) backend: Backend,
    /// The global rank of each group rank (`0..world` for the job's group).
    pub(crate) members: Arc<[usize]>,
    /// Where sub-groups meet; `None` for groups of one, whose sub-groups are groups of one.
    /// Declared after `backend` so that the store (which rank 0 may host) outlives the connections.
    pub(crate) scope: Option<Scope>,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("members", &self.members)
            .field("backend", &self.backend_name())
            .finish()
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

impl ProcessGroup {
    /// A group of one: rank 0 of 1, every collective is the identity.
    pub fn single() -> Self {
        Self::single_member(0)
    }

    /// A group of one whose only member has global rank `global`.
    pub(crate) fn single_member(global: usize) -> Self {
        ProcessGroup {
            rank: 0,
            world: 1,
            backend: Backend::Single,
            members: Arc::from([global]),
            scope: None,
        }
    }

    /// A group of one on the NCCL backend, GPU `device`: the same code path as a multi-rank NCCL
    /// group (host buffers staged through the GPU), for checking a GPU host (`scripts/gpu-check.sh`).
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] without the `cuda` feature, a GPU or libnccl; NCCL's own errors.
    pub fn nccl_solo(device: usize, timeout: Duration) -> Result<Self> {
        resolve_backend(BackendKind::Nccl)?;
        Ok(ProcessGroup {
            rank: 0,
            world: 1,
            backend: nccl_solo_backend(device, timeout)?,
            members: Arc::from([0]),
            scope: None,
        })
    }

    /// Joins the job described by `env`: rendezvous through the TCP store at
    /// `master_addr:`[`DistEnv::store_port`] (rank 0 hosts it unless `bellows launch` does), check that
    /// every rank has the same `job_hash`, then connect the backend.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid `cfg`; [`Error::JobHashMismatch`] naming the rank whose hash differs
    /// (reported on every rank); store, connection and timeout errors naming the peer;
    /// [`Error::BackendUnavailable`] when `nccl` is asked for but cannot be used.
    pub fn init(env: &DistEnv, cfg: &DistConfig, job_hash: &str) -> Result<Self> {
        let mut issues = Vec::new();
        cfg.validate("dist", &mut issues);
        if !issues.is_empty() {
            let text: Vec<String> = issues.iter().map(|(k, m)| format!("{k}: {m}")).collect();
            return Err(Error::Config(text.join("; ")));
        }
        if env.world_size <= 1 {
            return Ok(Self::single());
        }
        let kind = resolve_backend(cfg.backend)?;
        let timeout = cfg.timeout();
        let addr = format!("{}:{}", bracket(&env.master_addr), env.store_port());
        let token = env.job_token.as_deref().unwrap_or(DEFAULT_TOKEN);
        let server = if env.rank == 0 && env.rank0_hosts_store() {
            Some(StoreServer::bind(&addr, token)?)
        } else {
            None
        };
        let rendezvous = Rendezvous {
            addr,
            token: token.to_string(),
            job_hash: job_hash.to_string(),
            timeout,
            _server: server,
        };
        let mut store = rendezvous.connect()?;
        // The n-th group created by each rank shares the prefix pg<n>, so groups and reruns against one store do not collide.
        let generation = store.add(&format!("pg/count/{}", env.rank), 1)?;
        let prefix = format!("pg{generation}");
        check_job_hash(&mut store, &prefix, env, job_hash, timeout)?;
        let members: Arc<[usize]> = (0..env.world_size).collect();
        let backend = match kind {
            BackendKind::Nccl => nccl_backend(&mut store, &prefix, env, timeout)?,
            _ => {
                let spec = RingSpec {
                    rank: env.rank,
                    members: &members,
                    job_hash,
                    timeout,
                    prefix: &prefix,
                };
                Backend::Ring(Mutex::new(connect_ring(&mut store, &spec)?))
            }
        };
        Ok(ProcessGroup {
            rank: env.rank,
            world: env.world_size,
            backend,
            members,
            scope: Some(Scope::new(Arc::new(rendezvous), prefix)),
        })
    }

    /// This process's rank, `0..world_size()`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// The global rank (the job's `RANK`) of every member, indexed by group rank: `members()[rank()]`
    /// is this process. `0..world_size()` for the job's group; see [`ProcessGroup::split`].
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    /// `"single"`, `"cpu"` or `"nccl"`.
    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            Backend::Single => "single",
            Backend::Ring(_) => "cpu",
            #[cfg(feature = "cuda")]
            Backend::Nccl(_) => "nccl",
        }
    }

    /// Reduces `buf` elementwise across ranks, in place; every rank ends with the same bits.
    ///
    /// # Errors
    /// Timeout, peer and mismatch errors naming the op and the peer rank.
    pub fn all_reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        match &self.backend {
            Backend::Single => Ok(()),
            Backend::Ring(r) => lock(r).all_reduce(buf, op),
            #[cfg(feature = "cuda")]
            Backend::Nccl(c) => c.all_reduce(buf, op),
        }
    }

    /// Concatenates every rank's `local` in rank order into `out` (`out.len() == local.len() * world`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a wrong `out` length; [`Error::Mismatch`] if ranks pass different lengths.
    pub fn all_gather<T: Element>(&self, local: &[T], out: &mut [T]) -> Result<()> {
        if out.len() != local.len() * self.world {
            return Err(self.invalid(
                "all_gather",
                format!(
                    "out has {} elements, expected local ({}) x world ({})",
                    out.len(),
                    local.len(),
                    self.world
                ),
            ));
        }
        match &self.backend {
            Backend::Single => {
                out.copy_from_slice(local);
                Ok(())
            }
            Backend::Ring(r) => lock(r).all_gather(local, out),
            #[cfg(feature = "cuda")]
            Backend::Nccl(c) => c.all_gather(local, out),
        }
    }

    /// Reduces `input` across ranks and leaves this rank's chunk in `out`.
    ///
    /// Chunks follow [`chunk_range`]: the first `len % world` ranks get `len / world + 1` elements, the
    /// rest `len / world`, so `out.len()` must be `chunk_range(input.len(), world, rank).len()`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a wrong `out` length; collective errors as for [`Self::all_reduce`].
    pub fn reduce_scatter<T: Element>(
        &self,
        input: &[T],
        out: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let mine = chunk_range(input.len(), self.world, self.rank);
        if out.len() != mine.len() {
            return Err(self.invalid(
                "reduce_scatter",
                format!(
                    "out has {} elements, but this rank's chunk of {} is {}",
                    out.len(),
                    input.len(),
                    mine.len()
                ),
            ));
        }
        match &self.backend {
            Backend::Single => {
                out.copy_from_slice(input);
                Ok(())
            }
            Backend::Ring(r) => lock(r).reduce_scatter(input, out, op),
            #[cfg(feature = "cuda")]
            Backend::Nccl(c) => c.reduce_scatter(input, out, op),
        }
    }

    /// Copies `root`'s `buf` into every other rank's `buf` (all must have the same length).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `root >= world`; collective errors as for [`Self::all_reduce`].
    pub fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.check_root("broadcast", root)?;
        match &self.backend {
            Backend::Single => Ok(()),
            Backend::Ring(r) => lock(r).broadcast(buf, root),
            #[cfg(feature = "cuda")]
            Backend::Nccl(c) => c.broadcast(buf, root),
        }
    }

    /// Broadcasts a byte vector of any length from `root`; other ranks' vectors are resized to match.
    ///
    /// # Errors
    /// As for [`Self::broadcast`].
    pub fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        self.check_root("broadcast", root)?;
        match &self.backend {
            Backend::Single => Ok(()),
            Backend::Ring(r) => lock(r).broadcast_bytes(buf, root),
            #[cfg(feature = "cuda")]
            Backend::Nccl(c) => c.broadcast_bytes(buf, root),
        }
    }

    /// Returns once every rank has called `barrier`.
    ///
    /// # Errors
    /// Timeout and peer errors naming the rank.
    pub fn barrier(&self) -> Result<()> {
        match &self.backend {
            Backend::Single => Ok(()),
            Backend::Ring(r) => lock(r).barrier(),
            #[cfg(feature = "cuda")]
            Backend::Nccl(c) => c.barrier(),
        }
    }

    fn check_root(&self, op: &'static str, root: usize) -> Result<()> {
        if root >= self.world {
            return Err(self.invalid(
                op,
                format!("root {root} is not < world size {}", self.world),
            ));
        }
        Ok(())
    }

    /// An [`Error::InvalidArgument`] naming this process by its global rank.
    pub(crate) fn invalid(&self, op: &'static str, message: String) -> Error {
        Error::InvalidArgument {
            op,
            rank: self.members[self.rank],
            message,
        }
    }
}

pub(crate) fn lock(m: &Mutex<Ring>) -> std::sync::MutexGuard<'_, Ring> {
    // A panic inside a collective leaves the ring marked broken or mid-call; the next call reports it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn resolve_backend(asked: BackendKind) -> Result<BackendKind> {
    match asked {
        BackendKind::Cpu => Ok(BackendKind::Cpu),
        #[cfg(feature = "cuda")]
        BackendKind::Auto => Ok(if crate::nccl::available() {
            BackendKind::Nccl
        } else {
            BackendKind::Cpu
        }),
        #[cfg(not(feature = "cuda"))]
        BackendKind::Auto => Ok(BackendKind::Cpu),
        #[cfg(feature = "cuda")]
        BackendKind::Nccl => match crate::nccl::available() {
            true => Ok(BackendKind::Nccl),
            false => Err(Error::BackendUnavailable {
                backend: "nccl".into(),
                message: crate::nccl::unavailable_reason(),
            }),
        },
        #[cfg(not(feature = "cuda"))]
        BackendKind::Nccl => Err(Error::BackendUnavailable {
            backend: "nccl".into(),
            message: "built without the `cuda` feature".into(),
        }),
    }
}

#[cfg(feature = "cuda")]
fn nccl_backend(
    store: &mut StoreClient,
    prefix: &str,
    env: &DistEnv,
    timeout: Duration,
) -> Result<Backend> {
    Ok(Backend::Nccl(crate::nccl::NcclComm::init(
        store, prefix, env, timeout,
    )?))
}

#[cfg(feature = "cuda")]
fn nccl_solo_backend(device: usize, timeout: Duration) -> Result<Backend> {
    Ok(Backend::Nccl(crate::nccl::NcclComm::solo(device, timeout)?))
}

#[cfg(not(feature = "cuda"))]
fn nccl_solo_backend(_: usize, _: Duration) -> Result<Backend> {
    Err(Error::BackendUnavailable {
        backend: "nccl".into(),
        message: "built without the `cuda` feature".into(),
    })
}

#[cfg(not(feature = "cuda"))]
fn nccl_backend(_: &mut StoreClient, _: &str, _: &DistEnv, _: Duration) -> Result<Backend> {
    Err(Error::BackendUnavailable {
        backend: "nccl".into(),
        message: "built without the `cuda` feature".into(),
    })
}

/// Rank 0 compares every rank's hash and publishes a verdict that all ranks act on, so every rank's
/// error names the rank that differs, or the rank that never arrived. The verdict is
/// `ok`, `hash\n<rank>\n<their hash>` or `missing\n<rank>`.
fn check_job_hash(
    store: &mut StoreClient,
    prefix: &str,
    env: &DistEnv,
    job_hash: &str,
    timeout: Duration,
) -> Result<()> {
    let (rank, secs) = (env.rank, timeout.as_secs_f64());
    store.set(&format!("{prefix}/hash/{rank}"), job_hash.as_bytes())?;
    let verdict_key = format!("{prefix}/hash/verdict");
    if rank == 0 {
        let mut verdict = "ok".to_string();
        let deadline = Instant::now() + timeout;
        for r in 1..env.world_size {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            match store.get(&format!("{prefix}/hash/{r}"), left) {
                Ok(theirs) if theirs == job_hash.as_bytes() => {}
                Ok(theirs) => {
                    verdict = format!("hash\n{r}\n{}", String::from_utf8_lossy(&theirs));
                    break;
                }
                Err(Error::StoreTimeout { .. }) => {
                    verdict = format!("missing\n{r}");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        store.set(&verdict_key, verdict.as_bytes())?;
    }
    // Rank 0 gives up on a missing rank after `timeout`; the others wait a little longer to hear which.
    let verdict = match store.get(&verdict_key, timeout + VERDICT_SLACK) {
        Ok(v) => String::from_utf8_lossy(&v).into_owned(),
        Err(Error::StoreTimeout { .. }) => {
            return Err(Error::Timeout {
                op: "init",
                rank,
                peer: 0,
                secs,
            })
        }
        Err(e) => return Err(e),
    };
    let mut parts = verdict.splitn(3, '\n');
    match (
        parts.next(),
        parts.next().and_then(|r| r.parse::<usize>().ok()),
        parts.next(),
    ) {
        (Some("ok"), _, _) => Ok(()),
        (Some("missing"), Some(peer), _) => Err(Error::Timeout {
            op: "init",
            rank,
            peer,
            secs,
        }),
        (Some("hash"), Some(peer), theirs) => {
            let ours = if rank == 0 {
                job_hash.to_string()
            } else {
                String::from_utf8_lossy(&store.get(&format!("{prefix}/hash/0"), timeout)?)
                    .into_owned()
            };
            Err(Error::JobHashMismatch {
                rank: 0,
                peer,
                ours,
                theirs: theirs.unwrap_or_default().to_string(),
            })
        }
        _ => Err(Error::Store {
            addr: store.addr().to_string(),
            message: format!("malformed job-hash verdict {verdict:?}"),
        }),
    }
}
