//! NF4 quantization equals bitsandbytes 0.50's (`tests/golden/nf4_quant`, made by `gen.py` /
//! `nf4.py`; see `tests/golden/README.md` §3).
//!
//! Exact: 4-bit packed codes, the block absmax, the double-quant offset, nested absmax, map and
//! 8-bit codes, and the dequantized weights (host and device). The 8-bit codes follow bitsandbytes'
//! CPU lookup table, so they equal bnb's even in the blocks where that table does not round to
//! the strictly nearest entry (`dq.nearest_code`; listed in `case.json`).

use bellows_peft::nf4::{
    double_quantize, dynamic_map, quantize_nf4, Absmax, Nf4Options, NESTED_BLOCK_SIZE, NF4_LEVELS,
};
use bellows_peft::{Nf4Data, Nf4Weight};
use bellows_tests::{golden, read_array};
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Tensor, TensorData};

const WEIGHTS: [&str; 5] = ["w128x64", "w96x40", "w33x70", "w33x71", "w40x96"];

fn file() -> std::path::PathBuf {
    golden("nf4_quant").join("nf4.safetensors")
}

fn f32s(name: &str) -> (Vec<usize>, Vec<f32>) {
    let a = read_array(&file(), name);
    (a.shape, a.values.iter().map(|&v| v as f32).collect())
}

fn u8s(name: &str) -> Vec<u8> {
    read_array(&file(), name)
        .values
        .iter()
        .map(|&v| v as u8)
        .collect()
}

fn case_json() -> serde_json::Value {
    let text = std::fs::read_to_string(golden("nf4_quant").join("case.json")).expect("case.json");
    serde_json::from_str(&text).expect("valid json")
}

fn quantize(name: &str) -> (Nf4Data, Vec<f32>) {
    let (shape, w) = f32s(&format!("{name}.weight"));
    (quantize_nf4(&w, &shape, Nf4Options::default()), w)
}

#[test]
fn code_books_equal_bitsandbytes() {
    assert_eq!(f32s("w128x64.quant_map").1, NF4_LEVELS.to_vec());
    assert_eq!(f32s("dq.nested_quant_map").1, dynamic_map().to_vec());
}

#[test]
fn packed_codes_and_absmax_equal_bitsandbytes_for_widths_multiple_and_not_of_64() {
    for name in WEIGHTS {
        let (q, _) = quantize(name);
        assert_eq!(
            q.packed,
            u8s(&format!("{name}.packed")),
            "{name}: packed codes"
        );
        let Absmax::Double(d) = &q.absmax else {
            panic!("double quant is the default")
        };
        assert_eq!(
            d.codes,
            u8s(&format!("{name}.absmax_code")),
            "{name}: 8-bit absmax codes"
        );
        assert_eq!(
            d.nested_absmax,
            f32s(&format!("{name}.nested_absmax")).1,
            "{name}"
        );
        assert_eq!(
            vec![d.offset],
            f32s(&format!("{name}.offset")).1,
            "{name}: offset"
        );
        assert_eq!(d.block_size, NESTED_BLOCK_SIZE);
        // The scales before double quantization are bnb's `absmax_true` exactly.
        let plain = quantize_nf4(
            &f32s(&format!("{name}.weight")).1,
            &q.shape,
            Nf4Options {
                block_size: 64,
                double_quant: false,
            },
        );
        assert_eq!(plain.packed, q.packed);
        assert_eq!(
            plain.absmax,
            Absmax::Plain(f32s(&format!("{name}.absmax_true")).1),
            "{name}"
        );
    }
}

#[test]
fn dequantized_weights_equal_the_reference_exactly() {
    for name in WEIGHTS {
        let (q, w) = quantize(name);
        let Absmax::Double(d) = &q.absmax else {
            panic!("double quant is the default")
        };
        assert_eq!(
            d.dequantize(),
            f32s(&format!("{name}.absmax_dequant")).1,
            "{name}"
        );
        let expected = f32s(&format!("{name}.dequant")).1;
        assert_eq!(q.dequantize(), expected, "{name}: host dequant");
        // bnb's own CPU dequant agrees except where its documented bug hits (w40x96: K = 96).
        let bnb = f32s(&format!("{name}.dequant_bnb")).1;
        assert_eq!(
            bnb == expected,
            name != "w40x96",
            "{name}: bnb CPU bug as documented"
        );
        // The quantization error is bounded by half the widest NF4 gap times the block absmax.
        let max_err = q
            .dequantize()
            .iter()
            .zip(&w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max_err < 0.05, "{name}: {max_err}");
    }
}

