"""What the pretrained default backbone costs per sequence: iLoRA on SmolLM2-135M-Instruct, 4-bit NF4 and dense.

    python benchmarks/backbone_cost.py [--dataset ml-100k] [--steps 4] [--output results/backbone_cost.json]

For each backbone precision, iLoRA is built with the shipped defaults (batch 16, all seven projections adapted,
4 experts x rank 2) on the dataset's real prompts; it times ``--steps`` training steps (forward, backward, Adam
step; one warm-up step first, not counted) and ``--steps`` no-grad evaluation forwards of ``llm_eval_batch_size``
test histories, and reports medians per sequence and per user, the trainable parameters and the mean prompt length.
The SASRec encoder is untrained (a frozen random one: its cost is the same, its values do not matter here).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from machine import git_commit, hardware  # noqa: E402


def measure(dataset, load_in_4bit, steps):
    import torch
    from recbole.data import create_dataset, data_preparation

    from recbole_ilora.config import Config
    from recbole_ilora.model import iLoRA

    config = Config(
        model="iLoRA",
        dataset=dataset,
        config_dict={"llm_load_in_4bit": load_in_4bit, "show_progress": False, "sasrec_allow_random": True},
    )
    train_data, _, test_data = data_preparation(config, create_dataset(config))
    torch.manual_seed(config["seed"])
    model = iLoRA(config, train_data._dataset)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config["learning_rate"])
    batch_size, train_times, tokens = config["train_batch_size"], [], []
    batches = iter(train_data)
    model.train()
    for step in range(steps + 1):
        batch = next(batches)[:batch_size]
        prompt = model.prompt_builder(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
        tokens += prompt.attention_mask.sum(1).tolist()
        started = time.perf_counter()
        optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        optimizer.step()
        if step:  # the first step warms up
            train_times.append((time.perf_counter() - started) / len(batch))
    model.eval()
    interaction = next(iter(test_data))[0]
    histories, lengths = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
    eval_times, size = [], model.eval_batch_size
    with torch.no_grad():
        for chunk in range(steps + 1):
            rows = slice(chunk * size, (chunk + 1) * size)
            started = time.perf_counter()
            model.forward(histories[rows], lengths[rows])
            if chunk:
                eval_times.append((time.perf_counter() - started) / len(histories[rows]))
    return {
        "train_seconds_per_sequence": statistics.median(train_times),
        "eval_seconds_per_user": statistics.median(eval_times),
        "train_seconds_per_sequence_all": train_times,
        "eval_seconds_per_user_all": eval_times,
        "train_batch_size": batch_size,
        "llm_eval_batch_size": size,
        "mean_prompt_tokens": sum(tokens) / len(tokens),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--output", default=str(REPO / "results" / "backbone_cost.json"))
    args, _ = parser.parse_known_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from the command line
    result = {"commit": git_commit(), "hardware": hardware(), "dataset": args.dataset, "backbone": {}}
    for name, four_bit in (("smollm2-135m-instruct, 4-bit NF4", True), ("smollm2-135m-instruct, dense float32", False)):
        result["backbone"][name] = measure(args.dataset, four_bit, args.steps)
        figures = result["backbone"][name]
        print(
            f"{name}: train {figures['train_seconds_per_sequence']:.3f} s/sequence (batch {figures['train_batch_size']}), "
            f"eval {figures['eval_seconds_per_user']:.3f} s/user (batch {figures['llm_eval_batch_size']}), "
            f"{figures['mean_prompt_tokens']:.1f} prompt tokens, {figures['trainable_parameters']:,} trainable parameters",
            flush=True,
        )
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
