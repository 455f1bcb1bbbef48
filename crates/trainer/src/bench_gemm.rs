//! `bellows bench --mode gemm`: the backend's matrix-product rate on the products of the small
//! Llama's LoRA training step and on a square 2048³ product — the ceiling the training step is
//! measured against (issue 11). `benches/peer/torch_lora_bench.py --mode gemm` times
//! `torch.matmul` on the same list, so the two print comparable lines.

use std::time::Instant;

use burn::tensor::{backend::Backend, DType, Distribution, Tensor};
use serde::Serialize;

/// One timed product `[batch ×] [m, k] · [k, n]` (the right side stored `[n, k]` and transposed
/// when `rhs_t`, as a linear layer's weight is).
#[derive(Debug, Clone, Copy)]
pub struct GemmCase {
    /// Name shared with the peer script.
    pub name: &'static str,
    /// Independent products (attention heads × batch), 1 for a plain product.
    pub batch: usize,
    /// Rows of the left side.
    pub m: usize,
    /// The summed dimension.
    pub k: usize,
    /// Columns of the result.
    pub n: usize,
    /// The right side is stored `[n, k]` and transposed (`x · Wᵀ`).
    pub rhs_t: bool,
}

/// The products of one LoRA training step of the small Llama (batch 4 × seq 256 = 1024 tokens,
/// hidden 512, intermediate 1376, 8 heads of 64 over 4 kv heads, vocab 8192, LoRA r 16), plus the
/// square product the issue quotes. Keep in step with the peer script's `GEMM_CASES`.
pub const GEMM_CASES: &[GemmCase] = &[
    GemmCase {
        name: "square-2048",
        batch: 1,
        m: 2048,
        k: 2048,
        n: 2048,
        rhs_t: false,
    },
    GemmCase {
        name: "q-proj",
        batch: 1,
        m: 1024,
        k: 512,
        n: 512,
        rhs_t: true,
    },
    GemmCase {
        name: "kv-proj",
        batch: 1,
        m: 1024,
        k: 512,
        n: 256,
        rhs_t: true,
    },
    GemmCase {
        name: "up-proj",
        batch: 1,
        m: 1024,
        k: 512,
        n: 1376,
        rhs_t: true,
    },
    GemmCase {
        name: "down-proj",
        batch: 1,
        m: 1024,
        k: 1376,
        n: 512,
        rhs_t: true,
    },
    GemmCase {
        name: "lm-head",
        batch: 1,
        m: 1024,
        k: 512,
        n: 8192,
        rhs_t: true,
    },
    GemmCase {
        name: "up-proj-dx",
        batch: 1,
        m: 1024,
        k: 1376,
        n: 512,
        rhs_t: false,
    },
    GemmCase {
        name: "lm-head-dx",
        batch: 1,
        m: 1024,
        k: 8192,
        n: 512,
        rhs_t: false,
    },
    GemmCase {
        name: "lora-a",
        batch: 1,
        m: 1024,
        k: 512,
        n: 16,
        rhs_t: true,
    },
    GemmCase {
        name: "lora-b",
        batch: 1,
        m: 1024,
        k: 16,
        n: 512,
        rhs_t: true,
    },
    GemmCase {
        name: "attn-scores",
        batch: 32,
        m: 256,
        k: 64,
        n: 256,
        rhs_t: true,
    },
    GemmCase {
        name: "attn-values",
        batch: 32,
        m: 256,
        k: 256,
        n: 64,
        rhs_t: false,
    },
];

/// One line of `bellows bench --mode gemm`.
#[derive(Debug, Clone, Serialize)]
pub struct GemmReport {
    /// Always `"gemm"`.
    pub mode: &'static str,
    /// The case's name.
    pub case: &'static str,
    /// `"f32"`, `"bf16"` or `"f16"`.
    pub dtype: &'static str,
    /// `"backend"`: the backend's `matmul`; `"fused"`: the CPU kernels the fused training ops
    /// call (`bellows_peft::fused::product` in f32, `product_bf16` in bf16).
    pub kernel: &'static str,
    /// `[batch, m, k, n]`.
    pub shape: [usize; 4],
    /// Mean GFLOP/s over the timed repetitions (2·batch·m·k·n per product).
    pub gflops_per_sec: f64,
    /// GFLOP/s of the fastest repetition.
    pub gflops_per_sec_best: f64,
    /// Timed repetitions.
    pub reps: usize,
    /// Threads of the compute pool.
    pub threads: usize,
}

