"""The command line of ``benchmarks/grid.py`` (see the package's docstring)."""

import argparse
import functools
from pathlib import Path

from benchmarks import gridlib
from benchmarks.gridlib.execution import execute, recover, run_lock, status_lines, worker
from benchmarks.gridlib.planning import plan
from benchmarks.gridlib.plots import plot_continual, plot_lapse
from benchmarks.gridlib.report_continual import render_continual
from benchmarks.gridlib.report_lapse import render_lapse
from benchmarks.gridlib.reports import page_and_chart_report, report
from benchmarks.gridlib.rows import (
    BACKBONES,
    CONTINUAL_DATASETS,
    CONTINUAL_ROWS,
    DATASETS,
    DEFAULT_BACKBONE,
    LAPSE_ROWS,
    QUICK_BACKBONE,
    QUICK_CONTINUAL_ROWS,
    QUICK_DATASETS,
    QUICK_ROWS,
    REPO,
    ROWS,
    SEEDS,
    default_rows,
)


def main():
    parser = argparse.ArgumentParser(description=gridlib.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", help=f"default: {' '.join(DATASETS)}")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), help="default: every row")
    parser.add_argument("--seeds", nargs="+", type=int, help=f"default: {' '.join(map(str, SEEDS))}")
    parser.add_argument("--output", help="results folder (default: results/)")
    parser.add_argument("--work", help="checkpoints and logs (default: <output>/../benchmarks/work or <output>/work)")
    parser.add_argument("--quick", action="store_true", help="tiny grid on tests/data/lastfm-tiny (minutes)")
    parser.add_argument(
        "--backbone",
        choices=list(BACKBONES),
        help=f"the LLM rows' llm_backbone (default: {DEFAULT_BACKBONE}; --quick: {QUICK_BACKBONE}); the default "
        "--output of the embedded backbone is results/embedded/",
    )
    parser.add_argument(
        "--protocol",
        choices=["standard", "lapse", "continual"],
        default="standard",
        help="standard: the datasets' leave-one-out split; lapse: CaseQ's temporal shift (results/lapse/); "
        "continual: PESO's time blocks, one model trained block after block (results/continual/; ml-100k)",
    )
    parser.add_argument("--status", action="store_true", help="list finished and pending runs, run nothing")
    parser.add_argument("--report-only", action="store_true", help="rewrite the reports from finished runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--recover",
        metavar="SPEC",
        help="write the record of a run whose worker died after testing, from its log (<work>/logs/<run>.spec.json)",
    )
    parser.add_argument("--recover-commit", help="with --recover: the commit the run was made with (default: HEAD)")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.recover:
        return recover(args.recover, args.recover_commit)

    # protocol: (default rows, and with --quick; its datasets; its results folder; its report)
    protocols = {
        "standard": (None, QUICK_ROWS, list(DATASETS), None, report),
        "lapse": (
            LAPSE_ROWS,
            ["SASRec", "CaseQ"],
            list(DATASETS),
            "lapse",
            functools.partial(page_and_chart_report, render_lapse, plot_lapse),
        ),
        "continual": (
            CONTINUAL_ROWS,
            QUICK_CONTINUAL_ROWS,
            CONTINUAL_DATASETS,
            "continual",
            functools.partial(page_and_chart_report, render_continual, plot_continual),
        ),
    }
    default_rows_of_protocol, quick_rows, protocol_datasets, folder, write_report = protocols[args.protocol]
    datasets = args.datasets or list(QUICK_DATASETS if args.quick else protocol_datasets)
    known = QUICK_DATASETS if args.quick else DATASETS
    for dataset in datasets:
        if dataset not in known:
            parser.error(f"unknown dataset {dataset!r} for this grid; choose from {list(known)}")
    backbone = args.backbone or (QUICK_BACKBONE if args.quick else DEFAULT_BACKBONE)
    defaults = quick_rows if args.quick else default_rows_of_protocol
    rows = args.rows or defaults or default_rows(backbone)
    seeds = args.seeds or (SEEDS[:1] if args.quick else SEEDS)
    if args.output:
        output = Path(args.output).resolve()
    else:
        output = REPO / "results" / (folder or ("" if backbone == DEFAULT_BACKBONE or args.quick else backbone))
    work = (
        Path(args.work).resolve()
        if args.work
        else (REPO / "benchmarks" / "work" if output == REPO / "results" else output / "work")
    )
    runs = plan(datasets, rows, seeds, args.quick, backbone, args.protocol)
    # The reports always cover the whole default grid of these datasets (missing runs shown as such), so that running
    # a subset of rows or seeds never drops finished rows from the tables.
    report_rows = sorted(set(rows) | set(defaults or default_rows(backbone)), key=list(ROWS).index)
    report_seeds = sorted(set(seeds) | set(SEEDS[:1] if args.quick else SEEDS))
    report_runs = plan(datasets, report_rows, report_seeds, args.quick, backbone, args.protocol)
    if args.status:
        print("\n".join(status_lines(report_runs, output)))
        return 0

    def write_reports():
        with run_lock(work, "reports", wait=True):  # one grid process at a time rewrites the shared reports
            write_report(report_runs, output, args.quick)

    failed = [] if args.report_only else execute(runs, output, work, write_reports)
    write_reports()
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", flush=True)
        return 1
    return 0
