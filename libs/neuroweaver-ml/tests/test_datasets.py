import json

import pytest

from neuroweaver_ml.datasets import (
    IGNORE_INDEX,
    load_rows,
    split_train_eval,
    tokenize_row,
    tokenize_rows,
    validate_dataset,
)
from neuroweaver_ml.errors import DatasetInvalid
from neuroweaver_ml.testing import chat_rows, write_jsonl

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def problems(report):
    return [(p.line, p.message) for p in report.problems]


def test_valid_chat_dataset(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", chat_rows(5))
    r = validate_dataset(f)
    assert r.ok and r.format == "chat" and r.num_rows == 5
    assert len(r.sha256) == 64 and r.size_bytes == f.stat().st_size


@pytest.mark.parametrize(
    "bad, expected",
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "expected a JSON object"),
        ({"messages": []}, "non-empty list"),
        ({"messages": "hi"}, "non-empty list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "must end with an assistant message"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "no user message"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}, "role is 'robot'"),
        ({"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "x"}]}, "content is empty"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "content must be a string"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "content must be a string"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "x"},
                ]
            },
            "system message is only allowed as the first",
        ),
        ({"prompt": "p", "completion": "c"}, "looks like 'prompt_completion'"),
        ({"text": "x"}, "missing field 'messages'"),
    ],
)
def test_each_bad_chat_row_is_reported_with_its_line(tmp_path, bad, expected):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", bad if isinstance(bad, str) else json.dumps(bad), GOOD])
    r = validate_dataset(f)
    assert not r.ok
    assert len(r.problems) == 1, problems(r)
    assert r.problems[0].line == 3  # blank line 2 is counted
    assert expected in r.problems[0].message
    assert str(r.problems[0]).startswith("line 3: ")


def test_prompt_completion_and_preference(tmp_path):
    pc = write_jsonl(
        tmp_path / "pc.jsonl", [{"prompt": "Q: 1+1?\nA:", "completion": " 2"}, {"prompt": "x", "completion": ""}, {"prompt": "x"}]
    )
    r = validate_dataset(pc)
    assert r.format == "prompt_completion"
    assert problems(r) == [(2, "'completion' is empty"), (3, "missing field 'completion'")]
    pref = write_jsonl(
        tmp_path / "pref.jsonl",
        [
            {"prompt": "q", "chosen": "good", "rejected": "bad"},
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            {"prompt": "q", "chosen": "same", "rejected": "same"},
            {"prompt": "q", "chosen": "a"},
        ],
    )
    r = validate_dataset(pref)
    assert r.format == "preference"
    assert problems(r) == [(3, "'chosen' and 'rejected' are identical"), (4, "missing field 'rejected'")]
    r = validate_dataset(pref, allowed_formats=("chat", "prompt_completion"))
    assert "not accepted here" in r.problems[0].message


def test_prompt_only_format(tmp_path):
    f = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Why is my check engine light on?", "reference": "A stored fault code."},
            {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
            {"prompt": "q", "reference": ""},
            {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"prompt": "q", "completion": "c"},
        ],
    )
    r = validate_dataset(f)
    assert r.format == "prompt"
    assert problems(r) == [
        (3, "'reference' must be a non-empty string when present"),
        (4, "'prompt' messages must end with a user message"),
        (5, "row looks like 'prompt_completion' but the dataset format is 'prompt'"),
    ]


def test_file_level_problems(tmp_path):
    assert "file not found" in str(validate_dataset(tmp_path / "missing.jsonl").problems[0])
    assert "not a regular file" in str(validate_dataset(tmp_path).problems[0])
    assert not any(str(tmp_path) in str(p) for p in validate_dataset(tmp_path / "missing.jsonl").problems)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert problems(validate_dataset(empty)) == [(None, "dataset has no rows")]
    bad_utf8 = tmp_path / "latin1.jsonl"
    bad_utf8.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "caf\xe9"}\n')
    r = validate_dataset(bad_utf8)
    assert r.problems[0].line == 2 and "UTF-8" in r.problems[0].message
    assert problems(validate_dataset(empty, "bogus"))[0][1].startswith("unknown format")


