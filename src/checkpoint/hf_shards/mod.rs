//! Finding and reading the shard files of a checkpoint.

pub mod sharding;

use crate::checkpoint::Checkpoint;
use crate::checkpoint::hf_shards::sharding::{
    SHARDING_INFO_KEY, ShardFile, index_pieces, sharding_info,
};
use crate::checkpoint::identity::Inputs;
use crate::error::{Error, Result, counted};
use crate::safetensors::header::read_header;
use crate::safetensors::naming::{parse_output_name, parse_shard_name};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Per-tensor piece offsets of one shard.
pub type ShardingInfo = HashMap<String, Vec<u64>>;

/// The shard files of a checkpoint with their decoded sharding info.
struct ShardSet {
    shards: Vec<ShardFile>,
    infos: Vec<ShardingInfo>,
    skipped: Vec<PathBuf>,
}

/// The subfolder PyTorch's `HuggingFaceStorageWriter(save_distributed=True,
/// enable_consolidation=True)` puts the shards in, beside its consolidated
/// files.
pub const SHARDED_SUBFOLDER: &str = "sharded";

/// Lists the shard files of `dir`: its `*.safetensors` files (not
/// recursive; hidden names are not shards), or those of its `sharded/`
/// subfolder, as PyTorch lays them out with `enable_consolidation=True`,
/// when `dir` holds none or only files without `DCP_SHARDING_INFO` (the
/// consolidated ones) and the subfolder holds some. Only then are headers
/// read, up to the first that carries sharding information. An entry named
/// like a shard that is not a readable regular file (a dangling symlink, a
/// folder) is an error, never skipped: skipping every file of the highest
/// rank would make the checkpoint look smaller and shorten every tensor
/// without a trace.
pub fn find_shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let files = list_safetensors(dir)?;
    let sharded = dir.join(SHARDED_SUBFOLDER);
    if !sharded.is_dir() {
        return Ok(files);
    }
    let in_subfolder = list_safetensors(&sharded)?;
    if in_subfolder.is_empty() || any_carries_sharding_info(&files)? {
        return Ok(files);
    }
    Ok(in_subfolder)
}

/// Whether `dir` looks like an HF-shards checkpoint, reading at most one
/// header: it holds `*.safetensors` files other than consolidated outputs
/// of an earlier run, or files named like outputs whose first header
/// carries `DCP_SHARDING_INFO`, or its `sharded/` subfolder holds some.
/// Returns how many such files `dir` itself holds, or the subfolder's
/// count.
pub fn count_shard_candidates(dir: &Path) -> Result<usize> {
    let files = list_safetensors(dir)?;
    let own = files.iter().filter(|path| !is_output_name(path)).count();
    if own > 0 {
        return Ok(own);
    }
    // Files named like consolidated outputs are shards when they carry
    // sharding information (NeMo's own tests save shards under those
    // names); they are all of one kind, so one header tells.
    // One that cannot be read is no shard here; reading the checkpoint
    // names what is wrong with it if it is one.
    let first_is_shard = files.first().is_some_and(|first| {
        read_header(first).is_ok_and(|h| h.metadata.contains_key(SHARDING_INFO_KEY))
    });
    if first_is_shard {
        return Ok(files.len());
    }
    let sharded = dir.join(SHARDED_SUBFOLDER);
    if !sharded.is_dir() {
        return Ok(0);
    }
    Ok(list_safetensors(&sharded)?.len())
}

/// Whether the shards were found in `dir`'s `sharded/` subfolder rather
/// than in `dir` itself (for the summary).
pub fn read_from_subfolder(dir: &Path, shards: &[PathBuf]) -> bool {
    shards
        .first()
        .and_then(|shard| shard.parent())
        .is_some_and(|folder| folder == dir.join(SHARDED_SUBFOLDER))
}

/// Whether any of `files` carries `DCP_SHARDING_INFO`, reading headers
/// only until one does: files named like shards first, consolidated
/// outputs (`model-IIIII-of-NNNNN`) last.
fn any_carries_sharding_info(files: &[PathBuf]) -> Result<bool> {
    let mut order: Vec<&PathBuf> = files.iter().collect();
    order.sort_by_key(|path| is_output_name(path));
    for path in order {
        if read_header(path)?.metadata.contains_key(SHARDING_INFO_KEY) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The `*.safetensors` entries of `dir`, sorted; hidden names are left out.
fn list_safetensors(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut unusable = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))? {
        let path = entry.map_err(|e| Error::io("list", dir, e))?.path();
        let is_shard = path.extension().is_some_and(|ext| ext == "safetensors")
            && !path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if !is_shard {
            continue;
        }
        match not_a_regular_file(&path) {
            None => files.push(path),
            Some(why) => unusable.push((path, why)),
        }
    }
    if !unusable.is_empty() {
        return Err(unusable_entries(unusable));
    }
    files.sort();
    Ok(files)
}

