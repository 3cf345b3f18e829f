"""CaseQ (Yang, Wu, Wen, Zhou, Sun, Yan: "Towards Out-of-Distribution Sequential Event Prediction: A Causal
Treatment", NeurIPS 2022), as a RecBole sequential model.

A next-item model trained by maximum likelihood learns P(y | S), which mixes in the latent context of the training
period; under temporal shift that context changes. CaseQ learns contexts explicitly and trains a backdoor-adjusted,
variational objective:

- ``num_branch_layers`` layers, each with ``num_contexts`` parallel context units (a causal self-attention block, or a
  GRU: ``context_unit``). Layer 0's streams are copies of the embedded sequence; unit ``i`` of a layer reads stream
  ``i``. A branching layer scores, from each stream ``j`` and for each unit ``i``, ``tanh(x_j W_i) v_i`` and takes a
  softmax over the units: stream ``j`` of the next layer is ``sum_i w_ji * unit_i(stream_i)``. The last layer
  averages its weights over the streams into one output stream, then a layer norm.
- q(c | S), over the ``C ** L`` context paths (unit ``i_0`` of layer 0, ..., unit ``i_{L-1}`` of the last): the product
  of the branch weights along the path, at the position that predicts; it sums to one.
- The prior p(c): the mean of q over ``prior_pseudo_sequences`` sequences of random items (full length, no padding)
  passed through the same network, drawn anew at every step.
- Loss: the next-item loss (``loss_type`` CE: cross-entropy over all items, as the plugin's protocol; BCE: the
  paper's, one sampled negative) + ``kl_weight`` * KL(q || p), averaged over the batch. Scores: the last position's
  representation times the item embeddings.

Written from the paper and the official code (``chr26195/Caseq``), without its defects: the prior is computed only
when ``kl_weight`` > 0, there is no backbone option that always fails, and no removed numpy alias.
"""

import math

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from torch import nn


class AttentionUnit(nn.Module):
    """One context unit of the self-attention kind (SASRec's block as the official code writes it): a layer-normed
    query attending causally to the unnormalised stream (``n_heads`` heads) plus that query, then a layer norm and a
    point-wise feed-forward with a residual connection; padded positions are zeroed."""

    def __init__(self, hidden_size, n_heads, inner_size, dropout):
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden_size, eps=1e-8)
        self.attention = nn.MultiheadAttention(hidden_size, n_heads, dropout=dropout, batch_first=True)
        self.forward_norm = nn.LayerNorm(hidden_size, eps=1e-8)
        self.feed_forward = nn.Sequential(
            nn.Linear(hidden_size, inner_size),
            nn.Dropout(dropout),
            nn.ReLU(),
            nn.Linear(inner_size, hidden_size),
            nn.Dropout(dropout),
        )

    def forward(self, x, padding, causal):
        """``x`` [B, L, H]; ``padding`` [B, L, 1] (True at padding); ``causal`` [L, L] (True where not allowed)."""
        query = self.attention_norm(x)
        attended, _ = self.attention(query, x, x, attn_mask=causal, need_weights=False)
        x = self.forward_norm(query + attended)
        x = x + self.feed_forward(x)
        return x.masked_fill(padding, 0.0)


class GRUUnit(nn.Module):
    """One context unit of the recurrent kind: a GRU over the stream (histories are right-padded, so a position's
    output depends on the positions before it only); padded positions are zeroed."""

    def __init__(self, hidden_size, n_heads, inner_size, dropout):
        super().__init__()
        self.gru = nn.GRU(hidden_size, hidden_size, batch_first=True)

    def forward(self, x, padding, causal):
        output, _ = self.gru(x)
        return output.masked_fill(padding, 0.0)


UNITS = {"attention": AttentionUnit, "gru": GRUUnit}


