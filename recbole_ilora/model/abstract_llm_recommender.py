"""What every LLM-based sequential recommender of the plugin shares (iLoRA, UniformLoRA, Laser, CoFiRec).

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

``objective: generative`` (the paper's own protocol, ``properties/generative.yaml``) trains instead with the
language-modelling loss on the answer title of a prompt that lists the history and ``num_candidates`` candidates
(its own module, ``generative_objective.py``, mixed in here); ``predict`` then scores each candidate of a sampled
mode by the mean log-likelihood of its title (and end of sequence) given that prompt, encoded once per user, and
``generate_answers`` decodes greedily. A subclass provides ``adapter_inputs`` and ``adapter`` for it. The continual
mode's proximal term toward an anchored adapter (``proximal.py``) is added to every loss once one is anchored.
"""

import contextlib
import os

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn

from recbole_ilora.model.backbone import EMBEDDED, check_backbone, load_backbone, require_bitsandbytes
from recbole_ilora.model.candidates import CandidateSampler
from recbole_ilora.model.generative_objective import (
    CHAT_TEMPLATE_CHOICES,
    GenerativeObjective,
    generative_template,
    uses_chat_template,
)
from recbole_ilora.model.prompt import (
    PromptBuilder,
    fill_missing_texts,
    item_texts,
    move_article_first,
    parse_template,
    split_template,
)
from recbole_ilora.model.proximal import AdapterAnchor
from recbole_ilora.model.sequence_encoder import build_frozen_sasrec
from recbole_ilora.validation import require_int, require_positive

OBJECTIVES = ("head", "generative")