/// Why `path` (named like a shard) cannot be read as one, if it cannot.
fn not_a_regular_file(path: &Path) -> Option<String> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => None,
        Ok(meta) if meta.is_dir() => Some("is a directory".into()),
        Ok(_) => Some("is not a regular file (a device, pipe or socket)".into()),
        Err(e) => Some(match std::fs::read_link(path) {
            Ok(target) => format!(
                "is a symbolic link to {}, which cannot be opened ({e})",
                target.display()
            ),
            Err(_) => format!("cannot be examined ({e})"),
        }),
    }
}

/// One error naming every unusable shard-named entry (the first few).
fn unusable_entries(mut unusable: Vec<(PathBuf, String)>) -> Error {
    const SHOWN: usize = 8;
    unusable.sort();
    let mut listed: Vec<String> = unusable
        .iter()
        .take(SHOWN)
        .map(|(path, why)| format!("{} {why}", path.display()))
        .collect();
    if unusable.len() > SHOWN {
        listed.push(format!("... and {} more", unusable.len() - SHOWN));
    }
    Error::usage(
        format!(
            "{} entr{} named like a shard file cannot be read as one: {}",
            unusable.len(),
            if unusable.len() == 1 { "y" } else { "ies" },
            listed.join("; ")
        ),
        "every *.safetensors entry of INPUT_DIR must be a readable shard file: restore the file a \
         link points to (or copy the checkpoint with `cp -rL`), or move the entry out of INPUT_DIR",
    )
}

/// Who reads the shard headers (`--headers`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HeaderReading {
    /// Every rank reads every header (the design card's way).
    #[default]
    All,
    /// Each rank reads 1/size of the headers and the ranks exchange a
    /// validated summary: each header is read once per job, not once per
    /// rank (no metadata storm on Lustre).
    Shared,
}

/// One shard file as read: its validated header and decoded sharding info
/// (`None` when the file carries no DCP metadata). Small enough to send to
/// other ranks (`--headers shared`): the raw metadata is dropped once decoded.
#[derive(Debug, Serialize, Deserialize)]
pub struct ShardSummary {
    /// The file and its header.
    pub shard: ShardFile,
    /// Per-tensor piece offsets.
    pub info: Option<ShardingInfo>,
}

/// The shard files of INPUT_DIR, in sorted order.
pub fn list_shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::usage(
            format!("INPUT_DIR {} is not a directory", dir.display()),
            "pass the folder holding the shard-*.safetensors files",
        ));
    }
    find_shard_files(dir)
}

/// Reads and validates the headers of `paths`, in parallel.
pub fn read_shards(paths: &[PathBuf]) -> Result<Vec<ShardSummary>> {
    paths
        .par_iter()
        .map(|path| {
            let header = read_header(path)?;
            let mut shard = ShardFile {
                path: path.clone(),
                header,
            };
            let info = sharding_info(&shard)?;
            shard.header.metadata.clear();
            Ok(ShardSummary { shard, info })
        })
        .collect()
}

/// Builds the checkpoint from the parsed files of `dir` (in listing order):
/// skips earlier consolidated outputs, refuses other non-shards, checks that
/// no (rank, index) file is missing (with `allow_missing`, only that no whole
/// rank is, up to `source_ranks` ranks if given), and groups every tensor's
/// pieces, which must tile it.
pub fn checkpoint_from(
    dir: &Path,
    parsed: Vec<ShardSummary>,
    allow_missing: bool,
    source_ranks: Option<u32>,
) -> Result<Checkpoint> {
    let set = shard_set(dir, parsed, allow_missing, source_ranks)?;
    let tensors = index_pieces(&set.shards, &set.infos)?;
    let files: Vec<PathBuf> = set.shards.into_iter().map(|s| s.path).collect();
    Ok(Checkpoint {
        inputs: Inputs::unopened(&files),
        files,
        tensors,
        skipped_outputs: set.skipped,
        non_tensors: Vec::new(),
        excluded: Vec::new(),
        top_level_keys: Default::default(),
        notes: Vec::new(),
    })
}

