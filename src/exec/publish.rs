//! OUTPUT_DIR from start to finish: preparing it (lock, refusals, stale
//! temporaries) and publishing into it (report and index staged under
//! temporary names, then only renames, the index last; an older set removed
//! after the new index is in place).

use crate::error::{Error, Result};
use crate::exec::clobber::{Protected, RunPaths};
use crate::exec::lock::{Holder, OutputLock};
use crate::exec::output::{PendingFile, remove_stale_temps, sync_dir, temp_name};
use crate::plan::Plan;
use crate::report::{RankReport, RunReport};
use crate::safetensors::naming::{KNOWN_INDEX_NAMES, parse_output_name};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::Path;

/// Rank 0 only: creates OUTPUT_DIR, refuses to write over anything the
/// run reads (and a `--report` over anything at all, see [`Protected`]),
/// locks OUTPUT_DIR for this run, refuses (without `--overwrite`) to clobber
/// earlier outputs, and removes temporaries of killed runs. Nothing already
/// there is replaced or removed here: `--overwrite` takes effect only when
/// the new output is published. With `resume`, this plan's own file names
/// and the index are no refusal (the caller keeps what is complete and
/// rewrites the rest).
pub fn prepare_output_dir(
    dir: &Path,
    plan: &Plan,
    refusal: Refusal,
    paths: &RunPaths,
) -> Result<OutputLock> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create OUTPUT_DIR", dir, e))?;
    // Before the lock: a refused run leaves nothing behind but the folder.
    let protected = Protected::resolve(paths, plan, dir)?;
    protected.check_outputs()?;
    if let Some(report) = paths.report {
        protected.check_report(report)?;
    }
    // Before anything else in the folder: another run may be writing there.
    let lock = OutputLock::acquire(dir, &Holder::me())?;
    // lstat: a symlink at a final name, even a dangling one, is an existing
    // output (a rename replaces the link, never what it points to).
    let existing = existing_outputs(dir, plan)?;
    for name in &existing {
        let target = dir.join(name);
        if std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
            return Err(Error::usage(
                format!("{} exists and is not a regular file", target.display()),
                "move it out of OUTPUT_DIR; --overwrite replaces only files",
            ));
        }
    }
    let refused: Vec<String> = match refusal {
        Refusal::Nothing => vec![],
        Refusal::AnyOutput => existing,
        Refusal::OtherPlans => older_outputs(dir, plan)?,
    };
    if !refused.is_empty() {
        return Err(Error::usage(
            format!(
                "OUTPUT_DIR {} already holds {}",
                dir.display(),
                refused.join(", ")
            ),
            "pass --overwrite to replace them (they stay until the new output is complete), or choose another OUTPUT_DIR",
        ));
    }
    remove_stale_temps(dir)?;
    // Prove OUTPUT_DIR is writable before any rank starts copying.
    drop(PendingFile::create(dir, ".write-probe", 0)?);
    Ok(lock)
}

/// Which existing outputs stop a run before it writes anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `--overwrite`: none (they are replaced at publish time).
    Nothing,
    /// The default: any consolidated output or index.
    AnyOutput,
    /// `--resume`: outputs of another plan (other file count).
    OtherPlans,
}

/// The consolidated outputs already in `dir`: this plan's final names and
/// any other `model-IIIII-of-NNNNN.safetensors` (an older set of another
/// size), by `lstat`, so symlinks count whatever they point to.
fn existing_outputs(dir: &Path, plan: &Plan) -> Result<Vec<String>> {
    let mut names: Vec<String> = plan
        .files
        .iter()
        .map(|f| f.name.clone())
        .chain([plan.index_name.clone()])
        .filter(|name| std::fs::symlink_metadata(dir.join(name)).is_ok())
        .collect();
    for older in older_outputs(dir, plan)? {
        names.push(older);
    }
    names.sort();
    Ok(names)
}

/// Rank 0's part of publishing, written and synced but not yet in place.
pub struct Staged {
    report: RunReport,
    report_file: Option<PendingFile>,
    index_file: PendingFile,
}

impl Staged {
    /// Puts the report and then the index in place, and removes files of an
    /// older output set that the new index does not list (`--overwrite`).
    pub fn commit(self, dir: &Path, plan: &Plan) -> Result<RunReport> {
        if let Some(report_file) = self.report_file {
            let path = report_file.commit()?;
            sync_dir(split_path(&path).0)?;
        }
        self.index_file.commit()?;
        sync_dir(dir)?;
        remove_older_outputs(dir, plan)?;
        Ok(self.report)
    }
}

