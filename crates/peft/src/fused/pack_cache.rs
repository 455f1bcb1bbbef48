//! Packed bf16 operands kept for the next product that reads the same view: a frozen weight
//! is packed once, not twice per step, and a layer input that feeds several projections
//! (q, k, v and their adapters) is packed once for all of them.
//!
//! Sound because each kept entry holds its operand's storage (`Owner`, the tensor's shared
//! buffer): while the entry lives, that memory can be neither freed (so its address cannot
//! name another operand) nor written (Flex tensors are copy-on-write: an op writes in place
//! only into storage nobody else holds). An entry whose storage nobody else holds any more
//! is dropped at the next insertion; the kept packs stay within a budget (`budget()`:
//! 512 MiB, `BELLOWS_PACK_CACHE_MIB` to change it, `0` to keep none), and a pack that does
//! not fit is not kept (no eviction of live entries: where a step reads more than the budget
//! holds, evicting would only churn). Keeping an activation's storage also means Flex copies where it might otherwise
//! have written that storage in place, so a run at the edge of the machine's memory may want
//! `BELLOWS_PACK_CACHE_MIB=0`.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// What owns an operand's storage: the tensor's shared buffer.
pub type Owner = Arc<dyn Any + Send + Sync>;

/// MiB of packed operands kept at most unless `BELLOWS_PACK_CACHE_MIB` says otherwise (the
/// small Llama of the benchmarks keeps ~110–140 MiB: its frozen weights in their two
/// packings, plus one step's layer inputs).
const DEFAULT_MIB: usize = 512;

/// Bytes of packed operands kept at most: `BELLOWS_PACK_CACHE_MIB` (`0` keeps none — for a
/// run at the edge of the machine's memory), [`DEFAULT_MIB`] when unset; read once. A value
/// that is not a whole number of MiB is reported on stderr and the default used.
fn budget() -> usize {
    static BUDGET: OnceLock<usize> = OnceLock::new();
    *BUDGET
        .get_or_init(|| budget_from(std::env::var("BELLOWS_PACK_CACHE_MIB").ok().as_deref()) << 20)
}

/// The budget in MiB for the variable's value.
fn budget_from(value: Option<&str>) -> usize {
    match value.map(|v| v.trim().parse::<usize>()) {
        None => DEFAULT_MIB,
        Some(Ok(mib)) => mib,
        Some(Err(_)) => {
            eprintln!(
                "bellows: BELLOWS_PACK_CACHE_MIB={:?} is not a whole number of MiB; keeping up to {DEFAULT_MIB} MiB of packed operands",
                value.unwrap_or_default()
            );
            DEFAULT_MIB
        }
    }
}

/// A packed view: where its elements are and how they are read and packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// Address and length of the view's slice.
    pub addr: usize,
    pub len: usize,
    /// The element type (f32 and bf16 pack differently).
    pub elem: TypeId,
    /// (row, column) strides, rows, `k`.
    pub strides: (usize, usize),
    pub rows: usize,
    pub k: usize,
    /// How the view is packed.
    pub layout: Layout,
}

/// How a view is packed for a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Panels of `width` rows, consecutive-`k` pairs interleaved (`[panel][k / 2][width]`),
    /// with `k / 2` padded to a multiple of `pairs` and the panels to a multiple of `panels`.
    Panels {
        /// Rows per panel.
        width: usize,
        /// Multiple the pairs per panel are padded to.
        pairs: usize,
        /// Multiple the panel count is padded to.
        panels: usize,
    },
    /// AMX left-side tiles (`super::amx::pack_rows`).
    RowTiles,
}

struct Entry {
    key: Key,
    owner: Owner,
    packed: Arc<Vec<u32>>,
}

struct Kept {
    entries: Vec<Entry>,
    bytes: usize,
}

static KEPT: Mutex<Kept> = Mutex::new(Kept {
    entries: Vec::new(),
    bytes: 0,
});

fn kept() -> std::sync::MutexGuard<'static, Kept> {
    // A panic elsewhere while holding the lock leaves the entries consistent.
    KEPT.lock().unwrap_or_else(|e| e.into_inner())
}

/// The same storage: the owners' data pointers (not their vtables) are equal.
fn same(a: &Owner, b: &Owner) -> bool {
    std::ptr::eq(Arc::as_ptr(a).cast::<()>(), Arc::as_ptr(b).cast::<()>())
}

