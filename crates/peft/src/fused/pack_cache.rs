//! Packed bf16 operands kept for the next product that reads the same view: a frozen weight
//! is packed once, not twice per step, and a layer input that feeds several projections
//! (q, k, v and their adapters) is packed once for all of them.
//!
//! Sound because each kept entry holds its operand's storage (`Owner`, the tensor's shared
//! buffer): while the entry lives, that memory can be neither freed (so its address cannot
//! name another operand) nor written (Flex tensors are copy-on-write: an op writes in place
//! only into storage nobody else holds). An entry whose storage nobody else holds any more
//! is dropped at the next insertion; the kept packs stay within [`BUDGET`] bytes, least
//! recently used first out.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What owns an operand's storage: the tensor's shared buffer.
pub type Owner = Arc<dyn Any + Send + Sync>;

/// Bytes of packed operands kept at most (the small Llama of the benchmarks keeps ~110 MiB:
/// its frozen weights in their two packings, plus one step's layer inputs).
const BUDGET: usize = 512 << 20;

/// A packed view: where its elements are and how they are read and packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// Address and length of the view's slice.
    pub addr: usize,
    pub len: usize,
    /// The element type (f32 and bf16 pack differently).
    pub elem: TypeId,
    /// (row, column) strides, rows, `k`, panel width.
    pub strides: (usize, usize),
    pub rows: usize,
    pub k: usize,
    pub width: usize,
}

struct Entry {
    key: Key,
    owner: Owner,
    packed: Arc<Vec<u32>>,
    used: u64,
}

struct Kept {
    entries: Vec<Entry>,
    bytes: usize,
    clock: u64,
}

static KEPT: Mutex<Kept> = Mutex::new(Kept {
    entries: Vec::new(),
    bytes: 0,
    clock: 0,
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
        let mut k = kept();
        k.clock += 1;
        let now = k.clock;
        if let Some(e) = k
            .entries
            .iter_mut()
            .find(|e| e.key == key && same(&e.owner, owner))
        {
            e.used = now;
            return Arc::clone(&e.packed);
        }
    }
    let p = Arc::new(pack());
    insert(key, owner, Arc::clone(&p));
    p
}

fn insert(key: Key, owner: &Owner, packed: Arc<Vec<u32>>) {
    let size = bytes(&packed);
    if size > BUDGET {
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
    while k.bytes + size > BUDGET {
        let Some(oldest) = (0..k.entries.len()).min_by_key(|&i| k.entries[i].used) else {
            break;
        };
        let e = k.entries.swap_remove(oldest);
        k.bytes -= bytes(&e.packed);
    }
    if k.entries
        .iter()
        .any(|e| e.key == key && same(&e.owner, owner))
    {
        return;
    }
    let used = k.clock;
    k.bytes += size;
    k.entries.push(Entry {
        key,
        owner: Arc::clone(owner),
        packed,
        used,
    });
}

#[cfg(test)]
mod tests {
    use std::any::TypeId;
    use std::sync::Arc;

    use super::{packed, Key, Owner};

    fn key(v: &[f32]) -> Key {
        Key {
            addr: v.as_ptr() as usize,
            len: v.len(),
            elem: TypeId::of::<f32>(),
            strides: (1, 1),
            rows: 1,
            k: v.len(),
            width: 12,
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
