"""The collaborative sequence encoder: RecBole's own SASRec, composed and frozen, loaded from a RecBole checkpoint.

The checkpoint is what ``run_recbole_ilora.py --model=SASRec`` saves (its configuration stored as a plain dict by
``recbole_ilora._compat``), so it loads with ``torch.load(weights_only=True)``. Its architecture keys override the
current configuration, and it must come from the same dataset with the same item count and history length.
"""

from logging import getLogger

from recbole.model.sequential_recommender.sasrec import SASRec

from recbole_ilora.checkpoints import safe_load

SASREC_ARCHITECTURE_KEYS = (
    "n_layers",
    "n_heads",
    "hidden_size",
    "inner_size",
    "hidden_dropout_prob",
    "attn_dropout_prob",
    "hidden_act",
    "layer_norm_eps",
    "initializer_range",
)


def read_sasrec_checkpoint(path):
    """The checkpoint dict at ``path``, loaded weights-only; a clear error if it is not a SASRec checkpoint."""
    checkpoint = safe_load(path, "sasrec_checkpoint")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "config" not in checkpoint:
        raise ValueError(f"'sasrec_checkpoint' = {path!r} is not a RecBole checkpoint (no state_dict/config).")
    model = checkpoint["config"].get("model")
    if model != "SASRec":
        raise ValueError(f"'sasrec_checkpoint' = {path!r} holds a {model} model, not SASRec.")
    return checkpoint


def build_frozen_sasrec(config, dataset):
    """A frozen, eval-mode SASRec from ``sasrec_checkpoint`` (``recbole_ilora.quick_start`` pretrains one first when
    the key is unset). Without a checkpoint, a randomly initialised one only where ``sasrec_allow_random`` says it is
    intended (a cost benchmark, say), with a warning; otherwise an error: a gate on a random encoder routes noise."""
    path = config["sasrec_checkpoint"]
    if not path:
        if not config["sasrec_allow_random"]:
            raise ValueError(
                "'sasrec_checkpoint' is not set, so the frozen SASRec encoder would be random: run through "
                "run_recbole_ilora (which pretrains SASRec first), pass --sasrec_checkpoint=<SASRec .pth>, or set "
                "sasrec_allow_random=True if a random encoder is intended."
            )
        getLogger().warning("'sasrec_allow_random': the frozen SASRec encoder is randomly initialised.")
        encoder = SASRec(config, dataset)
    else:
        checkpoint = read_sasrec_checkpoint(path)
        saved = checkpoint["config"]
        if saved.get("dataset") != config["dataset"]:
            raise ValueError(
                f"'sasrec_checkpoint' = {path!r} was trained on dataset {saved.get('dataset')!r}, "
                f"not {config['dataset']!r}."
            )
        if saved.get("MAX_ITEM_LIST_LENGTH") != config["MAX_ITEM_LIST_LENGTH"]:
            raise ValueError(
                f"'sasrec_checkpoint' = {path!r} has MAX_ITEM_LIST_LENGTH={saved.get('MAX_ITEM_LIST_LENGTH')}, "
                f"but this run uses {config['MAX_ITEM_LIST_LENGTH']}."
            )
        n_items = checkpoint["state_dict"]["item_embedding.weight"].shape[0]
        if n_items != dataset.item_num:
            raise ValueError(
                f"'sasrec_checkpoint' = {path!r} has {n_items} items, but the dataset has {dataset.item_num}: "
                "it was trained on another version or filtering of the dataset."
            )
        architecture = {key: saved[key] for key in SASREC_ARCHITECTURE_KEYS}
        encoder = SASRec({**config.final_config_dict, **architecture}, dataset)
        encoder.load_state_dict(checkpoint["state_dict"])
    encoder.requires_grad_(False)
    return encoder.eval()


def sasrec_every_position(sasrec, item_seq, item_seq_len):
    """SASRec's causal representation at every history position, ``[B, L, d]``: row ``b``, position ``j`` encodes the
    history up to and including ``item_seq[b, j]`` (SASRec's attention is causal, so no later item enters it); its
    position ``item_seq_len - 1`` is exactly ``sasrec(item_seq, item_seq_len)``. Padding positions hold whatever
    SASRec computes there. RecBole's ``forward`` computes every position and keeps the last: the last layer's output
    is read by a forward hook on its transformer encoder instead of repeating that forward here."""
    captured = []

    def keep_last_layer(module, inputs, output):
        captured.append(output[-1])

    handle = sasrec.trm_encoder.register_forward_hook(keep_last_layer)
    try:
        sasrec(item_seq, item_seq_len)
    finally:
        handle.remove()
    return captured[0]  # [B, L, d]
