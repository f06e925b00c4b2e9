"""st_consolidate: consolidate PyTorch Distributed Checkpoints into Hugging
Face safetensors files at the disk's speed, from the training job.

- ``consolidate_safetensors_files`` and
  ``consolidate_safetensors_files_on_every_rank``: drop-ins for PyTorch's
  and NeMo Automodel's functions, same names and signatures.
- ``convert_zero_checkpoint_to_fp32_state_dict`` and
  ``convert_zero_checkpoint_to_state_dict``: drop-ins for DeepSpeed's, for
  ``safe_serialization=True`` (DeepSpeed's own runs otherwise).
- ``patch()``: puts the drop-ins wherever those functions are looked up
  (a context manager that undoes it).
- ``consolidate(input_dir, output_dir, *, ...)``: the whole tool, keywords
  named after the command's flags, returning a ``Summary``.

Messages go to the ``st_consolidate`` logger (progress at INFO). Importing
this package does not import torch.
"""

from ._api import (
    Summary,
    consolidate,
    consolidate_safetensors_files,
    consolidate_safetensors_files_on_every_rank,
)
from ._deepspeed import (
    convert_zero_checkpoint_to_fp32_state_dict,
    convert_zero_checkpoint_to_state_dict,
)
from ._errors import ConsolidationError, InputError
from ._native import __version__
from ._patch import patch

__all__ = [
    "ConsolidationError",
    "InputError",
    "Summary",
    "consolidate",
    "consolidate_safetensors_files",
    "consolidate_safetensors_files_on_every_rank",
    "convert_zero_checkpoint_to_fp32_state_dict",
    "convert_zero_checkpoint_to_state_dict",
    "patch",
    "__version__",
]
