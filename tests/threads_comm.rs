//! The library's run and collectives on 2 and 4 ranks in one process
//! ([`ThreadWorld`]), without `mpirun` (it also runs with
//! `--no-default-features`): the outputs equal a one-rank run's byte for
//! byte, on both input formats and both schedules; and a rank that fails
//! or leaves makes every rank return an error naming it, never a hang.

use sha2::{Digest, Sha256};
use st_consolidate_mpi::Error;
use st_consolidate_mpi::checkpoint::hf_shards::HeaderReading;
use st_consolidate_mpi::comm::collectives::{
    agree, collect_mismatches, gather_reports, read_shard_headers,
};
use st_consolidate_mpi::comm::threads::{ThreadRank, run_ranks};
use st_consolidate_mpi::comm::{Communicator, SingleProcess};
use st_consolidate_mpi::exec::cancel::StopReason;
use st_consolidate_mpi::failure::FailureKind;
use st_consolidate_mpi::messages::Silent;
use st_consolidate_mpi::plan::Schedule;
use st_consolidate_mpi::plan::mapping::MappingSource;
use st_consolidate_mpi::report::RankReport;
use st_consolidate_mpi::run::{Config, Summary, run};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The checkpoints the runs read: (name, input folder, mapping if any).
fn checkpoints() -> Vec<(&'static str, PathBuf, Option<PathBuf>)> {
    let f = fixtures();
    vec![
        (
            "hf-shards",
            f.join("torch-dcp-w2"),
            Some(f.join("torch-dcp-w2/mapping.json")),
        ),
        (
            "dcp 2-D mesh",
            f.join("dcp-v215-w4-mesh/checkpoint"),
            Some(f.join("dcp-v215-w4-mesh/mapping.json")),
        ),
        // No mapping: Hugging Face's default sharding of a DCP checkpoint.
        ("dcp, no mapping", f.join("torch-dcpfs-w2/checkpoint"), None),
    ]
}

fn config(
    input: &Path,
    mapping: Option<&Path>,
    output: &Path,
    schedule: Schedule,
    headers: HeaderReading,
) -> Config {
    let mut config = Config::new(input, output);
    if let Some(mapping) = mapping {
        config.plan.mapping = MappingSource::Mapping(mapping.to_path_buf());
    }
    config.plan.schedule = schedule;
    config.read.headers = headers;
    // The DCP fixtures hold optimizer state their mappings leave out.
    config.read.select.exclude = vec!["optim.*".into()];
    config.threads = Some(2);
    // Frequent progress rounds: their sums run beside the copy.
    config.progress_secs = 0.1;
    config
}

/// The configuration most failure tests use: the modulo schedule, every
/// rank reading every header.
fn modulo(input: &Path, mapping: &Path, output: &Path) -> Config {
    config(
        input,
        Some(mapping),
        output,
        Schedule::Modulo,
        HeaderReading::All,
    )
}

/// The error a rank that had to fail returned.
fn failure(rank: usize, outcome: st_consolidate_mpi::Result<Summary>) -> Error {
    outcome
        .err()
        .unwrap_or_else(|| panic!("rank {rank} succeeded"))
}

/// Runs one rank's `config` on each of `size` threaded ranks.
fn run_threaded(
    size: usize,
    config_for: impl Fn(usize) -> Config + Sync,
) -> Vec<st_consolidate_mpi::Result<Summary>> {
    run_ranks(size, |comm| run(&config_for(comm.rank()), comm, &Silent))
        .into_iter()
        .map(|outcome| outcome.expect("no rank panics"))
        .collect()
}

/// sha256 of every file in `dir`, by name.
fn digests(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let digest = Sha256::digest(std::fs::read(entry.path()).unwrap());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            (entry.file_name().to_string_lossy().into_owned(), hex)
        })
        .collect()
}

/// Files in `dir` under a final output name: weights or the index.
fn final_named(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && (n.ends_with(".safetensors") || n.ends_with(".json")))
        .collect();
    names.sort();
    names
}

