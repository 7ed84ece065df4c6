"""Input formatting: instruction format (stage 1), PromptEOL templates (stage 2), tokenisation.

Everything that decides which characters and tokens the model sees is here, in
one place, so training, evaluation and the exported sentence-transformers model
render texts identically (the export copies this file next to the model).

A text is rendered in three pieces:

    head  = template prefix (with the placeholder) + instruction prefix
    body  = the user's text             <- the only piece truncation shortens
    tail  = template suffix (+ the end-of-text token in stage 1)

Stage 1 (docs/method.md 4.1): query side "Instruct: {instruction}\\nQuery: " + text,
documents raw, the end-of-text token appended as the pooled last token.
Stage 2 (docs/method.md 4.2):
    This sentence: <|im_start|>“{stage-1 formatted text}” means in one word: “
with U+201C/U+201D quotes; the final “ is the last token.

This module imports only the standard library and torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUERY_INSTRUCTION_FORMAT = "Instruct: {instruction}\nQuery: "
NULL_TEXT = "Null"
PLACEHOLDER_SLOT = "{placeholder}"
QWEN_PLACEHOLDER = "<|im_start|>"  # already in the Qwen vocabulary (id 151644)
ADDED_PLACEHOLDER = "<|tp_placeholder|>"  # added to tokenizers without <|im_start|>


@dataclass(frozen=True)
class Template:
    """A wrapper around the formatted text. `prefix` may hold the placeholder slot."""

    name: str
    prefix: str
    suffix: str

    @property
    def has_placeholder_slot(self) -> bool:
        return PLACEHOLDER_SLOT in self.prefix


TEMPLATES = {
    # stage 1: the instruction-formatted text, nothing around it
    "instruction": Template("instruction", "", ""),
    # stage 2 (docs/method.md 4.2), Token Prepending variant of PromptEOL with curly quotes
    "prompteol": Template("prompteol", "This sentence: {placeholder}\u201c", "\u201d means in one word: \u201c"),
    # PromptEOL as published (Jiang et al. 2023, arXiv 2307.16645), ASCII quotes,
    # with the placeholder slot where the Token Prepending paper puts it
    "prompteol_original": Template("prompteol_original", 'This sentence : {placeholder}"', '" means in one word:"'),
}


@dataclass(frozen=True)
class TextFormat:
    """How a raw text becomes (head, body, tail).

    Attributes:
        template: the wrapper (TEMPLATES[name]).
        placeholder: the Token Prepending placeholder token rendered into the
            template's slot, or None for no placeholder (the slot renders empty).
        instruction_format: the query-side prefix; `{instruction}` is filled in.
        null_text: what an empty text becomes.
        append_eos: append the tokenizer's end-of-text token (stage 1 default).
        prepend_bos: start every sequence with the tokenizer's BOS token.
    """

    template: Template = TEMPLATES["instruction"]
    placeholder: str | None = None
    instruction_format: str = QUERY_INSTRUCTION_FORMAT
    null_text: str = NULL_TEXT
    append_eos: bool = True
    prepend_bos: bool = False

    def __post_init__(self):
        if self.placeholder is not None and not self.template.has_placeholder_slot:
            raise ValueError(f"template {self.template.name!r} has no placeholder slot")

    def to_dict(self) -> dict:
        """JSON-able description, stored next to a trained model."""
        return {
            "template": self.template.name,
            "placeholder": self.placeholder,
            "instruction_format": self.instruction_format,
            "null_text": self.null_text,
            "append_eos": self.append_eos,
            "prepend_bos": self.prepend_bos,
        }

    @classmethod
    def from_dict(cls, values: dict) -> TextFormat:
        values = dict(values)
        return cls(template=TEMPLATES[values.pop("template")], **values)

    def clean(self, text: str) -> str:
        """The user text as it is rendered: placeholder strings removed, empty -> null_text.

        A placeholder inside user text would put a second placeholder into the
        sequence; it is removed (documented behaviour), never duplicated.
        """
        if self.placeholder:
            text = text.replace(self.placeholder, "")
        return text if text.strip() else self.null_text

    def prompt(self, instruction: str | None) -> str:
        """The query-side prefix for `instruction` ("" for None: documents are raw)."""
        if not instruction:
            return ""
        return self.instruction_format.format(instruction=self.clean(instruction))

    def pieces(self, text: str, instruction: str | None) -> tuple[str, str, str]:
        """(head, body, tail) for one text; `instruction` None renders the text raw."""
        return self.pieces_with_prompt(text, self.prompt(instruction))

    def pieces_with_prompt(self, text: str, prompt: str) -> tuple[str, str, str]:
        """(head, body, tail) with an already formatted prompt (a sentence-transformers prompt)."""
        if self.placeholder:
            prompt = prompt.replace(self.placeholder, "")
        prefix = self.template.prefix.replace(PLACEHOLDER_SLOT, self.placeholder or "") + prompt
        return prefix, self.clean(text), self.template.suffix

    def render(self, text: str, instruction: str | None) -> str:
        """The full string (without the appended end-of-text token)."""
        return "".join(self.pieces(text, instruction))


def ensure_placeholder(tokenizer, requested: str | None = None, allow_add: bool = True) -> tuple[str, bool]:
    """The placeholder token for `tokenizer`: `requested`, else <|im_start|> when the
    vocabulary has it, else <|tp_placeholder|>. A missing token is added as a special
    token when `allow_add` (the caller must then grow the embedding matrix).

    Returns (token, whether it was added).
    """
    vocab = tokenizer.get_vocab()
    token = requested or (QWEN_PLACEHOLDER if QWEN_PLACEHOLDER in vocab else ADDED_PLACEHOLDER)
    if token in vocab:
        return token, False
    if not allow_add:
        raise ValueError(f"the tokenizer has no placeholder token {token!r} and adding it is not allowed")
    tokenizer.add_special_tokens({"additional_special_tokens": [token]})
    return token, True


def tokenize(
    tokenizer,
    pieces: list[tuple[str, str, str]],
    max_length: int,
    text_format: TextFormat,
    pad_to_multiple_of: int | None = None,
    packed: bool = False,
    pack_row_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenise rendered pieces into a padded batch (or, `packed`, padding-free rows).

    Only the body is truncated, to the token budget left after head and tail, so
    the instruction and the template always survive and the last token is the
    template's final character (or the end-of-text token).

    Returns a dict with
        input_ids, attention_mask: (B, T) int64, padded on tokenizer.padding_side;
        last_token_positions: (B,) index of each row's last real token;
        placeholder_positions: (B,) index of the placeholder (only with a placeholder).
    Packed (see pack_sequences): input_ids and position_ids (rows, width), no attention_mask,
    positions indexing each text's row, and sequence_rows / sequence_starts / sequence_lengths (B,).
    """
    extra_front = [tokenizer.bos_token_id] if text_format.prepend_bos else []
    extra_back = [tokenizer.eos_token_id] if text_format.append_eos else []
    if None in extra_front + extra_back:
        raise ValueError("the tokenizer has no BOS/EOS token to add; set prepend_bos/append_eos to false")
    budget = max_length - len(extra_front) - len(extra_back)

    sequences = [extra_front + ids + extra_back for ids in _encode_within_budget(tokenizer, pieces, budget)]
    placeholder_offsets = None
    if text_format.placeholder is not None:
        placeholder_id = tokenizer.convert_tokens_to_ids(text_format.placeholder)
        if placeholder_id is None or placeholder_id == tokenizer.unk_token_id:
            raise ValueError(f"placeholder {text_format.placeholder!r} is not a token of the tokenizer")
        placeholder_offsets = find_placeholders(sequences, placeholder_id)
    if packed:
        return pack_sequences(sequences, placeholder_offsets, pack_row_tokens, tokenizer.pad_token_id)
    return pad_sequences(sequences, tokenizer.pad_token_id, tokenizer.padding_side, placeholder_offsets,
                         pad_to_multiple_of)  # fmt: skip


