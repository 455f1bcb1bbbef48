//! Text sources tokenized on the fly, EOS handling, and `save_to_disk` folders.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

mod common;

use std::collections::HashMap;
use std::path::Path;

use bellows_data::{Content, DataConfig, Files, Split, TokenLoader, TokenRef};
use common::*;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

const WORDS: [&str; 9] = [
    "<unk>", "<s>", "</s>", "hello", "world", "the", "answer", "is", "42",
];

/// A tiny word-level tokenizer whose post-processor wraps every sequence in `<s> ... </s>`.
fn write_tokenizer(path: &Path, with_template: bool) {
    let vocab: HashMap<String, u32> = WORDS
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".into())
        .build()
        .unwrap();
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok.add_special_tokens([
        AddedToken::from("<s>", true),
        AddedToken::from("</s>", true),
    ])
    .unwrap();
    if with_template {
        let tp = TemplateProcessing::builder()
            .try_single("<s> $A </s>")
            .unwrap()
            .special_tokens(vec![("<s>", 1), ("</s>", 2)])
            .build()
            .unwrap();
        tok.with_post_processor(Some(tp));
    }
    tok.save(path, false).unwrap();
}

fn text_cfg(data: &Path, tok: &Path, content: Content) -> DataConfig {
    let files = Files::One(data.display().to_string());
    let mut c = DataConfig::new(files.clone());
    c.eval = Some(files);
    c.content = content;
    c.tokenizer = Some(tok.to_path_buf());
    c.seq_len = 8;
    c.batch_size = 1;
    c
}

fn rows_of(cfg: &DataConfig) -> Vec<(Vec<u32>, Vec<i64>)> {
    let mut l = TokenLoader::new(cfg, spec(Split::Eval, 0, 1, WORDS.len())).unwrap();
    drain(&mut l)
        .into_iter()
        .map(|b| {
            let n = b.segment_ids.iter().filter(|&&s| s > 0).count();
            (b.input_ids[..n].to_vec(), b.labels[..n].to_vec())
        })
        .collect()
}

#[test]
fn text_column_is_tokenized_with_the_post_processor_special_tokens() {
    let dir = tmp();
    let tok = p(&dir, "tokenizer.json");
    write_tokenizer(&tok, true);
    let data = p(&dir, "t.parquet");
    write_parquet(
        &data,
        &batch(vec![(
            "text",
            str_col(&["hello world", "the answer is 42"]),
        )]),
        10,
    );
    let got = rows_of(&text_cfg(&data, &tok, Content::Text));
    assert_eq!(got[0], (vec![1, 3, 4, 2], vec![1, 3, 4, 2]));
    assert_eq!(got[1], (vec![1, 5, 6, 7, 8, 2], vec![1, 5, 6, 7, 8, 2]));
}

#[test]
fn prompt_is_masked_and_completion_with_eos_is_learned() {
    let dir = tmp();
    let tok = p(&dir, "tokenizer.json");
    write_tokenizer(&tok, true);
    let data = p(&dir, "pc.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"the answer is\", \"completion\": \"42\"}\n{\"prompt\": \"hello\", \"completion\": \"world world\"}\n",
    )
    .unwrap();
    let got = rows_of(&text_cfg(&data, &tok, Content::PromptCompletion));
    assert_eq!(
        got[0],
        (vec![1, 5, 6, 7, 8, 2], vec![-100, -100, -100, -100, 8, 2])
    );
    assert_eq!(got[1], (vec![1, 3, 4, 4, 2], vec![-100, -100, 4, 4, 2]));
}

#[test]
fn add_eos_appends_the_token_once() {
    let dir = tmp();
    let tok = p(&dir, "plain.json");
    write_tokenizer(&tok, false);
    let data = p(&dir, "t.parquet");
    write_parquet(
        &data,
        &batch(vec![("text", str_col(&["hello world", "hello </s>"]))]),
        10,
    );
    let mut cfg = text_cfg(&data, &tok, Content::Text);
    assert_eq!(rows_of(&cfg)[0].0, [3, 4]);
    cfg.add_eos = true;
    cfg.eos_token = Some(TokenRef::Token("</s>".into()));
    let got = rows_of(&cfg);
    assert_eq!(got[0].0, [3, 4, 2]);
    assert_eq!(got[1].0, [3, 2]);

    // Pre-tokenized rows with an id.
    let ids = p(&dir, "ids.jsonl");
    write_jsonl(&ids, &[vec![5, 6], vec![7, 2]]);
    let mut cfg = text_cfg(&ids, &tok, Content::Tokens);
    cfg.tokenizer = None;
    cfg.add_eos = true;
    cfg.eos_token = Some(TokenRef::Id(2));
    let got = rows_of(&cfg);
    assert_eq!(got[0].0, [5, 6, 2]);
    assert_eq!(got[1].0, [7, 2]);

    cfg.eos_token = Some(TokenRef::Id(99));
    let err = TokenLoader::new(&cfg, spec(Split::Eval, 0, 1, WORDS.len()))
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("data.eos_token: id 99 is >= vocab_size 9"),
        "{err}"
    );
}

