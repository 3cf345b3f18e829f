"""Prompts of item histories for an LLM: text a reader would write, tokenised as a whole.

A prompt is ``prompt_template`` with ``{history}`` (and, for generative prompts, ``{candidates}``) replaced by its
item list, ``{title_1}<slot>{sep}{title_2}<slot>{sep}...{title_n}<slot>``, where ``<slot>`` is a special token
registered in the backbone's tokenizer (:data:`SLOT_TOKEN`): the position whose input embedding the model replaces
by the projected collaborative embedding of the item before it (LLaRA/iLoRA's hybrid item representation). The whole
text, optionally inside the tokenizer's chat template as a user turn, is tokenised in one call, so the ids the
backbone reads are exactly those of the prompt text, slot embeddings aside, for any tokenizer (byte-level BPE, which
adds no leading spaces, and sentencepiece alike). Special tokens split the text, so a slot never merges with its
neighbours, and the text after the last slot tokenises the same on its own: that is how each item's answer tokens
(for teacher forcing and candidate scoring) are computed once at start-up. Prompts are left-padded so that the last
prompt token sits at the last position of every row.

Titles are shown as a reader writes them (``prompt_title_article_first``: "English Patient, The (1996)" is shown as
"The English Patient (1996)") and cut to ``prompt_max_title_tokens`` tokens; the generative protocol matches answers
against exactly these shown titles.
"""

import re
from dataclasses import dataclass
from logging import getLogger

import torch

HISTORY_PLACEHOLDER = "{history}"
SLOT_TOKEN = "<|item_slot|>"
_CHAT_CONTENT = "\x00PROMPT\x00"
# Articles that catalogues (ml-100k, MovieLens) move behind the title: "Shawshank Redemption, The (1994)".
_TRAILING_ARTICLE = re.compile(
    r"^(?P<title>.+?), (?P<article>The|A|An|La|Le|Les|L'|Il|Lo|Los|Las|El|Der|Die|Das|Un|Une|Una)"
    r"(?P<rest>(?: \([^()]*\))*)$"
)


def move_article_first(title):
    """``'English Patient, The (1996)'`` -> ``'The English Patient (1996)'``; other titles unchanged."""
    match = _TRAILING_ARTICLE.match(title.strip())
    if match is None:
        return title
    article = match["article"]
    joiner = "" if article.endswith("'") else " "
    return f"{article}{joiner}{match['title']}{match['rest']}"


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


def parse_template(template, placeholders=("history",), key="prompt_template", strip=True):
    """Split ``template`` around its placeholders (each of ``placeholders`` exactly once, e.g. ``{history}``).

    Returns:
        tuple: ``(texts, order)``: the ``len(placeholders) + 1`` texts around them (stripped when ``strip``), and the
        placeholder names in the order they appear.
    """
    names = ", ".join("{" + name + "}" for name in placeholders)
    if not isinstance(template, str) or any(template.count("{" + name + "}") != 1 for name in placeholders):
        raise ValueError(f"'{key}' must contain each of the placeholders {names} exactly once, got {template!r}.")
    order = sorted(placeholders, key=lambda name: template.index("{" + name + "}"))
    texts, rest = [], template
    for name in order:
        before, rest = rest.split("{" + name + "}")
        texts.append(before.strip() if strip else before)
    texts.append(rest.strip() if strip else rest)
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


def register_slot_token(tokenizer):
    """The id of :data:`SLOT_TOKEN` in ``tokenizer``, added as a special token (never split, never normalised) if
    it is not there yet. Its id may lie beyond the backbone's embedding table: a slot's embedding is never looked up."""
    from tokenizers import AddedToken

    if SLOT_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(SLOT_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(SLOT_TOKEN)


def leading_special_ids(tokenizer):
    """The ids the tokenizer puts before a text of its own accord (Llama's ``<s>``; none for SmolLM2)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    raise ValueError(f"Cannot tell which special tokens {type(tokenizer).__name__} adds around a text.")


def chat_frame(tokenizer):
    """``(before, after)``: the text of the tokenizer's chat template around one user turn, with the assistant's turn
    opened (``add_generation_prompt``). Raises ``ValueError`` when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"The backbone's tokenizer ({type(tokenizer).__name__}) has no chat template.")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _CHAT_CONTENT}], tokenize=False, add_generation_prompt=True
    )
    if text.count(_CHAT_CONTENT) != 1:
        raise ValueError("The backbone's chat template does not hold the user's message once.")
    before, after = text.split(_CHAT_CONTENT)
    return before, after


