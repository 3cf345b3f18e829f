"""CaseQ's lapse protocol's report (``results/lapse/<dataset>.md``): each row tested without and with the lapse."""

import os
import statistics

from benchmarks import claims
from benchmarks.gridlib.planning import shipped
from benchmarks.gridlib.rows import BASELINE_BUDGET, LAPSE_PROPERTIES, QUICK_LAPSE, REPO
from benchmarks.gridlib.tables import (
    LAPSE_METRICS,
    backbone_line,
    fmt,
    incomplete_grid_lines,
    mean_std,
    row_label,
    run_rows,
    uncommitted_lines,
)


def render_lapse(dataset, planned, by_row, quick, done):

    seeds = sorted({run["seed"] for run in planned})
    lapse = QUICK_LAPSE if quick else shipped(LAPSE_PROPERTIES)["lapse"]
    command = "python benchmarks/grid.py --protocol lapse" + (" --quick" if quick else "")
    command += f" --datasets {dataset} --seeds {' '.join(map(str, seeds))}"
    modes = ["full", "uni100"]
    out = [f"# {dataset} under temporal shift: the lapse protocol (L = {lapse})", ""]
    out += incomplete_grid_lines(len(done), len(planned), 0)
    out += uncommitted_lines(done)
    out += [
        f"Produced by `{command}`; commits {', '.join(sorted({r['commit'] for r in done})) or '–'}, on "
        f"{'; '.join(sorted({r['hardware'] for r in done})) or '–'}. Each user's events in time order: training on "
        f"all but the last {2 + lapse}, validation (early stopping, full NDCG@10) on event -{2 + lapse}, test "
        f"without lapse on event -{1 + lapse}, test with lapse on the last event from the full history "
        "(`recbole_ilora/lapse.py`); users with fewer events are trained on and not evaluated. Drop: (without - "
        "with) / without, per seed, then mean ± std over seeds. RecBole's models train until early stopping fires "
        f"(`{os.path.relpath(BASELINE_BUDGET, REPO)}`); LLM rows: {backbone_line(planned)}, the shipped budget.",
        "",
        f"![both tests per model]({dataset}.png)",
        "",
        "| model | seeds | "
        + " | ".join(
            f"{mode} {metric} {which}"
            for mode in modes
            for metric in LAPSE_METRICS[:1]
            for which in ("without lapse", "with lapse", "drop")
        )
        + " | epochs | wall min/run |",
        "|---|---|" + "---|" * (3 * len(modes)) + "---|---|",
    ]
    for row, records in by_row.items():
        if not records:
            out.append(f"| {row} | 0 | " + " | ".join("–" for _ in range(3 * len(modes))) + " | – | – |")
            continue
        cells = []
        for mode in modes:
            metric = LAPSE_METRICS[0]
            for values in (
                [r["test"][f"{mode}_no_lapse"][metric] for r in records],
                [r["test"][mode][metric] for r in records],
                [d for r in records if (d := r["lapse_drops"][mode][metric]) is not None],
            ):
                cells.append(fmt(*mean_std(values)))
        epochs = ", ".join(str(r.get("epochs_run", "–")) for r in sorted(records, key=lambda r: r["seed"]))
        minutes = statistics.fmean(r["wall_seconds"] for r in records) / 60
        out.append(
            f"| {row_label(row, records)} | {len(records)} | " + " | ".join(cells) + f" | {epochs} | {minutes:.1f} |"
        )
    out += ["", "## The paper's claim: CaseQ's drop is smaller than its backbone's", ""]
    out += ["| unit | CaseQ's drop | the backbone's drop | verdict |", "|---|---|---|---|"]
    for caseq, backbone in (("CaseQ", "SASRec"), ("CaseQ-gru", "GRU4Rec")):
        for mode in modes:

            def drop(record, mode=mode):
                return record["lapse_drops"][mode][LAPSE_METRICS[0]]

            a, b = claims.summary(by_row.get(caseq, []), drop), claims.summary(by_row.get(backbone, []), drop)
            if not a or not b:
                cells = f"{claims.fmt_summary(a)} | {claims.fmt_summary(b)}"
                out.append(f"| {caseq} vs {backbone} ({mode}) | {cells} | not measured |")
                continue
            d = claims.in_std_units(b, a)  # the claim: CaseQ's drop is the smaller
            verdict = claims.verdict_words(d, None, b["mean"] > a["mean"])
            out.append(
                f"| {caseq} vs {backbone} ({mode}, {LAPSE_METRICS[0]}) | {claims.fmt_summary(a)} | "
                f"{claims.fmt_summary(b)} | {verdict} |"
            )
    out += ["", "## Runs", "", "| run | finished | epochs (cap) | wall min | commit | machine |", "|---" * 6 + "|"]
    out += run_rows(
        done,
        lambda record: [
            record["finished"],
            f"{record.get('epochs_run')} ({record.get('epochs_cap')})",
            f"{record['wall_seconds'] / 60:.1f}",
        ],
    )
    return "\n".join(out) + "\n"
