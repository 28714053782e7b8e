"""The request router: the default (base-model signatures) routes the embedded tasks, encoders plug in, MELD's
exclusion variants, files without pickles."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import copy_run
from safetensors.torch import load_file

from moepatch.cli import main as cli
from moepatch.data.synthetic import synthetic_records
from moepatch.task_experts.router import BaseModelEncoder
from moepatch.task_experts.router import TaskRouter
from moepatch.task_experts.router import expert_positives


@pytest.fixture()
def run(experts_run, tmp_path) -> Path:
    copy = copy_run(experts_run, tmp_path)
    return copy


def _fresh_requests(path: Path, per_task: int = 12, seed: int = 99) -> Path:
    """Held-out requests of the four embedded tasks, never seen by the router (another seed)."""
    with path.open("w") as stream:
        for task in ("chat", "code", "letters", "math"):
            for record in synthetic_records(task, per_task, seed=seed):
                stream.write(json.dumps({**record, "task": task}) + "\n")
    return path


def test_default_router_routes_held_out_requests_of_the_four_tasks(run, tmp_path, capsys):
    assert cli(["experts", "fit-router", str(run)]) == 0
    report = json.loads((run / "experts" / "router" / "holdout_report.json").read_text())
    assert report["accuracy"] >= 0.9 and report["requests"] >= 16
    assert "routing accuracy" in capsys.readouterr().out
    config = json.loads((run / "experts" / "router" / "router.json").read_text())
    assert config["encoder"] == {"kind": "base_model", "features": ["hidden", "load"], "max_length": 256}
    requests = _fresh_requests(tmp_path / "requests.jsonl")
    assert cli(["experts", "route", str(run), "--input", str(requests), "--top-k", "2"]) == 0
    routes = [json.loads(line) for line in (run / "experts" / "routes.jsonl").read_text().splitlines()]
    assert len(routes) == 48
    accuracy = sum(route["tasks"][0] == route["task"] for route in routes) / len(routes)
    assert accuracy >= 0.9
    for route in routes:
        assert len(route["tasks"]) == 2 and len(set(route["tasks"])) == 2
        assert sum(route["weights"]) == pytest.approx(1.0) and route["weights"][0] >= route["weights"][1]


def test_each_signature_part_alone_and_the_linear_head(run, tmp_path):
    for extra in (["--features", "hidden"], ["--features", "load"], ["--head", "linear"]):
        assert cli(["experts", "fit-router", str(run), *extra]) == 0
        report = json.loads((run / "experts" / "router" / "holdout_report.json").read_text())
        assert report["accuracy"] >= 0.75, (extra, report["accuracy"])


def test_base_model_signature_equals_an_independent_computation(base_checkpoint):
    """Mean-pooled final hidden state (normalised) ++ per-layer shares of each expert among the request's choices."""
    from transformers import AutoTokenizer

    import moepatch

    model = moepatch.from_pretrained(str(base_checkpoint)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(base_checkpoint))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    texts = ["Compute 3 + 4 and give the number.", "List the letters of ROUTER."]
    got = BaseModelEncoder(model, tokenizer).encode(texts)
    expected = []
    for text in texts:  # one request at a time: no padding to mask
        batch = tokenizer([text], return_tensors="pt")
        captured = []
        handles = [layer.mlp.gate.register_forward_hook(lambda m, a, out, captured=captured: captured.append(out[2]))
                   for layer in model.model.layers if hasattr(layer.mlp, "gate")]
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1][0].mean(0)
        for handle in handles:
            handle.remove()
        loads = torch.cat([torch.bincount(choice.reshape(-1), minlength=model.config.num_experts).float()
                           / choice.numel() for choice in captured])
        expected.append(torch.cat([F.normalize(hidden, dim=0), F.normalize(loads, dim=0)]))
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-4)


