//! The phases of a run, for any communicator:
//! read the checkpoint → plan → [dry run: print] → locate the DCP chunks
//! this rank reads → [verify only: compare] → lock and prepare OUTPUT_DIR →
//! create my files → copy and sync (with progress) → [verify] → stage
//! report and index → renames, index last.
//!
//! Every phase ends in one collective ([`agree`]) where all ranks learn
//! whether any rank failed and, if one did, its failure ([`crate::failure`]),
//! so a failing rank never leaves the others waiting. A phase looks at the
//! run's [`Cancel`](crate::exec::cancel::Cancel) before its work, and a
//! panic in its work is caught there and becomes that rank's failure.
//!
//! **The point of no return** ([`point_of_no_return`]) is the agreement
//! after the index is staged, just before the first change a reader of
//! OUTPUT_DIR can see (the old index retired). Before it, a stop or a
//! failure on any rank leaves OUTPUT_DIR exactly as it was, with its
//! previous output and index, and no temporary file. After it, the cancel
//! flag is no longer looked at: the renames complete and the run reports
//! success, with [`Summary::late_cancel`] saying that a stop arrived
//! meanwhile (the front end delivers it afterwards). The first collective
//! of a run checks that every rank was given the same options
//! ([`same_options`]). The work of each phase lives with its owner; this
//! module only sequences them.

pub mod hf_metadata;
mod resume;
pub mod same_options;

use crate::checkpoint::Checkpoint;
use crate::checkpoint::dcp::locate::{Located, Wanted, locate_pieces};
use crate::checkpoint::format::InputFormat;
use crate::checkpoint::hf_shards::{SHARDED_SUBFOLDER, read_from_subfolder};
use crate::checkpoint::identity;
use crate::checkpoint::select::check_has_tensors;
use crate::comm::Communicator;
use crate::comm::collectives::{
    agree, collect_mismatches, gather_reports, host_names, read_checkpoint,
    same_locations_everywhere, same_output_dir, same_plan_everywhere, sign_inputs, sum_over_ranks,
};
use crate::error::{Error, Result, counted, shown};
use crate::exec::assets::{ExistingAssets, asset_names, plan_assets, ties_word_embeddings};
use crate::exec::cancel::StopReason;
use crate::exec::clobber::RunPaths;
use crate::exec::needed::{pieces_to_copy, pieces_to_verify};
use crate::exec::output::{StagingFolder, move_into, sync_dir};
use crate::exec::publish::{
    Refusal, check_written_once, prepare_output_dir, retire_old_index, stage_index_and_report,
};
use crate::exec::verify::{
    Target, across_hosts, compare, existing_targets, stored_crc_counts, stored_crc_summary,
    targets_to_verify,
};
use crate::exec::write::{WriteTiming, copy_and_sync, create_files, default_threads};
use crate::failure::catch_panic;
use crate::messages::Messages;
use crate::plan::mapping::MappingSource;
use crate::plan::{self, Plan, PlanOptions};
use crate::progress::{Counters, FinishOnDrop, watch};
use crate::report::{InputFacts, RankReport, RunReport, describe, human_bytes};
use crate::safetensors::dtype::Dtype;
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What to do, from the command line.
#[derive(Clone, Debug)]
pub struct Config {
    /// The checkpoint folder.
    pub input: PathBuf,
    /// Folder for the consolidated files.
    pub output: PathBuf,
    /// Consolidate, preview, or check an existing output.
    pub mode: Mode,
    /// How much to print.
    pub verbosity: Verbosity,
    /// How the checkpoint is read.
    pub read: crate::checkpoint::ReadOptions,
    /// How the output is laid out.
    pub plan: PlanOptions,
    /// Worker threads per rank; `None` picks cores ÷ ranks on the node.
    pub threads: Option<usize>,
    /// Replace existing consolidated outputs (at publish time).
    pub overwrite: bool,
    /// Keep this plan's outputs that an earlier run completed (`--resume`).
    pub resume: bool,
    /// Copy the non-weight files of this folder into OUTPUT_DIR (`--hf-assets`).
    pub hf_assets: Option<PathBuf>,
    /// Use INPUT_DIR's `.hf_metadata` (NeMo's folder) where options are
    /// left open; `--no-hf-metadata` turns it off.
    pub hf_metadata: bool,
    /// Seconds between progress reports; zero turns them off.
    pub progress_secs: f64,
    /// Where rank 0 writes the JSON run report, if anywhere.
    pub report: Option<PathBuf>,
    /// The command line, for the report.
    pub command_line: Vec<String>,
    /// Set by the front end to stop the run (Ctrl-C in the Python package).
    pub cancel: crate::exec::cancel::Cancel,
    /// Build each rank's files in a folder of its own under this one
    /// (node-local scratch), then move them into OUTPUT_DIR and publish as
    /// usual (the drop-ins' `use_staging`).
    pub staging: Option<PathBuf>,
}

