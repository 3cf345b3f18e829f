"""From rows to runs: each run's property files, resolved configuration, hash (what makes two runs the same), the
runner command that reproduces it, where its record goes, and the LLM rows' training budget."""

import hashlib
import json
import os
import sys
from pathlib import Path

from benchmarks.gridlib.rows import (
    ABLATIONS,
    BASELINE_BUDGET,
    CONTINUAL_PROPERTIES,
    DATASETS,
    DEFAULT_BACKBONE,
    ENCODER_BUDGET,
    GENERATIVE_PROPERTIES,
    GENERATIVE_ROWS,
    INIT_FROM,
    LAPSE_PROPERTIES,
    PROPERTIES,
    QUICK,
    QUICK_CONTINUAL_BLOCKS,
    QUICK_DATASETS,
    QUICK_LAPSE,
    REPO,
    ROW_DATASETS,
    ROW_SEEDS,
    ROWS,
)

# Keys that name places or the machine, not the experiment; left out of the run's hash.
VOLATILE_KEYS = {
    "checkpoint_dir",
    "data_path",
    "device",
    "gpu_id",
    "use_gpu",
    "show_progress",
    "state",
    "local_rank",
    "single_spec",
    "nproc",
    "world_size",
    "offset",
    "ip",
    "port",
    "sasrec_checkpoint",
    "llm_cache_dir",
    "log_wandb",
    "wandb_project",
    "worker",
    "config_files",
    "resume_checkpoint",
    "dist_backend",
    "training_state_every_batches",  # resumption is exact (tested): where states are written changes no figure
    "llm_candidates_per_forward",
    "full_sort_max_scores",  # memory bounds: the scores do not depend on them (tested)
}


# Keys added after runs were recorded, at the values that reproduce what those runs did: left out of the hash at
# these values, so that a new option does not invalidate finished runs (a key at another value changes the hash).
NEUTRAL_DEFAULTS = {
    "objective": "head",
    "llm_activation_checkpointing": False,
    "lapse": None,
    "continual_blocks": 5,
    "continual_penalty": "none",
    "continual_penalty_weight": 2.0,
    "continual": False,
    "continual_strategy": "softmax_kl",
    "continual_lr_scale": 0.1,
    "continual_block": None,
    "continual_cumulative": False,
    "continual_l2_weights": [0.1, 1, 10],
    "llm_init_checkpoint": None,
    "laser_phase1_epochs": 0,
    "laser_phase1_negatives": 10,
    "laser_stage1_epochs": 0,
    "laser_stage1_temperature": 0.07,
    "laser_stage1_label_smoothing": 0.1,
    "laser_center": False,
    "laser_mformer_lr_scale": 1.0,
    "llm_lr_warmup_steps": 0,
    "llm_lr_schedule": "constant",
    "cofirec_code_init": "random",
}


# Keys read by the LLM model only, never by the SASRec encoder it reads, at the values the recorded encoder runs were
# hashed with (None: the key did not exist then). An encoder run's hash sees these values whatever the LLM rows use, so
# that a change of the LLM's objective or budget (issue 42) does not retrain the committed encoders.
LLM_ONLY_KEYS = {
    "llm_train_sequences_per_user": 1,
    "llm_loss_positions": None,
    "gate_scope": None,
    "score_head": None,
}


# Keys read by the head objective only (issue 42): left out of a generative run's hash. Checked: generative iLoRA and
# UniformLoRA runs at commit 0bd3ec1 (before these keys) and at 5f7a39c (with them), one epoch on the tiny fixture,
# have bit-identical trained weights (the unused scoring head aside) and test figures; a test keeps the objective
# blind to them (tests/test_generative.py).
HEAD_KEYS = {"llm_loss_positions", "gate_scope", "score_head"}


GENERATIVE_KEYS = {"num_candidates", "generation_max_new_tokens", "prompt_domain", "generative_prompt_template"}


def config_files(dataset, kind, quick, row=None, protocol="standard"):
    """Property files of a run, lowest precedence first (the plugin's Config adds the model's and dataset's own)."""
    files = []
    if quick:
        files.append(PROPERTIES / "dataset" / "lastfm.yaml")  # the tiny fixture is a LastFM subset
    if kind == "baseline":
        files.append(BASELINE_BUDGET)
    if kind in ("encoder", "llm", "continual"):  # a continual run's per-block encoders train like the grid's
        files.append(ENCODER_BUDGET)
    if row in GENERATIVE_ROWS:
        files.append(GENERATIVE_PROPERTIES)
    if protocol == "lapse":
        files.append(LAPSE_PROPERTIES)
    if protocol == "continual":
        files.append(CONTINUAL_PROPERTIES)
    if quick:
        files.append(QUICK)
    return [str(path) for path in files]


