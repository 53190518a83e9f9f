"""Multiple-choice scorers against lmms-eval 0.7.3's own task functions, item by item.

Each test scores the same model outputs with lmms-eval's functions (imported, fed the `doc`
dicts they expect) and with lavi_jax's evaluators, and requires the same per-item scores.
MMBench: `MMBench_Evaluator.eval_result` runs whole, with only its GPT fallback
(`extract_answer_from_item`, which calls the OpenAI API) replaced by "no match".
"""

from __future__ import annotations

import json

import pytest

from lavi_jax.eval import scorers
from lavi_jax.eval.scorers import mc_lmms_eval

import lmms_eval.tasks.mmbench.mmbench_evals as mmbench_evals
import lmms_eval.tasks.mmbench.en_utils as en_utils
import lmms_eval.tasks.seedbench.utils as seed_ref
import lmms_eval.tasks.scienceqa.utils as sqa_ref
import lmms_eval.tasks.mvbench.utils as mv_ref
import lmms_eval.tasks.videomme.utils as vm_ref
import lmms_eval.tasks._task_utils.mcq_extract as mcq_ref

OPTS = ["red", "blue", "green", "dark red"]

OUTPUTS = [
    # bare letters, wrapped letters, punctuation
    "B", "A", "C", "D", "E", "(B)", "(A)", "B.", "A.", "B)", "B:", "[B]", "'B'", '"B"', "**B**",
    "B!", "B?", "B.5", " B ", "B\n",
    # lower-case letters
    "b", "a", "b.", "(b)", "b. blue",
    # stated answers
    "The answer is B", "The answer is B.", "The answer is (B).", "Answer: B", "answer: b",
    "Option B", "I choose B", "It's B", "The correct option is (A).", "B. blue", "B blue",
    "A. red", "B\nThe sky is blue.", "The sky is blue, so B.",
    # option text instead of a letter
    "blue", "Blue.", "It is blue.", "red", "dark red", "There is a red car and a blue car",
    # the article "A", sentences
    "A dog is sitting on the bench.", "A cat", "A bird flies over a red roof",
    "I don't know.", "None of the above", "Because", "Both", "B's",
    # empty answers
    "", "   ", "\n",
    # multi-letter outputs
    "B, C", "B or C", "B and C", "BC", "AB", "ABCD", "B\nC", "A/B", "(A) or (B)", "1,000 B",
    "x-ray B",
    # unicode
    "Ｂ", "答案是B", "选B", "B。", "Bé", "é", "😀 B", "B 😀", "Ｂ．blue",
    "Failed to obtain answer via API",
    # formats of video models
    "(B) blue", "B - blue", "Answer: (B) blue.", "Best option:(B)", "a. red", "e", "E. none",
    "." * 40 + " B", "B" + "." * 40,
]
CASES = [(out, ans) for ans in ("A", "B") for out in OUTPUTS]
IDS = [f"{ans}-{i}" for ans in ("A", "B") for i in range(len(OUTPUTS))]


def ours(name, records, output, **kw):
    ev = scorers.get(name, **kw)
    samples = ev.load(records)
    result = ev.score(samples, {s["id"]: output for s in samples})
    return ev, result


# ============================================================================ MMBench


@pytest.fixture
def offline_mmbench(monkeypatch):
    """lmms-eval's evaluator with its GPT fallback answering "no match" instead of the API."""
    monkeypatch.setattr(mmbench_evals.MMBench_Evaluator, "extract_answer_from_item",
                        lambda self, item: (False, "no GPT offline"))
    return en_utils.mmbench_evaluator


def mmb_doc(index, answer, options=OPTS, category="attr"):
    doc = {"index": index, "question": "What color is it?", "answer": answer, "hint": None,
           "source": "s", "split": "dev", "category": category, "L2-category": "p"}
    doc.update({c: (options[i] if i < len(options) else None) for i, c in enumerate("ABCD")})
    return doc


def mmb_row(doc):
    return {"index": doc["index"], "question": doc["question"], "answer": doc["answer"],
            "category": doc["category"], "l2-category": doc["L2-category"],
            **{c: doc[c] for c in "ABCD" if doc[c] is not None}}


@pytest.mark.parametrize("output, answer", CASES, ids=IDS)
def test_mmbench_item(offline_mmbench, output, answer):
    doc = mmb_doc(0, answer)
    rec = en_utils.mmbench_process_results(doc, [output])["gpt_eval_score"]
    ref, _, _ = offline_mmbench.eval_result([rec], eval_method="openai")
    ev, result = ours("mmbench", [mmb_row(doc)], output)
    assert ev.convention == "lmms-eval 0.7.3 mmbench"
    assert float(result["per_sample"][0]["correct"]) == ref
    assert result["metrics"]["circular_accuracy"] == ref


