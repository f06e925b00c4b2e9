//! The flow of a run, for any communicator:
//! read headers → plan → agree → prepare OUTPUT_DIR (rank 0) → agree →
//! create my files → agree → copy and sync my work items (with progress) →
//! agree → [verify → agree] → rename my files → agree → gather reports →
//! rank 0 writes the index and report → agree.
//!
//! Every phase ends in one collective where all ranks learn whether any rank
//! failed, so a failing rank never leaves the others waiting, and only the
//! lowest failing rank reports its error.

use crate::checkpoint::hf_shards::sharding::index_pieces;
use crate::checkpoint::hf_shards::{
    HeaderReading, ParsedShard, assemble, list_shard_files, read_shards,
};
use crate::checkpoint::identity::{self, FileIdentity};
use crate::comm::Communicator;
use crate::error::{Error, Result, shown};
use crate::exec::convert::output_dtype;
use crate::exec::copy::{check_replicas, copy_item};
use crate::exec::lock::{Holder, OutputLock, host_name, read_token};
use crate::exec::output::{PendingFile, remove_stale_temps, sync_dir, temp_name};
use crate::exec::verify::{compare, existing_targets, written_targets};
use crate::plan::mapping::{MappingSource, Unmapped, assign};
use crate::plan::names::strip_prefixes;
use crate::plan::{Plan, Schedule};
use crate::progress::{Counters, FinishOnDrop, watch};
use crate::report::{RankReport, RunReport};
use crate::safetensors::dtype::Dtype;
use crate::safetensors::naming::parse_output_name;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use std::time::Instant;

pub use crate::safetensors::naming::INDEX_NAME;

/// What to do, from the command line.
#[derive(Clone, Debug)]
pub struct Config {
    /// Folder of shard files.
    pub input: PathBuf,
    /// Folder for the consolidated files.
    pub output: PathBuf,
    /// Where the tensor-to-file assignment comes from.
    pub mapping: MappingSource,
    /// What to do with tensors the mapping does not name.
    pub unmapped: Unmapped,
    /// Worker threads per rank; `None` picks cores ÷ ranks on the node.
    pub threads: Option<usize>,
    /// Print the plan and write nothing.
    pub dry_run: bool,
    /// Plan for this many ranks instead of the job's (with `dry_run`).
    pub plan_ranks: Option<usize>,
    /// Replace existing consolidated outputs.
    pub overwrite: bool,
    /// Read every written byte back and compare it with the shards before
    /// the files get their final names.
    pub verify: bool,
    /// Write nothing; check an existing output in `output` against the shards.
    pub verify_only: bool,
    /// Accept a shard file set with (rank, index) files missing.
    pub allow_missing_shard_files: bool,
    /// How many ranks saved the checkpoint, if the user knows.
    pub source_ranks: Option<u32>,
    /// Print only errors.
    pub quiet: bool,
    /// Also print per-rank detail.
    pub verbose: bool,
    /// Seconds between progress reports; zero turns them off.
    pub progress_secs: f64,
    /// Where rank 0 writes the JSON run report, if anywhere.
    pub report: Option<PathBuf>,
    /// Prefixes stripped from output tensor names (first match wins).
    pub strip_prefixes: Vec<String>,
    /// The command line, for the report.
    pub command_line: Vec<String>,
    /// Convert floating-point tensors to this dtype (`--dtype`).
    pub dtype: Option<Dtype>,
    /// How output bytes are split among ranks.
    pub schedule: Schedule,
    /// Whether every rank reads every header, or each reads a share.
    pub headers: HeaderReading,
}

/// What a finished run did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    /// Output files written (by all ranks).
    pub files: usize,
    /// Tensor bytes written (by all ranks).
    pub bytes: u64,
    /// Wall time of the whole run on this rank.
    pub seconds: f64,
}

