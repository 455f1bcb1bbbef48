//! The NCCL backend (feature `cuda`), through `cudarc::nccl`. Buffers are host slices staged through
//! the GPU of `LOCAL_RANK` on its default stream.
//!
//! # Finding libnccl
//! cudarc dlopens `libnccl.so` (and a few CUDA-versioned names) but never `libnccl.so.2`, the real SONAME
//! that runtime-only installs ship (Debian `libnccl2`, the PyPI `nvidia-nccl-cu12`/`-cu13` wheels).
//! [`find_library`] looks, in order, at:
//! 1. `BELLOWS_NCCL_PATH` (a file, or a directory holding `libnccl.so*`);
//! 2. the directories in `LD_LIBRARY_PATH`;
//! 3. `/usr/lib/x86_64-linux-gnu`, `/usr/lib64`, `/usr/lib`, `/usr/local/lib`, `/usr/local/cuda/lib64`;
//! 4. Python site-packages `nvidia/nccl/lib` under `VIRTUAL_ENV`, `CONDA_PREFIX`, `/usr/local/lib/python3*`,
//!    `/usr/lib/python3*`, `~/.local/lib/python3*` and `~/.pyenv/versions/*/lib/python3*`.
//!
//! A process cannot change where its own dynamic loader searches, so [`loader_dir`] makes a private
//! directory holding a `libnccl.so` link to what was found, and `bellows launch` prepends it to the
//! workers' `LD_LIBRARY_PATH`. A process started some other way gets a clear [`Error::BackendUnavailable`]
//! naming the library found and the directory to add.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{Comm, Id};

use crate::comm::{chunk_range, Element, ReduceOp};
use crate::env::DistEnv;
use crate::error::{Error, Result};
use crate::store::StoreClient;

/// Locates a libnccl shared object (see the module docs for the search order).
pub fn find_library() -> Option<PathBuf> {
    find_library_with(|k| std::env::var(k).ok())
}

fn nccl_in(dir: &Path) -> Option<PathBuf> {
    ["libnccl.so", "libnccl.so.2"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.exists())
}

fn glob_dirs(parent: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(parent)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(prefix))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn find_library_with(get: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(p) = get("BELLOWS_NCCL_PATH").map(PathBuf::from) {
        if p.is_file() {
            return Some(p);
        }
        if let Some(found) = nccl_in(&p) {
            return Some(found);
        }
    }
    let mut dirs: Vec<PathBuf> = get("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    dirs.extend(
        [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
            "/usr/local/lib",
            "/usr/local/cuda/lib64",
        ]
        .map(PathBuf::from),
    );
    let mut lib_roots: Vec<PathBuf> = Vec::new();
    for prefix in [get("VIRTUAL_ENV"), get("CONDA_PREFIX")]
        .into_iter()
        .flatten()
    {
        lib_roots.push(PathBuf::from(prefix).join("lib"));
    }
    lib_roots.extend(["/usr/local/lib", "/usr/lib"].map(PathBuf::from));
    if let Some(home) = get("HOME").map(PathBuf::from) {
        lib_roots.push(home.join(".local/lib"));
        lib_roots.extend(
            glob_dirs(&home.join(".pyenv/versions"), "")
                .into_iter()
                .map(|v| v.join("lib")),
        );
    }
    for root in lib_roots {
        for py in glob_dirs(&root, "python3") {
            for site in ["site-packages", "dist-packages"] {
                dirs.push(py.join(site).join("nvidia/nccl/lib"));
            }
        }
    }
    dirs.iter().find_map(|d| nccl_in(d))
}