/// Rank 0: writes the JSON report (if asked) and the index under temporary
/// names, synced: after this only renames are left.
pub fn stage_index_and_report(
    dir: &Path,
    report_path: Option<&Path>,
    plan: &Plan,
    report: RunReport,
) -> Result<Staged> {
    let report_file = match report_path {
        Some(path) => {
            let (folder, name) = split_path(path);
            let mut json = serde_json::to_vec_pretty(&report).unwrap_or_default();
            json.push(b'\n');
            Some(PendingFile::with_contents(folder, name, &json)?)
        }
        None => None,
    };
    let index_file = PendingFile::with_contents(dir, &plan.index_name, &index_json(plan))?;
    Ok(Staged {
        report,
        report_file,
        index_file,
    })
}

/// Rank 0, at publish: removes the index of an earlier output
/// (`--overwrite`, `--resume`), under this plan's index name, under the
/// other known one, or under any name when this tool wrote it and it names
/// files this run replaces or removes (`--index-name` changed between
/// runs): no index may describe a mix of old and new files.
pub fn retire_old_index(dir: &Path, plan: &Plan) -> Result<()> {
    let names = KNOWN_INDEX_NAMES
        .iter()
        .map(|n| n.to_string())
        .chain([plan.index_name.clone()])
        .chain(own_indexes_naming_outputs(dir, plan)?);
    for name in names {
        remove_if_there(&dir.join(name), "remove the old")?;
    }
    Ok(())
}

/// Removes `path`; one already gone is fine.
fn remove_if_there(path: &Path, action: &'static str) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(action, path, e)),
        _ => Ok(()),
    }
}

/// Rank 0, after the new index is in place: removes the files of an older
/// output set that the new index does not list (`--overwrite` only gets
/// here with such files present).
fn remove_older_outputs(dir: &Path, plan: &Plan) -> Result<()> {
    for name in older_outputs(dir, plan)? {
        remove_if_there(&dir.join(&name), "remove the older output")?;
    }
    Ok(())
}

/// `model-IIIII-of-NNNNN.safetensors` entries in `dir` that are not in
/// `plan`, an index under the other known name, and an index this tool
/// wrote under any other name that names files this run replaces or
/// removes.
fn older_outputs(dir: &Path, plan: &Plan) -> Result<Vec<String>> {
    let mut older = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))? {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let older_model =
            parse_output_name(&name).is_some() && !plan.files.iter().any(|f| f.name == name);
        let other_index = KNOWN_INDEX_NAMES.contains(&name.as_str()) && name != plan.index_name;
        if older_model || other_index {
            older.push(name);
        }
    }
    for index in own_indexes_naming_outputs(dir, plan)? {
        if !older.contains(&index) {
            older.push(index);
        }
    }
    older.sort();
    Ok(older)
}

/// The key of the index's `metadata` by which this tool marks the indexes
/// it writes, so that one under a custom `--index-name` is recognised as
/// an earlier output by a later run under another name.
pub const INDEX_MARK_KEY: &str = "written_by";

/// The value of [`INDEX_MARK_KEY`].
pub const INDEX_MARK: &str = "st-consolidate-mpi";

/// Indexes over this size are not read to look for the mark: a
/// consolidated model's index is a few MB at most.
const MAX_INDEX_BYTES: u64 = 256 << 20;

/// The `*.index.json` files in `dir`, other than this plan's index and the
/// known names (handled by name), that this tool wrote (marked with
/// [`INDEX_MARK`]) and that name a file this run replaces (one of its own
/// names) or removes (a `model-IIIII-of-NNNNN.safetensors` of `dir` it does
/// not write). Indexes of other tools are never touched: they may be the
/// original model's, and only the mark says whose an index is.
fn own_indexes_naming_outputs(dir: &Path, plan: &Plan) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))? {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let by_name = KNOWN_INDEX_NAMES.contains(&name.as_str()) || name == plan.index_name;
        if by_name || name.starts_with('.') || !name.ends_with(".index.json") {
            continue;
        }
        let path = entry.path();
        // lstat: a link is not followed (our indexes are regular files).
        let small_file = std::fs::symlink_metadata(&path)
            .is_ok_and(|m| m.is_file() && m.len() <= MAX_INDEX_BYTES);
        if !small_file {
            continue;
        }
        // One that cannot be read or parsed is not ours to remove.
        let Ok(index) = std::fs::read(&path)
            .map_err(|_| ())
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|_| ()))
        else {
            continue;
        };
        let marked = index.pointer(&format!("/metadata/{INDEX_MARK_KEY}"))
            == Some(&serde_json::Value::from(INDEX_MARK));
        let names_outputs = index
            .get("weight_map")
            .and_then(|w| w.as_object())
            .is_some_and(|map| {
                map.values().filter_map(|f| f.as_str()).any(|file| {
                    plan.files.iter().any(|f| f.name == file)
                        || (parse_output_name(file).is_some()
                            && std::fs::symlink_metadata(dir.join(file)).is_ok())
                })
            });
        if marked && names_outputs {
            found.push(name);
        }
    }
    found.sort();
    Ok(found)
}

