//! The `st-consolidate-mpi` command: arguments → config → driver → exit code.

mod stderr;

use clap::Parser;
use clap::builder::{PossibleValue, StringValueParser, TypedValueParser};
use st_consolidate_mpi::Error;
use st_consolidate_mpi::launch::{self, launcher_rank};
use st_consolidate_mpi::options::{
    HEADERS, INPUT_FORMATS, MAIN_DTYPE_NAMES, Options, SCHEDULES, Spelling, Table, UNMAPPED,
};
use st_consolidate_mpi::run::{Config, Summary, Verbosity, run};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Consolidate a PyTorch Distributed Checkpoint into Hugging Face safetensors files, in
/// parallel across MPI ranks. Reads DCP's default format (.metadata + __R_I.distcp, written by
/// torch.distributed.checkpoint.save: torchtitan, Megatron torch_dist, accelerate FSDP) and
/// per-rank safetensors shards (HuggingFaceStorageWriter(save_distributed=True)).
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "\
Which tensor goes to which file: at most one of --mapping, --hf-index and
--max-shard-size.
With none of them, a DCP checkpoint is written as Hugging Face does it (files
of at most 5 GB, filled in name order) and an HF-shards checkpoint into
model-00001-of-00001.safetensors. Non-tensor entries of a DCP checkpoint
(step, dataloader state) are skipped and listed in the summary.

Each rank writes the output files whose index % world size == its rank.
Outputs appear under their final names only once every rank has succeeded;
model.safetensors.index.json is written last.

Examples:
  st-consolidate-mpi --exclude 'optimizer.*' outputs/checkpoint/step-1000 hf-out/
  mpirun -n 4 st-consolidate-mpi --hf-index orig/model.safetensors.index.json \\
      ckpt/pytorch_model_fsdp_0 hf-out/
  srun -n 64 st-consolidate-mpi ckpt/epoch_0_step_19/model ckpt/epoch_0_step_19/model/consolidated
  st-consolidate-mpi --mapping ckpt/mapping.json ckpt/sharded out/
  mpirun -n 4 st-consolidate-mpi --hf-index orig/model.safetensors.index.json ckpt out
  srun -n 64 --mpi=pmix st-consolidate-mpi --max-shard-size 5GB ckpt out"
)]
struct Cli {
    /// The checkpoint folder: .metadata + *.distcp (DCP format), or HF shards: every
    /// *.safetensors file whose header carries DCP_SHARDING_INFO, whatever its name (or those of
    /// a sharded/ subfolder, PyTorch's enable_consolidation layout). Files named
    /// shard-RRRRR-model-IIIII-of-NNNNN are also checked for missing ranks; for other names the
    /// coverage check (every tensor tiled exactly by its pieces) is what catches a missing file.
    /// A NeMo Automodel model/ folder with .hf_metadata/ needs no other option.
    input_dir: PathBuf,

    /// Folder for model-*.safetensors and model.safetensors.index.json (created if missing).
    output_dir: PathBuf,

    /// The input's format; auto decides from the folder (.metadata: dcp; a 'latest' file or
    /// *_model_states.pt files: deepspeed; *.safetensors shards: hf-shards, reading at most one
    /// header) and refuses a folder holding both DCP and shards, or nothing.
    #[arg(long, value_parser = Names(INPUT_FORMATS.names()), default_value = INPUT_FORMATS.default)]
    input_format: String,

    /// DeepSpeed: read tag folder TAG (global_step500) instead of the one INPUT_DIR/latest names.
    /// INPUT_DIR may also be the tag folder itself.
    #[arg(long, value_name = "TAG")]
    tag: Option<String>,

    /// Export only tensors whose saved name matches GLOB (`*` any characters, `?` one;
    /// repeatable), e.g. --include 'model.*'. Applied before mapping and --strip-prefix.
    #[arg(long, value_name = "GLOB")]
    include: Vec<String>,

    /// Leave out tensors whose saved name matches GLOB (repeatable), e.g. --exclude 'optim.*'
    /// to export the model without the optimizer state. --dry-run lists name prefixes and sizes.
    #[arg(long, value_name = "GLOB")]
    exclude: Vec<String>,

    /// JSON {"tensor.name": index, ...} with file indices from 1 (PyTorch's fqn_to_index_mapping).
    #[arg(long, value_name = "FILE")]
    mapping: Option<PathBuf>,

    /// An existing model.safetensors.index.json whose weight_map gives each tensor's file.
    #[arg(long, value_name = "FILE")]
    hf_index: Option<PathBuf>,

