"""Every ``moepatch`` command answers bad input with an exit status and a short message, never a traceback, and
writes nothing.

Each row: the arguments (``{name}`` = a fixture file or folder), the expected exit status (2: a bad argument or a
model moepatch cannot patch, 1: a failed check or a malformed file) and a text the message must contain (the
argument or file it names).  Commands run in-process through :func:`moepatch.cli.main` — the console script's
entry point — and a few run as real subprocesses below.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers import LlamaConfig

from moepatch import cli
from moepatch.loading.install import install
from moepatch.testing import tiny
from moepatch.tools.c2r.profiling import CoactivationProfile


class RunsCode:
    """Unpickling this calls ``eval``: a safe loader must refuse it before anything is called."""

    def __reduce__(self) -> tuple:
        return (eval, ("__import__('pathlib').Path('PWNED').touch()",))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-inputs")
    made: dict[str, Path] = {"root": root}
    made["ck"] = tiny.save_tiny_checkpoint(root / "ck", "qwen2_moe")
    made["installed"] = tiny.save_tiny_checkpoint(root / "installed", "qwen2_moe")
    install(made["installed"])
    made["badblock"] = tiny.save_tiny_checkpoint(root / "badblock", "qwen2_moe")
    config = json.loads((made["badblock"] / "config.json").read_text())
    config["moepatch"] = {"freeze_gate": "maybe"}
    (made["badblock"] / "config.json").write_text(json.dumps(config))
    dense = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(dense).save_pretrained(root / "dense")
    made["dense"] = root / "dense"
    (root / "unknown").mkdir()
    (root / "unknown" / "config.json").write_text(json.dumps({"model_type": "no_such_model"}))
    made["unknown"] = root / "unknown"
    (root / "noconfig").mkdir()
    made["noconfig"] = root / "noconfig"
    (root / "nonempty").mkdir()
    (root / "nonempty" / "keep.txt").write_text("user data")
    made["nonempty"] = root / "nonempty"
    (root / "nonempty_demo" / "finetune").mkdir(parents=True)
    (root / "nonempty_demo" / "finetune" / "mine.txt").write_text("not the demo's")
    made["nonempty_demo"] = root / "nonempty_demo"
    import shutil

    def variant(name: str, edit) -> None:
        folder = root / name
        shutil.copytree(made["ck"], folder)
        edit(folder)
        made[name] = folder

    def edit_config(**fields):
        def edit(folder: Path) -> None:
            config = json.loads((folder / "config.json").read_text())
            config.update(fields)
            (folder / "config.json").write_text(json.dumps(config))
        return edit

    mixtral = tiny.save_tiny_checkpoint(root / "mixtral", "mixtral")
    made["mixtral"] = mixtral
    variant("broken", lambda f: (f / "config.json").write_text("{not json"))
    variant("noweights", lambda f: (f / "model.safetensors").unlink())
    variant("foreign", lambda f: shutil.copy(mixtral / "model.safetensors", f / "model.safetensors"))
    variant("truncated", lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:100]))
    variant("notok", lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")])
    variant("top1", edit_config(num_experts_per_tok=1))
    variant("top9", edit_config(num_experts_per_tok=9))
    variant("strblock", edit_config(moepatch="yes"))
    variant("badhidden", edit_config(hidden_size="abc"))
    variant("familymix", edit_config(moepatch={"family": "mixtral"}))
    variant("badautomap", edit_config(auto_map="oops"))
    variant("ownautomap", edit_config(auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}))
    variant("blocktype", edit_config(moepatch={"routing_stats": {"layers": "last"}}))
    variant("manyproblems", edit_config(moepatch={"routing_stats": {"layers": [99, 77]}, "bias_update": {"rate": -1},
                                                  "c2r": {"top_t": 0, "collaborative_list": None}}))
    variant("badfamily", edit_config(moepatch={"family": "nosuch"}))
    variant("junkbackup", lambda f: (f / "config.json.moepatch-orig").write_text("junk"))
    variant("edited", lambda f: install(f))
    for name, record in (("placed16", {"ep_size": 2, "num_experts": 16, "experts_per_rank": 8, "layers": [0, 2, 3]}),
                         ("placed9", {"ep_size": 3, "num_experts": 9, "experts_per_rank": 3, "layers": [0, 2, 3]}),
                         ("layersall", {"ep_size": 2, "num_experts": 8, "experts_per_rank": 4, "layers": "all"}),
                         ("denselayer", {"ep_size": 2, "num_experts": 8, "experts_per_rank": 4, "layers": [0, 1]})):
        variant(name, lambda f, record=record: (f / "expert_placement.json").write_text(json.dumps(record)))
    variant("badplacement", lambda f: (f / "expert_placement.json").write_text("{not json"))
    edit_config(top_t=3)(made["edited"])
    variant("otherbackup", lambda f: install(f))  # the backup of another model's config put in its place
    backup = json.loads((made["otherbackup"] / "config.json.moepatch-orig").read_text())
    (made["otherbackup"] / "config.json.moepatch-orig").write_text(json.dumps({**backup, "hidden_size": 64}))
    made["file"] = root / "file.txt"
    made["file"].write_text("a file, not a folder\n")
    made["small"] = root / "small.txt"
    made["small"].write_text("a few words only\n")
    made["empty"] = root / "empty.txt"
    made["empty"].write_text("\n\n")
    made["badjsonl"] = root / "bad.jsonl"
    made["badjsonl"].write_text("{not json}\n")
    made["norecord"] = root / "norecord.jsonl"
    made["norecord"].write_text(json.dumps({"something": "else"}) + "\n")
    matrices = torch.randint(0, 50, (3, 8, 8))
    matrices = matrices + matrices.transpose(1, 2)
    for name, top_k in (("m2", 2), ("m4", 4)):
        CoactivationProfile(layers=[0, 2, 3], num_layers=4, num_experts=8, top_k=top_k, tokens=100,
                            matrices=matrices.clone()).save(root / f"{name}.safetensors")
        made[name] = root / f"{name}.safetensors"
    official = matrices.clone()
    official.diagonal(dim1=1, dim2=2).zero_()
    made["nok"] = root / "official.json"
    made["nok"].write_text(json.dumps({"matrices": {"base": official.tolist()}}))
    negative = official.clone()
    negative[0, 0, 1] = negative[0, 1, 0] = -3
    made["negative"] = root / "negative.json"
    made["negative"].write_text(json.dumps({"matrices": {"base": negative.tolist()}}))
    made["notjson"] = root / "matrix.json"
    made["notjson"].write_text("[[[1, 2]")
    made["corrupt"] = root / "corrupt.safetensors"
    made["corrupt"].write_bytes(b"\x00\x01not safetensors")
    made["txtmatrix"] = root / "matrix.txt"
    made["txtmatrix"].write_text("1 2 3\n")
    made["zeros"] = root / "zeros.json"
    made["zeros"].write_text(json.dumps({"matrices": {"base": torch.zeros(3, 8, 8, dtype=torch.int64).tolist()}}))
    made["k9"] = root / "k9.json"
    made["k9"].write_text(json.dumps({"top_k": 9, "matrices": {"base": official.tolist()}}))
    made["latin1"] = root / "latin1.json"
    made["latin1"].write_bytes('{"matrices": "é"}'.encode("latin-1"))
    made["long"] = root / ("x" * 5000)
    made["badtypes"] = root / "badtypes.jsonl"
    made["badtypes"].write_text(json.dumps({"instruction": None, "output": 3}) + "\n")
    made["evil"] = root / "evil.pkl"
    made["evil"].write_bytes(pickle.dumps(RunsCode()))
    made["blockjson"] = root / "block.json"
    made["blockjson"].write_text(json.dumps({"moepatch": {"routing_stats": {"layers": "last"}}}))
    made["okblock"] = root / "okblock.json"
    made["okblock"].write_text(json.dumps({"moepatch": {"routing_stats": True}}))
    return made


CASES: list[tuple[str, int, str]] = [
    # top level
    ("", 2, "required"),
    ("frobnicate", 2, "invalid choice"),
    # inspect
    ("inspect", 2, "path"),
    ("inspect {root}/missing", 2, "no checkpoint folder"),
    ("inspect {file}", 2, "is a file"),
    ("inspect {noconfig}", 2, "has no config.json"),
    ("inspect {broken}", 1, "config.json: not a readable JSON"),
    ("inspect {unknown}", 1, "model_type='no_such_model'"),
    ("inspect {dense}", 2, "cannot patch LlamaForCausalLM"),
    ("inspect {badblock}", 1, "moepatch.freeze_gate"),
    # demo
    ("demo --family gpt2", 2, "--family"),
    ("demo --top-t 0", 2, "--top-t"),
    ("demo --top-t 8", 2, "--top-t"),
    ("demo --ep-size 3", 2, "--ep-size"),
    ("demo --ep-size 0", 2, "--ep-size"),
    ("demo --output {ck}", 2, "is the checkpoint folder"),
    ("demo --output {ck}/sub", 2, "lies inside the checkpoint folder"),
    ("demo --finetune-steps -1", 2, "--finetune-steps"),
    ("demo --output {file}", 2, "--output"),
    ("demo --seed x", 2, "--seed"),
    ("demo --seed -1", 2, "--seed"),
    ("demo --output {nonempty_demo}", 2, "--output"),
    ("demo --output ''", 2, "--output"),
    ("demo --output {file}/sub", 2, "--output"),
    ("demo --output /proc/moepatch-demo", 2, "cannot be written"),
    ("demo --seed 99999999999999999999", 2, "--seed"),
    ("demo --family mixtral --family olmoe", 2, "--family"),
    # profile
    ("profile", 2, "model_path"),
    ("profile {root}/missing", 2, "no checkpoint folder"),
    ("profile {file}", 2, "is a file"),
    ("profile {broken}", 1, "config.json"),
    ("profile {dense}", 2, "cannot patch LlamaForCausalLM"),
    ("profile {ck} --batch-size 0", 2, "--batch-size"),
    ("profile {ck} --batch-size -1", 2, "--batch-size"),
    ("profile {ck} --max-tokens 0", 2, "--max-tokens"),
    ("profile {ck} --max-length 0", 2, "--max-length"),
    ("profile {ck} --plot-layers 7", 2, "--plot-layers"),
    ("profile {ck} --plot-layers -4", 2, "--plot-layers"),
    ("profile {ck} --top-t 0", 2, "--top-t"),
    ("profile {ck} --top-t 8", 2, "--top-t"),
    ("profile {ck} --data {root}/missing.txt", 2, "--data"),
    ("profile {ck} --data {badjsonl}", 1, "bad.jsonl:1"),
    ("profile {ck} --data {empty}", 1, "--data: no documents"),
    ("profile {ck} --text-field ''", 2, "--text-field"),
    ("profile {ck} --output {file}", 2, "--output"),
    ("profile {ck} --min-tokens -1", 2, "--min-tokens"),
    ("profile {ck} --max-tokens 10", 2, "--max-tokens"),
    ("profile {ck} --data {small}", 1, "--min-tokens"),
    ("profile {installed}", 1, "moepatch uninstall"),
    ("profile {ck} --seed x", 2, "--seed"),
    ("profile {long}", 2, "File name too long"),
    ("profile {ck} --output {long}", 2, "--output"),
    ("profile {ck} --output ''", 2, "--output"),
    ("profile {ck} --output {file}/sub", 2, "--output"),
    ("profile {ck} --data {small} --data {small}", 2, "--data"),
    ("profile {ck} --no-write-config --top-t 3", 2, "--top-t"),
    ("profile {ck} --no-write-config --min-tokens 5", 2, "--min-tokens"),
    ("profile {noweights}", 2, "holds no weights"),
    ("profile {foreign}", 1, "model.safetensors: the weights hold"),  # from the headers, before the load
    ("profile {truncated}", 1, "model.safetensors: not a complete safetensors file"),
    ("profile {notok}", 1, "no usable tokenizer"),
    ("profile {top1}", 1, "at least 2 experts per token"),
    ("profile {top9}", 2, "top-9 of 8"),
    ("profile {strblock}", 1, "config.json"),
    ("profile {badblock}", 1, "config.json"),
    # place
    ("place", 2, "source"),
    ("place {ck}", 2, "--ep-size"),
    ("place {root}/missing.json --ep-size 2", 2, "no file at"),
    ("place {ck} --ep-size 0", 2, "--ep-size"),
    ("place {ck} --ep-size 3", 2, "--ep-size"),
    ("place {m2} --ep-size 3", 2, "--ep-size"),
    ("place {ck} --ep-size 2 --top-k 4", 2, "--top-k"),
    ("place {m2} --ep-size 2 --top-k 4", 2, "--top-k"),
    ("place {m4} --ep-size 2 --top-k 2", 2, "--top-k"),
    ("place {nok} --ep-size 2", 2, "--top-k"),
    ("place {nok} --ep-size 2 --top-k 0", 2, "--top-k"),
    ("place {txtmatrix} --ep-size 2", 1, "unsupported file type"),
    ("place {corrupt} --ep-size 2", 1, "corrupt.safetensors"),
    ("place {notjson} --ep-size 2", 1, "not valid JSON"),
    ("place {negative} --ep-size 2 --top-k 2", 1, "non-negative"),
    ("place {evil} --ep-size 2 --top-k 2", 1, "refusing to unpickle"),
    ("place {m2} --ep-size 2 --write-permuted {root}/out", 2, "--write-permuted"),
    ("place {ck} --ep-size 2 --write-permuted {ck}", 2, "--write-permuted"),
    ("place {ck} --ep-size 2 --write-permuted {nonempty}", 2, "--write-permuted"),
    ("place {ck} --ep-size 2 --write-permuted {file}", 2, "--write-permuted"),
    ("place {ck} --ep-size 2 --batch-size 0", 2, "--batch-size"),
    ("place {ck} --ep-size 2 --max-tokens -5", 2, "--max-tokens"),
    ("place {ck} --ep-size 2 --data {root}/missing.txt", 2, "--data"),
    ("place {dense} --ep-size 2", 2, "cannot patch LlamaForCausalLM"),
    ("place {long} --ep-size 2", 2, "File name too long"),
    ("place {ck} --ep-size 2 --ep-size 4", 2, "--ep-size"),
    ("place {nok} --ep-size 2 --top-k 9", 2, "--top-k"),
    ("place {nok} --ep-size 2 --top-k 1", 2, "--top-k"),
    ("place {m2} --ep-size 2 --hidden-size 0", 2, "--hidden-size"),
    ("place {m2} --ep-size 2 --hidden-size 64 --dtype int8", 2, "--dtype"),
    ("place {m2} --ep-size 2 --hidden-size 64 --dtype half", 2, "--dtype"),
    ("place {m2} --ep-size 2 --dtype float32", 2, "--dtype"),
    ("place {ck} --ep-size 2 --hidden-size 64", 2, "--hidden-size"),
    ("place {k9} --ep-size 2", 1, "top_k=9"),
    ("place {m2} --ep-size 2 --data {small}", 2, "--data"),
    ("place {m2} --ep-size 2 --max-tokens 5", 2, "--max-tokens"),
    ("place {m2} --ep-size 2 --batch-size 2", 2, "--batch-size"),
    ("place {zeros} --ep-size 2 --top-k 2", 1, "matrix 'base'"),
    ("place {latin1} --ep-size 2 --top-k 2", 1, "latin1.json"),
    ("place {ck} --ep-size 2 --write-permuted {file}/sub", 2, "--write-permuted"),
    ("place {foreign} --ep-size 2", 1, "they are not this config's model"),
    # allocate
    ("allocate", 2, "model_path"),
    ("allocate {root}/missing", 2, "no checkpoint folder"),
    ("allocate {ck} --max-experts 0", 2, "--max-experts"),
    ("allocate {ck} --max-rank 0", 2, "--max-rank"),
    ("allocate {ck} --top-k 0", 2, "--top-k"),
    ("allocate {ck} --target-modules 're:('", 2, "--target-modules: 're:(' is not a regular expression"),
    ("allocate {ck} --target-modules nosuch_proj", 2, "--target-modules: 'nosuch_proj' matches no projection"),
    ("allocate {ck} --top-k 9", 2, "--top-k"),
    ("allocate {ck} --epochs 0", 2, "--epochs"),
    ("allocate {ck} --batch-size 0", 2, "--batch-size"),
    ("allocate {ck} --examples 0", 2, "--examples"),
    ("allocate {ck} --examples 4 --batch-size 4", 2, "--examples"),
    ("allocate {ck} --max-length 0", 2, "--max-length"),
    ("allocate {ck} --lr 0", 2, "--lr"),
    ("allocate {ck} --lr nan", 2, "--lr"),
    ("allocate {ck} --arch-lr -1", 2, "--arch-lr"),
    ("allocate {ck} --target-modules nothing_matches", 2, "--target-modules"),
    ("allocate {ck} --data {root}/missing.jsonl", 2, "--data"),
    ("allocate {ck} --data {badjsonl}", 1, "bad.jsonl:1"),
    ("allocate {ck} --data {norecord}", 1, "norecord.jsonl, record 1"),
    ("allocate {ck} --output {file}", 2, "--output"),
    ("allocate {dense}", 2, "cannot patch LlamaForCausalLM"),
    ("allocate {ck} --max-rank 100000", 2, "--max-rank"),
    ("allocate {ck} --max-length 8", 2, "--max-length"),
    ("allocate {ck} --output {file}/sub", 2, "--output"),
    ("allocate {ck} --data {small} --examples 8", 2, "--examples"),
    ("allocate {ck} --seed -1", 2, "--seed"),
    ("allocate {ck} --weight-decay -1", 2, "--weight-decay"),
    ("allocate {ck} --warmup-steps -1", 2, "--warmup-steps"),
    ("allocate {ck} --lr-schedule cosine", 2, "--lr-schedule"),
    ("allocate {ck} --max-grad-norm nan", 2, "--max-grad-norm"),
    ("allocate {ck} --lora-dropout 1", 2, "--lora-dropout"),
    ("allocate {ck} --arch-betas 0.5 1.5", 2, "--arch-betas"),
    ("allocate {ck} --arch-betas 0.5", 2, "--arch-betas"),
    ("allocate {ck} --arch-weight-decay inf", 2, "--arch-weight-decay"),
    ("allocate {notok}", 1, "no usable tokenizer"),
    ("allocate {noweights}", 2, "holds no weights"),
    # install / uninstall
    ("install", 2, "path"),
    ("install {root}/missing", 2, "no checkpoint folder"),
    ("install {dense}", 2, "cannot patch LlamaForCausalLM"),
    ("install {badblock}", 1, "moepatch.freeze_gate"),
    ("install {noweights}", 2, "holds no weights"),
    ("install {truncated}", 1, "model.safetensors: not a complete safetensors file"),
    ("install {foreign}", 1, "they are not this config's model"),
    ("install {top9}", 2, "top-9 of 8"),
    ("install {badautomap}", 1, "auto_map"),
    ("install {junkbackup}", 1, "config.json.moepatch-orig"),
    ("uninstall {junkbackup}", 1, "config.json.moepatch-orig"),
    ("uninstall {edited}", 1, "edited since `moepatch install`"),
    ("uninstall --force {otherbackup}", 1, "describes another model than"),
    ("inspect {long}", 2, "File name too long"),
    ("inspect {top9}", 2, "top-9 of 8"),
    ("inspect {badhidden}", 1, "config.json: cannot build a config for model_type='qwen2_moe': Validation error for "
                               "field 'hidden_size': TypeError: Field 'hidden_size' expected int"),
    ("inspect {familymix}", 2, "moepatch.family"),
    ("place {ck} --ep-size 2 --text-field body", 2, "--text-field: only applies to .jsonl / .json --data"),
    ("profile {ck} --as-configured --no-write-config", 2, "--as-configured: "),
    ("profile {ck} --output {ck}", 2, "--output: {ck} is the command's input (model_path)"),
    ("allocate {ck} --output {ck}", 2, "--output: {ck} is the command's input (model_path)"),
    ("place {ck} --ep-size 2 --write-permuted {ck}/perm", 2, "lies inside the command's input"),
    ("profile {ck} --data {small} --text-field body", 2, "--text-field: only applies to .jsonl / .json --data"),
    ("inspect {noweights}", 1, "no weights (no *.safetensors)"),
    ("inspect {truncated}", 1, "model.safetensors: not a complete safetensors file"),
    ("inspect {foreign}", 1, "they are not this config's model"),
    ("uninstall {root}/missing", 2, "no checkpoint folder"),
    ("uninstall {ck}", 1, "was not prepared by `moepatch install`"),
    # issue #21, round two: the rest of the hunt
    ("inspect {blocktype}", 1, "moepatch.routing_stats.layers: expected a list of layer indices"),
    ("profile {badhidden}", 1, "Validation error for field 'hidden_size': TypeError"),
    ("allocate {foreign}", 1, "they are not this config's model"),
    ("allocate {mixtral}", 2, "--target-modules: not given, and its defaults"),
    ("allocate {ck} --target-modules q_proj q_proj", 2, "--target-modules: q_proj given twice"),
    ("profile {ck} --data {small} {small}", 2, "--data: "),
    ("profile {ck} --plot-layers 0 0", 2, "--plot-layers: 0 given twice"),
    ("install {ownautomap}", 1, "auto_map.AutoModelForCausalLM = 'modeling_custom.CustomForCausalLM'"),
    # every problem of a block at once, naming config.json (parse-time and layer problems together)
    ("install {manyproblems}", 1, "{manyproblems}/config.json: 5 problems in the moepatch config"),
    ("install {manyproblems}", 1, "moepatch.routing_stats.layers[1]: layer 77 does not exist"),
    ("install {badfamily}", 1, "{badfamily}/config.json: invalid moepatch config: moepatch.family: unknown family"),
    ("inspect {manyproblems}", 1, "{manyproblems}/config.json: 5 problem(s)"),
    ("inspect {manyproblems}", 1, "moepatch.c2r.top_t: top_t must be at least 1"),
    ("eval --model moepatch --model_args pretrained={ck},moepatch_config={blockjson} --tasks x", 1,
     "block.json (--model_args moepatch_config): invalid moepatch config"),  # the file's content: exit 1
    ("eval --model moepatch --model_args pretrained={ck},moepatch_config={notjson} --tasks x", 1,
     "matrix.json (--model_args moepatch_config) is not JSON"),
    ("experts fit-router {root}/missing --group g=a --group g=b", 2, "--group: group 'g' given twice"),
    ("experts fit-router {root}/missing --group g=a,b --group h=b", 2, "--group: task 'b' is in groups 'g' and 'h'"),
    ("experts fit-router {root}/missing --group g=a,a", 2, "--group: task 'a' is twice in group 'g'"),
    ("experts fit-router {root}/missing --features hidden hidden", 2, "--features: hidden given twice"),
    ("experts merge {root}/missing --tasks a b --replace", 2, "--replace: only with --name"),
    # issue #21, round three: an output that holds or lies inside an input, outputs that cannot be written (checked
    # before any work, never a raw [Errno N]), a combination that would silently drop one flag
    ("profile {ck} --output {root}", 2, "--output: {root} holds the command's input {ck} (model_path)"),
    ("profile {ck} --data {small} --output {root}", 2, "--output: {root} holds the command's input"),
    ("profile {ck} --output /proc/moepatch-profile", 2, "--output: /proc/moepatch-profile cannot be written"),
    ("profile {ck} --output /sys/moepatch-profile", 2, "--output: /sys/moepatch-profile cannot be written"),
    ("allocate {ck} --output {root}", 2, "--output: {root} holds the command's input {ck} (model_path)"),
    ("allocate {ck} --output /proc/x", 2, "--output: /proc/x cannot be written"),
    ("allocate {ck} --output /sys/x", 2, "--output: /sys/x cannot be written"),
    ("place {ck} --ep-size 2 --write-permuted /proc/perm", 2, "--write-permuted: /proc/perm cannot be written"),
    ("place {ck} --ep-size 2 --data {nonempty}/keep.txt --write-permuted {nonempty}", 2,
     "--write-permuted: {nonempty} holds the command's input {nonempty}/keep.txt (--data)"),
    ("demo --output /proc/demo", 2, "--output: /proc/demo cannot be written"),
    ("demo --output /sys/demo", 2, "--output: /sys/demo cannot be written"),
    ("eval --model moepatch --model_args pretrained={ck} --tasks x --output_path /sys/x", 2,
     "--output_path: /sys/x cannot be written"),
    ("eval --model moepatch --model_args pretrained={ck} --tasks x --output_path /proc/x/results.json", 2,
     "--output_path: /proc/x cannot be written"),
    ("eval --model moepatch --model_args pretrained={ck} --tasks x --output_path {ck}/results", 2,
     "--output_path: {ck}/results lies inside the command's input {ck} (--model_args pretrained)"),
    ("eval --model moepatch --model_args pretrained={ck} --tasks x --output_path {root}", 2,
     "--output_path: {root} holds the command's input {ck} (--model_args pretrained)"),
    ("eval --model moepatch --model_args pretrained={ck},moepatch_config={okblock} --tasks x --output_path "
     "{okblock}", 2, "--output_path: {okblock} is the command's input (--model_args moepatch_config)"),
    ("eval --model moepatch --model_args pretrained={ck},task_experts={root}/nonempty --tasks x", 2,
     "--model_args: task_experts={root}/nonempty: "),
    ("experts merge {root}/missing --from-routes {small} --weights 1 1", 2,
     "--weights: not with --from-routes: a route line carries its own weights"),
    # `moepatch eval`: model_args read as lm-eval reads them (space-separated, -a, --model_args=, JSON, several
    # flags), every moepatch key's type checked before lm-eval starts (exit 2 naming the flag as typed and the key;
    # --tasks arc_easy would need the network, so reaching lm-eval would exit 1)
    ("eval run --model moepatch --model_args pretrained={ck} task_expert=x --tasks arc_easy", 2,
     "--model_args: unknown argument(s) ['task_expert']"),
    ("eval --model moepatch -a pretrained={ck},task_expert=x --tasks arc_easy", 2,
     "-a: unknown argument(s) ['task_expert']"),
    ("eval --model moepatch --model_args pretrained={ck},top_k=x --tasks arc_easy", 2,
     "--model_args: top_k: expected an integer, got 'x'"),
    ("eval --model moepatch --model_args=pretrained={ck},top_k=x --tasks arc_easy", 2,
     "--model_args: top_k: expected an integer, got 'x'"),
    ("eval --model moepatch -a pretrained={ck} top_k=0 --tasks arc_easy", 2,
     "-a: top_k: expected an integer >= 1, got 0"),
    ("eval --model moepatch --model_args pretrained={ck},routing_stats=maybe --tasks arc_easy --output_path x", 2,
     "--model_args: routing_stats: expected true or false, got 'maybe'"),
    ("eval --model moepatch --model_args pretrained={ck} -a routing_stats=maybe --tasks arc_easy", 2,
     "-a: routing_stats: expected true or false, got 'maybe'"),
    ("eval --model moepatch --model_args pretrained={ck} max_length=abc --tasks arc_easy", 2,
     "--model_args: max_length: expected an integer, got 'abc'"),
    ("eval --model moepatch --model_args '{{\"pretrained\": \"{ck}\", \"top_k\": \"y\"}}' --tasks arc_easy", 2,
     "--model_args: top_k: expected an integer, got 'y'"),
    ("eval --model moepatch -apretrained={root}/missing --tasks arc_easy", 2,
     "-a: pretrained={root}/missing: no such folder"),
    ("eval --model moepatch --model_args top_k=1 --tasks arc_easy", 2, "--model_args: pretrained: required"),
    ("eval --model moepatch --model_args pretrained={ck},routing_stats=true --tasks arc_easy", 2,
     "--output_path: routing_stats=true writes"),  # statistics asked for with nowhere to go
    ("eval --model moepatch --model_args pretrained={ck},task_experts={root},moepatch_config={okblock} "
     "--tasks arc_easy", 2, "--model_args: task_experts load the base their manifest names; moepatch_config"),
    # an expert_placement.json that is not this checkpoint's (a file's content: exit 1, naming it and the field) is
    # refused before its figures are printed or profile writes config.json; a packed --dtype has no whole-byte rows
    ("place {placed16} --ep-size 2", 1, "{placed16}/expert_placement.json: field 'num_experts' is 16, but the "
                                        "checkpoint has 8 routed experts"),
    ("profile {placed16} --ep-size 2", 1, "{placed16}/expert_placement.json: field 'num_experts' is 16"),
    ("place {placed9} --ep-size 2", 1, "{placed9}/expert_placement.json: field 'num_experts' is 9"),
    ("profile {placed9} --ep-size 4", 1, "{placed9}/expert_placement.json: field 'num_experts' is 9"),
    ("place {layersall} --ep-size 2", 1, "{layersall}/expert_placement.json: field 'layers' must be"),
    ("place {denselayer} --ep-size 2", 1, "(its MoE layers [0, 2, 3]), got [0, 1]"),
    ("place {badplacement} --ep-size 2", 1, "{badplacement}/expert_placement.json: not a readable JSON file"),
    ("profile {badplacement} --ep-size 2", 1, "{badplacement}/expert_placement.json: not a readable JSON file"),
    ("place {m2} --ep-size 2 --hidden-size 64 --dtype float4_e2m1fn_x2", 2,
     "--dtype: float4_e2m1fn_x2 packs 2 values into each 1-byte element"),
]


def _tree(root: Path) -> dict[str, tuple[str, int] | None]:
    """Every entry under ``root`` (hidden ones included: a staging folder left behind is a change too): a file's
    bytes (as a digest) and modification time, a folder's presence."""
    return {str(path.relative_to(root)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
            if path.is_file() else None for path in root.rglob("*")}


def _argv(template: str, files: dict[str, Path]) -> list[str]:
    import shlex

    return shlex.split(template.format(**{name: str(path) for name, path in files.items()}))


def test_table_is_large_and_covers_every_command():
    commands = {case[0].split()[0] if case[0] else "" for case in CASES}
    assert len(CASES) >= 120
    assert {"inspect", "demo", "profile", "place", "allocate", "install", "uninstall"} <= commands


@pytest.mark.parametrize(("template", "status", "named"), CASES, ids=[case[0] or "<none>" for case in CASES])
def test_bad_input_fails_clearly_and_writes_nothing(files, capsys, monkeypatch, template, status, named):
    monkeypatch.chdir(files["root"])
    monkeypatch.delenv("MOEPATCH_DEBUG", raising=False)
    before = _tree(files["root"])
    try:
        code = cli.main(_argv(template, files))
    except SystemExit as exit_:
        code = exit_.code
    output = capsys.readouterr()
    text = output.out + output.err
    assert code == status, text
    assert named.format(**{name: str(path) for name, path in files.items()}) in text, text
    assert "Traceback" not in text and "Errno" not in text and "OSError" not in text
    assert _tree(files["root"]) == before, "a failed command wrote or changed files"
    assert not (files["root"] / "PWNED").exists()


def test_place_top4_matrix_refuses_copies_per_token_and_says_what_to_run(files, capsys):
    """Pair counts cannot give copies per token for k > 2: the report says so and prints no such figure."""
    assert cli.main(["place", str(files["m4"]), "--ep-size", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reports"]["coactivation"]["top_k"] == 4  # taken from the file, not the --top-k default
    assert report["reports"]["coactivation"]["mean_contiguous_copies_per_token"] is None
    assert "moepatch place CHECKPOINT" in report["notes"][0]
    assert cli.main(["place", str(files["m4"]), "--ep-size", "2"]) == 0
    text = capsys.readouterr().out
    assert "copies per token: not computed" in text and "top-4" in text


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moepatch.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_console_errors_are_short_and_debug_shows_the_traceback(files):
    missing = str(files["root"] / "missing")
    result = _run("profile", str(files["ck"]), "--batch-size", "0")
    assert result.returncode == 2 and "--batch-size" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2
    result = _run("inspect", str(files["broken"]))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2
    for debug in (["--debug"], []):
        result = _run("inspect", str(files["broken"]), *debug, env={} if debug else {"MOEPATCH_DEBUG": "1"})
        assert result.returncode != 0 and "Traceback" in result.stderr
    assert _run("uninstall", missing).returncode == 2
