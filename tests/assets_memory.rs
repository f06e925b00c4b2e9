//! `--hf-assets` copies a large file streamed, in fixed memory: its own
//! test binary, so that no other run's peak memory is measured with it.

mod common;
use common::*;
use std::process::Command;

/// Peak resident memory (KiB) of running the consolidator with `args`
/// directly (no launcher), as the kernel counts it for a waited-for child:
/// Python's `resource` reads it without any unsafe code here.
fn peak_rss_kib(args: &[&str]) -> u64 {
    let script = "import resource, subprocess, sys\n\
                  subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n\
                  print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)";
    let out = Command::new("python3")
        .args(["-c", script, BIN])
        .args(args)
        .output()
        .expect("python3 runs (scripts/setup.sh installs it)");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{text}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn a_large_asset_is_copied_in_fixed_memory() {
    const ASSET: u64 = 256 << 20;
    let input = torch_fixture();
    let dir = tempfile::tempdir().unwrap();
    let assets = dir.path().join("orig");
    std::fs::create_dir(&assets).unwrap();
    std::fs::write(assets.join("config.json"), "{}").unwrap();
    // Sparse: no disk blocks for the source, but every byte is read.
    let large = std::fs::File::create(assets.join("tokenizer.model")).unwrap();
    large.set_len(ASSET).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&large, b"end", ASSET - 3).unwrap();
    drop(large);
    let out = dir.path().join("out");
    let peak = peak_rss_kib(&["-q", "--hf-assets", s(&assets), s(&input), s(&out)]);
    let copied = std::fs::metadata(out.join("tokenizer.model")).unwrap();
    assert_eq!(copied.len(), ASSET);
    let mut tail = [0u8; 3];
    let file = std::fs::File::open(out.join("tokenizer.model")).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut tail, ASSET - 3).unwrap();
    assert_eq!(&tail, b"end");
    // The whole file in memory would be 256 MiB; the run itself needs ~30 MB.
    assert!(peak < 100 * 1024, "peak RSS {peak} KiB for a 256 MiB asset");
}
