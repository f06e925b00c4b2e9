"""``patch()``: the drop-ins wherever PyTorch's and NeMo's functions are
looked up, undone exactly."""

import importlib
import sys

from . import _api, _deepspeed

# (module, attribute) that hold the functions, by which drop-in replaces
# them. Modules that are not installed (or fail to import) are skipped.
_KNOWN = [
    ("torch.distributed.checkpoint._consolidate_hf_safetensors", "consolidate_safetensors_files"),
    (
        "torch.distributed.checkpoint._consolidate_hf_safetensors",
        "consolidate_safetensors_files_on_every_rank",
    ),
    ("torch.distributed.checkpoint.hf_storage", "consolidate_safetensors_files"),
    (
        "nemo_automodel.components.checkpoint._backports.consolidate_hf_safetensors",
        "consolidate_safetensors_files",
    ),
    (
        "nemo_automodel.components.checkpoint._backports.consolidate_hf_safetensors",
        "consolidate_safetensors_files_on_every_rank",
    ),
    ("nemo_automodel.components.checkpoint._backports.hf_storage", "consolidate_safetensors_files"),
    *((_deepspeed.MODULE, name) for name in _deepspeed.NAMES),
    (
        "nemo_automodel.components.checkpoint.checkpointing",
        "consolidate_safetensors_files_on_every_rank",
    ),
]

_DROPINS = {
    "consolidate_safetensors_files": _api.consolidate_safetensors_files,
    "consolidate_safetensors_files_on_every_rank": _api.consolidate_safetensors_files_on_every_rank,
    **{name: getattr(_deepspeed, name) for name in _deepspeed.NAMES},
}


def _import(name):
    try:
        return importlib.import_module(name)
    except Exception:  # not installed, or its own dependencies are missing
        return None


class Patch:
    """The replacements made, to undo them; a context manager."""

    def __init__(self):
        self._replaced = []  # (module, attribute, original, drop-in)
        originals = {}  # id(original) -> (original, drop-in)
        for module_name, attr in _KNOWN:
            module = _import(module_name)
            original = getattr(module, attr, None) if module is not None else None
            if callable(original) and original not in _DROPINS.values():
                originals[id(original)] = (original, _DROPINS[attr])
                if module_name == _deepspeed.MODULE:
                    # A call with safe_serialization=False falls through to it.
                    _deepspeed.originals.setdefault(attr, original)
        # Every imported module that bound an original by any name
        # (torchtitan's checkpointer, a script's own import), by identity.
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for attr, value in list(namespace.items()):
                found = originals.get(id(value))
                if found is not None and found[0] is value:
                    setattr(module, attr, found[1])
                    self._replaced.append((module, attr, value, found[1]))

    @property
    def replaced(self):
        """``module.attribute`` names that now hold a drop-in."""
        return [f"{m.__name__}.{a}" for m, a, _, _ in self._replaced]

    def undo(self):
        """Puts every original back where it was (only where the drop-in is
        still in place: a later assignment by someone else is kept)."""
        for module, attr, original, dropin in reversed(self._replaced):
            if getattr(module, attr, None) is dropin:
                setattr(module, attr, original)
        self._replaced = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False


def patch():
    """Replaces PyTorch's and NeMo Automodel's
    ``consolidate_safetensors_files[_on_every_rank]``, and DeepSpeed's
    ``convert_zero_checkpoint_to_fp32_state_dict`` and
    ``convert_zero_checkpoint_to_state_dict`` (which fall through to
    DeepSpeed's own when ``safe_serialization`` is false), with the drop-ins
    in their modules and in every imported module that bound them. Returns a
    :class:`Patch`; use it as a context manager, or call ``undo()``."""
    return Patch()
