//! Checking that every replica of a replicated piece holds the same bytes
//! as the piece that gets copied.

use super::{OpenInputs, read_shard_at};
use crate::error::{Error, Result};
use crate::plan::Plan;

/// Checks that every replica of a replicated piece holds the same bytes as
/// the piece, for the tensors of output file `file`.
pub fn check_replicas(plan: &Plan, file: usize) -> Result<()> {
    let mut inputs = OpenInputs::new(&plan.shards);
    let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    for entry in &plan.files[file].entries {
        let tensor = &plan.tensors[entry.tensor];
        for piece in tensor.pieces.iter().filter(|p| !p.replicas.is_empty()) {
            let copies = std::iter::once(&piece.location).chain(&piece.replicas);
            if copies.clone().any(|l| !l.is_located()) {
                return Err(Error::internal(format!(
                    "'{}': a replicated chunk was compared before it was located",
                    tensor.name
                )));
            }
            let len = crate::safetensors::header::byte_len(&piece.shape, tensor.dtype).unwrap_or(0);
            for replica in &piece.replicas {
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(a.len() as u64) as usize;
                    for (location, buffer) in [(&piece.location, &mut a), (replica, &mut b)] {
                        let path = &plan.shards[location.shard];
                        let input = inputs.get(location.shard)?;
                        read_shard_at(input, &mut buffer[..n], location.offset + done).map_err(
                            |e| Error::Copy {
                                tensor: tensor.name.clone(),
                                action: "read",
                                path: path.clone(),
                                source: e,
                            },
                        )?;
                    }
                    if a[..n] != b[..n] {
                        return Err(Error::Inconsistent {
                            tensor: tensor.name.clone(),
                            reason: format!(
                                "replicated piece {} differs between {} and {}",
                                crate::checkpoint::coverage::region(&piece.offsets, &piece.shape),
                                plan.shards[piece.location.shard].display(),
                                plan.shards[replica.shard].display()
                            ),
                            hint: "the shards come from different saves; use one checkpoint's files only",
                        });
                    }
                    done += n as u64;
                }
            }
        }
    }
    Ok(())
}
