//! The plan: output files, the tensor layout inside each, their header bytes,
//! and which rank writes what. Pure and deterministic, so every rank that
//! builds it from the same inputs gets the same plan.

pub mod dtypes;
pub mod fingerprint;
pub mod mapping;
pub mod names;
pub mod schedule;

pub use schedule::{BALANCED_ALIGN, Schedule, WORK_ITEM_BYTES, WorkItem};

use crate::checkpoint::{Checkpoint, FullTensor};
use crate::error::{Error, Result};
use crate::plan::dtypes::DtypeMapSource;
use crate::plan::mapping::{Assignment, MappingSource, Unmapped, assign_named};
use crate::plan::names::strip_prefixes;
use crate::safetensors::dtype::Dtype;
use crate::safetensors::header::{MAX_HEADER_LEN, TensorEntry, encode_header};
use crate::safetensors::naming::output_name;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::PathBuf;

/// One tensor's place in an output file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputEntry {
    /// Index into [`Plan::tensors`].
    pub tensor: usize,
    /// The dtype written: the tensor's own, or the `--dtype` target.
    pub dtype: Dtype,
    /// Byte range within the output file's data section.
    pub bytes: Range<u64>,
}

/// One consolidated output file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputFile {
    /// Output index, from 1.
    pub index: u32,
    /// File name, `model-IIIII-of-NNNNN.safetensors`.
    pub name: String,
    /// The length prefix and padded JSON header, written at offset 0.
    pub header: Vec<u8>,
    /// Tensors in data order.
    pub entries: Vec<OutputEntry>,
    /// The rank that writes this file.
    pub owner: usize,
}

impl OutputFile {
    /// Absolute offset of the data section.
    pub fn data_start(&self) -> u64 {
        self.header.len() as u64
    }

    /// Bytes of tensor data.
    pub fn data_len(&self) -> u64 {
        self.entries.last().map_or(0, |e| e.bytes.end)
    }

    /// Total file size.
    pub fn len(&self) -> u64 {
        self.data_start() + self.data_len()
    }