/// Runs a consolidation on this rank. Every rank must call it.
pub fn run(config: &Config, comm: &dyn Communicator) -> Result<Summary> {
    let started = Instant::now();
    let (rank, size) = (comm.rank(), comm.size());
    let say = |text: &str| {
        if rank == 0 && !config.quiet {
            eprintln!("{text}");
        }
    };
    let threads = config
        .threads
        .unwrap_or_else(|| default_threads(comm.ranks_on_node()));
    // Agreed on like every other phase: one node refusing threads must not
    // leave the other ranks waiting at the next collective.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| {
            Error::usage(
                format!("cannot start {threads} threads: {e}"),
                "pass a smaller --threads",
            )
        });
    let pool = agree(comm, pool)?;

    let plan_ranks = config.plan_ranks.filter(|_| config.dry_run).unwrap_or(size);
    let (parsed, headers_read) = read_headers(config, comm, &pool)?;
    let plan = agree(comm, pool.install(|| make_plan(config, plan_ranks, parsed)))?;
    agree(comm, same_plan_everywhere(comm, &plan))?;
    for name in &plan.missing {
        say(&format!(
            "warning: '{}' is in the mapping but in no shard; it is left out",
            shown(name)
        ));
    }
    if config.dry_run {
        if rank == 0 {
            print!("{}", describe(&plan));
        }
        return Ok(Summary::default());
    }
    if config.verify_only {
        let local = pool.install(|| {
            let (targets, mut problems) = existing_targets(&plan, &config.output, rank, size)?;
            problems.extend(compare(&plan, &targets)?);
            Ok(problems)
        });
        let problems = agree(comm, local)?;
        agree(comm, collect_mismatches(comm, &problems))?;
        say(&format!(
            "verified {} tensors ({}) in {} against {} shard files: all equal",
            plan.tensors.len(),
            human_bytes(plan.total_bytes()),
            config.output.display(),
            plan.shards.len()
        ));
        return Ok(Summary {
            files: 0,
            bytes: plan.total_bytes(),
            seconds: started.elapsed().as_secs_f64(),
        });
    }

    // Rank 0 locks OUTPUT_DIR for the whole run before touching it; every
    // rank then proves it sees that same folder.
    let inputs = if rank == 0 {
        identity::record(&plan.shards).map(Some)
    } else {
        Ok(None)
    };
    let inputs = agree(comm, inputs)?;
    let lock = if rank == 0 {
        prepare_output_dir(config, &plan).map(Some)
    } else {
        Ok(None)
    };
    let lock = agree(comm, lock)?;
    agree(comm, same_output_dir(comm, &config.output, lock.as_ref()))?;
    say(&format!(
        "consolidating {} tensors ({}) from {} shard files into {} files on {size} rank(s) x {threads} thread(s)",
        plan.tensors.len(),
        human_bytes(plan.total_bytes()),
        plan.shards.len(),
        plan.files.len()
    ));

    // Owners create and size their files before anyone writes to them
    // (under the balanced schedule, other ranks write into them too).
    let created = pool.install(|| create_files(config, &plan, rank));
    let created = agree(comm, created)?;
    let counters = Counters::default();
    let written = std::thread::scope(|scope| {
        let worker = scope.spawn(|| {
            let _finish = FinishOnDrop(&counters);
            pool.install(|| copy_and_sync(config, &plan, rank, &created, &counters.copied))
        });
        if config.progress_secs > 0.0 && !config.quiet {
            let interval = Duration::from_secs_f64(config.progress_secs);
            watch(comm, interval, plan.total_bytes(), &counters, rank == 0);
        }
        worker.join().unwrap_or_else(|_| {
            Err(Error::usage(
                "a copy thread panicked",
                "this is a bug; please report it with the command line",
            ))
        })
    });
    let timing = agree(comm, written)?;
    let pending: Vec<PendingFile> = created.into_values().collect();
    if config.verbose {
        let bytes = plan.bytes_per_rank()[rank];
        eprintln!(
            "rank {rank}: {} files, {} copied in {:.2} s ({:.2} GB/s), synced in {:.2} s",
            pending.len(),
            human_bytes(bytes),
            timing.copy,
            bytes as f64 / 1e9 / timing.copy.max(1e-9),
            timing.sync
        );
    }
    if config.verify {
        let temp_paths: Vec<PathBuf> = pending.iter().map(|p| p.temp_path().to_owned()).collect();
        let targets = written_targets(&plan, rank, &temp_paths);
        let mismatches = agree(comm, pool.install(|| compare(&plan, &targets)))?;
        agree(comm, collect_mismatches(comm, &mismatches))?;
        say("verified: every written byte equals the shards");
    }
    let mine = RankReport {
        rank,
        files: plan
            .files_of(rank)
            .iter()
            .map(|&f| plan.files[f].index)
            .collect(),
        bytes: plan.bytes_per_rank()[rank],
        seconds: started.elapsed().as_secs_f64(),
        threads,
        header_files_read: headers_read,
    };
    let payload = serde_json::to_vec(&mine).unwrap_or_default();
    // Publishing: everything is written and synced under temporary names
    // first (rank 0: report and index), then only renames remain, with the
    // index last. A failure before the renames leaves OUTPUT_DIR as it was.
    let staged = match comm.gather(&payload) {
        Some(reports) => {
            stage_index_and_report(config, &plan, &reports, inputs.as_deref()).map(Some)
        }
        None => Ok(None),
    };
    let staged = agree(comm, staged)?;
    // An old index goes before any model file is replaced, so that a crash
    // part-way never leaves an index describing a mix of old and new files.
    let retired = match &staged {
        Some(_) => retire_old_index(&config.output),
        None => Ok(()),
    };
    agree(comm, retired)?;
    let committed = pending
        .into_iter()
        .try_for_each(|file| file.commit().map(drop))
        .and_then(|()| sync_dir(&config.output));
    agree(comm, committed)?;
    let finished = match staged {
        Some(staged) => staged.commit(config, &plan).map(Some),
        None => Ok(None),
    };
    if let Some(report) = agree(comm, finished)? {
        say(&report.human(&config.output.display().to_string()));
    }
    drop(lock);
    Ok(Summary {
        files: plan.files.len(),
        bytes: plan.total_bytes(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Rank 0's part of publishing, written and synced but not yet in place.
struct Staged {
    report: RunReport,
    report_file: Option<PendingFile>,
    index_file: PendingFile,
}

impl Staged {
    /// Puts the report and then the index in place, and removes files of an
    /// older output set that the new index does not list (`--overwrite`).
    fn commit(self, config: &Config, plan: &Plan) -> Result<RunReport> {
        if let Some(report_file) = self.report_file {
            let path = report_file.commit()?;
            sync_dir(split_path(&path).0)?;
        }
        self.index_file.commit()?;
        sync_dir(&config.output)?;
        remove_older_outputs(&config.output, plan)?;
        Ok(self.report)
    }
}

/// Rank 0 only: reads every rank's report, checks each planned file was
/// written exactly once and no input changed, and writes the JSON report
/// (if asked) and the index under temporary names.
fn stage_index_and_report(
    config: &Config,
    plan: &Plan,
    payloads: &[Vec<u8>],
    inputs: Option<&[FileIdentity]>,
) -> Result<Staged> {
    let ranks: Vec<RankReport> = payloads
        .iter()
        .enumerate()
        .map(|(rank, bytes)| {
            serde_json::from_slice(bytes).map_err(|e| {
                Error::usage(
                    format!("rank {rank} sent an unreadable report: {e}"),
                    "all ranks must run the same st-consolidate-mpi binary",
                )
            })
        })
        .collect::<Result<_>>()?;
    check_written_once(plan, &ranks)?;
    if let Some(inputs) = inputs {
        identity::check_unchanged(&plan.shards, inputs)?;
    }
    let report = RunReport::new(
        plan,
        &config.input.display().to_string(),
        config.command_line.clone(),
        &ranks,
        config.verify,
    );
    let report_file = match &config.report {
        Some(path) => {
            let (dir, name) = split_path(path);
            let mut json = serde_json::to_vec_pretty(&report).unwrap_or_default();
            json.push(b'\n');
            Some(PendingFile::with_contents(dir, &name, &json)?)
        }
        None => None,
    };
    let index_file = PendingFile::with_contents(&config.output, INDEX_NAME, &index_json(plan))?;
    Ok(Staged {
        report,
        report_file,
        index_file,
    })
}

/// A file path's folder ("." for a bare name) and file name.
fn split_path(path: &Path) -> (&Path, String) {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    (dir, name)
}

/// Collective: every rank checks that all ranks built the same plan. Ranks
/// on different nodes list and read INPUT_DIR on their own; a stale
/// listing or a copy still in progress would otherwise have them write
/// different layouts into the same files.
fn same_plan_everywhere(comm: &dyn Communicator, plan: &Plan) -> Result<()> {
    let digests = comm.all_gather(&plan.fingerprint());
    match digests.iter().position(|d| d != &digests[0]) {
        None => Ok(()),
        Some(rank) => Err(Error::usage(
            format!(
                "rank {rank} built a different plan from rank 0: the ranks see different shard files or headers"
            ),
            "make sure every node sees the same, complete INPUT_DIR (wait for copies to finish; on NFS, check attribute caching) and runs the same command",
        )),
    }
}

/// Collective: gathers every rank's mismatch lines to rank 0, which fails
/// with all of them if there are any.
fn collect_mismatches(comm: &dyn Communicator, mine: &[String]) -> Result<()> {
    let payload = serde_json::to_vec(mine).unwrap_or_default();
    let Some(all) = comm.gather(&payload) else {
        return Ok(());
    };
    let mut mismatches = Vec::new();
    for (rank, bytes) in all.iter().enumerate() {
        // An unreadable list must never pass for an empty one.
        let lines: Vec<String> = serde_json::from_slice(bytes).map_err(|e| {
            Error::usage(
                format!("rank {rank} sent an unreadable verification result: {e}"),
                "all ranks must run the same st-consolidate-mpi binary; the output was not published",
            )
        })?;
        mismatches.extend(lines);
    }
    if mismatches.is_empty() {
        Ok(())
    } else {
        Err(Error::Mismatch { mismatches })
    }
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

/// Turns this rank's result into the job's: if any rank failed, every rank
/// returns an error, but only the lowest failing rank returns its own.
fn agree<T>(comm: &dyn Communicator, result: Result<T>) -> Result<T> {
    match comm.lowest_failed(result.is_err()) {
        Some(failed) if failed != comm.rank() => Err(Error::PeerFailed(failed)),
        _ => result,
    }
}

/// Collective: the parsed headers of every shard file, on every rank, and
/// how many of them this rank read itself. With `--headers all` each rank
/// reads them all; with `shared` each reads every size-th file and the ranks
/// exchange what they validated.
fn read_headers(
    config: &Config,
    comm: &dyn Communicator,
    pool: &rayon::ThreadPool,
) -> Result<(Vec<ParsedShard>, usize)> {
    let files = agree(comm, list_shard_files(&config.input))?;
    let (rank, size) = (comm.rank(), comm.size());
    if config.headers == HeaderReading::All || size == 1 {
        let parsed = agree(comm, pool.install(|| read_shards(&files)))?;
        return Ok((parsed, files.len()));
    }
    let mine: Vec<PathBuf> = files.iter().skip(rank).step_by(size).cloned().collect();
    let encoded = pool.install(|| read_shards(&mine)).and_then(|parsed| {
        serde_json::to_vec(&parsed).map_err(|e| {
            Error::usage(
                format!("cannot encode the headers read on rank {rank}: {e}"),
                "shard paths must be valid UTF-8 for --headers shared; use --headers all",
            )
        })
    });
    let encoded = agree(comm, encoded)?;
    let parts = comm.all_gather(&encoded);
    let garbled = |what: String| {
        Error::usage(
            what,
            "all ranks must run the same st-consolidate-mpi binary",
        )
    };
    let decoded: Result<Vec<Vec<ParsedShard>>> = parts
        .iter()
        .map(|bytes| {
            serde_json::from_slice(bytes)
                .map_err(|e| garbled(format!("unreadable header summary: {e}")))
        })
        .collect();
    // File i was read by rank i % size, as its (i / size)-th file.
    let ordered = decoded.and_then(|per_rank| {
        let mut per_rank: Vec<_> = per_rank.into_iter().map(Vec::into_iter).collect();
        (0..files.len())
            .map(|i| {
                per_rank[i % size]
                    .next()
                    .ok_or_else(|| garbled("a rank sent fewer headers than it read".into()))
            })
            .collect::<Result<Vec<_>>>()
    });
    Ok((agree(comm, ordered)?, mine.len()))
}

/// Builds the plan from every shard's parsed header (identical on every rank).
pub fn make_plan(config: &Config, world_size: usize, parsed: Vec<ParsedShard>) -> Result<Plan> {
    let checkpoint = assemble(
        &config.input,
        parsed,
        config.allow_missing_shard_files,
        config.source_ranks,
    )?;
    let mut tensors = index_pieces(&checkpoint.shards, &checkpoint.infos)?;
    strip_prefixes(&mut tensors, &config.strip_prefixes)?;
    let sizes: Vec<(&str, u64)> = tensors
        .iter()
        .map(|t| {
            let size = output_dtype(t.dtype, config.dtype).size();
            (t.name.as_str(), t.element_count() * size)
        })
        .collect();
    let assignment = assign(&sizes, &config.mapping, config.unmapped)?;
    let shards = checkpoint.shards.into_iter().map(|s| s.path).collect();
    let mut plan = Plan::build(shards, tensors, assignment, world_size, config.dtype)?;
    plan.schedule = config.schedule;
    Ok(plan)
}

/// Rank 0 only: creates OUTPUT_DIR and locks it for this run, refuses to
/// clobber inputs or (without `--overwrite`) earlier outputs, and removes
/// temporaries of killed runs. Nothing already there is replaced or removed
/// here: `--overwrite` takes effect only when the new output is published.
fn prepare_output_dir(config: &Config, plan: &Plan) -> Result<OutputLock> {
    let dir = &config.output;
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create OUTPUT_DIR", dir, e))?;
    // Before anything else in the folder: another run may be writing there.
    let lock = OutputLock::acquire(dir, &Holder::me())?;
    let mut finals: Vec<String> = plan.files.iter().map(|f| f.name.clone()).collect();
    finals.push(INDEX_NAME.to_string());
    let inputs: Vec<PathBuf> = plan
        .shards
        .iter()
        .filter_map(|p| p.canonicalize().ok())
        .collect();
    let canonical_dir = dir
        .canonicalize()
        .map_err(|e| Error::io("resolve", dir, e))?;
    for name in &finals {
        let target = canonical_dir.join(name);
        if inputs.contains(&target) {
            return Err(Error::usage(
                format!("output {} would overwrite an input shard", target.display()),
                "choose an OUTPUT_DIR that does not hold the shard files",
            ));
        }
    }
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
    if let Some(report) = &config.report {
        check_report_path(config, report, &canonical_dir, &finals, &inputs)?;
    }
    if !existing.is_empty() && !config.overwrite {
        return Err(Error::usage(
            format!(
                "OUTPUT_DIR {} already holds {}",
                dir.display(),
                existing.join(", ")
            ),
            "pass --overwrite to replace them (they stay until the new output is complete), or choose another OUTPUT_DIR",
        ));
    }
    remove_stale_temps(dir)?;
    // Prove OUTPUT_DIR is writable before any rank starts copying.
    drop(PendingFile::create(dir, ".write-probe", 0)?);
    Ok(lock)
}

/// The consolidated outputs already in `dir`: this plan's final names and
/// any other `model-IIIII-of-NNNNN.safetensors` (an older set of another
/// size), by `lstat`, so symlinks count whatever they point to.
fn existing_outputs(dir: &Path, plan: &Plan) -> Result<Vec<String>> {
    let mut names: Vec<String> = plan
        .files
        .iter()
        .map(|f| f.name.clone())
        .chain([INDEX_NAME.to_string()])
        .filter(|name| std::fs::symlink_metadata(dir.join(name)).is_ok())
        .collect();
    for older in older_outputs(dir, plan)? {
        names.push(older);
    }
    names.sort();
    Ok(names)
}

/// Collective: every rank reads the lock token rank 0 wrote in OUTPUT_DIR
/// and all compare, so that a node-local OUTPUT_DIR (each node writing into
/// a folder of its own under the same path) is refused before any byte is
/// written. The ranks and hosts that do not see rank 0's folder are named.
fn same_output_dir(comm: &dyn Communicator, dir: &Path, lock: Option<&OutputLock>) -> Result<()> {
    let seen = match lock {
        Some(lock) => lock.token().to_vec(),
        None => read_token_patiently(dir),
    };
    let mine = serde_json::to_vec(&(host_name(), seen)).unwrap_or_default();
    let all = comm.all_gather(&mine);
    let decoded: Vec<(String, Vec<u8>)> = all
        .iter()
        .map(|bytes| serde_json::from_slice(bytes).unwrap_or_default())
        .collect();
    let expected = &decoded[0].1;
    let blind: Vec<String> = decoded
        .iter()
        .enumerate()
        .filter(|(_, (_, token))| token != expected || token.is_empty())
        .map(|(rank, (host, _))| format!("rank {rank} on {host}"))
        .collect();
    if blind.is_empty() {
        return Ok(());
    }
    Err(Error::usage(
        format!(
            "OUTPUT_DIR {} is not the same folder on every rank: {} do(es) not see the folder rank 0 on {} prepared",
            dir.display(),
            blind.join(", "),
            decoded[0].0
        ),
        "OUTPUT_DIR must be on a filesystem shared by every node (not node-local scratch such as /tmp); nothing was written",
    ))
}

/// The lock token in `dir`, waiting briefly for it to appear, since a shared
/// filesystem may show a new file on other nodes a moment later. Empty if it
/// never does.
fn read_token_patiently(dir: &Path) -> Vec<u8> {
    for attempt in 0..10 {
        match read_token(dir) {
            Ok(token) => return token,
            Err(_) if attempt < 9 => std::thread::sleep(Duration::from_millis(200)),
            Err(_) => {}
        }
    }
    Vec::new()
}

/// Rank 0, at publish: removes the index of an earlier output (`--overwrite`).
fn retire_old_index(dir: &Path) -> Result<()> {
    let index = dir.join(INDEX_NAME);
    match std::fs::remove_file(&index) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io("remove the old", &index, e))
        }
        _ => Ok(()),
    }
}

/// Rank 0, after the new index is in place: removes the files of an older
/// output set that the new index does not list (`--overwrite` only gets
/// here with such files present).
fn remove_older_outputs(dir: &Path, plan: &Plan) -> Result<()> {
    for name in older_outputs(dir, plan)? {
        let path = dir.join(&name);
        std::fs::remove_file(&path).map_err(|e| Error::io("remove the older output", &path, e))?;
    }
    Ok(())
}

/// `model-IIIII-of-NNNNN.safetensors` entries in `dir` that are not in `plan`.
fn older_outputs(dir: &Path, plan: &Plan) -> Result<Vec<String>> {
    let mut older = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))? {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if parse_output_name(&name).is_some() && !plan.files.iter().any(|f| f.name == name) {
            older.push(name);
        }
    }
    older.sort();
    Ok(older)
}

