"""VQAv2 / TextVQA / GQA scores, item by item, against lmms-eval 0.7.3's own scoring code.

The reference side always runs lmms-eval: `ConfigurableTask.process_results` (unbound, on a stub
task holding only the attributes it reads), so the harness's stripping of the model output is
the reference's too. It dispatches to `vqav2_process_results` / `textvqa_process_results`, or,
for GQA (no process_results of its own), to the registered `exact_match` metric with the
keyword arguments read from lmms-eval's `gqa.yaml`. Building a real task would download the
dataset, hence the stub. LLaVA's GQA script is not importable; its cases are worked out by hand.
"""

import copy
import json
import os
import types

import pytest

import lmms_eval.api.task as lmms_task
import lmms_eval.api.metrics  # noqa: E402,F401  (registers the metrics)
import yaml  # noqa: E402
from lmms_eval.api.registry import get_metric  # noqa: E402
from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor  # noqa: E402
from lmms_eval.tasks.textvqa.utils import textvqa_process_results  # noqa: E402
from lmms_eval.tasks.vqav2.utils import vqav2_process_results  # noqa: E402

from lavi_jax.eval import scorers  # noqa: E402
from lavi_jax.eval.scorers import vqa, vqa_normalize  # noqa: E402


def _stub(**attrs):
    return types.SimpleNamespace(OUTPUT_TYPE="generate_until", **attrs)


def _reference(stub, doc, prediction):
    return lmms_task.ConfigurableTask.process_results(stub, copy.deepcopy(doc), [prediction])


def _gqa_metric_kwargs():
    path = os.path.join(os.path.dirname(lmms_task.__file__), "..", "tasks", "gqa", "gqa.yaml")
    loader = type("L", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda ld, node: None)
    with open(path) as f:
        (entry,) = [m for m in yaml.load(f, loader)["metric_list"] if m["metric"] == "exact_match"]
    return {k: v for k, v in entry.items() if k not in ("metric", "aggregation", "higher_is_better")}


VQAV2_TASK = _stub(config=types.SimpleNamespace(process_results=vqav2_process_results))
TEXTVQA_TASK = _stub(config=types.SimpleNamespace(process_results=textvqa_process_results))
GQA_TASK = _stub(config=types.SimpleNamespace(process_results=None, doc_to_choice=None),
                 doc_to_target=lambda doc: doc["answer"], multiple_target=False,
                 _metric_fn_list={"exact_match": get_metric("exact_match")},
                 _metric_fn_kwargs={"exact_match": _gqa_metric_kwargs()})


def _ours(name, answers, prediction, **options):
    ev = scorers.get(name, **options)
    sample = {"id": "q", "answers": answers, "metadata": {}}
    (row,) = ev.score([sample], {"q": prediction})["per_sample"]
    return row["score"]


def _ten(*groups):
    """Ten human answers from (answer, count) pairs."""
    out = [a for a, n in groups for _ in range(n)]
    assert len(out) == 10
    return out


