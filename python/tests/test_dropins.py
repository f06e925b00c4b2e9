"""The drop-ins take what PyTorch's consolidate_safetensors_files takes and
refuse clearly what makes it crash or mangle its output: each case runs
PyTorch 2.15's own function on the same call first, then ours."""

import json
import os
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TORCH_PEER, assert_same_output, read_outputs, run_torchrun, write_shards

import st_consolidate

WORKER = Path(__file__).with_name("dist_dropins_worker.py")


def tensors():
    g = torch.Generator().manual_seed(24)
    return {
        "a.weight": torch.randn(8, 3, generator=g),
        "b.weight": torch.randn(6, generator=g),
        "c.weight": torch.randn(4, 5, generator=g),
    }


def saved(folder, mapping=None):
    """A checkpoint as two ranks of HuggingFaceStorageWriter save it, with
    `mapping`'s file indices in its shard names."""
    write_shards(folder, tensors(), mapping, ranks=2)
    return folder


def names(folder):
    return sorted(os.listdir(folder))


GAPS = {"a.weight": 1, "b.weight": 3, "c.weight": 2000}


def test_a_mapping_with_gaps_writes_the_files_pytorch_writes(tmp):
    inp = saved(tmp / "in", GAPS)
    TORCH_PEER(str(inp), str(tmp / "peer"), GAPS)
    st_consolidate.consolidate_safetensors_files(str(inp), str(tmp / "ours"), GAPS)
    expected = [
        "model-00001-of-02000.safetensors",
        "model-00003-of-02000.safetensors",
        "model-02000-of-02000.safetensors",
        "model.safetensors.index.json",
    ]
    assert names(tmp / "peer") == expected
    assert names(tmp / "ours") == expected
    assert_same_output(tmp / "ours", tmp / "peer")
    st_consolidate.consolidate_safetensors_files_on_every_rank(str(inp), str(tmp / "every"), GAPS)
    assert names(tmp / "every") == expected
    assert_same_output(tmp / "every", tmp / "peer")


def file_names_made_by(peer, inp, out, mapping):
    """The names of the files `peer` writes for `mapping`, or the
    exception it raises."""
    try:
        peer(str(inp), str(out), mapping)
    except Exception as e:
        return e
    return names(out)


@pytest.mark.parametrize(
    "value, pytorch_makes",
    [
        (1.7, "model-001.7-of-00002.safetensors"),
        (2.0, "model-002.0-of-002.0.safetensors"),
        (True, "model-0True-of-00002.safetensors"),
        (0, "model-00000-of-00002.safetensors"),
        (-1, "model--0001-of-00002.safetensors"),
        ("abc", TypeError),
        ("2", TypeError),
        (None, TypeError),
    ],
)
def test_a_mapping_value_that_is_not_an_index_is_refused_naming_tensor_and_value(tmp, value, pytorch_makes):
    inp = saved(tmp / "in", {"a.weight": 1, "b.weight": 2, "c.weight": 2})
    mapping = {"a.weight": 1, "b.weight": value, "c.weight": 2}
    got = file_names_made_by(TORCH_PEER, inp, tmp / "peer", mapping)
    if isinstance(pytorch_makes, str):
        assert pytorch_makes in got  # a file named after the value: mangled
    else:
        assert isinstance(got, pytorch_makes)  # PyTorch crashes
    for call in [
        st_consolidate.consolidate_safetensors_files,
        st_consolidate.consolidate_safetensors_files_on_every_rank,
    ]:
        with pytest.raises(st_consolidate.InputError) as caught:
            call(str(inp), str(tmp / "ours"), mapping)
        assert str(caught.value).startswith(
            f"fqn_to_index_mapping: tensor 'b.weight' maps to {value!r}, not an output file index\n  hint: "
        )
        assert not (tmp / "ours").exists()


@pytest.mark.parametrize("value", [np.int64(2), np.int32(2), torch.tensor(2), torch.tensor(2, dtype=torch.int16)])
def test_numpy_and_torch_integers_are_indices_as_for_pytorch(tmp, value):
    inp = saved(tmp / "in", {"a.weight": 1, "b.weight": 2, "c.weight": 2})
    mapping = {"a.weight": 1, "b.weight": value, "c.weight": 2}
    TORCH_PEER(str(inp), str(tmp / "peer"), mapping)
    st_consolidate.consolidate_safetensors_files(str(inp), str(tmp / "ours"), mapping)
    assert names(tmp / "ours") == names(tmp / "peer")
    assert_same_output(tmp / "ours", tmp / "peer")


def test_a_mapping_that_is_not_a_dict_is_refused(tmp):
    inp = saved(tmp / "in")
    with pytest.raises(AttributeError):
        TORCH_PEER(str(inp), str(tmp / "peer"), [("a.weight", 1)])
    with pytest.raises(st_consolidate.InputError, match=r"^fqn_to_index_mapping=list is not a dict\n  hint: "):
        st_consolidate.consolidate_safetensors_files(str(inp), str(tmp / "ours"), [("a.weight", 1)])