impl Config {
    /// A plain consolidation of `input` into `output`, with every option
    /// at the command's default (the starting point of other front ends).
    pub fn new(input: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Config {
        Config {
            input: input.into(),
            output: output.into(),
            mode: Mode::Consolidate { verify: false },
            verbosity: Verbosity::Normal,
            read: crate::checkpoint::ReadOptions::default(),
            plan: PlanOptions::default(),
            threads: None,
            overwrite: false,
            resume: false,
            hf_assets: None,
            hf_metadata: true,
            progress_secs: 10.0,
            report: None,
            command_line: Vec::new(),
            cancel: crate::exec::cancel::Cancel::default(),
            staging: None,
        }
    }
}

/// What a run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Write the consolidated files; with `verify`, read every written byte
    /// back and compare it with the inputs before publishing.
    Consolidate {
        /// `--verify`.
        verify: bool,
    },
    /// Print the plan and write nothing, for this many ranks if given.
    DryRun {
        /// `--ranks N`.
        ranks: Option<usize>,
        /// `--ranks-per-node K`: also show bytes per node.
        ranks_per_node: Option<usize>,
    },
    /// Write nothing; check the output already in OUTPUT_DIR.
    VerifyOnly,
}

/// How much a run prints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    /// Only errors.
    Quiet,
    /// Progress and the summary.
    #[default]
    Normal,
    /// Also per-rank detail.
    Verbose,
}

/// What a finished run did, for the front end to show or return.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Output files written (by all ranks).
    pub files: usize,
    /// Tensor bytes written (by all ranks).
    pub bytes: u64,
    /// Wall time of the whole run on this rank.
    pub seconds: f64,
    /// Non-tensor entries of the checkpoint that were skipped (a DCP
    /// checkpoint's step, dataloader state).
    pub skipped: Vec<String>,
    /// `--dry-run`: the plan, as the table the command prints.
    pub plan_text: Option<String>,
    /// The run report, on rank 0 of a consolidation (what `--report`
    /// writes; its [`RunReport::human`] is the closing summary).
    pub report: Option<RunReport>,
    /// A stop that arrived after the point of no return: the run completed
    /// and published anyway; the front end delivers the stop now, saying so.
    pub late_cancel: Option<StopReason>,
}

impl Summary {
    /// What a front end says when a stop arrived after the point of no
    /// return, before it delivers the stop: the output is published.
    pub fn late_cancel_note(&self, output: &Path) -> Option<String> {
        let what = match self.late_cancel? {
            StopReason::Interrupted => "an interrupt (Ctrl-C)",
            StopReason::Exiting => "the interpreter's exit",
        };
        Some(format!(
            "{what} arrived after the point of no return: the consolidation completed and {} holds the complete new output; the stop takes effect now",
            output.display()
        ))
    }
}

/// One rank's view of the job: its configuration, communicator, message
/// sink and threads.
struct Job<'a> {
    config: &'a Config,
    comm: &'a dyn Communicator,
    messages: &'a dyn Messages,
    pool: rayon::ThreadPool,
    threads: usize,
    started: Instant,
    /// What this rank's locating of DCP chunks has cost so far.
    located: Cell<Located>,
    /// Bytes of the inputs' ends this rank read for their signatures.
    identity_bytes: Cell<u64>,
    /// Whether the input is a DCP checkpoint (whose chunks are located
    /// after the plan, so the ranks compare where they found them).
    dcp: Cell<bool>,
    /// The tensors whose pieces this rank asked to locate (it copies or
    /// verifies them); the others' pieces are dropped once it has located.
    read_tensors: std::cell::RefCell<std::collections::BTreeSet<usize>>,
    /// Phases run so far (for messages and the test hook).
    phases: Cell<usize>,
    /// The test hook's phase to panic in on this rank ([`PANIC_HOOK_VAR`]).
    panic_at: Option<usize>,
}

