//! Each tensor's output dtype, from `--dtype` (a cast) and `--dtype-map`
//! (NeMo Automodel's `fqn_to_dtype_mapping`: tensor name → the dtype of the
//! original Hugging Face checkpoint).
//!
//! The rules are NeMo Automodel 0.7.0's `_resolve_output_dtype`, so that a
//! folder NeMo saved consolidates to what NeMo's own consolidation writes:
//! - under a cast, an ordinary float tensor (F16, BF16, F32, F64) mapped to
//!   F32 is written as F32; any other ordinary float tensor takes the cast;
//!   FP8, integer and bool tensors keep their saved dtype;
//! - without a cast, a tensor mapped to an ordinary float dtype gets it back
//!   from any floating-point saved dtype, FP8 included;
//! - a floating-point tensor mapped to anything else (an FP8, integer or
//!   bool original: the original was quantized or packed) keeps its saved
//!   dtype, and is named in one warning.
//!
//! Two deliberate divergences from NeMo: a map entry that is not a
//! safetensors dtype is an error (NeMo takes it as F32), and tensors saved
//! in a dtype NeMo's table lacks (U16, U32, U64, C64, the FNUZ types) keep
//! their saved dtype whatever the map says (NeMo reads them as F32).

use crate::checkpoint::FullTensor;
use crate::error::{Error, Result, shown};
use crate::safetensors::dtype::{Dtype, output_dtype};
use crate::safetensors::json::{JsonError, parse_unique_json};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Where the per-tensor dtype map comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DtypeMapSource {
    /// No map: `--dtype` alone decides.
    #[default]
    None,
    /// A JSON file `{"name": "BF16", …}` (`--dtype-map`).
    File(PathBuf),
    /// Given by a caller (the Python binding's `fqn_to_dtype_mapping`);
    /// `origin` names it in messages.
    Given {
        /// What to call the map in messages.
        origin: String,
        /// Tensor name → safetensors dtype name.
        entries: BTreeMap<String, String>,
    },
}

/// The output dtype of every tensor, and the tensors whose quantized or
/// packed original was not restored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutputDtypes {
    /// One per tensor, in the order of the tensors they were resolved for.
    pub dtypes: Vec<Dtype>,
    /// (name, mapped dtype, saved dtype) of floating-point tensors kept as
    /// saved because the map names a non-float original.
    pub not_restored: Vec<(String, Dtype, Dtype)>,
}

/// How many tensors the not-restored warning names.
pub const NOT_RESTORED_SHOWN: usize = 5;

impl OutputDtypes {
    /// The one warning about quantized or packed originals, if any.
    pub fn warning(&self) -> Option<String> {
        if self.not_restored.is_empty() {
            return None;
        }
        let shown_ones: Vec<String> = self
            .not_restored
            .iter()
            .take(NOT_RESTORED_SHOWN)
            .map(|(name, mapped, saved)| {
                format!("{}: original {mapped}, saved {saved}", shown(name))
            })
            .collect();
        let more = self.not_restored.len().saturating_sub(NOT_RESTORED_SHOWN);
        let more = if more > 0 {
            format!("; {more} more tensor(s) omitted")
        } else {
            String::new()
        };
        Some(format!(
            "warning: {} tensor(s) whose original was quantized or packed were saved as floating point; \
             they keep their saved dtype (a dequantized checkpoint): {}{more}",
            self.not_restored.len(),
            shown_ones.join(", ")
        ))
    }
}

/// Reads the map of `source` into dtypes, refusing any value that is not a
/// safetensors dtype (naming the tensor, the value and the map).
pub fn load_map(source: &DtypeMapSource) -> Result<BTreeMap<String, Dtype>> {
    let (origin, entries) = match source {
        DtypeMapSource::None => return Ok(BTreeMap::new()),
        DtypeMapSource::File(path) => (path.display().to_string(), read_map_file(path)?),
        DtypeMapSource::Given { origin, entries } => (origin.clone(), entries.clone()),
    };
    entries
        .into_iter()
        .map(|(name, value)| match Dtype::parse(&value) {
            Ok(dtype) => Ok((name, dtype)),
            Err(_) => Err(Error::usage(
                format!(
                    "dtype map {origin}: tensor '{}' is mapped to '{}', which is not a safetensors dtype",
                    shown(&name),
                    shown(&value)
                ),
                "use a safetensors dtype name: BF16, F16, F32, F64, F8_E4M3, F8_E5M2, F8_E8M0, I8, U8, I16, I32, I64, BOOL, …",
            )),
        })
        .collect()
}

