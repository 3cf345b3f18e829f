"""Laser (Zhang, Hu, Zhang, Song, Huang, Nie: "Laser: Parameter-Efficient LLM Bi-Tuning for Sequential
Recommendation with Collaborative Information", arXiv 2409.01605): the LLM stays entirely frozen, with no LoRA;
only what goes in front of the prompt (a prefix) and behind it (a suffix) is trained.

- **M-Former (prefix).** The history's frozen SASRec item embeddings are projected to the M-Former width. A router
  (linear, ``mformer_num_experts`` experts) scores each history item (softmax over experts); padded positions are
  left out; the scores are averaged over the history and the ``mformer_top_k`` best experts are kept, their weights
  re-normalised to sum to one. Each expert is its own set of ``mformer_num_queries`` learnable query vectors; the
  queries attend to themselves and cross-attend to the projected history (a small transformer,
  ``mformer_num_layers`` layers, trained from scratch: the paper initialises it from BERT-base, which cannot be had
  here). The selected experts' outputs, weighted, are mapped to the LLM width and become prefix tokens placed
  before the text prompt. A load-balancing loss ``alpha * E * sum_e p_e f_e`` (``mformer_balance_weight``; ``p_e``:
  the mean router probability of expert e over the history items of the batch, ``f_e``: the share of those items
  whose top-k holds e) keeps the experts in use.
- **Suffix.** One learnable embedding after the text prompt; the user vector is the LLM's last hidden state there.
- **Items.** Each item is encoded by the same frozen LLM from its own prompt (``laser_item_template`` with its title,
  the M-Former prefix of its own collaborative embedding, then the suffix): an item table, computed without
  gradients and refreshed once per training epoch (at its first step). The user side learns to match that table,
  so validation and the tests score against it too, as the official code does (its ``model.I``, computed as the
  epoch starts and saved with the checkpoint): the table travels in the checkpoint (``other_parameter``), and the
  best epoch's weights are tested with the table they were trained against, reused by every test mode. (Scoring
  against a table recomputed from the trained weights instead, as this file first did, changes every item vector
  the user side had learnt to match: on the cycle fixture, Hit@1 0.03 after 6 epochs.) A model that never trained
  (no table) computes one from its current weights.
- **Score and loss.** Cosine similarity of the user vector and every item vector divided by ``laser_temperature``
  (0.05); cross-entropy over all items, plus the balance loss. With ``laser_center`` (off by default; issue 43's
  option against anisotropy: LLM vectors of different prompts are nearly parallel, so the cosine's spread is small)
  the table's mean item vector is subtracted from both sides first. Every run records the table's geometry
  (:func:`table_geometry`) for its first and its tested table.
- **Stage 1** (``laser_stage1_epochs``, before everything else; the official code's first stage). The M-Former is
  aligned with the history's text by a contrastive loss, without the LLM: the history's text is the mean of the
  frozen backbone's input embeddings over its items' title tokens (no extra download; the paper uses BERT-base, and
  initialises the M-Former from it, neither of which can be had here), the M-Former's side its prefix tokens, both in
  the LLM's embedding space; a history's similarity to a text is the best cosine over its prefix tokens (BLIP-2's
  image-text contrast), scaled by a learnable temperature starting at ``laser_stage1_temperature`` (0.07, the
  official), with the symmetric cross-entropy over the batch and label smoothing ``laser_stage1_label_smoothing``
  (0.1, the official), plus the balance loss.
- **Two phases** (the official code's stage "2-1" then "2-2"). For the first ``laser_phase1_epochs`` epochs the item
  side is encoded with gradients, for each row's target and ``laser_phase1_negatives`` items drawn uniformly from
  the catalogue (never the target; the official 10 per row), and the loss is the cross-entropy of the target among
  those 1 + N (the balance loss of every encoding added: the user's and the items'). No item table is built in that
  phase; validation scores against a table of the current weights. Then the table phase above. Uniform negatives,
  as the official code's are drawn; shared in-batch negatives with a log-popularity correction would cost fewer
  item encodings but change what the phase learns, and were not taken. With 0 (the default until issue 43's runs
  measure it) training starts at the table phase.

Departures: stage 1 aligns with the backbone's own token embeddings, not BERT, and the M-Former starts from random
weights, not BERT-base (neither can be had here). Written from the paper and the official code
(``015xy/Laser-main``); where the official code counts padded history positions in the balance loss and in the mean
routing score, this one does not.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from recbole_ilora.model.abstract_llm_recommender import LLMSequentialRecommender
from recbole_ilora.model.backbone import FrozenBackbone
from recbole_ilora.model.prompt import PromptBuilder
from recbole_ilora.validation import require_bool, require_float, require_int, require_positive


def table_geometry(table):
    """The geometry of an item table ``[n_items, H]`` (row 0, the padding item, left out), for issue 43's question of
    whether anisotropy holds the cosine score back: ``mean_cosine``, the mean cosine over all pairs of distinct items
    (exact, from the norm of the sum of the unit rows); ``effective_rank``, exp of the entropy of the normalised
    singular values of the unit rows (Roy and Vetterli 2007: n for n orthonormal rows, 1 for identical rows); and
    ``centred_effective_rank``, the same after the mean unit row is removed (what ``laser_center`` scores with)."""
    unit = F.normalize(table[1:].double(), dim=-1)
    n = unit.shape[0]
    total = unit.sum(0)
    mean_cosine = (float(total @ total) - n) / (n * (n - 1)) if n > 1 else float("nan")

    def effective_rank(matrix):
        values = torch.linalg.svdvals(matrix)
        if float(values.sum()) == 0.0:
            return 0.0
        p = values / values.sum()
        p = p[p > 0]
        return float(torch.exp(-(p * p.log()).sum()))

    return {
        "mean_cosine": mean_cosine,
        "effective_rank": effective_rank(unit),
        "centred_effective_rank": effective_rank(unit - unit.mean(0)),
    }


class MFormer(nn.Module):
    """Routed query experts cross-attending to a sequence of collaborative embeddings; see the module docstring."""

    def __init__(self, in_size, width, out_size, num_experts, num_queries, top_k, num_layers, num_heads, dropout):
        super().__init__()
        if top_k > num_experts:
            raise ValueError(f"'mformer_top_k' ({top_k}) cannot exceed 'mformer_num_experts' ({num_experts})")
        self.num_experts, self.top_k = num_experts, top_k
        self.input_projection = nn.Linear(in_size, width)
        self.router = nn.Linear(width, num_experts)
        self.queries = nn.Parameter(torch.randn(num_experts, num_queries, width) * 0.02)
        layer = nn.TransformerDecoderLayer(
            width, num_heads, dim_feedforward=4 * width, dropout=dropout, batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerDecoder(layer, num_layers)
        self.output_projection = nn.Linear(width, out_size)

    def route(self, memory, mask):
        """Router probabilities per history item ``[B, L, E]`` (zero at padding) and the sequence's weights over the
        experts ``[B, E]``: the mean over its items, the top-k kept and re-normalised (zero elsewhere)."""
        probs = self.router(memory).softmax(-1) * mask.unsqueeze(-1)
        mean = probs.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        top, index = mean.topk(self.top_k, dim=-1)
        weights = torch.zeros_like(mean).scatter(-1, index, top / top.sum(-1, keepdim=True))
        return probs, weights

    def balance_loss(self, probs, mask):
        """``E * sum_e p_e f_e`` over the (unpadded) history items of the batch (without the weight alpha)."""
        valid = mask.bool()
        item_probs = probs[valid]  # [N, E]
        p = item_probs.mean(0)
        chosen = item_probs.topk(self.top_k, dim=-1).indices  # [N, k]
        f = torch.zeros_like(p).scatter_add(0, chosen.flatten(), torch.ones(chosen.numel(), device=p.device))
        f = f / len(item_probs)
        return self.num_experts * (p * f).sum()

    def forward(self, items, mask):
        """``items`` ``[B, L, d_in]`` and ``mask`` ``[B, L]`` (1 for a real item) -> prefix ``[B, Q, d_out]``, router
        probabilities ``[B, L, E]`` and expert weights ``[B, E]``."""
        mask = mask.to(items.dtype)
        memory = self.input_projection(items)
        probs, weights = self.route(memory, mask)
        padding = mask == 0
        output = 0.0
        chosen = weights.topk(self.top_k, dim=-1)  # the experts in use, with their weights
        for slot in range(self.top_k):
            expert = chosen.indices[:, slot]  # [B]
            decoded = self.transformer(self.queries[expert], memory, memory_key_padding_mask=padding)
            output = output + chosen.values[:, slot, None, None] * decoded
        return self.output_projection(output), probs, weights


class Laser(LLMSequentialRecommender):
    prompt_slots = False  # the collaborative information comes in through the prefix
    has_lora_adapter = False  # the LLM is frozen whole
    has_gate = True  # the M-Former's router
    _keep_table = False  # set by resume_within_epoch for the next epoch start

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        if (config["objective"] or "head") != "head":
            raise ValueError("Laser scores items by the cosine of LLM vectors: 'objective' must be 'head'.")
        for key in ("mformer_num_experts", "mformer_top_k", "mformer_num_queries", "mformer_num_layers"):
            require_int(config, key, 1)
        require_int(config, "mformer_hidden_size", 1)
        require_int(config, "mformer_num_heads", 1)
        if config["mformer_hidden_size"] % config["mformer_num_heads"]:
            raise ValueError("Make sure 'mformer_hidden_size' is a multiple of 'mformer_num_heads'.")
        if config["mformer_top_k"] > config["mformer_num_experts"]:
            raise ValueError("Make sure 'mformer_top_k' <= 'mformer_num_experts'.")
        require_float(config, "mformer_dropout", 0.0, 1.0)
        require_float(config, "mformer_balance_weight", 0.0, float("inf"))
        require_positive(config, "laser_temperature")
        require_int(config, "laser_phase1_epochs", 0)
        require_int(config, "laser_phase1_negatives", 1)
        require_int(config, "laser_stage1_epochs", 0)
        require_positive(config, "laser_stage1_temperature")
        require_float(config, "laser_stage1_label_smoothing", 0.0, 1.0)
        require_bool(config, "laser_center")
        require_positive(config, "laser_mformer_lr_scale")

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.temperature = config["laser_temperature"]
        self.balance_weight = config["mformer_balance_weight"]
        self.mformer = MFormer(
            self.item_size,
            config["mformer_hidden_size"],
            self.llm_size,
            config["mformer_num_experts"],
            config["mformer_num_queries"],
            config["mformer_top_k"],
            config["mformer_num_layers"],
            config["mformer_num_heads"],
            config["mformer_dropout"],
        )
        self.suffix = nn.Parameter(torch.randn(1, 1, self.llm_size) * 0.02)
        self.item_prompt = PromptBuilder(
            self.tokenizer,
            self.prompt_builder.titles,
            config["laser_item_template"],
            config["prompt_item_separator"],
            config["prompt_max_title_tokens"],
            key="laser_item_template",
            slots=False,
        )
        self.item_vectors = None  # the item table of the latest training epoch (saved with the checkpoint)
        self.other_parameter_name = ["item_vectors"]  # RecBole's hook: kept in checkpoints and training states
        self.last_balance_loss = None  # the balance loss of the last training step (reported)
        self.phase1_epochs = config["laser_phase1_epochs"]
        self.phase1_negatives = config["laser_phase1_negatives"]
        self.stage1_epochs = config["laser_stage1_epochs"]
        self.stage1_smoothing = config["laser_stage1_label_smoothing"]
        # log(1 / temperature), learnt (CLIP's and BLIP-2's parametrisation); only where stage 1 runs, so that a
        # model without it keeps exactly the parameters (and checkpoints) it had before stage 1 existed
        if self.stage1_epochs:
            self.stage1_log_scale = nn.Parameter(torch.tensor(math.log(1.0 / config["laser_stage1_temperature"])))
        self._title_vectors = None  # [n_items, H]: each title's mean token embedding (stage 1's text side)
        self.epoch = 0  # the training epoch under way (start_epoch)
        self.center = bool(config["laser_center"])
        self.mformer_lr_scale = config["laser_mformer_lr_scale"]
        self.geometry = {}  # table_geometry of the first table built (initial weights) and the latest (reported)

    def build_llm(self, backbone, config):
        return FrozenBackbone(backbone)

    def training_summary(self):
        """What the runner records after training (and its tests): the balance loss of the last step, and the item
        table's geometry when the first table was built (``first``: the initial weights) and the latest (``last``:
        the tested table), with the number of tables built."""
        return {"balance_loss": self.last_balance_loss, "table_geometry": dict(self.geometry) or None}

    def build_bridges(self):
        return None, None  # no slots, no head: prefix, suffix and the cosine of LLM vectors

    def parameter_groups(self):
        """The optimizer's groups: the M-Former at ``laser_mformer_lr_scale`` times the learning rate, the suffix (and
        stage 1's temperature) at the learning rate (the official code trains its parts at different rates)."""
        trained = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        mformer = [p for name, p in trained if name.startswith("mformer.")]
        rest = [p for name, p in trained if not name.startswith("mformer.")]
        return [{"params": mformer, "lr_scale": self.mformer_lr_scale}, {"params": rest, "lr_scale": 1.0}]

    # ----- encoding ------------------------------------------------------------------------------------------
    def encode(self, text_prompt, items, mask):
        """The LLM's last hidden state (at the suffix) for ``[prefix of items] + text prompt + suffix``, ``[B, H]``,
        with the router's probabilities and weights."""
        embed = self.llm.input_embeddings()
        text = embed(text_prompt.input_ids)  # [B, T, H], left-padded
        prefix, probs, weights = self.mformer(items, mask)  # [B, Q, H]
        batch = text.shape[0]
        inputs_embeds = torch.cat([prefix.to(text.dtype), text, self.suffix.expand(batch, -1, -1).to(text.dtype)], 1)
        ones = lambda n: text_prompt.attention_mask.new_ones(batch, n)  # noqa: E731
        attention_mask = torch.cat([ones(prefix.shape[1]), text_prompt.attention_mask, ones(1)], dim=1)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # the text's padding sits between prefix and text
        output = self.llm.decoder()(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return output.last_hidden_state[:, -1].float(), probs, weights

    def _user(self, item_seq, item_seq_len):
        mask = item_seq != 0
        with torch.no_grad():
            history = self.item_embeddings()[item_seq]  # frozen SASRec embeddings, [B, L, d]
        return self.encode(self.prompt_builder(item_seq, item_seq_len), history, mask)

    def forward(self, item_seq, item_seq_len):
        return self._user(item_seq, item_seq_len)[0]  # [B, H]

    def routing(self, item_seq, item_seq_len):
        """The expert weights each history is routed with, ``[B, E]`` (no LLM forward)."""
        mask = item_seq != 0
        with torch.no_grad():
            history = self.item_embeddings()[item_seq]
        memory = self.mformer.input_projection(history)
        return self.mformer.route(memory, mask.to(memory.dtype))[1]

    @torch.no_grad()
    def item_table(self):
        """Every item's vector from its own prompt, ``[n_items, H]`` (row 0, padding, is zero); M-Former dropout off."""
        was_training = self.mformer.training
        self.mformer.train(False)
        try:
            items = torch.arange(1, self.n_items, device=self.device)
            rows = []
            chunks = list(items.split(self.eval_batch_size))
            for chunk in self._progress(chunks, "Laser item table"):
                rows.append(self.encode_items(chunk)[0])
            table = torch.cat(rows)
            return torch.cat([table.new_zeros(1, table.shape[1]), table])
        finally:
            self.mformer.train(was_training)

    def train(self, mode=True):
        if mode:  # a new epoch (RecBole calls train() as each starts): its table is computed at its first step
            if not self._keep_table:
                self.item_vectors = None
            self._keep_table = False
        return super().train(mode)

    def start_epoch(self, epoch):
        self.epoch = epoch

    @property
    def in_stage1(self):
        """Whether training is in stage 1 (the M-Former aligned with the history's text; see the module docstring)."""
        return self.training and self.epoch < self.stage1_epochs

    @property
    def in_phase1(self):
        """Whether training is in its first phase (item side encoded with gradients; see the module docstring)."""
        return self.training and self.stage1_epochs <= self.epoch < self.stage1_epochs + self.phase1_epochs

    def title_vectors(self):
        """``[n_items, H]``: the mean of the frozen backbone's input embeddings over each item's title tokens (row 0
        and items without a title: zero). Computed once."""
        if self._title_vectors is None:
            embed = self.llm.input_embeddings()
            rows = [torch.zeros(self.llm_size, device=self.device)]
            with torch.no_grad():
                for title in self.prompt_builder.titles[1:]:
                    ids = self.tokenizer(title, add_special_tokens=False)["input_ids"] if title else []
                    vector = embed(torch.tensor(ids, device=self.device)).float().mean(0) if ids else rows[0]
                    rows.append(vector)
            self._title_vectors = torch.stack(rows)
        return self._title_vectors

    def stage1_loss(self, item_seq):
        """Stage 1's contrastive loss of a batch (see the module docstring) and the router's probabilities."""
        mask = item_seq != 0
        with torch.no_grad():
            history = self.item_embeddings()[item_seq]  # [B, L, d]
            words = self.title_vectors()[item_seq]  # [B, L, H]
            text = (words * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)  # [B, H]
        prefix, probs, _ = self.mformer(history, mask)  # [B, Q, H]
        cosine = torch.einsum("bqh,ch->bqc", F.normalize(prefix.float(), dim=-1), F.normalize(text, dim=-1))
        similarity = cosine.max(dim=1).values * self.stage1_log_scale.exp().clamp(max=100.0)  # [B (history), B (text)]
        labels = torch.arange(len(item_seq), device=item_seq.device)
        loss = (
            F.cross_entropy(similarity, labels, label_smoothing=self.stage1_smoothing)
            + F.cross_entropy(similarity.t(), labels, label_smoothing=self.stage1_smoothing)
        ) / 2
        return loss, probs

    def sample_negatives(self, targets):
        """``[B, N]`` items drawn uniformly from the catalogue, never the padding item nor the row's target."""
        if self.n_items < 3:
            raise ValueError("Laser's first phase needs at least two items besides the padding item.")
        draws = torch.randint(1, self.n_items - 1, (len(targets), self.phase1_negatives), device=targets.device)
        return draws + (draws >= targets.unsqueeze(1)).long()  # 1 .. n_items - 1 without the target, uniform

    def encode_items(self, items):
        """Each item's vector from its own prompt, ``[M, H]`` (with gradients where enabled: the first phase), and the
        router's probabilities."""
        seq = items.unsqueeze(1)  # a one-item "history": the item itself
        vectors, probs, _ = self.encode(
            self.item_prompt(seq, torch.ones_like(items)), self.item_embeddings()[seq], seq != 0
        )
        return vectors, probs

    def resume_within_epoch(self):
        """Called by the trainer before it goes on in the middle of an epoch: the epoch's table, restored with the
        training state, is the one its remaining batches train against (not one of the restored weights)."""
        self._keep_table = True

    def load_state_dict(self, state_dict, strict=True, assign=False):
        self.item_vectors = None  # other weights: their table comes with them (load_other_parameter) or anew
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def load_other_parameter(self, para):
        if para is not None and para.get("item_vectors") is not None:
            para = {**para, "item_vectors": para["item_vectors"].to(self.device)}
        super().load_other_parameter(para)

    def current_table(self):
        """The item table to score against (see the module docstring)."""
        if self.item_vectors is None:
            self.item_vectors = self.item_table()
            geometry = table_geometry(self.item_vectors)
            self.geometry.setdefault("first", geometry)
            self.geometry["last"] = geometry
            self.geometry["tables"] = self.geometry.get("tables", 0) + 1
        return self.item_vectors

    # ----- RecBole's contract --------------------------------------------------------------------------------
    def score_items(self, user_repr, items=None):
        table, user = self.current_table(), user_repr
        if self.center:  # both sides less the table's mean item vector (laser_center), then the cosine
            mean = table[1:].mean(0)
            table, user = table - mean, user - mean
        table = F.normalize(table, dim=-1)
        user = F.normalize(user, dim=-1)
        if items is None:
            return user @ table.t() / self.temperature
        return (user * table[items]).sum(-1) / self.temperature

    def calculate_loss(self, interaction):
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        if self.in_stage1:  # the M-Former aligned with the history's text; no LLM forward
            loss, probs = self.stage1_loss(item_seq)
            item_balance = 0.0
        else:
            user, probs, _ = self._user(item_seq, item_seq_len)
            loss, item_balance = self.stage2_loss(user, interaction[self.POS_ITEM_ID])
        balance = self.mformer.balance_loss(probs, item_seq != 0) + item_balance
        self.last_balance_loss = float(balance.detach())
        return loss + self.balance_weight * balance

    def stage2_loss(self, user, targets):
        """Stage 2's ranking loss of the user vectors ``[B, H]`` and the balance loss of the item encodings it made
        (0.0 in the table phase, which encodes none)."""
        if self.in_phase1:  # the target among sampled negatives, both sides with gradients
            candidates = torch.cat([targets.unsqueeze(1), self.sample_negatives(targets)], dim=1)  # [B, 1 + N]
            vectors, item_probs = self.encode_items(candidates.flatten())  # [B (1 + N), H]
            vectors = F.normalize(vectors, dim=-1).view(*candidates.shape, -1)  # [B, 1 + N, H]
            logits = (F.normalize(user, dim=-1).unsqueeze(1) * vectors).sum(-1) / self.temperature  # [B, 1 + N]
            loss = self.loss_fct(logits, torch.zeros_like(targets))  # the target is column 0
            return loss, self.mformer.balance_loss(item_probs, torch.ones_like(item_probs[..., 0]))
        logits = self.score_items(user)  # every item, against the epoch's table (no gradients on the item side)
        logits[:, 0] = float("-inf")  # the padding item is never an answer
        return self.loss_fct(logits, targets), 0.0
