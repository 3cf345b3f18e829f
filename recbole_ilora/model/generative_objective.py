"""The paper's generative objective (LLaRA's and iLoRA's protocol; ``objective: generative``), one concern of
:class:`recbole_ilora.model.abstract_llm_recommender.LLMSequentialRecommender`, which mixes it in.

The prompt lists the history and ``num_candidates`` candidates (the target among items the user never interacted
with); training is the language-modelling loss on the answer's title tokens (and end of sequence); a sampled mode
scores every candidate by the mean log-likelihood of its title after that prompt, encoded once per user with its
key/value cache reused for the candidates, journaled so that a killed test resumes where it was; and
``generate_answers`` decodes greedily (the runner's ``recbole_ilora.generative`` matches answers to titles). A model
provides ``adapter_inputs`` and ``adapter`` (iLoRA: the prompt's embeddings and its user's gate).
"""

import contextlib
import copy

import torch
import torch.nn.functional as F

from recbole_ilora.model.prompt import parse_template

# Generative prompts per prompt_domain (LLaRA/iLoRA's wording); generative_prompt_template overrides them.
GENERATIVE_TEMPLATES = {
    "movie": "This user has watched {history} in the previous. Please predict the next movie this user will watch. "
    "Choose the answer from the following {num_candidates} movie titles: {candidates}. Answer:",
    "music": "This user has listened to {history} in the previous. Please predict the next artist this user will "
    "listen to. Choose the answer from the following {num_candidates} artists: {candidates}. Answer:",
    "game": "This user has played {history} in the previous. Please predict the next game this user will play. "
    "Choose the answer from the following {num_candidates} game titles: {candidates}. Answer:",
    "item": "This user has interacted with {history} in the previous. Please predict the next item this user will "
    "interact with. Choose the answer from the following {num_candidates} items: {candidates}. Answer:",
}


def generative_template(config):
    """The generative prompt template of ``config`` (``{num_candidates}`` filled in), checked for its placeholders."""
    template, key = config["generative_prompt_template"], "generative_prompt_template"
    if not template:
        if config["prompt_domain"] not in GENERATIVE_TEMPLATES:
            raise ValueError(
                f"Make sure 'prompt_domain' in {list(GENERATIVE_TEMPLATES)}, got {config['prompt_domain']!r} "
                "(or set 'generative_prompt_template')."
            )
        template = GENERATIVE_TEMPLATES[config["prompt_domain"]]
    if isinstance(template, str):
        template = template.replace("{num_candidates}", str(config["num_candidates"]))
    parse_template(template, ("history", "candidates"), key)
    return template


CHAT_TEMPLATE_CHOICES = ("auto", True, False)


def uses_chat_template(config, tokenizer):
    """Whether the generative prompt is a user turn of the tokenizer's chat template (``prompt_chat_template``):
    ``auto`` where the tokenizer has one (an instruct model answers in its assistant turn), ``True`` (an error
    without one), ``False`` never."""
    choice = config["prompt_chat_template"]
    if choice == "auto":
        return bool(getattr(tokenizer, "chat_template", None))
    return bool(choice)