/// Reads a `--dtype-map` file: a JSON object of names to dtype strings,
/// each name once.
fn read_map_file(path: &std::path::Path) -> Result<BTreeMap<String, String>> {
    let bad = |reason: String| {
        Error::usage(
            format!("dtype map {}: {reason}", path.display()),
            "give --dtype-map a JSON object like {\"model.embed_tokens.weight\": \"BF16\"} (NeMo's fqn_to_dtype_mapping.json), each name once",
        )
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::io("read the dtype map", path, e))?;
    let value = parse_unique_json(&text).map_err(|e| match e {
        JsonError::Syntax(e) => bad(format!("not valid JSON: {e}")),
        JsonError::Duplicate(dup) => bad(dup.to_string()),
    })?;
    let Value::Object(entries) = value else {
        return Err(bad("not a JSON object".into()));
    };
    entries
        .into_iter()
        .map(|(name, value)| match value {
            Value::String(dtype) => Ok((name, dtype)),
            other => Err(bad(format!(
                "'{}' maps to {other}, not a dtype string",
                shown(&name)
            ))),
        })
        .collect()
}

/// Resolves every tensor's output dtype. A tensor is looked up in `map` by
/// its output name, then by its saved name (`saved_names[i]`, before
/// `--strip-prefix`); names of the map that no tensor has are ignored, as
/// NeMo ignores them.
pub fn resolve(
    tensors: &[FullTensor],
    saved_names: &[String],
    cast: Option<Dtype>,
    map: &BTreeMap<String, Dtype>,
) -> OutputDtypes {
    let mut out = OutputDtypes::default();
    for (i, tensor) in tensors.iter().enumerate() {
        let mapped = map
            .get(&tensor.name)
            .or_else(|| saved_names.get(i).and_then(|n| map.get(n)))
            .copied();
        let (dtype, restored) = output_for(tensor.dtype, cast, mapped);
        if let (false, Some(mapped)) = (restored, mapped) {
            out.not_restored
                .push((tensor.name.clone(), mapped, tensor.dtype));
        }
        out.dtypes.push(dtype);
    }
    out
}

/// The dtypes NeMo's table (`DTYPE_MAP` in its `hf_utils`) knows.
fn nemo_knows(dtype: Dtype) -> bool {
    use Dtype::*;
    matches!(
        dtype,
        F16 | F32 | F64 | I8 | U8 | I16 | I32 | I64 | BF16 | F8_E4M3 | F8_E5M2 | F8_E8M0 | BOOL
    )
}

/// F16, BF16, F32 and F64: what NeMo calls regular floating dtypes.
fn is_regular_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}

/// Floating point as torch sees it, among the dtypes NeMo knows.
fn is_float(dtype: Dtype) -> bool {
    is_regular_float(dtype) || matches!(dtype, Dtype::F8_E4M3 | Dtype::F8_E5M2 | Dtype::F8_E8M0)
}