# (prediction, ten human answers): the kinds of outputs models write.
VQAV2_CASES = [
    ("yes", _ten(("yes", 10))),
    ("Yes", _ten(("yes", 10))),
    ("Yes.", _ten(("yes", 10))),
    ("  yes\n", _ten(("yes", 10))),
    ("No, it is not.", _ten(("no", 10))),
    ("no", _ten(("no", 9), ("yes", 1))),
    ("cat", _ten(("cat", 2), ("dog", 8))),
    ("Cat.", _ten(("cat", 3), ("dog", 7))),
    ("dog", _ten(("cat", 6), ("dog", 4))),
    ("two", _ten(("2", 9), ("two", 1))),
    ("Two", _ten(("2", 5), ("3", 5))),
    ("2", _ten(("two", 2), ("2", 1), ("3", 7))),
    ("none", _ten(("0", 4), ("none", 6))),
    ("ten", _ten(("10", 10))),
    ("1,000", _ten(("1000", 10))),
    ("3.5", _ten(("3.5", 7), ("3", 3))),
    ("The dog", _ten(("dog", 10))),
    ("a red apple", _ten(("red apple", 3), ("apple", 7))),
    ("an orange", _ten(("orange", 10))),
    ("dont know", _ten(("don't know", 4), ("unknown", 6))),
    ("isnt", _ten(("isn't", 10))),
    ("I'm not sure", _ten(("im not sure", 10))),
    ("he's", _ten(("hes", 10))),
    ("black-and-white", _ten(("black and white", 10))),
    ("black and white", _ten(("black-and-white", 5), ("black & white", 5))),
    ("London, England", _ten(("london, england", 5), ("london", 5))),
    ("london,england", _ten(("london, england", 10))),
    ("new york city", _ten(("nyc", 2), ("new york city", 8))),
    ("The man is riding a skateboard.", _ten(("skateboarding", 6), ("riding skateboard", 4))),
    ("There are two dogs in the picture.", _ten(("2", 10))),
    ("", _ten(("yes", 10))),
    ("", _ten(("", 1), ("yes", 9))),
    ("u.s.a.", _ten(("usa", 10))),
    ("what?!", _ten(("what", 10))),
    ("(red)", _ten(("red", 10))),
    ("café", _ten(("cafe", 5), ("café", 5))),
    ("Ｔｗｏ", _ten(("2", 10))),
    ("\u00a0yes\u00a0", _ten(("yes", 10))),
    ("東京", _ten(("東京", 3), ("tokyo", 7))),
    ("12:30", _ten(("12:30", 6), ("1230", 4))),
    ("man's hat", _ten(("man's hat", 5), ("mans hat", 5))),
    ("." * 40 + "x", _ten(("x", 10))),
]

TEXTVQA_CASES = [
    ("nike", _ten(("nike", 4), ("nike shoes", 6))),
    ("Nike", _ten(("nike", 10))),
    ("NIKE.", _ten(("nike", 10))),
    ("23", _ten(("23", 1), ("28", 9))),
    ("twenty three", _ten(("23", 10))),
    ("two", _ten(("2", 3), ("two", 7))),
    ("london,england", _ten(("london, england", 10))),
    ("london, england", _ten(("london,england", 10))),
    ("london, england", _ten(("london, england", 10))),
    ("London England", _ten(("london, england", 10))),
    ("What?", _ten(("what", 10))),
    ("coca-cola", _ten(("coca cola", 5), ("coca-cola", 5))),
    ("coca cola", _ten(("coca-cola", 10))),
    ("McDonald's", _ten(("mcdonald's", 6), ("mcdonalds", 4))),
    ("mcdonalds", _ten(("mcdonald's", 10))),
    ("It's 5 o'clock", _ten(("5 o'clock", 10))),
    ("The answer is STOP.", _ten(("stop", 10))),
    ("stop", _ten(("STOP", 10))),
    ("1,000", _ten(("1000", 5), ("1,000", 5))),
    ("$1,000", _ten(("$1000", 10))),
    ("3.14", _ten(("3.14", 10))),
    ("a", _ten(("a", 10))),
    ("the beatles", _ten(("beatles", 10))),
    ("", _ten(("unanswerable", 10))),
    ("", _ten(("", 2), ("unanswerable", 8))),
    ("unanswerable", _ten(("unanswerable", 3), ("answering does not require reading text", 7))),
    ("dont", _ten(("don't", 10))),
    ("wont", _ten(("won't", 10))),
    ("www.google.com", _ten(("www.google.com", 5), ("google", 5))),
    ("e-mail", _ten(("email", 5), ("e mail", 5))),
    ("Ｎｉｋｅ", _ten(("nike", 10))),
    ("straße", _ten(("strasse", 4), ("straße", 6))),
    ("\ttoyota\n", _ten(("toyota", 10))),
    ("Yes, it is.", _ten(("yes", 10))),
    ("one way", _ten(("1 way", 10))),
]

