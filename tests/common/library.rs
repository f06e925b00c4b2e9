//! Helpers for library-level tests (no binary, no MPI): a plan built as the binary builds it,
//! and output files written with the real copy, without MPI.

use sha2::{Digest, Sha256};
use st_consolidate_mpi::checkpoint::hf_shards::{checkpoint_from, list_shard_files, read_shards};
use st_consolidate_mpi::exec::cancel::Cancel;
use st_consolidate_mpi::exec::copy::copy_item;
use st_consolidate_mpi::plan::mapping::MappingSource;
use st_consolidate_mpi::plan::{self, Plan, PlanOptions};
use st_consolidate_mpi::safetensors::dtype::Dtype;
use st_synth::hex;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

/// The plan one rank builds for `input` with its `mapping.json`, exporting
/// floating-point tensors as `dtype` if given.
pub fn plan_for(input: &Path, dtype: Option<Dtype>) -> Plan {
    let files = list_shard_files(input).unwrap();
    let checkpoint = checkpoint_from(input, read_shards(&files).unwrap(), false, None).unwrap();
    let options = PlanOptions {
        mapping: MappingSource::Mapping(input.join("mapping.json")),
        dtype,
        ..PlanOptions::default()
    };
    plan::make(checkpoint, &options, 1).unwrap()
}

/// Writes every output file of a one-rank `plan` into `dir` (under its
/// final name) with the real copy, and returns their paths in plan order.
pub fn write_outputs(plan: &Plan, dir: &Path) -> st_consolidate_mpi::Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = plan.files.iter().map(|f| dir.join(&f.name)).collect();
    let files: Vec<File> = plan
        .files
        .iter()
        .zip(&paths)
        .map(|(f, path)| {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
                .unwrap();
            file.set_len(f.len()).unwrap();
            file.write_all_at(&f.header, 0).unwrap();
            file
        })
        .collect();
    let copied = AtomicU64::new(0);
    for item in plan.work_items(0) {
        copy_item(
            plan,
            &item,
            &files[item.file],
            &paths[item.file],
            &copied,
            &Cancel::default(),
        )?;
    }
    Ok(paths)
}

/// (file index, absolute offset, length) of tensor `name` in the outputs.
pub fn locate(plan: &Plan, name: &str) -> (usize, u64, u64) {
    for (f, file) in plan.files.iter().enumerate() {
        for entry in &file.entries {
            if plan.tensors[entry.tensor].name == name {
                let len = entry.bytes.end - entry.bytes.start;
                return (f, file.data_start() + entry.bytes.start, len);
            }
        }
    }
    panic!("no tensor {name} in the plan");
}

/// sha256 (hex) of every tensor in written output files, by name.
pub fn output_digests(plan: &Plan, paths: &[PathBuf]) -> BTreeMap<String, String> {
    let mut digests = BTreeMap::new();
    for (file, path) in plan.files.iter().zip(paths) {
        let bytes = std::fs::read(path).unwrap();
        for entry in &file.entries {
            let start = (file.data_start() + entry.bytes.start) as usize;
            let end = (file.data_start() + entry.bytes.end) as usize;
            let digest = hex(&Sha256::digest(&bytes[start..end]));
            digests.insert(plan.tensors[entry.tensor].name.clone(), digest);
        }
    }
    digests
}

/// sha256 (hex) of every tensor in the checkpoint's manifest.json.
pub fn manifest_digests(input: &Path) -> BTreeMap<String, String> {
    let manifest: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(input.join("manifest.json")).unwrap()).unwrap();
    manifest
        .into_iter()
        .map(|(name, v)| (name, v["sha256"].as_str().unwrap().to_string()))
        .collect()
}
