//! The one rule for every path a run writes: it never replaces an input, and
//! the one path the user chooses freely (`--report`) never replaces a file
//! the run reads, a file the run itself writes, or anything already in
//! INPUT_DIR or the `--hf-assets` folder.
//!
//! Paths are compared where a rename would land: the canonical folder plus
//! the file name (renaming onto a symlink replaces the link, not its
//! target). Inputs are also recorded where they resolve, so a report named
//! like a link's target is caught too. OUTPUT_DIR inside INPUT_DIR, or equal
//! to it, is allowed: outputs are checked against the files the run reads,
//! not against every file of INPUT_DIR.

use crate::checkpoint::dcp::METADATA_FILE;
use crate::error::{Error, Result};
use crate::exec::lock::LOCK_NAME;
use crate::exec::output::is_temp_name;
use crate::plan::Plan;
use crate::safetensors::naming::parse_output_name;
use std::path::{Path, PathBuf};

/// What a run reads and writes besides the plan's own files, as the command
/// line names them.
pub struct RunPaths<'a> {
    /// INPUT_DIR as given.
    pub input_dir: &'a Path,
    /// `--mapping` or `--hf-index`, with its flag.
    pub mapping: Option<(&'static str, &'a Path)>,
    /// `--hf-assets DIR` and the names copied from it into OUTPUT_DIR.
    pub assets: Option<(&'a Path, &'a [String])>,
    /// `--report`.
    pub report: Option<&'a Path>,
}

/// The paths a run must not write over, resolved once.
pub struct Protected {
    /// Files the run reads while it runs, with what they are: never written.
    inputs: Vec<(PathBuf, String)>,
    /// The mapping file, read whole at the start: only the new index may
    /// replace it (`--hf-index OUTPUT_DIR/model.safetensors.index.json
    /// --overwrite` is documented as safe).
    mapping: Vec<(PathBuf, String)>,
    /// Folders whose existing files `--report` must not replace, with a name.
    folders: Vec<(PathBuf, &'static str)>,
    /// OUTPUT_DIR, canonical.
    output_dir: PathBuf,
    /// Names this run writes in OUTPUT_DIR, with what they are.
    own: Vec<(String, String)>,
    /// The index this run writes.
    index_name: String,
}

impl Protected {
    /// Resolves `paths`, with `plan.shards` the files the pieces live in
    /// (shards, or `.distcp` files); `output_dir` must exist. An input that
    /// cannot be resolved is left out: the reader has already opened every
    /// input, so one that vanished since is caught when identities are
    /// checked at publish.
    pub fn resolve(paths: &RunPaths, plan: &Plan, output_dir: &Path) -> Result<Protected> {
        let output_dir = canonical_dir(output_dir, "resolve OUTPUT_DIR")?;
        let mut inputs = Vec::new();
        for input in &plan.shards {
            inputs.extend(both_forms(
                input,
                format!("the input file {}", input.display()),
            ));
        }
        let metadata = paths.input_dir.join(METADATA_FILE);
        if std::fs::symlink_metadata(&metadata).is_ok() {
            let what = format!("the checkpoint's {}", metadata.display());
            inputs.extend(both_forms(&metadata, what));
        }
        let mapping = match paths.mapping {
            Some((flag, path)) => both_forms(path, format!("the {flag} file {}", path.display())),
            None => vec![],
        };
        let mut folders = vec![(
            canonical_dir(paths.input_dir, "resolve INPUT_DIR")?,
            "INPUT_DIR",
        )];
        // The shards' own folder (INPUT_DIR/sharded for PyTorch's layout).
        for input in &plan.shards {
            let folder = input.parent().and_then(|p| p.canonicalize().ok());
            if let Some(folder) = folder.filter(|f| !folders.iter().any(|(known, _)| known == f)) {
                folders.push((folder, "INPUT_DIR"));
            }
        }
        let mut own: Vec<(String, String)> = plan
            .files
            .iter()
            .map(|file| (file.name.clone(), "an output file of this run".to_string()))
            .collect();
        own.push((plan.index_name.clone(), "the index this run writes".into()));
        own.push((LOCK_NAME.into(), "the lock this run holds".into()));
        if let Some((dir, names)) = paths.assets {
            let folder = canonical_dir(dir, "resolve the --hf-assets folder")?;
            folders.push((folder, "the --hf-assets folder"));
            for name in names {
                let source = dir.join(name);
                let what = format!("the --hf-assets file {}", source.display());
                inputs.extend(both_forms(&source, what));
                own.push((name.clone(), "a --hf-assets file this run copies".into()));
            }
        }
        Ok(Protected {
            inputs,
            mapping,
            folders,
            output_dir,
            own,
            index_name: plan.index_name.clone(),
        })
    }

