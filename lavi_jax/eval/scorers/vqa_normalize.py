"""The VQA answer processor as lmms-eval 0.7.3 applies it (`_task_utils/vqa_eval_metric.py`).

`process_punctuation` and `process_digit_article` are the two steps of the official VQA
evaluation script; `word_tokenize` is the extra first step of the EvalAI / MMF processor that
TextVQA uses. Reproduced with their quirks, because scores depend on them:

- punctuation: a mark is deleted when it touches a space anywhere in the answer, or when the answer
  holds a digit,digit group ("1,000"); otherwise it becomes a space ("black-and-white" ->
  "black and white"). Apostrophes, colons and periods are not in the list.
- periods: a period not followed by a digit is deleted, but only the first 32 of them (the
  reference passes `re.UNICODE`, which is 32, as the `count` argument of `re.sub`).
- number words "none", "zero" ... "ten" become digits; then the articles "a", "an", "the" go.
- contractions: whole words looked up in `CONTRACTIONS`, the table of the official script,
  including its odd entries (capitalised keys that never match lower-cased text,
  "somebody'd" -> "somebodyd").
- `word_tokenize` (TextVQA only): lower case, delete every "," and "?", "'s" -> " 's", strip. So
  "london,england" becomes "londonengland" and no longer matches "london, england".
"""

from __future__ import annotations

import re

CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've",
    'couldnt': "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    'didnt': "didn't", 'doesnt': "doesn't", 'dont': "don't", 'hadnt': "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't", 'havent': "haven't",
    'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's", 'howd': "how'd",
    'howll': "how'll", 'hows': "how's", "Id've": "I'd've", "I'dve": "I'd've", 'Im': "I'm",
    'Ive': "I've", 'isnt': "isn't", 'itd': "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    'itll': "it'll", "let's": "let's", 'maam': "ma'am", 'mightnt': "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", 'mightve': "might've",
    'mustnt': "mustn't", 'mustve': "must've", 'neednt': "needn't", 'notve': "not've",
    'oclock': "o'clock", 'oughtnt': "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", 'shant': "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", 'shouldve': "should've", 'shouldnt': "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd',
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", 'somebodyll': "somebody'll",
    'somebodys': "somebody's", 'someoned': "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", 'someonell': "someone'll", 'someones': "someone's",
    'somethingd': "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", 'somethingll': "something'll", 'thats': "that's",
    'thered': "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    'therere': "there're", 'theres': "there's", 'theyd': "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", 'theyll': "they'll", 'theyre': "they're", 'theyve': "they've",
    'twas': "'twas", 'wasnt': "wasn't", "wed've": "we'd've", "we'dve": "we'd've", 'weve': "we've",
    'werent': "weren't", 'whatll': "what'll", 'whatre': "what're", 'whats': "what's",
    'whatve': "what've", 'whens': "when's", 'whered': "where'd", 'wheres': "where's",
    'whereve': "where've", 'whod': "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    'wholl': "who'll", 'whos': "who's", 'whove': "who've", 'whyll': "why'll", 'whyre': "why're",
    'whys': "why's", 'wont': "won't", 'wouldve': "would've", 'wouldnt': "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", 'yall': "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", 'youd': "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're", 'youve': "you've",
}

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")

_DIGIT_COMMAS_DIGIT = re.compile(r"\d,+\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its point)
_PERIOD_LIMIT = 32


def process_punctuation(text: str) -> str:
    """Punctuation step of the official VQA script."""
    out = text
    delete_all = _DIGIT_COMMAS_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        # Tested on the input text, applied to the running output.
        if delete_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """Lower case, number words to digits, articles dropped, contractions written out."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def word_tokenize(text: str) -> str:
    """The EvalAI processor's first step (TextVQA): lower, drop "," and "?", split off "'s"."""
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def _whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """VQAv2 answer processing (lmms-eval `vqav2_process_results`, both sides):
    "The Two dogs!" -> "2 dogs", "dont" -> "don't", "1,000" -> "1000"."""
    return process_digit_article(process_punctuation(_whitespace(text)))


def evalai_answer(text: str) -> str:
    """The full EvalAI answer processor (lmms-eval `EvalAIAnswerProcessor.__call__`, TextVQA)."""
    return process_digit_article(process_punctuation(_whitespace(word_tokenize(text))))
