//! The options a user gives, from whichever front end, and every rule about
//! them: their names, the spellings of their choices (NeMo's dtype aliases
//! included), their ranges and which of them go together. The command's
//! clap definitions and the Python binding only convert their own types
//! into [`Options`]; [`Options::into_config`] is the one place that refuses
//! a combination or a value, so both front ends refuse the same things with
//! the same words, each naming the option as its user spells it
//! ([`Spelling`]: `--threads 0` or `threads=0`).

use crate::checkpoint::format::InputFormat;
use crate::checkpoint::hf_shards::HeaderReading;
use crate::checkpoint::select::Selection;
use crate::error::{Error, Result};
use crate::plan::Schedule;
use crate::plan::dtypes::DtypeMapSource;
use crate::plan::mapping::{MappingSource, Unmapped, parse_size};
use crate::run::{Config, Mode, Verbosity};
use crate::safetensors::dtype::Dtype;
use crate::safetensors::naming::index_name_for;
use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::PathBuf;

/// The most copy threads a rank starts; larger counts are taken as this.
/// Every thread is started up front with its own stack, and a copy is
/// bound by the storage long before a rank has a thousand requests in
/// flight, while tens of thousands of threads exhaust the process's thread
/// limit or memory maps instead of copying faster (65535 used to hang).
/// Capping rather than refusing lets a caller pass any positive count, as
/// `ThreadPoolExecutor(max_workers=N)` allows, which starts threads only
/// as work arrives.
pub const MAX_THREADS: usize = 1024;

/// The shortest progress interval: every round is a collective over all
/// ranks and, in a log, a line; ten a second is already more than anyone
/// reads, and a nanosecond would print a line per microsecond of copying.
pub const MIN_PROGRESS_SECS: f64 = 0.1;

/// The longest progress interval: a day.
pub const MAX_PROGRESS_SECS: f64 = 86_400.0;

/// The progress interval when none is given.
pub const DEFAULT_PROGRESS_SECS: f64 = 10.0;

/// The most ranks `--dry-run --ranks N` plans for: a plan's per-rank
/// tables grow with N, and no job has a million ranks.
pub const MAX_PLAN_RANKS: i64 = 1_000_000;

/// One option, as the front ends name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[allow(missing_docs)]
pub enum Opt {
    InputFormat,
    Tag,
    Include,
    Exclude,
    Mapping,
    HfIndex,
    MaxShardSize,
    Unmapped,
    Threads,
    DryRun,
    Ranks,
    RanksPerNode,
    Overwrite,
    Resume,
    HfAssets,
    StagingDir,
    IndexName,
    KeepTopLevelKey,
    KeepTied,
    ExcludeFrozenParameters,
    NoHfMetadata,
    Verify,
    VerifyOnly,
    AllowMissingShardFiles,
    SourceRanks,
    Quiet,
    Verbose,
    Progress,
    Report,
    Schedule,
    Headers,
    Dtype,
    DtypeMap,
    StripPrefix,
}

impl Opt {
    /// Every option, in the command's `--help` order.
    pub const ALL: [Opt; 34] = [
        Opt::InputFormat,
        Opt::Tag,
        Opt::Include,
        Opt::Exclude,
        Opt::Mapping,
        Opt::HfIndex,
        Opt::MaxShardSize,
        Opt::Unmapped,
        Opt::Threads,
        Opt::DryRun,
        Opt::Ranks,
        Opt::RanksPerNode,
        Opt::Overwrite,
        Opt::Resume,
        Opt::HfAssets,
        Opt::StagingDir,
        Opt::IndexName,
        Opt::KeepTopLevelKey,
        Opt::KeepTied,
        Opt::ExcludeFrozenParameters,
        Opt::NoHfMetadata,
        Opt::Verify,
        Opt::VerifyOnly,
        Opt::AllowMissingShardFiles,
        Opt::SourceRanks,
        Opt::Quiet,
        Opt::Verbose,
        Opt::Progress,
        Opt::Report,
        Opt::Schedule,
        Opt::Headers,
        Opt::Dtype,
        Opt::DtypeMap,
        Opt::StripPrefix,
    ];

