"""What every LLM-based sequential recommender of the plugin shares (iLoRA now; Laser and PESO later).

- a frozen SASRec (RecBole's own) as collaborative encoder: item embeddings for the prompt slots and the scoring
  space, and the sequence representation (e.g. iLoRA's gate input);
- the frozen LLM backbone and its tokenizer (``backbone.py``), the prompt builder (``prompt.py``);
- a trainable projector (collaborative item embedding -> LLM input embedding, LLaRA's two-layer MLP) and a
  trainable scoring head (LLM hidden state at the last prompt position -> SASRec's item space);
- RecBole's model contract: ``calculate_loss`` (cross-entropy over all items), ``predict`` (one LLM forward per
  distinct history, however many candidate rows RecBole repeats it for) and ``full_sort_predict``;
- checkpoints that hold only the trained parameters (``state_dict`` / ``load_state_dict``).

A subclass wraps the backbone with its adapter in ``build_llm`` and implements
``forward(item_seq, item_seq_len) -> [B, d]`` (the user's representation in SASRec's item space).
"""

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn

from recbole_ilora.model.backbone import load_backbone
from recbole_ilora.model.prompt import PromptBuilder, fill_missing_texts, item_texts, split_template
from recbole_ilora.model.sequence_encoder import build_frozen_sasrec
from recbole_ilora.validation import require_int, require_positive


