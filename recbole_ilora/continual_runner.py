"""The continual mode (``--continual=True``): one LoRA model trained block after block over time (PESO's setting).

For each time block ``t`` of ``continual_blocks`` (``recbole_ilora.continual``):

1. **The encoder**: the frozen SASRec must know the block's items, so it is trained on all data up to the block
   (every earlier block and the block's own training events; validated on the block's validation events) before
   the block's adapter, as a deployed system would. Its checkpoint is kept per block under
   ``<checkpoint_dir>/continual_encoders/`` and reused by every strategy run with the same dataset, seed, blocks and
   SASRec settings, so all strategies read the same encoders.
2. **The model**: built on block ``t``'s split with that encoder. ``continual_strategy``:
   - ``finetune``: block 0 from scratch; block ``t`` starts from block ``t - 1``'s trained weights (adapter, gate,
     projector, head), its learning rate times ``continual_lr_scale`` (PESO: 0.1);
   - ``l2`` / ``softmax_kl`` (PESO): the same, plus ``continual_penalty_weight`` times the proximal term toward block
     ``t - 1``'s adapter (its frozen snapshot); for ``l2`` the weight is chosen among ``continual_l2_weights``
     (0.1, 1, 10) on block 1's validation and kept for the later blocks (unset: ``continual_penalty_weight``);
   - ``cumulative``: every block from scratch on all data up to it.
3. **Tested** on block ``t``'s test events (every ``test_modes`` mode), its metrics written, as each block ends, to
   ``<checkpoint_dir>/<model>-continual-<time>.json`` (blocks, their users and sequences, metrics, timings, the
   checkpoint of every block). Resume a killed run with ``--resume_checkpoint=<that file>``: it restarts at the
   block it was in, from the last finished block's weights.

Reported at the end: every block's test metrics and their mean over blocks ``1 .. T - 1`` (block 0 has no past).
"""

import copy
import datetime
import hashlib
import json
import os
import shutil
from logging import getLogger

from recbole.utils import get_local_time, init_seed, set_color

from recbole_ilora.checkpoints import atomic_torch_save, claim_checkpoint_file, safe_load
from recbole_ilora.pipeline import pretrain_sasrec, train_and_evaluate

try:
    import fcntl
except ImportError:  # Windows: no file locks; runs sharing a checkpoint_dir may then train an encoder twice
    fcntl = None

STRATEGIES = ("finetune", "l2", "softmax_kl", "cumulative")
ENCODER_KEYS = ("sasrec_epochs", "sasrec_learning_rate", "sasrec_train_batch_size", "sasrec_stopping_step",
                "hidden_size", "n_layers", "n_heads", "inner_size", "MAX_ITEM_LIST_LENGTH")  # fmt: skip


def check_continual_config(config):
    from recbole_ilora.model.abstract_llm_recommender import LLMSequentialRecommender
    from recbole_ilora.utils import get_model

    model_class = get_model(config["model"])
    if not issubclass(model_class, LLMSequentialRecommender) or not model_class.has_lora_adapter:
        raise ValueError(
            "'continual' trains a LoRA model of the plugin block after block (iLoRA, UniformLoRA), "
            f"not {config['model']!r}."
        )
    strategy = config["continual_strategy"]
    if strategy not in STRATEGIES:
        raise ValueError(f"Make sure 'continual_strategy' in {list(STRATEGIES)}, got {strategy!r}.")
    if not isinstance(config["continual_blocks"], int) or config["continual_blocks"] < 2:
        raise ValueError(f"'continual_blocks' must be a whole number >= 2, got {config['continual_blocks']!r}")
    scale = config["continual_lr_scale"]
    if not isinstance(scale, (int, float)) or scale <= 0:
        raise ValueError(f"'continual_lr_scale' must be > 0, got {scale!r}")
    if config["lapse"] is not None:
        raise ValueError("'continual' and 'lapse' are two different splits: set one of them.")


def block_config(config, block, cumulative):
    block_cfg = copy.deepcopy(config)
    block_cfg["continual_block"] = block
    block_cfg["continual_cumulative"] = cumulative
    block_cfg["continual"] = False
    return block_cfg


