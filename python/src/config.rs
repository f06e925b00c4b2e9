//! Keyword arguments (a dict, named after the command's flags) → the
//! library's [`Config`]. The Python layer has already turned `torch.dtype`s
//! and NeMo's aliases into the names used here; what is left to refuse is
//! refused as the command refuses it, with an input error.

use pyo3::prelude::*;
use pyo3::types::PyDict;
use st_consolidate_mpi::checkpoint::format::InputFormat;
use st_consolidate_mpi::checkpoint::hf_shards::HeaderReading;
use st_consolidate_mpi::plan::Schedule;
use st_consolidate_mpi::plan::dtypes::DtypeMapSource;
use st_consolidate_mpi::plan::mapping::{MappingSource, Unmapped, parse_size};
use st_consolidate_mpi::run::{Config, Mode, Verbosity};
use st_consolidate_mpi::safetensors::dtype::Dtype;
use st_consolidate_mpi::{Error, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The keys `from_options` reads; any other is a mistake worth naming.
const KEYS: &[&str] = &[
    "input_format",
    "include",
    "exclude",
    "mapping",
    "hf_index",
    "max_shard_size",
    "fqn_to_index_mapping",
    "unmapped",
    "threads",
    "dry_run",
    "ranks",
    "ranks_per_node",
    "overwrite",
    "resume",
    "hf_assets",
    "no_hf_metadata",
    "keep_top_level_key",
    "index_name",
    "verify",
    "verify_only",
    "allow_missing_shard_files",
    "source_ranks",
    "progress",
    "report",
    "schedule",
    "headers",
    "dtype",
    "dtype_map",
    "fqn_to_dtype_mapping",
    "strip_prefix",
    "command_line",
];

fn bad(key: &str, what: impl std::fmt::Display, expected: &str) -> Error {
    Error::usage(
        format!("{key}={what} is not accepted"),
        format!("{key} takes {expected}"),
    )
}

/// One keyword's value, `None` when absent or `None`.
fn value<'py>(options: &Bound<'py, PyDict>, key: &str) -> Result<Option<Bound<'py, PyAny>>> {
    match options.get_item(key) {
        Ok(Some(v)) if !v.is_none() => Ok(Some(v)),
        Ok(_) => Ok(None),
        Err(e) => Err(bad(key, e, "a value")),
    }
}

macro_rules! getter {
    ($name:ident, $ty:ty, $expected:literal) => {
        fn $name(options: &Bound<'_, PyDict>, key: &str) -> Result<Option<$ty>> {
            match value(options, key)? {
                None => Ok(None),
                Some(v) => v.extract::<$ty>().map(Some).map_err(|_| {
                    bad(
                        key,
                        v.repr().map_or_else(|_| "?".into(), |r| r.to_string()),
                        $expected,
                    )
                }),
            }
        }
    };
}

getter!(get_bool, bool, "True or False");
getter!(get_string, String, "a string");
getter!(get_strings, Vec<String>, "a list of strings");
getter!(get_path, PathBuf, "a path (str or os.PathLike)");
getter!(get_count, u64, "a positive integer");
getter!(get_seconds, f64, "a number of seconds");
getter!(get_index_map, BTreeMap<String, u64>, "a dict {tensor name: output file index from 1}");
getter!(get_dtype_map, BTreeMap<String, String>, "a dict {tensor name: safetensors dtype name}");

/// `name` among `choices` (the command's spellings), or an input error.
fn choice<T: Copy>(
    key: &str,
    name: Option<String>,
    default: T,
    choices: &[(&str, T)],
) -> Result<T> {
    let Some(name) = name else {
        return Ok(default);
    };
    choices
        .iter()
        .find(|(n, _)| *n == name.replace('_', "-"))
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            bad(
                key,
                format!("'{name}'"),
                &format!("one of {}", names.join(", ")),
            )
        })
}