#[test]
fn missing_tokenizer_is_a_clear_error() {
    let dir = tmp();
    let data = p(&dir, "t.parquet");
    write_parquet(&data, &batch(vec![("text", str_col(&["hello"]))]), 10);
    let cfg = text_cfg(&data, &p(&dir, "nope.json"), Content::Text);
    let err = TokenLoader::new(&cfg, spec(Split::Eval, 0, 1, 9))
        .err()
        .unwrap();
    assert!(
        err.to_string().starts_with("tokenizer ") && err.to_string().contains("nope.json"),
        "{err}"
    );
}

#[test]
fn malformed_tokenizer_json_is_a_clear_error_naming_the_file() {
    let dir = tmp();
    let data = p(&dir, "t.parquet");
    write_parquet(&data, &batch(vec![("text", str_col(&["hello"]))]), 10);
    let good = p(&dir, "good.json");
    write_tokenizer(&good, true);
    let text = std::fs::read_to_string(&good).unwrap();
    for (name, body) in [
        ("cut.json", text[..text.len() / 2].to_string()),
        ("not_object.json", "[1, 2, 3]".to_string()),
        (
            "no_model.json",
            r#"{"version": "1.0", "model": 3}"#.to_string(),
        ),
        ("empty.json", String::new()),
    ] {
        let tok = p(&dir, name);
        std::fs::write(&tok, body).unwrap();
        let cfg = text_cfg(&data, &tok, Content::Text);
        let err = TokenLoader::new(&cfg, spec(Split::Eval, 0, 1, 9))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("tokenizer ") && err.contains(name),
            "{name}: {err}"
        );
    }
}

#[test]
fn save_to_disk_entries_naming_files_outside_the_folder_are_refused() {
    let dir = tmp();
    let tok = p(&dir, "tokenizer.json");
    write_tokenizer(&tok, true);
    let ds = dir.path().join("ds");
    std::fs::create_dir(&ds).unwrap();
    for name in ["../outside.arrow", "/etc/hostname", "sub/../../x.arrow"] {
        std::fs::write(
            ds.join("state.json"),
            format!(r#"{{"_data_files": [{{"filename": "{name}"}}]}}"#),
        )
        .unwrap();
        let err = TokenLoader::new(
            &text_cfg(&ds, &tok, Content::Text),
            spec(Split::Eval, 0, 1, 9),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("state.json") && err.contains("not a plain file name"),
            "{name}: {err}"
        );
    }
}

#[test]
fn save_to_disk_folders_are_read_in_state_json_order() {
    let dir = tmp();
    let tok = p(&dir, "tokenizer.json");
    write_tokenizer(&tok, true);
    let ds = dir.path().join("ds");
    std::fs::create_dir(&ds).unwrap();
    write_ipc(
        &ds.join("data-00000-of-00002.arrow"),
        &batch(vec![("text", str_col(&["hello", "world"]))]),
        1,
        true,
    );
    write_ipc(
        &ds.join("data-00001-of-00002.arrow"),
        &batch(vec![("text", str_col(&["the answer"]))]),
        1,
        true,
    );
    std::fs::write(ds.join("dataset_info.json"), "{}").unwrap();
    std::fs::write(
        ds.join("state.json"),
        r#"{"_data_files": [{"filename": "data-00001-of-00002.arrow"}, {"filename": "data-00000-of-00002.arrow"}], "_fingerprint": "x", "_split": "train"}"#,
    )
    .unwrap();
    let got = rows_of(&text_cfg(&ds, &tok, Content::Text));
    let ids: Vec<Vec<u32>> = got.into_iter().map(|(i, _)| i).collect();
    assert_eq!(ids, [vec![1, 5, 6, 2], vec![1, 3, 2], vec![1, 4, 2]]);

    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let err = TokenLoader::new(
        &text_cfg(&plain, &tok, Content::Text),
        spec(Split::Eval, 0, 1, 9),
    )
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("not a save_to_disk dataset"),
        "{err}"
    );
}