def encoder_for_block(config, block):
    """The block's SASRec encoder: trained on everything up to the block, or reused if an identical run kept it."""
    folder = os.path.join(config["checkpoint_dir"], "continual_encoders")
    settings = "-".join(str(config[key]) for key in ENCODER_KEYS) + str(config["data_path"])
    digest = hashlib.sha256(settings.encode()).hexdigest()[:10]
    name = f"{config['dataset']}-seed{config['seed']}-T{config['continual_blocks']}-block{block}-{digest}"
    path = os.path.join(folder, name + ".pth")
    os.makedirs(folder, exist_ok=True)
    # Runs sharing a checkpoint_dir (a grid's processes, one strategy each) train a block's encoder once: the first
    # holds the lock while it trains, the others wait for it and reuse its checkpoint.
    with open(path + ".lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if os.path.isfile(path):
            getLogger().info(set_color("continual", "green") + f": block {block} reuses its encoder {path}")
            return path
        trained = pretrain_sasrec(block_config(config, block, cumulative=True), show_progress=config["show_progress"])
        shutil.copyfile(trained, path + ".partial")
        os.replace(path + ".partial", path)
    return path


def _write_progress(path, progress):
    staging = path + ".partial"
    with open(staging, "w", encoding="utf-8") as file:
        json.dump(progress, file, indent=1, default=str)
    os.replace(staging, path)


def run_continual(config, saved=True):
    """Train and test ``config['model']`` over the time blocks (see the module docstring); returns the progress
    record: ``blocks`` (one dict per block) and ``mean_over_later_blocks``."""
    check_continual_config(config)
    logger = getLogger()
    strategy = config["continual_strategy"]
    resume = config["resume_checkpoint"]
    if resume and str(resume).endswith(".continual.json"):
        progress_file = resume
        with open(progress_file, encoding="utf-8") as file:
            progress = json.load(file)
        if progress["strategy"] != strategy or progress["blocks_total"] != config["continual_blocks"]:
            raise ValueError(
                f"{progress_file} is a run of strategy {progress['strategy']!r} over {progress['blocks_total']} "
                f"blocks, not {strategy!r} over {config['continual_blocks']}"
            )
        config["resume_checkpoint"] = None
        logger.info(set_color("continual", "green") + f": resuming {progress_file} at block {len(progress['blocks'])}")
    else:
        # Named to the second like RecBole's checkpoints, and claimed exclusively: two runs started in the same
        # second with one checkpoint_dir (a grid's two processes) would otherwise share the progress file and the
        # per-block weights named after it, each block loading whichever run saved last.
        progress_file = claim_checkpoint_file(
            os.path.join(config["checkpoint_dir"], f"{config['model']}-continual-{get_local_time()}.continual.json")
        )
        progress = {
            "model": config["model"],
            "dataset": config["dataset"],
            "strategy": strategy,
            "seed": config["seed"],
            "blocks_total": config["continual_blocks"],
            "blocks": [],
        }
        _write_progress(progress_file, progress)  # replaces the claimed empty file: resumable from here on
    base_lr = config["learning_rate"]
    for block in range(len(progress["blocks"]), config["continual_blocks"]):
        started = datetime.datetime.now()
        cumulative = strategy == "cumulative"
        block_cfg = block_config(config, block, cumulative)
        block_cfg["sasrec_checkpoint"] = encoder_for_block(config, block)
        previous = progress["blocks"][-1]["weights"] if block and not cumulative else None
        block_cfg["learning_rate"] = base_lr * (config["continual_lr_scale"] if previous else 1.0)
        penalty = strategy if strategy in ("l2", "softmax_kl") and previous else "none"
        block_cfg["continual_penalty"] = penalty

        def prepare(model, previous=previous, penalty=penalty):
            if previous:
                state = safe_load(previous, "the previous block's weights")
                model.load_state_dict(state)  # the trained parameters only (adapter, gate, projector, head)
            if penalty != "none":
                model.anchor_adapter()  # its snapshot: the previous block's adapter

        candidates = config["continual_l2_weights"] if penalty == "l2" and block == 1 else None
        if candidates:  # the L2 weight is chosen on block 1's validation, then kept for every later block
            trials = {}
            for weight in candidates:
                block_cfg["continual_penalty_weight"] = weight
                init_seed(block_cfg["seed"] + block, block_cfg["reproducibility"])
                trials[weight] = train_and_evaluate(block_cfg, saved=saved, verbose=False, prepare=prepare)
            bigger = config["valid_metric_bigger"]
            chosen = (max if bigger else min)(trials, key=lambda weight: trials[weight]["best_valid_score"])
            progress["l2_weight"] = chosen
            progress["l2_selection"] = {str(w): r["best_valid_score"] for w, r in trials.items()}
            logger.info(set_color("continual", "green") + f": L2 weight {chosen} chosen on block 1's validation "
                        f"({config['valid_metric']}: {progress['l2_selection']})")  # fmt: skip
            block_cfg["continual_penalty_weight"] = chosen
            result = trials[chosen]
        else:
            if penalty == "l2" and "l2_weight" in progress:
                block_cfg["continual_penalty_weight"] = progress["l2_weight"]
            init_seed(block_cfg["seed"] + block, block_cfg["reproducibility"])
            result = train_and_evaluate(block_cfg, saved=saved, verbose=False, prepare=prepare)
        weights = os.path.splitext(progress_file)[0] + f".block{block}.pth"
        best = safe_load(result["saved_model_file"], "saved_model_file")
        atomic_torch_save(best["state_dict"], weights)  # the block's best trained parameters, for block t + 1
        record = {
            "block": block,
            "test": {mode: dict(metrics) for mode, metrics in result["test_results"].items()} or
                    {"test": dict(result["test_result"])},
            "valid": dict(result["best_valid_result"] or {}),
            "learning_rate": block_cfg["learning_rate"],
            "penalty": penalty,
            "penalty_weight": block_cfg["continual_penalty_weight"] if penalty != "none" else None,
            "encoder": block_cfg["sasrec_checkpoint"],
            "weights": weights,
            "checkpoint": result["saved_model_file"],
            "epochs_run": result["epochs_run"],
            **(result["block_statistics"] or {}),  # users, users_left_out, training_sequences (before the budget)
            "trained_sequences": result["trained_sequences"],  # after the LLM's budget
            "proximal": (result["model_summary"] or {}).get("proximal"),  # the term's value and gradient share
            "timings": result["timings"],
            "wall_seconds": (datetime.datetime.now() - started).total_seconds(),
        }  # fmt: skip
        progress["blocks"].append(record)
        progress["mean_over_later_blocks"] = mean_over_later_blocks(progress["blocks"])
        _write_progress(progress_file, progress)
        logger.info(set_color(f"continual block {block}", "yellow") + f": {record['test']} (progress: {progress_file})")
    progress["progress_file"] = progress_file
    return progress


def mean_over_later_blocks(blocks):
    """Each mode's metrics averaged over blocks 1 .. T - 1 (those with a past to keep or forget)."""
    later = [block["test"] for block in blocks if block["block"] > 0]
    if not later:
        return {}
    return {
        mode: {metric: sum(b[mode][metric] for b in later) / len(later) for metric in later[0][mode]}
        for mode in later[0]
    }
