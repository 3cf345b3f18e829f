"""Export how a trained iLoRA routes every test user over its experts (from a saved checkpoint).

    python -m recbole_ilora.gate_report saved/iLoRA-<time>.pth --output gates.jsonl --png routing.png

Writes one JSON line per test user (``user_id``, ``weights``, ``entropy`` in nats, ``top_expert``) and prints a
summary: mean entropy against its maximum ln K, and how many users each expert leads. ``--png`` draws how users
are routed (share of users led by each expert, mean expert weight, and the distribution of gate entropy) next to
the uniform gate (1/K for every user); it needs matplotlib (``pip install -e ".[bench]"``). Run it from the
directory the model was trained in (the checkpoint's configuration names its SASRec checkpoint and caches by path).
"""

import argparse
import json
import math
from logging import getLogger

import torch

from recbole_ilora.saved_run import load_data_and_model


def gate_records(model, eval_data):
    """One record per user of ``eval_data``: user id, expert weights, entropy, top expert. A sampled loader (uni19,
    a generative model's) repeats each user once per candidate; the user's first row counts (all have its history)."""
    dataset = eval_data._dataset
    records, seen = [], set()
    with torch.no_grad():
        for interaction, *_ in eval_data:
            interaction = interaction.to(model.device)
            weights = model.routing(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]).float()  # [B, K]
            entropy = -(weights * weights.clamp_min(1e-12).log()).sum(1)  # [B]
            users = dataset.id2token(dataset.uid_field, interaction[dataset.uid_field].cpu())
            for user, row, row_entropy in zip(users, weights.tolist(), entropy.tolist(), strict=True):
                if user in seen:
                    continue
                seen.add(user)
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


def uniform_records(records):
    """The records a uniform gate (1/K for every user) gives the same users: the reference the PNG draws."""
    num_experts = len(records[0]["weights"])
    weights = [1.0 / num_experts] * num_experts
    return [
        {"user_id": r["user_id"], "weights": weights, "entropy": math.log(num_experts), "top_expert": 0}
        for r in records
    ]


def plot_routing(named_records, path, title="How users are routed"):
    """Draw a PNG comparing gates: ``named_records`` maps a label to its records (the same K for every label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_experts = len(next(iter(named_records.values()))[0]["weights"])
    if any(len(records[0]["weights"]) != num_experts for records in named_records.values()):
        raise ValueError("plot_routing compares gates with the same number of experts.")
    figure, (leads, weights, entropy) = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(named_records)
    for index, (label, records) in enumerate(named_records.items()):
        summary = summarize(records)
        offsets = [k + (index - (len(named_records) - 1) / 2) * width for k in range(num_experts)]
        leads.bar(offsets, [n / summary["users"] for n in summary["users_led_by_expert"]], width, label=label)
        weights.bar(offsets, summary["mean_weights"], width, label=label)
        entropy.hist(
            [r["entropy"] for r in records],
            bins=30,
            range=(0.0, summary["max_entropy"] * 1.02),
            alpha=0.55,
            label=f"{label} (mean {summary['mean_entropy']:.3f})",
        )
    for axis in (leads, weights):
        axis.set_xticks(range(num_experts), [f"expert {k}" for k in range(num_experts)])
    leads.set_ylabel("share of users")
    leads.set_title("users whose largest weight is on each expert")
    weights.set_title("mean gate weight per expert")
    entropy.axvline(math.log(num_experts), color="black", linestyle="--", linewidth=1)
    entropy.set_xlabel(f"gate entropy per user (nats; dashed: ln {num_experts})")
    entropy.set_ylabel("users")
    entropy.set_title("gate entropy")
    leads.legend(fontsize=8)
    entropy.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an iLoRA checkpoint saved by run_recbole_ilora.py")
    parser.add_argument("--output", default="gates.jsonl", help="JSON-lines file to write (default: gates.jsonl)")
    parser.add_argument("--png", help="also draw the routing next to the uniform gate into this PNG file")
    args = parser.parse_args()
    _, model, _, _, _, test_data = load_data_and_model(args.checkpoint)
    if not getattr(model, "has_gate", False):  # RecBole's models have no such attribute
        raise ValueError(f"{args.checkpoint} holds a {type(model).__name__}, which has no gate to report.")
    records = gate_records(model, test_data)
    with open(args.output, "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
    summary = summarize(records)
    if args.png:
        plot_routing({type(model).__name__: records, "uniform gate": uniform_records(records)}, args.png)
    getLogger().info(f"gate report: {summary}")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
