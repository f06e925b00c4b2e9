//! `--dtype` export end to end: every floating-point tensor converted,
//! everything else untouched, headers, sizes and the index following.
//! (The conversion itself is checked bit for bit against PyTorch in
//! src/convert.rs.)

mod common;
use common::*;
use st_consolidate_mpi::exec::convert::convert;
use st_consolidate_mpi::safetensors::dtype::Dtype;
use st_consolidate_mpi::safetensors::dtype::output_dtype;
use st_consolidate_mpi::safetensors::header::read_header;
use std::collections::BTreeMap;
use std::path::Path;

/// name -> (dtype, shape, bytes) of every tensor in a consolidated folder.
fn tensors(dir: &Path) -> BTreeMap<String, (Dtype, Vec<u64>, Vec<u8>)> {
    let mut all = BTreeMap::new();
    for name in names(dir).iter().filter(|n| n.ends_with(".safetensors")) {
        let path = dir.join(name);
        let header = read_header(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for t in header.tensors {
            let data = bytes
                [(header.data_start + t.begin) as usize..(header.data_start + t.end) as usize]
                .to_vec();
            all.insert(t.name, (t.dtype, t.shape, data));
        }
    }
    all
}

#[test]
fn floats_are_converted_and_everything_else_is_kept() {
    // The zoo has every dtype; 4 source ranks give column and mesh pieces.
    let ckpt = tempfile::tempdir().unwrap();
    make_shards(
        ckpt.path(),
        &["--layout", "zoo", "--ranks", "4", "--seed", "5"],
    );
    let mapping = ckpt.path().join("mapping.json");
    let plain = tempfile::tempdir().unwrap();
    consolidate_ok(
        2,
        &["--mapping", s(&mapping), s(ckpt.path()), s(plain.path())],
    );
    let source = tensors(plain.path());
    for (flag, target) in [
        ("bf16", Dtype::BF16),
        ("f16", Dtype::F16),
        ("f32", Dtype::F32),
        ("f64", Dtype::F64),
    ] {
        let out = tempfile::tempdir().unwrap();
        consolidate_ok(
            3,
            &[
                "--dtype",
                flag,
                "--verify",
                "--mapping",
                s(&mapping),
                s(ckpt.path()),
                s(out.path()),
            ],
        );
        // output_tensors checks the index, total_size and alignment.
        let _ = output_tensors(out.path());
        let got = tensors(out.path());
        assert_eq!(got.len(), source.len());
        for (name, (dtype, shape, bytes)) in &source {
            let want_dtype = output_dtype(*dtype, Some(target));
            let mut want =
                vec![0u8; bytes.len() / dtype.size() as usize * want_dtype.size() as usize];
            convert(*dtype, want_dtype, bytes, &mut want);
            let (got_dtype, got_shape, got_bytes) = &got[name];
            assert_eq!((got_dtype, got_shape), (&want_dtype, shape), "{name}");
            assert!(got_bytes == &want, "{name} --dtype {flag}");
            if !matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64) {
                assert_eq!(got_bytes, bytes, "{name} must be untouched");
            }
        }
        // --verify-only understands an exported output.
        consolidate_ok(2, &["--verify-only", s(ckpt.path()), s(out.path())]);
    }
}

#[test]
fn a_bf16_export_of_the_torch_fixture_halves_f32_and_f64() {
    let input = torch_fixture();
    let out = tempfile::tempdir().unwrap();
    consolidate_ok(
        2,
        &[
            "--dtype",
            "bf16",
            "--mapping",
            s(&input.join("mapping.json")),
            s(&input),
            s(out.path()),
        ],
    );
    let got = tensors(out.path());
    assert!(got.values().all(|(dtype, _, _)| *dtype == Dtype::BF16));
    let conv = &got["model.layers.0.conv.bias"]; // F64 [6, 5, 7, 9] in the shards
    assert_eq!(conv.2.len(), 6 * 5 * 7 * 9 * 2);
}