    /// The Python keyword (the flag without `--`, `-` as `_`); `None` for
    /// the command's own `--quiet` and `--verbose` (Python's `logging`
    /// filters by level instead).
    pub fn keyword(self) -> Option<&'static str> {
        Some(match self {
            Opt::InputFormat => "input_format",
            Opt::Tag => "tag",
            Opt::Include => "include",
            Opt::Exclude => "exclude",
            Opt::Mapping => "mapping",
            Opt::HfIndex => "hf_index",
            Opt::MaxShardSize => "max_shard_size",
            Opt::Unmapped => "unmapped",
            Opt::Threads => "threads",
            Opt::DryRun => "dry_run",
            Opt::Ranks => "ranks",
            Opt::RanksPerNode => "ranks_per_node",
            Opt::Overwrite => "overwrite",
            Opt::Resume => "resume",
            Opt::HfAssets => "hf_assets",
            Opt::StagingDir => "staging_dir",
            Opt::IndexName => "index_name",
            Opt::KeepTopLevelKey => "keep_top_level_key",
            Opt::KeepTied => "keep_tied",
            Opt::ExcludeFrozenParameters => "exclude_frozen_parameters",
            Opt::NoHfMetadata => "no_hf_metadata",
            Opt::Verify => "verify",
            Opt::VerifyOnly => "verify_only",
            Opt::AllowMissingShardFiles => "allow_missing_shard_files",
            Opt::SourceRanks => "source_ranks",
            Opt::Quiet | Opt::Verbose => return None,
            Opt::Progress => "progress",
            Opt::Report => "report",
            Opt::Schedule => "schedule",
            Opt::Headers => "headers",
            Opt::Dtype => "dtype",
            Opt::DtypeMap => "dtype_map",
            Opt::StripPrefix => "strip_prefix",
        })
    }

    /// The command's flag, `--` included.
    pub fn flag(self) -> &'static str {
        match self {
            Opt::InputFormat => "--input-format",
            Opt::Tag => "--tag",
            Opt::Include => "--include",
            Opt::Exclude => "--exclude",
            Opt::Mapping => "--mapping",
            Opt::HfIndex => "--hf-index",
            Opt::MaxShardSize => "--max-shard-size",
            Opt::Unmapped => "--unmapped",
            Opt::Threads => "--threads",
            Opt::DryRun => "--dry-run",
            Opt::Ranks => "--ranks",
            Opt::RanksPerNode => "--ranks-per-node",
            Opt::Overwrite => "--overwrite",
            Opt::Resume => "--resume",
            Opt::HfAssets => "--hf-assets",
            Opt::StagingDir => "--staging-dir",
            Opt::IndexName => "--index-name",
            Opt::KeepTopLevelKey => "--keep-top-level-key",
            Opt::KeepTied => "--keep-tied",
            Opt::ExcludeFrozenParameters => "--exclude-frozen-parameters",
            Opt::NoHfMetadata => "--no-hf-metadata",
            Opt::Verify => "--verify",
            Opt::VerifyOnly => "--verify-only",
            Opt::AllowMissingShardFiles => "--allow-missing-shard-files",
            Opt::SourceRanks => "--source-ranks",
            Opt::Quiet => "--quiet",
            Opt::Verbose => "--verbose",
            Opt::Progress => "--progress",
            Opt::Report => "--report",
            Opt::Schedule => "--schedule",
            Opt::Headers => "--headers",
            Opt::Dtype => "--dtype",
            Opt::DtypeMap => "--dtype-map",
            Opt::StripPrefix => "--strip-prefix",
        }
    }

    /// The option whose Python keyword is `key`, the drop-ins' names
    /// ([`DROP_IN_KEYWORDS`]) not included.
    pub fn from_keyword(key: &str) -> Option<Opt> {
        Opt::ALL.into_iter().find(|opt| opt.keyword() == Some(key))
    }

    /// Whether it is a switch (no value: on when given).
    fn is_switch(self) -> bool {
        matches!(
            self,
            Opt::DryRun
                | Opt::Overwrite
                | Opt::Resume
                | Opt::KeepTopLevelKey
                | Opt::KeepTied
                | Opt::ExcludeFrozenParameters
                | Opt::NoHfMetadata
                | Opt::Verify
                | Opt::VerifyOnly
                | Opt::AllowMissingShardFiles
                | Opt::Quiet
                | Opt::Verbose
        )
    }

    /// What the option takes, for the hint of a refused value (the
    /// binding's type errors use it too).
    pub fn takes(self) -> String {
        match self {
            Opt::Threads => format!(
                "a positive number of copy threads per rank (counts above {MAX_THREADS} are taken as {MAX_THREADS})"
            ),
            Opt::Ranks | Opt::RanksPerNode => {
                format!("an integer from 1 to {MAX_PLAN_RANKS}")
            }
            Opt::SourceRanks => format!("an integer from 1 to {}", u32::MAX),
            Opt::Progress => format!(
                "0 (no progress) or a number of seconds from {MIN_PROGRESS_SECS} to {MAX_PROGRESS_SECS} (a day)"
            ),
            Opt::MaxShardSize => "a size such as 5GB, 500MB, 2GiB or a number of bytes".into(),
            Opt::IndexName => "a file name ending in .index.json, or 'diffusers'".into(),
            Opt::Dtype => format!(
                "a floating-point type: {} (NeMo's and PyTorch's names work too: {}; \
                 case, a 'torch.' prefix, '_' and '-' do not matter; 'none' keeps the saved types)",
                MAIN_DTYPE_NAMES.join(", "),
                DTYPE_NAMES
                    .iter()
                    .map(|(name, _)| *name)
                    .filter(|name| !MAIN_DTYPE_NAMES.contains(name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Opt::InputFormat => one_of(INPUT_FORMATS.names()),
            Opt::Unmapped => one_of(UNMAPPED.names()),
            Opt::Schedule => one_of(SCHEDULES.names()),
            Opt::Headers => one_of(HEADERS.names()),
            Opt::Mapping => {
                "a JSON file {tensor name: file index from 1} (or, from Python, a dict)".into()
            }
            Opt::DtypeMap => {
                "a JSON file {tensor name: safetensors dtype} (or, from Python, a dict)".into()
            }
            Opt::HfIndex | Opt::HfAssets | Opt::Report => "a path".into(),
            Opt::Tag => "the name of a DeepSpeed tag folder, such as global_step500".into(),
            Opt::StagingDir => {
                "a folder that exists on every node (node-local scratch is fine)".into()
            }
            Opt::Include | Opt::Exclude => "glob patterns".into(),
            Opt::StripPrefix => "name prefixes".into(),
            _ => "True or False".into(),
        }
    }
}

fn one_of(names: Vec<&str>) -> String {
    format!("one of {}", names.join(", "))
}

/// The drop-ins' keyword names (PyTorch's and NeMo's
/// `consolidate_safetensors_files`), taken from Python as the option
/// they stand for, and named so in messages.
pub const DROP_IN_KEYWORDS: [(&str, Opt); 4] = [
    ("num_threads", Opt::Threads),
    ("cast_dtype", Opt::Dtype),
    ("fqn_to_index_mapping", Opt::Mapping),
    ("fqn_to_dtype_mapping", Opt::DtypeMap),
];

/// A choice's accepted names, the first one the default. Names are
/// compared with `_` read as `-` (`hf_shards` from Python is `hf-shards`).
pub struct Choices<T: 'static> {
    opt: Opt,
    table: &'static [(&'static str, T)],
    /// The default's name (for clap's `default_value`).
    pub default: &'static str,
}