/// Seconds spent in the phases of [`write_files`].
#[derive(Debug, Default)]
struct WriteTiming {
    copy: f64,
    sync: f64,
}

/// The `--report` file must go in an existing folder and must not replace an
/// input (a shard, the mapping) or an output.
fn check_report_path(
    config: &Config,
    report: &Path,
    output_dir: &Path,
    finals: &[String],
    inputs: &[PathBuf],
) -> Result<()> {
    let (dir, name) = split_path(report);
    let dir = dir
        .canonicalize()
        .map_err(|e| Error::io("find the folder of --report", dir, e))?;
    let target = dir.join(&name);
    let mapping = match &config.mapping {
        MappingSource::Mapping(path) | MappingSource::HfIndex(path) => path.canonicalize().ok(),
        _ => None,
    };
    let clobbers = inputs.contains(&target)
        || mapping.as_ref() == Some(&target)
        || (dir == output_dir && finals.contains(&name));
    if clobbers || target.is_dir() {
        return Err(Error::usage(
            format!(
                "--report {} would replace an input or output",
                report.display()
            ),
            "choose another file name for the report",
        ));
    }
    Ok(())
}

/// Creates this rank's files under temporary names, sized, with their
/// headers, after checking their replicated pieces.
fn create_files(config: &Config, plan: &Plan, rank: usize) -> Result<BTreeMap<usize, PendingFile>> {
    let mut created = BTreeMap::new();
    for f in plan.files_of(rank) {
        let file = &plan.files[f];
        let out = PendingFile::create(&config.output, &file.name, file.len())?;
        std::os::unix::fs::FileExt::write_all_at(out.file(), &file.header, 0)
            .map_err(|e| Error::io("write", out.temp_path(), e))?;
        check_replicas(plan, f)?;
        created.insert(f, out);
    }
    Ok(created)
}

