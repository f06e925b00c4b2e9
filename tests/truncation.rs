//! A shard truncated while the run reads it: one clear error naming the
//! file and tensor, never a signal, and no files left behind. Shards are
//! read, not memory-mapped, so a short file cannot raise SIGBUS.

mod common;
use common::*;
use st_consolidate_mpi::Error;
use st_consolidate_mpi::checkpoint::{FullTensor, Location};
use st_consolidate_mpi::exec::copy::{DIRECT_MIN_RUN, TRUNCATED_DURING_RUN, check_replicas};
use st_consolidate_mpi::exec::runs::Runs;
use st_consolidate_mpi::plan::Plan;
use st_consolidate_mpi::safetensors::header::read_header;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_st-consolidate-mpi");

/// Whether the copy moves `tensor` in the kernel (every run long enough).
fn is_direct(tensor: &FullTensor) -> bool {
    tensor.pieces.iter().all(|p| {
        let runs = Runs::new(&tensor.shape, &p.offsets, &p.shape, tensor.dtype.size());
        runs.run_len() >= DIRECT_MIN_RUN
    })
}

/// The last piece copy of a shard: where it is, its length, its tensor,
/// and whether it is the piece's primary location (the one the copy
/// reads) rather than a replica (read only by the replica check).
struct LastPiece<'a> {
    location: Location,
    len: u64,
    tensor: &'a FullTensor,
    primary: bool,
}

/// The last non-empty piece copy of every shard, by offset.
fn last_pieces(plan: &Plan) -> Vec<LastPiece<'_>> {
    let mut last: Vec<Option<LastPiece>> = (0..plan.shards.len()).map(|_| None).collect();
    for tensor in &plan.tensors {
        for piece in &tensor.pieces {
            let len = piece.shape.iter().product::<u64>() * tensor.dtype.size();
            let copies = std::iter::once((piece.location, true))
                .chain(piece.replicas.iter().map(|r| (*r, false)));
            for (location, primary) in copies {
                let slot = &mut last[location.shard];
                if len > 0
                    && slot
                        .as_ref()
                        .is_none_or(|l| location.offset > l.location.offset)
                {
                    *slot = Some(LastPiece {
                        location,
                        len,
                        tensor,
                        primary,
                    });
                }
            }
        }
    }
    last.into_iter().flatten().collect()
}

/// Cuts `path` to `len` bytes.
fn truncate(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn assert_truncation_error(err: Error, shard: &Path, tensor: &str) {
    let text = err.to_string();
    match err {
        Error::Copy {
            tensor: got,
            action,
            path,
            source,
        } => {
            assert_eq!(
                (got.as_str(), action, path.as_path()),
                (tensor, "read", shard)
            );
            assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof);
        }
        other => panic!("not a read error: {other:?}"),
    }
    assert!(
        text.contains(TRUNCATED_DURING_RUN) && text.contains("hint:"),
        "{text}"
    );
}

/// Truncates the shard after the plan was made from its header, in the
/// middle of its last piece, then copies: the copy fails on that piece.
fn copy_after_truncating(layout: &str, hidden: &str, direct: bool) {
    let ckpt = tempfile::tempdir().unwrap();
    make_shards(
        ckpt.path(),
        &[
            "--layout", layout, "--ranks", "4", "--files", "2", "--hidden", hidden, "--vocab",
            "4000", "--dtype", "f32",
        ],
    );
    let plan = plan_for(ckpt.path(), None);
    let last = last_pieces(&plan)
        .into_iter()
        .find(|l| l.primary && is_direct(l.tensor) == direct)
        .expect("some shard ends with such a piece");
    let path = plan.shards[last.location.shard].clone();
    truncate(&path, last.location.offset + last.len / 2);
    let out = tempfile::tempdir().unwrap();
    let err = write_outputs(&plan, out.path()).unwrap_err();
    assert_truncation_error(err, &path, &last.tensor.name);
}

#[test]
fn a_truncated_shard_is_a_read_error_on_the_gathered_path() {
    copy_after_truncating("tp", "256", false);
}

