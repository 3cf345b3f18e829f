"""The proximal terms of continual training (PESO: Yoo et al., ICLR 2026), with the model they anchor: a frozen
snapshot of a LoRA adapter's ``(A, B)`` matrices and the penalties that pull the adapter back to it. PESO's
softmax-KL is the mean over adapted modules of ``KL(softmax(vec A) || softmax(vec A_prev)) + KL(softmax(vec B) ||
softmax(vec B_prev))``; L2 is the squared distance ``||theta - theta_prev||^2`` summed over the same matrices. Only the
adapter is anchored (for iLoRA: all experts' rank channels); a gate, projector or head is not. The KL uses
log-softmax instead of the official code's epsilon-and-renormalise (``hsyoo32/peso``), which computes the same
divergence without its bias near zero probabilities. The time blocks and the continual runner are
``recbole_ilora.continual`` and ``recbole_ilora.continual_runner``.
"""

import torch
import torch.nn.functional as F

PENALTIES = ("none", "l2", "softmax_kl")


class AdapterAnchor:
    """A frozen snapshot of a LoRA adapter (``{module name: (A, B)}``) and the proximal terms toward it."""

    def __init__(self, pairs):
        self.snapshot = {name: (a.detach().clone(), b.detach().clone()) for name, (a, b) in pairs.items()}

    def _matched(self, pairs):
        if set(pairs) != set(self.snapshot):
            raise ValueError("the adapter's modules differ from the snapshot's")
        return [(pairs[name], self.snapshot[name]) for name in sorted(pairs)]

    @staticmethod
    def softmax_kl_of(current, previous, dtype=torch.float32):
        """KL(softmax(vec current) || softmax(vec previous)), a scalar, computed in ``dtype``."""
        log_p = F.log_softmax(current.flatten().to(dtype), 0)
        log_q = F.log_softmax(previous.flatten().to(dtype), 0)
        return (log_p.exp() * (log_p - log_q)).sum()

    def softmax_kl(self, pairs, dtype=torch.float32):
        """PESO's term: the mean over modules of KL(A) + KL(B)."""
        terms = [
            self.softmax_kl_of(a, a0, dtype) + self.softmax_kl_of(b, b0, dtype)
            for (a, b), (a0, b0) in self._matched(pairs)
        ]
        return torch.stack(terms).mean()

    def l2(self, pairs, dtype=torch.float32):
        """The squared distance to the snapshot, summed over every matrix."""
        terms = [
            ((a.to(dtype) - a0.to(dtype)) ** 2).sum() + ((b.to(dtype) - b0.to(dtype)) ** 2).sum()
            for (a, b), (a0, b0) in self._matched(pairs)
        ]
        return torch.stack(terms).sum()

    def penalty(self, kind, pairs, dtype=torch.float32):
        """The term toward the snapshot (``dtype``: float32 for training; float64 for the logged value: PESO's term
        is a sum of differences near 1e-7 whose float32 rounding can make it negative)."""
        if kind == "softmax_kl":
            return self.softmax_kl(pairs, dtype)
        if kind == "l2":
            return self.l2(pairs, dtype)
        raise ValueError(f"'continual_penalty' must be one of {list(PENALTIES)}, got {kind!r}")
