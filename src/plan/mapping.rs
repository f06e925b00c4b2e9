//! Which output file each tensor goes to: `--mapping`, `--hf-index`,
//! `--max-shard-size`, or a single file.

use crate::error::{Error, Result};
use crate::safetensors::json::{JsonError, parse_unique_json};
use crate::safetensors::naming::{MAX_FILES, parse_output_name};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Where the tensor-to-file assignment comes from.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum MappingSource {
    /// Everything in `model-00001-of-00001.safetensors`.
    #[default]
    SingleFile,
    /// A JSON `{fqn: index}` file (PyTorch's `fqn_to_index_mapping`).
    Mapping(PathBuf),
    /// An existing `model.safetensors.index.json`.
    HfIndex(PathBuf),
    /// Fill files in name order up to this many bytes each.
    MaxShardSize(u64),
    /// `{fqn: index}` given by a caller (the Python binding's
    /// `fqn_to_index_mapping`), checked as a `--mapping` file is; `origin`
    /// names it in messages.
    Given {
        /// What to call the mapping in messages.
        origin: String,
        /// Tensor name → output file index, from 1.
        entries: BTreeMap<String, u64>,
    },
}

impl MappingSource {
    /// Whether only the indices that hold a tensor get an output file.
    /// True for the sources that number files by index (a mapping, given
    /// or as a file, and an index's file names): PyTorch writes a file for
    /// each index of `fqn_to_index_mapping` that holds a tensor, named
    /// `-of-N` with N the largest, so indices 1, 3 and 2000 make three
    /// files, not 1,997 empty ones besides. The others number their files
    /// 1..N with none empty, except the one file of a run that keeps no
    /// tensor, which is still written.
    pub fn files_only_where_tensors(&self) -> bool {
        matches!(
            self,
            MappingSource::Mapping(_) | MappingSource::HfIndex(_) | MappingSource::Given { .. }
        )
    }
}

/// What to do with tensors that the mapping does not name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Unmapped {
    /// Stop with an error listing them.
    #[default]
    Error,
    /// Put them in the last output file.
    Last,
    /// Leave them out of the output (PyTorch's consolidation does); the
    /// plan lists them for one warning.
    Omit,
}

/// The result: an output file index (from 1) per tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// Output index for each input tensor, in the order given; 0 for a
    /// tensor left out ([`Unmapped::Omit`]).
    pub file_of: Vec<u32>,
    /// The largest index: the N of `model-IIIII-of-NNNNN` (as many files
    /// unless [`MappingSource::files_only_where_tensors`]).
    pub file_count: u32,
    /// Names in the mapping that no shard holds, left out of the output.
    pub missing: Vec<String>,
}

/// Assigns each `(name, bytes)` tensor an output file index, refusing
/// more than [`MAX_FILES`] output files.
pub fn assign(
    tensors: &[(&str, u64)],
    source: &MappingSource,
    unmapped: Unmapped,
) -> Result<Assignment> {
    let saved: Vec<String> = tensors.iter().map(|(name, _)| name.to_string()).collect();
    assign_named(tensors, &saved, source, unmapped)
}

/// [`assign`] for tensors renamed by `--strip-prefix`: `saved[i]` is the
/// name tensor `i` was saved under. A mapping may name a tensor by either.
pub fn assign_named(
    tensors: &[(&str, u64)],
    saved: &[String],
    source: &MappingSource,
    unmapped: Unmapped,
) -> Result<Assignment> {
    let assignment = assign_unchecked(tensors, saved, source, unmapped)?;
    if assignment.file_count > MAX_FILES {
        return Err(Error::usage(
            format!(
                "the mapping asks for {} output files; file names allow at most {MAX_FILES}",
                assignment.file_count
            ),
            "use fewer output files (a larger --max-shard-size, or smaller indices in the mapping)",
        ));
    }
    Ok(assignment)
}

