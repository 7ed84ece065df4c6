"""LLM data synthesis under the method's constraints: rewrites, extensions, hard negatives.

    python -m tpembed.data.synthesize OPERATION INPUT OUTPUT --backend B --model M [options]
    tpembed-synthesize rewrite mined.jsonl rewrites.jsonl --backend vllm --model Qwen/Qwen2.5-7B-Instruct \\
        --eval dev/stsb_zh/validation.jsonl
    tpembed-synthesize hard-negatives mined.jsonl filled.jsonl --backend openai --model my-model \\
        --base-url http://127.0.0.1:8000/v1 --no-decontaminate

INPUT holds retrieval records {query, pos, negs, instruction} (anything tpembed reads: JSONL,
parquet, a directory of them, a saved dataset); OUTPUT is a JSONL file of retrieval records the
trainers read unchanged. Operations (QZhou-Embedding's data construction, docs/building-data.md):

  rewrite         paraphrase the query and every positive (--rewrite-fields), keeping meaning,
                  language and style; one output record per input record whose paraphrases all
                  passed, with its other fields (negatives, instruction) kept.
  extend          a new query, positive and hard negative on a shifted, neighbouring topic (not a
                  paraphrase); --extensions new records per input record.
  hard-negatives  records with fewer than --min-negatives negatives get generated ones up to that
                  number, each worse than the positive in one of the method's three ways (it
                  deviates from the query's intent, it adds irrelevant detail, it answers another
                  aspect of the same topic; the ways rotate over a record's missing slots). Every
                  input record is written, completed as far as generation succeeded.

Prompts are editable templates, data/prompts/en.yaml and zh.yaml (--prompts DIR for edited
copies), each with a worked example sent as an earlier user/assistant turn; a text gets the
Chinese prompt when at least half of its script units are CJK characters (a Han or kana
character is one unit, a run of other letters, a word, is one unit), else the English one. The
prompt states the length range and the share of change the answer must meet. The model answers
with one JSON object, parsed strictly: the whole answer (optionally inside one ``` fence) must be
an object with exactly the asked keys, each a non-empty string; anything else is a rejected try,
never a crash. A request may generate up to --max-new-tokens, and no more than an answer that
passes the length rule can need (twice its UTF-8 bytes, plus 48 for the keys).

Constraints, checked in this order on every try; the first that fails rejects it and the item is
asked again (a new seed) up to --max-tries times (20), then reported as failed:
  json            the answer parses as above
  language        the same script as the original (the zh/en rule above)
  length          within +/-15% (rewrites) or +/-20% (extensions, negatives) of the original's
                  length in characters (whitespace runs count as one): characters, not words or
                  tokens, so the rule means the same in Chinese and English and for every tokenizer
  difference      rewrites and extended queries/positives differ from their original by more than
                  30% (a sentence) or 20% (a paragraph: two or more sentences): the character
                  Levenshtein distance between the normalised texts (NFKC, case, whitespace and
                  punctuation folded away) divided by the longer one's length, 0 for a copy and 1
                  for nothing in common. Characters because Chinese has no spaces and a token
                  measure would change with the tokenizer; normalised so that casing and
                  punctuation edits do not count as rewriting
  not_positive    no generated text is a copy (after the same folding) of one of the positives
  unique          no generated text equals (after folding) a text of the input or an earlier
                  accepted output, nor another text of the same answer
  decontaminated  (with --eval) no generated text matches the evaluation data under
                  tpembed.data.decontaminate's rules (exact, 13-word / 20-character n-gram,
                  optionally --minhash)

Decontamination is not optional by omission: give the evaluation data with --eval FILE/DIR...
(the formats tpembed-decontaminate reads), or say --no-decontaminate; neither is a usage error.
Besides the per-try constraint, every output record is checked as a whole before it is written
(texts carried over from the input, such as a rewrite's negatives, included) and removed when it
matches; the report counts both.

Backends, one interface: `transformers` (any local causal LM or `gguf:FILE.gguf` /
`gguf:PACKAGE/FILE.gguf`, batched generate with left padding and the tokenizer's chat template,
seeded per batch), `vllm` (offline LLM.generate with one seeded SamplingParams per request;
needs `pip install 'tpembed[vllm]'` and a GPU) and `openai` (any OpenAI-compatible
/chat/completions server: vLLM's, SGLang's, llama.cpp's, a hosted API; --base-url, API key from
the environment variable named by --api-key-env, never printed; timeouts, retries with backoff on
timeouts, 408, 429 and 5xx; the request carries a seed, which servers may honour; --json-mode
schema asks for structured output holding exactly the answer's keys, object for any JSON object).

Cache and resuming: every answer is stored in an sqlite file (--cache-dir, default
OUTPUT.cache/, file answers.sqlite) under a hash of (backend, model, prompt, sampling settings
with the request's seed and token budget, JSON mode), committed after every batch. A killed run started
again asks the model only for what it had not answered; a rerun with --overwrite is answered from
the cache. Seeds are derived from (--seed, record number, slot, try), so a rerun sends the same
requests. The transformers backend seeds each batch, so an answer generated there also depends on
its batch's other requests: reruns from the same cache state are identical.

Output: the records, each with a "synthesis" field training ignores (operation, backend, model,
source "file:line", the record's id when it has one, the try that passed per slot, the seed),
written atomically: a failed or killed run leaves no OUTPUT, and an existing OUTPUT is replaced
only with --overwrite. OUTPUT.report.json (written after OUTPUT) and the printed report give:
records, items (one text or answer to generate), tries, answers from the cache, acceptance per
constraint, failed items, tokens generated and tokens/s, and the decontamination.

Bad input: a record without the fields the operation needs stops the run with
`file:line: field 'x': problem` (--skip-invalid skips and counts it instead); a backend that is not
installed, an existing output or missing decontamination choice is a usage error; a server that
refuses the key (401/403) or the URL/model (404), or that answers no request of a batch (down,
timing out, errors, non-JSON), stops the run with the server's message; a single failed request
is a rejected try.

Exit codes: 0 done (also when items failed: see the report), 1 a data or backend error, 2 a usage
error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sqlite3
import string
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpembed.data.formats import NEGATIVE_FIELDS, POSITIVE_FIELDS, QUERY_FIELDS, DataError, iter_rows
from tpembed.data.io import OutputExistsError, atomic_path, jsonl_output
from tpembed.data.mining import normalize_text, text_key

OPERATIONS = ("rewrite", "extend", "hard-negatives")
BACKENDS = ("transformers", "vllm", "openai")
CONSTRAINTS = ("json", "language", "length", "difference", "not_positive", "unique", "decontaminated")
HARD_NEGATIVE_WAYS = ("deviates", "irrelevant_detail", "other_aspect")
LANGUAGES = ("en", "zh")
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
CACHE_FILE = "answers.sqlite"
PROVENANCE_FIELD = "synthesis"
VLLM_HINT = "pip install 'tpembed[vllm]' (Linux with a CUDA GPU)"
MAX_FAILURE_EXAMPLES = 20

# Han (with extensions and compatibility ideographs), hiragana and katakana: scripts written without spaces
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_CJK_CHAR = re.compile(f"[{_CJK}]")
_SCRIPT_UNIT = re.compile(f"[{_CJK}]|[^\\W\\d_{_CJK}]+")  # one CJK character, or a run of other letters
# a sentence ends at 。！？!? or at a full stop followed by a space, and at a line break
_SENTENCE_END = re.compile(r"[。！？!?]+|\.+(?=\s)|\n+")
_FENCE = re.compile(r"\A```(?:json)?[ \t]*\n(.*)\n[ \t]*```\Z", re.DOTALL)


class UsageError(ValueError):
    """A request that cannot run as given (exit code 2)."""


class BackendUnavailable(UsageError):
    """The chosen backend's package is not installed; the message names the extra."""


class BackendError(RuntimeError):
    """The backend failed as a whole: a refused key, an unknown model, no usable answer in a batch."""


