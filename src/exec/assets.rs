//! `--hf-assets DIR`: the files besides the weights that make OUTPUT_DIR
//! load as it is (config.json, tokenizer files, generation config, chat
//! template, custom code, README). Everything about them that can fail is
//! found before any weight is copied ([`plan_assets`]: the folder listed,
//! links resolved, every file opened, config.json converted, files already
//! in OUTPUT_DIR compared); at publish time they are copied like the
//! weights, streamed under a temporary name, synced, renamed before the
//! index appears.

use crate::error::{Error, Result};
use crate::exec::output::PendingFile;
use crate::safetensors::dtype::Dtype;
use serde_json::Value;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Endings of weight files, never copied: the output has its own. Besides
/// PyTorch's and safetensors' own, DCP's chunk archives and the other
/// formats Hugging Face folders hold weights in (TensorFlow, Flax, GGUF,
/// Lightning checkpoints, ONNX), and every index.
const WEIGHT_EXTENSIONS: [&str; 11] = [
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".distcp",
    ".h5",
    ".msgpack",
    ".gguf",
    ".ckpt",
    ".onnx",
    ".index.json",
];

/// Whether `name` in an assets folder is copied: not hidden (which also
/// leaves out DCP's `.metadata`), not weights, not an index.
pub fn is_asset(name: &str) -> bool {
    !name.starts_with('.') && !WEIGHT_EXTENSIONS.iter().any(|ext| name.ends_with(ext))
}

/// What to do with an asset whose name OUTPUT_DIR already holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExistingAssets {
    /// The default: refuse the run, as for the weights.
    Refuse,
    /// `--resume`: keep it if it holds exactly the bytes this run would
    /// write (an earlier run renamed it into place), refuse otherwise.
    KeepIfEqual,
    /// `--overwrite`: replace it.
    Replace,
}

/// One file of the assets folder, as it will be written into OUTPUT_DIR.
#[derive(Debug)]
struct Asset {
    name: String,
    source: PathBuf,
    /// `config.json` converted for `--dtype`; `None`: copied as it is.
    rewritten: Option<Vec<u8>>,
}

/// The assets of a run, checked on rank 0 before any weight is copied.
#[derive(Debug)]
pub struct AssetPlan {
    to_copy: Vec<Asset>,
    /// Names already in OUTPUT_DIR with the bytes this run would write
    /// (`--resume`): left as they are.
    pub kept: Vec<String>,
}

/// Rank 0, before anything is written: the assets `names` of `src` (as
/// [`asset_names`] listed them) for `out`, with `config.json` converted to
/// `dtype` if given. Fails naming the file if a file cannot be opened,
/// `config.json` cannot be converted, or (see [`ExistingAssets`]) OUTPUT_DIR
/// holds one of the names already.
pub fn plan_assets(
    src: &Path,
    names: &[String],
    out: &Path,
    dtype: Option<Dtype>,
    existing: ExistingAssets,
) -> Result<AssetPlan> {
    let mut plan = AssetPlan {
        to_copy: Vec::new(),
        kept: Vec::new(),
    };
    let mut refused = Vec::new();
    for name in names.iter().cloned() {
        let source = src.join(&name);
        File::open(&source).map_err(|e| Error::io("read", &source, e))?;
        let rewritten = match (dtype, name.as_str()) {
            (Some(dtype), "config.json") => Some(converted_config(&source, dtype)?),
            _ => None,
        };
        let asset = Asset {
            name,
            source,
            rewritten,
        };
        let target = out.join(&asset.name);
        if std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
            return Err(Error::usage(
                format!("{} exists and is not a regular file", target.display()),
                "move it out of OUTPUT_DIR; --hf-assets replaces only files",
            ));
        }
        if std::fs::symlink_metadata(&target).is_err() || existing == ExistingAssets::Replace {
            plan.to_copy.push(asset);
        } else if existing == ExistingAssets::KeepIfEqual && asset.is_written_at(&target)? {
            plan.kept.push(asset.name);
        } else {
            refused.push(asset.name);
        }
    }
    if refused.is_empty() {
        return Ok(plan);
    }
    let (what, hint) = match existing {
        ExistingAssets::KeepIfEqual => (
            "files --hf-assets would copy, with other contents",
            "pass --overwrite to replace them, or move them out of OUTPUT_DIR",
        ),
        _ => (
            "files --hf-assets would copy",
            "pass --overwrite to replace them, or choose another OUTPUT_DIR",
        ),
    };
    Err(Error::usage(
        format!(
            "OUTPUT_DIR {} already holds {} ({what})",
            out.display(),
            refused.join(", ")
        ),
        hint,
    ))
}