fn assign_unchecked(
    tensors: &[(&str, u64)],
    saved: &[String],
    source: &MappingSource,
    unmapped: Unmapped,
) -> Result<Assignment> {
    let mapping_path = match source {
        MappingSource::Mapping(path) | MappingSource::HfIndex(path) => path.clone(),
        MappingSource::Given { origin, .. } => PathBuf::from(origin),
        _ => PathBuf::new(),
    };
    let by_name = match source {
        MappingSource::SingleFile => {
            return Ok(Assignment {
                file_of: vec![1; tensors.len()],
                file_count: 1,
                missing: vec![],
            });
        }
        MappingSource::MaxShardSize(limit) => return Ok(fill_by_size(tensors, *limit)),
        MappingSource::Mapping(path) => read_mapping(path)?,
        MappingSource::HfIndex(path) => read_hf_index(path)?,
        MappingSource::Given { origin, entries } => check_indices(Path::new(origin), entries)?,
    };
    let file_count = by_name.values().copied().max().unwrap_or(1);
    let mut unmapped_names = Vec::new();
    let mut file_of = Vec::with_capacity(tensors.len());
    for ((name, _), saved) in tensors.iter().zip(saved) {
        match lookup(&by_name, name, saved, &mapping_path)? {
            Some(index) => file_of.push(index),
            None => {
                unmapped_names.push(name.to_string());
                file_of.push(match unmapped {
                    Unmapped::Omit => 0,
                    _ => file_count,
                });
            }
        }
    }
    if !unmapped_names.is_empty() && unmapped == Unmapped::Error {
        return Err(Error::Unmapped {
            mapping: mapping_path,
            names: unmapped_names,
        });
    }
    let present: BTreeSet<&str> = tensors
        .iter()
        .map(|(name, _)| *name)
        .chain(saved.iter().map(String::as_str))
        .collect();
    let missing = by_name
        .keys()
        .filter(|name| !present.contains(name.as_str()))
        .cloned()
        .collect();
    Ok(Assignment {
        file_of,
        file_count,
        missing,
    })
}

/// A tensor's file in the mapping, under its output name (`output`) or the
/// name it was saved under (`saved`, before `--strip-prefix`); an error if
/// the mapping holds both and they disagree.
fn lookup(
    by_name: &BTreeMap<String, u32>,
    output: &str,
    saved: &str,
    path: &Path,
) -> Result<Option<u32>> {
    match (by_name.get(output), by_name.get(saved)) {
        (Some(a), Some(b)) if a != b => Err(Error::Mapping {
            path: path.to_owned(),
            reason: format!(
                "tensor '{saved}' is listed under its output name '{output}' with file {a} \
                 and under its saved name '{saved}' with file {b}"
            ),
            hint: "keep one of the two entries, or make them name the same file",
        }),
        (Some(&index), _) | (None, Some(&index)) => Ok(Some(index)),
        (None, None) => Ok(None),
    }
}

/// Hugging Face's greedy sharding: walk tensors in name order and start a new
/// file when the next tensor would push the current one past `limit`.
fn fill_by_size(tensors: &[(&str, u64)], limit: u64) -> Assignment {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| tensors[i].0);
    let mut file_of = vec![1; tensors.len()];
    let (mut index, mut used) = (1u32, 0u64);
    for i in order {
        let bytes = tensors[i].1;
        if used > 0 && used.saturating_add(bytes) > limit {
            index += 1;
            used = 0;
        }
        used = used.saturating_add(bytes);
        file_of[i] = index;
    }
    Assignment {
        file_of,
        file_count: index,
        missing: vec![],
    }
}

/// Reads a --mapping or --hf-index file. A tensor listed twice is refused:
/// which of its two indices was meant cannot be known.
fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    parse_unique_json(&text).map_err(|e| match e {
        JsonError::Syntax(e) => Error::Mapping {
            path: path.to_owned(),
            reason: format!("not valid JSON: {e}"),
            hint: "fix the file, or pass a different --mapping/--hf-index",
        },
        JsonError::Duplicate(dup) => Error::Mapping {
            path: path.to_owned(),
            reason: dup.to_string(),
            hint: "list every tensor once: remove the entry that is wrong, or pass a different --mapping/--hf-index",
        },
    })
}

/// Reads `{fqn: index}` with indices from 1.
pub fn read_mapping(path: &Path) -> Result<BTreeMap<String, u32>> {
    let bad = |reason: String| Error::Mapping {
        path: path.to_owned(),
        reason,
        hint: "a mapping is a JSON object {\"tensor.name\": 1, ...} with output file indices from 1",
    };
    let Value::Object(entries) = read_json(path)? else {
        return Err(bad("not a JSON object".into()));
    };
    entries
        .into_iter()
        .map(|(name, value)| {
            match value
                .as_u64()
                .filter(|i| (1..=u64::from(MAX_FILES)).contains(i))
                .and_then(|i| u32::try_from(i).ok())
            {
                Some(index) => Ok((name, index)),
                None => Err(bad(format!(
                    "'{name}' maps to {value}, not an integer from 1 to {MAX_FILES}"
                ))),
            }
        })
        .collect()
}