class AnswerError(ValueError):
    """A model answer that is not the JSON object asked for (a rejected try)."""


# ---- constraints -----------------------------------------------------------------------


def text_length(text: str) -> int:
    """Length in characters, every run of whitespace counting as one space."""
    return len(" ".join(text.split()))


def within_length(original: str, candidate: str, tolerance: float) -> bool:
    """True when the candidate's length is within +/- tolerance (0.15 = 15%) of the original's."""
    reference = text_length(original)
    return abs(text_length(candidate) - reference) <= tolerance * reference + 1e-9


def length_bounds(original: str, tolerance: float) -> tuple[int, int]:
    """The shortest and longest lengths `within_length` accepts (the numbers put in prompts)."""
    reference = text_length(original)
    return math.ceil(reference * (1 - tolerance) - 1e-9), math.floor(reference * (1 + tolerance) + 1e-9)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance over characters (insertion, deletion, substitution each cost 1).

    The usual two-row dynamic programme, one numpy row per character of the shorter string: a
    row's deletions and substitutions are elementwise, and its insertions are a running minimum,
    row[j] = j + min over k <= j of (row'[k] - k). A shared prefix and suffix are trimmed first."""
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    a, b = a[start:], b[start:]
    while a and b and a[-1] == b[-1]:
        a, b = a[:-1], b[:-1]
    if not a or not b:
        return len(a) + len(b)
    import numpy as np

    short, long = (a, b) if len(a) <= len(b) else (b, a)
    codes = np.fromiter(map(ord, long), dtype=np.int64, count=len(long))
    steps = np.arange(len(long) + 1, dtype=np.int64)
    row = steps.copy()
    for i, char in enumerate(short, start=1):
        upper = np.empty_like(row)
        upper[0] = i
        upper[1:] = np.minimum(row[1:] + 1, row[:-1] + (codes != ord(char)))
        row = np.minimum.accumulate(upper - steps) + steps
    return int(row[-1])


def normalized_edit_distance(a: str, b: str) -> float:
    """Edit distance of the folded texts (mining.normalize_text) over the longer one's length:
    0 for texts equal after folding, 1 for texts with nothing in common."""
    a, b = normalize_text(a), normalize_text(b)
    longer = max(len(a), len(b))
    return edit_distance(a, b) / longer if longer else 0.0


def is_paragraph(text: str) -> bool:
    """Two or more sentences (ended by 。！？!?, a full stop before a space, or a line break)."""
    return sum(1 for part in _SENTENCE_END.split(text) if part.strip()) >= 2


def differs_enough(original: str, candidate: str, sentence_min: float = 0.30, paragraph_min: float = 0.20) -> bool:
    """True when the candidate differs from the original by more than the method's share:
    30% for a sentence, 20% for a paragraph (the original decides which)."""
    threshold = paragraph_min if is_paragraph(original) else sentence_min
    return normalized_edit_distance(original, candidate) > threshold


def detect_language(text: str) -> str | None:
    """ "zh" when at least half of the text's script units are CJK characters (a Han or kana
    character is a unit, a run of other letters is one), "en" when other letters dominate, None
    for a text without letters. A script rule, not language identification: French reads as "en"."""
    units = _SCRIPT_UNIT.findall(text)
    if not units:
        return None
    cjk = sum(1 for unit in units if _CJK_CHAR.fullmatch(unit))
    return "zh" if 2 * cjk >= len(units) else "en"


def same_language(original: str, candidate: str) -> bool:
    """True when the candidate is in the original's script; an original without letters accepts any."""
    language = detect_language(original)
    return language is None or detect_language(candidate) == language


def copies_positive(candidate: str, positives: Sequence[str]) -> bool:
    """True when the candidate equals one of the positives after folding case, width, spaces and punctuation."""
    key = normalize_text(candidate)
    return any(normalize_text(positive) == key for positive in positives)


class SeenTexts:
    """The folded texts seen so far (the input's and every accepted output's), as 63-bit hashes."""

    def __init__(self) -> None:
        self._keys: set[int] = set()

    @staticmethod
    def key(text: str) -> int:
        return text_key(normalize_text(text))

    def __contains__(self, text: str) -> bool:
        return self.key(text) in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, text: str) -> None:
        self._keys.add(self.key(text))


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) < len(keys):
        raise AnswerError("the JSON object repeats a key")
    return dict(pairs)


def parse_answer(raw: str, keys: Sequence[str]) -> dict[str, str]:
    """The model's answer as {key: text}, strictly: the answer (optionally inside one ``` fence)
    is one JSON object with exactly `keys`, each a non-empty string. Raises AnswerError."""
    text = raw.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        value = json.loads(text, object_pairs_hook=_refuse_duplicates)
    except AnswerError:
        raise
    except (ValueError, RecursionError) as error:
        raise AnswerError(f"not JSON ({str(error).split(':')[0]})") from None
    if not isinstance(value, dict):
        raise AnswerError(f"not a JSON object (a {type(value).__name__})")
    if set(value) != set(keys):
        raise AnswerError(f"keys {sorted(value)}, expected {sorted(keys)}")
    for key in keys:
        if not isinstance(value[key], str) or not value[key].strip():
            raise AnswerError(f"'{key}' is not a non-empty string")
    return {key: value[key].strip() for key in keys}


# ---- prompts ---------------------------------------------------------------------------

TEXT_BOUNDS = frozenset({"text", "min_chars", "max_chars", "min_change"})
PROMPT_PLACEHOLDERS = {
    "rewrite_query": TEXT_BOUNDS,
    "rewrite_passage": TEXT_BOUNDS,
    "extend": frozenset(
        {"query", "positive", "negative"}
        | {f"{name}_{end}" for name in ("query", "positive", "negative") for end in ("min", "max")}
    ),
    "hard_negative": frozenset({"query", "positive", "way", "min_chars", "max_chars"}),
}


def _placeholders(template: string.Template) -> set[str]:
    found = set()
    for match in template.pattern.finditer(template.template):
        if match.group("invalid") is not None:
            raise ValueError(f"a '$' that starts no placeholder at offset {match.start('invalid')} (write $$)")
        found.add(match.group("named") or match.group("braced") or "")
    return found - {""}


# the texts each template is filled from, and the keys its JSON answer must have
PROMPT_INPUTS = {
    "rewrite_query": ("text",),
    "rewrite_passage": ("text",),
    "extend": ("query", "positive", "negative"),
    "hard_negative": ("query", "positive", "way"),
}
ANSWER_KEYS = {
    "rewrite_query": ("text",),
    "rewrite_passage": ("text",),
    "extend": ("query", "positive", "negative"),
    "hard_negative": ("negative",),
}


@dataclass(frozen=True)
class Example:
    """A worked example of a prompt, sent as an earlier turn of the chat: the texts its template is
    filled from and the answer (as JSON). Small models follow the answer format far more often."""

    inputs: dict[str, str]
    answer: str


@dataclass(frozen=True)
class Prompts:
    """The prompt templates of both languages: a system message, one user template per task, the
    descriptions of the three hard-negative ways, and optional worked examples."""

    system: dict[str, str]
    templates: dict[tuple[str, str], string.Template]
    ways: dict[str, dict[str, str]]
    examples: dict[tuple[str, str], Example]
    source: str

    def render(self, language: str, name: str, values: dict[str, Any]) -> str:
        """Template `name` of `language` with its placeholders filled."""
        return self.templates[(language, name)].substitute({key: str(value) for key, value in values.items()})