    /// Whether the file holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// How the output is laid out, from the command line.
#[derive(Clone, Debug, Default)]
pub struct PlanOptions {
    /// Where the tensor-to-file assignment comes from.
    pub mapping: MappingSource,
    /// What to do with tensors the mapping does not name.
    pub unmapped: Unmapped,
    /// Prefixes stripped from output tensor names (first match wins).
    pub strip_prefixes: Vec<String>,
    /// Convert floating-point tensors to this dtype (`--dtype`).
    pub dtype: Option<Dtype>,
    /// Per-tensor original dtypes (`--dtype-map`), resolved with `dtype`
    /// by NeMo's rules ([`dtypes`]).
    pub dtype_map: DtypeMapSource,
    /// How output bytes are split among ranks.
    pub schedule: Schedule,
    /// The inputs' fingerprint ([`fingerprint::input_fingerprint`]),
    /// recorded in every header's `__metadata__`: not from the command line
    /// but set by the run once it has read the inputs.
    pub input_fingerprint: Option<String>,
    /// The index file's name (`--index-name`); `None`: Hugging Face's
    /// `model.safetensors.index.json`.
    pub index_name: Option<String>,
    /// Keep saved names under a single top-level key of the saved state
    /// dict (`--keep-top-level-key`) instead of writing the names inside it.
    pub keep_top_level_key: bool,
}

/// Plans the consolidation of `checkpoint` for `world_size` ranks
/// (identical on every rank that read the same checkpoint).
pub fn make(checkpoint: Checkpoint, options: &PlanOptions, world_size: usize) -> Result<Plan> {
    let mut tensors = checkpoint.tensors;
    let unwrapped = match options.keep_top_level_key {
        true => None,
        false => names::single_top_level_key(&tensors, &checkpoint.top_level_keys),
    };
    let prefixes = match &unwrapped {
        Some(key) => names::under_key(key, &options.strip_prefixes),
        None => options.strip_prefixes.clone(),
    };
    let saved_names = strip_prefixes(&mut tensors, &prefixes, &checkpoint.files)?;
    let map = dtypes::load_map(&options.dtype_map)?;
    let output = dtypes::resolve(&tensors, &saved_names, options.dtype, &map);
    let sizes: Vec<(&str, u64)> = tensors
        .iter()
        .zip(&output.dtypes)
        .map(|(t, dtype)| (t.name.as_str(), t.element_count() * dtype.size()))
        .collect();
    let mut assignment = assign_named(&sizes, &saved_names, &options.mapping, options.unmapped)?;
    let dtype_warning = output.warning();
    let (tensors, dtypes, saved_names, omitted) =
        omit_unassigned(tensors, output.dtypes, saved_names, &mut assignment);
    let mut plan = Plan::build(
        checkpoint.files,
        tensors,
        assignment,
        world_size,
        dtypes,
        options.input_fingerprint.as_deref(),
    )?;
    if options.mapping.files_only_where_tensors() {
        // Before anything reads positions in `files`: the plan is made.
        plan.files.retain(|file| !file.is_empty());
    }
    plan.dtype_warning = dtype_warning;
    plan.saved_names = saved_names;
    plan.omitted = omitted;
    plan.unwrapped_key = unwrapped;
    if let Some(name) = &options.index_name {
        plan.index_name = name.clone();
    }
    plan.schedule = options.schedule;
    Ok(plan)
}

/// Drops the tensors the assignment left out (file 0, [`Unmapped::Omit`]),
/// with their dtypes, saved names and assignment entries; returns what
/// remains and the names dropped.
fn omit_unassigned(
    tensors: Vec<FullTensor>,
    dtypes: Vec<Dtype>,
    saved_names: Vec<String>,
    assignment: &mut Assignment,
) -> (Vec<FullTensor>, Vec<Dtype>, Vec<String>, Vec<String>) {
    let mut kept = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut omitted = Vec::new();
    let each = tensors.into_iter().zip(dtypes).zip(saved_names);
    for (((tensor, dtype), saved), &file) in each.zip(&assignment.file_of) {
        if file == 0 {
            omitted.push(tensor.name);
        } else {
            kept.0.push(tensor);
            kept.1.push(dtype);
            kept.2.push(saved);
            kept.3.push(file);
        }
    }
    assignment.file_of = kept.3;
    (kept.0, kept.1, kept.2, omitted)
}

/// Everything every rank agrees on before any byte is written.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Input shard paths, indexed by `Location::shard`.
    pub shards: Vec<PathBuf>,
    /// Full tensors, sorted by name.
    pub tensors: Vec<FullTensor>,
    /// Each tensor's name as saved, before `--strip-prefix` or a top-level
    /// key was taken off (messages about its input chunks use it).
    pub saved_names: Vec<String>,
    /// Output files in index order.
    pub files: Vec<OutputFile>,
    /// Mapped names that no shard holds (left out, reported as a warning).
    pub missing: Vec<String>,
    /// Tensors the mapping does not name, left out ([`Unmapped::Omit`]).
    pub omitted: Vec<String>,
    /// The one warning about tensors of `--dtype-map` whose quantized or
    /// packed original was not restored.
    pub dtype_warning: Option<String>,
    /// The index file's name, written last.
    pub index_name: String,
    /// The one top-level key of the saved state dict every tensor sat
    /// under, left out of the output names (accelerate's `{"model": ...}`).
    pub unwrapped_key: Option<String>,
    /// Number of ranks the plan was made for.
    pub world_size: usize,
    /// How work is split among the ranks. File creation, renaming and
    /// verification stay with each file's owner whatever the schedule.
    pub schedule: Schedule,
    /// Files already complete in OUTPUT_DIR (`--resume`): nobody creates
    /// or writes them, whatever the schedule. Set after the ranks agreed on
    /// the plan, identically on every rank.
    pub kept: BTreeSet<usize>,
}

