//! File names of the Hugging Face layout: consolidated outputs
//! (`model-IIIII-of-NNNNN.safetensors`), their index, and the per-rank shards
//! PyTorch's `HuggingFaceStorageWriter` writes
//! (`shard-RRRRR-model-IIIII-of-NNNNN.safetensors`).

/// The name of the Hugging Face index file.
pub const INDEX_NAME: &str = "model.safetensors.index.json";

/// The index name Diffusers models use (`--index-name diffusers`).
pub const DIFFUSERS_INDEX_NAME: &str = "diffusion_pytorch_model.safetensors.index.json";

/// Index names an earlier run may have left: all count as outputs.
pub const KNOWN_INDEX_NAMES: [&str; 2] = [INDEX_NAME, DIFFUSERS_INDEX_NAME];

/// The longest index name: a file name may have 255 bytes (`NAME_MAX` on
/// Linux filesystems), and the index is first written under its temporary
/// name `.NAME.st-consolidate.tmp`, 20 bytes longer, which must fit too.
pub const MAX_INDEX_NAME_BYTES: usize = 255 - TEMP_DECORATION_BYTES;

/// What the temporary name adds to a file name (`.` and
/// `.st-consolidate.tmp`, see `exec::output::temp_name`).
pub const TEMP_DECORATION_BYTES: usize = 20;

/// The index file name `--index-name` asks for: `diffusers` is
/// [`DIFFUSERS_INDEX_NAME`]; any other value must be a plain file name
/// ending in `.index.json`: no folder (`/`), no NUL, not hidden, not a
/// model file's name, and at most [`MAX_INDEX_NAME_BYTES`] bytes. Checked
/// with the other options, before anything is read or written: a name the
/// filesystem refuses would otherwise fail only after the whole copy.
pub fn index_name_for(arg: &str) -> Result<String, String> {
    if arg == "diffusers" {
        return Ok(DIFFUSERS_INDEX_NAME.to_string());
    }
    let given = crate::error::shown(arg);
    if arg.contains('\0') {
        return Err(format!(
            "'{given}' holds a NUL byte, which no file name can: give a name like \
             model.safetensors.index.json"
        ));
    }
    if arg.len() > MAX_INDEX_NAME_BYTES {
        return Err(format!(
            "'{given}' is {} bytes long: a file name has at most 255 bytes, and the index is \
             first written as .NAME.st-consolidate.tmp, so NAME may have at most \
             {MAX_INDEX_NAME_BYTES} bytes; give a shorter name like model.safetensors.index.json",
            arg.len()
        ));
    }
    let plain = !arg.contains('/') && !arg.starts_with('.') && arg.ends_with(".index.json");
    if !plain || parse_output_name(arg).is_some() {
        return Err(format!(
            "'{given}' is not an index file name: give a name like model.safetensors.index.json \
             (a file name ending in .index.json, no folder), or 'diffusers' for {DIFFUSERS_INDEX_NAME}"
        ));
    }
    Ok(arg.to_string())
}

/// The most output files: names carry the index in five digits
/// (`model-IIIII-of-NNNNN`), and every index up to the largest is written.
pub const MAX_FILES: u32 = 99_999;

/// The consolidated file name for output `index` of `count`.
pub fn output_name(index: u32, count: u32) -> String {
    format!("model-{index:05}-of-{count:05}.safetensors")
}

/// Parses `model-IIIII-of-NNNNN.safetensors` into `(index, count)`.
pub fn parse_output_name(name: &str) -> Option<(u32, u32)> {
    let rest = name.strip_prefix("model-")?.strip_suffix(".safetensors")?;
    let (index, count) = rest.split_once("-of-")?;
    let digits = |s: &str| s.len() >= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(index) || !digits(count) {
        return None;
    }
    let index: u32 = index.parse().ok()?;
    let count: u32 = count.parse().ok()?;
    (index >= 1 && index <= count).then_some((index, count))
}

/// Parses `shard-RRRRR-model-IIIII-of-NNNNN.safetensors` into (rank, index, count).
pub fn parse_shard_name(name: &str) -> Option<(u32, u32, u32)> {
    let rest = name.strip_prefix("shard-")?;
    let (rank, output) = rest.split_once('-')?;
    let (index, count) = parse_output_name(output)?;
    let rank_ok = rank.len() >= 5 && rank.bytes().all(|b| b.is_ascii_digit());
    Some((rank.parse().ok().filter(|_| rank_ok)?, index, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_names_are_plain_file_names() {
        assert_eq!(index_name_for("diffusers").unwrap(), DIFFUSERS_INDEX_NAME);
        assert_eq!(index_name_for(INDEX_NAME).unwrap(), INDEX_NAME);
        for bad in ["out/x.index.json", ".x.index.json", "index.txt", "x.json"] {
            assert!(index_name_for(bad).is_err(), "{bad}");
        }
        let longest = format!("{}.index.json", "i".repeat(MAX_INDEX_NAME_BYTES - 11));
        assert_eq!(index_name_for(&longest).unwrap(), longest);
        let err = index_name_for(&format!("i{longest}")).unwrap_err();
        assert!(
            err.contains("236 bytes long") && err.contains("255 bytes"),
            "{err}"
        );
        let err = index_name_for("a\0.index.json").unwrap_err();
        assert!(
            err.starts_with("'a\\0.index.json' holds a NUL byte"),
            "{err}"
        );
    }

    #[test]
    fn output_names_round_trip() {
        assert_eq!(output_name(3, 12), "model-00003-of-00012.safetensors");
        assert_eq!(
            parse_output_name("model-00003-of-00012.safetensors"),
            Some((3, 12))
        );
        assert_eq!(parse_output_name("model-3-of-12.safetensors"), None);
        assert_eq!(parse_output_name("model-00013-of-00012.safetensors"), None);
    }

    #[test]
    fn shard_names_parse() {
        assert_eq!(
            parse_shard_name("shard-00002-model-00001-of-00004.safetensors"),
            Some((2, 1, 4))
        );
        assert_eq!(
            parse_shard_name("shard-2-model-00001-of-00004.safetensors"),
            None
        );
        assert_eq!(parse_shard_name("model-00001-of-00004.safetensors"), None);
    }
}
