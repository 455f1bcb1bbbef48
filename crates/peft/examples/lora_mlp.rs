//! LoRA on a model that is not a language model: a small burn MLP built from
//! `bellows_peft::Linear`, its "pretrained" base frozen, and only the adapters trained on a toy
//! regression (y = sin(2·x₀) + x₁·x₂).
//!
//! Run: `cargo run -p bellows-peft --example lora_mlp --release`

use bellows_peft::{InitRng, Linear, LoraInit, Method, PeftConfig, TargetModules};
use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{activation::relu, backend::Backend, Tensor, TensorData};

/// Any burn module can hold adapter-ready linears.
#[derive(Module, Debug)]
struct Mlp<B: Backend> {
    fc1: Linear<B>,
    fc2: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.fc2.forward(relu(self.fc1.forward(x)))
    }
}

type AB = Autodiff<Flex>;

fn data(rng: &mut InitRng, n: usize) -> (Tensor<AB, 2>, Tensor<AB, 2>) {
    let dev = Default::default();
    let x: Tensor<AB, 2> = rng.uniform([n, 4], -1.0, 1.0, &dev);
    let v = x.to_data().to_vec::<f32>().expect("f32");
    let y: Vec<f32> = v
        .chunks_exact(4)
        .map(|r| (2.0 * r[0]).sin() + r[1] * r[2])
        .collect();
    (x, Tensor::from_data(TensorData::new(y, [n, 1]), &dev))
}

fn main() {
    let dev = Default::default();
    let mut rng = InitRng::new(0);
    // The "pretrained" base, then frozen: its weights get no gradients and no optimizer state.
    let base = Mlp::<AB> {
        fc1: Linear::new(4, 64, true, 0.5, &mut rng, &dev),
        fc2: Linear::new(64, 1, true, 0.2, &mut rng, &dev),
    }
    .no_grad();
    let base_fc1 = base.fc1.dense_weight().into_data();

    // Target modules by path, exactly as for a language model.
    let cfg = PeftConfig {
        method: Method::Lora,
        r: 4,
        alpha: 8.0,
        init: LoraInit::Default,
        target_modules: TargetModules::Names(vec!["fc1".into(), "fc2".into()]),
        ..PeftConfig::default()
    };
    let plan = cfg.plan().expect("valid config");
    let attach = |l: Linear<AB>, path: &str, rng: &mut InitRng| match plan.spec_for(path, false) {
        Some(spec) => l.with_lora(&spec, rng),
        None => l,
    };
    let mut model = Mlp {
        fc1: attach(base.fc1, "fc1", &mut rng),
        fc2: attach(base.fc2, "fc2", &mut rng),
    };

    let (x, y) = data(&mut rng, 512);
    let mse = |m: &Mlp<AB>| (m.forward(x.clone()) - y.clone()).powf_scalar(2.0).mean();
    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.0)
        .init::<AB, Mlp<AB>>();
    let first = mse(&model).into_scalar();
    for step in 0..=300 {
        let loss = mse(&model);
        if step % 100 == 0 {
            println!("step {step:3}  mse {:.4}", loss.clone().into_scalar());
        }
        let grads = loss.backward();
        assert!(
            model
                .fc1
                .weight
                .as_ref()
                .and_then(|w| w.grad(&grads))
                .is_none(),
            "the base is frozen"
        );
        let grads = GradientsParams::from_grads(grads, &model);
        model = optim.step(1e-2, model, grads);
    }
    let last = mse(&model).into_scalar();
    println!("mse {first:.4} -> {last:.4}, trained only the adapters");
    assert!(last < first * 0.5, "the adapters learned the task");
    assert_eq!(
        model.fc1.dense_weight().into_data(),
        base_fc1,
        "base weights unchanged"
    );

    // For deployment, fold the adapters into the weights: same outputs, plain linears.
    let inference = model.valid();
    let merged = inference.clone();
    let merged = Mlp {
        fc1: merged.fc1.merge(),
        fc2: merged.fc2.merge(),
    };
    let xi = x.clone().inner();
    let (a, b) = (inference.forward(xi.clone()), merged.forward(xi));
    let diff = (a - b).abs().max().into_scalar();
    println!("max |adapted - merged| = {diff:e}");
    assert!(diff < 1e-4, "merged model computes the same function");
}