/// A directory holding a `libnccl.so` link to [`find_library`]'s result, for a child's `LD_LIBRARY_PATH`.
/// `None` when no libnccl is found.
///
/// # Errors
/// [`Error::File`] if the directory or link cannot be created.
pub fn loader_dir() -> Result<Option<PathBuf>> {
    let Some(lib) = find_library() else {
        return Ok(None);
    };
    let dir = std::env::temp_dir().join(format!("bellows-nccl-{}", std::process::id()));
    let file_err = |path: &Path, e: std::io::Error| Error::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(&dir).map_err(|e| file_err(&dir, e))?;
    let link = dir.join("libnccl.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link).map_err(|e| file_err(&link, e))?;
    Ok(Some(dir))
}

/// Whether libnccl can be loaded by cudarc and a CUDA driver with at least one GPU is present.
pub(crate) fn available() -> bool {
    unavailable_reason().is_empty()
}

/// Why NCCL cannot be used here, or an empty string if it can.
pub(crate) fn unavailable_reason() -> String {
    #[allow(unsafe_code)]
    // SAFETY: these only dlopen the libraries by name to see whether they load; no symbols are called.
    let (cuda, nccl) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nccl::sys::is_culib_present(),
        )
    };
    if !cuda {
        return "no CUDA driver (libcuda) found".into();
    }
    if CudaContext::device_count().map(|n| n < 1).unwrap_or(true) {
        return "no CUDA device found".into();
    }
    if !nccl {
        return match find_library() {
            Some(p) => format!(
                "found {} but cudarc only loads `libnccl.so`: start through `bellows launch`, or add a directory \
                 holding a `libnccl.so` link to it to LD_LIBRARY_PATH",
                p.display()
            ),
            None => "libnccl not found (set BELLOWS_NCCL_PATH)".into(),
        };
    }
    String::new()
}

/// The NCCL communicator handle, movable between threads.
struct SendComm(Comm);

// SAFETY: an NCCL communicator may be used from any host thread as long as calls on it are not concurrent;
// `NcclComm` keeps it behind a Mutex, so only one thread uses it at a time.
#[allow(unsafe_code)]
unsafe impl Send for SendComm {}

/// A process group's NCCL communicator.
pub(crate) struct NcclComm {
    /// This process's global rank (for errors; NCCL itself knows the group rank).
    rank: usize,
    timeout: Duration,
    stream: Arc<CudaStream>,
    comm: Mutex<Option<SendComm>>,
}

fn nccl_err(op: &'static str, rank: usize, e: impl std::fmt::Debug) -> Error {
    Error::Nccl {
        op,
        rank,
        message: format!("{e:?}"),
    }
}

impl NcclComm {
    /// Every rank joins the job's communicator on GPU `local_rank` (see [`Self::join`]).
    pub(crate) fn init(
        store: &mut StoreClient,
        prefix: &str,
        env: &DistEnv,
        timeout: Duration,
    ) -> Result<Self> {
        let rank = env.rank;
        let ctx = std::panic::catch_unwind(|| CudaContext::new(env.local_rank))
            .map_err(|_| nccl_err("init", rank, "creating the CUDA context panicked"))?
            .map_err(|e| nccl_err("init", rank, e))?;
        let members: Vec<usize> = (0..env.world_size).collect();
        Self::join(ctx.default_stream(), store, prefix, rank, &members, timeout)
    }

    /// A communicator for a sub-group (see [`crate::ProcessGroup::split`]) on this communicator's GPU
    /// and stream: `rank` is this process's place in `members` (the sub-group's global ranks).
    ///
    /// A fresh `ncclCommInitRank` from a unique id in the store, not `ncclCommSplit`: cudarc 0.19
    /// binds `ncclCommSplit` only in its raw `sys` layer and does not expose the safe `Comm`'s handle.
    pub(crate) fn split(
        &self,
        store: &mut StoreClient,
        prefix: &str,
        rank: usize,
        members: &[usize],
        timeout: Duration,
    ) -> Result<Self> {
        Self::join(self.stream.clone(), store, prefix, rank, members, timeout)
    }