impl Job<'_> {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Whether this rank speaks: rank 0, unless quiet.
    fn speaks(&self) -> bool {
        self.rank() == 0 && self.config.verbosity > Verbosity::Quiet
    }

    /// A note on rank 0 unless quiet.
    fn say(&self, text: &str) {
        if self.speaks() {
            self.messages.info(text);
        }
    }

    /// A warning on rank 0 unless quiet.
    fn warn(&self, text: &str) {
        if self.speaks() {
            self.messages.warning(text);
        }
    }

    /// A phase before the point of no return: a stopped run fails here,
    /// before `work`; otherwise `work` runs on this rank's threads (a panic
    /// in it becomes this rank's failure) and the ranks agree on the outcome.
    fn agree<T: Send>(&self, work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        self.phase(true, work)
    }

    /// A phase after the point of no return: the cancel flag is not looked
    /// at, so that a publish once begun completes.
    fn agree_committed<T: Send>(&self, work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        self.phase(false, work)
    }

    fn phase<T: Send>(
        &self,
        stoppable: bool,
        work: impl FnOnce() -> Result<T> + Send,
    ) -> Result<T> {
        let phase = self.phases.get() + 1;
        self.phases.set(phase);
        let stopped = match stoppable {
            true => self.config.cancel.check(),
            false => Ok(()),
        };
        let outcome = stopped.and_then(|()| {
            catch_panic(self.rank(), &format!("in phase {phase} of the run"), || {
                if self.panic_at == Some(phase) {
                    panic!("injected by the test hook {PANIC_HOOK_VAR} at phase {phase}");
                }
                self.pool.install(work)
            })
        });
        agree(self.comm, outcome)
    }

    /// Runs `work` on rank 0 only and agrees on the outcome.
    fn on_rank0<T: Send>(&self, work: impl FnOnce() -> Result<T> + Send) -> Result<Option<T>> {
        let rank0 = self.rank() == 0;
        self.agree(|| if rank0 { work().map(Some) } else { Ok(None) })
    }

    /// [`Job::on_rank0`] after the point of no return.
    fn on_rank0_committed<T: Send>(
        &self,
        work: impl FnOnce() -> Result<T> + Send,
    ) -> Result<Option<T>> {
        let rank0 = self.rank() == 0;
        self.agree_committed(|| if rank0 { work().map(Some) } else { Ok(None) })
    }

    /// Locates `pieces` of the plan's tensors (those this rank reads, not
    /// located yet) in their archives, on this rank's threads, and agrees
    /// on the outcome: a bad archive fails every rank, with the message of
    /// the lowest rank that found one (naming the file and the tensor).
    fn locate(&self, plan: &mut Plan, pieces: &[(usize, usize)]) -> Result<()> {
        let Plan {
            tensors,
            saved_names,
            shards,
            ..
        } = plan;
        let wanted = Wanted {
            names: saved_names,
            files: shards,
            pieces,
        };
        self.read_tensors
            .borrow_mut()
            .extend(pieces.iter().map(|&(t, _)| t));
        let cost = self.agree(|| locate_pieces(tensors, &wanted))?;
        let mut total = self.located.get();
        total += cost;
        self.located.set(total);
        Ok(())
    }

    /// Once this rank has located everything it reads: drops the pieces of
    /// every tensor it neither copies nor verifies (each rank keeps about
    /// 1/N of the pieces, not all of them), then compares with the other
    /// ranks where it found its DCP chunks ([`same_locations_everywhere`]):
    /// a chunk two ranks found at different places fails every rank, naming
    /// the file.
    fn located_all(&self, plan: &mut Plan) -> Result<()> {
        let rank = self.rank();
        let mut keep = std::mem::take(&mut *self.read_tensors.borrow_mut());
        // What the copy and the replica check walk, whether or not a piece
        // of it was wanted (a tensor of no bytes has none to read).
        for item in plan.work_items(rank) {
            keep.extend(plan.files[item.file].entries.iter().map(|e| e.tensor));
        }
        for f in plan.files_to_write(rank) {
            keep.extend(plan.files[f].entries.iter().map(|e| e.tensor));
        }
        for (t, tensor) in plan.tensors.iter_mut().enumerate() {
            if !keep.contains(&t) {
                tensor.pieces = Vec::new();
            }
        }
        *self.read_tensors.borrow_mut() = keep;
        if self.dcp.get() {
            agree(self.comm, same_locations_everywhere(self.comm, plan))?;
        }
        Ok(())
    }

    /// `-v`: what this rank read to locate its chunks, if it located any.
    fn report_located(&self) {
        let located = self.located.get();
        if self.config.verbosity < Verbosity::Verbose || located.chunks == 0 {
            return;
        }
        self.messages.detail(&format!(
            "rank {} on {}: located {} chunk(s) in their archives, {} read",
            self.rank(),
            crate::exec::lock::host_name(),
            located.chunks,
            human_bytes(located.archive_bytes)
        ));
    }

    /// The stored CRC-32s the ranks' verification of their `targets`
    /// checked, summed over the ranks, as the summary says them.
    fn crc_summary(&self, plan: &Plan, targets: &[Target]) -> Result<String> {
        let (checked, unchecked) = stored_crc_counts(plan, targets);
        let [checked, unchecked] = agree(
            self.comm,
            sum_over_ranks(self.comm, [checked as u64, unchecked as u64]),
        )?;
        Ok(stored_crc_summary((checked as usize, unchecked as usize)))
    }

    fn summary(&self, files: usize, bytes: u64) -> Summary {
        let seconds = self.started.elapsed().as_secs_f64();
        Summary {
            files,
            bytes,
            seconds,
            ..Summary::default()
        }
    }
}