@pytest.mark.parametrize("output", ["C", "c", "(C)", "green", "It is green", "C. green"])
def test_mmbench_three_options(offline_mmbench, output):
    doc = mmb_doc(3, "C", options=["red", "blue", "green"])
    rec = en_utils.mmbench_process_results(doc, [output])["gpt_eval_score"]
    ref, _, _ = offline_mmbench.eval_result([rec], eval_method="openai")
    _, result = ours("mmbench", [mmb_row(doc)], output)
    assert float(result["per_sample"][0]["correct"]) == ref


def test_mmbench_circular(offline_mmbench):
    # question 0 and its copies 1000000, 2000000; question 1 and one copy; an orphan copy.
    docs = [mmb_doc(0, "B"), mmb_doc(1_000_000, "A", OPTS[1:] + OPTS[:1]),
            mmb_doc(2_000_000, "D", OPTS[2:] + OPTS[:2]),
            mmb_doc(1, "C", category="obj"), mmb_doc(1_000_001, "B", OPTS[1:] + OPTS[:1], "obj"),
            mmb_doc(2, "A", category="obj"), mmb_doc(1_000_002, "D", OPTS[1:] + OPTS[:1], "obj"),
            mmb_doc(1_000_007, "A")]
    outputs = ["B", "The answer is A", "blue", "green", "(B)", "A dog sat on it", "dark red", "A"]
    recs = [en_utils.mmbench_process_results(d, [o])["gpt_eval_score"]
            for d, o in zip(docs, outputs)]
    overall, by_cat, by_l2 = offline_mmbench.eval_result(recs, eval_method="openai")
    ev = scorers.get("mmbench")
    samples = ev.load([mmb_row(d) for d in docs])
    result = ev.score(samples, {s["id"]: o for s, o in zip(samples, outputs)})
    m = result["metrics"]
    assert m["circular_accuracy"] == pytest.approx(overall)
    assert m["circular_by_category"] == pytest.approx(by_cat)
    assert m["circular_by_l2_category"] == pytest.approx(by_l2)
    assert m["num_groups"] == 3
    assert [s["id"] for s in m["skipped"]] == ["1000007"]


# ============================================================================ SEED-Bench


@pytest.mark.parametrize("output, answer", CASES, ids=IDS)
def test_seed_bench_item(output, answer):
    doc = {"question_id": "q1", "question": "What color is it?", "answer": answer,
           "data_type": "image", **{f"choice_{c}": o for c, o in zip("abcd", OPTS)}}
    res = seed_ref.seed_process_result(doc, [output])
    ref = seed_ref.seed_aggregation_result([res["seed_image"]])
    ev, result = ours("seed_bench", [doc], output)
    assert ev.convention == "lmms-eval 0.7.3 seed_bench"
    assert float(result["per_sample"][0]["correct"]) == ref
    assert result["metrics"]["by_data_type"] == {"image": ref}


# ============================================================================ ScienceQA-IMG


@pytest.mark.parametrize("output, answer", CASES, ids=IDS)
def test_scienceqa_item(output, answer):
    doc = {"question": "What color is it?", "choices": OPTS, "answer": "AB".index(answer),
           "hint": "Look.", "image": None}
    ref = sqa_ref.sqa_process_results(doc, [output])["exact_match"]
    problems = {"7": {**doc, "image": "image.png", "split": "test"}}
    ev, result = ours("scienceqa_img", problems, output)
    assert ev.convention == "lmms-eval 0.7.3 scienceqa"
    assert float(result["per_sample"][0]["correct"]) == ref


# ============================================================================ MVBench


def mv_doc(answer):
    return {"video": "v.mp4", "question": "What color is it?", "candidates": OPTS,
            "answer": OPTS["AB".index(answer)]}


@pytest.mark.parametrize("output, answer", CASES, ids=IDS)
def test_mvbench_item(tmp_path, output, answer):
    doc = mv_doc(answer)
    ref = mv_ref.mvbench_process_results(doc, [output])["mvbench_accuracy"]
    path = tmp_path / "action_sequence.json"
    path.write_text(json.dumps([doc]))
    ev, result = ours("mvbench", str(path), output)
    assert ev.convention == "lmms-eval 0.7.3 mvbench"
    assert float(result["per_sample"][0]["correct"]) == ref["score"]
    assert result["metrics"]["accuracy"] * 100 == mv_ref.mvbench_aggregate_results([ref])


