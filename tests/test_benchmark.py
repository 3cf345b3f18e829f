"""The benchmark's protocol: one test loader layout for every model, seeded uni19 candidates shared by all models,
the claims' statistics, the answers' scripts and the history-window study. The grid's own tests are
test_grid_planning.py, test_grid_execution.py and test_grid_reports.py."""

import gzip
import json
import math
import statistics
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, TINY, tiny_config
from recbole.utils import init_seed

from recbole_ilora.data import protocol_test_data
from recbole_ilora.gate_report import plot_routing, uniform_records
from recbole_ilora.model.sequence_encoder import read_sasrec_checkpoint
from recbole_ilora.quick_start import objective_function
from recbole_ilora.saved_run import load_data_and_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


FULL_METRIC_NAMES = ["recall", "mrr", "ndcg", "hit"]  # properties/dataset/lastfm.yaml's metrics


def candidate_rows(config, mode="uni19"):
    """(user, item) of every row of the test loader, read the way the trainer reads it (after seeding)."""
    test_data = protocol_test_data(config, mode)
    init_seed(config["seed"], config["reproducibility"])
    rows = []
    for interaction, _, positive_u, positive_i in test_data:
        rows.append((interaction["user_id"], interaction["item_id"], positive_u, positive_i))
    return rows


def flatten(rows):
    return torch.cat([u for u, *_ in rows]).tolist(), torch.cat([i for _, i, *_ in rows]).tolist()


def test_uni19_candidates_are_the_same_for_every_model_and_hold_the_target():
    # Each model with its own eval_batch_size (RecBole samples each user's candidates in user order).
    pop, sasrec, ilora = (
        candidate_rows(tiny_config(model, eval_batch_size=size))
        for model, size in (("Pop", 4096), ("SASRec", 100), ("iLoRA", 512))
    )
    assert flatten(pop) == flatten(sasrec) == flatten(ilora)  # Pop (a general model) uses the same layout

    users, items = flatten(sasrec)
    per_user = {}
    for user, item in zip(users, items, strict=True):
        per_user.setdefault(user, []).append(item)
    assert len(per_user) == 40 and all(len(candidates) == 20 for candidates in per_user.values())
    # Each user's first row is its target (RecBole's positive), which none of its 19 sampled items repeats.
    for candidates in per_user.values():
        assert candidates[0] not in candidates[1:]

    other_seed = flatten(candidate_rows(tiny_config("SASRec", seed=7)))
    assert other_seed[0] == users and other_seed[1] != items  # same users and targets, other candidates


def test_test_modes_full_equals_recboles_own_test_and_adds_uni19():
    config = {**TINY, "model": "SASRec", "epochs": 2, "test_modes": ["full", "uni19"]}
    result = objective_function(config_dict=config)
    assert result["test_results"]["full"] == result["test_result"]  # the same loader RecBole builds itself
    uni19 = result["test_results"]["uni19"]
    assert uni19["hit@10"] > result["test_result"]["hit@10"]  # 20 candidates are easier than all 1,461 items
    # uni19's Hit@1 recomputed here from the saved model's scores of the very candidates the loader gave
    _, model, *_ = load_data_and_model(result["saved_model_file"])
    test_config = tiny_config("SASRec", epochs=2, test_modes=["full", "uni19"])
    first, users = {}, {}
    with torch.no_grad():
        for interaction, _, _, _ in _loader_batches(test_config):
            scores = model.predict(interaction)
            for user, item, score in zip(
                interaction["user_id"].tolist(), interaction["item_id"].tolist(), scores, strict=True
            ):
                first.setdefault(user, (item, float(score)))  # each user's first row is its target
                users.setdefault(user, []).append(float(score))
    hits = [first[user][1] > max(scores[1:]) for user, scores in users.items()]
    assert len(hits) == 40 and uni19["hit@1"] == pytest.approx(sum(hits) / len(hits))
    assert 0 < sum(hits) < 40  # neither every user nor none: the comparison means something
    assert result["trainable_parameters"] == sum(p.numel() for p in _sasrec_parameters(result))


