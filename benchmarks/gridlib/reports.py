"""Writing every report of the standard protocol, and the page-and-chart pair of the other protocols."""

from pathlib import Path

from benchmarks.gridlib.plots import plot_gates, plot_rows
from benchmarks.gridlib.readme import update_readme
from benchmarks.gridlib.records import recorded_runs
from benchmarks.gridlib.report_standard import render_markdown
from benchmarks.gridlib.rows import REPO, ROWS


def per_dataset(runs, output):
    """For each dataset of the plan: its planned runs, the records shown, those to be trained again, and the shown
    records by row (every planned row, in the grid's order)."""
    for dataset in dict.fromkeys(run["dataset"] for run in runs):
        planned = [run for run in runs if run["dataset"] == dataset]
        done, stale = recorded_runs(planned, output)
        rows = sorted({run["row"] for run in planned}, key=list(ROWS).index)
        yield dataset, planned, done, stale, {row: [record for record in done if record["row"] == row] for row in rows}


def report(runs, output, quick):
    """Write ``<output>/<dataset>.md`` and its PNGs from the finished runs of the plan."""
    for dataset, planned, done, stale, by_row in per_dataset(runs, output):
        markdown = render_markdown(dataset, planned, by_row, quick, output, stale)
        Path(output, f"{dataset}.md").write_text(markdown, encoding="utf-8")
        if Path(output).resolve() == (REPO / "results").resolve():
            update_readme(dataset, markdown, len(done), len(planned))
        if done:
            plot_rows(dataset, by_row, Path(output, f"{dataset}.png"))
            plot_gates(dataset, by_row, output, Path(output, f"{dataset}.gates.png"))
        print(f"wrote {Path(output, dataset + '.md')} ({len(done)} of {len(planned)} runs)", flush=True)


def page_and_chart_report(render, plot, runs, output, quick):
    """Write ``<output>/<dataset>.md`` (``render``) and, once a run has finished, ``<output>/<dataset>.png``
    (``plot``): the report of the lapse protocol (both tests per mode, the relative drop, CaseQ's claim) and of the
    continual protocol (each block's figures, their mean over blocks 1 .. T - 1, the cost per block, PESO's claim)."""
    for dataset, planned, done, _, by_row in per_dataset(runs, output):
        Path(output, f"{dataset}.md").write_text(render(dataset, planned, by_row, quick, done), encoding="utf-8")
        if done:
            plot(dataset, by_row, Path(output, f"{dataset}.png"))
        print(f"wrote {Path(output, dataset + '.md')} ({len(done)} of {len(planned)} runs)", flush=True)