class GenerativeObjective:
    """The generative objective's methods (mixed into the LLM models' base class, which builds ``answer_prompt``,
    ``candidate_sampler``, ``num_candidates`` and ``max_new_tokens`` when ``objective`` is ``generative``)."""

    _score_journal = None  # (journal, {prompt key: scores}) inside journaling_scores()

    def adapter_inputs(self, item_seq, item_seq_len, prompt):
        """``(inputs_embeds [B, T, H], adapter state)`` of ``prompt`` for the histories (e.g. iLoRA's gate)."""
        raise NotImplementedError

    def adapter(self, state):
        """A context manager running the backbone with ``state`` (rows aligned with the batch)."""
        return contextlib.nullcontext()

    def expand_adapter_state(self, state, repeats):
        """``state`` for a batch in which every row is repeated ``repeats`` times (``repeat_interleave``)."""
        return state

    def candidate_lists(self, interaction):
        """``[B, num_candidates]``: the target and never-interacted items, shuffled (seeded by RecBole's seed)."""
        if self.candidate_sampler is None:
            raise RuntimeError(
                "objective 'generative' samples candidates from RecBole's splits: call model.attach_splits(train_data, "
                "valid_data, test_data) after building the model (the runner does)."
            )
        users, targets = interaction[self.USER_ID], interaction[self.POS_ITEM_ID]
        return self.candidate_sampler.sample(users, targets).to(self.device)

    def generative_loss(self, interaction, candidates=None):
        """Language-modelling loss on the answer's tokens (its title and end of sequence) only."""
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        candidates = self.candidate_lists(interaction) if candidates is None else candidates
        prompt = self.answer_prompt(item_seq, item_seq_len, candidates, interaction[self.POS_ITEM_ID])
        hidden = self._decode_prompt(item_seq, item_seq_len, prompt).last_hidden_state  # [B, T, H]
        predicts_answer = prompt.answer_mask[:, 1:]  # position t predicts token t + 1
        logits = self.llm.lm_head()(hidden[:, :-1][predicts_answer])  # [n_answer_tokens, V]
        return F.cross_entropy(logits.float(), prompt.input_ids[:, 1:][predicts_answer])

    def _decode_prompt(self, item_seq, item_seq_len, prompt, use_cache=False, return_state=False):
        """The decoder's output for ``prompt`` under the histories' adapter state (and that state if asked)."""
        inputs_embeds, state = self.adapter_inputs(item_seq, item_seq_len, prompt)
        with self.adapter(state):
            output = self.llm.decoder()(
                inputs_embeds=inputs_embeds,
                attention_mask=prompt.attention_mask,
                position_ids=prompt.position_ids,
                use_cache=use_cache,
            )
        return (output, state) if return_state else output

    def _candidate_likelihood(self, item_seq, item_seq_len, candidates):
        """Mean log-likelihood of every candidate's title and end of sequence given the prompt listing them,
        ``[B, C]``; the prompt is encoded once per history and its key/value cache reused for its candidates,
        ``llm_candidates_per_forward`` of them at a time (each forward repeats the cache that many times per history:
        that, not the prompt, bounds the memory)."""
        prompt = self.answer_prompt(item_seq, item_seq_len, candidates)
        output, state = self._decode_prompt(item_seq, item_seq_len, prompt, use_cache=True, return_state=True)
        last = output.last_hidden_state[:, -1]  # [B, H]: predicts each answer's first token
        step = self.candidates_per_forward
        chunks = candidates.split(step, dim=1)
        columns = [
            self._answer_likelihood(
                prompt, last, state, output.past_key_values, chunk, last_chunk=index == len(chunks) - 1
            )
            for index, chunk in enumerate(chunks)
        ]
        return torch.cat(columns, dim=1)

    def _answer_likelihood(self, prompt, last, state, prompt_cache, candidates, last_chunk):
        """``[B, c]``: the mean log-likelihood of ``c`` candidates per history after the prompt whose cache is
        ``prompt_cache`` (copied unless this is the last chunk: a forward extends the cache in place)."""
        batch_size, num = candidates.shape
        cache = prompt_cache if last_chunk else copy.deepcopy(prompt_cache)
        cache.batch_repeat_interleave(num)  # [B*c, ...]
        answers = self.answer_prompt.answer_table[candidates.flatten()]  # [B*c, A]
        lengths = self.answer_prompt.answer_length[candidates.flatten()]  # [B*c]
        width = int(lengths.max())
        answers = answers[:, :width]
        answer_mask = torch.arange(width, device=answers.device).unsqueeze(0) < lengths.unsqueeze(1)  # [B*c, A]
        prompt_mask = prompt.attention_mask.repeat_interleave(num, dim=0)  # [B*c, T]
        start = prompt.position_ids[:, -1].repeat_interleave(num) + 1  # [B*c]
        embeddings = self.llm.input_embeddings()(answers)  # [B*c, A, H]
        hidden = last.repeat_interleave(num, dim=0).unsqueeze(1)  # [B*c, 1, H]
        if width > 1:
            with self.adapter(self.expand_adapter_state(state, num)):
                rest = self.llm.decoder()(
                    inputs_embeds=embeddings[:, :-1],
                    attention_mask=torch.cat([prompt_mask, answer_mask[:, :-1].long()], dim=1),
                    position_ids=start.unsqueeze(1) + torch.arange(width - 1, device=answers.device).unsqueeze(0),
                    past_key_values=cache,
                    use_cache=True,
                ).last_hidden_state  # [B*c, A-1, H]
            hidden = torch.cat([hidden, rest], dim=1)  # [B*c, A, H]
        logits = self.llm.lm_head()(hidden).float()  # [B*c, A, V]
        token_log_probs = logits.gather(-1, answers.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # [B*c, A]
        mean = (token_log_probs * answer_mask).sum(1) / lengths
        return mean.view(batch_size, num)

    @contextlib.contextmanager
    def journaling_scores(self, journal):
        """Within: the generative objective's likelihood scores are written to ``journal`` (an open JSON-lines
        journal with ``records``, ``append`` and ``path``: the runner's ``recbole_ilora.journal.JsonLinesJournal``)
        as each chunk of prompts is scored, and a prompt the journal already holds is not scored again (the scores
        are read back exactly). A killed test resumes where it was. The journal must belong to these weights (the
        runner names it after the model checkpoint and opens it)."""
        self._score_journal = (journal, {record["prompt"]: record["scores"] for record in journal.records})
        try:
            yield self
        finally:
            self._score_journal = None

    def _journaled_likelihood(self, histories, candidates):
        """:meth:`_candidate_likelihood` of one chunk (``histories`` ``[U, L + 1]`` with their lengths last,
        ``candidates`` ``[U, C]``), read from the journal when it holds every prompt of the chunk; a chunk is
        scored and written whole, so that its scores do not depend on where an earlier process was killed."""
        if self._score_journal is None:
            return self._candidate_likelihood(histories[:, :-1], histories[:, -1], candidates)
        journal, known = self._score_journal
        keys = [",".join(map(str, row)) for row in torch.cat([histories, candidates], dim=1).tolist()]
        if all(key in known for key in keys):
            return torch.tensor([known[key] for key in keys], dtype=torch.float32, device=candidates.device)
        scores = self._candidate_likelihood(histories[:, :-1], histories[:, -1], candidates)
        records = [{"prompt": key, "scores": row} for key, row in zip(keys, scores.tolist(), strict=True)]
        journal.append(records)
        known.update((record["prompt"], record["scores"]) for record in records)
        return scores

    def _predict_by_likelihood(self, interaction, histories, row_to_history):
        """Sampled protocols for the generative objective: each history's rows are its candidates, listed in the
        prompt in ascending item id (so the target's place reveals nothing) and scored by their title's mean
        log-likelihood."""
        items = interaction[self.ITEM_ID]
        order = torch.argsort(row_to_history * (items.max() + 1) + items)  # rows grouped by history, ids ascending
        counts = torch.bincount(row_to_history, minlength=histories.shape[0])
        if not bool((counts == counts[0]).all()):
            raise ValueError("Every history needs the same number of candidate rows (a sampled mode uni<N>).")
        candidates = items[order].view(histories.shape[0], -1)  # [U, C]
        chunks = list(zip(histories.split(self.eval_batch_size), candidates.split(self.eval_batch_size), strict=True))
        scores = torch.cat(
            [self._journaled_likelihood(seq, cands) for seq, cands in self._progress(chunks, "LLM scoring")]
        )  # [U, C]
        result = torch.empty_like(items, dtype=scores.dtype)
        result[order] = scores.flatten()
        return result

    @torch.no_grad()
    def generate_answers(self, item_seq, item_seq_len, candidates, return_tokens=False):
        """Greedy answers (at most ``generation_max_new_tokens`` tokens) to the prompts listing ``candidates``;
        every sequence keeps its own adapter state (e.g. its user's gate). Returns the decoded texts (and the new
        token ids ``[B, n]`` with ``return_tokens``)."""
        prompt = self.answer_prompt(item_seq, item_seq_len, candidates)
        inputs_embeds, state = self.adapter_inputs(item_seq, item_seq_len, prompt)
        with self.adapter(state):
            tokens = self.llm.causal_lm().generate(
                inputs_embeds=inputs_embeds,
                attention_mask=prompt.attention_mask,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.answer_prompt.pad_id,
            )  # [B, new tokens]: with inputs_embeds only, generate returns the new tokens
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return (texts, tokens) if return_tokens else texts
