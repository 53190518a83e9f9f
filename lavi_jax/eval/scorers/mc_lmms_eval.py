"""lmms-eval 0.7.3's per-task multiple-choice rules, one item at a time.

Each rule is `rule(text, options, answer) -> (extracted, correct)`: `text` is the model output,
`options` the option texts in letter order, `answer` the answer letter; `extracted` is the option
letter the rule read (None when it read none) and `correct` the rule's 0/1 verdict. Written from
lmms-eval 0.7.3's task code (`lmms_eval/tasks/<task>/utils.py`):

  mmbench_static
              `mmbench_evals.MMBench_Evaluator.eval_sub_data` with `static_only=True`, as run by
              `eval_result(..., eval_method="static")` (lmms-eval's MMBench scoring without a GPT
              key, task mmbench_en_dev_static): `can_infer` (a lone or wrapped letter A-E, else
              the one option text inside the answer), and where that reads nothing,
              `extract_mcq_answer` over the row's option letters (A-D). Alias "mmbench".
  mmbench_can_infer
              `can_infer` alone; what it cannot read is no match (`eval_method="openai"` with the
              GPT step answering nothing). Not a default.
              For both, circular grouping is done by the evaluator: `eval_sub_data` scores a group
              1 exactly when every row's letter, read as above, is that row's answer.
  seed_bench  `seedbench.utils.seed_process_result` + `seed_aggregation_result`: the first
              character of the stripped output, compared case-insensitively.
  scienceqa   `scienceqa.utils.sqa_process_results`: the whole output equals the letter
              (case-insensitively), or it starts with an upper-case letter and a period.
  mvbench     `mvbench.utils.mcq_acc`: VQA-style punctuation clean-up, then "X. ..." or the
              first stand-alone letter A-E (either case).
  videomme    `videomme.utils.extract_characters_regex`, i.e. the shared
              `_task_utils.mcq_extract.extract_mcq_answer` over A-D.
  mcq_extract `extract_mcq_answer` over the sample's own letters (for "multiple_choice").
"""

from __future__ import annotations

import re
import string
from typing import Callable, Sequence

LETTERS = string.ascii_uppercase

Rule = Callable[[str, Sequence[str], str], "tuple[str | None, bool]"]

# ----------------------------------------------------------------------------- MMBench

_MMB_WRAPS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
              (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."))


def mmbench_letter(prediction: str) -> str | None:
    """`can_infer_option`: one of A-E standing alone, or alone in one of its wrappings."""
    if "Failed to obtain answer via API" in prediction:
        return None
    words = [w.strip() for w in prediction.split()]
    letters = LETTERS[:5]  # the reference's num_choice=5, whatever the option count
    alone = [c for c in letters if c in words]
    # A lone "A" in an answer of more than three words may be the article: no bare match.
    if len(alone) == 1 and not ("A" in words and len(words) > 3):
        return alone[0]
    for before, after in _MMB_WRAPS:
        hits = [c for c in letters if f"{before}{c}{after}" in words]
        if len(hits) == 1:
            return hits[0]
    return None


def mmbench_text(prediction: str, options: Sequence[str]) -> str | None:
    """`can_infer_text`: the one option (A-D) whose lower-cased text is inside the answer."""
    answer = prediction.lower()
    hits = [LETTERS[i] for i, o in enumerate(options[:4]) if str(o).lower() in answer]
    return hits[0] if len(hits) == 1 else None


def mmbench_can_infer(text, options, answer):
    prediction = str(text).strip()  # mmbench_process_results strips the response
    got = mmbench_letter(prediction) or mmbench_text(prediction, options)
    return got, got is not None and got == answer


def mmbench_static(text, options, answer):
    """`can_infer`, else `extract_mcq_answer` over the letters of the options (A-D at most)."""
    got, _ = mmbench_can_infer(text, options, answer)
    if got is None:
        # The reference passes the sorted keys of `build_choices` (its options among A-D).
        got = mcq_extract(str(text), tuple(LETTERS[:min(len(options), 4)]) or tuple("ABCDEFGH"))
        got = got or None
    return got, got is not None and got == answer


# ----------------------------------------------------------------------------- SEED-Bench


def seed_bench(text, options, answer):
    pred = str(text).strip()
    if len(pred) > 1:
        pred = pred[0]
    got = pred.upper() if len(pred) == 1 and pred.upper() in LETTERS[:len(options)] else None
    return got, pred.lower().strip() == str(answer).lower().strip()


# ----------------------------------------------------------------------------- ScienceQA


def scienceqa(text, options, answer):
    target = str(answer).strip().lower()
    pred = str(text).strip()
    if pred.lower() == target:
        return answer, True
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        got = pred[0] if pred[0] in LETTERS[:len(options)] else None
        return got, pred[0].lower() == target
    got = pred.upper() if len(pred) == 1 and pred.upper() in LETTERS[:len(options)] else None
    return got, False


# ----------------------------------------------------------------------------- MVBench

_MV_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
             "@", "`", ",", "?", "!")