# (prediction, GQA answer).
GQA_CASES = [
    ("yes", "yes"), ("Yes", "yes"), ("Yes.", "yes"), ("YES!", "yes"), (" yes ", "yes"),
    ("no", "yes"), ("No, it is not.", "no"), ("left", "left"), ("Left.", "left"),
    ("on the left", "left"), ("cat", "cat"), ("The cat", "cat"), ("cats", "cat"),
    ("t-shirt", "t-shirt"), ("tshirt", "t-shirt"), ("t shirt", "t-shirt"),
    ("black and white", "black and white"), ("white", "black and white"),
    ("two", "2"), ("2", "2"), ("", "yes"), ("", ""), ("man's", "man"), ("mans", "man's"),
    ("table.", "table"), ("table...", "table"), ("wooden", "wood"), ("blue\n", "blue"),
    ("The man is wearing a hat.", "hat"), ("café", "café"), ("CAFÉ", "café"),
    ("İstanbul", "istanbul"), ("İ", "i"), ("ﬁsh", "fish"), ("\u00a0dog", "dog"),
    ("giraffe", "giraffe "), ("yes\x00", "yes"),
]


@pytest.mark.parametrize("prediction, answers", VQAV2_CASES)
def test_vqav2_matches_lmms_eval(prediction, answers):
    doc = {"question_id": 1, "answers": [{"answer": a, "answer_confidence": "yes",
                                          "answer_id": i + 1} for i, a in enumerate(answers)]}
    expected = _reference(VQAV2_TASK, doc, prediction)["exact_match"]
    assert _ours("vqav2", answers, prediction) == expected
    assert _ours("vqa", answers, prediction) == expected


@pytest.mark.parametrize("prediction, answers", TEXTVQA_CASES)
def test_textvqa_matches_lmms_eval(prediction, answers):
    doc = {"question_id": 1, "answers": list(answers)}
    expected = _reference(TEXTVQA_TASK, doc, prediction)["exact_match"]
    assert _ours("textvqa", answers, prediction) == expected


@pytest.mark.parametrize("prediction, answer", GQA_CASES)
def test_gqa_matches_lmms_eval(prediction, answer):
    expected = _reference(GQA_TASK, {"answer": answer}, prediction)["exact_match"]
    assert _ours("gqa", [answer], prediction, metric="exact_match") == expected


@pytest.mark.parametrize("text", sorted({p for p, _ in VQAV2_CASES + TEXTVQA_CASES}
                                        | {a for _, ans in VQAV2_CASES + TEXTVQA_CASES
                                           for a in ans}))
def test_processors_match_lmms_eval(text):
    ref = EvalAIAnswerProcessor()
    assert vqa_normalize.evalai_answer(text) == ref(text)
    stripped = text.replace("\n", " ").replace("\t", " ").strip()
    assert vqa_normalize.normalize_answer(text) == \
        ref.process_digit_article(ref.process_punctuation(stripped))


def test_tables_are_lmms_evals():
    assert vqa_normalize.CONTRACTIONS == EvalAIAnswerProcessor.CONTRACTIONS
    assert list(vqa_normalize.PUNCTUATION) == EvalAIAnswerProcessor.PUNCTUATIONS
    assert set(vqa_normalize.ARTICLES) == set(EvalAIAnswerProcessor.ARTICLES)
    for word, digit in vqa_normalize.NUMBER_WORDS.items():
        assert EvalAIAnswerProcessor.NUMBER_MAP[word] == digit