#[test]
fn two_and_four_ranks_write_what_one_rank_writes_byte_for_byte() {
    for (name, input, mapping) in checkpoints() {
        let mapping = mapping.as_deref();
        let one = tempfile::tempdir().unwrap();
        let plain = config(
            &input,
            mapping,
            one.path(),
            Schedule::Modulo,
            HeaderReading::All,
        );
        run(&plain, &SingleProcess, &Silent).unwrap();
        let expected = digests(one.path());
        assert!(
            expected.keys().any(|n| n.ends_with(".safetensors")),
            "{name}: {expected:?}"
        );
        for size in [2, 4] {
            for (schedule, headers) in [
                (Schedule::Modulo, HeaderReading::All),
                (Schedule::Balanced, HeaderReading::Shared),
            ] {
                let out = tempfile::tempdir().unwrap();
                let outcomes = run_threaded(size, |_| {
                    config(&input, mapping, out.path(), schedule, headers)
                });
                let case = format!("{name}, {size} ranks, {schedule:?}, headers {headers:?}");
                let mut reports = 0;
                for (rank, outcome) in outcomes.into_iter().enumerate() {
                    let summary = outcome.unwrap_or_else(|e| panic!("{case}: rank {rank}: {e}"));
                    reports += usize::from(summary.report.is_some());
                    assert_eq!(summary.files, expected.len() - 1, "{case}: one index");
                }
                assert_eq!(reports, 1, "{case}: rank 0 alone gets the report");
                assert_eq!(digests(out.path()), expected, "{case}");
            }
        }
    }
}

/// A copy of the HF-shards fixture in which one shard is cut short.
fn fixture_with_a_truncated_shard() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join("torch-dcp-w2")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let victim = "shard-00002-model-00001-of-00002.safetensors";
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join(victim))
        .unwrap();
    file.set_len(4).unwrap();
    (dir, victim.to_string())
}

#[test]
fn an_input_error_on_one_rank_fails_every_rank_naming_it() {
    let (bad, victim) = fixture_with_a_truncated_shard();
    let good = fixtures().join("torch-dcp-w2");
    let mapping = good.join("mapping.json");
    let out = tempfile::tempdir().unwrap();
    // Rank 2 of 4 sees a damaged copy of the checkpoint; the others the
    // good one.
    let outcomes = run_threaded(4, |rank| {
        let input = if rank == 2 {
            bad.path()
        } else {
            good.as_path()
        };
        modulo(input, &mapping, out.path())
    });
    for (rank, outcome) in outcomes.into_iter().enumerate() {
        let err = failure(rank, outcome);
        if rank == 2 {
            assert!(err.to_string().contains(&victim), "{err}");
        } else {
            // Every other rank learns rank 2's own message and kind.
            assert!(
                matches!(
                    err,
                    Error::PeerFailed {
                        rank: 2,
                        kind: FailureKind::Input,
                        ..
                    }
                ),
                "rank {rank}: {err}"
            );
            assert!(
                err.to_string().starts_with("rank 2 refused its input: ")
                    && err.to_string().contains(&victim),
                "{err}"
            );
        }
    }
    assert_eq!(final_named(out.path()), Vec::<String>::new());
}

#[test]
fn ranks_given_different_options_are_refused_before_anything_is_read() {
    let input = fixtures().join("torch-dcp-w2");
    let mapping = input.join("mapping.json");
    let out = tempfile::tempdir().unwrap();
    // Rank 1 leaves a tensor out: it was given other options than rank 0.
    let outcomes = run_threaded(2, |rank| {
        let mut config = modulo(&input, &mapping, out.path());
        if rank == 1 {
            config.read.select.exclude.push("model.norm.weight".into());
            config.plan.unmapped = st_consolidate_mpi::plan::mapping::Unmapped::Omit;
        }
        config
    });
    for (rank, outcome) in outcomes.into_iter().enumerate() {
        let err = failure(rank, outcome);
        let text = err.to_string();
        assert!(
            text.contains("the ranks were given different options: include/exclude is")
                && text.contains("rank 1: Selection")
                && text.contains("model.norm.weight"),
            "rank {rank}: {text}"
        );
    }
    assert_eq!(final_named(out.path()), Vec::<String>::new());
}