_MV_DIGIT_COMMA = re.compile(r"\d,\d")
_MV_PERIOD = re.compile(r"\.(?!\d)")
_MV_LEADING = re.compile(r"([A-E])\.\s*(.+)$", re.IGNORECASE)
_MV_LETTER = re.compile(r"\b([A-E])\b", re.IGNORECASE)


def _mv_punctuation(text: str) -> str:
    out = text
    digit_comma = _MV_DIGIT_COMMA.search(text) is not None
    for p in _MV_PUNCT:
        # Decided on the input text, applied to the running output.
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The reference passes re.UNICODE (32) as `count`: at most 32 periods go.
    return _MV_PERIOD.sub("", out, count=32)


def mvbench_normalize(text: str) -> str:
    """`mcq_acc`'s `process`: an upper-case letter A-E, or the cleaned lower-case text."""
    m = _MV_LEADING.match(text.strip())
    if m:
        return m.group(1).upper()
    s = text.replace("\n", " ").replace("\t", " ").strip()
    s = _mv_punctuation(s)
    for ch in ("'", '"', ")", "("):
        s = s.strip(ch)
    s = s.strip().lower()
    m = _MV_LETTER.search(s)
    return m.group(1).upper() if m else s


def mvbench(text, options, answer):
    pred = mvbench_normalize(str(text))
    got = pred if len(pred) == 1 and pred in LETTERS[:len(options)] else None
    return got, pred == mvbench_normalize(str(answer))


# ----------------------------------------------------------------------------- mcq_extract

_PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is",
            "the best answer is", "best answer is", "the correct option is", "correct option is",
            "the best option is", "best option is", "the choice is", "choice is",
            "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
            "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为",
            "选", "答えは")
# (format, pattern, priority): "X" written as the pattern with {} for the letter.
_MARKED = (("({})", 6), ("{}.", 5), ("{}:", 4), ("{})", 3), ("{} ", 2))
_STRIP_ONE_BY_ONE = (",", ".", "!", "?", ";", ":", "'", '"')


def mcq_extract(response: str | None, choices: Sequence[str] = tuple("ABCDEFGH")) -> str:
    """`extract_mcq_answer`: the best-ranked letter among its answer formats, or ""."""
    if not response or not response.strip():
        return ""
    text = response.strip()
    for ch in _STRIP_ONE_BY_ONE:
        text = text.strip(ch)
    text = f" {text} "
    found = []  # (priority, position, letter), in the reference's order
    for pattern, priority in _MARKED:
        for c in choices:
            at = text.rfind(pattern.format(c))
            if at >= 0:
                found.append((priority, at, c))
    lower = text.lower()
    for phrase in _PHRASES:
        at = lower.find(phrase)
        if at >= 0:
            for c in choices:
                pos = text.find(c, at + len(phrase))
                if pos >= 0:
                    found.append((7, pos, c))
    core = text.strip()
    for c in choices:
        if core.startswith(c) and (len(core) == 1 or not core[1].isalpha()):
            found.append((10, 0, c))
    for c in choices:
        if core.endswith(c) and (len(core) == 1 or not core[-2].isalpha()):
            found.append((9, len(text) - 1, c))
    if not found:
        found = [(0, text.rfind(c), c) for c in choices if c in text]
    if not found:
        return ""
    # Highest priority, then the latest position; the first listed among equals.
    return max(found, key=lambda f: (f[0], f[1]))[2]


def videomme(text, options, answer):
    got = mcq_extract(str(text), "ABCD")
    return got or None, got.lower() == str(answer).lower()


def mcq_generic(text, options, answer):
    got = mcq_extract(str(text), tuple(LETTERS[:len(options)]) if options else tuple("ABCDEFGH"))
    return got or None, bool(got) and got == answer


RULES: dict[str, Rule] = {"mmbench_static": mmbench_static, "mmbench_can_infer": mmbench_can_infer,
                          "seed_bench": seed_bench, "scienceqa": scienceqa, "mvbench": mvbench,
                          "videomme": videomme, "mcq_extract": mcq_generic}
# Other names accepted for a rule: "mmbench" is the format's default, lmms-eval's static mode.
ALIASES: dict[str, str] = {"mmbench": "mmbench_static"}
