//! The scale simulation as a test: sparse checkpoints shaped like a 70B
//! Llama (headers plus holes), planned for 64 ranks. Timing and memory are
//! measured by scripts/scale.sh, not here.

mod common;
use common::*;

#[test]
fn a_70b_layout_balances_on_64_ranks() {
    for files in ["4", "30"] {
        let ckpt = tempfile::tempdir().unwrap();
        let args = [
            "--sparse",
            "--layout",
            "mixed",
            "--ranks",
            "64",
            "--files",
            files,
            "--layers",
            "80",
            "--hidden",
            "8192",
            "--intermediate",
            "28672",
            "--vocab",
            "128256",
        ];
        make_shards(ckpt.path(), &args);
        let mapping = ckpt.path().join("mapping.json");
        let dry = [
            "--dry-run",
            "--ranks",
            "64",
            "--mapping",
            s(&mapping),
            s(ckpt.path()),
            "unused",
        ];
        let run = consolidate_ok(0, &dry);
        let text = String::from_utf8_lossy(&run.stdout).into_owned();
        assert!(
            text.contains("159.90 GB from"),
            "a 160 GB checkpoint: {text}"
        );
        let (modulo, modulo_idle) = balance(&text, "modulo");
        let (balanced, balanced_idle) = balance(&text, "balanced");
        assert!(
            balanced <= 1.05,
            "{files} files: balanced max/mean {balanced}"
        );
        assert_eq!(balanced_idle, 0);
        assert_eq!(modulo_idle, 64 - files.parse::<usize>().unwrap());
        assert!(modulo > 3.0, "{files} files: modulo max/mean {modulo}");

        // Shared header reading on 4 real ranks gives the same plan.
        let mut shared = vec!["--headers", "shared"];
        shared.extend(dry);
        let run = consolidate_ok(4, &shared);
        assert_eq!(String::from_utf8_lossy(&run.stdout), text);
    }
}