/// A caller's `{fqn: index}`, its indices checked as [`read_mapping`] checks
/// a file's.
fn check_indices(origin: &Path, entries: &BTreeMap<String, u64>) -> Result<BTreeMap<String, u32>> {
    entries
        .iter()
        .map(|(name, &index)| match u32::try_from(index) {
            Ok(i) if (1..=MAX_FILES).contains(&i) => Ok((name.clone(), i)),
            _ => Err(Error::Mapping {
                path: origin.to_owned(),
                reason: format!("'{name}' maps to {index}, not an integer from 1 to {MAX_FILES}"),
                hint: "output file indices start at 1, as in model-00001-of-0000N.safetensors",
            }),
        })
        .collect()
}

/// Reads a Hugging Face index's `weight_map`. File names of the form
/// `model-IIIII-of-NNNNN.safetensors` give their index; if any name has
/// another form, files are numbered 1..N in sorted name order instead.
pub fn read_hf_index(path: &Path) -> Result<BTreeMap<String, u32>> {
    let bad = |reason: String| Error::Mapping {
        path: path.to_owned(),
        reason,
        hint: "an index is {\"weight_map\": {\"tensor.name\": \"model-00001-of-00002.safetensors\", ...}}",
    };
    let value = read_json(path)?;
    let Some(Value::Object(weight_map)) = value.get("weight_map") else {
        return Err(bad("has no \"weight_map\" object".into()));
    };
    let mut files = BTreeMap::new();
    for (name, file) in weight_map {
        let Some(file) = file.as_str() else {
            return Err(bad(format!("'{name}' maps to {file}, not a file name")));
        };
        files.insert(name.clone(), file.to_owned());
    }
    let names: BTreeSet<&String> = files.values().collect();
    let parsed: Option<BTreeMap<&String, u32>> = names
        .iter()
        .map(|file| parse_output_name(file).map(|(i, _)| (*file, i)))
        .collect();
    let index_of = parsed.unwrap_or_else(|| {
        names
            .iter()
            .zip(1u32..)
            .map(|(file, i)| (*file, i))
            .collect()
    });
    Ok(files
        .iter()
        .map(|(name, file)| (name.clone(), index_of[file]))
        .collect())
}

