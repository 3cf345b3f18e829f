"""One-call training and evaluation, following ``recbole.quick_start.run_recbole`` step by step with RecBole's own
data loaders, trainer and evaluator (without importing ``recbole.quick_start``, which pulls ray).

For the plugin's LLM models without a ``sasrec_checkpoint``, a SASRec is first trained on the same dataset, split
and data loaders settings (RecBole's SASRec and Trainer, ``sasrec_*`` keys), saved like ``--model=SASRec`` would save
it, and handed to the model as its frozen collaborative encoder. RecBole's FLOPs report is not computed.
``load_data_and_model`` reloads a checkpoint saved this way (weights-only), as RecBole's function of that name.

``test_modes`` (a list of RecBole evaluation modes, e.g. ``[full, uni19]``; set in ``properties/dataset/``) tests the
trained model on the test split once per mode, after the usual test. These loaders use the sequential layout for
every model, RecBole's general ones such as Pop included, so that every model is tested on the same users, targets
and, for sampled modes, the same candidates (RecBole's repeatable sampler, which excludes only the target, re-seeded
with ``seed`` before each mode).
"""

import contextlib
import copy
import logging
import os
import sys
import tempfile
from logging import getLogger

import numpy as np
import pandas as pd
import recbole
import torch
import yaml
from recbole.data import create_dataset, data_preparation
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.data.utils import create_samplers, get_dataloader
from recbole.utils import InputType, ModelType, get_environment, init_logger, init_seed, set_color

from recbole_ilora.checkpoints import (
    claim_checkpoint_file,
    model_file_of,
    release_unused_file,
    safe_load,
    test_journal_file,
    training_state_file,
)
from recbole_ilora.config import Config
from recbole_ilora.lapse import apply_lapse, check_lapse_config
from recbole_ilora.model.abstract_llm_recommender import LLMSequentialRecommender
from recbole_ilora.provenance import PhaseTimes, phase, provenance_lines
from recbole_ilora.trainer import first_process_value
from recbole_ilora.utils import get_model, get_trainer


def sasrec_pretraining_config(config):
    """A copy of ``config`` for SASRec with the ``sasrec_*`` training keys in place of the LLM model's."""
    sasrec_config = copy.deepcopy(config)
    overrides = {
        "model": "SASRec",
        "epochs": config["sasrec_epochs"],
        "learning_rate": config["sasrec_learning_rate"],
        "train_batch_size": config["sasrec_train_batch_size"],
        "stopping_step": config["sasrec_stopping_step"],
        "loss_type": "CE",
        "MODEL_INPUT_TYPE": InputType.POINTWISE,
        "save_dataloaders": False,
    }
    for key, value in overrides.items():
        sasrec_config[key] = value
    return sasrec_config


@contextlib.contextmanager
def own_checkpoint_file(config, trainer, saved=True):
    """Within: ``trainer.saved_model_file`` is a name no other run holds (:func:`claim_checkpoint_file`; in a
    distributed run the first process claims it for all). On the way out, the claimed file is removed if nothing was
    saved to it (a run that failed early, or one resumed into its earlier files)."""
    if not saved:
        yield
        return
    claims = config["single_spec"] or torch.distributed.get_rank() == 0
    claimed = claim_checkpoint_file(trainer.saved_model_file) if claims else None
    trainer.saved_model_file = claimed if config["single_spec"] else first_process_value(claimed)
    try:
        yield
    finally:
        if claims:
            release_unused_file(claimed)


def prepare_data(config, dataset):
    """RecBole's ``data_preparation``, with full-sort loaders bounded by ``full_sort_max_scores``
    (:func:`bounded_full_sort`)."""
    apply_lapse(config, dataset)  # the lapse protocol's split, when 'lapse' is set
    apply_block(config, dataset)  # a continual run's time block, when 'continual_block' is set
    return tuple(bounded_full_sort(config, loader) for loader in data_preparation(config, dataset))


