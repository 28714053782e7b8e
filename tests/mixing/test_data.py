"""Instruction data: record formats, prompt formats, assistant-only labels, fixed probe splits."""

from __future__ import annotations

import json

import pytest

from moepatch.data.instruction import IGNORE_INDEX
from moepatch.data.instruction import encode_messages
from moepatch.data.instruction import load_source
from moepatch.data.instruction import read_jsonl
from moepatch.data.instruction import to_messages
from moepatch.testing import tiny

FASTCHAT = {"system_prompt": "Be brief.", "conversations": [
    {"from": "human", "value": "What routes tokens?"}, {"from": "gpt", "value": "The router."},
    {"from": "human", "value": "How many experts?"}, {"from": "gpt", "value": "The top k."}]}
ALPACA = {"instruction": "Name the gate.", "input": "MoE layer", "output": "The router."}
CHATML = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _trained_text(tokenizer, encoded) -> str:
    pairs = zip(encoded["input_ids"], encoded["labels"], strict=True)
    return tokenizer.decode([t for t, label in pairs if label != IGNORE_INDEX])


def test_record_formats():
    assert to_messages(FASTCHAT) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What routes tokens?"},
        {"role": "assistant", "content": "The router."}, {"role": "user", "content": "How many experts?"},
        {"role": "assistant", "content": "The top k."}]
    assert to_messages(ALPACA) == [{"role": "user", "content": "Name the gate.\n\nMoE layer"},
                                   {"role": "assistant", "content": "The router."}]
    with pytest.raises(ValueError, match="x.jsonl:3: unknown record format"):
        to_messages({"text": "plain"}, "x.jsonl:3")
    with pytest.raises(ValueError, match=r"conversations\[0\] needs 'from'"):
        to_messages({"conversations": [{"from": "bot", "value": "hi"}]})
    with pytest.raises(ValueError, match="no assistant turn"):
        to_messages({"conversations": [{"from": "human", "value": "hi"}]})


def test_vicuna_format_trains_only_assistant_spans():
    tokenizer = tiny.tiny_tokenizer()
    encoded = encode_messages(tokenizer, to_messages(FASTCHAT), prompt_format="vicuna")
    text = tokenizer.decode(encoded["input_ids"])
    assert text == ("Be brief. USER: What routes tokens? ASSISTANT: The router.</s> USER: How many experts? "
                    "ASSISTANT: The top k.</s>")
    assert _trained_text(tokenizer, encoded) == " The router.</s> The top k.</s>"
    assert len(encoded["labels"]) == len(encoded["input_ids"]) == len(encoded["attention_mask"])


def test_chat_template_format_and_truncation():
    tokenizer = tiny.tiny_tokenizer()
    tokenizer.chat_template = CHATML
    encoded = encode_messages(tokenizer, to_messages(ALPACA))
    assert tokenizer.decode(encoded["input_ids"]) == (
        "<|user|>\nName the gate.\n\nMoE layer</s>\n<|assistant|>\nThe router.</s>\n")
    assert _trained_text(tokenizer, encoded) == "The router.</s>\n"
    short = encode_messages(tokenizer, to_messages(ALPACA), max_length=5)
    assert len(short["input_ids"]) == 5 and set(short["labels"]) == {IGNORE_INDEX}


def test_inconsistent_template_and_missing_template_are_refused():
    tokenizer = tiny.tiny_tokenizer()
    with pytest.raises(ValueError, match="has no chat template"):
        encode_messages(tokenizer, to_messages(ALPACA))
    tokenizer.chat_template = "{{ messages | length }} turns{% if add_generation_prompt %}!{% endif %}"
    with pytest.raises(ValueError, match="does not render turn by turn consistently"):
        encode_messages(tokenizer, to_messages(ALPACA))


