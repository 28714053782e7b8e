"""Dynamic data mixing during HF Trainer fine-tuning: probe rounds, the weight update, checkpointed sampler state.

The method is Dynamic Data Mixing (Zhu et al., 2024).  Every ``update_every`` optimizer steps
:class:`DynamicSamplingCallback` routes each source's fixed probe set through the model (eval mode, no grad),
records hard top-k counts with :class:`~moepatch.routing.recorder.RoutingRecorder` (default: the last MoE
layer, as in the
paper), sums them over ranks, and applies :func:`moepatch.mixing.update_rule.update_weights`.  The new weights go to the
:class:`~moepatch.mixing.sampler.DynamicMixtureSampler` from a declared draw on (exact with workers); each round is
appended to ``output_dir/sampling_info/rounds.jsonl`` on the main process.  :class:`MixtureTrainer` plugs the
sampler into the Trainer and saves / restores its state with every checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from moepatch.compat import distributed_ready
from moepatch.errors import FieldError
from moepatch.feature import feature_state_keys
from moepatch.feature import load_feature_states
from moepatch.loading.pretrained import from_pretrained
from moepatch.mixing.sampler import DynamicMixtureSampler
from moepatch.mixing.sampler import MixtureDataset
from moepatch.mixing.update_rule import CRITERIA
from moepatch.mixing.update_rule import DISTANCES
from moepatch.mixing.update_rule import source_distances
from moepatch.mixing.update_rule import update_weights
from moepatch.routing.recorder import RoutingRecorder
from moepatch.routing.recorder import collective_device
from moepatch.staged_output import write_text_atomically
from moepatch.tools.report import plot_sampling_rounds
from moepatch.validation import is_int

logger = logging.getLogger("moepatch.dynamic_sampling")  # the name of earlier releases: logging configs keep working
STATE_FILE = "dynamic_sampling.json"
ROUNDS_FILE = Path("sampling_info") / "rounds.jsonl"


@dataclass
class DynamicSamplingArguments:
    """Options of dynamic data mixing (Dynamic Data Mixing, Zhu et al., 2024; usable with ``HfArgumentParser``).

    Every value is checked when the object is built: :class:`~moepatch.errors.FieldError` names the bad field
    (``HfArgumentParser`` spells it ``--<field>``; the command maps it).
    """

    update_every: int = field(default=100, metadata={"help": "Optimizer steps between probe rounds (m; >= 1)."})
    eta: float = field(default=10.0, metadata={"help": "Step size η of the weight update (finite, >= 0)."})
    c: float = field(default=0.05, metadata={"help": "Smoothing towards uniform, in [0, 1]; every weight stays >= "
                                                     "c/|D|."})
    distance: str = field(default="l2", metadata={"help": "'l2' or 'cos'."})
    criterion: str = field(default="mean", metadata={"help": "'mean', 'max' or 'min'."})
    probe_layers: list[int] = field(default_factory=lambda: [-1], metadata={
        "help": "MoE layers to record (decoder-layer indices, negative from the last; default the last, as in the "
                "paper)."})
    probe_batch_size: int = field(default=4, metadata={"help": "Batch size of the probe forwards (>= 1)."})
    sampling_seed: int = field(default=0, metadata={"help": "Seed of the source draws, the per-source streams and "
                                                            "the probe subsets."})
    plot: bool = field(default=True, metadata={"help": "Draw sampling_info/rounds.png after every round."})

    def __post_init__(self) -> None:
        if not (is_int(self.update_every) and self.update_every >= 1):
            raise FieldError("update_every", f"expected an integer >= 1 (optimizer steps between probe rounds), "
                                             f"got {self.update_every!r}")
        if not (_is_number(self.eta) and math.isfinite(self.eta) and self.eta >= 0):
            raise FieldError("eta", f"expected a finite step size >= 0, got {self.eta!r}")
        if not (_is_number(self.c) and 0.0 <= self.c <= 1.0):
            raise FieldError("c", f"expected a smoothing value in [0, 1], got {self.c!r}")
        if self.distance not in DISTANCES:
            raise FieldError("distance", f"expected one of {', '.join(DISTANCES)}, got {self.distance!r}")
        if self.criterion not in CRITERIA:
            raise FieldError("criterion", f"expected one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        layers = self.probe_layers
        if not isinstance(layers, (list, tuple)) or not layers:
            raise FieldError("probe_layers", f"expected at least one MoE layer index, got {layers!r}")
        if not all(is_int(index) for index in layers):
            raise FieldError("probe_layers", f"expected integer layer indices, got {list(layers)!r}")
        if len(set(layers)) != len(layers):
            raise FieldError("probe_layers", f"a layer is listed twice: {list(layers)}")
        if not (is_int(self.probe_batch_size) and self.probe_batch_size >= 1):
            raise FieldError("probe_batch_size", f"expected an integer >= 1, got {self.probe_batch_size!r}")
        if not is_int(self.sampling_seed):
            raise FieldError("sampling_seed", f"expected an integer, got {self.sampling_seed!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class DynamicSamplingCallback(TrainerCallback):
    """Probe rounds and weight updates; see the module docstring."""

    def __init__(
        self,
        sampler: DynamicMixtureSampler,
        names: list[str],
        probe_sets: list[list[dict[str, Any]]],
        collator: Any,
        options: DynamicSamplingArguments,
    ) -> None:
        if len(names) != len(probe_sets) or len(names) != len(sampler.source_sizes):
            raise ValueError("names / probe_sets: one name and one probe set per source")
        if any(not probe for probe in probe_sets):
            raise ValueError("probe_sets: every source needs probe examples")
        self.sampler, self.names, self.probe_sets = sampler, names, probe_sets
        self.collator, self.options = collator, options

    def probe_loads(self, model: torch.nn.Module) -> list[list[float]]:
        """Per source: the recorded layers' hard top-k counts over its probe set, summed over ranks, flattened.

        Rank ``r`` of ``W`` routes examples ``r, r+W, ...`` of every probe set, so the total is the single-process
        result whatever the world size (the official probe grows with it).  Every rank runs the same number of
        forwards — ranks short of a batch route a filler outside the recorder — because ZeRO-3 gathers parameters
        collectively in each forward.
        """
        rank, world = _rank_and_world()
        size = self.options.probe_batch_size
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        loads = []

        def forward(examples: list[dict[str, Any]]) -> None:
            batch = self.collator(examples)
            model(**{key: batch[key].to(device) for key in ("input_ids", "attention_mask")})

        try:
            for probe in self.probe_sets:
                mine = probe[rank::world]
                batches = [mine[start : start + size] for start in range(0, len(mine), size)]
                needed = math.ceil(math.ceil(len(probe) / world) / size)
                recorder = RoutingRecorder(model, self.options.probe_layers)
                with torch.no_grad():
                    with recorder:
                        for batch in batches:
                            forward(batch)
                    for _ in range(needed - len(batches)):
                        forward(probe[:1])
                loads.append(recorder.all_reduce().counts.flatten().double().tolist())
        finally:
            model.train(was_training)
        return loads

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any):
        """Drop rounds recorded after the step training starts from (a resume from an earlier checkpoint, or an
        earlier run in the same folder): the rounds file then describes this run only, with no round twice."""
        path = Path(args.output_dir) / ROUNDS_FILE
        if state.is_world_process_zero and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= state.global_step]
            write_text_atomically(path, "".join(line + "\n" for line in kept))
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None, **kwargs: Any):
        if model is None or state.global_step % self.options.update_every != 0:
            return control
        loads = self.probe_loads(model)
        old = self.sampler.weights
        o = self.options
        new = update_weights(old, loads, eta=o.eta, c=o.c, distance=o.distance, criterion=o.criterion)
        _check_ranks_agree(new)
        self.sampler.set_weights(new, consumed=consumed_draws(args, state.global_step))
        if state.is_world_process_zero:
            record = {
                "step": state.global_step,
                "sources": self.names,
                "old_weights": old,
                "new_weights": new,
                "distances": source_distances(loads, distance=o.distance, criterion=o.criterion),
                "per_source_loads": loads,
                "realised_counts": list(self.sampler.counts),
                "world_size": _rank_and_world()[1],
            }
            path = Path(args.output_dir) / ROUNDS_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            if o.plot:
                self._plot(path)
        return control

    def _plot(self, rounds_path: Path) -> None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            logger.warning("dynamic sampling: no PNG of the rounds (pip install matplotlib)")
            self.options.plot = False
            return
        rounds = [json.loads(line) for line in rounds_path.read_text().splitlines() if line.strip()]
        plot_sampling_rounds(rounds, rounds_path.parent / "rounds.png")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        """Every rank writes its own sampler state, so a run can show that all ranks drew the same mixture."""
        rank, _ = _rank_and_world()
        path = Path(args.output_dir) / "sampling_info" / f"sampler.rank{rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        state_dict = self.sampler.state_dict(consumed=consumed_draws(args, state.global_step))
        record = {"names": self.names, **state_dict, "counts": list(self.sampler.counts)}
        write_text_atomically(path, json.dumps(record))
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            state_dict = self.sampler.state_dict(consumed=consumed_draws(args, state.global_step))
            write_text_atomically(folder / STATE_FILE, json.dumps({"names": self.names, **state_dict}))
        return control


class ResumingTrainer(Trainer):
    """A Trainer whose plain (non-DeepSpeed) resume restores a patched MoE model exactly.

    transformers 5.24's Trainer restores a checkpoint with a raw ``load_state_dict``, but MoE checkpoints are saved
    in the per-expert layout (``experts.{e}.gate_proj.weight``) that only ``from_pretrained`` fuses back into
    ``experts.gate_up_proj``: without a reload the experts silently keep their pre-resume weights.  What a feature
    added (LoRA experts' weights, for one) lives in its own files beside the weights, and each feature restores its
    own through the :class:`~moepatch.feature.Feature` interface (:func:`~moepatch.feature.load_feature_states`).
    """

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)

        target = model if model is not None else self.model
        if target is None:
            raise ValueError(f"resume_from_checkpoint: no model to restore {resume_from_checkpoint} into")
        reloaded = from_pretrained(resume_from_checkpoint, patch=False)
        added = feature_state_keys(target)
        missing, unexpected = target.load_state_dict(reloaded.state_dict(), strict=False)
        missing = [key for key in missing if key not in added]
        if missing or unexpected:
            raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint} does not match the model "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        try:
            load_feature_states(target, resume_from_checkpoint)
        except ValueError as error:
            raise ValueError(f"resume_from_checkpoint: {error}") from None


class MixtureTrainer(ResumingTrainer):
    """A Trainer whose train dataset is a :class:`MixtureDataset` drawn by a :class:`DynamicMixtureSampler`.

    The sampler's state (weights schedule, position) is saved with every checkpoint and restored on resume; the
    Trainer's own batch skipping is turned off because the sampler resumes at the right draw by itself.
    """

    def __init__(self, *args: Any, mixture_sampler: DynamicMixtureSampler, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.train_dataset, MixtureDataset):
            raise ValueError("MixtureTrainer: train_dataset must be a MixtureDataset")
        self.mixture_sampler = mixture_sampler
        self.args.ignore_data_skip = True  # the sampler resumes at the consumed draw itself

    def _get_train_sampler(self, train_dataset: Any = None) -> DynamicMixtureSampler:
        return self.mixture_sampler

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """Restore the sampler from the checkpoint first (every backend: DeepSpeed skips ``_load_from_checkpoint``)."""
        if resume_from_checkpoint is True:

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(resume_from_checkpoint, str):
            path = os.path.join(resume_from_checkpoint, STATE_FILE)
            if not os.path.exists(path):
                raise ValueError(f"resume_from_checkpoint: {path} missing; the checkpoint has no sampler state")
            state = json.loads(Path(path).read_text())
            state.pop("names", None)
            self.mixture_sampler.load_state_dict(state)
        return super().train(resume_from_checkpoint, *args, **kwargs)


def sampling_horizon(args: Any) -> int:
    """Draws an update must wait for: what the DataLoader (and accelerate's look-ahead) may have prefetched."""
    prefetch = (args.dataloader_prefetch_factor or 2) * args.dataloader_num_workers
    return (prefetch + 2) * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def consumed_draws(args: Any, global_step: int) -> int:
    """Draws of the (shared) sampler the first ``global_step`` optimizer steps used, over all ranks."""
    return global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def _rank_and_world() -> tuple[int, int]:

    if distributed_ready():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_ranks_agree(weights: list[float]) -> None:
    """Raise unless every rank computed exactly rank 0's weights (they drive the same draws on every rank)."""

    if _rank_and_world()[1] == 1:
        return
    mine = torch.tensor(weights, dtype=torch.float64, device=collective_device())
    reference = mine.clone()
    dist.broadcast(reference, src=0)
    if not torch.equal(mine, reference):
        raise RuntimeError(f"dynamic sampling: rank {dist.get_rank()} computed weights {weights}, rank 0 "
                           f"{reference.tolist()}; the ranks would draw different mixtures")
