"""The paper's generative protocol (iLoRA, LLaRA): candidates in the prompt, a generated title as the answer.

- :func:`named_candidates` decides which candidates a generated text names: titles are compared case- and
  whitespace-insensitively, on word boundaries, and a title found only inside a longer named title (``Heat`` in
  ``Heat Wave``) does not count.
- :func:`verdict` / :func:`summarize_verdicts`: an output is *valid* when it names exactly one candidate, *correct*
  when that one is the target. ValidRatio = valid / users; HR@1 (valid) = correct / valid, the paper's definition;
  HR@1 (all) = correct / users, what RecBole's Hit@1 would mean. With no valid answer HR@1 (valid) is undefined:
  ``None`` (``null`` in JSON), not 0.
- :func:`evaluate_generation`: the greedy answers of every test user after the test, to the prompts listing the
  candidates of :class:`recbole_ilora.model.candidates.CandidateSampler` (which the model uses too, so it lives
  with the model: the model package imports nothing of the runner).
"""

import json
import os
import re
from logging import getLogger

from recbole_ilora.checkpoints import claim_checkpoint_file
from recbole_ilora.model.abstract_llm_recommender import LLMSequentialRecommender


def normalize_title(text):
    """Lower case, one space between words, no surrounding space."""
    return " ".join(str(text).lower().split())


def named_candidates(output, titles):
    """Indices of the ``titles`` that ``output`` names (see the module docstring), in ascending order."""
    text = normalize_title(output)
    spans = {}
    for index, title in enumerate(titles):
        title = normalize_title(title)
        if not title:
            continue
        pattern = r"(?<!\w)" + re.escape(title) + r"(?!\w)"
        spans[index] = [(m.start(), m.end()) for m in re.finditer(pattern, text)]
    named = []
    for index, own in spans.items():
        for start, end in own:
            inside_longer = any(
                other != index and s <= start and end <= e and (e - s) > (end - start)
                for other, others in spans.items()
                for s, e in others
            )
            if not inside_longer:
                named.append(index)
                break
    return named


def verdict(output, titles, target_index):
    """``(valid, correct, named)`` of one generated ``output`` for candidates ``titles`` with the answer at
    ``target_index``."""
    named = named_candidates(output, titles)
    valid = len(named) == 1
    return valid, valid and named[0] == target_index, named


def summarize_verdicts(verdicts):
    """ValidRatio, HR@1 (valid) and HR@1 (all) of ``(valid, correct)`` pairs."""
    users = len(verdicts)
    valid = sum(1 for is_valid, _ in verdicts if is_valid)
    correct = sum(1 for _, is_correct in verdicts if is_correct)
    return {
        "users": users,
        "valid_ratio": valid / users if users else 0.0,
        "hr@1_valid": correct / valid if valid else None,  # 0 / 0: undefined, not a miss
        "hr@1_all": correct / users if users else 0.0,
    }


def replayed_verdicts(records, users, candidate_ids, output_file):
    """The ``(valid, correct)`` of journaled answer ``records``, after checking that they answer these ``users`` on
    these ``candidate_ids`` (one list per user): a journal of another run is refused, not merged."""
    for record, user, ids in zip(records, users, candidate_ids, strict=True):
        if record["user_id"] != user or record["candidate_ids"] != ids:
            raise ValueError(
                f"{output_file} line {record['prompt_id'] + 1} answers user {record['user_id']} on other candidates "
                f"than this evaluation asks (user {user}): it belongs to another run; move it away to generate the "
                "answers anew."
            )
    return [(record["valid"], record["correct"]) for record in records]


def answer_records(outputs, users, candidate_ids, targets, item_titles, first_prompt_id):
    """One journal record per generated answer: the prompt's candidates, the target, the answer and its verdict."""
    records = []
    for offset, (output, user, ids, target) in enumerate(zip(outputs, users, candidate_ids, targets, strict=True)):
        titles = [item_titles[item] for item in ids]
        target_index = ids.index(int(target))
        valid, correct, named = verdict(output, titles, target_index)
        records.append(
            {
                "prompt_id": first_prompt_id + offset,
                "user_id": user,
                "candidate_ids": ids,
                "candidates": titles,
                "target": titles[target_index],
                "target_id": ids[target_index],
                "output": output,
                "named": [titles[index] for index in named],
                "valid": valid,
                "correct": correct,
            }
        )
    return records


