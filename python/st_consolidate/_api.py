"""The Python API: the whole tool (``consolidate``) and the drop-ins for
PyTorch's and NeMo's ``consolidate_safetensors_files[_on_every_rank]``.
Arguments are adapted here; the library does the work."""

import atexit
import collections.abc
import dataclasses
import json
import logging
import operator
import os
import tempfile
import sys

from . import _dist
from ._errors import InputError
from ._native import consolidate as _run
from ._native import stop_for_exit as _stop_for_exit

logger = logging.getLogger("st_consolidate")

# Consolidations still running on other threads when the interpreter exits
# are stopped and waited for while it is still whole (see python/src/exit.rs).
atexit.register(_stop_for_exit)

@dataclasses.dataclass(frozen=True)
class Summary:
    """What a consolidation did (on this rank's view of the job)."""

    files: int
    """Output files written by all ranks."""
    bytes: int
    """Tensor bytes written by all ranks."""
    seconds: float
    """Wall time of the call on this rank."""
    skipped: list
    """Non-tensor entries of the checkpoint that were skipped."""
    plan: str = None
    """dry_run=True: the plan, as the command prints it (rank 0)."""
    report: dict = None
    """The run report (as --report writes it), on rank 0."""


def _cast_name(cast_dtype):
    """A torch.dtype → its name ("torch.bfloat16"); a name as it is. Which
    names are accepted (the command's bf16|f16|f32|f64, NeMo's aliases) is
    the library's rule (src/options.rs), shared with the command."""
    # Without importing torch: a torch.dtype exists only once torch is.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(cast_dtype, torch.dtype):
        return str(cast_dtype)
    return cast_dtype


# A process_group meaning "this process alone", whatever the job: for the
# DeepSpeed drop-ins, whose originals are single-process functions that a
# training script calls on one rank.
ONE_PROCESS = object()


def _communicator(process_group):
    """The job's communicator: over ``process_group`` (or the default
    group) when torch.distributed is initialized, else None (one process)."""
    if process_group is ONE_PROCESS:
        return None
    dist = _dist.distributed_or_none()
    if dist is None:
        return None
    return _dist.TorchCommunicator(process_group)


def _invoke(input_dir, output_dir, options, communicator):
    options = {k: v for k, v in options.items() if v is not None}
    result = _run(_path(input_dir), _path(output_dir), options, communicator, logger)
    if result.get("human"):
        logger.info("%s", result["human"])
    report = json.loads(result["report"]) if result.get("report") else None
    return Summary(
        files=result["files"],
        bytes=result["bytes"],
        seconds=result["seconds"],
        skipped=list(result["skipped"]),
        plan=result.get("plan"),
        report=report,
    )


