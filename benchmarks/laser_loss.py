"""Did Laser learn? Its cross-entropy on training sequences, trained against untrained, both scored against the item
table it trained with (the checkpoint's), next to a uniform guess's ln(n_items); and how alike the table's items are.

    python benchmarks/laser_loss.py benchmarks/work/saved/Laser-<time>.pth [--sequences 64] [--output F.json]

The sequences are the first ``--sequences`` of the run's budgeted training loader (each user's most recent training
sequence, in RecBole's seeded order). The untrained model is the same configuration built afresh, torch seeded with
the run's seed: a fresh initialisation of the M-Former and suffix (not the run's own initial weights, which no file
keeps), scored against the trained checkpoint's table. Costs about 2 LLM forwards per sequence.
"""

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from machine import git_commit, hardware  # noqa: E402


def cross_entropy(model, batches):
    """Mean cross-entropy over all items (the balance loss left out) of ``batches``, without gradients."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model.score_items(model.forward(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]))
            logits[:, 0] = float("-inf")
            total += float(F.cross_entropy(logits, batch[model.POS_ITEM_ID], reduction="sum"))
            count += len(batch)
    return total / count


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a Laser checkpoint saved by the runner (it holds its item table)")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--output", help="write the figures as JSON here too")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from the command line
    import torch
    import torch.nn.functional as F

    from recbole_ilora.data import budget_training_data
    from recbole_ilora.saved_run import load_data_and_model
    from recbole_ilora.utils import get_model

    config, trained, _, train_data, *_ = load_data_and_model(args.checkpoint)
    if config["model"] != "Laser":
        raise ValueError(f"{args.checkpoint} holds a {config['model']} model, not Laser.")
    config["show_progress"] = False
    batches, taken = [], 0
    for batch in budget_training_data(config, train_data)[0]:
        batches.append(batch[: args.sequences - taken])
        taken += len(batches[-1])
        if taken >= args.sequences:
            break
    torch.manual_seed(config["seed"])
    untrained = get_model("Laser")(config, train_data._dataset).eval()
    untrained.item_vectors = trained.item_vectors  # the table the run trained against
    table = F.normalize(trained.item_vectors[1:].float(), dim=-1)
    cosines = table @ table.t()
    off_diagonal = cosines[~torch.eye(len(table), dtype=torch.bool)]
    result = {
        "checkpoint": args.checkpoint,
        "sequences": taken,
        "uniform_cross_entropy": math.log(trained.n_items - 1),
        "untrained_cross_entropy": cross_entropy(untrained, batches),
        "trained_cross_entropy": cross_entropy(trained, batches),
        "item_table_mean_cosine": float(off_diagonal.mean()),
        "commit": git_commit(),
        "hardware": hardware(),
    }
    print(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