/// The test hook that makes a phase panic, to show that a panic fails
/// every rank without a hang: `PHASE` (this process) or `RANK:PHASE`
/// (one rank of a threaded job), phases counted from 1.
pub const PANIC_HOOK_VAR: &str = "ST_CONSOLIDATE_TEST_PANIC_AT_PHASE";

fn panic_hook(rank: usize) -> Option<usize> {
    let value = std::env::var(PANIC_HOOK_VAR).ok()?;
    match value.split_once(':') {
        Some((r, phase)) => (r.parse().ok() == Some(rank)).then(|| phase.parse().ok())?,
        None => value.parse().ok(),
    }
}

/// Runs a consolidation on this rank, telling `messages` what happens.
/// Every rank must call it, with the same options.
pub fn run(config: &Config, comm: &dyn Communicator, messages: &dyn Messages) -> Result<Summary> {
    // The first collective of every run: ranks given different options
    // would otherwise call different collectives and wait on each other.
    agree(comm, same_options::check(comm, config))?;
    // Phases catch their own panics; this catches one between them, so
    // that none reaches a front end (the ranks may then wait on this one
    // until the communicator's timeout).
    let summary = catch_panic(comm.rank(), "running", || {
        run_agreed(config, comm, messages)
    })?;
    Ok(Summary {
        late_cancel: config.cancel.reason(),
        ..summary
    })
}

fn run_agreed(
    config: &Config,
    comm: &dyn Communicator,
    messages: &dyn Messages,
) -> Result<Summary> {
    let detected = match config.hf_metadata {
        true => hf_metadata::apply(config),
        false => None,
    };
    let (config, taken) = match &detected {
        Some((config, taken)) => (config, Some(taken)),
        None => (config, None),
    };
    let job = start(config, comm, messages)?;
    if let Some(taken) = taken {
        job.say(&taken.human());
    }
    let plan_ranks = match config.mode {
        Mode::DryRun {
            ranks: Some(ranks), ..
        } => ranks,
        _ => comm.size(),
    };
    // A dry run copies nothing: a DCP checkpoint is planned from its
    // `.metadata` alone, without a read of its chunk archives.
    let dry_run = matches!(config.mode, Mode::DryRun { .. });
    let read = crate::checkpoint::ReadOptions {
        plan_only: dry_run,
        ..config.read.clone()
    };
    let (mut checkpoint, format, headers_read) =
        read_checkpoint(&config.input, &read, comm, &job.pool)?;
    if dry_run && format == InputFormat::Dcp {
        job.say(
            "note: planned from .metadata alone; no chunk was located in its archive (only \
             each file's first and last 64 KiB were read, for the inputs' fingerprint); a run \
             locates and checks, on each rank, the chunks that rank copies, before it copies",
        );
    }
    job.dcp.set(format == InputFormat::Dcp);
    let mut inputs = std::mem::take(&mut checkpoint.inputs);
    agree(comm, check_has_tensors(&config.input, &checkpoint))?;
    if format == InputFormat::HfShards && read_from_subfolder(&config.input, &checkpoint.files) {
        job.say(&format!(
            "reading the shards in {}: {} itself holds no shard files, at most consolidated ones \
             without DCP_SHARDING_INFO (PyTorch's enable_consolidation layout)",
            config.input.join(SHARDED_SUBFOLDER).display(),
            config.input.display()
        ));
    }
    if let Some(note) = crate::report::skipped_outputs_note(&checkpoint.skipped_outputs) {
        job.say(&note);
    }
    for note in &checkpoint.notes {
        job.say(note);
    }
    let mut facts = input_facts(config, format, &checkpoint);
    if let Some(taken) = taken {
        facts.from_hf_metadata = taken.listed();
    }
    let mut plan_options = plan_options_for(config, format);
    let select = &config.read.select;
    if let Some(warning) = select.unmatched_warning(&checkpoint, &plan_options.strip_prefixes) {
        job.warn(&warning);
    }
    // Each input's ends are read once per view of INPUT_DIR (a node),
    // divided among the ranks sharing it; rank 0's view's signatures make
    // the fingerprint, and every view's are compared once the plans are.
    let signed = sign_inputs(comm, &mut inputs, &config.input, &job.pool)?;
    job.identity_bytes.set(signed.bytes_read);
    plan_options.input_fingerprint = Some(resume::input_fingerprint(
        &job,
        format,
        &checkpoint.files,
        &inputs,
        signed.table.as_deref(),
    )?);
    drop(signed.table);
    let plan = job.agree(|| plan::make(checkpoint, &plan_options, plan_ranks))?;
    agree(comm, same_plan_everywhere(comm, &plan))?;
    agree(comm, signed.compared)?;
    let tied = config
        .hf_assets
        .as_deref()
        .is_some_and(ties_word_embeddings);
    if let Some(warning) = &plan.dtype_warning {
        job.warn(warning);
    }
    if let Some(key) = &plan.unwrapped_key {
        job.say(&format!(
            "note: every tensor was saved under the state dict's one top-level key '{}' \
             (accelerate's FSDP layout): names are written without '{}.', as accelerate \
             merge-weights writes them; --keep-top-level-key keeps the saved names",
            shown(key),
            shown(key)
        ));
    }
    if let Some(note) = crate::report::optimizer_note(&facts) {
        job.say(&note);
    }
    for name in &plan.missing {
        if tied && name == "lm_head.weight" {
            job.say("note: 'lm_head.weight' is in the mapping but in no shard, as expected: config.json ties it to the input embeddings (tie_word_embeddings)");
            continue;
        }
        job.warn(&format!(
            "warning: '{}' is in the mapping but in no shard; it is left out",
            shown(name)
        ));
    }
    if !plan.omitted.is_empty() {
        job.warn(&format!(
            "warning: {} tensor(s) are not in the mapping and are left out: {}",
            plan.omitted.len(),
            crate::error::list_names(&plan.omitted)
        ));
    }
    let summary = match config.mode {
        Mode::DryRun { ranks_per_node, .. } => {
            let mut text = describe(&plan, &facts);
            if let Some(k) = ranks_per_node {
                text.push_str(&crate::report::per_node_view(&plan, k));
            }
            Ok(Summary {
                plan_text: (job.rank() == 0).then_some(text),
                ..Summary::default()
            })
        }
        Mode::VerifyOnly => verify_existing(&job, plan),
        Mode::Consolidate { verify } => {
            consolidate(&job, plan, &inputs, &facts, verify, headers_read)
        }
    };
    summary.map(|summary| Summary {
        skipped: facts.non_tensors,
        ..summary
    })
}