def load_prompts(directory: str | Path | None = None) -> Prompts:
    """Read en.yaml and zh.yaml from `directory` (default: the packaged data/prompts), checking
    that each holds every template with only known placeholders, the three ways, and examples
    with the right texts and answer keys."""
    import yaml

    directory = Path(directory) if directory is not None else PROMPTS_DIR
    system, templates, ways, examples = {}, {}, {}, {}
    for language in LANGUAGES:
        path = directory / f"{language}.yaml"
        if not path.is_file():
            raise UsageError(f"{path}: no such prompt file (a prompts folder holds en.yaml and zh.yaml)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise UsageError(f"{path}: not valid YAML ({error})") from None
        if not isinstance(data, dict) or not isinstance(data.get("system"), str):
            raise UsageError(f"{path}: expected a mapping with a 'system' text")
        system[language] = data["system"]
        for name, allowed in PROMPT_PLACEHOLDERS.items():
            templates[(language, name)] = _checked_template(path, data, name, allowed)
        found = data.get("ways")
        if not isinstance(found, dict) or set(found) != set(HARD_NEGATIVE_WAYS):
            raise UsageError(f"{path}: 'ways' must describe exactly {', '.join(HARD_NEGATIVE_WAYS)}")
        ways[language] = {way: str(found[way]) for way in HARD_NEGATIVE_WAYS}
        for name, example in (data.get("examples") or {}).items():
            examples[(language, name)] = _checked_example(path, name, example)
    return Prompts(system, templates, ways, examples, str(directory))


def _checked_example(path: Path, name: str, example: Any) -> Example:
    if name not in PROMPT_INPUTS:
        raise UsageError(f"{path}: example for unknown prompt '{name}' (known: {', '.join(PROMPT_INPUTS)})")
    answer = example.get("answer") if isinstance(example, dict) else None
    inputs = {key: value for key, value in example.items() if key != "answer"} if isinstance(example, dict) else {}
    if set(inputs) != set(PROMPT_INPUTS[name]) or not all(isinstance(v, str) for v in inputs.values()):
        raise UsageError(f"{path}: examples.{name} needs the texts {', '.join(PROMPT_INPUTS[name])} and an answer")
    if name == "hard_negative" and inputs["way"] not in HARD_NEGATIVE_WAYS:
        raise UsageError(f"{path}: examples.{name}.way must be one of {', '.join(HARD_NEGATIVE_WAYS)}")
    if not isinstance(answer, dict) or set(answer) != set(ANSWER_KEYS[name]):
        raise UsageError(f"{path}: examples.{name}.answer must be a mapping with keys {', '.join(ANSWER_KEYS[name])}")
    return Example(inputs, json.dumps(answer, ensure_ascii=False))


def _checked_template(path: Path, data: dict, name: str, allowed: frozenset) -> string.Template:
    text = data.get(name)
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"{path}: '{name}' is missing or not a text")
    template = string.Template(text)
    try:
        unknown = _placeholders(template) - allowed
    except ValueError as error:
        raise UsageError(f"{path}: '{name}': {error}") from None
    if unknown:
        raise UsageError(f"{path}: '{name}' uses unknown placeholders {sorted(unknown)} (known: {sorted(allowed)})")
    return template


# ---- backends --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """Sampling settings shared by every request of a run (0 temperature: greedy)."""

    temperature: float = 0.8
    top_p: float = 0.95


@dataclass(frozen=True)
class Request:
    """One generation: chat messages ((role, content), ...), a token budget, a seed, and the keys
    of the JSON object that answers it (for backends that can constrain decoding to them)."""

    messages: tuple[tuple[str, str], ...]
    max_tokens: int
    seed: int
    keys: tuple[str, ...] = ()

    def chat(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass(frozen=True)
class Answer:
    """A backend's answer: the text and the tokens generated (None: the server did not say),
    or an error for this request alone."""

    text: str | None
    tokens: int | None = 0
    error: str | None = None


class Backend:
    """What the synthesis asks of a generator: `generate` answers a batch of requests in order.
    `name` and `model` are part of every cache key; `batch_size` requests go to `generate` at once."""

    name = "backend"
    model = ""
    batch_size = 8

    def generate(self, requests: Sequence[Request], sampling: Sampling) -> list[Answer]:
        raise NotImplementedError


def _chat_text(tokenizer, messages: list[dict[str, str]]) -> tuple[str, bool]:
    """The prompt text in the tokenizer's chat template with the assistant turn opened, and
    whether the tokenizer should still add its special tokens (only without a template)."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
        except Exception:  # a template that refuses a system turn raises its own (jinja) error type
            first = {"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
            merged = [first, *messages[2:]]
            return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True), False
    return "\n\n".join(message["content"] for message in messages) + "\n\n", True


def _stable_int(*parts: Any, bits: int = 31) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - bits)


def gguf_source(spec: str) -> tuple[str, str] | None:
    """(folder, file name) of a `gguf:PATH.gguf` or `gguf:PACKAGE/FILE.gguf` spec, else None."""
    if not spec.startswith("gguf:"):
        return None
    inner = spec[len("gguf:") :]
    path = Path(inner).expanduser()
    if not path.is_file():
        import importlib.util

        package, _, rest = inner.partition("/")
        found = importlib.util.find_spec(package) if package and rest else None
        if found is None or not found.submodule_search_locations:
            raise UsageError(f"GGUF file {inner!r} not found, neither as a path nor inside an installed package")
        path = Path(list(found.submodule_search_locations)[0]) / rest
        if not path.is_file():
            raise UsageError(f"GGUF file {inner!r} not found inside the package {package}")
    return str(path.resolve().parent), path.name


class TransformersBackend(Backend):
    """Any local causal LM through transformers' batched `generate` (left padding, the chat
    template when the tokenizer has one, sampling seeded per batch)."""

    name = "transformers"

    def __init__(self, model, tokenizer, *, model_name: str, batch_size: int = 8):
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise UsageError(f"{model_name}: the tokenizer has neither a pad nor an end-of-text token")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.lm, self.tokenizer, self.model, self.batch_size = model.eval(), tokenizer, model_name, batch_size
        configured = getattr(model.generation_config, "eos_token_id", None)
        configured = configured if isinstance(configured, list) else [configured]
        self.stop_ids = {i for i in (*configured, tokenizer.eos_token_id) if i is not None}

    @classmethod
    def load(
        cls,
        spec: str,
        *,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int = 8,
        trust_remote_code: bool = False,
    ) -> TransformersBackend:
        """Load a model directory, a hub id or a `gguf:` file (dequantised in memory)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = gguf_source(spec)
        source, extra = (gguf[0], {"gguf_file": gguf[1]}) if gguf else (spec, {})
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, **extra
        )
        return cls(model.to(device), tokenizer, model_name=spec, batch_size=batch_size)

    def generate(self, requests: Sequence[Request], sampling: Sampling) -> list[Answer]:
        import torch

        rendered = [_chat_text(self.tokenizer, request.chat()) for request in requests]
        encoded = self.tokenizer(
            [text for text, _ in rendered], return_tensors="pt", padding=True, add_special_tokens=rendered[0][1]
        ).to(self.lm.device)
        options = {"max_new_tokens": max(r.max_tokens for r in requests), "pad_token_id": self.tokenizer.pad_token_id}
        options["eos_token_id"] = sorted(self.stop_ids)
        if sampling.temperature > 0:
            options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        devices = [self.lm.device.index or 0] if self.lm.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(_stable_int(*(r.seed for r in requests), bits=63))
            output = self.lm.generate(**encoded, **options)
        new_tokens = output[:, encoded["input_ids"].shape[1] :].tolist()
        return [self._answer(ids, request.max_tokens) for ids, request in zip(new_tokens, requests)]

    def _answer(self, ids: list[int], max_tokens: int) -> Answer:
        """The text up to and with the first stop token, within the request's own budget."""
        ids = ids[:max_tokens]
        for position, token in enumerate(ids):
            if token in self.stop_ids:
                ids = ids[: position + 1]
                break
        return Answer(self.tokenizer.decode(ids, skip_special_tokens=True), len(ids))


