"""GPU-only path: the 4-bit NF4 backbone with bfloat16 compute on CUDA (skipped without a CUDA device)."""

import pytest
import torch

from recbole_ilora.model.backbone import build_embedded_llm, load_causal_lm
from recbole_ilora.model.gated_lora import MoELoRA

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_gated_lora_trains_on_a_4bit_cuda_backbone(tmp_path):
    import bitsandbytes as bnb

    config = {
        "llm_hidden_size": 64,
        "llm_num_layers": 2,
        "llm_num_heads": 2,
        "llm_intermediate_size": 128,
        "llm_vocab_size": 200,
        "llm_init_seed": 0,
        "llm_cache_dir": str(tmp_path),
        "checkpoint_dir": str(tmp_path),
        "llm_compute_dtype": "auto",
        "llm_trust_remote_code": False,
        "llm_load_in_4bit": True,
        "llm_4bit_quant_type": "nf4",
        "llm_4bit_double_quant": True,
    }
    path = build_embedded_llm(config, ["Toy Story", "GoldenEye", "Four Rooms"] * 5)
    model, _ = load_causal_lm(path, config, "cuda")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    moe = MoELoRA(model, 4, 2, 16, 0.0, ["q_proj", "v_proj"]).train()
    ids = torch.randint(4, 20, (2, 6), device="cuda")
    with moe.gate(torch.full((2, 4), 0.25, device="cuda")):
        loss = moe(input_ids=ids).logits.float().logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for n, p in moe.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
