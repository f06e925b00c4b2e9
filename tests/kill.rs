//! A run killed part-way leaves nothing under a final name, and the next run
//! cleans up and succeeds.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Direct children of `pid`, from /proc.
fn children(pid: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: state, ppid, ...
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let ppid: u32 = after.split(' ').nth(1).unwrap().parse().unwrap();
        if ppid == pid {
            kids.push(child);
        }
    }
    kids
}

/// Whether `pid` is a process that has not exited (zombies have).
fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !matches!(
            stat[stat.rfind(')').unwrap() + 2..].chars().next(),
            Some('Z' | 'X')
        )
    })
}

fn finals(dir: &Path) -> Vec<String> {
    names(dir)
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect()
}

#[test]
fn a_killed_run_leaves_no_final_file_and_a_rerun_succeeds() {
    // About 1 GB of column-sharded tensors: a couple of seconds of copying.
    // Under both schedules: with `balanced`, both ranks write into each file.
    let ckpt = tempfile::tempdir().unwrap();
    let args = [
        "--layout", "tp", "--ranks", "8", "--files", "4", "--layers", "9", "--hidden", "2048",
        "--vocab", "32000",
    ];
    make_shards(ckpt.path(), &args);
    for schedule in ["modulo", "balanced"] {
        kill_and_rerun(ckpt.path(), schedule);
    }
}

fn kill_and_rerun(ckpt: &Path, schedule: &str) {
    let mapping = ckpt.join("mapping.json");
    let out = tempfile::tempdir().unwrap();
    let mut launcher = Command::new("mpirun")
        .args([
            "-n",
            "2",
            BIN,
            "-q",
            "--schedule",
            schedule,
            "--threads",
            "1",
            "--mapping",
            s(&mapping),
            s(ckpt),
            s(out.path()),
        ])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // Wait until copying has started: temporary files exist.
    let started = Instant::now();
    while !names(out.path()).iter().any(|n| n.ends_with(".tmp")) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the run never started writing"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let ranks = children(launcher.id());
    assert_eq!(ranks.len(), 2, "mpirun's children: {ranks:?}");
    // SIGKILL one rank, SIGTERM the launcher.
    Command::new("kill")
        .args(["-KILL", &ranks[1].to_string()])
        .status()
        .unwrap();
    Command::new("kill")
        .args(["-TERM", &launcher.id().to_string()])
        .status()
        .unwrap();
    let status = launcher.wait().unwrap();
    assert!(!status.success(), "the run must have been cut short");
    // Wait for the surviving rank to be gone: while it lives it rightly
    // holds OUTPUT_DIR, and a rerun would be refused.
    let started = Instant::now();
    while ranks.iter().any(|&pid| is_running(pid)) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a rank outlived its launcher"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        finals(out.path()),
        Vec::<String>::new(),
        "{schedule}: no final-named file or index"
    );

    // The rerun removes the stale temporaries and succeeds, verified.
    consolidate_ok(
        2,
        &[
            "--verify",
            "--schedule",
            schedule,
            "--mapping",
            s(&mapping),
            s(ckpt),
            s(out.path()),
        ],
    );
    assert!(
        !names(out.path()).iter().any(|n| n.starts_with('.')),
        "{:?}",
        names(out.path())
    );
    assert_matches_manifest(out.path(), &ckpt.join("manifest.json"));
}
