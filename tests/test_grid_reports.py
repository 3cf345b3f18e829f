"""The benchmark grid's reports (benchmarks/gridlib/report_*.py, tables.py, readme.py, plots.py): tables, gates,
answers, Laser's balance loss, the continual protocol's blocks and PESO's strength, earlier budgets, rows from
uncommitted trees, and the README's copy of the results."""

import gzip
import json
import math

import pytest

from benchmarks.gridlib.planning import llm_budget, run_file
from benchmarks.gridlib.plots import plot_continual
from benchmarks.gridlib.readme import update_readme
from benchmarks.gridlib.records import record_budget
from benchmarks.gridlib.report_continual import lambda_curve_lines, proximal_share_lines, render_continual
from benchmarks.gridlib.report_standard import (
    answer_statistics,
    answers_table,
    balance_lines,
    earlier_lines,
    gate_table,
)
from benchmarks.gridlib.rows import GENERATIVE_ROWS
from benchmarks.gridlib.tables import (
    GENERATIVE_METRICS,
    budgets_line,
    generative_metrics,
    protocol_table,
    uncommitted_lines,
)


def test_answer_statistics_count_distinct_answers_and_collapsed_outputs(tmp_path, monkeypatch):

    verdicts = [
        {"output": "Star Wars", "named": []},
        {"output": " Star Wars ", "named": []},
        {"output": "Heat", "named": ["Heat"]},
        {"output": "Heat and Ghost", "named": ["Heat", "Ghost"]},
    ]
    path = tmp_path / "run.generations.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as file:
        file.writelines(json.dumps(verdict) + "\n" for verdict in verdicts)
    stats = answer_statistics(path)
    assert stats == {
        "users": 4,
        "distinct_answers": 3,
        "top_answer": "Star Wars",
        "top_answer_share": 0.5,
        "naming_no_candidate": 0.5,
        "naming_several": 0.25,
    }
    record = {"row": "iLoRA-generative", "seed": 2020, "dataset": "d", "run_id": "iLoRA-generative-seed2020-x"}
    runs = tmp_path / "runs" / "d"
    runs.mkdir(parents=True)
    path.rename(runs / "iLoRA-generative-seed2020-x.generations.jsonl.gz")
    table = answers_table({"iLoRA-generative": [record]}, tmp_path)
    assert "| iLoRA-generative | 2020 | 4 | 3 | `Star Wars` | 0.500 | 0.500 | 0.250 |" in table.splitlines()


def test_the_report_gives_lasers_balance_loss_per_seed_from_its_records(monkeypatch):
    laser = [{"seed": 2021, "model_summary": {"balance_loss": 1.25}}, {"seed": 2020, "model_summary": None},
             {"seed": 2022, "model_summary": {"balance_loss": 7.9}}]  # fmt: skip
    (line, _) = balance_lines({"Laser": laser, "iLoRA": [{"seed": 2020}]})
    assert line.endswith("seed 2021: 1.2500; seed 2022: 7.9000.")  # seed order; a run without the figure left out
    assert "one-hot by construction" in line  # the shipped mformer_top_k: 1 makes the gate table's entropy 0
    assert balance_lines({"iLoRA": [{"seed": 2020}]}) == []  # no Laser row, no line


def test_the_readme_gets_each_table_apart_and_the_claims_without_their_why(tmp_path, monkeypatch):
    results = "\n".join([
        "# ml-100k", "", "## Full ranking (test)", "", "| model | ndcg@10 |", "|---|---|", "| SASRec | 0.06 |", "",
        "## The paper's protocol: a generated title (test)", "", "Text.", "", "| model | hr@1 |", "|---|---|",
        "| iLoRA | 0.07 |", "", "What the models answered:", "", "| model | answers |", "|---|---|", "| iLoRA | 451 |",
        "", "## The paper's claims", "", "| claim | verdict | why |", "|---|---|---|",
        "| 1 | not distinguishable | a \\| b, long |", "", "## Runs", "", "| run | commit |", "|---|---|", "| r | c |",
    ])  # fmt: skip
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:ml-100k -->\nstale\n<!-- /results:ml-100k -->\nafter\n"
                      "<!-- results:lastfm -->\n<!-- /results:lastfm -->\nend\n", encoding="utf-8")  # fmt: skip
    update_readme("ml-100k", results, 3, 4, readme=readme)
    update_readme("lastfm", results.replace("ml-100k", "lastfm"), 1, 2, readme=readme)
    update_readme("ml-1m", results, 1, 2, readme=readme)  # no markers of its own: nothing changes
    text = readme.read_text(encoding="utf-8")
    ours, lastfm = text.split("<!-- results:ml-100k -->")[1], text.split("<!-- results:lastfm -->")[1]
    assert text.startswith("intro\n") and "\nafter\n" in text and text.endswith("end\n") and "stale" not in text
    # Two tables of one section stay two tables (a blank line between), not one table with a second header inside.
    assert "| iLoRA | 0.07 |\n\n| model | answers |" in ours
    # The claims without the 'why' column (an escaped pipe inside it is no column break), linked to instead.
    assert "| claim | verdict |\n|---|---|\n| 1 | not distinguishable |\n" in ours and "long" not in ours
    assert "(results/ml-100k.md#the-papers-claims)" in ours
    assert "| run | commit |" not in ours  # only the sections the README shows
    assert "| SASRec | 0.06 |" not in lastfm.split("<!-- /results:lastfm -->")[0]  # LastFM: its claims only
    assert "(results/lastfm.md#the-papers-claims)" in lastfm and "1 of 2 runs finished" in lastfm