/// The layout options, with Hugging Face's default for a DCP checkpoint
/// when no mapping option was given: files of at most 5 GB (a DCP checkpoint
/// carries no file mapping of its own).
fn plan_options_for(config: &Config, format: InputFormat) -> PlanOptions {
    let mut options = config.plan.clone();
    let carries_no_mapping = matches!(format, InputFormat::Dcp | InputFormat::DeepSpeed);
    if options.mapping == MappingSource::SingleFile && carries_no_mapping {
        options.mapping = MappingSource::MaxShardSize(DCP_DEFAULT_SHARD_SIZE);
    }
    // DeepSpeed's zero_to_fp32 writes every floating-point tensor as F32
    // (the masters are F32; frozen parameters and buffers are upcast).
    if format == InputFormat::DeepSpeed && options.dtype.is_none() {
        options.dtype = Some(Dtype::F32);
    }
    options
}

/// What the report, the summary and the dry run say about the input.
fn input_facts(config: &Config, format: InputFormat, checkpoint: &Checkpoint) -> InputFacts {
    let exported = checkpoint
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.byte_len(), true));
    let excluded = checkpoint
        .excluded
        .iter()
        .map(|(name, bytes)| (name.clone(), *bytes, false));
    InputFacts {
        dir: config.input.display().to_string(),
        format: match format {
            InputFormat::Dcp => "dcp",
            InputFormat::DeepSpeed => "deepspeed",
            _ => "hf-shards",
        },
        non_tensors: checkpoint.non_tensors.clone(),
        tensors: exported.chain(excluded).collect(),
        from_hf_metadata: Vec::new(),
    }
}

/// Hugging Face's default `max_shard_size`.
pub const DCP_DEFAULT_SHARD_SIZE: u64 = 5_000_000_000;

/// Starts this rank's copy threads. Agreed on like every other phase: one
/// node refusing threads must not leave the other ranks waiting.
fn start<'a>(
    config: &'a Config,
    comm: &'a dyn Communicator,
    messages: &'a dyn Messages,
) -> Result<Job<'a>> {
    let threads = config
        .threads
        .unwrap_or_else(|| default_threads(comm.ranks_on_node()));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| {
            Error::usage(
                format!("cannot start {threads} threads: {e}"),
                "pass a smaller --threads",
            )
        });
    Ok(Job {
        config,
        comm,
        messages,
        pool: agree(comm, pool)?,
        threads,
        started: Instant::now(),
        located: Cell::new(Located::default()),
        identity_bytes: Cell::new(0),
        dcp: Cell::new(false),
        read_tensors: Default::default(),
        phases: Cell::new(0),
        panic_at: panic_hook(comm.rank()),
    })
}