def apply_block(config, dataset):
    """A continual run's block split (``continual_block``, set by :mod:`recbole_ilora.continual_runner`)."""
    if config["continual_block"] is None:
        return dataset
    from recbole_ilora.continual import apply_time_block

    return apply_time_block(config, dataset, int(config["continual_block"]), bool(config["continual_cumulative"]))


def bounded_full_sort(config, loader):
    """``loader``, or, if it is a full-sort evaluation loader whose batches would score more than
    ``full_sort_max_scores`` (users x items), the same loader with fewer users per batch.

    RecBole's sequential full-sort loader takes ``eval_batch_size`` users per batch, and every model returns a score
    for every item of each user (``full_sort_predict``, ``[users, items]``), which the evaluator then masks and ranks:
    at 1M items the default 4096 users ask for 16 GB of float32 in one batch. The batch, not the product, is what
    has to shrink, since the scores of a whole batch are held at once; each user's scores do not depend on it."""
    if not isinstance(loader, FullSortEvalDataLoader) or not config["full_sort_max_scores"]:
        return loader
    items = loader._dataset.item_num
    users = max(1, int(config["full_sort_max_scores"]) // items)
    if not loader.is_sequential or loader.step <= users:  # RecBole's general layout already counts scores
        return loader
    bounded = copy.copy(config)
    bounded.final_config_dict = {**config.final_config_dict, "eval_batch_size": users}
    getLogger().info(
        f"full ranking: {users} users per evaluation batch ({users * items:,} scores; full_sort_max_scores = "
        f"{config['full_sort_max_scores']:,}) instead of eval_batch_size = {loader.step}"
    )
    return FullSortEvalDataLoader(bounded, loader._dataset, loader._sampler, shuffle=False)


def pretrain_sasrec(config, show_progress=False):
    """Train RecBole's SASRec on the configured dataset and split with the ``sasrec_*`` keys; returns the best
    checkpoint's path. The dataset is created anew (RecBole's ``data_preparation`` consumes a dataset)."""
    logger = getLogger()
    sasrec_config = sasrec_pretraining_config(config)
    logger.info(set_color("Pretraining the SASRec encoder", "green") + " (no 'sasrec_checkpoint' given)")
    train_data, valid_data, _ = prepare_data(sasrec_config, create_dataset(sasrec_config))
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model("SASRec")(sasrec_config, train_data._dataset).to(config["device"])
    trainer = get_trainer(sasrec_config["MODEL_TYPE"], "SASRec")(sasrec_config, model)
    with own_checkpoint_file(config, trainer):
        best_score, _ = trainer.fit(train_data, valid_data, saved=True, show_progress=show_progress)
    if not config["single_spec"]:  # distributed: the first process wrote the checkpoint that every process loads
        torch.distributed.barrier()
    logger.info(
        set_color("SASRec encoder", "green") + f": best valid {config['valid_metric']} = {best_score:.4f}, "
        f"saved to {trainer.saved_model_file}"
    )
    return trainer.saved_model_file


FILTER_KEYS = (
    "rm_dup_inter",
    "val_interval",
    "filter_inter_by_user_or_item",
    "user_inter_num_interval",
    "item_inter_num_interval",
)


def check_dataset(config):
    """Before anything is built: the dataset's interaction file must exist, unless RecBole can download the dataset
    by name (it then does, which needs the network)."""
    names = config["benchmark_filename"] or [None]
    files = [
        os.path.join(config["data_path"], f"{config['dataset']}{'.' + part if part else ''}.inter") for part in names
    ]
    if all(os.path.isfile(file) for file in files):
        return
    with open(os.path.join(os.path.dirname(recbole.__file__), "properties", "dataset", "url.yaml")) as file:
        downloadable = yaml.safe_load(file) or {}
    if config["dataset"] in downloadable:
        return
    missing = next(file for file in files if not os.path.isfile(file))
    raise FileNotFoundError(
        f"'dataset' = {config['dataset']!r}: the interaction file {missing} does not exist, and RecBole knows no "
        f"dataset of that name to download. Put <name>/<name>.inter (RecBole's atomic files) under 'data_path' "
        f"(now {os.path.dirname(os.path.normpath(config['data_path']))!r}) or choose a RecBole dataset name."
    )


def create_filtered_dataset(config):
    """RecBole's ``create_dataset``, with a clear error when its filters leave nothing."""
    try:
        dataset = create_dataset(config)
    except ValueError as error:
        if "feat is empty" not in str(error):
            raise
        dataset = None
    if dataset is None or dataset.inter_num == 0:
        filters = {key: config[key] for key in FILTER_KEYS if config[key] not in (None, False, {}, [])}
        raise ValueError(
            f"Dataset {config['dataset']!r} has no interactions left after RecBole's filtering ({filters}); "
            "relax these keys."
        )
    return dataset


def check_resume(config):
    """``resume_checkpoint``, before any data is prepared: the file must exist; a plugin LLM run resumes with the
    SASRec encoder it was trained with (from its training state) unless ``sasrec_checkpoint`` is given."""
    path = config["resume_checkpoint"]
    if not path:
        return
    if not issubclass(get_model(config["model"]), LLMSequentialRecommender):
        safe_load(path, "resume_checkpoint")  # RecBole's own resume (its best checkpoint and optimizer) reads it
        return
    state_file = training_state_file(model_file_of(path))
    state = safe_load(state_file, "resume_checkpoint")
    if not config["sasrec_checkpoint"]:
        config["sasrec_checkpoint"] = state["config"].get("sasrec_checkpoint")


# Settings a warm start's checkpoint must share with the run it starts: its weights fit this adapter, gate and
# projector only then (the scoring head is the head objective's and may be left out).
WARM_START_KEYS = ("model", "dataset", "llm_backbone", "lora_num_experts", "lora_expert_rank", "lora_target_modules",
                   "gate_input")  # fmt: skip


def file_digest(path):
    import hashlib

    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def check_warm_start(config):
    """``llm_init_checkpoint``, before any data is prepared: a checkpoint of a finished run of the same model on the
    same data and backbone (:data:`WARM_START_KEYS`), whose trained adapter, gate and projector start this run (the
    generative objective starting from what the head objective learnt, LLaRA's curriculum idea). The run reads the
    SASRec encoder that run read (its projector maps that encoder's item embeddings): ``sasrec_checkpoint``, when
    given, must be the same file. Returns the checkpoint, or None without the key."""
    path = config["llm_init_checkpoint"]
    if not path:
        return None
    if not issubclass(get_model(config["model"]), LLMSequentialRecommender):
        raise ValueError(f"'llm_init_checkpoint' starts an LLM model's adapter; {config['model']} has none.")
    if config["resume_checkpoint"]:
        raise ValueError(
            "'llm_init_checkpoint' starts a new run; 'resume_checkpoint' goes on with a killed one: set one."
        )
    checkpoint = safe_load(path, "llm_init_checkpoint")
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint):
        raise ValueError(f"'llm_init_checkpoint' = {path!r} is not a model checkpoint (no config and state_dict).")
    theirs = checkpoint["config"]
    for key in WARM_START_KEYS:
        if theirs.get(key) != config[key]:
            raise ValueError(
                f"'llm_init_checkpoint' = {path!r} was trained with {key} = {theirs.get(key)!r}, this run has "
                f"{config[key]!r}: its weights do not fit this model."
            )
    encoder = theirs.get("sasrec_checkpoint")
    if not config["sasrec_checkpoint"]:
        if not encoder or not os.path.isfile(encoder):
            raise FileNotFoundError(
                f"'llm_init_checkpoint' = {path!r} read the SASRec encoder {encoder!r}, which is not here: set "
                "'sasrec_checkpoint' to that encoder's file (its projector maps that encoder's item embeddings)."
            )
        config["sasrec_checkpoint"] = encoder
    elif encoder and os.path.isfile(encoder) and file_digest(encoder) != file_digest(config["sasrec_checkpoint"]):
        raise ValueError(
            f"'sasrec_checkpoint' = {config['sasrec_checkpoint']!r} is not the encoder 'llm_init_checkpoint' = "
            f"{path!r} was trained with ({encoder!r}): its projector would read other item embeddings."
        )
    return checkpoint


