"""POPE and MME scorers against their references, item by item.

POPE's reference is LLaVA's `llava/eval/eval_pope.py` (haotian-liu/LLaVA), which is not installable.
Its rules, as that file states them in `eval_pope`:
  1. "Only keep the first sentence": if the text contains ".", keep `text.split('.')[0]`;
  2. `text.replace(',', '')`, then `words = text.split(' ')` (single spaces only);
  3. if 'No' in words or 'not' in words or 'no' in words: the answer is "no", else "yes";
  4. positive class "yes"; yes_ratio = share of "yes" predictions; precision TP/(TP+FP), recall
     TP/(TP+FN), F1 2PR/(P+R), accuracy (TP+TN)/N.
`POPE_CASES` hold the reading of each answer worked out by hand from those rules. They are also
scored with lmms-eval 0.7.3's `pope/utils.py` (exact match of the lower-cased, stripped answer):
the cases marked as agreeing must get identical per-item scores there, the others must differ.

MME's reference is lmms-eval 0.7.3's `mme/utils.py`, imported and run on the same outputs.
"""

import json
import random

import pytest

from lavi_jax.eval import scorers
from lavi_jax.eval.scorers import mme as mme_scorer
from lavi_jax.eval.scorers import pope as pope_scorer

import lmms_eval.tasks.pope.utils as lmms_pope
import lmms_eval.tasks.mme.utils as lmms_mme

# (answer, eval_pope.py's reading, lmms-eval gives the same per-item scores for both labels)
POPE_CASES = [
    ("Yes", "yes", True),
    ("yes", "yes", True),
    ("No", "no", True),
    ("no", "no", True),
    (" no", "no", True),                      # words ['', 'no']
    ("No.", "no", False),                     # lmms-eval: "no." is neither label
    ("yes.", "yes", False),
    ("no.", "no", False),
    ("NO", "yes", False),                     # capitals: only "No"/"no"/"not" count
    ("Not", "yes", False),
    ("It is NOT a dog", "yes", False),
    ("not sure", "no", False),
    ("Yes, but it is not red.", "no", False),  # comma dropped, "not" in the first sentence
    ("Yes, there is a dog.", "yes", False),
    ("No, there is not.", "no", False),
    ("There is no dog in the image.", "no", False),
    ("I don't think so", "yes", False),
    ("The answer is yes.", "yes", False),
    ("The answer is no.", "no", False),
    ("", "yes", False),                       # empty: yes; lmms-eval: neither
    (" ", "yes", False),
    ("Yes. There is no dog.", "yes", False),  # only the first sentence counts
    ("There is a dog. No cat.", "yes", False),
    ("There are no. Yes", "no", False),
    ("No!", "yes", False),                    # "No!" is not the word "No"
    ("No, ", "no", False),
    ("no\n", "yes", False),                   # split on " " only: "no\n" is one word
    ("\nno", "yes", False),
    ("No,there is none", "yes", False),       # comma removal joins "Nothere"
    ("Yes, no.", "no", False),
    ("nope", "yes", False),
    ("None", "yes", False),
    ("cannot", "yes", False),
    ("isn't", "yes", False),
    ("It's not.", "no", False),
    ("Non.", "yes", False),
    ("no。", "yes", False),                    # ideographic full stop is not "."
    ("No\u00a0dog", "yes", False),            # no-break space does not split
    ("是", "yes", False),
    ("Nein", "yes", False),
    ("1.5 no", "yes", False),                 # first "sentence" is "1"
    ("Yes.No", "yes", False),
    (".no", "yes", False),
]


def lmms_pope_score(answer, label):
    doc = {"question_id": "q", "answer": label, "question": "Is there a dog?"}
    return lmms_pope.pope_process_results(doc, [answer])["pope_accuracy"]["score"]


def pope_samples(labels, category="random"):
    return [{"id": str(i), "image": "x.jpg", "prompt": "Is there a dog?", "answer": lab,
             "metadata": {"category": category}} for i, lab in enumerate(labels)]


@pytest.mark.parametrize("answer, reading, lmms_agrees", POPE_CASES)
def test_pope_reading_matches_eval_pope(answer, reading, lmms_agrees):
    assert pope_scorer.llava_pope_answer(answer) == reading
    ev = scorers.get("pope")
    rows = ev.score(pope_samples(["yes", "no"]), {"0": answer, "1": answer})["per_sample"]
    assert [r["extracted"] for r in rows] == [reading, reading]
    ours = [float(r["correct"]) for r in rows]
    assert ours == [float(reading == "yes"), float(reading == "no")]
    reference = [lmms_pope_score(answer, "yes"), lmms_pope_score(answer, "no")]
    assert (ours == reference) == lmms_agrees


