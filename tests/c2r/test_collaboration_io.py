"""Co-activation matrix files: every format round-trips, malformed files fail naming the problem, pickles are safe."""

from __future__ import annotations

import builtins
import importlib
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from real_data import LLAMA_MOE_MATRICES
from safetensors import safe_open
from safetensors.torch import save_file

from moepatch.c2r import matrices as collaboration_io

DATA_FILE = LLAMA_MOE_MATRICES


def sample_matrices(layers: int = 3, experts: int = 6, seed: int = 0, diagonal: int = -1) -> np.ndarray:
    """Symmetric int64 counts with the official diagonal convention."""
    generator = np.random.default_rng(seed)
    upper = np.triu(generator.integers(0, 1000, size=(layers, experts, experts)), k=1)
    counts = upper + upper.transpose(0, 2, 1)
    for layer in range(layers):
        np.fill_diagonal(counts[layer], diagonal)
    return counts.astype(np.int64)


def write_json(path: Path, document: object) -> Path:
    path.write_text(json.dumps(document))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------------------------


def test_json_matrices_wrapper_round_trip(tmp_path: Path) -> None:
    base, topt = sample_matrices(seed=1), sample_matrices(seed=2, diagonal=0)
    path = write_json(
        tmp_path / "c.json",
        {"model": "x", "meaning": "counts", "matrices": {"base": base.tolist(), "topt_5": topt.tolist()}},
    )
    loaded = collaboration_io.load_matrices(path)
    assert list(loaded) == ["base", "topt_5"]
    assert loaded["base"].dtype == torch.int64
    assert np.array_equal(loaded["base"].numpy(), base)
    assert np.array_equal(loaded["topt_5"].numpy(), topt)


def test_json_flat_dict_and_bare_list(tmp_path: Path) -> None:
    counts = sample_matrices()
    flat = collaboration_io.load_matrices(write_json(tmp_path / "flat.json", {"a": counts.tolist(), "note": "x"}))
    assert list(flat) == ["a"] and np.array_equal(flat["a"].numpy(), counts)
    bare = collaboration_io.load_matrices(write_json(tmp_path / "bare.json", counts.tolist()))
    assert list(bare) == ["matrix"] and np.array_equal(bare["matrix"].numpy(), counts)


def test_json_integral_floats_are_accepted(tmp_path: Path) -> None:
    counts = sample_matrices()
    loaded = collaboration_io.load_matrices(write_json(tmp_path / "f.json", counts.astype(float).tolist()))
    assert loaded["matrix"].dtype == torch.int64 and np.array_equal(loaded["matrix"].numpy(), counts)


def test_safetensors_round_trip_with_metadata(tmp_path: Path) -> None:
    counts = sample_matrices(layers=2, experts=8)
    path = tmp_path / "profile.safetensors"
    collaboration_io.save_matrices(
        path, {"coactivation": torch.from_numpy(counts).to(torch.int32)}, metadata={"model": "tiny", "tokens": "10"}
    )
    loaded = collaboration_io.load_matrices(path)
    assert list(loaded) == ["coactivation"]
    assert loaded["coactivation"].dtype == torch.int64
    assert np.array_equal(loaded["coactivation"].numpy(), counts)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"model": "tiny", "tokens": "10"}


def test_safetensors_takes_every_3d_tensor(tmp_path: Path) -> None:
    path = tmp_path / "mixed.safetensors"
    first, second = sample_matrices(seed=3), sample_matrices(seed=4)
    save_file(
        {"a": torch.from_numpy(first), "b": torch.from_numpy(second), "ranking": torch.zeros(3, 6, dtype=torch.int64)},
        str(path),
    )
    loaded = collaboration_io.load_matrices(path)
    assert sorted(loaded) == ["a", "b"]
    assert np.array_equal(loaded["a"].numpy(), first) and np.array_equal(loaded["b"].numpy(), second)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_pickle_loads(tmp_path: Path, protocol: int) -> None:
    counts = sample_matrices(layers=4, experts=8)
    path = tmp_path / "base_collaboration.pkl"
    path.write_bytes(pickle.dumps(counts, protocol=protocol))
    array = collaboration_io.load_official_pickle(path)
    assert type(array) is np.ndarray and array.dtype == np.int64 and np.array_equal(array, counts)
    loaded = collaboration_io.load_matrices(path)
    assert list(loaded) == ["base_collaboration"] and np.array_equal(loaded["base_collaboration"].numpy(), counts)