#[test]
fn ranks_that_see_different_output_folders_are_refused() {
    let input = fixtures().join("torch-dcp-w2");
    let mapping = input.join("mapping.json");
    let (out, elsewhere) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // As on a node-local OUTPUT_DIR: rank 1's folder is not rank 0's.
    let outcomes = run_threaded(2, |rank| {
        let dir = if rank == 1 {
            elsewhere.path()
        } else {
            out.path()
        };
        modulo(&input, &mapping, dir)
    });
    for (rank, outcome) in outcomes.into_iter().enumerate() {
        let text = failure(rank, outcome).to_string();
        assert!(
            text.contains("is not the same folder on every rank") && text.contains("rank 1 on ")
                || text == "rank 0 failed",
            "rank {rank}: {text}"
        );
    }
    assert_eq!(final_named(out.path()), Vec::<String>::new());
    assert_eq!(final_named(elsewhere.path()), Vec::<String>::new());
}

/// A rank that leaves the job at its `at`-th collective (counting all but
/// the progress sums, which run on a channel of their own): from then on
/// it joins none, as a rank whose process died would not, and its thread
/// ends when its run returns. `at = usize::MAX` never leaves and counts.
struct LeavesAt<'a> {
    inner: &'a ThreadRank,
    at: usize,
    seen: Cell<usize>,
}

impl LeavesAt<'_> {
    fn step(&self) -> st_consolidate_mpi::Result<()> {
        let seen = self.seen.get();
        self.seen.set(seen + 1);
        if seen >= self.at {
            return Err(Error::Communicator {
                rank: self.inner.rank(),
                reason: "this rank left the job (injected by the test)".into(),
                hint: "none".into(),
            });
        }
        Ok(())
    }
}

impl Communicator for LeavesAt<'_> {
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
        self.step()?;
        self.inner.lowest_failed(failed)
    }
    fn gather(&self, bytes: &[u8]) -> st_consolidate_mpi::Result<Option<Vec<Vec<u8>>>> {
        self.step()?;
        self.inner.gather(bytes)
    }
    fn all_gather(&self, bytes: &[u8]) -> st_consolidate_mpi::Result<Vec<Vec<u8>>> {
        self.step()?;
        self.inner.all_gather(bytes)
    }
    fn broadcast(&self, root: usize, bytes: &[u8]) -> st_consolidate_mpi::Result<Vec<u8>> {
        self.step()?;
        self.inner.broadcast(root, bytes)
    }
    fn sum_polled(&self, values: [u64; 2]) -> st_consolidate_mpi::Result<[u64; 2]> {
        if self.seen.get() > self.at {
            return self.step().map(|()| values);
        }
        self.inner.sum_polled(values)
    }
}

/// Runs the HF-shards fixture on 2 ranks into `out`, rank 1 leaving at
/// its `at`-th collective; returns each rank's outcome and how many
/// collectives rank 1 called.
fn run_with_rank1_leaving(
    at: usize,
    out: &Path,
) -> (Vec<st_consolidate_mpi::Result<Summary>>, usize) {
    let input = fixtures().join("torch-dcp-w2");
    let mapping = input.join("mapping.json");
    let called = std::sync::atomic::AtomicUsize::new(0);
    let outcomes = run_ranks(2, |comm| {
        let config = config(
            &input,
            Some(&mapping),
            out,
            Schedule::Balanced,
            HeaderReading::Shared,
        );
        if comm.rank() != 1 {
            return run(&config, comm, &Silent);
        }
        let leaving = LeavesAt {
            inner: comm,
            at,
            seen: Cell::new(0),
        };
        let outcome = run(&config, &leaving, &Silent);
        called.store(leaving.seen.get(), std::sync::atomic::Ordering::Relaxed);
        outcome
    });
    let outcomes = outcomes
        .into_iter()
        .map(|o| o.expect("no rank panics"))
        .collect();
    (outcomes, called.into_inner())
}