/// NeMo's consolidation inputs in its `.hf_metadata` folder: read as the
/// mapping and the dtype map, not files of the model.
const CONSOLIDATION_INPUTS: [&str; 2] = [
    "fqn_to_file_index_mapping.json",
    "fqn_to_dtype_mapping.json",
];

/// Training state that HF Trainer and DeepSpeed keep beside the model's
/// files in a checkpoint folder (`checkpoint-N/`): not part of the model.
/// (Their `.pt`, `.pth` and `.bin` files are weights' endings, left out
/// already.)
const TRAINING_STATE: [&str; 4] = [
    "latest",
    "trainer_state.json",
    "zero_to_fp32.py",
    "zero_to_torch.py",
];

/// The files of `dir` to copy, sorted, as paths relative to `dir` (`/`
/// between components): its regular files and links to them, and those of
/// its subfolders (sentence-transformers' `1_Pooling/`), whole. Hidden
/// entries, weights, NeMo's two mapping files, a training checkpoint's
/// own state ([`TRAINING_STATE`]) and the folders in `skip`
/// (INPUT_DIR and OUTPUT_DIR when they sit inside `dir`) are left out. A
/// dangling link, as a Hugging Face cache snapshot has after a partial
/// download, a link to a folder, or an entry that is neither a file nor a
/// folder (a FIFO would block the copy), is an error.
pub fn asset_names(dir: &Path, skip: &[PathBuf]) -> Result<Vec<String>> {
    let skip: Vec<PathBuf> = skip.iter().filter_map(|p| p.canonicalize().ok()).collect();
    let mut names = Vec::new();
    collect_assets(dir, "", &skip, &mut names)?;
    names.retain(|name| {
        !CONSOLIDATION_INPUTS.contains(&name.as_str()) && !TRAINING_STATE.contains(&name.as_str())
    });
    names.sort();
    Ok(names)
}

/// Adds the asset files under `dir` (at `prefix` within the assets folder).
fn collect_assets(
    dir: &Path,
    prefix: &str,
    skip: &[PathBuf],
    names: &mut Vec<String>,
) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("list --hf-assets", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list --hf-assets", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_asset(&name) {
            continue;
        }
        let path = entry.path();
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(dangling(&path));
            }
            Err(e) => return Err(Error::io("inspect", &path, e)),
        };
        let relative = format!("{prefix}{name}");
        if meta.is_file() {
            names.push(relative);
        } else if meta.is_dir() {
            let linked = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
            if linked {
                return Err(Error::usage(
                    format!("--hf-assets: {} is a link to a folder", path.display()),
                    "replace the link with the folder it points to, or move it out of the --hf-assets folder",
                ));
            }
            if path.canonicalize().is_ok_and(|p| skip.contains(&p)) {
                continue;
            }
            collect_assets(&path, &format!("{relative}/"), skip, names)?;
        } else {
            return Err(Error::usage(
                format!(
                    "--hf-assets: {} is not a regular file or a folder",
                    path.display()
                ),
                "move it out of the --hf-assets folder, or replace it with the file it stands for",
            ));
        }
    }
    Ok(())
}

/// The error for a link in the assets folder whose target does not exist.
fn dangling(link: &Path) -> Error {
    let target = std::fs::read_link(link)
        .map(|t| t.display().to_string())
        .unwrap_or_else(|_| "?".into());
    Error::usage(
        format!(
            "--hf-assets: {} is a link to {target}, which does not exist",
            link.display()
        ),
        "download the missing file again (a Hugging Face cache snapshot links to blobs/), or remove the link",
    )
}