class BranchingLayer(nn.Module):
    """Weights ``w[b, l, j, i]`` of unit ``i`` for stream ``j`` (softmax over ``i``), from ``tanh(x_j W_i) v_i``."""

    def __init__(self, num_contexts, hidden_size):
        super().__init__()
        self.projections = nn.Parameter(torch.empty(num_contexts, hidden_size, hidden_size))
        self.scores = nn.Parameter(torch.empty(num_contexts, hidden_size))
        nn.init.xavier_normal_(self.projections)
        nn.init.xavier_normal_(self.scores)

    def forward(self, streams, padding):
        """``streams`` [B, L, C, H] -> weights [B, L, C (stream j), C (unit i)], zero at padded positions."""
        hidden = torch.tanh(torch.einsum("bljh,ihk->bljik", streams, self.projections))  # [B, L, C_j, C_i, H]
        logits = (hidden * self.scores).sum(-1)  # [B, L, C_j, C_i]
        return logits.softmax(dim=-1).masked_fill(padding.unsqueeze(-1), 0.0)


class CaseQ(SequentialRecommender):
    r"""CaseQ: context-branching sequence encoder with a variational, backdoor-adjusted objective (see the module
    docstring); keys in ``properties/model/CaseQ.yaml``."""

    PAIRWISE_LOSS_TYPES = ("BCE",)  # the paper's loss reads one sampled negative (recbole_ilora.config)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.hidden_size = config["hidden_size"]
        self.num_contexts = config["num_contexts"]
        self.num_layers = config["num_branch_layers"]
        self.kl_weight = config["kl_weight"]
        self.num_pseudo = config["prior_pseudo_sequences"]
        self.loss_type = config["loss_type"]
        unit = config["context_unit"]
        if unit not in UNITS:
            raise ValueError(f"'context_unit' must be one of {sorted(UNITS)}, got {unit!r}")
        if self.loss_type not in ("CE", "BCE"):
            raise ValueError(f"CaseQ's 'loss_type' must be 'CE' or 'BCE', got {self.loss_type!r}")
        for key in ("num_contexts", "num_branch_layers", "prior_pseudo_sequences", "hidden_size"):
            if not isinstance(config[key], int) or config[key] < 1:
                raise ValueError(f"'{key}' must be a whole number >= 1, got {config[key]!r}")
        negatives = config["train_neg_sample_args"] or {}
        if self.loss_type == "BCE" and negatives.get("distribution", "none") == "none":
            raise ValueError("CaseQ's loss_type 'BCE' needs one sampled negative: set train_neg_sample_args, e.g. "
                             "{distribution: uniform, sample_num: 1}")  # fmt: skip
        if not isinstance(self.kl_weight, (int, float)) or self.kl_weight < 0:
            raise ValueError(f"'kl_weight' must be >= 0, got {self.kl_weight!r}")

        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(self.max_seq_length, self.hidden_size)
        self.embedding_dropout = nn.Dropout(config["dropout_prob"])
        self.layers = nn.ModuleList(
            nn.ModuleList(
                UNITS[unit](self.hidden_size, config["n_heads"], config["inner_size"], config["dropout_prob"])
                for _ in range(self.num_contexts)
            )
            for _ in range(self.num_layers)
        )
        self.branches = nn.ModuleList(
            BranchingLayer(self.num_contexts, self.hidden_size) for _ in range(self.num_layers)
        )
        self.output_norm = nn.LayerNorm(self.hidden_size, eps=1e-8)
        self._init_weights()

    def _init_weights(self):
        """Xavier-normal for every matrix (as the official code), zero biases, unit layer norms; the padding row
        of the item table stays zero."""
        for name, parameter in self.named_parameters():
            if "norm" in name:
                continue
            if parameter.dim() >= 2:
                nn.init.xavier_normal_(parameter)
            elif "bias" in name:
                nn.init.zeros_(parameter)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    # ----- the encoder ---------------------------------------------------------------------------------------
    def encode(self, item_seq):
        """Every position's representation [B, L, H] and the branch weights of each layer (the last averaged over
        streams: [B, L, 1, C])."""
        length = item_seq.shape[1]
        positions = torch.arange(length, device=item_seq.device).unsqueeze(0)
        x = self.item_embedding(item_seq) * math.sqrt(self.hidden_size) + self.position_embedding(positions)
        padding = (item_seq == 0).unsqueeze(-1)  # [B, L, 1]
        x = self.embedding_dropout(x).masked_fill(padding, 0.0)
        causal = torch.ones(length, length, dtype=torch.bool, device=item_seq.device).triu(1)
        streams = x.unsqueeze(2).expand(-1, -1, self.num_contexts, -1)  # [B, L, C, H]
        weights = []
        for depth, (units, branch) in enumerate(zip(self.layers, self.branches, strict=True)):
            w = branch(streams, padding)  # [B, L, C_j, C_i]
            if depth == self.num_layers - 1:
                w = w.mean(dim=2, keepdim=True)  # one output stream
            outputs = torch.stack([unit(streams[:, :, i], padding, causal) for i, unit in enumerate(units)], dim=2)
            streams = torch.einsum("blji,blih->bljh", w, outputs)  # stream j = sum_i w_ji unit_i(stream_i)
            weights.append(w)
        return self.output_norm(streams[:, :, 0]), weights

    def context_probabilities(self, weights):
        """q(c | S) over the C ** L context paths, [..., C ** L], from the branch weights at one position each
        (``weights[d]``: [..., C_j, C_i]; the last [..., 1, C]). Path (i_0, ..., i_{L-1}) has probability
        w_0[i_1, i_0] * w_1[i_2, i_1] * ... * w_{L-1}[0, i_{L-1}]: the unit of layer d feeds the stream that the unit
        of layer d + 1 reads."""
        paths = None  # [..., C^d paths, C]: probability of a path ending at unit i of layer d, stream by stream
        for depth, w in enumerate(weights):
            if depth == 0:
                # layer 0's streams are copies: path i_0 reaches stream j with weight w_0[j, i_0]
                paths = w.transpose(-1, -2)  # [..., C_i0, C_j]
                continue
            # the unit i_d of this layer reads stream i_d: extend every path that reached stream i_d
            step = w  # [..., C_j (next stream), C_i (this unit)]
            paths = torch.einsum("...pi,...ji->...pij", paths, step).flatten(-3, -2)  # [..., C^d * C, C_j]
        return paths.squeeze(-1) if paths.shape[-1] == 1 else paths

    def forward(self, item_seq, item_seq_len):
        output, _ = self.encode(item_seq)
        return self.gather_indexes(output, item_seq_len - 1)  # [B, H]

    def prior(self):
        """p(c): q averaged over random full-length pseudo-sequences passed through the same network (gradients
        flow through it, as in the official code)."""
        pseudo = torch.randint(1, self.n_items, (self.num_pseudo, self.max_seq_length), device=self.device)
        _, weights = self.encode(pseudo)
        return self.context_probabilities([w[:, -1] for w in weights]).mean(dim=0)  # [C ** L]

    def kl_term(self, q, p):
        """KL(q || p), averaged over the batch (``q`` [B, C ** L], ``p`` [C ** L])."""
        return (q * (q.clamp_min(1e-12).log() - p.clamp_min(1e-12).log())).sum(-1).mean()

    # ----- RecBole's contract --------------------------------------------------------------------------------
    def calculate_loss(self, interaction):
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        output, weights = self.encode(item_seq)
        last = item_seq_len - 1
        seq_output = self.gather_indexes(output, last)
        target = interaction[self.POS_ITEM_ID]
        if self.loss_type == "CE":
            loss = F.cross_entropy(seq_output @ self.item_embedding.weight.T, target)
        else:
            negative = interaction[self.NEG_ITEM_ID]
            positive_logit = (seq_output * self.item_embedding(target)).sum(-1)
            negative_logit = (seq_output * self.item_embedding(negative)).sum(-1)
            loss = F.binary_cross_entropy_with_logits(
                positive_logit, torch.ones_like(positive_logit)
            ) + F.binary_cross_entropy_with_logits(negative_logit, torch.zeros_like(negative_logit))
        if self.kl_weight > 0:  # the prior only when its term counts
            rows = torch.arange(len(item_seq), device=item_seq.device)
            q = self.context_probabilities([w[rows, last] for w in weights])
            loss = loss + self.kl_weight * self.kl_term(q, self.prior())
        return loss

    def predict(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return (seq_output * self.item_embedding(interaction[self.ITEM_ID])).sum(-1)

    def full_sort_predict(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return seq_output @ self.item_embedding.weight.T
