//! The run's protocol over threaded ranks (issue 24): a stop at every
//! collective of a run, in turn, leaves either the earlier output intact
//! with its index and the stop reported, or the new output complete with
//! success reported (a stop after the point of no return); never a folder
//! without its index, never a failure over published output, never a
//! staging folder left behind. A panic in a phase fails every rank with
//! one message. The shared headers cost each rank one model, not one per
//! rank.

use sha2::{Digest, Sha256};
use st_consolidate_mpi::Error;
use st_consolidate_mpi::checkpoint::hf_shards::HeaderReading;
use st_consolidate_mpi::checkpoint::{ReadOptions, wire};
use st_consolidate_mpi::comm::Communicator;
use st_consolidate_mpi::comm::collectives::read_checkpoint;
use st_consolidate_mpi::comm::threads::{ThreadRank, run_ranks};
use st_consolidate_mpi::exec::cancel::{Cancel, StopReason};
use st_consolidate_mpi::failure::FailureKind;
use st_consolidate_mpi::messages::Silent;
use st_consolidate_mpi::plan::mapping::MappingSource;
use st_consolidate_mpi::run::{Config, Summary, run};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A rank's communicator that sets the run's cancel flag (as Ctrl-C does)
/// when its `at`-th collective begins; `at = usize::MAX` only counts.
struct StopsAt<'a> {
    inner: &'a ThreadRank,
    at: usize,
    seen: Cell<usize>,
    cancel: Cancel,
}

impl StopsAt<'_> {
    fn step(&self) {
        let seen = self.seen.get() + 1;
        self.seen.set(seen);
        if seen == self.at {
            self.cancel.cancel();
        }
    }
}

impl Communicator for StopsAt<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn ranks_on_node(&self) -> usize {
        self.inner.ranks_on_node()
    }
    fn lowest_failed(&self, failed: bool) -> st_consolidate_mpi::Result<Option<usize>> {
        self.step();
        self.inner.lowest_failed(failed)
    }
    fn gather(&self, bytes: &[u8]) -> st_consolidate_mpi::Result<Option<Vec<Vec<u8>>>> {
        self.step();
        self.inner.gather(bytes)
    }
    fn all_gather(&self, bytes: &[u8]) -> st_consolidate_mpi::Result<Vec<Vec<u8>>> {
        self.step();
        self.inner.all_gather(bytes)
    }
    fn broadcast(&self, root: usize, bytes: &[u8]) -> st_consolidate_mpi::Result<Vec<u8>> {
        self.step();
        self.inner.broadcast(root, bytes)
    }
    fn sum_polled(&self, values: [u64; 2]) -> st_consolidate_mpi::Result<[u64; 2]> {
        self.inner.sum_polled(values)
    }
}

/// The HF-shards fixture into `out` with its two-file mapping, replacing
/// what is there; `staging` builds in folders under that root.
fn config(out: &Path, staging: Option<&Path>) -> Config {
    let input = fixtures().join("torch-dcp-w2");
    let mut config = Config::new(&input, out);
    config.plan.mapping = MappingSource::Mapping(input.join("mapping.json"));
    config.overwrite = true;
    config.threads = Some(1);
    // No progress rounds: the collectives counted are the run's own.
    config.progress_secs = 0.0;
    config.staging = staging.map(Path::to_path_buf);
    config
}

/// Runs 2 threaded ranks; `victim` is stopped at its `at`-th collective.
/// Returns each rank's outcome and how many collectives the victim called.
fn run_stopped(
    out: &Path,
    staging: Option<&Path>,
    victim: usize,
    at: usize,
) -> (Vec<st_consolidate_mpi::Result<Summary>>, usize) {
    let counted = std::sync::Mutex::new(0);
    let outcomes = run_ranks(2, |rank| {
        let config = config(out, staging);
        let comm = StopsAt {
            inner: rank,
            at: if rank.rank() == victim {
                at
            } else {
                usize::MAX
            },
            seen: Cell::new(0),
            cancel: config.cancel.clone(),
        };
        let outcome = run(&config, &comm, &Silent);
        if rank.rank() == victim {
            *counted.lock().unwrap() = comm.seen.get();
        }
        outcome
    });
    let outcomes = outcomes
        .into_iter()
        .map(|o| o.expect("no rank panics"))
        .collect();
    (outcomes, counted.into_inner().unwrap())
}

/// Every file under `dir` (recursively), by relative path, with its sha256.
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return files;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            for (inner, digest) in snapshot(&path) {
                files.insert(format!("{name}/{inner}"), digest);
            }
        } else {
            let digest = Sha256::digest(std::fs::read(&path).unwrap());
            files.insert(name, digest.iter().map(|b| format!("{b:02x}")).collect());
        }
    }
    files
}

/// An earlier output in `out`: the same checkpoint in one file.
fn earlier_output(out: &Path) {
    let mut config = config(out, None);
    config.plan.mapping = MappingSource::SingleFile;
    run(&config, &st_consolidate_mpi::comm::SingleProcess, &Silent).unwrap();
}

/// What a run that is not stopped writes into a fresh folder.
fn expected_output() -> BTreeMap<String, String> {
    let out = tempfile::tempdir().unwrap();
    let (outcomes, _) = run_stopped(out.path(), None, 0, usize::MAX);
    assert!(outcomes.iter().all(Result::is_ok));
    snapshot(out.path())
}

