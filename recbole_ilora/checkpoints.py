"""Checkpoint files: their names, safe loading and atomic saving, for every runner and model of the plugin.

- Names: RecBole's ``saved/<model>-<time>.pth`` is claimed exclusively when a trainer is built
  (:func:`claim_checkpoint_file`; two runs started in the same second get ``-2``, ``-3``, ...) and given back if
  nothing was saved to it; its companions are the training state ``<model>-<time>.training_state.pth``
  (:func:`training_state_file`, :func:`model_file_of`) and the test journals ``<model>-<time>.<name>.jsonl``.
- Loading: :func:`safe_load` is ``torch.load(weights_only=True)``: tensors and plain values, never code; a missing,
  tampered or damaged file is an error naming the key and the file.
- Saving: :func:`atomic_torch_save` writes a temporary file and renames it over the old one, so a kill mid-save
  leaves the previous file intact; :func:`model_checkpoint` holds RecBole's checkpoint fields with plain values
  (:func:`plain_config`), which the weights-only loader accepts.
"""

import enum
import os
import tempfile

import torch


def plain_value(value):
    """A weights-only-loadable copy of a config value: enums by name, devices and other objects as strings."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, dict):
        return {str(key): plain_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain_value(item) for item in value]
    return str(value)


def plain_config(config):
    """The final configuration of a RecBole ``Config`` as a dict that ``torch.load(weights_only=True)`` accepts."""
    final = config.final_config_dict if hasattr(config, "final_config_dict") else dict(config)
    return {key: plain_value(value) for key, value in final.items()}


def atomic_torch_save(obj, path):
    """``torch.save`` to a temporary file in ``path``'s folder, flushed and renamed over ``path``: a crash mid-save
    leaves the previous file intact. The file gets the permissions a plain ``torch.save`` would give."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, staging = tempfile.mkstemp(prefix=".saving-", suffix=".pth", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(staging, 0o666 & ~umask)  # mkstemp makes 0600
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise


def safe_load(path, key=None, map_location="cpu"):
    """``torch.load(path, weights_only=True)``: tensors and plain values only, never code. A missing file, or one
    that is no such checkpoint (tampered, truncated, pickled objects), is a clear error naming ``key`` and the file.
    """
    what = f"'{key}' = {str(path)!r}" if key else repr(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} does not exist.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # UnpicklingError (pickled objects), RuntimeError (not a torch zip), EOFError, ...
        raise ValueError(
            f"{what} cannot be loaded safely as a checkpoint (torch.load with weights_only=True refuses it or it is "
            f"damaged): {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from error


def model_checkpoint(trainer, epoch):
    """RecBole's checkpoint fields but the optimizer's, with plain values (weights-only loadable)."""
    return {
        "config": plain_config(trainer.config),
        "epoch": epoch,
        "cur_step": trainer.cur_step,
        "best_valid_score": float(trainer.best_valid_score),
        "state_dict": trainer.model.state_dict(),
        "other_parameter": trainer.model.other_parameter(),
    }


TRAINING_STATE_SUFFIX = ".training_state"


def training_state_file(model_file):
    """The training-state companion of a model checkpoint: ``x.pth`` -> ``x.training_state.pth``."""
    root, extension = os.path.splitext(str(model_file))
    return root + TRAINING_STATE_SUFFIX + (extension or ".pth")


def test_journal_file(model_file, name):
    """A journal of the tests of a model checkpoint's weights (``recbole_ilora.journal``):
    ``x.pth`` -> ``x.<name>.jsonl``."""
    return os.path.splitext(str(model_file))[0] + f".{name}.jsonl"


def model_file_of(path):
    """The model checkpoint named by ``path``, which may be the model checkpoint or its training state."""
    root, extension = os.path.splitext(str(path))
    if root.endswith(TRAINING_STATE_SUFFIX):
        return root[: -len(TRAINING_STATE_SUFFIX)] + extension
    return str(path)


def claim_checkpoint_file(path):
    """``path``, or else the first free ``<stem>-2<ext>``, ``<stem>-3<ext>``, ..., created empty and exclusively.

    RecBole names a checkpoint ``<model>-<local time to the second>.pth``, so two runs of one model started in the
    same second with one ``checkpoint_dir`` (two datasets benchmarked side by side, say) would save, reload and test
    one file. Creating the name with ``O_EXCL`` when the trainer is built gives each run its own file; the first
    save replaces the empty one. A name whose training-state companion exists is taken too."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, extension = os.path.splitext(str(path))
    number = 1
    while True:
        candidate = str(path) if number == 1 else f"{root}-{number}{extension}"
        number += 1
        if os.path.exists(training_state_file(candidate)):
            continue
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return candidate


def release_unused_file(path):
    """Remove a file claimed by :func:`claim_checkpoint_file` that no save has written (still empty)."""
    if path and os.path.isfile(path) and os.path.getsize(path) == 0:
        os.remove(path)