fn shard_set(
    dir: &Path,
    parsed: Vec<ShardSummary>,
    allow_missing: bool,
    source_ranks: Option<u32>,
) -> Result<ShardSet> {
    let mut checkpoint = ShardSet {
        shards: Vec::new(),
        infos: Vec::new(),
        skipped: Vec::new(),
    };
    // Files named like consolidated outputs are shards when any of them
    // carries sharding information (NeMo's naming): one of them without it
    // then lost it, and skipping it would drop its tensors without a word.
    let outputs_are_shards = parsed
        .iter()
        .any(|s| s.info.is_some() && is_output_name(&s.shard.path));
    for ShardSummary { shard, info } in parsed {
        match info {
            Some(info) => {
                checkpoint.shards.push(shard);
                checkpoint.infos.push(info);
            }
            None if is_output_name(&shard.path) && outputs_are_shards => {
                return Err(output_named_without_info(&shard.path));
            }
            // A consolidated file from an earlier run into this same folder
            // (named in one note by the run).
            None if is_output_name(&shard.path) => checkpoint.skipped.push(shard.path),
            None => return Err(Error::NotDcpShard { path: shard.path }),
        }
    }
    check_file_set(&checkpoint.shards, source_ranks, allow_missing)?;
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

/// The refusal of a file named like an output without
/// `DCP_SHARDING_INFO` among output-named files that carry it.
fn output_named_without_info(path: &Path) -> Error {
    Error::usage(
        format!(
            "{}: named like a consolidated output and without DCP_SHARDING_INFO, but the other \
             files of INPUT_DIR named so are shards (they carry it): this one is a shard that \
             lost its sharding information, or an output of another run",
            crate::error::shown(&path.display().to_string())
        ),
        "restore the shard file from the checkpoint as saved, or move the file out of INPUT_DIR \
         if it is no shard",
    )
}

/// PyTorch's writer leaves one file per (source rank, output index) for
/// every rank that holds part of that output, which for sharded models is
/// every rank. A missing file cannot always be seen in the pieces: losing
/// the rank that holds a tensor's end silently shrinks the tensor. So the
/// files named `shard-RRRRR-model-IIIII-of-NNNNN` must be a complete set,
/// whatever other shards lie beside them: ranks 1..=R, every index that
/// some rank wrote, every pair present. R is the highest rank seen, unless
/// `--source-ranks` says how many ranks saved the checkpoint: only that
/// catches the loss of every file of the highest rank. An index that no
/// rank wrote is a gap in the writer's mapping, not a lost file: PyTorch's
/// writer names files by `fqn_to_index_mapping`, and a mapping using
/// indices 1, 3 and 2000 leaves files of those indices only, each
/// `-of-02000` (as with the highest rank, the loss of every file of one
/// index is not visible here; a mapping naming its tensors reports them
/// missing). Shards of other names beside such a set are refused unless
/// `allow_missing`: nothing tells whether they complete it (files of the
/// set renamed) or stand beside a set that lost files.
fn check_file_set(
    shards: &[ShardFile],
    expected_ranks: Option<u32>,
    allow_missing: bool,
) -> Result<()> {
    let mut named: Vec<((u32, u32, u32), &Path)> = Vec::new();
    let mut others: Vec<&Path> = Vec::new();
    for shard in shards {
        let name = shard.path.file_name().map(|n| n.to_string_lossy());
        match name.as_deref().and_then(parse_shard_name) {
            Some(parsed) => named.push((parsed, &shard.path)),
            None => others.push(&shard.path),
        }
    }
    let Some(&(first, first_path)) = named.first() else {
        return match expected_ranks {
            Some(_) if !shards.is_empty() => Err(Error::usage(
                "--source-ranks needs shard files named shard-RRRRR-model-IIIII-of-NNNNN.safetensors",
                "drop --source-ranks for checkpoints named otherwise",
            )),
            _ => Ok(()),
        };
    };
    let count = first.2;
    if let Some((other, other_path)) = named.iter().find(|n| n.0.2 != count) {
        return Err(Error::usage(
            format!(
                "shard files disagree on the number of output files: {} says -of-{count:05}, {} \
                 -of-{:05}",
                first_path.display(),
                other_path.display(),
                other.2
            ),
            "INPUT_DIR mixes two checkpoints; keep one checkpoint's files only",
        ));
    }
    if allow_missing && expected_ranks.is_none() {
        return Ok(());
    }
    let highest = named.iter().map(|n| n.0.0).max().unwrap_or(0);
    let ranks = expected_ranks.unwrap_or(highest);
    if highest > ranks {
        return Err(Error::usage(
            format!("shard files come from rank {highest}, but --source-ranks is {ranks}"),
            "pass the number of ranks that saved the checkpoint, or remove files of other saves",
        ));
    }
    let present: std::collections::HashSet<(u32, u32)> =
        named.iter().map(|n| (n.0.0, n.0.1)).collect();
    let indices: std::collections::BTreeSet<u32> = named.iter().map(|n| n.0.1).collect();
    let has_rank = |r: u32| indices.iter().any(|&i| present.contains(&(r, i)));
    let missing: Vec<String> = if allow_missing {
        // Only whole ranks, up to --source-ranks, must be there.
        (1..=ranks)
            .filter(|&r| !has_rank(r))
            .map(|r| format!("shard-{r:05}-model-*-of-{count:05}.safetensors"))
            .collect()
    } else {
        (1..=ranks)
            .flat_map(|r| indices.iter().map(move |&i| (r, i)))
            .filter(|pair| !present.contains(pair))
            .map(|(r, i)| format!("shard-{r:05}-model-{i:05}-of-{count:05}.safetensors"))
            .collect()
    };
    let beside = match others.is_empty() {
        true => String::new(),
        false => format!(
            "; INPUT_DIR also holds {} named otherwise: {}",
            counted(others.len(), "shard", "shards"),
            crate::error::list_file_names(&others)
        ),
    };
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(8).map(String::as_str).collect();
        return Err(Error::usage(
            format!(
                "{} missing from the set of {} x {}: {}{}{beside}",
                counted(missing.len(), "shard file", "shard files"),
                counted(ranks as usize, "rank", "ranks"),
                counted(count as usize, "output file", "output files"),
                shown.join(", "),
                if missing.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            ),
            "copy every shard file of the checkpoint under its own name; if the writer never \
             produced these files (an output holding only replicated tensors), pass \
             --allow-missing-shard-files",
        ));
    }
    if !others.is_empty() && !allow_missing {
        return Err(Error::usage(
            format!(
                "INPUT_DIR holds {} named otherwise beside the complete set of \
                 shard-RRRRR-model-IIIII-of-NNNNN files ({} x {}): {}; nothing tells whether \
                 they belong to that set or complete a set that lost files",
                counted(others.len(), "shard", "shards"),
                counted(ranks as usize, "rank", "ranks"),
                counted(count as usize, "output file", "output files"),
                crate::error::list_file_names(&others)
            ),
            "give the checkpoint's shards their names as saved \
             (shard-RRRRR-model-IIIII-of-NNNNN.safetensors) or move other checkpoints' files \
             out of INPUT_DIR; if every file the writer produced is there, pass \
             --allow-missing-shard-files",
        ));
    }
    Ok(())
}