    /// Fill files in tensor-name order up to SIZE each, e.g. 5GB, 500MB, 2GiB.
    #[arg(long, value_name = "SIZE")]
    max_shard_size: Option<String>,

    /// What to do with tensors the mapping does not name: stop with an error, put them in the
    /// last file, or leave them out with one warning (as PyTorch's consolidation does).
    #[arg(long, value_parser = Names(UNMAPPED.names()), default_value = UNMAPPED.default)]
    unmapped: String,

    /// Copy threads per rank; counts above 1024 are taken as 1024 [default: cores on the node /
    /// ranks on the node].
    #[arg(long, value_name = "N", value_parser = integer, allow_negative_numbers = true)]
    threads: Option<i64>,

    /// Print the plan (files, tensors, bytes, owning rank, bytes per rank) and write nothing.
    #[arg(long)]
    dry_run: bool,

    /// With --dry-run: plan for N ranks (bytes per rank, max/mean, idle ranks for both
    /// schedules) without starting N ranks.
    #[arg(long, value_name = "N", value_parser = integer, allow_negative_numbers = true)]
    ranks: Option<i64>,

    /// With --dry-run: group the ranks into nodes of K consecutive ranks (as srun and mpirun
    /// place them by default) and show the bytes per node for both schedules.
    #[arg(long, value_name = "K", value_parser = integer, allow_negative_numbers = true)]
    ranks_per_node: Option<i64>,

    /// Replace consolidated files already in OUTPUT_DIR.
    #[arg(long)]
    overwrite: bool,

    /// Continue an interrupted run: keep every output file already complete in OUTPUT_DIR (its
    /// header and size are this plan's, and its tensor bytes, compared with the inputs, equal
    /// them) and write only the others, then the index.
    #[arg(long)]
    resume: bool,

    /// Also copy every file of DIR that is not weights (config.json, tokenizer files,
    /// generation_config.json, chat template, *.py, README.md...) into OUTPUT_DIR, e.g. the
    /// original model's folder; never *.safetensors, *.bin, *.pt, *.pth, index files or hidden
    /// files. With --dtype, config.json's dtype is updated.
    #[arg(long, value_name = "DIR")]
    hf_assets: Option<PathBuf>,

    /// Build each rank's files in a new folder of its own under DIR (node-local scratch such as
    /// $TMPDIR works), then copy them into OUTPUT_DIR and publish as usual: index last, nothing
    /// replaced before the new output is complete. The staging folders are removed, on failure
    /// too. Not with --schedule balanced.
    #[arg(long, value_name = "DIR")]
    staging_dir: Option<PathBuf>,

    /// The index file's name instead of model.safetensors.index.json; `diffusers` stands for
    /// diffusion_pytorch_model.safetensors.index.json (Diffusers models, NeMo's
    /// --diffusers-compatible). --verify-only and --resume look for it under that name; with
    /// --overwrite, an index of the other name left by an earlier run is removed.
    #[arg(long, value_name = "NAME")]
    index_name: Option<String>,

    /// Keep the saved names of a DCP checkpoint whose tensors all sit under one top-level key of
    /// the saved state dict. By default the names inside it are written, as accelerate
    /// merge-weights does for accelerate's FSDP folders (dcp.save({"model": state_dict}) saves
    /// model.lm_head.weight; the output says lm_head.weight). Mappings match either name.
    #[arg(long)]
    keep_top_level_key: bool,

    /// DeepSpeed: also write each tied alias (shared_params, e.g. lm_head.weight tied to
    /// model.embed_tokens.weight) as a copy of its owner. By default the alias is left out, as
    /// save_pretrained leaves it out and from_pretrained ties it again; a note names each one.
    #[arg(long)]
    keep_tied: bool,

    /// DeepSpeed: leave the frozen parameters (requires_grad=False) out, as zero_to_fp32.py
    /// --exclude_frozen_parameters does; only trainable parameters and buffers are written.
    #[arg(long)]
    exclude_frozen_parameters: bool,

    /// Ignore INPUT_DIR/.hf_metadata. By default, when NeMo Automodel's .hf_metadata folder is
    /// in INPUT_DIR, its fqn_to_file_index_mapping.json is the mapping (unless a mapping option
    /// is given), its fqn_to_dtype_mapping.json the dtype map (unless --dtype-map is given), and
    /// its other entries, folders whole, are copied into OUTPUT_DIR as --hf-assets copies (unless
    /// --hf-assets is given). Use it, for example, to keep F32-saved weights that the dtype map
    /// would round to BF16.
    #[arg(long)]
    no_hf_metadata: bool,

