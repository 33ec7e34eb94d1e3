//! Printing: one JSON document on stdout with `--format json`, or readable
//! `key: value` lines.

use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Readable lines (alias `toml`: `policy suggest` prints its policy file).
    #[value(alias = "toml")]
    Table,
    /// Alias `sarif`: `scan` prints a SARIF 2.1.0 log, other commands JSON.
    #[value(alias = "sarif")]
    Json,
}

/// Prints `value` in the chosen format.
pub fn emit(format: Format, value: &Value) {
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        ),
        Format::Table => print_table(value, 0),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn print_table(value: &Value, indent: usize) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) => {
            let width = map.keys().map(|k| k.len()).max().unwrap_or(0);
            for (k, v) in map {
                match v {
                    Value::Object(_) | Value::Array(_) if !is_flat_array(v) => {
                        println!("{pad}{k}:");
                        print_table(v, indent + 2);
                    }
                    Value::Array(items) => {
                        let joined: Vec<String> = items.iter().map(scalar).collect();
                        println!("{pad}{k:width$}  {}", joined.join(", "));
                    }
                    _ => println!("{pad}{k:width$}  {}", scalar(v)),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::Object(_) => {
                        print_table(item, indent);
                        println!();
                    }
                    _ => println!("{pad}{}", scalar(item)),
                }
            }
        }
        other => println!("{pad}{}", scalar(other)),
    }
}

fn is_flat_array(v: &Value) -> bool {
    matches!(v, Value::Array(items) if items.iter().all(|i| !i.is_object() && !i.is_array()))
}