def data_path(dataset, quick):
    relative = (QUICK_DATASETS if quick else DATASETS)[dataset]
    return None if relative is None else str(REPO / relative)


def resolve_config(model, dataset, files, config_dict):
    """The run's resolved RecBole configuration (the command line of this process is not read)."""
    from recbole_ilora.config import Config

    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return Config(model=model, dataset=dataset, config_file_list=files, config_dict=config_dict)
    finally:
        sys.argv = argv


def config_hash(config, extra="", encoder=False):
    settings = {
        key: value
        for key, value in config.final_config_dict.items()
        if key not in VOLATILE_KEYS and not (key in NEUTRAL_DEFAULTS and NEUTRAL_DEFAULTS[key] == value)
    }
    if settings.get("objective") != "generative":  # keys read by the generative objective only
        settings = {key: value for key, value in settings.items() if key not in GENERATIVE_KEYS}
    else:
        settings = {key: value for key, value in settings.items() if key not in HEAD_KEYS}
    if settings.get("model") == "SASRec" and encoder:
        for key, value in LLM_ONLY_KEYS.items():
            settings.pop(key, None)
            if value is not None:
                settings[key] = value
    text = json.dumps(settings, sort_keys=True, default=str) + extra
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def plan(datasets, rows, seeds, quick, backbone=DEFAULT_BACKBONE, protocol="standard"):
    """Every run of the grid: the main rows of every seed first, then the generative rows, then the ablations (so that
    a partial grid already compares iLoRA, UniformLoRA and the baselines over seeds under both protocols); encoders
    before the LLM rows that need them."""
    from recbole_ilora.pipeline import sasrec_pretraining_config

    runs = []
    for seed in seeds:
        for dataset in datasets:
            wanted = [
                row
                for row in rows
                if dataset in ROW_DATASETS.get(row, {dataset}) and (quick or seed in ROW_SEEDS.get(row, [seed]))
            ]
            if any(ROWS[row][0] == "llm" for row in wanted) and "SASRec-encoder" not in wanted:
                wanted.insert(0, "SASRec-encoder")
            wanted += [INIT_FROM[row] for row in wanted if row in INIT_FROM and INIT_FROM[row] not in wanted]
            wanted.sort(key=lambda row: list(ROWS).index(row))
            encoder_id, run_ids = None, {}
            for row in wanted:
                kind, model, overrides, _ = ROWS[row]
                config_dict = {"seed": seed, "show_progress": False, **overrides}
                if kind in ("llm", "continual"):
                    config_dict["llm_backbone"] = backbone
                if protocol == "lapse" and quick:
                    config_dict["lapse"] = QUICK_LAPSE  # the 40 users of the fixture are too short for 30
                if protocol == "continual" and quick:
                    config_dict["continual_blocks"] = QUICK_CONTINUAL_BLOCKS
                path = data_path(dataset, quick)
                if path:
                    config_dict["data_path"] = path
                files = config_files(dataset, kind, quick, row, protocol)
                config = resolve_config(model, dataset, files, config_dict)
                if row in GENERATIVE_ROWS and config["epochs"] == 1 and not quick:
                    # One epoch leaves validation nothing to choose (the tested weights are that epoch's either way),
                    # and on the paper's protocol it costs a pass of likelihood scoring over every user: skipped.
                    config_dict["eval_step"] = 0
                    config = resolve_config(model, dataset, files, config_dict)
                if kind == "encoder":
                    config = sasrec_pretraining_config(config)
                init_id = run_ids.get(INIT_FROM.get(row))  # the run this one starts from (planned before it)
                extra = (encoder_id + (f"|{init_id}" if init_id else "")) if kind == "llm" else ""
                run_hash = config_hash(config, extra=extra, encoder=kind == "encoder")
                run_id = f"{row}-seed{seed}-{run_hash}"
                run_ids[row] = run_id
                if kind == "encoder":
                    encoder_id = run_id
                runs.append(
                    {
                        "run_id": run_id,
                        "row": row,
                        "kind": kind,
                        "model": model,
                        "dataset": dataset,
                        "seed": seed,
                        "config_files": files,
                        "config_dict": config_dict,
                        "encoder": encoder_id if kind == "llm" else None,
                        "backbone": backbone if kind in ("llm", "continual") else None,
                        "command": runner_command(config, model, dataset, files, config_dict, kind),
                        "budget": llm_budget(config) if kind == "llm" else None,
                        "init_from": init_id,
                    }
                )

    def phase(run):
        return 2 if run["row"] in ABLATIONS else 1 if run["row"] in GENERATIVE_ROWS else 0

    return sorted(runs, key=lambda run: (phase(run), seeds.index(run["seed"])))  # stable


