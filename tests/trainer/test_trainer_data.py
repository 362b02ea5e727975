"""Data formats, label masks (exact -100 positions), malformed lines, truncation, padding."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterctl.errors import InvalidArgument
from adapterctl.trainer.data import IGNORE_INDEX, load_jsonl, split_eval, tokenize

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def tok(tiny_base):
    from adapterctl.basemodel import load_tokenizer

    return load_tokenizer(tiny_base)


def _write(tmp_path: Path, lines: list) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _one(tmp_path, tok, record, **kw):
    data = load_jsonl(_write(tmp_path, [record]))
    kw.setdefault("max_seq_len", 512)
    kw.setdefault("train_on_inputs", False)
    return data.format, tokenize(data, tok, **kw).examples[0]


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_text_labels_every_token_and_appends_eos(tmp_path, tok, train_on_inputs):
    fmt, ex = _one(tmp_path, tok, {"text": "A fine film."}, train_on_inputs=train_on_inputs)
    assert fmt == "text"
    assert ex.input_ids == tok("A fine film.").input_ids + [tok.eos_token_id]
    assert ex.labels == ex.input_ids  # nothing masked either way


def test_prompt_completion_masks_the_prompt_unless_train_on_inputs(tmp_path, tok):
    record = {"prompt": "Review: Jaws\n", "completion": "Bring a bigger boat."}
    prompt_ids = tok(record["prompt"]).input_ids
    completion_ids = tok(record["completion"], add_special_tokens=False).input_ids + [tok.eos_token_id]
    fmt, masked = _one(tmp_path, tok, record)
    assert fmt == "prompt_completion"
    assert masked.input_ids == prompt_ids + completion_ids
    assert masked.labels == [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    _, unmasked = _one(tmp_path, tok, record, train_on_inputs=True)
    assert unmasked.labels == unmasked.input_ids


def test_messages_loss_on_assistant_turns_only(tmp_path, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Jaws?"},
                {"role": "assistant", "content": "Bigger boat."}, {"role": "user", "content": "Cats?"},
                {"role": "assistant", "content": "No."}]
    fmt, ex = _one(tmp_path, tok, {"messages": messages})
    assert fmt == "messages"
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert ex.input_ids == tok(rendered, add_special_tokens=False).input_ids
    kept = [i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX]
    # Exactly the two assistant spans: content + <end_of_turn> + newline, nothing of system/user turns.
    spans = tok.decode([ex.input_ids[i] for i in kept])
    assert spans == "Bigger boat.<end_of_turn>\nNo.<end_of_turn>\n"
    assert all(ex.labels[i] == ex.input_ids[i] for i in kept)
    model_header = tok("<start_of_turn>model\n", add_special_tokens=False).input_ids
    first = kept[0]
    assert ex.input_ids[first - len(model_header):first] == model_header  # starts right after the header
    _, unmasked = _one(tmp_path, tok, {"messages": messages}, train_on_inputs=True)
    assert unmasked.labels == unmasked.input_ids


def test_messages_need_generation_marks_for_masking(tmp_path, tiny_base):
    from adapterctl.basemodel import load_tokenizer

    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok = load_tokenizer(tiny_base, chat_template=plain)
    data = load_jsonl(
        _write(tmp_path, [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    )
    with pytest.raises(InvalidArgument, match="generation"):
        tokenize(data, tok, max_seq_len=64, train_on_inputs=False)
    assert tokenize(data, tok, max_seq_len=64, train_on_inputs=True).examples


def test_malformed_lines_name_file_and_line(tmp_path):
    path = _write(
        tmp_path, [{"text": "ok"}, "", "{not json", {"prompt": "p", "completion": "c"}, [1, 2], {"text": "fine"}]
    )
    with pytest.raises(InvalidArgument) as info:
        load_jsonl(path)
    message = str(info.value)
    assert f"{path}:3: invalid JSON" in message
    assert f"{path}:4:" in message and f"{path}:5: expected a JSON object" in message
    assert "--skip-bad-lines" in message and "\n" not in message
    data = load_jsonl(path, skip_bad_lines=True)
    assert data.skipped == 3 and [r["text"] for r in data.records] == ["ok", "fine"] and data.line_numbers == [1, 6]


def test_format_override_and_record_validation(tmp_path):
    path = _write(tmp_path, [{"text": "x", "prompt": "p", "completion": "c"}])
    assert load_jsonl(path).format == "prompt_completion"
    assert load_jsonl(path, fmt="text").format == "text"
    bad = _write(tmp_path, [{"messages": [{"role": "user", "content": "no answer"}]}])
    with pytest.raises(InvalidArgument, match=r"data.jsonl:1: no assistant message"):
        load_jsonl(bad)
    with pytest.raises(InvalidArgument, match="does not exist"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_truncation_and_dropped_counts(tmp_path, tok):
    long_text = " ".join(["word"] * 100)
    path = _write(tmp_path, [{"text": long_text}, {"text": "short"},
                             {"prompt": long_text, "completion": "lost"}])
    text_data = load_jsonl(path, skip_bad_lines=True)  # the prompt/completion line does not match "text"
    out = tokenize(text_data, tok, max_seq_len=16, train_on_inputs=False)
    assert out.truncated == 1 and len(out.examples[0].input_ids) == 16
    pc = load_jsonl(
        _write(tmp_path, [{"prompt": long_text, "completion": "lost"}, {"prompt": "p", "completion": "kept"}])
    )
    out = tokenize(pc, tok, max_seq_len=16, train_on_inputs=False)
    assert out.truncated == 1 and out.dropped == 1 and len(out.examples) == 1


def test_eval_split_is_deterministic_and_disjoint():
    data = load_jsonl(EXAMPLES / "movie_reviews.jsonl")
    train_a, eval_a = split_eval(data, 0.1, seed=3)
    train_b, eval_b = split_eval(data, 0.1, seed=3)
    assert eval_a.line_numbers == eval_b.line_numbers and len(eval_a.records) == 5
    assert not set(train_a.line_numbers) & set(eval_a.line_numbers)
    assert len(train_a.records) + len(eval_a.records) == len(data.records)


def test_example_files_parse(tok):
    for name, fmt in [("movie_reviews.jsonl", "text"), ("prompt_completion.jsonl", "prompt_completion"),
                      ("chat_messages.jsonl", "messages")]:
        data = load_jsonl(EXAMPLES / name)
        assert data.format == fmt and data.skipped == 0
        assert tokenize(data, tok, max_seq_len=256, train_on_inputs=False).examples


def test_collator_right_pads_with_ignored_labels():
    from adapterctl.trainer.collate import RightPadCollator

    batch = RightPadCollator(pad_id=0, pad_to_multiple_of=4)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                                              {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
