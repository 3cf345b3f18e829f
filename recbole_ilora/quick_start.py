"""One-call training and evaluation, as ``recbole.quick_start`` (without importing it, which pulls ray): the command
line's entry (:func:`run_recbole_ilora`, :func:`run` with several processes), RecBole's hyper-tuning objective, and
:func:`load_data_and_model`. The steps below them: ``recbole_ilora.data`` (datasets, splits, budgets, test loaders),
``recbole_ilora.pipeline`` (encoder, model, training, tests) and ``recbole_ilora.saved_run`` (reloading).
"""

import logging
import sys
from logging import getLogger

import torch
from recbole.utils import init_logger, init_seed

from recbole_ilora.config import Config
from recbole_ilora.pipeline import train_and_evaluate
from recbole_ilora.provenance import log_provenance
from recbole_ilora.saved_run import load_data_and_model  # noqa: F401 (public, as RecBole's)


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
