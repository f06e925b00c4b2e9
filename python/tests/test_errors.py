"""Bad inputs raise a ValueError (and RuntimeError) naming the file and the
tensor, and leave nothing under a final name."""

import json
import struct
import sys

import pytest
import torch
from conftest import write_shards

import st_consolidate


def final_names(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


def rewrite_header(path, edit):
    """Edits a safetensors header in place, keeping its length (padded
    with spaces, as the format allows)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    path.write_bytes(data[:8] + text.ljust(n) + data[8 + n :])


def test_a_tensor_whose_shape_does_not_fit_its_bytes_names_the_file_and_the_tensor(tmp):
    mapping = write_shards(tmp / "in", {"w": torch.randn(8, 4), "z": torch.randn(8)})
    shard = sorted((tmp / "in").glob("*.safetensors"))[0]
    rewrite_header(shard, lambda h: h["w"].update(shape=[3, 4]))
    before = {p: p.read_bytes() for p in (tmp / "in").iterdir()}
    with pytest.raises(ValueError) as caught:
        st_consolidate.consolidate_safetensors_files(tmp / "in", tmp / "out", mapping)
    assert isinstance(caught.value, RuntimeError)
    assert shard.name in str(caught.value) and "'w'" in str(caught.value), caught.value
    assert final_names(tmp / "out") == []
    assert {p: p.read_bytes() for p in (tmp / "in").iterdir()} == before


def test_a_file_without_sharding_info_is_named(tmp):
    from safetensors.torch import save_file

    mapping = write_shards(tmp / "in", {"w": torch.randn(4, 4)})
    save_file({"x": torch.zeros(2)}, str(tmp / "in" / "stray.safetensors"))
    with pytest.raises(ValueError, match="stray.safetensors"):
        st_consolidate.consolidate_safetensors_files(tmp / "in", tmp / "out", mapping)
    assert final_names(tmp / "out") == []


def test_pieces_that_do_not_tile_a_tensor_name_it(tmp):
    tensors = {"w": torch.randn(8, 4)}
    mapping = write_shards(tmp / "in", tensors, ranks=2)
    def overlap(header):
        info = json.loads(header["__metadata__"]["DCP_SHARDING_INFO"])
        info["w"]["saved_offsets"] = [2, 0]  # rows 2-3 twice, 6-7 never
        header["__metadata__"]["DCP_SHARDING_INFO"] = json.dumps(info)

    rewrite_header(sorted((tmp / "in").glob("shard-00002-*"))[0], overlap)
    with pytest.raises(ValueError, match="'w'"):
        st_consolidate.consolidate_safetensors_files(tmp / "in", tmp / "out", mapping)
    assert final_names(tmp / "out") == []


def test_other_failures_are_runtime_errors_not_value_errors(tmp):
    mapping = write_shards(tmp / "in", {"w": torch.randn(4, 4)})
    (tmp / "out").write_text("a file where the output folder should be")
    with pytest.raises(st_consolidate.ConsolidationError) as caught:
        st_consolidate.consolidate_safetensors_files(tmp / "in", tmp / "out", mapping)
    assert isinstance(caught.value, RuntimeError)


def test_importing_does_not_import_torch():
    import subprocess

    code = "import sys, st_consolidate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_consolidate_returns_a_summary(tmp):
    write_shards(tmp / "in", {"w": torch.randn(4, 4), "b": torch.randn(4)})
    summary = st_consolidate.consolidate(tmp / "in", tmp / "out", max_shard_size=64, verify=True)
    assert summary.files == 2 and summary.bytes == 80
    assert summary.report["world_size"] == 1
    plan = st_consolidate.consolidate(tmp / "in", tmp / "plan", dry_run=True)
    assert "model-00001-of-00001.safetensors" in plan.plan and not (tmp / "plan").exists()
    with pytest.raises(ValueError, match="schedule"):
        st_consolidate.consolidate(tmp / "in", tmp / "x", schedule="fastest")
