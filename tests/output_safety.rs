//! OUTPUT_DIR safety: one run at a time (F2), publishing that cannot leave a
//! partial set (F6), a folder every rank must share (F7), `--overwrite`
//! that replaces only at publish time (F8), and the smaller cases around
//! them (older sets, symlinks at final names, inputs changed mid-run).

mod common;
use common::*;
use st_consolidate_mpi::exec::lock::{Holder, LOCK_NAME, OutputLock, host_name};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const INDEX: &str = "model.safetensors.index.json";

fn fixture_args<'a>(mapping: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec!["--mapping", s(mapping), s(torch_fixture_ref()), s(out)]
}

fn torch_fixture_ref() -> &'static Path {
    static FIXTURE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(torch_fixture)
}

#[test]
fn a_folder_held_by_a_live_run_is_refused_and_its_files_kept() {
    let mapping = torch_fixture().join("mapping.json");
    let out = tempfile::tempdir().unwrap();
    // This test process stands for a live run on this host, mid-copy.
    let holder = Holder::me();
    let lock = OutputLock::acquire(out.path(), &holder).unwrap();
    let live_temp = out
        .path()
        .join(".model-00001-of-00002.safetensors.st-consolidate.tmp");
    std::fs::write(&live_temp, b"being written").unwrap();
    let before = snapshot(out.path());
    for ranks in [0, 2] {
        let run = consolidate(ranks, &fixture_args(&mapping, out.path()));
        let text = stderr(&run);
        assert_eq!(run.status.code(), Some(1), "{text}");
        assert_eq!(text.matches("error:").count(), 1, "{text}");
        assert!(text.contains("is in use by another run"), "{text}");
        assert!(
            text.contains(&format!("host {}, pid {}", holder.host, holder.pid)),
            "{text}"
        );
        assert!(text.contains(LOCK_NAME), "says how to clear it: {text}");
        assert_eq!(snapshot(out.path()), before, "the live run's files stay");
    }
    drop(lock);
    std::fs::remove_file(&live_temp).unwrap();
    consolidate_ok(2, &fixture_args(&mapping, out.path()));
    assert_matches_manifest(out.path(), &torch_fixture().join("manifest.json"));
    assert!(!out.path().join(LOCK_NAME).exists(), "the lock is released");
}

#[test]
fn a_lock_left_by_a_killed_run_is_taken_over() {
    let mapping = torch_fixture().join("mapping.json");
    let out = tempfile::tempdir().unwrap();
    let mut child = Command::new("true").spawn().unwrap();
    let dead = Holder {
        pid: child.id(),
        process_start: Some(1),
        ..Holder::me()
    };
    child.wait().unwrap();
    std::mem::forget(OutputLock::acquire(out.path(), &dead).unwrap());
    std::fs::write(
        out.path()
            .join(".model-00002-of-00002.safetensors.st-consolidate.tmp"),
        b"left by the killed run",
    )
    .unwrap();
    consolidate_ok(2, &fixture_args(&mapping, out.path()));
    assert_eq!(
        names(out.path()),
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            INDEX
        ]
    );
}

#[test]
fn a_lock_from_another_host_is_never_broken() {
    let mapping = torch_fixture().join("mapping.json");
    let out = tempfile::tempdir().unwrap();
    let remote = Holder {
        host: "node-elsewhere".into(),
        ..Holder::me()
    };
    std::mem::forget(OutputLock::acquire(out.path(), &remote).unwrap());
    let run = consolidate(2, &fixture_args(&mapping, out.path()));
    let text = stderr(&run);
    assert_eq!(run.status.code(), Some(1), "{text}");
    assert!(text.contains("host node-elsewhere"), "{text}");
    assert_eq!(names(out.path()), [LOCK_NAME]);
}

#[test]
fn a_full_disk_at_the_index_publishes_nothing() {
    // 316 KiB = 79 pages: the lock and both model files fit (1 + 40 + 38
    // pages, headers holding the input fingerprint), the index does not.
    // Everything is staged before any rename, so the run fails with no
    // model file under a final name.
    let disk = SmallDisk::new("316k");
    let out = disk.0.path().join("out");
    let mapping = torch_fixture().join("mapping.json");
    let text = assert_fails(
        2,
        &fixture_args(&mapping, &out),
        &torch_fixture(),
        &out,
        &["No space left on device", INDEX, "the disk is full"],
    );
    assert!(text.contains("write"), "{text}");
    assert_eq!(names(&out), Vec::<String>::new());
}

