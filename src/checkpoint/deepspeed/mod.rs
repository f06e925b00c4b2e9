//! Reading DeepSpeed ZeRO checkpoints (stages 1, 2 and 3, and
//! BF16_Optimizer) as `engine.save_checkpoint` writes them: a tag folder of
//! `torch.save` files, one optimizer-states file per data-parallel rank.
//!
//! The fp32 master weights are flat partitions: each rank holds a range of
//! each flat group's elements. The reader turns every parameter's share of
//! every partition into pieces of the checkpoint model ([`flat`]: a flat
//! range of a row-major tensor is at most `2·ndim − 1` dense blocks), so
//! the plan, the copy and verification treat them like any other format's
//! pieces. Everything is planned from the pickles alone ([`torch_save`],
//! [`states`]): no tensor byte is read here, and the Adam states, two
//! thirds of the optimizer files, are never read at all.
//!
//! The arithmetic is DeepSpeed's own `zero_to_fp32.py` (0.19.8), in the
//! format brief's terms:
//! - ZeRO-1/2: a group's partitions, concatenated in rank order, are the
//!   group's flat buffer; `param_shapes[g]` walks it in order, each
//!   parameter followed by its alignment padding.
//! - ZeRO-3: each parameter is split on its own into `ceil(n/W)` elements
//!   per rank, laid one after the other in each rank's sub-group tensor.
//! - Frozen parameters have no fp32 master: they come from the model
//!   states (ZeRO-2: whole; ZeRO-3: per-rank fragments; ZeRO-1, which does
//!   not save them apart, from `module`), buffers from `module`, in the
//!   training dtype.

pub mod flat;
mod folder;
mod states;
mod torch_save;

pub use folder::{LATEST_FILE, LOOKS, is_deepspeed_checkpoint};

use crate::checkpoint::identity::{Inputs, open_identified};
use crate::checkpoint::select::Selection;
use crate::checkpoint::{Checkpoint, Location, Piece, PieceHints, TensorSpec, tensor_from_pieces};
use crate::error::{Error, Result};
use crate::safetensors::dtype::Dtype;
use crate::safetensors::header::byte_len;
use states::{ModelStates, OptimStates, Stage};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use torch_save::{TensorRef, TorchSave};

/// How messages about a DeepSpeed tensor's pieces name them and advise.
pub const DEEPSPEED_HINTS: PieceHints = PieceHints {
    holder: "partition",
    corrupt: "the checkpoint's files are corrupt or altered; copy the tag folder again",
    overlap: "the files come from different saves; use the files of one tag folder only",
    missing: "an optimizer-states file is missing or truncated; copy every *_optim_states.pt file of the tag folder",
};

/// What to take from a DeepSpeed checkpoint folder.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeepSpeedRead<'a> {
    /// `--tag`: the tag folder to read instead of the one `latest` names.
    pub tag: Option<&'a str>,
    /// `--keep-tied`: write each tied alias as a copy of its owner.
    pub keep_tied: bool,
    /// `--exclude-frozen-parameters`: leave the frozen parameters out.
    pub exclude_frozen: bool,
}

