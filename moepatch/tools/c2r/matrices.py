"""Reading and writing per-layer expert co-activation matrices (C2R profiling, Zhang et al., NAACL 2025).

A co-activation ("collaboration") matrix set is int64 ``[L, E, E]``: ``C[l, i, j]`` = number of profiled tokens whose
top-k experts at layer ``l`` contain both ``i`` and ``j``.  The diagonal carries no information (official files hold
0 or -1 there) and is kept as stored.  Accepted formats:

* JSON ``{"matrices": {name: [L][E][E], ...}, ...}`` (other top-level keys such as ``"model"`` or ``"meaning"`` are
  descriptive and ignored) — ``data/c2r-moe/llama-moe-v1-3_5b-2_8.collaboration.json`` of this repository;
* JSON ``{name: [L][E][E], ...}`` (non-list values are taken as metadata and ignored);
* bare JSON ``[L][E][E]`` (named ``"matrix"``);
* safetensors: every 3-D tensor by its key (moepatch's profiler writes ``"coactivation"``);
* the official ``.pkl`` files of the C2R repository (one pickled numpy array, named after the file stem, e.g.
  ``base_collaboration``), read by :func:`load_official_pickle`, which never executes code from the file.

Every loaded matrix is validated (3-D, square, finite, non-negative integer counts off the diagonal, symmetric), so
the placement and routing code downstream can rely on it.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save_file

JSON_SUFFIXES = (".json",)
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pkl", ".pickle")


def _numpy_core_attribute(submodule: str, name: str) -> Any:
    """The numpy internal ``name`` from ``numpy._core.<submodule>`` (numpy >= 2) or ``numpy.core.<submodule>``.

    Resolved once at import, so pickles naming either location map to the function of the installed numpy.
    """
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"cannot locate numpy's {submodule}.{name}; unsupported numpy version {np.__version__}")


_numpy_reconstruct = _numpy_core_attribute("multiarray", "_reconstruct")
_numpy_scalar = _numpy_core_attribute("multiarray", "scalar")
_numpy_frombuffer = _numpy_core_attribute("numeric", "_frombuffer")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` limited to what protocol-0..2 pickles use to store raw bytes.

    Raises:
        ValueError: for any other codec (``_codecs.encode`` accepts arbitrary codecs, e.g. decompressors).
    """
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise ValueError(f"refusing to unpickle _codecs.encode with codec {encoding!r}; only latin1 bytes are accepted")
    return text.encode("latin1")


_ALLOWED_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    # ndarray reconstruction (protocols 0-4), under numpy >= 2 and numpy 1.x module names.
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    # ndarray reconstruction from an in-band buffer (protocol 5).
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    # numpy scalars (e.g. a dtype's fill value or a 0-d value).
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # raw bytes in protocol 0-2 pickles.
    ("_codecs", "encode"): _latin1_encode,
}
"""The only globals a collaboration pickle may reference: what rebuilding a plain numeric numpy array needs."""


