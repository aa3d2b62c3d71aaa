"""Evaluation: metrics by hand, bootstrap intervals, log-probs equal to training's, the
reward-model path, `demoalign eval` end to end on real UltraFeedback and HH pairs, bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import SHARED_DATA, fresh_model

torch.set_num_threads(1)

UF = SHARED_DATA / "ultrafeedback_sample" / "train_clean.jsonl"
HH = SHARED_DATA / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"
SMALL = dict(
    max_length=64,
    max_prompt_length=32,
    max_new_tokens=6,
    eval_batch_size=8,
    bootstrap_resamples=200,
    cpu=True,
)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory, tiny_model_dir):
    """Same tokenizer, other random weights."""
    from transformers import AutoTokenizer

    from demoalign.tiny import tiny_model

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = tmp_path_factory.mktemp("other") / "model"
    tiny_model(tok, hidden_size=32, seed=1).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _reward_model(tok, out, num_labels=1):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=num_labels,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer):
    return _reward_model(tokenizer, tmp_path_factory.mktemp("rm") / "rm")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    from demoalign.data import load_preference_pairs

    pairs = load_preference_pairs(HH, limit=4)
    return _write_jsonl(
        tmp_path_factory.mktemp("prompts") / "prompts.jsonl",
        [{"prompt": e.prompt} for e, _ in pairs],
    )


# ---------------------------------------------------------------- metrics by hand


def test_pair_metrics_by_hand():
    from demoalign.eval.metrics import pair_metrics, pair_values

    good, bad = [-1.0, -2.0, -3.0, -4.0], [-2.0, -2.0, -1.0, -5.0]
    ref_good, ref_bad = [-1.0, -1.0, -3.0, -4.5], [-1.0, -2.0, -1.0, -5.0]
    values = pair_values(good, bad, ref_good, ref_bad)
    # gaps 1, 0, -2, 1; chosen higher: yes, tie, no, yes; implicit rewards (0 vs -1), (-1 vs 0),
    # (0 vs 0), (0.5 vs 0): yes, no, tie, yes.
    assert values["logp_gap"] == [1.0, 0.0, -2.0, 1.0]
    assert values["pair_win_rate"] == [1.0, 0.5, 0.0, 1.0]
    assert values["implicit_reward_accuracy"] == [1.0, 0.0, 0.5, 1.0]
    expected = {"logp_gap": 0.0, "pair_win_rate": 0.625, "implicit_reward_accuracy": 0.625}
    assert pair_metrics(good, bad, ref_good, ref_bad) == expected
    assert {k: sum(v) / len(v) for k, v in values.items()} == expected
    assert "implicit_reward_accuracy" not in pair_values(good, bad)


def test_win_rate_by_hand_ties_half():
    from demoalign.eval.metrics import win_values

    wins = win_values([1.0, 2.0, 3.0, 3.0], [0.0, 2.0, 4.0, 1.0])
    assert wins == [1.0, 0.5, 0.0, 1.0] and sum(wins) / 4 == 0.625
    assert win_values([0.3, -1.0], [0.3, -1.0]) == [0.5, 0.5]
    with pytest.raises(ValueError):
        win_values([1.0], [1.0, 2.0])


def test_bootstrap_interval_contains_estimate_and_is_seeded():
    import numpy as np

    from demoalign.eval.stats import bootstrap_interval, summarize

    values = [1.0, 0.0, 1.0, 1.0, 0.5, 0.0, 1.0, 1.0, 0.0, 1.0]
    m = summarize(values, n_resamples=500, seed=3)
    assert m["value"] == 0.65 and m["n"] == 10
    assert m["low"] <= m["value"] <= m["high"] and m["low"] < m["high"]
    assert summarize(values, n_resamples=500, seed=3) == m
    continuous = [0.1, 2.3, -0.7, 1.9, 0.4, 3.1, -1.2, 0.8]
    assert bootstrap_interval(continuous, 500, seed=4) != bootstrap_interval(
        continuous, 500, seed=5
    )
    # The percentile interval, computed here by hand with the same generator.
    rng = np.random.default_rng(3)
    x = np.array(values)
    means = x[rng.integers(0, 10, size=(500, 10))].mean(axis=1)
    assert (m["low"], m["high"]) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    # A wider confidence level gives a wider interval; constant values give a point.
    lo90, hi90 = bootstrap_interval(values, 500, seed=3, confidence=0.9)
    assert m["low"] <= lo90 and hi90 <= m["high"]
    assert bootstrap_interval([0.5] * 7, 100, seed=0) == (0.5, 0.5)


def test_model_names_are_distinct_path_endings(tmp_path):
    from demoalign.eval.evaluate import model_names

    assert model_names([str(tmp_path / "a" / "final"), str(tmp_path / "b" / "final")]) == [
        "a/final",
        "b/final",
    ]
    assert model_names([str(tmp_path / "sft"), str(tmp_path / "irft")]) == ["sft", "irft"]


def test_reward_text_template():
    from demoalign.config import BEAVER_TEMPLATE
    from demoalign.eval.reward_scoring import reward_text

    assert (
        reward_text(BEAVER_TEMPLATE, "Hi {x}", " Hello {prompt}")
        == "BEGINNING OF CONVERSATION: USER: Hi {x} ASSISTANT: Hello {prompt}"
    )


def test_stage_gaps_from_a_run_folder(tmp_path):
    from demoalign.config import EvalConfig
    from demoalign.eval.evaluate import stage_gaps

    for stage, rows in ((1, [(-5.0, -6.0), (-4.0, -4.0)]), (2, [(-3.0, -6.0), (-2.0, -5.0)])):
        (tmp_path / "stages" / str(stage)).mkdir(parents=True)
        _write_jsonl(
            tmp_path / "stages" / str(stage) / "negatives.jsonl",
            [{"ref_logp_demonstration": d, "ref_logp_negative": n} for d, n in rows],
        )
    gaps = stage_gaps(str(tmp_path), EvalConfig(models="x", pairs="y", bootstrap_resamples=50))
    assert [(g["stage"], g["value"], g["n"]) for g in gaps] == [(1, 0.5, 2), (2, 3.0, 2)]
    assert gaps[1]["low"] == gaps[1]["high"] == 3.0


# ---------------------------------------------------------------- preference-pair loading


def test_load_preference_pairs_real_files():
    from demoalign.data import load_preference_pairs

    uf = load_preference_pairs(UF, limit=5)
    first = json.loads(UF.open().readline())
    assert len(uf) == 5 and uf[0][0].prompt == first["prompt"]
    assert (
        uf[0][0].response == first["chosen"]
        and uf[0][1] == first["rejected"]
        and uf[0][0].history == ()
    )
    hh = load_preference_pairs(HH, limit=5)
    assert len(hh) == 5
    example, rejected = hh[0]
    assert (
        example.prompt == "okay some of these do not have anything to do with pens"
        and len(example.history) == 4
    )
    assert example.history[:2] == (
        ("user", "what are some pranks with a pen i can do?"),
        ("assistant", "Are you looking for practical joke ideas?"),
    )
    assert example.response.startswith("No, sorry!") and rejected.startswith(
        "There are lots of funny things"
    )


def test_load_preference_pairs_messages_and_empty_responses(tmp_path):
    from demoalign.data import load_preference_pairs

    f = _write_jsonl(
        tmp_path / "m.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": "Hi"}],
                "chosen": [{"role": "assistant", "content": "Hello"}],
                "rejected": [{"role": "assistant", "content": "Go away"}],
            },
            {"prompt": "Q", "chosen": "A", "rejected": "  "},
        ],
    )
    pairs = load_preference_pairs(f)
    assert [(e.prompt, e.response, r) for e, r in pairs] == [("Hi", "Hello", "Go away")]


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"prompt": "Q", "chosen": "A"}], "line 1: field 'rejected': missing"),
        (
            [
                {"prompt": "Q", "chosen": "A", "rejected": "B"},
                {"prompt": "Q", "chosen": "A", "rejected": None},
            ],
            "line 2: field 'rejected': expected a string",
        ),
        (
            [
                {
                    "chosen": "\n\nHuman: a\n\nAssistant: b",
                    "rejected": "\n\nHuman: other\n\nAssistant: c",
                }
            ],
            "field 'rejected': chosen and rejected transcripts differ",
        ),
        (
            [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a"}],
            "field 'rejected': HH transcript must end with an Assistant turn",
        ),
        ([], "no records found (empty file?)"),
        ([{"prompt": "Q", "chosen": "", "rejected": "B"}], "no usable preference pairs"),
    ],
)
def test_load_preference_pairs_errors(tmp_path, records, message):
    from demoalign.data import DataError, load_preference_pairs

    f = _write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError) as err:
        load_preference_pairs(f)
    assert str(f) in str(err.value) and message in str(err.value)


# ---------------------------------------------------------------- log-probs = training's


def test_eval_logps_equal_training_logps(tiny_model_dir, tokenizer):
    """Evaluation scores pairs with the training code's function (pairs.pair_logps) on the very ids
    training builds (Encoder.encode, responses cut to max_length)."""
    from demoalign.data import Example, load_preference_pairs
    from demoalign.encoding import Encoder
    from demoalign.eval.metrics import pair_sequence_logps
    from demoalign.pairs import Pair, pair_logps

    model = fresh_model(tiny_model_dir).eval()
    pairs = load_preference_pairs(HH, limit=3) + load_preference_pairs(UF, limit=3)
    enc = Encoder(tokenizer, "hh", 64, 32)
    good, bad = pair_sequence_logps(model, enc, pairs, fit=True)
    train_enc = Encoder(tokenizer, "hh", 64, 32)
    items = []
    for i, (e, r) in enumerate(pairs):
        demo = train_enc.encode(e)
        neg = train_enc.encode(Example(e.prompt, r, e.history))
        items.append(Pair(demo.prompt_ids, demo.response_ids, neg.response_ids, index=i))
    with torch.no_grad():
        g, b, _, _ = pair_logps(model, items, tokenizer.pad_token_id)
    assert good == pytest.approx(g.tolist(), abs=1e-5) and bad == pytest.approx(
        b.tolist(), abs=1e-5
    )
    assert (
        train_enc.counts.responses_cut > 0
        and enc.counts.responses_cut == train_enc.counts.responses_cut
    )
    # the history is part of the scored prompt (when the prompt is not cut)
    wide = Encoder(tokenizer, "hh", 512, 256)
    assert (
        len(wide.prompt_ids(pairs[0][0]))
        > len(wide.prompt_ids(Example(pairs[0][0].prompt, ""))) + 20
    )


# ---------------------------------------------------------------- reward model


def test_reward_scores_do_not_depend_on_batching(reward_model_dir):
    from demoalign.eval.reward_scoring import reward_scores
    from demoalign.models import load_reward_model

    rm, tok = load_reward_model(str(reward_model_dir))
    rm = rm.eval()
    texts = ["USER: hi ASSISTANT: hello there", "USER: sort 3 1 ASSISTANT: 1 3", "x"]
    together = reward_scores(rm, tok, texts, batch_size=8)
    alone = [reward_scores(rm, tok, [t], batch_size=1)[0] for t in texts]
    assert together == pytest.approx(alone, abs=1e-5) and len(set(together)) == 3


def test_reward_model_with_two_labels_is_refused(tmp_path, tokenizer, tiny_model_dir, prompts_file):
    from demoalign.eval.evaluate import evaluate

    rm2 = _reward_model(tokenizer, tmp_path / "rm2", num_labels=2)
    with pytest.raises(ValueError, match="num_labels=2; a reward model must give one score"):
        evaluate(
            models=str(tiny_model_dir),
            prompts=str(prompts_file),
            reward_model=str(rm2),
            output_dir=str(tmp_path / "out"),
            **SMALL,
        )
    assert not (tmp_path / "out").exists()  # refused before any work


# ---------------------------------------------------------------- evaluate / CLI


def test_model_against_itself(tmp_path, tiny_model_dir, reward_model_dir, prompts_file):
    """Reference = model: every implicit reward is 0, all ties; baseline = model: every win a
    tie."""
    from demoalign.eval.evaluate import evaluate

    res = evaluate(
        models=str(tiny_model_dir),
        reference=str(tiny_model_dir),
        pairs=str(HH),
        max_pairs=6,
        prompts=str(prompts_file),
        reward_model=str(reward_model_dir),
        baseline=str(tiny_model_dir),
        template="hh",
        output_dir=str(tmp_path / "self"),
        **SMALL,
    )
    (entry,) = res["models"]
    for metric in ("implicit_reward_accuracy", "win_rate_vs_baseline"):
        assert entry["metrics"][metric]["value"] == entry["metrics"][metric]["low"] == 0.5
        assert entry["metrics"][metric]["high"] == 0.5
    assert (
        entry["metrics"]["implicit_reward_accuracy"]["n"] == 6
        and entry["metrics"]["win_rate_vs_baseline"]["n"] == 4
    )
    assert res["baseline"] == entry["name"]


def test_cli_end_to_end(
    tmp_path, tiny_model_dir, second_model_dir, reward_model_dir, prompts_file, capsys
):
    from demoalign.cli import main

    out = tmp_path / "eval"
    small = [f"{k}={v}" for k, v in SMALL.items()]
    args = [
        "eval",
        f"models={tiny_model_dir},{second_model_dir}",
        f"reference={tiny_model_dir}",
        f"pairs={UF}",
        "max_pairs=5",
        "task=sort",
        "task_prompts=4",
        f"prompts={prompts_file}",
        f"reward_model={reward_model_dir}",
        f"baseline={tiny_model_dir}",
        f"output_dir={out}",
        *small,
    ]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in res["models"]]
    assert len(names) == 2 and res["baseline"] == names[0]
    expected = {
        "logp_gap",
        "pair_win_rate",
        "implicit_reward_accuracy",
        "task_exact_match_sampled",
        "task_exact_match_greedy",
        "reward_score",
        "win_rate_vs_baseline",
    }
    for entry in res["models"]:
        assert set(entry["metrics"]) == expected
        for metric, m in entry["metrics"].items():
            assert set(m) == {"value", "low", "high", "n"}
            assert m["low"] <= m["value"] + 1e-12 and m["value"] <= m["high"] + 1e-12, metric
        assert (
            entry["metrics"]["logp_gap"]["n"] == 5
            and entry["metrics"]["task_exact_match_greedy"]["n"] == 4
        )
    base, other = res["models"]
    assert base["metrics"]["implicit_reward_accuracy"]["value"] == 0.5
    assert base["metrics"]["win_rate_vs_baseline"]["value"] == 0.5
    # Paired differences to the baseline: the mean difference equals the difference of the means
    # (same items), every per-item metric is compared, and the baseline has none of its own.
    assert "vs_baseline" not in base
    assert set(other["vs_baseline"]) == expected - {"win_rate_vs_baseline"}
    for metric, d in other["vs_baseline"].items():
        gap = other["metrics"][metric]["value"] - base["metrics"][metric]["value"]
        assert d["value"] == pytest.approx(gap, abs=1e-9), metric
        assert d["n"] == other["metrics"][metric]["n"] and d["low"] <= d["value"] <= d["high"]
    report = (out / "report.md").read_text()
    assert "| model |" in report and names[1] in report and "![metrics.png](metrics.png)" in report
    assert f"## Paired differences to `{names[0]}`" in report
    assert (out / "metrics.png").stat().st_size > 1000
    gens = {
        n: [
            json.loads(line)
            for line in (out / "generations" / f"{n.replace('/', '__')}.jsonl").open()
        ]
        for n in names
    }
    assert all(len(g) == 4 and "reward" in g[0] for g in gens.values())
    assert "wrote" in capsys.readouterr().out
    # Same seed, same settings, another folder: the very same generations.
    again_args = [a for a in args if not a.startswith(("output_dir=", "task=", "pairs="))]
    assert main(again_args + [f"output_dir={tmp_path / 'again'}"]) == 0
    for n in names:
        name = f"{n.replace('/', '__')}.jsonl"
        first = [r["response"] for r in gens[n]]
        second = [
            json.loads(line)["response"]
            for line in (tmp_path / "again" / "generations" / name).open()
        ]
        assert first == second, n
    assert main(args) == 2  # results exist: refused without overwrite
    assert "overwrite=true" in capsys.readouterr().err

    # Rescore without regenerating: doctor the saved responses and see the scores follow them.
    path = out / "generations" / f"{names[1].replace('/', '__')}.jsonl"
    doctored = [{**r, "response": "a fixed answer"} for r in gens[names[1]]]
    path.write_text("".join(json.dumps(r) + "\n" for r in doctored))
    assert main(args + ["regenerate=false", "overwrite=true"]) == 0
    again = json.loads((out / "results.json").read_text())
    regen = [json.loads(line) for line in path.open()]
    assert [r["response"] for r in regen] == ["a fixed answer"] * 4
    assert [r["reward"] for r in regen] != [r["reward"] for r in gens[names[1]]]
    assert (
        again["models"][0]["metrics"]["reward_score"] == res["models"][0]["metrics"]["reward_score"]
    )
    assert again["models"][1]["metrics"]["logp_gap"] == res["models"][1]["metrics"]["logp_gap"]


def test_eval_on_hh_pairs_with_two_models(tmp_path, tiny_model_dir, second_model_dir):
    from demoalign.eval.evaluate import evaluate

    res = evaluate(
        models=f"{tiny_model_dir},{second_model_dir}",
        pairs=str(HH),
        max_pairs=6,
        template="hh",
        output_dir=str(tmp_path / "hh"),
        **SMALL,
    )
    gaps = [m["metrics"]["logp_gap"]["value"] for m in res["models"]]
    assert gaps[0] != gaps[1] and all(math.isfinite(g) for g in gaps)
    assert "implicit_reward_accuracy" not in res["models"][0]["metrics"]  # no reference given
    assert (tmp_path / "hh" / "report.md").exists() and (tmp_path / "hh" / "metrics.png").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(), "nothing to evaluate"),
        (dict(prompts="p.jsonl"), "needs reward_model"),
        (dict(pairs="x", reward_template="{prompt}"), "must contain {response}"),
        (dict(pairs="x", bogus=1), "unknown config key `bogus`"),
    ],
)
def test_bad_config(tiny_model_dir, overrides, message):
    from demoalign.eval.evaluate import evaluate

    with pytest.raises(ValueError, match=message):
        evaluate(models=str(tiny_model_dir), **overrides)


def test_bad_files(tmp_path, tiny_model_dir, reward_model_dir):
    from demoalign.data import DataError
    from demoalign.eval.evaluate import evaluate

    bad = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": "A"}])
    with pytest.raises(DataError, match="field 'rejected': missing"):
        evaluate(
            models=str(tiny_model_dir), pairs=str(bad), output_dir=str(tmp_path / "o1"), **SMALL
        )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty file"):
        evaluate(
            models=str(tiny_model_dir), pairs=str(empty), output_dir=str(tmp_path / "o2"), **SMALL
        )
    with pytest.raises(DataError, match="empty file"):
        evaluate(
            models=str(tiny_model_dir),
            prompts=str(empty),
            reward_model=str(reward_model_dir),
            output_dir=str(tmp_path / "o3"),
            **SMALL,
        )


# ---------------------------------------------------------------- lm-evaluation-harness bridge


def test_leaderboard_without_the_extra_names_the_install(monkeypatch, tmp_path, tiny_model_dir):
    import sys

    from demoalign.cli import main
    from demoalign.eval.leaderboard import MissingExtra, import_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"pip install 'demoalign\[eval\]'"):
        import_lm_eval()
    assert (
        main(
            ["eval", f"models={tiny_model_dir}", "leaderboard=all", f"output_dir={tmp_path / 'o'}"]
        )
        == 2
    )
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="unknown leaderboard task"):
        from demoalign.eval.evaluate import evaluate

        evaluate(models=str(tiny_model_dir), leaderboard="arc,mmlu")


def test_leaderboard_bridge_end_to_end(tmp_path, tiny_model_dir):
    pytest.importorskip(
        "lm_eval", reason="lm-evaluation-harness is not installed (pip install 'demoalign[eval]')"
    )
    from demoalign.eval.evaluate import evaluate

    res = evaluate(
        models=str(tiny_model_dir),
        leaderboard="all",
        leaderboard_limit=1,
        mmlu_shots=4,  # the default: the most the local dev split allows
        output_dir=str(tmp_path / "lb"),
        **{**SMALL, "bootstrap_resamples": 20},
    )
    metrics = res["models"][0]["metrics"]
    expected = {
        "arc_easy": ("acc_norm", 25),
        "arc_challenge": ("acc_norm", 25),
        "truthfulqa_mc2": ("acc", 0),
        "winogrande": ("acc", 5),
        "gsm8k": ("exact_match,strict-match", 5),
        "hellaswag": ("acc_norm", 10),
        "mmlu": ("acc", 4),
    }
    assert set(metrics) == set(expected)
    for task, (metric, shots) in expected.items():
        m = metrics[task]
        assert (m["metric"], m["num_fewshot"]) == (metric, shots)
        assert m["n"] == (
            57 if task == "mmlu" else 1
        )  # limit is per task; MMLU is 57 subject tasks
        assert 0.0 <= m["low"] <= m["value"] <= m["high"] <= 1.0
    assert (
        "lm-evaluation-harness arc_challenge: acc_norm, 25-shot"
        in (tmp_path / "lb" / "report.md").read_text()
    )


def test_mmlu_subjects_get_at_most_their_other_distinct_dev_questions_as_examples():
    """college_physics's dev split repeats a question: lm-eval leaves out both copies when one
    is asked, so 4 examples would be refused for that subject (it stopped `mmlu_shots=4`)."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed")
    from conftest import SHARED_DATA
    from demoalign.eval.leaderboard import task_configs

    configs = {c["task"]: c for c in task_configs("mmlu", SHARED_DATA, 4)}
    assert len(configs) == 57
    shots = {task: c["num_fewshot"] for task, c in configs.items()}
    assert shots.pop("mmlu_college_physics") == 3
    assert set(shots.values()) == {4}
    docs = configs["mmlu_college_physics"]["custom_dataset"]()["dev"]
    assert len(docs) == 4 and len(set(docs["question"])) == 4