def test_numpy1_module_names_load(tmp_path: Path) -> None:
    # Files written under numpy 1.x (as the official ones may be) name numpy.core, not numpy._core.
    counts = sample_matrices()
    payload = pickle.dumps(counts, protocol=2)  # protocol 2 spells globals as text lines, safe to rename
    assert b"numpy._core.multiarray" in payload
    path = tmp_path / "old.pkl"
    path.write_bytes(payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert np.array_equal(collaboration_io.load_official_pickle(path), counts)


def test_float_pickle_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "f.pkl"
    path.write_bytes(pickle.dumps(sample_matrices().astype(np.float32)))
    assert collaboration_io.load_official_pickle(path).dtype == np.float32
    assert collaboration_io.load_matrices(path)["f"].dtype == torch.int64


def test_official_llama_moe_file_loads() -> None:
    loaded = collaboration_io.load_matrices(DATA_FILE)
    assert sorted(loaded) == ["base_collaboration", "topt_5_collaboration"]
    for counts in loaded.values():
        assert counts.shape == (32, 8, 8) and counts.dtype == torch.int64
        # C2R's profiling: every layer sums to 200 contexts x 1024 tokens x 2 ordered pairs.
        assert counts.sum(dim=(1, 2)).tolist() == [409_600] * 32


# ----------------------------------------------------------------------------------------------------------------
# Malformed inputs
# ----------------------------------------------------------------------------------------------------------------


def asymmetric() -> list:
    counts = sample_matrices()
    counts[2, 1, 4] += 1
    return counts.tolist()


def negative() -> list:
    counts = sample_matrices()
    counts[1, 0, 3] = counts[1, 3, 0] = -5
    return counts.tolist()


def fractional() -> list:
    counts = sample_matrices().astype(float)
    counts[0, 2, 5] = counts[0, 5, 2] = 1.5
    return counts.tolist()


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"m": [[0, 1], [1, 0]]}, r"matrix 'm' must be 3-D"),
        ({"m": [[[0, 1, 2], [1, 0, 2]]]}, "square"),
        ({"m": [[[0, 1], [1]]]}, "not a regular"),
        ({"m": [[["a", "b"], ["c", "d"]]]}, "integer counts, got dtype"),
        ({"m": [[[True, False], [False, True]]]}, "integer counts, got dtype bool"),
        ({"m": []}, "3-D"),
        ({"m": asymmetric()}, r"symmetric.*layer 2: C\[1, 4\]"),
        ({"m": negative()}, r"non-negative.*layer 1, experts \(0, 3\)"),
        ({"m": fractional()}, r"non-integer at layer 0, experts \(2, 5\)"),
        ({"model": "x"}, "no matrices found"),
        ({"matrices": []}, "non-empty object"),
        ("just a string", "expected a JSON object"),
    ],
)
def test_malformed_json_is_rejected(tmp_path: Path, document: object, message: str) -> None:
    path = write_json(tmp_path / "bad.json", document)
    with pytest.raises(ValueError, match=message) as error:
        collaboration_io.load_matrices(path)
    assert str(path) in str(error.value)