def warm_start(model, checkpoint, path):
    """Copy ``checkpoint``'s trained parameters into ``model``: every trainable parameter of the same name and shape;
    all but the scoring head must be there (an error otherwise). Returns the names loaded and those left as built."""
    state = checkpoint["state_dict"]
    parameters = dict(model.named_parameters())
    loaded, fresh = [], []
    with torch.no_grad():
        for name in sorted(model.trainable_parameter_names()):
            if name in state and state[name].shape == parameters[name].shape:
                parameters[name].copy_(state[name])
                loaded.append(name)
            else:
                fresh.append(name)
    missing = [name for name in fresh if not name.startswith("score_head.")]
    if missing:
        raise ValueError(
            f"'llm_init_checkpoint' = {path!r} lacks {len(missing)} of this model's trained parameters (or holds "
            f"them in another shape): {missing[:4]}{' ...' if len(missing) > 4 else ''}"
        )
    getLogger().info(
        f"Warm start from {path}: {len(loaded)} trained tensors loaded"
        + (f"; {', '.join(fresh)} start as built" if fresh else "")
    )
    return loaded, fresh


def prepare_model(config, train_data, show_progress=False, timings=None):
    """Build the model named by ``config['model']``, pretraining its SASRec encoder first when it needs one
    (``timings``, a dict, receives the seconds of ``sasrec_pretraining`` and ``model_building``)."""
    timings = PhaseTimes() if timings is None else timings
    model_class = get_model(config["model"])  # its check_config ran in train_and_evaluate, before any data
    with phase(timings, "sasrec_pretraining"):
        if issubclass(model_class, LLMSequentialRecommender) and not config["sasrec_checkpoint"]:
            config["sasrec_checkpoint"] = pretrain_sasrec(config, show_progress)
    with phase(timings, "model_building"):
        init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
        model = model_class(config, train_data._dataset).to(config["device"])
    return model