class VllmBackend(Backend):
    """vLLM's offline engine: one LLM.generate call per batch, a seeded SamplingParams per request,
    prompts rendered with the model's chat template exactly as the transformers backend does."""

    name = "vllm"

    def __init__(
        self,
        spec: str,
        *,
        seed: int = 0,
        dtype: str = "auto",
        batch_size: int = 1024,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
    ):
        try:
            import vllm
        except ImportError:
            raise BackendUnavailable(f"the vllm backend needs the vllm package: {VLLM_HINT}") from None
        gguf = gguf_source(spec)
        options = dict(
            model=str(Path(*gguf)) if gguf else spec,
            seed=seed,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=trust_remote_code,
        )
        if max_model_len:
            options["max_model_len"] = max_model_len
        self._sampling_params = vllm.SamplingParams
        self.llm = vllm.LLM(**options)
        self.model, self.batch_size = spec, batch_size

    def generate(self, requests: Sequence[Request], sampling: Sampling) -> list[Answer]:
        tokenizer = self.llm.get_tokenizer()
        prompts = []
        for request in requests:
            text, add_special = _chat_text(tokenizer, request.chat())
            prompts.append({"prompt_token_ids": tokenizer(text, add_special_tokens=add_special)["input_ids"]})
        params = [
            self._sampling_params(
                temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=r.max_tokens, seed=r.seed
            )
            for r in requests
        ]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        return [Answer(output.outputs[0].text, len(output.outputs[0].token_ids)) for output in outputs]


JSON_MODES = ("off", "object", "schema")


def answer_schema(keys: Sequence[str]) -> dict:
    """The OpenAI `response_format` that constrains decoding to one JSON object holding exactly
    `keys`, each a string (structured outputs: vLLM, SGLang, llama.cpp's server, OpenAI). The
    answer is still parsed and every constraint checked; only its form is guaranteed (an empty
    or blank string fits the schema and is a rejected try: `minLength` and `pattern` are left out
    because servers differ on which of them they accept, and one they refuse fails every request)."""
    if not keys:
        raise ValueError("a JSON schema answer needs the keys it must hold")
    schema = {
        "type": "object",
        "properties": {key: {"type": "string"} for key in keys},
        "required": list(keys),
        "additionalProperties": False,
    }
    return {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": schema}}


class OpenAIBackend(Backend):
    """Any OpenAI-compatible /chat/completions server, over the standard library's urllib with
    `concurrency` requests in flight. The API key is read from the environment and never shown."""

    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        retries: int = 3,
        retry_backoff: float = 1.0,
        concurrency: int = 8,
        batch_size: int | None = None,
        json_mode: str | bool = "off",
    ):
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise UsageError("the openai backend needs --base-url (or OPENAI_BASE_URL), e.g. http://127.0.0.1:8000/v1")
        if not base_url.startswith(("http://", "https://")):
            raise UsageError(f"--base-url must start with http:// or https://, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self._api_key = os.environ.get(api_key_env) or None
        self.timeout, self.retries, self.retry_backoff = timeout, retries, retry_backoff
        self.concurrency = max(1, concurrency)
        self.json_mode = {False: "off", True: "object"}.get(json_mode, json_mode)
        if self.json_mode not in JSON_MODES:
            raise UsageError(f"--json-mode is one of {', '.join(JSON_MODES)}, got {json_mode!r}")
        self.batch_size = batch_size or 4 * self.concurrency

    def generate(self, requests: Sequence[Request], sampling: Sampling) -> list[Answer]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(lambda request: self._complete(request, sampling), requests))

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _complete(self, request: Request, sampling: Sampling) -> Answer:
        """One request with retries on timeouts, 408, 429 and 5xx; fatal refusals raise BackendError."""
        body = {"model": self.model, "messages": request.chat(), "max_tokens": request.max_tokens}
        body.update(temperature=sampling.temperature, top_p=sampling.top_p, seed=request.seed, n=1)
        if self.json_mode == "object":
            body["response_format"] = {"type": "json_object"}
        elif self.json_mode == "schema":
            body["response_format"] = answer_schema(request.keys)
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.retry_backoff * 2 ** (attempt - 1))
            status, payload, problem = self._post(data)
            if status == 200:
                return self._answer(payload)
            if status in (401, 403):
                raise BackendError(f"{problem} (the API key is read from ${self.api_key_env})")
            if status == 404:
                raise BackendError(f"{problem} (check --base-url and --model)")
            if status is not None and status < 500 and status not in (408, 429):
                return Answer(None, 0, error=problem)
        return Answer(None, 0, error=problem)

    def _post(self, data: bytes) -> tuple[int | None, bytes, str]:
        """(HTTP status or None, body, problem) of one POST; never raises for network trouble."""
        import urllib.error
        import urllib.request

        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, response.read(), ""
        except urllib.error.HTTPError as error:
            detail = error.read()[:300].decode("utf-8", "replace")
            return error.code, b"", self._redact(f"HTTP {error.code} from {self.url}: {detail}")
        except (OSError, ValueError) as error:  # refused, unreachable, timed out, a broken response
            reason = getattr(error, "reason", None) or error
            return None, b"", self._redact(f"no answer from {self.url}: {reason} (timeout {self.timeout:g} s)")

    def _answer(self, payload: bytes) -> Answer:
        try:
            data = json.loads(payload)
            content = data["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError
        except (ValueError, KeyError, IndexError, TypeError):
            preview = payload[:120].decode("utf-8", "replace")
            return Answer(
                None, 0, error=self._redact(f"the answer from {self.url} is not chat-completions JSON: {preview!r}")
            )
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        tokens = usage.get("completion_tokens")
        return Answer(content, tokens if isinstance(tokens, int) else None)


def make_backend(name: str, model: str, **options: Any) -> Backend:
    """Build a backend by name; `options` are its constructor's keyword arguments."""
    if name == "transformers":
        return TransformersBackend.load(model, **options)
    if name == "vllm":
        return VllmBackend(model, **options)
    if name == "openai":
        return OpenAIBackend(model, **options)
    raise UsageError(f"unknown backend {name!r} (one of {', '.join(BACKENDS)})")


# ---- the answer cache ------------------------------------------------------------------


def request_key(backend: Backend, request: Request, sampling: Sampling) -> str:
    """The cache key: a hash of the backend, the model, the prompt, every sampling setting and
    how decoding was constrained (a JSON schema names the answer's keys)."""
    identity = [backend.name, backend.model, request.messages, request.max_tokens, request.seed]
    mode = getattr(backend, "json_mode", "off")
    identity += [sampling.temperature, sampling.top_p, {"off": False, "object": True}.get(mode, [mode, request.keys])]
    return hashlib.sha256(json.dumps(identity, ensure_ascii=False).encode("utf-8")).hexdigest()


class AnswerCache:
    """Answers on disk in sqlite, keyed by `request_key`. Every batch is one transaction, so a
    killed run loses at most the batch in flight."""

    def __init__(self, path: str | Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), timeout=60)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, text TEXT NOT NULL, tokens INTEGER)"
        )
        self._db.commit()

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def get_many(self, keys: Sequence[str]) -> dict[str, Answer]:
        found = {}
        for start in range(0, len(keys), 500):
            part = list(keys[start : start + 500])
            marks = ",".join("?" * len(part))
            for key, text, tokens in self._db.execute(
                f"SELECT key, text, tokens FROM answers WHERE key IN ({marks})", part
            ):
                found[key] = Answer(text, tokens)
        return found

    def put_many(self, entries: Sequence[tuple[str, Answer]]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO answers (key, text, tokens) VALUES (?, ?, ?)",
                [(key, answer.text, answer.tokens) for key, answer in entries],
            )

    def close(self) -> None:
        self._db.close()


# ---- settings, items and the report ----------------------------------------------------


@dataclass
class Settings:
    """Everything of a run but its files and backend; the defaults are the method's numbers."""

    max_tries: int = 20
    rewrite_length_tolerance: float = 0.15
    length_tolerance: float = 0.20
    sentence_difference: float = 0.30
    paragraph_difference: float = 0.20
    rewrite_fields: tuple[str, ...] = ("query", "pos")
    extensions: int = 1
    min_negatives: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int = 0
    chunk_size: int = 256
    window: int = 32768
    skip_invalid: bool = False
    prompts_dir: str | None = None
    minhash: float | None = None


