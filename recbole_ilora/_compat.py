"""RecBole 1.2.1 on today's stack: every shim in one place, each with the reason and a test (tests/test_compat.py).

RecBole 1.2.1 was released for numpy 1, pandas 1/2 and torch < 2.6. On the stack pinned in setup.cfg it breaks
in six known ways and is noisy in a seventh; :func:`apply` fixes them without editing any installed file. It is
idempotent and is called by :class:`recbole_ilora.config.Config` before RecBole's own ``Config`` runs.

1. numpy 2 removed ``np.float_``, ``np.complex_`` and ``np.unicode_``; ``Config.compatibility_settings`` reads
   them (to set even older aliases) and raises ``AttributeError``. Shim: alias the three before the first Config.
2. torch >= 2.6 loads with ``weights_only=True`` by default. RecBole's ``Trainer._save_checkpoint`` writes with
   ``pickle_protocol=4`` (whose FRAME opcode the weights-only unpickler rejects: "Unsupported operand 149") and
   pickles the whole ``Config`` object and a numpy score, so ``Trainer.evaluate(load_best_model=True)``,
   ``Trainer.resume_checkpoint`` and ``load_data_and_model`` fail; allow-listing globals does not help.
   Shim: ``Trainer._save_checkpoint`` is replaced by :func:`save_checkpoint`, which writes the same fields with
   plain values and torch's default protocol, atomically; RecBole's own ``torch.load`` calls then work with the
   safe default, and a checkpoint never carries pickled code.
3. ``recbole/model/sequential_recommender/sine.py`` calls ``torch.autograd.set_detect_anomaly(True)`` at import
   time, so any model lookup turns anomaly mode on for the whole process (SASRec trains about 1.8x slower).
   Shim: import RecBole's sequential models once and restore the anomaly-mode state that was in force before.
4. pandas 3 breaks ``token_seq`` item fields (ml-100k's ``movie_title``) in ``Dataset._remap`` and silently
   ignores ``fillna(inplace=True)`` on a column. Shim: setup.cfg pins ``pandas<3``; :func:`check_pandas` turns an
   environment that slipped past the pin into a clear error instead of silently wrong data.

5. RecBole's distributed mode assumes CUDA: ``Config._init_device`` hard-codes the NCCL backend and CUDA devices
   (our :class:`recbole_ilora.config.Config` adds the ``dist_backend`` key and a gloo/CPU path), and
   ``AbstractTrainer`` wraps the model in ``DistributedDataParallel(model, device_ids=[local_rank])``, which a CPU
   module rejects ("device_ids ... only work with ... GPU modules"). Shim: the ``DistributedDataParallel`` name in
   ``recbole.trainer.trainer`` becomes :func:`distributed_data_parallel`, which passes no ``device_ids`` for a CPU
   module and is otherwise torch's class.
6. RecBole's ``ensure_dir`` checks whether a folder exists and then creates it, so the processes of one distributed
   run race for the checkpoint folder (each process's trainer and ``data_preparation`` create it): the loser dies
   with ``FileExistsError``. Seen in this suite's 2-process test. Shim: the ``ensure_dir`` name in every RecBole
   module that imported it becomes :func:`ensure_dir`, ``os.makedirs(path, exist_ok=True)``.

7. RecBole's ``Dataset`` calls ``fillna(inplace=True)`` on a column and ``Series.agg(len)``; pandas 2.2+ answers
   each with a ``FutureWarning`` about pandas 3 (four warnings, about 20 lines, every time a dataset is built: in
   every run's output and log, and the benchmark grid's console). The behaviour they announce cannot happen here
   (shim 4 refuses pandas 3), so they tell a user nothing. Shim: :func:`quiet_recbole_pandas_warnings` ignores
   ``FutureWarning`` raised from ``recbole.data.dataset.dataset`` only.

Also: ``recbole.quick_start`` imports ray 2.6.3, which fails on this stack (``pkg_resources``); this package never
imports it (``recbole_ilora.quick_start`` follows RecBole's steps with RecBole's parts).
"""

from recbole_ilora.checkpoints import atomic_torch_save, model_checkpoint

_APPLIED = False
_NUMPY_ALIASES = {"float_": "float64", "complex_": "complex128", "unicode_": "str_"}


