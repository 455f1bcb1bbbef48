//! Wall time of the f32 products ([`super::product`]) by shape and layout, kept only when the
//! environment variable `BELLOWS_PRODUCT_STATS` is set (read once): how `bellows bench` shows
//! which products a step spends its time in and at what rate, without a profiler.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// `(nanoseconds, flops, calls)` by `"rows x k x cols lhs-strides rhs-strides"`.
type Table = HashMap<String, (u64, u64, u64)>;

fn table() -> Option<&'static Mutex<Table>> {
    static T: OnceLock<Option<Mutex<Table>>> = OnceLock::new();
    T.get_or_init(|| std::env::var_os("BELLOWS_PRODUCT_STATS").map(|_| Mutex::default()))
        .as_ref()
}

/// The start of a timed product, when stats are kept.
pub(crate) fn start() -> Option<Instant> {
    table().map(|_| Instant::now())
}

/// Records a product started at `t0` (nothing when stats are off).
pub(crate) fn record(
    t0: Option<Instant>,
    (rows, k, cols): (usize, usize, usize),
    strides: ((usize, usize), (usize, usize)),
) {
    let (Some(t0), Some(t)) = (t0, table()) else {
        return;
    };
    let ns = t0.elapsed().as_nanos() as u64;
    let key = format!("{rows}x{k}x{cols} {:?} {:?}", strides.0, strides.1);
    let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
    let e = t.entry(key).or_default();
    e.0 += ns;
    e.1 += (2 * rows * k * cols) as u64;
    e.2 += 1;
}

/// The table so far, slowest total first, one line per shape (`None` when stats are off).
pub fn report() -> Option<String> {
    let t = table()?.lock().unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<_> = t.iter().collect();
    rows.sort_by_key(|(_, v)| std::cmp::Reverse(v.0));
    let total: u64 = rows.iter().map(|(_, v)| v.0).sum();
    let mut out = format!("products: {:.1} ms in all\n", total as f64 / 1e6);
    for (key, (ns, flops, calls)) in rows {
        let rate = *flops as f64 / (*ns).max(1) as f64;
        out.push_str(&format!(
            "{:>9.1} ms {rate:>6.1} GFLOP/s {calls:>6} calls  {key}\n",
            *ns as f64 / 1e6
        ));
    }
    Some(out)
}
