"""A gated mixture of LoRA experts on top of an ordinary peft LoRA (iLoRA, Kong et al., NeurIPS 2024, Sec. 3).

One LoRA of rank ``r = K * r_e`` is split along its rank channels into ``K`` experts of rank ``r_e``
(channels ``[k * r_e, (k + 1) * r_e)`` form expert ``k``). For a sequence with gate weights ``g`` (``[K]``)::

    delta(x) = scaling * sum_k g_k * B_k A_k x  =  scaling * B (expand(g) * (A x))

so the gate is applied by scaling the output of every ``lora_A`` block-wise, before ``lora_B``. peft builds,
freezes and dispatches the LoRA layers (dense and bitsandbytes 4-bit bases alike); this module only adds a
forward hook on each ``lora_A`` and delivers one gate vector per sequence, shared by every layer and token, through
a scoped context manager. The cost is one plain rank-``r`` LoRA plus one element-wise product per layer.

A LoRA layer called outside :meth:`MoELoRA.gate` raises: it never reuses a stale gate. A per-sequence gate cannot
be folded into the base weights, so merging raises too.
"""

import contextlib
import functools

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

ADAPTER_NAME = "default"


def _refuse_merge(layer_name, *args, **kwargs):
    raise RuntimeError(
        f"Cannot merge the gated LoRA of '{layer_name}' into its base weights: the experts are mixed per sequence "
        "by the gate, so there is no single weight delta to merge."
    )


class MoELoRA(torch.nn.Module):
    """A causal LM with a gated mixture-of-experts LoRA adapter.

    Args:
        model: the frozen base model (dense or bitsandbytes 4-bit).
        num_experts: ``K``.
        expert_rank: ``r_e``; the peft LoRA has rank ``K * r_e``.
        alpha: LoRA alpha; ``scaling = alpha / (K * r_e)``, as for a plain LoRA of the same rank.
        dropout: LoRA dropout on the adapter input.
        target_modules: module names to adapt (peft's ``target_modules``).
    """

    def __init__(self, model, num_experts, expert_rank, alpha, dropout, target_modules):
        super().__init__()
        self.num_experts = num_experts
        self.expert_rank = expert_rank
        lora_config = LoraConfig(
            r=num_experts * expert_rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=list(target_modules),
            bias="none",
        )
        self.peft_model = get_peft_model(model, lora_config, adapter_name=ADAPTER_NAME)
        self._channel_gate = None  # [B, r] while inside gate(), else None
        self.lora_layers = {}
        for name, module in self.peft_model.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER_NAME not in module.lora_A:
                raise ValueError(
                    f"'lora_target_modules': peft adapts '{name}' ({type(module).__name__}) without a lora_A, so the "
                    "gate could not reach it and it would run ungated; target linear layers only (e.g. q_proj, v_proj)."
                )
            if isinstance(module, LoraLayer):
                if module.lora_variant.get(ADAPTER_NAME) is not None:
                    raise ValueError(f"Gated LoRA supports plain LoRA only; '{name}' uses a LoRA variant (e.g. DoRA).")
                module.lora_A[ADAPTER_NAME].register_forward_hook(self._scale_rank_channels)
                module.merge = functools.partial(_refuse_merge, name)
                self.lora_layers[name] = module
        if not self.lora_layers:
            raise ValueError(f"'lora_target_modules' = {list(target_modules)} matched no module of the backbone.")

    def adapter_pairs(self):
        """``{module name: (A, B)}``: every adapted module's LoRA matrices (all experts' rank channels)."""
        return {
            name: (module.lora_A[ADAPTER_NAME].weight, module.lora_B[ADAPTER_NAME].weight)
            for name, module in self.lora_layers.items()
        }

    @property
    def rank(self):
        return self.num_experts * self.expert_rank

    @contextlib.contextmanager
    def gate(self, gate_weights):
        """Route every LoRA layer with ``gate_weights`` inside the block: ``[B, K]`` (one row per sequence, for
        every token) or ``[B, T, K]`` (one row per token; the layers' inputs must then have ``T`` tokens)."""
        if gate_weights.dim() not in (2, 3) or gate_weights.shape[-1] != self.num_experts:
            raise ValueError(
                f"gate_weights must be [batch, {self.num_experts}] or [batch, tokens, {self.num_experts}], got "
                f"{list(gate_weights.shape)}"
            )
        if self._channel_gate is not None:
            raise RuntimeError("MoELoRA.gate() blocks cannot be nested.")
        self._channel_gate = gate_weights.repeat_interleave(self.expert_rank, dim=-1)  # [B, r] or [B, T, r]
        try:
            yield self
        finally:
            self._channel_gate = None

    def _scale_rank_channels(self, module, inputs, output):
        gate = self._channel_gate
        if gate is None:
            raise RuntimeError(
                "A gated LoRA layer was called without a gate: run the model inside `with moe_lora.gate(weights):`."
            )
        if gate.shape[0] != output.shape[0]:
            raise RuntimeError(f"The gate holds {gate.shape[0]} sequences but the batch has {output.shape[0]}.")
        if gate.dim() == 3:  # one gate per token
            if output.dim() != 3 or output.shape[1] != gate.shape[1]:
                raise RuntimeError(
                    f"The gate holds {gate.shape[1]} tokens per sequence but the layer's input has "
                    f"{list(output.shape[1:-1])}."
                )
            return output * gate.to(output.dtype)  # [B, T, r]
        gate = gate.view(gate.shape[0], *([1] * (output.dim() - 2)), gate.shape[1])  # [B, 1.., r]
        return output * gate.to(output.dtype)

    def forward(self, *args, **kwargs):
        return self.peft_model(*args, **kwargs)

    def decoder(self):
        """The base model's decoder stack (hidden states without the LM head), LoRA layers included."""
        return self.peft_model.get_base_model().get_decoder()

    def enable_activation_checkpointing(self):
        """Recompute every decoder layer's activations in the backward pass instead of keeping them (less memory,
        about one more forward of compute). Non-reentrant checkpointing keeps the autograd graph of the forward, so
        gradients still reach the gate, which is no input of the layers; each layer's replay runs with the gate
        of its forward pass, restored for the duration of the replay (the gate block has ended by then)."""
        from torch.utils.checkpoint import checkpoint
        from transformers.modeling_layers import GradientCheckpointingLayer

        base = self.peft_model.get_base_model()
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

        def gated_checkpoint(function, *args, **kwargs):
            gate = self._channel_gate

            def replay(*inner_args, **inner_kwargs):
                if self._channel_gate is gate:  # the forward pass itself, inside its gate block
                    return function(*inner_args, **inner_kwargs)
                previous, self._channel_gate = self._channel_gate, gate
                try:
                    return function(*inner_args, **inner_kwargs)
                finally:
                    self._channel_gate = previous

            return checkpoint(replay, *args, use_reentrant=False, **kwargs)

        layers = [module for module in base.modules() if isinstance(module, GradientCheckpointingLayer)]
        if not layers:
            raise ValueError(f"{type(base).__name__} has no layers that support activation checkpointing.")
        for layer in layers:
            layer._gradient_checkpointing_func = gated_checkpoint

    def causal_lm(self):
        """The base causal LM (LoRA layers included), for generation."""
        return self.peft_model.get_base_model()

    def lm_head(self):
        return self.peft_model.get_base_model().get_output_embeddings()

    def input_embeddings(self):
        return self.peft_model.get_input_embeddings()
