"""Did Laser learn? Its cross-entropy on training sequences, trained against untrained, both scored against the item
table it trained with (the checkpoint's), next to a uniform guess's ln(n_items); how alike the table's items are
(its geometry: mean cosine, effective rank); and whether the table can hold the collaborative signal at all: a
linear probe (ridge least squares) from SASRec's sequence representation to the target's unit table vector, fitted on
every budgeted training sequence and scored on the test users by the cosine to the table (full ranking, each user's
history masked), next to SASRec's own ranking of the same users (issue 43, ask 3).

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


def linear_probe(features, targets, ridge=1e-3):
    """``W [d + 1, H]`` minimising ``||[X 1] W - Y||^2 + ridge ||W||^2`` (closed form, float64)."""
    import torch

    x = torch.cat([features.double(), features.new_ones(len(features), 1).double()], dim=1)
    gram = x.t() @ x + ridge * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, x.t() @ targets.double())


def probe_hits(trained, train_batches, test_data, k=10):
    """Hit@k of the linear probe through the table and of SASRec itself on the test users (full ranking)."""
    import torch
    import torch.nn.functional as F

    unit = F.normalize(trained.item_vectors.float(), dim=-1)
    with torch.no_grad():
        pairs = [(trained.sequence_representation(b[trained.ITEM_SEQ], b[trained.ITEM_SEQ_LEN]),
                  unit[b[trained.POS_ITEM_ID]]) for b in train_batches]  # fmt: skip
        weights = linear_probe(torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs]))
        hits = {"probe": 0, "sasrec": 0}
        users = 0
        for interaction, history_index, positive_u, positive_i in test_data:
            features = trained.sequence_representation(interaction[trained.ITEM_SEQ], interaction[trained.ITEM_SEQ_LEN])
            predicted = (torch.cat([features, features.new_ones(len(features), 1)], 1).double() @ weights).float()
            for name, scores in (("probe", F.normalize(predicted, dim=-1) @ unit.t()),
                                 ("sasrec", features @ trained.item_embeddings().t())):  # fmt: skip
                scores[:, 0] = float("-inf")
                if history_index is not None:
                    scores[history_index] = float("-inf")
                top = scores.topk(k, dim=1).indices
                target = torch.zeros_like(scores, dtype=torch.bool)
                target[positive_u, positive_i] = True
                hits[name] += int(target.gather(1, top).any(1).sum())
            users += len(features)
    return {"probe_training_sequences": sum(len(x) for x, _ in pairs), f"probe_hit@{k}": hits["probe"] / users,
            f"sasrec_hit@{k}": hits["sasrec"] / users, "test_users": users}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a Laser checkpoint saved by the runner (it holds its item table)")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--output", help="write the figures as JSON here too")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from the command line
    import torch

    from recbole_ilora.data import budget_training_data
    from recbole_ilora.model.laser import table_geometry
    from recbole_ilora.saved_run import load_data_and_model
    from recbole_ilora.utils import get_model

    config, trained, _, train_data, _, test_data = load_data_and_model(args.checkpoint)
    if config["model"] != "Laser":
        raise ValueError(f"{args.checkpoint} holds a {config['model']} model, not Laser.")
    config["show_progress"] = False
    budgeted = list(budget_training_data(config, train_data)[0])
    batches, taken = [], 0
    for batch in budgeted:
        batches.append(batch[: args.sequences - taken])
        taken += len(batches[-1])
        if taken >= args.sequences:
            break
    torch.manual_seed(config["seed"])
    untrained = get_model("Laser")(config, train_data._dataset).eval()
    untrained.item_vectors = trained.item_vectors  # the table the run trained against
    geometry = table_geometry(trained.item_vectors)
    result = {
        "checkpoint": args.checkpoint,
        "sequences": taken,
        "uniform_cross_entropy": math.log(trained.n_items - 1),
        "untrained_cross_entropy": cross_entropy(untrained, batches),
        "trained_cross_entropy": cross_entropy(trained, batches),
        "item_table_mean_cosine": geometry["mean_cosine"],  # the same pairs, from the norm of the rows' sum
        "table_geometry": geometry,
        **probe_hits(trained, budgeted, test_data),
        "commit": git_commit(),
        "hardware": hardware(),
    }
    print(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
