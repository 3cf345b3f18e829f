"""iLoRA: instance-wise LoRA for sequential recommendation (Kong et al., NeurIPS 2024).

A frozen causal LLM reads the user's history as a prompt of item titles, each followed by a slot holding the
item's SASRec embedding mapped by a trainable projector. Its adapter is a gated mixture of LoRA experts
(``gated_lora.MoELoRA``): one LoRA of rank ``lora_num_experts * lora_expert_rank`` whose rank channels form the
experts, mixed per user by a gate network on the user's SASRec sequence representation (softmax over experts, one
vector per sequence for every layer and token). The LLM's last hidden state, mapped to SASRec's item space by a
trainable head, scores every item; training minimises cross-entropy over all items.
"""

import torch
from torch import nn

from recbole_ilora.model.abstract_llm_recommender import LLMSequentialRecommender
from recbole_ilora.model.gated_lora import MoELoRA


class iLoRA(LLMSequentialRecommender):
    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.num_experts = config["lora_num_experts"]
        # Gate: SASRec sequence representation -> expert logits.
        self.gate_network = nn.Linear(self.item_size, self.num_experts)

    def build_llm(self, backbone, config):
        return MoELoRA(
            backbone,
            num_experts=config["lora_num_experts"],
            expert_rank=config["lora_expert_rank"],
            alpha=config["lora_alpha"],
            dropout=config["lora_dropout"],
            target_modules=config["lora_target_modules"],
        )

    def gate_weights(self, seq_repr):
        """Softmax weights over the experts, ``[B, K]``, from the SASRec representation ``[B, d]``."""
        return torch.softmax(self.gate_network(seq_repr), dim=-1)

    def forward(self, item_seq, item_seq_len):
        seq_repr = self.sequence_representation(item_seq, item_seq_len)  # [B, d]
        prompt = self.prompt_builder(item_seq, item_seq_len)
        inputs_embeds = self.prompt_embeddings(prompt, self.llm.input_embeddings())  # [B, T, H]
        with self.llm.gate(self.gate_weights(seq_repr)):
            hidden = self.last_hidden_state(self.llm.decoder(), prompt, inputs_embeds)  # [B, H]
        return self.score_head(hidden)  # [B, d]
