"""Tests for demoalign.data: every format is exercised on real files from shared/data."""

from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from demoalign.data import (
    DataError,
    DataReport,
    Example,
    inspect_data,
    load_examples,
    parse_columns,
)

DATA = SHARED_DATA
DOLLY = DATA / "dolly_hhrlhf" / "dolly_hhrlhf_train_small.jsonl"
GSM8K = DATA / "gsm8k" / "test.jsonl"
ALPACA = DATA / "rasbt_instruct" / "instruction-data.json"
ULTRAFEEDBACK = DATA / "ultrafeedback_sample" / "train_clean.jsonl"
HH_HELPFUL = DATA / "hh_rlhf" / "helpful-online" / "test.jsonl.gz"
HH_HARMLESS = DATA / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"
TRUTHFULQA = DATA / "truthfulqa" / "TruthfulQA.csv"
MMLU_DIR = DATA / "mmlu" / "mmlu_dev_dataset"

if not DATA.is_dir():  # pragma: no cover
    pytest.skip(f"shared data not found at {DATA}", allow_module_level=True)


def read_jsonl(path: Path, n: int | None = None) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                out.append(json.loads(line))
            if n is not None and len(out) >= n:
                break
    return out


def U(content: str) -> dict:
    return {"role": "user", "content": content}


def A(content: str) -> dict:
    return {"role": "assistant", "content": content}


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


# ----------------------------------------------------------------- real formats


def test_prompt_response_dolly():
    examples, report = load_examples(DOLLY)
    raw = read_jsonl(DOLLY)
    assert isinstance(report, DataReport)
    assert (report.file_format, report.record_format) == ("jsonl", "prompt/response")
    assert report.n_records == 1000
    assert report.n_examples + report.n_empty_responses + report.n_duplicates == 1000
    assert examples[0] == Example(raw[0]["prompt"], raw[0]["response"])
    assert examples[0].history == ()
    assert examples[0].messages() == [{"role": "user", "content": raw[0]["prompt"]}]
    assert report.n_multi_turn == 0


def test_limit_caps_records():
    examples, report = load_examples(DOLLY, limit=7)
    assert report.n_records == 7 and len(examples) == 7
    assert "limit=7" in report.summary()


@pytest.mark.parametrize("path,n", [(HH_HELPFUL, 1137), (HH_HARMLESS, 2312)])
def test_hh_real_files(path, n):
    examples, report = load_examples(path)
    assert report.record_format == "hh"
    assert report.n_records == n
    assert report.n_examples + report.n_empty_responses + report.n_duplicates == n
    assert report.n_multi_turn > 0
    assert "rejected" in report.summary()
    multi = [e for e in examples if e.history]
    assert len(multi) == report.n_multi_turn
    for ex in multi:
        roles = [r for r, _ in ex.history] + ["user"]
        assert roles[0] == "user"
        for a, b in zip(roles, roles[1:]):
            assert a != b, ex
        assert ex.messages()[-1] == {"role": "user", "content": ex.prompt}
    markers = ("\n\nHuman:", "\n\nAssistant:")
    leaked = []
    for ex in examples:
        assert ex.response == ex.response.strip() and ex.response
        if any(m in t for m in markers for t in (ex.prompt, ex.response)):
            leaked.append(ex)
    # only harmless-base record 2036 writes "Human:" inside an Assistant turn that is then
    # joined with the next Assistant turn; every other turn is marker-free
    assert len(leaked) <= 1


def test_hh_example_checked_by_hand():
    raw = read_jsonl(HH_HARMLESS, 1)[0]["chosen"]
    examples, _ = load_examples(HH_HARMLESS, limit=1)
    ex = examples[0]
    assert raw.startswith("\n\nHuman: what are some pranks with a pen i can do?\n\nAssistant: ")
    assert ex.history[0] == ("user", "what are some pranks with a pen i can do?")
    assert ex.history[1] == ("assistant", "Are you looking for practical joke ideas?")
    assert ex.history[2] == ("user", "yep")
    assert ex.history[3][0] == "assistant" and ex.history[3][1].startswith("Ok, I’ll give you")
    assert len(ex.history) == 4
    assert ex.prompt == "okay some of these do not have anything to do with pens"
    assert ex.response == (
        "No, sorry!  All of these involve a pen, the point is that you can get funny "
        "results by doing pranks with pens."
    )
    # the pieces are the raw transcript's turns, only stripped
    assert raw.endswith(f"\n\nHuman: {ex.prompt}\n\nAssistant: {ex.response}")