/// Stops `victim` at each collective in turn, over an earlier output or
/// into a fresh folder, with or without staging, and checks each outcome.
fn stop_at_every_collective(victim: usize, over_earlier: bool, staged: bool) {
    let expected = expected_output();
    assert!(expected.contains_key("model.safetensors.index.json"));
    let probe = tempfile::tempdir().unwrap();
    let (_, total) = run_stopped(probe.path(), None, victim, usize::MAX);
    let staging_root = tempfile::tempdir().unwrap();
    let staging = staged.then_some(staging_root.path());
    let (mut failed, mut published) = (0, 0);
    // Staging adds phases to the count taken without it.
    for at in 1..=total + 4 {
        let parent = tempfile::tempdir().unwrap();
        let out = parent.path().join("out");
        if over_earlier {
            earlier_output(&out);
        }
        let before = snapshot(&out);
        let (outcomes, called) = run_stopped(&out, staging, victim, at);
        if at > called {
            // Past the run's last collective: no stop at all.
            assert!(
                outcomes
                    .iter()
                    .all(|o| o.as_ref().is_ok_and(|s| s.late_cancel.is_none()))
            );
            assert_eq!(snapshot(&out), expected);
            break;
        }
        let after = snapshot(&out);
        let case = format!(
            "victim {victim}, stopped at collective {at}, earlier output {over_earlier}, staged {staged}"
        );
        assert!(
            std::fs::read_dir(staging_root.path())
                .unwrap()
                .next()
                .is_none(),
            "{case}: a staging folder was left behind"
        );
        if outcomes.iter().all(Result::is_ok) {
            // Published: the whole new output, success reported, and the
            // stop said to have come late.
            published += 1;
            assert_eq!(after, expected, "{case}");
            let late = outcomes[victim].as_ref().unwrap().late_cancel;
            assert_eq!(late, Some(StopReason::Interrupted), "{case}");
            continue;
        }
        failed += 1;
        assert!(
            outcomes.iter().all(Result::is_err),
            "{case}: the ranks disagree on the outcome"
        );
        // Stopped: exactly as before, earlier index included, no temporary.
        assert_eq!(after, before, "{case}");
        if over_earlier {
            assert!(after.contains_key("model.safetensors.index.json"), "{case}");
        }
        for (rank, outcome) in outcomes.into_iter().enumerate() {
            let err = outcome.unwrap_err();
            if rank == victim {
                assert!(
                    matches!(err, Error::Cancelled(StopReason::Interrupted)),
                    "{case}: rank {rank}: {err}"
                );
            } else {
                assert!(
                    matches!(err, Error::PeerFailed { rank: r, kind: FailureKind::Interrupted, .. } if r == victim),
                    "{case}: rank {rank}: {err}"
                );
                assert!(
                    err.to_string()
                        .starts_with(&format!("rank {victim} was interrupted: ")),
                    "{err}"
                );
            }
        }
    }
    // Both sides of the point of no return were reached.
    assert!(
        failed > 10 && published >= 2,
        "{failed} stopped, {published} published of {total}"
    );
}

#[test]
fn a_stop_at_any_collective_over_an_earlier_output_keeps_it_or_publishes_the_new_one() {
    stop_at_every_collective(0, true, false);
    stop_at_every_collective(1, true, false);
}

#[test]
fn a_stop_at_any_collective_into_a_fresh_folder_leaves_it_empty_or_complete() {
    stop_at_every_collective(1, false, false);
}

#[test]
fn a_staged_run_stopped_at_any_collective_leaves_one_index_and_no_staging() {
    stop_at_every_collective(0, true, true);
    stop_at_every_collective(1, false, true);
}

#[test]
fn a_staged_run_writes_what_an_unstaged_run_writes() {
    let staging_root = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let (outcomes, _) = run_stopped(out.path(), Some(staging_root.path()), 0, usize::MAX);
    for outcome in outcomes {
        assert_eq!(outcome.unwrap().late_cancel, None);
    }
    assert_eq!(snapshot(out.path()), expected_output());
    assert!(
        std::fs::read_dir(staging_root.path())
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn shared_headers_cost_each_rank_one_model_not_one_per_rank() {
    let input = fixtures().join("torch-dcpfs-w2/checkpoint");
    let options = ReadOptions {
        headers: HeaderReading::Shared,
        ..ReadOptions::default()
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let model_len = {
        let (checkpoint, _, _) = read_checkpoint(
            &input,
            &options,
            &st_consolidate_mpi::comm::SingleProcess,
            &pool,
        )
        .unwrap();
        wire::encode(&checkpoint).len() as u64
    };
    let received = run_ranks(32, |rank| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        read_checkpoint(&input, &options, rank, &pool).unwrap();
        rank.bytes_received()
    });
    for (rank, bytes) in received.into_iter().enumerate() {
        let bytes = bytes.unwrap();
        // The model, and a few bytes of agreements: never 32 models.
        assert!(
            bytes >= model_len && bytes < model_len + 4096,
            "rank {rank} received {bytes} bytes for a model of {model_len}"
        );
    }
}