def test_centroid_head_and_exclusions_against_hand_computation():
    torch.manual_seed(0)
    signatures = torch.randn(12, 5)
    labels = ["a", "b", "c"] * 4
    router = TaskRouter.fit(signatures, labels, encoder={"kind": "test"}, groups={"a": "g", "b": "g"})
    centroids = torch.stack([F.normalize(signatures[i::3].mean(0), dim=0) for i in range(3)])
    query = torch.randn(4, 5)
    torch.testing.assert_close(router.scores(query), F.normalize(query, dim=-1) @ centroids.T)
    plain = router.route(query, top_k=2)
    for row, choice in zip(router.scores(query), plain, strict=True):
        values, indices = row.topk(2)
        assert choice.tasks == [["a", "b", "c"][i] for i in indices]
        torch.testing.assert_close(torch.tensor(choice.weights), torch.softmax(values / 0.05, dim=0))
    own = ["a", "b", "c", "a"]
    for choice, task in zip(router.route(query, 2, own_tasks=own, exclude="cross-dataset"), own, strict=True):
        assert task not in choice.tasks
    for choice, task in zip(router.route(query, 1, own_tasks=own, exclude="cross-task"), own, strict=True):
        assert choice.tasks == (["c"] if task in ("a", "b") else choice.tasks) and task not in choice.tasks
    with pytest.raises(ValueError, match=r"exclude: cross-task: no task left"):
        TaskRouter.fit(signatures[:8], ["a", "b"] * 4, encoder={}, groups={"a": "g", "b": "g"}).route(
            query[:1], 1, own_tasks=["a"], exclude="cross-task")


def test_router_files_are_safetensors_and_json_and_round_trip(tmp_path):
    torch.manual_seed(1)
    signatures, labels = torch.randn(20, 6), ["x", "y"] * 10
    for head in ("centroid", "linear"):
        router = TaskRouter.fit(signatures, labels, head=head, encoder={"kind": "test"})
        router.save(tmp_path / head)
        assert set(load_file(str(tmp_path / head / "router.safetensors"))) == set(router.tensors)
        again = TaskRouter.load(tmp_path / head)
        torch.testing.assert_close(again.scores(signatures), router.scores(signatures))
    with pytest.raises(ValueError, match="no fitted router"):
        TaskRouter.load(tmp_path / "missing")


def _tiny_sentence_transformer(folder: Path) -> Path:
    """A small BERT with a word-level tokenizer, wrapped as a sentence-transformers model (mean pooling)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models
    from tokenizers import Tokenizer
    from tokenizers import models as token_models
    from tokenizers import pre_tokenizers
    from tokenizers import processors
    from transformers import BertConfig
    from transformers import BertModel
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for task in ("chat", "code", "letters", "math") for record in synthetic_records(task, 50)
                    for word in re.findall(r"\w+|[^\w\s]", record["conversations"][0]["value"])})
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tokenizer = Tokenizer(token_models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(  # [CLS] text [SEP], as BERT / bge tokenizers do
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=128))
    bert.save_pretrained(folder / "bert")
    fast.save_pretrained(folder / "bert")
    word = models.Transformer(str(folder / "bert"), max_seq_length=64)
    model = SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), "mean")])
    model.save(str(folder / "encoder"))
    return folder / "encoder"


def test_a_local_sentence_transformers_encoder_plugs_in(run, tmp_path, capsys):
    pytest.importorskip("sentence_transformers")
    encoder = _tiny_sentence_transformer(tmp_path)
    assert cli(["experts", "fit-router", str(run), "--encoder", str(encoder)]) == 0
    config = json.loads((run / "experts" / "router" / "router.json").read_text())
    assert config["encoder"] == {"kind": "sentence_transformers", "path": str(encoder.resolve())}
    assert cli(["experts", "fit-router", str(run), "--encoder", str(encoder), "--encoder-pooling", "cls"]) == 2
    assert "its own pooling module is used" in capsys.readouterr().err
    centroids = load_file(str(run / "experts" / "router" / "router.safetensors"))["centroids"]
    assert centroids.shape == (4, 32)  # the encoder's width, not the base model's
    report = json.loads((run / "experts" / "router" / "holdout_report.json").read_text())
    assert report["accuracy"] >= 0.9  # the tasks' words differ: even a random small encoder separates them
    requests = _fresh_requests(tmp_path / "requests.jsonl", per_task=3)
    assert cli(["experts", "route", str(run), "--input", str(requests), "--top-k", "1"]) == 0
    assert len((run / "experts" / "routes.jsonl").read_text().splitlines()) == 12


def test_a_plain_transformers_encoder_embeds_as_flagembedding_does(run, tmp_path):
    """A bge-style folder (config.json, no sentence-transformers files): [CLS] of the last hidden state, L2-normalised
    — FlagEmbedding's dense embedding, computed here with transformers alone."""
    pytest.importorskip("sentence_transformers")
    from transformers import AutoModel
    from transformers import AutoTokenizer

    from moepatch.task_experts.router import SentenceTransformerEncoder

    folder = _tiny_sentence_transformer(tmp_path).parent / "bert"
    assert not (folder / "modules.json").exists()
    texts = ["Compute 3 + 4 .", "Say hello to the router please ."]
    tokenizer, bert = AutoTokenizer.from_pretrained(str(folder)), AutoModel.from_pretrained(str(folder)).eval()
    assert all(ids[0] == tokenizer.cls_token_id for ids in tokenizer(texts)["input_ids"])  # position 0 is [CLS]
    with torch.no_grad():
        cls = bert(**tokenizer(texts, padding=True, return_tensors="pt")).last_hidden_state[:, 0]
    encoder = SentenceTransformerEncoder(folder)
    torch.testing.assert_close(encoder.encode(texts), torch.nn.functional.normalize(cls, dim=-1), atol=1e-5,
                               rtol=1e-5)
    assert cli(["experts", "fit-router", str(run), "--encoder", str(folder)]) == 0
    config = json.loads((run / "experts" / "router" / "router.json").read_text())
    assert config["encoder"] == {"kind": "sentence_transformers", "path": str(folder.resolve()), "pooling": "cls"}
    assert json.loads((run / "experts" / "router" / "holdout_report.json").read_text())["accuracy"] >= 0.9
    requests = _fresh_requests(tmp_path / "requests.jsonl", per_task=2)
    assert cli(["experts", "route", str(run), "--input", str(requests), "--top-k", "1"]) == 0
    assert len((run / "experts" / "routes.jsonl").read_text().splitlines()) == 8