def alias_numpy_2_names():
    """Shim 1: restore the three numpy-1 names RecBole's Config reads, where numpy 2 removed them."""
    import numpy as np

    for old_name, new_name in _NUMPY_ALIASES.items():
        if old_name not in np.__dict__:
            setattr(np, old_name, getattr(np, new_name))


def save_checkpoint(self, epoch, verbose=True, **kwargs):
    """Shim 2, replacing ``recbole.trainer.Trainer._save_checkpoint``: the same checkpoint fields, loadable with
    ``torch.load(weights_only=True)``: the config as a plain dict, the best score as a float, torch's default
    pickle protocol (RecBole's protocol 4 emits FRAME opcodes the weights-only unpickler rejects), and written
    atomically (temporary file, then rename), so a crash mid-save leaves the previous checkpoint intact."""
    from recbole.utils import set_color

    if not self.config["single_spec"] and self.config["local_rank"] != 0:
        return
    saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
    atomic_torch_save({**model_checkpoint(self, epoch), "optimizer": self.optimizer.state_dict()}, saved_model_file)
    if verbose:
        self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")


def _patch_checkpoint_saving():
    from recbole.trainer import trainer as recbole_trainer

    recbole_trainer.Trainer._save_checkpoint = save_checkpoint


def distributed_data_parallel(module, device_ids=None, **kwargs):
    """Shim 5: torch's ``DistributedDataParallel``, without ``device_ids`` for a module on the CPU."""
    from torch.nn.parallel import DistributedDataParallel

    if all(parameter.device.type == "cpu" for parameter in module.parameters()):
        device_ids = None
    return DistributedDataParallel(module, device_ids=device_ids, **kwargs)


def _patch_distributed_data_parallel():
    from recbole.trainer import trainer as recbole_trainer

    recbole_trainer.DistributedDataParallel = distributed_data_parallel


def ensure_dir(dir_path):
    """Shim 6: RecBole's ``ensure_dir`` without its check-then-create race between processes."""
    import os

    os.makedirs(dir_path, exist_ok=True)


ENSURE_DIR_MODULES = (
    "recbole.utils.utils",
    "recbole.utils",
    "recbole.utils.logger",
    "recbole.trainer.trainer",
    "recbole.data.utils",
    "recbole.data.dataset.dataset",
)


RECBOLE_ENSURE_DIR = None  # RecBole's own function, kept for the test of the shim


def _patch_ensure_dir():
    import importlib

    from recbole.utils import utils as recbole_utils

    global RECBOLE_ENSURE_DIR
    if recbole_utils.ensure_dir is not ensure_dir:
        RECBOLE_ENSURE_DIR = recbole_utils.ensure_dir
    for name in ENSURE_DIR_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "ensure_dir"):
            module.ensure_dir = ensure_dir


def import_sequential_models_without_anomaly_mode():
    """Shim 3: import RecBole's sequential models (sine.py included) and undo sine.py's global anomaly mode."""
    import torch

    enabled, check_nan = torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()
    import recbole.model.sequential_recommender  # noqa: F401  (runs sine.py's module-level side effect once)

    torch.autograd.set_detect_anomaly(enabled, check_nan=check_nan)


def check_pandas(version=None):
    """Shim 4: refuse pandas >= 3, which silently corrupts RecBole 1.2.1's token_seq fields."""
    if version is None:
        import pandas

        version = pandas.__version__
    major = int(str(version).split(".")[0])
    if major >= 3:
        raise ImportError(
            f"pandas {version} is installed, but RecBole 1.2.1 mis-reads token_seq fields (item titles) with "
            "pandas 3. Install the pinned stack: pip install 'pandas<3' (see setup.cfg)."
        )


def quiet_recbole_pandas_warnings():
    """Shim 7: ignore pandas' FutureWarnings about pandas 3 raised from RecBole's ``Dataset`` (pandas 3 is refused)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.data\.dataset\.dataset")


def apply():
    """Apply every shim once per process. Safe to call many times."""
    global _APPLIED
    if _APPLIED:
        return
    check_pandas()
    quiet_recbole_pandas_warnings()
    alias_numpy_2_names()
    import_sequential_models_without_anomaly_mode()
    _patch_checkpoint_saving()
    _patch_distributed_data_parallel()
    _patch_ensure_dir()
    _APPLIED = True
