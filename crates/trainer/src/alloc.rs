//! Allocator tuning for the training loop (issue 11).
//!
//! A training step allocates and frees hundreds of MiB of tensors. glibc serves every block
//! above its mmap threshold (128 KiB, raised as blocks are freed) from fresh pages and unmaps it
//! on free, so each step pays page faults and kernel page zeroing for the same memory again
//! (measured on the small LoRA step: ~42 000 faults per step, a fifth of the samples in the
//! profile). Serving every block from the heap and never trimming it lets the allocator reuse
//! the memory: no page faults per step after the first, +3–7 % tokens/s, and 14 MiB less peak
//! memory (docs/BENCHMARKS.md).

/// Makes glibc's `malloc` keep freed memory for reuse: every block comes from the heap (no
/// `mmap` per block) and the heap is not trimmed. Call once, early (the `bellows` binary does).
/// The peak resident memory stays what the step needs, but freed memory is not returned to the
/// system until exit. A no-op on other platforms and C libraries.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: `mallopt` only changes allocator parameters; glibc applies them under its lock.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_MMAP_MAX, 0);
    }
}