def test_gate_table_gives_each_gate_its_top_weight_so_a_uniform_gate_is_not_read_as_routing(tmp_path, monkeypatch):

    gates = {
        "iLoRA": [[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6]],  # routes: top weights 0.7 and 0.6
        "iLoRA-gate-uniform": [[0.25, 0.25, 0.25, 0.25]] * 2,  # every user "led" by expert 0, by index alone
    }
    by_row = {}
    for row, weights in gates.items():
        record = {"run_id": f"{row}-seed1-h", "dataset": "d", "seed": 1}
        entropies = [-sum(w * math.log(w) for w in user) for user in weights]
        leads = [sum(max(range(4), key=user.__getitem__) == k for user in weights) for k in range(4)]
        record["gate"] = {
            "num_experts": 4,
            "users": 2,
            "mean_entropy": sum(entropies) / 2,
            "users_led_by_expert": leads,
        }
        path = run_file(tmp_path, record).with_suffix(".gates.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"weights": user}) + "\n" for user in weights))
        by_row[row] = [record]
    lines = gate_table(by_row, tmp_path).splitlines()
    assert lines[2].startswith("| iLoRA | 1 | 4 |") and "| 0.650 | 0.50/0.00/0.00/0.50 |" in lines[2]
    assert (
        lines[3].startswith("| iLoRA-gate-uniform | 1 | 4 | 1.386 |") and "| 0.250 | 1.00/0.00/0.00/0.00 |" in lines[3]
    )


def test_generative_table_leaves_an_undefined_hr_at_1_valid_out_of_the_mean(monkeypatch):

    def record(valid_ratio, hr_valid, hr_all):
        generative = {"users": 943, "valid_ratio": valid_ratio, "hr@1_valid": hr_valid, "hr@1_all": hr_all}
        return {"generative": generative, "trainable_parameters": 10, "wall_seconds": 60, "cpu_seconds": 60}

    # the third seed has no valid answer: HR@1 (valid) is None, or 0 in records written before it was None; no miss
    by_row = {
        "UniformLoRA-generative": [record(0.004, 0.5, 0.002), record(0.008, 0.25, 0.002), record(0.0, 0.0, 0.0)],
        "iLoRA-generative": [record(0.002, 1.0, 0.002), record(0.004, 0.5, 0.002), record(0.0, None, 0.0)],
    }
    table = protocol_table(by_row, GENERATIVE_METRICS, generative_metrics, GENERATIVE_ROWS)
    lines = table.splitlines()
    assert lines[2] == (
        "| UniformLoRA-generative | 3 | **0.0040 ± 0.0040** | 0.3750 ± 0.1768 (2 of 3 seeds) | "
        "**0.0013 ± 0.0012** | 10 | 1.0 | 1.0 |"
    )
    assert lines[3] == (
        "| iLoRA-generative | 3 | 0.0020 ± 0.0020 | **0.7500 ± 0.3536** (2 of 3 seeds) | "
        "**0.0013 ± 0.0012** | 10 | 1.0 | 1.0 |"
    )


def test_the_continual_claim_compares_the_mean_over_later_blocks_over_seeds(monkeypatch):

    def record(row, seed, later, hit=0.2):  # block 0 is the same for both rows: only blocks 1..T-1 count
        blocks = [{"block": b, "test": {"full": {"ndcg@10": 0.5 if b == 0 else later}, "uni19": {"hit@1": hit}},
                   "users": 10, "training_sequences": 30, "trained_sequences": 10, "wall_seconds": 60.0}
                  for b in range(3)]  # fmt: skip
        mean = {"full": {"ndcg@10": later}, "uni19": {"hit@1": hit}}
        return {"run_id": f"{row}-{seed}", "row": row, "seed": seed, "blocks": blocks, "blocks_total": 3,
                "mean_over_later_blocks": mean, "commit": "c", "hardware": "h", "finished": "t",
                "wall_seconds": 180.0, "epochs_cap": 1, "llm_train_sequences_per_user": 1}  # fmt: skip

    planned = [{"seed": seed, "backbone": "embedded"} for seed in (1, 2, 3)]

    def claim_line(peso, finetune, metric="ndcg@10 (full)", peso_hits=(0.2,) * 3, finetune_hits=(0.2,) * 3):
        rows = (("UniformLoRA-finetune", finetune, finetune_hits), ("UniformLoRA-peso", peso, peso_hits))
        by_row = {
            row: [record(row, seed, v, h) for seed, v, h in zip((1, 2, 3), values, hits, strict=True)]
            for row, values, hits in rows
        }
        done = [r for records in by_row.values() for r in records]
        markdown = render_continual("d", planned, by_row, True, done)
        start = f"| UniformLoRA-peso vs UniformLoRA-finetune | {metric} |"
        return next(line for line in markdown.splitlines() if line.startswith(start))

    assert claim_line([0.30, 0.31, 0.32], [0.20, 0.21, 0.22]).endswith("| reproduced |")
    assert "not reproduced (the other way round)" in claim_line([0.20, 0.21, 0.22], [0.30, 0.31, 0.32])
    assert "not distinguishable at this budget (d = +0.5" in claim_line([0.21, 0.25, 0.23], [0.20, 0.24, 0.22])
    # the second metric has its own verdict, from its own figures: here the other way round to full NDCG@10's
    low, high = (0.20, 0.21, 0.22), (0.30, 0.31, 0.32)
    hit_line = claim_line(list(high), list(low), "hit@1 (uni19)", peso_hits=low, finetune_hits=high)
    assert "not reproduced (the other way round)" in hit_line and "0.2100 ± 0.0100 (3 seeds)" in hit_line


def test_the_continual_report_shows_the_proximal_terms_weight_or_that_a_run_did_not_record_it(monkeypatch):

    def share(term, ratio):
        return {"batches": 3, "term": term, "penalty_grad_norm": ratio * 2.0, "task_grad_norm": 2.0,
                "grad_norm_ratio": ratio, "last_term": term}  # fmt: skip

    def record(seed, shares):
        blocks = [{"block": 0, "penalty": "none", "penalty_weight": None, "proximal": None}]
        blocks += [{"block": b + 1, "penalty": "softmax_kl", "penalty_weight": 2.0, "proximal": s}
                   for b, s in enumerate(shares)]  # fmt: skip
        return {"seed": seed, "blocks": blocks}

    lines = proximal_share_lines({
        "UniformLoRA-peso": [record(2021, [share(1e-6, 1e-4), share(3e-6, 3e-4)]), record(2020, [None, None])],
        "UniformLoRA-finetune": [{"seed": 2020, "blocks": [{"block": 1, "penalty": "none", "proximal": None}]}],
    })  # fmt: skip
    rows = [line for line in lines if line.startswith("| UniformLoRA")]
    assert rows == [
        "| UniformLoRA-peso | 2020 | 2.0 | not recorded | – | – | – |",  # its seeds in order
        "| UniformLoRA-peso | 2021 | 2.0 | 2e-06 | 0.0004 | 2 | 0.0002 |",
    ]  # means over blocks 1..2
    assert proximal_share_lines({"UniformLoRA-finetune": [record(2020, [])]}) == []  # no penalised row


def test_earlier_llm_records_are_reported_apart_with_the_budget_they_trained_with(tmp_path, monkeypatch):
    budget = {"objective": "head", "epochs": 1, "train_batch_size": 16, "learning_rate": 0.001,
              "llm_train_sequences_per_user": 2, "llm_loss_positions": "all", "gate_scope": "position",
              "score_head": "residual"}  # fmt: skip
    planned = [{"run_id": "iLoRA-seed2020-new", "row": "iLoRA", "kind": "llm", "budget": budget}]
    folder = tmp_path / "runs" / "ml-100k"
    folder.mkdir(parents=True)

    def record(run_id, ndcg, seed=2020, **extra):
        test = {"full": {"ndcg@10": ndcg}, "uni19": {"hit@1": 0.5}}
        data = {"run_id": run_id, "row": "iLoRA", "seed": seed, "commit": "abc1234", "test": test, **extra}
        (folder / f"{run_id}.json").write_text(json.dumps(data))

    record("iLoRA-seed2020-new", 0.07, trained_targets=18693)  # the planned run: the tables', not an earlier one
    record("iLoRA-seed2020-old", 0.04)  # recorded before issue 42: no targets, no budget
    record("iLoRA-seed2021-old", 0.02, seed=2021)
    record("iLoRA-seed2020-old.superseded-2026", 0.9)  # a superseded record is never shown
    lines = earlier_lines("ml-100k", planned, tmp_path)
    (row,) = [line for line in lines if line.startswith("| iLoRA |")]
    assert "1 most recent training sequence, the label only, per-sequence gate, plain head" in row
    assert "| 2020, 2021 | 0.0300 ± 0.0141 |" in row  # the two earlier seeds only
    assert budgets_line([json.loads((folder / "iLoRA-seed2020-new.json").read_text())], planned) == (
        "iLoRA: 1 epoch(s), batch 16; each user's 2 most recent training windows (18,693 targets), a loss at every "
        "position, per-position gate, residual head"
    )
    # a record with targets but no budget, planned nowhere, cannot be labelled: an error, not a wrong label
    with pytest.raises(ValueError, match="no budget"):
        record_budget({"run_id": "x", "row": "iLoRA", "trained_targets": 5})


def test_runs_that_computed_in_bfloat16_are_a_budget_apart_from_float32_ones(monkeypatch):
    from conftest import tiny_config

    from recbole_ilora.model import backbone

    budget = {"objective": "head", "epochs": 1, "train_batch_size": 16, "learning_rate": 0.001,
              "llm_train_sequences_per_user": 2, "llm_loss_positions": "all", "gate_scope": "position",
              "score_head": "residual"}  # fmt: skip
    earlier = {"run_id": "iLoRA-seed2020-a", "row": "iLoRA", "trained_targets": 10, "budget": budget}
    now = {"run_id": "iLoRA-seed2021-b", "row": "iLoRA", "trained_targets": 10,
           "budget": {**budget, "compute_dtype": "bfloat16"}}  # fmt: skip
    assert record_budget(earlier)["compute_dtype"] == "float32"  # recorded before the dtype was: float32 then
    line = budgets_line([earlier, now])
    assert line.count("iLoRA: ") == 2 and line.count("bfloat16 compute") == 1, line  # two budgets, one said bf16
    # the grid records the dtype the run's machine resolves 'auto' to
    config = tiny_config(llm_compute_dtype="auto")
    for flags, dtype in (({"avx512_bf16"}, "bfloat16"), ({"avx2"}, "float32")):
        monkeypatch.setattr(backbone, "cpu_flags", lambda flags=flags: ("a CPU", flags))
        assert llm_budget(config)["compute_dtype"] == dtype


def test_runs_from_uncommitted_trees_are_marked_in_the_tables(monkeypatch):

    def record(seed, commit):
        return {"run_id": f"SASRec-seed{seed}-h", "seed": seed, "commit": commit, "test": {"full": {"ndcg@10": 0.1}},
                "trainable_parameters": 10, "wall_seconds": 60}  # fmt: skip

    by_row = {"SASRec": [record(2020, "abc1234+uncommitted"), record(2021, "abc1234")], "Pop": [record(2020, "d")]}
    table = protocol_table(by_row, ["ndcg@10"], lambda r: r["test"]["full"], ["SASRec", "Pop"])
    assert "| SASRec † | 2 |" in table and "| Pop | 1 |" in table
    (note, _) = uncommitted_lines([r for records in by_row.values() for r in records])
    assert note.startswith("† 1 run(s)") and "`SASRec-seed2020-h`" in note
    assert uncommitted_lines(by_row["Pop"]) == []


def test_the_lambda_curve_lists_each_pesos_strength_beside_finetuning_and_plots_it(tmp_path, monkeypatch):

    def record(seed, ndcg, hit, ratio=None):
        share = {"grad_norm_ratio": ratio} if ratio is not None else None
        test = {"full": {"ndcg@10": ndcg}, "uni19": {"hit@1": hit}}
        blocks = [{"block": b, "proximal": share, "test": test} for b in range(3)]
        return {"seed": seed, "blocks": blocks, "blocks_total": 3,
                "mean_over_later_blocks": {"full": {"ndcg@10": ndcg}, "uni19": {"hit@1": hit}}}  # fmt: skip

    by_row = {
        "UniformLoRA-finetune": [record(2020, 0.030, 0.25), record(2021, 0.9, 0.9)],  # seed 2021 is not read
        "UniformLoRA-peso": [record(2020, 0.030, 0.25, ratio=2e-6)],
        "UniformLoRA-peso-lambda2e6": [record(2020, 0.020, 0.20, ratio=1.5)],
    }
    assert lambda_curve_lines("ml-100k", {"UniformLoRA-peso": by_row["UniformLoRA-peso"]}) == []  # one point
    lines = lambda_curve_lines("ml-100k", by_row)
    assert "| PESO | 2 | 2e-06 | 0.0300 | 0.2500 |" in lines
    assert "| PESO | 2e+06 | 1.5 | 0.0200 | 0.2000 |" in lines
    assert "| UniformLoRA-finetune | – | – | 0.0300 | 0.2500 |" in lines
    plot_continual("ml-100k", by_row, tmp_path / "ml-100k.png")
    assert (tmp_path / "ml-100k-lambda.png").read_bytes().startswith(b"\x89PNG")
