//! Helpers for the integration tests: running the real binaries (under
//! mpirun when asked) and checking outputs byte for byte.
#![allow(dead_code)]

mod library;
#[allow(unused_imports)] // not every test binary uses the library helpers
pub use library::*;

use sha2::{Digest, Sha256};
use st_consolidate_mpi::safetensors::header::read_header;
use st_synth::hex;
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_st-consolidate-mpi");

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// (max/mean, idle ranks) of a schedule's row in --dry-run output.
pub fn balance(text: &str, schedule: &str) -> (f64, usize) {
    let row: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with(schedule))
        .unwrap()
        .split_whitespace()
        .collect();
    (row[1].parse().unwrap(), row[4].parse().unwrap())
}

/// The PyTorch-written fixture, copied from shared/fixtures.
pub fn torch_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch-dcp-w2")
}

/// Runs the consolidator with `ranks` MPI ranks (0 = no launcher at all).
pub fn consolidate(ranks: usize, args: &[&str]) -> Output {
    let mut command = if ranks == 0 {
        Command::new(BIN)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["--oversubscribe", "-n", &ranks.to_string(), BIN]);
        c
    };
    command
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("mpirun runs (scripts/setup.sh installs OpenMPI)")
}

/// Runs like [`consolidate`], and also returns each rank's exit code, in
/// rank order (`None`: the rank left no code). Under mpirun each rank runs
/// in a shell that writes its exit code to a file of its own, and mpirun
/// is told to wait for every rank instead of killing the others at the
/// first non-zero exit (it then exits 0 itself, so only these codes tell).
/// `timeout` turns a rank that never ends into exit code 124, a failure
/// the caller sees, instead of a test that waits for ever; it is no
/// assertion on speed.
pub fn consolidate_each_rank(ranks: usize, args: &[&str]) -> (Output, Vec<Option<i32>>) {
    if ranks == 0 {
        let out = consolidate(0, args);
        let code = out.status.code();
        return (out, vec![code]);
    }
    let codes = tempfile::tempdir().unwrap();
    let out = Command::new("mpirun")
        .args(["--oversubscribe", "-n", &ranks.to_string()])
        .args(["sh", "-c", RECORD_EXIT_CODE, BIN])
        .args(args)
        .env("ST_TEST_EXIT_CODES", codes.path())
        .env("OMPI_MCA_orte_abort_on_non_zero_status", "0")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("mpirun runs (scripts/setup.sh installs OpenMPI)");
    let codes = (0..ranks)
        .map(|rank| {
            std::fs::read_to_string(codes.path().join(format!("rank-{rank}")))
                .ok()
                .and_then(|code| code.trim().parse().ok())
        })
        .collect();
    (out, codes)
}

/// The shell run as each rank by [`consolidate_each_rank`]: `$0` is the
/// binary, `$@` its arguments.
const RECORD_EXIT_CODE: &str = r#"timeout -k 10 600 "$0" "$@"; code=$?
echo "$code" > "$ST_TEST_EXIT_CODES/rank-$OMPI_COMM_WORLD_RANK"; exit "$code""#;

/// Like [`consolidate`], but the run must succeed.
pub fn consolidate_ok(ranks: usize, args: &[&str]) -> Output {
    let out = consolidate(ranks, args);
    assert!(
        out.status.success(),
        "run failed: {args:?}\n{}",
        stderr(&out)
    );
    out
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes a synthetic checkpoint with `st-make-shards`'s command line, in
/// this process.
pub fn make_shards(dir: &Path, args: &[&str]) {
    let mut argv = vec!["st-make-shards", dir.to_str().unwrap()];
    argv.extend_from_slice(args);
    assert_eq!(
        st_synth::cli::main_with(argv),
        std::process::ExitCode::SUCCESS,
        "st-make-shards {args:?}"
    );
}

/// sha256 of every tensor in a consolidated folder, via its index; also
/// checks the index agrees with the files' headers and total_size.
pub fn output_tensors(dir: &Path) -> BTreeMap<String, (Vec<u64>, String, String)> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let weight_map = index["weight_map"].as_object().unwrap();
    let mut files: Vec<&str> = weight_map.values().map(|v| v.as_str().unwrap()).collect();
    files.sort();
    files.dedup();
    let mut tensors = BTreeMap::new();
    let mut total = 0;
    for name in files {
        let path = dir.join(name);
        let header = read_header(&path).unwrap();
        assert_eq!(
            header.metadata.get("format").map(String::as_str),
            Some("pt")
        );
        assert_eq!(header.data_start % 8, 0, "{name}: header not padded");
        let mut file = std::fs::File::open(&path).unwrap();
        for t in header.tensors {
            assert_eq!(weight_map[&t.name].as_str(), Some(name), "{}", t.name);
            assert_eq!(
                (header.data_start + t.begin) % t.dtype.size(),
                0,
                "{} misaligned",
                t.name
            );
            let mut bytes = vec![0u8; (t.end - t.begin) as usize];
            file.seek(SeekFrom::Start(header.data_start + t.begin))
                .unwrap();
            file.read_exact(&mut bytes).unwrap();
            total += bytes.len() as u64;
            let digest = hex(&Sha256::digest(&bytes));
            tensors.insert(t.name, (t.shape, t.dtype.name().to_string(), digest));
        }
    }
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));
    assert_eq!(tensors.len(), weight_map.len());
    tensors
}