def test_mvbench_accuracy_leaves_out_empty_outputs(tmp_path):
    docs = [mv_doc("B")] * 4
    outputs = ["B", "", "C", "b"]
    refs = [mv_ref.mvbench_process_results(d, [o])["mvbench_accuracy"]
            for d, o in zip(docs, outputs)]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(docs))
    ev = scorers.get("mvbench")
    samples = ev.load(str(path))
    m = ev.score(samples, {s["id"]: o for s, o in zip(samples, outputs)})["metrics"]
    assert m["accuracy"] * 100 == pytest.approx(mv_ref.mvbench_aggregate_results(refs))
    assert m["num_empty_uncounted"] == 1


# ============================================================================ Video-MME


def vm_doc(answer, qid="001-1"):
    return {"video_id": "001", "videoID": "abc", "question_id": qid, "duration": "short",
            "domain": "Knowledge", "sub_category": "Humanity & History",
            "task_type": "Counting Problem", "question": "What color is it?",
            "options": [f"{c}. {o}" for c, o in zip("ABCD", OPTS)], "answer": answer}


@pytest.mark.parametrize("output, answer", CASES, ids=IDS)
def test_videomme_item(output, answer):
    doc = vm_doc(answer)
    ref = vm_ref.videomme_process_results(doc, [output])["videomme_perception_score"]
    ev, result = ours("videomme", [doc], output)
    assert ev.convention == "lmms-eval 0.7.3 videomme"
    assert float(result["per_sample"][0]["correct"]) == ref["score"]
    assert result["metrics"]["accuracy"] * 100 == vm_ref.videomme_aggregate_results([ref])


# ============================================================================ generic


@pytest.mark.parametrize("output, answer", CASES, ids=IDS)
def test_multiple_choice_generic_item(output, answer):
    ref = mcq_ref.extract_mcq_answer(output, choices=list("ABCD"))
    assert (mc_lmms_eval.mcq_extract(output, "ABCD")) == ref
    rec = {"question_id": 1, "question": "Q?", "options": OPTS, "answer": answer}
    ev, result = ours("multiple_choice", [rec], output)
    assert ev.convention == "lmms-eval 0.7.3 mcq_extract"
    assert result["per_sample"][0]["correct"] == (ref == answer)


# ============================================================================ options, bad input


def test_lenient_is_an_option_only():
    rec = {"question_id": 1, "question": "Q?", "options": OPTS, "answer": "B"}
    for name in ("mmbench", "seed_bench", "videomme", "multiple_choice"):
        assert scorers.get(name).convention.startswith("lmms-eval 0.7.3 ")
        assert scorers.get(name, convention="lenient").convention == "lenient"
    ev = scorers.get("multiple_choice", convention="lenient")
    samples = ev.load([rec])
    assert ev.score(samples, {"1": "It is blue."})["per_sample"][0]["correct"]
    strict = scorers.get("multiple_choice")
    assert not strict.score(samples, {"1": "It is blue."})["per_sample"][0]["correct"]
    assert scorers.get("mvbench", convention="lmms-eval 0.7.3 videomme").rule == "videomme"
    with pytest.raises(ValueError):
        scorers.get("mmbench", convention="vlmevalkit")


def test_multiple_choice_bad_input_reported_by_id(tmp_path):
    ev = scorers.get("multiple_choice")
    samples = ev.load([{"question_id": 1, "question": "Q?", "options": OPTS, "answer": "B"},
                       {"question_id": 1, "question": "Q?", "options": OPTS, "answer": "A"},
                       {"question_id": 2, "question": "Q?", "options": OPTS}])
    result = ev.score(samples, {"1": "B", "2": "A"})
    assert result["metrics"]["accuracy"] == 1.0 and result["metrics"]["num_samples"] == 1
    reasons = {s["id"]: s["reason"] for s in result["metrics"]["skipped"]}
    assert set(reasons) == {"1", "2"} and "duplicate" in reasons["1"]
    assert "no answer" in reasons["2"]

    path = tmp_path / "t.json"
    path.write_text(json.dumps([{**mv_doc("B"), "answer": "purple"}]))
    mv = scorers.get("mvbench")
    m = mv.score(mv.load(str(path)), {"t/0": "B"})["metrics"]
    assert m["num_samples"] == 0 and m["skipped"][0]["id"] == "t/0"

    mmb = scorers.get("mmbench")
    rows = [{"question": "Q?", "A": "x", "B": "y", "answer": "A"},
            {"index": 4, "A": "x", "B": "y", "answer": "A"}]
    assert mmb.load(rows) == []
    assert [s["id"] for s in mmb.skipped] == ["row 0", "4"]
