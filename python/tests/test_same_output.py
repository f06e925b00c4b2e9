"""The drop-ins write what PyTorch's and NeMo's functions write: every
tensor's name, dtype, shape and bytes, and the index's weight_map and
total_size."""

import json
import shutil

import pytest
import torch
from conftest import FIXTURES, NEMO_PEER, TORCH_PEER, assert_same_output, write_shards

import st_consolidate

HF_FIXTURES = ["torch-dcp-w2", "torch-edge/consolidated"]


def fixture_input(name, tmp):
    src = FIXTURES / name
    if (src / "sharded").is_dir():
        src = src / "sharded"
    dst = tmp / "in"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.json", "*.md"))
    return dst


def mapping_of(folder):
    from safetensors import safe_open

    names = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                names[name] = int(path.name.split("-model-")[1][:5])
    return names


@pytest.mark.parametrize("fixture", HF_FIXTURES)
@pytest.mark.parametrize("peer", [TORCH_PEER, NEMO_PEER], ids=["torch", "nemo"])
def test_committed_fixtures(fixture, peer, tmp):
    src = fixture_input(fixture, tmp)
    mapping = mapping_of(src)
    st_consolidate.consolidate_safetensors_files(src, tmp / "ours", mapping, num_threads=5)
    peer(str(src), str(tmp / "theirs"), mapping, num_threads=5)
    assert_same_output(tmp / "ours", tmp / "theirs")


def float_tensors():
    g = torch.Generator().manual_seed(1)
    return {
        "a.f32": torch.randn(6, 5, generator=g),
        "b.f16": torch.randn(7, 3, generator=g).half(),
        "c.bf16": torch.randn(4, 4, generator=g).bfloat16(),
        "d.f64": torch.randn(5, generator=g).double(),
        "e.vec": torch.randn(3, generator=g),
    }


def all_dtype_tensors():
    g = torch.Generator().manual_seed(2)
    t = float_tensors()
    t.update(
        {
            "i.i64": torch.randint(-(2**40), 2**40, (5, 2), generator=g),
            "i.i32": torch.randint(-1000, 1000, (3, 3), generator=g).int(),
            "i.i16": torch.randint(-1000, 1000, (4,), generator=g).short(),
            "i.i8": torch.randint(-100, 100, (9,), generator=g).to(torch.int8),
            "i.u8": torch.randint(0, 255, (6, 2), generator=g).to(torch.uint8),
            "j.bool": torch.randint(0, 2, (5, 3), generator=g).bool(),
            "k.fp8e4m3": torch.randn(6, 4, generator=g).to(torch.float8_e4m3fn),
            "k.fp8e5m2": torch.randn(5, 4, generator=g).to(torch.float8_e5m2),
        }
    )
    return t


def test_generated_float_checkpoint_matches_both_peers(tmp):
    mapping = write_shards(tmp / "in", float_tensors(), {"a.f32": 1, "b.f16": 2, "c.bf16": 2, "d.f64": 3, "e.vec": 3})
    st_consolidate.consolidate_safetensors_files(tmp / "in", tmp / "ours", mapping)
    for name, peer in [("torch", TORCH_PEER), ("nemo", NEMO_PEER)]:
        peer(str(tmp / "in"), str(tmp / name), mapping)
        assert_same_output(tmp / "ours", tmp / name)


def test_every_dtype_matches_nemo_where_pytorch_crashes(tmp):
    tensors = all_dtype_tensors()
    mapping = {name: 1 + i % 3 for i, name in enumerate(sorted(tensors))}
    write_shards(tmp / "in", tensors, mapping, ranks=3)
    st_consolidate.consolidate_safetensors_files(tmp / "in", tmp / "ours", mapping, num_threads=2)
    NEMO_PEER(str(tmp / "in"), str(tmp / "nemo"), mapping, num_threads=2)
    assert_same_output(tmp / "ours", tmp / "nemo")
    with pytest.raises(Exception):  # PyTorch 2.15 takes element sizes from torch.finfo
        TORCH_PEER(str(tmp / "in"), str(tmp / "torch"), mapping)