@dataclass(frozen=True)
class Target:
    """One text an answer must hold: its JSON key, the original whose language and length it
    must match (within `tolerance`), and the text it must differ from (rewrites, extensions)."""

    key: str
    original: str
    tolerance: float
    differ_from: str | None = None


@dataclass
class Item:
    """One thing to generate (a paraphrase, an extension, one missing negative) and its tries."""

    slot: str  # "query", "pos[0]", "extend[0]", "negs[3]"
    messages: tuple[tuple[str, str], ...]
    targets: tuple[Target, ...]
    positives: tuple[str, ...]
    max_tokens: int
    extra: dict = field(default_factory=dict)
    answer: dict[str, str] | None = None
    tries: int = 0
    rejection: str = ""


@dataclass
class Job:
    """An input record, where it is, and its items."""

    index: int
    location: str
    record: dict
    view: RetrievalView
    items: list[Item]


@dataclass
class RunReport:
    """What a synthesis run did: counts, acceptance per constraint, tokens and speed."""

    operation: str = ""
    backend: str = ""
    model: str = ""
    input: str = ""
    output: str = ""
    records_read: int = 0
    records_written: int = 0
    records_skipped: dict[str, int] = field(default_factory=dict)
    items: int = 0
    items_accepted: int = 0
    items_failed: int = 0
    tries: int = 0
    answers_cached: int = 0
    answers_generated: int = 0
    backend_errors: int = 0
    constraints: dict[str, list[int]] = field(default_factory=dict)  # name -> [checked, passed]
    tokens_generated: int = 0
    answers_without_token_count: int = 0
    generation_seconds: float = 0.0
    seconds: float = 0.0
    decontamination: dict[str, Any] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)

    def count(self, constraint: str, passed: bool) -> None:
        counts = self.constraints.setdefault(constraint, [0, 0])
        counts[0] += 1
        counts[1] += int(passed)

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens_generated / self.generation_seconds if self.generation_seconds > 0 else None

    def to_dict(self) -> dict:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["constraints"] = {
            name: {"checked": checked, "passed": passed, "acceptance": round(passed / checked, 4) if checked else None}
            for name, (checked, passed) in self.constraints.items()
        }
        data["tokens_per_second"] = self.tokens_per_second
        return data

    def format(self) -> str:
        lines = [
            f"{self.operation} with {self.backend}:{self.model}: read {self.records_read} records, "
            f"wrote {self.records_written} to {self.output}",
            f"items {self.items}: accepted {self.items_accepted}, failed {self.items_failed}; tries {self.tries} "
            f"(answers from the cache {self.answers_cached}, generated {self.answers_generated}, "
            f"backend errors {self.backend_errors})",
            f"{'constraint':<16}{'checked':>9}{'passed':>9}{'acceptance':>12}",
        ]
        for name in CONSTRAINTS:
            if name in self.constraints:
                checked, passed = self.constraints[name]
                rate = f"{100 * passed / checked:.1f}%" if checked else "-"
                lines.append(f"{name:<16}{checked:>9}{passed:>9}{rate:>12}")
        speed = self.tokens_per_second
        lines.append(
            f"tokens generated {self.tokens_generated} in {self.generation_seconds:.1f} s"
            + (f": {speed:.1f} tokens/s" if speed is not None else "")
            + (
                f" ({self.answers_without_token_count} answers without a token count)"
                if self.answers_without_token_count
                else ""
            )
        )
        lines.append(_format_decontamination(self.decontamination))
        lines += [f"  skipped {count}: {reason}" for reason, count in self.records_skipped.items()]
        lines += [
            f"  failed: {failure['source']} {failure['slot']} after {failure['tries']} tries, "
            f"last: {failure['last_rejection'][:100]}"
            for failure in self.failures[:3]
        ]
        return "\n".join(lines)


def _format_decontamination(info: dict) -> str:
    if not info.get("enabled"):
        return "decontamination: off (--no-decontaminate): no decontamination set was given"
    return (
        f"decontamination against {', '.join(info['eval_sources'])} ({info['eval_texts']} texts): "
        f"{info['tries_rejected']} tries rejected, {info['records_removed']} output records removed"
    )


# ---- operations ------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievalView:
    """The retrieval fields of a record and the names they were found under."""

    query_field: str
    query: str
    pos_field: str
    positives: tuple[str, ...]
    neg_field: str
    negatives: tuple[str, ...]


def _field(record: dict, names: tuple[str, ...]) -> tuple[str | None, Any]:
    for name in names:
        if name in record:
            return name, record[name]
    return None, None


def _texts(record: dict, names: tuple[str, ...], location: str, required: bool) -> tuple[str, list[str]]:
    name, value = _field(record, names)
    if name is None or value is None:
        if required:
            raise DataError(location, names[0], f"missing (accepted names: {', '.join(names)})")
        return names[0], []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise DataError(location, name, "expected a string or a list of strings")
    values = [v for v in values if v.strip()]
    if required and not values:
        raise DataError(location, name, "no non-empty text")
    return name, values


def read_view(record: dict, location: str) -> RetrievalView:
    """The query, positives and negatives of a retrieval record; DataError names what is missing."""
    query_field, query = _texts(record, QUERY_FIELDS, location, required=True)
    if len(query) != 1:
        raise DataError(location, query_field, "expected one query text")
    pos_field, positives = _texts(record, POSITIVE_FIELDS, location, required=True)
    neg_field, negatives = _texts(record, NEGATIVE_FIELDS, location, required=False)
    return RetrievalView(query_field, query[0], pos_field, tuple(positives), neg_field, tuple(negatives))


def token_budget(targets: Sequence[Target], max_new_tokens: int) -> int:
    """The most tokens a passing answer could need: a token never covers less than one UTF-8 byte
    and a JSON escape (\\u4e00) takes at most twice a character's bytes, plus room for the keys."""
    longest = sum(math.ceil(len(t.original.encode("utf-8")) * (1 + t.tolerance)) for t in targets)
    return min(max_new_tokens, 48 + 2 * longest)


def template_values(name: str, inputs: dict[str, str], language: str, settings: Settings, prompts: Prompts) -> dict:
    """The placeholders of template `name` filled from its input texts: the texts, the length
    bounds the answer must keep, the share it must change, the hard-negative way's description."""
    if name in ("rewrite_query", "rewrite_passage"):
        text = inputs["text"]
        low, high = length_bounds(text, settings.rewrite_length_tolerance)
        change = settings.paragraph_difference if is_paragraph(text) else settings.sentence_difference
        return {"text": text, "min_chars": low, "max_chars": high, "min_change": round(100 * change)}
    if name == "extend":
        values = dict(inputs)
        for key in ("query", "positive", "negative"):
            values[f"{key}_min"], values[f"{key}_max"] = length_bounds(inputs[key], settings.length_tolerance)
        return values
    low, high = length_bounds(inputs["positive"], settings.length_tolerance)
    way = prompts.ways[language][inputs["way"]]
    return {"query": inputs["query"], "positive": inputs["positive"], "way": way, "min_chars": low, "max_chars": high}


class Operation:
    """An operation plans the items of a record and builds its output records from their answers."""

    name = ""

    def __init__(self, settings: Settings, prompts: Prompts):
        self.settings, self.prompts = settings, prompts

    def plan(self, view: RetrievalView) -> list[Item]:
        raise NotImplementedError

    def finish(self, job: Job, provenance: dict) -> list[dict]:
        raise NotImplementedError

    def messages(self, language: str, name: str, inputs: dict[str, str]) -> tuple[tuple[str, str], ...]:
        """The chat: the system message, the template's worked example (when the prompts have one)
        as a user and an assistant turn, then the filled template."""
        turns = [("system", self.prompts.system[language])]
        example = self.prompts.examples.get((language, name))
        if example is not None:
            values = template_values(name, example.inputs, language, self.settings, self.prompts)
            turns += [("user", self.prompts.render(language, name, values)), ("assistant", example.answer)]
        values = template_values(name, inputs, language, self.settings, self.prompts)
        return (*turns, ("user", self.prompts.render(language, name, values)))

    def _item(self, slot: str, name: str, inputs: dict[str, str], targets: tuple[Target, ...], positives) -> Item:
        language = detect_language(" ".join(inputs[key] for key in PROMPT_INPUTS[name] if key != "way")) or "en"
        messages = self.messages(language, name, inputs)
        return Item(slot, messages, targets, tuple(positives), token_budget(targets, self.settings.max_new_tokens))


