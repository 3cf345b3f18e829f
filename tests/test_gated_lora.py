"""The maths of the gated mixture of LoRA experts, on a tiny LLaMA with dense and 4-bit NF4 bases."""

import pytest
import torch

from recbole_ilora.model.backbone import build_embedded_llm, load_causal_lm
from recbole_ilora.model.gated_lora import ADAPTER_NAME, MoELoRA

K, RANK_PER_EXPERT, ALPHA = 4, 2, 8
TARGETS = ["q_proj", "v_proj", "down_proj"]
LLM = {
    "llm_hidden_size": 64,
    "llm_num_layers": 2,
    "llm_num_heads": 2,
    "llm_intermediate_size": 128,
    "llm_vocab_size": 300,
    "llm_init_seed": 7,
    "llm_compute_dtype": "float32",
    "llm_trust_remote_code": False,
    "llm_4bit_quant_type": "nf4",
    "llm_4bit_double_quant": True,
    "checkpoint_dir": "saved",
}
CORPUS = ["Toy Story", "GoldenEye", "Four Rooms", "Get Shorty", "Copycat", "the next item is"] * 3


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return build_embedded_llm({**LLM, "llm_cache_dir": str(tmp_path_factory.mktemp("llm"))}, CORPUS)


def load(llm_dir, four_bit):
    model, _ = load_causal_lm(llm_dir, {**LLM, "llm_load_in_4bit": four_bit}, "cpu")
    return model.eval()


def inputs(batch=3, length=7):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(4, 30, (batch, length), generator=generator)  # within the small vocabulary


def random_gate(batch=3):
    return torch.softmax(torch.randn(batch, K, generator=torch.Generator().manual_seed(1)), dim=-1)


def randomise_lora_b(moe):
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in moe.lora_layers.values():
            weight = layer.lora_B[ADAPTER_NAME].weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)


def wrap(model):
    return MoELoRA(model, K, RANK_PER_EXPERT, ALPHA, 0.0, TARGETS).eval()


@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "nf4"])
def test_zero_lora_b_reproduces_the_base_model_exactly(llm_dir, four_bit):
    model = load(llm_dir, four_bit)
    ids = inputs()
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
        moe = wrap(model)
        with moe.gate(random_gate()):
            adapted_logits = moe(input_ids=ids).logits
    assert torch.equal(base_logits, adapted_logits)


@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "nf4"])
def test_layer_output_is_the_explicit_gated_sum_over_experts(llm_dir, four_bit):
    moe = wrap(load(llm_dir, four_bit))
    randomise_lora_b(moe)
    name, layer = next((n, m) for n, m in moe.lora_layers.items() if n.endswith("layers.0.self_attn.q_proj"))
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(3))
    gate = random_gate()
    lora_a, lora_b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight  # [r, in], [out, r]
    scaling = layer.scaling[ADAPTER_NAME]
    assert scaling == ALPHA / (K * RANK_PER_EXPERT)
    with torch.no_grad():
        expected = layer.get_base_layer()(x)
        for k in range(K):
            block = slice(k * RANK_PER_EXPERT, (k + 1) * RANK_PER_EXPERT)
            expert = x @ lora_a[block].t() @ lora_b[:, block].t()  # B_k A_k x, [3, 5, out]
            expected = expected + scaling * gate[:, k].view(-1, 1, 1) * expert
        with moe.gate(gate):
            actual = layer(x)
    assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-5)


def test_one_hot_gate_equals_that_single_expert(llm_dir):
    ids = inputs()
    moe = wrap(load(llm_dir, False))
    randomise_lora_b(moe)
    expert = 2
    one_hot = torch.zeros(3, K)
    one_hot[:, expert] = 1.0
    with torch.no_grad(), moe.gate(one_hot):
        gated = moe(input_ids=ids).logits
    # The same model with every other expert's channels removed, run with an all-ones gate.
    keep = torch.zeros(K * RANK_PER_EXPERT)
    keep[expert * RANK_PER_EXPERT : (expert + 1) * RANK_PER_EXPERT] = 1.0
    with torch.no_grad():
        for layer in moe.lora_layers.values():
            layer.lora_A[ADAPTER_NAME].weight.mul_(keep.unsqueeze(1))
        with moe.gate(torch.ones(3, K)):
            single = moe(input_ids=ids).logits
    assert torch.allclose(gated, single, atol=1e-6, rtol=1e-6)
    with torch.no_grad(), moe.gate(torch.roll(one_hot, 1, dims=1)):
        other = moe(input_ids=ids).logits
    assert not torch.allclose(gated, other, atol=1e-4)  # experts differ, so the gate matters