    /// After writing, read every file back and compare each tensor byte with the shards
    /// (before the files get their final names). Across nodes, each file is compared on
    /// another node than the one that wrote it, so node-local INPUT_DIR copies must agree.
    #[arg(long)]
    verify: bool,

    /// Write nothing: check the consolidated output already in OUTPUT_DIR against the shards
    /// (headers, index, total_size and every tensor byte).
    #[arg(long)]
    verify_only: bool,

    /// Accept a checkpoint in which some shard-RRRRR-model-IIIII files are absent (only if the
    /// writer never produced them); the pieces must still tile every tensor.
    #[arg(long)]
    allow_missing_shard_files: bool,

    /// How many ranks saved the checkpoint: every shard-RRRRR for R in 1..=N must be present.
    /// Without it the highest rank seen is taken, which cannot notice that all files of the
    /// highest rank are gone (their tensors would come out shorter).
    #[arg(long, value_name = "N", value_parser = integer, allow_negative_numbers = true)]
    source_ranks: Option<i64>,

    /// Print only errors.
    #[arg(short, long)]
    quiet: bool,

    /// Also print per-rank detail (files, bytes, copy and sync times).
    #[arg(short, long)]
    verbose: bool,

    /// Seconds between progress reports for the whole job (rank 0: a live bar on a terminal,
    /// one log line per interval otherwise); 0 turns progress off, otherwise from 0.1 to 86400
    /// (a day) [default: 10].
    #[arg(long, value_name = "SECS", allow_negative_numbers = true)]
    progress: Option<f64>,

    /// Write a JSON run report (version, command line, ranks, files, bytes, times, verification).
    #[arg(long, value_name = "FILE.json")]
    report: Option<PathBuf>,

    /// How output bytes are split among ranks: modulo (file i written whole by rank
    /// i % ranks; one writer per file, safe on every filesystem, NFS included) or balanced
    /// (equal contiguous byte blocks; several ranks write disjoint ranges of one file, which
    /// local filesystems, Lustre and GPFS handle, NFS without care may not).
    #[arg(long, value_parser = Names(SCHEDULES.names()), default_value = SCHEDULES.default)]
    schedule: String,

    /// Who reads the shard headers: all (every rank reads every header) or shared (each rank
    /// reads 1/ranks of them and the ranks exchange a validated summary, so each file is opened
    /// once per job: use it for thousands of shards on Lustre or GPFS).
    #[arg(long, value_parser = Names(HEADERS.names()), default_value = HEADERS.default)]
    headers: String,

    /// Convert every floating-point tensor (F16, BF16, F32, F64) to this type, rounding to
    /// nearest even exactly as PyTorch's tensor.to(dtype); integer, bool, fp8 and complex tensors
    /// stay. With --dtype-map, a tensor mapped to F32 stays F32 (NeMo's rule). NeMo's and
    /// PyTorch's names work too (bfloat16, torch.float32, fp16, half, double...; case, '_' and
    /// '-' do not matter), and none keeps the saved types.
    #[arg(long, value_name = "TYPE", value_parser = Names(MAIN_DTYPE_NAMES.to_vec()))]
    dtype: Option<String>,

    /// JSON {"tensor.name": "BF16", ...}: each tensor's original dtype (NeMo Automodel's
    /// fqn_to_dtype_mapping.json), applied by NeMo 0.7.0's rules: without --dtype, a tensor
    /// mapped to F16/BF16/F32/F64 is restored to it from any floating-point saved dtype (FP8
    /// included); a float tensor mapped to FP8, an integer or BOOL (a quantized or packed
    /// original) keeps its saved dtype, named in one warning; integers and bool never change.
    /// Unlike NeMo, a value that is not a safetensors dtype is an error, and tensors saved as
    /// U16, U32, U64, C64 or an FNUZ type (outside NeMo's table) keep their saved dtype. Names of
    /// the map that no tensor has are ignored.
    #[arg(long, value_name = "FILE")]
    dtype_map: Option<PathBuf>,

    /// Remove PREFIX from the start of every tensor name in the output (repeatable; the first
    /// matching prefix is removed). A mapping may name a tensor by its saved or its stripped name.
    #[arg(long, value_name = "PREFIX")]
    strip_prefix: Vec<String>,
}

