"""Multiple-choice scorers against lmms-eval 0.7.3's own task functions, item by item.

Each test scores the same model outputs with lmms-eval's functions (imported, fed the `doc`
dicts they expect) and with lavi_jax's evaluators, and requires the same per-item scores.
MMBench: `MMBench_Evaluator.eval_result` runs whole, with `eval_method="static"` (lmms-eval's
scoring without a GPT key, our default) and, for the kept "mmbench_can_infer" option, with
`eval_method="openai"` and only its GPT fallback (`extract_answer_from_item`, which calls the
OpenAI API) replaced by "no match".
"""

from __future__ import annotations

import json

import pytest

from lavi_jax.eval import scorers
from lavi_jax.eval.scorers import mc_lmms_eval

import lmms_eval.tasks.mmbench.mmbench_evals as mmbench_evals
import lmms_eval.tasks.mmbench.en_utils as en_utils
import lmms_eval.tasks.mmbench.cn_utils as cn_utils
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


@pytest.fixture
def static_mmbench(monkeypatch):
    """lmms-eval's evaluators as run by eval_method="static" (the GPT step must not be reached)."""
    def no_gpt(self, item):
        raise AssertionError("static MMBench reached the GPT step")
    monkeypatch.setattr(mmbench_evals.MMBench_Evaluator, "extract_answer_from_item", no_gpt)
    return {"mmbench": (en_utils, en_utils.mmbench_evaluator),
            "mmbench_cn": (cn_utils, cn_utils.mmbench_evaluator)}


CAN_INFER = "mmbench_can_infer"  # the kept option: can_infer alone, else no match


def mmb_doc(index, answer, options=OPTS, category="attr"):
    doc = {"index": index, "question": "What color is it?", "answer": answer, "hint": None,
           "source": "s", "split": "dev", "category": category, "L2-category": "p"}
    doc.update({c: (options[i] if i < len(options) else None) for i, c in enumerate("ABCD")})
    return doc


def mmb_row(doc):
    return {"index": doc["index"], "question": doc["question"], "answer": doc["answer"],
            "category": doc["category"], "l2-category": doc["L2-category"],
            **{c: doc[c] for c in "ABCD" if doc[c] is not None}}


def mmb_rotations(answer, options=OPTS, base=0):
    """A main question and its circular copies: options rotated, index + k * 1,000,000."""
    n = len(options)
    return [mmb_doc(base + k * 1_000_000, "ABCD"[("ABCD".index(answer) - k) % n],
                    options[k:] + options[:k]) for k in range(n)]


def mmb_static_ref(utils, evaluator, docs, outputs):
    recs = [utils.mmbench_process_results(d, [o])["gpt_eval_score"]
            for d, o in zip(docs, outputs)]
    return evaluator.eval_result(recs, eval_method="static")


def mmb_ours(name, docs, outputs, **kw):
    ev = scorers.get(name, **kw)
    samples = ev.load([mmb_row(d) for d in docs])
    return ev, ev.score(samples, {s["id"]: o for s, o in zip(samples, outputs)})


# -- the default: lmms-eval's static mode


@pytest.mark.parametrize("name", ["mmbench", "mmbench_cn"])
@pytest.mark.parametrize("output, answer", CASES, ids=IDS)
def test_mmbench_item_static(static_mmbench, name, output, answer):
    doc = mmb_doc(0, answer)
    ref, _, _ = mmb_static_ref(*static_mmbench[name], [doc], [output])
    ev, result = mmb_ours(name, [doc], [output])
    assert ev.convention == "lmms-eval 0.7.3 mmbench_static"
    assert float(result["per_sample"][0]["correct"]) == ref
    assert result["metrics"]["circular_accuracy"] == ref