/// Times every case of [`GEMM_CASES`] in `dtype`: two untimed products, then
/// repetitions until ~0.3 s (at least 3) have passed.
pub fn run_gemm_bench<B: Backend>(dtype: DType, device: &B::Device) -> Vec<GemmReport> {
    GEMM_CASES
        .iter()
        .map(|c| {
            let dist = Distribution::Normal(0.0, 1.0);
            let a = Tensor::<B, 3>::random([c.batch, c.m, c.k], dist, device).cast(dtype);
            let b_dims = if c.rhs_t {
                [c.batch, c.n, c.k]
            } else {
                [c.batch, c.k, c.n]
            };
            let b = Tensor::<B, 3>::random(b_dims, dist, device).cast(dtype);
            let product = || {
                let b = if c.rhs_t {
                    b.clone().swap_dims(1, 2)
                } else {
                    b.clone()
                };
                let y = if c.batch == 1 {
                    let a2: Tensor<B, 2> = a.clone().squeeze_dim(0);
                    let b2: Tensor<B, 2> = b.squeeze_dim(0);
                    a2.matmul(b2).unsqueeze_dim(0)
                } else {
                    a.clone().matmul(b)
                };
                B::sync(device).ok();
                y
            };
            report(c, dtype, "backend", || drop(product()))
        })
        .collect()
}

/// Times every case of [`GEMM_CASES`] on the fused ops' CPU kernels (f32 `gemm` or the bf16
/// dot-product kernel), the operands read in place as the fused ops read them. `None` for a
/// dtype they do not run (f16).
pub fn run_fused_gemm_bench(dtype: DType) -> Option<Vec<GemmReport>> {
    use bellows_peft::fused::{product, product_bf16};
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return None;
    }
    let values =
        |n: usize| -> Vec<f32> { (0..n).map(|i| ((i % 97) as f32 - 48.0) / 61.0).collect() };
    Some(
        GEMM_CASES
            .iter()
            .map(|c| {
                let (a, b) = (values(c.batch * c.m * c.k), values(c.batch * c.k * c.n));
                let rhs_strides = if c.rhs_t { (1, c.k) } else { (c.n, 1) };
                let dims = (c.m, c.k, c.n);
                let one = |i: usize| {
                    let (a, b) = (&a[i * c.m * c.k..], &b[i * c.k * c.n..]);
                    if dtype == DType::BF16 {
                        product_bf16(a, (c.k, 1), b, rhs_strides, dims)
                    } else {
                        product(a, (c.k, 1), b, rhs_strides, dims)
                    }
                };
                report(c, dtype, "fused", || {
                    // Batched cases run one task per product, as the fused attention does.
                    use rayon::prelude::*;
                    if c.batch == 1 {
                        drop(one(0));
                    } else {
                        (0..c.batch).into_par_iter().for_each(|i| drop(one(i)));
                    }
                })
            })
            .collect(),
    )
}

/// Two untimed runs of `product`, then repetitions until ~0.3 s (at least 3) have passed.
fn report(
    c: &GemmCase,
    dtype: DType,
    kernel: &'static str,
    mut product: impl FnMut(),
) -> GemmReport {
    for _ in 0..2 {
        product();
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || start.elapsed().as_secs_f64() < 0.3 {
        let t = Instant::now();
        product();
        times.push(t.elapsed().as_secs_f64());
    }
    let flop = 2.0 * (c.batch * c.m * c.k * c.n) as f64;
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    GemmReport {
        mode: "gemm",
        case: c.name,
        dtype: match dtype {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            _ => "f32",
        },
        kernel,
        shape: [c.batch, c.m, c.k, c.n],
        gflops_per_sec: flop / mean / 1e9,
        gflops_per_sec_best: flop / best / 1e9,
        reps: times.len(),
        threads: rayon::current_num_threads(),
    }
}
