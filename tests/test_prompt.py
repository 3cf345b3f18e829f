"""Prompt tensors: text, slot positions and left padding line up with the history."""

import pytest
import torch

from recbole_ilora.model.backbone import train_embedded_tokenizer
from recbole_ilora.model.prompt import PromptBuilder, split_template

TEXTS = ["", "Toy Story", "GoldenEye", "Four Rooms", "Get Shorty"]
TEMPLATE = "The user watched {history}. Next:"


@pytest.fixture(scope="module")
def builder():
    tokenizer = train_embedded_tokenizer(TEXTS[1:] + ["The user watched", ". Next:", ", "], vocab_size=200)
    return tokenizer, PromptBuilder(tokenizer, TEXTS, TEMPLATE, ", ", max_title_tokens=16)


def test_prompt_reads_history_with_one_slot_per_item(builder):
    tokenizer, build = builder
    item_seq = torch.tensor([[1, 2, 3, 0], [4, 0, 0, 0]])
    prompt = build(item_seq, torch.tensor([3, 1]))
    batch, total = prompt.input_ids.shape
    assert prompt.attention_mask.shape == prompt.position_ids.shape == prompt.slot_mask.shape == (batch, total)
    assert prompt.slot_mask.sum(1).tolist() == [3, 1]
    assert prompt.slot_items.tolist() == [1, 2, 3, 4]  # row-major order, one per history item

    def text(row):
        ids = prompt.input_ids[row][prompt.attention_mask[row].bool()].clone()
        ids[prompt.slot_mask[row][prompt.attention_mask[row].bool()]] = tokenizer.convert_tokens_to_ids("<unk>")
        return tokenizer.decode(ids, skip_special_tokens=False)

    assert text(0) == "<s> The user watched Toy Story<unk> , GoldenEye<unk> , Four Rooms<unk> . Next:"
    assert text(1) == "<s> The user watched Get Shorty<unk> . Next:"


def test_left_padding_and_positions(builder):
    _, build = builder
    prompt = build(torch.tensor([[1, 2, 3, 0], [4, 0, 0, 0]]), torch.tensor([3, 1]))
    lengths = prompt.attention_mask.sum(1)
    assert prompt.attention_mask[:, -1].tolist() == [1, 1]  # the last prompt token is last in every row
    assert torch.equal(prompt.input_ids[0, -3:], prompt.input_ids[1, -3:])  # same suffix, right-aligned
    for row, length in enumerate(lengths.tolist()):
        assert prompt.attention_mask[row, : prompt.input_ids.shape[1] - length].sum() == 0
        assert prompt.position_ids[row, -length:].tolist() == list(range(length))


def test_slot_follows_its_title(builder):
    tokenizer, build = builder
    prompt = build(torch.tensor([[2, 0]]), torch.tensor([1]))
    slot = int(prompt.slot_mask[0].nonzero())
    title_ids = tokenizer("GoldenEye", add_special_tokens=False)["input_ids"]
    assert prompt.input_ids[0, slot - len(title_ids) : slot].tolist() == title_ids


def test_titles_are_truncated(builder):
    tokenizer, _ = builder
    build = PromptBuilder(tokenizer, TEXTS, TEMPLATE, ", ", max_title_tokens=1)
    long = build(torch.tensor([[1, 2, 3, 4]]), torch.tensor([4]))
    full = PromptBuilder(tokenizer, TEXTS, TEMPLATE, ", ", max_title_tokens=16)(
        torch.tensor([[1, 2, 3, 4]]), torch.tensor([4])
    )
    assert long.input_ids.shape[1] < full.input_ids.shape[1]
    assert long.slot_mask.sum() == 4


@pytest.mark.parametrize("template", ["no placeholder", "{history} and {history}", None])
def test_template_needs_one_history_placeholder(template):
    with pytest.raises(ValueError, match="'prompt_template'"):
        split_template(template)
