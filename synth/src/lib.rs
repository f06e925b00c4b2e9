//! Synthetic DCP checkpoints, laid out exactly as PyTorch's
//! `HuggingFaceStorageWriter(save_distributed=True)` writes them, with a
//! manifest of every full tensor's sha256. Used by `st-make-shards`, the
//! tests and the benchmarks.
//!
//! Every byte of a full tensor is a pure function of (seed, tensor, position),
//! so pieces are generated straight into their files and the full tensor's
//! hash is computed in one streaming pass, without holding any tensor.

pub mod cli;

use serde_json::json;
use sha2::{Digest, Sha256};
use st_consolidate_mpi::checkpoint::hf_shards::sharding::SHARDING_INFO_KEY;
use st_consolidate_mpi::exec::runs::Runs;
use st_consolidate_mpi::safetensors::dtype::Dtype;
use st_consolidate_mpi::safetensors::header::{TensorEntry, byte_len, encode_header};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// How a tensor is cut across the source ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Saved whole by `copies` ranks (1 = deduplicated, as PyTorch does).
    Replicate {
        /// Number of ranks that each save the full tensor.
        copies: usize,
    },
    /// Cut into `chunks[d]` pieces along each dimension with `torch.chunk`
    /// semantics (ceil-sized; trailing pieces may be empty).
    Chunk(Vec<u64>),
}

/// One tensor of a synthetic checkpoint.
#[derive(Clone, Debug)]
pub struct SynthTensor {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Full shape.
    pub shape: Vec<u64>,
    /// How it is cut.
    pub placement: Placement,
    /// Output file index (from 1).
    pub file: u32,
}

/// A synthetic checkpoint.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Source ranks (shard files per output index).
    pub ranks: usize,
    /// Output file count.
    pub files: u32,
    /// The tensors.
    pub tensors: Vec<SynthTensor>,
    /// Seed for the tensor bytes.
    pub seed: u64,
}

/// The model layouts `st-make-shards --layout` offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// Embeddings and MLP up/gate row-sharded, attention and down projections
    /// column-sharded, o_proj on a 2-D mesh, norms replicated.
    Mixed,
    /// Every tensor row-sharded (FSDP).
    Fsdp,
    /// Every matrix column-sharded (tensor parallel), norms replicated.
    Tp,
    /// Every matrix on a 2-D mesh, norms replicated.
    #[value(name = "2d")]
    TwoD,
    /// Small tensors of every dtype and awkward shape: 0-D, 4-D, 6-D, empty
    /// dimensions, empty pieces, uneven chunks, meshes, duplicated replicas.
    Zoo,
}

/// Model dimensions for [`Spec::model`].
#[derive(Clone, Copy, Debug)]
pub struct ModelSize {
    /// Transformer layers.
    pub layers: u32,
    /// Hidden size.
    pub hidden: u64,
    /// Vocabulary size.
    pub vocab: u64,
    /// MLP intermediate size (0: twice the hidden size).
    pub intermediate: u64,
}

/// A rows x cols factorisation of `ranks`, as square as possible.
pub fn mesh(ranks: usize) -> (u64, u64) {
    let mut rows = (ranks as f64).sqrt() as usize;
    while rows > 1 && !ranks.is_multiple_of(rows) {
        rows -= 1;
    }
    let rows = rows.max(1);
    (rows as u64, (ranks / rows) as u64)
}

