"""The standard protocol's report (leave-one-out): ``<dataset>.md`` with the tables, gates, Laser's balance loss,
generative answers, claims and targets, earlier budgets and encoder notes."""

import collections
import gzip
import json
import math
import os
from pathlib import Path

from benchmarks import claims
from benchmarks.gridlib.encoders import earlier_encoder_record, encoder_checkpoint, same_encoder, used_current_encoder
from benchmarks.gridlib.planning import data_path, run_file, shipped, training_budget
from benchmarks.gridlib.records import machine_of, record_budget, superseded_name
from benchmarks.gridlib.rows import (
    BASELINE_BUDGET,
    DEFAULT_BACKBONE,
    ENCODER_BUDGET,
    GENERATIVE_ROWS,
    PROPERTIES,
    REPO,
    ROWS,
)
from benchmarks.gridlib.tables import (
    FULL_METRICS,
    GENERATIVE_METRICS,
    SAMPLED_METRICS,
    backbone_line,
    budget_label,
    budgets_line,
    dataset_statistics,
    fmt,
    generative_metrics,
    incomplete_grid_lines,
    mean_std,
    protocol_table,
    run_rows,
    uncommitted_lines,
)


def gate_table(by_row, output):
    lines = [
        "| model | seeds | K | mean gate entropy (nats) | ln K | exp(entropy): effective experts | "
        "mean weight of a user's top expert (1/K: no preference) | share of users led by each expert (per seed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, records in by_row.items():
        gated = [r for r in records if r.get("gate")]
        if not gated:
            continue
        k = gated[0]["gate"]["num_experts"]
        entropy = mean_std([r["gate"]["mean_entropy"] for r in gated])
        top = [top_weight(run_file(output, r).with_suffix(".gates.jsonl")) for r in gated]
        top = fmt(*mean_std(top), digits=3) if None not in top else "–"
        leads = "; ".join(
            "/".join(f"{n / r['gate']['users']:.2f}" for n in r["gate"]["users_led_by_expert"]) for r in gated
        )
        lines.append(
            f"| {row} | {len(gated)} | {k} | {fmt(*entropy, digits=3)} | {math.log(k):.3f} | "
            f"{math.exp(entropy[0]):.2f} | {top} | {leads} |"
        )
    return "\n".join(lines)


def balance_lines(by_row):
    """Laser's load-balancing loss at its last training step, per seed (its router's share of users per expert is in
    the gate table): E * sum_e p_e f_e over the batch's history items, without its weight alpha; 1 when the experts
    are used evenly, E when one expert takes every item."""
    records = sorted(by_row.get("Laser", []), key=lambda r: r["seed"])
    losses = [(r["seed"], (r.get("model_summary") or {}).get("balance_loss")) for r in records]
    losses = [(seed, loss) for seed, loss in losses if loss is not None]
    if not losses:
        return []
    text = "; ".join(f"seed {seed}: {loss:.4f}" for seed, loss in losses)
    one_hot = ""
    if shipped(PROPERTIES / "model" / "Laser.yaml")["mformer_top_k"] == 1:  # the grid runs the shipped defaults
        one_hot = (
            "Laser keeps each user's top expert only (`mformer_top_k: 1`, its weight re-normalised), so its "
            "weights are one-hot by construction: its entropy 0 and top weight 1 say nothing of its router, "
            "whose spread is the share of users led by each expert. "
        )
    return [
        f"{one_hot}Laser's balance loss E * sum_e p_e f_e at the last training step, without its weight (1 when "
        f"the experts are used evenly, E = 8 when one expert takes every history item): {text}.",
        "",
    ]


def top_weight(path):
    """The mean over users of their largest expert weight (``<run>.gates.jsonl``), or None without that file. It tells
    a gate that prefers an expert from one that leads by a hair: a user led by expert 2 at 0.2503 is not routed."""
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as file:
        weights = [max(json.loads(line)["weights"]) for line in file if line.strip()]
    return sum(weights) / len(weights)


def answer_statistics(path):
    """What a generative run answered (its ``.generations.jsonl.gz``): how many distinct answers, how often the most
    frequent one, and how many answers name no candidate or several. A model that has not learnt to copy a title
    from its prompt answers most users alike, whatever their candidates."""
    with gzip.open(path, "rt", encoding="utf-8") as file:
        verdicts = [json.loads(line) for line in file if line.strip()]
    if not verdicts:
        return None
    answers = collections.Counter(verdict["output"].strip() for verdict in verdicts)
    top, count = answers.most_common(1)[0]
    users = len(verdicts)
    return {
        "users": users,
        "distinct_answers": len(answers),
        "top_answer": top,
        "top_answer_share": count / users,
        "naming_no_candidate": sum(not verdict["named"] for verdict in verdicts) / users,
        "naming_several": sum(len(verdict["named"]) > 1 for verdict in verdicts) / users,
    }


def answers_table(by_row, output):
    lines = [
        "| model | seed | test users | distinct answers | most frequent answer | its share of users | "
        "answers naming no candidate | naming 2 or more |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in GENERATIVE_ROWS:
        for record in sorted(by_row.get(row, []), key=lambda r: r["seed"]):
            path = run_file(output, record).with_suffix(".generations.jsonl.gz")
            stats = answer_statistics(path) if path.exists() else None
            if stats is None:
                continue
            top = stats["top_answer"] if len(stats["top_answer"]) <= 40 else stats["top_answer"][:39] + "…"
            top = top.replace("|", "\\|").replace("`", "'")
            shares = (stats["top_answer_share"], stats["naming_no_candidate"], stats["naming_several"])
            lines.append(
                f"| {row} | {record['seed']} | {stats['users']:,} | {stats['distinct_answers']:,} | `{top}` | "
                + " | ".join(f"{share:.3f}" for share in shares)
                + " |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def render_markdown(dataset, planned, by_row, quick, output, stale=()):
    done = [record for records in by_row.values() for record in records]
    commits = sorted({record["commit"] for record in done})
    machines = sorted({record["hardware"] for record in done})
    total = sum(record["wall_seconds"] for record in done)
    cpu = sum(record["cpu_seconds"] for record in done if "cpu_seconds" in record)
    untimed = sum("cpu_seconds" not in record for record in done)  # runs recorded before CPU time was kept
    without = f" ({untimed} run(s) recorded without CPU time)" if untimed else ""
    properties = PROPERTIES / "dataset" / f"{'lastfm' if quick else dataset}.yaml"
    stats = dataset_statistics(dataset, quick)
    seeds = sorted({run["seed"] for run in planned})
    command = "python benchmarks/grid.py" + (" --quick" if quick else "")
    command += f" --datasets {dataset} --seeds {' '.join(map(str, seeds))}"
    out = [f"# {dataset}: iLoRA, uniform LoRA and RecBole's sequential baselines", ""]
    out += incomplete_grid_lines(len(done), len(planned), len(stale))
    out += uncommitted_lines(done)
    out += [
        f"Produced by `{command}` (rows: {', '.join(by_row)}), commit{'s' if len(commits) > 1 else ''} "
        f"{', '.join(f'`{c}`' for c in commits) or '–'}, on {'; '.join(machines) or '–'}. "
        f"Total compute of the finished runs: {total / 3600:.2f} h wall, {cpu / 3600:.2f} h CPU{without} (two runs "
        "share the 2 cores, so a run's wall time includes waiting; its CPU time does not). Mean ± sample standard "
        f"deviation over seeds {', '.join(map(str, seeds))}; the best mean per column is in bold. Raw per-run JSON: "
        f"`runs/{dataset}/`.",
        "",
        f"LLM rows' backbone (`llm_backbone`): {backbone_line(planned)}.",
        "",
        "## Full ranking (test)",
        "",
        "Every item is ranked for every test user (RecBole `full`). In this leave-one-out split each user has one "
        "target, so Recall@k equals Hit@k (both are in the raw JSON).",
        "",
        protocol_table(
            by_row, FULL_METRICS, lambda r: r["test"]["full"], [r for r in ROWS if r not in GENERATIVE_ROWS]
        ),
        "",
        "## 20 candidates (`uni19`, test)",
        "",
        "The target and 19 items sampled uniformly by RecBole's repeatable sampler (which excludes only the target), "
        "re-seeded with the run's seed before testing: every row of a seed ranks the same candidates.",
        "",
        protocol_table(by_row, SAMPLED_METRICS, lambda r: r["test"]["uni19"], list(ROWS)),
        "",
        "Rows marked `-generative` score each candidate by the mean log-likelihood of its title given a prompt "
        "listing the 20 candidates (in ascending item id), encoded once per user; the others by their scoring head.",
        "",
        "## The paper's protocol: a generated title among 20 candidates (test)",
        "",
        "Trained with the language-modelling loss on the answer title of a prompt listing the history and 20 "
        "candidates (the target and 19 items the user never interacted with, sampled by RecBole's sampler, seeded: "
        "the same lists for both rows), then answering greedily (`properties/generative.yaml`). ValidRatio: share "
        "of test users whose answer names exactly one candidate; HR@1 (valid) = correct / valid (the paper's; "
        "undefined for a run without a valid answer, so its mean is over the seeds where it is defined); "
        "HR@1 (all) = correct / users (RecBole's Hit@1). Every test user's candidates, answer and verdict: "
        "`runs/<run>.generations.jsonl.gz`.",
        "",
        protocol_table(by_row, GENERATIVE_METRICS, generative_metrics, GENERATIVE_ROWS),
        "",
        "What the models answered (from the same files; answers compared after stripping spaces at both ends):",
        "",
        answers_table(by_row, output) or "No generative run has finished.",
        "",
        *([] if quick else claims_lines(dataset, planned, by_row, output)),
        "## Does the gate differentiate users?",
        "",
        "Gate weights of every test user, from the best checkpoint of each run (`runs/<run>.gates.jsonl`). A gate "
        "that ignores the user has entropy ln K and a top weight of 1/K: its leading expert (the largest weight, ties "
        "to the lowest index) leads by a hair or by index alone, so read the shares of users led only next to the "
        "top weight; see "
        f"`{dataset}.gates.png` (first seed).",
        "",
        gate_table(by_row, output),
        "",
        *balance_lines(by_row),
        *([] if quick else earlier_lines(dataset, planned, output)),
        "## Rows",
        "",
        "| row | what it is | command of one run (seed shown for the first seed) |",
        "|---|---|---|",
    ]
    for row in by_row:
        run = next(r for r in planned if r["row"] == row)
        out.append(f"| {row} | {ROWS[row][3]} | `{run['command']}` |")
    out += [
        "",
        "Training budget: no hyperparameter was tuned for any row, on any split. RecBole's models use RecBole's "
        f"defaults and the budget of `{os.path.relpath(BASELINE_BUDGET, REPO)}` (early stopping on validation "
        "NDCG@10); the LLM rows use the plugin's shipped defaults: "
        f"{budgets_line([r for r in done if ROWS[r['row']][0] == 'llm'], planned) or '–'}; the SASRec encoder "
        f"uses `{os.path.relpath(ENCODER_BUDGET, REPO)}`. The LLM rows' wall time excludes the encoder's "
        "(its own row), which the shipped `--model=iLoRA` command spends first.",
        "",
        "## Dataset",
        "",
        f"{stats['users']:,} users, {stats['items']:,} items, {stats['interactions']:,} interactions "
        f"(mean {stats['mean_sequence_length']:.1f} per user, density {stats['density']:.4f}). Property file "
        f"`{os.path.relpath(properties, REPO)}`:",
        "",
        "```yaml",
        properties.read_text(encoding="utf-8").rstrip(),
        "```",
        "",
        "## Runs",
        "",
        "Epochs: those trained (the best checkpoint is tested); `stopped` says whether early stopping ended the run "
        "before the cap.",
        "",
        "| run | backbone | finished | epochs (cap) | stopped | wall min | CPU min | commit | machine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    out += run_rows(
        done,
        lambda record: [
            record.get("backbone") or "–",
            record["finished"],
            f"{record['epochs_run']} ({record['epochs_cap']})" if "epochs_run" in record else "–",
            {True: "yes", False: "no"}.get(record.get("stopped_early"), "–"),
            f"{record['wall_seconds'] / 60:.1f}",
            f"{record['cpu_seconds'] / 60:.1f}" if "cpu_seconds" in record else "–",
        ],
    )
    retrained = encoder_notes(planned, [*done, *stale], output)
    if retrained:
        out += [
            "",
            "## Encoders trained again",
            "",
            "These LLM runs were trained with an earlier run of their seed's `SASRec-encoder` (same configuration), "
            "whose checkpoint was lost with the machine's work folder; the encoder was then trained again for later "
            "rows, and the table's `SASRec-encoder` row is the new run. The earlier run's record is kept as "
            "`runs/<run>.superseded-<time>.json`. The same seed reproduces a run exactly on the same machine (tested, "
            "and checked on an ml-100k encoder); on another CPU the floating-point sums differ and so, slightly, "
            "do the metrics. Where the two encoder runs' valid and test metrics are identical, the LLM run is kept; "
            "otherwise the grid trains it again with the current encoder (so that every LLM row of a seed shares one "
            "encoder) and keeps this record as superseded; the tables leave it out.",
            "",
            "| LLM run | its encoder's record | that encoder: full NDCG@10, uni19 Hit@1 | "
            "current encoder: full NDCG@10, uni19 Hit@1 | this run |",
            "|---|---|---|---|---|",
            *retrained,
        ]
    return "\n".join(out) + "\n"


def earlier_records(dataset, planned, output):
    """The records in ``<output>/runs/<dataset>/`` of the plan's LLM rows that the plan no longer runs (an earlier
    budget or code: their hash differs), superseded records left out."""
    rows = {run["row"] for run in planned if run["kind"] == "llm"}
    ids = {run["run_id"] for run in planned}
    records = []
    for path in sorted(Path(output, "runs", dataset).glob("*-seed*-*.json")):
        if ".superseded-" in path.name or path.stem.count(".") or path.stem in ids:
            continue
        record = json.loads(path.read_text())
        if record.get("row") in rows and "test" in record:
            records.append(record)
    return records


def earlier_lines(dataset, planned, output):
    """``## Earlier budgets``: the LLM rows' earlier records (:func:`earlier_records`), grouped by row and budget, with
    the figures the tables above show for the current ones."""
    groups = collections.defaultdict(list)
    for record in earlier_records(dataset, planned, output):
        budget = record_budget(record)
        groups[(record["row"], json.dumps(budget, sort_keys=True))].append(record)
    if not groups:
        return []
    out = [
        "## Earlier budgets",
        "",
        "The same rows as recorded before their settings changed (kept in `runs/`, not in the tables above): each "
        "with the budget it was trained with, mean ± std over its seeds.",
        "",
        "| row | budget | seeds | full NDCG@10 | uni19 Hit@1 | HR@1 (all) | commits |",
        "|---|---|---|---|---|---|---|",
    ]
    for (row, budget), records in sorted(groups.items(), key=lambda item: list(ROWS).index(item[0][0])):
        full = [r["test"]["full"]["ndcg@10"] for r in records if "full" in r["test"]]
        uni19 = [r["test"]["uni19"]["hit@1"] for r in records if "uni19" in r["test"]]
        hr1 = [r["generative"]["hr@1_all"] for r in records if r.get("generative")]
        seeds = ", ".join(str(r["seed"]) for r in sorted(records, key=lambda r: r["seed"]))
        commits = ", ".join(f"`{c}`" for c in sorted({r["commit"] for r in records}))
        targets = {r.get("trained_targets") for r in records}
        label = budget_label(json.loads(budget), targets.pop() if len(targets) == 1 else None)
        out.append(
            f"| {row} | {label} | {seeds} | {fmt(*mean_std(full))} | {fmt(*mean_std(uni19))} | "
            f"{fmt(*mean_std(hr1))} | {commits} |"
        )
    return [*out, ""]


def claims_lines(dataset, planned, by_row, output):
    """The claims table and the targets (benchmarks/claims.py), with the SASRec encoder ranking the very candidates of
    each generative iLoRA run (computed once, cached next to the run)."""

    by_row = claims.with_partial_runs(by_row, planned, Path(output) / "partial" / dataset)
    encoder_results = {}
    here = data_path(dataset, quick=False)  # the encoders' checkpoints name the data folder of the checkout they ran in
    for record in by_row.get("iLoRA-generative", []):
        run = next(r for r in planned if r["run_id"] == record["run_id"])
        encoder_path = run_file(output, {"dataset": dataset, "run_id": run["encoder"]})
        generations = Path(record["_path"]).with_suffix(".generations.jsonl.gz")
        checkpoint = encoder_checkpoint(encoder_path) if encoder_path.exists() else None
        if checkpoint and generations.exists():
            cache = Path(record["_path"]).with_suffix(".encoder-on-candidates.json")
            encoder_results[record["seed"]] = claims.encoder_on_candidates(generations, checkpoint, cache, here)
    backbone = next((run["backbone"] for run in planned if run.get("backbone")), DEFAULT_BACKBONE)
    llm_records = [record for records in by_row.values() for record in records if ROWS[record["row"]][0] == "llm"]
    lines = claims.claims_section(dataset, by_row, backbone, budgets_line(llm_records, planned) or training_budget())
    lines += ["", *claims.targets_section(dataset, by_row, encoder_results)]
    lines += ["", *claims.cofirec_claims_section(by_row)]
    return [*lines, ""]


def encoder_notes(planned, done, output):
    """One table line per LLM run whose encoder checkpoint is not the one of its encoder's current record, and whether
    the grid keeps it or trains it again."""
    records = {record["run_id"]: record for record in done}
    lines = []

    def figures(record):
        machine = machine_of(record, missing="machine not recorded")
        return f"{record['test']['full']['ndcg@10']:.4f}, {record['test']['uni19']['hit@1']:.4f} ({machine})"

    for run in planned:
        record, encoder = records.get(run["run_id"]), records.get(run["encoder"])
        if not record or not encoder or used_current_encoder(record, encoder):
            continue
        used = earlier_encoder_record(run_file(output, encoder), record)
        name = f"`{superseded_name(run_file(output, encoder), used).name}`" if used else "not kept"
        out = figures(used) if used else "–"
        verdict = "kept: the encoder reproduced exactly" if same_encoder(used, encoder) else "to be trained again"
        lines.append(f"| {record['run_id']} | {name} | {out} | {figures(encoder)} | {verdict} |")
    return lines
