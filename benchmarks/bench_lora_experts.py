"""Train-step time and peak memory: moepatch LoRA experts vs peft LoRA, side by side in one run.

Variants (each in a fresh subprocess, so its peak memory is its own; all train with AdamW on the same batch):

* ``peft-lora``: one peft LoRA (r=8) on the attention projections q, k, v, o;
* ``mola-8`` / ``mola-32``: moepatch MoLA, top-2 of 8 / of 32 LoRA experts (r=8) with a router, on the same
  projections — with sparse top-k the step time should hardly grow from 8 to 32 experts;
* ``peft-target-parameters``: peft LoRA (r=8) on the routed experts' fused tensors (``target_parameters``: one LoRA
  per routed expert, ΔW of every expert materialised each step);
* ``routed-1``: moepatch, one LoRA (r=8) per routed expert on gate / up / down, run on the expert's own tokens (the
  same adapter as ``peft-target-parameters``);
* ``routed-mola-8``: moepatch, top-2 of 8 LoRA experts (r=8) per routed expert on gate / up / down.

Models: ``tiny`` (the embedded tiny Qwen2-MoE) and ``qwen1.5-moe``: Qwen1.5-MoE-A2.7B layer sizes (hidden 2048,
moe_intermediate 1408, 60 experts top-4, shared expert 5632, 16 heads) with ``--layers`` layers and a reduced
vocabulary.  Each ratio divides a variant by its baseline (``vs``) measured in the same run.

Peak memory: on CPU the peak resident set of the train steps (``VmHWM`` of ``/proc/self/status`` after resetting it
through ``/proc/self/clear_refs`` right before the first step; ``resource.getrusage`` ``ru_maxrss`` where that file
is not writable), minus the resident set before the first step; on GPU ``torch.cuda.max_memory_allocated`` minus
the memory allocated before the first step.  Both count activations, gradients and optimizer state, not the weights.

Usage::

    python benchmarks/bench_lora_experts.py                         # CPU, both models, 1 Qwen1.5-MoE layer
    python benchmarks/bench_lora_experts.py --device cuda --dtype bfloat16 --compile --layers 2 --seq 512
    python benchmarks/bench_lora_experts.py --json figures.json   # also the key figures as JSON (see figures_json.py)
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import make_batch  # noqa: E402
from bench_forward import qwen15_moe_reduced  # noqa: E402
from bench_forward import synchronize  # noqa: E402
from figures_json import Figure  # noqa: E402
from figures_json import add_json_argument  # noqa: E402
from figures_json import write_summary  # noqa: E402

MODELS = ("tiny", "qwen1.5-moe")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ROUTED = ["mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"]
NO_DROPOUT = {"method": "mola", "r": 8, "dropout": 0.0}  # peft's LoRA default: the same work on both sides
VARIANTS = {
    "peft-lora": None,
    "mola-8": {**NO_DROPOUT, "target_modules": ATTENTION, "num_experts": 8, "top_k": 2},
    "mola-32": {**NO_DROPOUT, "target_modules": ATTENTION, "num_experts": 32, "top_k": 2},
    "peft-target-parameters": None,
    "routed-1": {**NO_DROPOUT, "target_modules": ROUTED, "num_experts": 1, "top_k": 1},
    "routed-mola-8": {**NO_DROPOUT, "target_modules": ROUTED, "num_experts": 8, "top_k": 2},
}
BASELINE = {"mola-8": "peft-lora", "mola-32": "mola-8", "routed-1": "peft-target-parameters",
            "routed-mola-8": "peft-target-parameters"}
"""Each variant's ratio is against this one (``mola-32`` against ``mola-8``: how time grows with the expert count)."""