    /// Group rank 0 creates the unique id and shares it through the store under `prefix`; every member
    /// then joins. `members[r]` is the global rank of group rank `r`, which errors name.
    fn join(
        stream: Arc<CudaStream>,
        store: &mut StoreClient,
        prefix: &str,
        rank: usize,
        members: &[usize],
        timeout: Duration,
    ) -> Result<Self> {
        let me = members[rank];
        let key = format!("{prefix}/nccl_id");
        let id = if rank == 0 {
            let id = Id::new().map_err(|e| nccl_err("get_unique_id", me, e))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            store.set(&key, &bytes)?;
            id
        } else {
            let bytes = store.get(&key, timeout).map_err(|e| match e {
                Error::StoreTimeout { secs, .. } => Error::Timeout {
                    op: "init",
                    rank: me,
                    peer: members[0],
                    secs,
                },
                e => e,
            })?;
            let internal: [std::ffi::c_char; 128] =
                std::array::from_fn(|i| bytes.get(i).copied().unwrap_or(0) as std::ffi::c_char);
            Id::uninit(internal)
        };
        let comm = Comm::from_rank(stream.clone(), rank, members.len(), id)
            .map_err(|e| nccl_err("comm_init_rank", me, e))?;
        Ok(NcclComm {
            rank: me,
            timeout,
            stream,
            comm: Mutex::new(Some(SendComm(comm))),
        })
    }

    /// A communicator of world size 1 on GPU `device` (no store needed).
    pub(crate) fn solo(device: usize, timeout: Duration) -> Result<Self> {
        let ctx = std::panic::catch_unwind(|| CudaContext::new(device))
            .map_err(|_| nccl_err("init", 0, "creating the CUDA context panicked"))?
            .map_err(|e| nccl_err("init", 0, e))?;
        let stream = ctx.default_stream();
        let id = Id::new().map_err(|e| nccl_err("get_unique_id", 0, e))?;
        let comm = Comm::from_rank(stream.clone(), 0, 1, id)
            .map_err(|e| nccl_err("comm_init_rank", 0, e))?;
        Ok(NcclComm {
            rank: 0,
            timeout,
            stream,
            comm: Mutex::new(Some(SendComm(comm))),
        })
    }

