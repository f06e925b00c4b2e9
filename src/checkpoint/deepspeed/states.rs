//! What the reader takes from DeepSpeed's two kinds of pickles (the format
//! brief's §2.2 and §2.3): the model-states file's module, shapes, frozen
//! fragments and tied names, and the optimizer-states file's stage,
//! partition count and fp32 master partitions. Everything else in them
//! (Adam states, loss scalers, the training script's client state) is left
//! as parsed and never read.

use super::torch_save::{TensorRef, TorchSave};
use crate::checkpoint::dcp::pickle::Value;
use crate::error::Result;
use crate::safetensors::dtype::Dtype;
use crate::safetensors::header::byte_len;

/// A model-states file (`mp_rank_00_model_states.pt`, or ZeRO-3's
/// `zero_pp_rank_D_mp_rank_00_model_states.pt`).
#[derive(Debug)]
pub struct ModelStates {
    /// `module`: the module's state dict in the training dtype (ZeRO-3:
    /// parameters as 0-element tensors), in order.
    pub module: Vec<(String, TensorRef)>,
    /// `buffer_names`: the persistent buffers.
    pub buffer_names: Vec<String>,
    /// `param_shapes`: per flat group, the trainable parameters in the
    /// order they were flattened, with their shapes.
    pub param_shapes: Vec<Vec<(String, Vec<u64>)>>,
    /// `frozen_param_shapes` (`None` under ZeRO-1, and when saved with
    /// `exclude_frozen_parameters`).
    pub frozen_param_shapes: Option<Vec<(String, Vec<u64>)>>,
    /// `frozen_param_fragments`: ZeRO-2 the whole tensor, ZeRO-3 this
    /// rank's padded partition.
    pub frozen_param_fragments: Vec<(String, TensorRef)>,
    /// `shared_params`: tied alias → owner (filled on global rank 0 only).
    pub shared_params: Vec<(String, String)>,
    /// `global_steps`, to tell files of different saves apart.
    pub global_steps: Option<i64>,
    /// `mp_world_size` (tensor-parallel degree).
    pub mp_world_size: Option<i64>,
    /// Whether `module` is `None` (pipeline parallel: layers are saved in
    /// files of their own).
    pub module_is_none: bool,
    /// Keys of an expert-parallel (MoE/AutoEP) save.
    pub expert_keys: Vec<String>,
}

/// Which optimizer wrote an optimizer-states file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// ZeRO stage 1, 2 or 3 (`zero_stage`).
    Zero(u8),
    /// BF16_Optimizer (bf16 + ZeRO-1 + fp32 gradient accumulation): no
    /// `zero_stage`, ZeRO-1's layout with untrimmed partitions.
    Bf16Optimizer,
}

/// An optimizer-states file (`[bf16_]zero_pp_rank_D_mp_rank_00_optim_states.pt`).
#[derive(Debug)]
pub struct OptimStates {
    /// The optimizer.
    pub stage: Stage,
    /// `partition_count`: the data-parallel world size (the largest, when
    /// a list).
    pub partition_count: u64,
    /// Whether `partition_count` is a list whose values differ (MoE).
    pub partition_counts_differ: bool,
    /// This rank's fp32 master partition of each flat group (ZeRO-3: of
    /// each sub-group).
    pub flat_groups: Vec<TensorRef>,
    /// `param_alignment_paddings` (DeepSpeed 0.19.8 with
    /// `parameter_alignment`): zeros after each parameter, per group.
    pub alignment_paddings: Option<Vec<Vec<u64>>>,
    /// `ds_zero_partition_groups` is present (AutoEP's partition-native
    /// expert state).
    pub autoep: bool,
    /// Whether a flat group is a 0-element placeholder (NVMe offload).
    pub has_placeholder: bool,
}

/// Typed access to one file's pickle, with errors naming the file.
struct View<'a> {
    save: &'a TorchSave,
}