/// `config.json` at `path` with its dtype fields set to `dtype`.
fn converted_config(path: &Path, dtype: Dtype) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    with_dtype(&bytes, dtype).map_err(|reason| Error::Mapping {
        path: path.to_owned(),
        reason,
        hint: "fix config.json in the --hf-assets folder, or leave out --dtype",
    })
}

impl Asset {
    /// Whether `target` is a regular file (not a link) holding exactly the
    /// bytes this asset writes, compared in fixed memory.
    fn is_written_at(&self, target: &Path) -> Result<bool> {
        if !std::fs::symlink_metadata(target).is_ok_and(|m| m.is_file()) {
            return Ok(false);
        }
        let open = |path: &Path| File::open(path).map_err(|e| Error::io("read", path, e));
        let existing = open(target)?;
        match &self.rewritten {
            Some(bytes) => same_bytes(existing, target, bytes.as_slice(), &self.source),
            None => same_bytes(existing, target, open(&self.source)?, &self.source),
        }
    }

    /// Writes the asset into `out` under its temporary name, synced:
    /// streamed (the kernel's copy where it can) in fixed memory, so a
    /// large file never sits in memory whole.
    fn stage(&self, out: &Path) -> Result<PendingFile> {
        // A file of a subfolder is written in that subfolder of OUTPUT_DIR,
        // under its own temporary name there.
        let target = out.join(&self.name);
        let (dir, file_name) = match (target.parent(), target.file_name()) {
            (Some(dir), Some(name)) => (dir.to_path_buf(), name.to_os_string()),
            _ => {
                return Err(Error::internal(format!(
                    "asset '{}' has no file name",
                    self.name
                )));
            }
        };
        if dir != out {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        }
        if let Some(bytes) = &self.rewritten {
            return PendingFile::with_contents(&dir, &file_name, bytes);
        }
        let pending = PendingFile::create(&dir, &file_name, 0)?;
        let mut source =
            File::open(&self.source).map_err(|e| Error::io("read", &self.source, e))?;
        std::io::copy(&mut source, &mut pending.file())
            .map_err(|e| Error::io("write a copy of", &self.source, e))?;
        pending.sync()?;
        Ok(pending)
    }
}