def test_an_empty_mapping_is_refused_rather_than_an_empty_output(tmp):
    inp = saved(tmp / "in")
    with pytest.raises(ValueError, match="max"):
        TORCH_PEER(str(inp), str(tmp / "peer"), {})
    for call in [
        st_consolidate.consolidate_safetensors_files,
        st_consolidate.consolidate_safetensors_files_on_every_rank,
    ]:
        with pytest.raises(
            st_consolidate.InputError, match=r"^fqn_to_index_mapping is empty: every tensor would be left out\n"
        ):
            call(str(inp), str(tmp / "ours"), {})
    assert not (tmp / "ours").exists()


MAPPING = {"a.weight": 1, "b.weight": 2, "c.weight": 3}


@pytest.mark.parametrize("num_threads", [0, -1, 1, 3, np.int64(2)])
def test_any_integer_thread_count_pytorch_takes_works(tmp, num_threads):
    # PyTorch copies sequentially for num_threads <= 1, 0 and -1 included.
    inp = saved(tmp / "in", MAPPING)
    TORCH_PEER(str(inp), str(tmp / "peer"), MAPPING, num_threads=num_threads)
    st_consolidate.consolidate_safetensors_files(str(inp), str(tmp / "ours"), MAPPING, num_threads=num_threads)
    assert_same_output(tmp / "ours", tmp / "peer")


def test_many_threads_work(tmp):
    inp = saved(tmp / "in", MAPPING)
    TORCH_PEER(str(inp), str(tmp / "peer"), MAPPING, num_threads=5000)
    st_consolidate.consolidate_safetensors_files(str(inp), str(tmp / "ours"), MAPPING, num_threads=5000)
    assert_same_output(tmp / "ours", tmp / "peer")


@pytest.mark.parametrize("num_threads, pytorch_raises", [("2", TypeError), (2.5, None), (None, TypeError)])
def test_a_thread_count_that_is_not_an_integer_is_refused(tmp, num_threads, pytorch_raises):
    inp = saved(tmp / "in", MAPPING)
    if pytorch_raises:
        with pytest.raises(pytorch_raises):
            TORCH_PEER(str(inp), str(tmp / "peer"), MAPPING, num_threads=num_threads)
    else:
        # 2.5 reaches ThreadPoolExecutor, which happens to take it.
        TORCH_PEER(str(inp), str(tmp / "peer"), MAPPING, num_threads=num_threads)
    with pytest.raises(st_consolidate.InputError) as caught:
        st_consolidate.consolidate_safetensors_files(str(inp), str(tmp / "ours"), MAPPING, num_threads=num_threads)
    assert str(caught.value).startswith(f"num_threads={num_threads!r} is not an integer\n  hint: ")


# A folder name that is not UTF-8, as Linux allows.
LATIN1 = b"caf\xe9"


@pytest.mark.parametrize("form", ["bytes", "str", "pathlib"])
def test_paths_as_str_bytes_or_pathlike_work_whatever_their_bytes(tmp, form):
    root = os.fsencode(tmp)
    inp = root + b"/in-" + LATIN1
    saved(os.fsdecode(inp), MAPPING)
    # PyTorch's function takes str and PathLike ones...
    TORCH_PEER(os.fsdecode(inp), os.fsdecode(root + b"/peer-" + LATIN1), MAPPING)
    # ...but not bytes.
    with pytest.raises(TypeError, match="Can't mix strings and bytes"):
        TORCH_PEER(inp, root + b"/peer-bytes-" + LATIN1, MAPPING)
    out = root + b"/ours-" + LATIN1
    given = {
        "bytes": lambda p: p,
        "str": os.fsdecode,
        "pathlib": lambda p: pathlib.Path(os.fsdecode(p)),
    }[form]
    st_consolidate.consolidate_safetensors_files(given(inp), given(out), MAPPING)
    assert os.path.isdir(out)
    assert_same_output(os.fsdecode(out), os.fsdecode(root + b"/peer-" + LATIN1))
    every = root + b"/every-" + LATIN1
    st_consolidate.consolidate_safetensors_files_on_every_rank(given(inp), given(every), MAPPING)
    assert_same_output(os.fsdecode(every), os.fsdecode(root + b"/peer-" + LATIN1))


def test_a_staging_dir_that_is_not_utf8_works(tmp):
    root = os.fsencode(tmp)
    inp = saved(tmp / "in", MAPPING)
    TORCH_PEER(str(inp), str(tmp / "peer"), MAPPING)
    staging = root + b"/staging-" + LATIN1
    os.mkdir(staging)
    st_consolidate.consolidate_safetensors_files(inp, tmp / "ours", MAPPING, use_staging=True, staging_dir=staging)
    assert_same_output(tmp / "ours", tmp / "peer")