def training_windows(config, dataset):
    """Row indices of ``dataset`` (RecBole's augmented training sequences) that tile each user's training history
    with non-overlapping windows of ``MAX_ITEM_LIST_LENGTH`` items: the user's most recent sequence, then the one whose
    target is the first item of its history, and so on back. A model trained at every position of these rows sees
    every training target once (each user's first item is never one: nothing precedes it). In time order."""
    users = dataset.inter_feat[dataset.uid_field].numpy()
    from_last = pd.Series(np.arange(len(users))).groupby(users).cumcount(ascending=False).to_numpy()
    return np.flatnonzero(from_last % config["MAX_ITEM_LIST_LENGTH"] == 0)


def budget_training_data(config, train_data, every_position=False):
    """The LLM's training loader: each user's ``llm_train_sequences_per_user`` most recent training sequences
    (RecBole's augmented prefixes, in time order within a user; ``None`` keeps them all). With ``every_position`` (a
    model with a loss at every history position) the sequences are first cut to non-overlapping windows
    (:func:`training_windows`), so that the budget counts windows and no target is trained twice in an epoch. SASRec's
    pretraining is not affected (it builds its own loaders). Returns the loader and the number of targets per epoch."""
    budget = config["llm_train_sequences_per_user"]
    dataset = train_data._dataset
    rows = training_windows(config, dataset) if every_position else np.arange(len(dataset.inter_feat))
    users = dataset.inter_feat[dataset.uid_field].numpy()[rows]
    if budget is not None:  # rank of every row among its user's rows, counted from the user's last (most recent)
        from_last = pd.Series(np.arange(len(rows))).groupby(users).cumcount(ascending=False).to_numpy()
        rows = rows[from_last < budget]
    keep = torch.from_numpy(rows)
    lengths = dataset.inter_feat[config["ITEM_LIST_LENGTH_FIELD"]][keep]
    targets = int(lengths.sum()) if every_position else len(rows)
    kind = "windows" if every_position else "sequences"
    getLogger().info(
        set_color("LLM training budget", "green") + f": {len(rows)} {kind} of {len(dataset.inter_feat)} training "
        f"sequences, {targets} targets per epoch ('llm_train_sequences_per_user' = {budget}: each user's most recent "
        f"{kind}{'; a loss at every history position' if every_position else ''})"
    )
    if budget is None and not every_position:
        return train_data, targets
    subset = dataset.copy(dataset.inter_feat[keep])
    loader = get_dataloader(config, "train")(config, subset, train_data._sampler, shuffle=config["shuffle"])
    return loader, targets


