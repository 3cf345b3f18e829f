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


def parse_template(template, placeholders=("history",), key="prompt_template"):
    """Split ``template`` around its placeholders (each of ``placeholders`` exactly once, e.g. ``{history}``).

    Returns:
        tuple: ``(texts, order)``: the ``len(placeholders) + 1`` stripped texts around them, and the placeholder
        names in the order they appear.
    """
    names = ", ".join("{" + name + "}" for name in placeholders)
    if not isinstance(template, str) or any(template.count("{" + name + "}") != 1 for name in placeholders):
        raise ValueError(f"'{key}' must contain each of the placeholders {names} exactly once, got {template!r}.")
    order = sorted(placeholders, key=lambda name: template.index("{" + name + "}"))
    texts, rest = [], template
    for name in order:
        before, rest = rest.split("{" + name + "}")
        texts.append(before.strip())
    texts.append(rest.strip())
    return texts, order


def split_template(template):
    """``(prefix, suffix)`` around the single ``{history}`` placeholder of ``prompt_template``."""
    texts, _ = parse_template(template)
    return texts[0], texts[1]


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # [B, T] token ids (slots hold a placeholder id)
    attention_mask: torch.Tensor  # [B, T] 1 for prompt tokens, 0 for left padding
    position_ids: torch.Tensor  # [B, T] 0.. from each row's first prompt token
    slot_mask: torch.Tensor  # [B, T] True where an item embedding goes
    slot_items: torch.Tensor  # [n_slots] item id of every slot, in row-major order of slot_mask
    answer_mask: torch.Tensor | None = None  # [B, T] True on the answer's tokens (title and end of sequence)


