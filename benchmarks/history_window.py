"""Which history window the LLM's prompt should read (issue 42): iLoRA trained and validated at several
``MAX_ITEM_LIST_LENGTH`` values with the same number of training targets, each with its own SASRec encoder.

    python benchmarks/history_window.py --windows 5 20          # trains what is missing (about 40 CPU-min a window)
    python benchmarks/history_window.py --readme-run results/default-command/iLoRA-ml-100k-<commit>-<date>.json
    python benchmarks/history_window.py --report                # results/history_window/<dataset>.{md,png}

The window is one key for both parts: the prompt lists the last L items and the frozen SASRec encoder that feeds the
gate, the projector and the residual head reads the same L (it is pretrained with the shipped ``sasrec_*`` keys, as
the README command does). Every window gets the shipped head objective's budget in items, not in windows: each
user's ``--items-per-user // L`` most recent training windows (20 items: L = 5 reads 4 windows, 10 reads 2, the
shipped default, 20 reads 1), so every window trains on about 18.7k targets of ml-100k. The window chosen is the one
with the best validation full NDCG@10 of iLoRA (RecBole's ``valid_metric``), if it beats the shipped window (10) by
more than 0.006, about one standard error over ml-100k's 943 users; otherwise the shipped window stays. The test
figures are reported, never used to choose.

Each window runs in a process of its own and writes ``results/history_window/<dataset>-L<L>-seed<seed>.json``
(validation and test metrics of iLoRA and of its encoder, budget, timings, commit, machine) when it has finished; a
finished window is not run again. A killed window resumes from its last training state (written every 10 training
batches) with the encoder it trained with; one killed while its encoder was pretraining pretrains it again.
Checkpoints and RecBole's logs go to ``--work``. Refuses a checkout with uncommitted code, properties or benchmarks.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.gridlib.planning import data_path  # noqa: E402
from benchmarks.gridlib.plots import save_figure  # noqa: E402
from benchmarks.gridlib.records import write_json_atomically  # noqa: E402
from benchmarks.gridlib.rows import PROPERTIES, QUICK  # noqa: E402
from benchmarks.machine import git_commit, hardware  # noqa: E402

FOLDER = REPO / "results" / "history_window"
WINDOWS = (5, 10, 20)
SHIPPED_WINDOW = 10  # properties/dataset/*.yaml's MAX_ITEM_LIST_LENGTH
MARGIN = 0.006  # about one standard error of full NDCG@10 over ml-100k's 943 users (docs/benchmark.md, learning curve)
QUICK_FILES = (PROPERTIES / "dataset" / "lastfm.yaml", QUICK)  # --quick: the tiny LastFM fixture, tiny models


def windows_per_user(window, items_per_user):
    """Training windows per user that give ``items_per_user`` targets at this ``window`` (at least one)."""
    return max(1, items_per_user // window)


def record_file(output, dataset, window, seed):
    return Path(output) / f"{dataset}-L{window}-seed{seed}.json"


def chosen_window(records, shipped=SHIPPED_WINDOW, margin=MARGIN):
    """The window of the record with the best validation score (RecBole's ``valid_metric``; a tie goes to the shorter
    window, the cheaper prompt), unless the ``shipped`` window was measured too and the best beats it by no more than
    ``margin``: a change of the default must be larger than one standard error of the metric."""
    if not records:
        raise ValueError("no finished window to choose from")
    best = max(records, key=lambda record: (record["best_valid_score"], -record["window"]))
    default = next((record for record in records if record["window"] == shipped), None)
    if default is not None and best["best_valid_score"] - default["best_valid_score"] <= margin:
        return shipped
    return best["window"]


def last_training_state(folder, model):
    """The newest ``<model>-*.training_state.pth`` in ``folder`` (a killed run's), or None."""
    states = sorted(glob.glob(str(Path(folder) / f"{model}-*.training_state.pth")), key=os.path.getmtime)
    return states[-1] if states else None


def run_window(args, window):
    """Train, validate and test iLoRA at one window in this process; write its record."""
    import torch

    from recbole_ilora.checkpoints import safe_load
    from recbole_ilora.model.sequence_encoder import read_sasrec_checkpoint
    from recbole_ilora.quick_start import run_recbole_ilora

    work = (Path(args.work) / "history_window" / f"{args.dataset}-L{window}-seed{args.seed}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # RecBole's log/ and log_tensorboard/ go next to the checkpoints
    per_user = windows_per_user(window, args.items_per_user)
    config_dict = {
        "seed": args.seed,
        "MAX_ITEM_LIST_LENGTH": window,
        "llm_train_sequences_per_user": per_user,
        "checkpoint_dir": str(work),
        "show_progress": False,
    }
    state = last_training_state(work, args.model)
    if state:
        config_dict["resume_checkpoint"] = state
        print(f"L = {window}: resuming from {state}", flush=True)
    files = [str(QUICK_FILES[0]), str(QUICK_FILES[1])] if args.quick else None
    if data_path(args.dataset, args.quick):
        config_dict["data_path"] = data_path(args.dataset, args.quick)
    commit = git_commit()
    argv, sys.argv = sys.argv, sys.argv[:1]  # RecBole's Config reads --key=value from the command line
    try:
        result = run_recbole_ilora(args.model, args.dataset, files, config_dict)
    finally:
        sys.argv = argv
    encoder_file = safe_load(result["saved_model_file"], "saved_model_file")["config"]["sasrec_checkpoint"]
    encoder = read_sasrec_checkpoint(encoder_file)
    command = f"python run_recbole_ilora.py --model={args.model} --dataset={args.dataset} " + " ".join(
        f"--{key}={value}" for key, value in config_dict.items() if key in ("seed", "MAX_ITEM_LIST_LENGTH",
                                                                              "llm_train_sequences_per_user")
    )  # fmt: skip
    record = {
        "model": args.model, "dataset": args.dataset, "seed": args.seed, "window": window,
        "items_per_user": args.items_per_user, "windows_per_user": per_user, "command": command,
        "commit": commit, "machine": hardware(), "torch_threads": torch.get_num_threads(),
        "trained_sequences": result["trained_sequences"], "trained_targets": result["trained_targets"],
        "best_valid_score": result["best_valid_score"],
        "valid": {key: float(value) for key, value in (result["best_valid_result"] or {}).items()},
        "test": {mode: {k: float(v) for k, v in metrics.items()} for mode, metrics in result["test_results"].items()},
        "sasrec_checkpoint": encoder_file, "encoder_window": encoder["config"]["MAX_ITEM_LIST_LENGTH"],
        "encoder_best_valid_score": float(encoder["best_valid_score"]),
        "encoder_best_epoch": int(encoder["epoch"]) + 1,  # the epoch (from 1) of its best validation
        "encoder_test": {mode: {k: float(v) for k, v in metrics.items()}
                         for mode, metrics in result["encoder_test_results"].items()},
        "timings": result["timings"], "cpu_timings": result["cpu_timings"], "train_losses": result["train_losses"],
        "resumed": bool(state),
    }  # fmt: skip
    write_json_atomically(record_file(args.output, args.dataset, window, args.seed), record)
    scores = record["best_valid_score"], record["encoder_best_valid_score"]
    print(f"L = {window}: valid NDCG@10 {scores[0]:.4f} (encoder {scores[1]:.4f})")


def import_readme_run(path, output):
    """The shipped window's record from a committed run of the README command (``results/default-command/``, made by
    ``benchmarks/readme_command.py``): the same command, defaults and seed on ml-100k, so the same run as this script's
    L = 10, read from its JSON and its log (validation figures). Its thread count was torch's default (the machine's
    2 cores) and its CPU time per phase was not logged then."""
    import re

    from benchmarks.readme_command import ordered_dict

    run = json.loads(Path(path).read_text())
    log = (Path(path).parent / run["log"]).read_text(encoding="utf-8", errors="replace")
    valid = ordered_dict(re.findall(r"best valid : (OrderedDict\(.*\))\n", log)[-1])
    budget = re.findall(r"LLM training budget: (\d+) windows of \d+ training sequences, (\d+) targets", log)[-1]
    items_per_user = 2 * SHIPPED_WINDOW
    record = {
        "model": "iLoRA", "dataset": "ml-100k", "seed": run["seed"], "window": SHIPPED_WINDOW,
        "items_per_user": items_per_user, "windows_per_user": windows_per_user(SHIPPED_WINDOW, items_per_user),
        "command": run["command"].split(" && ")[-1], "commit": run["commit"],
        "machine": f"{run['cores']} x {run['cpu']}, no GPU", "torch_threads": None,
        "trained_sequences": int(budget[0]), "trained_targets": int(budget[1]),
        "best_valid_score": valid["ndcg@10"], "valid": valid, "test": run["test"],
        "encoder_best_valid_score": float(re.findall(r"SASRec encoder: best valid NDCG@10 = ([\d.]+)", log)[-1]),
        "encoder_window": SHIPPED_WINDOW, "encoder_test": run["encoder_test"],
        "timings": run["timings"], "cpu_timings": None, "source": str(Path(path).resolve().relative_to(REPO)),
    }  # fmt: skip
    assert record["trained_targets"] == run["trained_targets"]
    write_json_atomically(record_file(output, "ml-100k", SHIPPED_WINDOW, run["seed"]), record)
    print(f"L = {SHIPPED_WINDOW} from {path}: valid NDCG@10 {record['best_valid_score']:.4f}")


def train_minutes(record):
    """'CPU (wall)' minutes of the training phase; the wall alone where CPU time was not recorded."""
    wall = record["timings"]["training"] / 60
    if record.get("cpu_timings"):
        return f"{record['cpu_timings']['training'] / 60:.1f} ({wall:.1f})"
    return f"– ({wall:.1f})"


def report(output, dataset, seed):
    """``<dataset>.md`` (one row per window, the chosen one named) and ``<dataset>.png`` from the records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = sorted(
        (json.loads(path.read_text()) for path in Path(output).glob(f"{dataset}-L*-seed{seed}.json")),
        key=lambda record: record["window"],
    )
    if not records:
        raise SystemExit(f"no finished window of {dataset}, seed {seed}, in {output}")
    chosen = chosen_window(records)
    ran = [r for r in records if not r.get("source")]
    lines = [
        f"# The LLM's history window on {dataset} (iLoRA, seed {seed}; issue 42)",
        "",
        f"`python benchmarks/history_window.py --windows {' '.join(str(r['window']) for r in ran) or '-'}`"
        + "".join(f", `--readme-run {r['source']}`" for r in records if r.get("source"))
        + f", then `--report`. Each window L is iLoRA's shipped defaults with `MAX_ITEM_LIST_LENGTH = L` for both the "
        f"prompt and its SASRec encoder (pretrained by the run with the shipped `sasrec_*` keys) and the same "
        f"training budget in items: each user's {records[0]['items_per_user']} // L most recent training windows. "
        f"Chosen on validation full NDCG@10 (iLoRA), the shipped L = {SHIPPED_WINDOW} kept unless another window beats "
        f"it by more than {MARGIN} (about one standard error over ml-100k's 943 users; fixed before the runs): "
        f"**L = {chosen}**. The test columns are reported, not used.",
        "",
        "| L | windows/user | windows | targets | valid NDCG@10 | encoder valid | test full NDCG@10 | encoder test | "
        "uni19 Hit@1 | encoder uni19 Hit@1 | train min, CPU (wall) | commit | machine (threads) |",
        "|---" * 13 + "|",
    ]
    for r in records:
        lines.append(
            f"| {'**' + str(r['window']) + '**' if r['window'] == chosen else r['window']} | {r['windows_per_user']} | "
            f"{r['trained_sequences']:,} | {r['trained_targets']:,} | {r['best_valid_score']:.4f} | "
            f"{r['encoder_best_valid_score']:.4f} | {r['test']['full']['ndcg@10']:.4f} | "
            f"{r['encoder_test']['full']['ndcg@10']:.4f} | {r['test']['uni19']['hit@1']:.4f} | "
            f"{r['encoder_test']['uni19']['hit@1']:.4f} | {train_minutes(r)} | `{r['commit']}` | "
            f"{r['machine'].split(',')[0]} ({r['torch_threads'] or 'default'}) |"
        )
    imported = [r for r in records if r.get("source")]
    if imported:
        lines += [""] + [f"L = {r['window']}: the README command's committed run, `{r['source']}` (same command, "
                         "defaults and seed; torch's default threads on the 2 cores; CPU time per phase not logged "
                         "then)." for r in imported]  # fmt: skip
    (Path(output) / f"{dataset}.md").write_text("\n".join(lines) + "\n")
    figure, axis = plt.subplots(figsize=(6, 4))
    windows = [r["window"] for r in records]
    for label, key, style in (("iLoRA, validation", "best_valid_score", "o-"),
                              ("its encoder, validation", "encoder_best_valid_score", "o--")):  # fmt: skip
        axis.plot(windows, [r[key] for r in records], style, label=label)
    axis.plot(windows, [r["test"]["full"]["ndcg@10"] for r in records], "s-", label="iLoRA, test")
    axis.plot(windows, [r["encoder_test"]["full"]["ndcg@10"] for r in records], "s--", label="its encoder, test")
    axis.set_xscale("log", base=2)
    axis.set_xticks(windows, [str(w) for w in windows])
    axis.set_xlabel("history window L (items)")
    axis.set_ylabel("full NDCG@10")
    axis.set_title(f"{dataset}, seed {seed}: {records[0]['machine'].split(',')[0]}")
    axis.legend(fontsize=8)
    save_figure(figure, Path(output) / f"{dataset}.png")
    print(f"wrote {Path(output) / f'{dataset}.md'} (chosen L = {chosen})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", nargs="+", type=int, default=list(WINDOWS))
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--model", default="iLoRA", choices=["iLoRA", "UniformLoRA"])
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--items-per-user", type=int, default=20, help="training targets per user (default 20)")
    parser.add_argument("--output", default=str(FOLDER))
    parser.add_argument("--work", default=str(REPO / "benchmarks" / "work"))
    parser.add_argument("--quick", action="store_true", help="the tiny fixture (tests/data/lastfm-tiny), tiny models")
    parser.add_argument("--report", action="store_true", help="only write the report of the finished windows")
    parser.add_argument("--readme-run", default=None, help="record L = 10 from this committed README-command JSON")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a window in this process
    args = parser.parse_args()
    args.output, args.work = str(Path(args.output).resolve()), str(Path(args.work).resolve())  # a worker chdirs
    if args.quick:
        args.dataset = "lastfm-tiny"
    if args.readme_run:
        import_readme_run(args.readme_run, args.output)
        return
    if args.report:
        report(args.output, args.dataset, args.seed)
        return
    if args.one is not None:
        run_window(args, args.one)
        return
    if git_commit().endswith("+uncommitted") and Path(args.output).is_relative_to(REPO / "results"):
        raise SystemExit("Commit first: every record names the commit of the code that produced it.")
    Path(args.output).mkdir(parents=True, exist_ok=True)
    for window in args.windows:
        if record_file(args.output, args.dataset, window, args.seed).exists():
            print(f"L = {window}: finished already")
            continue
        command = [sys.executable, __file__, "--one", str(window)] + [
            f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
            if key in ("dataset", "model", "seed", "items_per_user", "output", "work")
        ] + (["--quick"] if args.quick else [])  # fmt: skip
        subprocess.run(command, check=True)
    report(args.output, args.dataset, args.seed)


if __name__ == "__main__":
    main()