fn positive(key: &str, n: Option<u64>) -> Result<Option<usize>> {
    match n {
        Some(0) => Err(bad(key, 0, "a positive integer")),
        n => Ok(n.map(|n| n as usize)),
    }
}

/// The mapping source: `fqn_to_index_mapping` (the drop-ins'), `mapping`,
/// `hf_index` or `max_shard_size` (an int of bytes or "5GB"), at most one.
fn mapping(options: &Bound<'_, PyDict>) -> Result<MappingSource> {
    let given = get_index_map(options, "fqn_to_index_mapping")?;
    let file = get_path(options, "mapping")?;
    let index = get_path(options, "hf_index")?;
    let size = match value(options, "max_shard_size")? {
        None => None,
        Some(v) => Some(match v.extract::<u64>() {
            Ok(bytes) if bytes > 0 => bytes,
            _ => {
                let text: String = v.str().map(|s| s.to_string()).unwrap_or_default();
                parse_size(&text).map_err(|e| bad("max_shard_size", &text, &e))?
            }
        }),
    };
    let count = [
        given.is_some(),
        file.is_some(),
        index.is_some(),
        size.is_some(),
    ]
    .iter()
    .filter(|&&b| b)
    .count();
    if count > 1 {
        return Err(Error::usage(
            "more than one of mapping, hf_index and max_shard_size is given",
            "pass at most one of them",
        ));
    }
    Ok(match (given, file, index, size) {
        (Some(entries), ..) => MappingSource::Given {
            origin: "fqn_to_index_mapping".into(),
            entries,
        },
        (_, Some(path), ..) => MappingSource::Mapping(path),
        (_, _, Some(path), _) => MappingSource::HfIndex(path),
        (.., Some(size)) => MappingSource::MaxShardSize(size),
        _ => MappingSource::SingleFile,
    })
}

/// `dtype_map`: a JSON file's path, or a dict; `fqn_to_dtype_mapping` is
/// the drop-ins' name for the dict.
fn dtype_map(options: &Bound<'_, PyDict>) -> Result<DtypeMapSource> {
    if let Some(entries) = get_dtype_map(options, "fqn_to_dtype_mapping")? {
        return Ok(DtypeMapSource::Given {
            origin: "fqn_to_dtype_mapping".into(),
            entries,
        });
    }
    match value(options, "dtype_map")? {
        None => Ok(DtypeMapSource::None),
        Some(v) if v.is_instance_of::<PyDict>() => Ok(DtypeMapSource::Given {
            origin: "dtype_map".into(),
            entries: get_dtype_map(options, "dtype_map")?.unwrap_or_default(),
        }),
        Some(_) => Ok(DtypeMapSource::File(
            get_path(options, "dtype_map")?.unwrap_or_default(),
        )),
    }
}