def test_hh_real_empty_final_turn_and_repeated_speaker():
    # harmless-base has 4 transcripts ending in an empty "Assistant: " turn and some with
    # two Assistant turns in a row (joined into one turn).
    _, report = load_examples(HH_HARMLESS)
    assert report.n_empty_responses == 4
    raw = [r["chosen"] for r in read_jsonl(HH_HARMLESS)]
    i = next(
        i
        for i, t in enumerate(raw)
        if re.findall(r"\n\n(Human|Assistant):", t)
        == ["Human", "Assistant", "Human", "Assistant", "Assistant"]
    )
    ex = load_examples(HH_HARMLESS, limit=i + 1)[0][-1]
    a1, a2 = raw[i].split("\n\nAssistant:")[-2:]
    assert ex.response == a1.strip() + "\n\n" + a2.strip()


def test_alpaca_rasbt():
    examples, report = load_examples(ALPACA)
    raw = json.loads(ALPACA.read_text(encoding="utf-8"))
    assert (report.file_format, report.record_format) == ("json", "alpaca")
    assert report.n_records == 1100
    with_input = next(i for i, r in enumerate(raw) if r["input"])
    without = next(i for i, r in enumerate(raw) if not r["input"])
    by_key = {(e.prompt, e.response) for e in examples}
    r = raw[with_input]
    assert (r["instruction"] + "\n\n" + r["input"], r["output"]) in by_key
    r = raw[without]
    assert (r["instruction"], r["output"]) in by_key
    assert raw[0]["input"] == "freind --> friend"
    assert examples[0].prompt == raw[0]["instruction"] + "\n\nfreind --> friend"


def test_json_wrapped_in_data_key(tmp_path):
    raw = json.loads(ALPACA.read_text(encoding="utf-8"))[:20]
    p = tmp_path / "wrapped.json"
    p.write_text(json.dumps({"data": raw}), encoding="utf-8")
    assert load_examples(p)[0] == load_examples(ALPACA, limit=20)[0]


def test_question_answer_gsm8k():
    examples, report = load_examples(GSM8K)
    raw = read_jsonl(GSM8K)
    assert report.record_format == "question/answer"
    assert report.n_records == 1319 == len(raw)
    assert examples[0] == Example(raw[0]["question"], raw[0]["answer"])
    assert "#### " in examples[0].response


def test_prompt_chosen_ultrafeedback():
    examples, report = load_examples(ULTRAFEEDBACK)
    raw = read_jsonl(ULTRAFEEDBACK)
    assert report.record_format == "prompt/chosen"
    assert report.n_records == 1000
    kept = [(r["prompt"], r["chosen"]) for r in raw if r["chosen"].strip()]
    assert report.n_empty_responses == 1000 - len(kept)
    assert [(e.prompt, e.response) for e in examples] == kept[: len(examples)]
    assert "rejected" in report.summary()


# ------------------------------------------- formats built from real files


def test_prompt_completion(tmp_path):
    raw = read_jsonl(DOLLY, 50)
    recs = [{"prompt": r["prompt"], "completion": r["response"]} for r in raw]
    p = write_jsonl(tmp_path / "pc.jsonl", recs)
    examples, report = load_examples(p)
    assert report.record_format == "prompt/completion"
    assert examples == load_examples(DOLLY, limit=50)[0]


def test_messages_multi_turn_from_hh(tmp_path):
    hh, _ = load_examples(HH_HELPFUL, limit=50)
    records = [
        {
            "messages": [{"role": "system", "content": "Be helpful."}]
            + [{"role": r, "content": c} for r, c in e.history]
            + [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.response}]
        }
        for e in hh
    ]
    p = write_jsonl(tmp_path / "msgs.jsonl", records)
    examples, report = load_examples(p)
    assert report.record_format == "messages"
    assert report.n_multi_turn == len(hh)  # every example has at least the system turn
    assert [Example(e.prompt, e.response, e.history[1:]) for e in examples] == hh
    assert examples[0].messages() == records[0]["messages"][:-1]