fn is_output_name(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_output_name)
        .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_named_entries_that_are_not_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir
            .path()
            .join("shard-00001-model-00001-of-00001.safetensors");
        std::fs::write(&real, b"x").unwrap();
        // Not named like a shard, or hidden: not looked at.
        std::os::unix::fs::symlink("gone", dir.path().join("notes.txt")).unwrap();
        std::os::unix::fs::symlink("gone", dir.path().join(".hidden.safetensors")).unwrap();
        assert_eq!(
            find_shard_files(dir.path()).unwrap(),
            std::slice::from_ref(&real)
        );
        // A link to a file is followed.
        let linked = dir
            .path()
            .join("shard-00002-model-00001-of-00001.safetensors");
        std::os::unix::fs::symlink(&real, &linked).unwrap();
        assert_eq!(find_shard_files(dir.path()).unwrap(), [real, linked]);

        let dangling = dir
            .path()
            .join("shard-00003-model-00001-of-00001.safetensors");
        std::os::unix::fs::symlink("/nonexistent/x.safetensors", &dangling).unwrap();
        std::fs::create_dir(
            dir.path()
                .join("shard-00004-model-00001-of-00001.safetensors"),
        )
        .unwrap();
        let err = find_shard_files(dir.path()).unwrap_err().to_string();
        let expected = format!(
            "2 entries named like a shard file cannot be read as one: {} is a symbolic link to \
             /nonexistent/x.safetensors, which cannot be opened (No such file or directory (os error 2)); \
             {}/shard-00004-model-00001-of-00001.safetensors is a directory\n  hint: ",
            dangling.display(),
            dir.path().display()
        );
        assert!(err.starts_with(&expected), "{err}");
    }
}
