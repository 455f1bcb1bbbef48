//! Sharded matmul / embedding on `world` ranks as threads (an in-memory collective) give, on each
//! rank, exactly the rows of the full gradient summed over ranks, and the forward of the whole
//! weight.

use std::sync::{Arc, Barrier, Mutex};

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Distribution, Int, Tensor, TensorData};

use super::*;

type Ad = Autodiff<Flex>;

/// Shared-memory collectives among threads: each rank posts its buffer, then reads all of them.
struct Threads {
    rank: usize,
    world: usize,
    posted: Arc<Mutex<Vec<Vec<f32>>>>,
    barrier: Arc<Barrier>,
}

impl Threads {
    fn group(world: usize) -> Vec<Threads> {
        let posted = Arc::new(Mutex::new(vec![Vec::new(); world]));
        let barrier = Arc::new(Barrier::new(world));
        (0..world)
            .map(|rank| Threads {
                rank,
                world,
                posted: posted.clone(),
                barrier: barrier.clone(),
            })
            .collect()
    }

    fn exchange(&self, buf: &[f32]) -> Vec<Vec<f32>> {
        self.posted.lock().expect("lock")[self.rank] = buf.to_vec();
        self.barrier.wait();
        let all = self.posted.lock().expect("lock").clone();
        self.barrier.wait();
        all
    }
}

impl Collective for Threads {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_gather(&self, mine: &[f32], all: &mut [f32]) -> Result<(), String> {
        let parts = self.exchange(mine);
        for (r, p) in parts.iter().enumerate() {
            all[r * mine.len()..(r + 1) * mine.len()].copy_from_slice(p);
        }
        Ok(())
    }
    fn all_gather_bytes(&self, mine: &[u8], all: &mut [u8]) -> Result<(), String> {
        let as_f32: Vec<f32> = mine.iter().map(|&b| f32::from(b)).collect();
        let parts = self.exchange(&as_f32);
        for (r, p) in parts.iter().enumerate() {
            for (i, v) in p.iter().enumerate() {
                all[r * mine.len() + i] = *v as u8;
            }
        }
        Ok(())
    }
    fn reduce_scatter_sum(&self, all: &[f32], mine: &mut [f32]) -> Result<(), String> {
        let parts = self.exchange(all);
        let n = mine.len();
        for (i, m) in mine.iter_mut().enumerate() {
            *m = parts.iter().map(|p| p[self.rank * n + i]).sum();
        }
        Ok(())
    }
}

fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32")
}

fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

#[test]
fn shard_rows_split_evenly_with_the_first_ranks_one_larger() {
    assert_eq!(shard_rows(10, 3, 0), 0..4);
    assert_eq!(shard_rows(10, 3, 1), 4..7);
    assert_eq!(shard_rows(10, 3, 2), 7..10);
    assert_eq!(shard_rows(2, 3, 2), 2..2);
}

/// Rank r's input, the full weight and the summed full gradient computed densely on one thread.
fn dense_reference(
    world: usize,
    w: &Tensor<Flex, 2>,
    xs: &[Tensor<Flex, 2>],
) -> (Vec<Vec<f32>>, Vec<f32>) {
    let mut ys = Vec::new();
    let mut gw = vec![0f32; w.dims().iter().product()];
    for x in xs.iter().take(world) {
        let wa = Tensor::<Ad, 2>::from_data(w.to_data(), &Default::default()).require_grad();
        let xa = Tensor::<Ad, 2>::from_data(x.to_data(), &Default::default());
        let y = xa.matmul(wa.clone().transpose());
        ys.push(values(y.clone().inner()));
        let g = y.powi_scalar(2).sum().backward();
        for (acc, v) in gw.iter_mut().zip(values(wa.grad(&g).expect("gradient"))) {
            *acc += v;
        }
    }
    (ys, gw)
}

#[test]
fn sharded_matmul_forward_and_reduced_gradient_match_the_dense_product() {
    for world in [1usize, 2, 3] {
        let dev = Default::default();
        let (out, inp) = (7usize, 5usize);
        let w = Tensor::<Flex, 2>::random([out, inp], Distribution::Normal(0.0, 1.0), &dev);
        let xs: Vec<_> = (0..world)
            .map(|_| Tensor::<Flex, 2>::random([4, inp], Distribution::Normal(0.0, 1.0), &dev))
            .collect();
        let (ys, gw) = dense_reference(world, &w, &xs);
        let handles: Vec<_> = Threads::group(world)
            .into_iter()
            .map(|c| {
                let (w, x) = (w.to_data(), xs[c.rank].to_data());
                std::thread::spawn(move || {
                    let group = ShardGroup::new(Arc::new(c));
                    let dev = Default::default();
                    let full = Tensor::<Ad, 2>::from_data(w, &dev);
                    let sh = group.sharding(out);
                    let shard = group.shard(full).detach().require_grad();
                    let x = Tensor::<Ad, 2>::from_data(x, &dev).require_grad();
                    let y = sharded_matmul_t(x.clone(), shard.clone(), &sh);
                    let g = y.clone().powi_scalar(2).sum().backward();
                    assert!(group.settle().is_none());
                    (
                        sh.my_rows(),
                        values(y.inner()),
                        values(shard.grad(&g).expect("gradient")),
                        x.grad(&g).is_some(),
                    )
                })
            })
            .collect();
        for (rank, h) in handles.into_iter().enumerate() {
            let (rows, y, g, has_dx) = h.join().expect("rank thread");
            close(&y, &ys[rank], &format!("world {world} rank {rank} y"));
            close(
                &g,
                &gw[rows.start * inp..rows.end * inp],
                &format!("world {world} rank {rank} dW"),
            );
            assert!(has_dx);
        }
    }
}