#[test]
fn a_failed_overwrite_keeps_the_previous_output_and_its_index_input() {
    // Room for one output (~312 KB) and a bit: the --dtype f32 rerun
    // (~520 KB) runs out of space while copying.
    let disk = SmallDisk::new("400k");
    let out = disk.0.path().join("out");
    let mapping = torch_fixture().join("mapping.json");
    consolidate_ok(2, &fixture_args(&mapping, &out));
    let previous = snapshot(&out);
    let index = out.join(INDEX);
    // The old index is both an input (--hf-index) and an output.
    let args = [
        "--overwrite",
        "--dtype",
        "f32",
        "--hf-index",
        s(&index),
        s(torch_fixture_ref()),
        s(&out),
    ];
    let run = consolidate(2, &args);
    let text = stderr(&run);
    assert_eq!(run.status.code(), Some(1), "{text}");
    assert!(text.contains("No space left on device"), "{text}");
    assert_eq!(
        snapshot(&out),
        previous,
        "the previous output, index included, is intact"
    );
    assert!(
        !names(&out).iter().any(|n| n.starts_with('.')),
        "{:?}",
        names(&out)
    );
    assert_matches_manifest(&out, &torch_fixture().join("manifest.json"));
}

#[test]
fn overwrite_with_the_old_index_as_input_replaces_it_at_publish() {
    let out = tempfile::tempdir().unwrap();
    let mapping = torch_fixture().join("mapping.json");
    consolidate_ok(2, &fixture_args(&mapping, out.path()));
    let index = out.path().join(INDEX);
    consolidate_ok(
        3,
        &[
            "--overwrite",
            "--hf-index",
            s(&index),
            s(torch_fixture_ref()),
            s(out.path()),
        ],
    );
    assert_matches_manifest(out.path(), &torch_fixture().join("manifest.json"));
}

#[test]
fn an_older_set_of_another_size_needs_overwrite_and_goes_after_the_new_index() {
    let out = tempfile::tempdir().unwrap();
    let mapping = torch_fixture().join("mapping.json");
    consolidate_ok(2, &fixture_args(&mapping, out.path()));
    let three = [
        "--max-shard-size",
        "120KB",
        s(torch_fixture_ref()),
        s(out.path()),
    ];
    // Without --overwrite the older -of-00002 set blocks the run.
    let before = snapshot(out.path());
    let run = consolidate(2, &three);
    let text = stderr(&run);
    assert_eq!(run.status.code(), Some(1), "{text}");
    assert!(
        text.contains("already holds") && text.contains("model-00001-of-00002.safetensors"),
        "{text}"
    );
    assert_eq!(snapshot(out.path()), before);
    let mut args = vec!["--overwrite"];
    args.extend(three);
    consolidate_ok(2, &args);
    let left = names(out.path());
    assert!(
        left.iter().all(|n| n == INDEX || n.contains("-of-00003")),
        "older files removed: {left:?}"
    );
    assert_eq!(left.len(), 4, "{left:?}");
    assert_matches_manifest(out.path(), &torch_fixture().join("manifest.json"));
}

#[test]
fn a_symlink_at_a_final_name_is_an_existing_output() {
    let out = tempfile::tempdir().unwrap();
    let mapping = torch_fixture().join("mapping.json");
    let dangling = out.path().join("model-00001-of-00002.safetensors");
    let target = out.path().join("nowhere");
    std::os::unix::fs::symlink(&target, &dangling).unwrap();
    let run = consolidate(2, &fixture_args(&mapping, out.path()));
    let text = stderr(&run);
    assert_eq!(run.status.code(), Some(1), "{text}");
    assert!(
        text.contains("already holds model-00001-of-00002.safetensors"),
        "{text}"
    );
    assert!(std::fs::symlink_metadata(&dangling).unwrap().is_symlink());
    // --overwrite replaces the link itself, never what it points to.
    let mut args = vec!["--overwrite"];
    args.extend(fixture_args(&mapping, out.path()));
    consolidate_ok(2, &args);
    assert!(std::fs::symlink_metadata(&dangling).unwrap().is_file());
    assert!(!target.exists());
    assert_matches_manifest(out.path(), &torch_fixture().join("manifest.json"));
}