@pytest.mark.parametrize("letter", list("ABCD"))
def test_mmbench_static_circular_stated_letters(static_mmbench, letter):
    # "The answer is A": can_infer refuses the lone "A" (a possible article); the static
    # fallback (extract_mcq_answer) reads it, so the whole group is right.
    docs = mmb_rotations(letter)
    outputs = [f"The answer is {d['answer']}" for d in docs]
    ref, _, _ = mmb_static_ref(*static_mmbench["mmbench"], docs, outputs)
    _, result = mmb_ours("mmbench", docs, outputs)
    assert ref == 1.0
    assert result["metrics"]["circular_accuracy"] == ref
    assert result["metrics"]["num_groups"] == 1
    _, old = mmb_ours("mmbench", docs, outputs, convention=CAN_INFER)
    assert old["metrics"]["circular_accuracy"] == 0.0


@pytest.mark.parametrize("outputs", [
    ["blue", "blue", "blue", "blue"],                    # option text only
    ["It is blue.", "blue", "Blue", "the blue one"],
    ["dark red", "The answer is A", "(C)", "blue"],      # wrong text in a copy
    ["B", "The answer is A", "I don't know.", "B"],      # one copy matches nothing
    ["I don't know.", "None", "", "???"],                # nothing readable anywhere
    ["B", "A", "D", "C"],
    ["The answer is A", "The answer is A", "The answer is A", "The answer is A"],
    ["A cat", "A", "A bird flies over a red roof", "C"],
])
def test_mmbench_static_circular_groups(static_mmbench, outputs):
    docs = mmb_rotations("B")
    for name in ("mmbench", "mmbench_cn"):
        ref, _, _ = mmb_static_ref(*static_mmbench[name], docs, outputs)
        _, result = mmb_ours(name, docs, outputs)
        assert result["metrics"]["circular_accuracy"] == ref, name


CN_OPTS = ["红色", "蓝色", "绿色", "深红色"]
CN_OUTPUTS = ["答案是B", "答案是 B", "答案为B。", "选B", "我选B", "B。", "答案：B", "（B）", "Ｂ", "蓝色",
              "是蓝色的", "蓝色。", "红色", "深红色", "答案是A", "选A", "A。", "我不知道", "都不是", "",
              "因为天空是蓝色的，所以选B", "B项", "选项B", "答案是蓝色"]


@pytest.mark.parametrize("answer", ["A", "B"])
@pytest.mark.parametrize("output", CN_OUTPUTS)
def test_mmbench_cn_static_chinese_answers(static_mmbench, output, answer):
    doc = mmb_doc(0, answer, options=CN_OPTS)
    doc["question"] = "它是什么颜色？"
    ref, _, _ = mmb_static_ref(*static_mmbench["mmbench_cn"], [doc], [output])
    ev, result = mmb_ours("mmbench_cn", [doc], [output])
    assert ev.convention == "lmms-eval 0.7.3 mmbench_static"
    assert float(result["per_sample"][0]["correct"]) == ref


def test_mmbench_cn_static_circular_chinese(static_mmbench):
    docs = mmb_rotations("B", options=CN_OPTS)
    for outputs in (["答案是B", "答案是A", "选D", "答案为C"], ["蓝色"] * 4,
                    ["答案是B", "答案是A", "我不知道", "答案为C"]):
        ref, _, _ = mmb_static_ref(*static_mmbench["mmbench_cn"], docs, outputs)
        _, result = mmb_ours("mmbench_cn", docs, outputs)
        assert result["metrics"]["circular_accuracy"] == ref


@pytest.mark.parametrize("output", ["C", "c", "(C)", "green", "It is green", "C. green",
                                    "The answer is C", "The answer is D", "D", "I pick D"])
def test_mmbench_static_three_options(static_mmbench, output):
    # the fallback reads only the letters of the options (A-C here)
    doc = mmb_doc(3, "C", options=["red", "blue", "green"])
    ref, _, _ = mmb_static_ref(*static_mmbench["mmbench"], [doc], [output])
    _, result = mmb_ours("mmbench", [doc], [output])
    assert float(result["per_sample"][0]["correct"]) == ref


