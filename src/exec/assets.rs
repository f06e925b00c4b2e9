//! `--hf-assets DIR`: the files besides the weights that make OUTPUT_DIR
//! load as it is (config.json, tokenizer files, generation config, chat
//! template, custom code, README). Copied like the weights: under a
//! temporary name, synced, renamed before the index appears.

use crate::error::{Error, Result};
use crate::exec::output::PendingFile;
use crate::safetensors::dtype::Dtype;
use serde_json::Value;
use std::path::Path;

/// Extensions of weight files, never copied: the output has its own.
const WEIGHT_EXTENSIONS: [&str; 5] = [".safetensors", ".bin", ".pt", ".pth", ".index.json"];

/// Whether `name` in an assets folder is copied: not hidden, not weights,
/// not an index.
pub fn is_asset(name: &str) -> bool {
    !name.starts_with('.') && !WEIGHT_EXTENSIONS.iter().any(|ext| name.ends_with(ext))
}

/// The regular files of `dir` to copy, sorted (folders are not copied).
pub fn asset_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("list --hf-assets", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list --hf-assets", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_asset(&name) && entry.path().is_file() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Rank 0, before anything is written: asset names already in `out` need
/// `--overwrite`, like the weights.
pub fn check_assets_absent(out: &Path, names: &[String]) -> Result<()> {
    let existing: Vec<&str> = names
        .iter()
        .filter(|n| std::fs::symlink_metadata(out.join(n)).is_ok())
        .map(String::as_str)
        .collect();
    if existing.is_empty() {
        return Ok(());
    }
    Err(Error::usage(
        format!(
            "OUTPUT_DIR {} already holds {} (files --hf-assets would copy)",
            out.display(),
            existing.join(", ")
        ),
        "pass --overwrite to replace them, or choose another OUTPUT_DIR",
    ))
}

/// Rank 0: writes every asset of `src` into `out` under temporary names,
/// synced; `config.json` gets the `--dtype` of the weights if one was given.
pub fn stage_assets(
    src: &Path,
    out: &Path,
    dtype: Option<Dtype>,
) -> Result<Vec<(String, PendingFile)>> {
    let mut staged = Vec::new();
    for name in asset_names(src)? {
        let path = src.join(&name);
        let mut bytes = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
        if let (Some(dtype), "config.json") = (dtype, name.as_str()) {
            bytes = with_dtype(&bytes, dtype).map_err(|reason| Error::Mapping {
                path: path.clone(),
                reason,
                hint: "fix config.json in the --hf-assets folder, or leave out --dtype",
            })?;
        }
        let file = PendingFile::with_contents(out, &name, &bytes)?;
        staged.push((name, file));
    }
    Ok(staged)
}

/// transformers' name of a dtype, as config.json spells it.
fn torch_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        Dtype::F64 => "float64",
        _ => "float32",
    }
}

/// `config` with its dtype set: `dtype` (current transformers) and
/// `torch_dtype` (older configs) wherever present, `dtype` if neither is.
/// The JSON is rewritten pretty-printed; key order may change.
pub fn with_dtype(config: &[u8], dtype: Dtype) -> std::result::Result<Vec<u8>, String> {
    let mut value: Value =
        serde_json::from_slice(config).map_err(|e| format!("not valid JSON: {e}"))?;
    let Some(object) = value.as_object_mut() else {
        return Err("not a JSON object".into());
    };
    let name = Value::from(torch_name(dtype));
    let mut set = false;
    for key in ["dtype", "torch_dtype"] {
        if let Some(slot) = object.get_mut(key) {
            *slot = name.clone();
            set = true;
        }
    }
    if !set {
        object.insert("dtype".into(), name);
    }
    let mut text = serde_json::to_vec_pretty(&value).map_err(|e| e.to_string())?;
    text.push(b'\n');
    Ok(text)
}

/// Whether `dir/config.json` ties the output embeddings to the input ones
/// (`tie_word_embeddings: true`): then no `lm_head.weight` is expected.
pub fn ties_word_embeddings(dir: &Path) -> bool {
    std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .and_then(|config| config.get("tie_word_embeddings")?.as_bool())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_indices_and_hidden_files_are_not_assets() {
        for name in [
            "config.json",
            "tokenizer.json",
            "tokenizer.model",
            "merges.txt",
            "x.py",
        ] {
            assert!(is_asset(name), "{name}");
        }
        for name in [
            "model.safetensors",
            "pytorch_model.bin",
            "a.pt",
            "a.pth",
            "model.safetensors.index.json",
            "pytorch_model.bin.index.json",
            ".cache",
        ] {
            assert!(!is_asset(name), "{name}");
        }
    }

    #[test]
    fn the_dtype_field_present_is_updated_or_dtype_added() {
        let get = |text: &str, dtype| -> Value {
            serde_json::from_slice(&with_dtype(text.as_bytes(), dtype).unwrap()).unwrap()
        };
        let got = get(r#"{"dtype": "float32", "hidden_size": 8}"#, Dtype::BF16);
        assert_eq!(
            got,
            serde_json::json!({"dtype": "bfloat16", "hidden_size": 8})
        );
        let got = get(r#"{"torch_dtype": "float32"}"#, Dtype::F16);
        assert_eq!(got, serde_json::json!({"torch_dtype": "float16"}));
        let got = get(r#"{"a": [1, {"b": null}]}"#, Dtype::F32);
        assert_eq!(
            got,
            serde_json::json!({"a": [1, {"b": null}], "dtype": "float32"})
        );
        assert!(
            with_dtype(b"[1]", Dtype::F32)
                .unwrap_err()
                .contains("not a JSON object")
        );
        assert!(
            with_dtype(b"{", Dtype::F32)
                .unwrap_err()
                .contains("not valid JSON")
        );
    }
}