def cut_title(tokenizer, text, max_tokens):
    """``text`` cut to its first ``max_tokens`` tokens (tokenised on its own), as text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True).strip()


class PromptBuilder(torch.nn.Module):
    """Turns ``(item_seq [B, L], item_seq_len [B])``, and for generative prompts a candidate list ``[B, C]`` and an
    answer item ``[B]``, into a :class:`PromptBatch`.

    Args:
        tokenizer: the backbone's tokenizer (:data:`SLOT_TOKEN` is registered in it).
        texts: text of every internal item id (index 0 is padding).
        template: a prompt template with each of ``placeholders`` once (``{history}``; ``{candidates}`` too for
            generative prompts).
        separator: text between two entries of an item list (``prompt_item_separator``).
        max_title_tokens: titles are cut to this many tokens (``prompt_max_title_tokens``).
        placeholders: the item lists the template holds.
        key: the configuration key of ``template``, for error messages.
        chat: wrap the prompt in the tokenizer's chat template as a user turn (the answer is the assistant's turn).
        slots: follow each title with a slot (iLoRA's item embedding); False: titles only (a model that brings its
            collaborative information another way, e.g. Laser's prefix). Answers (generative prompts) need slots.
    """

    def __init__(
        self,
        tokenizer,
        texts,
        template,
        separator,
        max_title_tokens,
        placeholders=("history",),
        key="prompt_template",
        chat=False,
        slots=True,
    ):
        super().__init__()
        self.slots = slots
        self.pieces, self.order = parse_template(template, placeholders, key, strip=False)
        self.tokenizer = tokenizer
        self.separator = separator
        self.slot_token_id = register_slot_token(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.frame = chat_frame(tokenizer) if chat else ("", "")
        self.leading_ids = [] if chat else leading_special_ids(tokenizer)  # a chat template writes its own
        self.titles = [cut_title(tokenizer, text, max_title_tokens) if text else "" for text in texts]  # as shown
        # Answer of item i (generative prompts): the tokens that follow the prompt, its title and end of sequence.
        if not slots:  # no answers to a prompt without slots
            return
        self.answer_tail, self.answer_lead = self._answer_lead()
        self.answer_context = tokenizer(SLOT_TOKEN + self.answer_tail, add_special_tokens=False)["input_ids"]
        table, lengths = _table([self._answer_ids(title, key) for title in self.titles], self.pad_id)
        self.register_buffer("answer_table", table, persistent=False)  # [n_items, A]
        self.register_buffer("answer_length", lengths, persistent=False)  # [n_items]

    # ----- text ------------------------------------------------------------------------------------------------
    def item_list_text(self, items):
        """``title<slot>{sep}title<slot>...`` of a list of item ids."""
        slot = SLOT_TOKEN if self.slots else ""
        return self.separator.join(self.titles[item] + slot for item in items)

    def text(self, lists):
        """The whole prompt text for ``lists`` (placeholder name -> item ids), chat frame included."""
        parts = [self.pieces[0]]
        for index, name in enumerate(self.order):
            parts += [self.item_list_text(lists[name]), self.pieces[index + 1]]
        return self.frame[0] + "".join(parts) + self.frame[1]

    def _answer_lead(self):
        """``(tail, lead)``: the prompt's text after its last slot, and what separates the answer from it: nothing
        after white space (a chat turn ends in a newline), else one space ("Answer: The English Patient")."""
        tail = self.text({name: [0] for name in self.order}).rsplit(SLOT_TOKEN, 1)[1]
        return tail, ("" if not tail or tail[-1].isspace() else " ")

    def _answer_ids(self, title, key):
        """The ids of ``title`` as they follow the prompt when the whole text is tokenised, plus end of sequence.
        The text after the prompt's last slot is tokenised on its own the same way (special tokens split the text),
        so ``<slot> + tail + lead + title`` minus ``<slot> + tail`` gives them."""
        if not title:
            return [self.eos_id]
        tail, lead = self.answer_tail, self.answer_lead
        context = self.answer_context
        whole = self.tokenizer(SLOT_TOKEN + tail + lead + title, add_special_tokens=False)["input_ids"]
        if whole[: len(context)] != context:
            raise ValueError(
                f"'{key}': the end of the prompt ({tail!r}) merges with the answer {title!r} into one token; end the "
                "template with a word or punctuation the tokenizer keeps apart (e.g. 'Answer:')."
            )
        return whole[len(context) :] + [self.eos_id]

    # ----- tensors ---------------------------------------------------------------------------------------------
    def _rows(self, item_seq, item_seq_len, candidates):
        """Per row: the item lists (placeholder name -> ids), in the template's order."""
        histories = [seq[:length] for seq, length in zip(item_seq.tolist(), item_seq_len.tolist(), strict=True)]
        lists = [{"history": history} for history in histories]
        if "candidates" in self.order:
            if candidates is None:
                raise ValueError("This prompt template lists candidates: pass candidates [B, C].")
            for row, cands in zip(lists, candidates.tolist(), strict=True):
                row["candidates"] = cands
        return lists

    def token_ids(self, item_seq, item_seq_len, candidates=None):
        """Every row's prompt token ids (slots as :data:`SLOT_TOKEN`'s id) and its slot items, as lists."""
        rows = self._rows(item_seq, item_seq_len, candidates)
        encoded = self.tokenizer([self.text(row) for row in rows], add_special_tokens=False)["input_ids"]
        slot_items = [[item for name in self.order for item in row[name]] if self.slots else [] for row in rows]
        return [self.leading_ids + ids for ids in encoded], slot_items

    def lengths(self, item_seq, item_seq_len, candidates=None, answers=None):
        """Every row's prompt length in tokens, ``[B]``."""
        return self.forward(item_seq, item_seq_len, candidates, answers).attention_mask.sum(1)

    def forward(self, item_seq, item_seq_len, candidates=None, answers=None):
        """The prompt batch; ``candidates`` ``[B, C]`` fill ``{candidates}``; ``answers`` ``[B]`` append the answer
        title and end-of-sequence token (teacher forcing), marked by ``answer_mask``."""
        device = item_seq.device
        rows, slot_items = self.token_ids(item_seq, item_seq_len, candidates)
        answer_ids = [[] for _ in rows]
        if answers is not None:
            if not self.slots:
                raise ValueError("A prompt without slots has no answers (generative prompts need slots).")
            answer_ids = [self.answer_table[item, : self.answer_length[item]].tolist() for item in answers.tolist()]
        total = max(len(ids) + len(answer) for ids, answer in zip(rows, answer_ids, strict=True))
        batch_size = len(rows)
        input_ids = torch.full((batch_size, total), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(batch_size, total, dtype=torch.long)
        answer_mask = torch.zeros(batch_size, total, dtype=torch.bool)
        for row, (ids, answer) in enumerate(zip(rows, answer_ids, strict=True)):
            start = total - len(ids) - len(answer)  # left padding
            input_ids[row, start:] = torch.tensor(ids + answer, dtype=torch.long)
            attention_mask[row, start:] = 1
            answer_mask[row, total - len(answer) :] = bool(answer)
        slot_mask = input_ids == self.slot_token_id
        counts = slot_mask.sum(1).tolist()
        for row, items in enumerate(slot_items):
            if counts[row] != len(items):
                raise ValueError(
                    f"A prompt holds {counts[row]} slots for {len(items)} items: does a title contain {SLOT_TOKEN!r}?"
                )
        input_ids[slot_mask] = self.pad_id  # a placeholder: the slot's embedding is the item's, never looked up
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        flat_items = torch.tensor([item for items in slot_items for item in items], dtype=torch.long)
        return PromptBatch(
            input_ids.to(device),
            attention_mask.to(device),
            position_ids.to(device),
            slot_mask.to(device),
            flat_items.to(device),
            answer_mask.to(device) if answers is not None else None,
        )


def _table(sequences, pad_id):
    """Right-padded ``[n, width]`` tensor of token lists, and their lengths ``[n]``."""
    width = max(len(sequence) for sequence in sequences)
    table = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for index, sequence in enumerate(sequences):
        table[index, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return table, torch.tensor([len(sequence) for sequence in sequences], dtype=torch.long)
