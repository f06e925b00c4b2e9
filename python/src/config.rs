//! Keyword arguments (a dict, named after the command's flags or, for the
//! drop-ins, after PyTorch's arguments) → the library's [`Options`]. Only
//! Python's types are converted here: which options go together, their
//! ranges and the names of their choices (dtype aliases included) are the
//! library's rules ([`Options::into_config`]), the command's too, so both
//! refuse the same things with the same words.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};
use st_consolidate_mpi::options::{DROP_IN_KEYWORDS, Opt, Options, Spelling, Table};
use st_consolidate_mpi::run::Config;
use st_consolidate_mpi::{Error, Result};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// The private key the Python layer fills with what the run report records
/// as the command line; never named to the user.
const COMMAND_LINE: &str = "command_line";

/// `repr(value)`, for messages.
fn repr(value: &Bound<'_, PyAny>) -> String {
    value.repr().map_or_else(|_| "?".into(), |r| r.to_string())
}

/// `name=value` is not of a type the option takes.
fn bad(name: &str, value: &Bound<'_, PyAny>, expected: &str) -> Error {
    Error::usage(
        format!("{name}={} is not accepted", repr(value)),
        format!("{name} takes {expected}"),
    )
}

/// What the caller passed: each option's value (`None`s left out) under
/// the name it was given by.
struct Given<'py> {
    values: BTreeMap<Opt, (String, Bound<'py, PyAny>)>,
    command_line: Option<Bound<'py, PyAny>>,
}

impl<'py> Given<'py> {
    fn read(options: &Bound<'py, PyDict>) -> Result<Self> {
        let mut given = Given {
            values: BTreeMap::new(),
            command_line: None,
        };
        for (key, value) in options.iter() {
            let Ok(key) = key.extract::<String>() else {
                return Err(Error::usage(
                    format!("the option name {} is not a string", repr(&key)),
                    "pass options as keyword arguments",
                ));
            };
            if key == COMMAND_LINE {
                given.command_line = Some(value);
                continue;
            }
            let Some(opt) = Opt::from_keyword(&key).or_else(|| {
                DROP_IN_KEYWORDS
                    .iter()
                    .find(|(alias, _)| *alias == key)
                    .map(|(_, opt)| *opt)
            }) else {
                return Err(Error::usage(
                    format!("unknown option '{key}'"),
                    format!("the options are: {}", public_keywords().join(", ")),
                ));
            };
            if value.is_none() {
                continue;
            }
            if let Some((other, _)) = given.values.get(&opt) {
                return Err(Error::usage(
                    format!("{other} and {key} are the same option, given twice"),
                    format!("pass one of {other} and {key}"),
                ));
            }
            given.values.insert(opt, (key, value));
        }
        Ok(given)
    }

    /// The options given under a drop-in's name, for messages.
    fn renamed(&self) -> Vec<(Opt, &'static str)> {
        DROP_IN_KEYWORDS
            .iter()
            .filter(|(alias, opt)| self.values.get(opt).is_some_and(|(key, _)| key == alias))
            .map(|(alias, opt)| (*opt, *alias))
            .collect()
    }

    /// The value of `opt` as `T`, or a message naming it and what it takes.
    fn get<T: for<'a> FromPyObject<'a, 'py>>(&self, opt: Opt) -> Result<Option<T>> {
        self.convert(opt, |value| value.extract::<T>().ok())
    }

    /// The value of `opt` through `convert`; `None` from it is a type the
    /// option does not take.
    fn convert<T>(
        &self,
        opt: Opt,
        convert: impl FnOnce(&Bound<'py, PyAny>) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.values.get(&opt) {
            None => Ok(None),
            Some((name, value)) => convert(value)
                .map(Some)
                .ok_or_else(|| bad(name, value, &opt.takes())),
        }
    }

    fn switch(&self, opt: Opt) -> Result<bool> {
        Ok(self.get::<bool>(opt)?.unwrap_or(false))
    }

    fn strings(&self, opt: Opt) -> Result<Vec<String>> {
        Ok(self.get::<Vec<String>>(opt)?.unwrap_or_default())
    }

    fn path(&self, opt: Opt) -> Result<Option<PathBuf>> {
        self.convert(opt, path_of)
    }

    fn integer(&self, opt: Opt) -> Result<Option<i64>> {
        self.convert(opt, integer_of)
    }

    /// A file's path, or (a dict) the entries themselves, each converted by
    /// `entry` (which names the tensor when it refuses one).
    fn table<V>(
        &self,
        opt: Opt,
        entry: impl Fn(&str, &str, &Bound<'py, PyAny>) -> Result<V>,
    ) -> Result<Option<Table<V>>> {
        let Some((name, value)) = self.values.get(&opt) else {
            return Ok(None);
        };
        let Ok(dict) = value.cast::<PyDict>() else {
            return Ok(self.path(opt)?.map(Table::File));
        };
        let mut entries = BTreeMap::new();
        for (key, value) in dict.iter() {
            let Ok(tensor) = key.extract::<String>() else {
                return Err(Error::usage(
                    format!(
                        "{name} has the key {}, which is not a tensor name",
                        repr(&key)
                    ),
                    format!("{name}'s keys are tensor names (strings)"),
                ));
            };
            let value = entry(name, &tensor, &value)?;
            entries.insert(tensor, value);
        }
        Ok(Some(Table::Entries(entries)))
    }
}

/// The keywords a caller may pass (the private one not among them).
fn public_keywords() -> Vec<&'static str> {
    Opt::ALL
        .iter()
        .filter_map(|opt| opt.keyword())
        .chain(DROP_IN_KEYWORDS.iter().map(|(alias, _)| *alias))
        .collect()
}

