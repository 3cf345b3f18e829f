"""Markdown pieces every protocol's report uses: mean and standard deviation over seeds, protocol tables, labels of
rows from uncommitted trees, budgets and backbones, the dataset's statistics."""

import collections
import functools
import json
import math
import statistics

from benchmarks.gridlib.planning import config_files, data_path, resolve_config
from benchmarks.gridlib.records import UNCOMMITTED, machine_of, record_budget
from benchmarks.gridlib.rows import BACKBONES, ROWS

LAPSE_METRICS = ["ndcg@10", "hit@10"]


# Each block's figures in the continual report: (test mode, metric).
CONTINUAL_METRICS = [("full", "ndcg@10"), ("uni19", "hit@1")]


FULL_METRICS = ["ndcg@5", "ndcg@10", "ndcg@20", "hit@1", "hit@5", "hit@10", "hit@20", "mrr@10"]


SAMPLED_METRICS = ["hit@1", "hit@5", "ndcg@5", "ndcg@10", "mrr@20"]


GENERATIVE_METRICS = ["valid_ratio", "hr@1_valid", "hr@1_all"]


def mean_std(values):
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(mean, std, digits=4):
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


@functools.cache
def dataset_statistics(dataset, quick):
    from recbole.data import create_dataset

    config_dict = {"show_progress": False}
    if data_path(dataset, quick):
        config_dict["data_path"] = data_path(dataset, quick)
    config = resolve_config("SASRec", dataset, config_files(dataset, "baseline", quick), config_dict)
    data = create_dataset(config)
    users, items = data.user_num - 1, data.item_num - 1
    return {
        "users": users,
        "items": items,
        "interactions": data.inter_num,
        "mean_sequence_length": data.inter_num / users,
        "density": data.inter_num / (users * items),
    }


def protocol_table(by_row, metrics, section, rows):
    """The ``rows`` of ``by_row`` as a table of ``section(record)``'s ``metrics`` (mean ± std over seeds)."""
    by_row = {row: records for row, records in by_row.items() if row in rows}
    values = {  # None: undefined for that seed (HR@1 (valid) without a valid answer), left out of the mean
        row: {metric: [v for r in records if (v := section(r)[metric]) is not None] for metric in metrics}
        for row, records in by_row.items()
        if records
    }
    stats = {row: {metric: mean_std(v) for metric, v in of_row.items()} for row, of_row in values.items()}
    means = {metric: [s[metric][0] for s in stats.values() if s[metric][0] is not None] for metric in metrics}
    best = {metric: max(means[metric], default=None) for metric in metrics}
    lines = [
        "| model | seeds | " + " | ".join(metrics) + " | trainable params | wall min/run | CPU min/run |",
        "|---|---|" + "---|" * len(metrics) + "---|---|---|",
    ]
    for row, records in by_row.items():
        if not records:
            lines.append(f"| {row} | 0 | " + " | ".join("–" for _ in metrics) + " | – | – | – |")
            continue
        cells = []
        for metric in metrics:
            mean, std = stats[row][metric]
            cell = fmt(mean, std)
            if mean is not None and math.isclose(mean, best[metric], rel_tol=0, abs_tol=1e-12):
                cell = f"**{cell}**"
            if len(values[row][metric]) < len(records):
                cell += f" ({len(values[row][metric])} of {len(records)} seeds)"
            cells.append(cell)
        params = records[0]["trainable_parameters"]
        minutes = statistics.fmean(r["wall_seconds"] for r in records) / 60
        timed = [r["cpu_seconds"] for r in records if "cpu_seconds" in r]
        cpu = f"{statistics.fmean(timed) / 60:.1f}" if timed else "–"
        lines.append(
            f"| {row_label(row, records)} | {len(records)} | " + " | ".join(cells) + f" | {params:,} | {minutes:.1f} | "
            f"{cpu} |"
        )
    return "\n".join(lines)


def generative_metrics(record):
    """A generative run's ValidRatio and HR@1s, HR@1 (valid) undefined (None) without a valid answer (records written
    before ``summarize_verdicts`` returned None there hold 0)."""
    metrics = dict(record["generative"])
    if not metrics["valid_ratio"]:
        metrics["hr@1_valid"] = None
    return metrics