/// Whether two readers hold the same bytes, read in blocks.
fn same_bytes(mut a: impl Read, a_path: &Path, mut b: impl Read, b_path: &Path) -> Result<bool> {
    const BLOCK: usize = 64 * 1024;
    let (mut x, mut y) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    loop {
        let n = fill(&mut a, &mut x).map_err(|e| Error::io("read", a_path, e))?;
        let m = fill(&mut b, &mut y).map_err(|e| Error::io("read", b_path, e))?;
        if x[..n] != y[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

/// Reads until `buf` is full or the reader ends; the bytes read.
fn fill(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

impl AssetPlan {
    /// The line saying which assets `--resume` left as they are in `out`.
    pub fn kept_summary(&self, out: &Path) -> String {
        format!(
            "resume: keeping {} asset(s) already in {} with the same bytes: {}",
            self.kept.len(),
            out.display(),
            crate::error::shown(&self.kept.join(", "))
        )
    }

    /// Rank 0, at publish time: every asset not kept, written into `out`
    /// under its temporary name and synced, with its name.
    pub fn stage(&self, out: &Path) -> Result<Vec<(String, PendingFile)>> {
        self.to_copy
            .iter()
            .map(|asset| Ok((asset.name.clone(), asset.stage(out)?)))
            .collect()
    }
}

/// transformers' name of a dtype, as config.json spells it.
fn torch_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        Dtype::F64 => "float64",
        _ => "float32",
    }
}

/// `config` with its dtype set: `dtype` (current transformers) and
/// `torch_dtype` (older configs) wherever present at the top level, `dtype`
/// if neither is; and every `dtype`/`torch_dtype` string (or null) of the
/// nested configs (a multimodal model's `text_config`, `vision_config`).
/// The JSON is rewritten pretty-printed; key order may change.
pub fn with_dtype(config: &[u8], dtype: Dtype) -> std::result::Result<Vec<u8>, String> {
    let mut value: Value =
        serde_json::from_slice(config).map_err(|e| format!("not valid JSON: {e}"))?;
    let Some(object) = value.as_object_mut() else {
        return Err("not a JSON object".into());
    };
    let name = Value::from(torch_name(dtype));
    let mut set = false;
    for key in DTYPE_KEYS {
        if let Some(slot) = object.get_mut(key) {
            *slot = name.clone();
            set = true;
        }
    }
    if !set {
        object.insert("dtype".into(), name.clone());
    }
    for (key, nested) in object.iter_mut() {
        if !DTYPE_KEYS.contains(&key.as_str()) {
            set_nested_dtypes(nested, &name);
        }
    }
    let mut text = serde_json::to_vec_pretty(&value).map_err(|e| e.to_string())?;
    text.push(b'\n');
    Ok(text)
}

/// The names config.json gives its dtype, current and older.
const DTYPE_KEYS: [&str; 2] = ["dtype", "torch_dtype"];

/// Sets every dtype field inside `value` (at any depth) that holds a
/// string or null to `name`; other values under those keys are left alone.
fn set_nested_dtypes(value: &mut Value, name: &Value) {
    match value {
        Value::Object(object) => {
            for (key, nested) in object.iter_mut() {
                let is_dtype = DTYPE_KEYS.contains(&key.as_str());
                if is_dtype && (nested.is_string() || nested.is_null()) {
                    *nested = name.clone();
                } else {
                    set_nested_dtypes(nested, name);
                }
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|item| set_nested_dtypes(item, name)),
        _ => {}
    }
}

/// Whether `dir/config.json` ties the output embeddings to the input ones
/// (`tie_word_embeddings: true`): then no `lm_head.weight` is expected.
pub fn ties_word_embeddings(dir: &Path) -> bool {
    std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .and_then(|config| config.get("tie_word_embeddings")?.as_bool())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The assets of `src` listed and planned, as a run does.
    fn plan_all(
        src: &Path,
        out: &Path,
        dtype: Option<Dtype>,
        existing: ExistingAssets,
    ) -> Result<AssetPlan> {
        plan_assets(src, &asset_names(src, &[])?, out, dtype, existing)
    }

    #[test]
    fn weights_indices_and_hidden_files_are_not_assets() {
        for name in [
            "config.json",
            "tokenizer.json",
            "tokenizer.model",
            "merges.txt",
            "x.py",
        ] {
            assert!(is_asset(name), "{name}");
        }
        for name in [
            "model.safetensors",
            "pytorch_model.bin",
            "a.pt",
            "a.pth",
            "model.safetensors.index.json",
            "pytorch_model.bin.index.json",
            ".cache",
            ".metadata",
            "__0_0.distcp",
            "tf_model.h5",
            "flax_model.msgpack",
            "model-q4.gguf",
            "last.ckpt",
            "model.onnx",
        ] {
            assert!(!is_asset(name), "{name}");
        }
    }

    #[test]
    fn the_dtype_field_present_is_updated_or_dtype_added() {
        let get = |text: &str, dtype| -> Value {
            serde_json::from_slice(&with_dtype(text.as_bytes(), dtype).unwrap()).unwrap()
        };
        let got = get(r#"{"dtype": "float32", "hidden_size": 8}"#, Dtype::BF16);
        assert_eq!(
            got,
            serde_json::json!({"dtype": "bfloat16", "hidden_size": 8})
        );
        let got = get(r#"{"torch_dtype": "float32"}"#, Dtype::F16);
        assert_eq!(got, serde_json::json!({"torch_dtype": "float16"}));
        let got = get(r#"{"a": [1, {"b": null}]}"#, Dtype::F32);
        assert_eq!(
            got,
            serde_json::json!({"a": [1, {"b": null}], "dtype": "float32"})
        );
        let nested = r#"{"torch_dtype": "float32", "text_config": {"torch_dtype": "float32",
            "layers": [{"dtype": null}]}, "vision_config": {"dtype": "float32",
            "quantization": {"dtype": {"bits": 4}}}}"#;
        assert_eq!(
            get(nested, Dtype::BF16),
            serde_json::json!({"torch_dtype": "bfloat16",
                "text_config": {"torch_dtype": "bfloat16", "layers": [{"dtype": "bfloat16"}]},
                "vision_config": {"dtype": "bfloat16", "quantization": {"dtype": {"bits": 4}}}})
        );
        assert!(
            with_dtype(b"[1]", Dtype::F32)
                .unwrap_err()
                .contains("not a JSON object")
        );
        assert!(
            with_dtype(b"{", Dtype::F32)
                .unwrap_err()
                .contains("not valid JSON")
        );
    }

    #[test]
    fn existing_assets_are_refused_kept_when_equal_or_replaced() {
        let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::write(src.path().join("config.json"), r#"{"dtype": "float32"}"#).unwrap();
        std::fs::write(src.path().join("README.md"), "# model").unwrap();
        let plan = |existing| plan_all(src.path(), out.path(), Some(Dtype::BF16), existing);
        assert_eq!(plan(ExistingAssets::Refuse).unwrap().to_copy.len(), 2);
        // What this run writes: config.json converted, README.md as it is.
        let converted = with_dtype(br#"{"dtype": "float32"}"#, Dtype::BF16).unwrap();
        std::fs::write(out.path().join("config.json"), &converted).unwrap();
        std::fs::write(out.path().join("README.md"), "# model").unwrap();
        let err = plan(ExistingAssets::Refuse).unwrap_err().to_string();
        assert!(
            err.contains("already holds README.md, config.json"),
            "{err}"
        );
        let kept = plan(ExistingAssets::KeepIfEqual).unwrap();
        assert_eq!((kept.kept.len(), kept.to_copy.len()), (2, 0));
        std::fs::write(out.path().join("README.md"), "# mine").unwrap();
        let err = plan(ExistingAssets::KeepIfEqual).unwrap_err().to_string();
        assert!(
            err.contains("README.md (files --hf-assets would copy, with other"),
            "{err}"
        );
        assert!(!err.contains("config.json"), "{err}");
        assert_eq!(plan(ExistingAssets::Replace).unwrap().to_copy.len(), 2);
        std::fs::remove_file(out.path().join("README.md")).unwrap();
        std::fs::create_dir(out.path().join("README.md")).unwrap();
        let err = plan(ExistingAssets::Replace).unwrap_err().to_string();
        assert!(err.contains("is not a regular file"), "{err}");
    }

    #[test]
    fn dangling_links_and_fifos_are_errors_and_folders_are_skipped() {
        let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::create_dir(src.path().join("checkpoint")).unwrap();
        std::fs::write(src.path().join("real.json"), "{}").unwrap();
        std::os::unix::fs::symlink("real.json", src.path().join("linked.json")).unwrap();
        let plan = || plan_all(src.path(), out.path(), None, ExistingAssets::Refuse);
        let names: Vec<String> = plan()
            .unwrap()
            .to_copy
            .into_iter()
            .map(|a| a.name)
            .collect();
        assert_eq!(names, ["linked.json", "real.json"]);
        std::os::unix::fs::symlink("../blobs/x", src.path().join("tokenizer.json")).unwrap();
        let err = plan().unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json is a link to ../blobs/x"),
            "{err}"
        );
        std::fs::remove_file(src.path().join("tokenizer.json")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            src.path().join("pipe"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
            0,
        )
        .unwrap();
        let err = plan().unwrap_err().to_string();
        assert!(
            err.contains("pipe is not a regular file or a folder"),
            "{err}"
        );
        let err = plan_all(
            &src.path().join("gone"),
            out.path(),
            None,
            ExistingAssets::Refuse,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("cannot list --hf-assets") && err.contains("gone"),
            "{err}"
        );
    }

    #[test]
    fn a_staged_asset_holds_the_source_bytes() {
        let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(src.path().join("tokenizer.model"), &bytes).unwrap();
        let plan = plan_all(src.path(), out.path(), None, ExistingAssets::Refuse).unwrap();
        for (_, file) in plan.stage(out.path()).unwrap() {
            file.commit().unwrap();
        }
        assert_eq!(
            std::fs::read(out.path().join("tokenizer.model")).unwrap(),
            bytes
        );
        let again = plan_all(src.path(), out.path(), None, ExistingAssets::KeepIfEqual).unwrap();
        assert_eq!(again.kept, ["tokenizer.model"]);
    }
}
