"""Trainers for the plugin's models: RecBole's ``Trainer`` with the optimizer over trained parameters only, two
checkpoint files, and exact resumption.

- ``saved/<model>-<time>.pth``, the model checkpoint: the best trained parameters (adapter, gate, projector, head),
  the plain-dict configuration that rebuilds the frozen parts, epoch and best score, written whenever the validation
  score improves (RecBole's rule). This is the file to share, to test and to reload (``load_data_and_model``).
- ``saved/<model>-<time>.training_state.pth``, written at the start of every epoch, every
  ``training_state_every_batches`` training batches within an epoch, and once more when training has finished:
  everything the run needs to go on exactly where it was: the latest trained parameters, the optimizer's state, the
  epoch and the batches of it already trained, the early-stopping counter, best score and result, and every random
  state (torch, CUDA, numpy, Python, the training loader's shuffling generator at the epoch's start).
  ``resume_checkpoint`` (the runner's ``resume_checkpoint`` key) restarts from it; a run killed at any point and
  resumed ends with the same metrics as one never interrupted. Resumed within an epoch, the loader replays the
  epoch's order and skips the batches already trained (RecBole's logged loss of that epoch then sums the remaining
  batches only). Resumed from a finished training, nothing trains and the run goes straight to its tests.

Both are written atomically (a kill during a save leaves the previous file intact) and load with
``torch.load(weights_only=True)``: tensors and plain values, never pickled code.
"""

import math
import os
import random
from collections import OrderedDict

import numpy as np
import torch
from recbole.trainer import Trainer
from recbole.utils import set_color
from torch.nn.parallel import DistributedDataParallel

from recbole_ilora.checkpoints import (
    atomic_torch_save,
    model_checkpoint,
    model_file_of,
    plain_config,
    safe_load,
    training_state_file,
)
from recbole_ilora.model.abstract_llm_recommender import LLMSequentialRecommender


def first_process_value(value):
    """In RecBole's distributed mode: the first process's ``value`` (e.g. a checkpoint name, which RecBole derives
    from each process's own clock), in every process."""
    values = [value]
    torch.distributed.broadcast_object_list(values, src=0)
    return values[0]


def random_states():
    """Every random generator's state, as tensors and plain values (weights-only loadable)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)],
        "python": [version, list(internal), gauss_next],
    }


def set_random_states(states):
    """Restore what :func:`random_states` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


LR_SCHEDULES = ("constant", "cosine")