impl Spec {
    /// A Llama-shaped checkpoint in the given layout.
    pub fn model(
        layout: Layout,
        size: ModelSize,
        ranks: usize,
        files: u32,
        dtype: Dtype,
        seed: u64,
    ) -> Spec {
        if layout == Layout::Zoo {
            return Spec::zoo(ranks, seed);
        }
        let r = ranks as u64;
        let (a, b) = mesh(ranks);
        let (row, col, grid) = (vec![r, 1], vec![1, r], vec![a, b]);
        // (rows, columns, mixed, fsdp, tp, 2d)
        let pick = |mixed: &Vec<u64>| match layout {
            Layout::Mixed => mixed.clone(),
            Layout::Fsdp => row.clone(),
            Layout::Tp => col.clone(),
            _ => grid.clone(),
        };
        let inter = if size.intermediate == 0 {
            size.hidden * 2
        } else {
            size.intermediate
        };
        let (h, v) = (size.hidden, size.vocab);
        let files = files.max(1);
        let layers = size.layers.max(1);
        let mut tensors = Vec::new();
        let mut add = |name: String, shape: Vec<u64>, placement: Placement, file: u32| {
            tensors.push(SynthTensor {
                name,
                dtype,
                shape,
                placement,
                file,
            });
        };
        let norm = || match layout {
            Layout::Fsdp => Placement::Chunk(vec![r]),
            _ => Placement::Replicate { copies: 1 },
        };
        add(
            "model.embed_tokens.weight".into(),
            vec![v, h],
            Placement::Chunk(pick(&row)),
            1,
        );
        for l in 0..layers {
            let file = 1 + (u64::from(l) * u64::from(files) / u64::from(layers)) as u32;
            let p = format!("model.layers.{l}");
            for proj in ["q_proj", "k_proj", "v_proj"] {
                add(
                    format!("{p}.self_attn.{proj}.weight"),
                    vec![h, h],
                    Placement::Chunk(pick(&col)),
                    file,
                );
            }
            add(
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, h],
                Placement::Chunk(pick(&grid)),
                file,
            );
            for proj in ["gate_proj", "up_proj"] {
                add(
                    format!("{p}.mlp.{proj}.weight"),
                    vec![inter, h],
                    Placement::Chunk(pick(&row)),
                    file,
                );
            }
            add(
                format!("{p}.mlp.down_proj.weight"),
                vec![h, inter],
                Placement::Chunk(pick(&col)),
                file,
            );
            add(format!("{p}.input_layernorm.weight"), vec![h], norm(), file);
            add(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                norm(),
                file,
            );
        }
        add("model.norm.weight".into(), vec![h], norm(), files);
        add(
            "lm_head.weight".into(),
            vec![v, h],
            Placement::Chunk(pick(&row)),
            files,
        );
        // More files than layers: spread tensors rather than layers over the
        // files, so that no output index is left empty.
        if files > layers {
            let count = tensors.len() as u64;
            for (i, tensor) in tensors.iter_mut().enumerate() {
                tensor.file = 1 + (i as u64 * u64::from(files) / count) as u32;
            }
        }
        Spec {
            ranks,
            files,
            tensors,
            seed,
        }
    }

    /// Every dtype and awkward shape the format allows.
    pub fn zoo(ranks: usize, seed: u64) -> Spec {
        let r = ranks as u64;
        let (a, b) = mesh(ranks);
        let mut tensors = Vec::new();
        for (i, dtype) in Dtype::ALL.iter().enumerate() {
            let file = 1 + (i % 3) as u32;
            let lower = dtype.name().to_lowercase();
            let mut add = |name: &str, shape: &[u64], placement: Placement| {
                tensors.push(SynthTensor {
                    name: format!("zoo.{lower}.{name}"),
                    dtype: *dtype,
                    shape: shape.to_vec(),
                    placement,
                    file,
                });
            };
            add("rows", &[2 * r + 1, 7], Placement::Chunk(vec![r, 1]));
            add("cols", &[5, 3 * r + 2], Placement::Chunk(vec![1, r]));
            add(
                "mesh",
                &[2 * a + 1, 3 * b + 1],
                Placement::Chunk(vec![a, b]),
            );
            add("scalar", &[], Placement::Replicate { copies: 1 });
            add("conv", &[6, 5, 7, 9], Placement::Chunk(vec![1, 1, 1, r]));
            add(
                "six_d",
                &[2, 3, 2, 3, 2, 5],
                Placement::Chunk(vec![1, a, 1, 1, 1, b]),
            );
            // Fewer rows than ranks: torch.chunk leaves trailing pieces empty.
            add("tiny", &[2, 4], Placement::Chunk(vec![r, 1]));
            add("empty", &[0, 4], Placement::Chunk(vec![r, 1]));
            add(
                "norm",
                &[11],
                Placement::Replicate {
                    copies: ranks.min(3),
                },
            );
        }
        Spec {
            ranks,
            files: 3,
            tensors,
            seed,
        }
    }

    /// Total bytes of all full tensors.
    pub fn total_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| byte_len(&t.shape, t.dtype).unwrap_or(0))
            .sum()
    }
}

