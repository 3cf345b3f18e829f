"""Do a generative run's answers follow item popularity? Evidence for the claims table's explanations.

    python benchmarks/answer_popularity.py results/partial/ml-100k/<run>.answers.generations.jsonl.gz
    python benchmarks/answer_popularity.py <run>.generations.jsonl.gz --dataset lastfm

Each user's 20 candidates (the target and 19 uniform negatives) are ranked by how often each item is a next-item
target in the training split (1: the most trained of the 20; ties share their mean rank). Written next to the
generations file as ``<run>.popularity.json`` and printed:

- ``popularity_pick_hit@1``: the share of users whose target is the most trained of their candidates (ties split the
  credit): what picking by popularity alone scores on these very lists;
- ``answer_rank_mean`` and ``answers_most_trained``: where the model's answers (those naming exactly one candidate)
  stand among their lists, against 10.5 and 0.05 for a pick at random;
- ``target_rank_mean``: where the targets stand (uniform negatives are mostly unpopular, so targets rank high);
- ``answers_by_position``: how many answers name the candidate at each place of the prompt's list, next to
  ``targets_by_position`` (where the targets stand: a bias of the answers shows against it) and
  ``right_answers_by_position`` (the right answers, by their place).

The candidate ids are the run's internal item ids; the script checks, user by user, that the target of each line is
that user's test item in the dataset's own split, so a file from another dataset or split is refused.
"""

import argparse
import collections
import gzip
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def split_of(config):
    """(training counts {internal item id: times a training target}, {user token: internal test item id})."""
    from recbole.data import create_dataset

    dataset = create_dataset(config)
    train, _, test = dataset.build()
    counts = collections.Counter(train.inter_feat[dataset.iid_field].tolist())
    users = dataset.field2id_token[dataset.uid_field]
    test_items = {
        str(users[u]): int(i)
        for u, i in zip(
            test.inter_feat[dataset.uid_field].tolist(), test.inter_feat[dataset.iid_field].tolist(), strict=True
        )
    }
    return counts, test_items


def ranks(values):
    """Rank of every value, 1 for the largest; ties share their mean rank."""
    return [
        sum(other > value for other in values) + (sum(other == value for other in values) + 1) / 2 for value in values
    ]


def popularity_statistics(lines, counts, test_items):
    picked = 0.0
    answer_ranks, target_ranks = [], []
    positions = collections.Counter()  # where in its list each answer stands (a bias to the first or last?)
    target_places, right_places = collections.Counter(), collections.Counter()
    for line in lines:
        if test_items.get(str(line["user_id"])) != line["target_id"]:
            raise ValueError(
                f"user {line['user_id']}: the file's target {line['target_id']} is not the user's test item in this "
                "dataset's split; pass the run's --dataset"
            )
        trained = [counts.get(item, 0) for item in line["candidate_ids"]]
        rank = ranks(trained)
        target = line["candidate_ids"].index(line["target_id"])
        most = max(trained)
        if trained[target] == most:
            picked += 1 / sum(count == most for count in trained)
        target_ranks.append(rank[target])
        target_places[target] += 1
        named = line.get("named") or []
        if len(named) == 1 and named[0] in line["candidates"]:
            place = line["candidates"].index(named[0])
            answer_ranks.append(rank[place])
            positions[place] += 1
            if place == target:
                right_places[place] += 1
    size = len(lines[0]["candidate_ids"]) if lines else None
    return {
        "users": len(lines),
        "popularity_pick_hit@1": picked / len(lines),
        "target_rank_mean": statistics.fmean(target_ranks),
        "answers_naming_one_candidate": len(answer_ranks),
        "answer_rank_mean": statistics.fmean(answer_ranks) if answer_ranks else None,
        "answers_most_trained": sum(r <= 1.5 for r in answer_ranks) / len(answer_ranks) if answer_ranks else None,
        "answers_in_top_5": sum(r <= 5 for r in answer_ranks) / len(answer_ranks) if answer_ranks else None,
        "answers_by_position": [positions[i] for i in range(size or 0)],
        "targets_by_position": [target_places[i] for i in range(size or 0)],
        "right_answers_by_position": [right_places[i] for i in range(size or 0)],
        "random_pick": {
            "answer_rank_mean": (size + 1) / 2 if size else None,
            "answers_most_trained": 1 / size if size else None,
        },
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("generations", help="a generative run's <run>.generations.jsonl.gz")
    parser.add_argument("--dataset", default="ml-100k", help="the run's dataset (default: ml-100k)")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]
    from lapse_cold_items import dataset_config
    from machine import git_commit

    path = Path(args.generations)
    with gzip.open(path, "rt", encoding="utf-8") as file:
        lines = [json.loads(text) for text in file if text.strip()]
    counts, test_items = split_of(dataset_config(args.dataset, None))
    result = {"generations": str(path), "dataset": args.dataset, "commit": git_commit()}
    result.update(popularity_statistics(lines, counts, test_items))
    output = path.with_name(path.name.replace(".generations.jsonl.gz", "") + ".popularity.json")
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
