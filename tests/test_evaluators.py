"""Benchmark scorers on small fixtures in each benchmark's public file format.

Every expected number is worked out by hand in the comments next to it.
"""

import base64
import json

import pytest

from lavi_jax.eval import scorers
from lavi_jax.eval.scorers import extract_choice, extract_yes_no, normalize_answer, vqa_soft_accuracy
from lavi_jax.eval.scorers.multiple_choice import options_from_text

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


# ============================================================================ VQA normaliser


@pytest.mark.parametrize("raw, expected", [
    ("Yes.", "yes"),                            # trailing period dropped
    ("The Dog", "dog"),                         # lower case, article "the" dropped
    ("an apple", "apple"),                      # article "an"
    ("a cat", "cat"),                           # article "a"
    ("Two", "2"),                               # number word -> digit
    ("none", "0"),                              # "none" counts as zero
    ("ten dogs", "10 dogs"),
    ("dont", "don't"),                          # contraction restored
    ("isnt", "isn't"),
    ("couldnt've", "couldn't've"),              # partially written contraction
    ("don't", "don't"),                         # already written out: unchanged
    ("well", "well"),                           # a real word is not a contraction
    ("black-and-white", "black and white"),     # in-word punctuation becomes a space
    ("hello, world", "hello world"),            # punctuation next to a space is deleted
    ("1,000", "1000"),                          # digit,digit: punctuation deleted
    ("3.5", "3.5"),                             # decimal point kept
    ("u.s.", "us"),                             # other periods dropped
    ("(red)", "red"),
    ("what?!", "what"),
    ("  Left\n side\t", "left side"),           # whitespace collapsed
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


# ============================================================================ VQA soft accuracy


@pytest.mark.parametrize("k, expected", [
    # Ten humans, k of whom gave the predicted answer. Leaving out one of the k matching humans
    # leaves k-1 matches (k such subsets); leaving out one of the 10-k others leaves k matches.
    # acc = (k * min((k-1)/3, 1) + (10-k) * min(k/3, 1)) / 10
    (0, 0.0),   # (0 + 10*0) / 10
    (1, 0.3),   # (1*0 + 9*(1/3)) / 10 = 3/10
    (2, 0.6),   # (2*(1/3) + 8*(2/3)) / 10 = (2/3 + 16/3)/10 = 6/10
    (3, 0.9),   # (3*(2/3) + 7*1) / 10 = (2 + 7)/10
    (4, 1.0),   # (4*1 + 6*1) / 10
    (10, 1.0),
])
def test_vqa_soft_accuracy_counts(k, expected):
    answers = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_soft_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_soft_accuracy_normalises_both_sides():
    # "Two" and "2." normalise to "2"; 3 of 10 humans said it -> 0.9 (see above).
    answers = ["2", "two", "2."] + ["3"] * 7
    assert vqa_soft_accuracy("Two", answers) == pytest.approx(0.9)
    # With a single human answer, the leave-one-out subset is empty: 0, as lmms-eval scores it.
    assert vqa_soft_accuracy("The Cat.", ["cat"]) == 0.0


# ============================================================================ VQAv2 / TextVQA / GQA


def _vqav2_files(tmp_path):
    questions = write_jsonl(tmp_path / "llava_vqav2_val.jsonl", [
        {"question_id": 1, "image": "COCO_val2014_000000000001.jpg",
         "text": f"What animal is this?\n{SHORT}", "category": "default"},
        {"question_id": 2, "image": "COCO_val2014_000000000002.jpg",
         "text": "How many dogs?", "category": "default"},
        {"question_id": 3, "image": "COCO_val2014_000000000003.jpg",
         "text": "Is it sunny?", "category": "default"},
    ])
    ans = lambda *xs: [{"answer": x, "answer_confidence": "yes", "answer_id": i + 1}
                       for i, x in enumerate(xs)]
    annotations = write_json(tmp_path / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 1, "image_id": 1, "answer_type": "other", "question_type": "what",
         "multiple_choice_answer": "dog", "answers": ans(*(["cat"] * 2 + ["dog"] * 8))},
        {"question_id": 2, "image_id": 2, "answer_type": "number", "question_type": "how many",
         "multiple_choice_answer": "2", "answers": ans(*(["2"] * 9 + ["two"]))},
        {"question_id": 3, "image_id": 3, "answer_type": "yes/no", "question_type": "is it",
         "multiple_choice_answer": "yes", "answers": ans(*(["yes"] * 10))},
    ]})
    return questions, annotations