/// A piece of a synthetic tensor: its source rank, offsets and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthPiece {
    /// Source rank (0-based).
    pub rank: usize,
    /// Offsets in the full tensor.
    pub offsets: Vec<u64>,
    /// Piece shape.
    pub shape: Vec<u64>,
}

/// The pieces of `tensor` across `ranks` source ranks. A chunking must not
/// make more pieces than ranks: each rank saves at most one piece of a tensor.
pub fn pieces(tensor: &SynthTensor, ranks: usize) -> Vec<SynthPiece> {
    match &tensor.placement {
        Placement::Replicate { copies } => (0..(*copies).clamp(1, ranks))
            .map(|rank| SynthPiece {
                rank,
                offsets: vec![0; tensor.shape.len()],
                shape: tensor.shape.clone(),
            })
            .collect(),
        Placement::Chunk(chunks) => {
            let ndim = tensor.shape.len();
            let counts: Vec<u64> = (0..ndim)
                .map(|d| chunks.get(d).copied().unwrap_or(1).max(1))
                .collect();
            let total: u64 = counts.iter().product();
            (0..total)
                .map(|linear| {
                    let mut rest = linear;
                    let mut offsets = vec![0; ndim];
                    let mut shape = vec![0; ndim];
                    for d in (0..ndim).rev() {
                        let j = rest % counts[d];
                        rest /= counts[d];
                        let n = tensor.shape[d];
                        let size = n.div_ceil(counts[d]);
                        let start = (j * size).min(n);
                        offsets[d] = start;
                        shape[d] = (start + size).min(n) - start;
                    }
                    SynthPiece {
                        rank: (linear % ranks as u64) as usize,
                        offsets,
                        shape,
                    }
                })
                .collect()
        }
    }
}

/// Fills `out` with bytes `start..start + out.len()` of the full tensor
/// `tensor_id`: a splitmix64 stream, so any range can be made on its own.
pub fn tensor_bytes(seed: u64, tensor_id: u64, start: u64, out: &mut [u8]) {
    let mut position = start;
    let mut i = 0;
    while i < out.len() {
        let word = position / 8;
        let mut z = seed
            ^ tensor_id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ word.wrapping_mul(0xD1B5_4A32_D192_ED03);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let bytes = z.to_le_bytes();
        let skip = (position % 8) as usize;
        let take = (8 - skip).min(out.len() - i);
        out[i..i + take].copy_from_slice(&bytes[skip..skip + take]);
        i += take;
        position += take as u64;
    }
}

/// What `write` produced.
#[derive(Clone, Debug, Default)]
pub struct Written {
    /// Shard files written.
    pub files: usize,
    /// Bytes of tensor data in them.
    pub bytes: u64,
}

/// Writes the checkpoint's shard files, `mapping.json` and (unless `sparse`)
/// `manifest.json` into `dir`. With `sparse`, data sections are left as holes
/// so that planning can be tested at any scale without using disk.
pub fn write(spec: &Spec, dir: &Path, sparse: bool) -> std::io::Result<Written> {
    std::fs::create_dir_all(dir)?;
    // (rank, file) -> [(tensor id, piece)]
    let mut by_file: BTreeMap<(usize, u32), Vec<(usize, SynthPiece)>> = BTreeMap::new();
    for (id, tensor) in spec.tensors.iter().enumerate() {
        for piece in pieces(tensor, spec.ranks) {
            by_file
                .entry((piece.rank, tensor.file))
                .or_default()
                .push((id, piece));
        }
    }
    let mut written = Written::default();
    for ((rank, file), members) in &by_file {
        let name = format!(
            "shard-{:05}-model-{file:05}-of-{:05}.safetensors",
            rank + 1,
            spec.files
        );
        let mut entries = Vec::with_capacity(members.len());
        let mut info = serde_json::Map::new();
        let mut offset = 0;
        for (id, piece) in members {
            let tensor = &spec.tensors[*id];
            let len = byte_len(&piece.shape, tensor.dtype).unwrap_or(0);
            entries.push(TensorEntry {
                name: tensor.name.clone(),
                dtype: tensor.dtype,
                shape: piece.shape.clone(),
                begin: offset,
                end: offset + len,
            });
            info.insert(tensor.name.clone(), json!({"saved_offsets": piece.offsets}));
            offset += len;
        }
        let metadata = BTreeMap::from([
            ("format".to_string(), "pt".to_string()),
            ("DCP_VERSION".to_string(), "1.0".to_string()),
            (
                SHARDING_INFO_KEY.to_string(),
                serde_json::Value::Object(info).to_string(),
            ),
        ]);
        let header = encode_header(&metadata, &entries);
        let file = File::create(dir.join(name))?;
        let mut out = BufWriter::with_capacity(1 << 20, &file);
        out.write_all(&header)?;
        if !sparse {
            for (id, piece) in members {
                let tensor = &spec.tensors[*id];
                write_piece(spec.seed, *id as u64, tensor, piece, &mut out)?;
            }
        }
        out.flush()?;
        drop(out);
        file.set_len(header.len() as u64 + offset)?;
        written.files += 1;
        written.bytes += offset;
    }
    let mapping: BTreeMap<&str, u32> = spec
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.file))
        .collect();
    std::fs::write(
        dir.join("mapping.json"),
        serde_json::to_string_pretty(&mapping)? + "\n",
    )?;
    if !sparse {
        std::fs::write(
            dir.join("manifest.json"),
            serde_json::to_string_pretty(&manifest(spec))? + "\n",
        )?;
    }
    Ok(written)
}