#[test]
fn ranks_that_see_different_output_dirs_are_stopped_before_writing() {
    // MPMD launch: each rank's OUTPUT_DIR path is a folder of its own, as
    // with node-local scratch under one path on every node.
    let input = torch_fixture();
    let mapping = input.join("mapping.json");
    let dir = tempfile::tempdir().unwrap();
    let (out0, out1) = (dir.path().join("out0"), dir.path().join("out1"));
    let run = Command::new("mpirun")
        .args(["--oversubscribe", "-n", "1", BIN, "--mapping", s(&mapping)])
        .args([s(&input), s(&out0), ":", "-n", "1", BIN, "--mapping"])
        .args([s(&mapping), s(&input), s(&out1)])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap();
    let text = stderr(&run);
    assert_eq!(run.status.code(), Some(1), "{text}");
    assert_eq!(text.matches("error:").count(), 1, "{text}");
    assert!(
        text.contains("is not the same folder on every rank"),
        "{text}"
    );
    assert!(
        text.contains(&format!("rank 1 on {}", host_name())),
        "names the rank and host: {text}"
    );
    assert!(text.contains("shared by every node"), "{text}");
    assert_eq!(names(&out0), Vec::<String>::new(), "nothing written");
    assert!(!out1.exists(), "rank 1 created nothing");
}

#[test]
fn a_shard_replaced_during_the_run_stops_publishing() {
    // ~300 MB of column-sharded tensors copied by one thread: long enough to
    // swap a shard (a byte-identical copy moved over it) while copying.
    let ckpt = tempfile::tempdir().unwrap();
    make_shards(
        ckpt.path(),
        &[
            "--layout", "tp", "--ranks", "4", "--files", "2", "--layers", "4", "--hidden", "1536",
            "--vocab", "16000",
        ],
    );
    let victim = ckpt
        .path()
        .join("shard-00002-model-00001-of-00002.safetensors");
    let twin = ckpt.path().join(".twin");
    std::fs::copy(&victim, &twin).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mapping = ckpt.path().join("mapping.json");
    let mut child = Command::new(BIN)
        .args(["-q", "--threads", "1", "--mapping", s(&mapping)])
        .args([s(ckpt.path()), s(out.path())])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !names(out.path())
        .iter()
        .any(|n| n.ends_with(".tmp") && n.starts_with(".model"))
    {
        assert!(Instant::now() < deadline, "the run never started copying");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended too soon to test"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    std::fs::rename(&twin, &victim).unwrap();
    let run = child.wait_with_output().unwrap();
    let text = stderr(&run);
    assert_eq!(run.status.code(), Some(1), "{text}");
    assert!(
        text.contains("changed during the run") && text.contains(s(&victim)),
        "{text}"
    );
    assert!(names(out.path()).is_empty(), "{:?}", names(out.path()));
}

// ---------------------------------------------------------------------------
// `--report` never replaces what the run reads or writes (issue 17, case 16).

/// An original-model folder for `--hf-assets`.
fn assets_folder(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"hidden_size": 16}"#).unwrap();
    std::fs::write(dir.join("tokenizer.json"), r#"{"model": {}}"#).unwrap();
}

/// Runs `args` on two ranks, which must be refused before any work with one
/// message holding every needle; every folder in `watched` keeps its files,
/// byte for byte.
fn report_refused(args: &[&str], watched: &[&Path], needles: &[&str]) {
    let before: Vec<_> = watched.iter().map(|dir| snapshot(dir)).collect();
    let run = consolidate(2, args);
    let text = stderr(&run);
    assert_eq!(run.status.code(), Some(1), "{args:?}\n{text}");
    assert_eq!(text.matches("error:").count(), 1, "{text}");
    assert!(text.contains("hint:"), "{text}");
    for needle in needles {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    for (dir, before) in watched.iter().zip(before) {
        assert_eq!(snapshot(dir), before, "{} changed", dir.display());
        assert!(
            !names(dir).iter().any(|n| n.ends_with(".tmp")),
            "{:?}",
            names(dir)
        );
    }
}

#[test]
fn a_report_over_a_copied_asset_of_a_complete_output_is_refused_and_the_output_kept() {
    let work = tempfile::tempdir().unwrap();
    let assets = work.path().join("orig");
    assets_folder(&assets);
    let out = work.path().join("out");
    let input = torch_fixture();
    let mapping = input.join("mapping.json");
    let base = ["--mapping", s(&mapping), "--hf-assets", s(&assets)];
    let mut args = base.to_vec();
    args.extend([s(&input), s(&out)]);
    consolidate_ok(2, &args);
    let report = out.join("config.json");
    let mut args = vec!["--overwrite", "--report", s(&report)];
    args.extend(base);
    args.extend([s(&input), s(&out)]);
    report_refused(
        &args,
        &[&out, &assets],
        &[
            &format!("--report {} would replace", s(&report)),
            "a --hf-assets file this run copies",
        ],
    );
    assert_matches_manifest(&out, &input.join("manifest.json"));
}

#[test]
fn a_report_over_a_copied_asset_of_a_fresh_output_publishes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let assets = work.path().join("orig");
    assets_folder(&assets);
    let out = work.path().join("out");
    let input = torch_fixture();
    let report = out.join("config.json");
    let args = [
        "--hf-assets",
        s(&assets),
        "--report",
        s(&report),
        s(&input),
        s(&out),
    ];
    report_refused(&args, &[&assets], &["config.json", "--hf-assets"]);
    assert_eq!(names(&out), Vec::<String>::new(), "nothing published");
}

#[test]
fn a_report_over_a_file_of_the_assets_folder_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let assets = work.path().join("orig");
    assets_folder(&assets);
    // Not copied (hidden), yet a file of the folder all the same.
    std::fs::write(assets.join(".gitattributes"), "x").unwrap();
    let out = work.path().join("out");
    let input = torch_fixture();
    for (name, what) in [
        ("config.json", "the --hf-assets file"),
        (".gitattributes", "of the --hf-assets folder"),
    ] {
        let report = assets.join(name);
        let args = [
            "--hf-assets",
            s(&assets),
            "--report",
            s(&report),
            s(&input),
            s(&out),
        ];
        report_refused(&args, &[&assets], &[s(&report), what]);
    }
}