/// Rank 0 only, before publishing: checks what the ranks actually did
/// against the plan. Each rank reports the files it created
/// ([`RankReport::files`], from what `create_files` returned, not from the
/// plan), and every planned file must have been created by exactly one rank
/// (by none for a file kept from an earlier run). Each created file must
/// also be in `dir` under its temporary name: a regular file of its planned
/// length that begins with its planned header.
pub fn check_written_once(plan: &Plan, ranks: &[RankReport], dir: &Path) -> Result<()> {
    let mut written: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for report in ranks {
        for index in &report.files {
            written.entry(*index).or_default().push(report.rank);
        }
    }
    for (f, file) in plan.files.iter().enumerate() {
        let by = written.remove(&file.index).unwrap_or_default();
        let expected = usize::from(!plan.kept.contains(&f));
        if by.len() != expected {
            return Err(Error::ranks_disagree(
                format!(
                    "{} was created by {} rank(s) {by:?}, not {expected}",
                    file.name,
                    by.len()
                ),
                "all ranks must run the same command on the same inputs; rerun with --overwrite",
            ));
        }
        if expected == 1 {
            check_on_disk(&dir.join(temp_name(&file.name)), file.len(), &file.header)?;
        }
    }
    if let Some((index, by)) = written.into_iter().next() {
        return Err(Error::ranks_disagree(
            format!("rank(s) {by:?} created output {index}, which the plan does not have"),
            "all ranks must run the same command on the same inputs; rerun with --overwrite",
        ));
    }
    Ok(())
}

/// Checks that the written temporary `path` is a regular file of `len`
/// bytes that begins with `header`.
fn check_on_disk(path: &Path, len: u64, header: &[u8]) -> Result<()> {
    let changed = |what: String| {
        Error::usage(
            format!("{} {what}", path.display()),
            "another process changed OUTPUT_DIR during the run (it is locked for this run); stop it and rerun",
        )
    };
    let meta =
        std::fs::symlink_metadata(path).map_err(|e| Error::io("find the written", path, e))?;
    if !meta.is_file() || meta.len() != len {
        return Err(changed(format!(
            "is not the written file: {} bytes, not {len}",
            meta.len()
        )));
    }
    let mut start = vec![0u8; header.len()];
    std::fs::File::open(path)
        .and_then(|file| std::os::unix::fs::FileExt::read_exact_at(&file, &mut start, 0))
        .map_err(|e| Error::io("read the written", path, e))?;
    if start != header {
        return Err(changed("does not begin with its planned header".into()));
    }
    Ok(())
}

/// The Hugging Face index: total tensor bytes and the file of each tensor.
pub fn index_json(plan: &Plan) -> Vec<u8> {
    let weight_map: BTreeMap<&str, &str> = plan
        .files
        .iter()
        .flat_map(|file| {
            file.entries
                .iter()
                .map(move |e| (plan.tensors[e.tensor].name.as_str(), file.name.as_str()))
        })
        .collect();
    let index = serde_json::json!({
        "metadata": {"total_size": plan.total_bytes(), INDEX_MARK_KEY: INDEX_MARK},
        "weight_map": weight_map,
    });
    let mut text = serde_json::to_vec_pretty(&index).unwrap_or_default();
    text.push(b'\n');
    text
}

/// A file path's folder ("." for a bare name) and file name (as given: it
/// need not be UTF-8).
pub fn split_path(path: &Path) -> (&Path, &OsStr) {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    (dir, path.file_name().unwrap_or_default())
}