impl Cli {
    /// The options as given; every rule about them is the library's
    /// ([`Options::into_config`]), shared with the Python package.
    fn options(self) -> Options {
        Options {
            input_format: Some(self.input_format),
            tag: self.tag,
            include: self.include,
            exclude: self.exclude,
            mapping: self.mapping.map(Table::File),
            hf_index: self.hf_index,
            max_shard_size: self.max_shard_size,
            unmapped: Some(self.unmapped),
            threads: self.threads,
            dry_run: self.dry_run,
            ranks: self.ranks,
            ranks_per_node: self.ranks_per_node,
            overwrite: self.overwrite,
            resume: self.resume,
            hf_assets: self.hf_assets,
            staging_dir: self.staging_dir,
            index_name: self.index_name,
            keep_top_level_key: self.keep_top_level_key,
            keep_tied: self.keep_tied,
            exclude_frozen_parameters: self.exclude_frozen_parameters,
            no_hf_metadata: self.no_hf_metadata,
            verify: self.verify,
            verify_only: self.verify_only,
            allow_missing_shard_files: self.allow_missing_shard_files,
            source_ranks: self.source_ranks,
            quiet: self.quiet,
            verbose: self.verbose,
            progress: self.progress,
            report: self.report,
            schedule: Some(self.schedule),
            headers: Some(self.headers),
            dtype: self.dtype,
            dtype_map: self.dtype_map.map(Table::File),
            strip_prefix: self.strip_prefix,
            // Paths need not be UTF-8 (a folder named in Latin-1): the
            // report's JSON holds a lossy copy; std::env::args would panic.
            command_line: std::env::args_os()
                .map(|arg| arg.to_string_lossy().into_owned())
                .collect(),
            ..Options::new(self.input_dir, self.output_dir, Spelling::Flags)
        }
    }
}

/// A choice's value as given, for the library to check; its names (the
/// library's) only list the choices in `--help` and clap's messages.
#[derive(Clone)]
struct Names(Vec<&'static str>);

impl TypedValueParser for Names {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<String, clap::Error> {
        StringValueParser::new().parse_ref(cmd, arg, value)
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(
            self.0.iter().map(|name| PossibleValue::new(*name)),
        ))
    }
}

/// An integer as written, negative included; one too large for an `i64`
/// saturates (the library caps or refuses it with the option's range).
fn integer(text: &str) -> Result<i64, String> {
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("'{text}' is not an integer"));
    }
    Ok(text.parse().unwrap_or(if text.starts_with('-') {
        i64::MIN
    } else {
        i64::MAX
    }))
}

/// What a finished run prints: the plan of a dry run on stdout, the
/// closing summary on stderr (rank 0; the others return neither).
fn show(config: &Config, summary: &Summary) {
    if let Some(text) = &summary.plan_text {
        print!("{text}");
    }
    if let Some(report) = &summary.report
        && config.verbosity > Verbosity::Quiet
    {
        stderr::write_line(&report.human(&config.output.display().to_string()));
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            if launcher_rank() == 0 {
                let _ = err.print();
            }
            return ExitCode::from(if err.use_stderr() { 2 } else { 0 });
        }
    };
    // A usage error as clap's: exit 2, said once by the launcher's rank 0,
    // before MPI starts.
    let config = match cli.options().into_config() {
        Ok(config) => config,
        Err(err) => {
            if launcher_rank() == 0 {
                stderr::write_line(&format!("st-consolidate-mpi: error: {err}"));
            }
            return ExitCode::from(2);
        }
    };
    // MPI finalizes when `world` drops at the end of main.
    let world = match launch::start() {
        Ok(world) => world,
        Err(err) => return start_failed(&err),
    };
    let comm = world.comm();
    match run(&config, comm, &stderr::Stderr) {
        Ok(summary) => {
            show(&config, &summary);
            ExitCode::SUCCESS
        }
        // The failing rank prints its own message.
        Err(Error::PeerFailed { .. }) => ExitCode::FAILURE,
        Err(err) => {
            if comm.size() > 1 {
                stderr::write_line(&format!(
                    "st-consolidate-mpi: rank {}: error: {err}",
                    comm.rank()
                ));
            } else {
                stderr::write_line(&format!("st-consolidate-mpi: error: {err}"));
            }
            ExitCode::FAILURE
        }
    }
}

/// A start-up failure. When the world is wrong every task is "rank 0" of
/// its own world, so the launcher's rank 0 alone speaks; any other failure
/// is this process's own, said with its launcher rank.
fn start_failed(err: &Error) -> ExitCode {
    match err {
        Error::WrongWorld { .. } if launcher_rank() != 0 => {}
        Error::WrongWorld { .. } => {
            stderr::write_line(&format!("st-consolidate-mpi: error: {err}"))
        }
        _ if launch::under_launcher() => stderr::write_line(&format!(
            "st-consolidate-mpi: rank {}: error: {err}",
            launcher_rank()
        )),
        _ => stderr::write_line(&format!("st-consolidate-mpi: error: {err}")),
    }
    ExitCode::FAILURE
}