def test_problem_collection_is_capped(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", ["{bad"] * 25)
    r = validate_dataset(f, max_problems=10)
    assert [p.line for p in r.problems] == list(range(1, 11))
    assert r.truncated
    with pytest.raises(DatasetInvalid, match="line 1: invalid JSON"):
        load_rows(f)


def test_length_limits(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    long = {"messages": [{"role": "user", "content": "brake pads " * 200}, {"role": "assistant", "content": "ok"}]}
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, long])
    r = validate_dataset(f, tokenizer=tok, max_tokens=128)
    assert len(r.problems) == 1 and r.problems[0].line == 2 and "tokens, over the maximum of 128" in r.problems[0].message
    r = validate_dataset(f, max_chars=500)
    assert r.problems[0].line == 2 and "characters, over the maximum of 500" in r.problems[0].message
    assert validate_dataset(f, tokenizer=tok, max_tokens=5000).ok


@pytest.mark.parametrize(
    "template",
    [
        "{{ raise_exception('roles must alternate') }}{{ messages }}",  # how real templates refuse a conversation
        "{{ messages[0].content.nope() }}",
        "{% for m in messages %}{{ m['content'] / 2 }}{% endfor %}",
    ],
)
def test_a_chat_template_failing_on_a_row_is_that_rows_problem(tmp_path, tiny_model_dir, template):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = template
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD])
    r = validate_dataset(f, tokenizer=tok, max_tokens=128)
    assert [p.line for p in r.problems] == [1, 2]
    assert all(p.message.startswith("the chat template cannot render this row: ") for p in r.problems)


def test_split_is_seeded_and_disjoint():
    rows = list(range(100))
    tr, ev = split_train_eval(rows, 0.1, seed=3)
    assert len(ev) == 10 and len(tr) == 90 and not set(tr) & set(ev)
    assert split_train_eval(rows, 0.1, seed=3) == (tr, ev)
    assert split_train_eval(rows, 0.1, seed=4)[1] != ev
    assert split_train_eval(rows, 0.0) == (rows, [])
    assert split_train_eval([1, 2], 0.9) == ([1], [2]) or len(split_train_eval([1, 2], 0.9)[0]) == 1


def test_completion_only_labels_cover_exactly_the_assistant_turns(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Oil type?"},
            {"role": "assistant", "content": "Synthetic oil."},
            {"role": "user", "content": "When?"},
            {"role": "assistant", "content": "Every six thousand miles."},
        ]
    }
    ex = tokenize_row(tok, row, "chat", 512)
    assert len(ex["input_ids"]) == len(ex["labels"])
    trained = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == "Synthetic oil.<|im_end|>\nEvery six thousand miles.<|im_end|>\n"
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ex["input_ids"], ex["labels"], strict=True))
    full = tokenize_row(tok, row, "chat", 512, completion_only=False)
    assert full["labels"] == full["input_ids"]


def test_prompt_completion_tokenization_and_truncation(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ex = tokenize_row(tok, {"prompt": "The capital of France is", "completion": " Paris."}, "prompt_completion", 512)
    trained = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == " Paris.<|im_end|>"
    rows = [{"prompt": "word " * 100, "completion": "end"}, {"prompt": "a", "completion": "b " * 100}]
    td = tokenize_rows(tok, rows, "prompt_completion", 32)
    assert td.dropped == 1  # the completion of row 1 is cut off entirely
    assert td.truncated == 1 and len(td.examples) == 1 and len(td.examples[0]["input_ids"]) == 32


def test_a_line_over_the_limit_is_a_numbered_problem_and_is_never_read_whole(tmp_path):
    import tracemalloc

    from neuroweaver_ml.datasets import MAX_LINE_BYTES

    f = tmp_path / "long.jsonl"
    with open(f, "wb") as out:
        out.write(json.dumps(GOOD).encode() + b"\n")
        out.write(b'{"messages": "' + b"x" * (24 * MAX_LINE_BYTES) + b'"}\n')  # 24 MiB, one line
        out.write(json.dumps(GOOD).encode() + b"\n" + b"y" * (3 * MAX_LINE_BYTES))  # last line: no newline
    tracemalloc.start()
    try:
        r = validate_dataset(f)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    too_long = f"line is longer than {MAX_LINE_BYTES} bytes (the maximum)"
    assert problems(r) == [(2, too_long), (4, too_long)]  # line numbers stay right after a skipped line
    assert r.num_rows == 2
    assert peak < 6 * MAX_LINE_BYTES, peak  # a few 1 MiB buffers, not the 24 MiB line


def test_line_limit_boundary(tmp_path):
    row = json.dumps(GOOD).encode()
    f = tmp_path / "edge.jsonl"
    f.write_bytes(row + b"\n" + row + b" " * 10 + b"\n" + row)
    limit = len(row)
    assert problems(validate_dataset(f, max_line_bytes=limit)) == [(2, f"line is longer than {limit} bytes (the maximum)")]
    assert validate_dataset(f, max_line_bytes=limit + 10).ok


def test_deeply_nested_json_is_a_problem_not_a_crash(tmp_path):
    f = tmp_path / "deep.jsonl"
    f.write_text(json.dumps(GOOD) + "\n" + "[" * 200_000 + "\n")
    assert problems(validate_dataset(f)) == [(2, "invalid JSON: nested too deeply")]
