"""iLoRA: instance-wise LoRA for sequential recommendation (Kong et al., NeurIPS 2024).

A frozen causal LLM reads the user's history as a prompt of item titles, each followed by a slot holding the
item's SASRec embedding mapped by a trainable projector. Its adapter is a gated mixture of LoRA experts
(``gated_lora.MoELoRA``): one LoRA of rank ``lora_num_experts * lora_expert_rank`` whose rank channels form the
experts, mixed per user by a gate network on the user's SASRec sequence representation (softmax over experts, one
vector per sequence for every layer and token). The LLM's last hidden state, mapped to SASRec's item space by a
trainable head, scores every item; training minimises cross-entropy over all items.

Ablations (``gate_input``): ``sasrec`` (the paper's gate), ``uniform`` (every expert weighted 1/K for every user)
and ``prompt_mean`` (the gate reads the mean of the LLM's prompt input embeddings instead of SASRec).
"""

import torch
from torch import nn

from recbole_ilora.model.abstract_llm_recommender import LLMSequentialRecommender
from recbole_ilora.model.gated_lora import MoELoRA
from recbole_ilora.validation import require_float, require_int, require_positive, require_str_list

GATE_INPUTS = ("sasrec", "uniform", "prompt_mean")


class iLoRA(LLMSequentialRecommender):
    gate_inputs = GATE_INPUTS  # the values of 'gate_input' this model accepts

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        if config["gate_input"] not in cls.gate_inputs:
            raise ValueError(f"Make sure 'gate_input' in {list(cls.gate_inputs)}, got {config['gate_input']!r}.")
        require_int(config, "lora_num_experts", 1)
        require_int(config, "lora_expert_rank", 1)
        require_positive(config, "lora_alpha")
        require_float(config, "lora_dropout", 0.0, 1.0)
        require_str_list(config, "lora_target_modules")

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.num_experts = config["lora_num_experts"]
        self.gate_input = config["gate_input"]
        self.gate_network = self.build_gate()  # None for a constant gate

    def build_llm(self, backbone, config):
        return MoELoRA(
            backbone,
            num_experts=config["lora_num_experts"],
            expert_rank=config["lora_expert_rank"],
            alpha=config["lora_alpha"],
            dropout=config["lora_dropout"],
            target_modules=config["lora_target_modules"],
        )

    def build_gate(self):
        """The gate network: its input feature -> expert logits."""
        if self.gate_input == "uniform":
            return None
        in_features = self.item_size if self.gate_input == "sasrec" else self.llm_size
        return nn.Linear(in_features, self.num_experts)

    def gate_weights(self, seq_repr, inputs_embeds, attention_mask):
        """Weights over the experts, ``[B, K]``, one row per sequence."""
        if self.gate_network is None:  # uniform
            return seq_repr.new_full((seq_repr.shape[0], self.num_experts), 1.0 / self.num_experts)
        if self.gate_input == "sasrec":
            features = seq_repr  # [B, d]
        else:  # prompt_mean: masked mean of the prompt's input embeddings, [B, H]
            mask = attention_mask.unsqueeze(-1).to(inputs_embeds.dtype)  # [B, T, 1]
            features = ((inputs_embeds * mask).sum(1) / mask.sum(1)).float()
        return torch.softmax(self.gate_network(features), dim=-1)

    def adapter_inputs(self, item_seq, item_seq_len, prompt):
        """The prompt's input embeddings and every sequence's gate, ``([B, T, H], [B, K])``."""
        seq_repr = self.sequence_representation(item_seq, item_seq_len)  # [B, d]
        inputs_embeds = self.prompt_embeddings(prompt, self.llm.input_embeddings())  # [B, T, H]
        return inputs_embeds, self.gate_weights(seq_repr, inputs_embeds, prompt.attention_mask)

    def adapter(self, gate):
        return self.llm.gate(gate)

    def expand_adapter_state(self, gate, repeats):
        return gate.repeat_interleave(repeats, dim=0)

    def _encode_prompt(self, item_seq, item_seq_len):
        prompt = self.prompt_builder(item_seq, item_seq_len)
        inputs_embeds, gate = self.adapter_inputs(item_seq, item_seq_len, prompt)
        return prompt, inputs_embeds, gate

    def routing(self, item_seq, item_seq_len):
        """The expert weights each history is routed with, ``[B, K]`` (no LLM forward)."""
        return self._encode_prompt(item_seq, item_seq_len)[2]

    def forward(self, item_seq, item_seq_len):
        prompt, inputs_embeds, gate = self._encode_prompt(item_seq, item_seq_len)
        with self.llm.gate(gate):
            hidden = self.last_hidden_state(self.llm.decoder(), prompt, inputs_embeds)  # [B, H]
        return self.score_head(hidden)  # [B, d]
