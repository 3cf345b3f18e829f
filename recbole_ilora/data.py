"""The data layer of a run: RecBole's dataset with its filters checked, the splits (and a lapse or continual block's
split), the LLM's training budget (each user's most recent training sequences or windows), full-ranking loaders
bounded in memory, and the test loaders of every test mode (the sequential layout for every model, so that every
model is tested on the same users, targets and, for sampled modes, the same candidates: RecBole's repeatable
sampler re-seeded with ``seed`` before each mode)."""

import copy
import os
from logging import getLogger

import numpy as np
import pandas as pd
import recbole
import torch
import yaml
from recbole.data import create_dataset, data_preparation
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.data.utils import create_samplers, get_dataloader
from recbole.utils import ModelType, set_color

from recbole_ilora.lapse import apply_lapse


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
