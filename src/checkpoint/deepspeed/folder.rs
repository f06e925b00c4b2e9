//! Finding a DeepSpeed checkpoint's files: the tag folder (from `latest`,
//! `--tag`, or INPUT_DIR itself) and its model-states and optimizer-states
//! files, each parsed from its name. Layouts this reader cannot merge
//! (tensor or pipeline parallel, MoE experts, NVMe-offloaded partitions)
//! are refused here, by the names of the files that show them.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The file DeepSpeed writes beside its tag folders, naming the newest.
pub const LATEST_FILE: &str = "latest";

/// What a DeepSpeed checkpoint folder looks like, for messages.
pub const LOOKS: &str = "a DeepSpeed checkpoint folder holds a 'latest' file and a tag folder \
     (global_stepN/) of *_model_states.pt and *_optim_states.pt files (engine.save_checkpoint)";

/// The files of one tag.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TagFiles {
    /// The tag folder.
    pub dir: PathBuf,
    /// The tag (the folder's name).
    pub tag: String,
    /// ZeRO-1/2's `mp_rank_00_model_states.pt`, if present.
    pub model_states: Option<PathBuf>,
    /// ZeRO-3's `zero_pp_rank_D_mp_rank_00_model_states.pt`, by D.
    pub zero3_model_states: Vec<(u64, PathBuf)>,
    /// `[bf16_]zero_pp_rank_D_mp_rank_00_optim_states.pt`, by D.
    pub optim_states: Vec<(u64, PathBuf)>,
}

/// Whether `dir` looks like a DeepSpeed checkpoint: it holds a `latest`
/// file, or model-states files of its own (a tag folder).
pub fn is_deepspeed_checkpoint(dir: &Path) -> bool {
    dir.join(LATEST_FILE).is_file() || has_model_states(dir)
}

fn has_model_states(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.ends_with("model_states.pt"))
        })
    })
}

/// The tag folder `dir` means, with `tag` (`--tag`) if given: `dir/TAG`,
/// or `dir/<latest>`, or `dir` itself when it holds the files.
pub fn tag_folder(dir: &Path, tag: Option<&str>) -> Result<(PathBuf, String)> {
    let name_of = |path: &Path| {
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    if let Some(tag) = tag {
        if tag.is_empty() || tag.contains('/') || tag == "." || tag == ".." {
            return Err(Error::usage(
                format!("--tag {tag:?} is not a tag folder's name"),
                "pass the name of a folder beside 'latest', such as global_step500",
            ));
        }
        let folder = dir.join(tag);
        if folder.is_dir() {
            return Ok((folder, tag.to_owned()));
        }
        if name_of(dir) == tag && has_model_states(dir) {
            return Ok((dir.to_owned(), tag.to_owned()));
        }
        return Err(Error::usage(
            format!("{} has no tag folder {tag}", dir.display()),
            format!(
                "pass a tag that is a folder of {}: {}",
                dir.display(),
                list_tags(dir)
            ),
        ));
    }
    let latest = dir.join(LATEST_FILE);
    if latest.is_file() {
        let text = std::fs::read(&latest).map_err(|e| Error::io("read", &latest, e))?;
        let tag = String::from_utf8_lossy(&text).trim().to_owned();
        let folder = dir.join(&tag);
        if tag.is_empty() || tag.contains('/') || !folder.is_dir() {
            return Err(Error::usage(
                format!(
                    "{} names the tag {tag:?}, but {} has no such folder",
                    latest.display(),
                    dir.display()
                ),
                format!(
                    "pass --tag with one of the tags present ({}), or copy the tag folder 'latest' names",
                    list_tags(dir)
                ),
            ));
        }
        return Ok((folder, tag));
    }
    Ok((dir.to_owned(), name_of(dir)))
}

/// The sub-folders of `dir` that hold model-states files, for messages.
fn list_tags(dir: &Path) -> String {
    let mut tags: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| has_model_states(&entry.path()))
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    tags.sort();
    match tags.is_empty() {
        true => "none found".to_owned(),
        false => tags.join(", "),
    }
}

/// What a file name in a tag folder is.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    /// `mp_rank_MM_model_states.pt`.
    ModelStates { mp: u64 },
    /// `zero_pp_rank_D_mp_rank_MM_model_states.pt`.
    Zero3ModelStates { dp: u64, mp: u64 },
    /// `[bf16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt`.
    OptimStates { dp: u64, mp: u64, bf16: bool },
    /// A pipeline-parallel layer file (`layer_LL-model_MM-model_states.pt`).
    PipelineLayer,
    /// An expert (MoE) file.
    Expert,
    /// Anything else.
    Other,
}

fn number(text: &str) -> Option<u64> {
    (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse().ok())
        .flatten()
}

fn kind_of(name: &str) -> Kind {
    if name.starts_with("layer_") && name.contains("expert") || name.starts_with("expp_rank_") {
        return Kind::Expert;
    }
    if name.starts_with("layer_") && name.ends_with("model_states.pt") {
        return Kind::PipelineLayer;
    }
    let zero_pp = |rest: &str, suffix: &str| -> Option<(u64, u64)> {
        let rest = rest.strip_prefix("zero_pp_rank_")?.strip_suffix(suffix)?;
        let (dp, mp) = rest.split_once("_mp_rank_")?;
        Some((number(dp)?, number(mp)?))
    };
    if let Some(mp) = name
        .strip_prefix("mp_rank_")
        .and_then(|rest| rest.strip_suffix("_model_states.pt"))
        .and_then(number)
    {
        return Kind::ModelStates { mp };
    }
    if let Some((dp, mp)) = zero_pp(name, "_model_states.pt") {
        return Kind::Zero3ModelStates { dp, mp };
    }
    let (bf16, rest) = match name.strip_prefix("bf16_") {
        Some(rest) => (true, rest),
        None => (false, name),
    };
    if let Some((dp, mp)) = zero_pp(rest, "_optim_states.pt") {
        return Kind::OptimStates { dp, mp, bf16 };
    }
    Kind::Other
}