def test_load_source_with_a_fixed_probe_split(tmp_path):
    records = [{"instruction": f"Question {i}", "output": f"Answer {i}"} for i in range(20)]
    path = tmp_path / "math.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    tokenizer = tiny.tiny_tokenizer()
    first = load_source("math", path, tokenizer, probe_size=5, seed=3, prompt_format="vicuna")
    again = load_source("math", path, tokenizer, probe_size=5, seed=3, prompt_format="vicuna")
    assert len(first.train) == 15 and len(first.probe) == 5 and first.probe == again.probe
    probe_texts = {tokenizer.decode(e["input_ids"]) for e in first.probe}
    train_texts = {tokenizer.decode(e["input_ids"]) for e in first.train}
    assert not probe_texts & train_texts and len(probe_texts | train_texts) == 20
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps(FASTCHAT) + "\n")
    with_dev = load_source("math", path, tokenizer, probe_path=dev, prompt_format="vicuna")
    assert len(with_dev.train) == 20 and len(with_dev.probe) == 1
    (tmp_path / "bad.jsonl").write_text('{"instruction": "q", "output": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not JSON"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_probe_file_larger_than_probe_size_gives_a_fixed_seeded_subset(tmp_path, caplog):
    """The official dev sets hold 1,000 examples per source; the probe uses probe_size of them, not all."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"instruction": f"Train {i}", "output": f"A{i}"}) + "\n" for i in range(10)))
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"instruction": f"Dev {i}", "output": f"B{i}"}) + "\n" for i in range(30)))
    tokenizer = tiny.tiny_tokenizer()

    def probe_texts(seed: int, size: int = 8) -> list[str]:
        source = load_source("math", train, tokenizer, probe_path=dev, probe_size=size, seed=seed,
                             prompt_format="vicuna")
        assert len(source.train) == 10  # the train file is not touched by the probe split
        return [tokenizer.decode(example["input_ids"]) for example in source.probe]

    with caplog.at_level("INFO", logger="moepatch.data"):
        first = probe_texts(seed=3)
    assert "probe set of 8 of the 30 examples" in caplog.text
    assert len(first) == 8 and len(set(first)) == 8
    assert all("Dev " in text for text in first)
    numbers = [int(text.split("Dev ")[1].split()[0]) for text in first]
    assert numbers == sorted(numbers)  # kept in file order
    assert probe_texts(seed=3) == first  # fixed: the same subset every time
    assert probe_texts(seed=4) != first  # seeded
    assert len(probe_texts(seed=3, size=100)) == 30  # all of a smaller file
    with pytest.raises(ValueError, match="probe_size: expected an integer >= 1"):
        load_source("math", train, tokenizer, probe_path=dev, probe_size=0, prompt_format="vicuna")


def test_malformed_records_are_named_by_file_and_line(tmp_path):
    tokenizer = tiny.tiny_tokenizer()
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join([json.dumps(ALPACA)] * 3 + [json.dumps({"text": "plain"})]) + "\n")
    with pytest.raises(ValueError, match=r"chat.jsonl:4: unknown record format"):
        load_source("chat", path, tokenizer, probe_size=1, prompt_format="vicuna")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl holds no record"):
        load_source("empty", empty, tokenizer, probe_size=1, prompt_format="vicuna")


@pytest.mark.parametrize("record, message", [
    ({"instruction": None, "output": "a"}, "'instruction' must be a string, got null"),
    ({"instruction": "q", "output": 3}, "'output' must be a string, got 3"),
    ({"instruction": "q", "input": ["x"], "output": "a"}, "'input' must be a string, got [\"x\"]"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}]},
     "conversations[1] needs 'from'"),
    ({"conversations": 5}, "'conversations' must be a non-empty list, got 5"),
    ({"system_prompt": 1, "conversations": FASTCHAT["conversations"]}, "'system_prompt' must be a string, got 1"),
])
def test_non_string_fields_are_refused_naming_file_and_line(record, message):
    with pytest.raises(ValueError) as caught:
        to_messages(record, "x.jsonl:7")
    assert str(caught.value).startswith("x.jsonl:7: ") and message in str(caught.value)


def test_optional_fields_may_be_null_or_absent():
    assert to_messages({"instruction": "q", "input": None, "output": "a"}) == to_messages({"instruction": "q",
                                                                                          "output": "a"})
    assert to_messages({**FASTCHAT, "system_prompt": None})[0]["role"] == "user"


def test_truncation_that_leaves_no_label_drops_the_training_example(tmp_path, caplog):
    """Training examples with no assistant token left are dropped (counted, logged); probe examples are kept."""
    tokenizer = tiny.tiny_tokenizer()
    short = {"instruction": "Hi", "output": "Hello."}
    long = {"instruction": " ".join(["word"] * 60), "output": "Fine."}
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in [short, long, short, long, long]))
    dev.write_text(json.dumps(long) + "\n")
    with caplog.at_level("WARNING", logger="moepatch.data"):
        source = load_source("mixed", train, tokenizer, probe_path=dev, prompt_format="vicuna", max_length=24)
    assert (len(source.train), source.dropped, len(source.probe)) == (2, 3, 1)
    assert all(any(label != IGNORE_INDEX for label in example["labels"]) for example in source.train)
    assert "source 'mixed': 3 of its 5 training examples" in caplog.text
    everything = load_source("mixed", train, tokenizer, probe_path=dev, prompt_format="vicuna", max_length=2)
    assert (everything.train, everything.dropped) == ([], 5)  # the caller decides what an empty source means
    kept = load_source("mixed", train, tokenizer, probe_path=dev, prompt_format="vicuna", max_length=512)
    assert (len(kept.train), kept.dropped) == (5, 0)