/// Copies this rank's work items, into its own files or (balanced schedule)
/// into ranges of files other ranks created, then syncs every file it wrote.
fn copy_and_sync(
    config: &Config,
    plan: &Plan,
    rank: usize,
    created: &BTreeMap<usize, PendingFile>,
    copied: &AtomicU64,
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
        let path = config.output.join(temp_name(&plan.files[item.file].name));
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
        copy_item(plan, item, file, path, copied)
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
        let (file, path) = target(f);
        file.sync_all().map_err(|e| Error::io("sync", path, e))
    })?;
    Ok(WriteTiming {
        copy: (copy_done - started).as_secs_f64(),
        sync: copy_done.elapsed().as_secs_f64(),
    })
}

/// Rank 0 only: checks that every planned file was reported written by
/// exactly one rank.
fn check_written_once(plan: &Plan, ranks: &[RankReport]) -> Result<()> {
    let mut written: BTreeMap<u32, usize> = BTreeMap::new();
    for index in ranks.iter().flat_map(|r| &r.files) {
        *written.entry(*index).or_default() += 1;
    }
    for file in &plan.files {
        if written.get(&file.index) != Some(&1) {
            return Err(Error::usage(
                format!(
                    "{} was written {} times, not once",
                    file.name,
                    written.get(&file.index).unwrap_or(&0)
                ),
                "all ranks must run the same command on the same inputs; rerun with --overwrite",
            ));
        }
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
        "metadata": {"total_size": plan.total_bytes()},
        "weight_map": weight_map,
    });
    let mut text = serde_json::to_vec_pretty(&index).unwrap_or_default();
    text.push(b'\n');
    text
}

