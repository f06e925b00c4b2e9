//! The library's one error type.
//!
//! Every message names what went wrong (file, tensor) and ends with a hint
//! telling the user what to do, because the person reading it is usually an
//! operator looking at a Slurm log, not the author of the checkpoint.

use rustix::io::Errno;
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a run was asked to stop (`exec::cancel`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StopReason {
    /// An interrupt (Ctrl-C, SIGINT) reached this rank.
    Interrupted,
    /// This rank's process is exiting (the Python interpreter's exit).
    Exiting,
}

/// What happened to a rank that failed (the protocol is in `failure`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The inputs or the options are unusable.
    Input,
    /// The rank was interrupted (Ctrl-C) before the point of no return.
    Interrupted,
    /// The rank's process was exiting (the Python interpreter's exit).
    Exited,
    /// The ranks cannot communicate: a rank died, never came or timed out.
    Departed,
    /// A bug: a panic or a broken invariant.
    Internal,
    /// Anything else: the filesystem, verification, ranks that disagree.
    Failed,
}

/// Everything that can stop a consolidation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation failed.
    #[error("cannot {action} {}: {}\n  hint: {}", shown_path(path), shown(&source.to_string()), io_hint(source))]
    Io {
        /// What we were doing, as a verb phrase ("read", "create", ...).
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A shard file is not a well-formed safetensors file.
    #[error(
        "{}: invalid safetensors file: {}\n  hint: the file may be truncated or corrupt; re-copy it from the checkpoint or re-save it",
        shown_path(path),
        shown(reason)
    )]
    BadFile {
        /// The shard file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A tensor entry inside a shard file is malformed.
    #[error(
        "{}: tensor '{}': {}\n  hint: {hint}",
        shown_path(path),
        shown(tensor),
        shown(reason)
    )]
    BadTensor {
        /// The shard file holding the tensor.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// What is wrong with it.
        reason: String,
        /// What the user can do.
        hint: &'static str,
    },

    /// Reading a shard or writing an output failed while copying a tensor.
    #[error(
        "tensor '{}': cannot {action} {}: {}\n  hint: {}",
        shown(tensor),
        shown_path(path),
        shown(&source.to_string()),
        io_hint(source)
    )]
    Copy {
        /// The tensor being copied.
        tensor: String,
        /// What we were doing ("read", "write", "map").
        action: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A safetensors file that carries no DCP sharding metadata.
    #[error(
        "{}: not a DCP shard (its __metadata__ has no DCP_SHARDING_INFO)\n  hint: INPUT_DIR must hold only the per-rank shard files written by PyTorch's HuggingFaceStorageWriter(save_distributed=True); move other .safetensors files elsewhere",
        shown_path(path)
    )]
    NotDcpShard {
        /// The file.
        path: PathBuf,
    },

    /// The pieces of a tensor do not fit together into one full tensor.
    #[error("tensor '{}': {}\n  hint: {hint}", shown(tensor), shown(reason))]
    Inconsistent {
        /// The tensor's name.
        tensor: String,
        /// What does not fit.
        reason: String,
        /// What the user can do.
        hint: &'static str,
    },

    /// The mapping of tensors to output files is unusable.
    #[error("{}: {}\n  hint: {hint}", shown_path(path), shown(reason))]
    Mapping {
        /// The mapping or index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
        /// What the user can do.
        hint: &'static str,
    },

    /// Tensors present in the shards have no output file in the mapping.
    #[error("{} tensor(s) in the shards are not in the mapping {}: {}\n  hint: add them to the mapping (under their saved or their --strip-prefix name), or pass --unmapped last to put them in the last output file", names.len(), shown_path(mapping), list_names(names))]
    Unmapped {
        /// The mapping or index file.
        mapping: PathBuf,
        /// The unmapped tensor names.
        names: Vec<String>,
    },

    /// The command line or the directories do not allow a run.
    #[error("{}\n  hint: {}", shown(reason), shown(hint))]
    Usage {
        /// What is wrong.
        reason: String,
        /// What the user can do.
        hint: String,
    },

    /// Written bytes differ from the shards (found by verification).
    #[error("verification failed for {}:{}\n  hint: the output is not trustworthy; {}", counted(mismatches.len(), "tensor", "tensors"), listed_lines(mismatches), mismatch_hint(mismatches))]
    Mismatch {
        /// One line per mismatching tensor (shown one per line, the
        /// first ten: a one-line list of long lines is unreadable).
        mismatches: Vec<String>,
    },

    /// MPI's world is smaller than the job the launcher started: the MPI
    /// library and the launcher do not speak the same process-management
    /// interface, so every task would run alone and write every file.
    #[error(
        "MPI reports a world of {size} rank(s), but the launcher started {tasks} tasks ({var}={tasks}); each task would consolidate alone and write every file\n  hint: under srun, pass --mpi=pmix for an OpenMPI build or --mpi=pmi2 for an MPICH build (srun --mpi=list shows what Slurm offers); with mpirun/mpiexec, use the one of the MPI this binary was built with"
    )]
    WrongWorld {
        /// The launcher's variable that gave the task count.
        var: &'static str,
        /// Tasks the launcher started.
        tasks: usize,
        /// World size MPI reports.
        size: usize,
    },

    /// An in-kernel copy between two files failed without saying which side.
    #[error(
        "tensor '{}': cannot copy {} into {}: {}\n  hint: {}",
        shown(tensor),
        shown_path(from),
        shown_path(to),
        shown(&source.to_string()),
        io_hint(source)
    )]
    CopyBetween {
        /// The tensor being copied.
        tensor: String,
        /// The input file.
        from: PathBuf,
        /// The output file.
        to: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A checkpoint's metadata file (DCP's `.metadata`) cannot be used.
    #[error("{}: {}\n  hint: {}", shown_path(path), shown(reason), shown(hint))]
    BadCheckpoint {
        /// The metadata file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
        /// What the user can do.
        hint: String,
    },

    /// An existing output's `model.safetensors.index.json` is unusable
    /// (`--verify-only`).
    #[error("{}: {}\n  hint: {hint}", shown_path(path), shown(reason))]
    BadIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
        /// What the user can do.
        hint: &'static str,
    },

    /// The ranks do not agree: different plans, different OUTPUT_DIRs, or
    /// messages another rank sent that cannot be read.
    #[error("{}\n  hint: {}", shown(reason), shown(hint))]
    RanksDisagree {
        /// What differs between ranks.
        reason: String,
        /// What the user can do.
        hint: String,
    },

    /// Something that cannot happen did: a bug in this program.
    #[error(
        "internal error: {}\n  hint: this is a bug; please report it with the command line",
        shown(reason)
    )]
    Internal {
        /// What went wrong.
        reason: String,
    },

    /// MPI was initialized before this library could initialize it, so
    /// MPI's world cannot be this job's: running on as one process would
    /// have every task write every file.
    #[error(
        "MPI was already initialized in this process (by mpi4py or another library), so st-consolidate-mpi cannot start the job's MPI world; running on as one process would have every task consolidate alone\n  hint: run st-consolidate-mpi as a process of its own under the launcher (not from a program that has called MPI_Init); from Python, call st_consolidate's functions with a torch.distributed process group instead of mpi4py"
    )]
    MpiAlreadyInitialized,

    /// The front end asked the run to stop ([`crate::exec::cancel::Cancel`])
    /// before its point of no return.
    #[error(
        "the consolidation was stopped before it finished ({}): nothing was published, the earlier output (if any) is as it was, and the temporary files were removed\n  hint: run it again to consolidate",
        match .0 { StopReason::Interrupted => "interrupted: Ctrl-C or SIGINT", StopReason::Exiting => "the Python interpreter is exiting" }
    )]
    Cancelled(StopReason),

    /// A collective failed in the communicator itself (torch.distributed
    /// raised: a timeout, a peer that went away).
    #[error(
        "rank {rank}: the ranks cannot communicate: {}\n  hint: {}",
        shown(reason),
        shown(hint)
    )]
    Communicator {
        /// This process's rank.
        rank: usize,
        /// What the communicator said.
        reason: String,
        /// What the user can do.
        hint: String,
    },

    /// Another rank failed ([`crate::failure`]): its rank, what happened to
    /// it, and its message. The command prints only the failing rank's own
    /// error; the Python extension raises this one on the other ranks.
    #[error("rank {rank} {}: {message}", kind.what_happened())]
    PeerFailed {
        /// The rank that failed.
        rank: usize,
        /// What happened to it.
        kind: FailureKind,
        /// Its message.
        message: String,
    },
}