def test_vqav2_load_and_score(tmp_path):
    questions, annotations = _vqav2_files(tmp_path)
    ev = scorers.get("vqav2")
    samples = ev.load(questions, annotations, image_root="/coco/val2014")
    assert [s["id"] for s in samples] == ["1", "2", "3"]
    s = samples[0]
    assert s["image"] == "/coco/val2014/COCO_val2014_000000000001.jpg"
    # The suffix is appended once, whether or not the question file already has it.
    assert s["prompt"] == f"What animal is this?\n{SHORT}"
    assert samples[1]["prompt"] == f"How many dogs?\n{SHORT}"
    assert s["answers"] == ["cat"] * 2 + ["dog"] * 8 and s["answer"] == "dog"
    assert s["metadata"]["answer_type"] == "other"

    result = ev.score(samples, {1: "Cat.", "2": "Two", 3: None})
    # q1: "cat" given by 2 of 10 humans -> 0.6; q2: "two" -> "2", which all 10 match -> 1.0;
    # q3: prediction None -> 0. accuracy = (0.6 + 1.0 + 0) / 3 = 1.6 / 3
    m = result["metrics"]
    assert m["accuracy"] == pytest.approx(1.6 / 3)
    assert m["num_samples"] == 3 and m["num_failed"] == 1
    assert m["by_answer_type"] == pytest.approx({"number": 1.0, "other": 0.6, "yes/no": 0.0})
    rows = {r["id"]: r for r in result["per_sample"]}
    assert rows["1"]["score"] == pytest.approx(0.6) and rows["1"]["prediction"] == "Cat."
    assert rows["3"]["score"] == 0.0 and rows["3"]["error"] == "prediction is None"


def test_vqav2_official_question_file(tmp_path):
    questions = write_json(tmp_path / "q.json", {"data_subtype": "val2014", "questions": [
        {"question_id": 42001, "image_id": 42, "question": "What color is the bus?"}]})
    annotations = write_json(tmp_path / "a.json", {"annotations": [
        {"question_id": 42001, "answers": [{"answer": "red"}] * 3 + [{"answer": "blue"}] * 7}]})
    (s,) = scorers.get("vqav2").load(questions, annotations)
    assert s["image"] == "COCO_val2014_000000000042.jpg"
    assert s["prompt"] == f"What color is the bus?\n{SHORT}"
    # "red" by 3 of 10 -> 0.9
    assert scorers.get("vqav2").score([s], {"42001": "Red"})["metrics"]["accuracy"] == \
        pytest.approx(0.9)


def _textvqa_files(tmp_path):
    questions = write_jsonl(tmp_path / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": 34602, "image": "003a8ae2ef43b901.jpg",
         "text": f"what is the brand?\nReference OCR token: Nike, shoe\n{SHORT}"},
        {"question_id": 34603, "image": "00b5b5a3fd8e4e0a.jpg",
         "text": f"what number is on the jersey?\n{SHORT}"},
    ])
    annotations = write_json(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa",
                                                                    "data": [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what is the brand?",
         "answers": ["nike"] * 4 + ["nike shoes"] * 6},
        {"question_id": 34603, "image_id": "00b5b5a3fd8e4e0a",
         "question": "what number is on the jersey?", "answers": ["23"] * 1 + ["28"] * 9},
    ]})
    return questions, annotations


def test_textvqa_soft_and_exact(tmp_path):
    questions, annotations = _textvqa_files(tmp_path)
    preds = {"34602": "Nike", "34603": "23"}
    soft = scorers.get("textvqa")
    samples = soft.load(questions, annotations)
    assert samples[0]["answers"] == ["nike"] * 4 + ["nike shoes"] * 6
    assert samples[0]["prompt"].count(SHORT) == 1
    # q1: "nike" by 4 of 10 -> 1.0; q2: "23" by 1 of 10 -> 0.3. mean = 1.3 / 2 = 0.65
    assert soft.score(samples, preds)["metrics"]["accuracy"] == pytest.approx(0.65)
    # Exact: "Nike" -> "nike" is one of the answers (1), "23" is one too (1) -> 1.0
    exact = scorers.get("textvqa", metric="exact")
    result = exact.score(exact.load(questions, annotations), preds)
    assert result["metrics"]["accuracy"] == 1.0
    assert all(r["correct"] for r in result["per_sample"])