/// A path from `str`, `os.PathLike` or `bytes` (non-UTF-8 names included:
/// a `str` carrying them as surrogate escapes, as `os.fsdecode` makes
/// them, becomes those bytes again).
fn path_of(value: &Bound<'_, PyAny>) -> Option<PathBuf> {
    if let Ok(path) = value.extract::<PathBuf>() {
        return Some(path);
    }
    let fspath = value
        .py()
        .import("os")
        .ok()?
        .call_method1("fspath", (value,))
        .ok()?;
    let bytes = fspath.cast::<PyBytes>().ok()?;
    Some(OsString::from_vec(bytes.as_bytes().to_vec()).into())
}

/// A Python `int` as an `i64`, saturated when it does not fit (the
/// library caps or refuses it by the option's range); `None` for other
/// types.
fn integer_of(value: &Bound<'_, PyAny>) -> Option<i64> {
    if let Ok(n) = value.extract::<i64>() {
        return Some(n);
    }
    if !value.is_instance_of::<pyo3::types::PyInt>() {
        return None;
    }
    Some(if value.gt(0).ok()? {
        i64::MAX
    } else {
        i64::MIN
    })
}

/// One entry of a mapping: the tensor's output file index.
fn file_index(name: &str, tensor: &str, value: &Bound<'_, PyAny>) -> Result<u64> {
    // `bool` is an `int` to Python; no one means file True.
    let index = (!value.is_instance_of::<pyo3::types::PyBool>())
        .then(|| value.extract::<u64>().ok())
        .flatten();
    index.ok_or_else(|| {
        Error::usage(
            format!(
                "{name}: tensor '{tensor}' has the file index {}, which is not an integer from 1",
                repr(value)
            ),
            format!("{name} maps each tensor name to its output file's index, an integer from 1"),
        )
    })
}

/// One entry of a dtype map: the tensor's original dtype's name.
fn dtype_name(name: &str, tensor: &str, value: &Bound<'_, PyAny>) -> Result<String> {
    value.extract::<String>().map_err(|_| {
        Error::usage(
            format!(
                "{name}: tensor '{tensor}' has {}, which is not a dtype name",
                repr(value)
            ),
            format!("{name} maps tensor names to safetensors dtype names such as \"BF16\""),
        )
    })
}

/// The private command line: whatever the Python layer put there, as
/// text (lossy for bytes), never refused.
fn command_line(value: Option<&Bound<'_, PyAny>>) -> Vec<String> {
    let Some(Ok(items)) = value.map(|v| v.try_iter()) else {
        return Vec::new();
    };
    items
        .flatten()
        .map(|item| {
            if let Ok(text) = item.cast::<PyString>() {
                // Surrogate escapes (non-UTF-8 names) become U+FFFD.
                return text.to_string_lossy().into_owned();
            }
            match path_of(&item) {
                Some(path) => path.to_string_lossy().into_owned(),
                None => item.str().map_or_else(|_| "?".into(), |s| s.to_string()),
            }
        })
        .collect()
}

/// The run's configuration from the keyword arguments.
pub fn from_options(
    input: PathBuf,
    output: PathBuf,
    options: &Bound<'_, PyDict>,
) -> Result<Config> {
    let given = Given::read(options)?;
    let max_shard_size = given.convert(Opt::MaxShardSize, |value| {
        if let Ok(text) = value.extract::<String>() {
            return Some(text);
        }
        // Bytes, as digits for the library's size parser (which refuses
        // zero and negative counts with the option's range).
        integer_of(value).map(|n| n.to_string())
    })?;
    let options = Options {
        input_format: given.get(Opt::InputFormat)?,
        tag: given.get(Opt::Tag)?,
        include: given.strings(Opt::Include)?,
        exclude: given.strings(Opt::Exclude)?,
        mapping: given.table(Opt::Mapping, file_index)?,
        hf_index: given.path(Opt::HfIndex)?,
        max_shard_size,
        unmapped: given.get(Opt::Unmapped)?,
        threads: given.integer(Opt::Threads)?,
        dry_run: given.switch(Opt::DryRun)?,
        ranks: given.integer(Opt::Ranks)?,
        ranks_per_node: given.integer(Opt::RanksPerNode)?,
        overwrite: given.switch(Opt::Overwrite)?,
        resume: given.switch(Opt::Resume)?,
        hf_assets: given.path(Opt::HfAssets)?,
        staging_dir: given.path(Opt::StagingDir)?,
        index_name: given.get(Opt::IndexName)?,
        keep_top_level_key: given.switch(Opt::KeepTopLevelKey)?,
        keep_tied: given.switch(Opt::KeepTied)?,
        exclude_frozen_parameters: given.switch(Opt::ExcludeFrozenParameters)?,
        no_hf_metadata: given.switch(Opt::NoHfMetadata)?,
        verify: given.switch(Opt::Verify)?,
        verify_only: given.switch(Opt::VerifyOnly)?,
        allow_missing_shard_files: given.switch(Opt::AllowMissingShardFiles)?,
        source_ranks: given.integer(Opt::SourceRanks)?,
        // Every message goes to `logging`, which filters by level.
        verbose: true,
        progress: given.get(Opt::Progress)?,
        report: given.path(Opt::Report)?,
        schedule: given.get(Opt::Schedule)?,
        headers: given.get(Opt::Headers)?,
        dtype: given.get(Opt::Dtype)?,
        dtype_map: given.table(Opt::DtypeMap, dtype_name)?,
        strip_prefix: given.strings(Opt::StripPrefix)?,
        command_line: command_line(given.command_line.as_ref()),
        renamed: given.renamed(),
        ..Options::new(input, output, Spelling::Keywords)
    };
    options.into_config()
}