impl<T: Copy> Choices<T> {
    /// The names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.table.iter().map(|(name, _)| *name).collect()
    }

    fn pick(&self, options: &Options, given: Option<&str>) -> Result<T> {
        let name = given.unwrap_or(self.default);
        let wanted = name.replace('_', "-");
        self.table
            .iter()
            .find(|(n, _)| *n == wanted)
            .map(|(_, v)| *v)
            .ok_or_else(|| options.refused(self.opt, name))
    }
}

/// `--input-format`.
pub const INPUT_FORMATS: Choices<InputFormat> = Choices {
    opt: Opt::InputFormat,
    table: &[
        ("auto", InputFormat::Auto),
        ("hf-shards", InputFormat::HfShards),
        ("dcp", InputFormat::Dcp),
        ("deepspeed", InputFormat::DeepSpeed),
    ],
    default: "auto",
};

/// `--unmapped`: `omit` is what PyTorch's consolidation does (the
/// drop-ins' choice), from either front end.
pub const UNMAPPED: Choices<Unmapped> = Choices {
    opt: Opt::Unmapped,
    table: &[
        ("error", Unmapped::Error),
        ("last", Unmapped::Last),
        ("omit", Unmapped::Omit),
    ],
    default: "error",
};

/// `--schedule`.
pub const SCHEDULES: Choices<Schedule> = Choices {
    opt: Opt::Schedule,
    table: &[
        ("modulo", Schedule::Modulo),
        ("balanced", Schedule::Balanced),
    ],
    default: "modulo",
};

/// `--headers`.
pub const HEADERS: Choices<HeaderReading> = Choices {
    opt: Opt::Headers,
    table: &[
        ("all", HeaderReading::All),
        ("shared", HeaderReading::Shared),
    ],
    default: "all",
};

/// `--dtype`'s own names (what `--help` lists first).
pub const MAIN_DTYPE_NAMES: [&str; 4] = ["bf16", "f16", "f32", "f64"];

/// Every `--dtype` name after [`normalized_dtype`]: the command's, the
/// safetensors names in lower case (the same), and NeMo's
/// `resolve_dtype_cast` aliases (`_DTYPE_CAST_ALIASES`), plus `float`
/// (`torch.float`'s attribute name).
const DTYPE_NAMES: [(&str, Dtype); 14] = [
    ("bf16", Dtype::BF16),
    ("f16", Dtype::F16),
    ("f32", Dtype::F32),
    ("f64", Dtype::F64),
    ("bfloat16", Dtype::BF16),
    ("fp16", Dtype::F16),
    ("float16", Dtype::F16),
    ("half", Dtype::F16),
    ("fp32", Dtype::F32),
    ("float32", Dtype::F32),
    ("float", Dtype::F32),
    ("fp64", Dtype::F64),
    ("float64", Dtype::F64),
    ("double", Dtype::F64),
];

/// NeMo's normalisation of a cast name: lower case, a `torch.` prefix
/// dropped, `_` and `-` dropped (`torch.bfloat16`, `BF-16` → `bfloat16`,
/// `bf16`).
fn normalized_dtype(name: &str) -> String {
    let lower = name.trim().to_lowercase();
    lower
        .strip_prefix("torch.")
        .unwrap_or(&lower)
        .replace(['_', '-'], "")
}

/// How a front end names options in messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Spelling {
    /// The command's flags: `--threads 0`, `--dry-run`.
    #[default]
    Flags,
    /// Python keywords: `threads=0`, `dry_run=True`.
    Keywords,
}

/// A table option's source: a file, or (from Python) its entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Table<V> {
    /// A JSON file.
    File(PathBuf),
    /// The entries themselves.
    Entries(BTreeMap<String, V>),
}