def _loader_batches(config, mode="uni19"):
    test_data = protocol_test_data(config, mode)
    init_seed(config["seed"], config["reproducibility"])  # as the runner does before testing each mode
    return list(test_data)


def _sasrec_parameters(result):
    return torch.load(result["saved_model_file"], weights_only=True)["state_dict"].values()


def test_routing_png_draws_a_gate_next_to_the_uniform_gate(tmp_path):
    records = [
        {"user_id": str(u), "weights": w, "entropy": -sum(x * math.log(x) for x in w), "top_expert": w.index(max(w))}
        for u, w in enumerate([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6], [0.25, 0.25, 0.25, 0.25]])
    ]
    uniform = uniform_records(records)
    assert all(r["weights"] == [0.25] * 4 and r["entropy"] == math.log(4) for r in uniform)
    plot_routing({"iLoRA": records, "uniform gate": uniform}, tmp_path / "routing.png")
    assert (tmp_path / "routing.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="same number of experts"):
        plot_routing({"a": records, "b": [{**records[0], "weights": [0.5, 0.5]}]}, tmp_path / "bad.png")


def test_answer_popularity_ranks_answers_and_targets_among_their_candidates_by_training_counts(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import answer_popularity as ap

    assert ap.ranks([5, 9, 5, 1]) == [2.5, 1.0, 2.5, 4.0]  # ties share their mean rank
    counts = {10: 9, 11: 5, 12: 5, 13: 1}  # times each item is a training target
    lines = [  # candidates 10..13; user a's target is the most trained, b's ties with another
        {"user_id": "a", "target_id": 10, "candidate_ids": [13, 10, 11, 12], "candidates": ["D", "A", "B", "C"],
         "named": ["D"]},  # answers the least trained: rank 4
        {"user_id": "b", "target_id": 11, "candidate_ids": [11, 12, 13, 99], "candidates": ["B", "C", "D", "Z"],
         "named": ["B", "C"]},  # names two candidates: not counted as an answer
    ]  # fmt: skip
    stats = ap.popularity_statistics(lines, counts, {"a": 10, "b": 11})
    assert stats["popularity_pick_hit@1"] == pytest.approx((1 + 0.5) / 2)  # b's target shares the top with item 12
    assert stats["target_rank_mean"] == pytest.approx((1 + 1.5) / 2)
    assert stats["answers_naming_one_candidate"] == 1 and stats["answer_rank_mean"] == 4.0
    assert stats["answers_most_trained"] == 0.0 and stats["random_pick"]["answer_rank_mean"] == 2.5
    assert stats["answers_by_position"] == [1, 0, 0, 0]  # a's answer, first in its list
    assert stats["targets_by_position"] == [1, 1, 0, 0]  # b's target first, a's second
    assert stats["right_answers_by_position"] == [0, 0, 0, 0]  # a answered wrong, b named two
    lines[0]["named"] = ["A"]  # now a names its target, second in its list
    assert ap.popularity_statistics(lines, counts, {"a": 10, "b": 11})["right_answers_by_position"] == [0, 1, 0, 0]
    with pytest.raises(ValueError, match="user b: the file's target 11 is not the user's test item"):
        ap.popularity_statistics(lines, counts, {"a": 10, "b": 12})  # another split: refused


def _generations(path, correct):
    with gzip.open(path, "wt", encoding="utf-8") as file:
        for user, is_correct in correct.items():
            file.write(json.dumps({"user_id": user, "correct": is_correct, "valid": True}) + "\n")


def test_claims_compare_one_seed_user_by_user_and_several_seeds_in_stds(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import claims

    users = [str(u) for u in range(100)]
    # iLoRA answers 30 users right, UniformLoRA 10 of them: a paired difference of 0.2 over 100 users
    ilora = {u: int(u) < 30 for u in users}
    uniform = {u: int(u) < 10 for u in users}
    for name, correct in (("iLoRA-generative", ilora), ("UniformLoRA-generative", uniform)):
        _generations(tmp_path / f"{name}.generations.jsonl.gz", correct)

    def record(name, seed, hr):
        return {"row": name, "seed": seed, "_path": str(tmp_path / f"{name}.json"), "trainable_parameters": 10,
                "generative": {"valid_ratio": 1.0, "hr@1_valid": hr, "hr@1_all": hr}}  # fmt: skip

    one_seed = {"iLoRA-generative": [record("iLoRA-generative", 2020, 0.3)],
                "UniformLoRA-generative": [record("UniformLoRA-generative", 2020, 0.1)]}  # fmt: skip
    result = claims.compare_rows(one_seed, "iLoRA-generative", ["UniformLoRA-generative"], claims.hr1_all, "HR@1 (all)")
    se = statistics.stdev([int(ilora[u]) - int(uniform[u]) for u in users]) / 10
    assert f"+0.2000 ± {se:.4f}" in result["figure"] and f"z = {0.2 / se:+.1f}" in result["figure"]
    assert result["verdict"] == "reproduced"  # z = 5
    assert claims.compare_rows(one_seed, "UniformLoRA-generative", ["iLoRA-generative"], claims.hr1_all, "HR@1 (all)")[
        "verdict"
    ].startswith("not reproduced")

    seeds = {row: [record(row, s, hr + 0.01 * k) for k, s in enumerate((2020, 2021, 2022))]
             for row, hr in (("iLoRA-generative", 0.30), ("UniformLoRA-generative", 0.29))}  # fmt: skip
    close = claims.compare_rows(seeds, "iLoRA-generative", ["UniformLoRA-generative"], claims.hr1_all, "HR@1 (all)")
    assert "d = +1.0" in close["figure"] and close["verdict"].startswith("not distinguishable")  # 0.01 / std 0.01
    # every seed's answers paired user by user, pooled over seeds (shown beside d; d decides over seeds)
    assert f"paired over 3 seeds x 100 users: +0.2000 ± {se / math.sqrt(3):.4f}" in close["figure"]
    seeds["UniformLoRA-generative"][1]["_path"] = str(tmp_path / "elsewhere.json")  # seed 2021 kept no answers
    assert "paired over 2 seeds x 100 users" in claims.compare_rows(
        seeds, "iLoRA-generative", ["UniformLoRA-generative"], claims.hr1_all, "HR@1 (all)")["figure"]  # fmt: skip
    parameters = {"iLoRA": [{"trainable_parameters": 1005}], "UniformLoRA": [{"trainable_parameters": 1000}]}
    assert claims.parameter_claim(parameters)["verdict"] == "reproduced"


def test_the_encoder_target_pairs_every_seed_with_its_own_encoder(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import claims

    users = [str(u) for u in range(100)]
    records, encoders, diffs = [], {}, []
    for k, seed in enumerate((2020, 2021)):
        mine = {u: int(u) < 10 + 10 * k for u in users}  # 10 then 20 users right
        encoder = {u: int(u) < 40 for u in users}  # its encoder: 40 right in both seeds
        _generations(tmp_path / f"run{seed}.generations.jsonl.gz", mine)
        hr = 0.1 + 0.1 * k
        generative = {"valid_ratio": 1.0, "hr@1_valid": hr, "hr@1_all": hr}
        records.append(
            {
                "row": "iLoRA-generative",
                "seed": seed,
                "_path": str(tmp_path / f"run{seed}.json"),
                "generative": generative,
            }
        )
        encoders[seed] = {"hit@1": 0.4, "per_user": encoder}
        diffs.append(claims.paired(mine, encoder))
    (line,) = [t for t in claims.targets_section("ml-100k", {"iLoRA-generative": records}, encoders) if "SASRec" in t]
    # By hand: seed 2020's per-user differences are -1 for 30 users and 0 for 70 (mean -0.3, sample variance
    # (30 x 0.7² + 70 x 0.3²) / 99 = 21/99); seed 2021's -1 for 20 and 0 for 80 (mean -0.2, variance 16/99). The
    # pooled difference is their mean, -0.25, with standard error sqrt(21/99/100 + 16/99/100) / 2 = 0.030567.
    assert diffs[0]["diff"] == -0.3 and diffs[1]["diff"] == -0.2  # the seeds differ: pooling can be told from one
    assert "paired over 2 seeds x 100 users: -0.2500 ± 0.0306" in line and line.endswith("| no |")


def test_encoder_on_prompt_candidates_equals_its_full_ranking_restricted_to_them(sasrec_checkpoint, tmp_path):
    monkeypatch_path = str(REPO_ROOT / "benchmarks")
    sys.path.insert(0, monkeypatch_path)
    try:
        import claims
    finally:
        sys.path.remove(monkeypatch_path)
    _, model, dataset, _, _, test_data = load_data_and_model(sasrec_checkpoint)
    lines, expected = [], {}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for interaction, _, _, _ in test_data:
            scores = model.full_sort_predict(interaction).view(len(interaction), -1)
            for row, user in enumerate(interaction["user_id"].tolist()):
                target = int(interaction["item_id"][row])
                others = [i for i in torch.randperm(dataset.item_num - 1, generator=generator)[:25].add(1).tolist()
                          if i != target][:19]  # fmt: skip
                candidates = others[:7] + [target] + others[7:]
                token = str(dataset.id2token("user_id", user))
                lines.append({"user_id": token, "candidate_ids": candidates})
                expected[token] = bool(candidates[int(scores[row, candidates].argmax())] == target)
    path = tmp_path / "run.generations.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as file:
        file.writelines(json.dumps(line) + "\n" for line in lines)
    result = claims.encoder_on_candidates(path, sasrec_checkpoint, tmp_path / "cache.json")
    assert result["per_user"] == expected and result["users"] == 40
    assert 0 < sum(expected.values()) < 40  # some right, some wrong: the comparison can fail
    assert claims.encoder_on_candidates(path, "no-such-file", tmp_path / "cache.json") == result  # cached


def test_paired_answers_count_users_per_verdict_and_refuse_unpaired_files(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import paired_answers

    def line(user, output, correct, candidates=("A", "B")):
        return {"user_id": user, "candidates": list(candidates), "target": "A", "output": output,
                "valid": output in candidates, "correct": correct}  # fmt: skip

    a = {1: line(1, "A", True), 2: line(2, "A", True), 3: line(3, "B", False), 4: line(4, "x", False)}
    b = {1: line(1, "A", True), 2: line(2, "B", False), 3: line(3, "A", True), 4: line(4, "A", True)}
    result = paired_answers.compare(a, b)
    assert result["right"] == {"both": 1, "a_only": 1, "b_only": 2, "neither": 0}
    assert result["same_answer"] == 1 and result["a"]["hr@1_all"] == 0.5 and result["b"]["hr@1_all"] == 0.75
    assert result["paired_a_minus_b"]["diff"] == pytest.approx(-0.25)
    path = tmp_path / "a.generations.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as file:
        file.write("".join(json.dumps(value) + "\n" for value in a.values()))
    assert paired_answers.read_answers(path) == a
    with pytest.raises(ValueError, match="user 3 has other candidates"):
        paired_answers.compare(a, {**b, 3: line(3, "A", True, candidates=("A", "C"))})


def test_a_partial_runs_answers_enter_the_claims_marked_as_such(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import claims

    def write_answers(path, rights, first_candidate=1):
        with gzip.open(path, "wt", encoding="utf-8") as file:
            for user, right in enumerate(rights):
                line = {"user_id": str(user), "correct": right, "candidate_ids": [first_candidate, 7]}
                file.write(json.dumps(line) + "\n")

    rights_mine, rights_other = [True, True, True, False] * 5, [False, False, True, False] * 5
    partial = tmp_path / "partial"
    partial.mkdir()
    summary = {"users": 20, "valid_ratio": 1.0, "hr@1_valid": 0.75, "hr@1_all": 0.75}
    (partial / "iLoRA-generative-seed1-h.answers.json").write_text(json.dumps({"answers": summary}))
    # The CLI that answered for the partial run drew other candidate lists than the grid's run of the seed.
    write_answers(partial / "iLoRA-generative-seed1-h.answers.generations.jsonl.gz", rights_mine, first_candidate=2)
    other_path = tmp_path / "UniformLoRA-generative-seed1-g.json"
    write_answers(other_path.with_suffix(".generations.jsonl.gz"), rights_other)
    other = {"run_id": "UniformLoRA-generative-seed1-g", "row": "UniformLoRA-generative", "seed": 1, "test": {},
             "generative": {**summary, "hr@1_valid": 0.25, "hr@1_all": 0.25}, "_path": str(other_path)}  # fmt: skip
    planned = [{"run_id": "iLoRA-generative-seed1-h", "row": "iLoRA-generative", "seed": 1}, other]
    by_row = claims.with_partial_runs({"UniformLoRA-generative": [other]}, planned, partial)
    assert by_row["iLoRA-generative"][0]["partial"] and by_row["iLoRA-generative"][0]["generative"] == summary
    result = claims.compare_rows(by_row, "iLoRA-generative", ["UniformLoRA-generative"], claims.hr1_all, "HR@1 (all)")
    assert result["figure"].startswith("iLoRA-generative (partial run: answers only) 0.7500 (1 seed)")
    # Not paired: the two runs answered other candidate lists.
    assert "paired" not in result["figure"] and result["verdict"].endswith("no per-user verdicts to pair)")
    # On the same lists the two are paired user by user.
    write_answers(partial / "iLoRA-generative-seed1-h.answers.generations.jsonl.gz", rights_mine)
    result = claims.compare_rows(by_row, "iLoRA-generative", ["UniformLoRA-generative"], claims.hr1_all, "HR@1 (all)")
    assert "paired over 20 users: +0.5000" in result["figure"] and result["verdict"] == "reproduced"  # z = 4.4
    # A run with a record of its own is not replaced by its partial answers.
    own = {**other, "run_id": "iLoRA-generative-seed1-h", "row": "iLoRA-generative"}
    assert claims.with_partial_runs({"iLoRA-generative": [own]}, planned, partial)["iLoRA-generative"] == [own]


def test_the_head_targets_compare_ilora_with_sasrec_over_seeds_and_each_run_with_its_own_encoder(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import claims

    def record(seed, ndcg, encoder=None):
        return {"seed": seed, "test": {"full": {"ndcg@10": ndcg}},
                **({"encoder_test": {"full": {"ndcg@10": encoder}}} if encoder is not None else {})}  # fmt: skip

    sasrec = [record(2020, 0.05), record(2021, 0.06), record(2022, 0.07)]
    ilora = [record(2020, 0.06, 0.05), record(2021, 0.08, 0.06)]
    lines = claims.head_target_lines({"iLoRA": ilora, "SASRec": sasrec})
    # two of three seeds: no verdict yet; the runs against their own encoders: +0.01 and +0.02, mean 0.015
    assert lines[0].endswith("| not yet (2 of 3 seeds) |")
    assert "| iLoRA | 0.0150 ± 0.0071 (2 seeds) (run - encoder; per seed 2020: 0.0600 vs 0.0500, 2021: 0.0800 vs " in (
        lines[1]
    ) and lines[1].endswith("| yes |")
    ilora.append(record(2022, 0.04))  # a record without its encoder's test (before issue 42) counts for the first line
    lines = claims.head_target_lines({"iLoRA": ilora, "SASRec": sasrec})
    # iLoRA 0.06 ± 0.02, SASRec 0.06 ± 0.01: d = 0 / sqrt((0.02² + 0.01²) / 2) = 0, not above
    assert "iLoRA 0.0600 ± 0.0200 (3 seeds) vs SASRec 0.0600 ± 0.0100 (3 seeds); d = +0.0" in lines[0]
    assert lines[0].endswith("| no |")
    assert claims.head_target_lines({"SASRec": sasrec}) == []


def test_the_sasrec_target_is_met_only_when_ilora_is_ahead_by_two_pooled_stds(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import claims

    def rows(ilora, sasrec):
        records = lambda values: [{"seed": s, "test": {"full": {"ndcg@10": v}}} for s, v in enumerate(values)]  # noqa: E731
        return claims.head_target_lines({"iLoRA": records(ilora), "SASRec": records(sasrec)})[0]

    # means 0.064 and 0.063, stds 0.01 and 0.005: d = 0.001 / sqrt((0.01² + 0.005²) / 2) = +0.1
    assert rows([0.054, 0.064, 0.074], [0.058, 0.063, 0.068]).endswith("| above in the mean only (d within 2: "
                                                                       "not distinguishable) |")  # fmt: skip
    # means 0.07 and 0.06, stds 0.002 each: d = +5.0
    line = rows([0.068, 0.07, 0.072], [0.058, 0.06, 0.062])
    assert "d = +5.0" in line and line.endswith("| yes |")


def test_cofirecs_claims_compare_it_with_each_ablation_and_wait_for_its_first_run(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import claims

    def record(row, ndcg, hit):
        return {"row": row, "test": {"full": {"ndcg@10": ndcg}, "uni19": {"hit@1": hit}}}

    assert claims.cofirec_claims_section({"SASRec": [record("SASRec", 0.06, 0.4)]}) == []  # nothing run yet
    by_row = {
        "CoFiRec": [record("CoFiRec", v, 0.30) for v in (0.050, 0.052, 0.054)],  # mean 0.052, std 0.002
        "CoFiRec-fused": [record("CoFiRec-fused", v, 0.31) for v in (0.040, 0.042, 0.044)],  # d = +5.0
        "SASRec": [record("SASRec", v, 0.40) for v in (0.060, 0.062, 0.064)],
    }
    lines = claims.cofirec_claims_section(by_row)
    fused = next(line for line in lines if line.startswith("| coarse to fine beats fused (full ranking)"))
    assert "d = +5.0" in fused and fused.endswith("| reproduced |")
    baselines = next(line for line in lines if line.startswith("| CoFiRec beats the baselines"))
    assert "vs SASRec 0.0620" in baselines and baselines.endswith("| not reproduced (the other way round) |")
    order = next(line for line in lines if line.startswith("| the order matters"))
    assert order.endswith("| not measured |")  # no reversed run yet
    by_row["CoFiRec"][0].update(run_id="CoFiRec-seed2020-x", model_summary={"tokenizer": {
        "tokenizer": "levels", "order": "coarse_to_fine", "collision_rate_before": 0.0071, "collision_rate_after": 0.0,
        "codebook_usage": [0.8125, 1.0]}})  # fmt: skip
    ids = claims.cofirec_claims_section(by_row)
    assert "| CoFiRec-seed2020-x | levels, coarse_to_fine | 0.0071 | 0.0000 | 0.81 / 1.00 |" in ids


def test_history_window_trains_each_window_with_its_own_encoder_on_the_same_items_and_chooses_on_validation(tmp_path):
    """benchmarks/history_window.py (issue 42's window choice): every window L gets an encoder pretrained at L and the
    same budget in items (L = 2 reads each user's 2 most recent windows, L = 4 one), and a finished window is not
    run again."""
    script = str(REPO_ROOT / "benchmarks" / "history_window.py")
    command = [sys.executable, script, "--quick", "--windows", "2", "4", "--items-per-user", "4",
               "--output", str(tmp_path / "out"), "--work", str(tmp_path / "work")]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
    records = {w: json.loads((tmp_path / "out" / f"lastfm-tiny-L{w}-seed2020.json").read_text()) for w in (2, 4)}
    for window, record in records.items():
        assert record["windows_per_user"] == 4 // window
        assert record["encoder_window"] == window
        assert read_sasrec_checkpoint(record["sasrec_checkpoint"])["config"]["MAX_ITEM_LIST_LENGTH"] == window
    assert records[2]["sasrec_checkpoint"] != records[4]["sasrec_checkpoint"]
    assert records[2]["trained_sequences"] > records[4]["trained_sequences"]  # more, shorter windows ...
    assert records[2]["trained_targets"] == records[4]["trained_targets"]  # ... the same targets
    again = subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
    assert again.stdout.count("finished already") == 2
    assert (tmp_path / "out" / "lastfm-tiny.png").read_bytes()[:8] == PNG_MAGIC


def test_the_history_window_is_chosen_on_validation_and_changes_only_by_more_than_the_margin(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    from history_window import chosen_window

    def records(*scores):
        return [{"window": w, "best_valid_score": v, "test": 1 - v} for w, v in scores]  # test never decides

    assert chosen_window(records((5, 0.070), (10, 0.075), (20, 0.072)), shipped=10, margin=0.006) == 10
    assert chosen_window(records((5, 0.070), (10, 0.075), (20, 0.080)), shipped=10, margin=0.006) == 10  # +0.005
    assert chosen_window(records((5, 0.070), (10, 0.075), (20, 0.082)), shipped=10, margin=0.006) == 20
    assert chosen_window(records((20, 0.07), (5, 0.07)), shipped=10, margin=0.006) == 5  # no shipped run; a tie
    with pytest.raises(ValueError):
        chosen_window([])


def test_the_shipped_window_is_read_from_the_readme_commands_committed_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    from history_window import import_readme_run

    path = REPO_ROOT / "results" / "default-command" / "iLoRA-ml-100k-8e18f5e-2026-12-07.json"
    import_readme_run(path, tmp_path)
    record = json.loads((tmp_path / "ml-100k-L10-seed2020.json").read_text())
    # the log's LLM validation ("epoch 0 evaluating [..., valid_score: 0.075000]"), not its encoder's (0.0744)
    assert record["best_valid_score"] == 0.075 and record["encoder_best_valid_score"] == 0.0744
    assert (record["trained_sequences"], record["trained_targets"], record["windows_per_user"]) == (1886, 18693, 2)
    assert record["test"]["full"]["ndcg@10"] == 0.0636 and record["encoder_test"]["full"]["ndcg@10"] == 0.0627


def test_two_runs_of_another_compute_dtype_are_compared_metric_by_metric_from_their_logs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    from dtype_runs import compare, read_run

    def log(dtype, ndcg, hit1, loss):
        test = f"OrderedDict([('ndcg@10', np.float64({ndcg})), ('hit@10', np.float64(0.13)), ('hit@1', np.float64({hit1})), ('mrr@10', np.float64(0.04))])"  # noqa: E501
        lines = [
            "INFO  Code: commit abc1234",
            "INFO  Machine: 2 x AMD EPYC (avx512_bf16), no GPU, 24 GiB",
            f"INFO  Backbone /x: NF4 4-bit weights, {dtype} compute (llm_compute_dtype = auto)",
            "INFO  epoch 0 training [time: 1.00s, train loss: 9.0000]",  # SASRec's pretraining: not the LLM's
            "Trainable parameters: 10",
            f"INFO  epoch 0 training [time: 2.00s, train loss: {loss}]",
            f"INFO  test result (full): {test}",
            f"INFO  encoder test result (full): {test.replace(str(ndcg), '0.05')}",
            'INFO  timings (s): {"training": 900.0}',
            f"INFO  best valid : {test}",
        ]
        path = tmp_path / f"{dtype}.log"
        path.write_text("\n".join(lines) + "\n")
        return path

    float32 = read_run(log("float32", 0.0636, 0.017, 300.5))
    bfloat16 = read_run(log("bfloat16", 0.0641, 0.0159, 300.25))
    assert (float32["compute_dtype"], bfloat16["compute_dtype"]) == ("float32", "bfloat16")
    assert float32["train_loss"] == [300.5] and float32["encoder_test"]["full"]["ndcg@10"] == 0.05
    difference = compare(float32, bfloat16)
    assert difference["test"]["full"]["ndcg@10"] == 0.0005 and difference["test"]["full"]["hit@1"] == -0.0011
    assert difference["best_valid"]["hit@10"] == 0.0  # 0.13 in both