impl Error {
    /// Builds an [`Error::Io`] for `action` on `path`.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// Builds an [`Error::Usage`]: the command line or the directories do
    /// not allow a run.
    pub fn usage(reason: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::Usage {
            reason: reason.into(),
            hint: hint.into(),
        }
    }

    /// Builds an [`Error::RanksDisagree`].
    pub fn ranks_disagree(reason: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::RanksDisagree {
            reason: reason.into(),
            hint: hint.into(),
        }
    }

    /// Builds an [`Error::Internal`].
    pub fn internal(reason: impl Into<String>) -> Self {
        Error::Internal {
            reason: reason.into(),
        }
    }
}

fn io_hint(err: &std::io::Error) -> &'static str {
    let errno = err.raw_os_error().map(Errno::from_raw_os_error);
    match errno {
        Some(Errno::NOSPC) => "the disk is full; free space in OUTPUT_DIR or choose another one",
        Some(Errno::DQUOT) => {
            "the disk quota is exhausted; free space or choose another OUTPUT_DIR"
        }
        Some(Errno::ACCESS | Errno::PERM | Errno::ROFS) => {
            "check permissions: the input must be readable and OUTPUT_DIR writable"
        }
        Some(Errno::NOENT) => "check that the path exists and is visible from every node",
        Some(Errno::MFILE | Errno::NFILE) => {
            "too many open files: raise `ulimit -n`, use fewer output files, or run more ranks"
        }
        _ => "check the path and the filesystem, then rerun",
    }
}