/// Reads a DeepSpeed checkpoint into the checkpoint model: the tensors
/// `select` keeps, their pieces in the files, and notes for the user on
/// what was done differently from `zero_to_fp32` (tied aliases, frozen
/// parameters).
pub fn read_checkpoint(dir: &Path, read: &DeepSpeedRead, select: &Selection) -> Result<Checkpoint> {
    let (tag_dir, tag) = folder::tag_folder(dir, read.tag)?;
    let listed = folder::list_files(&tag_dir, &tag)?;
    let mut opened = Opened::default();
    let optim: Vec<OptimStates> = listed
        .optim_states
        .iter()
        .map(|(_, path)| states::optim_states(&opened.open(path)?))
        .collect::<Result<_>>()?;
    let world = check_optim_files(&listed, &optim)?;
    let stage = optim[0].stage;
    let model_paths: Vec<PathBuf> = match stage {
        Stage::Zero(3) => check_zero3_model_files(&listed, world)?,
        _ => match &listed.model_states {
            Some(path) => vec![path.clone()],
            None => {
                return Err(bad_dir(
                    &listed.dir,
                    format!(
                        "the optimizer files are ZeRO-{}'s, but there is no mp_rank_00_model_states.pt beside them",
                        stage_number(stage)
                    ),
                    "copy the tag folder's mp_rank_00_model_states.pt too",
                ));
            }
        },
    };
    let optim_files = opened.take_files();
    let optim_bytes = std::mem::take(&mut opened.bytes);
    let mut models: Vec<(ModelStates, PathBuf)> = Vec::with_capacity(model_paths.len());
    for path in &model_paths {
        let save = opened.open(path)?;
        let mut model = states::model_states(&save)?;
        check_model_file(&model, &save.path, models.first(), &listed)?;
        if !models.is_empty() {
            // ZeRO-3's other ranks matter for their frozen fragments only:
            // their module and shapes (the first rank's, checked equal)
            // would make memory grow with the number of ranks.
            model.module = Vec::new();
            model.param_shapes = Vec::new();
        }
        models.push((model, save.path));
    }
    // Location::shard indexes files: the optimizer files by rank, then the
    // model-states files by rank.
    let model_base = optim_files.len();
    let files: Vec<PathBuf> = optim_files.iter().chain(&model_paths).cloned().collect();
    let mut notes = Vec::new();
    let primary = &models[0].0;
    let trainable = trainable_tensors(stage, world, primary, &optim, &listed)?;
    notes.push(not_exported(&optim, &trainable, optim_bytes));
    let frozen = frozen_tensors(stage, world, &models, model_base, &mut notes)?;
    // --exclude-frozen-parameters: left out like --exclude, so that the dry
    // run still lists them.
    let left_out: HashSet<String> = match read.exclude_frozen {
        true => frozen.iter().map(|(name, ..)| name.clone()).collect(),
        false => HashSet::new(),
    };
    let buffers = buffer_tensors(primary, model_base);
    let mut named: Vec<Named> = Vec::new();
    named.extend(buffers);
    named.extend(frozen);
    named.extend(trainable);
    let aliases = tied_aliases(primary, &named, read.keep_tied, &mut notes);
    named.extend(aliases);
    if stage == Stage::Bf16Optimizer {
        notes.push(
            "note: read as a BF16_Optimizer checkpoint (bf16 with fp32 gradient accumulation), \
             which zero_to_fp32 refuses; the fp32 masters are taken with ZeRO-1's arithmetic"
                .to_owned(),
        );
    }
    let mut seen = HashSet::new();
    let mut excluded = Vec::new();
    let mut tensors = Vec::new();
    for (name, dtype, shape, pieces) in named {
        if !seen.insert(name.clone()) {
            return Err(bad_dir(
                &listed.dir,
                format!("tensor '{name}' is saved twice (as a trainable, frozen or buffer tensor)"),
                "the model-states file is inconsistent; save the checkpoint again",
            ));
        }
        if left_out.contains(&name) || !select.keeps(&name) {
            // Shapes from the pickles fit (states::View::shape).
            excluded.push((name, byte_len(&shape, dtype).unwrap_or(0)));
            continue;
        }
        let spec = TensorSpec {
            name: &name,
            dtype,
            shape: Some(&shape),
            hints: &DEEPSPEED_HINTS,
        };
        tensors.push(tensor_from_pieces(&spec, pieces, &files)?);
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Checkpoint {
        files,
        tensors,
        excluded,
        inputs: opened.inputs,
        notes,
        ..Checkpoint::default()
    })
}