impl Plan {
    /// [`Plan::new`], refusing any output file whose header safetensors
    /// readers would not accept ([`check_header_len`]): the way to build the
    /// plan of a run, before anything is written.
    pub fn build(
        shards: Vec<PathBuf>,
        tensors: Vec<FullTensor>,
        assignment: Assignment,
        world_size: usize,
        dtypes: Vec<Dtype>,
        fingerprint: Option<&str>,
    ) -> Result<Plan> {
        let plan = Plan::new(shards, tensors, assignment, world_size, dtypes, fingerprint);
        for file in &plan.files {
            let json_len = file.header.len() as u64 - 8;
            check_header_len(&file.name, file.entries.len(), json_len)?;
        }
        Ok(plan)
    }

    /// Lays out the output files, writing tensor `t` as `dtypes[t]` (its
    /// saved dtype or the one [`dtypes::resolve`] chose), and assigns file
    /// `index` to rank `index % world_size` (the design card's schedule).
    /// Every header records `fingerprint`, the inputs'
    /// ([`fingerprint::input_fingerprint`]), if given. Does not check header
    /// sizes: runs use [`Plan::build`].
    pub fn new(
        shards: Vec<PathBuf>,
        tensors: Vec<FullTensor>,
        assignment: Assignment,
        world_size: usize,
        dtypes: Vec<Dtype>,
        fingerprint: Option<&str>,
    ) -> Plan {
        let mut members: BTreeMap<u32, Vec<usize>> = (1..=assignment.file_count)
            .map(|i| (i, Vec::new()))
            .collect();
        for (tensor, &index) in assignment.file_of.iter().enumerate() {
            members.entry(index).or_default().push(tensor);
        }
        let metadata = fingerprint::header_metadata(fingerprint);
        let files = members
            .into_iter()
            .map(|(index, mut members)| {
                // Largest elements first, then by name: every tensor then
                // starts aligned to its element size, as safetensors' writer does.
                let dtype_of = |t: usize| dtypes[t];
                members.sort_by(|&a, &b| {
                    (dtype_of(b).size().cmp(&dtype_of(a).size()))
                        .then_with(|| tensors[a].name.cmp(&tensors[b].name))
                });
                let mut offset = 0u64;
                let mut entries = Vec::with_capacity(members.len());
                for tensor in members {
                    let dtype = dtype_of(tensor);
                    let len = tensors[tensor].element_count() * dtype.size();
                    entries.push(OutputEntry {
                        tensor,
                        dtype,
                        bytes: offset..offset + len,
                    });
                    offset += len;
                }
                OutputFile {
                    index,
                    name: output_name(index, assignment.file_count),
                    header: file_header(&tensors, &entries, &metadata),
                    entries,
                    owner: index as usize % world_size,
                }
            })
            .collect();
        Plan {
            shards,
            saved_names: tensors.iter().map(|t| t.name.clone()).collect(),
            tensors,
            files,
            missing: assignment.missing,
            omitted: vec![],
            dtype_warning: None,
            index_name: crate::safetensors::naming::INDEX_NAME.to_string(),
            unwrapped_key: None,
            world_size,
            schedule: Schedule::Modulo,
            kept: BTreeSet::new(),
        }
    }

    /// The header file `f` would have with `fingerprint` recorded instead
    /// of the plan's (none: as versions before the fingerprint wrote it),
    /// to recognise a file of this layout written from other inputs.
    pub fn header_with_fingerprint(&self, f: usize, fingerprint: Option<&str>) -> Vec<u8> {
        let metadata = fingerprint::header_metadata(fingerprint);
        file_header(&self.tensors, &self.files[f].entries, &metadata)
    }

    /// Indices of the files `rank` writes: the ones it owns and that are
    /// not kept from an earlier run (it creates, renames and verifies them).
    pub fn files_to_write(&self, rank: usize) -> Vec<usize> {
        let mut files = self.files_of(rank);
        files.retain(|f| !self.kept.contains(f));
        files
    }

    /// Indices of the files `rank` owns: creates, renames and verifies.
    pub fn files_of(&self, rank: usize) -> Vec<usize> {
        (0..self.files.len())
            .filter(|&f| self.files[f].owner == rank)
            .collect()
    }