/// `--dtype-map` end to end on every dtype of the zoo: each tensor mapped to
/// a dtype chosen by its position, output dtypes and bytes as NeMo's rules
/// and PyTorch's casts give them, `--verify` and `--verify-only` passing,
/// `--resume` keeping every file, and the index's total_size following.
#[test]
fn a_dtype_map_sets_each_tensor_by_nemo_rules() {
    use st_consolidate_mpi::plan::dtypes::output_for;
    let ckpt = tempfile::tempdir().unwrap();
    make_shards(
        ckpt.path(),
        &["--layout", "zoo", "--ranks", "3", "--seed", "7"],
    );
    let mapping = ckpt.path().join("mapping.json");
    let plain = tempfile::tempdir().unwrap();
    consolidate_ok(
        1,
        &["--mapping", s(&mapping), s(ckpt.path()), s(plain.path())],
    );
    let source = tensors(plain.path());
    let choices = [
        Dtype::BF16,
        Dtype::F32,
        Dtype::F16,
        Dtype::F64,
        Dtype::F8_E4M3,
        Dtype::I8,
    ];
    let map: BTreeMap<String, Dtype> = source
        .keys()
        .enumerate()
        .map(|(i, name)| (name.clone(), choices[i % choices.len()]))
        .collect();
    let map_file = ckpt.path().join("dtypes.json");
    let json: BTreeMap<&str, &str> = map.iter().map(|(k, v)| (k.as_str(), v.name())).collect();
    std::fs::write(&map_file, serde_json::to_vec(&json).unwrap()).unwrap();
    for cast in [None, Some(("bf16", Dtype::BF16))] {
        let out = tempfile::tempdir().unwrap();
        let mut args = vec![
            "--verify",
            "--dtype-map",
            s(&map_file),
            "--mapping",
            s(&mapping),
        ];
        if let Some((flag, _)) = cast {
            args.extend(["--dtype", flag]);
        }
        args.extend([s(ckpt.path()), s(out.path())]);
        consolidate_ok(2, &args);
        let _ = output_tensors(out.path());
        let got = tensors(out.path());
        let mut changed = 0;
        for (name, (dtype, shape, bytes)) in &source {
            let (want_dtype, _) = output_for(*dtype, cast.map(|c| c.1), Some(map[name]));
            let mut want =
                vec![0u8; bytes.len() / dtype.size() as usize * want_dtype.size() as usize];
            convert(*dtype, want_dtype, bytes, &mut want);
            let (got_dtype, got_shape, got_bytes) = &got[name];
            assert_eq!((got_dtype, got_shape), (&want_dtype, shape), "{name}");
            assert!(got_bytes == &want, "{name}");
            changed += usize::from(want_dtype != *dtype);
        }
        assert!(
            changed >= 5,
            "the map must change several dtypes, changed {changed}"
        );
        consolidate_ok(2, &["--verify-only", s(ckpt.path()), s(out.path())]);
        let mut resume = args.clone();
        resume.insert(0, "--resume");
        let text = stderr(&consolidate_ok(2, &resume));
        assert!(text.contains("keeping 3 of 3 files"), "{text}");
    }
}

#[test]
fn a_dtype_map_value_that_is_no_dtype_is_refused_naming_the_tensor() {
    let ckpt = tempfile::tempdir().unwrap();
    make_shards(
        ckpt.path(),
        &["--layout", "zoo", "--ranks", "2", "--seed", "3"],
    );
    let map_file = ckpt.path().join("dtypes.json");
    std::fs::write(&map_file, br#"{"some.tensor": "bfloat16"}"#).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mapping = ckpt.path().join("mapping.json");
    let args = [
        "--dtype-map",
        s(&map_file),
        "--mapping",
        s(&mapping),
        s(ckpt.path()),
        s(out.path()),
    ];
    assert_fails(
        2,
        &args,
        ckpt.path(),
        out.path(),
        &[
            "tensor 'some.tensor' is mapped to 'bfloat16', which is not a safetensors dtype",
            "dtypes.json",
        ],
    );
}