/// Asserts a consolidated folder reproduces every tensor of a manifest.
pub fn assert_matches_manifest(out_dir: &Path, manifest: &Path) {
    let manifest: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
    let got = output_tensors(out_dir);
    let names: Vec<&String> = got.keys().collect();
    assert_eq!(names, manifest.keys().collect::<Vec<_>>());
    for (name, expected) in &manifest {
        let shape: Vec<u64> = serde_json::from_value(expected["shape"].clone()).unwrap();
        let want = (
            shape,
            expected["dtype"].as_str().unwrap().to_string(),
            expected["sha256"].as_str().unwrap().to_string(),
        );
        assert_eq!(got[name], want, "tensor {name}");
    }
}

/// Every file in `dir` with its bytes, to prove inputs are left untouched.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            files.insert(path.clone(), std::fs::read(&path).unwrap());
        }
    }
    files
}

/// Names of the files in `dir`, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => vec![],
    };
    names.sort();
    names
}

/// A writable copy of the PyTorch fixture's shards and mapping.
pub fn copy_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, bytes) in snapshot(&torch_fixture()) {
        std::fs::write(dir.path().join(path.file_name().unwrap()), bytes).unwrap();
    }
    std::fs::remove_file(dir.path().join("manifest.json")).unwrap();
    dir
}

/// Rewrites the JSON header of a safetensors file with `edit`.
pub fn edit_header(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

/// Edits the decoded DCP_SHARDING_INFO of a shard file.
pub fn edit_sharding_info(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    edit_header(path, |header| {
        let text = header["__metadata__"]["DCP_SHARDING_INFO"]
            .as_str()
            .unwrap();
        let mut info: serde_json::Value = serde_json::from_str(text).unwrap();
        edit(&mut info);
        header["__metadata__"]["DCP_SHARDING_INFO"] = serde_json::Value::String(info.to_string());
    });
}

/// Asserts a run failed cleanly: exit code 1 on every rank, one error
/// message that contains every `needle`, no final-named output, untouched
/// inputs.
pub fn assert_fails(
    ranks: usize,
    args: &[&str],
    input: &Path,
    output: &Path,
    needles: &[&str],
) -> String {
    let before = snapshot(input);
    let (out, codes) = consolidate_each_rank(ranks, args);
    let text = stderr(&out);
    assert_eq!(
        codes,
        vec![Some(1); ranks.max(1)],
        "every rank must exit 1 (rank order): {args:?}\n{text}"
    );
    for needle in needles {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert_eq!(
        text.matches("error:").count(),
        1,
        "one message, not one per rank:\n{text}"
    );
    assert!(text.contains("hint:"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    let finals: Vec<String> = names(output)
        .into_iter()
        .filter(|n| n.starts_with("model"))
        .collect();
    assert!(
        finals.is_empty() || input == output,
        "final-named outputs left: {finals:?}"
    );
    assert!(
        !names(output).iter().any(|n| n.ends_with(".tmp")),
        "temporary files left"
    );
    assert_eq!(snapshot(input), before, "inputs must be untouched");
    text
}

/// A small tmpfs, unmounted on drop (mounting needs root, as CI has).
pub struct SmallDisk(pub tempfile::TempDir);

impl SmallDisk {
    pub fn new(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "this test mounts a small tmpfs and needs root"
        );
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

/// Starts `mpirun -n 2 st-consolidate-mpi -q ARGS` writing into `out`, and
/// once copying has begun (a model file's temporary holds tensor bytes: see
/// [`copying_has_begun`]) SIGKILLs one rank and SIGTERMs the launcher;
/// returns once every rank has exited (a rank still alive rightly holds
/// OUTPUT_DIR, so a rerun must wait for it). Panics if the run ends before
/// copying was seen: the kill would not have cut a copy short.
pub fn kill_mid_copy(args: &[&str], out: &Path) {
    let mut launcher = Command::new("mpirun")
        .args(["-n", "2", BIN, "-q"])
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !copying_has_begun(out) {
        if let Some(status) = launcher.try_wait().unwrap() {
            panic!("the run ended ({status}) before any tensor bytes were copied");
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the run never started copying"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let ranks = children(launcher.id());
    assert_eq!(ranks.len(), 2, "mpirun's children: {ranks:?}");
    for (signal, pid) in [("-KILL", ranks[1]), ("-TERM", launcher.id())] {
        Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
    }
    assert!(
        !launcher.wait().unwrap().success(),
        "the run must have been cut short"
    );
    let started = std::time::Instant::now();
    while ranks.iter().any(|&pid| is_running(pid)) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "a rank outlived its launcher"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether a model output's temporary in `dir`
/// (`.model-*.st-consolidate.tmp`, not the write probe or a staged lock,
/// index or report) holds tensor bytes. Such a file is created at its full
/// length and zero-filled, with its header at the start; a non-zero byte
/// after the header is a copied one (synthetic tensors are pseudo-random,
/// never long runs of zeros).
pub fn copying_has_begun(dir: &Path) -> bool {
    names(dir)
        .iter()
        .filter(|n| n.starts_with(".model-") && n.ends_with(".st-consolidate.tmp"))
        .any(|n| has_tensor_bytes(&dir.join(n)))
}

/// Whether the data section of the safetensors file at `path` (being
/// written) holds a non-zero byte. False while its header is not written.
fn has_tensor_bytes(path: &Path) -> bool {
    let Ok(mut file) = std::fs::File::open(path) else {
        return false; // renamed or removed meanwhile
    };
    let mut len = [0u8; 8];
    if file.read_exact(&mut len).is_err() {
        return false;
    }
    let header_len = u64::from_le_bytes(len);
    if header_len == 0 || file.seek(SeekFrom::Start(8 + header_len)).is_err() {
        return false;
    }
    // Compared a block at a time: slice equality is a memcmp.
    let zeros = vec![0u8; 1 << 20];
    let mut block = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut block) {
            Ok(0) | Err(_) => return false,
            Ok(n) if block[..n] != zeros[..n] => return true,
            Ok(_) => {}
        }
    }
}

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