/// Parses a size such as `5GB`, `500MB`, `2GiB` or `1000000` (bytes).
/// Decimal units are powers of 1000 and binary units powers of 1024, as in
/// Hugging Face's `max_shard_size`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size like 5GB, 500MB or 2GiB"))?;
    let scale: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024f64.powi(2),
        "GIB" => 1024f64.powi(3),
        "TIB" => 1024f64.powi(4),
        other => {
            return Err(format!(
                "unknown size unit '{other}' (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    let bytes = (number * scale).round();
    if !(1.0..1.8e19).contains(&bytes) {
        return Err(format!("size '{text}' must be at least one byte"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn json_file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    #[test]
    fn mapping_assigns_indices_and_reports_missing_names() {
        let file = json_file(r#"{"a": 1, "b": 3, "gone": 2}"#);
        let source = MappingSource::Mapping(file.path().into());
        let got = assign(&[("a", 4), ("b", 4)], &source, Unmapped::Error).unwrap();
        assert_eq!(got.file_of, vec![1, 3]);
        assert_eq!(got.file_count, 3);
        assert_eq!(got.missing, vec!["gone".to_string()]);
    }

    #[test]
    fn unmapped_tensors_are_an_error_or_go_last() {
        let file = json_file(r#"{"a": 1, "b": 2}"#);
        let source = MappingSource::Mapping(file.path().into());
        let err = assign(&[("a", 1), ("x", 1)], &source, Unmapped::Error).unwrap_err();
        assert!(
            matches!(&err, Error::Unmapped { names, .. } if names == &["x"]),
            "{err:?}"
        );
        let listed = format!("not in the mapping {}: x\n  hint:", file.path().display());
        assert!(err.to_string().contains(&listed), "{err}");
        let got = assign(&[("a", 1), ("x", 1)], &source, Unmapped::Last).unwrap();
        assert_eq!(got.file_of, vec![1, 2]);
    }

    #[test]
    fn a_mapping_may_use_saved_or_output_names() {
        let file = json_file(r#"{"_orig_mod.a": 2, "b": 1, "c": 3, "_orig_mod.c": 3, "gone": 1}"#);
        let source = MappingSource::Mapping(file.path().into());
        let saved = [
            "_orig_mod.a".to_string(),
            "_orig_mod.b".into(),
            "_orig_mod.c".into(),
        ];
        let tensors = [("a", 1), ("b", 1), ("c", 1)];
        let got = assign_named(&tensors, &saved, &source, Unmapped::Error).unwrap();
        assert_eq!(got.file_of, vec![2, 1, 3]);
        assert_eq!(got.missing, vec!["gone".to_string()]);
        let file = json_file(r#"{"_orig_mod.a": 2, "a": 1}"#);
        let source = MappingSource::Mapping(file.path().into());
        let err = assign_named(&tensors[..1], &saved[..1], &source, Unmapped::Error)
            .unwrap_err()
            .to_string();
        let expected = "tensor '_orig_mod.a' is listed under its output name 'a' with file 1 \
                        and under its saved name '_orig_mod.a' with file 2";
        assert!(err.contains(expected), "{err}");
    }

    #[test]
    fn malformed_mappings_are_refused() {
        for (text, reason) in [
            (r#"{"a": 0}"#, "'a' maps to 0, not an integer from 1"),
            (r#"{"a": "1"}"#, "'a' maps to \"1\", not an integer"),
            (r#"{"a": -1}"#, "'a' maps to -1, not an integer"),
            (r#"{"a": 100000}"#, "'a' maps to 100000, not an integer"),
            (r#"[1]"#, "not a JSON object"),
            ("{", "not valid JSON"),
        ] {
            let file = json_file(text);
            let err = read_mapping(file.path()).unwrap_err().to_string();
            assert!(err.contains(reason), "{text}: {err}");
        }
    }

    #[test]
    fn a_tensor_listed_twice_is_refused() {
        // serde_json alone keeps the last: "a" would silently go to file 2.
        let file = json_file(r#"{"a": 1, "b": 1, "a": 2}"#);
        let err = read_mapping(file.path()).unwrap_err().to_string();
        let expected = format!(
            "{}: the key 'a' appears twice\n  hint: list every tensor once",
            file.path().display()
        );
        assert!(err.starts_with(&expected), "{err}");
        let index = json_file(
            r#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "a": "model-00002-of-00002.safetensors"}}"#,
        );
        let err = read_hf_index(index.path()).unwrap_err().to_string();
        assert!(
            err.contains("the key 'a' appears twice inside 'weight_map'"),
            "{err}"
        );
        let index = json_file(r#"{"weight_map": {}, "weight_map": {"a": "x.safetensors"}}"#);
        let err = read_hf_index(index.path()).unwrap_err().to_string();
        assert!(err.contains("the key 'weight_map' appears twice"), "{err}");
    }

    #[test]
    fn hf_index_uses_file_names_or_sorted_order() {
        let file = json_file(
            r#"{"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}}"#,
        );
        let map = read_hf_index(file.path()).unwrap();
        assert_eq!((map["a"], map["b"]), (2, 1));
        let file =
            json_file(r#"{"weight_map": {"a": "zeta.safetensors", "b": "alpha.safetensors"}}"#);
        let map = read_hf_index(file.path()).unwrap();
        assert_eq!((map["a"], map["b"]), (2, 1));
    }

    #[test]
    fn too_many_output_files_are_refused() {
        let index = json_file(r#"{"weight_map": {"a": "model-100000-of-100000.safetensors"}}"#);
        let source = MappingSource::HfIndex(index.path().into());
        let err = assign(&[("a", 1)], &source, Unmapped::Error).unwrap_err();
        assert!(
            err.to_string()
                .contains("asks for 100000 output files; file names allow at most 99999"),
            "{err}"
        );
        let tensors: Vec<(String, u64)> = (0..100_000).map(|i| (format!("t{i}"), 1)).collect();
        let tensors: Vec<(&str, u64)> = tensors.iter().map(|(n, b)| (n.as_str(), *b)).collect();
        let err = assign(&tensors, &MappingSource::MaxShardSize(1), Unmapped::Error).unwrap_err();
        assert!(err.to_string().contains("at most 99999"), "{err}");
    }

    #[test]
    fn max_shard_size_fills_in_name_order() {
        let got = fill_by_size(&[("c", 6), ("a", 5), ("b", 5), ("d", 20)], 10);
        assert_eq!(got.file_of, vec![2, 1, 1, 3]);
        assert_eq!(got.file_count, 3);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5MB"), Ok(1_500_000));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("GB").is_err());
        assert!(parse_size("0").is_err());
    }
}