/// What a user asked for, as given: each front end fills it from its own
/// types and leaves every check to [`Options::into_config`]. Integers are
/// as given (negative included; a front end saturates what does not fit),
/// choices are names.
#[derive(Clone, Debug, Default)]
#[allow(missing_docs)]
pub struct Options {
    pub input: PathBuf,
    pub output: PathBuf,
    pub input_format: Option<String>,
    /// A DeepSpeed checkpoint's tag folder instead of `latest`'s.
    pub tag: Option<String>,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub mapping: Option<Table<u64>>,
    pub hf_index: Option<PathBuf>,
    /// A size's text (`5GB`), or a count of bytes as digits.
    pub max_shard_size: Option<String>,
    pub unmapped: Option<String>,
    pub threads: Option<i64>,
    pub dry_run: bool,
    pub ranks: Option<i64>,
    pub ranks_per_node: Option<i64>,
    pub overwrite: bool,
    pub resume: bool,
    pub hf_assets: Option<PathBuf>,
    /// Build each rank's files in a folder of its own under this one, then
    /// move them into OUTPUT_DIR (the drop-ins' `use_staging`).
    pub staging_dir: Option<PathBuf>,
    pub index_name: Option<String>,
    pub keep_top_level_key: bool,
    /// Write a DeepSpeed checkpoint's tied aliases as copies.
    pub keep_tied: bool,
    /// Leave a DeepSpeed checkpoint's frozen parameters out.
    pub exclude_frozen_parameters: bool,
    pub no_hf_metadata: bool,
    pub verify: bool,
    pub verify_only: bool,
    pub allow_missing_shard_files: bool,
    pub source_ranks: Option<i64>,
    pub quiet: bool,
    pub verbose: bool,
    /// Seconds; `None` is [`DEFAULT_PROGRESS_SECS`].
    pub progress: Option<f64>,
    pub report: Option<PathBuf>,
    pub schedule: Option<String>,
    pub headers: Option<String>,
    pub dtype: Option<String>,
    pub dtype_map: Option<Table<String>>,
    pub strip_prefix: Vec<String>,
    /// What the run report records as the command line (never named in a
    /// message).
    pub command_line: Vec<String>,
    /// How messages name the options.
    pub spelling: Spelling,
    /// Options the caller gave under another name (a drop-in's
    /// `num_threads`): messages use that name.
    pub renamed: Vec<(Opt, &'static str)>,
}

impl Options {
    /// Every option at its default, for `input` → `output`.
    pub fn new(input: impl Into<PathBuf>, output: impl Into<PathBuf>, spelling: Spelling) -> Self {
        Options {
            input: input.into(),
            output: output.into(),
            spelling,
            ..Options::default()
        }
    }

    /// The option's name as this caller spells it.
    pub fn name(&self, opt: Opt) -> String {
        if let Some((_, name)) = self.renamed.iter().find(|(o, _)| *o == opt) {
            return (*name).to_string();
        }
        match self.spelling {
            Spelling::Flags => opt.flag().to_string(),
            Spelling::Keywords => opt.keyword().unwrap_or(opt.flag()).to_string(),
        }
    }

    /// The option given with `value`: `--threads 0`, `threads=0`.
    fn given(&self, opt: Opt, value: impl Display) -> String {
        match self.spelling {
            Spelling::Flags => format!("{} {value}", self.name(opt)),
            Spelling::Keywords => format!("{}={value}", self.name(opt)),
        }
    }

    /// The option as set: a switch `--dry-run` / `dry_run=True`, any
    /// other by its name.
    fn set(&self, opt: Opt) -> String {
        if opt.is_switch() && self.spelling == Spelling::Keywords {
            format!("{}=True", self.name(opt))
        } else {
            self.name(opt)
        }
    }

    /// `value` of `opt` is refused: the value, and what the option takes.
    fn refused(&self, opt: Opt, value: impl Display) -> Error {
        Error::usage(
            format!("{} is not accepted", self.given(opt, value)),
            format!("{} takes {}", self.name(opt), opt.takes()),
        )
    }

    /// The conversion `name` asks for: `None` keeps the saved dtypes (an
    /// empty name or `none`, as NeMo reads them).
    fn dtype_named(&self, name: &str) -> Result<Option<Dtype>> {
        let normalized = normalized_dtype(name);
        if normalized.is_empty() || normalized == "none" {
            return Ok(None);
        }
        DTYPE_NAMES
            .iter()
            .find(|(n, _)| *n == normalized)
            .map(|(_, dtype)| Some(*dtype))
            .ok_or_else(|| self.refused(Opt::Dtype, name))
    }

    /// Whether the option was given (a switch turned on, a value passed).
    fn is_set(&self, opt: Opt) -> bool {
        match opt {
            Opt::Mapping => self.mapping.is_some(),
            Opt::HfIndex => self.hf_index.is_some(),
            Opt::MaxShardSize => self.max_shard_size.is_some(),
            Opt::DryRun => self.dry_run,
            Opt::Ranks => self.ranks.is_some(),
            Opt::RanksPerNode => self.ranks_per_node.is_some(),
            Opt::Overwrite => self.overwrite,
            Opt::Resume => self.resume,
            Opt::HfAssets => self.hf_assets.is_some(),
            Opt::StagingDir => self.staging_dir.is_some(),
            Opt::Verify => self.verify,
            Opt::VerifyOnly => self.verify_only,
            Opt::Quiet => self.quiet,
            Opt::Verbose => self.verbose,
            // The rules below name no other option.
            _ => false,
        }
    }

