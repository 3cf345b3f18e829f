"""Prompts of item histories for an LLM, built as tensors (no per-batch Python string work).

A prompt reads ``<bos> {prefix} {title_1} [e_1]{sep}{title_2} [e_2]{sep}... {title_n} [e_n] {suffix}``, where
``prefix`` and ``suffix`` are the parts of ``prompt_template`` around ``{history}`` and ``[e_i]`` is one *slot*
position whose input embedding the model replaces by the projected collaborative embedding of item ``i``
(LLaRA/iLoRA's hybrid item representation). Titles are tokenised once per item at start-up; a batch is then a
gather and a scatter. Prompts are left-padded so that the last prompt token sits at the last position of every row.
"""

from dataclasses import dataclass
from logging import getLogger

import torch

HISTORY_PLACEHOLDER = "{history}"


def item_texts(dataset, field):
    """The text of every internal item id (index 0, the padding item, is ''), from the item feature ``field``.

    Raises:
        ValueError: the dataset has no such item field (names the key and lists the fields it has).
    """
    item_feat = dataset.item_feat
    fields = [] if item_feat is None else list(item_feat.columns)
    if field not in fields:
        raise ValueError(
            f"'prompt_text_field' = {field!r} is not an item field of dataset '{dataset.dataset_name}'; its item "
            f"fields are {fields}. Load it with load_col (e.g. load_col: {{item: [item_id, {field}]}}) or set "
            "prompt_text_field to one of them."
        )
    values = item_feat[field]
    if values.dim() == 1:  # token field: one token id per item
        values = values.unsqueeze(1)
    vocabulary = dataset.field2id_token[field]
    texts = []
    for row in values.tolist():
        texts.append(" ".join(str(vocabulary[token]) for token in row if token != 0))
    return texts


def fill_missing_texts(texts, dataset):
    """Items without text get their original item token as text; one warning says how many."""
    tokens = dataset.field2id_token[dataset.iid_field]
    missing = {index for index, text in enumerate(texts) if index > 0 and not text.strip()}
    if missing:
        getLogger().warning(
            f"{len(missing)} of {len(texts) - 1} items have no text in 'prompt_text_field'; their prompts use the "
            f"item token instead (e.g. item {tokens[min(missing)]!r})."
        )
    return [f"item {tokens[index]}" if index in missing else text for index, text in enumerate(texts)]


def split_template(template):
    """``(prefix, suffix)`` around the single ``{history}`` placeholder of ``prompt_template``."""
    if not isinstance(template, str) or template.count(HISTORY_PLACEHOLDER) != 1:
        raise ValueError(
            f"'prompt_template' must contain the placeholder {HISTORY_PLACEHOLDER} exactly once, got {template!r}."
        )
    prefix, suffix = template.split(HISTORY_PLACEHOLDER)
    return prefix.strip(), suffix.strip()


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # [B, T] token ids (slots hold a placeholder id)
    attention_mask: torch.Tensor  # [B, T] 1 for prompt tokens, 0 for left padding
    position_ids: torch.Tensor  # [B, T] 0.. from each row's first prompt token
    slot_mask: torch.Tensor  # [B, T] True where an item embedding goes
    slot_items: torch.Tensor  # [n_slots] item id of every slot, in row-major order of slot_mask


