"""The options' rules are the library's (src/options.rs), shared with the
command: the same cases are refused with the same reason and hint (each
naming the options as its user spells them), the command's spellings work
from Python and NeMo's from both, any positive thread count works, and the
private command_line never reaches a message."""

import json
import logging
import os
import subprocess

import pytest
import torch
from conftest import REPO, read_outputs, write_shards

import st_consolidate
from st_consolidate import _native

CASES = json.loads((REPO / "tests" / "option_cases.json").read_text())["refused"]
BIN = REPO / "target" / "release" / "st-consolidate-mpi"


def tensors():
    g = torch.Generator().manual_seed(3)
    return {
        "a": torch.randn(6, 5, generator=g),
        "b": torch.randn(7, 3, generator=g).half(),
        "c": torch.randn(4, 4, generator=g).bfloat16(),
        "i": torch.arange(8, dtype=torch.int32),
    }


@pytest.fixture
def shards(tmp):
    write_shards(tmp / "in", tensors())
    return tmp / "in"


@pytest.mark.parametrize("case", CASES, ids=[" ".join(c["args"]) for c in CASES])
def test_the_shared_cases_are_refused_as_the_command_refuses_them(case, shards, tmp):
    with pytest.raises(st_consolidate.InputError) as caught:
        st_consolidate.consolidate(shards, tmp / "out", **case["keywords"])
    assert isinstance(caught.value, ValueError)
    reason, hint = case["python"]
    lines = str(caught.value).split("\n")
    assert lines[0] == reason, caught.value
    assert lines[1].startswith(f"  hint: {hint}"), caught.value
    assert len(lines) == 2, caught.value
    assert not (tmp / "out").exists()


def test_the_command_says_the_same_as_python_for_every_shared_case(shards, tmp):
    """Both front ends side by side, the binary run when it is built
    (scripts/test.sh builds it before the Python tests): each says its
    line of the shared table."""
    if not BIN.exists():
        pytest.skip("target/release/st-consolidate-mpi is not built")
    for case in CASES:
        run = subprocess.run(
            [BIN, *case["args"], shards, tmp / "out"], capture_output=True, text=True
        )
        assert run.returncode == 2, run.stderr
        command_lines = run.stderr.removeprefix("st-consolidate-mpi: error: ").rstrip("\n").split("\n")
        with pytest.raises(st_consolidate.InputError) as caught:
            st_consolidate.consolidate(shards, tmp / "out", **case["keywords"])
        python_lines = str(caught.value).split("\n")
        assert command_lines[0] == case["command"][0], run.stderr
        assert python_lines[0] == case["python"][0], caught.value
        assert len(command_lines) == len(python_lines) == 2
        assert command_lines[1].startswith(f"  hint: {case['command'][1]}"), run.stderr
        assert python_lines[1].startswith(f"  hint: {case['python'][1]}"), caught.value


def outputs(folder):
    found, index = read_outputs(folder)
    return found, index


@pytest.mark.parametrize(
    "spellings",
    [
        ["f32", "F32", "fp32", "float32", "torch.float32", torch.float32, torch.float],
        ["bf16", "bfloat16", "BF-16", torch.bfloat16],
        ["f16", "fp16", "half", torch.float16, torch.half],
        ["f64", "double", torch.float64],
    ],
    ids=["f32", "bf16", "f16", "f64"],
)
def test_the_commands_and_nemos_dtype_names_and_torch_dtypes_cast_alike(spellings, shards, tmp):
    results = []
    for n, dtype in enumerate(spellings):
        st_consolidate.consolidate(shards, tmp / f"out{n}", dtype=dtype, progress=0)
        results.append(outputs(tmp / f"out{n}"))
    assert all(r == results[0] for r in results), spellings
    found = results[0][0]
    wanted = {"f32": "F32", "bf16": "BF16", "f16": "F16", "f64": "F64"}[spellings[0]]
    assert {name: found[name][0] for name in found} == {"a": wanted, "b": wanted, "c": wanted, "i": "I32"}
    if BIN.exists():
        # The command, given NeMo's name, writes the same bytes.
        subprocess.run(
            [BIN, "-q", "--dtype", f"torch.{str(spellings[-1]).removeprefix('torch.')}", shards, tmp / "cli"],
            check=True,
        )
        assert outputs(tmp / "cli") == results[0]


