"""C2R placement reaches transformers' expert parallelism.

``moepatch place --ep-size N`` predicts the bytes per token of the per-pair dispatch (transformers' ``all_to_all``) and
of the dedup dispatch (``moepatch_dedup``) with :func:`moepatch.tools.c2r.traffic.predict_dispatch`;
``--write-permuted`` renumbers the experts so that, loaded with ``ep_size = N``, each rank's contiguous shard is one
planned group, and records ``N`` (``expert_placement.json``), so another EP size is refused by name before loading.

The multi-process test loads the renumbered copy under torchrun with the dedup dispatch and checks that three counts
of one batch agree exactly: the bytes the dispatch counted, an independent count from the routing the recorder saw,
and ``predict_dispatch`` on the original checkpoint's routing of the same batch under the planned groups.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import torchrun_command

import moepatch
from moepatch import cli
from moepatch.expert_parallel import PLACEMENT_FILE
from moepatch.expert_parallel import check_placement
from moepatch.testing import tiny
from moepatch.tools.c2r.placement import contiguous_placement
from moepatch.tools.c2r.placement import inverse_permutation
from moepatch.tools.c2r.traffic import chunk_source_ranks
from moepatch.tools.c2r.traffic import predict_dispatch

WORKER = Path(__file__).with_name("placement_worker.py")
EP_SIZE = 2
FLOAT32_BYTES = 4


# ------------------------------------------------------------------------------------------------ prediction
def test_predict_dispatch_counts_rows_per_pair_and_per_rank() -> None:
    groups = [[0, 1], [2, 3], [4, 5]]  # 3 ranks
    indices = np.array([[0, 1], [0, 2], [2, 5], [4, 5]])
    sources = np.array([0, 1, 2, 0])
    rows = predict_dispatch(indices, groups, source_ranks=sources)
    # token 0: both experts on its own rank 0; token 1 (rank 1): E0 remote, E2 local; token 2 (rank 2): E2 remote,
    # E5 local; token 3 (rank 0): E4, E5 both on rank 2, one dedup row
    assert (rows.copies, rows.pair_rows_remote, rows.pair_rows_local) == (1 + 2 + 2 + 1, 4, 4)
    assert (rows.dedup_rows_remote, rows.dedup_rows_local) == (3, 3)
    assert rows.per_token(row_bytes=8)["dedup_bytes_remote_per_token"] == 3 * 8 / 4


def test_a_uniform_source_rank_is_the_mean_over_every_source_rank() -> None:
    generator = np.random.default_rng(0)
    indices = np.stack([generator.choice(12, size=4, replace=False) for _ in range(50)])
    groups = [list(range(r * 3, r * 3 + 3)) for r in range(4)]
    uniform = predict_dispatch(indices, groups)
    assert uniform.source == "uniform"
    by_source = [predict_dispatch(indices, groups, source_ranks=np.full(50, rank)) for rank in range(4)]
    for field in ("pair_rows_remote", "pair_rows_local", "dedup_rows_remote", "dedup_rows_local"):
        assert getattr(uniform, field) == Fraction(sum(getattr(rows, field) for rows in by_source), 4), field
    assert uniform.pair_rows_remote == Fraction(50 * 4 * 3, 4)  # k (D - 1) / D per token, any placement
    assert uniform.dedup_rows_remote == Fraction(uniform.copies * 3, 4)


def test_predict_dispatch_refuses_bad_routings() -> None:
    groups = [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match=r"range\(0, 4\)"):
        predict_dispatch(np.array([[1, 4]]), groups)
    with pytest.raises(ValueError, match=r"source ranks must lie in range\(0, 2\)"):
        predict_dispatch(np.array([[0, 1]]), groups, source_ranks=np.array([2]))


# ------------------------------------------------------------------------------------------ checkpoints, place
@pytest.fixture(scope="module")
def placed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A tiny Qwen2-MoE with C2R fields (8 experts, top-2), its ``place --ep-size 2 --write-permuted`` copy and the
    JSON report."""
    root = tmp_path_factory.mktemp("placed")
    model = tiny.tiny_model("qwen2_moe")
    model.config.top_t, model.config.collaborative_list = 3, tiny.random_collaborative_list(4, 8, seed=1)
    model.save_pretrained(root / "original")
    tiny.tiny_tokenizer().save_pretrained(root / "original")
    result = subprocess.run(
        [sys.executable, "-m", "moepatch.cli", "place", str(root / "original"), "--ep-size", str(EP_SIZE), "--json",
         "--write-permuted", str(root / "permuted")], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    return root / "original", root / "permuted", json.loads(result.stdout)


def test_place_reports_dispatch_bytes_from_the_profiled_tokens(placed: tuple[Path, Path, dict]) -> None:
    _, permuted, result = placed
    for routing, report in result["reports"].items():
        assert report["dispatch"] == {"source_rank": "uniform", "hidden_size": 32, "dtype": "float32",
                                      "element_size": 4, "row_bytes": 128,
                                      "dtype_source": "the checkpoint's dtype as loaded"}, routing
        for row in report["layers"]:
            entry = row["dispatch"]
            assert entry["pair_rows_remote_per_token"] == 2 * (EP_SIZE - 1) / EP_SIZE
            assert entry["pair_bytes_remote_per_token"] == entry["pair_rows_remote_per_token"] * 128
            for placement in ("contiguous", "planned"):  # dedup: copies (exact, from the tokens) x (D - 1) / D
                copies = row[f"{placement}_copies_per_token"]
                assert entry[f"{placement}_dedup_rows_remote_per_token"] == pytest.approx(copies / 2, abs=1e-12)
                assert entry[f"{placement}_dedup_rows_local_per_token"] == pytest.approx(copies / 2, abs=1e-12)
                assert entry[f"{placement}_dedup_bytes_remote_per_token"] == pytest.approx(copies / 2 * 128,
                                                                                              abs=1e-9)
    record = json.loads((permuted / PLACEMENT_FILE).read_text())
    assert record == {"ep_size": EP_SIZE, "num_experts": 8, "experts_per_rank": 4, "layers": [0, 2, 3]}


def test_a_matrix_file_gives_rows_and_refuses_dedup_rows_for_top_k_above_2(tmp_path: Path, capsys) -> None:
    counts = torch.zeros(2, 8, 8)
    generator = torch.Generator().manual_seed(0)
    for layer in range(2):
        for _ in range(100):
            chosen = torch.randperm(8, generator=generator)[:3]
            for i in chosen:
                for j in chosen:
                    if i != j:
                        counts[layer, i, j] += 1
    path = tmp_path / "top3.json"
    path.write_text(json.dumps({"top_k": 3, "matrices": {"m": counts.tolist()}}))
    assert cli.main(["place", str(path), "--ep-size", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["reports"]["m"]
    for row in report["layers"]:
        entry = row["dispatch"]
        assert entry["pair_rows_remote_per_token"] == 1.5 and entry["pair_bytes_remote_per_token"] is None
        assert entry["planned_dedup_rows_remote_per_token"] is None  # copies of a top-3 model: not from pairs
    assert cli.main(["place", str(path), "--ep-size", "2"]) == 0
    text = capsys.readouterr().out
    assert "bytes: not computed" in text and "pair counts of a top-k > 2 model do not give them" in text


def test_another_ep_size_is_refused_by_name_before_loading(placed: tuple[Path, Path, dict], capsys) -> None:
    from transformers import DistributedConfig

    import moepatch

    original, permuted, _ = placed
    assert check_placement(permuted, EP_SIZE)["experts_per_rank"] == 4
    assert check_placement(original, 4) is None  # not renumbered: nothing to check
    expected = rf"{PLACEMENT_FILE}: the experts of this checkpoint were renumbered so that each of 2 expert-parallel"
    with pytest.raises(ValueError, match=expected):
        check_placement(permuted, 4)
    with pytest.raises(ValueError, match=expected):  # before any process group or weight is touched
        moepatch.from_pretrained(permuted, distributed_config=DistributedConfig(tp_size=4, ep_size=4, tp_plan={}))
    assert cli.main(["place", str(permuted), "--ep-size", "4"]) == 2
    error = capsys.readouterr().err
    assert "--ep-size" in error and "Use ep_size=2" in error and str(permuted / PLACEMENT_FILE) in error


def test_a_malformed_placement_record_is_named(tmp_path: Path) -> None:
    config = tiny.tiny_config("qwen2_moe")  # 8 routed experts, 4 decoder layers
    (tmp_path / PLACEMENT_FILE).write_text(json.dumps({"ep_size": 2, "num_experts": 8, "experts_per_rank": 3}))
    with pytest.raises(ValueError, match=r"expert_placement.json: ep_size 2 x experts_per_rank 3 is not num_experts"):
        check_placement(tmp_path, 2, config)
    (tmp_path / PLACEMENT_FILE).write_text(json.dumps({"ep_size": "2", "num_experts": 8, "experts_per_rank": 4}))
    with pytest.raises(ValueError, match=r"field 'ep_size' must be a positive integer"):
        check_placement(tmp_path, 2, config)


@pytest.mark.parametrize(("record", "named"), [
    ({"ep_size": 2, "num_experts": 16, "experts_per_rank": 8, "layers": [0, 2, 3]},
     "field 'num_experts' is 16, but the checkpoint has 8 routed experts"),
    ({"ep_size": 3, "num_experts": 9, "experts_per_rank": 3, "layers": [0, 2, 3]},
     "field 'num_experts' is 9, but the checkpoint has 8 routed experts"),
    ({"ep_size": 2, "num_experts": 8, "experts_per_rank": 4, "layers": "all"}, "field 'layers' must be"),
    ({"ep_size": 2, "num_experts": 8, "experts_per_rank": 4}, "field 'layers' must be"),
    ({"ep_size": 2, "num_experts": 8, "experts_per_rank": 4, "layers": []}, "field 'layers' must be"),
    ({"ep_size": 2, "num_experts": 8, "experts_per_rank": 4, "layers": [0, 4]}, "(its decoder layers 0 .. 3), got"),
    ({"ep_size": 2, "num_experts": 8, "experts_per_rank": 4, "layers": [0, 0]}, "field 'layers' must be"),
    ({"ep_size": 2, "num_experts": 8, "experts_per_rank": 4, "layers": [True, 2]}, "field 'layers' must be"),
], ids=["16 experts", "9 experts", "layers all", "no layers", "no layer", "layer 4 of 4", "twice", "a bool"])
def test_a_record_that_is_not_this_checkpoints_is_refused_by_field(tmp_path: Path, record: dict, named: str) -> None:
    """The record must fit the checkpoint: it gave false figures ("each of 2 ranks holds one planned group of 8
    experts" of an 8-expert model) or advice ("Use ep_size=3", which does not divide 8). Read from the folder's own
    config.json when no config is given; for the same EP size and for another one."""
    folder = tiny.save_tiny_checkpoint(tmp_path / "ckpt", "qwen2_moe")
    (folder / PLACEMENT_FILE).write_text(json.dumps(record))
    for ep_size in (2, 4):
        with pytest.raises(ValueError) as error:
            check_placement(folder, ep_size)
        assert str(error.value).startswith(f"{folder / PLACEMENT_FILE}: ") and named in str(error.value)
        assert "planned group" not in str(error.value) and "Use ep_size" not in str(error.value)
    (folder / PLACEMENT_FILE).write_text(json.dumps({**record, "num_experts": 8, "experts_per_rank": 4,
                                                     "ep_size": 2, "layers": [0, 2, 3]}))
    assert check_placement(folder, 2)["layers"] == [0, 2, 3]  # the record the renumbering writes: accepted


# ----------------------------------------------------------------------------------------- under torchrun
def independent_rows(routing: list[list[int]], ep_size: int, experts_per_rank: int) -> dict[str, int]:
    """From the routing alone: rank ``r`` dispatches its ``torch.chunk`` slice of the shared batch; per-pair rows per
    (token, expert), dedup rows per (token, distinct rank); remote when the rank is not the token's."""
    chunk = -(-len(routing) // ep_size)
    counts = dict(pairs_remote=0, pairs_local=0, rows_remote=0, rows_local=0)
    for position, experts in enumerate(routing):
        source = position // chunk
        ranks = [expert // experts_per_rank for expert in experts]
        counts["pairs_local"] += ranks.count(source)
        counts["pairs_remote"] += len(ranks) - ranks.count(source)
        counts["rows_local"] += source in ranks
        counts["rows_remote"] += len(set(ranks) - {source})
    return counts


def layout_checks_folder(original: Path, permuted: Path, folder: Path) -> Path:
    """The placement worker's CHECKS: ``misplaced``, the renumbered copy with its record rewritten for 4 ranks (the
    worker loads it with 2), and ``chosen``, the original with ``"ep_implementation": "moepatch_dedup"`` in its
    moepatch block, prepared by ``moepatch install``."""
    shutil.copytree(permuted, folder / "misplaced")
    record = json.loads((permuted / PLACEMENT_FILE).read_text())
    record.update(ep_size=4, experts_per_rank=record["num_experts"] // 4)
    (folder / "misplaced" / PLACEMENT_FILE).write_text(json.dumps(record))
    chosen = Path(shutil.copytree(original, folder / "chosen"))
    config = json.loads((chosen / "config.json").read_text())
    config["moepatch"] = {"ep_implementation": "moepatch_dedup"}
    (chosen / "config.json").write_text(json.dumps(config))
    moepatch.install(chosen)
    return folder


def check_layout_results(found: dict, *, moe_layers: int) -> None:
    """What one rank recorded for :func:`layout_checks_folder`: ``apply`` refused the copy loaded by plain
    ``from_pretrained`` at another EP size (naming the record and both sizes) and patched nothing; the block's
    dispatch reached transformers' engine through ``moepatch.from_pretrained`` and the installed loader where
    ``"auto"`` was left, and a given ``"all_to_all"`` won."""
    refusal = found["apply_refusal"]
    assert refusal is not None and PLACEMENT_FILE in refusal, refusal
    assert "each of 4 expert-parallel ranks" in refusal and f"with ep_size={EP_SIZE}" in refusal
    assert not found["misplaced_patched"]
    for load in ("by_moepatch", "by_installed_loader"):
        assert found[load] == {"dedup_layers": moe_layers, "ep_implementation": "moepatch_dedup"}, load
    assert found["given"] == {"dedup_layers": 0, "ep_implementation": "all_to_all"}
    assert found["auto_left_as_given"] == "auto"  # the caller's DistributedConfig is not changed


@pytest.mark.slow
def test_the_renumbered_copy_places_groups_and_moves_the_predicted_bytes(placed: tuple[Path, Path, dict],
                                                                          tmp_path: Path) -> None:
    original, permuted, result = placed
    checks = layout_checks_folder(original, permuted, tmp_path / "checks")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run(torchrun_command(str(WORKER), str(original), str(permuted), str(tmp_path), str(checks),
                                          processes=EP_SIZE), env=env, capture_output=True, text=True, timeout=400)
    assert all(f"rank {r} done" in run.stdout for r in range(EP_SIZE)), (run.stdout + run.stderr)[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(EP_SIZE)]
    planned = {row["layer"]: row["groups"] for row in result["reports"]["c2r"]["layers"]}  # what was written
    hidden = ranks[0]["hidden_size"]
    assert ranks[0]["c2r_routers"] == 3  # the copy routes under its (renumbered) C2R lists

    # each rank's contiguous shard IS one planned group (the original experts, in group order)
    for rank, data in enumerate(ranks):
        assert {int(k): v for k, v in data["shard_sources"].items()} == {
            layer: groups[rank] for layer, groups in planned.items()}

    layers = sorted(planned)
    assert len(ranks[0]["traffic"]) == len(layers)
    for slot, layer in enumerate(layers):
        routing_permuted = ranks[0]["routing_permuted"][str(layer)]
        routing_original = ranks[0]["routing_original"][str(layer)]
        assert all(data["routing_permuted"][str(layer)] == routing_permuted for data in ranks)  # one shared batch
        # the copy routes as the original under the renumbering (new id n is old expert order[n])
        order = [expert for group in planned[layer] for expert in group]
        new_id = inverse_permutation(order)
        assert [sorted(new_id[e] for e in experts) for experts in routing_original] == [
            sorted(experts) for experts in routing_permuted]

        sources = chunk_source_ranks(len(routing_permuted), EP_SIZE)
        counted = {key: sum(data["traffic"][slot][key] for data in ranks)
                   for key in ("pairs_remote", "pairs_local", "rows_remote", "rows_local", "hidden_bytes_remote",
                               "returned_rows_remote")}
        independent = independent_rows(routing_permuted, EP_SIZE, 8 // EP_SIZE)
        on_copy = predict_dispatch(np.array(routing_permuted), contiguous_placement(8, EP_SIZE),
                                   source_ranks=sources)
        on_original = predict_dispatch(np.array(routing_original), planned[layer], source_ranks=sources)
        for prediction in (on_copy, on_original):
            assert (prediction.pair_rows_remote, prediction.pair_rows_local, prediction.dedup_rows_remote,
                    prediction.dedup_rows_local) == (counted["pairs_remote"], counted["pairs_local"],
                                                     counted["rows_remote"], counted["rows_local"]), layer
        assert {key: counted[key] for key in independent} == independent, layer
        assert counted["hidden_bytes_remote"] == on_original.dedup_rows_remote * hidden * FLOAT32_BYTES
        assert counted["returned_rows_remote"] == counted["rows_remote"]
    group = ranks[0]["group_traffic"]
    assert group["rows_remote"] == sum(sum(t["rows_remote"] for t in data["traffic"]) for data in ranks)
    assert all(data["group_traffic"] == group for data in ranks)
    for data in ranks:
        check_layout_results(data["layout_checks"], moe_layers=len(layers))


def test_a_matrix_file_with_a_hidden_size_gives_bytes_per_token(tmp_path: Path, capsys) -> None:
    ep_size, hidden, experts = 4, 48, 8
    generator = np.random.default_rng(0)
    popularity = generator.dirichlet(np.full(experts, 0.5))  # skewed, so the plan differs from the contiguous one
    tokens = [[generator.choice(experts, size=2, replace=False, p=popularity) for _ in range(300)] for _ in range(2)]
    counts = np.zeros((2, experts, experts))
    for layer, pairs in enumerate(tokens):
        for first, second in pairs:
            counts[layer, first, second] += 1
            counts[layer, second, first] += 1
    path = tmp_path / "top2.json"
    path.write_text(json.dumps({"top_k": 2, "matrices": {"m": counts.tolist()}}))

    def remote_rows_per_token(pairs: list[np.ndarray], groups: list[list[int]]) -> float:
        """Dedup remote rows per token from each token's experts: its distinct devices x (D - 1) / D."""
        device = {expert: index for index, group in enumerate(groups) for expert in group}
        return sum(len({device[int(e)] for e in pair}) for pair in pairs) / len(pairs) * (ep_size - 1) / ep_size

    for dtype, extra in ((torch.float16, ["--dtype", "float16"]), (torch.bfloat16, [])):  # bfloat16: the default
        assert cli.main(["place", str(path), "--ep-size", str(ep_size), "--hidden-size", str(hidden), "--json",
                         *extra]) == 0
        report = json.loads(capsys.readouterr().out)["reports"]["m"]
        row_bytes = hidden * torch.finfo(dtype).bits // 8
        assert report["dispatch"]["row_bytes"] == row_bytes
        assert report["dispatch"]["dtype"] == str(dtype).removeprefix("torch.")
        contiguous = [list(range(d * experts // ep_size, (d + 1) * experts // ep_size)) for d in range(ep_size)]
        for row, pairs in zip(report["layers"], tokens, strict=True):
            entry = row["dispatch"]
            assert entry["pair_bytes_remote_per_token"] == pytest.approx(2 * (ep_size - 1) / ep_size * row_bytes)
            for placement, groups in (("contiguous", contiguous), ("planned", row["groups"])):
                assert entry[f"{placement}_dedup_bytes_remote_per_token"] == pytest.approx(
                    remote_rows_per_token(pairs, groups) * row_bytes)
    assert cli.main(["place", str(path), "--ep-size", str(ep_size), "--hidden-size", str(hidden)]) == 0
    text = capsys.readouterr().out
    assert f"row = hidden {hidden} x bfloat16" in text and "bytes: not computed" not in text

    # refused by flag before the source is read: a file that is no matrix file, a folder that is no checkpoint
    path.write_text("not a matrix file")
    assert cli.main(["place", str(path), "--ep-size", str(ep_size), "--dtype", "float16"]) == 2
    assert "--dtype" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["place", str(path), "--ep-size", str(ep_size), "--hidden-size", "8", "--dtype", "int8"])
    assert "argument --dtype" in capsys.readouterr().err
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_text("not weights")
    assert cli.main(["place", str(folder), "--ep-size", str(ep_size), "--hidden-size", str(hidden)]) == 2
    assert "--hidden-size" in capsys.readouterr().err
