"""RoutingRecorder.all_reduce sums statistics over real data-parallel ranks (2 processes, gloo, torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import torchrun_command
from routing_reference import capture_router_inputs
from routing_reference import moe_routers
from routing_reference import reference_counts

from moepatch.testing import tiny


@pytest.mark.slow
def test_all_reduce_sums_over_two_ranks(tmp_path: Path):
    worker = Path(__file__).with_name("distributed_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    command = torchrun_command(str(worker), str(tmp_path))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert "rank 0 done" in result.stdout and "rank 1 done" in result.stdout, result.stdout + result.stderr

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["reduced"] == ranks[1]["reduced"]
    reduced = ranks[0]["reduced"]

    # independent: the same shards in this process, routing recomputed from the router weights
    model = tiny.tiny_model("qwen2_moe", seed=0)
    routers = moe_routers(model)
    counts = torch.zeros(len(routers), 8, dtype=torch.int64)
    sums = torch.zeros(len(routers), 8, dtype=torch.float64)
    tokens = 0
    for rank in ranks:
        batch = tiny.demo_batch(texts=tuple(rank["shard"]))
        keep = batch["attention_mask"].reshape(-1).bool()
        tokens += int(keep.sum())
        with capture_router_inputs(model) as captured, torch.no_grad():
            model(**batch)
        for slot, layer in enumerate(sorted(routers)):
            c, s = reference_counts(model, routers[layer], captured[layer][0], 2, keep)
            counts[slot] += c
            sums[slot] += s
        assert rank["local"]["tokens"][0] == int(keep.sum())
    assert reduced["counts"] == counts.tolist()
    assert reduced["tokens"] == [tokens] * len(routers)
    torch.testing.assert_close(torch.tensor(reduced["prob_sums"], dtype=torch.float64), sums, atol=1e-5, rtol=0)


def test_all_reduce_without_process_group_is_a_no_op():
    model = tiny.tiny_model("mixtral")
    with __import__("moepatch").RoutingRecorder(model) as recorder, torch.no_grad():
        model(**tiny.demo_batch())
    before = recorder.counts.clone()
    assert recorder.all_reduce() is recorder
    assert torch.equal(recorder.counts, before)
