//! Which on-disk format INPUT_DIR holds: PyTorch DCP's default
//! (`.metadata` + `__R_I.distcp`), HF shards
//! (`shard-RRRRR-model-IIIII-of-NNNNN.safetensors`) or a DeepSpeed ZeRO
//! checkpoint (`latest` + `global_stepN/*_optim_states.pt`).

use crate::checkpoint::dcp::is_dcp_checkpoint;
use crate::checkpoint::deepspeed::is_deepspeed_checkpoint;
use crate::checkpoint::hf_shards::count_shard_candidates;
use crate::error::{Error, Result};
use std::path::Path;

/// `--input-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InputFormat {
    /// Decide from the folder's contents.
    #[default]
    Auto,
    /// Per-rank safetensors shards from `HuggingFaceStorageWriter`.
    HfShards,
    /// DCP's default `FileSystemWriter` format.
    Dcp,
    /// DeepSpeed ZeRO's `engine.save_checkpoint` folder.
    DeepSpeed,
}

const LOOKS: &str = "a DCP checkpoint holds .metadata and __R_I.distcp files (torch.distributed.checkpoint.save); \
an HF-shards checkpoint holds shard-RRRRR-model-IIIII-of-NNNNN.safetensors files (HuggingFaceStorageWriter(save_distributed=True)), or a sharded/ subfolder of them; \
a DeepSpeed checkpoint holds a 'latest' file and a global_stepN/ folder of *_model_states.pt and *_optim_states.pt files";

/// The format of `dir`: `asked`, or what the folder holds with `Auto`.
/// A folder holding both, or neither, is an error saying what was found.
pub fn detect(dir: &Path, asked: InputFormat) -> Result<InputFormat> {
    if !dir.is_dir() {
        return Err(Error::usage(
            format!("INPUT_DIR {} is not a directory", dir.display()),
            format!("pass the checkpoint folder: {LOOKS}"),
        ));
    }
    if asked != InputFormat::Auto {
        return Ok(asked);
    }
    let has_metadata = is_dcp_checkpoint(dir);
    // HF Trainer's checkpoint-N holds its own model.safetensors beside the
    // DeepSpeed files: a consolidated output, never a shard, so a folder
    // with `latest` (or model-states files) and no `.metadata` is
    // DeepSpeed's whatever else it holds.
    if !has_metadata && is_deepspeed_checkpoint(dir) {
        return Ok(InputFormat::DeepSpeed);
    }
    // Consolidated outputs of an earlier run into this folder (or PyTorch's
    // beside a sharded/ subfolder) are not shards; no header is read here.
    let shards = count_shard_candidates(dir)?;
    match (has_metadata, shards > 0) {
        (true, false) => Ok(InputFormat::Dcp),
        (false, true) => Ok(InputFormat::HfShards),
        (true, true) => Err(Error::usage(
            format!(
                "INPUT_DIR {} holds both a DCP .metadata file and {shards} *.safetensors file(s): which checkpoint is meant?",
                dir.display()
            ),
            format!(
                "pass --input-format dcp or --input-format hf-shards, or separate the two; {LOOKS}"
            ),
        )),
        (false, false) => Err(Error::usage(
            format!(
                "INPUT_DIR {} holds no checkpoint: no .metadata file and no shard *.safetensors files",
                dir.display()
            ),
            format!("pass the checkpoint folder: {LOOKS}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_told_apart_and_ambiguity_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = detect(dir.path(), InputFormat::Auto)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("holds no checkpoint") && err.contains(".distcp"),
            "{err}"
        );
        std::fs::write(dir.path().join(".metadata"), b"x").unwrap();
        assert_eq!(
            detect(dir.path(), InputFormat::Auto).unwrap(),
            InputFormat::Dcp
        );
        std::fs::write(dir.path().join("model-00001-of-00001.safetensors"), b"x").unwrap();
        assert_eq!(
            detect(dir.path(), InputFormat::Auto).unwrap(),
            InputFormat::Dcp
        );
        let shard = "shard-00001-model-00001-of-00001.safetensors";
        std::fs::write(dir.path().join(shard), b"x").unwrap();
        let err = detect(dir.path(), InputFormat::Auto)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("both") && err.contains("--input-format"),
            "{err}"
        );
        assert_eq!(
            detect(dir.path(), InputFormat::HfShards).unwrap(),
            InputFormat::HfShards
        );
        std::fs::remove_file(dir.path().join(".metadata")).unwrap();
        assert_eq!(
            detect(dir.path(), InputFormat::Auto).unwrap(),
            InputFormat::HfShards
        );
    }

    #[test]
    fn consolidated_files_beside_a_sharded_subfolder_are_hf_shards() {
        // PyTorch's enable_consolidation layout; the files are not even
        // valid safetensors: detection reads at most one header, and one it
        // cannot read is no shard.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model-00001-of-00001.safetensors"), b"x").unwrap();
        std::fs::create_dir(dir.path().join("sharded")).unwrap();
        assert!(
            detect(dir.path(), InputFormat::Auto)
                .unwrap_err()
                .to_string()
                .contains("holds no checkpoint")
        );
        let shard = "sharded/shard-00001-model-00001-of-00001.safetensors";
        std::fs::write(dir.path().join(shard), b"x").unwrap();
        assert_eq!(
            detect(dir.path(), InputFormat::Auto).unwrap(),
            InputFormat::HfShards
        );
    }
}