def runner_command(config, model, dataset, files, config_dict, kind):
    """The single ``run_recbole_ilora.py`` command that reproduces a run (LLM rows: with the encoder's path)."""
    if kind == "encoder":
        keys = ["epochs", "learning_rate", "train_batch_size", "stopping_step"]
        overrides = {key: config[key] for key in keys}
        parts = ["python run_recbole_ilora.py", "--model=SASRec", f"--dataset={dataset}"]
        parts += [option(key, value) for key, value in {**config_dict, **overrides}.items()]
    else:
        parts = ["python run_recbole_ilora.py", f"--model={model}", f"--dataset={dataset}"]
        parts += [option(key, value) for key, value in config_dict.items()]
    if files:
        parts.append('--config_files="' + " ".join(os.path.relpath(f, REPO) for f in files) + '"')
    if kind == "llm":
        parts.append("--sasrec_checkpoint=<the SASRec-encoder checkpoint of this seed>")
    return " ".join(parts).replace(str(REPO) + os.sep, "")


def option(key, value):
    """``--key=value`` as a shell passes it to RecBole, which evaluates it: a dict or list in double quotes
    (``--clip_grad_norm="{'max_norm': 1.0}"``)."""
    text = str(value)
    return f'--{key}="{text}"' if any(c in text for c in " {}[]()'") else f"--{key}={text}"


def run_file(output, run):
    """Where a run's record goes: ``<output>/runs/<dataset>/<run id>.json``."""
    return Path(output) / "runs" / run["dataset"] / f"{run['run_id']}.json"


def shipped(path):
    """A property file's settings."""
    import yaml

    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def training_budget(scope="for every LLM row"):
    """The LLM rows' training budget in words, from the shipped defaults they run with."""
    defaults = shipped(PROPERTIES / "model" / "LLMSequentialRecommender.yaml")
    per_user = defaults["llm_train_sequences_per_user"]
    sequences = "every training sequence" if per_user is None else f"each user's {per_user} most recent training "
    sequences += "" if per_user is None else ("sequence" if per_user == 1 else "sequences")
    return f"{defaults['epochs']} epoch(s) on {sequences}, batch {defaults['train_batch_size']}, {scope}"


# The settings that say how much and what an LLM row learnt from (recorded with every LLM run since issue 42).
BUDGET_KEYS = (
    "objective",
    "epochs",
    "train_batch_size",
    "learning_rate",
    "llm_train_sequences_per_user",
    "llm_loss_positions",
    "gate_scope",
    "score_head",
)


# What every LLM run recorded before issue 42 learnt from (commit 0bd3ec1 and earlier: its shipped defaults, none of
# which the grid overrode): each user's most recent training sequence, its label only, the per-sequence gate, the head
# alone from a random start.
EARLIER_BUDGET = {
    "epochs": 1,
    "train_batch_size": 16,
    "learning_rate": 0.001,
    "llm_train_sequences_per_user": 1,
    "llm_loss_positions": "last",
    "gate_scope": "sequence",
    "score_head": "plain",
    "compute_dtype": "float32",
}


def llm_budget(config):
    """An LLM run's budget settings (:data:`BUDGET_KEYS`) from its resolved configuration, and the dtype its backbone
    computes in on this machine (``llm_compute_dtype: auto`` is bfloat16 on a CPU with bfloat16 units, float32 on
    others: the same row's runs on two machines may differ there)."""
    from recbole_ilora.model.backbone import compute_dtype_name

    return {**{key: config[key] for key in BUDGET_KEYS}, "compute_dtype": compute_dtype_name(config)}