# -- the kept option: can_infer alone ("openai" with the GPT step answering no match)


@pytest.mark.parametrize("output, answer", CASES, ids=IDS)
def test_mmbench_item_can_infer(offline_mmbench, output, answer):
    doc = mmb_doc(0, answer)
    rec = en_utils.mmbench_process_results(doc, [output])["gpt_eval_score"]
    ref, _, _ = offline_mmbench.eval_result([rec], eval_method="openai")
    ev, result = ours("mmbench", [mmb_row(doc)], output, convention=CAN_INFER)
    assert ev.convention == "lmms-eval 0.7.3 mmbench_can_infer"
    assert float(result["per_sample"][0]["correct"]) == ref
    assert result["metrics"]["circular_accuracy"] == ref


@pytest.mark.parametrize("output", ["C", "c", "(C)", "green", "It is green", "C. green"])
def test_mmbench_three_options_can_infer(offline_mmbench, output):
    doc = mmb_doc(3, "C", options=["red", "blue", "green"])
    rec = en_utils.mmbench_process_results(doc, [output])["gpt_eval_score"]
    ref, _, _ = offline_mmbench.eval_result([rec], eval_method="openai")
    _, result = ours("mmbench", [mmb_row(doc)], output, convention=CAN_INFER)
    assert float(result["per_sample"][0]["correct"]) == ref


CIRCULAR_DOCS = [mmb_doc(0, "B"), mmb_doc(1_000_000, "A", OPTS[1:] + OPTS[:1]),
                 mmb_doc(2_000_000, "D", OPTS[2:] + OPTS[:2]),
                 mmb_doc(1, "C", category="obj"),
                 mmb_doc(1_000_001, "B", OPTS[1:] + OPTS[:1], "obj"),
                 mmb_doc(2, "A", category="obj"),
                 mmb_doc(1_000_002, "D", OPTS[1:] + OPTS[:1], "obj"),
                 mmb_doc(1_000_007, "A")]
CIRCULAR_OUTPUTS = ["B", "The answer is A", "blue", "green", "(B)", "A dog sat on it",
                    "dark red", "A"]


@pytest.mark.parametrize("method", ["static", "openai"])
def test_mmbench_circular(offline_mmbench, method):
    # question 0 and its copies 1000000, 2000000; question 1 and one copy; an orphan copy.
    # (The offline fixture's stand-in GPT step is never reached by "static".)
    recs = [en_utils.mmbench_process_results(d, [o])["gpt_eval_score"]
            for d, o in zip(CIRCULAR_DOCS, CIRCULAR_OUTPUTS)]
    overall, by_cat, by_l2 = offline_mmbench.eval_result(recs, eval_method=method)
    kw = {} if method == "static" else {"convention": CAN_INFER}
    _, result = mmb_ours("mmbench", CIRCULAR_DOCS, CIRCULAR_OUTPUTS, **kw)
    m = result["metrics"]
    assert m["circular_accuracy"] == pytest.approx(overall)
    assert m["circular_by_category"] == pytest.approx(by_cat)
    assert m["circular_by_l2_category"] == pytest.approx(by_l2)
    assert m["num_groups"] == 3
    assert [s["id"] for s in m["skipped"]] == ["1000007"]


def test_mmbench_conventions_named():
    for name in ("mmbench", "mmbench_cn"):
        assert scorers.get(name).convention == "lmms-eval 0.7.3 mmbench_static"
        for alias in ("mmbench", "lmms-eval 0.7.3 mmbench", "mmbench_static"):
            assert scorers.get(name, convention=alias).convention == \
                "lmms-eval 0.7.3 mmbench_static"
        for old in (CAN_INFER, "lmms-eval 0.7.3 " + CAN_INFER):
            assert scorers.get(name, convention=old).convention == \
                "lmms-eval 0.7.3 mmbench_can_infer"


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