def test_other_file_problems(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        collaboration_io.load_matrices(tmp_path / "broken.json")
    (tmp_path / "m.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported file type '.npy'"):
        collaboration_io.load_matrices(tmp_path / "m.npy")
    with pytest.raises(FileNotFoundError):
        collaboration_io.load_matrices(tmp_path / "missing.json")
    save_file({"ranking": torch.zeros(3, 6)}, str(tmp_path / "flat.safetensors"))
    with pytest.raises(ValueError, match="no 3-D"):
        collaboration_io.load_matrices(tmp_path / "flat.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        collaboration_io.load_matrices(tmp_path / "garbage.safetensors")


def test_save_validates(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="symmetric"):
        collaboration_io.save_matrices(path, {"m": torch.tensor(asymmetric())})
    with pytest.raises(ValueError, match="str to str"):
        collaboration_io.save_matrices(path, {"m": torch.from_numpy(sample_matrices())}, metadata={"tokens": 10})
    with pytest.raises(ValueError, match="at least one"):
        collaboration_io.save_matrices(path, {})
    assert not path.exists()


# ----------------------------------------------------------------------------------------------------------------
# Pickle safety
# ----------------------------------------------------------------------------------------------------------------


class RunsShellCommand:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


class EvaluatesCode:
    def __reduce__(self) -> tuple:
        return (builtins.eval, ("__import__('os').getpid()",))


def test_malicious_pickles_are_refused_before_any_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Serialise with the real callables (pickle stores only their names), then replace them with recorders: even a
    # broken loader would call a recorder, never the shell.
    shell_path = tmp_path / "shell.pkl"
    shell_path.write_bytes(pickle.dumps(RunsShellCommand()))
    eval_path = tmp_path / "eval.pkl"
    eval_path.write_bytes(pickle.dumps(EvaluatesCode()))
    calls: list[tuple] = []
    system_module = os.system.__module__  # "posix" on Linux: the name pickle stores
    monkeypatch.setattr(importlib.import_module(system_module), "system", lambda *args: calls.append(args))
    monkeypatch.setattr(os, "system", lambda *args: calls.append(args))
    monkeypatch.setattr(builtins, "eval", lambda *args: calls.append(args))

    refused = re.escape(f"refusing to unpickle {system_module}.system") + ".*only plain numeric numpy arrays"
    with pytest.raises(ValueError, match=refused):
        collaboration_io.load_official_pickle(shell_path)
    with pytest.raises(ValueError, match=r"refusing to unpickle builtins\.eval"):
        collaboration_io.load_official_pickle(eval_path)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        collaboration_io.load_matrices(shell_path)
    assert calls == []


def test_other_callables_and_non_arrays_are_refused(tmp_path: Path) -> None:
    tensor_path = tmp_path / "tensor.pkl"
    tensor_path.write_bytes(pickle.dumps(torch.zeros(2, 2, 2)))
    with pytest.raises(ValueError, match="refusing to unpickle torch"):
        collaboration_io.load_official_pickle(tensor_path)

    list_path = tmp_path / "list.pkl"
    list_path.write_bytes(pickle.dumps(sample_matrices().tolist()))
    with pytest.raises(ValueError, match="expected a pickled numpy ndarray, got list"):
        collaboration_io.load_official_pickle(list_path)

    object_path = tmp_path / "object.pkl"
    object_path.write_bytes(pickle.dumps(np.array([[[1, "a"]]], dtype=object)))
    with pytest.raises(ValueError, match="dtype object"):
        collaboration_io.load_official_pickle(object_path)

    codec_path = tmp_path / "codec.pkl"
    payload = pickle.dumps(np.zeros((1, 2, 2), dtype=np.int64), protocol=2)
    assert b"latin1" in payload
    codec_path.write_bytes(payload.replace(b"latin1", b"rot_13"))  # same length: framing stays valid
    with pytest.raises(ValueError, match="codec 'rot_13'"):
        collaboration_io.load_official_pickle(codec_path)

    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(pickle.dumps(sample_matrices())[:20])
    with pytest.raises(ValueError, match="not a readable numpy array pickle"):
        collaboration_io.load_official_pickle(truncated)
