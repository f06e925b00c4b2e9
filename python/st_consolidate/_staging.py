"""``use_staging``: the files are built in a staging folder (``staging_dir``,
or the system's temporary folder), then copied into ``output_dir`` and
published there atomically: each file under a temporary name, synced,
renamed, the index last. The library builds them as it builds any output;
rank 0 copies them once every rank has finished, and every rank learns
whether that worked."""

import contextlib
import hashlib
import os
import shutil
import tempfile

from ._errors import ConsolidationError

INDEX = "model.safetensors.index.json"


def _build_dir(output_dir, staging_dir):
    root = staging_dir if staging_dir is not None else tempfile.gettempdir()
    # The same name on every rank, and one per output folder.
    digest = hashlib.sha256(os.path.abspath(os.fspath(output_dir)).encode()).hexdigest()[:16]
    return os.path.join(os.fspath(root), f"st-consolidate-staging-{digest}")


def _publish(build_dir, output_dir):
    os.makedirs(output_dir, exist_ok=True)
    names = sorted(n for n in os.listdir(build_dir) if n.endswith(".safetensors"))
    # The index last: a reader never sees one that names a missing file.
    if os.path.exists(os.path.join(build_dir, INDEX)):
        names.append(INDEX)
    for name in names:
        final = os.path.join(output_dir, name)
        temp = os.path.join(output_dir, f".{name}.st-consolidate-staging.tmp")
        try:
            with open(os.path.join(build_dir, name), "rb") as src, open(temp, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(temp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temp)
    fd = os.open(output_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(build_dir, ignore_errors=True)


@contextlib.contextmanager
def staged(output_dir, staging_dir, communicator):
    """Yields the folder to build in; after the build, publishes it into
    ``output_dir`` (rank 0) and agrees on the outcome (every rank)."""
    build_dir = _build_dir(output_dir, staging_dir)
    yield build_dir
    rank = communicator.rank if communicator is not None else 0
    error = None
    if rank == 0:
        try:
            _publish(build_dir, os.fspath(output_dir))
        except OSError as e:
            error = e
    if communicator is not None:
        failed = communicator.lowest_failed(error is not None)
        if failed is not None and error is None:
            raise ConsolidationError(
                f"rank {failed} failed: cannot publish the staged files into {output_dir}"
            )
    if error is not None:
        raise ConsolidationError(
            f"rank 0 failed: cannot publish the staged files from {build_dir} into {output_dir}: {error}\n"
            f"  hint: check the space and permissions of {output_dir}; the built files stay in {build_dir}"
        ) from error