def protocol_test_data(config, mode, test_split="lapse"):
    """RecBole's test loader for ``config``'s dataset and split, evaluated under ``mode`` ('full', 'uni19',
    'pop100', ...), in the sequential layout whatever the model (see the module docstring). Under the lapse
    protocol (``lapse`` set), ``test_split`` picks the test with lapse (RecBole's test) or 'no_lapse'."""
    test_config = copy.deepcopy(config)
    test_config["eval_args"] = {**config["eval_args"], "mode": {**config["eval_args"]["mode"], "test": mode}}
    test_config._set_eval_neg_sample_args("test")
    test_config["MODEL_TYPE"] = ModelType.SEQUENTIAL
    test_config["repeatable"] = True
    dataset = apply_block(test_config, apply_lapse(test_config, create_dataset(test_config), test_split))
    built_datasets = dataset.build()
    _, _, test_sampler = create_samplers(test_config, dataset, built_datasets)
    loader = get_dataloader(test_config, "test")(test_config, built_datasets[2], test_sampler, shuffle=False)
    return bounded_full_sort(test_config, loader)


def evaluate_test_modes(config, trainer, show_progress=False, known=None, label="test result"):
    """The trained model (already holding its best weights) tested under every mode of ``config['test_modes']``;
    ``known`` (mode -> metrics) holds modes already evaluated on their protocol loader, which are not run again.

    Returns:
        dict: mode -> RecBole's OrderedDict of metrics.
    """
    results = {}
    for mode in config["test_modes"] or []:
        if known and mode in known:
            results[mode] = known[mode]
        else:
            test_data = protocol_test_data(config, mode)
            init_seed(config["seed"], config["reproducibility"])  # the same sampled candidates for every model
            results[mode] = trainer.evaluate(test_data, load_best_model=False, show_progress=show_progress)
        getLogger().info(set_color(f"{label} ({mode})", "yellow") + f": {results[mode]}")
        if config["lapse"] is not None:  # the same mode on the test without lapse
            name = f"{mode}_no_lapse"
            test_data = protocol_test_data(config, mode, "no_lapse")
            init_seed(config["seed"], config["reproducibility"])
            results[name] = trainer.evaluate(test_data, load_best_model=False, show_progress=show_progress)
            getLogger().info(set_color(f"{label} ({mode}, without lapse)", "yellow") + f": {results[name]}")
    return results


def evaluate_encoder(config, model, test_data, show_progress=False):
    """The frozen SASRec encoder of an LLM ``model``, tested on the same loaders as the model: RecBole's test
    (``test_data``) and every mode of ``test_modes`` (:func:`evaluate_test_modes`: each mode's protocol loader, seeded
    as for the model, so the same sampled candidates). Returns ``(test_result, {mode: metrics})``, so that one run
    shows what the LLM added."""
    from recbole.trainer import Trainer

    trainer = Trainer(sasrec_pretraining_config(config), model.sasrec)
    init_seed(config["seed"], config["reproducibility"])
    test_result = trainer.evaluate(test_data, load_best_model=False, show_progress=show_progress)
    getLogger().info(set_color("encoder test result", "yellow") + f" (its frozen SASRec, same split): {test_result}")
    results = evaluate_test_modes(config, trainer, show_progress, label="encoder test result")
    model.sasrec.eval()
    return test_result, results