class Rewrite(Operation):
    """Paraphrases of the query and/or every positive; the record is written when all passed."""

    name = "rewrite"

    def plan(self, view: RetrievalView) -> list[Item]:
        texts = [("query", view.query, "rewrite_query")] if "query" in self.settings.rewrite_fields else []
        if "pos" in self.settings.rewrite_fields:
            texts += [(f"pos[{i}]", text, "rewrite_passage") for i, text in enumerate(view.positives)]
        tolerance = self.settings.rewrite_length_tolerance
        return [
            self._item(slot, name, {"text": text}, (Target("text", text, tolerance, differ_from=text),), view.positives)
            for slot, text, name in texts
        ]

    def finish(self, job: Job, provenance: dict) -> list[dict]:
        if any(item.answer is None for item in job.items):
            return []
        record, positives = dict(job.record), list(job.view.positives)
        for item in job.items:
            if item.slot == "query":
                record[job.view.query_field] = item.answer["text"]
            else:
                positives[int(item.slot[4:-1])] = item.answer["text"]
        record[job.view.pos_field] = positives
        record[PROVENANCE_FIELD] = provenance
        return [record]


class Extend(Operation):
    """New (query, positive, negative) records on a shifted topic next to the original's."""

    name = "extend"

    def plan(self, view: RetrievalView) -> list[Item]:
        tolerance = self.settings.length_tolerance
        negative = view.negatives[0] if view.negatives else view.positives[0]
        targets = (
            Target("query", view.query, tolerance, differ_from=view.query),
            Target("positive", view.positives[0], tolerance, differ_from=view.positives[0]),
            Target("negative", negative, tolerance),
        )
        inputs = {"query": view.query, "positive": view.positives[0], "negative": negative}
        return [
            self._item(f"extend[{k}]", "extend", inputs, targets, view.positives)
            for k in range(self.settings.extensions)
        ]

    def finish(self, job: Job, provenance: dict) -> list[dict]:
        records = []
        for item in job.items:
            if item.answer is None:
                continue
            answer = item.answer
            record = {"query": answer["query"], "pos": [answer["positive"]], "negs": [answer["negative"]]}
            if job.record.get("instruction"):
                record["instruction"] = job.record["instruction"]
            record[PROVENANCE_FIELD] = {**provenance, "tries": {item.slot: item.tries}}
            records.append(record)
        return records


class HardNegatives(Operation):
    """Generated negatives for records with fewer than `min_negatives`, the three ways rotating."""

    name = "hard-negatives"

    def plan(self, view: RetrievalView) -> list[Item]:
        positive, tolerance = view.positives[0], self.settings.length_tolerance
        targets = (Target("negative", positive, tolerance),)
        items = []
        for slot in range(len(view.negatives), self.settings.min_negatives):
            way = HARD_NEGATIVE_WAYS[slot % len(HARD_NEGATIVE_WAYS)]
            inputs = {"query": view.query, "positive": positive, "way": way}
            item = self._item(f"negs[{slot}]", "hard_negative", inputs, targets, view.positives)
            item.extra["way"] = way
            items.append(item)
        return items

    def finish(self, job: Job, provenance: dict) -> list[dict]:
        accepted = [item for item in job.items if item.answer is not None]
        if not accepted:
            return [job.record]
        record = dict(job.record)
        record[job.view.neg_field] = [*job.view.negatives, *(item.answer["negative"] for item in accepted)]
        record[PROVENANCE_FIELD] = {**provenance, "ways": {item.slot: item.extra["way"] for item in accepted}}
        return [record]


OPERATION_CLASSES = {cls.name: cls for cls in (Rewrite, Extend, HardNegatives)}


# ---- the run ---------------------------------------------------------------------------


class CachedGenerator:
    """Answers requests from the cache, and the rest from the backend in batches, each batch
    stored as soon as it returns. A batch in which no request got an answer stops the run."""

    def __init__(self, backend: Backend, cache: AnswerCache, sampling: Sampling, report: RunReport):
        self.backend, self.cache, self.sampling, self.report = backend, cache, sampling, report

    def answers(self, requests: Sequence[Request]) -> list[Answer]:
        keys = [request_key(self.backend, request, self.sampling) for request in requests]
        found = self.cache.get_many(keys)
        answers = [found.get(key) for key in keys]
        self.report.answers_cached += sum(answer is not None for answer in answers)
        missing = [i for i, answer in enumerate(answers) if answer is None]
        for start in range(0, len(missing), self.backend.batch_size):
            batch = missing[start : start + self.backend.batch_size]
            began = time.perf_counter()
            generated = self.backend.generate([requests[i] for i in batch], self.sampling)
            self.report.generation_seconds += time.perf_counter() - began
            if all(answer.error is not None for answer in generated):
                raise BackendError(f"{self.backend.name} answered none of {len(batch)} requests: {generated[0].error}")
            self._account(generated)
            self.cache.put_many([(keys[i], answer) for i, answer in zip(batch, generated) if answer.error is None])
            for i, answer in zip(batch, generated):
                answers[i] = answer
        return answers

    def _account(self, generated: Sequence[Answer]) -> None:
        for answer in generated:
            if answer.error is not None:
                continue
            self.report.answers_generated += 1
            if answer.tokens is None:
                self.report.answers_without_token_count += 1
            else:
                self.report.tokens_generated += answer.tokens


class Judge:
    """Checks one answer against every constraint in order, counting each in the report."""

    def __init__(self, settings: Settings, seen: SeenTexts, decontaminator, report: RunReport):
        self.settings, self.seen, self.decontaminator, self.report = settings, seen, decontaminator, report

    def accept(self, item: Item, raw: str) -> tuple[dict[str, str] | None, str]:
        """(the answer's texts, "") when every constraint passes, else (None, the reason). An
        accepted answer's texts join the seen texts."""
        try:
            answer = parse_answer(raw, [target.key for target in item.targets])
        except AnswerError as error:
            self.report.count("json", False)
            return None, f"json: {error}"
        self.report.count("json", True)
        for name, passed in self._verdicts(item, answer):
            self.report.count(name, passed)
            if not passed:
                if name == "decontaminated":
                    self.report.decontamination["tries_rejected"] += 1
                return None, name
        for text in answer.values():
            self.seen.add(text)
        return answer, ""

    def _verdicts(self, item: Item, answer: dict[str, str]) -> Iterator[tuple[str, bool]]:
        """(constraint, passed) in the order of CONSTRAINTS, each computed only when the caller
        gets that far (it stops at the first failure)."""
        s, pairs = self.settings, [(answer[target.key], target) for target in item.targets]
        yield "language", all(same_language(target.original, text) for text, target in pairs)
        yield "length", all(within_length(target.original, text, target.tolerance) for text, target in pairs)
        differing = [(text, target.differ_from) for text, target in pairs if target.differ_from is not None]
        if differing:
            yield (
                "difference",
                all(
                    differs_enough(original, text, s.sentence_difference, s.paragraph_difference)
                    for text, original in differing
                ),
            )
        yield "not_positive", not any(copies_positive(text, item.positives) for text, _ in pairs)
        keys = {SeenTexts.key(text) for text, _ in pairs}
        yield "unique", len(keys) == len(pairs) and not any(text in self.seen for text, _ in pairs)
        if self.decontaminator is not None:
            yield "decontaminated", all(self.decontaminator.match(text) is None for text, _ in pairs)


@dataclass
class _Context:
    """What the rounds of a run share."""

    operation: Operation
    generator: CachedGenerator
    judge: Judge
    report: RunReport
    settings: Settings
    progress: Any