def test_textvqa_matches_by_image_and_question_when_ids_differ(tmp_path):
    questions, annotations = _textvqa_files(tmp_path)
    records = [json.loads(l) for l in questions.read_text().splitlines()]
    for i, r in enumerate(records):
        r["question_id"] = i  # LLaVA-style renumbered ids
    write_jsonl(questions, records)
    samples = scorers.get("textvqa").load(questions, annotations)
    assert samples[1]["answers"] == ["23"] + ["28"] * 9


def test_gqa_exact_and_normalized(tmp_path):
    questions = write_jsonl(tmp_path / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": "201307251", "image": "n7768.jpg", "text": "Is the lamp on?"},
        {"question_id": "201640614", "image": "n3637.jpg", "text": "What animal is it?"},
        {"question_id": "20968379", "image": "n4567.jpg", "text": "Which color is the car?"},
    ])
    annotations = write_json(tmp_path / "testdev_balanced_questions.json", {
        "201307251": {"imageId": "n7768", "question": "Is the lamp on?", "answer": "yes"},
        "201640614": {"imageId": "n3637", "question": "What animal is it?", "answer": "cat"},
        "20968379": {"imageId": "n4567", "question": "Which color is the car?",
                     "answer": "white"},
    })
    preds = {"201307251": "Yes.", "201640614": "The cat", "20968379": "black"}
    gqa = scorers.get("gqa")
    samples = gqa.load(questions, annotations)
    assert samples[0]["answers"] == ["yes"]
    # LLaVA's conversion (rstrip ".", lower) + exact match: "yes" == "yes" (1);
    # "the cat" != "cat" (0);
    # "black" != "white" (0) -> 1/3
    assert gqa.score(samples, preds)["metrics"]["accuracy"] == pytest.approx(1 / 3)
    # normalized: the article goes too, so "cat" matches (1) -> 2/3
    norm = scorers.get("gqa", metric="normalized")
    assert norm.score(samples, preds)["metrics"]["accuracy"] == pytest.approx(2 / 3)
    # The GQA questions file alone also loads (answers inside).
    alone = gqa.load(annotations)
    assert alone[2]["image"] == "n4567.jpg" and alone[2]["answers"] == ["white"]


def test_vqa_requires_ground_truth(tmp_path):
    questions = write_jsonl(tmp_path / "test.jsonl", [{"question_id": 1, "image": "a.jpg",
                                                       "text": "What?"}])
    ev = scorers.get("vqav2")
    with pytest.raises(ValueError, match="no ground-truth"):  # a file without any answers fails loudly
        ev.load(questions)


# ============================================================================ option letters

OPTS = ["red", "blue", "green", "dark red"]


