//! Output tensor names: `--strip-prefix` clean-up (e.g. `_orig_mod.` left by
//! `torch.compile`, or a `model.` wrapper), with collisions and names
//! safetensors cannot hold refused.

use crate::checkpoint::FullTensor;
use crate::error::{Error, Result, shown};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The header key safetensors keeps for its metadata: no tensor may be
/// named so (a header holding it twice cannot be loaded).
const METADATA_KEY: &str = "__metadata__";

/// The top-level key of the saved state dict that every tensor sits under
/// (`.metadata`'s planner_data: accelerate saves `dcp.save({"model":
/// state_dict})`, so every name starts with `model.`), if there is one.
/// A checkpoint whose tensors sit at the top level, or under several keys
/// (torchtitan: the model flat, the optimizer under `optimizer`), has none.
pub fn single_top_level_key(
    tensors: &[FullTensor],
    keys: &BTreeMap<String, String>,
) -> Option<String> {
    let mut found: Option<&String> = None;
    for tensor in tensors {
        let key = keys.get(&tensor.name)?;
        if found.is_some_and(|k| k != key) || !tensor.name.starts_with(&format!("{key}.")) {
            return None;
        }
        found = Some(key);
    }
    found.cloned()
}

/// The prefixes that write the names inside `key`: each of the user's
/// `--strip-prefix` under the key first (first match wins), then the key
/// alone, then the user's as given.
pub fn under_key(key: &str, prefixes: &[String]) -> Vec<String> {
    let inside = prefixes.iter().map(|p| format!("{key}.{p}"));
    inside
        .chain([format!("{key}.")])
        .chain(prefixes.iter().cloned())
        .collect()
}

/// Removes the first of `prefixes` that each name starts with, then re-sorts
/// by the new names. Two tensors that end up with one name are an error
/// naming both, and so is a name safetensors cannot hold (empty or
/// `__metadata__`), stripped or as saved, whatever the input format.
/// Returns each tensor's saved name, in the new order (a mapping may use
/// either name). `files` are the input paths the pieces' locations index,
/// for messages.
pub fn strip_prefixes(
    tensors: &mut [FullTensor],
    prefixes: &[String],
    files: &[PathBuf],
) -> Result<Vec<String>> {
    let saved: Vec<String> = tensors.iter().map(|t| t.name.clone()).collect();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for tensor in tensors.iter_mut() {
        let original = tensor.name.clone();
        if let Some(rest) = prefixes
            .iter()
            .find_map(|p| original.strip_prefix(p.as_str()))
        {
            tensor.name = rest.to_string();
        }
        if tensor.name.is_empty() || tensor.name == METADATA_KEY {
            return Err(unstorable(tensor, &original, files));
        }
        if let Some(other) = seen.insert(tensor.name.clone(), original.clone()) {
            return Err(Error::usage(
                format!(
                    "tensors '{other}' and '{original}' would both be named '{}' after --strip-prefix",
                    tensor.name
                ),
                "strip a prefix that does not merge distinct tensors, or none",
            ));
        }
    }
    if prefixes.is_empty() {
        // Names are as saved, already sorted.
        return Ok(saved);
    }
    // Output names are unique (checked above): one order for both lists.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| tensors[a].name.cmp(&tensors[b].name));
    let saved = order.iter().map(|&i| saved[i].clone()).collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(saved)
}

/// The error for `tensor`, saved as `original`, whose output name
/// safetensors cannot hold.
fn unstorable(tensor: &FullTensor, original: &str, files: &[PathBuf]) -> Error {
    let file = tensor
        .pieces
        .first()
        .and_then(|p| files.get(p.location.shard))
        .map(|f| format!(" (in {})", f.display()))
        .unwrap_or_default();
    let why = match tensor.name.as_str() {
        "" => "an empty name",
        _ => "the name safetensors keeps for the header's metadata",
    };
    if tensor.name == original {
        return Error::usage(
            format!(
                "tensor '{}'{file} has {why}, which no safetensors file can hold",
                shown(original)
            ),
            format!(
                "leave it out with --exclude '{}', or give it another name with --strip-prefix",
                shown(original)
            ),
        );
    }
    Error::usage(
        format!(
            "--strip-prefix leaves tensor '{}'{file} named '{}' ({why}), which safetensors cannot hold",
            shown(original),
            tensor.name
        ),
        "use a shorter prefix",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::dtype::Dtype;

    fn tensors(names: &[&str]) -> Vec<FullTensor> {
        names
            .iter()
            .map(|n| FullTensor {
                name: n.to_string(),
                dtype: Dtype::U8,
                shape: vec![1],
                pieces: vec![],
            })
            .collect()
    }

    #[test]
    fn prefixes_are_stripped_and_names_resorted() {
        let mut list = tensors(&["_orig_mod.b", "_orig_mod.model.a", "c"]);
        let saved =
            strip_prefixes(&mut list, &["_orig_mod.".into(), "model.".into()], &[]).unwrap();
        let names: Vec<&str> = list.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b", "c", "model.a"]);
        assert_eq!(saved, ["_orig_mod.b", "c", "_orig_mod.model.a"]);
    }

    #[test]
    fn names_safetensors_cannot_hold_are_refused() {
        for (name, left) in [("m.", ""), ("m.__metadata__", "__metadata__")] {
            let mut list = tensors(&[name]);
            let err = strip_prefixes(&mut list, &["m.".into()], &[])
                .unwrap_err()
                .to_string();
            let expected = format!("--strip-prefix leaves tensor '{name}' named '{left}' (");
            assert!(err.starts_with(&expected), "{err}");
        }
        // As saved, with or without prefixes to strip: named with its file.
        for prefixes in [vec![], vec!["m.".to_string()]] {
            let mut list = tensors(&["a", "__metadata__"]);
            list[1].pieces.push(crate::checkpoint::Piece::new(
                crate::checkpoint::Location::at(0, 0),
                &[0],
                &[1],
            ));
            let files = [PathBuf::from("ckpt/__0_0.distcp")];
            let err = strip_prefixes(&mut list, &prefixes, &files)
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(
                    "tensor '__metadata__' (in ckpt/__0_0.distcp) has the name safetensors keeps for the header's metadata"
                ) && err.contains("--exclude '__metadata__'"),
                "{err}"
            );
        }
        // A prefix that gives it another name makes it storable.
        let mut list = tensors(&["__metadata__"]);
        strip_prefixes(&mut list, &["__".into()], &[]).unwrap();
        assert_eq!(list[0].name, "metadata__");
    }

    #[test]
    fn collisions_name_both_tensors() {
        let mut list = tensors(&["model.w", "w"]);
        let err = strip_prefixes(&mut list, &["model.".into()], &[])
            .unwrap_err()
            .to_string();
        // Both original names, then the one they would share.
        assert!(
            err.starts_with("tensors 'model.w' and 'w' would both be named 'w' after"),
            "{err}"
        );
    }
}