/// `--verify-only`: compares the output already in OUTPUT_DIR with the
/// inputs; each rank locates the chunks of the files it compares.
fn verify_existing(job: &Job, mut plan: Plan) -> Result<Summary> {
    let (config, rank, size) = (job.config, job.rank(), job.comm.size());
    let (targets, mut problems) =
        job.agree(|| existing_targets(&plan, &config.output, rank, size))?;
    let pieces = pieces_to_verify(&plan, &targets);
    job.locate(&mut plan, &pieces)?;
    job.located_all(&mut plan)?;
    job.report_located();
    let plan = &plan;
    let problems = job.agree(|| {
        problems.extend(compare(plan, &targets)?);
        Ok(problems)
    })?;
    agree(job.comm, collect_mismatches(job.comm, &problems))?;
    let crcs = job.crc_summary(plan, &targets)?;
    job.say(&format!(
        "verified {} tensors ({}) in {} against {} input files: all equal{crcs}",
        plan.tensors.len(),
        human_bytes(plan.total_bytes()),
        config.output.display(),
        plan.shards.len(),
    ));
    Ok(job.summary(0, plan.total_bytes()))
}

/// Writes, verifies and publishes the consolidated files.
fn consolidate(
    job: &Job,
    mut plan: Plan,
    inputs: &identity::Inputs,
    facts: &InputFacts,
    verify: bool,
    headers_read: usize,
) -> Result<Summary> {
    let (config, comm, rank) = (job.config, job.comm, job.rank());
    let out = &config.output;
    // Under --verify, each file is compared on another node than the one
    // that wrote it where there is one (exec::verify::assign): which files
    // a rank verifies, and so which chunks it locates, follows the hosts.
    let hosts = match verify {
        true => Some(agree(comm, host_names(comm))?),
        false => None,
    };
    let verifying = hosts.as_deref();
    // Each rank locates the chunks it reads once the plan says which, and
    // before OUTPUT_DIR is touched, so that a bad archive fails the run
    // with nothing written. Under --resume the files kept are known only
    // once OUTPUT_DIR is locked: their chunks are located only to verify.
    if !config.resume {
        locate_to_write(job, &mut plan, verifying)?;
    }
    // Every rank records the identity of each input (those it signed with
    // their signatures), checked again before publishing. Rank 0 locks
    // OUTPUT_DIR for the whole run before touching it; every rank then
    // proves it sees that same folder.
    let inputs = job.agree(|| inputs.recorded())?;
    let mapping = match &config.plan.mapping {
        MappingSource::Mapping(path) => Some(("--mapping", path.as_path())),
        MappingSource::HfIndex(path) => Some(("--hf-index", path.as_path())),
        _ => None,
    };
    let report_path = config.report.as_deref();
    let refusal = match (config.overwrite, config.resume) {
        (true, _) => Refusal::Nothing,
        (false, true) => Refusal::OtherPlans,
        (false, false) => Refusal::AnyOutput,
    };
    // The assets are checked here, before any weight is copied: a folder
    // or config.json that cannot be used must not fail a long run at its end.
    let existing_assets = match refusal {
        Refusal::Nothing => ExistingAssets::Replace,
        Refusal::OtherPlans => ExistingAssets::KeepIfEqual,
        Refusal::AnyOutput => ExistingAssets::Refuse,
    };
    // INPUT_DIR and OUTPUT_DIR are never assets, even inside the folder.
    let not_assets = [config.input.clone(), out.clone()];
    let prepared = job.on_rank0(|| {
        let listed = match &config.hf_assets {
            Some(dir) => Some((dir.as_path(), asset_names(dir, &not_assets)?)),
            None => None,
        };
        let paths = RunPaths {
            input_dir: &config.input,
            mapping,
            assets: listed.as_ref().map(|(dir, names)| (*dir, names.as_slice())),
            report: report_path,
        };
        let lock = prepare_output_dir(out, &plan, refusal, &paths)?;
        // Listed once, for the clobber rule above and for this plan.
        let assets = match &listed {
            Some((dir, names)) => Some(plan_assets(
                dir,
                names,
                out,
                config.plan.dtype,
                existing_assets,
            )?),
            None => None,
        };
        Ok((lock, assets))
    })?;
    let (lock, assets) = prepared.unzip();
    if let Some(kept) = assets.iter().flatten().find(|a| !a.kept.is_empty()) {
        job.say(&kept.kept_summary(out));
    }
    agree(comm, same_output_dir(comm, out, lock.as_ref()))?;
    if config.resume {
        resume::keep_complete_files(job, &mut plan)?;
        locate_to_write(job, &mut plan, verifying)?;
    }
    let plan = &plan;
    if let Some(note) = idle_note(plan) {
        job.say(&note);
    }
    job.say(&format!(
        "consolidating {} ({}) from {} into {} on {} x {}",
        counted(plan.tensors.len(), "tensor", "tensors"),
        human_bytes(plan.total_bytes()),
        counted(plan.shards.len(), "input file", "input files"),
        counted(plan.files.len(), "file", "files"),
        counted(comm.size(), "rank", "ranks"),
        counted(job.threads, "thread", "threads")
    ));
    // With staging, each rank builds its files in a folder of its own
    // (removed when this returns, whatever happens), then moves them into
    // OUTPUT_DIR under their temporary names; the publish is the same.
    let staging = match &config.staging {
        Some(root) => Some(job.agree(|| StagingFolder::create(root, rank))?),
        None => None,
    };
    let build_dir = staging.as_ref().map_or(out.as_path(), StagingFolder::path);
    // Owners create and size their files before anyone writes to them
    // (under the balanced schedule, other ranks write into them too).
    let created = job.agree(|| create_files(build_dir, plan, rank))?;
    let timing = agree(comm, copy_with_progress(job, build_dir, plan, &created))?;
    report_timing(job, plan, created.len(), &timing);
    job.report_located();
    // Staged files go to OUTPUT_DIR before verification, so that --verify
    // reads the bytes that will be published.
    let created = match &staging {
        Some(_) => job.agree(|| move_into(created, out, &config.cancel))?,
        None => created,
    };
    drop(staging);
    if let Some(hosts) = verifying {
        let targets = targets_to_verify(plan, out, rank, hosts);
        let mismatches = job.agree(|| compare(plan, &targets))?;
        agree(comm, collect_mismatches(comm, &mismatches))?;
        let crcs = job.crc_summary(plan, &targets)?;
        let elsewhere = match across_hosts(hosts) {
            true => ", each file compared on another node than the one that wrote it",
            false => "",
        };
        job.say(&format!(
            "verified: every written byte equals the inputs{elsewhere}{crcs}"
        ));
    }

    // The inputs are still what each rank recorded (its share signed
    // again): a file replaced or rewritten during the run stops it here.
    let rechecked = job.agree(|| inputs.check_unchanged())?;
    job.identity_bytes.set(job.identity_bytes.get() + rechecked);
    if config.verbosity >= Verbosity::Verbose {
        job.messages.detail(&format!(
            "rank {rank} on {}: read {} of the inputs' ends for their signatures (its share, before the plan and again before publishing)",
            crate::exec::lock::host_name(),
            human_bytes(job.identity_bytes.get())
        ));
    }
    let mine = RankReport {
        rank,
        host: crate::exec::lock::host_name(),
        files: created.keys().map(|&f| plan.files[f].index).collect(),
        bytes: plan.bytes_per_rank()[rank],
        seconds: job.started.elapsed().as_secs_f64(),
        threads: job.threads,
        header_files_read: headers_read,
        chunks_located: job.located.get().chunks,
        archive_bytes_read: job.located.get().archive_bytes,
        identity_bytes_read: job.identity_bytes.get(),
    };
    let pending: Vec<_> = created.into_values().collect();
    // Publishing: everything is written and synced under temporary names
    // first (rank 0: report and index), then only renames remain, with the
    // index last. A failure before the renames leaves OUTPUT_DIR as it was.
    let ranks = agree(comm, gather_reports(comm, &mine))?;
    let staged = job.on_rank0(|| {
        let ranks = ranks.unwrap_or_default();
        check_written_once(plan, &ranks, out)?;
        let mut report = RunReport::new(plan, facts, config.command_line.clone(), &ranks, verify);
        if config.resume {
            report.kept = Some(
                plan.kept
                    .iter()
                    .map(|&f| plan.files[f].name.clone())
                    .collect(),
            );
        }
        // Staged before the index, renamed with the weights: the index
        // stays the last file to appear.
        let assets = match assets.flatten() {
            Some(assets) => assets.stage(out)?,
            None => vec![],
        };
        report.assets = assets.iter().map(|(name, _)| name.clone()).collect();
        Ok((
            stage_index_and_report(out, report_path, plan, report)?,
            assets,
        ))
    })?;
    let (staged, assets) = match staged {
        Some((staged, assets)) => (Some(staged), assets),
        None => (None, vec![]),
    };
    point_of_no_return(job)?;
    // An old index goes before any model file is replaced, so that a crash
    // part-way never leaves an index describing a mix of old and new files.
    job.on_rank0_committed(|| retire_old_index(out, plan))?;
    // Every folder a file was renamed in is synced: OUTPUT_DIR, and the
    // subfolders assets went into.
    let mut folders = std::collections::BTreeSet::from([out.clone()]);
    let committed = pending
        .into_iter()
        .chain(assets.into_iter().map(|(_, file)| file))
        .try_for_each(|file| {
            let path = file.commit()?;
            folders.extend(path.parent().map(Path::to_path_buf));
            Ok(())
        })
        .and_then(|()| folders.iter().try_for_each(|dir| sync_dir(dir)));
    agree(comm, committed)?;
    let finished = job.on_rank0_committed(|| match staged {
        Some(staged) => staged.commit(out, plan),
        None => unreachable_on_rank0(),
    })?;
    drop(lock);
    Ok(Summary {
        report: finished,
        ..job.summary(plan.files.len(), plan.total_bytes())
    })
}