def _run_round(pending: list[tuple[Job, Item]], ctx: _Context) -> list[tuple[Job, Item]]:
    """One try for every pending item, judged in input order; the items still pending after it
    (an item is done when accepted or after max_tries tries, then counted as failed). A try's
    seed depends on the record, the item and the try's number only, so how records share rounds
    changes no request and a rerun finds every answer in the cache. (Except that which of two
    records that got the same text keeps it depends on the order of judging, so another
    --chunk-size can move one extra try; and the transformers backend seeds per batch, so its
    answers depend on the batch. A rerun or resume with the same settings is identical.)"""
    requests = [
        Request(
            item.messages,
            item.max_tokens,
            _stable_int(ctx.settings.seed, job.index, item.slot, item.tries),
            tuple(target.key for target in item.targets),
        )
        for job, item in pending
    ]
    answers = ctx.generator.answers(requests)
    still = []
    for (job, item), answer in zip(pending, answers):
        item.tries += 1
        ctx.report.tries += 1
        if answer.error is not None:
            ctx.report.backend_errors += 1
            item.rejection = f"backend: {answer.error}"
        else:
            item.answer, item.rejection = ctx.judge.accept(item, answer.text)
        if item.answer is not None:
            ctx.report.items_accepted += 1
            ctx.progress.update(1)
        elif item.tries < ctx.settings.max_tries:
            still.append((job, item))
        else:
            ctx.report.items_failed += 1
            ctx.progress.update(1)
            if len(ctx.report.failures) < MAX_FAILURE_EXAMPLES:
                ctx.report.failures.append(
                    {"source": job.location, "slot": item.slot, "tries": item.tries, "last_rejection": item.rejection}
                )
    return still


def _plan_jobs(input_path: str | Path, operation: Operation, report: RunReport | None) -> Iterator[Job]:
    """The input's records as jobs; a malformed record raises DataError, or with skip_invalid
    is counted (when `report` is given) and left out."""
    for index, (location, record) in enumerate(iter_rows(input_path)):
        try:
            view = read_view(record, location)
        except DataError as error:
            if not operation.settings.skip_invalid:
                raise
            if report is not None:
                reason = f"invalid record: {str(error).removeprefix(f'{error.location}: ')}"
                report.records_skipped[reason] = report.records_skipped.get(reason, 0) + 1
            continue
        yield Job(index, location, record, view, operation.plan(view))


def _provenance(job: Job, ctx: _Context) -> dict:
    """The "synthesis" field of a record made from `job`: what made it, from which record, at which tries."""
    backend = ctx.generator.backend
    info = {"operation": ctx.operation.name, "backend": backend.name, "model": backend.model, "source": job.location}
    for name in ("id", "_id", "query_id"):
        if name in job.record:
            info["id"] = job.record[name]
            break
    info["tries"] = {item.slot: item.tries for item in job.items if item.answer is not None}
    info["seed"] = ctx.settings.seed
    return info


def _build_decontaminator(eval_sources, decontaminate: bool, minhash: float | None, report: RunReport):
    """The Decontaminator for the run, or None when decontamination was turned off explicitly."""
    from tpembed.data.decontaminate import Decontaminator

    if not decontaminate:
        if eval_sources:
            raise UsageError("evaluation data was given and decontamination turned off: choose one")
        report.decontamination = {"enabled": False, "note": "no decontamination set was given (--no-decontaminate)"}
        return None
    if not eval_sources:
        raise UsageError(
            "give the evaluation data to decontaminate against (--eval FILE/DIR ...) or --no-decontaminate"
        )
    if isinstance(eval_sources, Decontaminator):
        decontaminator, names = eval_sources, ["(a Decontaminator)"]
    else:
        names = [str(source) for source in eval_sources]
        decontaminator = Decontaminator.from_sources(names, minhash_threshold=minhash)
    report.decontamination = {
        "enabled": True,
        "eval_sources": names,
        "eval_texts": len(decontaminator),
        "tries_rejected": 0,
        "records_removed": 0,
        "removed": [],
    }
    return decontaminator