def _is_int_or_float(dtype: np.dtype) -> bool:
    """Whether ``dtype`` can hold counts: integer or float, not bool, complex, string or object."""
    return dtype != np.bool_ and (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating))


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild plain numpy arrays.

    Unpickling calls whatever callables the file names (``os.system``, ``builtins.eval``, ...); resolving names
    through an allowlist, before anything is called, makes loading an untrusted ``.pkl`` safe.
    """

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_PICKLE_GLOBALS.get((module, name))
        if allowed is None:
            raise ValueError(
                f"refusing to unpickle {module}.{name}: only plain numeric numpy arrays are accepted in collaboration "
                f"pickles; convert the file to JSON or safetensors"
            )
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise ValueError("refusing to unpickle a persistent reference; only plain numeric numpy arrays are accepted")


def load_official_pickle(path: str | os.PathLike[str]) -> np.ndarray:
    """Load one official C2R ``collaboration_data/*.pkl`` file (a pickled numpy array) without executing code.

    Args:
        path (`str` or `os.PathLike`): the ``.pkl`` file.

    Returns:
        `np.ndarray`: the stored integer or float array (not yet validated as a co-activation matrix; see
        :func:`load_matrices`).

    Raises:
        ValueError: if the pickle references anything but numpy array reconstruction ("refusing to unpickle
            <module>.<name> ..."), is corrupt, or does not hold a numeric (integer or float) ndarray.
    """
    path = Path(path)
    with path.open("rb") as handle:
        try:
            loaded = _NumpyArrayUnpickler(handle).load()
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError) as error:
            raise ValueError(f"{path}: not a readable numpy array pickle ({type(error).__name__}: {error})") from None
    if not isinstance(loaded, np.ndarray) or type(loaded) is not np.ndarray:
        raise ValueError(f"{path}: expected a pickled numpy ndarray, got {type(loaded).__name__}")
    if not _is_int_or_float(loaded.dtype):
        raise ValueError(f"{path}: expected an integer or float array, got dtype {loaded.dtype}")
    return loaded


def _validated(values: Any, path: Path, name: str) -> torch.Tensor:
    """Check one ``[L, E, E]`` co-activation matrix set and return it as a contiguous int64 CPU tensor.

    Raises:
        ValueError: naming ``path`` and ``name`` and the first problem: not numeric, not 3-D, not square, no layers,
            non-finite or non-integer or negative off-diagonal counts (with the first offending layer and pair),
            asymmetric (with the first offending layer and pair).
    """
    where = f"{path}: matrix {name!r}"
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values)
    except ValueError as error:  # ragged nested lists
        raise ValueError(f"{where} is not a regular [L][E][E] array ({error})") from None
    if not _is_int_or_float(array.dtype):
        raise ValueError(f"{where} must hold integer counts, got dtype {array.dtype}")
    if array.ndim != 3:
        raise ValueError(f"{where} must be 3-D [layers, experts, experts], got shape {tuple(array.shape)}")
    num_layers, rows, cols = array.shape
    if rows != cols:
        raise ValueError(f"{where} must be square in its last two dimensions, got shape {tuple(array.shape)}")
    if num_layers == 0 or rows == 0:
        raise ValueError(f"{where} is empty, shape {tuple(array.shape)}")
    off_diagonal = ~np.eye(rows, dtype=bool)[None, :, :].repeat(num_layers, axis=0)

    def first(mask: np.ndarray) -> str:
        layer, row, col = (int(x) for x in np.argwhere(mask)[0])
        return f"layer {layer}, experts ({row}, {col}): {array[layer, row, col]!r}"

    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            raise ValueError(f"{where} has non-finite entries, first at {first(bad)}")
        bad = off_diagonal & (array != np.round(array))
        if bad.any():
            raise ValueError(f"{where} must hold integer counts off the diagonal, first non-integer at {first(bad)}")
        if np.abs(array).max() >= 2.0**63:
            raise ValueError(f"{where} has counts that do not fit int64")
    counts = array.astype(np.int64)
    bad = off_diagonal & (counts < 0)
    if bad.any():
        raise ValueError(f"{where} must hold non-negative counts off the diagonal, first negative at {first(bad)}")
    bad = off_diagonal & (counts != counts.transpose(0, 2, 1))
    if bad.any():
        layer, row, col = (int(x) for x in np.argwhere(bad)[0])
        raise ValueError(
            f"{where} must be symmetric (a pair of experts is co-activated by the same tokens either way), first "
            f"mismatch at layer {layer}: C[{row}, {col}] = {counts[layer, row, col]} but C[{col}, {row}] = "
            f"{counts[layer, col, row]}"
        )
    return torch.from_numpy(np.ascontiguousarray(counts))


def _matrices_from_json(document: Any, path: Path) -> dict[str, Any]:
    """Pick the named ``[L][E][E]`` lists out of one of the accepted JSON layouts."""
    if isinstance(document, list):
        return {"matrix": document}
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a JSON object or a [L][E][E] list, got {type(document).__name__}")
    if "matrices" in document:
        matrices = document["matrices"]
        if not isinstance(matrices, dict) or not matrices:
            raise ValueError(f'{path}: "matrices" must be a non-empty object {{name: [L][E][E]}}')
        return dict(matrices)
    found = {name: value for name, value in document.items() if isinstance(value, list)}
    if not found:
        raise ValueError(
            f'{path}: no matrices found; expected {{"matrices": {{name: [L][E][E]}}}}, {{name: [L][E][E]}} or a bare '
            f"[L][E][E] list"
        )
    return found


def _json_document(path: Path) -> Any:
    """A matrix file's JSON document; ``ValueError`` naming the file when it is not UTF-8 JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 JSON ({error.reason} at byte {error.start})") from None


def load_matrices(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load co-activation matrices by name from JSON, safetensors or an official pickle.

    Args:
        path (`str` or `os.PathLike`): a ``.json``, ``.safetensors`` or ``.pkl`` / ``.pickle`` file (see the module
            docstring for the layouts).

    Returns:
        `dict[str, torch.Tensor]`: name -> int64 ``[L, E, E]`` CPU tensor, in file order.

    Raises:
        ValueError: for an unknown suffix, an unreadable file, a file without matrices, or a matrix that fails
            validation (the message names the file, the matrix and the first offending layer / expert pair).
        FileNotFoundError: if ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no co-activation matrix file at {path}")
    suffix = path.suffix.lower()
    raw: dict[str, Any]
    if suffix in JSON_SUFFIXES:
        raw = _matrices_from_json(_json_document(path), path)
    elif suffix in SAFETENSORS_SUFFIXES:
        try:
            tensors = load_file(str(path))
        except Exception as error:  # safetensors raises its own SafetensorError for corrupt headers
            raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
        raw = {name: tensor for name, tensor in tensors.items() if tensor.dim() == 3}
        if not raw:
            shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
            raise ValueError(f"{path}: no 3-D [L, E, E] tensor in the file (found {shapes})")
    elif suffix in PICKLE_SUFFIXES:
        raw = {path.stem: load_official_pickle(path)}
    else:
        raise ValueError(
            f"{path}: unsupported file type {suffix!r}; expected one of "
            f"{', '.join(JSON_SUFFIXES + SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"
        )
    return {str(name): _validated(values, path, str(name)) for name, values in raw.items()}


def save_matrices(
    path: str | os.PathLike[str],
    matrices: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write co-activation matrices to a safetensors file (int64, one tensor per name).

    Matrices are validated exactly as on load, so a file written here always loads back.

    Args:
        path (`str` or `os.PathLike`): destination ``.safetensors`` file.
        matrices (`Mapping[str, torch.Tensor]`): name -> ``[L, E, E]`` counts (any device, integer or integral float).
        metadata (`Mapping[str, str]`, *optional*): string metadata stored in the safetensors header (e.g. model id,
            profiling data, token count).

    Raises:
        ValueError: if there are no matrices, a name is empty, a matrix fails validation, or metadata is not
            ``str -> str``.
    """
    path = Path(path)
    if not matrices:
        raise ValueError("save_matrices needs at least one matrix")
    tensors: dict[str, torch.Tensor] = {}
    for name, values in matrices.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"matrix names must be non-empty strings, got {name!r}")
        tensors[name] = _validated(values, path, name)
    if metadata is not None:
        bad = {key: value for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)}
        if bad:
            raise ValueError(f"safetensors metadata must map str to str, got {bad!r}")
        metadata = dict(metadata)
    save_file(tensors, str(path), metadata=metadata)


def recorded_top_k(path: str | os.PathLike[str]) -> int | None:
    """The routing's experts per token as recorded in a matrix file, or ``None`` when the file does not say.

    moepatch's profiler stores ``top_k`` in the safetensors metadata; a JSON document may carry a top-level integer
    ``"top_k"``; the official pickles record nothing.

    Raises:
        ValueError: if the file records a ``top_k`` that is not a positive integer.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    value: Any = None
    if suffix in SAFETENSORS_SUFFIXES:

        try:
            with safe_open(str(path), framework="pt") as handle:
                value = (handle.metadata() or {}).get("top_k")
        except Exception as error:  # safetensors raises its own SafetensorError for corrupt headers
            raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
        if value is not None:
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"{path}: metadata top_k={value!r} is not an integer") from None
    elif suffix in JSON_SUFFIXES:
        document = _json_document(path)
        value = document.get("top_k") if isinstance(document, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{path}: top_k must be a positive integer, got {value!r}")
    return value


def inferred_top_k(matrices: torch.Tensor) -> int | None:
    """Experts per token implied by matrices whose diagonal counts each expert's tokens (moepatch's profiler).

    With ``k`` experts per token, a layer's diagonal sums to ``tokens·k`` and its off-diagonal to ``tokens·k·(k-1)``,
    so ``k = 1 + off / diagonal``.  Returns ``None`` when the diagonal holds no counts (official files hold 0 or -1)
    or when the layers do not agree on one integer ``k``.
    """
    counts = matrices.to(torch.float64)
    diagonal = counts.diagonal(dim1=-2, dim2=-1).sum(-1)
    off = counts.sum((-2, -1)) - diagonal
    if bool((diagonal <= 0).any()):
        return None
    ratios = 1.0 + off / diagonal
    first = float(ratios.flatten()[0])
    if first != round(first) or bool((ratios != first).any()):
        return None
    return int(first)