/// The point of no return: the last phase that looks at the cancel flag.
/// Every rank has written, synced and (rank 0) staged the index and the
/// report under temporary names; nothing a reader of OUTPUT_DIR sees has
/// changed yet. Once every rank has agreed here, the publish (old index
/// retired, renames, index last) runs to its end: a stop that arrives
/// later is reported as [`Summary::late_cancel`], after the output is in
/// place, never as a failure over published output.
fn point_of_no_return(job: &Job) -> Result<()> {
    job.agree(|| Ok(()))
}

/// Locates the chunks this rank reads to write its share of the plan (and,
/// under `--verify`, given every rank's host, to compare the files it
/// verifies), then holds at the test hook
/// ([`crate::checkpoint::dcp::hold_after_read`]).
fn locate_to_write(job: &Job, plan: &mut Plan, verify: Option<&[String]>) -> Result<()> {
    let rank = job.rank();
    let mut pieces = pieces_to_copy(plan, rank);
    if let Some(hosts) = verify {
        let mine = targets_to_verify(plan, &job.config.output, rank, hosts);
        pieces.extend(pieces_to_verify(plan, &mine));
    }
    job.locate(plan, &pieces)?;
    job.located_all(plan)?;
    crate::checkpoint::dcp::hold_after_read();
    Ok(())
}