@pytest.mark.parametrize("text, expected", [
    ("B", "B"),
    ("b", "B"),
    ("(B)", "B"),
    ("B.", "B"),
    ("[C]", "C"),
    ("B. blue", "B"),
    ("(D) dark red", "D"),
    ("C) green", "C"),
    ("The answer is B", "B"),
    ("The answer is B.", "B"),
    ("Answer: C) blue", "C"),            # the stated letter wins over the option text
    ("The correct option is (A).", "A"),
    ("I think D is right", "D"),
    ("blue", "B"),                       # the text of one option
    ("Green.", "C"),
    ("dark red", "D"),                   # "red" inside "dark red" is not a second match
    ("It is blue.", "B"),
    ("A dog is sitting", None),          # the article "A" is not option A
    ("E", None),                         # not one of the four letters
    ("I don't know", None),
    ("", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text, OPTS) == expected


def test_options_from_text():
    assert options_from_text(f"Q?\nA. cat\nB. dog house\n{LETTER}") == ["cat", "dog house"]
    assert options_from_text("Question: q\nOptions: (A) cat (B) dog (C) bird") == \
        ["cat", "dog", "bird"]
    assert options_from_text("no options here") == []


# ============================================================================ MMBench


def test_mmbench_tsv_circular(tmp_path):
    png = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\tl2-category\tsplit"
    rows = [  # 1000000 + i is the official circular copy of question i (options rotated)
        f"0\tWhat color is the sky?\tA photo.\tblue\tred\tgreen\tnan\tA\tattr\t{png}\tp\tdev",
        f"1000000\tWhat color is the sky?\tA photo.\tred\tgreen\tblue\tnan\tC\tattr\t{png}\tp\tdev",
        f"1\tWhich animal?\tnan\tcat\tdog\t\t\tB\tobj\t{png}\tp\tdev",
        f"1000001\tWhich animal?\tnan\tdog\tcat\t\t\tA\tobj\t{png}\tp\tdev",
    ]
    tsv = tmp_path / "mmbench_dev_20230712.tsv"
    tsv.write_text("\n".join([header] + rows) + "\n")
    ev = scorers.get("mmbench", image_cache_dir=str(tmp_path / "imgs"))
    samples = ev.load(tsv)
    assert [s["id"] for s in samples] == ["0", "1000000", "1", "1000001"]
    assert samples[0]["prompt"] == ("A photo.\nWhat color is the sky?\nA. blue\nB. red\n"
                                    f"C. green\n{LETTER}")
    assert samples[2]["prompt"] == f"Which animal?\nA. cat\nB. dog\n{LETTER}"  # no hint, 2 opts
    assert [s["answer"] for s in samples] == ["A", "C", "B", "A"]
    assert samples[0]["image"].endswith("0.png")
    assert open(samples[0]["image"], "rb").read().startswith(b"\x89PNG")
    assert samples[1]["metadata"]["group"] == 0

    preds = {"0": "A", "1000000": "The answer is C", "1": "dog", "1000001": "(B)"}
    m = ev.score(samples, preds)["metrics"]
    # rows: A=A ok, C=C ok, dog->B=B ok, B!=A wrong -> 3/4
    assert m["accuracy"] == pytest.approx(3 / 4)
    # groups: question 0 all right (1), question 1 has a wrong rotation (0) -> 1/2
    assert m["circular_accuracy"] == pytest.approx(1 / 2) and m["num_groups"] == 2
    assert m["by_category"] == pytest.approx({"attr": 1.0, "obj": 0.5})

    # Without a cache folder the encoded image stays in the metadata.
    plain = scorers.get("mmbench").load(tsv)
    assert plain[0]["image"] is None and plain[0]["metadata"]["image_base64"] == png


def test_mmbench_rotate_all_rounds(tmp_path):
    path = write_jsonl(tmp_path / "mmbench.jsonl", [
        {"index": 5, "question": "Which fruit is yellow?", "A": "apple", "B": "banana",
         "C": "cherry", "answer": "B", "category": "attr", "image": "5.jpg"}])
    ev = scorers.get("mmbench", rotate=True)
    samples = ev.load(path, image_root="/mmb")
    # Round r shows options[r:] + options[:r]; banana (index 1) is at (1 - r) mod 3.
    assert [s["id"] for s in samples] == ["5", "5@1", "5@2"]
    assert [s["options"] for s in samples] == [["apple", "banana", "cherry"],
                                               ["banana", "cherry", "apple"],
                                               ["cherry", "apple", "banana"]]
    assert [s["answer"] for s in samples] == ["B", "A", "C"]
    assert samples[0]["image"] == "/mmb/5.jpg"
    m = ev.score(samples, {"5": "B", "5@1": "banana", "5@2": "C"})["metrics"]
    assert m["accuracy"] == 1.0 and m["circular_accuracy"] == 1.0
    # One rotation wrong: rows 2/3, the question fails circular evaluation.
    m = ev.score(samples, {"5": "B", "5@1": "B", "5@2": "C"})["metrics"]
    assert m["accuracy"] == pytest.approx(2 / 3) and m["circular_accuracy"] == 0.0


# ============================================================================ SEED / SQA / video


def test_seed_bench(tmp_path):
    q1 = f"Where is it?\nA. park\nB. beach\nC. office\nD. kitchen\n{LETTER}"
    questions = write_jsonl(tmp_path / "llava-seed-bench.jsonl", [
        {"image": "SEED-Bench-image/1.jpg", "text": q1, "question_id": "101"},
        {"image": "SEED-Bench-image/2.jpg", "text": "How many?\nA. 1\nB. 2\nC. 3\nD. 4",
         "question_id": "102"},
        {"image": "SEED-Bench-video-image/3.png", "text": "What happens?\nA. x\nB. y\nC. z\nD. w",
         "question_id": "103"},
    ])
    gt = write_json(tmp_path / "SEED-Bench.json", {
        "question_type": {"Scene Understanding": 1, "Instances Counting": 5,
                          "Action Recognition": 10},
        "questions": [
            {"question_id": "101", "question": "Where is it?", "choice_a": "park",
             "choice_b": "beach", "choice_c": "office", "choice_d": "kitchen", "answer": "B",
             "question_type_id": 1, "data_type": "image", "data_id": "1.jpg"},
            {"question_id": "102", "question": "How many?", "choice_a": "1", "choice_b": "2",
             "choice_c": "3", "choice_d": "4", "answer": "C", "question_type_id": 5,
             "data_type": "image", "data_id": "2.jpg"},
            {"question_id": "103", "question": "What happens?", "choice_a": "x", "choice_b": "y",
             "choice_c": "z", "choice_d": "w", "answer": "D", "question_type_id": 10,
             "data_type": "video", "data_id": "3.mp4"},
        ]})
    ev = scorers.get("seed_bench")
    samples = ev.load(questions, gt)
    assert samples[0]["prompt"] == q1  # the LLaVA prompt already lists the options
    assert samples[1]["prompt"].endswith(f"D. 4\n{LETTER}")
    assert [s["answer"] for s in samples] == ["B", "C", "D"]
    assert samples[0]["metadata"]["category"] == "Scene Understanding"
    result = ev.score(samples, {"101": "beach", "102": "B", "103": "D"})
    m = result["metrics"]
    # beach -> B ok; B != C wrong; D ok -> 2/3; image 1/2, video 1/1
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["by_data_type"] == pytest.approx({"image": 0.5, "video": 1.0})
    assert m["by_category"]["Instances Counting"] == 0.0


def test_scienceqa_img_problems(tmp_path):
    problems = write_json(tmp_path / "problems.json", {
        "1": {"question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1,
              "hint": "Look at the animals.", "image": "image.png", "split": "test",
              "subject": "natural science"},
        "2": {"question": "Which word rhymes?", "choices": ["cat", "dog"], "answer": 0,
              "hint": "", "image": None, "split": "test", "subject": "language science"},
        "3": {"question": "Which map?", "choices": ["a", "b", "c"], "answer": 2, "hint": "",
              "image": "image.png", "split": "val", "subject": "social science"},
    })
    splits = write_json(tmp_path / "pid_splits.json", {"test": ["1", "2"], "val": ["3"]})
    ev = scorers.get("scienceqa_img")
    samples = ev.load(problems, splits, image_root="/sqa/images")
    # Only test problems with an image: problem 1.
    assert [s["id"] for s in samples] == ["1"]
    assert samples[0]["image"] == "/sqa/images/test/1/image.png"
    assert samples[0]["prompt"] == (f"Look at the animals.\nWhich is a mammal?\nA. frog\n"
                                    f"B. whale\n{LETTER}")
    assert samples[0]["answer"] == "B"
    assert ev.score(samples, {"1": "B"})["metrics"]["accuracy"] == 1.0


def test_scienceqa_llava_conversation_file(tmp_path):
    path = write_json(tmp_path / "llava_test_CQM-A.json", [
        {"id": "7", "image": "7/image.png", "conversations": [
            {"from": "human", "value": "<image>\nContext: A map.\nQuestion: Which state?\n"
                                       "Options: (A) Ohio (B) Utah (C) Iowa"},
            {"from": "gpt", "value": "The answer is C."}]},
        {"id": "8", "conversations": [  # no image: not part of ScienceQA-IMG
            {"from": "human", "value": "Question: q\nOptions: (A) x (B) y"},
            {"from": "gpt", "value": "The answer is A."}]},
    ])
    samples = scorers.get("scienceqa_img").load(path)
    assert len(samples) == 1
    assert samples[0]["options"] == ["Ohio", "Utah", "Iowa"] and samples[0]["answer"] == "C"
    assert samples[0]["prompt"].startswith("Context: A map.")
    assert samples[0]["prompt"].endswith(LETTER)


def test_mvbench_and_videomme(tmp_path):
    folder = tmp_path / "mvbench"
    folder.mkdir()
    write_json(folder / "action_sequence.json", [
        {"video": "v1.mp4", "question": "What did the person do first?",
         "candidates": ["walk", "run", "sit"], "answer": "run"},
        {"video": "v2.mp4", "question": "Then?", "candidates": ["open", "close"],
         "answer": "open"}])
    mv = scorers.get("mvbench")
    samples = mv.load(str(folder), image_root="/videos")
    assert [s["id"] for s in samples] == ["action_sequence/0", "action_sequence/1"]
    assert samples[0]["video"] == "/videos/v1.mp4" and samples[0]["answer"] == "B"
    m = mv.score(samples, {"action_sequence/0": "(B) run", "action_sequence/1": "B"})["metrics"]
    assert m["accuracy"] == 0.5 and m["by_category"] == {"action_sequence": 0.5}

    vm = scorers.get("videomme")
    path = write_json(tmp_path / "videomme.json", [
        {"video_id": "001", "videoID": "fFjv93ACGo8", "question_id": "001-1", "duration": "short",
         "domain": "Knowledge", "task_type": "Counting Problem", "question": "How many?",
         "options": ["A. 1", "B. 2", "C. 3", "D. 4"], "answer": "C"}])
    (s,) = vm.load(path)
    assert s["video"] == "fFjv93ACGo8.mp4" and s["options"] == ["1", "2", "3", "4"]
    assert s["prompt"] == f"How many?\nA. 1\nB. 2\nC. 3\nD. 4\n{LETTER}"
    m = vm.score([s], {"001-1": "C. 3"})["metrics"]
    assert m["accuracy"] == 1.0 and m["by_duration"] == {"short": 1.0}


def test_multiple_choice_failures_are_wrong(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [
        {"question_id": i, "question": "Q?", "options": ["x", "y"], "answer": "A"}
        for i in range(5)])
    ev = scorers.get("multiple_choice")
    samples = ev.load(path)
    result = ev.score(samples, {"0": "A", "1": None, "2": RuntimeError("OOM"), "3": "A",
                                "4": "no idea"}, failures={3: "timeout"})
    rows = {r["id"]: r for r in result["per_sample"]}
    # 0 right; 1 None; 2 exception; 3 failed by reason; 4 unreadable -> 1/5
    assert result["metrics"]["accuracy"] == pytest.approx(1 / 5)
    assert result["metrics"]["num_failed"] == 3 and result["metrics"]["num_unparsed"] == 1
    assert rows["1"]["error"] == "prediction is None"
    assert rows["2"]["error"] == "RuntimeError: OOM"
    assert rows["3"]["error"] == "timeout" and not rows["3"]["correct"]
    assert rows["4"]["extracted"] is None and not rows["4"]["correct"]
    missing = ev.score(samples, {})
    assert missing["metrics"]["accuracy"] == 0.0
    assert {r["error"] for r in missing["per_sample"]} == {"missing prediction"}


# ============================================================================ yes / no


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("yes.", "yes"), ("No", "no"), ("NO.", "no"),
    ("Yes, there is a dog.", "yes"), ("No, there is not.", "no"),
    ("There is no dog in the image.", "no"), ("I don't see one.", "no"),
    ("There is a dog.", None), ("", None), (None, None),
])
def test_extract_yes_no(text, expected):
    assert extract_yes_no(text) == expected


