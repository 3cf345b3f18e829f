"""Export how a trained iLoRA routes every test user over its experts (from a saved checkpoint).

    python -m recbole_ilora.gate_report saved/iLoRA-<time>.pth --output gates.jsonl

Writes one JSON line per test user (``user_id``, ``weights``, ``entropy`` in nats, ``top_expert``) and prints a
summary: mean entropy against its maximum ln K, and how many users each expert leads. Run it from the directory
the model was trained in (the checkpoint's configuration names its SASRec checkpoint and caches by path).
"""

import argparse
import json
import math
from logging import getLogger

import torch

from recbole_ilora.quick_start import load_data_and_model


def gate_records(model, eval_data):
    """One record per user of ``eval_data`` (a full-sort loader): user id, expert weights, entropy, top expert."""
    dataset = eval_data._dataset
    records = []
    with torch.no_grad():
        for interaction, *_ in eval_data:
            interaction = interaction.to(model.device)
            weights = model.routing(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]).float()  # [B, K]
            entropy = -(weights * weights.clamp_min(1e-12).log()).sum(1)  # [B]
            users = dataset.id2token(dataset.uid_field, interaction[dataset.uid_field].cpu())
            for user, row, row_entropy in zip(users, weights.tolist(), entropy.tolist(), strict=True):
                records.append(
                    {
                        "user_id": str(user),
                        "weights": row,
                        "entropy": row_entropy,
                        "top_expert": max(range(len(row)), key=row.__getitem__),
                    }
                )
    return records


def summarize(records):
    num_experts = len(records[0]["weights"])
    leads = [sum(r["top_expert"] == k for r in records) for k in range(num_experts)]
    return {
        "users": len(records),
        "num_experts": num_experts,
        "mean_entropy": sum(r["entropy"] for r in records) / len(records),
        "max_entropy": math.log(num_experts),
        "mean_weights": [sum(r["weights"][k] for r in records) / len(records) for k in range(num_experts)],
        "users_led_by_expert": leads,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an iLoRA checkpoint saved by run_recbole_ilora.py")
    parser.add_argument("--output", default="gates.jsonl", help="JSON-lines file to write (default: gates.jsonl)")
    args = parser.parse_args()
    _, model, _, _, _, test_data = load_data_and_model(args.checkpoint)
    if not hasattr(model, "routing"):
        raise ValueError(f"{args.checkpoint} holds a {type(model).__name__}, which has no gate to report.")
    records = gate_records(model, test_data)
    with open(args.output, "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
    summary = summarize(records)
    getLogger().info(f"gate report: {summary}")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
