"""UniformLoRA: iLoRA minus the gate, the uniform-LoRA baseline of Kong et al. (NeurIPS 2024).

Everything is iLoRA's (backbone, prompt, projector, scoring head, training, keys) except that every user gets the
same adapter: the gate is a constant vector of ones, so ``delta(x) = scaling * sum_k B_k A_k x = scaling * B A x``,
exactly one plain LoRA of the same total rank ``lora_num_experts * lora_expert_rank`` and the same scaling. It has
no gate parameters. (iLoRA's ``gate_input: uniform`` ablation instead weights each expert 1/K.)
"""

from recbole_ilora.model.ilora import iLoRA


class UniformLoRA(iLoRA):
    gate_inputs = ("none",)

    def build_gate(self):
        return None

    def gate_weights(self, seq_repr, inputs_embeds, attention_mask):
        return seq_repr.new_ones(seq_repr.shape[0], self.num_experts)  # [B, K]: every expert, full weight
