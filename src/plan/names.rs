//! Output tensor names: `--strip-prefix` clean-up (e.g. `_orig_mod.` left by
//! `torch.compile`, or a `model.` wrapper), with collisions refused.

use crate::checkpoint::FullTensor;
use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// Removes the first of `prefixes` that each name starts with, then re-sorts
/// by the new names. Two tensors that end up with one name are an error
/// naming both. Returns each tensor's saved name, in the new order (a
/// mapping may use either name).
pub fn strip_prefixes(tensors: &mut [FullTensor], prefixes: &[String]) -> Result<Vec<String>> {
    let saved: Vec<String> = tensors.iter().map(|t| t.name.clone()).collect();
    if prefixes.is_empty() {
        return Ok(saved);
    }
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for tensor in tensors.iter_mut() {
        let original = tensor.name.clone();
        if let Some(rest) = prefixes
            .iter()
            .find_map(|p| original.strip_prefix(p.as_str()))
        {
            tensor.name = rest.to_string();
        }
        // "__metadata__" is the header's metadata key, not a tensor name.
        if tensor.name.is_empty() || tensor.name == "__metadata__" {
            return Err(Error::usage(
                format!(
                    "--strip-prefix leaves tensor '{original}' named '{}', which safetensors cannot hold",
                    tensor.name
                ),
                "use a shorter prefix",
            ));
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
    // Output names are unique (checked above): one order for both lists.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| tensors[a].name.cmp(&tensors[b].name));
    let saved = order.iter().map(|&i| saved[i].clone()).collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(saved)
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
        let saved = strip_prefixes(&mut list, &["_orig_mod.".into(), "model.".into()]).unwrap();
        let names: Vec<&str> = list.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b", "c", "model.a"]);
        assert_eq!(saved, ["_orig_mod.b", "c", "_orig_mod.model.a"]);
    }

    #[test]
    fn names_safetensors_cannot_hold_are_refused() {
        for (name, left) in [("m.", ""), ("m.__metadata__", "__metadata__")] {
            let mut list = tensors(&[name]);
            let err = strip_prefixes(&mut list, &["m.".into()])
                .unwrap_err()
                .to_string();
            let expected = format!("--strip-prefix leaves tensor '{name}' named '{left}', which");
            assert!(err.starts_with(&expected), "{err}");
        }
    }

    #[test]
    fn collisions_name_both_tensors() {
        let mut list = tensors(&["model.w", "w"]);
        let err = strip_prefixes(&mut list, &["model.".into()])
            .unwrap_err()
            .to_string();
        // Both original names, then the one they would share.
        assert!(
            err.starts_with("tensors 'model.w' and 'w' would both be named 'w' after"),
            "{err}"
        );
    }
}