def test_each_sequence_gets_its_own_gate(llm_dir):
    ids = inputs(batch=2)
    ids[1] = ids[0]
    moe = wrap(load(llm_dir, True))
    randomise_lora_b(moe)
    gate = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    with torch.no_grad(), moe.gate(gate):
        logits = moe(input_ids=ids).logits
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)
    with torch.no_grad(), moe.gate(gate[:1]):
        alone = moe(input_ids=ids[:1]).logits
    assert torch.allclose(logits[0], alone[0], atol=1e-5)


def test_only_lora_parameters_train_and_the_cost_is_one_lora(llm_dir):
    moe = wrap(load(llm_dir, True))
    trainable = {name: p for name, p in moe.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert len(moe.lora_layers) == len(TARGETS) * LLM["llm_num_layers"]
    assert len(trainable) == 2 * len(moe.lora_layers)
    expected = sum(K * RANK_PER_EXPERT * (layer.in_features + layer.out_features) for layer in moe.lora_layers.values())
    assert sum(p.numel() for p in trainable.values()) == expected


def test_missing_gate_raises_and_gate_is_cleared_after_the_block(llm_dir):
    moe = wrap(load(llm_dir, False))
    ids = inputs()
    with pytest.raises(RuntimeError, match="without a gate"):
        moe(input_ids=ids)
    with pytest.raises(RuntimeError, match="boom"), moe.gate(random_gate()):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="without a gate"):
        moe(input_ids=ids)  # no stale gate survives an exception


def test_bad_gates_and_merging_are_refused(llm_dir):
    moe = wrap(load(llm_dir, False))
    with pytest.raises(ValueError, match="gate_weights must be"):
        with moe.gate(torch.ones(3, K + 1)):
            pass
    with pytest.raises(RuntimeError, match="holds 2 sequences"), moe.gate(torch.ones(2, K)):
        moe(input_ids=inputs(batch=3))
    with pytest.raises(RuntimeError, match="cannot be nested"), moe.gate(torch.ones(3, K)):
        with moe.gate(torch.ones(3, K)):
            pass
    with pytest.raises(RuntimeError, match="Cannot merge"):
        moe.peft_model.merge_and_unload()


def test_unknown_target_modules_are_refused(llm_dir):
    with pytest.raises(ValueError):
        MoELoRA(load(llm_dir, False), K, RANK_PER_EXPERT, ALPHA, 0.0, ["no_such_proj"])


def test_4bit_cpu_weight_repacking_is_switched_off_on_every_layer(llm_dir):
    import bitsandbytes as bnb

    model = load(llm_dir, True)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 7 * LLM["llm_num_layers"]  # every projection of every decoder layer is 4-bit
    assert all(m.support_avx512bf16_for_cpu is False for m in four_bit)


def test_gradients_flow_through_4bit_layers_after_a_no_grad_eval_forward(llm_dir):
    """bitsandbytes repacks weights on the first eval/no-grad forward on AVX512-BF16 CPUs and drops later
    gradients; on such a CPU this test exercises the trap itself, elsewhere it checks the same path stays sound."""
    moe = wrap(load(llm_dir, True))
    randomise_lora_b(moe)
    ids = inputs()
    with torch.no_grad(), moe.gate(random_gate()):
        moe.eval()(input_ids=ids)
    moe.train()
    embeds = moe.input_embeddings()(ids).detach().requires_grad_(True)
    with moe.gate(random_gate()):
        moe(inputs_embeds=embeds).logits.sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    for layer in moe.lora_layers.values():
        assert layer.lora_A[ADAPTER_NAME].weight.grad.abs().sum() > 0


def test_all_ones_gate_is_exactly_one_plain_lora_of_the_same_rank(llm_dir):
    """UniformLoRA's adapter: a gate of ones turns the mixture into peft's plain rank-K*r_e LoRA."""
    from peft import LoraConfig, get_peft_model

    ids = inputs()
    moe = wrap(load(llm_dir, False))
    randomise_lora_b(moe)
    plain = get_peft_model(
        load(llm_dir, False),
        LoraConfig(r=K * RANK_PER_EXPERT, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS),
    ).eval()
    plain.load_state_dict(moe.peft_model.state_dict())
    with torch.no_grad(), moe.gate(torch.ones(3, K)):
        gated = moe(input_ids=ids).logits
    with torch.no_grad():
        reference = plain(input_ids=ids).logits
    assert torch.allclose(gated, reference, atol=1e-6, rtol=1e-6)


def test_targets_without_lora_a_are_refused_rather_than_run_ungated(llm_dir):
    # peft adapts an embedding with lora_embedding_A/B, outside the gate's reach
    with pytest.raises(ValueError, match="'lora_target_modules': peft adapts 'base_model.model.model.embed_tokens'"):
        MoELoRA(load(llm_dir, False), K, RANK_PER_EXPERT, ALPHA, 0.0, ["q_proj", "embed_tokens"])