def find_placeholders(sequences: list[list[int]], placeholder_id: int) -> list[int]:
    """The placeholder's index in each sequence, which must hold it exactly once."""
    offsets = []
    for row, ids in enumerate(sequences):
        found = [i for i, token in enumerate(ids) if token == placeholder_id]
        if len(found) != 1:
            raise ValueError(f"sequence {row} holds the placeholder {len(found)} times; it must occur exactly once")
        offsets.append(found[0])
    return offsets


def pack_sequences(
    sequences: list[list[int]],
    placeholder_offsets: list[int] | None = None,
    row_tokens: int | None = None,
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Pack token sequences into rows without padding between them.

    Texts go into rows of at most `row_tokens` tokens (never less than the longest text;
    None: the longest text) by first-fit decreasing, so a row's attention costs at most
    row_tokens ** 2 however many texts the batch holds. Positions restart at 0 for each
    text, which Hugging Face decoders read as separate sequences (no attention across
    them); the unused end of a row is filler that forms a sequence of its own and is
    never pooled.

    Returns input_ids and position_ids (rows, width); per text, in input order:
    sequence_rows, sequence_starts, sequence_lengths, last_token_positions (in the row)
    and placeholder_positions (in the row; only with `placeholder_offsets`, each text's
    placeholder index).
    """
    lengths = [len(ids) for ids in sequences]
    capacity = max(row_tokens or 0, max(lengths))
    fill: list[int] = []  # tokens used in each row
    rows, starts = [0] * len(sequences), [0] * len(sequences)
    for index in sorted(range(len(sequences)), key=lambda i: -lengths[i]):
        row = next((r for r, used in enumerate(fill) if used + lengths[index] <= capacity), len(fill))
        if row == len(fill):
            fill.append(0)
        rows[index], starts[index] = row, fill[row]
        fill[row] += lengths[index]
    width = max(fill)
    input_ids = torch.full((len(fill), width), pad_token_id, dtype=torch.long)  # (rows, width)
    position_ids = torch.zeros((len(fill), width), dtype=torch.long)  # (rows, width)
    for ids, row, start in zip(sequences, rows, starts):
        input_ids[row, start : start + len(ids)] = torch.tensor(ids, dtype=torch.long)
        position_ids[row, start : start + len(ids)] = torch.arange(len(ids))
    for row, used in enumerate(fill):
        position_ids[row, used:] = torch.arange(width - used)  # the filler: a sequence of its own
    batch = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "sequence_rows": torch.tensor(rows, dtype=torch.long),
        "sequence_starts": torch.tensor(starts, dtype=torch.long),
        "sequence_lengths": torch.tensor(lengths, dtype=torch.long),
        "last_token_positions": torch.tensor([s + n - 1 for s, n in zip(starts, lengths)], dtype=torch.long),
    }
    if placeholder_offsets is not None:
        batch["placeholder_positions"] = torch.tensor([s + o for s, o in zip(starts, placeholder_offsets)])
    return batch


def packed_sequences(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """The token sequences of a packed batch, in text order (the inverse of pack_sequences)."""
    spans = zip(batch["sequence_rows"].tolist(), batch["sequence_starts"].tolist(), batch["sequence_lengths"].tolist())
    return [batch["input_ids"][row, start : start + length].tolist() for row, start, length in spans]


def _encode_within_budget(tokenizer, pieces: list[tuple[str, str, str]], budget: int) -> list[list[int]]:
    texts = ["".join(p) for p in pieces]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    result = []
    for (head, body, tail), ids, offsets in zip(pieces, encoded["input_ids"], encoded["offset_mapping"]):
        if len(ids) <= budget:
            result.append(ids)
            continue
        body_start, body_end = len(head), len(head) + len(body)
        # tokens that overlap the body are the ones truncation may drop
        body_tokens = [i for i, (s, e) in enumerate(offsets) if s < body_end and e > body_start]
        fixed = len(ids) - len(body_tokens)
        keep = budget - fixed
        if keep < 1:
            raise ValueError(
                f"the template and instruction alone take {fixed} tokens, which leaves no room for text "
                f"within max_length (budget {budget}); raise the max length or shorten the instruction: {head!r}"
            )
        while True:
            cut = offsets[body_tokens[keep - 1]][1] if keep > 0 else body_start
            truncated = head + body[: max(cut - body_start, 0)] + tail
            ids = tokenizer(truncated, add_special_tokens=False)["input_ids"]
            if len(ids) <= budget or keep == 0:
                break
            keep -= 1
        if len(ids) > budget:
            raise ValueError(f"cannot fit {head!r} + {tail!r} into {budget} tokens")
        result.append(ids)
    return result


def pad_sequences(
    sequences: list[list[int]],
    pad_token_id: int,
    padding_side: str = "left",
    placeholder_offsets: list[int] | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad token id lists into tensors and compute the pooling and placeholder positions
    (`placeholder_offsets`: each sequence's placeholder index)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(len(s) for s in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)  # (B, T)
    starts = [length - len(ids) if padding_side == "left" else 0 for ids in sequences]
    for row, (ids, start) in enumerate(zip(sequences, starts)):
        input_ids[row, start : start + len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, start : start + len(ids)] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "last_token_positions": torch.tensor([s + len(ids) - 1 for s, ids in zip(starts, sequences)]),
    }
    if placeholder_offsets is not None:
        batch["placeholder_positions"] = torch.tensor([s + o for s, o in zip(starts, placeholder_offsets)])
    return batch