    /// A digest of everything the ranks must agree on: inputs, where every
    /// piece's bytes are (file, offset, block, replicas; for a DCP chunk
    /// not located yet, its archive's place), output layout and headers,
    /// owners and schedule. Headers alone are not enough: two node-local
    /// copies whose `.metadata` point a chunk at different archives give
    /// the same headers and copy different bytes.
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        for path in &self.shards {
            hash.update(path.as_os_str().as_encoded_bytes());
            hash.update([0]);
        }
        let numbers = |hash: &mut Sha256, values: &[u64]| {
            hash.update((values.len() as u64).to_le_bytes());
            for value in values {
                hash.update(value.to_le_bytes());
            }
        };
        for tensor in &self.tensors {
            hash.update(tensor.name.as_bytes());
            hash.update([0]);
            hash.update(tensor.dtype.name().as_bytes());
            hash.update([0]);
            numbers(&mut hash, &tensor.shape);
            hash.update((tensor.pieces.len() as u64).to_le_bytes());
            for piece in &tensor.pieces {
                numbers(&mut hash, &piece.offsets);
                numbers(&mut hash, &piece.shape);
                let copies = std::iter::once(&piece.location).chain(&piece.replicas);
                hash.update((piece.replicas.len() as u64 + 1).to_le_bytes());
                for location in copies {
                    let crc = location.crc32.map_or(u64::MAX, u64::from);
                    let archive = location.archive_len.unwrap_or(u64::MAX);
                    numbers(
                        &mut hash,
                        &[location.shard as u64, location.offset, crc, archive],
                    );
                }
            }
        }
        for file in &self.files {
            hash.update(file.name.as_bytes());
            hash.update(&file.header);
            hash.update((file.owner as u64).to_le_bytes());
        }
        hash.update((self.world_size as u64).to_le_bytes());
        hash.update([self.schedule as u8]);
        hash.finalize().into()
    }

    /// Total tensor bytes across all output files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(OutputFile::data_len).sum()
    }
}

/// The header bytes of an output file holding `entries`, with `metadata`.
fn file_header(
    tensors: &[FullTensor],
    entries: &[OutputEntry],
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    let header_entries: Vec<TensorEntry> = entries
        .iter()
        .map(|entry| TensorEntry {
            name: tensors[entry.tensor].name.clone(),
            dtype: entry.dtype,
            shape: tensors[entry.tensor].shape.clone(),
            begin: entry.bytes.start,
            end: entry.bytes.end,
        })
        .collect();
    encode_header(metadata, &header_entries)
}

