"""A run's training pipeline below the runners: the SASRec encoder's pretraining, a warm start from another run, the
model, training (resumable), the test modes and the frozen encoder's own test, with each phase's wall and CPU time.

For the plugin's LLM models without a ``sasrec_checkpoint``, a SASRec is first trained on the same dataset, split
and data loaders settings (RecBole's SASRec and Trainer, ``sasrec_*`` keys), saved like ``--model=SASRec`` would save
it, and handed to the model as its frozen collaborative encoder. RecBole's FLOPs report is not computed.
"""

import contextlib
import copy
import json
import os
from logging import getLogger

import torch
from recbole.data import create_dataset
from recbole.utils import InputType, get_environment, init_seed, set_color

from recbole_ilora.checkpoints import (
    claim_checkpoint_file,
    model_file_of,
    release_unused_file,
    safe_load,
    test_journal_file,
    training_state_file,
)
from recbole_ilora.data import (
    budget_training_data,
    check_dataset,
    create_filtered_dataset,
    prepare_data,
    protocol_test_data,
    recbole_test_mode,
)
from recbole_ilora.journal import JsonLinesJournal
from recbole_ilora.lapse import check_lapse_config
from recbole_ilora.model.abstract_llm_recommender import LLMSequentialRecommender
from recbole_ilora.model.backbone import file_digest
from recbole_ilora.provenance import PhaseTimes, phase
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


def check_resume(config):
    """``resume_checkpoint``, before any data is prepared: the file must exist; a plugin LLM run resumes with the
    SASRec encoder it was trained with (from its training state) unless ``sasrec_checkpoint`` is given. Returns that
    training state (None for RecBole's own models and without the key)."""
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
    return state


# Settings a warm start's checkpoint must share with the run it starts: its weights fit this adapter, gate and
# projector only then (the scoring head is the head objective's and may be left out).


WARM_START_KEYS = ("model", "dataset", "llm_backbone", "lora_num_experts", "lora_expert_rank", "lora_target_modules",
                   "gate_input")  # fmt: skip


def check_warm_start(config, resumed=None):
    """``llm_init_checkpoint``, before any data is prepared: a checkpoint of a finished run of the same model on the
    same data and backbone (:data:`WARM_START_KEYS`), whose trained adapter, gate and projector start this run (the
    generative objective starting from what the head objective learnt, LLaRA's curriculum idea). The run reads the
    SASRec encoder that run read (its projector maps that encoder's item embeddings): ``sasrec_checkpoint``, when
    given, must be the same file. With ``resume_checkpoint``, the resumed run (``resumed``: its training state, from
    :func:`check_resume`) must have started from the same file (its weights come from its own state then). Returns
    the checkpoint, or None when there is nothing to load."""
    path = config["llm_init_checkpoint"]
    if not path:
        return None
    if not issubclass(get_model(config["model"]), LLMSequentialRecommender):
        raise ValueError(f"'llm_init_checkpoint' starts an LLM model's adapter; {config['model']} has none.")
    if config["resume_checkpoint"]:  # a killed warm-started run goes on from its own state, not from the start
        started_from = resumed["config"].get("llm_init_checkpoint")
        if started_from != path:
            raise ValueError(
                f"'resume_checkpoint' = {config['resume_checkpoint']!r} goes on with a run started from "
                f"'llm_init_checkpoint' = {started_from!r}, not {path!r}: a warm start begins a new run; set one."
            )
        getLogger().info(f"Resuming a run warm-started from {path}: its weights come from the resumed state.")
        return None
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
    resumed = check_resume(config)
    warm = check_warm_start(config, resumed)
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
                    journal = tests.enter_context(JsonLinesJournal(scores_file, fresh=fresh))
                    tests.enter_context(model.journaling_scores(journal))
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
    # machine-readable (benchmarks/grid.py --recover and performance.py read them): wall, then CPU seconds per phase
    logger.info(set_color("timings (s)", "yellow") + ": " + json.dumps({k: round(v, 2) for k, v in timings.items()}))
    logger.info(set_color("CPU seconds per phase", "yellow") + ": " + json.dumps(timings.cpu_rounded()))
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