    /// Refuses a file this run writes into OUTPUT_DIR that is one of its
    /// inputs.
    pub fn check_outputs(&self) -> Result<()> {
        for (name, what) in &self.own {
            let target = self.output_dir.join(name);
            // `--hf-index OUTPUT_DIR/<the index>` is read into memory at the
            // start: the new index may replace it.
            let mapping = || match name == &self.index_name {
                true => None,
                false => find(&self.mapping, &target),
            };
            if let Some(input) = find(&self.inputs, &target).or_else(mapping) {
                return Err(Error::usage(
                    format!("{} ({what}) would overwrite {input}", target.display()),
                    "choose an OUTPUT_DIR that holds none of the run's inputs",
                ));
            }
        }
        Ok(())
    }

    /// Refuses a `--report` path that would replace anything the run reads
    /// or writes, or any file already in INPUT_DIR or the assets folder.
    pub fn check_report(&self, report: &Path) -> Result<()> {
        let target = landing(report).ok_or_else(|| {
            Error::usage(
                format!(
                    "cannot find the folder of --report {}: it must exist",
                    report.display()
                ),
                "create the folder first, or choose a report path in an existing folder",
            )
        })?;
        match self.replaced_by_report(&target) {
            None => Ok(()),
            Some(what) => Err(Error::usage(
                format!("--report {} would replace {what}", report.display()),
                "choose a report path that is no input, no file this run writes in OUTPUT_DIR \
                 and no existing file of INPUT_DIR or the --hf-assets folder, e.g. a new name \
                 beside OUTPUT_DIR",
            )),
        }
    }

    /// What a report renamed onto `target` would replace, if anything.
    fn replaced_by_report(&self, target: &Path) -> Option<String> {
        if target.is_dir() {
            return Some(format!("the folder {}", target.display()));
        }
        if let Some(input) = find(&self.inputs, target).or_else(|| find(&self.mapping, target)) {
            return Some(input);
        }
        let (folder, name) = (target.parent()?, file_name(target)?);
        let shown = target.display();
        if folder == self.output_dir {
            if let Some((_, what)) = self.own.iter().find(|(own, _)| *own == name) {
                return Some(format!("{shown}, {what}"));
            }
            if is_temp_name(&name) {
                return Some(format!(
                    "{shown}, a temporary name of the runs into OUTPUT_DIR (removed as stale)"
                ));
            }
            if parse_output_name(&name).is_some() {
                return Some(format!(
                    "{shown}, a consolidated output name (an older set is removed at publish)"
                ));
            }
        }
        let (_, which) = self.folders.iter().find(|(f, _)| f == folder)?;
        let exists = std::fs::symlink_metadata(target).is_ok();
        exists.then(|| format!("the existing file {shown} of {which}"))
    }
}

/// What, among `files`, lives at `target`.
fn find(files: &[(PathBuf, String)], target: &Path) -> Option<String> {
    files
        .iter()
        .find(|(path, _)| path == target)
        .map(|(_, what)| what.clone())
}

/// A file read by the run, where a rename would land on it and where it
/// resolves (its target, for a symlink).
fn both_forms(path: &Path, what: String) -> Vec<(PathBuf, String)> {
    [landing(path), path.canonicalize().ok()]
        .into_iter()
        .flatten()
        .map(|form| (form, what.clone()))
        .collect()
}

/// Where a rename onto `path` lands: its folder resolved, plus its name.
fn landing(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?;
    let folder = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    Some(folder.canonicalize().ok()?.join(name))
}

fn file_name(path: &Path) -> Option<String> {
    path.file_name().map(|n| n.to_string_lossy().into_owned())
}

fn canonical_dir(dir: &Path, action: &'static str) -> Result<PathBuf> {
    dir.canonicalize().map_err(|e| Error::io(action, dir, e))
}