def prepare(variant: str, model: torch.nn.Module) -> torch.nn.Module:
    """The model with ``variant``'s adapter attached (base frozen)."""
    if variant.startswith("peft"):
        from peft import LoraConfig
        from peft import get_peft_model

        if variant == "peft-lora":
            config = LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION)
        else:
            config = LoraConfig(r=8, lora_alpha=16, target_modules=[],
                                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        return get_peft_model(model, config)
    import moepatch

    moepatch.apply(model, {"lora_experts": VARIANTS[variant]})
    return model


def build(name: str, layers: int, vocab: int, device: torch.device, dtype: torch.dtype
          ) -> tuple[torch.nn.Module, int]:
    """The named model on ``device`` in ``dtype`` and its vocabulary size."""
    torch.manual_seed(0)
    if name == "tiny":
        from moepatch.testing import tiny

        model, vocab = tiny.tiny_model("qwen2_moe"), len(tiny.tiny_tokenizer())
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(qwen15_moe_reduced(layers, vocab))
    return model.to(device=device, dtype=dtype), vocab


class PeakMemory:
    """Peak memory of a stretch of code above the memory in use when it starts (see the module docstring)."""

    STATUS, CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM (clear_refs)"

    def _status_kb(self, field: str) -> int:
        return int(re.search(rf"^{field}:\s+(\d+) kB", self.STATUS.read_text(), re.MULTILINE).group(1))

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.resting = torch.cuda.memory_allocated(self.device)
            return
        self.resting = self._status_kb("VmRSS") * 1024
        try:
            self.CLEAR.write_text("5")  # resets the peak resident set (VmHWM) to the current one
        except OSError:
            self.method = "ru_maxrss"

    def peak_above_start(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.resting
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if self.method == "ru_maxrss"
                else self._status_kb("VmHWM") * 1024)
        return max(0, peak - self.resting)


def child(args: argparse.Namespace) -> None:
    """One variant on one model: prints a JSON line with the median step time, peak memory and trainable count."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model, vocab = build(args.model, args.layers, args.vocab, device, dtype)
    model = prepare(args.variant, model).train()
    step_model = torch.compile(model) if args.compile else model
    batch = make_batch(vocab, args.batch_size, args.seq, device)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=True)  # multi-tensor, as on GPU by default
    memory = PeakMemory(device)
    memory.start()
    times = []
    for step in range(args.warmup + args.steps):
        synchronize(device)
        start = time.perf_counter()
        step_model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    print(json.dumps({"step_s": statistics.median(times), "peak_mb": memory.peak_above_start() / 2**20,
                      "memory": memory.method, "trainable": sum(p.numel() for p in trainable)}))


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, checked: a bad value exits with status 2 and a message naming the flag."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--layers", type=int, default=1, help="decoder layers of the Qwen1.5-MoE-sized model")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<index>")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for the train steps")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary of the Qwen1.5-MoE-sized model")
    parser.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    add_json_argument(parser)
    args = parser.parse_args(argv)
    for flag, minimum in (("layers", 1), ("steps", 1), ("warmup", 0), ("batch_size", 1), ("seq", 2), ("vocab", 16)):
        if getattr(args, flag) < minimum:
            parser.error(f"--{flag.replace('_', '-')}: expected an integer >= {minimum}, got {getattr(args, flag)}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: expected cpu, cuda or cuda:<index>, got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu, cuda or cuda:<index>, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device: CUDA is not available on this machine")
    return args


def child_command(args: argparse.Namespace, model: str, variant: str) -> list[str]:
    command = [sys.executable, __file__, "--model", model, "--variant", variant]
    for flag in ("layers", "device", "dtype", "steps", "warmup", "batch_size", "seq", "vocab"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return command + (["--compile"] if args.compile else [])


def run_variant(args: argparse.Namespace, model: str, variant: str) -> dict:
    """The child's result; a failing child ends the run with its error output (status 1)."""
    done = subprocess.run(child_command(args, model, variant), capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"bench_lora_experts: {model} / {variant} failed (status {done.returncode}), see above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(model: str, args: argparse.Namespace, results: dict[str, dict]) -> None:
    shape = f"{args.layers} layer(s) of Qwen1.5-MoE-A2.7B sizes" if model == "qwen1.5-moe" else "tiny Qwen2-MoE"
    method = next(iter(results.values()))["memory"]
    print(f"\n{model} ({shape}): batch {args.batch_size}x{args.seq}, {args.dtype}, {args.device}"
          f"{', compiled' if args.compile else ''}; median of {args.steps} train steps (forward + backward + AdamW); "
          f"peak = step peak above the resting model ({method})")
    print(f"{'variant':<24}{'step ms':>10}{'peak MB':>10}{'trainable':>13}  {'vs':<24}{'time':>7}{'peak':>7}")
    for variant, result in results.items():
        base = results.get(BASELINE.get(variant, ""))
        ratios = (f"{BASELINE[variant]:<24}{result['step_s'] / base['step_s']:>6.2f}x"
                  f"{result['peak_mb'] / max(base['peak_mb'], 1e-9):>6.2f}x" if base else "-")
        print(f"{variant:<24}{result['step_s'] * 1e3:>10.1f}{result['peak_mb']:>10.1f}{result['trainable']:>13,}  "
              f"{ratios}")


def key_figures(model: str, args: argparse.Namespace, results: dict[str, dict]) -> list[Figure]:
    """One figure per variant measured with its baseline: the step-time ratio, with the peak-memory ratio beside it."""
    setting = (f"{model}{f' {args.layers}L' if model == 'qwen1.5-moe' else ''} {args.batch_size}x{args.seq}"
               f"{' compiled' if args.compile else ''}")
    figures = []
    for variant, result in results.items():
        base = results.get(BASELINE.get(variant, ""))
        if base:
            figures.append(Figure(setting, f"{variant} / {BASELINE[variant]} step", result["step_s"] / base["step_s"],
                                  extra=f"peak {result['peak_mb'] / max(base['peak_mb'], 1e-9):.2f}x"))
    return figures


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    if args.variant:
        child(args)
        return
    figures = []
    for model in args.models:
        results = {}
        for variant in args.variants:
            results[variant] = run_variant(args, model, variant)
            print(f"  {model} / {variant}: {results[variant]['step_s'] * 1e3:.1f} ms", file=sys.stderr, flush=True)
        print_table(model, args, results)
        figures += key_figures(model, args, results)
    write_summary(args.json, "bench_lora_experts", args, figures)


if __name__ == "__main__":
    main()