#[test]
fn sharded_embedding_matches_the_dense_lookup_and_gradient() {
    let world = 3;
    let dev = Default::default();
    let (vocab, d) = (11usize, 4usize);
    let table = Tensor::<Flex, 2>::random([vocab, d], Distribution::Normal(0.0, 1.0), &dev);
    let ids: Vec<Vec<i64>> = vec![vec![0, 3, 3, 10], vec![5, 1, 0, 0], vec![9, 9, 2, 7]];
    // Dense: Σ_r d/dW of Σ embedding(ids_r)² · k (k = r + 1 so ranks differ).
    let mut gw = vec![0f32; vocab * d];
    let mut ys = Vec::new();
    for (r, id) in ids.iter().enumerate() {
        let wa = Tensor::<Ad, 2>::from_data(table.to_data(), &dev).require_grad();
        let i = Tensor::<Ad, 2, Int>::from_data(TensorData::new(id.clone(), [1, 4]), &dev);
        let y = burn::tensor::module::embedding(wa.clone(), i);
        ys.push(values(y.clone().inner()));
        let g = y.powi_scalar(2).sum().mul_scalar((r + 1) as f32).backward();
        for (acc, v) in gw.iter_mut().zip(values(wa.grad(&g).expect("gradient"))) {
            *acc += v;
        }
    }
    let handles: Vec<_> = Threads::group(world)
        .into_iter()
        .map(|c| {
            let (w, id) = (table.to_data(), ids[c.rank].clone());
            std::thread::spawn(move || {
                let rank = c.rank;
                let group = ShardGroup::new(Arc::new(c));
                let dev = Default::default();
                let sh = group.sharding(vocab);
                let shard = group
                    .shard(Tensor::<Ad, 2>::from_data(w, &dev))
                    .detach()
                    .require_grad();
                let i = Tensor::<Ad, 2, Int>::from_data(TensorData::new(id, [1, 4]), &dev);
                let y = sharded_embedding(shard.clone(), i, &sh);
                let g = y
                    .clone()
                    .powi_scalar(2)
                    .sum()
                    .mul_scalar((rank + 1) as f32)
                    .backward();
                (
                    sh.my_rows(),
                    values(y.inner()),
                    values(shard.grad(&g).expect("gradient")),
                )
            })
        })
        .collect();
    for (rank, h) in handles.into_iter().enumerate() {
        let (rows, y, g) = h.join().expect("rank thread");
        close(&y, &ys[rank], &format!("rank {rank} lookup"));
        close(
            &g,
            &gw[rows.start * d..rows.end * d],
            &format!("rank {rank} dW"),
        );
    }
}

#[test]
fn a_frozen_shard_gets_no_gradient_but_the_input_does() {
    let group = ShardGroup::new(Arc::new(Threads::group(1).pop().expect("one rank")));
    let dev = Default::default();
    let w = Tensor::<Ad, 2>::random([3, 2], Distribution::Normal(0.0, 1.0), &dev);
    let sh = group.sharding(3);
    let x = Tensor::<Ad, 2>::random([2, 2], Distribution::Normal(0.0, 1.0), &dev).require_grad();
    let y = sharded_matmul_t(x.clone(), w.clone(), &sh);
    let g = y.sum().backward();
    assert!(w.grad(&g).is_none());
    let dx = values(x.grad(&g).expect("gradient"));
    let colsum: Vec<f32> = {
        let wv = values(w.inner());
        (0..2)
            .map(|j| (0..3).map(|i| wv[i * 2 + j]).sum())
            .collect()
    };
    close(&dx, &[colsum.clone(), colsum].concat(), "dx");
}

#[test]
fn nf4_shards_fall_on_block_boundaries_and_gather_back_bit_exactly() {
    use crate::nf4::{quantize_nf4, Nf4Options, Nf4Weight};
    let (out, inp) = (7usize, 128usize);
    let raw: Vec<f32> = (0..out * inp)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
        .collect();
    for double_quant in [true, false] {
        let opts = Nf4Options {
            block_size: 64,
            double_quant,
        };
        let data = quantize_nf4(&raw, &[out, inp], opts);
        let whole = values(Nf4Weight::<Flex>::from_data(&data, &Default::default()).dequantize());
        let handles: Vec<_> = Threads::group(3)
            .into_iter()
            .map(|c| {
                let data = data.clone();
                std::thread::spawn(move || {
                    let group = ShardGroup::new(Arc::new(c));
                    let q = Nf4Weight::<Flex>::from_data(&data, &Default::default());
                    let sh = group.sharding(out);
                    let mine = shard_nf4(&q, sh.my_rows()).expect("128 = 2 blocks per row");
                    assert_eq!(mine.packed.dims()[0], sh.my_rows().len() * inp / 2);
                    values(gather_nf4(&mine, &sh).dequantize())
                })
            })
            .collect();
        for h in handles {
            assert_eq!(
                h.join().expect("rank thread"),
                whole,
                "double_quant {double_quant}"
            );
        }
    }
}