#[test]
fn a_report_over_the_dcp_metadata_or_a_file_of_input_dir_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let ckpt = work.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dcp-v215-w2/checkpoint");
    for (path, bytes) in snapshot(&fixture) {
        std::fs::write(ckpt.join(path.file_name().unwrap()), bytes).unwrap();
    }
    std::fs::write(ckpt.join("notes.txt"), "the run's notes").unwrap();
    let out = work.path().join("out");
    for (name, what) in [
        (".metadata", "the checkpoint's"),
        ("__1_0.distcp", "the input file"),
        ("notes.txt", "the existing file"),
    ] {
        let report = ckpt.join(name);
        let args = ["--report", s(&report), s(&ckpt), s(&out)];
        report_refused(&args, &[&ckpt], &[s(&report), what]);
    }
    // OUTPUT_DIR = INPUT_DIR stays allowed, with a report of a new name.
    let report = ckpt.join("run.json");
    consolidate_ok(2, &["-q", "--report", s(&report), s(&ckpt), s(&ckpt)]);
    assert!(report.is_file());
}

#[test]
fn a_report_over_the_lock_or_another_run_file_is_refused_and_later_runs_work() {
    let out = tempfile::tempdir().unwrap();
    let input = torch_fixture();
    for name in [
        LOCK_NAME,
        INDEX,
        "model-00001-of-00001.safetensors",
        // A consolidated name of another set: removed after the new index.
        "model-00001-of-00003.safetensors",
        ".model-00001-of-00001.safetensors.st-consolidate.tmp",
    ] {
        let report = out.path().join(name);
        let args = ["--report", s(&report), s(&input), s(out.path())];
        report_refused(&args, &[out.path()], &[s(&report)]);
        assert_eq!(names(out.path()), Vec::<String>::new());
    }
    let report = out.path().join("run.json");
    consolidate_ok(2, &["--report", s(&report), s(&input), s(out.path())]);
    consolidate_ok(0, &["--overwrite", s(&input), s(out.path())]);
    assert!(!out.path().join(LOCK_NAME).exists());
}