#[test]
fn device_dequantization_is_bit_exact_with_the_host_reference() {
    let dev = Default::default();
    for name in WEIGHTS {
        let (q, _) = quantize(name);
        let expected = f32s(&format!("{name}.dequant")).1;
        let w = Nf4Weight::<Flex>::from_data(&q, &dev);
        let got = w.dequantize().into_data().to_vec::<f32>().expect("f32");
        assert_eq!(got, expected, "{name}: Flex dequant");
        let w = Nf4Weight::<Autodiff<Flex>>::from_data(&q, &dev);
        let got = w.dequantize().into_data().to_vec::<f32>().expect("f32");
        assert_eq!(got, expected, "{name}: Autodiff<Flex> dequant");
        // The device holds what the host data holds, byte for byte.
        assert_eq!(w.storage_bytes(), q.storage_bytes());
    }
}

#[test]
fn eight_bit_absmax_codes_equal_bnb_including_where_bnb_is_not_strictly_nearest() {
    let (_, absmax) = f32s("dq.absmax_true");
    let d = double_quantize(&absmax, NESTED_BLOCK_SIZE);
    assert_eq!(
        vec![d.offset],
        f32s("dq.offset").1,
        "offset = mean of absmax"
    );
    assert_eq!(d.nested_absmax, f32s("dq.nested_absmax").1);
    assert_eq!(
        d.codes,
        u8s("dq.absmax_code"),
        "bitsandbytes' codes, all 2048"
    );
    assert_eq!(d.dequantize(), f32s("dq.absmax_dequant").1);
    // Where they differ from strictly nearest rounding is exactly what case.json lists.
    let nearest = u8s("dq.nearest_code");
    let differ: Vec<(usize, u8, u8)> = (0..nearest.len())
        .filter(|&i| nearest[i] != d.codes[i])
        .map(|i| (i, d.codes[i], nearest[i]))
        .collect();
    let listed: Vec<(usize, u8, u8)> = case_json()["per_weight"]["dq"]
        ["nearest_8bit_absmax_code_mismatches_vs_bnb"]
        .as_array()
        .expect("list")
        .iter()
        .map(|m| {
            let n = |k: &str| m[k].as_u64().expect("integer") as usize;
            (n("block"), n("bnb_code") as u8, n("nearest_code") as u8)
        })
        .collect();
    assert_eq!(differ, listed);
    assert_eq!(listed.len(), 6);
}

#[test]
fn gradients_reach_the_input_through_an_nf4_matmul_and_equal_the_dense_ones() {
    type AB = Autodiff<Flex>;
    let dev = Default::default();
    let (q, _) = quantize("w33x70");
    let w = Nf4Weight::<AB>::from_data(&q, &dev);
    let dense = Tensor::<AB, 2>::from_data(TensorData::new(q.dequantize(), [33, 70]), &dev);
    let xs: Vec<f32> = (0..5 * 70)
        .map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0)
        .collect();
    let x1 = Tensor::<AB, 2>::from_data(TensorData::new(xs.clone(), [5, 70]), &dev).require_grad();
    let x2 = Tensor::<AB, 2>::from_data(TensorData::new(xs, [5, 70]), &dev).require_grad();
    let y1 = w.matmul_t(x1.clone());
    let y2 = x2.clone().matmul(dense.transpose());
    assert_eq!(y1.clone().into_data(), y2.clone().into_data());
    let g1 = y1.powf_scalar(2.0).sum().backward();
    let g2 = y2.powf_scalar(2.0).sum().backward();
    let (g1, g2) = (x1.grad(&g1).expect("grad"), x2.grad(&g2).expect("grad"));
    g1.into_data()
        .assert_approx_eq::<f32>(&g2.into_data(), burn::tensor::Tolerance::absolute(1e-6));
}