def budget_label(budget, targets=None):
    """An LLM row's budget in words: ``1 epoch, batch 16; each user's 2 most recent windows (18,693 targets), a loss
    at every position, per-position gate, residual head``; the generative objective reads only the first part."""
    per_user = budget.get("llm_train_sequences_per_user")
    generative = budget.get("objective") == "generative"
    every = not generative and budget.get("llm_loss_positions") == "all"
    unit = "window" if every else "sequence"
    what = f"every training {unit}" if per_user is None else f"each user's {per_user} most recent training {unit}"
    what += "" if per_user == 1 else "s"
    if targets:
        what += f" ({targets:,} targets)"
    parts = [f"{budget.get('epochs')} epoch(s), batch {budget.get('train_batch_size')}; {what}"]
    if generative:
        parts.append("the answer title's tokens")
    else:
        parts.append("a loss at every position" if every else "the label only")
        if budget.get("gate_scope"):  # iLoRA's and UniformLoRA's keys (Laser has neither)
            parts.append(f"per-{budget['gate_scope']} gate")
        if budget.get("score_head"):
            parts.append(f"{budget['score_head']} head")
    if budget.get("compute_dtype", "float32") != "float32":  # float32 unless said
        parts.append(f"{budget['compute_dtype']} compute")
    return ", ".join(parts)


def budgets_line(records, planned=()):
    """The distinct budgets of ``records`` in words, with the targets each trained (ranges over seeds)."""
    labels, rows = collections.defaultdict(set), collections.defaultdict(dict)
    for record in records:
        budget = json.dumps(record_budget(record, planned), sort_keys=True)
        labels[budget].add(record.get("trained_targets"))
        rows[budget][record["row"]] = None
    out = []
    for budget, targets in labels.items():
        known = sorted(t for t in targets if t)
        span = None if not known else known[0] if known[0] == known[-1] else None
        text = budget_label(json.loads(budget), span)
        if known and span is None:
            text += f" ({known[0]:,} to {known[-1]:,} targets over seeds)"
        out.append(f"{', '.join(rows[budget])}: {text}")
    return "; ".join(out)


def backbone_line(planned):
    names = sorted({run["backbone"] for run in planned if run.get("backbone")})
    return "; ".join(f"`{name}`, {BACKBONES[name]}" for name in names) or "no LLM row"


def row_label(row, records):
    """``row``, marked † when one of its runs was recorded from a working tree with uncommitted changes."""
    return f"{row} †" if any(record.get("commit", "").endswith(UNCOMMITTED) for record in records) else row


def uncommitted_lines(records):
    """A footnote naming the runs marked † (:func:`row_label`); none without such runs."""
    runs = sorted(record["run_id"] for record in records if record.get("commit", "").endswith(UNCOMMITTED))
    if not runs:
        return []
    return [
        f"† {len(runs)} run(s) of the row were recorded from a working tree with uncommitted changes to the package, "
        "properties or benchmarks (before the grid refused such trees): their code is no commit exactly, their "
        f"figures are kept and marked: {', '.join(f'`{run}`' for run in runs)}.",
        "",
    ]


def incomplete_grid_lines(finished, planned, stale):
    """The report's warning while the grid is incomplete (none once it is): how many runs finished, and how many more
    were recorded with an encoder trained again since, which the tables leave out."""
    if finished >= planned:
        return []
    one = stale == 1
    waiting = (
        f" {stale} more {'was' if one else 'were'} trained with an earlier encoder and {'waits' if one else 'wait'} to "
        f'be trained again: the tables leave {"it" if one else "them"} out (see "Encoders trained again").'
        if stale
        else ""
    )
    return [f"**Incomplete grid: {finished} of {planned} runs finished.**{waiting} Rerun the command to resume.", ""]


def run_rows(done, cells):
    """The runs table's rows, one per finished run in seed then row order: its id, ``cells(record)`` (a list of
    strings), its commit and its machine."""
    return [
        f"| {record['run_id']} | " + " | ".join(cells(record)) + f" | {record['commit']} | {machine_of(record)} |"
        for record in sorted(done, key=lambda r: (r["seed"], list(ROWS).index(r["row"])))
    ]
