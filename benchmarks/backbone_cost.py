"""What the pretrained default backbone costs per sequence: iLoRA on SmolLM2-135M-Instruct, 4-bit NF4 and dense;
and, with ``--models``, what each LLM model costs on the 4-bit backbone (Laser next to iLoRA).

    python benchmarks/backbone_cost.py [--dataset ml-100k] [--steps 4] [--output results/backbone_cost.json]
    python benchmarks/backbone_cost.py --models iLoRA Laser      # -> results/model_cost.json

For each backbone precision, iLoRA is built with the shipped defaults (batch 16, all seven projections adapted,
4 experts x rank 2) on the dataset's real prompts; it times ``--steps`` training steps (forward, backward, Adam
step; one warm-up step first, not counted) and ``--steps`` no-grad evaluation forwards of ``llm_eval_batch_size``
test histories, and reports medians per sequence and per user, the trainable parameters and the mean prompt length.
The SASRec encoder is untrained (a frozen random one: its cost is the same, its values do not matter here). For
Laser, the item table (every item through the LLM from its own prompt, once per epoch) is timed once as well.
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


def measure(dataset, load_in_4bit, steps, model_name="iLoRA"):
    import torch
    from recbole.data import create_dataset, data_preparation

    from recbole_ilora.config import Config
    from recbole_ilora.utils import get_model

    config = Config(
        model=model_name,
        dataset=dataset,
        config_dict={"llm_load_in_4bit": load_in_4bit, "show_progress": False, "sasrec_allow_random": True},
    )
    train_data, _, test_data = data_preparation(config, create_dataset(config))
    torch.manual_seed(config["seed"])
    model = get_model(model_name)(config, train_data._dataset)
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
    table_seconds = None
    if hasattr(model, "item_table"):
        started = time.perf_counter()
        model.item_table()
        table_seconds = time.perf_counter() - started
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
        "item_table_seconds": table_seconds,
        "items": model.n_items - 1,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--output", help="default: results/backbone_cost.json; with --models, results/model_cost.json")
    parser.add_argument("--models", nargs="+", help="compare these LLM models on the 4-bit backbone instead")
    args, _ = parser.parse_known_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from the command line
    if args.models:
        return compare_models(args)
    args.output = args.output or str(REPO / "results" / "backbone_cost.json")
    result = {"commit": git_commit(), "hardware": hardware(), "dataset": args.dataset, "backbone": {}}
    for name, four_bit in (("smollm2-135m-instruct, 4-bit NF4", True), ("smollm2-135m-instruct, dense float32", False)):
        result["backbone"][name] = measure(args.dataset, four_bit, args.steps)
        figures = result["backbone"][name]
        print(
            f"{name}: train {figures['train_seconds_per_sequence']:.3f} s/sequence "
            f"(batch {figures['train_batch_size']}), "
            f"eval {figures['eval_seconds_per_user']:.3f} s/user (batch {figures['llm_eval_batch_size']}), "
            f"{figures['mean_prompt_tokens']:.1f} prompt tokens, "
            f"{figures['trainable_parameters']:,} trainable parameters",
            flush=True,
        )
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.output}")


def compare_models(args):
    output = args.output or str(REPO / "results" / "model_cost.json")
    result = {"commit": git_commit(), "hardware": hardware(), "dataset": args.dataset, "models": {}}
    for name in args.models:
        figures = result["models"][name] = measure(args.dataset, True, args.steps, name)
        table = figures["item_table_seconds"]
        print(
            f"{name} (4-bit): train {figures['train_seconds_per_sequence']:.3f} s/sequence, eval "
            f"{figures['eval_seconds_per_user']:.3f} s/user, {figures['trainable_parameters']:,} trainable parameters"
            + (f", item table {table:.1f} s for {figures['items']:,} items" if table is not None else ""),
            flush=True,
        )
    Path(output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {output}")


if __name__ == "__main__":
    main()