/// One line when the modulo schedule leaves ranks with nothing to write
/// (fewer files than ranks): the job then waits on the few that write.
fn idle_note(plan: &Plan) -> Option<String> {
    let per_rank = plan.bytes_per_rank();
    let idle = per_rank.iter().filter(|&&b| b == 0).count();
    let to_write = plan.files.len() - plan.kept.len();
    if plan.schedule != crate::plan::Schedule::Modulo || idle == 0 || to_write == 0 {
        return None;
    }
    Some(format!(
        "note: {idle} of {} ranks are idle ({} to write, one rank each under --schedule modulo); \
         --schedule balanced spreads every file over all ranks",
        per_rank.len(),
        counted(to_write, "file", "files")
    ))
}

/// Rank 0 always staged before it commits; reaching this is a bug.
fn unreachable_on_rank0<T>() -> Result<T> {
    Err(Error::internal("rank 0 has nothing staged to publish"))
}

/// Copies and syncs this rank's work items on its threads while the main
/// thread joins the job-wide progress rounds.
fn copy_with_progress(
    job: &Job,
    dir: &Path,
    plan: &Plan,
    created: &std::collections::BTreeMap<usize, crate::exec::output::PendingFile>,
) -> Result<WriteTiming> {
    let (config, pool, rank) = (job.config, &job.pool, job.rank());
    let counters = Counters::default();
    std::thread::scope(|scope| {
        let worker = scope.spawn(|| {
            let _finish = FinishOnDrop(&counters);
            pool.install(|| {
                copy_and_sync(dir, plan, rank, created, &counters.copied, &config.cancel)
            })
        });
        let progress = if config.progress_secs > 0.0 && config.verbosity > Verbosity::Quiet {
            let interval = Duration::from_secs_f64(config.progress_secs);
            let total = plan.bytes_per_rank().iter().sum();
            let view = job.speaks().then(|| job.messages.progress(total));
            watch(job.comm, interval, &counters, view.as_deref())
        } else {
            Ok(())
        };
        // The copy is waited for even when progress failed: its threads
        // borrow the plan and the files.
        let copied = worker
            .join()
            .unwrap_or_else(|_| Err(Error::internal("a copy thread panicked")));
        progress.and(copied)
    })
}

/// `-v`: one line per rank on its copy and sync times.
fn report_timing(job: &Job, plan: &Plan, files: usize, timing: &WriteTiming) {
    if job.config.verbosity < Verbosity::Verbose {
        return;
    }
    let rank = job.rank();
    let bytes = plan.bytes_per_rank()[rank];
    let line = format!(
        "rank {rank} on {}: {files} files, {} copied in {:.2} s ({:.2} GB/s) by {} thread(s), synced in {:.2} s",
        crate::exec::lock::host_name(),
        human_bytes(bytes),
        timing.copy,
        bytes as f64 / 1e9 / timing.copy.max(1e-9),
        job.threads,
        timing.sync
    );
    job.messages.detail(&line);
}
