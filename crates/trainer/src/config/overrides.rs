//! `--set dotted.key=value` overrides applied to the parsed TOML before deserialisation.

use toml::{Table, Value};

/// One `--set` problem: the override text and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverrideError {
    /// The override as given.
    pub text: String,
    /// What is wrong.
    pub message: String,
}

/// Parses `value` as a TOML value, or as a plain string when it is not valid TOML
/// (`peft.method=lora` gives the string `"lora"`, `optim.lr=3e-4` the float 3e-4).
pub fn parse_value(value: &str) -> Value {
    match format!("v = {value}").parse::<Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| Value::String(value.to_string())),
        Err(_) => Value::String(value.to_string()),
    }
}

/// Applies one `key=value` override to `root`, creating intermediate tables.
///
/// # Errors
/// A missing `=`, an empty key segment, or a path through a non-table value.
pub fn apply(root: &mut Table, text: &str) -> Result<(), OverrideError> {
    let err = |m: &str| OverrideError {
        text: text.to_string(),
        message: m.to_string(),
    };
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| err("expected dotted.key=value"))?;
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(err("empty key segment"));
    }
    let (last, parents) = parts.split_last().ok_or_else(|| err("empty key"))?;
    let mut table = root;
    for (i, p) in parents.iter().enumerate() {
        let entry = table
            .entry(p.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        table = match entry {
            Value::Table(t) => t,
            _ => return Err(err(&format!("{} is not a table", parts[..=i].join(".")))),
        };
    }
    table.insert(last.to_string(), parse_value(value.trim()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_toml_or_plain_strings() {
        assert_eq!(parse_value("3e-4"), Value::Float(3e-4));
        assert_eq!(parse_value("lora"), Value::String("lora".into()));
        assert_eq!(parse_value("\"lora\""), Value::String("lora".into()));
        assert_eq!(parse_value("8"), Value::Integer(8));
        assert_eq!(
            parse_value(r#"["a.parquet","b.parquet"]"#),
            Value::Array(vec![
                Value::String("a.parquet".into()),
                Value::String("b.parquet".into())
            ])
        );
        assert_eq!(parse_value("runs/x"), Value::String("runs/x".into()));
    }

    #[test]
    fn overrides_create_tables_and_reject_bad_paths() {
        let mut t = Table::new();
        apply(&mut t, "model.init.hidden_size=64").expect("valid");
        assert_eq!(t["model"]["init"]["hidden_size"], Value::Integer(64));
        apply(&mut t, "run.seed=1").expect("valid");
        assert!(apply(&mut t, "run.seed.x=1").is_err());
        assert!(apply(&mut t, "noequals").is_err());
        assert!(apply(&mut t, "a..b=1").is_err());
    }
}
