//! A `Linear` with a frozen NF4 base (QLoRA): the base gets no gradient, the adapter and the input
//! do; the forward equals a dense layer holding the dequantized weight; merging works and the
//! quantized base comes back exactly.

use bellows_peft::{InitRng, Linear, LoraInit, LoraSpec, Nf4Options};
use burn::backend::{Autodiff, Flex};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, Tensor, Tolerance};

type AB = Autodiff<Flex>;

fn spec(dora: bool) -> LoraSpec {
    LoraSpec {
        r: 4,
        alpha: 8.0,
        scale: 2.0,
        dropout: 0.0,
        dora,
        init: LoraInit::Gaussian,
    }
}

/// A quantized layer with a non-zero B, so the adapter changes the output.
fn layer<B: Backend>(dora: bool, rng: &mut InitRng) -> Linear<B> {
    let dev = Default::default();
    let mut l = Linear::<B>::new(70, 33, true, 0.5, rng, &dev)
        .quantize(Nf4Options::default())
        .with_lora(&spec(dora), rng);
    let lora = l.lora.as_mut().expect("attached");
    lora.lora_b = Param::from_tensor(rng.normal([33, 4], 0.0, 0.3, &dev));
    l
}

#[derive(Default)]
struct Paths(Vec<String>, Vec<String>);
impl<B: Backend> ModuleVisitor<B> for Paths {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.1.push(name.into());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.1.pop();
    }
    fn visit_float<const D: usize>(&mut self, _: &Param<Tensor<B, D>>) {
        self.0.push(self.1.join("."));
    }
}

#[test]
fn the_quantized_base_is_not_a_parameter_and_only_bias_and_adapter_are() {
    let l = layer::<Flex>(false, &mut InitRng::new(1));
    assert!(l.is_quantized() && l.weight.is_none());
    let mut p = Paths::default();
    l.visit(&mut p);
    assert_eq!(p.0, ["bias", "lora.lora_a", "lora.lora_b"]);
    assert_eq!((l.d_in(), l.d_out()), (70, 33));
}

#[test]
fn forward_equals_a_dense_layer_with_the_dequantized_weight() {
    let mut rng = InitRng::new(2);
    let q = layer::<Flex>(true, &mut rng);
    let mut dense = Linear::from_weight(q.dense_weight(), q.bias.as_ref().map(|b| b.val()));
    dense.lora = q.lora.clone();
    let x = rng.normal::<Flex, 3>([2, 3, 70], 0.0, 1.0, &Default::default());
    q.forward(x.clone())
        .into_data()
        .assert_approx_eq::<f32>(&dense.forward(x).into_data(), Tolerance::absolute(1e-5));
}

#[test]
fn gradients_reach_the_input_and_the_adapter_and_match_the_dense_layer() {
    let mut rng = InitRng::new(3);
    for dora in [false, true] {
        let q = layer::<AB>(dora, &mut rng);
        let mut dense = Linear::from_weight(q.dense_weight(), q.bias.as_ref().map(|b| b.val()));
        dense.weight = dense.weight.map(|w| w.set_require_grad(false));
        dense.lora = q.lora.clone();
        let dev = Default::default();
        let x = rng.normal::<AB, 2>([5, 70], 0.0, 1.0, &dev).require_grad();
        let gq = q.forward(x.clone()).powf_scalar(2.0).sum().backward();
        let gd = dense.forward(x.clone()).powf_scalar(2.0).sum().backward();
        let (lq, ld) = (q.lora.as_ref().expect("a"), dense.lora.as_ref().expect("a"));
        let close = |a: Option<Tensor<Flex, 2>>, b: Option<Tensor<Flex, 2>>| {
            a.expect("grad")
                .into_data()
                .assert_approx_eq::<f32>(&b.expect("grad").into_data(), Tolerance::absolute(1e-4));
        };
        close(x.grad(&gq), x.grad(&gd));
        close(lq.lora_a.grad(&gq), ld.lora_a.grad(&gd));
        close(lq.lora_b.grad(&gq), ld.lora_b.grad(&gd));
    }
}

#[test]
fn merge_makes_a_dense_layer_and_unmerge_restores_the_quantized_base_exactly() {
    let mut rng = InitRng::new(4);
    let l = layer::<Flex>(false, &mut rng);
    let base = l.dense_weight().into_data();
    let x = rng.normal::<Flex, 2>([3, 70], 0.0, 1.0, &Default::default());
    let y = l.forward(x.clone()).into_data();
    let merged = l.clone().merge_in_place();
    assert!(merged.merged && merged.weight.is_some() && merged.is_quantized());
    merged
        .forward(x.clone())
        .into_data()
        .assert_approx_eq::<f32>(&y, Tolerance::absolute(1e-5));
    let restored = merged.unmerge();
    assert!(restored.weight.is_none() && !restored.merged);
    assert_eq!(restored.dense_weight().into_data(), base);
    let unloaded = l.merge();
    assert!(!unloaded.is_quantized() && unloaded.lora.is_none());
    unloaded
        .forward(x)
        .into_data()
        .assert_approx_eq::<f32>(&y, Tolerance::absolute(1e-5));
}