def lr_factor(step, total_steps, warmup_steps, schedule):
    """The learning-rate multiplier at training step ``step`` (0-based, counted over every epoch): a linear warm-up
    over the first ``warmup_steps`` steps ((step + 1) / warmup), then ``constant`` 1 or ``cosine`` decay to 0 over
    the remaining steps of ``total_steps`` (the official Laser code's schedule; SLMRec's)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


class LLMRecTrainer(Trainer):
    """RecBole's Trainer; the optimizer holds only parameters that require gradients (adapter, gate, projector,
    head), never the frozen (possibly 4-bit) backbone, so its state and checkpoints stay small."""

    def __init__(self, config, model):
        if not config["single_spec"]:  # RecBole's distributed mode: synchronise the trained parameters only
            frozen = [name for name, parameter in model.named_parameters() if not parameter.requires_grad]
            buffers = [name for name, _ in model.named_buffers()]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen + buffers)
        super().__init__(config, model)
        self.best_epoch = None  # the epoch of the model checkpoint on disk, if any
        self._saving = True
        self._resumed_loader_state = None
        self._resumed_batches = 0  # batches of the first resumed epoch trained before the kill
        self._resumed_random_states = None  # the random states after those batches
        self._training_finished = False  # resumed from the state written when training had finished
        self.epochs_trained = None  # epochs trained by the run, whatever process trained them (set once fit ends)
        self.state_every_batches = int(config["training_state_every_batches"] or 0)
        if not config["single_spec"]:  # every process names the files of the first (each has its own clock)
            self.saved_model_file = first_process_value(self.saved_model_file)

    def sync_grad_loss(self):
        """RecBole's zero-valued sum over the parameters, so that each one takes part in DDP's reduction, over the
        trained parameters only (RecBole's sums every parameter, the frozen 4-bit backbone included)."""
        return sum(parameter.sum() * 0 for parameter in self.model.parameters() if parameter.requires_grad)

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model and not self.config["single_spec"]:
            torch.distributed.barrier()  # the first process has finished writing the best checkpoint
        return super().evaluate(eval_data, load_best_model, model_file, show_progress)

    def _build_optimizer(self, **kwargs):
        """Over the trained parameters only, one group per part an LLM model names in ``parameter_groups()`` (Laser:
        the M-Former's own rate), each at its ``lr_scale`` of ``learning_rate``."""
        if "params" not in kwargs:
            if isinstance(self.model, LLMSequentialRecommender):
                groups = self.model.parameter_groups()
            else:
                groups = [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
            learning_rate = self.config["learning_rate"]
            kwargs["params"] = [
                {"params": group["params"], "lr": learning_rate * group.get("lr_scale", 1.0),
                 "initial_lr": learning_rate * group.get("lr_scale", 1.0)}
                for group in groups
            ]  # fmt: skip
        return super()._build_optimizer(**kwargs)

    def schedule_learning_rate(self, epoch, index, batches_per_epoch):
        """Set every parameter group's rate for batch ``index`` of ``epoch`` (``llm_lr_warmup_steps``,
        ``llm_lr_schedule``): a function of the step alone, so a resumed run sets the very rates it would have."""
        warmup, schedule = int(self.config["llm_lr_warmup_steps"] or 0), self.config["llm_lr_schedule"] or "constant"
        if not warmup and schedule == "constant":
            return
        factor = lr_factor(epoch * batches_per_epoch + index, self.epochs * batches_per_epoch, warmup, schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def _is_writer(self):
        return self.config["single_spec"] or self.config["local_rank"] == 0

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self._saving = saved
        if self._training_finished:  # RecBole's fit would save the latest weights over the best checkpoint
            self.logger.info(set_color("Training had finished", "blue") + ": testing the best checkpoint")
            return self.best_valid_score, self.best_valid_result
        result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        self.epochs_trained = max(self.train_loss_dict) + 1 if self.train_loss_dict else self.start_epoch
        if saved:  # a kill during the tests resumes to the tests
            self.save_training_state(self.epochs_trained, finished=True)
        return result

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if self._resumed_loader_state is not None:  # the first epoch after resume_checkpoint: shuffle as before
            train_data.generator.set_state(self._resumed_loader_state)
            self._resumed_loader_state = None
        elif self._saving:
            self.save_training_state(epoch_idx, train_data)
        skip, self._resumed_batches = self._resumed_batches, 0
        if isinstance(self.model, LLMSequentialRecommender):
            self.model.start_epoch(epoch_idx)  # e.g. Laser's phase
            if skip:
                self.model.resume_within_epoch()  # e.g. Laser keeps the item table of the epoch
        batches = _ResumableBatches(self, train_data, epoch_idx, skip)
        return super()._train_epoch(batches, epoch_idx, loss_func=loss_func, show_progress=show_progress)

    def save_training_state(self, epoch, train_data=None, batch=0, loader_state=None, finished=False):
        """Write the training state for going on at ``batch`` of ``epoch`` (see the module docstring); within an
        epoch, ``loader_state`` is the loader's generator at the epoch's start. ``finished``: training has ended
        (``epoch`` epochs were trained)."""
        if not self._is_writer():
            return
        if loader_state is None and train_data is not None:
            loader_state = train_data.generator.get_state()
        state = {
            "model": self.config["model"],
            "dataset": self.config["dataset"],
            "epoch": epoch,
            "batch": batch,
            "finished": finished,
            "cur_step": self.cur_step,
            "best_valid_score": float(self.best_valid_score),
            "best_valid_result": None
            if self.best_valid_result is None
            else {key: float(value) for key, value in self.best_valid_result.items()},
            "best_epoch": self.best_epoch,
            "state_dict": self.model.state_dict(),
            "other_parameter": self.model.other_parameter(),
            "optimizer": self.optimizer.state_dict(),
            "random_states": random_states(),
            "loader_generator": loader_state,
            "config": plain_config(self.config),
        }
        path = training_state_file(self.saved_model_file)
        atomic_torch_save(state, path)
        if epoch == self.start_epoch and batch == 0 and not finished:
            self.logger.info(set_color("Training state", "blue") + f": {path} (resume with --resume_checkpoint=<it>)")

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self._is_writer():
            return
        model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        atomic_torch_save(model_checkpoint(self, epoch), model_file)
        self.best_epoch = epoch
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {model_file}")

    def resume_checkpoint(self, resume_file):
        """Continue a run exactly where its training state was written (``resume_file``: the model checkpoint
        ``saved/<model>-<time>.pth`` or its ``.training_state.pth``): trained weights, optimizer, epoch,
        early-stopping counter, best score and result, random states. Later best checkpoints overwrite the same
        model checkpoint."""
        model_file = model_file_of(resume_file)
        state_file = training_state_file(model_file)
        if not os.path.exists(state_file):
            raise FileNotFoundError(
                f"Cannot resume from {resume_file}: its training state {state_file} is missing (it is written at the "
                "start of every epoch by the plugin's trainer)."
            )
        state = safe_load(state_file, "resume_checkpoint")
        if str(state.get("model", "")).lower() != str(self.config["model"]).lower():
            raise ValueError(
                f"{state_file} holds a {state.get('model')} run, not a {self.config['model']}: cannot resume."
            )
        if state.get("dataset") != self.config["dataset"]:
            raise ValueError(
                f"{state_file} was trained on dataset {state.get('dataset')!r}, not {self.config['dataset']!r}: "
                "cannot resume."
            )
        if os.path.exists(model_file) and os.path.getsize(model_file) > 0:  # empty: claimed, never saved to
            best_epoch = safe_load(model_file, "resume_checkpoint")["epoch"]
            if not (state["best_epoch"] or 0) <= best_epoch <= state["epoch"]:
                raise ValueError(
                    f"{state_file} starts epoch {state['epoch']} with its best model at epoch {state['best_epoch']}, "
                    f"but {model_file} belongs to epoch {best_epoch}: they are not from the same run."
                )
        elif state["best_epoch"] is not None:
            raise FileNotFoundError(f"Cannot resume: {state_file} needs its best model checkpoint {model_file}.")
        self.saved_model_file = model_file
        self.start_epoch = state["epoch"]
        self.cur_step = state["cur_step"]
        self.best_valid_score = state["best_valid_score"]
        self.best_valid_result = None if state["best_valid_result"] is None else OrderedDict(state["best_valid_result"])
        self.best_epoch = state["best_epoch"]
        self.model.load_state_dict(state["state_dict"])
        self.model.load_other_parameter(state.get("other_parameter"))
        self.optimizer.load_state_dict(state["optimizer"])
        set_random_states(state["random_states"])
        self._resumed_loader_state = state["loader_generator"]
        self._resumed_batches = int(state.get("batch") or 0)
        self._resumed_random_states = state["random_states"] if self._resumed_batches else None
        if state.get("finished"):
            self._training_finished = True
            self.epochs_trained = state["epoch"]
            self.logger.info(
                f"Training state loaded from {state_file}: training had finished ({state['epoch']} epochs)"
            )
            return
        within = f", batch {self._resumed_batches}" if self._resumed_batches else ""
        self.logger.info(
            f"Training state loaded from {state_file}. Resume training from epoch {self.start_epoch}{within}"
        )


class _ResumableBatches:
    """The training loader of one epoch as the trainer's loop sees it: the first ``skip`` batches (trained before a
    kill) are drawn and dropped, then the random states saved after them are restored; every
    ``training_state_every_batches`` batches, the training state is written before the next batch is trained.
    Everything else (length, sampler, shuffle) is the loader's."""

    def __init__(self, trainer, loader, epoch, skip):
        self._trainer, self._loader, self._epoch, self._skip = trainer, loader, epoch, skip
        self._loader_state = loader.generator.get_state()  # the epoch's order (set by the caller for this epoch)

    def __len__(self):
        return len(self._loader)

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __iter__(self):
        trainer, every = self._trainer, self._trainer.state_every_batches
        for index, batch in enumerate(self._loader):
            if index < self._skip:
                continue
            if index == self._skip and trainer._resumed_random_states is not None:
                set_random_states(trainer._resumed_random_states)  # as they were after the skipped batches
                trainer._resumed_random_states = None
            elif every and index % every == 0 and index and trainer._saving:
                random_after_fetch = random_states()  # the state a resumed run restores after drawing this batch
                trainer.save_training_state(self._epoch, batch=index, loader_state=self._loader_state)
                set_random_states(random_after_fetch)
            trainer.schedule_learning_rate(self._epoch, index, len(self._loader))
            yield batch
            if isinstance(trainer.model, LLMSequentialRecommender):  # the batch's backward and step have run
                trainer.model.record_proximal_step()