DESCRIPTIONS = {"chat": "Say hello and answer a friendly question",
                "code": "Write a Python function that returns a value",
                "letters": "List or spell the letters of a word",
                "math": "Compute the sum of numbers and give the number"}


def test_melds_retrieval_router_fine_tunes_the_encoder_on_scored_positives(run, tmp_path, capsys):
    """MELD's router: every expert answers every fitting request, the (near-)best are positives, the encoder is
    fine-tuned contrastively, and a request's scores are its cosines to the experts' descriptions."""
    from sentence_transformers import SentenceTransformer  # the test extra installs it (and datasets)

    bert = _tiny_sentence_transformer(tmp_path).parent / "bert"
    descriptions = tmp_path / "descriptions.json"
    descriptions.write_text(json.dumps(DESCRIPTIONS))
    # mean pooling: the [CLS] output of a random one-layer BERT barely depends on the text (bge's is trained)
    argv = ["experts", "fit-router", str(run), "--encoder", str(bert), "--encoder-pooling", "mean", "--head",
            "retrieval", "--descriptions", str(descriptions)]
    router_folder = run / "experts" / "router"
    assert cli(argv) == 0
    before = json.loads((router_folder / "holdout_report.json").read_text())["accuracy"]
    assert not (router_folder / "encoder").exists()
    assert cli([*argv, "--finetune-encoder", "--encoder-epochs", "3", "--encoder-lr", "1e-3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"scored 4 experts on \d+ requests", out) and "(scored positives, temperature 0.02)" in out
    after = json.loads((router_folder / "holdout_report.json").read_text())["accuracy"]
    assert after >= before + 0.2  # 0.50 -> 0.81 here: the fine-tune moves requests towards their experts
    tuned = router_folder / "encoder"
    assert (tuned / "model.safetensors").is_file() and not list(tuned.rglob("*.bin"))  # no pickle written
    config = json.loads((router_folder / "router.json").read_text())
    assert config["head"] == "retrieval" and config["encoder"] == {"kind": "sentence_transformers", "path": "encoder"}
    # the scores are the cosines of request and description embeddings by the saved encoder, loaded on its own
    texts = ["Compute 3 + 4 and give the number .", "Say hello ."]
    independent = SentenceTransformer(str(tuned), device="cpu")
    queries = F.normalize(independent.encode(texts, convert_to_tensor=True), dim=-1)
    described = F.normalize(independent.encode([DESCRIPTIONS[t] for t in sorted(DESCRIPTIONS)], convert_to_tensor=True),
                            dim=-1)
    router = TaskRouter.load(router_folder)
    torch.testing.assert_close(router.scores(independent.encode(texts, convert_to_tensor=True)), queries @ described.T,
                               atol=1e-5, rtol=1e-5)
    moved = tmp_path / "moved"  # the fine-tuned encoder travels with its run
    run.rename(moved)
    requests = _fresh_requests(tmp_path / "requests.jsonl", per_task=2)
    assert cli(["experts", "route", str(moved), "--input", str(requests), "--top-k", "1"]) == 0
    assert len((moved / "experts" / "routes.jsonl").read_text().splitlines()) == 8


def test_melds_training_groups_pair_each_positive_with_a_negative():
    from moepatch.task_experts.encoder_tuning import contrastive_rows

    positives = torch.tensor([[True, False, False], [True, True, False], [True, True, True]])
    rows = contrastive_rows(["q0", "q1", "q2"], positives, ["a", "b", "c"], seed=0)
    assert [(row["anchor"], row["positive"]) for row in rows] == [("q0", "a"), ("q1", "a"), ("q1", "b")]
    assert [row["negative"] for row in rows][1:] == ["c", "c"] and rows[0]["negative"] in ("b", "c")


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["fit-router", "{run}", "--head", "retrieval"], 2, r"--head: retrieval scores requests .* give --encoder DIR"),
    (["fit-router", "{run}", "--finetune-encoder"], 2, r"--finetune-encoder: only with --head retrieval"),
    (["fit-router", "{run}", "--descriptions", "{descriptions}"], 2, r"--descriptions: only the retrieval head"),
    (["fit-router", "{run}", "--encoder", "{run}/experts/chat"], 2,
     r"--encoder: .*chat holds neither a sentence-transformers model \(modules.json\) nor a transformers encoder"),
    (["fit-router", "{run}", "--descriptions", "{requests}"], 1,
     r"requests\.jsonl \(--descriptions\): not a JSON file"),
    (["fit-router", "{run}", "--encoder-pooling", "mean"], 2, r"--encoder-pooling: only with --encoder"),
    (["fit-router", "{run}", "--data", "{run}/nowhere"], 2, r"--data: .*nowhere is not a data folder"),
    (["fit-router", "{run}", "--encoder", "{run}/nowhere"], 2, r"--encoder: .*is not a folder"),
    (["fit-router", "{run}", "--group", "g=chat,nope"], 2, r"--group: unknown task 'nope'"),
    (["route", "{run}", "--input", "{requests}"], 2, r"no fitted router"),
    (["fit-router", "{run}", "--encoder", "{base}"], 2,
     r"--encoder: .* holds a causal language model \(Qwen2MoeForCausalLM\), not an embedding encoder"),
    (["fit-router", "{run}", "--encoder", "{truncated}"], 1,
     r"error: .*truncated/model\.safetensors: not a complete safetensors file"),
    (["fit-router", "{run}", "--encoder", "{truncated}", "--features", "hidden"], 2,
     r"--features: only applies to the base model's signatures; --encoder embeds the requests itself"),
    (["fit-router", "{run}", "--encoder", "{truncated}", "--features", "hidden", "load"], 2, r"--features: "),
])
def test_bad_router_arguments_name_the_argument(run, base_checkpoint, tmp_path, capsys, argv, code, message):
    requests = _fresh_requests(tmp_path / "requests.jsonl", per_task=1)
    descriptions = tmp_path / "descriptions.json"
    descriptions.write_text(json.dumps(DESCRIPTIONS))
    truncated = tmp_path / "truncated"  # a bge-style encoder folder whose weights were cut short
    if "{truncated}" in argv:
        pytest.importorskip("sentence_transformers")
        from transformers import BertConfig
        from transformers import BertModel

        BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32)).save_pretrained(truncated)
        weights = truncated / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    argv = [arg.format(run=run, requests=requests, descriptions=descriptions, base=base_checkpoint,
                       truncated=truncated) for arg in argv]
    before = _tree(run), _tree(tmp_path)
    assert cli(["experts", *argv]) == code
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err
    assert (_tree(run), _tree(tmp_path)) == before, "a refused command wrote or changed files"
    assert not (run / "experts" / "router").exists()