/// The note on what the optimizer files hold besides the masters: the
/// optimizer's own states (never read) and the partitions' padding.
fn not_exported(optim: &[OptimStates], trainable: &[Named], optim_bytes: u64) -> String {
    let groups = || optim.iter().flat_map(|o| &o.flat_groups);
    let masters: u64 = groups().map(TensorRef::numel).sum();
    let master_bytes: u64 = groups().map(|t| t.numel() * t.dtype.size()).sum();
    let params: u64 = trainable.iter().map(|(_, _, shape, _)| numel(shape)).sum();
    let padding = match masters.saturating_sub(params) {
        0 => String::new(),
        n => format!(
            ", nor the {} of padding in the partitions",
            crate::error::counted(n as usize, "element", "elements")
        ),
    };
    format!(
        "note: not exported: the optimizer's states (Adam's exp_avg and exp_avg_sq; {} of the {} \
         *_optim_states.pt files besides the fp32 masters, never read){padding}",
        crate::report::human_bytes(optim_bytes.saturating_sub(master_bytes)),
        optim.len(),
    )
}

/// Interprets `data` as a model-states and as an optimizer-states pickle,
/// for the fuzz target: whatever the bytes, an error and never a panic.
pub fn interpret_pickle(data: &[u8]) -> (bool, bool) {
    match TorchSave::from_pickle(Path::new("fuzz"), data) {
        Ok(save) => (
            states::model_states(&save).is_ok(),
            states::optim_states(&save).is_ok(),
        ),
        Err(_) => (false, false),
    }
}

/// The files opened so far, in order, with what each was when opened.
#[derive(Default)]
struct Opened {
    paths: Vec<PathBuf>,
    inputs: Inputs,
    /// Bytes of every file opened.
    bytes: u64,
}

impl Opened {
    /// Opens an input (regular files only, identity taken first) and reads
    /// its zip directory and pickle.
    fn open(&mut self, path: &Path) -> Result<TorchSave> {
        let (file, seen) = open_identified(path)?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("inspect", path, e))?
            .len();
        let save = TorchSave::open(path, &file, len)?;
        self.inputs.push_opened(path.to_owned(), seen);
        self.paths.push(path.to_owned());
        self.bytes += len;
        Ok(save)
    }

    fn take_files(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.paths)
    }
}

fn bad_dir(dir: &Path, reason: String, hint: &str) -> Error {
    Error::BadCheckpoint {
        path: dir.to_owned(),
        reason,
        hint: hint.to_owned(),
    }
}