def _pope_files(tmp_path):
    labels = {  # 4 "yes" labels and 6 "no" labels over two categories
        "random": [("a.jpg", "dog", "yes"), ("b.jpg", "cat", "yes"), ("c.jpg", "car", "no"),
                   ("d.jpg", "cup", "no"), ("e.jpg", "bus", "no")],
        "adversarial": [("a.jpg", "cat", "yes"), ("b.jpg", "dog", "yes"), ("c.jpg", "tv", "no"),
                        ("d.jpg", "bed", "no"), ("e.jpg", "bird", "no")],
    }
    folder = tmp_path / "pope"
    folder.mkdir()
    questions, qid = [], 0
    for cat, rows in labels.items():
        write_jsonl(folder / f"coco_pope_{cat}.json", [
            {"question_id": i + 1, "image": f"COCO_val2014_{img}",
             "text": f"Is there a {obj} in the image?", "label": lab}
            for i, (img, obj, lab) in enumerate(rows)])
        for img, obj, _ in rows:
            qid += 1
            questions.append({"question_id": qid, "image": f"COCO_val2014_{img}",
                              "text": f"Is there a {obj} in the image?\n{SHORT}",
                              "category": cat})
    return write_jsonl(tmp_path / "llava_pope_test.jsonl", questions), folder