fn bytes(p: &[u32]) -> usize {
    std::mem::size_of_val(p)
}

/// The packed form of `key`'s view of `owner`'s storage: kept from an earlier product, or
/// made by `pack` and kept.
pub fn packed(key: Key, owner: &Owner, pack: impl FnOnce() -> Vec<u32>) -> Arc<Vec<u32>> {
    {
        let k = kept();
        if let Some(e) = k
            .entries
            .iter()
            .find(|e| e.key == key && same(&e.owner, owner))
        {
            return Arc::clone(&e.packed);
        }
    }
    let p = Arc::new(pack());
    insert(key, owner, Arc::clone(&p));
    p
}

fn insert(key: Key, owner: &Owner, packed: Arc<Vec<u32>>) {
    let size = bytes(&packed);
    let budget = budget();
    if size > budget {
        return;
    }
    let mut k = kept();
    // Storage only this cache's entries still hold belongs to a dropped tensor.
    let mut held: HashMap<*const (), usize> = HashMap::new();
    for e in &k.entries {
        *held.entry(Arc::as_ptr(&e.owner).cast()).or_default() += 1;
    }
    k.entries
        .retain(|e| Arc::strong_count(&e.owner) > held[&Arc::as_ptr(&e.owner).cast()]);
    k.bytes = k.entries.iter().map(|e| bytes(&e.packed)).sum();
    // Full: the new pack is not kept (evicting a live entry to make room would only churn when
    // a step reads more than the budget holds — each pack evicted before its next use).
    if k.bytes + size > budget {
        return;
    }
    if k.entries
        .iter()
        .any(|e| e.key == key && same(&e.owner, owner))
    {
        return;
    }
    k.bytes += size;
    k.entries.push(Entry {
        key,
        owner: Arc::clone(owner),
        packed,
    });
}

#[cfg(test)]
mod tests {
    use std::any::TypeId;
    use std::sync::Arc;

    use super::{budget_from, packed, Key, Layout, Owner, DEFAULT_MIB};

    #[test]
    fn the_budget_variable_is_read_as_whole_mib() {
        assert_eq!(budget_from(None), DEFAULT_MIB);
        assert_eq!(budget_from(Some("0")), 0);
        assert_eq!(budget_from(Some(" 64 ")), 64);
        assert_eq!(budget_from(Some("lots")), DEFAULT_MIB);
        assert_eq!(budget_from(Some("-1")), DEFAULT_MIB);
    }

    fn key(v: &[f32]) -> Key {
        Key {
            addr: v.as_ptr() as usize,
            len: v.len(),
            elem: TypeId::of::<f32>(),
            strides: (1, 1),
            rows: 1,
            k: v.len(),
            layout: Layout::Panels {
                width: 12,
                pairs: 1,
                panels: 1,
            },
        }
    }

    /// Kept while the storage lives, packed again for another view or storage, dropped with
    /// the storage.
    #[test]
    fn packs_are_reused_while_their_storage_lives() {
        let data: Arc<Vec<f32>> = Arc::new(vec![1.0; 64]);
        let owner: Owner = data.clone();
        let made = std::cell::Cell::new(0);
        let get = |k: Key, o: &Owner| {
            packed(k, o, || {
                made.set(made.get() + 1);
                vec![7; 16]
            })
        };
        let a = get(key(&data), &owner);
        let b = get(key(&data), &owner);
        assert!(Arc::ptr_eq(&a, &b));
        // Another view of the same storage, and the same view claimed by another owner.
        get(key(&data[..32]), &owner);
        let other: Owner = Arc::new(0u8);
        get(key(&data), &other);
        assert_eq!(made.get(), 3);
        // Once only the cache holds the storage, the next insertion drops its entries (and
        // with them the storage).
        let gone = Arc::downgrade(&data);
        drop((owner, a, b));
        drop(data);
        assert!(gone.upgrade().is_some(), "kept while its packs are");
        let fresh: Arc<Vec<f32>> = Arc::new(vec![2.0; 8]);
        let fresh_owner: Owner = fresh.clone();
        get(key(&fresh), &fresh_owner);
        assert_eq!(made.get(), 4);
        let again: Owner = fresh.clone();
        get(key(&fresh), &again);
        assert_eq!(
            made.get(),
            4,
            "the same storage through another handle is the same owner"
        );
        assert!(gone.upgrade().is_none(), "dropped with its storage");
    }
}