#[test]
fn a_rank_that_leaves_at_any_collective_fails_every_rank_and_nothing_hangs() {
    let reference = tempfile::tempdir().unwrap();
    let (outcomes, total) = run_with_rank1_leaving(usize::MAX, reference.path());
    assert!(
        outcomes.iter().all(Result::is_ok),
        "the counting run succeeds"
    );
    assert!(total > 10, "{total} collectives");
    let expected = digests(reference.path());
    for at in 0..total {
        let out = tempfile::tempdir().unwrap();
        let (outcomes, _) = run_with_rank1_leaving(at, out.path());
        let rank0 = outcomes[0].as_ref().err();
        let text = rank0.map(ToString::to_string).unwrap_or_default();
        assert!(
            matches!(rank0, Some(Error::Communicator { rank: 0, .. }))
                && text.contains("rank 1 ended without joining"),
            "leaving at {at}: rank 0: {text}"
        );
        assert!(outcomes[1].is_err(), "leaving at {at}: rank 1 succeeded");
        // Files get their final names only in the last two collectives'
        // phases (each rank renames, then rank 0 the index): a departure
        // before them leaves nothing final-named. After, whatever was
        // published is complete: an index only over equal, present files.
        let published = final_named(out.path());
        if at + 2 < total {
            assert_eq!(published, Vec::<String>::new(), "leaving at {at}");
        }
        let found = digests(out.path());
        for name in &published {
            assert_eq!(
                found.get(name),
                expected.get(name),
                "leaving at {at}: {name}"
            );
        }
        if published.iter().any(|n| n.ends_with(".index.json")) {
            assert_eq!(found, expected, "leaving at {at}");
        }
    }
}

#[test]
fn agree_returns_the_lowest_failing_ranks_own_error_and_peer_failed_elsewhere() {
    let outcomes = run_ranks(4, |comm| {
        let mine: st_consolidate_mpi::Result<usize> = match comm.rank() {
            1 | 3 => Err(Error::internal(format!("broke on rank {}", comm.rank()))),
            rank => Ok(rank),
        };
        agree(comm, mine).map_err(|e| e.to_string())
    });
    let texts: Vec<String> = outcomes
        .into_iter()
        .map(|o| o.unwrap().unwrap_err())
        .collect();
    assert!(texts[1].contains("broke on rank 1"), "{texts:?}");
    // Every other rank, rank 3 included (it failed too, but later in rank
    // order), learns rank 1's kind and message.
    for rank in [0, 2, 3] {
        assert_eq!(
            texts[rank],
            format!("rank 1 hit a bug: {}", texts[1]),
            "{texts:?}"
        );
    }
    let all_fine = run_ranks(3, |comm| agree(comm, Ok(comm.rank())).unwrap());
    let all_fine: Vec<usize> = all_fine.into_iter().map(|o| o.unwrap()).collect();
    assert_eq!(all_fine, [0, 1, 2]);
}

#[test]
fn shared_header_reads_give_every_rank_what_reading_them_all_gives() {
    let input = fixtures().join("torch-dcp-w2");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let (all, read) =
        read_shard_headers(&input, HeaderReading::All, &SingleProcess, &pool).unwrap();
    assert_eq!(read, 4);
    // As JSON values: the pieces' offsets are a map of no fixed order.
    let expected = serde_json::to_value(&all).unwrap();
    for size in [2, 3, 4] {
        let outcomes = run_ranks(size, |comm| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            let (parsed, read) =
                read_shard_headers(&input, HeaderReading::Shared, comm, &pool).unwrap();
            (serde_json::to_value(&parsed).unwrap(), read)
        });
        let mut total_read = 0;
        for outcome in outcomes {
            let (parsed, read) = outcome.unwrap();
            assert_eq!(parsed, expected, "{size} ranks");
            total_read += read;
        }
        assert_eq!(total_read, 4, "{size} ranks: each header read once");
    }
}