def test_pope_metrics_match_lmms_eval_where_they_agree():
    rng = random.Random(0)
    answers = [a for a, _, agrees in POPE_CASES if agrees]
    labels = [rng.choice(["yes", "no"]) for _ in range(200)]
    preds = {str(i): rng.choice(answers) for i in range(200)}
    m = scorers.get("pope").score(pope_samples(labels), preds)["metrics"]
    results = [lmms_pope.pope_process_results({"question_id": str(i), "answer": lab}, [preds[str(i)]])
               for i, lab in enumerate(labels)]
    for ours, theirs in [("accuracy", "accuracy"), ("precision", "precision"),
                         ("recall", "recall"), ("f1", "f1_score")]:
        per_item = [r[f"pope_{theirs}"] for r in results]
        assert m[ours] == pytest.approx(getattr(lmms_pope, f"pope_aggregate_{theirs}")(per_item))
    # lmms-eval's yes_ratio counts "yes" labels; eval_pope.py's counts "yes" predictions.
    yes_labels = lmms_pope.pope_aggregate_yes_ratio([r["pope_yes_ratio"] for r in results])
    assert yes_labels == pytest.approx(labels.count("yes") / 200)
    predicted_yes = sum(pope_scorer.llava_pope_answer(p) == "yes" for p in preds.values())
    assert m["yes_ratio"] == pytest.approx(predicted_yes / 200)


def test_pope_splits_and_f1_average():
    # random: TP=1 FP=1 TN=1 FN=1 -> P=R=F1=0.5; popular: all 4 right -> F1=1; adversarial:
    # every answer "Yes" -> TP=2 FP=2 -> P=0.5, R=1, F1=2/3. Mean F1 = (0.5 + 1 + 2/3) / 3.
    samples, preds = [], {}
    answers = {"random": ["Yes", "No", "Yes, but it is not red.", "Yes."],
               "popular": ["Yes", "Yes", "No.", "not sure"],
               "adversarial": ["Yes", "", "The answer is yes.", "I don't think so"]}
    for cat, outs in answers.items():
        for lab, out in zip(["yes", "yes", "no", "no"], outs):
            sid = f"{cat}/{len(samples)}"
            samples.append({"id": sid, "answer": lab, "metadata": {"category": cat}})
            preds[sid] = out
    m = scorers.get("pope").score(samples, preds)["metrics"]
    by = m["by_category"]
    assert (by["random"]["f1"], by["popular"]["f1"], by["adversarial"]["f1"]) == \
        pytest.approx((0.5, 1.0, 2 / 3))
    assert by["adversarial"]["yes_ratio"] == 1.0 and by["popular"]["yes_ratio"] == 0.5
    assert m["f1"] == pytest.approx((0.5 + 1 + 2 / 3) / 3)
    # pooled: TP=5 FP=3 TN=3 FN=1 -> P=5/8, R=5/6, F1=2*(25/48)/(35/24)=5/7
    assert m["f1_pooled"] == pytest.approx(5 / 7) and m["accuracy"] == pytest.approx(8 / 12)