/// Lists the tag folder's files, refusing layouts this reader cannot
/// merge and folders that mix two saves' files.
pub fn list_files(dir: &Path, tag: &str) -> Result<TagFiles> {
    let refuse = |reason: String, hint: &str| Error::BadCheckpoint {
        path: dir.to_owned(),
        reason,
        hint: hint.to_owned(),
    };
    let mut names: Vec<String> = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "offloaded_tensors" {
            return Err(refuse(
                "it holds offloaded_tensors/: the optimizer's partitions were offloaded to NVMe \
                 and saved as raw swap files"
                    .into(),
                "load the checkpoint in DeepSpeed without NVMe offload and save it again, or \
                 convert it with deepspeed.checkpoint.ds_to_universal",
            ));
        }
        names.push(name);
    }
    names.sort();
    let mut files = TagFiles {
        dir: dir.to_owned(),
        tag: tag.to_owned(),
        ..TagFiles::default()
    };
    let mut bf16_prefixes = (Vec::new(), Vec::new());
    let tp_hint = "merging tensor- or pipeline-parallel slices needs each tensor's split \
                   dimension, which a ZeRO checkpoint does not record; convert it with \
                   deepspeed.checkpoint.ds_to_universal, or save it from a run without \
                   tensor/pipeline parallelism";
    for name in &names {
        let path = dir.join(name);
        let mp = match kind_of(name) {
            Kind::PipelineLayer => {
                return Err(refuse(
                    format!("it holds {name}: a pipeline-parallel checkpoint"),
                    tp_hint,
                ));
            }
            Kind::Expert => {
                return Err(refuse(
                    format!("it holds {name}: a mixture-of-experts checkpoint with expert files"),
                    "expert-parallel checkpoints are not supported; convert it with \
                     deepspeed.checkpoint.ds_to_universal",
                ));
            }
            Kind::Other => continue,
            Kind::ModelStates { mp } => {
                files.model_states.get_or_insert(path);
                mp
            }
            Kind::Zero3ModelStates { dp, mp } => {
                files.zero3_model_states.push((dp, path));
                mp
            }
            Kind::OptimStates { dp, mp, bf16 } => {
                match bf16 {
                    true => bf16_prefixes.0.push(name.clone()),
                    false => bf16_prefixes.1.push(name.clone()),
                }
                files.optim_states.push((dp, path));
                mp
            }
        };
        if mp != 0 {
            return Err(refuse(
                format!(
                    "it holds {name}: files of model-parallel rank {mp}, a tensor- or pipeline-parallel checkpoint"
                ),
                tp_hint,
            ));
        }
    }
    if let (Some(bf16), Some(plain)) = (bf16_prefixes.0.first(), bf16_prefixes.1.first()) {
        return Err(refuse(
            format!(
                "it holds optimizer files of two saves: {bf16} (a bf16 run) and {plain} (an fp16/fp32 run)"
            ),
            "a tag folder must hold the files of one save; move the other run's files out",
        ));
    }
    if files.model_states.is_some() && !files.zero3_model_states.is_empty() {
        return Err(refuse(
            format!(
                "it holds model-states files of two saves: mp_rank_00_model_states.pt (ZeRO-1/2) and {} (ZeRO-3)",
                files.zero3_model_states[0]
                    .1
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
            ),
            "a tag folder must hold the files of one save; move the other run's files out",
        ));
    }
    if files.model_states.is_none() && files.zero3_model_states.is_empty() {
        return Err(refuse(
            "it holds no model-states file (mp_rank_00_model_states.pt, or zero_pp_rank_0_mp_rank_00_model_states.pt)".into(),
            &format!("pass the folder DeepSpeed saved into; {LOOKS}"),
        ));
    }
    if files.optim_states.is_empty() {
        return Err(refuse(
            "it holds no *_optim_states.pt file: a ZeRO stage 0 checkpoint, or the optimizer files were not copied".into(),
            "copy every *_optim_states.pt file of the tag folder (ZeRO stage 0 checkpoints are not supported)",
        ));
    }
    files.optim_states.sort();
    files.zero3_model_states.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_parsed_as_deepspeed_names_them() {
        assert_eq!(
            kind_of("mp_rank_00_model_states.pt"),
            Kind::ModelStates { mp: 0 }
        );
        assert_eq!(
            kind_of("zero_pp_rank_10_mp_rank_01_model_states.pt"),
            Kind::Zero3ModelStates { dp: 10, mp: 1 }
        );
        assert_eq!(
            kind_of("bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt"),
            Kind::OptimStates {
                dp: 2,
                mp: 0,
                bf16: true
            }
        );
        assert_eq!(
            kind_of("zero_pp_rank_2_mp_rank_00_optim_states.pt"),
            Kind::OptimStates {
                dp: 2,
                mp: 0,
                bf16: false
            }
        );
        assert_eq!(
            kind_of("layer_01-model_00-model_states.pt"),
            Kind::PipelineLayer
        );
        assert_eq!(
            kind_of("layer_0_expert_1_mp_rank_00_model_states.pt"),
            Kind::Expert
        );
        assert_eq!(
            kind_of("zero_pp_rank_x_mp_rank_00_optim_states.pt"),
            Kind::Other
        );
        assert_eq!(kind_of("zero_to_fp32.py"), Kind::Other);
    }
}
