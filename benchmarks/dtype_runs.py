"""Two runs that differ only in the backbone's compute dtype, compared from their logs (issue 42, part 3: does the
faster bfloat16 default move a run's losses and metrics away from float32's, and how far?).

    python benchmarks/dtype_runs.py FLOAT32.log BFLOAT16.log --output results/performance/dtype_runs.json

Each log is RecBole's log of a ``run_recbole_ilora.py`` run (the same command but ``--llm_compute_dtype``, the same
``--sasrec_checkpoint``, so that the encoder is the same); the runner writes its provenance (commit, machine,
threads) at the top and its phase timings at the end. Writes the JSON (each run's dtype, commit, machine, training
loss, best validation, test metrics per mode, timings, and the differences bfloat16 - float32) and prints a table.
"""

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from readme_command import metrics, ordered_dict  # noqa: E402

METRICS = ("ndcg@10", "hit@10", "hit@1", "mrr@10")
LOSS = r"epoch \d+ training \[time: [\d.]+s, train loss: ([\d.]+)\]"


def read_run(path):
    """What one run's log says: its dtype, code, machine, losses, validation, test metrics and timings."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")

    def one(pattern):
        found = re.findall(pattern, text)
        if not found:
            raise ValueError(f"{path}: no line matches {pattern!r}; is it a finished run's log?")
        return found[-1]

    return {
        "log": str(path),
        "compute_dtype": one(r"Backbone .*?: .*? weights, (\w+) compute"),
        "commit": one(r"Code: commit (\S+)"),
        "machine": one(r"Machine: (.*)"),
        "train_loss": [float(x) for x in re.findall(LOSS, text.split("Trainable parameters")[-1])],  # the LLM's
        "best_valid": ordered_dict(one(r"best valid : (OrderedDict\(.*\))")),
        "test": metrics(text, "test result"),
        "encoder_test": metrics(text, "encoder test result"),
        "timings": json.loads(one(r"timings \(s\): (\{.*\})")),
    }


def compare(float32, bfloat16):
    """``{mode: {metric: bfloat16 - float32}}`` over the test modes both runs have, and the same for validation."""
    test = {
        mode: {m: round(bfloat16["test"][mode][m] - float32["test"][mode][m], 4) for m in METRICS}
        for mode in float32["test"]
        if mode in bfloat16["test"]
    }
    valid = {m: round(bfloat16["best_valid"][m] - float32["best_valid"][m], 4) for m in METRICS}
    return {"test": test, "best_valid": valid}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("float32_log")
    parser.add_argument("bfloat16_log")
    parser.add_argument("--output", default=str(REPO / "results" / "performance" / "dtype_runs.json"))
    args = parser.parse_args()
    runs = {"float32": read_run(args.float32_log), "bfloat16": read_run(args.bfloat16_log)}
    for name, run in runs.items():
        if run["compute_dtype"] != name:
            raise SystemExit(f"{run['log']} computed in {run['compute_dtype']}, not {name}")
    record = {**runs, "bfloat16_minus_float32": compare(runs["float32"], runs["bfloat16"])}
    Path(args.output).write_text(json.dumps(record, indent=1) + "\n")
    modes = list(runs["float32"]["test"])
    headers = [f"test {mode} {m}" for mode in modes for m in ("ndcg@10", "hit@1")]
    print("| run | train loss | valid NDCG@10 | " + " | ".join(headers) + " | training s |")
    for name, run in runs.items():
        cells = [name, f"{run['train_loss'][-1]:.4f}", f"{run['best_valid']['ndcg@10']:.4f}"]
        cells += [f"{run['test'][mode][m]:.4f}" for mode in modes for m in ("ndcg@10", "hit@1")]
        cells.append(f"{run['timings']['training']:.0f}")
        print("| " + " | ".join(cells) + " |")
    print(json.dumps(record["bfloat16_minus_float32"]))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
