//! Verification: reads consolidated files back and compares every tensor
//! byte with the shard pieces. Used by `--verify` (after writing, before the
//! files get their final names) and `--verify-only` (an existing output).

use crate::convert::can_convert;
use crate::copy::{ShardFiles, TensorCopy};
use crate::driver::INDEX_NAME;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::header::read_header;
use crate::plan::Plan;
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// One output file to check: where each of its tensors' bytes start.
#[derive(Clone, Debug)]
pub struct Target {
    /// The output file (temporary or final name).
    pub path: PathBuf,
    /// Name shown in messages.
    pub name: String,
    /// (index into `plan.tensors`, absolute offset of its first byte, the
    /// dtype it was written in).
    pub tensors: Vec<(usize, u64, Dtype)>,
}

/// The files `rank` just wrote, at their temporary paths.
pub fn written_targets(plan: &Plan, rank: usize, temp_paths: &[PathBuf]) -> Vec<Target> {
    plan.files_of(rank)
        .into_iter()
        .zip(temp_paths)
        .map(|(f, path)| {
            let file = &plan.files[f];
            Target {
                path: path.clone(),
                name: file.name.clone(),
                tensors: file
                    .entries
                    .iter()
                    .map(|e| (e.tensor, file.data_start() + e.bytes.start, e.dtype))
                    .collect(),
            }
        })
        .collect()
}

/// Checks an existing output folder's index and headers against the plan,
/// and returns the files for `rank` to compare byte by byte (file `i` of the
/// index, in sorted order, goes to rank `i % size`) with every structural
/// problem found.
pub fn existing_targets(
    plan: &Plan,
    out_dir: &Path,
    rank: usize,
    size: usize,
) -> Result<(Vec<Target>, Vec<String>)> {
    let index_path = out_dir.join(INDEX_NAME);
    let text = std::fs::read(&index_path).map_err(|e| Error::io("read", &index_path, e))?;
    let bad_index = |reason: String| Error::Mapping {
        path: index_path.clone(),
        reason,
        hint: "the output is incomplete or not from a consolidation; rerun the consolidation with --overwrite",
    };
    let index: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| bad_index(format!("not valid JSON: {e}")))?;
    let weight_map = index
        .get("weight_map")
        .and_then(|w| w.as_object())
        .ok_or_else(|| bad_index("has no \"weight_map\" object".into()))?;
    let by_name: BTreeMap<&str, usize> = plan
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let mut problems = Vec::new();
    let mut files: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, file) in weight_map {
        match file.as_str() {
            Some(file) => files.entry(file).or_default().push(name),
            None => problems.push(format!(
                "{INDEX_NAME}: '{name}' maps to {file}, not a file name"
            )),
        }
    }
    // Index-wide checks once, on rank 0: every shard tensor listed, and
    // total_size equal to the tensor bytes the output files' headers hold.
    if rank == 0 {
        for name in by_name.keys() {
            if !weight_map.contains_key(*name) {
                problems.push(format!("'{name}' is in the shards but not in {INDEX_NAME}"));
            }
        }
        let mut held = 0u64;
        for file in files.keys() {
            if let Ok(header) = read_header(&out_dir.join(file)) {
                held += header.tensors.iter().map(|t| t.end - t.begin).sum::<u64>();
            }
        }
        match index
            .pointer("/metadata/total_size")
            .and_then(|v| v.as_u64())
        {
            Some(total) if total == held => {}
            other => problems.push(format!(
                "{INDEX_NAME}: total_size is {other:?}, but its files hold {held} bytes of tensors"
            )),
        }
    }
    let mut targets = Vec::new();
    for (i, (file, names)) in files.iter().enumerate() {
        if i % size != rank {
            continue;
        }
        let path = out_dir.join(file);
        let header = match read_header(&path) {
            Ok(header) => header,
            Err(err) => {
                problems.push(
                    err.to_string()
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                );
                continue;
            }
        };
        let listed: BTreeSet<&str> = names.iter().copied().collect();
        let mut tensors = Vec::new();
        for entry in &header.tensors {
            if !listed.contains(entry.name.as_str()) {
                problems.push(format!(
                    "{file}: holds '{}', which {INDEX_NAME} does not map to it",
                    entry.name
                ));
                continue;
            }
            let Some(&t) = by_name.get(entry.name.as_str()) else {
                problems.push(format!("{file}: '{}' is not in the shards", entry.name));
                continue;
            };
            let tensor = &plan.tensors[t];
            let dtype_ok = can_convert(tensor.dtype, entry.dtype);
            if !dtype_ok || entry.shape != tensor.shape {
                problems.push(format!(
                    "{file}: '{}' is {} {:?}, the shards say {} {:?}",
                    entry.name, entry.dtype, entry.shape, tensor.dtype, tensor.shape
                ));
                continue;
            }
            tensors.push((t, header.data_start + entry.begin, entry.dtype));
        }
        for name in listed {
            if !header.tensors.iter().any(|e| e.name == name) {
                problems.push(format!(
                    "{file}: '{name}' is listed in {INDEX_NAME} but missing from the file"
                ));
            }
        }
        targets.push(Target {
            path,
            name: file.to_string(),
            tensors,
        });
    }
    Ok((targets, problems))
}

/// Compares every tensor byte of `targets` with the shards, in parallel.
/// Returns one line per mismatching tensor; I/O failures are errors.
pub fn compare(plan: &Plan, targets: &[Target]) -> Result<Vec<String>> {
    let jobs: Vec<(&Target, usize, u64, Dtype)> = targets
        .iter()
        .flat_map(|t| {
            t.tensors
                .iter()
                .map(move |&(tensor, at, dtype)| (t, tensor, at, dtype))
        })
        .collect();
    let results: Vec<Option<String>> = jobs
        .par_iter()
        .map(|&(target, tensor, at, dtype)| compare_tensor(plan, target, tensor, at, dtype))
        .collect::<Result<_>>()?;
    Ok(results.into_iter().flatten().collect())
}

/// Compares one written tensor, window by window, with the bytes its pieces
/// give (converted to `dtype` when it was exported in another type).
fn compare_tensor(
    plan: &Plan,
    target: &Target,
    t: usize,
    at: u64,
    dtype: Dtype,
) -> Result<Option<String>> {
    let tensor = &plan.tensors[t];
    let size = dtype.size();
    let elements = tensor.element_count();
    let file = File::open(&target.path).map_err(|e| Error::io("open", &target.path, e))?;
    let copy = TensorCopy::new(tensor);
    let mut inputs = ShardFiles::new(&plan.shards);
    let (mut scratch, mut expected, mut actual) = (Vec::new(), Vec::new(), Vec::new());
    let mut element = 0;
    while element < elements {
        let stop = (element + copy.window_elements(dtype)).min(elements);
        copy.assemble_as(
            dtype,
            element..stop,
            &mut inputs,
            &mut scratch,
            &mut expected,
        )?;
        actual.resize(expected.len(), 0);
        file.read_exact_at(&mut actual, at + element * size)
            .map_err(|e| Error::io("read back", &target.path, e))?;
        if let Some(i) = expected.iter().zip(actual.iter()).position(|(a, b)| a != b) {
            return Ok(Some(format!(
                "'{}' in {}: first difference at byte {} of the tensor",
                tensor.name,
                target.name,
                element * size + i as u64
            )));
        }
        element = stop;
    }
    Ok(None)
}
