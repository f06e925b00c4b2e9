"""The job's protocol under torchrun with gloo, 2 ranks (issue 24): an
interrupt at each collective in turn leaves the earlier output intact with
its index (the interrupted rank raising KeyboardInterrupt, the other a
ConsolidationError naming it) or the new output complete and reported as
published; ranks given different options refuse before writing; a panic
on one rank fails both without a hang; a rank that never calls fails the
other within the group's timeout; a staged save with node-local staging
folders writes what an unstaged one does and leaves no staging behind."""

import json
from pathlib import Path

import torch
from conftest import assert_same_output, run_torchrun, write_shards

WORKER = Path(__file__).with_name("protocol_worker.py")
INDEX = "model.safetensors.index.json"


def checkpoint(tmp):
    g = torch.Generator().manual_seed(5)
    tensors = {f"layer.{i}.w": torch.randn(8, 3 + i, generator=g) for i in range(6)}
    mapping = {name: 1 + i % 3 for i, name in enumerate(sorted(tensors))}
    write_shards(tmp / "in", tensors, mapping, ranks=2)
    (tmp / "mapping.json").write_text(json.dumps(mapping))
    (tmp / "results").mkdir()
    return mapping


def run(tmp, scenario, timeout=300):
    done = run_torchrun(
        WORKER, 2, scenario, tmp / "in", tmp / "mapping.json", tmp / "out", tmp / "results", timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((tmp / "results" / f"rank-{r}.json").read_text()) for r in range(2)]


def test_an_interrupt_at_each_collective_keeps_the_earlier_output_or_publishes_the_new_one(tmp):
    checkpoint(tmp)
    seen = run(tmp, "stops", timeout=600)
    runs = list(zip(seen[0]["runs"], seen[1]["runs"]))
    stopped = published = 0
    # The last run went past the victim's last collective: not stopped.
    for r0, r1 in runs[:-1]:
        case = f"interrupted at collective {r1['at']}"
        (what0, text0, _), (what1, text1, late1) = r0["outcome"], r1["outcome"]
        assert not any(".st-consolidate" in name for name in r0["left"]), case
        assert INDEX in r0["after"], f"{case}: a folder without its index"
        if late1:
            # Past the point of no return: published, success reported, the
            # interrupt delivered afterwards.
            published += 1
            assert what0 == "returned", case
            assert r0["after"] == runs[-1][0]["after"], case
            continue
        stopped += 1
        assert r0["after"] == r0["before"], f"{case}: the earlier output changed"
        assert what1 == "KeyboardInterrupt", (case, what1, text1)
        assert what0 == "ConsolidationError" and text0.startswith("rank 1 was interrupted: "), (case, text0)
    assert stopped >= 8 and published >= 1, (stopped, published)
    last0, last1 = runs[-1]
    assert last0["outcome"][0] == last1["outcome"][0] == "returned"
    assert last0["after"] != last0["before"]


def test_ranks_given_different_options_refuse_before_writing(tmp):
    checkpoint(tmp)
    seen = run(tmp, "options")
    for s in seen:
        what, text, _ = s["outcome"]
        assert what == "ConsolidationError", text
        assert "the ranks were given different options: mode is" in text and "rank 1:" in text, text
        assert not s["exists"]


def test_a_panic_on_one_rank_fails_both_without_a_hang(tmp):
    checkpoint(tmp)
    seen = run(tmp, "panic")
    texts = [s["outcome"][1] for s in seen]
    assert [s["outcome"][0] for s in seen] == ["ConsolidationError"] * 2
    assert texts[0] == texts[1], texts
    assert texts[0].startswith("rank 1 hit a bug: internal error: rank 1 panicked while in phase 3"), texts
    assert all(s["left"] == [] for s in seen)


def test_a_rank_that_never_calls_fails_the_other_within_the_timeout(tmp):
    checkpoint(tmp)
    seen = run(tmp, "absent")
    what, text, _ = seen[0]["outcome"]
    assert what == "ConsolidationError", text
    assert seen[0]["seconds"] < 60, seen[0]["seconds"]


def test_a_staged_save_to_node_local_folders_writes_what_an_unstaged_save_writes(tmp):
    checkpoint(tmp)
    seen = run(tmp, "staged")
    assert_same_output(tmp / "out" / "staged", tmp / "out" / "plain")
    assert all(s["staging_left"] == [] for s in seen)
