"""The README's run command, as a new user runs it: a fresh clone of this commit, a new virtual environment, empty
caches (pip's and the converted backbone's), the command verbatim. Keeps the run's log and writes what it measured.

    python benchmarks/readme_command.py                 # the line after <!-- readme:run-command --> in README.md
    python benchmarks/readme_command.py --keep-cache    # reuse ~/.cache (pip, converted backbone): the run alone

Writes ``results/default-command/<model>-<dataset>-<commit>-<date>.log`` (RecBole's log of the run) and ``.json``:
the command, commit, machine, wall time of the whole command (install included) and of each phase (the runner's
timings), peak resident memory (``/usr/bin/time -v``), and the test metrics of the model and of its frozen encoder
as the log states them. Refuses to run from a checkout with uncommitted changes to the code, properties or benchmarks:
a clone would not hold them.
"""

import argparse
import collections
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from machine import git_commit  # noqa: E402


def readme_command(marker="<!-- readme:run-command -->"):
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    index = lines.index(marker)
    return next(line for line in lines[index + 1 :] if line.strip() and not line.startswith("```"))


def ordered_dict(value):
    """``{metric: float}`` of a logged ``OrderedDict([('ndcg@10', np.float64(0.0636)), ...])``."""
    namespace = {"__builtins__": {}, "OrderedDict": collections.OrderedDict, "np": types.SimpleNamespace(float64=float)}
    return {k: float(v) for k, v in eval(value, namespace).items()}


def metrics(text, label):
    """``{mode: metrics}`` of the log lines ``<label> (<mode>): OrderedDict(...)`` (``test result`` is not read in
    ``encoder test result``)."""
    found = re.findall(r"(?<!encoder )" + re.escape(label) + r" \((\w+)\): (OrderedDict\(.*\))", text)
    return {mode: ordered_dict(value) for mode, value in found}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep-cache", action="store_true", help="use the user's caches (pip, converted backbone)")
    parser.add_argument("--output", default=str(REPO / "results" / "default-command"))
    parser.add_argument("--finish", default=None, help="only write the record of the finished run in this folder")
    args = parser.parse_args()
    if args.finish:
        finish(Path(args.finish), Path(args.output))
        return
    commit = git_commit()
    if commit.endswith("+uncommitted"):
        raise SystemExit("Commit first: a fresh clone would not hold the uncommitted changes.")
    command = readme_command()
    work = Path(tempfile.mkdtemp(prefix="readme-command-"))
    clone = work / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    environment = dict(os.environ)
    if not args.keep_cache:
        environment["XDG_CACHE_HOME"] = str(work / "cache")  # pip's cache and the converted backbone's
    done = subprocess.run(
        ["/usr/bin/time", "-v", "bash", "-euo", "pipefail", "-c", command],
        cwd=clone,
        env=environment,
        capture_output=True,
        text=True,
    )
    (work / "stdout.txt").write_text(done.stdout)
    (work / "stderr.txt").write_text(done.stderr)
    run = {"command": command, "commit": commit, "empty_caches": not args.keep_cache}
    (work / "run.json").write_text(json.dumps({**run, "date": datetime.date.today().isoformat()}))
    if done.returncode:
        raise SystemExit(f"the command failed ({done.returncode}); its output is in {work}")
    finish(work, Path(args.output))


def finish(work, output):
    """The record of the finished run in ``work`` (its clone's log, ``/usr/bin/time -v``'s figures)."""
    run = json.loads((work / "run.json").read_text())
    clone, stderr = work / "clone", (work / "stderr.txt").read_text()
    logs = sorted((clone / "log").rglob("*.log"), key=lambda path: path.stat().st_mtime)
    log = logs[-1]  # the LLM's run (SASRec's pretraining writes no log of its own)
    text = log.read_text(encoding="utf-8", errors="replace")
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", stderr)[1].split(":")
    wall = sum(float(part) * 60**power for power, part in enumerate(reversed(clock)))
    cpu_seconds = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", stderr)[1]) for kind in ("User", "System"))
    model = re.search(r"--model=(\w+)", run["command"])[1]
    dataset = re.search(r"--dataset=([\w-]+)", run["command"])[1]
    output.mkdir(parents=True, exist_ok=True)
    stem = f"{model}-{dataset}-{run['commit']}-{run['date']}"
    shutil.copyfile(log, output / f"{stem}.log")
    cpuinfo = Path("/proc/cpuinfo").read_text()
    record = {
        **run,
        "cpu": re.search(r"model name\s*:\s*(.*)", cpuinfo)[1],
        "cores": os.cpu_count(),
        "cpu_flags": sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16|amx_tile|avx512f|avx2)\b", cpuinfo))),
        "wall_seconds": wall,
        "cpu_seconds": cpu_seconds,
        "peak_rss_gb": int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)[1]) / 1024**2,
        "timings": json.loads(re.findall(r"timings \(s\): (\{.*\})", text)[-1]),
        "trained_targets": int(re.findall(r"(\d+) targets per epoch", text)[-1]),
        "seed": int(re.findall(r"seed = (\d+)", text)[0]),
        "test": metrics(text, "test result"),
        "encoder_test": metrics(text, "encoder test result"),
        "log": f"{stem}.log",
    }
    (output / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    shutil.rmtree(clone / ".venv", ignore_errors=True)


if __name__ == "__main__":
    main()