def _tree(root: Path) -> dict[str, str | None]:
    """Every entry under ``root``, hidden ones included: a file's bytes (as a digest), a folder's presence."""
    import hashlib

    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            for path in sorted(root.rglob("*"))}


def test_route_refuses_unknown_tasks_and_too_large_k(run, tmp_path, capsys):
    assert cli(["experts", "fit-router", str(run), "--features", "hidden"]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hello", "task": "poetry"}) + "\n")
    requests = _fresh_requests(tmp_path / "requests.jsonl", per_task=1)
    capsys.readouterr()
    before = _tree(run), _tree(tmp_path)
    assert cli(["experts", "route", str(run), "--input", str(bad)]) == 1  # the file's content: exit 1, named
    err = capsys.readouterr().err
    assert "task(s) ['poetry'] are not among the router's" in err and "Traceback" not in err
    assert cli(["experts", "route", str(run), "--input", str(requests), "--top-k", "5"]) == 2
    err = capsys.readouterr().err
    assert "--top-k: 5 is more than the router's 4 tasks" in err and "Traceback" not in err
    assert (_tree(run), _tree(tmp_path)) == before
    assert not (run / "experts" / "routes.jsonl").exists()


def test_groups_fit_and_cross_task_top_k_is_bounded_by_the_tasks_left(run, tmp_path, capsys):
    """--group once per group (repeatable); --exclude cross-task leaves a request only the other groups' tasks, so a
    larger --top-k is refused (it would silently route to fewer) and a fitting one routes outside the group."""
    assert cli(["experts", "fit-router", str(run), "--features", "hidden", "--group", "words=chat,letters",
                "--group", "numbers=code,math"]) == 0
    assert TaskRouter.load(run / "experts" / "router").groups == {"chat": "words", "letters": "words",
                                                                  "code": "numbers", "math": "numbers"}
    requests = _fresh_requests(tmp_path / "requests.jsonl", per_task=1)
    capsys.readouterr()
    assert cli(["experts", "route", str(run), "--input", str(requests), "--exclude", "cross-task",
                "--top-k", "3"]) == 2
    assert "--top-k: 3 is more than the 2 task(s) --exclude cross-task leaves" in capsys.readouterr().err
    assert not (run / "experts" / "routes.jsonl").exists()
    assert cli(["experts", "route", str(run), "--input", str(requests), "--exclude", "cross-task",
                "--top-k", "2"]) == 0
    groups = {"chat": "words", "letters": "words", "code": "numbers", "math": "numbers"}
    for line in (run / "experts" / "routes.jsonl").read_text().splitlines():
        route = json.loads(line)
        assert len(route["tasks"]) == 2 and all(groups[t] != groups[route["task"]] for t in route["tasks"])


def test_melds_positives_are_the_near_best_experts():
    losses = torch.tensor([[1.0, 1.04, 2.0], [3.0, 1.5, 1.52], [0.5, 0.9, 0.51]])
    got = expert_positives(losses, 0.05)
    expected = torch.tensor([[True, True, False], [False, True, True], [True, False, True]])
    assert torch.equal(got, expected)


def test_contrastive_head_learns_multi_positive_routing():
    """Three clusters; requests of cluster 2 are answered well by experts 1 and 2 (two positives)."""
    torch.manual_seed(0)
    centers = torch.randn(3, 16) * 3
    labels = [i % 3 for i in range(60)]
    signatures = centers[labels] + 0.3 * torch.randn(60, 16)
    positives = torch.zeros(60, 3, dtype=torch.bool)
    for row, label in enumerate(labels):
        positives[row, label] = True
        if label == 2:
            positives[row, 1] = True
    router = TaskRouter.fit(signatures, [["a", "b", "c"][i] for i in labels], head="contrastive",
                            encoder={"kind": "test"}, positives=positives)
    query = centers + 0.3 * torch.randn(3, 16)
    choices = router.route(query, top_k=2)
    assert choices[0].tasks[0] == "a" and choices[1].tasks[0] == "b"
    assert set(choices[2].tasks) == {"b", "c"}  # both positives of cluster 2 ranked first
    with pytest.raises(ValueError, match="needs every request's positive experts"):
        TaskRouter.fit(signatures, [["a", "b", "c"][i] for i in labels], head="contrastive", encoder={})


def test_contrastive_fit_router_scores_every_expert(run, capsys):
    assert cli(["experts", "fit-router", str(run), "--head", "contrastive", "--features", "hidden"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"scored 4 experts on \d+ requests: [\d.]+ positive experts per request", out)
    assert TaskRouter.load(run / "experts" / "router").head == "contrastive"