/// Up to ten names, escaped, and how many more there are.
pub fn list_names(names: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut text = names
        .iter()
        .take(SHOWN)
        .map(|name| shown(name))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" ... and {} more", names.len() - SHOWN));
    }
    text
}

/// How `--verify` mismatch lines of a file compared on another node than
/// the one that wrote it end (`exec::verify::assign`).
pub const COMPARED_ELSEWHERE: &str = "against its copy of INPUT_DIR";

/// What to do about verification mismatches: where a file compared on
/// another node differs, the likeliest cause is that the nodes' copies of
/// INPUT_DIR differ, which rerunning would not change.
fn mismatch_hint(mismatches: &[String]) -> &'static str {
    match mismatches.iter().any(|m| m.ends_with(COMPARED_ELSEWHERE)) {
        true => {
            "a file differs from the inputs as another node sees them: the nodes' copies of INPUT_DIR likely differ \
             (compare them, e.g. sha256sum on each node, or give every node one shared INPUT_DIR), else check the filesystem; \
             then rerun with --overwrite"
        }
        false => "check the filesystem and rerun with --overwrite",
    }
}

/// `names` one per line, each indented and escaped: the first ten, then
/// how many more there are.
pub fn listed_lines(names: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut text: String = names
        .iter()
        .take(SHOWN)
        .map(|name| format!("\n  {}", shown(name)))
        .collect();
    if names.len() > SHOWN {
        text.push_str(&format!("\n  ... and {} more", names.len() - SHOWN));
    }
    text
}

/// `count` with the noun that agrees with it: "1 file", "2 files".
pub fn counted(count: usize, one: &str, many: &str) -> String {
    format!("{count} {}", if count == 1 { one } else { many })
}