def recbole_test_mode(config):
    """RecBole's own test mode when it is also one of ``test_modes`` and its loader is the test modes' (a
    sequential model, no lapse), else None. Then the two are one evaluation: on the seeded protocol loader, the same
    candidates as every other model's (a generative model's likelihood test costs about 2 s per user on SmolLM2 and
    CPU; it used to run twice, RecBole's candidates drawn from wherever training left the random state)."""
    mode = config["eval_args"]["mode"]
    mode = mode.get("test") if isinstance(mode, dict) else mode
    if config["lapse"] is not None or config["MODEL_TYPE"] != ModelType.SEQUENTIAL:
        return None
    return mode if mode in (config["test_modes"] or []) else None


def lapse_drops(test_results):
    """Under the lapse protocol: for each mode, every metric's relative drop from the test without lapse to the test
    with lapse, ``(no lapse - with lapse) / no lapse`` (None where the first is 0)."""
    drops = {}
    for mode, metrics in test_results.items():
        if mode.endswith("_no_lapse") or f"{mode}_no_lapse" not in test_results:
            continue
        before = test_results[f"{mode}_no_lapse"]
        drops[mode] = {
            metric: (before[metric] - value) / before[metric] if before[metric] else None
            for metric, value in metrics.items()
        }
    return drops


def train_and_evaluate(config, saved=True, verbose=True, prepare=None):
    """RecBole's steps after the configuration: data, model, ``fit``, test ``evaluate``; RecBole's result dict.
    ``prepare(model)``, if given, runs on the built model before training (a continual run loads the previous
    block's weights and anchors the adapter there)."""
    logger = getLogger()
    timings = PhaseTimes()
    model_class = get_model(config["model"])
    if issubclass(model_class, LLMSequentialRecommender):
        model_class.check_config(config)  # before any data is prepared
    check_dataset(config)
    check_lapse_config(config)
    check_resume(config)
    warm = check_warm_start(config)
    with phase(timings, "data_preparation"):
        dataset = create_filtered_dataset(config)
        if verbose:
            logger.info(dataset)
        train_data, valid_data, test_data = prepare_data(config, dataset)
    show_progress = config["show_progress"] if verbose else False

    model = prepare_model(config, train_data, show_progress, timings)
    if warm is not None:
        warm_start(model, warm, config["llm_init_checkpoint"])
    if prepare is not None:
        prepare(model)
    llm = isinstance(model, LLMSequentialRecommender)
    if llm:  # the whole splits: a user's candidates exclude all of the user's items
        model.attach_splits(train_data, valid_data, test_data)
    trained_targets = None
    if llm:
        train_data, trained_targets = budget_training_data(config, train_data, model.trains_every_position)
    trained_sequences = len(train_data.dataset)
    if verbose:
        logger.info(model)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    with own_checkpoint_file(config, trainer, saved):
        if config["resume_checkpoint"]:
            trainer.resume_checkpoint(config["resume_checkpoint"])
        with phase(timings, "training"):  # with RecBole's validation after each epoch
            best_valid_score, best_valid_result = trainer.fit(
                train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress
            )
        epochs_run = getattr(trainer, "epochs_trained", None)  # the plugin's trainer counts a resumed run's epochs
        if epochs_run is None:
            epochs_run = max(trainer.train_loss_dict) + 1 if trainer.train_loss_dict else trainer.start_epoch
        with phase(timings, "testing"):
            # A generative run's tests take about an hour on a CPU, so they are journaled next to the checkpoint that
            # names their weights: a killed run, resumed from its finished training, goes on where they were. A run that
            # trained in this process starts them afresh.
            journaled = saved and config["single_spec"] and llm and model.generative
            fresh = bool(trainer.train_loss_dict)
            with contextlib.ExitStack() as tests:
                if isinstance(model, LLMSequentialRecommender):  # every test mode scores the same test histories with
                    tests.enter_context(model.reusing_encodings())  # the same weights: each is encoded once
                if journaled:
                    scores_file = test_journal_file(trainer.saved_model_file, "test_scores")
                    tests.enter_context(model.journaling_scores(scores_file, fresh=fresh))
                own_mode = recbole_test_mode(config)
                if own_mode is not None:  # RecBole's test is one of the test modes: run it once, on the seeded loader
                    test_data = protocol_test_data(config, own_mode)
                    init_seed(config["seed"], config["reproducibility"])
                test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=show_progress)
                known = {own_mode: test_result} if own_mode is not None else None
                test_results = evaluate_test_modes(config, trainer, show_progress, known=known)
            generative_result = None
            if llm and model.generative:
                from recbole_ilora.generative import evaluate_generation

                answers_file = test_journal_file(trainer.saved_model_file, "generations") if journaled else None
                generative_result = evaluate_generation(
                    config, model, output_file=answers_file, show_progress=show_progress, resume=journaled and not fresh
                )
    encoder_result, encoder_results = None, None
    if isinstance(model, LLMSequentialRecommender) and config["single_spec"]:  # (several processes: not yet)
        with phase(timings, "encoder_testing"):
            encoder_result, encoder_results = evaluate_encoder(config, model, test_data, show_progress)
    logger.info(set_color("timings (s, wall / CPU)", "yellow") + ": " + timings.summary())
    if verbose:
        logger.info("The running environment of this training is as follows:\n" + get_environment(config).draw())
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    return {
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "test_results": test_results,
        "generative_result": generative_result,
        "lapse_drops": lapse_drops(test_results),  # {} unless 'lapse' is set
        "encoder_test_result": encoder_result,  # an LLM model's frozen SASRec on the same test (None otherwise)
        "encoder_test_results": encoder_results,  # ... and on every test mode
        "saved_model_file": trainer.saved_model_file if saved else None,
        "timings": dict(timings),  # wall seconds per phase
        "cpu_timings": dict(timings.cpu),  # the process's CPU seconds per phase (all its threads)
        "model_summary": model.training_summary() if llm else None,
        "train_losses": [float(trainer.train_loss_dict[epoch]) for epoch in sorted(trainer.train_loss_dict)],
        "epochs_run": epochs_run,  # epochs trained, counting those of a resumed run's earlier process
        "stopped_early": epochs_run < config["epochs"],
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "trained_sequences": trained_sequences,  # the training loader's sequences per epoch, after the LLM budget
        "trained_targets": trained_targets,  # an LLM model's training targets per epoch (every position: per window)
        "block_statistics": getattr(dataset, "block_stats", None),  # a continual run's block: users, sequences
    }


