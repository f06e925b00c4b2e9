//! The input fingerprint every output header records in its `__metadata__`,
//! so that `--resume` keeps a file only if it was written from these same
//! inputs (a checkpoint of the step before has the same shapes, hence the
//! same header otherwise).
//!
//! It is built from content only: each input's path relative to INPUT_DIR,
//! its size and its content signature (the one the ranks compare, see
//! [`content_signature`]), and a SHA-256 of a DCP checkpoint's whole
//! `.metadata`. Never inode, device or modification time: the same inputs
//! copied elsewhere must still give byte-identical outputs.
//!
//! Computing it takes the inputs' sizes and signatures as the ranks signed
//! them (each input by one rank per view of INPUT_DIR, see
//! [`crate::checkpoint::identity::Inputs::sign_share`]) and reads
//! `.metadata` whole; the rest of the plan stays pure, taking the result as
//! a string.

#[cfg(test)]
use crate::checkpoint::identity::content_signature;
use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// The `__metadata__` key under which the fingerprint is recorded.
pub const FINGERPRINT_KEY: &str = "st_consolidate_input";

/// One input as signed: its path, its size and its content signature
/// ([`crate::checkpoint::identity::content_signature`]).
pub type Signed<'a> = (&'a Path, u64, &'a str);

/// The fingerprint of `files` (the inputs pieces live in, in plan order,
/// with their sizes and content signatures) under `input_dir`, with the DCP
/// `metadata_file` if there is one: `sha256:` and 64 hex digits.
pub fn input_fingerprint(
    input_dir: &Path,
    files: &[Signed],
    metadata_file: Option<&Path>,
) -> Result<String> {
    let mut hash = Sha256::new();
    for &(path, size, signature) in files {
        hash.update(relative_name(input_dir, path));
        hash.update([0]);
        hash.update(size.to_le_bytes());
        hash.update(signature.as_bytes());
    }
    if let Some(path) = metadata_file {
        // Streamed: a large run's .metadata is tens of MB, not worth holding.
        let mut digest = Sha256::new();
        let mut file = std::fs::File::open(path).map_err(|e| Error::io("read", path, e))?;
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            match std::io::Read::read(&mut file, &mut buffer) {
                Ok(0) => break,
                Ok(n) => digest.update(&buffer[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("read", path, e)),
            }
        }
        hash.update(b"\0.metadata\0");
        hash.update(digest.finalize());
    }
    Ok(format!("sha256:{}", hex(&hash.finalize())))
}

/// `path` relative to `input_dir` (inputs are listed as `input_dir/name`,
/// or `input_dir/sharded/name`), as bytes; the file name if it is not
/// under it.
fn relative_name(input_dir: &Path, path: &Path) -> Vec<u8> {
    let relative = path
        .strip_prefix(input_dir)
        .ok()
        .or_else(|| path.file_name().map(Path::new))
        .unwrap_or(path);
    relative.as_os_str().as_encoded_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `__metadata__` of an output header: `"format": "pt"` as safetensors
/// writes it, and the input fingerprint if there is one (plans built
/// without reading the inputs, and files of older versions, have none).
pub fn header_metadata(fingerprint: Option<&str>) -> BTreeMap<String, String> {
    let mut metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    if let Some(fingerprint) = fingerprint {
        metadata.insert(FINGERPRINT_KEY.to_string(), fingerprint.to_string());
    }
    metadata
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// `input_fingerprint` of `files` signed here.
    fn input_fingerprint(
        input_dir: &Path,
        files: &[PathBuf],
        metadata_file: Option<&Path>,
    ) -> Result<String> {
        let mut signed = Vec::new();
        for path in files {
            let size = std::fs::metadata(path)
                .map_err(|e| Error::io("inspect", path, e))?
                .len();
            signed.push((path.as_path(), size, content_signature(path)?));
        }
        let signed: Vec<Signed> = signed
            .iter()
            .map(|(p, n, s)| (*p, *n, s.as_str()))
            .collect();
        super::input_fingerprint(input_dir, &signed, metadata_file)
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn the_same_contents_elsewhere_give_the_same_fingerprint() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let files_a = vec![write(a.path(), "x.distcp", b"abc")];
        let meta_a = write(a.path(), ".metadata", b"meta");
        // Written later, on another inode and maybe another device.
        let files_b = vec![write(b.path(), "x.distcp", b"abc")];
        let meta_b = write(b.path(), ".metadata", b"meta");
        let fa = input_fingerprint(a.path(), &files_a, Some(&meta_a)).unwrap();
        let fb = input_fingerprint(b.path(), &files_b, Some(&meta_b)).unwrap();
        assert_eq!(fa, fb);
        assert!(fa.starts_with("sha256:") && fa.len() == 7 + 64, "{fa}");
    }

    #[test]
    fn names_contents_sizes_and_the_metadata_change_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let meta = write(d, ".metadata", b"meta");
        let files = vec![write(d, "a", b"abc")];
        let base = input_fingerprint(d, &files, Some(&meta)).unwrap();
        assert_ne!(input_fingerprint(d, &files, None).unwrap(), base);
        let renamed = vec![write(d, "b", b"abc")];
        assert_ne!(input_fingerprint(d, &renamed, Some(&meta)).unwrap(), base);
        write(d, "a", b"abd");
        assert_ne!(input_fingerprint(d, &files, Some(&meta)).unwrap(), base);
        write(d, "a", b"abcd");
        assert_ne!(input_fingerprint(d, &files, Some(&meta)).unwrap(), base);
        write(d, "a", b"abc");
        assert_eq!(input_fingerprint(d, &files, Some(&meta)).unwrap(), base);
        write(d, ".metadata", b"metA");
        assert_ne!(input_fingerprint(d, &files, Some(&meta)).unwrap(), base);
        let err = input_fingerprint(d, &[d.join("gone")], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("gone") && err.contains("hint:"), "{err}");
    }

    #[test]
    fn the_header_metadata_holds_the_format_and_the_fingerprint() {
        assert_eq!(header_metadata(None).len(), 1);
        let with = header_metadata(Some("sha256:00"));
        assert_eq!(with["format"], "pt");
        assert_eq!(with[FINGERPRINT_KEY], "sha256:00");
    }
}
