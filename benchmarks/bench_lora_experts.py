"""Train-step time and peak memory: moepatch LoRA experts vs peft LoRA, side by side in one run.

Variants (each in a fresh subprocess, so peak memory is its own; all train with AdamW on the same batch):

* ``peft-lora``: one peft LoRA (r=8) on the attention projections q, k, v, o;
* ``lora-experts``: moepatch MoLA, top-2 of 8 LoRA experts (r=8) with a router, on the same projections;
* ``peft-target-parameters``: peft LoRA (r=8) on the routed experts' fused tensors (``target_parameters``: one LoRA
  per routed expert, ΔW of every expert materialised each step);
* ``routed-1``: moepatch, one LoRA (r=8) per routed expert on gate / up / down, run on the expert's own tokens;
* ``routed-experts``: moepatch, top-2 of 8 LoRA experts (r=8) per routed expert on gate / up / down.

Models: the tiny Qwen2-MoE and a 2-layer model with Qwen1.5-MoE-A2.7B layer sizes.  Peak memory is the process's
peak resident set on CPU (``ru_maxrss``) and ``torch.cuda.max_memory_allocated`` on GPU.

Usage::

    python benchmarks/bench_lora_experts.py
    python benchmarks/bench_lora_experts.py --device cuda --dtype bfloat16 --steps 20
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import build_model  # noqa: E402
from bench_forward import make_batch  # noqa: E402
from bench_forward import synchronize  # noqa: E402

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ROUTED = ["mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"]
VARIANTS = {
    "peft-lora": None,
    "lora-experts": {"method": "mola", "target_modules": ATTENTION, "num_experts": 8, "top_k": 2, "r": 8},
    "peft-target-parameters": None,
    "routed-1": {"method": "mola", "target_modules": ROUTED, "num_experts": 1, "top_k": 1, "r": 8},
    "routed-experts": {"method": "mola", "target_modules": ROUTED, "num_experts": 8, "top_k": 2, "r": 8},
}
BASELINE = {"lora-experts": "peft-lora", "routed-1": "peft-target-parameters",
            "routed-experts": "peft-target-parameters"}


def prepare(variant: str, model: torch.nn.Module) -> torch.nn.Module:
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


def child(args: argparse.Namespace) -> None:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model, vocab = build_model(args.model, args.vocab, device, dtype)
    model = prepare(args.variant, model).train()
    batch = make_batch(vocab, args.batch_size, args.seq, device)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=True)  # multi-tensor, as on GPU by default
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.steps):
        synchronize(device)
        start = time.perf_counter()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"step_s": statistics.median(times), "peak_mb": peak / 2**20,
                      "trainable": sum(p.numel() for p in trainable)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "qwen1.5-moe-2l"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return
    for model in args.models:
        results = {}
        for variant in args.variants:
            command = [sys.executable, __file__, "--model", model, "--variant", variant, "--device", args.device,
                       "--dtype", args.dtype, "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--batch-size", str(args.batch_size), "--seq", str(args.seq), "--vocab", str(args.vocab)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"\n{model}: batch {args.batch_size}x{args.seq}, {args.dtype}, {args.device}, median of {args.steps} "
              "train steps (forward + backward + AdamW)")
        print(f"{'variant':<24}{'step ms':>10}  {'vs baseline':<34}{'peak MB':>8}{'trainable':>12}")
        for variant, result in results.items():
            base = BASELINE.get(variant)
            ratio = f"{result['step_s'] / results[base]['step_s']:.2f}x {base}" if base in results else "-"
            print(f"{variant:<24}{result['step_s'] * 1e3:>10.1f}  {ratio:<34}{result['peak_mb']:>8.0f}"
                  f"{result['trainable']:>12,}")


if __name__ == "__main__":
    main()
