"""In-process serving of task experts: route each request, then generate a batch whose requests use different
adapters (peft mixed-adapter batches: ``adapter_names=[...]``, one entry per row).

A request routed to one task uses that task's expert; to several, the ``cat`` merge of those experts with equal
weights (MELD merged each pair offline; an existing merge from ``experts merge`` is used, a missing one is merged in
memory with peft's ``add_weighted_adapter``).  peft runs mixed batches for LoRA on linear layers only; adapters on
fused routed experts (``target_parameters``) are served one adapter group after another instead — same outputs,
stated in :attr:`TaskExpertModel.mixed_batches`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from moepatch.data.instruction import IGNORE_INDEX
from moepatch.data.instruction import encode_messages
from moepatch.data.instruction import to_messages
from moepatch.task_experts.adapter_files import quiet_peft
from moepatch.task_experts.manifest import MERGED_FOLDER
from moepatch.task_experts.manifest import ExpertManifest
from moepatch.task_experts.manifest import base_model
from moepatch.task_experts.merging import combination_key
from moepatch.task_experts.merging import read_merges
from moepatch.task_experts.router import BaseModelEncoder
from moepatch.task_experts.router import RequestEncoder
from moepatch.task_experts.router import SentenceTransformerEncoder
from moepatch.task_experts.router import TaskRouter
from moepatch.task_experts.run_folder import read_run
from moepatch.task_experts.weighted_adapters import add_weighted_adapter

BASE_ADAPTER = "__base__"
"""peft's name for "no adapter" in a mixed batch."""


@dataclass
class Generation:
    text: str
    adapter: str
    tasks: list[str]
    token_ids: list[int]


