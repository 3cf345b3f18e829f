"""Trainers for the plugin's models: RecBole's ``Trainer`` with the optimizer over trained parameters only."""

from recbole.trainer import Trainer


class LLMRecTrainer(Trainer):
    """RecBole's Trainer; the optimizer holds only parameters that require gradients (adapter, gate, projector,
    head), never the frozen (possibly 4-bit) backbone, so its state and checkpoints stay small."""

    def _build_optimizer(self, **kwargs):
        kwargs.setdefault("params", [p for p in self.model.parameters() if p.requires_grad])
        return super()._build_optimizer(**kwargs)
