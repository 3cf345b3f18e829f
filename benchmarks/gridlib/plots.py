"""The grid's charts: rows per dataset, the lapse drop, the continual blocks, the gates' routing and PESO's strength."""

import json
from pathlib import Path

from benchmarks.gridlib.planning import run_file
from benchmarks.gridlib.report_continual import block_metric, lambda_curve
from benchmarks.gridlib.rows import GATE_PLOT_ROWS
from benchmarks.gridlib.tables import CONTINUAL_METRICS, LAPSE_METRICS, mean_std


def plot_lambda_curve(dataset, by_row, path):
    """Each metric against lambda (log scale), fine-tuning and L2 as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, references = lambda_curve(by_row)
    figure, axes = plt.subplots(1, len(CONTINUAL_METRICS), figsize=(12, 4.5))
    for axis, key in zip(axes, CONTINUAL_METRICS, strict=True):
        axis.plot([p[0] for p in points], [p[1][key] for p in points], marker="o", label="PESO (softmax-KL)")
        for (row, figures), style in zip(references.items(), ("--", ":"), strict=False):
            axis.axhline(figures[key], linestyle=style, color="grey", label=row)
        axis.set_xscale("log")
        axis.set_xlabel("lambda (the paper's: 2)")
        axis.set_title(f"{dataset}: {key[1]} ({key[0]}), mean over blocks 1..T-1, seed 2020")
        axis.legend(fontsize=8)
    save_figure(figure, path)


def save_figure(figure, path):
    """Lay out, write (110 dpi) and close a chart."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_rows(dataset, by_row, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for axis, (mode, metric) in zip(axes, [("full", "ndcg@10"), ("uni19", "hit@1")], strict=True):
        rows = [row for row, records in by_row.items() if records and mode in records[0]["test"]]
        colours = [
            "tab:red" if row.startswith("iLoRA") else "tab:blue" if row.startswith("UniformLoRA") else "tab:gray"
            for row in rows
        ]
        stats = [mean_std([r["test"][mode][metric] for r in by_row[row]]) for row in rows]
        axis.bar(rows, [m for m, _ in stats], yerr=[s or 0.0 for _, s in stats], color=colours, capsize=3)
        axis.set_title(f"{dataset}: {metric} ({mode}), mean ± std over seeds")
        axis.tick_params(axis="x", rotation=60)
    save_figure(figure, path)


def plot_lapse(dataset, by_row, path):
    """Under the lapse protocol: each model's NDCG@10 on the test without lapse next to the test with lapse (full
    ranking and uni100, mean ± std over seeds): how far each one falls when the test lies in the future."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row, records in by_row.items() if records]
    metric = LAPSE_METRICS[0]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, mode in zip(axes, ["full", "uni100"], strict=True):
        for offset, (test, label, colour) in enumerate(
            [(f"{mode}_no_lapse", "without lapse", "tab:blue"), (mode, "with lapse", "tab:orange")]
        ):
            stats = [mean_std([r["test"][test][metric] for r in by_row[row]]) for row in rows]
            positions = [index + (offset - 0.5) * 0.4 for index in range(len(rows))]
            axis.bar(
                positions,
                [m for m, _ in stats],
                width=0.4,
                yerr=[s or 0.0 for _, s in stats],
                capsize=3,
                color=colour,
                label=label,
            )
        axis.set_xticks(range(len(rows)), rows, rotation=30)
        axis.set_title(f"{dataset}: {metric} ({mode}), mean ± std over seeds")
        axis.margins(y=0.25)  # room above the bars for the legend
        axis.legend(loc="upper right")
    save_figure(figure, path)


def plot_continual(dataset, by_row, path):
    """Under the continual protocol: each row's test figures block by block (mean over seeds, std as error bars);
    with two lambdas of PESO finished, also ``<dataset>-lambda.png`` (:func:`plot_lambda_curve`)."""
    if len(lambda_curve(by_row)[0]) >= 2:
        plot_lambda_curve(dataset, by_row, Path(path).with_name(f"{dataset}-lambda.png"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(CONTINUAL_METRICS), figsize=(12, 4.5))
    for axis, (mode, metric) in zip(axes, CONTINUAL_METRICS, strict=True):
        for row, records in by_row.items():
            blocks = sorted({b["block"] for r in records for b in r["blocks"]})
            if not blocks:
                continue
            stats = [
                mean_std([v for r in records if (v := block_metric(r, b, mode, metric)) is not None]) for b in blocks
            ]
            axis.errorbar(
                blocks,
                [m for m, _ in stats],
                yerr=[s or 0.0 for _, s in stats],
                marker="o",
                capsize=3,
                label=row,
                linestyle="--" if row.endswith("cumulative") else "-",
            )
        axis.set_xlabel("time block")
        axis.set_title(f"{dataset}: {metric} ({mode}) per block, mean ± std over seeds")
        axis.legend(fontsize=8)
    save_figure(figure, path)


def plot_gates(dataset, by_row, output, path):
    from recbole_ilora.gate_report import plot_routing

    named = {}
    for row in GATE_PLOT_ROWS:
        records = sorted(by_row.get(row, []), key=lambda r: r["seed"])
        if records:
            gates = run_file(output, {"dataset": dataset, "run_id": records[0]["run_id"]}).with_suffix(".gates.jsonl")
            named[f"{row} (seed {records[0]['seed']})"] = [json.loads(line) for line in gates.read_text().splitlines()]
    if named:
        plot_routing(named, path, title=f"{dataset}: how test users are routed over the experts")
