//! The `float32` mean of the block scales, summed in exactly the order of PyTorch's CPU
//! `cascade_sum` (aten/src/ATen/native/cpu/SumKernel.cpp), which bitsandbytes' `absmax.mean()`
//! runs. A plain or `f64` sum differs in the last bit for some tensors, and the offset then
//! shifts every double-quantized scale.

/// Lanes of torch's `Vectorized<float>` in its reduction kernels (8, also on AVX-512 machines:
/// checked against `torch.sum` for lengths 1 to 40 000 on the golden files' machine).
const LANES: usize = 8;
/// torch's instruction-level parallelism factor in `row_sum`.
const ILP: usize = 4;
/// torch's number of cascade levels in `multi_row_sum`.
const LEVELS: usize = 4;

fn add(acc: &mut [f32], x: &[f32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += *b;
    }
}

fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

/// torch's `multi_row_sum` with `ILP` rows: element `(i, k)` is `elem(i·ILP + k)`, a vector of
/// `width` lanes; partial sums cascade through `LEVELS` accumulators.
fn multi_row_sum(elem: &dyn Fn(usize) -> Vec<f32>, width: usize, size: usize) -> Vec<Vec<f32>> {
    let level_power = 4.max(ceil_log2(size) / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = vec![vec![vec![0f32; width]; ILP]; LEVELS];
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add(a, &elem(i * ILP + k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (lo, up) in lower[j - 1].iter_mut().zip(upper[0].iter_mut()) {
                add(up, lo);
                lo.fill(0.0);
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    for i in i..size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add(a, &elem(i * ILP + k));
        }
    }
    let mut out = acc.swap_remove(0);
    for level in &acc {
        for (o, a) in out.iter_mut().zip(level) {
            add(o, a);
        }
    }
    out
}

/// torch's `row_sum`: `size` elements of `width` lanes.
fn row_sum(elem: &dyn Fn(usize) -> Vec<f32>, width: usize, size: usize) -> Vec<f32> {
    let size_ilp = size / ILP;
    let mut partial = multi_row_sum(elem, width, size_ilp);
    for i in size_ilp * ILP..size {
        add(&mut partial[0], &elem(i));
    }
    let (first, rest) = partial.split_at_mut(1);
    for p in rest.iter() {
        add(&mut first[0], p);
    }
    partial.swap_remove(0)
}

/// `torch.sum` of a contiguous `float32` vector on one CPU thread.
pub(crate) fn torch_sum(v: &[f32]) -> f32 {
    let n = v.len();
    if n < LANES {
        return row_sum(&|i| vec![v[i]], 1, n)[0];
    }
    let vecs = n / LANES;
    let lanes = row_sum(&|i| v[i * LANES..(i + 1) * LANES].to_vec(), LANES, vecs);
    let mut total = 0f32;
    for x in &v[vecs * LANES..] {
        total += x;
    }
    for x in lanes {
        total += x;
    }
    total
}

/// `torch.mean` of a contiguous `float32` vector on CPU: the sum above divided by the count.
pub(crate) fn torch_mean(v: &[f32]) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    #[allow(clippy::cast_precision_loss)]
    let n = v.len() as f32;
    torch_sum(v) / n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_small_integers_exactly_for_every_path() {
        for n in [0usize, 1, 7, 16, 37, 64, 100, 1000, 70_000] {
            let v: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
            let exact: usize = (0..n).map(|i| i % 7).sum();
            assert_eq!(torch_sum(&v), exact as f32, "n = {n}");
        }
    }
}