@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float16, "fp32", "float64"])
def test_cast_dtype_matches_nemo(cast, tmp):
    tensors = all_dtype_tensors()
    mapping = write_shards(tmp / "in", tensors)
    st_consolidate.consolidate_safetensors_files(tmp / "in", tmp / "ours", mapping, cast_dtype=cast)
    from nemo_automodel.components.checkpoint._backports.consolidate_hf_safetensors import (
        resolve_dtype_cast,
    )

    nemo_cast = cast if isinstance(cast, torch.dtype) else resolve_dtype_cast(cast)
    NEMO_PEER(str(tmp / "in"), str(tmp / "nemo"), mapping, cast_dtype=nemo_cast)
    assert_same_output(tmp / "ours", tmp / "nemo")


def test_a_non_float_cast_is_a_value_error(tmp):
    mapping = write_shards(tmp / "in", float_tensors())
    with pytest.raises(ValueError, match="cast_dtype=torch.int8"):
        st_consolidate.consolidate_safetensors_files(tmp / "in", tmp / "ours", mapping, cast_dtype=torch.int8)
    assert not (tmp / "ours").exists() or not list((tmp / "ours").glob("*.safetensors"))


def test_fqn_to_dtype_mapping_matches_nemo(tmp):
    tensors = all_dtype_tensors()
    tensors["a.f32"] = tensors["a.f32"].bfloat16()  # saved as bf16, originally f32
    tensors["c.bf16"] = tensors["c.bf16"].float()  # saved as f32, originally bf16
    mapping = write_shards(tmp / "in", tensors)
    dtypes = {"a.f32": "F32", "c.bf16": "BF16", "b.f16": "F8_E4M3", "i.i32": "F32", "gone": "F16"}
    st_consolidate.consolidate_safetensors_files(tmp / "in", tmp / "ours", mapping, fqn_to_dtype_mapping=dtypes)
    NEMO_PEER(str(tmp / "in"), str(tmp / "nemo"), mapping, fqn_to_dtype_mapping=dtypes)
    assert_same_output(tmp / "ours", tmp / "nemo")


def test_no_mapping_is_one_file_as_the_peers_given_every_fqn_to_1(tmp):
    tensors = float_tensors()
    write_shards(tmp / "in", tensors, {n: 1 + i % 2 for i, n in enumerate(tensors)})
    st_consolidate.consolidate_safetensors_files(tmp / "in", tmp / "ours", None)
    ones = {name: 1 for name in tensors}
    for name, peer in [("torch", TORCH_PEER), ("nemo", NEMO_PEER)]:
        peer(str(tmp / "in"), str(tmp / name), ones)
        assert_same_output(tmp / "ours", tmp / name)
    index = json.loads((tmp / "ours" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}


def test_tensors_the_mapping_does_not_name_are_left_out_with_one_warning(tmp, caplog):
    tensors = float_tensors()
    write_shards(tmp / "in", tensors)
    partial = {name: 1 for name in list(tensors)[:3]}
    with caplog.at_level("WARNING", logger="st_consolidate"):
        st_consolidate.consolidate_safetensors_files(tmp / "in", tmp / "ours", partial)
    TORCH_PEER(str(tmp / "in"), str(tmp / "torch"), partial)
    assert_same_output(tmp / "ours", tmp / "torch")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "d.f64" in warnings[0] and "e.vec" in warnings[0], warnings


def test_existing_outputs_are_replaced_and_staging_publishes(tmp):
    mapping = write_shards(tmp / "in", float_tensors())
    st_consolidate.consolidate_safetensors_files(tmp / "in", tmp / "ours", mapping)
    st_consolidate.consolidate_safetensors_files(
        tmp / "in", tmp / "ours", mapping, use_staging=True, staging_dir=tmp / "stage"
    )
    TORCH_PEER(str(tmp / "in"), str(tmp / "torch"), mapping)
    assert_same_output(tmp / "ours", tmp / "torch")
    assert list((tmp / "stage").iterdir()) == []