def synthesize(
    operation: str,
    input_path: str | Path,
    output_path: str | Path,
    backend: Backend | str,
    *,
    model: str | None = None,
    backend_options: dict | None = None,
    eval_sources: Sequence[str | Path] | Any = (),
    decontaminate: bool = True,
    settings: Settings | None = None,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> RunReport:
    """Run one operation from `input_path` to `output_path` and return its report (also written to
    OUTPUT.report.json). `backend` is a Backend, or a name built with `model` and `backend_options`
    once the input has been checked. `eval_sources`: evaluation files/directories or a built
    Decontaminator; decontaminate=False must be said explicitly when there are none."""
    began = time.perf_counter()
    settings = settings or Settings()
    _check_request(operation, settings, Path(output_path), overwrite)
    report = RunReport(operation=operation, input=str(input_path), output=str(output_path))
    decontaminator = _build_decontaminator(eval_sources, decontaminate, settings.minhash, report)
    op = OPERATION_CLASSES[operation](settings, load_prompts(settings.prompts_dir))
    seen, report.items = _index_input(input_path, op)
    if isinstance(backend, str):
        backend = make_backend(backend, model or "", **(backend_options or {}))
    report.backend, report.model = backend.name, backend.model
    cache = AnswerCache(Path(cache_dir or f"{output_path}.cache") / CACHE_FILE)
    generator = CachedGenerator(backend, cache, Sampling(settings.temperature, settings.top_p), report)
    ctx = _Context(op, generator, Judge(settings, seen, decontaminator, report), report, settings, None)
    try:
        _write(input_path, output_path, overwrite, ctx, progress)
    finally:
        cache.close()
    report.seconds = time.perf_counter() - began
    with atomic_path(f"{output_path}.report.json", overwrite=True) as staging:
        staging.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def _check_request(operation: str, settings: Settings, output_path: Path, overwrite: bool) -> None:
    """UsageError or OutputExistsError before anything is loaded."""
    if operation not in OPERATION_CLASSES:
        raise UsageError(f"unknown operation {operation!r} (one of {', '.join(OPERATIONS)})")
    _check_settings(settings)
    if output_path.exists() and not overwrite:
        raise OutputExistsError(f"{output_path} exists; pass --overwrite to replace it")


def _index_input(input_path: str | Path, op: Operation) -> tuple[SeenTexts, int]:
    """The first pass over the input: every record checked (before a model is loaded), every
    original text remembered for deduplication, the items counted."""
    seen, items = SeenTexts(), 0
    for job in _plan_jobs(input_path, op, None):
        items += len(job.items)
        for text in (job.view.query, *job.view.positives, *job.view.negatives):
            seen.add(text)
    return seen, items


def _check_settings(s: Settings) -> None:
    if s.window < s.chunk_size:
        raise UsageError(f"--window ({s.window}) must be at least --chunk-size ({s.chunk_size})")
    if s.max_tries < 1 or s.chunk_size < 1 or s.extensions < 1 or s.min_negatives < 0:
        raise UsageError("--max-tries, --chunk-size and --extensions must be at least 1, --min-negatives at least 0")
    if not set(s.rewrite_fields) <= {"query", "pos"} or not s.rewrite_fields:
        raise UsageError("--rewrite-fields takes query and/or pos")
    if not all(
        0 <= value < 1
        for value in (s.rewrite_length_tolerance, s.length_tolerance, s.sentence_difference, s.paragraph_difference)
    ):
        raise UsageError("length tolerances and difference shares are fractions in [0, 1)")


def _write(input_path: str | Path, output_path: str | Path, overwrite: bool, ctx: _Context, progress: bool) -> None:
    """The second pass, in rounds over a rolling window of records: each round gives every pending
    item one try; records whose items are all done leave the window, in input order, to be
    written, and new records join it so that `chunk_size` records with items stay in flight. So
    every round but the last few of the whole input is full (a chunk that waited for its slowest
    items would send small batches for its last rounds, leaving a GPU idle). Records with nothing
    to generate (hard negatives on mined records that mostly have enough) count toward a second
    bound, `window` records between reading and writing, so memory stays bounded whatever the
    input; it is large (32768) because where only a share p of the records have items, a round
    holds at most p x window of them. The output appears only when the last record is written."""
    from tqdm import tqdm

    with tqdm(total=ctx.report.items, unit=" items", desc=ctx.operation.name, disable=not progress) as bar:
        ctx.progress = bar
        with jsonl_output(output_path, overwrite) as writer:
            jobs = _plan_jobs(input_path, ctx.operation, ctx.report)
            window: deque[Job] = deque()  # admitted and not yet written, in input order
            pending: list[tuple[Job, Item]] = []
            open_jobs: dict[int, int] = {}  # job index -> its items still pending
            exhausted = False
            while True:
                while not exhausted and len(open_jobs) < ctx.settings.chunk_size and len(window) < ctx.settings.window:
                    job = next(jobs, None)
                    if job is None:
                        exhausted = True
                        break
                    ctx.report.records_read += 1
                    window.append(job)
                    pending.extend((job, item) for item in job.items)
                    if job.items:
                        open_jobs[job.index] = len(job.items)
                if pending:
                    still = _run_round(pending, ctx)
                    left = {id(item) for _, item in still}
                    for job, item in pending:
                        if id(item) not in left:
                            open_jobs[job.index] -= 1
                            if not open_jobs[job.index]:
                                del open_jobs[job.index]
                    pending = still
                while window and window[0].index not in open_jobs:
                    _write_job(window.popleft(), ctx, writer)
                if exhausted and not window:
                    break
            ctx.report.records_written = writer.report.written


def _write_job(job: Job, ctx: _Context, writer) -> None:
    """Write the records made from a finished job, each checked whole against the evaluation data."""
    decontaminator = ctx.judge.decontaminator
    for record in ctx.operation.finish(job, _provenance(job, ctx)):
        if decontaminator is not None:
            check = decontaminator.check_record(record, job.location)
            if check.record is None:
                info = ctx.report.decontamination
                info["records_removed"] += 1
                if len(info["removed"]) < MAX_FAILURE_EXAMPLES:
                    info["removed"].append(check.findings[0].report_line(job.location))
                continue
        writer.write(record)


# ---- command line ----------------------------------------------------------------------


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(part for part in text.replace(",", " ").split() if part)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpembed-synthesize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("operation", choices=OPERATIONS)
    parser.add_argument("input", help="retrieval records (JSONL, parquet, a directory, a saved dataset)")
    parser.add_argument("output", help="output JSONL file")
    parser.add_argument("--backend", required=True, choices=BACKENDS)
    parser.add_argument("--model", required=True, help="model directory, hub id, gguf:FILE, or the server's model name")
    data = parser.add_argument_group("data")
    data.add_argument("--eval", nargs="+", action="extend", default=[], metavar="PATH", help="evaluation files/dirs")
    data.add_argument("--no-decontaminate", action="store_true", help="write without decontamination (say so)")
    data.add_argument("--minhash", type=float, metavar="T", help="also reject near duplicates of evaluation texts")
    data.add_argument("--overwrite", action="store_true", help="replace an existing output")
    data.add_argument("--cache-dir", help="answer cache folder (default OUTPUT.cache)")
    data.add_argument("--prompts", dest="prompts_dir", metavar="DIR", help="folder with edited en.yaml and zh.yaml")
    data.add_argument("--skip-invalid", action="store_true", help="skip (and count) records missing fields")
    data.add_argument("--no-progress", action="store_true", help="no progress bar")
    _constraint_options(parser.add_argument_group("constraints and operations"))
    _generation_options(parser.add_argument_group("generation"))
    return parser


def _constraint_options(group) -> None:
    d = Settings()
    group.add_argument("--max-tries", type=int, default=d.max_tries, help=f"tries per item (default {d.max_tries})")
    group.add_argument("--rewrite-length-tolerance", type=float, default=d.rewrite_length_tolerance, metavar="F")
    group.add_argument(
        "--length-tolerance",
        type=float,
        default=d.length_tolerance,
        metavar="F",
        help="extensions and negatives (default 0.2)",
    )
    group.add_argument("--sentence-difference", type=float, default=d.sentence_difference, metavar="F")
    group.add_argument("--paragraph-difference", type=float, default=d.paragraph_difference, metavar="F")
    group.add_argument(
        "--rewrite-fields",
        type=_name_list,
        default=d.rewrite_fields,
        metavar="query,pos",
        help="what rewrite paraphrases (default query,pos)",
    )
    group.add_argument("--extensions", type=int, default=d.extensions, help="new records per record (extend)")
    group.add_argument("--min-negatives", type=int, default=d.min_negatives, help="hard-negatives target (default 4)")


def _generation_options(group) -> None:
    d = Settings()
    group.add_argument("--seed", type=int, default=d.seed)
    group.add_argument("--temperature", type=float, default=d.temperature)
    group.add_argument("--top-p", type=float, default=d.top_p)
    group.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    group.add_argument(
        "--chunk-size",
        type=int,
        default=d.chunk_size,
        help="records in flight: each round tries their pending items; finished records make room for new ones",
    )
    group.add_argument(
        "--window",
        type=int,
        default=d.window,
        help="most records read and not yet written, those with nothing to generate included (memory bound)",
    )
    group.add_argument("--batch-size", type=int, help="requests per backend call (transformers 8, vllm 1024)")
    group.add_argument("--trust-remote-code", action="store_true")
    group.add_argument("--device", help="transformers: cpu, cuda, cuda:1 (default: cuda when available)")
    group.add_argument("--dtype", default="auto", help="transformers/vllm: auto, float32, bfloat16, float16")
    group.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm")
    group.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm")
    group.add_argument("--max-model-len", type=int, help="vllm")
    group.add_argument("--base-url", help="openai: e.g. http://127.0.0.1:8000/v1 (default $OPENAI_BASE_URL)")
    group.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: variable holding the API key")
    group.add_argument("--timeout", type=float, default=120.0, help="openai: seconds per request")
    group.add_argument("--retries", type=int, default=3, help="openai: retries of a failed request")
    group.add_argument("--retry-backoff", type=float, default=1.0, help="openai: first wait, doubled each retry")
    group.add_argument("--concurrency", type=int, default=8, help="openai: requests in flight")
    group.add_argument(
        "--json-mode",
        default="off",
        choices=JSON_MODES,
        help="openai: constrain decoding: object (response_format json_object: any JSON object) or schema "
        "(json_schema: exactly the answer's keys, each a string)",
    )


def backend_options(args: argparse.Namespace) -> dict:
    """The parsed command line's options of the chosen backend."""
    if args.json_mode != "off" and args.backend != "openai":
        raise UsageError(f"--json-mode {args.json_mode} is for --backend openai (the server constrains decoding)")
    if args.backend == "transformers":
        options = dict(device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    elif args.backend == "vllm":
        options = dict(
            seed=args.seed,
            dtype=args.dtype,
            tensor_parallel_size=args.tensor_parallel_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
            trust_remote_code=args.trust_remote_code,
        )
    else:
        options = dict(
            base_url=args.base_url,
            api_key_env=args.api_key_env,
            timeout=args.timeout,
            retries=args.retries,
            retry_backoff=args.retry_backoff,
            concurrency=args.concurrency,
            json_mode=args.json_mode,
        )
    if args.batch_size:
        options["batch_size"] = args.batch_size
    return options


def settings_from_args(args: argparse.Namespace) -> Settings:
    names = Settings.__dataclass_fields__
    return Settings(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed by argparse
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        report = synthesize(
            args.operation,
            args.input,
            args.output,
            args.backend,
            model=args.model,
            backend_options=backend_options(args),
            eval_sources=args.eval,
            decontaminate=not args.no_decontaminate,
            settings=settings_from_args(args),
            cache_dir=args.cache_dir,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (UsageError, OutputExistsError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except (DataError, BackendError, OSError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