def test_a_drop_in_takes_the_commands_dtype_names(shards, tmp):
    mapping = {name: 1 for name in tensors()}
    st_consolidate.consolidate_safetensors_files(shards, tmp / "f32", mapping, cast_dtype="f32")
    st_consolidate.consolidate_safetensors_files(shards, tmp / "torch", mapping, cast_dtype=torch.float32)
    assert outputs(tmp / "f32") == outputs(tmp / "torch")
    assert outputs(tmp / "f32")[0]["b"][0] == "F32"


def test_any_positive_thread_count_works_and_others_are_refused(shards, tmp):
    for n, threads in enumerate([1, 1025, 10**6, 10**30]):
        summary = st_consolidate.consolidate(shards, tmp / f"out{n}", threads=threads, progress=0)
        assert summary.report["threads_per_rank"] == [min(threads, 1024)]
        assert outputs(tmp / f"out{n}") == outputs(tmp / "out0")
    for threads, shown in [(0, "0"), (-1, "-1"), (-(10**30), str(-(2**63))), (2.5, "2.5"), ("4", "'4'")]:
        with pytest.raises(st_consolidate.InputError) as caught:
            st_consolidate.consolidate(shards, tmp / "bad", threads=threads)
        assert str(caught.value).startswith(f"threads={shown} is not accepted\n  hint: threads takes a positive"), caught.value
    assert not (tmp / "bad").exists()


def native(input_dir, output_dir, options):
    return _native.consolidate(os.fspath(input_dir), os.fspath(output_dir), options, None, logging.getLogger("t"))


def test_the_drop_ins_names_are_taken_and_named_in_messages(shards, tmp):
    """num_threads, cast_dtype, fqn_to_index_mapping, fqn_to_dtype_mapping:
    the drop-ins' keywords are the options they stand for, and a message
    about one names it as the caller did."""
    for options, reason in [
        ({"cast_dtype": "torch.int8"}, "cast_dtype=torch.int8 is not accepted"),
        ({"num_threads": 0}, "num_threads=0 is not accepted"),
        (
            {"fqn_to_index_mapping": {"a": 1.7}},
            "fqn_to_index_mapping: tensor 'a' has the file index 1.7, which is not an integer from 1",
        ),
        (
            {"fqn_to_index_mapping": {"a": -1}},
            "fqn_to_index_mapping: tensor 'a' has the file index -1, which is not an integer from 1",
        ),
        (
            {"fqn_to_index_mapping": {"a": 1}, "max_shard_size": "1GB"},
            "fqn_to_index_mapping and max_shard_size both say which tensor goes to which file",
        ),
        ({"threads": 2, "num_threads": 2}, "threads and num_threads are the same option, given twice"),
        ({"fqn_to_dtype_mapping": {"a": 3}}, "fqn_to_dtype_mapping: tensor 'a' has 3, which is not a dtype name"),
    ]:
        with pytest.raises(st_consolidate.InputError) as caught:
            native(shards, tmp / "out", options)
        assert str(caught.value).split("\n")[0] == reason, caught.value
    native(shards, tmp / "out", {"num_threads": 10**9, "cast_dtype": "bfloat16", "unmapped": "omit"})
    assert outputs(tmp / "out")[0]["a"][0] == "BF16"


def test_command_line_is_private(shards, tmp):
    with pytest.raises(st_consolidate.InputError) as caught:
        native(shards, tmp / "out", {"bogus": 1, "command_line": ["x"]})
    text = str(caught.value)
    assert text.startswith("unknown option 'bogus'") and "num_threads" in text, text
    assert "command_line" not in text
    # Whatever it holds (bytes of a non-UTF-8 name, not even a string) is
    # recorded, never refused.
    summary = native(shards, tmp / "out", {"command_line": [b"tool", b"in\xff", 3], "progress": 0})
    assert json.loads(summary["report"])["command_line"] == ["tool", "in\ufffd", "3"]
    summary = st_consolidate.consolidate(shards, tmp / "out2", progress=0)
    assert summary.report["command_line"] == ["st_consolidate.consolidate", str(shards), str(tmp / "out2")]


def test_a_bytes_path_with_a_non_utf8_name_is_a_path(shards, tmp):
    report = os.fsencode(tmp) + b"/report-\xff.json"
    st_consolidate.consolidate(shards, tmp / "out", report=report, progress=0)
    assert json.loads(open(report, "rb").read())["outputs"]