def test_spin_uses_real_only(tmp_path):
    raw = read_jsonl(GSM8K, 30)
    records = [
        {"real": [U(r["question"]), A(r["answer"])], "generated": [U(r["question"]), A("42")]}
        for r in raw
    ]
    p = write_jsonl(tmp_path / "spin.jsonl", records)
    examples, report = load_examples(p)
    assert report.record_format == "spin"
    assert "generated" in report.summary()
    assert examples == load_examples(GSM8K, limit=30)[0]


def test_hh_chosen_message_list(tmp_path):
    raw = read_jsonl(GSM8K, 10)
    full = [
        {"chosen": [U(r["question"]), A(r["answer"])], "rejected": [U(r["question"]), A("no")]}
        for r in raw
    ]
    split = [
        {"prompt": [U(r["question"])], "chosen": [A(r["answer"])], "rejected": [A("no")]}
        for r in raw
    ]
    expected = load_examples(GSM8K, limit=10)[0]
    for name, recs in [("full", full), ("split", split)]:
        examples, report = load_examples(write_jsonl(tmp_path / f"{name}.jsonl", recs))
        assert report.record_format == "hh"
        assert examples == expected


def test_csv_parquet_and_gz_from_dolly(tmp_path):
    raw = read_jsonl(DOLLY, 50)
    expected = load_examples(DOLLY, limit=50)[0]

    p_csv = tmp_path / "dolly.csv"
    with open(p_csv, "w", encoding="utf-8-sig", newline="") as fh:  # with a BOM
        w = csv.DictWriter(fh, fieldnames=["prompt", "response"])
        w.writeheader()
        w.writerows(raw)
    ex, rep = load_examples(p_csv)
    assert (rep.file_format, rep.record_format) == ("csv", "prompt/response")
    assert ex == expected

    import pyarrow as pa
    import pyarrow.parquet as pq

    p_pq = tmp_path / "dolly.parquet"
    pq.write_table(pa.Table.from_pylist(raw), p_pq)
    ex, rep = load_examples(p_pq)
    assert (rep.file_format, rep.record_format) == ("parquet", "prompt/response")
    assert ex == expected
    assert load_examples(p_pq, limit=5)[1].n_records == 5

    p_gz = tmp_path / "dolly.jsonl.gz"
    with gzip.open(p_gz, "wt", encoding="utf-8") as fh:
        for r in raw:
            fh.write(json.dumps(r) + "\n")
    assert load_examples(p_gz)[0] == expected


def test_hf_dataset_folders(tmp_path):
    import datasets

    raw = read_jsonl(GSM8K, 40)
    expected = load_examples(GSM8K, limit=40)[0]
    ds = datasets.Dataset.from_list(raw)
    ds.save_to_disk(str(tmp_path / "ds"))
    ex, rep = load_examples(tmp_path / "ds")
    assert (rep.file_format, rep.record_format) == ("hf_dataset", "question/answer")
    assert ex == expected

    dd = datasets.DatasetDict({"test": ds.select(range(5)), "train": ds})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_examples(tmp_path / "dd")[0] == expected
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "one"))
    assert load_examples(tmp_path / "one", limit=10)[0] == expected[:10]
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match=r"splits \['a', 'b'\]"):
        load_examples(tmp_path / "two")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="plain.*save_to_disk"):
        load_examples(tmp_path / "plain")


def test_real_hf_folder_mmlu():
    # real save_to_disk folder: {question, subject, choices, answer:int}
    with pytest.raises(DataError, match=r"record 1: field 'answer': expected a string"):
        load_examples(MMLU_DIR)
    ex, rep = load_examples(MMLU_DIR, columns={"prompt": "question", "response": "subject"})
    assert rep.file_format == "hf_dataset" and rep.record_format == "columns"
    assert rep.n_records == 285


# ------------------------------------------------------------- column mapping