impl<'a> View<'a> {
    fn dict(&self, value: Value, what: &str) -> Result<&'a [(Value, Value)]> {
        self.save.pickle.dict(value).ok_or_else(|| {
            self.save.bad(format!(
                "{what} is a {}, not a dict",
                self.save.pickle.describe(value)
            ))
        })
    }

    fn get(&self, pairs: &[(Value, Value)], key: &str) -> Option<Value> {
        self.save.pickle.dict_get(pairs, key)
    }

    fn require(&self, pairs: &[(Value, Value)], key: &str, hint_where: &str) -> Result<Value> {
        self.get(pairs, key).ok_or_else(|| {
            self.save.bad(format!(
                "{hint_where} has no '{key}' entry; DeepSpeed writes one"
            ))
        })
    }

    fn str(&self, value: Value, what: &str) -> Result<String> {
        match self.save.pickle.str(value) {
            Some(text) => Ok(text.to_owned()),
            None => Err(self.save.bad(format!(
                "{what} is a {}, not a str",
                self.save.pickle.describe(value)
            ))),
        }
    }

    fn list(&self, value: Value, what: &str) -> Result<&'a [Value]> {
        self.save.pickle.sequence(value).ok_or_else(|| {
            self.save.bad(format!(
                "{what} is a {}, not a list",
                self.save.pickle.describe(value)
            ))
        })
    }

    fn uint(&self, value: Value, what: &str) -> Result<u64> {
        match value {
            Value::Int(n) if n >= 0 => Ok(n as u64),
            _ => Err(self.save.bad(format!(
                "{what} is a {}, not a count",
                self.save.pickle.describe(value)
            ))),
        }
    }

    /// A `torch.Size` (or a plain tuple of ints).
    fn shape(&self, value: Value, what: &str) -> Result<Vec<u64>> {
        let pickle = &self.save.pickle;
        let items = match pickle.object(value) {
            Some(object) if object.class.is("torch", "Size") => pickle
                .tuple(object.args)
                .and_then(|args| args.first())
                .and_then(|dims| pickle.sequence(*dims)),
            _ => pickle.sequence(value),
        };
        let Some(items) = items else {
            return Err(self.save.bad(format!(
                "{what} is a {}, not a torch.Size",
                pickle.describe(value)
            )));
        };
        let shape: Vec<u64> = items
            .iter()
            .map(|dim| self.uint(*dim, what))
            .collect::<Result<_>>()?;
        // Every count the reader derives from a shape (elements, bytes of
        // any dtype) then fits in 64 bits.
        if byte_len(&shape, Dtype::F64).is_none() {
            return Err(self
                .save
                .bad(format!("{what} is {shape:?}, a size that overflows")));
        }
        Ok(shape)
    }

    /// A dict of names to shapes.
    fn shapes(&self, value: Value, what: &str) -> Result<Vec<(String, Vec<u64>)>> {
        self.dict(value, what)?
            .iter()
            .map(|(name, shape)| {
                let name = self.str(*name, &format!("a name in {what}"))?;
                let shape = self.shape(*shape, &format!("{what}['{name}']"))?;
                Ok((name, shape))
            })
            .collect()
    }

    /// A dict of names to tensors.
    fn tensors(&self, value: Value, what: &str) -> Result<Vec<(String, TensorRef)>> {
        self.dict(value, what)?
            .iter()
            .map(|(name, tensor)| {
                let name = self.str(*name, &format!("a name in {what}"))?;
                let tensor = self.save.tensor(*tensor, &format!("{what}['{name}']"))?;
                Ok((name, tensor))
            })
            .collect()
    }
}

/// Reads a model-states file's pickle.
pub fn model_states(save: &TorchSave) -> Result<ModelStates> {
    let view = View { save };
    let top = view.dict(save.pickle.root(), "the file's pickle")?;
    let here = "the model-states pickle";
    let module = view.require(top, "module", here)?;
    let module_is_none = module == Value::None;
    let module = match module_is_none {
        true => Vec::new(),
        false => view.tensors(module, "module")?,
    };
    let buffer_names = match view.get(top, "buffer_names") {
        None | Some(Value::None) => Vec::new(),
        Some(names) => view
            .list(names, "buffer_names")?
            .iter()
            .map(|name| view.str(*name, "a buffer name"))
            .collect::<Result<_>>()?,
    };
    let param_shapes = match view.get(top, "param_shapes") {
        None | Some(Value::None) => Vec::new(),
        Some(groups) => view
            .list(groups, "param_shapes")?
            .iter()
            .enumerate()
            .map(|(g, group)| view.shapes(*group, &format!("param_shapes[{g}]")))
            .collect::<Result<_>>()?,
    };
    let frozen_param_shapes = match view.get(top, "frozen_param_shapes") {
        None | Some(Value::None) => None,
        Some(shapes) => Some(view.shapes(shapes, "frozen_param_shapes")?),
    };
    let frozen_param_fragments = match view.get(top, "frozen_param_fragments") {
        None | Some(Value::None) => Vec::new(),
        Some(fragments) => view.tensors(fragments, "frozen_param_fragments")?,
    };
    let shared_params = match view.get(top, "shared_params") {
        None | Some(Value::None) => Vec::new(),
        Some(shared) => view
            .dict(shared, "shared_params")?
            .iter()
            .map(|(alias, owner)| {
                Ok((
                    view.str(*alias, "a tied alias")?,
                    view.str(*owner, "a tied owner")?,
                ))
            })
            .collect::<Result<_>>()?,
    };
    let int = |key: &str| match view.get(top, key) {
        Some(Value::Int(n)) => Some(n),
        _ => None,
    };
    let expert_keys = ["ds_autoep_layers", "autoep_layers"]
        .into_iter()
        .filter(|key| !matches!(view.get(top, key), None | Some(Value::None)))
        .map(str::to_owned)
        .collect();
    Ok(ModelStates {
        module,
        buffer_names,
        param_shapes,
        frozen_param_shapes,
        frozen_param_fragments,
        shared_params,
        global_steps: int("global_steps"),
        mp_world_size: int("mp_world_size"),
        module_is_none,
        expert_keys,
    })
}