/// The run's configuration from the keyword arguments.
pub fn from_options(
    input: PathBuf,
    output: PathBuf,
    options: &Bound<'_, PyDict>,
) -> Result<Config> {
    for key in options.keys() {
        let key = key.to_string();
        if !KEYS.contains(&key.as_str()) {
            return Err(Error::usage(
                format!("unknown option '{key}'"),
                format!("the options are: {}", KEYS.join(", ")),
            ));
        }
    }
    let mut config = Config::new(input, output);
    // Every message goes to `logging`, which filters by level.
    config.verbosity = Verbosity::Verbose;
    let dry_run = get_bool(options, "dry_run")?.unwrap_or(false);
    let verify_only = get_bool(options, "verify_only")?.unwrap_or(false);
    config.mode = if dry_run {
        Mode::DryRun {
            ranks: positive("ranks", get_count(options, "ranks")?)?,
            ranks_per_node: positive("ranks_per_node", get_count(options, "ranks_per_node")?)?,
        }
    } else if verify_only {
        Mode::VerifyOnly
    } else {
        Mode::Consolidate {
            verify: get_bool(options, "verify")?.unwrap_or(false),
        }
    };
    config.read.format = choice(
        "input_format",
        get_string(options, "input_format")?,
        InputFormat::Auto,
        &[
            ("auto", InputFormat::Auto),
            ("hf-shards", InputFormat::HfShards),
            ("dcp", InputFormat::Dcp),
        ],
    )?;
    config.read.select.include = get_strings(options, "include")?.unwrap_or_default();
    config.read.select.exclude = get_strings(options, "exclude")?.unwrap_or_default();
    config.read.allow_missing_shard_files =
        get_bool(options, "allow_missing_shard_files")?.unwrap_or(false);
    config.read.source_ranks = match get_count(options, "source_ranks")? {
        Some(n) => Some(
            u32::try_from(n)
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| bad("source_ranks", n, "a positive integer"))?,
        ),
        None => None,
    };
    config.read.headers = choice(
        "headers",
        get_string(options, "headers")?,
        HeaderReading::All,
        &[
            ("all", HeaderReading::All),
            ("shared", HeaderReading::Shared),
        ],
    )?;
    config.plan.mapping = mapping(options)?;
    config.plan.unmapped = choice(
        "unmapped",
        get_string(options, "unmapped")?,
        Unmapped::Error,
        &[
            ("error", Unmapped::Error),
            ("last", Unmapped::Last),
            ("omit", Unmapped::Omit),
        ],
    )?;
    config.plan.strip_prefixes = get_strings(options, "strip_prefix")?.unwrap_or_default();
    config.plan.dtype = match get_string(options, "dtype")? {
        None => None,
        Some(name) => Some(choice(
            "dtype",
            Some(name.to_lowercase()),
            Dtype::F32,
            &[
                ("bf16", Dtype::BF16),
                ("f16", Dtype::F16),
                ("f32", Dtype::F32),
                ("f64", Dtype::F64),
            ],
        )?),
    };
    config.plan.dtype_map = dtype_map(options)?;
    config.plan.schedule = choice(
        "schedule",
        get_string(options, "schedule")?,
        Schedule::Modulo,
        &[
            ("modulo", Schedule::Modulo),
            ("balanced", Schedule::Balanced),
        ],
    )?;
    config.threads = match get_count(options, "threads")? {
        Some(n @ 1..=1024) => Some(n as usize),
        Some(n) => return Err(bad("threads", n, "an integer from 1 to 1024")),
        None => None,
    };
    config.overwrite = get_bool(options, "overwrite")?.unwrap_or(false);
    config.resume = get_bool(options, "resume")?.unwrap_or(false);
    config.hf_assets = get_path(options, "hf_assets")?;
    config.hf_metadata = !get_bool(options, "no_hf_metadata")?.unwrap_or(false);
    config.plan.keep_top_level_key = get_bool(options, "keep_top_level_key")?.unwrap_or(false);
    config.plan.index_name = match get_string(options, "index_name")? {
        Some(name) => Some(
            st_consolidate_mpi::safetensors::naming::index_name_for(&name).map_err(|reason| {
                Error::usage(reason, "index_name takes a file name or 'diffusers'")
            })?,
        ),
        None => None,
    };
    config.progress_secs = match get_seconds(options, "progress")? {
        Some(s) if s == 0.0 || (0.1..=86_400.0).contains(&s) => s,
        Some(s) => return Err(bad("progress", s, "0 (off) or seconds from 0.1 to 86400")),
        None => 10.0,
    };
    config.report = get_path(options, "report")?;
    config.command_line = get_strings(options, "command_line")?.unwrap_or_default();
    if config.resume && (dry_run || verify_only) {
        return Err(Error::usage(
            "resume does not go with dry_run or verify_only",
            "pass one of them",
        ));
    }
    if verify_only && config.overwrite {
        return Err(Error::usage(
            "verify_only does not go with overwrite",
            "verify_only writes nothing",
        ));
    }
    Ok(config)
}
