"""Drop-ins for DeepSpeed's ``convert_zero_checkpoint_to_fp32_state_dict``
and ``convert_zero_checkpoint_to_state_dict`` (``deepspeed.utils.zero_to_fp32``,
0.19.8): with ``safe_serialization=True`` the tool writes the safetensors
files, streamed, with tied weights handled (DeepSpeed's own run fails on
them); with ``safe_serialization=False`` DeepSpeed's function runs, since
this tool writes no pickles. The file names are DeepSpeed's:
``model.safetensors`` when everything fits in one file (no index), else
``model-0000I-of-0000N.safetensors`` and ``model.safetensors.index.json``."""

import importlib
import inspect
import os

from . import _api

MODULE = "deepspeed.utils.zero_to_fp32"
NAMES = ("convert_zero_checkpoint_to_fp32_state_dict", "convert_zero_checkpoint_to_state_dict")

# A shard size no checkpoint reaches: one file.
_ONE_FILE = 1 << 62

# DeepSpeed's functions, recorded by patch() when it replaces them, so a
# call that falls through never reaches a drop-in again.
originals = {}


def _original(name):
    function = originals.get(name)
    if function is None:
        function = getattr(importlib.import_module(MODULE), name)
    return function


def _convert(name, args, kwargs, dtype_default):
    original = _original(name)
    bound = inspect.signature(original).bind(*args, **kwargs)
    bound.apply_defaults()
    given = bound.arguments
    if not given.get("safe_serialization"):
        return original(*args, **kwargs)
    output_dir = _api._path(given["output_dir"], "output_dir")
    summary = _api.consolidate(
        given["checkpoint_dir"],
        output_dir,
        input_format="deepspeed",
        tag=given.get("tag"),
        # DeepSpeed's max_shard_size=None writes one file whatever its size.
        max_shard_size=_ONE_FILE if given.get("max_shard_size") is None else given["max_shard_size"],
        dtype=given.get("dtype", dtype_default),
        exclude_frozen_parameters=bool(given.get("exclude_frozen_parameters")),
        overwrite=True,
        no_hf_metadata=True,
        # DeepSpeed's function runs in one process, whatever the job.
        process_group=_api.ONE_PROCESS,
    )
    if summary.files == 1:
        # DeepSpeed names an unsharded output model.safetensors, without an
        # index. The file is renamed first: a folder with both still loads
        # (from_pretrained takes model.safetensors first).
        os.replace(
            os.path.join(output_dir, "model-00001-of-00001.safetensors"),
            os.path.join(output_dir, "model.safetensors"),
        )
        os.remove(os.path.join(output_dir, "model.safetensors.index.json"))
    return None


def convert_zero_checkpoint_to_fp32_state_dict(*args, **kwargs):
    """Drop-in for DeepSpeed's function of the same name: with
    ``safe_serialization=True`` the tool writes the F32 safetensors files
    (``zero_to_fp32.py``'s output, bit for bit; tied aliases left out as
    ``save_pretrained`` leaves them); otherwise DeepSpeed's function runs."""
    return _convert(NAMES[0], args, kwargs, "f32")


def convert_zero_checkpoint_to_state_dict(*args, **kwargs):
    """Drop-in for DeepSpeed's function of the same name (``dtype``: a
    torch dtype or a name, as DeepSpeed takes it): with
    ``safe_serialization=True`` the tool writes the safetensors files
    (``zero_to_torch.py --dtype``'s tensors, bit for bit); otherwise
    DeepSpeed's function runs."""
    return _convert(NAMES[1], args, kwargs, "f32")