/// Reads an optimizer-states file's pickle. Only the fp32 partitions'
/// places are taken; the Adam states' tensors are never looked at.
pub fn optim_states(save: &TorchSave) -> Result<OptimStates> {
    let view = View { save };
    let pickle = &save.pickle;
    let top = view.dict(pickle.root(), "the file's pickle")?;
    let state = view.require(top, "optimizer_state_dict", "the optimizer-states pickle")?;
    let state = view.dict(state, "optimizer_state_dict")?;
    let here = "optimizer_state_dict";
    let stage = match view.get(state, "zero_stage") {
        Some(value) => {
            let number = match pickle.object(value) {
                Some(object) if object.class.name == "ZeroStageEnum" => pickle
                    .tuple(object.args)
                    .and_then(|args| args.first().copied()),
                _ => Some(value),
            };
            match number {
                Some(Value::Int(n @ 1..=3)) => Stage::Zero(n as u8),
                _ => {
                    return Err(save.bad(format!(
                        "zero_stage is {}, not ZeRO stage 1, 2 or 3",
                        pickle.describe(value)
                    )));
                }
            }
        }
        None => Stage::Bf16Optimizer,
    };
    let counts = view.require(state, "partition_count", here)?;
    let counts: Vec<u64> = match counts {
        Value::Int(_) => vec![view.uint(counts, "partition_count")?],
        _ => view
            .list(counts, "partition_count")?
            .iter()
            .map(|c| view.uint(*c, "partition_count"))
            .collect::<Result<_>>()?,
    };
    let Some(&partition_count) = counts.iter().max() else {
        return Err(save.bad("partition_count is an empty list".into()));
    };
    let groups_key = match stage {
        Stage::Zero(3) => "fp32_flat_groups",
        _ => "single_partition_of_fp32_groups",
    };
    let groups = view.require(state, groups_key, here)?;
    let flat_groups: Vec<TensorRef> = view
        .list(groups, groups_key)?
        .iter()
        .enumerate()
        .map(|(g, group)| save.tensor(*group, &format!("{groups_key}[{g}]")))
        .collect::<Result<_>>()?;
    if let Some(odd) = flat_groups.iter().position(|t| t.shape.len() != 1) {
        return Err(save.bad(format!(
            "{groups_key}[{odd}] has shape {:?}; a flat group is 1-dimensional",
            flat_groups[odd].shape
        )));
    }
    let alignment_paddings = match view.get(state, "param_alignment_paddings") {
        None | Some(Value::None) => None,
        Some(groups) => Some(
            view.list(groups, "param_alignment_paddings")?
                .iter()
                .map(|group| {
                    view.list(*group, "param_alignment_paddings")?
                        .iter()
                        .map(|pad| view.uint(*pad, "param_alignment_paddings"))
                        .collect::<Result<Vec<u64>>>()
                })
                .collect::<Result<_>>()?,
        ),
    };
    Ok(OptimStates {
        stage,
        partition_count,
        partition_counts_differ: counts.iter().any(|c| *c != partition_count),
        has_placeholder: stage == Stage::Zero(3) && flat_groups.iter().any(|t| t.numel() == 0),
        flat_groups,
        alignment_paddings,
        autoep: view.get(state, "ds_zero_partition_groups").is_some(),
    })
}