def test_pope_bad_input(tmp_path):
    records = [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes", "category": "random"},
        {"question_id": 2, "image": "b.jpg", "label": "no", "category": "random"},            # no text
        {"question_id": 3, "text": "Is there a cat?", "label": "no", "category": "random"},   # no image
        {"question_id": 4, "image": "c.jpg", "text": "Is there a car?", "label": "maybe", "category": "random"},
        {"question_id": 5, "image": "d.jpg", "text": "Is there a cup?", "category": "random"},  # no label
        {"question_id": 6, "image": "e.jpg", "text": "Is there a bus?", "label": " No", "category": "random"},
        {"question_id": 6, "image": "f.jpg", "text": "Is there a tv?", "label": "yes", "category": "random"},
    ]
    path = tmp_path / "pope.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ev = scorers.get("pope")
    samples = ev.load(str(path))
    assert [s["id"] for s in samples] == ["random/1", "random/6#0", "random/6#1"]
    assert [s["answer"] for s in samples] == ["yes", "no", "yes"]
    m = ev.score(samples, {"random/1": "Yes", "random/6#0": "No", "random/6#1": "No"})["metrics"]
    assert m["num_skipped"] == 4 and m["skipped"] == {
        "random/2": "no question text", "random/3": "no image",
        "random/4": "label 'maybe' is not yes/no", "random/5": "no label"}
    assert set(m["input_notes"]) == {"random/6#0", "random/6#1"}
    assert m["accuracy"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------- MME

MME_ANSWERS = [
    "Yes", "yes", "No", "no", "Yes.", "No.", "YES", "NO", " yes ", "\nNo\n", "y", "n", "Y", "N",
    "x", "", " ", ".", "The answer is yes.", "The answer is no.", "I don't think so",
    "not sure", "Nope", "None", "Know", "Yeah", "yes, it is", "No, it prints 3.",
    "Yes, but it is not red.", "There is no dog.", "yes.no", "y.", "n.", "...yes",
    "是的", "Ja", "Nein", "Sí", "noo", "I think yes", "yess", "n o", "Yes\n\nNo", "nó",
]


def lmms_mme_score(answer, label, category="existence", question_id="existence/1.png"):
    doc = {"question_id": question_id, "answer": label, "category": category}
    out = lmms_mme.mme_process_results(doc, [answer])
    return next(iter(out.values()))["score"]


@pytest.mark.parametrize("answer", MME_ANSWERS)
def test_mme_items_match_lmms_eval(answer):
    assert mme_scorer.parse_mme_answer(answer) == lmms_mme.parse_pred_ans(answer)
    samples = [{"id": str(i), "answer": lab,
                "metadata": {"category": "existence", "image_key": "existence/1.png"}}
               for i, lab in enumerate(["yes", "no"])]
    rows = scorers.get("mme").score(samples, {"0": answer, "1": answer})["per_sample"]
    assert [float(r["correct"]) for r in rows] == \
        [lmms_mme_score(answer, "Yes"), lmms_mme_score(answer, "No")]


def test_mme_hand_cases():
    parse = mme_scorer.parse_mme_answer
    assert parse("The answer is yes.") == "other" and parse("I don't think so") == "other"
    assert parse("not sure") == "no" and parse("Yes.") == "yes" and parse("") == "other"


def test_mme_scores_match_lmms_eval():
    rng = random.Random(1)
    categories = list(lmms_mme.eval_type_dict["Perception"]) + \
        list(lmms_mme.eval_type_dict["Cognition"])
    samples, preds, docs = [], {}, []
    for cat in categories:
        for img in range(rng.randint(1, 5)):
            image = f"{cat}/{img}.png"
            for lab in ("Yes", "No"):
                sid = f"{image}#{lab}"
                answer = rng.choice(MME_ANSWERS)
                samples.append({"id": sid, "answer": lab.lower(),
                                "metadata": {"category": cat, "image_key": image}})
                preds[sid] = answer
                docs.append(({"question_id": image, "answer": lab, "category": cat}, answer))
    m = scorers.get("mme").score(samples, preds)["metrics"]
    by_metric = {"mme_perception_score": [], "mme_cognition_score": []}
    for doc, answer in docs:
        for key, value in lmms_mme.mme_process_results(doc, [answer]).items():
            by_metric[key].append(value)
    assert m["perception"] == pytest.approx(
        lmms_mme.mme_aggregate_results(by_metric["mme_perception_score"]))
    assert m["cognition"] == pytest.approx(
        lmms_mme.mme_aggregate_results(by_metric["mme_cognition_score"]))
    assert m["perception_missing"] == [] and m["cognition_missing"] == []


def test_mme_bad_input(tmp_path):
    rec = lambda qid, text, answer, image=None, cat="existence": {
        "question_id": qid, "image": image or qid, "text": text, "answer": answer, "category": cat}
    records = [
        rec("existence/1.png", "Is there a dog?", "Yes"), rec("existence/1.png", "Is there a cat?", "No."),
        rec("existence/2.png", "Is there a car?", "Yes"),              # alone: not a pair
        rec("existence/3.png", "Is there a bus?", "Yes"), rec("existence/3.png", "Is there a cup?", "maybe"),
        {"question_id": "existence/4.png", "image": "existence/4.png", "answer": "No", "category": "existence"},
    ]
    path = tmp_path / "mme.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ev = scorers.get("mme")
    samples = ev.load(str(path))
    assert [s["id"] for s in samples] == ["existence/1.png#0", "existence/1.png#1"]
    assert [s["answer"] for s in samples] == ["yes", "no"]
    m = ev.score(samples, {"existence/1.png#0": "Yes", "existence/1.png#1": "No"})["metrics"]
    assert m["skipped"]["existence/3.png#1"] == "answer 'maybe' is not yes/no"
    assert m["skipped"]["existence/4.png"] == "no question text"
    assert "MME scores pairs" in m["skipped"]["existence/2.png"]
    assert "MME scores pairs" in m["skipped"]["existence/3.png#0"]
    assert m["num_skipped"] == 4 and m["perception"] == pytest.approx(200.0)


def test_unknown_category_goes_to_cognition_as_in_lmms_eval():
    samples = [{"id": str(i), "answer": lab, "metadata": {"category": "ocr", "image_key": "a.png"}}
               for i, lab in enumerate(["yes", "no"])]
    m = scorers.get("mme").score(samples, {"0": "Yes", "1": "No"})["metrics"]
    assert m["cognition"] == 200.0 and m["perception"] == 0.0 and m["unknown_categories"] == ["ocr"]
    assert lmms_mme_score("Yes", "Yes", category="ocr") == 1.0
    key = next(iter(lmms_mme.mme_process_results(
        {"question_id": "a", "answer": "Yes", "category": "ocr"}, ["Yes"])))
    assert key == "mme_cognition_score"


# ---------------------------------------------------------------------------- conventions


def test_conventions_and_lenient_option():
    assert scorers.get("pope").convention == "LLaVA eval_pope.py"
    assert scorers.get("mme").convention == "lmms-eval 0.7.3 mme"
    lenient_pope = scorers.get("pope", extractor="lenient")
    lenient_mme = scorers.get("mme", extractor="lenient")
    assert lenient_pope.convention == lenient_mme.convention == "lenient"
    assert lenient_pope.read("I don't think so") == "no" and lenient_pope.read("") is None
    assert lenient_mme.read("The answer is yes.") == "yes"
    with pytest.raises(ValueError):
        scorers.get("pope", extractor="loose")
