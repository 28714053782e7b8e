"""Run under torchrun (gloo, CPU): each rank records its own shard of texts, then the recorder sums across ranks.

Writes ``rank{r}.json`` with the local statistics (before the reduction) and the reduced ones.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

import moepatch
from moepatch.testing import tiny

TEXTS = list(tiny.DEMO_TEXTS) + list(tiny.CORPUS[:4])


def main(output: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny.tiny_model("qwen2_moe", seed=0)
    shard = tuple(TEXTS[rank::world])
    with moepatch.RoutingRecorder(model) as recorder, torch.no_grad():
        model(**tiny.demo_batch(texts=shard))
    local = recorder.to_dict()
    reduced = recorder.all_reduce().to_dict()
    with open(os.path.join(output, f"rank{rank}.json"), "w") as handle:
        json.dump({"local": local, "reduced": reduced, "shard": shard}, handle)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} done")


if __name__ == "__main__":
    main(sys.argv[1])