def log_provenance(logger=None):
    """Log the run's provenance header (code, machine, libraries: :func:`provenance_lines`)."""
    for line in provenance_lines():
        (logger or getLogger()).info(set_color(line.split(":", 1)[0], "yellow") + ":" + line.split(":", 1)[1])


def run_recbole_ilora(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True):
    """Train and test ``model`` on ``dataset`` (any plugin or RecBole model), as ``recbole.quick_start.run_recbole``.

    Returns:
        dict: RecBole's ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result``, ``test_result``; and
        ``test_results`` (mode -> metrics, for ``test_modes``), ``generative_result`` (ValidRatio and HR@1 of greedy
        answers, for ``objective: generative``), ``saved_model_file``, ``trainable_parameters`` and ``timings``
        (seconds of data preparation, SASRec pretraining, model building, training, testing; also logged).
    """
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    log_provenance(logger)
    logger.info(sys.argv)
    logger.info(config)
    if config["continual"]:
        from recbole_ilora.continual_runner import run_continual

        return run_continual(config, saved=saved)
    return train_and_evaluate(config, saved=saved, verbose=True)


def run(
    model=None,
    dataset=None,
    config_file_list=None,
    config_dict=None,
    saved=True,
    nproc=1,
    world_size=-1,
    ip="localhost",
    port="5678",
    group_offset=0,
):
    """RecBole's ``quick_start.run``: :func:`run_recbole_ilora` in this process, or in ``nproc`` processes of a
    ``world_size``-process group (RecBole's distributed mode; ``dist_backend`` picks NCCL or gloo; several machines:
    each runs ``nproc`` processes with its ``group_offset``, all with the first machine's ``ip`` and ``port``).
    Every process trains its share of each batch with its own copy of the frozen backbone; only the trained
    parameters' gradients are averaged. Returns the first process's result (None on a machine without it)."""
    if nproc == 1 and world_size <= 0:
        return run_recbole_ilora(model, dataset, config_file_list, config_dict, saved)
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    settings = {"world_size": world_size if world_size > 0 else nproc, "ip": ip, "port": port, "nproc": nproc}
    config_dict = {**(config_dict or {}), **settings, "offset": group_offset}
    mp.spawn(_run_process, args=(model, dataset, config_file_list, config_dict, saved, queue), nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()


def _run_process(local_rank, model, dataset, config_file_list, config_dict, saved, queue):
    try:
        result = run_recbole_ilora(model, dataset, config_file_list, {**config_dict, "local_rank": local_rank}, saved)
        if local_rank == 0 and config_dict.get("offset", 0) == 0:
            queue.put(result)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def objective_function(config_dict=None, config_file_list=None, saved=True):
    """RecBole's hyper-tuning objective for any plugin or RecBole model (quiet: errors only on the console).

    Returns:
        dict: ``model`` and the keys of :func:`run_recbole_ilora`.
    """
    config = Config(config_dict=config_dict, config_file_list=config_file_list)
    init_seed(config["seed"], config["reproducibility"])
    logger = getLogger()
    for handler in logger.handlers[:]:
        logger.removeHandler(handler)
    init_logger(config)
    logging.basicConfig(level=logging.ERROR)
    return {"model": config["model"], **train_and_evaluate(config, saved=saved, verbose=False)}


# Keys RecBole's Config derives itself; a checkpoint's copies are not passed back.
_DERIVED_KEYS = {
    "MODEL_TYPE",
    "MODEL_INPUT_TYPE",
    "eval_type",
    "device",
    "single_spec",
    "local_rank",
    "valid_neg_sample_args",
    "test_neg_sample_args",
    "data_path",
    "model",
    "dataset",
}


def load_data_and_model(model_file, data_path=None):
    """RecBole's ``load_data_and_model`` for checkpoints saved through this plugin (weights-only loading).

    Args:
        model_file: the checkpoint (``saved/<model>-<time>.pth``).
        data_path: the folder holding the dataset's folder, for a checkpoint that moved from the checkout or machine
            it was trained on (its config names that place's absolute path); None: the checkpoint's own.

    Returns:
        tuple: ``config, model, dataset, train_data, valid_data, test_data``, the model in eval mode.
    """
    checkpoint = safe_load(model_file, "model_file")
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint):
        raise ValueError(f"{model_file!r} is not a RecBole model checkpoint (no config and state_dict).")
    saved = checkpoint["config"]
    restored = {key: value for key, value in saved.items() if key not in _DERIVED_KEYS}
    if restored.get("train_neg_sample_args", {}).get("distribution") == "none":  # RecBole's expansion of None
        restored["train_neg_sample_args"] = None
    # RecBole stores data_path joined with the dataset name; the plugin's Config honours it for every dataset.
    restored["data_path"] = data_path or os.path.dirname(os.path.normpath(saved["data_path"]))
    # Through a YAML file, not config_dict: RecBole eval()s config_dict strings (prompt templates, paths).
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, encoding="utf-8") as file:
        yaml.safe_dump(restored, file, allow_unicode=True)
    try:
        config = Config(model=saved["model"], dataset=saved["dataset"], config_file_list=[file.name])
    finally:
        os.remove(file.name)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = prepare_data(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    if isinstance(model, LLMSequentialRecommender):
        model.attach_splits(train_data, valid_data, test_data)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model.eval(), dataset, train_data, valid_data, test_data