#[test]
fn rank_0_collects_every_ranks_mismatches_and_reports() {
    let outcomes = run_ranks(3, |comm| {
        let rank = comm.rank();
        let mine: Vec<String> = (0..rank).map(|i| format!("rank {rank} line {i}")).collect();
        let mismatches = collect_mismatches(comm, &mine);
        let report = RankReport {
            rank,
            host: "here".into(),
            files: vec![rank as u32],
            bytes: rank as u64 * 10,
            seconds: 0.0,
            threads: 1,
            header_files_read: 0,
            chunks_located: rank as u64,
            archive_bytes_read: rank as u64 * 100,
            identity_bytes_read: 0,
        };
        let reports = gather_reports(comm, &report).unwrap();
        (mismatches, reports)
    });
    for (rank, outcome) in outcomes.into_iter().enumerate() {
        let (mismatches, reports) = outcome.unwrap();
        if rank != 0 {
            assert!(mismatches.is_ok() && reports.is_none(), "rank {rank}");
            continue;
        }
        match mismatches {
            Err(Error::Mismatch { mismatches }) => assert_eq!(
                mismatches,
                ["rank 1 line 0", "rank 2 line 0", "rank 2 line 1"]
            ),
            other => panic!("rank 0: {other:?}"),
        }
        let reports = reports.unwrap();
        let bytes: Vec<u64> = reports.iter().map(|r| r.bytes).collect();
        assert_eq!(bytes, [0, 10, 20]);
    }
}

#[test]
fn a_cancelled_rank_fails_every_rank() {
    let input = fixtures().join("torch-dcp-w2");
    let mapping = input.join("mapping.json");
    let out = tempfile::tempdir().unwrap();
    let outcomes = run_threaded(2, |rank| {
        let config = modulo(&input, &mapping, out.path());
        if rank == 1 {
            config.cancel.cancel();
        }
        config
    });
    assert!(
        matches!(
            outcomes[0],
            Err(Error::PeerFailed {
                rank: 1,
                kind: FailureKind::Interrupted,
                ..
            })
        ),
        "{:?}",
        outcomes[0].as_ref().err()
    );
    assert!(
        matches!(outcomes[1], Err(Error::Cancelled(StopReason::Interrupted))),
        "{:?}",
        outcomes[1].as_ref().err()
    );
    assert_eq!(final_named(out.path()), Vec::<String>::new());
}

#[test]
fn ranks_that_read_different_bytes_under_the_same_headers_are_refused_naming_the_rank() {
    let good = fixtures().join("torch-dcp-w2");
    let mapping = good.join("mapping.json");
    // Rank 1's copy: same files, same headers, one data byte changed (as
    // a node-local copy still being written, or a stale one, would be).
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&good).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, copy.path().join(path.file_name().unwrap())).unwrap();
    }
    let changed = copy
        .path()
        .join("shard-00001-model-00002-of-00002.safetensors");
    let mut bytes = std::fs::read(&changed).unwrap();
    *bytes.last_mut().unwrap() ^= 0xff;
    std::fs::write(&changed, bytes).unwrap();
    let out = tempfile::tempdir().unwrap();
    let outcomes = run_threaded(2, |rank| {
        let input = if rank == 1 {
            copy.path()
        } else {
            good.as_path()
        };
        modulo(input, &mapping, out.path())
    });
    for (rank, outcome) in outcomes.into_iter().enumerate() {
        let text = failure(rank, outcome).to_string();
        // The plan records the inputs' fingerprint (their first and last
        // 64 KiB), so the plans already differ; the byte-level comparison
        // after it would name the file.
        assert!(
            text.contains("rank 1 built a different plan from rank 0")
                || text.contains("does not hold the same bytes on every rank")
                    && text.contains("rank 1 on ")
                || text == "rank 0 failed",
            "rank {rank}: {text}"
        );
    }
    assert_eq!(final_named(out.path()), Vec::<String>::new());
}
