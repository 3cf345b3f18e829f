"""Candidate lists of the paper's generative protocol (iLoRA, LLaRA): the target and ``num_candidates - 1`` items
the user never interacted with, drawn uniformly by RecBole's non-repeatable ``Sampler`` (in any split), shuffled.
"""

import numpy as np
import torch
from recbole.sampler import Sampler


class CandidateSampler:
    """Candidate lists for the generative prompt: the target and ``num_candidates - 1`` items the user never
    interacted with, shuffled.

    Built from the three split datasets of RecBole's ``data_preparation`` (train, valid, test): RecBole's
    ``Sampler`` in its test phase excludes every item of the user's train, valid and test interactions; the
    exclusion sets are completed with the items of the histories (in a sequential dataset the first item of a
    user is never a target). Sampling uses NumPy's global generator, which RecBole's ``init_seed`` seeds.
    """

    def __init__(self, datasets, num_candidates, iid_field, uid_field, item_list_field):
        self.num_negatives = num_candidates - 1
        self.sampler = Sampler(["train", "valid", "test"], list(datasets), "uniform").set_phase("test")
        used = self.sampler.used_ids  # the test phase's: one set of item ids per user id
        for dataset in datasets:
            users = dataset.inter_feat[uid_field].numpy()
            histories = dataset.inter_feat[item_list_field].numpy()
            for user, history in zip(users, histories, strict=True):
                used[user].update(int(item) for item in history if item > 0)
        self.item_num = self.sampler.item_num
        if self.num_negatives >= self.item_num - 1:
            raise ValueError(f"'num_candidates' = {num_candidates} needs more items than the dataset has.")

    def sample(self, user_ids, targets):
        """``[B, num_candidates]`` candidate item ids (the target among them at a random position)."""
        user_ids, targets = torch.as_tensor(user_ids).cpu(), torch.as_tensor(targets).cpu()
        negatives = self.sampler.sample_by_user_ids(user_ids.numpy(), targets.numpy(), self.num_negatives)
        negatives = negatives.view(self.num_negatives, -1).t().contiguous()  # RecBole groups them by draw: [B, C-1]
        # RecBole draws with replacement; a list names every candidate once, so draw repeated ones again.
        for row in range(negatives.shape[0]):
            while len(set(negatives[row].tolist())) < self.num_negatives:
                seen, duplicates = set(), []
                for column, item in enumerate(negatives[row].tolist()):
                    if item in seen:
                        duplicates.append(column)
                    seen.add(item)
                user = user_ids[row : row + 1].numpy().repeat(len(duplicates))
                negatives[row, duplicates] = self.sampler.sample_by_user_ids(user, None, 1)
        candidates = torch.cat([targets.unsqueeze(1), negatives], dim=1)  # [B, C]
        order = np.argsort(np.random.random_sample(tuple(candidates.shape)), axis=1)
        return torch.gather(candidates, 1, torch.from_numpy(order))
