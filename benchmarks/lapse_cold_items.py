"""How many test targets of the lapse protocol are items the training split never shows (cold items).

    python benchmarks/lapse_cold_items.py                 # ml-100k and LastFM, L = 30: prints and writes JSON
    python benchmarks/lapse_cold_items.py --datasets lastfm --lapse 30

A model that learns one embedding per item cannot rank an item it never saw in training (its embedding keeps its
initial value). Under the lapse protocol the test with lapse asks for each user's last event, L events after the
training data ends, so on a dataset whose users keep meeting new items that test is largely about cold items: its
drop then measures the catalogue's growth as much as a change of taste. For each test this script counts the
targets whose item appears nowhere in the training rows (neither as a target nor in a history), with the very split
the runs use (``recbole_ilora.lapse.apply_lapse`` on the dataset's own settings), and writes
``results/lapse/cold_items.json``.
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def dataset_config(dataset_name, lapse):
    """The plugin's configuration of a benchmark dataset (its own settings) under ``lapse``."""
    from benchmarks.gridlib.rows import DATASETS
    from recbole_ilora.config import Config

    config_dict = {"show_progress": False, "lapse": lapse}
    if DATASETS[dataset_name]:
        config_dict["data_path"] = str(REPO / DATASETS[dataset_name])
    return Config(model="SASRec", dataset=dataset_name, config_dict=config_dict)


def cold_shares(config):
    """``{"users": n, "test_with_lapse": share, "test_without_lapse": share, "valid": share}`` for the dataset of
    ``config`` (a sequential model's configuration with ``lapse`` set)."""
    from recbole.data import create_dataset

    from recbole_ilora.lapse import apply_lapse

    train, valid, test = apply_lapse(config, create_dataset(config), "lapse").build()
    no_lapse_test = apply_lapse(config, create_dataset(config), "no_lapse").build()[2]  # the same train and valid
    seen = set(train.inter_feat[train.iid_field].tolist())
    seen |= set(train.inter_feat[train.item_id_list_field].flatten().tolist()) - {0}

    def cold(split):
        items = split.inter_feat[split.iid_field].tolist()
        return sum(item not in seen for item in items) / len(items)

    return {
        "users": len(test),
        "valid": cold(valid),
        "test_without_lapse": cold(no_lapse_test),
        "test_with_lapse": cold(test),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["ml-100k", "lastfm"])
    parser.add_argument("--lapse", type=int, default=30)
    parser.add_argument("--output", default=str(REPO / "results" / "lapse" / "cold_items.json"))
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from the command line
    shares = {name: cold_shares(dataset_config(name, args.lapse)) for name in args.datasets}
    result = {"lapse": args.lapse, "datasets": shares}
    for name, shares in result["datasets"].items():
        print(
            f"{name}: {shares['users']} users evaluated; targets never seen in training: valid "
            f"{shares['valid']:.3f}, test without lapse {shares['test_without_lapse']:.3f}, test with lapse "
            f"{shares['test_with_lapse']:.3f}"
        )
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
