"""Continual training over time blocks (PESO: Yoo et al., "Continual Low-Rank Adapters for LLM-based Generative
Recommender Systems", ICLR 2026): the pieces of the continual mode.

- **Time blocks** (:func:`time_block_ids`, :func:`apply_time_block`): a dataset's interactions in time order cut into
  ``T`` blocks of equal size. For block ``t``, each user with at least 3 target events in the block contributes:
  training = the block's target events except the last two, each with its history from all earlier interactions
  (earlier blocks included, up to the history length); validation = the block's second-to-last; test = its last.
  Users with fewer are left out of the block (counted). ``cumulative=True`` trains on every block up to ``t``
  (the cumulative-retraining strategy), still validated and tested on block ``t``.
- **Proximal terms** (:class:`AdapterAnchor`, in ``recbole_ilora.model.proximal``, with the model it anchors): a
  frozen snapshot of a LoRA adapter's ``(A, B)`` matrices and the penalties that pull the adapter back to it: PESO's
  softmax-KL, the mean over adapted modules of ``KL(softmax(vec A) || softmax(vec A_prev)) + KL(softmax(vec B) ||
  softmax(vec B_prev))``, and the squared L2 distance ``||theta - theta_prev||^2`` summed over the same matrices. Only
  the adapter is anchored (for iLoRA: all experts' rank channels); a gate, projector or head is not.

Written from the paper and the official code (``hsyoo32/peso``); the KL uses log-softmax instead of the official
code's epsilon-and-renormalise, which computes the same divergence without its bias near zero probabilities.
"""

from logging import getLogger

import numpy as np
from recbole.utils import FeatureSource, FeatureType

from recbole_ilora.model.proximal import PENALTIES, AdapterAnchor  # noqa: F401 (the continual mode's names)

BLOCK_FIELD = "time_block"


def time_block_ids(timestamps, num_blocks):
    """The block of every interaction: ranks in time order (ties in the order given) cut into ``num_blocks`` equal
    parts, ``int64 [n]``."""
    timestamps = np.asarray(timestamps)
    if num_blocks < 1 or num_blocks > len(timestamps):
        raise ValueError(f"'continual_blocks' must be between 1 and the number of interactions, got {num_blocks}")
    order = np.argsort(timestamps, kind="stable")
    blocks = np.empty(len(timestamps), dtype=np.int64)
    blocks[order] = np.arange(len(timestamps)) * num_blocks // len(timestamps)
    return blocks


def block_rows(groups, row_blocks, block, cumulative=False, min_events=3):
    """Row indices of (train, valid, test) for ``block`` and the block's statistics.

    Args:
        groups: one array of row indices per user, in time order (RecBole's augmented rows: one per target event).
        row_blocks: the block of every row's target event.
        block: t.
        cumulative: train on the rows of every block up to t (validation and test stay block t's).
    """
    train, valid, test = [], [], []
    users = left_out = 0
    for rows in groups:
        rows = np.asarray(rows)
        mine = rows[row_blocks[rows] == block]
        if len(mine) < min_events:
            left_out += int(len(mine) > 0)
            if cumulative:
                train.append(rows[row_blocks[rows] < block])
            continue
        users += 1
        earlier = rows[row_blocks[rows] < block] if cumulative else rows[:0]
        train += [earlier, mine[:-2]]
        valid.append(mine[-2])
        test.append(mine[-1])
    as_array = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)  # noqa: E731
    stats = {"block": block, "users": users, "users_left_out": left_out}
    train, valid, test = as_array(train), np.asarray(valid, np.int64), np.asarray(test, np.int64)
    stats["training_sequences"] = len(train)
    return train, valid, test, stats


def apply_time_block(config, dataset, block, cumulative=False):
    """Make ``dataset.build()`` return block ``block``'s (train, valid, test) of ``config['continual_blocks']`` blocks;
    the block's statistics are left in ``dataset.block_stats`` once built."""
    num_blocks = int(config["continual_blocks"])
    if not 0 <= block < num_blocks:
        raise ValueError(f"block {block} is not one of the {num_blocks} blocks")

    def build():
        frame = dataset.inter_feat  # still RecBole's DataFrame: mark each interaction's block before augmentation
        frame[BLOCK_FIELD] = time_block_ids(frame[dataset.time_field].to_numpy(), num_blocks).astype(np.float64)
        dataset.set_field_property(BLOCK_FIELD, FeatureType.FLOAT, FeatureSource.INTERACTION, 1)
        dataset._change_feat_format()  # the sequential augmentation: each row keeps its target event's block
        dataset.sort(by=dataset.time_field)
        groups = list(dataset._grouped_index(dataset.inter_feat[dataset.uid_field].numpy()))
        row_blocks = dataset.inter_feat[BLOCK_FIELD].numpy().astype(np.int64)
        train, valid, test, stats = block_rows(groups, row_blocks, block, cumulative)
        dataset.block_stats = stats
        getLogger().info(
            f"time block {block} of {num_blocks}{' (cumulative training)' if cumulative else ''}: "
            f"{stats['users']} users, {stats['training_sequences']} training sequences, "
            f"{stats['users_left_out']} users with fewer than 3 events "
            "in the block left out"
        )
        if stats["users"] == 0:
            raise ValueError(f"time block {block}: no user has 3 events in it; use fewer 'continual_blocks'")
        dataset._drop_unused_col()
        return [dataset.copy(dataset.inter_feat[index]) for index in (train, valid, test)]

    dataset.build = build
    return dataset