def test_pope_metrics(tmp_path):
    questions, folder = _pope_files(tmp_path)
    ev = scorers.get("pope")
    samples = ev.load(questions, folder)
    assert [s["answer"] for s in samples] == ["yes", "yes", "no", "no", "no"] * 2
    assert samples[0]["prompt"] == f"Is there a dog in the image?\n{SHORT}"
    preds = {
        # random: yes-labels Yes, Yes (TP, TP); no-labels No, "There is no cup." (TN, TN), Yes (FP)
        1: "Yes", 2: "Yes", 3: "No", 4: "There is no cup.", 5: "Yes",
        # adversarial: yes-labels Yes (TP), No (FN); no-labels No (TN), No (TN), None (FP:
        # a failed prediction counts as the opposite of its label)
        6: "Yes", 7: "No", 8: "No", 9: "No", 10: None,
    }
    m = ev.score(samples, preds)["metrics"]
    # Overall TP=3, FN=1, TN=4, FP=2 over 10 questions.
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (3, 1, 4, 2)
    assert m["accuracy"] == pytest.approx(0.7)       # (3 + 4) / 10
    assert m["precision"] == pytest.approx(0.6)      # 3 / (3 + 2)
    assert m["recall"] == pytest.approx(0.75)        # 3 / (3 + 1)
    assert m["f1_pooled"] == pytest.approx(2 / 3)    # 2*0.6*0.75 / (0.6+0.75) = 0.9/1.35
    assert m["f1"] == pytest.approx(0.65)            # mean of the splits' F1: (0.8 + 0.5) / 2
    assert m["yes_ratio"] == pytest.approx(0.5)      # (3 + 2) / 10 predicted yes
    assert m["num_failed"] == 1
    # random: TP=2, FN=0, TN=2, FP=1 -> P = 2/3, R = 1, F1 = 2*(2/3)/(5/3) = 0.8, acc = 4/5
    r = m["by_category"]["random"]
    assert (r["precision"], r["recall"], r["f1"], r["accuracy"]) == pytest.approx(
        (2 / 3, 1.0, 0.8, 0.8))
    # adversarial: TP=1, FN=1, TN=2, FP=1 -> P = 1/2, R = 1/2, F1 = 1/2, acc = 3/5,
    # yes_ratio = (1 + 1) / 5
    a = m["by_category"]["adversarial"]
    assert (a["precision"], a["recall"], a["f1"], a["accuracy"], a["yes_ratio"]) == \
        pytest.approx((0.5, 0.5, 0.5, 0.6, 0.4))