def consolidate(
    input_dir,
    output_dir,
    *,
    input_format="auto",
    tag=None,
    include=None,
    exclude=None,
    mapping=None,
    hf_index=None,
    max_shard_size=None,
    unmapped="error",
    threads=None,
    dry_run=False,
    ranks=None,
    ranks_per_node=None,
    overwrite=False,
    resume=False,
    hf_assets=None,
    staging_dir=None,
    no_hf_metadata=False,
    keep_top_level_key=False,
    keep_tied=False,
    exclude_frozen_parameters=False,
    index_name=None,
    verify=False,
    verify_only=False,
    allow_missing_shard_files=False,
    source_ranks=None,
    progress=10.0,
    report=None,
    schedule="modulo",
    headers="all",
    dtype=None,
    dtype_map=None,
    strip_prefix=None,
    process_group=None,
):
    """Consolidates ``input_dir`` (a DCP checkpoint, HF shards, or a
    DeepSpeed ZeRO checkpoint folder: the one holding ``latest``, or a tag
    folder; ``tag`` picks another tag) into
    ``output_dir``, as the ``st-consolidate-mpi`` command does; each keyword
    is the command's flag of the same name (``--hf-index`` → ``hf_index``).
    ``dtype`` takes the command's names (bf16, f16, f32, f64), NeMo's aliases
    (bfloat16, fp32, half, ...) or a float torch.dtype; ``threads`` any
    positive count (above 1024 taken as 1024); ``dtype_map`` a path or a
    dict; ``max_shard_size`` bytes or a string such as "5GB". The options'
    rules are the command's. With torch.distributed
    initialized, every rank of ``process_group`` (default: the default group)
    must call it. Returns a :class:`Summary`; raises :class:`InputError` or
    :class:`ConsolidationError` on every rank alike."""
    if isinstance(include, str):
        include = [include]
    if isinstance(exclude, str):
        exclude = [exclude]
    if isinstance(strip_prefix, str):
        strip_prefix = [strip_prefix]
    options = dict(
        input_format=input_format,
        tag=tag,
        include=include,
        exclude=exclude,
        mapping=_path(mapping, "mapping"),
        hf_index=_path(hf_index, "hf_index"),
        max_shard_size=max_shard_size,
        unmapped=unmapped,
        threads=threads,
        dry_run=dry_run,
        ranks=ranks,
        ranks_per_node=ranks_per_node,
        overwrite=overwrite,
        resume=resume,
        hf_assets=_path(hf_assets, "hf_assets"),
        staging_dir=_path(staging_dir, "staging_dir"),
        no_hf_metadata=no_hf_metadata,
        keep_top_level_key=keep_top_level_key,
        keep_tied=keep_tied,
        exclude_frozen_parameters=exclude_frozen_parameters,
        index_name=index_name,
        verify=verify,
        verify_only=verify_only,
        allow_missing_shard_files=allow_missing_shard_files,
        source_ranks=source_ranks,
        progress=progress,
        report=_path(report, "report"),
        schedule=schedule,
        headers=headers,
        dtype=_cast_name(dtype),
        dtype_map=dtype_map if isinstance(dtype_map, dict) else _path(dtype_map, "dtype_map"),
        strip_prefix=strip_prefix,
        command_line=_command_line("st_consolidate.consolidate", input_dir, output_dir),
    )
    return _invoke(input_dir, output_dir, options, _communicator(process_group))


def _path(value, name="path"):
    """A path given as str, bytes or os.PathLike, as a str (None stays
    None). Bytes that are not UTF-8 become lone surrogates, as os.fsdecode
    makes them, which the extension turns back into the same bytes: a
    folder whose name is not UTF-8 is found."""
    if value is None:
        return None
    try:
        return os.fsdecode(os.fspath(value))
    except TypeError:
        raise InputError(
            f"{name}={value!r} is not a path\n  hint: pass a str, bytes or os.PathLike such as pathlib.Path"
        ) from None


def _shown(path):
    """A path for messages and the report's command line: valid text, the
    bytes that are not UTF-8 shown as \\xNN escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _command_line(caller, input_dir, output_dir):
    return [caller, _shown(_path(input_dir, "input_dir")), _shown(_path(output_dir, "output_dir"))]


def _count(value):
    """``value`` as an int if it is one (an int, a numpy or 0-d torch
    integer: what ``operator.index`` takes), else None. A bool is no count,
    and a float is not taken even when whole: PyTorch's names would show
    it as "2.0"."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _file_indices(mapping):
    """``fqn_to_index_mapping`` checked: every value an output file index
    (an integer from 1), or an InputError naming the tensor and the value.
    PyTorch formats the value into the file name, so 1.7, True, 0 or -1
    give files named model-001.7-of-..., model-0True-of-...; a string makes
    it crash."""
    if not isinstance(mapping, collections.abc.Mapping):
        raise InputError(
            f"fqn_to_index_mapping={type(mapping).__name__} is not a dict\n"
            f"  hint: pass a dict {{tensor name: output file index from 1}}, or None for one file"
        )
    checked = {}
    for name, value in mapping.items():
        index = _count(value)
        if index is None or not 1 <= index < 2**64:
            raise InputError(
                f"fqn_to_index_mapping: tensor '{name}' maps to {value!r}, not an output file index\n"
                f"  hint: indices are integers from 1, the I of model-0000I-of-0000N.safetensors"
            )
        checked[str(name)] = index
    if not checked:
        # Every tensor would be left out, and an earlier output replaced by
        # an empty index; PyTorch's consolidate_safetensors_files crashes.
        raise InputError(
            "fqn_to_index_mapping is empty: every tensor would be left out\n"
            "  hint: pass the mapping the checkpoint was saved with, or None for one file"
        )
    return checked