/// Up to ten of `paths`, by file name, as [`list_names`] shows names.
pub fn list_file_names<P: AsRef<Path>>(paths: &[P]) -> String {
    let names: Vec<String> = paths
        .iter()
        .map(|p| {
            p.as_ref()
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    list_names(&names)
}

/// `text` as it may appear inside a one-line message: control characters
/// (newlines, ESC of ANSI colour codes, ...) and the Unicode controls that
/// reorder or break displayed text are escaped as `escape_debug` does
/// (`\n`, `\u{1b}`), everything else is kept. Names and paths come from the
/// input files; printed raw, one of them could split the one error message
/// into several lines or recolour the terminal.
pub fn shown(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A path as [`shown`] shows text (lossy for non-UTF-8 bytes).
pub fn shown_path(path: &Path) -> String {
    shown(&path.to_string_lossy()).into_owned()
}

/// Control characters, line and paragraph separators, and the
/// bidirectional marks, embeddings, overrides and isolates.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{061C}' | '\u{200E}' | '\u{200F}'
        )
        || ('\u{202A}'..='\u{202E}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_plain_names_kept() {
        assert!(matches!(shown("model.layers.0.w"), Cow::Borrowed(_)));
        assert_eq!(
            shown("a\nb\x1b[31mc\td\u{7f}"),
            "a\\nb\\u{1b}[31mc\\td\\u{7f}"
        );
        assert_eq!(shown("x\u{202E}y\u{2028}z"), "x\\u{202e}y\\u{2028}z");
        // Not control characters: kept as they are.
        assert_eq!(shown("é中\\n\""), "é中\\n\"");
    }

    #[test]
    fn messages_stay_on_their_two_lines() {
        let err = Error::BadTensor {
            path: PathBuf::from("dir/shard\n-1.safetensors"),
            tensor: "w\n\x1b[31mred".into(),
            reason: "dtype \"Q\r\" unknown".into(),
            hint: "re-save it",
        };
        let text = err.to_string();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(!text.contains('\x1b') && !text.contains('\r'), "{text}");
        assert!(text.contains("tensor 'w\\n\\u{1b}[31mred'"), "{text}");
        assert!(text.starts_with("dir/shard\\n-1.safetensors: "), "{text}");
        let err = Error::Unmapped {
            mapping: PathBuf::from("m.json"),
            names: vec!["a\nb".into(), "c".into()],
        };
        assert_eq!(err.to_string().lines().count(), 2, "{err}");
        let err = Error::usage("bad \u{1b}name\n", "hint\nmore".to_string());
        assert_eq!(err.to_string().lines().count(), 2, "{err}");
    }

    /// A verification failure is the one message of several lines: one
    /// tensor per line (at most ten, then a count), each line escaped,
    /// then the hint.
    #[test]
    fn a_verification_failure_lists_one_tensor_per_line() {
        let line = |i: usize| format!("model-00001-of-00001.safetensors: tensor 'w{i}' differs");
        let err = Error::Mismatch {
            mismatches: (0..12).map(line).collect(),
        };
        let text = err.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 13, "{text}");
        assert_eq!(lines[0], "verification failed for 12 tensors:");
        assert_eq!(lines[1], format!("  {}", line(0)));
        assert_eq!(lines[10], format!("  {}", line(9)));
        assert_eq!(lines[11], "  ... and 2 more");
        assert!(lines[12].starts_with("  hint: the output is not trustworthy"));
        let across = format!(
            "'t' in f: first difference at byte 0; written on a, compared on b {COMPARED_ELSEWHERE}"
        );
        let text = Error::Mismatch {
            mismatches: vec![line(0), across],
        }
        .to_string();
        assert!(
            text.contains("hint: the output is not trustworthy; a file differs from the inputs as another node sees them: the nodes' copies of INPUT_DIR likely differ"),
            "{text}"
        );
        let err = Error::Mismatch {
            mismatches: vec!["a\nb".into()],
        };
        assert_eq!(
            err.to_string().lines().take(2).collect::<Vec<_>>(),
            ["verification failed for 1 tensor:", "  a\\nb"]
        );
    }
}
