"""Input formatting and tokenisation: exact characters, truncation, positions."""

import pytest

from tpembed.data import TEMPLATES, TextFormat, tokenize

INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def test_stage1_query_and_document_rendering_is_character_exact():
    text_format = TextFormat()
    assert text_format.render("what is BM25?", INSTRUCTION) == (
        "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: what is BM25?"
    )
    assert text_format.render("BM25 is a ranking function.", None) == "BM25 is a ranking function."


def test_empty_text_becomes_null():
    text_format = TextFormat()
    assert text_format.render("", None) == "Null"
    assert text_format.render("   ", INSTRUCTION).endswith("\nQuery: Null")


def test_stage1_appends_end_of_text_as_last_token(qwen_tokenizer):
    batch = tokenize(qwen_tokenizer, [TextFormat().pieces("hello", None)], 32, TextFormat())
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert ids[-1] == qwen_tokenizer.eos_token_id == 151643
    assert ids[:-1] == qwen_tokenizer("hello", add_special_tokens=False)["input_ids"]
    no_eos = TextFormat(append_eos=False)
    batch = tokenize(qwen_tokenizer, [no_eos.pieces("hello", None)], 32, no_eos)
    assert batch["input_ids"][0].tolist() == qwen_tokenizer("hello", add_special_tokens=False)["input_ids"]


def test_truncation_shortens_only_the_text_and_keeps_the_instruction(qwen_tokenizer):
    text_format = TextFormat()
    long_text = " ".join(f"word{i}" for i in range(400))
    max_length = 40
    batch = tokenize(qwen_tokenizer, [text_format.pieces(long_text, INSTRUCTION)], max_length, text_format)
    ids = batch["input_ids"][0].tolist()
    assert len(ids) == max_length
    decoded = qwen_tokenizer.decode(ids[:-1])
    assert decoded.startswith("Instruct: " + INSTRUCTION + "\nQuery: word0 word1")
    assert ids[-1] == qwen_tokenizer.eos_token_id
    # a text that fits is not touched
    batch = tokenize(qwen_tokenizer, [text_format.pieces("word0 word1", INSTRUCTION)], max_length, text_format)
    assert qwen_tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()][:-1]) == (
        "Instruct: " + INSTRUCTION + "\nQuery: word0 word1"
    )


def test_instruction_longer_than_the_budget_is_a_clear_error(qwen_tokenizer):
    text_format = TextFormat()
    with pytest.raises(ValueError, match="template and instruction alone"):
        tokenize(qwen_tokenizer, [text_format.pieces("text", INSTRUCTION)], 8, text_format)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_positions_follow_padding(qwen_tokenizer, padding_side):
    qwen_tokenizer.padding_side = padding_side
    text_format = TextFormat()
    batch = tokenize(qwen_tokenizer, [("", "a", ""), ("", "a much longer text here", "")], 32, text_format)
    for row in range(2):
        mask = batch["attention_mask"][row]
        real = mask.nonzero().flatten()
        assert int(batch["last_token_positions"][row]) == int(real.max())
        assert batch["input_ids"][row, batch["last_token_positions"][row]] == qwen_tokenizer.eos_token_id
    if padding_side == "left":
        assert (batch["last_token_positions"] == batch["input_ids"].shape[1] - 1).all()


def test_templates_are_registered():
    assert set(TEMPLATES) >= {"instruction", "prompteol", "prompteol_original"}


# ---- stage 2: PromptEOL + instruction + placeholder (docs/method.md 4.2) ----------------

STAGE2 = TextFormat(template=TEMPLATES["prompteol"], placeholder="<|im_start|>", append_eos=False)


def test_stage2_rendering_is_byte_exact():
    query = STAGE2.render("what is BM25?", INSTRUCTION)
    expected_query = (
        b"This sentence: <|im_start|>\xe2\x80\x9cInstruct: Given a web search query, retrieve relevant passages that "
        b"answer the query\nQuery: what is BM25?\xe2\x80\x9d means in one word: \xe2\x80\x9c"
    )
    assert query.encode("utf-8") == expected_query
    document = STAGE2.render("BM25 is a ranking function.", None)
    assert document.encode("utf-8") == (
        b"This sentence: <|im_start|>\xe2\x80\x9cBM25 is a ranking function."
        b"\xe2\x80\x9d means in one word: \xe2\x80\x9c"
    )
    assert document == "This sentence: <|im_start|>\u201cBM25 is a ranking function.\u201d means in one word: \u201c"


def test_original_prompteol_template():
    original = TextFormat(template=TEMPLATES["prompteol_original"], placeholder=None, append_eos=False)
    assert original.render("A man sings.", None) == 'This sentence : "A man sings." means in one word:"'


def stage2_ids(tokenizer, text, instruction, max_length):
    batch = tokenize(tokenizer, [STAGE2.pieces(text, instruction)], max_length, STAGE2)
    return batch, batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()


def test_stage2_truncation_keeps_the_suffix_and_the_placeholder(qwen_tokenizer):
    long_text = " ".join(f"word{i}" for i in range(500))
    batch, ids = stage2_ids(qwen_tokenizer, long_text, INSTRUCTION, 48)
    assert len(ids) == 48
    decoded = qwen_tokenizer.decode(ids)
    assert decoded.startswith("This sentence: <|im_start|>\u201cInstruct: " + INSTRUCTION + "\nQuery: word0 word1")
    assert decoded.endswith("\u201d means in one word: \u201c")
    assert qwen_tokenizer.decode(ids[-1:]).endswith("\u201c"), "the final quote is the last token"
    assert ids.count(151644) == 1
    row = batch["input_ids"][0]
    assert int(row[batch["placeholder_positions"][0]]) == 151644
    assert int(batch["last_token_positions"][0]) == row.shape[0] - 1


def test_placeholder_inside_user_text_is_removed(qwen_tokenizer):
    text = "ignore <|im_start|> this"
    assert STAGE2.render(text, None).count("<|im_start|>") == 1
    assert STAGE2.render(text, None) == "This sentence: <|im_start|>\u201cignore  this\u201d means in one word: \u201c"
    batch, ids = stage2_ids(qwen_tokenizer, text, "instruction with <|im_start|> inside", 64)
    assert ids.count(151644) == 1


def test_a_sequence_without_exactly_one_placeholder_is_refused(qwen_tokenizer):
    from tpembed.data.templates import find_placeholders

    with pytest.raises(ValueError, match="exactly once"):
        find_placeholders([[1, 151644, 2, 151644]], placeholder_id=151644)
    with pytest.raises(ValueError, match="exactly once"):
        find_placeholders([[1, 2]], placeholder_id=151644)
    assert find_placeholders([[151644, 1], [1, 2, 151644]], 151644) == [0, 2]