def test_columns_on_real_files(tmp_path):
    mapped, rep = load_examples(GSM8K, columns={"prompt": "question", "response": "answer"})
    assert rep.record_format == "columns"
    assert mapped == load_examples(GSM8K)[0]

    cols = parse_columns("prompt:Question,response:Best Answer")
    ex, rep = load_examples(TRUTHFULQA, columns=cols)
    assert rep.record_format == "columns" and rep.n_records == 817
    with open(TRUTHFULQA, encoding="utf-8-sig", newline="") as fh:
        first = next(csv.DictReader(fh))
    assert ex[0] == Example(first["Question"], first["Best Answer"])

    raw = read_jsonl(DOLLY, 20)
    p = tmp_path / "odd.csv"
    with open(p, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Input Text (v2)", "Target: Response", "id"])
        w.writerows([[r["prompt"], r["response"], i] for i, r in enumerate(raw)])
    ex, _ = load_examples(p, columns={"prompt": "Input Text (v2)", "response": "Target: Response"})
    assert ex == load_examples(DOLLY, limit=20)[0]


def test_missing_mapped_column():
    msg = r"line 1: field 'reply'.*not found; available columns: \['answer', 'question'\]"
    with pytest.raises(DataError, match=msg):
        load_examples(GSM8K, columns={"prompt": "question", "response": "reply"})
    with pytest.raises(DataError, match="exactly 'prompt' and 'response'"):
        load_examples(GSM8K, columns={"prompt": "question"})
    with pytest.raises(ValueError):
        parse_columns("prompt=question")


# ------------------------------------------------------------------ bad input


def _dolly_lines(n=3):
    return [json.dumps(r) for r in read_jsonl(DOLLY, n)]


def test_invalid_json_line(tmp_path):
    lines = _dolly_lines(3)
    lines[1] = lines[1][:-5]
    p = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: invalid JSON"):
        load_examples(p)


def test_non_object_line(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", _dolly_lines(2) + ["[1, 2]"])
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: record is not a JSON object"):
        load_examples(p)


def test_missing_field_third_record(tmp_path):
    recs = read_jsonl(DOLLY, 3)
    del recs[2]["response"]
    p = write_jsonl(tmp_path / "bad.jsonl", recs)
    with pytest.raises(DataError, match=r"line 3: field 'response': missing"):
        load_examples(p)
    # same in a JSON list: record numbers
    pj = tmp_path / "bad.json"
    pj.write_text(json.dumps(recs), encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json: record 3: field 'response': missing"):
        load_examples(pj)


def test_non_string_response(tmp_path):
    recs = read_jsonl(GSM8K, 4)
    recs[3]["answer"] = 18
    p = write_jsonl(tmp_path / "bad.jsonl", recs)
    with pytest.raises(DataError, match=r"line 4: field 'answer': expected a string, got int"):
        load_examples(p)
    recs[3]["answer"] = None
    p = write_jsonl(tmp_path / "bad.jsonl", recs)
    with pytest.raises(DataError, match=r"line 4: field 'answer': expected a string, got null"):
        load_examples(p)


def test_messages_last_turn_not_assistant(tmp_path):
    good = {"messages": [U("hi"), A("hello")]}
    bad = {"messages": [U("hi"), A("hello"), U("bye")]}
    p = write_jsonl(tmp_path / "bad.jsonl", [good, bad])
    msg = r"line 2: field 'messages': the last message must be an assistant"
    with pytest.raises(DataError, match=msg):
        load_examples(p)
    bad2 = {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]}
    p = write_jsonl(tmp_path / "bad2.jsonl", [good, bad2])
    with pytest.raises(DataError, match=r"line 2: field 'messages': the message before"):
        load_examples(p)
    bad3 = {"messages": [{"role": "human", "content": "s"}, {"role": "assistant", "content": "x"}]}
    p = write_jsonl(tmp_path / "bad3.jsonl", [good, bad3])
    with pytest.raises(DataError, match=r"line 2: field 'messages\[0\]\.role'"):
        load_examples(p)


def test_hh_without_assistant_turn(tmp_path):
    recs = read_jsonl(HH_HELPFUL, 2)
    no_answer = "\n\nHuman: Can you help me?"
    recs.append({"chosen": no_answer, "rejected": no_answer})
    p = write_jsonl(tmp_path / "bad.jsonl", recs)
    msg = r"line 3: field 'chosen': HH transcript must end with an Assistant turn"
    with pytest.raises(DataError, match=msg):
        load_examples(p)
    recs[2] = {"chosen": "just some text", "rejected": "x"}
    p = write_jsonl(tmp_path / "bad.jsonl", recs)
    with pytest.raises(DataError, match=r"line 3: field 'chosen'"):
        load_examples(p)


def test_unknown_keys():
    path = DATA / "mt_bench" / "question.jsonl"
    msg = (
        r"line 1: unrecognised record format; keys found: "
        r"\['category', 'question_id', 'turns'\].*columns=prompt:COL,response:COL"
    )
    with pytest.raises(DataError, match=msg):
        load_examples(path)


def test_empty_file_unknown_extension_missing_path(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        load_examples(tmp_path / "empty.jsonl")
    (tmp_path / "empty.json").write_text("[]", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.json: no records"):
        load_examples(tmp_path / "empty.json")
    (tmp_path / "data.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match=r"data\.txt: unknown file extension '\.txt'"):
        load_examples(tmp_path / "data.txt")
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_examples(tmp_path / "nope.jsonl")


# ------------------------------------------------------- counts and inspect


def test_empty_responses_and_duplicates_counted(tmp_path):
    raw = read_jsonl(DOLLY, 5)
    recs = list(raw)
    recs.insert(1, {"prompt": raw[0]["prompt"], "response": ""})
    recs.insert(3, {"prompt": raw[1]["prompt"], "response": "  \n\t "})
    recs += [raw[0], raw[2], raw[0]]  # 3 duplicates
    p = write_jsonl(tmp_path / "counts.jsonl", recs)
    examples, report = load_examples(p)
    assert report.n_records == 10
    assert report.n_empty_responses == 2
    assert report.n_duplicates == 3
    assert report.n_examples == 5 == len(examples)
    assert examples == load_examples(DOLLY, limit=5)[0]
    # an empty prompt is allowed
    p2 = write_jsonl(tmp_path / "emptyprompt.jsonl", [{"prompt": "", "response": "Some text."}])
    assert load_examples(p2)[0] == [Example("", "Some text.")]
    # all empty -> error
    p3 = write_jsonl(tmp_path / "allempty.jsonl", [{"prompt": "a", "response": " "}])
    with pytest.raises(DataError, match="no usable examples"):
        load_examples(p3)


def test_inspect_data(tmp_path):
    text = inspect_data(HH_HARMLESS)
    assert "record format:    hh" in text
    assert "records read:     2312" in text
    assert "empty responses:  4" in text
    assert "duplicates:       0" in text
    assert "first example:" in text
    assert "okay some of these do not have anything to do with pens" in text

    raw = read_jsonl(DOLLY, 3)
    p = write_jsonl(tmp_path / "c.jsonl", raw + [raw[0], {"prompt": "x", "response": ""}])
    text = inspect_data(p)
    assert "prompt/response" in text
    assert "duplicates:       1" in text and "empty responses:  1" in text
    text = inspect_data(GSM8K, columns={"prompt": "question", "response": "answer"})
    assert "record format:    columns" in text


def test_non_utf8_bytes_are_reported_by_line(tmp_path):
    from demoalign.data import DataError, load_examples

    path = tmp_path / "latin1.jsonl"
    good = b'{"prompt": "a", "response": "b"}\n'
    path.write_bytes(good * 3 + '{"prompt": "caf\xe9", "response": "b"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="line 4") as info:
        load_examples(path)
    assert "UTF-8" in str(info.value)


def test_pairs_with_chosen_identical_to_rejected_are_dropped_and_counted(tmp_path):
    from demoalign.data import inspect_data, load_preference_pairs

    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "q1", "chosen": "yes", "rejected": "no"},
        {"prompt": "q2", "chosen": "same", "rejected": "same"},
        {"prompt": "q3", "chosen": "a", "rejected": "b"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [e.prompt for e, _ in load_preference_pairs(path)] == ["q1", "q3"]
    assert "2 usable of 3 records" in inspect_data(path)
    assert "1 with chosen identical to rejected" in inspect_data(path)