def test_a_path_that_is_no_path_is_refused_naming_the_argument(tmp):
    inp = saved(tmp / "in", MAPPING)
    with pytest.raises(TypeError):
        TORCH_PEER(str(inp), 7, MAPPING)
    with pytest.raises(st_consolidate.InputError, match=r"^output_dir=7 is not a path\n  hint: pass a str, bytes"):
        st_consolidate.consolidate_safetensors_files(str(inp), 7, MAPPING)
    with pytest.raises(st_consolidate.InputError, match=r"^staging_dir=1.5 is not a path\n"):
        st_consolidate.consolidate_safetensors_files(str(inp), tmp / "o", MAPPING, use_staging=True, staging_dir=1.5)


def test_the_report_shows_bytes_that_are_not_utf8_as_escapes(tmp):
    root = os.fsencode(tmp)
    inp = root + b"/in-" + LATIN1
    saved(os.fsdecode(inp), MAPPING)
    summary = st_consolidate.consolidate(inp, root + b"/out", report=tmp / "report.json")
    assert summary.files == 1
    report = json.loads((tmp / "report.json").read_text())
    assert report["command_line"][1] == os.fsdecode(root) + "/in-caf\\xe9", report["command_line"]


# Under torchrun: next to PyTorch's on_every_rank on the same calls.


def run_scenario(tmp, scenario, *extra):
    inp = saved(tmp / "in", MAPPING)
    (tmp / "mapping.json").write_text(json.dumps(MAPPING))
    (tmp / "results").mkdir()
    (tmp / "out").mkdir()
    done = run_torchrun(
        WORKER, 2, scenario, inp, tmp / "mapping.json", tmp / "out", tmp / "results", *extra, timeout=240
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((tmp / "results" / f"rank-{r}.json").read_text()) for r in (0, 1)]


def test_a_rank_outside_the_process_group_is_told_so(tmp):
    rank0, rank1 = run_scenario(tmp, "outsider")
    # Rank 0, the group's one member, consolidates; so does PyTorch's.
    assert rank0 == {"ours": None, "peer": None}
    assert_same_output(tmp / "out" / "ours", tmp / "out" / "peer")
    # On rank 1, PyTorch's function silently does nothing; ours says why.
    assert rank1["peer"] is None
    kind, message = rank1["ours"]
    assert kind == "InputError"
    assert message.startswith(
        "this rank (global rank 1) is not a member of process_group, which only its member ranks may call\n  hint: "
    ), message


NOT_A_GROUP = """
import sys, torch.distributed as dist, st_consolidate
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
try:
    st_consolidate.consolidate_safetensors_files_on_every_rank(sys.argv[2], sys.argv[3], {"a.weight": 1},
                                                               process_group="abc")
except st_consolidate.InputError as e:
    print(e)
dist.destroy_process_group()
"""


def test_a_process_group_that_is_no_group_is_refused(tmp):
    # In a process of its own: this one keeps torch.distributed uninitialised.
    import subprocess
    import sys

    inp = saved(tmp / "in", MAPPING)
    done = subprocess.run(
        [sys.executable, "-c", NOT_A_GROUP, str(tmp / "store"), str(inp), str(tmp / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("process_group='abc' is not a process group of this job: "), done.stdout
    assert "hint: pass a group made by torch.distributed.new_group, or None for the default group" in done.stdout
    assert not (tmp / "out").exists()


@pytest.mark.parametrize("variant", ["gloo", "twin"])
def test_a_reinitialised_default_group_works(tmp, variant):
    seen = run_scenario(tmp, "reinit", variant)
    for rank in seen:
        assert rank["first"] is None and rank["second"] is None and rank["peer"] is None, rank
        # The destroyed group's twin went with it; the new group has one.
        assert rank["twins_after_destroy"] == 0
        assert rank["twins"] == (1 if variant == "twin" else 0)
    assert_same_output(tmp / "out" / "first", tmp / "out" / "peer-second")
    assert_same_output(tmp / "out" / "second", tmp / "out" / "peer-second")


def test_a_rank_that_never_calls_fails_the_first_collective_with_a_consolidation_error(tmp):
    inp = saved(tmp / "in", MAPPING)
    (tmp / "mapping.json").write_text(json.dumps(MAPPING))
    (tmp / "results").mkdir()
    done = run_torchrun(WORKER, 2, "never", inp, tmp / "mapping.json", tmp / "out", tmp / "results", timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    rank0 = json.loads((tmp / "results" / "rank-0.json").read_text())
    kind, message = rank0["ours"]
    assert kind == "ConsolidationError"
    assert message.startswith(
        "global rank 0: the ranks of the process group could not start the consolidation together ("
    ), message
    assert "a rank that never calls, or that died or exited, makes this fail" in message
    # Within the group's timeout (3 s), with room for a slow machine.
    assert rank0["seconds"] < 60
    assert not (tmp / "out" / "ours").exists()