class PromptBuilder(torch.nn.Module):
    """Turns ``(item_seq [B, L], item_seq_len [B])`` into a :class:`PromptBatch`.

    Args:
        tokenizer: the backbone's tokenizer.
        texts: text of every internal item id (index 0 is padding).
        template: ``prompt_template`` with one ``{history}``.
        separator: text between two history entries (``prompt_item_separator``).
        max_title_tokens: titles are cut to this many tokens (``prompt_max_title_tokens``).
    """

    def __init__(self, tokenizer, texts, template, separator, max_title_tokens):
        super().__init__()
        prefix, suffix = split_template(template)

        def encode(text):
            return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.slot_id = self.pad_id
        # Titles are tokenised on their own and so carry their leading word boundary; the separator's trailing
        # spaces would double it.
        separator_ids = encode(separator.rstrip(" "))
        self.separator_length = len(separator_ids)
        # Segment of item i: its title tokens, one slot, the separator.
        segments = [encode(text)[:max_title_tokens] + [self.slot_id] + separator_ids for text in texts]
        width = max(len(segment) for segment in segments)
        table = torch.full((len(segments), width), self.pad_id, dtype=torch.long)
        slot_positions = torch.empty(len(segments), dtype=torch.long)
        for index, segment in enumerate(segments):
            table[index, : len(segment)] = torch.tensor(segment, dtype=torch.long)
            slot_positions[index] = len(segment) - 1 - self.separator_length
        self.register_buffer("segment_table", table, persistent=False)  # [n_items, S]
        self.register_buffer("segment_length", torch.tensor([len(s) for s in segments]), persistent=False)  # [n]
        self.register_buffer("slot_position", slot_positions, persistent=False)  # [n_items]
        self.register_buffer("prefix_ids", torch.tensor(bos + encode(prefix), dtype=torch.long), persistent=False)
        self.register_buffer("suffix_ids", torch.tensor(encode(suffix), dtype=torch.long), persistent=False)

    def forward(self, item_seq, item_seq_len):
        batch_size, max_items = item_seq.shape
        width = self.segment_table.shape[1]
        device = item_seq.device
        tokens = self.segment_table[item_seq]  # [B, L, S]
        seg_len = self.segment_length[item_seq]  # [B, L]
        token_pos = torch.arange(width, device=device)  # [S]
        item_pos = torch.arange(max_items, device=device)  # [L]
        in_history = item_pos.unsqueeze(0) < item_seq_len.unsqueeze(1)  # [B, L]
        keep = token_pos.view(1, 1, -1) < seg_len.unsqueeze(-1)  # [B, L, S]
        keep &= in_history.unsqueeze(-1)
        # The last history entry takes no trailing separator.
        is_last = item_pos.unsqueeze(0) == (item_seq_len - 1).unsqueeze(1)  # [B, L]
        is_separator = token_pos.view(1, 1, -1) >= (seg_len - self.separator_length).unsqueeze(-1)  # [B, L, S]
        keep &= ~(is_last.unsqueeze(-1) & is_separator)
        is_slot = token_pos.view(1, 1, -1) == self.slot_position[item_seq].unsqueeze(-1)  # [B, L, S]
        slot_item = torch.where(is_slot, item_seq.unsqueeze(-1), torch.zeros_like(tokens))  # [B, L, S]

        prefix, suffix = self.prefix_ids, self.suffix_ids

        def filler(length, value, dtype):
            return torch.full((batch_size, length), value, dtype=dtype, device=device)

        content = torch.cat(
            [prefix.expand(batch_size, -1), tokens.flatten(1), suffix.expand(batch_size, -1)], dim=1
        )  # [B, P + L*S + Q]
        content_keep = torch.cat(
            [filler(len(prefix), True, torch.bool), keep.flatten(1), filler(len(suffix), True, torch.bool)], dim=1
        )
        content_slot_item = torch.cat(
            [filler(len(prefix), 0, torch.long), slot_item.flatten(1), filler(len(suffix), 0, torch.long)], dim=1
        )

        row_length = content_keep.sum(1)  # [B]
        total = int(row_length.max())
        # Left padding: the kept tokens of row b go to positions total - row_length[b] ... total - 1.
        target = (total - row_length).unsqueeze(1) + content_keep.cumsum(1) - 1  # [B, C]
        rows = torch.arange(batch_size, device=device).unsqueeze(1).expand_as(target)
        rows, target = rows[content_keep], target[content_keep]

        input_ids = torch.full((batch_size, total), self.pad_id, dtype=torch.long, device=device)
        input_ids[rows, target] = content[content_keep]
        slot_items = torch.zeros(batch_size, total, dtype=torch.long, device=device)
        slot_items[rows, target] = content_slot_item[content_keep]
        slot_mask = slot_items > 0  # history items are never the padding item 0
        attention_mask = torch.zeros(batch_size, total, dtype=torch.long, device=device)
        attention_mask[rows, target] = 1
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        return PromptBatch(input_ids, attention_mask, position_ids, slot_mask, slot_items[slot_mask])
