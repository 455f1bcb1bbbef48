//! The `[data]` section as users write it in a job TOML.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use bellows_data::{Content, DataConfig, Files, OnError, Packing, Shuffle, TokenRef, Truncation};
use serde::Deserialize;

#[derive(Deserialize)]
struct Job {
    data: DataConfig,
}

#[test]
fn every_key_parses_from_toml() {
    let job: Job = toml::from_str(
        r#"
        [data]
        train = ["data/train-*.parquet", "extra.jsonl"]
        eval = "data/eval.parquet"
        content = "prompt_completion"
        tokenizer = "tok/tokenizer.json"
        seq_len = 512
        batch_size = 4
        packing = "pack"
        truncation = "split"
        on_error = "skip"
        shuffle = "off"
        shuffle_buffer = 0
        pad_token_id = 2
        add_eos = true
        eos_token = "</s>"
        [data.columns]
        prompt = "question"
        completion = "answer"
        "#,
    )
    .unwrap();
    let d = job.data;
    assert_eq!(d.train.patterns(), ["data/train-*.parquet", "extra.jsonl"]);
    assert_eq!(d.eval, Some(Files::One("data/eval.parquet".into())));
    assert_eq!(d.content, Content::PromptCompletion);
    assert_eq!((d.seq_len, d.batch_size), (512, 4));
    assert_eq!(d.packing, Packing::Pack);
    assert_eq!(d.truncation, Truncation::Split);
    assert_eq!(d.on_error, OnError::Skip);
    assert_eq!(d.shuffle, Shuffle::Off);
    assert_eq!(d.eos_token, Some(TokenRef::Token("</s>".into())));
    assert_eq!(d.columns.prompt, "question");
    assert_eq!(d.columns.input_ids, "input_ids");
    let mut issues = Vec::new();
    d.validate("data", &mut issues);
    assert!(issues.is_empty(), "{issues:?}");
}

#[test]
fn defaults_and_unknown_keys() {
    let job: Job = toml::from_str("[data]\ntrain = \"a.parquet\"\n").unwrap();
    assert_eq!(job.data, DataConfig::new(Files::One("a.parquet".into())));
    assert_eq!(job.data.seq_len, 256);
    assert_eq!(job.data.packing, Packing::Pad);
    assert_eq!(job.data.shuffle_buffer, 1024);

    let err = toml::from_str::<Job>("[data]\ntrain = \"a\"\nbatchsize = 3\n")
        .err()
        .unwrap();
    assert!(err.to_string().contains("batchsize"), "{err}");
    let err = toml::from_str::<Job>("[data]\ntrain = \"a\"\npacking = \"tight\"\n")
        .err()
        .unwrap();
    assert!(err.to_string().contains("tight"), "{err}");
    let err = toml::from_str::<Job>("[data]\ntrain = \"a\"\n[data.columns]\ntxt = \"x\"\n")
        .err()
        .unwrap();
    assert!(err.to_string().contains("txt"), "{err}");
}