    /// Every rule about which options go together, in one place: the
    /// first pair that does not is refused, naming both.
    fn check_combinations(&self) -> Result<()> {
        let sources = [Opt::Mapping, Opt::HfIndex, Opt::MaxShardSize];
        let given: Vec<Opt> = sources.into_iter().filter(|&o| self.is_set(o)).collect();
        if let [first, second, ..] = given[..] {
            return Err(Error::usage(
                format!(
                    "{} and {} both say which tensor goes to which file",
                    self.set(first),
                    self.set(second)
                ),
                format!(
                    "pass at most one of {}",
                    sources.map(|o| self.name(o)).join(", ")
                ),
            ));
        }
        // (option, option it does not go with, why: {a} and {b} are their
        // names as this caller spells them)
        let exclusive: [(Opt, Opt, &str); 10] = [
            (Opt::Quiet, Opt::Verbose, "pass one of them"),
            (
                Opt::DryRun,
                Opt::VerifyOnly,
                "{a} prints a plan, {b} checks the output already in OUTPUT_DIR: pass one of them",
            ),
            (
                Opt::Verify,
                Opt::VerifyOnly,
                "{a} checks what this run writes, {b} the output already in OUTPUT_DIR: pass one of them",
            ),
            (
                Opt::VerifyOnly,
                Opt::Overwrite,
                "{a} writes nothing, so there is nothing to overwrite: leave {b} out",
            ),
            (
                Opt::Resume,
                Opt::DryRun,
                "{a} continues a run that writes, {b} writes nothing: pass one of them",
            ),
            (
                Opt::Resume,
                Opt::VerifyOnly,
                "{a} continues a run that writes, {b} writes nothing: pass one of them",
            ),
            (
                Opt::HfAssets,
                Opt::DryRun,
                "{a} copies files into OUTPUT_DIR, which {b} never writes: leave {a} out",
            ),
            (
                Opt::HfAssets,
                Opt::VerifyOnly,
                "{a} copies files into OUTPUT_DIR, which {b} never writes: leave {a} out",
            ),
            (
                Opt::StagingDir,
                Opt::DryRun,
                "{a} is where files are built before they go to OUTPUT_DIR, and {b} builds none: leave {a} out",
            ),
            (
                Opt::StagingDir,
                Opt::VerifyOnly,
                "{a} is where files are built before they go to OUTPUT_DIR, and {b} builds none: leave {a} out",
            ),
        ];
        for (a, b, why) in exclusive {
            if self.is_set(a) && self.is_set(b) {
                return Err(Error::usage(
                    format!("{} does not go with {}", self.set(a), self.set(b)),
                    why.replace("{a}", &self.name(a))
                        .replace("{b}", &self.name(b)),
                ));
            }
        }
        // Said after the conflicts, which would remain once it is added.
        for opt in [Opt::Ranks, Opt::RanksPerNode] {
            if self.is_set(opt) && !self.dry_run {
                return Err(Error::usage(
                    format!("{} needs {}", self.set(opt), self.set(Opt::DryRun)),
                    format!(
                        "{} plans for ranks that are not started, which only a dry run does: add {}",
                        self.name(opt),
                        self.set(Opt::DryRun)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// An integer option within `range`, or refused.
    fn count(
        &self,
        opt: Opt,
        value: Option<i64>,
        range: std::ops::RangeInclusive<i64>,
    ) -> Result<Option<i64>> {
        match value {
            Some(n) if !range.contains(&n) => Err(self.refused(opt, n)),
            n => Ok(n),
        }
    }

    /// The run's configuration, or an [`Error::Usage`] naming the first
    /// option (and value) that is refused and what it takes.
    pub fn into_config(self) -> Result<Config> {
        self.check_combinations()?;
        let mut config = Config::new(self.input.clone(), self.output.clone());
        config.mode = if self.dry_run {
            let plan_ranks = 1..=MAX_PLAN_RANKS;
            Mode::DryRun {
                ranks: self
                    .count(Opt::Ranks, self.ranks, plan_ranks.clone())?
                    .map(|n| n as usize),
                ranks_per_node: self
                    .count(Opt::RanksPerNode, self.ranks_per_node, plan_ranks)?
                    .map(|n| n as usize),
            }
        } else if self.verify_only {
            Mode::VerifyOnly
        } else {
            Mode::Consolidate {
                verify: self.verify,
            }
        };
        config.verbosity = match (self.quiet, self.verbose) {
            (true, _) => Verbosity::Quiet,
            (_, true) => Verbosity::Verbose,
            _ => Verbosity::Normal,
        };
        config.read.format = INPUT_FORMATS.pick(&self, self.input_format.as_deref())?;
        config.read.select = Selection {
            include: self.include.clone(),
            exclude: self.exclude.clone(),
        };
        config.read.allow_missing_shard_files = self.allow_missing_shard_files;
        config.read.tag = self.tag.clone();
        config.read.keep_tied = self.keep_tied;
        config.read.exclude_frozen = self.exclude_frozen_parameters;
        config.read.source_ranks = self
            .count(Opt::SourceRanks, self.source_ranks, 1..=i64::from(u32::MAX))?
            .map(|n| n as u32);
        config.read.headers = HEADERS.pick(&self, self.headers.as_deref())?;
        config.plan.mapping = self.mapping_source()?;
        config.plan.unmapped = UNMAPPED.pick(&self, self.unmapped.as_deref())?;
        config.plan.strip_prefixes = self.strip_prefix.clone();
        config.plan.dtype = match &self.dtype {
            None => None,
            Some(name) => self.dtype_named(name)?,
        };
        config.plan.dtype_map = match &self.dtype_map {
            None => DtypeMapSource::None,
            Some(Table::File(path)) => DtypeMapSource::File(path.clone()),
            Some(Table::Entries(entries)) => DtypeMapSource::Given {
                origin: self.name(Opt::DtypeMap),
                entries: entries.clone(),
            },
        };
        config.plan.schedule = SCHEDULES.pick(&self, self.schedule.as_deref())?;
        if self.staging_dir.is_some() && config.plan.schedule == Schedule::Balanced {
            return Err(Error::usage(
                format!(
                    "{} does not go with {}",
                    self.name(Opt::StagingDir),
                    self.given(Opt::Schedule, "balanced")
                ),
                format!(
                    "staging builds each rank's files in a folder of its own, and the balanced schedule has several ranks write into one file: leave {} out or use the modulo schedule",
                    self.name(Opt::StagingDir)
                ),
            ));
        }
        config.staging = self.staging_dir.clone();
        config.plan.index_name = match &self.index_name {
            None => None,
            Some(name) => Some(index_name_for(name).map_err(|reason| {
                Error::usage(
                    format!("{}: {reason}", self.name(Opt::IndexName)),
                    format!(
                        "{} takes {}",
                        self.name(Opt::IndexName),
                        Opt::IndexName.takes()
                    ),
                )
            })?),
        };
        config.plan.keep_top_level_key = self.keep_top_level_key;
        config.threads = match self.threads {
            Some(n) if n < 1 => return Err(self.refused(Opt::Threads, n)),
            Some(n) => Some(usize::try_from(n).map_or(MAX_THREADS, |n| n.min(MAX_THREADS))),
            None => None,
        };
        config.overwrite = self.overwrite;
        config.resume = self.resume;
        config.hf_assets = self.hf_assets.clone();
        config.hf_metadata = !self.no_hf_metadata;
        config.progress_secs = match self.progress {
            None => DEFAULT_PROGRESS_SECS,
            Some(secs)
                if secs == 0.0 || (MIN_PROGRESS_SECS..=MAX_PROGRESS_SECS).contains(&secs) =>
            {
                secs
            }
            Some(secs) => {
                return Err(Error::usage(
                    format!(
                        "{} is neither 0 (no progress) nor a number of seconds from {MIN_PROGRESS_SECS} to {MAX_PROGRESS_SECS} (a day)",
                        self.given(Opt::Progress, secs)
                    ),
                    "every report is a collective over all ranks and, in a log, a line: \
                     pass 0 to turn progress off",
                ));
            }
        };
        config.report = self.report.clone();
        config.command_line = self.command_line;
        Ok(config)
    }

    /// Which tensor goes to which file (at most one source: checked by
    /// [`Options::check_combinations`]).
    fn mapping_source(&self) -> Result<MappingSource> {
        Ok(
            match (&self.mapping, &self.hf_index, &self.max_shard_size) {
                (Some(Table::File(path)), ..) => MappingSource::Mapping(path.clone()),
                (Some(Table::Entries(entries)), ..) => MappingSource::Given {
                    origin: self.name(Opt::Mapping),
                    entries: entries.clone(),
                },
                (_, Some(path), _) => MappingSource::HfIndex(path.clone()),
                (.., Some(text)) => {
                    MappingSource::MaxShardSize(parse_size(text).map_err(|reason| {
                        Error::usage(
                            format!("{}: {reason}", self.name(Opt::MaxShardSize)),
                            format!(
                                "{} takes {}",
                                self.name(Opt::MaxShardSize),
                                Opt::MaxShardSize.takes()
                            ),
                        )
                    })?)
                }
                _ => MappingSource::SingleFile,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> Options {
        Options::new("in", "out", Spelling::Flags)
    }

    fn keywords() -> Options {
        Options::new("in", "out", Spelling::Keywords)
    }

    /// The refusal's message (reason and hint), or a panic if accepted.
    fn refused(options: Options) -> String {
        match options.into_config() {
            Err(err @ Error::Usage { .. }) => err.to_string(),
            Err(other) => panic!("not a usage error: {other}"),
            Ok(config) => panic!("accepted: {config:?}"),
        }
    }

    #[test]
    fn defaults_are_the_commands() {
        let config = flags().into_config().unwrap();
        let plain = Config::new("in", "out");
        assert_eq!(config.mode, plain.mode);
        assert_eq!(config.verbosity, plain.verbosity);
        assert_eq!(config.read.format, InputFormat::Auto);
        assert_eq!(config.read.headers, HeaderReading::All);
        assert_eq!(config.plan.mapping, MappingSource::SingleFile);
        assert_eq!(config.plan.unmapped, Unmapped::Error);
        assert_eq!(config.plan.schedule, Schedule::Modulo);
        assert_eq!(config.plan.dtype, None);
        assert_eq!(config.threads, None);
        assert_eq!(config.progress_secs, plain.progress_secs);
        assert!(config.hf_metadata);
    }

    #[test]
    fn every_dtype_spelling_of_both_front_ends_names_its_type() {
        for (name, dtype) in [
            ("bf16", Dtype::BF16),
            ("BF16", Dtype::BF16),
            ("bfloat16", Dtype::BF16),
            ("torch.bfloat16", Dtype::BF16),
            ("Torch.BFloat16", Dtype::BF16),
            ("bf-16", Dtype::BF16),
            ("f16", Dtype::F16),
            ("fp16", Dtype::F16),
            ("half", Dtype::F16),
            ("torch.float16", Dtype::F16),
            ("f32", Dtype::F32),
            ("F32", Dtype::F32),
            ("fp32", Dtype::F32),
            ("float", Dtype::F32),
            ("float_32", Dtype::F32),
            ("torch.float32", Dtype::F32),
            ("f64", Dtype::F64),
            ("double", Dtype::F64),
            ("torch.float64", Dtype::F64),
        ] {
            for mut options in [flags(), keywords()] {
                options.dtype = Some(name.into());
                assert_eq!(
                    options.into_config().unwrap().plan.dtype,
                    Some(dtype),
                    "{name}"
                );
            }
        }
        for name in ["", "none", "None", "torch.none"] {
            let mut options = keywords();
            options.dtype = Some(name.into());
            assert_eq!(options.into_config().unwrap().plan.dtype, None, "{name:?}");
        }
    }

    #[test]
    fn a_dtype_that_is_no_float_type_is_named_with_the_accepted_names() {
        let mut options = flags();
        options.dtype = Some("int8".into());
        let text = refused(options);
        assert!(text.starts_with("--dtype int8 is not accepted\n"), "{text}");
        assert!(
            text.contains("--dtype takes a floating-point type: bf16, f16, f32, f64")
                && text.contains("bfloat16"),
            "{text}"
        );
        let mut options = keywords();
        options.dtype = Some("torch.int8".into());
        options.renamed.push((Opt::Dtype, "cast_dtype"));
        let text = refused(options);
        assert!(
            text.starts_with("cast_dtype=torch.int8 is not accepted\n"),
            "{text}"
        );
        assert!(text.contains("hint: cast_dtype takes"), "{text}");
    }

    #[test]
    fn any_positive_thread_count_is_taken_and_capped() {
        for (given, taken) in [(1, 1), (7, 7), (1024, 1024), (1025, 1024), (i64::MAX, 1024)] {
            let mut options = keywords();
            options.threads = Some(given);
            assert_eq!(
                options.into_config().unwrap().threads,
                Some(taken),
                "{given}"
            );
        }
        for given in [0, -1, i64::MIN] {
            let mut options = flags();
            options.threads = Some(given);
            let text = refused(options);
            assert!(
                text.starts_with(&format!("--threads {given} is not accepted\n")),
                "{text}"
            );
            assert!(text.contains("--threads takes a positive number"), "{text}");
        }
        let mut options = keywords();
        options.threads = Some(0);
        options.renamed.push((Opt::Threads, "num_threads"));
        assert!(refused(options).starts_with("num_threads=0 is not accepted"));
    }

    #[test]
    fn progress_is_zero_or_a_tenth_of_a_second_to_a_day() {
        for secs in [0.0, 0.1, 10.0, 86_400.0] {
            let mut options = flags();
            options.progress = Some(secs);
            assert_eq!(options.into_config().unwrap().progress_secs, secs);
        }
        for secs in [1e-9, 0.09, -0.5, f64::NAN, f64::INFINITY, 86_401.0] {
            let mut options = keywords();
            options.progress = Some(secs);
            let text = refused(options);
            assert!(
                text.starts_with(&format!("progress={secs} is neither 0")),
                "{text}"
            );
            assert!(
                text.contains("nor a number of seconds from 0.1 to 86400"),
                "{text}"
            );
        }
    }

    #[test]
    fn plan_rank_counts_are_ranged_and_need_a_dry_run() {
        let mut options = flags();
        options.ranks = Some(4);
        let text = refused(options);
        assert!(text.starts_with("--ranks needs --dry-run\n"), "{text}");
        assert!(text.contains("add --dry-run"), "{text}");
        let mut options = keywords();
        options.ranks_per_node = Some(4);
        let text = refused(options);
        assert!(
            text.starts_with("ranks_per_node needs dry_run=True\n"),
            "{text}"
        );
        for n in [0, -3, MAX_PLAN_RANKS + 1] {
            let mut options = flags();
            options.dry_run = true;
            options.ranks = Some(n);
            assert!(refused(options).starts_with(&format!("--ranks {n} is not accepted")));
        }
        let mut options = flags();
        options.dry_run = true;
        options.ranks = Some(64);
        options.ranks_per_node = Some(8);
        assert_eq!(
            options.into_config().unwrap().mode,
            Mode::DryRun {
                ranks: Some(64),
                ranks_per_node: Some(8)
            }
        );
    }

    #[test]
    fn options_that_do_not_go_together_are_named_in_both_spellings() {
        type Set = fn(&mut Options);
        let cases: [(Set, &str, &str); 9] = [
            (
                |o| {
                    o.hf_assets = Some("orig".into());
                    o.dry_run = true;
                },
                "--hf-assets does not go with --dry-run",
                "hf_assets does not go with dry_run=True",
            ),
            (
                |o| {
                    o.hf_assets = Some("orig".into());
                    o.verify_only = true;
                },
                "--hf-assets does not go with --verify-only",
                "hf_assets does not go with verify_only=True",
            ),
            (
                |o| {
                    o.verify = true;
                    o.verify_only = true;
                },
                "--verify does not go with --verify-only",
                "verify=True does not go with verify_only=True",
            ),
            (
                |o| {
                    o.resume = true;
                    o.dry_run = true;
                },
                "--resume does not go with --dry-run",
                "resume=True does not go with dry_run=True",
            ),
            (
                |o| {
                    o.resume = true;
                    o.verify_only = true;
                },
                "--resume does not go with --verify-only",
                "resume=True does not go with verify_only=True",
            ),
            (
                |o| {
                    o.verify_only = true;
                    o.overwrite = true;
                },
                "--verify-only does not go with --overwrite",
                "verify_only=True does not go with overwrite=True",
            ),
            (
                |o| {
                    o.dry_run = true;
                    o.verify_only = true;
                },
                "--dry-run does not go with --verify-only",
                "dry_run=True does not go with verify_only=True",
            ),
            (
                |o| {
                    o.mapping = Some(Table::File("m.json".into()));
                    o.max_shard_size = Some("5GB".into());
                },
                "--mapping and --max-shard-size both say which tensor goes to which file",
                "mapping and max_shard_size both say which tensor goes to which file",
            ),
            (
                |o| {
                    o.hf_index = Some("i.json".into());
                    o.max_shard_size = Some("5GB".into());
                },
                "--hf-index and --max-shard-size both say",
                "hf_index and max_shard_size both say",
            ),
        ];
        for (set, flag_text, keyword_text) in cases {
            let mut options = flags();
            set(&mut options);
            let text = refused(options);
            assert!(text.starts_with(flag_text), "{text}");
            let mut options = keywords();
            set(&mut options);
            let text = refused(options);
            assert!(text.starts_with(keyword_text), "{text}");
        }
        let mut options = flags();
        options.quiet = true;
        options.verbose = true;
        assert!(refused(options).starts_with("--quiet does not go with --verbose"));
    }

    #[test]
    fn a_drop_in_mapping_is_named_by_its_keyword() {
        let mut options = keywords();
        options.mapping = Some(Table::Entries(BTreeMap::from([("w".into(), 1)])));
        options.renamed.push((Opt::Mapping, "fqn_to_index_mapping"));
        options.max_shard_size = Some("1GB".into());
        assert!(refused(options.clone()).starts_with("fqn_to_index_mapping and max_shard_size"));
        options.max_shard_size = None;
        match options.into_config().unwrap().plan.mapping {
            MappingSource::Given { origin, entries } => {
                assert_eq!(origin, "fqn_to_index_mapping");
                assert_eq!(entries["w"], 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn choices_take_either_separator_and_refuse_others_listing_the_names() {
        let mut options = keywords();
        options.input_format = Some("hf_shards".into());
        options.unmapped = Some("omit".into());
        options.schedule = Some("balanced".into());
        options.headers = Some("shared".into());
        let config = options.into_config().unwrap();
        assert_eq!(config.read.format, InputFormat::HfShards);
        assert_eq!(config.plan.unmapped, Unmapped::Omit);
        assert_eq!(config.plan.schedule, Schedule::Balanced);
        assert_eq!(config.read.headers, HeaderReading::Shared);
        let mut options = flags();
        options.schedule = Some("fast".into());
        assert_eq!(
            refused(options),
            "--schedule fast is not accepted\n  hint: --schedule takes one of modulo, balanced"
        );
    }

    #[test]
    fn sizes_index_names_and_source_ranks_are_checked_here() {
        let mut options = flags();
        options.max_shard_size = Some("0".into());
        let text = refused(options);
        assert!(
            text.starts_with("--max-shard-size: size '0' must be at least one byte"),
            "{text}"
        );
        let mut options = keywords();
        options.max_shard_size = Some("2GiB".into());
        assert_eq!(
            options.into_config().unwrap().plan.mapping,
            MappingSource::MaxShardSize(2 << 30)
        );
        let mut options = keywords();
        options.index_name = Some("../x.index.json".into());
        let text = refused(options);
        assert!(text.contains("not an index file name"), "{text}");
        let mut options = flags();
        options.source_ranks = Some(0);
        assert!(refused(options).starts_with("--source-ranks 0 is not accepted"));
    }

    #[test]
    fn every_option_has_one_keyword_and_flag() {
        let mut keywords: Vec<&str> = Opt::ALL.iter().filter_map(|o| o.keyword()).collect();
        let count = keywords.len();
        keywords.sort();
        keywords.dedup();
        assert_eq!(keywords.len(), count);
        for opt in Opt::ALL {
            assert_eq!(
                opt.keyword().map(|k| format!("--{}", k.replace('_', "-"))),
                opt.keyword().map(|_| opt.flag().to_string()),
            );
            if let Some(key) = opt.keyword() {
                assert_eq!(Opt::from_keyword(key), Some(opt));
            }
        }
        for (alias, _) in DROP_IN_KEYWORDS {
            assert_eq!(Opt::from_keyword(alias), None);
        }
    }
}