/// Refuses an output file whose JSON header (`json_len` bytes, padding
/// included) exceeds [`MAX_HEADER_LEN`], the limit of the safetensors
/// library and of this tool's own reader: such a file would be written in
/// full and then be unreadable. Millions of tiny tensors in one file get
/// there (about 60 bytes of header per tensor).
pub fn check_header_len(file: &str, tensors: usize, json_len: u64) -> Result<()> {
    if json_len <= MAX_HEADER_LEN {
        return Ok(());
    }
    Err(Error::usage(
        format!(
            "{file} would hold {tensors} tensors with a {json_len}-byte header, over the \
             {MAX_HEADER_LEN}-byte limit of safetensors readers"
        ),
        "spread the tensors over more output files: pass --max-shard-size (smaller than now, if given), \
         or a --mapping/--hf-index with more files",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::header::parse_header;

    #[test]
    fn headers_up_to_the_limit_pass_and_longer_ones_are_refused() {
        let name = "model-00001-of-00001.safetensors";
        assert!(check_header_len(name, 3, MAX_HEADER_LEN).is_ok());
        let err = check_header_len(name, 1_600_000, MAX_HEADER_LEN + 8)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "model-00001-of-00001.safetensors would hold 1600000 tensors with a 100000008-byte \
             header, over the 100000000-byte limit of safetensors readers\n  hint: spread the \
             tensors over more output files: pass --max-shard-size (smaller than now, if given), \
             or a --mapping/--hf-index with more files"
        );
    }

    #[test]
    fn a_plan_with_an_oversized_header_is_refused_and_others_pass() {
        // Two tensors whose names alone fill the header past the limit.
        let long = |c: char| c.to_string().repeat(MAX_HEADER_LEN as usize / 2);
        let tensors = vec![
            tensor(&long('a'), Dtype::U8, &[1]),
            tensor(&long('b'), Dtype::U8, &[1]),
            tensor("small", Dtype::U8, &[1]),
        ];
        let assignment = |file_of: Vec<u32>| Assignment {
            file_count: *file_of.iter().max().unwrap(),
            file_of,
            missing: vec![],
        };
        let err = Plan::build(
            vec![],
            tensors.clone(),
            assignment(vec![1, 1, 2]),
            1,
            saved(&tensors),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("model-00001-of-00002.safetensors would hold 2 tensors with a 1000001"),
            "{}",
            &err[..200]
        );
        // One long name per file fits.
        let dtypes = saved(&tensors);
        let plan =
            Plan::build(vec![], tensors, assignment(vec![1, 2, 2]), 1, dtypes, None).unwrap();
        assert!(plan.files[0].header.len() as u64 - 8 <= MAX_HEADER_LEN);
        assert!(plan.files[1].header.len() as u64 - 8 > MAX_HEADER_LEN / 2);
    }

    /// Every tensor written in its saved dtype.
    fn saved(tensors: &[FullTensor]) -> Vec<Dtype> {
        tensors.iter().map(|t| t.dtype).collect()
    }

    fn tensor(name: &str, dtype: Dtype, shape: &[u64]) -> FullTensor {
        FullTensor {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            pieces: vec![],
        }
    }

    #[test]
    fn files_are_ordered_by_element_size_then_name_and_aligned() {
        let tensors = vec![
            tensor("a", Dtype::U8, &[3]),
            tensor("b", Dtype::F64, &[2]),
            tensor("c", Dtype::BF16, &[5]),
            tensor("d", Dtype::F32, &[]),
        ];
        let assignment = Assignment {
            file_of: vec![1, 1, 1, 1],
            file_count: 1,
            missing: vec![],
        };
        let dtypes = saved(&tensors);
        let plan = Plan::new(vec![], tensors, assignment, 1, dtypes, None);
        let file = &plan.files[0];
        let order: Vec<&str> = file
            .entries
            .iter()
            .map(|e| plan.tensors[e.tensor].name.as_str())
            .collect();
        assert_eq!(order, ["b", "d", "c", "a"]);
        for entry in &file.entries {
            let size = plan.tensors[entry.tensor].dtype.size();
            assert_eq!((file.data_start() + entry.bytes.start) % size, 0);
        }
        assert_eq!(file.header.len() % 8, 0);
        let parsed = parse_header(&file.header[8..], file.len()).unwrap();
        assert_eq!(parsed.metadata["format"], "pt");
        assert_eq!(parsed.tensors.len(), 4);
    }

    #[test]
    fn files_go_to_index_modulo_world_size_and_split_into_items() {
        let tensors = vec![
            tensor("big", Dtype::U8, &[WORK_ITEM_BYTES * 2 + 1]),
            tensor("small", Dtype::U8, &[1]),
        ];
        let assignment = Assignment {
            file_of: vec![1, 3],
            file_count: 3,
            missing: vec![],
        };
        let dtypes = saved(&tensors);
        let plan = Plan::new(vec![], tensors, assignment, 2, dtypes, None);
        let owners: Vec<usize> = plan.files.iter().map(|f| f.owner).collect();
        assert_eq!(owners, [1, 0, 1]);
        assert!(plan.files[1].is_empty());
        let items = plan.work_items(1);
        assert_eq!(items.len(), 4);
        assert_eq!(items[2].bytes, WORK_ITEM_BYTES * 2..WORK_ITEM_BYTES * 2 + 1);
        assert!(plan.work_items(0).is_empty());
        assert_eq!(plan.bytes_per_rank(), [0, WORK_ITEM_BYTES * 2 + 2]);
    }
}