/// One tensor's output dtype, and `false` when a mapped quantized or
/// packed original was not restored (the caller warns about it).
pub fn output_for(saved: Dtype, cast: Option<Dtype>, mapped: Option<Dtype>) -> (Dtype, bool) {
    if !nemo_knows(saved) {
        return (saved, true);
    }
    if cast.is_some() && mapped == Some(Dtype::F32) && is_regular_float(saved) {
        return (Dtype::F32, true);
    }
    if cast.is_some() {
        return (output_dtype(saved, cast), true);
    }
    match mapped {
        None => (saved, true),
        Some(mapped) if mapped == saved => (saved, true),
        Some(mapped) if is_regular_float(mapped) && is_float(saved) => (mapped, true),
        Some(_) => (saved, !is_float(saved)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Dtype::*;

    #[test]
    fn nemo_rules_under_a_cast() {
        // A mapped F32 stays F32 (upcast from BF16), other floats take the cast.
        assert_eq!(output_for(BF16, Some(BF16), Some(F32)), (F32, true));
        assert_eq!(output_for(F32, Some(BF16), Some(F32)), (F32, true));
        assert_eq!(output_for(F32, Some(BF16), Some(BF16)), (BF16, true));
        assert_eq!(output_for(F32, Some(BF16), None), (BF16, true));
        assert_eq!(output_for(F64, Some(F16), None), (F16, true));
        // FP8 mapped to F32 stays FP8; integers and bool never change.
        assert_eq!(output_for(F8_E4M3, Some(BF16), Some(F32)), (F8_E4M3, true));
        assert_eq!(output_for(F8_E4M3, Some(BF16), None), (F8_E4M3, true));
        assert_eq!(output_for(I64, Some(BF16), Some(F32)), (I64, true));
        assert_eq!(output_for(BOOL, Some(F32), None), (BOOL, true));
    }

    #[test]
    fn nemo_rules_without_a_cast() {
        assert_eq!(output_for(F32, None, None), (F32, true));
        assert_eq!(output_for(F32, None, Some(BF16)), (BF16, true));
        assert_eq!(output_for(BF16, None, Some(F32)), (F32, true));
        // Restored from FP8.
        assert_eq!(output_for(F8_E4M3, None, Some(BF16)), (BF16, true));
        assert_eq!(output_for(F8_E8M0, None, Some(F64)), (F64, true));
        // A quantized original (FP8 or integer) is not restored, and says so.
        assert_eq!(output_for(BF16, None, Some(F8_E4M3)), (BF16, false));
        assert_eq!(output_for(F32, None, Some(I8)), (F32, false));
        // An integer tensor mapped to a float stays an integer, silently.
        assert_eq!(output_for(I32, None, Some(BF16)), (I32, true));
    }

    #[test]
    fn dtypes_nemo_lacks_are_kept_as_saved() {
        for saved in [U16, U32, U64, C64, F8_E4M3FNUZ, F8_E5M2FNUZ] {
            assert_eq!(output_for(saved, Some(BF16), Some(F32)), (saved, true));
            assert_eq!(output_for(saved, None, Some(BF16)), (saved, true));
        }
    }

    #[test]
    fn the_map_matches_output_then_saved_names_and_warns_once() {
        let tensor = |name: &str, dtype| FullTensor {
            name: name.into(),
            dtype,
            shape: vec![1],
            pieces: vec![],
        };
        let tensors = vec![tensor("a", F32), tensor("b", BF16), tensor("c", F32)];
        let saved = vec![
            "model.a".to_string(),
            "model.b".to_string(),
            "model.c".to_string(),
        ];
        let map = BTreeMap::from([
            ("model.a".to_string(), BF16),
            ("b".to_string(), F8_E4M3),
            ("unrelated".to_string(), F16),
        ]);
        let out = resolve(&tensors, &saved, None, &map);
        assert_eq!(out.dtypes, [BF16, BF16, F32]);
        assert_eq!(out.not_restored, [("b".to_string(), F8_E4M3, BF16)]);
        let warning = out.warning().unwrap();
        assert!(
            warning.contains("b: original F8_E4M3, saved BF16"),
            "{warning}"
        );
    }

    #[test]
    fn an_unknown_dtype_string_is_refused_naming_tensor_and_value() {
        let source = DtypeMapSource::Given {
            origin: "fqn_to_dtype_mapping".into(),
            entries: BTreeMap::from([("w".to_string(), "float32".to_string())]),
        };
        let err = load_map(&source).unwrap_err().to_string();
        assert!(err.contains("tensor 'w' is mapped to 'float32'"), "{err}");
        assert!(err.contains("fqn_to_dtype_mapping"), "{err}");
    }
}
