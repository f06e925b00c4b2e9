//! Finding and reading the shard files of a checkpoint.

use crate::dcp::{Shard, sharding_info};
use crate::error::{Error, Result};
use crate::header::read_header;
use crate::mapping::parse_output_name;
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Per-tensor piece offsets of one shard.
type ShardingInfo = HashMap<String, Vec<u64>>;

/// The checkpoint as read from disk.
#[derive(Debug)]
pub struct Checkpoint {
    /// The shard files, sorted by path.
    pub shards: Vec<Shard>,
    /// Each shard's decoded sharding info, in the same order.
    pub infos: Vec<HashMap<String, Vec<u64>>>,
    /// Consolidated outputs of an earlier run found among the inputs and
    /// ignored (when OUTPUT_DIR is INPUT_DIR).
    pub skipped: Vec<PathBuf>,
}

/// Lists the `*.safetensors` files of `dir` (not recursive). If there are
/// none but a `sharded/` subfolder exists, as PyTorch's writer lays it out
/// with `enable_consolidation=True`, lists that instead.
pub fn find_shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let list = |dir: &Path| -> Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))? {
            let path = entry.map_err(|e| Error::io("list", dir, e))?.path();
            let is_shard = path.extension().is_some_and(|ext| ext == "safetensors")
                && !path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if is_shard && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        Ok(files)
    };
    let files = list(dir)?;
    let sharded = dir.join("sharded");
    if files.is_empty() && sharded.is_dir() {
        return list(&sharded);
    }
    Ok(files)
}

/// Reads and validates every shard header in `dir`, in parallel.
pub fn read_checkpoint(dir: &Path) -> Result<Checkpoint> {
    if !dir.is_dir() {
        return Err(Error::usage(
            format!("INPUT_DIR {} is not a directory", dir.display()),
            "pass the folder holding the shard-*.safetensors files",
        ));
    }
    let files = find_shard_files(dir)?;
    let parsed: Vec<(Shard, Option<ShardingInfo>)> = files
        .into_par_iter()
        .map(|path| {
            let header = read_header(&path)?;
            let shard = Shard { path, header };
            let info = sharding_info(&shard)?;
            Ok((shard, info))
        })
        .collect::<Result<_>>()?;
    let mut checkpoint = Checkpoint {
        shards: Vec::new(),
        infos: Vec::new(),
        skipped: Vec::new(),
    };
    for (shard, info) in parsed {
        match info {
            Some(info) => {
                checkpoint.shards.push(shard);
                checkpoint.infos.push(info);
            }
            // A consolidated file from an earlier run into this same folder.
            None if is_output_name(&shard.path) => checkpoint.skipped.push(shard.path),
            None => return Err(Error::NotDcpShard { path: shard.path }),
        }
    }
    if checkpoint.shards.is_empty() {
        return Err(Error::usage(
            format!(
                "INPUT_DIR {} holds no DCP shard files (*.safetensors)",
                dir.display()
            ),
            "pass the checkpoint folder written by HuggingFaceStorageWriter(save_distributed=True), or its sharded/ subfolder",
        ));
    }
    Ok(checkpoint)
}

fn is_output_name(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_output_name)
        .is_some()
}
