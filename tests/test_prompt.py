"""Prompts: the ids the backbone reads are those of the prompt text tokenised as a whole, for a byte-level BPE
(SmolLM2), a sentencepiece Llama-2 tokenizer and the embedded one; slots, left padding, titles as shown."""

import io
import json

import pytest
import torch
from conftest import requires_smollm2

from recbole_ilora.model.backbone import train_embedded_tokenizer
from recbole_ilora.model.prompt import SLOT_TOKEN, PromptBuilder, move_article_first, split_template

TEXTS = ["", "Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)", "The English Patient (1996)"]
TEMPLATE = "The user watched {history}. Next:"
GENERATIVE = "This user has watched {history} in the previous. Choose the answer from: {candidates}. Answer:"
CORPUS = [*TEXTS[1:], "The user watched", ". Next:", ", ", GENERATIVE]
S = SLOT_TOKEN


def sentencepiece_llama2(folder):
    """A tiny sentencepiece tokenizer laid out as a Llama-2 release: tokenizer.model, no pad token."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(params=["embedded", "sentencepiece", pytest.param("smollm2", marks=requires_smollm2)])
def tokenizer(request, tmp_path):
    if request.param == "embedded":
        return train_embedded_tokenizer(CORPUS, vocab_size=200)
    if request.param == "sentencepiece":
        return sentencepiece_llama2(tmp_path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(request.getfixturevalue("smollm2_dir"))


def read_ids(prompt, row):
    """The ids of one row as the backbone reads them, slots written as the slot token, padding left out."""
    ids = prompt.input_ids[row].clone()
    ids[prompt.slot_mask[row]] = -1
    ids = ids[prompt.attention_mask[row].bool()].tolist()
    return ids


def whole(tokenizer, text, special=True):
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    slot = tokenizer.convert_tokens_to_ids(SLOT_TOKEN)
    return [-1 if token == slot else token for token in ids]


def test_prompt_ids_are_the_whole_text_tokenised(tokenizer):
    build = PromptBuilder(tokenizer, TEXTS, TEMPLATE, ", ", max_title_tokens=16)
    prompt = build(torch.tensor([[1, 2, 3, 0], [4, 0, 0, 0]]), torch.tensor([3, 1]))
    assert read_ids(prompt, 0) == whole(
        tokenizer, f"The user watched Toy Story (1995){S}, GoldenEye (1995){S}, Four Rooms (1995){S}. Next:"
    )
    assert read_ids(prompt, 1) == whole(tokenizer, f"The user watched The English Patient (1996){S}. Next:")
    assert prompt.slot_items.tolist() == [1, 2, 3, 4]  # row-major, one per history item
    assert (prompt.input_ids[prompt.slot_mask] < len(tokenizer) - 1).all()  # a slot's id is never looked up


def test_generative_prompt_with_answer_is_the_whole_text_tokenised(tokenizer):
    build = PromptBuilder(tokenizer, TEXTS, GENERATIVE, ", ", 16, placeholders=("history", "candidates"))
    prompt = build(torch.tensor([[1, 2]]), torch.tensor([2]), torch.tensor([[3, 4]]), torch.tensor([4]))
    text = (
        f"This user has watched Toy Story (1995){S}, GoldenEye (1995){S} in the previous. Choose the answer from: "
        f"Four Rooms (1995){S}, The English Patient (1996){S}. Answer: The English Patient (1996)"
    )
    assert read_ids(prompt, 0) == whole(tokenizer, text) + [tokenizer.eos_token_id]
    answer = prompt.input_ids[0][prompt.answer_mask[0]].tolist()
    assert tokenizer.decode(answer, skip_special_tokens=True).strip() == "The English Patient (1996)"
    assert answer[-1] == tokenizer.eos_token_id
    assert prompt.slot_items.tolist() == [1, 2, 3, 4]


@requires_smollm2
def test_chat_prompt_is_the_chat_template_tokenised(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    build = PromptBuilder(tokenizer, TEXTS, GENERATIVE, ", ", 16, placeholders=("history", "candidates"), chat=True)
    prompt = build(torch.tensor([[1]]), torch.tensor([1]), torch.tensor([[2, 3]]), torch.tensor([3]))
    user = (
        f"This user has watched Toy Story (1995){S} in the previous. Choose the answer from: GoldenEye (1995){S}, "
        f"Four Rooms (1995){S}. Answer:"
    )
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    assert read_ids(prompt, 0) == whole(tokenizer, chat + "Four Rooms (1995)<|im_end|>", special=False)
    decoded = tokenizer.decode(prompt.input_ids[0])
    assert "watched Toy Story (1995)" in decoded and "<|im_start|>assistant\nFour Rooms (1995)<|im_end|>" in decoded


def test_left_padding_and_positions(tokenizer):
    build = PromptBuilder(tokenizer, TEXTS, TEMPLATE, ", ", max_title_tokens=16)
    prompt = build(torch.tensor([[1, 2, 3, 0], [4, 0, 0, 0]]), torch.tensor([3, 1]))
    lengths = prompt.attention_mask.sum(1)
    assert prompt.attention_mask[:, -1].tolist() == [1, 1]  # the last prompt token is last in every row
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for row, length in enumerate(lengths.tolist()):
        width = prompt.input_ids.shape[1] - length
        assert prompt.attention_mask[row, :width].sum() == 0 and (prompt.input_ids[row, :width] == pad).all()
        assert prompt.position_ids[row, -length:].tolist() == list(range(length))


def test_llama2_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    tokenizer = sentencepiece_llama2(tmp_path)
    assert tokenizer.pad_token_id is None
    build = PromptBuilder(tokenizer, TEXTS, TEMPLATE, ", ", max_title_tokens=16)
    assert build.pad_id == tokenizer.eos_token_id
    prompt = build(torch.tensor([[1, 2], [3, 0]]), torch.tensor([2, 1]))
    assert prompt.input_ids[1, 0] == tokenizer.eos_token_id and prompt.attention_mask[1, 0] == 0
    assert read_ids(prompt, 1)[0] == tokenizer.bos_token_id  # Llama's <s>, from the tokenizer itself


def test_titles_are_cut_to_their_first_tokens(tokenizer):
    build = PromptBuilder(tokenizer, TEXTS, TEMPLATE, ", ", max_title_tokens=1)
    for text, shown in zip(TEXTS[1:], build.titles[1:], strict=True):
        first = tokenizer(text, add_special_tokens=False)["input_ids"][:1]
        assert shown == tokenizer.decode(first, skip_special_tokens=True).strip()
        assert len(shown) < len(text)
    prompt = build(torch.tensor([[1, 2, 3, 4]]), torch.tensor([4]))
    assert read_ids(prompt, 0) == whole(
        tokenizer, "The user watched " + ", ".join(t + S for t in build.titles[1:]) + ". Next:"
    )


@pytest.mark.parametrize(
    "stored, shown",
    [
        ("English Patient, The (1996)", "The English Patient (1996)"),
        ("Shawshank Redemption, The (1994)", "The Shawshank Redemption (1994)"),
        ("Postino, Il (1994)", "Il Postino (1994)"),
        ("Cité des enfants perdus, La (1995)", "La Cité des enfants perdus (1995)"),
        ("Beatles, The", "The Beatles"),
        ("Toy Story (1995)", "Toy Story (1995)"),
        ("Sense and Sensibility (1995)", "Sense and Sensibility (1995)"),
        ("Crumb, Theodore (1994)", "Crumb, Theodore (1994)"),  # not an article
    ],
)
def test_trailing_articles_go_first(stored, shown):
    assert move_article_first(stored) == shown


@pytest.mark.parametrize("template", ["no placeholder", "{history} and {history}", None])
def test_template_needs_one_history_placeholder(template):
    with pytest.raises(ValueError, match="'prompt_template'"):
        split_template(template)