#[test]
fn a_truncated_shard_is_a_read_error_on_the_in_kernel_path() {
    copy_after_truncating("fsdp", "512", true);
}

#[test]
fn a_truncated_replica_is_a_read_error_in_the_replica_check() {
    let ckpt = tempfile::tempdir().unwrap();
    make_shards(ckpt.path(), &["--layout", "zoo", "--ranks", "4"]);
    let plan = plan_for(ckpt.path(), None);
    let last = last_pieces(&plan)
        .into_iter()
        .find(|l| !l.primary)
        .expect("some shard ends with a replica");
    let path = plan.shards[last.location.shard].clone();
    truncate(&path, last.location.offset + last.len / 2);
    let name = &last.tensor.name;
    let file = plan
        .files
        .iter()
        .position(|f| {
            f.entries
                .iter()
                .any(|e| &plan.tensors[e.tensor].name == name)
        })
        .unwrap();
    let err = check_replicas(&plan, file).unwrap_err();
    assert_truncation_error(err, &path, name);
}

/// Starts a consolidation of `ckpt` into `out` and truncates `victim` to
/// `keep` bytes as soon as the first output file exists. `None` if the run
/// finished before that could happen.
fn run_and_truncate(
    ranks: usize,
    ckpt: &Path,
    out: &Path,
    victim: &Path,
    keep: u64,
) -> Option<Output> {
    let mut command = if ranks == 0 {
        Command::new(BIN)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["--oversubscribe", "-n", &ranks.to_string(), BIN]);
        c
    };
    let mapping = ckpt.join("mapping.json");
    let child = command
        .args(["-q", "--threads", "1", "--mapping"])
        .args([&mapping, ckpt, out])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary (and mpirun) start");
    let mut child = child;
    let started = Instant::now();
    loop {
        let any_temp = std::fs::read_dir(out)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            })
            .unwrap_or(false);
        if any_temp {
            truncate(victim, keep);
            break;
        }
        if child.try_wait().unwrap().is_some() || started.elapsed() > Duration::from_secs(120) {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let output = child.wait_with_output().unwrap();
    (!output.status.success()).then_some(output)
}

/// End to end, best effort on timing: a bigger checkpoint is tried when the
/// run outpaces the truncation.
fn truncated_during_the_run(ranks: usize) {
    for layers in ["1", "4", "12"] {
        let ckpt = tempfile::tempdir().unwrap();
        make_shards(
            ckpt.path(),
            &[
                "--layout", "tp", "--ranks", "4", "--files", "2", "--layers", layers, "--hidden",
                "2048", "--vocab", "32000", "--dtype", "bf16",
            ],
        );
        // A shard of the second output file: read last with one thread.
        let victim: PathBuf = ckpt
            .path()
            .join("shard-00004-model-00002-of-00002.safetensors");
        let keep = read_header(&victim).unwrap().data_start;
        let out = tempfile::tempdir().unwrap();
        let Some(output) = run_and_truncate(ranks, ckpt.path(), out.path(), &victim, keep) else {
            continue;
        };
        let text = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "no signal, exit 1:\n{text}");
        let errors: Vec<&str> = text.lines().filter(|l| l.contains("error:")).collect();
        assert_eq!(errors.len(), 1, "{text}");
        assert!(
            errors[0].contains(&victim.display().to_string())
                && errors[0].contains("tensor '")
                && errors[0].contains("truncated"),
            "{text}"
        );
        assert!(!text.contains("panicked"), "{text}");
        let left: Vec<String> = std::fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !left
                .iter()
                .any(|n| n.starts_with("model") || n.ends_with(".tmp")),
            "left behind: {left:?}"
        );
        return;
    }
    panic!("every run finished before its shard could be truncated");
}

#[test]
fn a_shard_truncated_during_a_run_stops_it_cleanly() {
    truncated_during_the_run(0);
}

#[test]
fn a_shard_truncated_during_an_mpi_run_stops_it_cleanly() {
    truncated_during_the_run(2);
}
