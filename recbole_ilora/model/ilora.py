"""iLoRA: instance-wise LoRA for sequential recommendation (Kong et al., NeurIPS 2024).

A frozen causal LLM reads the user's history as a prompt of item titles, each followed by a slot holding the
item's SASRec embedding mapped by a trainable projector. Its adapter is a gated mixture of LoRA experts
(``gated_lora.MoELoRA``): one LoRA of rank ``lora_num_experts * lora_expert_rank`` whose rank channels form the
experts, mixed per user by a gate network on the user's SASRec sequence representation (softmax over experts, one
vector per sequence for every layer and token). The LLM's last hidden state, mapped to SASRec's item space by a
trainable head, scores every item; training minimises cross-entropy over all items.

Learning from every position (the head objective's default, ``llm_loss_positions: all``): the causal LLM reads the
user's history once and the representation is read at every item's slot, so one forward trains a prediction of the
next item after each history item, as SASRec trains; the reading after the last item is the one scored at test time.
So that no position sees its future, the gate is position-wise (``gate_scope: position``, the default): every token
is routed by SASRec's causal representation of the history up to the item it belongs to (the prompt's opening words
by the first item's). ``gate_scope: sequence`` is the paper's gate, one vector per sequence from the whole history
(SASRec's last position): with a loss at every position it would show each earlier position the items after it, so
it trains on the last position only. The text of ``prompt_template`` after the history is not fed to the head
objective: the representation is read at the last slot, and nothing after it can change that reading.

Ablations (``gate_input``): ``sasrec`` (the paper's gate), ``uniform`` (every expert weighted 1/K for every user)
and ``prompt_mean`` (the gate reads the mean of the LLM's prompt input embeddings instead of SASRec).
"""

import torch
from torch import nn

from recbole_ilora.model.abstract_llm_recommender import LLMSequentialRecommender
from recbole_ilora.model.gated_lora import MoELoRA
from recbole_ilora.model.prompt import parse_template
from recbole_ilora.model.sequence_encoder import sasrec_every_position
from recbole_ilora.validation import require_choice, require_float, require_int, require_positive, require_str_list

GATE_INPUTS = ("sasrec", "uniform", "prompt_mean")
GATE_SCOPES = ("position", "sequence")
LOSS_POSITIONS = ("all", "last")
SCORE_HEADS = ("residual", "plain")


class iLoRA(LLMSequentialRecommender):
    gate_inputs = GATE_INPUTS  # the values of 'gate_input' this model accepts
    has_gate = True

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
        require_choice(config, "gate_scope", GATE_SCOPES)
        require_choice(config, "llm_loss_positions", LOSS_POSITIONS)
        require_choice(config, "score_head", SCORE_HEADS)
        generative = (config["objective"] or "head") == "generative"
        if not generative and config["gate_scope"] == "sequence" and config["llm_loss_positions"] == "all":
            raise ValueError(
                "'gate_scope' = 'sequence' routes every token by the whole history, so a loss at every position "
                "('llm_loss_positions' = 'all') would show each position the items after it: set "
                "llm_loss_positions=last with it, or gate_scope=position."
            )

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.num_experts = config["lora_num_experts"]
        self.gate_input = config["gate_input"]
        self.gate_scope = config["gate_scope"]
        self.gate_network = self.build_gate()  # None for a constant gate

    def head_prompt_template(self, config):
        """``prompt_template`` up to its history: the head objective reads after the last item's slot."""
        prefix = parse_template(config["prompt_template"], strip=False)[0][0]  # checks the placeholder is there once
        return prefix + "{history}"

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

    def position_gate(self, positions, prompt, inputs_embeds, item_seq_len):
        """``[B, T, K]``: every prompt token's gate, from the history up to the item it belongs to (its title's and
        slot's tokens, and the separator before them; the prompt's opening words belong to the first item)."""
        if self.gate_network is None:  # a constant gate: the same for every token, [B, K]
            return self.gate_weights(positions[:, 0], inputs_embeds, prompt.attention_mask)
        if self.gate_input == "sasrec":
            slots_before = prompt.slot_mask.long().cumsum(1) - prompt.slot_mask.long()  # [B, T]: slots strictly before
            item_index = torch.minimum(slots_before, (item_seq_len - 1).unsqueeze(1))  # [B, T]
            features = positions.gather(1, item_index.unsqueeze(-1).expand(-1, -1, positions.shape[-1]))  # [B, T, d]
        else:  # prompt_mean: running mean of the prompt's input embeddings up to each token, [B, T, H]
            mask = prompt.attention_mask.unsqueeze(-1).to(inputs_embeds.dtype)  # [B, T, 1]
            features = ((inputs_embeds * mask).cumsum(1) / mask.cumsum(1).clamp(min=1)).float()
        return torch.softmax(self.gate_network(features), dim=-1)  # [B, T, K]

    def position_representations(self, item_seq, item_seq_len):
        """``[B, L, d]``: the user read at every history item's slot (``read_out`` of the LLM's state there)."""
        prompt = self.prompt_builder(item_seq, item_seq_len)
        with torch.no_grad():
            positions = sasrec_every_position(self.sasrec, item_seq, item_seq_len)  # [B, L, d]
        inputs_embeds = self.prompt_embeddings(prompt, self.llm.input_embeddings())  # [B, T, H]
        if self.gate_scope == "position":
            gate = self.position_gate(positions, prompt, inputs_embeds, item_seq_len)  # [B, T, K]
        else:  # the paper's: one gate per sequence, from SASRec's last position
            last = positions[torch.arange(item_seq.shape[0], device=item_seq.device), item_seq_len - 1]  # [B, d]
            gate = self.gate_weights(last, inputs_embeds, prompt.attention_mask)  # [B, K]
        with self.llm.gate(gate):
            hidden = self.llm.decoder()(
                inputs_embeds=inputs_embeds,
                attention_mask=prompt.attention_mask,
                position_ids=prompt.position_ids,
                use_cache=False,
            ).last_hidden_state  # [B, T, H]
        valid = torch.arange(item_seq.shape[1], device=item_seq.device).unsqueeze(0) < item_seq_len.unsqueeze(1)
        slot_hidden = hidden.new_zeros(*item_seq.shape, hidden.shape[-1])  # [B, L, H]
        slot_hidden[valid] = hidden[prompt.slot_mask]  # both in row-major order: row b's items 0 .. len - 1
        return self.read_out(slot_hidden, positions)  # [B, L, d]

    def forward(self, item_seq, item_seq_len):
        user_repr = self.position_representations(item_seq, item_seq_len)  # [B, L, d]
        return user_repr[torch.arange(item_seq.shape[0], device=item_seq.device), item_seq_len - 1]  # [B, d]