    /// Runs `f` with the communicator, then waits for the stream with the group timeout; on failure or
    /// timeout the communicator is aborted and the group stays broken.
    fn run<R>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Comm, &Arc<CudaStream>) -> Result<R>,
    ) -> Result<R> {
        let mut guard = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        let Some(comm) = guard.as_ref() else {
            return Err(Error::Broken {
                rank: self.rank,
                first: "an earlier NCCL call failed".into(),
            });
        };
        let result = f(&comm.0, &self.stream).and_then(|r| self.wait(op).map(|()| r));
        if result.is_err() {
            *guard = None; // Dropping the communicator aborts it.
        }
        result
    }

    fn wait(&self, op: &'static str) -> Result<()> {
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| nccl_err(op, self.rank, e))?;
        let deadline = Instant::now() + self.timeout;
        while !event.is_complete() {
            if Instant::now() >= deadline {
                let message = format!("timed out after {:.1} s (NCCL does not say which rank is missing; check the other ranks)", self.timeout.as_secs_f64());
                return Err(Error::Nccl {
                    op,
                    rank: self.rank,
                    message,
                });
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(())
    }

    fn nccl_op(op: ReduceOp) -> cudarc::nccl::ReduceOp {
        match op {
            ReduceOp::Sum => cudarc::nccl::ReduceOp::Sum,
            ReduceOp::Mean => cudarc::nccl::ReduceOp::Avg,
            ReduceOp::Max => cudarc::nccl::ReduceOp::Max,
        }
    }

    pub(crate) fn all_reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let rank = self.rank;
        self.run("all_reduce", |comm, stream| {
            let mut dev = stream
                .clone_htod(buf)
                .map_err(|e| nccl_err("all_reduce", rank, e))?;
            comm.all_reduce_in_place(&mut dev, &Self::nccl_op(op))
                .map_err(|e| nccl_err("all_reduce", rank, e))?;
            stream
                .memcpy_dtoh(&dev, buf)
                .map_err(|e| nccl_err("all_reduce", rank, e))
        })
    }

    pub(crate) fn all_gather<T: Element>(&self, local: &[T], out: &mut [T]) -> Result<()> {
        let rank = self.rank;
        self.run("all_gather", |comm, stream| {
            let send = stream
                .clone_htod(local)
                .map_err(|e| nccl_err("all_gather", rank, e))?;
            let mut recv = stream
                .clone_htod(out)
                .map_err(|e| nccl_err("all_gather", rank, e))?;
            comm.all_gather(&send, &mut recv)
                .map_err(|e| nccl_err("all_gather", rank, e))?;
            stream
                .memcpy_dtoh(&recv, out)
                .map_err(|e| nccl_err("all_gather", rank, e))
        })
    }

    /// NCCL wants equal chunks: each rank's [`chunk_range`] is placed in a slot of the largest chunk size.
    pub(crate) fn reduce_scatter<T: Element>(
        &self,
        input: &[T],
        out: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let (rank, n) = (self.rank, input.len());
        let world = self
            .comm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.0.world_size())
            .unwrap_or(1);
        let slot = n.div_ceil(world);
        let mut padded = vec![T::default(); slot * world];
        for r in 0..world {
            let c = chunk_range(n, world, r);
            padded[r * slot..r * slot + c.len()].copy_from_slice(&input[c]);
        }
        let mut mine = vec![T::default(); slot];
        self.run("reduce_scatter", |comm, stream| {
            let send = stream
                .clone_htod(&padded)
                .map_err(|e| nccl_err("reduce_scatter", rank, e))?;
            let mut recv = stream
                .clone_htod(&mine)
                .map_err(|e| nccl_err("reduce_scatter", rank, e))?;
            comm.reduce_scatter(&send, &mut recv, &Self::nccl_op(op))
                .map_err(|e| nccl_err("reduce_scatter", rank, e))?;
            stream
                .memcpy_dtoh(&recv, &mut mine[..])
                .map_err(|e| nccl_err("reduce_scatter", rank, e))
        })?;
        out.copy_from_slice(&mine[..out.len()]);
        Ok(())
    }

    pub(crate) fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        let rank = self.rank;
        self.run("broadcast", |comm, stream| {
            let mut dev = stream
                .clone_htod(buf)
                .map_err(|e| nccl_err("broadcast", rank, e))?;
            comm.broadcast_in_place(&mut dev, root as i32)
                .map_err(|e| nccl_err("broadcast", rank, e))?;
            stream
                .memcpy_dtoh(&dev, buf)
                .map_err(|e| nccl_err("broadcast", rank, e))
        })
    }

    pub(crate) fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        let mut len = [buf.len() as i64];
        self.broadcast(&mut len, root)?;
        buf.resize(usize::try_from(len[0]).unwrap_or(0), 0);
        if buf.is_empty() {
            return Ok(());
        }
        self.broadcast(buf, root)
    }

    pub(crate) fn barrier(&self) -> Result<()> {
        self.all_reduce(&mut [0u8], ReduceOp::Sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bellows_nccl_path_wins_and_missing_paths_are_skipped() {
        let dir = std::env::temp_dir().join(format!("bellows-nccl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let lib = dir.join("libnccl.so.2");
        std::fs::write(&lib, b"").expect("fake lib");
        let d = dir.display().to_string();
        let found = find_library_with(|k| (k == "BELLOWS_NCCL_PATH").then(|| d.clone()));
        assert_eq!(found, Some(lib.clone()));
        let found =
            find_library_with(|k| (k == "LD_LIBRARY_PATH").then(|| format!("/nonexistent:{d}")));
        assert_eq!(found, Some(lib));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