@pytest.mark.parametrize("prediction, answer, expected", [
    # LLaVA convert_gqa_for_eval.py: text.rstrip('.').lower(), then prediction == answer.
    ("Yes.", "yes", 1.0),
    ("Left...", "left", 1.0),
    ("YES!", "yes", 0.0),        # "!" kept; lmms-eval would match
    (" yes", "yes", 0.0),        # no strip; lmms-eval would match
    ("tshirt", "t-shirt", 0.0),  # lmms-eval would match
    ("The cat", "cat", 0.0),
    ("yes", "yes", 1.0),
    ("No", "no", 1.0),
    ("NO.", "no", 1.0),
    ("no.", "yes", 0.0),
    ("White.", "white", 1.0),
    ("white car", "white", 0.0),
    ("Cat.\n", "cat", 0.0),      # the trailing newline stops rstrip('.')
    ("left.", "left", 1.0),
    ("Left side", "left", 0.0),
    ("t-shirt.", "t-shirt", 1.0),
    ("T-Shirt", "t-shirt", 1.0),
    ("2", "2", 1.0),
    ("two", "2", 0.0),
    ("", "yes", 0.0),
    (".", "", 1.0),               # rstrip leaves "", equal to an empty answer
    ("Ünïcode.", "ünïcode", 1.0),
    ("İ", "i̇", 1.0),             # str.lower() of U+0130 is "i" + U+0307
    ("yes, it is.", "yes", 0.0),
    ("on the table.", "on the table", 1.0),
    ("ON THE TABLE", "on the table", 1.0),
])
def test_llava_gqa_default(prediction, answer, expected):
    """GQA's default is LLaVA's scoring: scripts/convert_gqa_for_eval.py (haotian-liu/LLaVA) writes
    ``res['text'].rstrip('.').lower()`` and GQA's eval.py counts ``prediction == answer``."""
    assert _ours("gqa", [answer], prediction) == expected


@pytest.mark.parametrize("prediction, answer, expected", [("Yes.", "yes", 1.0), ("YES!", "yes", 0.0)])
def test_llava_gqa_option(prediction, answer, expected):
    assert _ours("gqa", [answer], prediction, metric="llava_gqa") == expected


def test_conventions():
    assert scorers.get("vqav2").convention == "lmms-eval 0.7.3 vqav2"
    assert scorers.get("vqa").convention == "lmms-eval 0.7.3 vqav2"
    assert scorers.get("textvqa").convention == "lmms-eval 0.7.3 textvqa"
    assert scorers.get("gqa").convention == "LLaVA convert_gqa_for_eval.py"
    assert scorers.get("gqa", metric="exact_match").convention == "lmms-eval 0.7.3 gqa"
    for metric in ("exact", "normalized"):
        assert scorers.get("textvqa", metric=metric).convention == "lenient"
    assert set(vqa.CONVENTIONS) >= {"vqa_soft", "evalai_soft", "exact_match", "llava_gqa"}


def test_bad_questions_are_reported_by_id_and_the_rest_scored(tmp_path):
    """Missing text, missing answers, a repeated id and an unknown answer type: reported by id, never a crash."""
    questions = tmp_path / "q.jsonl"
    rows = [{"question_id": "1", "image": "a.jpg", "text": "What colour?", "answers": ["red"] * 10,
             "answer_type": "other"},
            {"question_id": "2", "image": "b.jpg", "text": "", "answers": ["blue"] * 10},
            {"question_id": "3", "image": "c.jpg", "text": "How many?"},
            {"question_id": "1", "image": "d.jpg", "text": "Again?", "answers": ["x"] * 10},
            {"question_id": "4", "image": "e.jpg", "text": "Is it?", "answers": ["yes"] * 10,
             "answer_type": "binary"}]
    questions.write_text("\n".join(json.dumps(r) for r in rows))
    ev = scorers.get("vqav2")
    samples = ev.load(str(questions))
    assert [s["id"] for s in samples] == ["1", "4"]
    m = ev.score(samples, {"1": "Red.", "4": "no"})["metrics"]
    assert {(x["id"], x["reason"]) for x in m["skipped"]} == {
        ("2", "no question text"), ("3", "no ground-truth answers"), ("1", "duplicate id (the first is scored)")}
    assert m["num_skipped"] == 3 and "4" in m["input_notes"] and m["accuracy"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="annotations.json"):
        (tmp_path / "annotations.json").write_text(json.dumps({"annotations": [{"answers": []}]}))
        ev.load(str(questions), str(tmp_path / "annotations.json"))