def _thread_count(num_threads):
    """``num_threads`` as the library's ``threads``: any positive integer
    (the library uses as many as help); 0 and negative values mean one
    thread, as PyTorch's and NeMo's consolidation take them (they copy
    sequentially for ``num_threads <= 1``)."""
    count = _count(num_threads)
    if count is None:
        raise InputError(
            f"num_threads={num_threads!r} is not an integer\n  hint: pass the number of threads, such as 4"
        )
    return max(1, count)


def _dropin_options(fqn_to_index_mapping, num_threads, cast_dtype, fqn_to_dtype_mapping):
    """What the drop-ins ask of the library: the shards given, the mapping
    given (None: one file), tensors it does not name left out with one
    warning (as PyTorch does), existing outputs replaced (a restarted job
    saves again), nothing detected or copied besides the weights."""
    if fqn_to_index_mapping is not None:
        fqn_to_index_mapping = _file_indices(fqn_to_index_mapping)
    if fqn_to_dtype_mapping is not None:
        fqn_to_dtype_mapping = {str(k): str(v) for k, v in fqn_to_dtype_mapping.items()}
    return dict(
        input_format="hf-shards",
        fqn_to_index_mapping=fqn_to_index_mapping,
        unmapped="omit",
        # Under the drop-ins' names, which the library's messages then use.
        num_threads=_thread_count(num_threads),
        overwrite=True,
        no_hf_metadata=True,
        cast_dtype=_cast_name(cast_dtype),
        fqn_to_dtype_mapping=fqn_to_dtype_mapping,
    )


def _dropin(input_dir, output_dir, options, communicator, use_staging, staging_dir):
    input_dir = _path(input_dir, "input_dir")
    output_dir = _path(output_dir, "output_dir")
    staging_dir = _path(staging_dir, "staging_dir")
    options["command_line"] = _command_line("st_consolidate drop-in", input_dir, output_dir)
    if use_staging:
        # Each rank builds in a new folder of its own under staging_dir (the
        # system's temporary folder by default, as NeMo's mkdtemp), and the
        # library publishes from there as it publishes any run.
        options["staging_dir"] = staging_dir if staging_dir is not None else tempfile.gettempdir()
    _invoke(input_dir, output_dir, options, communicator)


def consolidate_safetensors_files(
    input_dir,
    output_dir,
    fqn_to_index_mapping=None,
    num_threads=1,
    use_staging=False,
    staging_dir=None,
    cast_dtype=None,
    fqn_to_dtype_mapping=None,
):
    """Drop-in for PyTorch's and NeMo's ``consolidate_safetensors_files``:
    the same output, atomically published, index last. Always one process
    (PyTorch's writer calls it on one rank while the others wait).
    ``fqn_to_index_mapping=None`` writes one file. Returns None."""
    options = _dropin_options(fqn_to_index_mapping, num_threads, cast_dtype, fqn_to_dtype_mapping)
    _dropin(input_dir, output_dir, options, None, use_staging, staging_dir)


def consolidate_safetensors_files_on_every_rank(
    input_dir,
    output_dir,
    fqn_to_index_mapping,
    num_threads=1,
    process_group=None,
    use_staging=False,
    staging_dir=None,
    cast_dtype=None,
    fqn_to_dtype_mapping=None,
):
    """Drop-in for ``consolidate_safetensors_files_on_every_rank``: every
    rank of ``process_group`` (default: the default group; one process if
    torch.distributed is not initialized) writes its share of the files. A
    failure on any rank raises on every rank with the same message. Returns
    None."""
    options = _dropin_options(fqn_to_index_mapping, num_threads, cast_dtype, fqn_to_dtype_mapping)
    _dropin(input_dir, output_dir, options, _communicator(process_group), use_staging, staging_dir)
