"""PESO's continual protocol's report (``results/continual/<dataset>.md``): every block, the mean over later blocks,
the proximal term's weight and the curve over PESO's strength."""

import functools
import statistics

from benchmarks import claims
from benchmarks.gridlib.planning import shipped, training_budget
from benchmarks.gridlib.rows import CONTINUAL_PROPERTIES, LAMBDA_ROWS, QUICK_CONTINUAL_BLOCKS, ROWS
from benchmarks.gridlib.tables import (
    CONTINUAL_METRICS,
    backbone_line,
    fmt,
    incomplete_grid_lines,
    mean_std,
    row_label,
    run_rows,
    uncommitted_lines,
)


def block_metric(record, block, mode, metric):
    """A continual record's test figure on ``block`` (None if that block did not run)."""
    blocks = [b for b in record["blocks"] if b["block"] == block]
    return blocks[0]["test"][mode][metric] if blocks else None


def later_mean(record, mode, metric):
    """A continual record's figure averaged over blocks 1 .. T - 1 (None until every block has run)."""
    if len(record["blocks"]) < record["blocks_total"]:
        return None
    return record["mean_over_later_blocks"][mode][metric]


def render_continual(dataset, planned, by_row, quick, done):

    seeds = sorted({run["seed"] for run in planned})
    blocks = QUICK_CONTINUAL_BLOCKS if quick else shipped(CONTINUAL_PROPERTIES)["continual_blocks"]
    command = "python benchmarks/grid.py --protocol continual" + (" --quick" if quick else "")
    command += f" --datasets {dataset} --seeds {' '.join(map(str, seeds))}"
    budget = training_budget(scope="in each block, for every row")
    if done:  # what the runs did (the quick grid's epochs differ from the shipped default)
        epochs, per_user = done[0]["epochs_cap"], done[0]["llm_train_sequences_per_user"]
        budget = f"{epochs} epoch(s) on each user's {per_user} most recent training sequence(s) in each block"
    out = [f"# {dataset}: continual training over {blocks} time blocks (PESO's setting)", ""]
    out += incomplete_grid_lines(len(done), len(planned), 0)
    out += uncommitted_lines(done)
    out += [
        f"Produced by `{command}` (one process per core; rerun to resume: a killed run restarts at its block); commits "
        f"{', '.join(sorted({r['commit'] for r in done})) or '–'}, on "
        f"{'; '.join(sorted({r['hardware'] for r in done})) or '–'}. The interactions in time order cut into "
        f"{blocks} blocks of equal size; for block t, each user with at least 3 events in it trains on them but the "
        "last two (histories reach into earlier blocks), validates on the second-to-last and is tested on the last "
        "(`recbole_ilora/continual.py`). Before each block, the frozen SASRec encoder is trained on all data up to it, "
        "once per seed, and every row reads the same encoders. Block 0 trains from scratch; later blocks start from "
        "the previous block's best weights at a tenth of the learning rate, except `cumulative`, which retrains from "
        f"scratch on every block up to t. Backbone: {backbone_line(planned)}. Budget: {budget}. Nothing is tuned, "
        "except the L2 row's weight, chosen among 0.1, 1 and 10 on block 1's validation, as the issue asks.",
        "",
    ]
    for mode, metric in CONTINUAL_METRICS:
        out += [f"## {metric} ({mode}) per block, mean ± std over seeds", ""]
        if mode == CONTINUAL_METRICS[0][0]:
            out += [f"![per block]({dataset}.png)", ""]
        header = " | ".join(f"block {b}" for b in range(blocks))
        out += [f"| row | seeds | {header} | mean over blocks 1..{blocks - 1} |", "|---|---|" + "---|" * (blocks + 1)]
        for row, records in by_row.items():
            cells = []
            for block in range(blocks):
                values = [v for r in records if (v := block_metric(r, block, mode, metric)) is not None]
                cells.append(fmt(*mean_std(values)) if values else "–")
            later = [v for r in records if (v := later_mean(r, mode, metric)) is not None]
            cells.append(f"**{fmt(*mean_std(later))}**" if later else "–")
            out.append(f"| {row_label(row, records)} | {len(records)} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["## The paper's claim: PESO beats single evolving LoRA and cumulative retraining", ""]
    out += [
        f"Each row's figure averaged over blocks 1..{blocks - 1}, per seed, then mean ± std over seeds, for each "
        "metric above; d: the difference in pooled standard deviations; a verdict needs |d| ≥ 2 (one seed gives "
        "none).",
        "",
        "| comparison | metric | PESO | the other | verdict |",
        "|---|---|---|---|---|",
    ]
    comparisons = (
        ("UniformLoRA-peso", "UniformLoRA-finetune"),
        ("UniformLoRA-peso", "UniformLoRA-cumulative"),
        ("UniformLoRA-peso", "UniformLoRA-l2"),
        ("iLoRA-peso", "iLoRA-finetune"),
        ("CoFiRec-peso", "CoFiRec-finetune"),
        ("CoFiRec-peso", "CoFiRec-cumulative"),
        ("CoFiRec-peso", "CoFiRec-l2"),
    )
    for mode, metric in CONTINUAL_METRICS:
        for peso, other in comparisons:
            if peso not in by_row or other not in by_row:
                continue
            a = claims.summary(by_row[peso], functools.partial(later_mean, mode=mode, metric=metric))
            b = claims.summary(by_row[other], functools.partial(later_mean, mode=mode, metric=metric))
            if not a or not b:
                verdict = "not measured"
            else:
                verdict = claims.verdict_words(claims.in_std_units(a, b), None, a["mean"] > b["mean"])
            out.append(
                f"| {peso} vs {other} | {metric} ({mode}) | {claims.fmt_summary(a)} | "
                f"{claims.fmt_summary(b)} | {verdict} |"
            )
    out += ["", "## Blocks and cost", ""]
    out += [
        "Each block's users and training sequences (from the first seed's run of each row; `cumulative` trains on "
        "every block up to t), and the wall minutes a block took (mean over seeds: its encoder, when this row "
        "trained it, its training and its tests).",
        "",
    ]
    out += [
        "| row | " + " | ".join(f"block {b}: users, sequences (trained), min" for b in range(blocks)) + " |",
        "|---|" + "---|" * blocks,
    ]
    for row, records in by_row.items():
        if not records:
            continue
        first = min(records, key=lambda r: r["seed"])
        cells = []
        for block in range(blocks):
            mine = [b for b in first["blocks"] if b["block"] == block]
            minutes = [b["wall_seconds"] / 60 for r in records for b in r["blocks"] if b["block"] == block]
            if not mine:
                cells.append("–")
                continue
            b = mine[0]
            cells.append(
                f"{b['users']}, {b['training_sequences']} ({b['trained_sequences']}), {statistics.fmean(minutes):.1f}"
            )
        out.append(f"| {row} | " + " | ".join(cells) + " |")
    l2 = [r for r in by_row.get("UniformLoRA-l2", []) if r.get("l2_weight") is not None]
    if l2:
        out += [
            "",
            "The L2 row's weight, chosen on block 1's validation (valid NDCG@10 of each weight): "
            + "; ".join(f"seed {r['seed']}: {r['l2_weight']} ({r['l2_selection']})" for r in l2)
            + ".",
        ]
    out += proximal_share_lines(by_row)
    out += lambda_curve_lines(dataset, by_row)
    header = "| run | what it is | finished | blocks | wall min | commit | machine |"
    out += ["", "## Runs", "", header, "|---" * 7 + "|"]
    out += run_rows(
        done,
        lambda record: [
            ROWS[record["row"]][3],
            record["finished"],
            f"{len(record['blocks'])} of {record['blocks_total']}",
            f"{record['wall_seconds'] / 60:.1f}",
        ],
    )
    return "\n".join(out) + "\n"


def lambda_curve(by_row, seed=2020):
    """Issue 45's curve, seed ``seed``: ``[(lambda, {(mode, metric): mean over blocks 1..T-1}, gradient ratio)]`` of
    every PESO row that has finished, by lambda, and the same figures of fine-tuning and L2 (``{row: figures}``)."""
    points, references = [], {}
    for row, records in by_row.items():
        record = next((r for r in records if r["seed"] == seed), None)
        if record is None or later_mean(record, *CONTINUAL_METRICS[0]) is None:
            continue
        figures = {(mode, metric): later_mean(record, mode, metric) for mode, metric in CONTINUAL_METRICS}
        if row in LAMBDA_ROWS:
            shares = [b.get("proximal") for b in record["blocks"] if b["block"] > 0]
            ratio = statistics.fmean(s["grad_norm_ratio"] for s in shares) if shares and all(shares) else None
            points.append((LAMBDA_ROWS[row], figures, ratio))
        elif row in ("UniformLoRA-finetune", "UniformLoRA-l2"):
            references[row] = figures
    return sorted(points, key=lambda point: point[0]), references


def lambda_curve_lines(dataset, by_row):
    """The report's section on the strength of PESO's term (issue 45): a line per lambda, fine-tuning and L2 beside."""
    points, references = lambda_curve(by_row)
    if len(points) < 2:
        return []
    metrics = " | ".join(f"{metric} ({mode})" for mode, metric in CONTINUAL_METRICS)
    lines = [
        "",
        "## The strength of PESO's term (issue 45), seed 2020",
        "",
        f"![metric against lambda]({dataset}-lambda.png)",
        "",
        "UniformLoRA with PESO's softmax-KL term at lambda 2 (the paper's) and larger, each figure the mean over "
        "blocks 1 .. T - 1; the term's gradient norm over the task loss's (mean over later blocks) says how hard "
        "it pulls; fine-tuning (no term) and L2 (its chosen weight) of the same seed beside.",
        "",
        f"| row | lambda | gradient ratio | {metrics} |",
        "|---|---|---|" + "---|" * len(CONTINUAL_METRICS),
    ]
    for value, figures, ratio in points:
        cells = " | ".join(f"{figures[key]:.4f}" for key in CONTINUAL_METRICS)
        lines.append(f"| PESO | {value:g} | {'–' if ratio is None else f'{ratio:.3g}'} | {cells} |")
    for row, figures in references.items():
        lines.append(f"| {row} | – | – | " + " | ".join(f"{figures[key]:.4f}" for key in CONTINUAL_METRICS) + " |")
    return lines


def proximal_share_lines(by_row):
    """How much the proximal term weighed in training: per penalised row and seed, the weighted term and the ratio of
    its gradient's norm to the task loss's over the adapter, mean over blocks 1 .. T - 1 (each block's value is its
    mean over batches; runs from before the plugin recorded them say so)."""
    rows = []
    for row, records in by_row.items():
        for record in sorted(records, key=lambda r: r["seed"]):
            later = [b for b in record["blocks"] if b["block"] > 0 and b.get("penalty") not in (None, "none")]
            if not later:
                continue
            shares = [b.get("proximal") for b in later]
            if any(share is None for share in shares):
                rows.append(f"| {row} | {record['seed']} | {later[0]['penalty_weight']} | not recorded | – | – | – |")
                continue
            keys = ("term", "penalty_grad_norm", "task_grad_norm", "grad_norm_ratio")
            means = [statistics.fmean(share[key] for share in shares) for key in keys]
            rows.append(
                f"| {row} | {record['seed']} | {later[0]['penalty_weight']} | "
                + " | ".join(f"{value:.3g}" for value in means)
                + " |"
            )
    if not rows:
        return []
    return [
        "",
        "## The proximal term's weight in training",
        "",
        "Mean over blocks 1 .. T - 1 of each block's mean over its training batches: the weighted term "
        "(weight x penalty; the task loss is a cross-entropy of order log(#items)), the L2 norms over the "
        "adapter's matrices of its gradient and of the task loss's gradient, and their ratio.",
        "",
        "| row | seed | weight | weighted term | its gradient norm | task gradient norm | ratio |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
