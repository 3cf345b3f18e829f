"""Trainers for the plugin's models: RecBole's ``Trainer`` with the optimizer over trained parameters only, and
checkpoints split in two.

- ``saved/<model>-<time>.pth``, the model checkpoint: the trained parameters (adapter, gate, projector, head), the
  plain-dict configuration that rebuilds the frozen parts, epoch and best score. This is the file to share, to
  test and to reload (``load_data_and_model``); it is barely larger than the trained parameters.
- ``saved/<model>-<time>.training_state.pth``: what only resuming needs (the optimizer's state, e.g. Adam's two
  moments, twice the trained parameters' size), read by ``resume_checkpoint``.

Both are written atomically and load with ``torch.load(weights_only=True)``.
"""

import os

import torch
from recbole.trainer import Trainer
from recbole.utils import set_color

from recbole_ilora._compat import atomic_torch_save, model_checkpoint


def training_state_file(model_file):
    """The training-state companion of a model checkpoint: ``x.pth`` -> ``x.training_state.pth``."""
    root, extension = os.path.splitext(str(model_file))
    return root + ".training_state" + (extension or ".pth")


class LLMRecTrainer(Trainer):
    """RecBole's Trainer; the optimizer holds only parameters that require gradients (adapter, gate, projector,
    head), never the frozen (possibly 4-bit) backbone, so its state and checkpoints stay small."""

    def _build_optimizer(self, **kwargs):
        kwargs.setdefault("params", [p for p in self.model.parameters() if p.requires_grad])
        return super()._build_optimizer(**kwargs)

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        atomic_torch_save({"epoch": epoch, "optimizer": self.optimizer.state_dict()}, training_state_file(model_file))
        atomic_torch_save(model_checkpoint(self, epoch), model_file)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {model_file} (+ training state)")

    def resume_checkpoint(self, resume_file):
        """RecBole's resume: weights, epoch, step and best score from the model checkpoint, the optimizer's state
        from its training-state companion (which must belong to the same epoch)."""
        resume_file = str(resume_file)
        state_file = training_state_file(resume_file)
        if not os.path.exists(state_file):
            raise FileNotFoundError(
                f"Cannot resume from {resume_file}: its training state {state_file} (the optimizer's state) is missing."
            )
        checkpoint = torch.load(resume_file, map_location=self.device, weights_only=True)
        state = torch.load(state_file, map_location=self.device, weights_only=True)
        if state["epoch"] != checkpoint["epoch"]:
            raise ValueError(
                f"{state_file} belongs to epoch {state['epoch']} but {resume_file} to epoch {checkpoint['epoch']}."
            )
        if checkpoint["config"]["model"].lower() != self.config["model"].lower():
            raise ValueError(
                f"{resume_file} holds a {checkpoint['config']['model']}, not a {self.config['model']}: cannot resume."
            )
        self.saved_model_file = resume_file
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint.get("other_parameter"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")
