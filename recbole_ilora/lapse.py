"""The temporal-shift protocol of CaseQ (Yang et al., NeurIPS 2022), as a split for every model: ``lapse: L``.

Each user's events in time order: training uses every event except the last ``2 + L``; validation is event
``-(2 + L)``; "test without lapse" is event ``-(1 + L)``; "test with lapse" is the last event, predicted from the
full history (the ``L`` lapse events included as history, never as targets). The model is trained and selected on
data that ends ``L`` events before the test it is finally asked about. Users with fewer than ``3 + L`` events cannot
be split this way: as in the official code, all their events are training data and they are not evaluated (the log
says how many).

The split replaces RecBole's leave-one-out (``eval_args: {split: {LS: valid_and_test}, order: TO, group_by:
user}``, required) on the same rows RecBole would split: for a sequential model, the augmented rows (one per target
event, its history before it); for a general model, the interactions. RecBole's test split is the test with lapse;
``test_split='no_lapse'`` builds the test without lapse in its place.
"""

from logging import getLogger

import numpy as np

SPLITS = ("lapse", "no_lapse")


def check_lapse_config(config):
    """Errors naming the key, before any data is read."""
    lapse = config["lapse"]
    if lapse is None:
        return
    if isinstance(lapse, bool) or not isinstance(lapse, int) or lapse < 0:
        raise ValueError(f"'lapse' must be a whole number of events >= 0 (or None for RecBole's split), got {lapse!r}")
    eval_args = config["eval_args"]
    if eval_args.get("split") != {"LS": "valid_and_test"} or eval_args.get("order") != "TO":
        raise ValueError(
            "'lapse' replaces RecBole's leave-one-out split in time order: set eval_args split {LS: valid_and_test} "
            f"and order TO (got split {eval_args.get('split')!r}, order {eval_args.get('order')!r})"
        )
    if eval_args.get("group_by") != "user":
        raise ValueError(f"'lapse' splits each user's events: eval_args group_by must be 'user', got "
                         f"{eval_args.get('group_by')!r}")  # fmt: skip


def lapse_indices(groups, lapse, events_per_row_offset):
    """Row indices of (train, valid, test with lapse, test without lapse) and the number of users too short.

    Args:
        groups: one array of row indices per user, in time order.
        lapse: L.
        events_per_row_offset: a user's event count minus its row count (1 for augmented sequential rows, whose
            first event is never a target; 0 for interactions).
    """
    train, valid, test, no_lapse = [], [], [], []
    short = 0
    for rows in groups:
        rows = np.asarray(rows)
        if len(rows) + events_per_row_offset < 3 + lapse:
            short += 1
            train.append(rows)
            continue
        train.append(rows[: -(2 + lapse)])
        valid.append(rows[-(2 + lapse)])
        no_lapse.append(rows[-(1 + lapse)])
        test.append(rows[-1])
    as_array = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
    return (
        as_array(train),
        np.asarray(valid, dtype=np.int64),
        np.asarray(test, dtype=np.int64),
        np.asarray(no_lapse, dtype=np.int64),
        short,
    )


def apply_lapse(config, dataset, test_split="lapse"):
    """Make ``dataset.build()`` return RecBole's three splits under the lapse protocol (test: ``test_split``).
    Nothing happens when ``config['lapse']`` is None."""
    if config["lapse"] is None:
        return dataset
    if test_split not in SPLITS:
        raise ValueError(f"test_split must be one of {SPLITS}, got {test_split!r}")
    lapse = int(config["lapse"])

    def build():
        dataset._change_feat_format()  # the sequential augmentation, as RecBole's build() starts
        dataset.sort(by=dataset.time_field)  # order TO (checked at start-up)
        # RecBole's grouping keeps each user's rows in the order above: time order
        groups = dataset._grouped_index(dataset.inter_feat[dataset.uid_field].numpy())
        sequential = hasattr(dataset, "item_list_length_field")
        train, valid, test, no_lapse, short = lapse_indices(list(groups), lapse, 1 if sequential else 0)
        getLogger().info(
            f"lapse split (L = {lapse}): {len(test)} users evaluated, {short} with fewer than {3 + lapse} events "
            f"trained on and not evaluated; {len(train)} training rows"
        )
        if len(test) == 0:
            raise ValueError(
                f"'lapse' = {lapse}: no user of {config['dataset']!r} has the {3 + lapse} events the split needs"
            )
        dataset._drop_unused_col()
        chosen = test if test_split == "lapse" else no_lapse
        return [dataset.copy(dataset.inter_feat[index]) for index in (train, valid, chosen)]  # user by user, as RecBole

    dataset.build = build
    dataset.lapse_test_split = test_split
    return dataset