/// The `--dry-run` report: files, tensors, bytes, owners, bytes per rank.
pub fn describe(plan: &Plan) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "plan: {} tensors, {} from {} shard files into {} output files on {} rank(s)\n",
        plan.tensors.len(),
        human_bytes(plan.total_bytes()),
        plan.shards.len(),
        plan.files.len(),
        plan.world_size
    ));
    out.push_str(&format!(
        "{:<36} {:>8} {:>14} {:>6}\n",
        "file", "tensors", "bytes", "rank"
    ));
    for file in &plan.files {
        out.push_str(&format!(
            "{:<36} {:>8} {:>14} {:>6}\n",
            file.name,
            file.entries.len(),
            file.len(),
            file.owner
        ));
    }
    out.push_str(&format!(
        "{:<10} {:>9} {:>16} {:>16} {:>11}{}\n",
        "schedule",
        "max/mean",
        "max bytes/rank",
        "mean bytes/rank",
        "idle ranks",
        if plan.world_size <= 16 {
            "   bytes per rank"
        } else {
            ""
        }
    ));
    for schedule in [Schedule::Modulo, Schedule::Balanced] {
        let mut variant = plan.clone();
        variant.schedule = schedule;
        let balance = Balance::of(&variant);
        out.push_str(&format!(
            "{:<10} {:>9.3} {:>16} {:>16.0} {:>11}",
            format!("{schedule:?}").to_lowercase(),
            balance.max_over_mean,
            balance.max,
            balance.mean,
            balance.idle
        ));
        if plan.world_size <= 16 {
            out.push_str("   ");
            out.push_str(
                &balance
                    .per_rank
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
        if schedule == plan.schedule {
            out.push_str("   (selected)");
        }
        out.push('\n');
    }
    out
}

/// How evenly a plan spreads bytes over its ranks.
#[derive(Clone, Debug, PartialEq)]
pub struct Balance {
    /// Tensor bytes per rank.
    pub per_rank: Vec<u64>,
    /// The busiest rank's bytes.
    pub max: u64,
    /// Mean bytes per rank.
    pub mean: f64,
    /// max / mean (1.0 is perfect).
    pub max_over_mean: f64,
    /// Ranks with nothing to write.
    pub idle: usize,
}

impl Balance {
    /// The balance of `plan` under its schedule.
    pub fn of(plan: &Plan) -> Balance {
        let per_rank = plan.bytes_per_rank();
        let max = per_rank.iter().copied().max().unwrap_or(0);
        let mean = plan.total_bytes() as f64 / plan.world_size.max(1) as f64;
        Balance {
            max,
            mean,
            max_over_mean: if mean > 0.0 { max as f64 / mean } else { 1.0 },
            idle: per_rank.iter().filter(|&&b| b == 0).count(),
            per_rank,
        }
    }
}

/// Formats a byte count for people.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}
