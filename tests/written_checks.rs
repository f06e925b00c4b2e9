//! What is checked about the files a rank wrote before they are published:
//! `--verify` reads exactly the files that were created, and
//! `check_written_once` checks what the ranks created and what is on disk,
//! not what the plan says they should have done.

mod common;
use common::*;
use st_consolidate_mpi::exec::cancel::Cancel;
use st_consolidate_mpi::exec::output::temp_name;
use st_consolidate_mpi::exec::publish::check_written_once;
use st_consolidate_mpi::exec::verify::{compare, written_targets};
use st_consolidate_mpi::exec::write::{copy_and_sync, create_files};
use st_consolidate_mpi::plan::Plan;
use st_consolidate_mpi::report::RankReport;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::AtomicU64;

/// The fixture's two-file plan for one rank.
fn fixture_plan() -> Plan {
    let plan = plan_for(&torch_fixture(), None);
    assert_eq!(plan.files.len(), 2);
    plan
}

/// What rank `rank` reports it created.
fn created_by(rank: usize, files: &[u32]) -> RankReport {
    RankReport {
        rank,
        host: String::new(),
        files: files.to_vec(),
        bytes: 0,
        seconds: 0.0,
        threads: 1,
        header_files_read: 0,
        chunks_located: 0,
        archive_bytes_read: 0,
        identity_bytes_read: 0,
    }
}

#[test]
fn verify_reads_each_created_file_with_its_own_layout() {
    let plan = fixture_plan();
    let out = tempfile::tempdir().unwrap();
    let mut created = create_files(out.path(), &plan, 0).unwrap();
    copy_and_sync(
        out.path(),
        &plan,
        0,
        &created,
        &AtomicU64::new(0),
        &Cancel::default(),
    )
    .unwrap();
    // A planned file that was not created (as one kept by --resume is not):
    // the targets are the created files, not the planned ones zipped
    // against the created ones' paths.
    drop(created.remove(&0));
    let targets = written_targets(&plan, &created);
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0].name, plan.files[1].name);
    assert_eq!(targets[0].path, created[&1].temp_path());
    assert_eq!(compare(&plan, &targets).unwrap(), Vec::<String>::new());
}

/// A one-rank plan's files created and written in `dir`, and rank 0's
/// report of them.
fn written(plan: &Plan, dir: &Path) -> Vec<RankReport> {
    let created = create_files(dir, plan, 0).unwrap();
    copy_and_sync(
        dir,
        plan,
        0,
        &created,
        &AtomicU64::new(0),
        &Cancel::default(),
    )
    .unwrap();
    let indices: Vec<u32> = created.keys().map(|&f| plan.files[f].index).collect();
    // Leave the temporaries in place, as they are until the renames.
    created.into_values().for_each(std::mem::forget);
    vec![created_by(0, &indices)]
}

#[test]
fn check_written_once_checks_the_reports_against_the_plan() {
    let plan = fixture_plan();
    let out = tempfile::tempdir().unwrap();
    let reports = written(&plan, out.path());
    check_written_once(&plan, &reports, out.path()).unwrap();
    let (one, two) = (plan.files[0].index, plan.files[1].index);
    for (reports, needle) in [
        (vec![created_by(0, &[one])], "created by 0 rank(s)"),
        (
            vec![created_by(0, &[one, two]), created_by(1, &[two])],
            "created by 2 rank(s) [0, 1]",
        ),
        (vec![created_by(0, &[one, two, 7])], "created output 7"),
    ] {
        let err = check_written_once(&plan, &reports, out.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{needle:?} in {err}");
        assert!(err.contains("hint:"), "{err}");
    }
}

/// Something done to a written temporary behind the run's back.
type Damage = fn(&Path);

#[test]
fn check_written_once_checks_the_files_on_disk() {
    let plan = fixture_plan();
    let name = &plan.files[1].name;
    let cases: [(&str, Damage); 3] = [
        ("cannot find the written", |p| {
            std::fs::remove_file(p).unwrap()
        }),
        ("bytes, not", |p| {
            let len = std::fs::metadata(p).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .unwrap()
                .set_len(len - 1)
                .unwrap();
        }),
        ("does not begin with its planned header", |p| {
            let file = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            file.write_all_at(b"{", 9).unwrap();
        }),
    ];
    for (needle, damage) in cases {
        let out = tempfile::tempdir().unwrap();
        let reports = written(&plan, out.path());
        let temp = out.path().join(temp_name(name));
        damage(&temp);
        let err = check_written_once(&plan, &reports, out.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(needle) && err.contains(temp_name(name).to_string_lossy().as_ref()),
            "{needle:?} in {err}"
        );
    }
}

#[test]
fn a_cancelled_copy_stops_before_writing_a_byte() {
    use st_consolidate_mpi::safetensors::dtype::Dtype;
    // Without a cast (runs copied as they are) and with one (gathered and
    // converted window by window): both look at the flag first.
    for dtype in [None, Some(Dtype::F64)] {
        let plan = plan_for(&torch_fixture(), dtype);
        let out = tempfile::tempdir().unwrap();
        let created = create_files(out.path(), &plan, 0).unwrap();
        let (copied, cancel) = (AtomicU64::new(0), Cancel::default());
        cancel.cancel();
        let err = copy_and_sync(out.path(), &plan, 0, &created, &copied, &cancel).unwrap_err();
        assert!(
            matches!(err, st_consolidate_mpi::Error::Cancelled(_)),
            "{dtype:?}: {err}"
        );
        assert_eq!(copied.into_inner(), 0, "{dtype:?}");
    }
}