def spread_adapter_names(model: Any) -> int:
    """Let peft's mixed-adapter batches reach LoRA layers inside MoE blocks.

    peft hands every LoRA layer one adapter name per batch row and checks ``len(x) == len(adapter_names)``; an MoE
    block flattens its input to ``[batch·tokens, hidden]`` before the shared expert (and dense MLPs of some
    families), so those layers refuse the batch.  A pre-hook on the transformers model records each call's token
    count ``T`` (``input_ids`` / ``inputs_embeds``); each LoRA linear layer then repeats the names per token when
    its input has exactly ``batch·T`` rows (row ``b·T + t`` belongs to request ``b``).  Any other row count (a
    layer that sees a subset of the tokens) is refused with the layer's name rather than guessed.  Returns the
    number of layers changed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "_moepatch_records_tokens", False):
        base._moepatch_tokens_per_row = None

        def record(module: Any, args: tuple, kwargs: dict) -> None:  # ``base``, which carries the count
            inputs = kwargs.get("input_ids")
            if inputs is None:
                inputs = kwargs.get("inputs_embeds")
            if inputs is None and args:
                inputs = args[0]
            module._moepatch_tokens_per_row = inputs.shape[1] if torch.is_tensor(inputs) and inputs.dim() > 1 else None

        base.register_forward_pre_hook(record, with_kwargs=True)
        base._moepatch_records_tokens = True
    changed = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or getattr(module, "_moepatch_spreads_names", False):
            continue
        layer: Any = module  # an nn.Module; peft types LoraLayer as a bare mixin (no forward), the marker is ours
        original = layer.forward

        def forward(x: torch.Tensor, *args: Any, _original: Any = original, _name: str = name,
                    **kwargs: Any) -> torch.Tensor:
            names = kwargs.get("adapter_names")
            if names is not None and x.dim() == 2 and x.shape[0] != len(names):
                tokens = base._moepatch_tokens_per_row
                if tokens is None or x.shape[0] != len(names) * tokens:
                    raise ValueError(f"{_name}: {x.shape[0]} input rows for a mixed batch of {len(names)} requests "
                                     f"of {tokens} tokens: this layer sees part of the tokens, so a mixed-adapter "
                                     "batch cannot tell whose rows they are; serve one adapter at a time")
                kwargs["adapter_names"] = [adapter for adapter in names for _ in range(tokens)]
            return _original(x, *args, **kwargs)

        layer.forward = forward
        layer._moepatch_spreads_names = True
        changed += 1
    return changed


class TaskExpertModel:
    """A base MoE with its task experts loaded as peft adapters and (optionally) the fitted request router."""

    def __init__(self, model: Any, tokenizer: Any, manifest: ExpertManifest, router: TaskRouter | None = None,
                 encoder: Any = None) -> None:
        self.model, self.tokenizer, self.manifest = model, tokenizer, manifest
        spread_adapter_names(model)
        self.router, self.encoder = router, encoder
        self.tokenizer.padding_side = "left"  # generation appends on the right
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def from_experts(cls, output: str | Path, *, with_router: bool = True) -> TaskExpertModel:
        """Load the base named in the manifest (patched), every expert and every saved merge, and the router."""
        manifest = read_run(output, router=with_router)
        base, tokenizer = base_model(manifest)
        with quiet_peft():
            model = PeftModel.from_pretrained(base, str(manifest.expert_path(manifest.tasks[0])),
                                              adapter_name=manifest.tasks[0])
            for task in manifest.tasks[1:]:
                model.load_adapter(str(manifest.expert_path(task)), adapter_name=task)
            merged = manifest.folder / MERGED_FOLDER
            for entry in read_merges(merged):
                model.load_adapter(str(merged / entry["path"]), adapter_name=entry["name"])
        model.eval()
        router: TaskRouter | None = None
        encoder: RequestEncoder | None = None
        if with_router:
            router = TaskRouter.load(manifest.folder / "router")
            if router.encoder["kind"] != "base_model":
                encoder = SentenceTransformerEncoder.from_description(router.encoder,
                                                                      router_folder=manifest.folder / "router")
            else:  # signatures come from the base itself: route() runs it with the adapters disabled
                encoder = BaseModelEncoder(model.get_base_model(), tokenizer,
                                           features=router.encoder["features"],
                                           max_length=router.encoder["max_length"])
            with model.disable_adapter():
                router.check_encoder(encoder)  # router.safetensors against the signatures, named, before routing
        return cls(model, tokenizer, manifest, router, encoder)

    # ------------------------------------------------------------------ adapters
    @property
    def adapters(self) -> list[str]:
        return list(self.model.peft_config)

    @property
    def mixed_batches(self) -> bool:
        """Whether peft can run different adapters in one batch (not with ``target_parameters`` adapters)."""
        return not any(getattr(config, "target_parameters", None) for config in self.model.peft_config.values())

    def adapter_for(self, tasks: Sequence[str]) -> str:
        """The adapter serving a request routed to ``tasks``: the task's expert, or the equal-weight ``cat`` merge
        of several (merged now, in memory, if ``experts merge`` did not write it)."""
        if len(tasks) == 1:
            self.manifest.expert(tasks[0])
            return tasks[0]
        key = combination_key(tasks, [1.0] * len(tasks))
        name = "+".join(key)
        if name not in self.model.peft_config:
            self.manifest.check_tasks(list(key))
            add_weighted_adapter(self.model, list(key), [1.0 / len(key)] * len(key), name, "cat")
            spread_adapter_names(self.model)
        return name

    def route(self, texts: Sequence[str], top_k: int = 2) -> list[list[str]]:
        if self.router is None:
            raise ValueError("no router loaded: fit one with `moepatch experts fit-router` or pass adapter names")
        with self.model.disable_adapter():
            signatures = self.encoder.encode(list(texts))
        return [choice.tasks for choice in self.router.route(signatures, top_k)]

    # ------------------------------------------------------------------ running
    def _encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(list(texts), return_tensors="pt", padding=True)
        return {key: value.to(self.model.device) for key, value in batch.items()
                if key in ("input_ids", "attention_mask")}

    @contextlib.contextmanager
    def _only(self, adapter: str) -> Iterator[None]:
        """Every row of the next call under one adapter (no ``adapter_names``): peft's plain path."""
        with quiet_peft():
            if adapter == BASE_ADAPTER:
                with self.model.disable_adapter():
                    yield
            else:
                self.model.set_adapter(adapter)
                yield

    def _by_adapter(self, texts: Sequence[Any], adapters: Sequence[str],
                    run: Callable[[Sequence[Any], list[str]], list[Any]]) -> list[Any]:
        """``run`` on one mixed batch where peft can mix adapters, else once per adapter group (results in the
        requests' order)."""
        unknown = sorted({a for a in adapters if a != BASE_ADAPTER and a not in self.model.peft_config})
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; loaded: {self.adapters}")
        if len(texts) != len(adapters):
            raise ValueError(f"{len(texts)} texts but {len(adapters)} adapter names")
        if self.mixed_batches and len(set(adapters)) > 1:
            with quiet_peft():
                return run(texts, list(adapters))
        result: list[Any] = [None] * len(texts)
        for adapter in dict.fromkeys(adapters):
            rows = [i for i, name in enumerate(adapters) if name == adapter]
            with self._only(adapter):
                for row, value in zip(rows, run([texts[i] for i in rows], []), strict=True):
                    result[row] = value
        return result

    @torch.no_grad()
    def logits(self, texts: Sequence[str], adapters: Sequence[str]) -> torch.Tensor:
        """Next-token logits ``[n, vocab]`` of each text under its adapter (one mixed batch where peft can)."""
        def run(chunk: Sequence[str], names: list[str]) -> list[torch.Tensor]:
            extra = {"adapter_names": names} if names else {}
            return list(self.model(**self._encode(chunk), **extra).logits[:, -1].float())

        return torch.stack(self._by_adapter(texts, adapters, run))

    @torch.no_grad()
    def generate_with(self, texts: Sequence[str], adapters: Sequence[str], max_new_tokens: int = 16
                      ) -> list[list[int]]:
        """Greedy continuations (token ids) of ``texts``, each under its adapter: one mixed batch, or one batch per
        adapter where peft cannot mix (see the module docstring)."""
        return self._by_adapter(texts, adapters, lambda chunk, names: self._generate(chunk, names, max_new_tokens))

    def _generate(self, texts: Sequence[str], adapters: list[str], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations; ``adapters``: one name per row (a mixed batch), or empty (the active adapter)."""
        batch = self._encode(texts)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False,
                                  "pad_token_id": self.tokenizer.pad_token_id}
        if adapters:
            kwargs["adapter_names"] = adapters
        output = self.model.generate(**batch, **kwargs)
        width = batch["input_ids"].shape[1]
        return [row[width:].tolist() for row in output]

    @torch.no_grad()
    def answer_losses(self, records: Sequence[dict[str, Any]], adapters: Sequence[str], batch_size: int = 8
                      ) -> list[float]:
        """Per record (a conversation / instruction record), the mean next-token loss of its answer tokens under its
        adapter — mixed batches, answers only (the tokenisation finetune trains on)."""
        prompt_format = "chat_template" if getattr(self.tokenizer, "chat_template", None) else "vicuna"
        encoded = [encode_messages(self.tokenizer, to_messages(record), prompt_format=prompt_format)
                   for record in records]
        losses: list[float] = []
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(encoded), batch_size):
            chunk, names = encoded[start:start + batch_size], list(adapters[start:start + batch_size])
            width = max(len(item["input_ids"]) for item in chunk)
            ids = torch.tensor([item["input_ids"] + [pad] * (width - len(item["input_ids"])) for item in chunk])
            mask = torch.tensor([[1] * len(item["input_ids"]) + [0] * (width - len(item["input_ids"]))
                                 for item in chunk])
            labels = torch.tensor([item["labels"] + [IGNORE_INDEX] * (width - len(item["labels"])) for item in chunk])

            def run(rows: Sequence[int], adapter_names: list[str], ids: torch.Tensor = ids,
                    mask: torch.Tensor = mask) -> list[torch.Tensor]:  # this chunk's batch, bound now
                extra = {"adapter_names": adapter_names} if adapter_names else {}
                index = torch.tensor(list(rows))
                return list(self.model(input_ids=ids[index].to(self.model.device),
                                       attention_mask=mask[index].to(self.model.device), **extra).logits.float().cpu())

            logits = torch.stack(self._by_adapter(list(range(len(chunk))), names, run))
            per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                          ignore_index=IGNORE_INDEX, reduction="none")
            counted = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1)
            losses += (per_token.sum(dim=1) / counted).tolist()
        return losses

    def generate(self, texts: Sequence[str], top_k: int = 2, max_new_tokens: int = 16) -> list[Generation]:
        """Route every request, then generate all of them in one batch with their own adapters."""
        routes = self.route(texts, top_k)
        adapters = [self.adapter_for(tasks) for tasks in routes]
        tokens = self.generate_with(texts, adapters, max_new_tokens)
        return [Generation(self.tokenizer.decode(ids, skip_special_tokens=True), adapter, tasks, ids)
                for ids, adapter, tasks in zip(tokens, adapters, routes, strict=True)]


def throughput(serving: TaskExpertModel, texts: Sequence[str], adapters: Sequence[str], batch_size: int,
               max_new_tokens: int) -> dict[str, float]:
    """Generated tokens per second: mixed batches (requests in arrival order, any adapters together) vs one adapter
    at a time (the requests grouped by adapter, batched within each group) — what serving without mixed batches
    costs when requests arrive interleaved."""
    def timed(batches: list[tuple[list[str], list[str]]]) -> float:
        start = time.perf_counter()
        produced = sum(len(ids) for chunk, names in batches
                       for ids in serving.generate_with(chunk, names, max_new_tokens))
        return produced / (time.perf_counter() - start)

    texts, adapters = list(texts), list(adapters)
    mixed = [(texts[i:i + batch_size], adapters[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    grouped = []
    for adapter in dict.fromkeys(adapters):
        rows = [text for text, name in zip(texts, adapters, strict=True) if name == adapter]
        grouped += [(rows[i:i + batch_size], [adapter] * len(rows[i:i + batch_size]))
                    for i in range(0, len(rows), batch_size)]
    timed(mixed[:1])  # warm-up
    mixed_rate, grouped_rate = timed(mixed), timed(grouped)
    return {"mixed_tokens_per_s": mixed_rate, "one_adapter_at_a_time_tokens_per_s": grouped_rate,
            "ratio": mixed_rate / grouped_rate, "batches_mixed": len(mixed), "batches_one_at_a_time": len(grouped)}