fn stage_number(stage: Stage) -> u8 {
    match stage {
        Stage::Zero(n) => n,
        Stage::Bf16Optimizer => 1,
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The optimizer files must be ranks 0..W-1 of one save, W being their
/// `partition_count`, all of one stage and group count; returns W.
fn check_optim_files(listed: &folder::TagFiles, optim: &[OptimStates]) -> Result<u64> {
    let dir = &listed.dir;
    let first = &optim[0];
    let first_name = file_name(&listed.optim_states[0].1);
    for ((_, path), states) in listed.optim_states.iter().zip(optim) {
        let name = file_name(path);
        if states.autoep {
            return Err(bad_dir(
                dir,
                format!(
                    "{name} holds AutoEP's partition-native expert state (ds_zero_partition_groups)"
                ),
                "expert-parallel checkpoints are not supported; convert it with deepspeed.checkpoint.ds_to_universal",
            ));
        }
        if states.partition_counts_differ {
            return Err(bad_dir(
                dir,
                format!(
                    "{name} has groups partitioned over different numbers of ranks: a mixture-of-experts checkpoint"
                ),
                "expert-parallel checkpoints are not supported; convert it with deepspeed.checkpoint.ds_to_universal",
            ));
        }
        if states.has_placeholder {
            return Err(bad_dir(
                dir,
                format!(
                    "{name} holds an empty placeholder for a partition: the optimizer was offloaded to NVMe"
                ),
                "load the checkpoint in DeepSpeed without NVMe offload and save it again",
            ));
        }
        if states.stage != first.stage
            || states.flat_groups.len() != first.flat_groups.len()
            || states.partition_count != first.partition_count
            || states.alignment_paddings != first.alignment_paddings
        {
            return Err(bad_dir(
                dir,
                format!(
                    "{name} and {first_name} come from different saves: their stage, partition count, \
                     group count or alignment differ"
                ),
                "a tag folder must hold the files of one save; copy the tag folder again",
            ));
        }
    }
    let world = first.partition_count;
    let ranks: Vec<u64> = listed.optim_states.iter().map(|(d, _)| *d).collect();
    let expected: Vec<u64> = (0..world).collect();
    if ranks != expected {
        let have: HashSet<u64> = ranks.iter().copied().collect();
        let missing: Vec<String> = (0..world)
            .filter(|d| !have.contains(d))
            .map(|d| format!("zero_pp_rank_{d}"))
            .collect();
        let extra: Vec<String> = ranks
            .iter()
            .filter(|d| **d >= world)
            .map(|d| format!("zero_pp_rank_{d}"))
            .collect();
        let mut what = Vec::new();
        if !missing.is_empty() {
            what.push(format!("missing: {}", crate::error::list_names(&missing)));
        }
        if !extra.is_empty() {
            what.push(format!(
                "beyond the partition count: {}",
                crate::error::list_names(&extra)
            ));
        }
        return Err(bad_dir(
            dir,
            format!(
                "the optimizer states were partitioned over {world} ranks (partition_count in {first_name}), \
                 but the folder holds {} optimizer file(s); {}",
                ranks.len(),
                what.join("; ")
            ),
            "copy every *_optim_states.pt file of the tag folder, and only those of one save",
        ));
    }
    Ok(world)
}

/// ZeRO-3 writes one model-states file per rank: ranks 0..W-1.
fn check_zero3_model_files(listed: &folder::TagFiles, world: u64) -> Result<Vec<PathBuf>> {
    let ranks: Vec<u64> = listed.zero3_model_states.iter().map(|(d, _)| *d).collect();
    if ranks != (0..world).collect::<Vec<u64>>() {
        let found: Vec<String> = listed
            .zero3_model_states
            .iter()
            .map(|(_, path)| file_name(path))
            .collect();
        return Err(bad_dir(
            &listed.dir,
            format!(
                "a ZeRO-3 checkpoint of {world} ranks needs zero_pp_rank_0 .. zero_pp_rank_{}_mp_rank_00_model_states.pt; found {}",
                world.saturating_sub(1),
                match found.is_empty() {
                    true => "none (mp_rank_00_model_states.pt is ZeRO-1/2's)".to_owned(),
                    false => crate::error::list_names(&found),
                }
            ),
            "copy every *_model_states.pt file of the tag folder, and only those of one save",
        ));
    }
    Ok(listed
        .zero3_model_states
        .iter()
        .map(|(_, path)| path.clone())
        .collect())
}

/// Refuses a model-states file of a layout this reader cannot merge, or
/// (ZeRO-3) of another save than the first rank's file `first`.
fn check_model_file(
    model: &ModelStates,
    path: &Path,
    first: Option<&(ModelStates, PathBuf)>,
    listed: &folder::TagFiles,
) -> Result<()> {
    let name = file_name(path);
    if model.module_is_none {
        return Err(bad_dir(
            &listed.dir,
            format!(
                "{name} has no module: a pipeline-parallel checkpoint keeps its layers in files of their own"
            ),
            "pipeline-parallel checkpoints are not supported; convert it with deepspeed.checkpoint.ds_to_universal",
        ));
    }
    if let Some(key) = model.expert_keys.first() {
        return Err(bad_dir(
            &listed.dir,
            format!("{name} records AutoEP expert layers ({key})"),
            "expert-parallel checkpoints are not supported; convert it with deepspeed.checkpoint.ds_to_universal",
        ));
    }
    if let Some(mp) = model.mp_world_size.filter(|mp| *mp > 1) {
        return Err(bad_dir(
            &listed.dir,
            format!(
                "{name} was saved with mp_world_size {mp}: a tensor-parallel checkpoint, of which only model-parallel rank 0's files are here"
            ),
            "merging tensor-parallel slices needs each tensor's split dimension, which a ZeRO checkpoint does not record; convert it with deepspeed.checkpoint.ds_to_universal",
        ));
    }
    if let Some((first, first_path)) = first
        && (model.global_steps != first.global_steps || model.param_shapes != first.param_shapes)
    {
        return Err(bad_dir(
            &listed.dir,
            format!(
                "{name} and {} come from different saves (their step or parameter shapes differ)",
                file_name(first_path)
            ),
            "a tag folder must hold the files of one save; copy the tag folder again",
        ));
    }
    Ok(())
}

type Named = (String, Dtype, Vec<u64>, Vec<Piece>);

/// Appends the pieces of elements `[start, end)` of a tensor of `shape`,
/// whose element `start` is at byte `first_byte` of file `file`.
fn push_range(
    pieces: &mut Vec<Piece>,
    shape: &[u64],
    start: u64,
    end: u64,
    file: usize,
    first_byte: u64,
    element: u64,
) {
    for block in flat::blocks(shape, start, end) {
        let at = first_byte + (block.first - start) * element;
        pieces.push(Piece::new(
            Location::at(file, at),
            &block.offsets,
            &block.shape,
        ));
    }
}

/// Appends rank `rank`'s share of a ZeRO-3 parameter of `shape`: elements
/// `[rank·c, (rank+1)·c)` (c = `ceil(n/W)`) cut at the parameter's end, the
/// share's first element at byte `first_byte` of file `file`. Trailing
/// ranks may hold padding only.
fn push_zero3_share(
    pieces: &mut Vec<Piece>,
    shape: &[u64],
    rank: usize,
    file: usize,
    first_byte: u64,
    element: u64,
    world: u64,
) {
    let n = numel(shape);
    let share = n.div_ceil(world);
    let start = rank as u64 * share;
    let end = (start + share).min(n);
    if start < end {
        push_range(pieces, shape, start, end, file, first_byte, element);
    }
}

fn numel(shape: &[u64]) -> u64 {
    shape.iter().product()
}

/// The trainable parameters, from the fp32 masters (§3.1, §3.2).
fn trainable_tensors(
    stage: Stage,
    world: u64,
    model: &ModelStates,
    optim: &[OptimStates],
    listed: &folder::TagFiles,
) -> Result<Vec<Named>> {
    let groups = optim[0].flat_groups.len();
    if model.param_shapes.len() != groups {
        return Err(bad_dir(
            &listed.dir,
            format!(
                "the model states list {} parameter group(s), the optimizer files {groups}",
                model.param_shapes.len()
            ),
            "the model-states and optimizer-states files come from different saves; copy the tag folder again",
        ));
    }
    let mut out = Vec::new();
    for (g, params) in model.param_shapes.iter().enumerate() {
        let parts: Vec<&TensorRef> = optim.iter().map(|o| &o.flat_groups[g]).collect();
        let dtype = parts[0].dtype;
        if let Some(r) = parts.iter().position(|p| p.dtype != dtype) {
            return Err(bad_dir(
                &listed.dir,
                format!(
                    "group {g}'s master partition is {} on rank 0 but {} on rank {r}",
                    dtype, parts[r].dtype
                ),
                "the optimizer files come from different saves; copy the tag folder again",
            ));
        }
        let size = dtype.size();
        let mismatch = |reason: String| {
            bad_dir(
                &listed.dir,
                format!("parameter group {g}: {reason}"),
                "the model-states and optimizer-states files do not belong together (another save, or a truncated copy); copy the tag folder again",
            )
        };
        match stage {
            Stage::Zero(3) => {
                let mut at = 0u64;
                for (name, shape) in params {
                    let n = numel(shape);
                    let share = n.div_ceil(world);
                    let mut pieces = Vec::new();
                    for (r, part) in parts.iter().enumerate() {
                        if at + share > part.numel() {
                            return Err(mismatch(format!(
                                "'{name}' needs elements [{at}, {}) of rank {r}'s partition, which holds {}",
                                at + share,
                                part.numel()
                            )));
                        }
                        push_zero3_share(
                            &mut pieces,
                            shape,
                            r,
                            r,
                            part.element_offset(at),
                            size,
                            world,
                        );
                    }
                    at += share;
                    out.push((name.clone(), dtype, shape.clone(), pieces));
                }
                if let Some(r) = parts.iter().position(|p| p.numel() != at) {
                    return Err(mismatch(format!(
                        "its parameters fill {at} elements of each rank's partition, but rank {r}'s holds {}",
                        parts[r].numel()
                    )));
                }
            }
            _ => {
                let lens: Vec<u64> = parts.iter().map(|p| p.numel()).collect();
                let starts: Vec<u64> = lens
                    .iter()
                    .scan(0u64, |sum, len| {
                        let start = *sum;
                        *sum += len;
                        Some(start)
                    })
                    .collect();
                let total: u64 = lens.iter().sum();
                let paddings = optim[0].alignment_paddings.as_ref().and_then(|p| p.get(g));
                let mut at = 0u64;
                for (i, (name, shape)) in params.iter().enumerate() {
                    let n = numel(shape);
                    if at.saturating_add(n) > total {
                        return Err(mismatch(format!(
                            "'{name}' needs elements [{at}, {}) of the group, whose partitions hold {total}",
                            at + n
                        )));
                    }
                    let mut pieces = Vec::new();
                    for (r, part) in parts.iter().enumerate() {
                        let (part_start, part_end) = (starts[r], starts[r] + lens[r]);
                        let (a, b) = (at.max(part_start), (at + n).min(part_end));
                        if a < b {
                            let first = part.element_offset(a - part_start);
                            push_range(&mut pieces, shape, a - at, b - at, r, first, size);
                        }
                    }
                    out.push((name.clone(), dtype, shape.clone(), pieces));
                    // Saturating: a padding beyond the group (a corrupt
                    // pickle) then fails the check below or the next one.
                    let padding = paddings.and_then(|p| p.get(i)).copied().unwrap_or(0);
                    at = at.saturating_add(n).saturating_add(padding);
                }
                // zero_to_fp32's own check: both ends align to 2·W elements.
                let align = |x: u64| x.div_ceil(2 * world);
                if align(at) != align(total) {
                    return Err(mismatch(format!(
                        "its parameters take {at} elements, but the partitions hold {total}"
                    )));
                }
            }
        }
    }
    Ok(out)
}

/// Frozen parameters, from the model states in the training dtype (§3.3).
fn frozen_tensors(
    stage: Stage,
    world: u64,
    models: &[(ModelStates, PathBuf)],
    model_base: usize,
    notes: &mut Vec<String>,
) -> Result<Vec<Named>> {
    let (primary, primary_path) = &models[0];
    let whole = |tensor: &TensorRef, n: u64, file: usize, shape: &[u64]| {
        let mut pieces = Vec::new();
        push_range(
            &mut pieces,
            shape,
            0,
            n,
            file,
            tensor.offset,
            tensor.dtype.size(),
        );
        pieces
    };
    let Some(shapes) = &primary.frozen_param_shapes else {
        if matches!(stage, Stage::Zero(1) | Stage::Bf16Optimizer) {
            // ZeRO-1 saves no frozen fragments: they are in `module`.
            let trainable: HashSet<&str> = primary
                .param_shapes
                .iter()
                .flatten()
                .map(|(name, _)| name.as_str())
                .collect();
            let buffers: HashSet<&str> = primary.buffer_names.iter().map(String::as_str).collect();
            let aliases: HashSet<&str> = primary
                .shared_params
                .iter()
                .map(|(a, _)| a.as_str())
                .collect();
            let frozen: Vec<Named> = primary
                .module
                .iter()
                .filter(|(name, _)| {
                    !trainable.contains(name.as_str())
                        && !buffers.contains(name.as_str())
                        && !aliases.contains(name.as_str())
                })
                .map(|(name, tensor)| {
                    let pieces = whole(tensor, tensor.numel(), model_base, &tensor.shape);
                    (name.clone(), tensor.dtype, tensor.shape.clone(), pieces)
                })
                .collect();
            if !frozen.is_empty() {
                let names: Vec<String> = frozen.iter().map(|(n, ..)| n.clone()).collect();
                notes.push(format!(
                    "note: {} frozen parameter(s) exported from the model states in the training dtype \
                     (ZeRO-1 saves no fp32 copy of them; zero_to_fp32 leaves them out): {}",
                    names.len(),
                    crate::error::list_names(&names)
                ));
            }
            return Ok(frozen);
        }
        notes.push(
            "note: the checkpoint records no frozen parameters (saved with exclude_frozen_parameters, \
             as HF Trainer saves PEFT models): only the trainable parameters and buffers are exported"
                .to_owned(),
        );
        return Ok(Vec::new());
    };
    // Each rank's fragments by name (a PEFT model has thousands).
    let fragments: Vec<HashMap<&str, &TensorRef>> = models
        .iter()
        .map(|(model, _)| {
            (model.frozen_param_fragments.iter())
                .map(|(name, tensor)| (name.as_str(), tensor))
                .collect()
        })
        .collect();
    let mut out = Vec::new();
    for (name, shape) in shapes {
        let n = numel(shape);
        let missing = |path: &Path, what: String| Error::BadCheckpoint {
            path: path.to_owned(),
            reason: format!("frozen parameter '{name}': {what}"),
            hint: "the model-states file is incomplete or altered; copy the tag folder again"
                .to_owned(),
        };
        let fragment = |rank: usize| fragments[rank].get(name.as_str()).copied().cloned();
        if n == 0 {
            let dtype = fragment(0).map_or(Dtype::F32, |t| t.dtype);
            out.push((name.clone(), dtype, shape.clone(), Vec::new()));
            continue;
        }
        match stage {
            Stage::Zero(3) => {
                let share = n.div_ceil(world);
                let mut pieces = Vec::new();
                let mut dtype = None;
                for (r, (_, path)) in models.iter().enumerate() {
                    let Some(part) = fragment(r) else {
                        return Err(missing(
                            path,
                            "no fragment in frozen_param_fragments".into(),
                        ));
                    };
                    if part.numel() < share || dtype.is_some_and(|d| d != part.dtype) {
                        return Err(missing(
                            path,
                            format!(
                                "its fragment is {} {:?}, not {share} elements of rank {r}'s share",
                                part.dtype, part.shape
                            ),
                        ));
                    }
                    dtype = Some(part.dtype);
                    let size = part.dtype.size();
                    push_zero3_share(
                        &mut pieces,
                        shape,
                        r,
                        model_base + r,
                        part.offset,
                        size,
                        world,
                    );
                }
                out.push((
                    name.clone(),
                    dtype.unwrap_or(Dtype::F32),
                    shape.clone(),
                    pieces,
                ));
            }
            _ => {
                let Some(part) = fragment(0) else {
                    return Err(missing(
                        primary_path,
                        "no tensor in frozen_param_fragments".into(),
                    ));
                };
                if part.numel() < n {
                    return Err(missing(
                        primary_path,
                        format!(
                            "its tensor holds {} elements, the shape {shape:?} needs {n}",
                            part.numel()
                        ),
                    ));
                }
                out.push((
                    name.clone(),
                    part.dtype,
                    shape.clone(),
                    whole(&part, n, model_base, shape),
                ));
            }
        }
    }
    Ok(out)
}

/// The persistent buffers, from the (rank 0) model states' `module`.
fn buffer_tensors(model: &ModelStates, model_base: usize) -> Vec<Named> {
    let buffers: HashSet<&str> = model.buffer_names.iter().map(String::as_str).collect();
    model
        .module
        .iter()
        .filter(|(name, _)| buffers.contains(name.as_str()))
        .map(|(name, tensor)| {
            let mut pieces = Vec::new();
            push_range(
                &mut pieces,
                &tensor.shape,
                0,
                tensor.numel(),
                model_base,
                tensor.offset,
                tensor.dtype.size(),
            );
            (name.clone(), tensor.dtype, tensor.shape.clone(), pieces)
        })
        .collect()
}

/// Tied aliases (`shared_params`): left out, as `save_pretrained` leaves
/// them, with one note; with `keep_tied`, written as copies of their owner.
fn tied_aliases(
    model: &ModelStates,
    named: &[Named],
    keep_tied: bool,
    notes: &mut Vec<String>,
) -> Vec<Named> {
    if model.shared_params.is_empty() {
        return Vec::new();
    }
    let by_name: HashMap<&str, &Named> = named.iter().map(|t| (t.0.as_str(), t)).collect();
    let mut copies = Vec::new();
    let mut pairs = Vec::new();
    for (alias, owner) in &model.shared_params {
        pairs.push(format!("'{alias}' = '{owner}'"));
        if keep_tied && let Some((_, dtype, shape, pieces)) = by_name.get(owner.as_str()).copied() {
            copies.push((alias.clone(), *dtype, shape.clone(), pieces.clone()));
        }
    }
    notes.push(match keep_tied {
        true => format!(
            "note: tied weights written twice (--keep-tied), each alias as a copy of its owner: {}",
            pairs.join(", ")
        ),
        false => format!(
            "note: tied weights are written once, under the owner's name, as save_pretrained writes them \
             (from_pretrained ties them again); left out: {} (--keep-tied writes the alias too)",
            pairs.join(", ")
        ),
    });
    copies
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixtures_pickles_interpret_and_garbage_does_not_panic() {
        // The fuzz target's entry: DeepSpeed's own pickles (its seeds) read
        // as what they are, and any prefix of them refused without a panic.
        let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/pickle");
        let model = std::fs::read(seeds.join("ds-z3-w2-bf16-model.pkl")).unwrap();
        let optim = std::fs::read(seeds.join("ds-z3-w2-bf16-optim.pkl")).unwrap();
        // Tensors have no storage entry here, so only the shapes parse.
        assert_eq!(interpret_pickle(&model), (false, false));
        let save = TorchSave::from_pickle(Path::new("m"), &model).unwrap();
        let err = states::model_states(&save).unwrap_err().to_string();
        assert!(err.contains("has no entry in the archive"), "{err}");
        let save = TorchSave::from_pickle(Path::new("o"), &optim).unwrap();
        let err = states::optim_states(&save).unwrap_err().to_string();
        assert!(err.contains("fp32_flat_groups[0]"), "{err}");
        for cut in (0..optim.len()).step_by(37) {
            let _ = interpret_pickle(&optim[..cut]);
        }
    }

    #[test]
    fn a_shape_whose_size_overflows_is_refused_where_it_is_read() {
        // {'module': OrderedDict(), 'param_shapes': [OrderedDict(w=
        // torch.Size([2**40, 2**40]))]}, pickled by Python: 2^80 elements.
        let hex = "80027d71002858060000006d6f64756c65710163636f6c6c656374696f6e730a4f726465726564\
                   446963740a710229527103580c000000706172616d5f73686170657371045d710568022952710658\
                   0100000077710763746f7263680a53697a650a71088a060000000000018a06000000000001867109\
                   85710a52710b7361752e";
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let save = TorchSave::from_pickle(Path::new("m"), &bytes).unwrap();
        let err = states::model_states(&save).unwrap_err().to_string();
        assert!(
            err.contains(
                "param_shapes[0]['w'] is [1099511627776, 1099511627776], a size that overflows"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_training_scripts_client_state_is_recorded_not_refused() {
        // numpy numbers, an RNG state and argparse arguments, as a training
        // script's client_state puts them beside the weights: parsed as
        // inert records (nothing is called), so only the missing module
        // is reported.
        let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/pickle");
        let state = std::fs::read(seeds.join("ds-client-state.pkl")).unwrap();
        let save = TorchSave::from_pickle(Path::new("c"), &state).unwrap();
        let err = states::model_states(&save).unwrap_err().to_string();
        assert!(err.contains("has no 'module' entry"), "{err}");
    }
}