def test_pope_label_files_alone(tmp_path):
    _, folder = _pope_files(tmp_path)
    samples = scorers.get("pope").load(folder)
    # Question ids restart per label file, so they are prefixed with the category.
    assert samples[0]["id"] == "adversarial/1" and samples[5]["id"] == "random/1"
    assert samples[0]["metadata"]["category"] == "adversarial"
    assert sum(s["answer"] == "yes" for s in samples) == 4


def _mme_folder(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    layout = {  # subtask: {image: [(question, answer), ...]}
        "existence": {"1.jpg": [("Is there a dog?", "Yes"), ("Is there a cat?", "No")],
                      "2.jpg": [("Is there a car?", "Yes"), ("Is there a bus?", "No")]},
        "artwork": {"a.jpg": [("Is it by Monet?", "Yes"), ("Is it by Dali?", "No")],
                    "b.jpg": [("Is it a painting?", "Yes"), ("Is it a photo?", "No")]},
        "code_reasoning": {"c.png": [("Does it print 3?", "Yes"), ("Does it print 4?", "No")]},
    }
    for task, images in layout.items():
        nested = task == "artwork"  # artwork-style subtasks keep images/ and questions_answers_YN/
        img_dir = root / task / "images" if nested else root / task
        qa_dir = root / task / "questions_answers_YN" if nested else root / task
        img_dir.mkdir(parents=True, exist_ok=True)
        qa_dir.mkdir(parents=True, exist_ok=True)
        for image, qas in images.items():
            (img_dir / image).write_bytes(b"")
            suffix = " Please answer yes or no."
            (qa_dir / (image.rsplit(".", 1)[0] + ".txt")).write_text(
                "".join(f"{q}{suffix}\t{a}\n" for q, a in qas))
    return root


MME_PREDICTIONS = [
    # existence 1.jpg: both right; 2.jpg: right, wrong
    "Yes", "No", "Yes", "Yes",
    # artwork a.jpg: both right; b.jpg: both wrong
    "Yes", "No", "No", "Yes",
    # code_reasoning c.png: both right
    "yes.", "No, it prints 3.",
]


def _check_mme(m):
    # existence: acc = 3/4, acc+ = 1/2 (only 1.jpg fully right) -> 75 + 50 = 125
    e = m["subtasks"]["existence"]
    assert (e["accuracy"], e["accuracy_plus"], e["score"]) == pytest.approx((0.75, 0.5, 125.0))
    # artwork: acc = 2/4, acc+ = 1/2 -> 50 + 50 = 100
    assert m["subtasks"]["artwork"]["score"] == pytest.approx(100.0)
    # code_reasoning: 100 + 100 = 200 (cognition)
    assert m["subtasks"]["code_reasoning"]["score"] == pytest.approx(200.0)
    assert m["perception"] == pytest.approx(225.0)  # 125 + 100 over the perception subtasks here
    assert m["cognition"] == pytest.approx(200.0)
    assert "existence" not in m["perception_missing"] and "OCR" in m["perception_missing"]


def test_mme_from_release_folder(tmp_path):
    root = _mme_folder(tmp_path)
    ev = scorers.get("mme")
    samples = ev.load(annotations=root)
    assert [s["metadata"]["category"] for s in samples] == \
        ["artwork"] * 4 + ["code_reasoning"] * 2 + ["existence"] * 4
    assert samples[0]["id"] == "artwork/images/a.jpg#0"
    assert samples[0]["image"] == str(root / "artwork" / "images" / "a.jpg")
    assert samples[0]["prompt"] == f"Is it by Monet? Please answer yes or no.\n{SHORT}"
    order = [6, 7, 8, 9, 0, 1, 2, 3, 4, 5]  # MME_PREDICTIONS index for each loaded sample
    preds = {s["id"]: MME_PREDICTIONS[order[i]] for i, s in enumerate(samples)}
    _check_mme(ev.score(samples, preds)["metrics"])


def test_mme_llava_jsonl(tmp_path):
    root = _mme_folder(tmp_path)
    records = []
    for task, image in [("existence", "existence/1.jpg"), ("existence", "existence/2.jpg"),
                        ("artwork", "artwork/images/a.jpg"), ("artwork", "artwork/images/b.jpg"),
                        ("code_reasoning", "code_reasoning/c.png")]:
        txt = (root / image).with_suffix(".txt")
        if task == "artwork":
            txt = root / "artwork" / "questions_answers_YN" / txt.name
        for line in txt.read_text().splitlines():
            records.append({"question_id": image, "image": image, "category": task,
                            "text": line.split("\t")[0] + f"\n{SHORT}"})
    questions = write_jsonl(tmp_path / "llava_mme.jsonl", records)
    ev = scorers.get("mme")
    samples = ev.load(questions, root, image_root=str(root))
    # The two questions of an image share LLaVA's question_id; ids get #0 / #1.
    assert [s["id"] for s in samples[:2]] == ["existence/1.jpg#0", "existence/1.jpg#1"]
    assert [s["answer"] for s in samples] == ["yes", "no"] * 5
    preds = {s["id"]: p for s, p in zip(samples, MME_PREDICTIONS)}
    result = ev.score(samples, preds)
    _check_mme(result["metrics"])
    # A missing prediction is wrong: existence 1.jpg loses its acc+ too.
    del preds["existence/1.jpg#0"]
    m = ev.score(samples, preds)["metrics"]
    # existence: acc = 2/4, acc+ = 0/2 -> 50
    assert m["subtasks"]["existence"]["score"] == pytest.approx(50.0)
    assert m["num_failed"] == 1


# ============================================================================ registry


def test_registry():
    assert {"vqav2", "textvqa", "gqa", "mmbench", "seed_bench", "scienceqa_img", "mvbench",
            "videomme", "pope", "mme"} <= set(scorers.names())
    assert scorers.get("GQA").metric == "llava_gqa"
    assert scorers.get("textvqa", metric="normalized").metric == "normalized"
    with pytest.raises(KeyError, match="unknown evaluator"):
        scorers.get("nope")
    with pytest.raises(ValueError):
        scorers.get("vqa", metric="bleu")