class PromptBuilder(torch.nn.Module):
    """Turns ``(item_seq [B, L], item_seq_len [B])``, and for generative prompts a candidate list ``[B, C]`` and an
    answer item ``[B]``, into a :class:`PromptBatch`.

    Args:
        tokenizer: the backbone's tokenizer.
        texts: text of every internal item id (index 0 is padding).
        template: a prompt template with each of ``placeholders`` once (``{history}``; ``{candidates}`` too for
            generative prompts).
        separator: text between two entries of an item list (``prompt_item_separator``).
        max_title_tokens: titles are cut to this many tokens (``prompt_max_title_tokens``).
        placeholders: the item lists the template holds.
        key: the configuration key of ``template``, for error messages.
    """

    def __init__(
        self, tokenizer, texts, template, separator, max_title_tokens, placeholders=("history",), key="prompt_template"
    ):
        super().__init__()
        constants, self.order = parse_template(template, placeholders, key)

        def encode(text):
            return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.slot_id = self.pad_id
        # Titles are tokenised on their own and so carry their leading word boundary; the separator's trailing
        # spaces would double it.
        separator_ids = encode(separator.rstrip(" "))
        self.separator_length = len(separator_ids)
        titles = [encode(text)[:max_title_tokens] for text in texts]
        # Segment of item i in a list: its title tokens, one slot, the separator.
        segments = [title + [self.slot_id] + separator_ids for title in titles]
        table, lengths = _table(segments, self.pad_id)
        self.register_buffer("segment_table", table, persistent=False)  # [n_items, S]
        self.register_buffer("segment_length", lengths, persistent=False)  # [n_items]
        self.register_buffer("slot_position", lengths - 1 - self.separator_length, persistent=False)  # [n_items]
        # Answer of item i (generative prompts): its title tokens and the end-of-sequence token.
        table, lengths = _table([title + [self.eos_id] for title in titles], self.pad_id)
        self.register_buffer("answer_table", table, persistent=False)  # [n_items, A]
        self.register_buffer("answer_length", lengths, persistent=False)  # [n_items]
        for index, text in enumerate(constants):
            ids = (bos if index == 0 else []) + encode(text)
            self.register_buffer(f"text_{index}", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.num_texts = len(constants)

    def _item_list(self, items, lengths):
        """Tokens, kept-token mask and slot item ids of an item list, each ``[B, L * S]``."""
        width, max_items = self.segment_table.shape[1], items.shape[1]
        token_pos = torch.arange(width, device=items.device).view(1, 1, -1)  # [1, 1, S]
        item_pos = torch.arange(max_items, device=items.device).unsqueeze(0)  # [1, L]
        tokens = self.segment_table[items]  # [B, L, S]
        seg_len = self.segment_length[items].unsqueeze(-1)  # [B, L, 1]
        keep = (token_pos < seg_len) & (item_pos < lengths.unsqueeze(1)).unsqueeze(-1)  # [B, L, S]
        # The last entry takes no trailing separator.
        is_last = (item_pos == (lengths - 1).unsqueeze(1)).unsqueeze(-1)  # [B, L, 1]
        keep &= ~(is_last & (token_pos >= seg_len - self.separator_length))
        is_slot = token_pos == self.slot_position[items].unsqueeze(-1)  # [B, L, S]
        slot_item = torch.where(is_slot, items.unsqueeze(-1), torch.zeros_like(tokens))  # [B, L, S]
        return tokens.flatten(1), keep.flatten(1), slot_item.flatten(1)

    def lengths(self, item_seq, item_seq_len, candidates=None, answers=None):
        """Every row's prompt length in tokens, ``[B]`` (without building the prompt)."""
        return self._pieces(item_seq, item_seq_len, candidates, answers)[1].sum(1)

    def _pieces(self, item_seq, item_seq_len, candidates, answers):
        batch_size, device = item_seq.shape[0], item_seq.device
        lists = {"history": (item_seq, item_seq_len)}
        if "candidates" in self.order:
            if candidates is None:
                raise ValueError("This prompt template lists candidates: pass candidates [B, C].")
            lists["candidates"] = (candidates, torch.full_like(item_seq_len, candidates.shape[1]))
        tokens, keep, slots, answer = [], [], [], []

        def add(piece_tokens, piece_keep, piece_slots, is_answer=False):
            tokens.append(piece_tokens)
            keep.append(piece_keep)
            slots.append(piece_slots)
            answer.append(torch.full_like(piece_keep, is_answer))

        for index in range(self.num_texts):
            text = getattr(self, f"text_{index}").expand(batch_size, -1)
            add(text, torch.ones_like(text, dtype=torch.bool), torch.zeros_like(text))
            if index < len(self.order):
                add(*self._item_list(*lists[self.order[index]]))
        if answers is not None:
            answer_tokens = self.answer_table[answers]  # [B, A]
            positions = torch.arange(answer_tokens.shape[1], device=device).unsqueeze(0)
            answer_keep = positions < self.answer_length[answers].unsqueeze(1)
            add(answer_tokens, answer_keep, torch.zeros_like(answer_tokens), is_answer=True)
        return torch.cat(tokens, 1), torch.cat(keep, 1), torch.cat(slots, 1), torch.cat(answer, 1)

    def forward(self, item_seq, item_seq_len, candidates=None, answers=None):
        """The prompt batch; ``candidates`` ``[B, C]`` fill ``{candidates}``; ``answers`` ``[B]`` append the answer
        title and end-of-sequence token (teacher forcing), marked by ``answer_mask``."""
        batch_size, device = item_seq.shape[0], item_seq.device
        content, content_keep, content_slot_item, content_answer = self._pieces(
            item_seq, item_seq_len, candidates, answers
        )  # [B, C] each

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
        slot_mask = slot_items > 0  # listed items are never the padding item 0
        attention_mask = torch.zeros(batch_size, total, dtype=torch.long, device=device)
        attention_mask[rows, target] = 1
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        answer_mask = None
        if answers is not None:
            answer_mask = torch.zeros(batch_size, total, dtype=torch.bool, device=device)
            answer_mask[rows, target] = content_answer[content_keep]
        return PromptBatch(input_ids, attention_mask, position_ids, slot_mask, slot_items[slot_mask], answer_mask)


def _table(sequences, pad_id):
    """Right-padded ``[n, width]`` tensor of token lists, and their lengths ``[n]``."""
    width = max(len(sequence) for sequence in sequences)
    table = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for index, sequence in enumerate(sequences):
        table[index, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return table, torch.tensor([len(sequence) for sequence in sequences], dtype=torch.long)
