//! Which output files to compare: the ones just written, or those of an
//! existing output, whose index and headers are checked against the plan.

use crate::error::{Error, Result};
use crate::exec::output::PendingFile;
use crate::plan::Plan;
use crate::safetensors::dtype::Dtype;
use crate::safetensors::dtype::can_convert;
use crate::safetensors::header::read_header;
use crate::safetensors::json::{JsonError, parse_unique_json};
use std::collections::{BTreeMap, BTreeSet};
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
    /// Where it was written and compared, when on different hosts: its
    /// mismatch lines end with it (see [`super::assign`]).
    pub origin: Option<String>,
}

/// The files this rank created and wrote (as [`create_files`] returns
/// them, by planned file index), at their temporary paths: exactly the files
/// it renames into place, each with its own planned layout.
///
/// [`create_files`]: crate::exec::write::create_files
pub fn written_targets(plan: &Plan, created: &BTreeMap<usize, PendingFile>) -> Vec<Target> {
    created
        .iter()
        .map(|(&f, file)| planned_target(plan, f, file.temp_path().to_owned()))
        .collect()
}

/// Planned output file `f`, found at `path`: where each of its tensors'
/// bytes start, as the plan laid them out.
pub fn planned_target(plan: &Plan, f: usize, path: PathBuf) -> Target {
    let file = &plan.files[f];
    Target {
        path,
        name: file.name.clone(),
        tensors: file
            .entries
            .iter()
            .map(|e| (e.tensor, file.data_start() + e.bytes.start, e.dtype))
            .collect(),
        origin: None,
    }
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
    let index_name = plan.index_name.as_str();
    let index_path = out_dir.join(index_name);
    let text = std::fs::read(&index_path).map_err(|e| Error::io("read", &index_path, e))?;
    let bad_index = |reason: String| Error::BadIndex {
        path: index_path.clone(),
        reason,
        hint: "the output is incomplete or not from a consolidation; rerun the consolidation with --overwrite",
    };
    // A tensor listed twice in the index is as wrong as in a mapping.
    let index = std::str::from_utf8(&text)
        .map_err(|e| bad_index(format!("not valid UTF-8: {e}")))
        .and_then(|text| {
            parse_unique_json(text).map_err(|e| match e {
                JsonError::Syntax(e) => bad_index(format!("not valid JSON: {e}")),
                JsonError::Duplicate(dup) => bad_index(dup.to_string()),
            })
        })?;
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
                "{index_name}: '{name}' maps to {file}, not a file name"
            )),
        }
    }
    // Index-wide checks once, on rank 0: every shard tensor listed, and
    // total_size equal to the tensor bytes the output files' headers hold.
    if rank == 0 {
        for name in by_name.keys() {
            if !weight_map.contains_key(*name) {
                problems.push(format!("'{name}' is in the shards but not in {index_name}"));
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
                "{index_name}: total_size is {other:?}, but its files hold {held} bytes of tensors"
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
                    "{file}: holds '{}', which {index_name} does not map to it",
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
                    "{file}: '{name}' is listed in {index_name} but missing from the file"
                ));
            }
        }
        targets.push(Target {
            path,
            name: file.to_string(),
            tensors,
            origin: None,
        });
    }
    Ok((targets, problems))
}