def evaluate_generation(config, model, output_file=None, show_progress=False, resume=False):
    """Greedy answers for every test user to a prompt listing its history and candidates (the target and
    never-interacted items, sampled after re-seeding with ``seed``: the same lists for every model).

    Writes one JSON line per user (prompt id, user, candidate ids and titles, target, output, named candidates,
    verdict) to ``output_file`` (default ``<checkpoint_dir>/<model>-generations-<time>.jsonl``), a generation batch
    (``llm_eval_batch_size`` users) at a time.
    With ``resume``, the answers ``output_file`` already holds for the same users and candidates (written by a killed
    evaluation of the same weights: the runner names the file after the model checkpoint) are kept and not generated
    again; otherwise the file is written anew.

    Returns:
        dict: ``users``, ``valid_ratio``, ``hr@1_valid`` (``None`` when no answer is valid), ``hr@1_all`` and
        ``generations_file``.
    """
    from recbole.utils import get_local_time, init_seed, set_color
    from tqdm import tqdm

    from recbole_ilora.data import protocol_test_data
    from recbole_ilora.journal import JsonLinesJournal

    test_data = protocol_test_data(config, "full")  # one row per test user
    init_seed(config["seed"], config["reproducibility"])
    if output_file is None:
        name = f"{config['model']}-generations-{get_local_time()}.jsonl"
        output_file = claim_checkpoint_file(os.path.join(config["checkpoint_dir"], name))  # never another run's
    dataset = test_data._dataset
    model.eval()
    verdicts = []
    progress = tqdm(  # counted in users, a generation batch at a time: its remaining time means something
        total=test_data.sample_size,
        desc=set_color("Generating", "pink"),
        unit="user",
        ncols=100,
        disable=not show_progress,
    )
    with JsonLinesJournal(output_file, fresh=not resume) as journal:
        written = len(journal.records)
        if written:
            getLogger().info(f"Resuming the answers: {written} users' answers are in {output_file}")
        for interaction, _, _, targets in test_data:
            interaction = interaction.to(model.device)
            users, targets = interaction[model.USER_ID], targets.to(model.device)
            candidates = model.candidate_sampler.sample(users, targets).to(model.device)  # [B, C]: drawn every batch
            user_tokens = [str(token) for token in dataset.id2token(dataset.uid_field, users.cpu())]
            for start in range(0, len(users), model.eval_batch_size):  # journaled a generation batch at a time
                rows = slice(start, start + model.eval_batch_size)
                chunk_users, chunk_candidates = user_tokens[rows], candidates[rows]
                earlier = journal.records[len(verdicts) : len(verdicts) + len(chunk_users)]
                if len(earlier) == len(chunk_users):  # answered before the evaluation was killed
                    verdicts.extend(replayed_verdicts(earlier, chunk_users, chunk_candidates.tolist(), output_file))
                else:
                    journal.keep(len(verdicts))  # a generation batch torn by the kill is answered again, whole
                    outputs = model.generate_answers(
                        interaction[model.ITEM_SEQ][rows], interaction[model.ITEM_SEQ_LEN][rows], chunk_candidates
                    )
                    records = answer_records(
                        outputs, chunk_users, chunk_candidates.tolist(), targets[rows].tolist(), model.item_titles,
                        first_prompt_id=len(verdicts),
                    )  # fmt: skip
                    verdicts.extend((record["valid"], record["correct"]) for record in records)
                    journal.append(records)
                progress.update(len(chunk_users))
        journal.keep(len(verdicts))  # nothing beyond the test users
    progress.close()
    result = {**summarize_verdicts(verdicts), "generations_file": output_file}

    getLogger().info(set_color("generative test", "yellow") + f": {result}")
    return result


def main():
    """``python -m recbole_ilora.generative saved/iLoRA-<time>.pth [--output answers.jsonl]``: a saved model of the
    paper's protocol answers every test user's prompt greedily; prints ValidRatio and both HR@1 (run it where the
    model was trained: its configuration names its data and encoder)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("checkpoint", help="a checkpoint saved by run_recbole_ilora.py with objective: generative")
    parser.add_argument("--output", help="the JSON lines of every user's candidates, answer and verdict")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the answers --output holds (a killed run of this command on this checkpoint); generate the rest",
    )
    args = parser.parse_args()
    if args.resume and not args.output:
        parser.error("--resume needs --output: the file whose answers are kept")
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from the command line
    from recbole_ilora.saved_run import load_data_and_model

    config, model, *_ = load_data_and_model(args.checkpoint)
    if not isinstance(model, LLMSequentialRecommender) or not model.generative:
        raise ValueError(f"{args.checkpoint} was not trained with objective: generative")
    model.show_progress = True
    result = evaluate_generation(config, model, output_file=args.output, show_progress=True, resume=args.resume)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