class LLMSequentialRecommender(SequentialRecommender):
    input_type = InputType.POINTWISE

    @classmethod
    def check_config(cls, config):
        """Reject out-of-range or mistyped keys before any data is prepared or model trained."""
        require_int(config, "llm_eval_batch_size", 1)
        require_int(config, "prompt_max_title_tokens", 1)
        require_positive(config, "learning_rate")
        if not config["llm_path"]:
            for key in ("llm_hidden_size", "llm_num_layers", "llm_num_heads", "llm_intermediate_size"):
                require_int(config, key, 1)
            require_int(config, "llm_vocab_size", 16)
            if config["llm_hidden_size"] % config["llm_num_heads"]:
                raise ValueError("Make sure 'llm_hidden_size' is a multiple of 'llm_num_heads'.")

    def __init__(self, config, dataset):
        self.check_config(config)
        super().__init__(config, dataset)
        self.eval_batch_size = config["llm_eval_batch_size"]

        # Collaborative encoder (frozen).
        self.sasrec = build_frozen_sasrec(config, dataset)
        self.item_size = self.sasrec.hidden_size

        # Backbone (frozen) and prompts.
        texts = fill_missing_texts(item_texts(dataset, config["prompt_text_field"]), dataset)
        prefix, suffix = split_template(config["prompt_template"])
        corpus = [prefix, suffix, config["prompt_item_separator"], *texts[1:]]
        backbone, self.tokenizer = load_backbone(config, corpus, self.device)
        self.llm_size = backbone.config.hidden_size
        self.llm = self.build_llm(backbone, config)
        self.prompt_builder = PromptBuilder(
            self.tokenizer,
            texts,
            config["prompt_template"],
            config["prompt_item_separator"],
            config["prompt_max_title_tokens"],
        )

        # Trainable bridges.
        self.projector = nn.Sequential(
            nn.Linear(self.item_size, self.llm_size), nn.GELU(), nn.Linear(self.llm_size, self.llm_size)
        )
        self.score_head = nn.Linear(self.llm_size, self.item_size)
        self.loss_fct = nn.CrossEntropyLoss()

    def build_llm(self, backbone, config):
        """Wrap the frozen ``backbone`` with the model's trainable adapter; returns the module kept as ``self.llm``."""
        raise NotImplementedError

    # ----- shared pieces for forward() -------------------------------------------------------------------------
    def train(self, mode=True):
        super().train(mode)
        self.sasrec.eval()  # frozen encoder: no dropout, ever
        return self

    def sequence_representation(self, item_seq, item_seq_len):
        """SASRec's representation of the history, ``[B, d]`` (frozen)."""
        with torch.no_grad():
            return self.sasrec(item_seq, item_seq_len)

    def item_embeddings(self):
        """SASRec's item embedding table, ``[n_items, d]`` (frozen): the prompt slots and the scoring space."""
        return self.sasrec.item_embedding.weight

    def prompt_embeddings(self, prompt, input_embeddings):
        """Token embeddings of ``prompt`` with every slot replaced by its projected item embedding, ``[B, T, H]``."""
        embeds = input_embeddings(prompt.input_ids)  # [B, T, H]
        slot_embeds = self.projector(self.item_embeddings()[prompt.slot_items])  # [n_slots, H]
        return embeds.masked_scatter(prompt.slot_mask.unsqueeze(-1), slot_embeds.to(embeds.dtype))

    @staticmethod
    def last_hidden_state(decoder, prompt, inputs_embeds):
        """The decoder's final hidden state at the last prompt position, ``[B, H]`` (prompts are left-padded)."""
        output = decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=prompt.attention_mask,
            position_ids=prompt.position_ids,
            use_cache=False,
        )
        return output.last_hidden_state[:, -1].float()

    # ----- RecBole's contract ----------------------------------------------------------------------------------
    def _scores_all_items(self, item_seq, item_seq_len):
        user_repr = self.forward(item_seq, item_seq_len)  # [B, d]
        logits = user_repr @ self.item_embeddings().t()  # [B, n_items]
        logits[:, 0] = float("-inf")  # the padding item is never an answer
        return logits

    def calculate_loss(self, interaction):
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        logits = self._scores_all_items(item_seq, item_seq_len)
        return self.loss_fct(logits, interaction[self.POS_ITEM_ID])

    def _encode_in_chunks(self, item_seq, item_seq_len):
        """``forward`` over at most ``llm_eval_batch_size`` histories at a time, ``[B, d]``."""
        parts = [
            self.forward(seq, length)
            for seq, length in zip(
                item_seq.split(self.eval_batch_size), item_seq_len.split(self.eval_batch_size), strict=True
            )
        ]
        return torch.cat(parts)

    def predict(self, interaction):
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        # Sampled protocols repeat each history once per candidate row: encode every distinct history once.
        histories, row_to_history = torch.unique(
            torch.cat([item_seq, item_seq_len.unsqueeze(1)], dim=1), dim=0, return_inverse=True
        )
        user_repr = self._encode_in_chunks(histories[:, :-1], histories[:, -1])  # [U, d]
        item_repr = self.item_embeddings()[interaction[self.ITEM_ID]]  # [N, d]
        return (user_repr[row_to_history] * item_repr).sum(-1)  # [N]

    def full_sort_predict(self, interaction):
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        user_repr = self._encode_in_chunks(item_seq, item_seq_len)  # [B, d]
        return user_repr @ self.item_embeddings().t()  # [B, n_items]

    # ----- checkpoints: trained parameters only ----------------------------------------------------------------
    def trainable_parameter_names(self):
        return {name for name, parameter in self.named_parameters() if parameter.requires_grad}

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """Only the trained parameters; the frozen backbone and SASRec are rebuilt from the configuration."""
        full = super().state_dict(*args, prefix=prefix, keep_vars=keep_vars)
        wanted = {prefix + name for name in self.trainable_parameter_names()}
        trained = type(full)((key, value) for key, value in full.items() if key in wanted)
        if destination is not None:
            destination.update(trained)
            return destination
        return trained

    def load_state_dict(self, state_dict, strict=True, assign=False):
        expected = self.trainable_parameter_names()
        missing, unexpected = expected - set(state_dict), set(state_dict) - expected
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"Checkpoint does not match {type(self).__name__}'s trained parameters: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}."
            )
        state = {key: value for key, value in state_dict.items() if key in expected}
        return super().load_state_dict(state, strict=False, assign=assign)