def share_of_targets(local_targets):
    """In a distributed run, this process's targets over the mean per process (1.0 alone): each process's mean loss
    times it, averaged over processes (as DDP averages gradients), is the mean over every target of the global batch,
    however unevenly the processes' rows hold targets."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1.0
    counts = local_targets.detach().to(torch.float64).reshape(1)
    total = counts.clone()
    torch.distributed.all_reduce(total)
    return float(counts * torch.distributed.get_world_size() / total)


def next_item_targets(item_seq, item_seq_len, labels):
    """``(targets [B, L], valid [B, L])``: the item that follows each history position (position ``j`` is followed by
    ``item_seq[:, j + 1]``, the last one, ``item_seq_len - 1``, by ``labels``), and which positions hold an item."""
    positions = torch.arange(item_seq.shape[1], device=item_seq.device).unsqueeze(0)  # [1, L]
    valid = positions < item_seq_len.unsqueeze(1)  # [B, L]
    targets = torch.zeros_like(item_seq)
    targets[:, :-1] = item_seq[:, 1:]
    targets = targets.scatter(1, (item_seq_len - 1).unsqueeze(1), labels.unsqueeze(1))
    return targets.masked_fill(~valid, 0), valid


class LLMSequentialRecommender(GenerativeObjective, SequentialRecommender):
    input_type = InputType.POINTWISE
    prompt_slots = True  # each history title is followed by a slot holding the item's projected SASRec embedding

    @classmethod
    def check_config(cls, config):
        """Reject out-of-range or mistyped keys before any data is prepared or model trained."""
        keys = ("llm_eval_batch_size", "llm_candidates_per_forward", "prompt_max_title_tokens", "MAX_ITEM_LIST_LENGTH")
        for key in (*keys, "train_batch_size"):
            require_int(config, key, 1)
        require_positive(config, "learning_rate")
        if not config["sasrec_checkpoint"]:  # the SASRec pretraining's own keys
            require_int(config, "sasrec_epochs", 1)
            require_int(config, "sasrec_train_batch_size", 1)
            require_positive(config, "sasrec_learning_rate")
        if (config["continual_penalty"] or "none") not in ("none", "l2", "softmax_kl"):
            raise ValueError(
                f"Make sure 'continual_penalty' in ['none', 'l2', 'softmax_kl'], got {config['continual_penalty']!r}."
            )
        require_int(config, "continual_blocks", 1)
        require_int(config, "llm_lr_warmup_steps", 0)
        if (config["llm_lr_schedule"] or "constant") not in ("constant", "cosine"):
            raise ValueError(
                f"Make sure 'llm_lr_schedule' in ['constant', 'cosine'], got {config['llm_lr_schedule']!r}."
            )
        if config["prompt_chat_template"] not in CHAT_TEMPLATE_CHOICES:
            raise ValueError(
                f"Make sure 'prompt_chat_template' in ['auto', True, False], got {config['prompt_chat_template']!r}."
            )
        check_backbone(config)
        checkpoint = config["sasrec_checkpoint"]
        if checkpoint and not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"'sasrec_checkpoint' = {checkpoint!r} does not exist.")
        load_col = config["load_col"]
        field = config["prompt_text_field"]
        if isinstance(load_col, dict) and field not in (load_col.get("item") or []):
            raise ValueError(
                f"'prompt_text_field' = {field!r} is not loaded: add it to load_col's item fields "
                f"(load_col: {{item: [item_id, {field}]}}; now {load_col.get('item')})."
            )
        objective = config["objective"] or "head"
        if objective not in OBJECTIVES:
            raise ValueError(f"Make sure 'objective' in {list(OBJECTIVES)}, got {objective!r}.")
        if objective == "generative":
            require_int(config, "num_candidates", 2)
            require_int(config, "generation_max_new_tokens", 1)
            generative_template(config)
            modes = config["eval_args"]["mode"]
            modes = modes.values() if isinstance(modes, dict) else [modes]
            if any(not str(mode).startswith("uni") for mode in modes):
                raise ValueError(
                    f"'objective' = 'generative' ranks the candidates of a sampled mode, not every item: set "
                    f"'eval_args' mode to uni<N> (got {config['eval_args']['mode']!r}); "
                    "--config_files=properties/generative.yaml does it."
                )
            rows = max(int(str(mode)[3:]) + 1 for mode in [*modes, *(config["test_modes"] or [])] if mode != "full")
            if config["eval_batch_size"] < rows:  # RecBole would split one user's rows over two predict calls
                raise ValueError(
                    f"'eval_batch_size' = {config['eval_batch_size']} is smaller than one user's {rows} rows of a "
                    "sampled mode: RecBole would split the user's candidates over two prompts. Raise it to at least "
                    f"{rows}."
                )
        if config["llm_load_in_4bit"]:
            require_bitsandbytes()
        if not config["llm_path"] and config["llm_backbone"] == EMBEDDED:
            for key in ("llm_hidden_size", "llm_num_layers", "llm_num_heads", "llm_intermediate_size"):
                require_int(config, key, 1)
            require_int(config, "llm_vocab_size", 16)
            if config["llm_hidden_size"] % config["llm_num_heads"]:
                raise ValueError("Make sure 'llm_hidden_size' is a multiple of 'llm_num_heads'.")

    def __init__(self, config, dataset):
        self.check_config(config)
        super().__init__(config, dataset)
        self.eval_batch_size = config["llm_eval_batch_size"]
        self.penalty_kind = config["continual_penalty"] or "none"
        self.penalty_weight = config["continual_penalty_weight"] or 0.0
        self.show_progress = bool(config["show_progress"])
        self.candidates_per_forward = config["llm_candidates_per_forward"]
        self.loss_positions = config["llm_loss_positions"] or "last"  # iLoRA.yaml; a model without the key: last
        self.generative = (config["objective"] or "head") == "generative"
        self.residual_head = (config["score_head"] or "plain") == "residual"

        # Collaborative encoder (frozen).
        self.sasrec = build_frozen_sasrec(config, dataset)
        self.item_size = self.sasrec.hidden_size

        # Backbone (frozen) and prompts.
        texts = fill_missing_texts(item_texts(dataset, config["prompt_text_field"]), dataset)
        if config["prompt_title_article_first"]:
            texts = [move_article_first(text) for text in texts]
        prefix, suffix = split_template(config["prompt_template"])
        template = generative_template(config) if self.generative else None
        extra = parse_template(template, ("history", "candidates"))[0] if self.generative else []
        corpus = [prefix, suffix, *extra, config["prompt_item_separator"], *texts[1:]]
        backbone, self.tokenizer = load_backbone(config, corpus, self.device)
        self.llm_size = backbone.config.hidden_size
        self.llm = self.build_llm(backbone, config)
        if config["llm_activation_checkpointing"]:
            if not hasattr(self.llm, "enable_activation_checkpointing"):
                raise ValueError(f"'llm_activation_checkpointing' is not supported by {type(self).__name__}'s adapter.")
            self.llm.enable_activation_checkpointing()
        self.prompt_builder = PromptBuilder(
            self.tokenizer,
            texts,
            self.head_prompt_template(config),
            config["prompt_item_separator"],
            config["prompt_max_title_tokens"],
            slots=self.prompt_slots,
        )

        # Trainable bridges.
        self.projector, self.score_head = self.build_bridges()
        self.loss_fct = nn.CrossEntropyLoss()

        # The paper's generative protocol.
        self.answer_prompt = None
        self.candidate_sampler = None  # set by attach_splits()
        if self.generative:
            self.answer_prompt = PromptBuilder(
                self.tokenizer,
                texts,
                template,
                config["prompt_item_separator"],
                config["prompt_max_title_tokens"],
                placeholders=("history", "candidates"),
                key="generative_prompt_template",
                chat=uses_chat_template(config, self.tokenizer),
            )
            self.num_candidates = config["num_candidates"]
            self.max_new_tokens = config["generation_max_new_tokens"]
            self.item_titles = self.answer_prompt.titles  # as the prompts show them: answers are matched to these

    def attach_splits(self, train_data, valid_data, test_data):
        """Called by the runner with RecBole's three data loaders: the generative objective samples its candidate
        lists among the items each user never interacted with, in any split."""
        if self.generative:
            datasets = [data._dataset for data in (train_data, valid_data, test_data)]
            self.candidate_sampler = CandidateSampler(
                datasets, self.num_candidates, self.ITEM_ID, self.USER_ID, self.ITEM_SEQ
            )

    def head_prompt_template(self, config):
        """The template of the head objective's prompt (``prompt_template``; a model may cut it)."""
        return config["prompt_template"]

    def build_llm(self, backbone, config):
        """Wrap the frozen ``backbone`` with the model's trainable adapter; returns the module kept as ``self.llm``."""
        raise NotImplementedError

    def build_bridges(self):
        """``(projector, score_head)``: SASRec item embedding -> LLM input (LLaRA's two-layer MLP, for the slots)
        and LLM hidden state -> SASRec's item space (the scores). A model without slots or head returns None."""
        projector = nn.Sequential(
            nn.Linear(self.item_size, self.llm_size), nn.GELU(), nn.Linear(self.llm_size, self.llm_size)
        )
        score_head = nn.Linear(self.llm_size, self.item_size)
        if self.residual_head:  # score_head: residual starts at the encoder's own ranking (see read_out)
            nn.init.zeros_(score_head.weight)
            nn.init.zeros_(score_head.bias)
        return projector, score_head

    def read_out(self, hidden, encoder_repr):
        """The user representation in SASRec's item space from the LLM's hidden state(s) ``[..., H]``: the score head
        of it (``score_head: plain``), or SASRec's own representation of the same history plus that head, which
        starts at zero (``score_head: residual``): at step 0 the model ranks exactly as its encoder, and training
        learns what the LLM adds. ``encoder_repr`` ``[..., d]``: SASRec's representation at the same position."""
        user_repr = self.score_head(hidden.float())
        return user_repr + encoder_repr if self.residual_head else user_repr

    def score_items(self, user_repr, items=None):
        """Scores of ``user_repr`` ``[B, d]`` against ``items`` (``[B]``: one item per row) or every item
        (``None``: ``[B, n_items]``): dot products in SASRec's item space."""
        if items is None:
            return user_repr @ self.item_embeddings().t()
        return (user_repr * self.item_embeddings()[items]).sum(-1)

    # ----- shared pieces for forward() -------------------------------------------------------------------------
    _encoding_cache = None  # a dict inside reusing_encodings()

    def train(self, mode=True):
        if mode and self._score_journal is not None:
            raise RuntimeError(
                f"{self._score_journal[0].path} journals the scores of fixed weights: training inside "
                "journaling_scores() would change them."
            )
        if mode and self._encoding_cache is not None:
            self._encoding_cache.clear()
        super().train(mode)
        self.sasrec.eval()  # frozen encoder: no dropout, ever
        return self

    # ----- what the model can do (the runners ask these instead of naming concrete models) ------------------
    has_lora_adapter = True  # a LoRA adapter the continual mode can anchor (Laser: a frozen LLM, none)
    has_gate = False  # routing(): per-user expert weights for the gate report (iLoRA, Laser)

    def routing(self, item_seq, item_seq_len):
        """The expert weights each history is routed with, ``[B, K]`` (models with ``has_gate``)."""
        raise NotImplementedError(f"{type(self).__name__} has no gate.")

    def parameter_groups(self):
        """The optimizer's parameter groups, each ``{"params": [...], "lr_scale": x}`` (the trainer sets its rate to x
        times ``learning_rate``): one group of every trained parameter here; Laser names its parts."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr_scale": 1.0}]

    def start_epoch(self, epoch):
        """Called by the trainer as training epoch ``epoch`` (0-based, counted across a resume) starts; a model whose
        training changes with the epoch (Laser's two phases) overrides it."""

    def resume_within_epoch(self):
        """Called by the trainer before it goes on in the middle of an epoch (a resumed run); a model that holds
        per-epoch state (Laser's item table) overrides it."""

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

    # ----- RecBole's contract ----------------------------------------------------------------------------------
    def _scores_all_items(self, item_seq, item_seq_len):
        user_repr = self.forward(item_seq, item_seq_len)  # [B, d]
        logits = self.score_items(user_repr)  # [B, n_items]
        logits[:, 0] = float("-inf")  # the padding item is never an answer
        return logits

    def calculate_loss(self, interaction):
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        if self.generative:
            loss = self.generative_loss(interaction)
        elif self.trains_every_position:
            loss = self.every_position_loss(item_seq, item_seq_len, interaction[self.POS_ITEM_ID])
        else:
            logits = self._scores_all_items(item_seq, item_seq_len)
            loss = self.loss_fct(logits, interaction[self.POS_ITEM_ID])
        return loss + self.proximal_term()

    @property
    def trains_every_position(self):
        """Whether training has a loss at every history position (the head objective with ``llm_loss_positions:
        all``); the runner then trains on non-overlapping windows of each user's history."""
        return not self.generative and self.loss_positions == "all"

    def position_representations(self, item_seq, item_seq_len):
        """``[B, L, d]``: the user representation read after every history item, each from the history up to that
        item only (``llm_loss_positions: all``); padding positions are never read."""
        raise NotImplementedError(f"{type(self).__name__} reads the user only after the whole history.")

    def every_position_loss(self, item_seq, item_seq_len, labels):
        """Cross-entropy over all items at every history position, the way SASRec trains: the representation read
        after item ``j`` targets item ``j + 1``, the one after the last item targets RecBole's label; each target of
        the batch counts once (the mean over targets), padding positions never."""
        user_repr = self.position_representations(item_seq, item_seq_len)  # [B, L, d]
        targets, valid = next_item_targets(item_seq, item_seq_len, labels)  # [B, L], [B, L]
        logits = self.score_items(user_repr[valid])  # [N, n_items]
        logits[:, 0] = float("-inf")  # the padding item is never an answer
        loss = F.cross_entropy(logits, targets[valid])
        return loss * share_of_targets(valid.sum())

    # ----- continual training (recbole_ilora.continual) -------------------------------------------------------
    anchor = None  # an AdapterAnchor: the previous block's adapter, set by anchor_adapter()

    def anchor_adapter(self):
        """Keep a frozen snapshot of the current adapter; from now on the loss adds ``continual_penalty_weight`` times
        the ``continual_penalty`` toward it (PESO's softmax-KL, or L2)."""
        if not hasattr(self.llm, "adapter_pairs"):
            raise ValueError(f"{type(self).__name__} has no LoRA adapter to anchor.")
        self.anchor = AdapterAnchor(self.llm.adapter_pairs())

    def proximal_term(self):
        if self.anchor is None or self.penalty_kind == "none" or not self.penalty_weight:
            return 0.0
        pairs = self.llm.adapter_pairs()
        term = self.penalty_weight * self.anchor.penalty(self.penalty_kind, pairs)
        if self.training and torch.is_grad_enabled():  # its own gradient, for record_proximal_step (cheap: no LLM)
            matrices = [matrix for pair in pairs.values() for matrix in pair]
            gradient = torch.autograd.grad(term, matrices, retain_graph=True)
            with torch.no_grad():  # the logged value in float64 (the training term above stays float32)
                exact = self.anchor.penalty(self.penalty_kind, pairs, dtype=torch.float64)
            self._proximal_step = (self.penalty_weight * float(exact), matrices, gradient)
        return term

    _proximal_step = None  # (weighted term, adapter matrices, the term's gradient) of the batch being trained
    _proximal_sums = None

    def record_proximal_step(self):
        """After a batch's backward (the trainer calls it): add that batch's weighted proximal term, the norm of its
        gradient over the adapter and the norm of the task loss's gradient (the whole gradient minus the term's) to
        the running sums of :meth:`proximal_summary`. Gradients are read from ``.grad``, so under
        ``clip_grad_norm`` they are the clipped ones."""
        if self._proximal_step is None:
            return
        term, matrices, gradient = self._proximal_step
        self._proximal_step = None
        if any(matrix.grad is None for matrix in matrices):
            return
        penalty_sq = sum(float(g.double().pow(2).sum()) for g in gradient)
        task = [m.grad.double() - g.double() for m, g in zip(matrices, gradient, strict=True)]  # whole minus term
        task_sq = sum(float(t.pow(2).sum()) for t in task)
        sums = self._proximal_sums or {"batches": 0, "term": 0.0, "penalty_grad_norm": 0.0, "task_grad_norm": 0.0}
        sums["batches"] += 1
        sums["term"] += term
        sums["penalty_grad_norm"] += penalty_sq**0.5
        sums["task_grad_norm"] += task_sq**0.5
        sums["last_term"] = term
        self._proximal_sums = sums

    def proximal_summary(self):
        """The proximal term's share of training, mean over the batches trained with it (None without one):
        ``term`` (weight times penalty, next to a task loss of order log(#items)), ``penalty_grad_norm`` and
        ``task_grad_norm`` (L2 norms over the adapter's matrices) and their ratio; the batches this process trained
        (a run resumed within a block counts those after the resume)."""
        sums = self._proximal_sums
        if not sums:
            return None
        n = sums["batches"]
        summary = {key: sums[key] / n for key in ("term", "penalty_grad_norm", "task_grad_norm")}
        summary["grad_norm_ratio"] = summary["penalty_grad_norm"] / summary["task_grad_norm"] if summary[
            "task_grad_norm"] else None  # fmt: skip
        return {"batches": n, **summary, "last_term": sums["last_term"]}

    def training_summary(self):
        """What the runner records after training (a continual block: the proximal term's share)."""
        proximal = self.proximal_summary()
        return {"proximal": proximal} if proximal else {}

    def _encode_in_chunks(self, item_seq, item_seq_len):
        """``forward`` over at most ``llm_eval_batch_size`` histories at a time, ``[B, d]``; inside
        :meth:`reusing_encodings`, a history encoded before is not encoded again."""
        cache = self._encoding_cache
        keys = [bytes(row) for row in torch.cat([item_seq, item_seq_len.unsqueeze(1)], 1).cpu().numpy()]
        new = [row for row, key in enumerate(keys) if cache is None or key not in cache]
        parts = []
        if new:
            index = torch.tensor(new, device=item_seq.device)
            seqs, lengths = item_seq[index], item_seq_len[index]
            chunks = list(zip(seqs.split(self.eval_batch_size), lengths.split(self.eval_batch_size), strict=True))
            parts = [self.forward(seq, length) for seq, length in self._progress(chunks, "LLM encoding")]
        encoded = torch.cat(parts) if parts else None
        if cache is None:
            return encoded
        for position, row in enumerate(new):
            cache[keys[row]] = encoded[position]
        return torch.stack([cache[key] for key in keys])

    @contextlib.contextmanager
    def reusing_encodings(self):
        """Within: every history's representation is computed once and reused (the weights must not change: the
        runner opens it around the test modes, which score the same test histories). Cleared on the way out, and
        by ``train()`` and ``load_state_dict``."""
        self._encoding_cache = {}
        try:
            yield self
        finally:
            self._encoding_cache = None

    def predict(self, interaction):
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        # Sampled protocols repeat each history once per candidate row: encode every distinct prompt once. A
        # generative prompt lists its user's candidates, so its key is the user and the history (two users with
        # one history are two prompts); a head prompt is the history alone (its score depends on nothing else).
        key = [item_seq, item_seq_len.unsqueeze(1)]
        if self.generative:
            key.insert(0, interaction[self.USER_ID].unsqueeze(1))
        prompts, row_to_history = torch.unique(torch.cat(key, dim=1), dim=0, return_inverse=True)
        histories = prompts[:, 1:] if self.generative else prompts  # [U, L + 1]: the history and its length
        if self.generative:
            return self._predict_by_likelihood(interaction, histories, row_to_history)
        user_repr = self._encode_in_chunks(histories[:, :-1], histories[:, -1])  # [U, d]
        return self.score_items(user_repr[row_to_history], interaction[self.ITEM_ID])  # [N]

    def full_sort_predict(self, interaction):
        if self.generative:
            raise ValueError("'objective' = 'generative' ranks candidates (eval_args mode uni<N>), not every item.")
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        user_repr = self._encode_in_chunks(item_seq, item_seq_len)  # [B, d]
        return self.score_items(user_repr)  # [B, n_items]

    def _progress(self, chunks, description):
        """``chunks``, with a progress bar (remaining time included) when ``show_progress`` and there are several:
        RecBole's evaluation bar counts its batches, and one batch of users can take minutes on a CPU."""
        if not self.show_progress or len(chunks) < 2:
            return chunks
        from recbole.utils import set_color
        from tqdm import tqdm

        return tqdm(chunks, desc=set_color(description, "pink"), ncols=100, leave=False)

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
        if self._encoding_cache is not None:
            self._encoding_cache.clear()
        return super().load_state_dict(state, strict=False, assign=assign)
