//! This rank's share of the writing: its output files created and sized
//! under temporary names, its work items copied, everything it wrote synced;
//! and how many copy threads a rank uses.

use crate::error::{Error, Result};
use crate::exec::cancel::Cancel;
use crate::exec::copy::{check_replicas, copy_item};
use crate::exec::output::{PendingFile, temp_name};
use crate::plan::Plan;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::time::Instant;

/// Seconds spent in the phases of [`copy_and_sync`].
#[derive(Debug, Default)]
pub struct WriteTiming {
    /// Seconds copying.
    pub copy: f64,
    /// Seconds syncing.
    pub sync: f64,
}

/// Creates this rank's files under temporary names, sized, with their
/// headers, after checking their replicated pieces (not the files kept from
/// an earlier run).
pub fn create_files(dir: &Path, plan: &Plan, rank: usize) -> Result<BTreeMap<usize, PendingFile>> {
    let mut created = BTreeMap::new();
    for f in plan.files_to_write(rank) {
        let file = &plan.files[f];
        let out = PendingFile::create(dir, &file.name, file.len())?;
        std::os::unix::fs::FileExt::write_all_at(out.file(), &file.header, 0)
            .map_err(|e| Error::io("write", out.temp_path(), e))?;
        check_replicas(plan, f)?;
        created.insert(f, out);
    }
    Ok(created)
}

/// Copies this rank's work items, into its own files or (balanced schedule)
/// into ranges of files other ranks created, then syncs every file it wrote.
pub fn copy_and_sync(
    dir: &Path,
    plan: &Plan,
    rank: usize,
    created: &BTreeMap<usize, PendingFile>,
    copied: &AtomicU64,
    cancel: &Cancel,
) -> Result<WriteTiming> {
    let started = Instant::now();
    let items = plan.work_items(rank);
    // Every file this rank writes to that another rank owns, opened for
    // writing in place (never created or truncated here). Its own files are
    // used through their open handles: no second descriptor per file.
    let mut others: BTreeMap<usize, (File, PathBuf)> = BTreeMap::new();
    for item in &items {
        if created.contains_key(&item.file) || others.contains_key(&item.file) {
            continue;
        }
        let path = dir.join(temp_name(&plan.files[item.file].name));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("open for writing", &path, e))?;
        others.insert(item.file, (file, path));
    }
    let target = |f: usize| -> (&File, &Path) {
        match created.get(&f) {
            Some(out) => (out.file(), out.temp_path()),
            None => (&others[&f].0, others[&f].1.as_path()),
        }
    };
    items.par_iter().try_for_each(|item| {
        let (file, path) = target(item.file);
        copy_item(plan, item, file, path, copied, cancel)
    })?;
    let copy_done = Instant::now();
    // Its own files (even those with no data: their header is written) and
    // every range it wrote into another's.
    let mut written: Vec<usize> = created
        .keys()
        .copied()
        .chain(others.keys().copied())
        .collect();
    written.sort_unstable();
    written.par_iter().try_for_each(|&f| {
        // A cancelled run removes these files: no need to wait for them.
        cancel.check()?;
        let (file, path) = target(f);
        file.sync_all().map_err(|e| Error::io("sync", path, e))
    })?;
    Ok(WriteTiming {
        copy: (copy_done - started).as_secs_f64(),
        sync: copy_done.elapsed().as_secs_f64(),
    })
}

/// Threads per rank when `--threads` is not given. If the launcher bound
/// this rank to some cores (mpirun binds to a core by default for small
/// jobs), those cores are this rank's alone; otherwise the node's cores are
/// shared among the ranks on it. At least one.
pub fn default_threads(ranks_on_node: usize) -> usize {
    let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
    let online = online_cpus().unwrap_or(allowed);
    if allowed < online {
        allowed
    } else {
        (online / ranks_on_node.max(1)).max(1)
    }
}

/// CPUs online on this node, from `/sys/devices/system/cpu/online`
/// (a list of ranges such as `0-3,8-11`).
fn online_cpus() -> Option<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    text.trim().split(',').try_fold(0, |count, range| {
        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
        let (lo, hi): (usize, usize) = (lo.parse().ok()?, hi.parse().ok()?);
        Some(count + hi.checked_sub(lo)? + 1)
    })
}
