//! Target `loader_state`: a checkpoint's `loader-rank-<r>.json` (the data loader's resume cursor)
//! through JSON decoding and [`TokenLoader::resume`] over a small fixed dataset, then a few batches;
//! and, as the state of a one-rank job, through [`bellows_data::reshard`] onto two ranks.

use std::path::{Path, PathBuf};

use bellows_data::{
    DataConfig, Files, LoaderSpec, LoaderState, Packing, Split, TokenLoader, Truncation,
};

/// Rows per file of the fixed dataset (3 files, so 3 chunks).
const ROWS: usize = 20;

fn dataset(scratch: &Path) -> Vec<String> {
    (0..3)
        .map(|f| {
            let p: PathBuf = scratch.join(format!("data-{f}.jsonl"));
            if !p.is_file() {
                let text: String = (0..ROWS)
                    .map(|r| {
                        let len = 1 + (r * 5 + f) % 13;
                        let ids: Vec<String> =
                            (0..len).map(|j| ((r + j + f) % 30).to_string()).collect();
                        format!("{{\"input_ids\": [{}]}}\n", ids.join(","))
                    })
                    .collect();
                std::fs::write(&p, text).expect("write fuzz dataset");
            }
            p.display().to_string()
        })
        .collect()
}

/// Runs one input. Property: a state that does not fit the data is an error, never a panic, and
/// a loader that resumed yields batches of the configured shape.
pub fn run(data: &[u8], scratch: &Path) {
    let Ok(state) = serde_json::from_slice::<LoaderState>(data) else {
        return;
    };
    let mut cfg = DataConfig::new(Files::Many(dataset(scratch)));
    cfg.seq_len = 8;
    cfg.batch_size = 2;
    cfg.shuffle_buffer = 4;
    // Both ways a document can be carried across rows, chosen by the input's length.
    if data.len().is_multiple_of(2) {
        cfg.packing = Packing::Pack;
    } else {
        cfg.truncation = Truncation::Split;
    }
    let shard = if (1..=4).contains(&state.shard.world) && state.shard.rank < state.shard.world {
        state.shard
    } else {
        bellows_data::Shard::single()
    };
    let spec = LoaderSpec {
        split: if state.split == Split::Eval {
            Split::Eval
        } else {
            Split::Train
        },
        shard,
        seed: 7,
        vocab_size: 32,
    };
    if spec.split == Split::Eval {
        cfg.eval = Some(cfg.train.clone());
    }
    if let Ok(loader) = TokenLoader::resume(&cfg, spec, &state) {
        take_a_few(loader, &cfg);
    }
    // The same state as the only rank of a job, resharded onto two ranks (elastic resume).
    if spec.split == Split::Train {
        let two = LoaderSpec {
            shard: bellows_data::Shard { rank: 1, world: 2 },
            ..spec
        };
        if let Ok(s) = bellows_data::reshard(&cfg, two, std::slice::from_ref(&state)) {
            if let Ok(loader) = TokenLoader::resume(&cfg, two, &s) {
                take_a_few(loader, &cfg);
            }
        }
    }
}

fn take_a_few(mut loader: TokenLoader, cfg: &DataConfig) {
    for _ in 0..3 {
        match loader.next_batch() {
            Ok(Some(b)) => assert!(b.label_tokens() <= cfg.batch_size * cfg.seq_len),
            Ok(None) | Err(_) => break,
        }
    }
}