fn write_piece(
    seed: u64,
    id: u64,
    tensor: &SynthTensor,
    piece: &SynthPiece,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let runs = Runs::new(
        &tensor.shape,
        &piece.offsets,
        &piece.shape,
        tensor.dtype.size(),
    );
    let mut buffer = Vec::new();
    for n in 0..runs.count() {
        let mut left = runs.run_len();
        let mut at = runs.dst(n);
        while left > 0 {
            let chunk = left.min(1 << 20);
            buffer.resize(chunk as usize, 0);
            tensor_bytes(seed, id, at, &mut buffer);
            out.write_all(&buffer)?;
            at += chunk;
            left -= chunk;
        }
    }
    Ok(())
}

/// `{name: {shape, dtype, sha256}}` of every full tensor, like the fixture's.
pub fn manifest(spec: &Spec) -> serde_json::Value {
    let mut manifest = serde_json::Map::new();
    let mut buffer = vec![0u8; 1 << 20];
    for (id, tensor) in spec.tensors.iter().enumerate() {
        let len = byte_len(&tensor.shape, tensor.dtype).unwrap_or(0);
        let mut hasher = Sha256::new();
        let mut at = 0;
        while at < len {
            let chunk = (len - at).min(buffer.len() as u64) as usize;
            tensor_bytes(spec.seed, id as u64, at, &mut buffer[..chunk]);
            hasher.update(&buffer[..chunk]);
            at += chunk as u64;
        }
        manifest.insert(
            tensor.name.clone(),
            json!({"shape": tensor.shape, "dtype": tensor.dtype.name(), "sha256": hex(&hasher.finalize())}),
        );
    }
    serde_json::Value::Object(manifest)
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_follows_torch_chunk() {
        let tensor = SynthTensor {
            name: "t".into(),
            dtype: Dtype::U8,
            shape: vec![3, 2],
            placement: Placement::Chunk(vec![4, 1]),
            file: 1,
        };
        let rows: Vec<(u64, u64)> = pieces(&tensor, 4)
            .iter()
            .map(|p| (p.offsets[0], p.shape[0]))
            .collect();
        assert_eq!(rows, [(0, 1), (1, 1), (2, 1), (3, 0)]);
        let tensor = SynthTensor {
            shape: vec![1003, 2],
            placement: Placement::Chunk(vec![4, 1]),
            ..tensor
        };
        let rows: Vec<u64> = pieces(&tensor, 4).iter().map(|p| p.shape[0]).collect();
        assert_eq!(rows, [251, 251, 251, 250]);
    }

    #[test]
    fn tensor_bytes_are_position_independent() {
        let mut whole = vec![0u8; 37];
        tensor_bytes(7, 3, 5, &mut whole);
        let mut part = vec![0u8; 10];
        tensor_bytes(7, 3, 16, &mut part);
        assert_eq!(part, whole[11..21]);
    }

    #[test]
    fn meshes_are_square_when_possible() {
        assert_eq!(mesh(4), (2, 2));
        assert_eq!(mesh(8), (2, 4));
        assert_eq!(mesh(7), (1, 7));
        assert_eq!(mesh(1), (1, 1));
    }
}
