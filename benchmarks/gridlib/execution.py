"""Running the planned runs: one worker subprocess a run, locks shared by several grid processes, resuming a killed
run from its training state, recovering a run whose worker died after training, and the status of the grid."""

import collections
import contextlib
import datetime
import fcntl
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gridlib.encoders import encoder_checkpoint, keep_encoder_copy
from benchmarks.gridlib.planning import llm_budget, resolve_config, run_file
from benchmarks.gridlib.records import finished, keep_superseded, write_json_atomically
from benchmarks.gridlib.rows import GRID_SCRIPT, REPO
from benchmarks.machine import git_commit, hardware, uncommitted_changes

STARTED = time.time()


def execute(runs, output, work, after_each=None):
    """Run every unfinished run in order as a subprocess (``after_each()`` after each); returns the failed ids.

    Several grid processes may share one ``--output`` and ``--work``: each run is locked (``flock`` on
    ``<work>/logs/<run>.lock``, released by the kernel if its process dies) while it runs, so a second process skips
    a run that another is running or has finished since it planned. An LLM row whose encoder another process is
    training goes to the back of the queue once, so this process runs what it can meanwhile (another seed's encoder,
    say); it waits for the encoder only when nothing else is left."""
    work = Path(work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    failed = []
    for run in runs:  # encoders recorded before their checkpoints were copied into the results
        if run["kind"] == "encoder" and run_file(output, run).exists():
            keep_encoder_copy(run_file(output, run))
    pending = [run for run in runs if not finished(output, run)]
    print(f"{len(runs) - len(pending)} of {len(runs)} runs finished; {len(pending)} to go", flush=True)
    queue, deferred = list(pending), set()
    numbers = {run["run_id"]: number for number, run in enumerate(pending, 1)}
    while queue:
        run = queue.pop(0)
        number = numbers[run["run_id"]]
        with run_lock(work, run["run_id"], wait=False) as locked:
            if not locked:
                print(f"[{number}/{len(pending)}] {run['run_id']}: another grid process is running it", flush=True)
                continue
            if finished(output, run):
                print(f"[{number}/{len(pending)}] {run['run_id']}: finished by another grid process", flush=True)
                continue
            spec = {**run, "output": str(run_file(output, run))}
            if run["encoder"]:
                encoder_run = next(r for r in runs if r["run_id"] == run["encoder"])
                if (
                    run["run_id"] not in deferred
                    and any(other["run_id"] not in deferred for other in queue)
                    and run["encoder"] not in failed
                    and not finished(output, encoder_run)
                    and held_elsewhere(work, run["encoder"])
                ):
                    print(
                        f"[{number}/{len(pending)}] {run['run_id']}: its encoder is being trained by another grid "
                        "process; the runs after it go first",
                        flush=True,
                    )
                    deferred.add(run["run_id"])
                    queue.append(run)
                    continue
                if run["encoder"] not in failed and not finished(output, encoder_run):
                    with run_lock(work, run["encoder"], wait=True):  # another process may be training it
                        pass
                if run["encoder"] in failed or not finished(output, encoder_run):
                    print(f"[{number}/{len(pending)}] {run['run_id']}: skipped, its encoder is missing", flush=True)
                    failed.append(run["run_id"])
                    continue
                spec["encoder_file"] = str(run_file(output, encoder_run))
            if run.get("init_from"):
                init_run = next(r for r in runs if r["run_id"] == run["init_from"])
                if not finished(output, init_run):
                    print(
                        f"[{number}/{len(pending)}] {run['run_id']}: skipped, {init_run['run_id']} (the run it "
                        "starts from) has not finished",
                        flush=True,
                    )
                    failed.append(run["run_id"])
                    continue
                spec["init_file"] = str(run_file(output, init_run))
            refuse_uncommitted(output)
            spec_path = work / "logs" / f"{run['run_id']}.spec.json"
            spec.update(earlier_attempt(work, run["run_id"], continual=run["kind"] == "continual"))
            spec_path.write_text(json.dumps(spec, indent=1))
            log_path = work / "logs" / f"{run['run_id']}.log"
            resumed = f" (resumed from {spec['resume_checkpoint']})" if spec.get("resume_checkpoint") else ""
            print(f"[{number}/{len(pending)}] {run['run_id']}{resumed} ... ", end="", flush=True)
            started = time.time()
            with open(log_path, "w", encoding="utf-8") as log:
                code = subprocess.call(
                    [sys.executable, str(GRID_SCRIPT), "--worker", str(spec_path)],
                    cwd=work,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            elapsed = time.time() - started
            if code == 0 and run_file(output, run).exists():
                print(f"done in {elapsed / 60:.1f} min", flush=True)
            else:
                failed.append(run["run_id"])
                print(f"FAILED (exit {code}) after {elapsed / 60:.1f} min; log: {log_path}", flush=True)
                print("".join(open(log_path, encoding="utf-8").readlines()[-15:]), flush=True)
        if after_each:
            after_each()
    return failed


def init_checkpoint(record_file):
    """The checkpoint of the finished run recorded in ``record_file`` (its ``saved_model_file``), which a row of
    :data:`INIT_FROM` starts from; it lives in the machine's ``--work`` folder, which is not committed."""
    record = json.loads(Path(record_file).read_text())
    path = record.get("saved_model_file")
    if not path or not Path(path).is_file():
        raise FileNotFoundError(
            f"{record['run_id']}'s checkpoint {path!r} is not on this machine (checkpoints stay in --work, which is "
            f"not committed): remove {record_file} and rerun the grid to train that run again, then this one."
        )
    return path


def refuse_uncommitted(output):
    """Stop before a run whose record would go to the committed results (``<repo>/results`` and below) while the
    package, properties or benchmarks have uncommitted changes: its figures would be no commit's. Runs written
    elsewhere (``--quick``, a scratch ``--output``) go on, their records marked ``+uncommitted``."""
    if not Path(output).resolve().is_relative_to((REPO / "results").resolve()):
        return
    changes = uncommitted_changes()
    if changes:
        raise SystemExit(
            f"Refusing to record a run into {output}: uncommitted changes to {', '.join(changes)}. Commit them (or "
            "stash them) and rerun the grid: finished runs are kept and an interrupted one resumes."
        )


def earlier_attempt(work, run_id, continual=False):
    """What an unfinished earlier attempt of ``run_id`` left (its worker killed, or the grid stopped): its log moved
    to ``<run>.attempt-<n>.log``, its wall time, the state it resumed from, and the training state it named, which
    the new attempt resumes from (``resume_checkpoint``: exact, so the run's hash and figures stay; a state written
    when training had finished sends the run straight to its tests). A ``continual`` run resumes from the progress
    file its log names (``<model>-continual-<time>.continual.json``, written as each block ends): at the block it
    was in, from the last finished block's weights; killed in its first block, it starts over. Returns the spec's
    ``earlier_attempts`` and ``resume_checkpoint``."""
    logs = Path(work) / "logs"
    log_path, spec_path = logs / f"{run_id}.log", logs / f"{run_id}.spec.json"
    if not log_path.exists():
        return {}
    earlier = json.loads(spec_path.read_text()) if spec_path.exists() else {}
    attempts = earlier.get("earlier_attempts", [])
    started = spec_path.stat().st_mtime if spec_path.exists() else log_path.stat().st_mtime
    text = re.sub(r"\x1b\[[0-9;]*m", "", log_path.read_text(encoding="utf-8", errors="replace"))
    if continual:  # a block's training states cannot resume a continual run; its progress file can
        states = re.findall(r"(?:\(progress: |continual: resuming )(\S+?\.continual\.json)", text)
    else:
        states = re.findall(r"Training state(?::| loaded from) (\S+?\.training_state\.pth)", text)
    # A worker that died of an error is not resumed: the error may have been in what it trained. One that died before
    # it loaded or wrote any state (refused in its setup) trained nothing: the state it was to resume from stands.
    failed = "Traceback (most recent call last)" in text
    if failed and not states and earlier.get("resume_checkpoint"):
        states = [os.path.relpath(earlier["resume_checkpoint"], work)]
        failed = False
    state = states[-1] if states and not failed else None
    moved = logs / f"{run_id}.attempt-{len(attempts) + 1}.log"
    # The attempt lasted until its last write: its log's, or, killed in its tests (which log nothing until they end),
    # the last line of the scores and answers it journaled next to its checkpoint, which the next attempt keeps.
    last_write = log_path.stat().st_mtime
    if state:
        model_file = Path(work) / state.replace(".training_state.pth", ".pth")
        for journal in (model_file.with_suffix(".test_scores.jsonl"), model_file.with_suffix(".generations.jsonl")):
            last_write = max(last_write, journal.stat().st_mtime) if journal.exists() else last_write
    wall = last_write - started
    log_path.rename(moved)
    attempts.append(
        {
            "log": moved.name,
            "wall_seconds": wall,
            "training_state": state,
            "resumed_from": earlier.get("resume_checkpoint"),
        }
    )
    resume = state if state and (Path(work) / state).exists() else None
    return {"earlier_attempts": attempts, "resume_checkpoint": str(Path(work) / resume) if resume else None}


def held_elsewhere(work, run_id):
    """Whether another process holds ``run_id``'s lock (is running it) at this moment."""
    with run_lock(work, run_id, wait=False) as free:
        return not free


@contextlib.contextmanager
def run_lock(work, run_id, wait):
    """Yield whether this process holds ``<work>/logs/<run_id>.lock`` (``wait``: block until it does)."""
    (Path(work) / "logs").mkdir(parents=True, exist_ok=True)
    with open(Path(work) / "logs" / f"{run_id}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def worker(spec_path):
    """Train and test one run; write its JSON (metrics, wall time, commit, hardware) only when everything ended."""
    spec = json.loads(Path(spec_path).read_text())
    commit = git_commit()  # the code this process runs: a commit made while it trains is not the run's
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from the command line; this one is ours
    from recbole.utils import init_logger, init_seed

    from recbole_ilora.pipeline import sasrec_pretraining_config, train_and_evaluate
    from recbole_ilora.provenance import log_provenance

    config_dict = dict(spec["config_dict"])
    if spec.get("encoder_file"):
        config_dict["sasrec_checkpoint"] = encoder_checkpoint(spec["encoder_file"])
    if spec.get("init_file"):  # a row started from another row's finished run
        config_dict["llm_init_checkpoint"] = init_checkpoint(spec["init_file"])
    if spec.get("resume_checkpoint"):  # an earlier attempt was killed: go on from its training state
        config_dict["resume_checkpoint"] = spec["resume_checkpoint"]
    config = resolve_config(spec["model"], spec["dataset"], spec["config_files"], config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    log_provenance()  # the run's log names its code, machine and libraries
    if spec["kind"] == "encoder":
        config = sasrec_pretraining_config(config)
    if spec["kind"] == "continual":
        return continual_worker(spec, config, commit)
    result = train_and_evaluate(config, saved=True, verbose=True)  # per-epoch results in the run's log
    saved_model_file = str(Path(result["saved_model_file"]).resolve())
    record = {
        **record_header(spec, config, commit),
        "trainable_parameters": result["trainable_parameters"],
        "backbone": config["llm_backbone"] if spec["kind"] == "llm" else None,
        "epochs_cap": config["epochs"],
        "epochs_run": result["epochs_run"],
        "stopped_early": result["stopped_early"],
        "timings": result["timings"],
        "cpu_timings": result["cpu_timings"],
        "best_valid_score": result["best_valid_score"],
        "valid": dict(result["best_valid_result"] or {}),  # empty when validation was skipped (eval_step 0)
        "test": {mode: dict(metrics) for mode, metrics in result["test_results"].items()},
        "encoder_test": {mode: dict(metrics) for mode, metrics in (result["encoder_test_results"] or {}).items()},
        "trained_sequences": result["trained_sequences"],
        "trained_targets": result["trained_targets"],
        "generative": result["generative_result"],
        "lapse_drops": result["lapse_drops"],
        "model_summary": result["model_summary"],  # what the model reports of its training (Laser: balance loss)
        "saved_model_file": saved_model_file,
        "sasrec_checkpoint": config["sasrec_checkpoint"] if spec["kind"] == "llm" else None,
        "budget": llm_budget(config) if spec["kind"] == "llm" else None,
        "init_from": spec.get("init_from"),
    }
    if record["generative"]:  # every user's candidates, answer and verdict, next to the run's JSON
        with open(record["generative"]["generations_file"], "rb") as source:
            with gzip.open(Path(spec["output"]).with_suffix(".generations.jsonl.gz"), "wb") as target:
                shutil.copyfileobj(source, target)
    if has_gate_report(spec, config):
        record["gate"] = export_gates(saved_model_file, Path(spec["output"]).with_suffix(".gates.jsonl"))
    keep_superseded(Path(spec["output"]))
    write_json_atomically(spec["output"], record)
    if spec["kind"] == "encoder":
        keep_encoder_copy(spec["output"])


def continual_worker(spec, config, commit):
    """A continual run (``--protocol continual``): every block trained and tested by the plugin's continual mode; the
    record holds each block's figures and their mean over blocks 1 .. T - 1."""
    from recbole_ilora.continual_runner import run_continual

    progress = run_continual(config, saved=True)
    keep = (
        "block",
        "users",
        "users_left_out",
        "training_sequences",
        "trained_sequences",
        "learning_rate",
        "penalty",
        "penalty_weight",
        "proximal",
        "encoder",
        "epochs_run",
        "valid",
        "test",
        "timings",
        "wall_seconds",
    )
    record = {
        **record_header(spec, config, commit),
        "backbone": config["llm_backbone"],
        "strategy": config["continual_strategy"],
        "blocks_total": config["continual_blocks"],
        "epochs_cap": config["epochs"],
        "llm_train_sequences_per_user": config["llm_train_sequences_per_user"],
        "blocks": [{key: block.get(key) for key in keep} for block in progress["blocks"]],
        "mean_over_later_blocks": progress["mean_over_later_blocks"],
        "l2_weight": progress.get("l2_weight"),
        "l2_selection": progress.get("l2_selection"),
        "progress_file": str(Path(progress["progress_file"]).resolve()),
    }
    write_json_atomically(spec["output"], record)


def record_header(spec, config, commit):
    """What every run's record begins with: which run, the code and machine, when, and what it cost."""
    header = {
        "run_id": spec["run_id"],
        "row": spec["row"],
        "kind": spec["kind"],
        "model": config["model"],
        "dataset": spec["dataset"],
        "seed": spec["seed"],
        "command": spec["command"],
        "commit": commit,
        "hardware": hardware(),
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        # Over the attempts this one went on from ("attempts"); CPU time is this process's only.
        "wall_seconds": time.time() - STARTED + continued_wall(spec),
        "cpu_seconds": time.process_time(),  # user + system time of this process: less sensitive to a busy machine
    }
    if spec.get("earlier_attempts"):
        header["attempts"] = spec["earlier_attempts"] + [{"wall_seconds": time.time() - STARTED, "last": True}]
        header["resumed_from"] = spec.get("resume_checkpoint")
    return header


def continued_wall(spec):
    """The wall seconds of the earlier attempts whose training a resumed run goes on from: the last one, and each
    before it that the next one resumed from (an attempt that started over ends the chain); 0 for a fresh start."""
    if not spec.get("resume_checkpoint"):
        return 0.0
    total = 0.0
    for attempt in reversed(spec.get("earlier_attempts", [])):
        total += attempt["wall_seconds"]
        if not attempt.get("resumed_from"):
            break
    return total


def recover(spec_path, commit=None):
    """Write the record of a run whose worker died after testing (its log holds every figure), marked
    ``recovered_from_log``: the metrics, generative result, timings, trainable parameters and checkpoint from the
    run's log, the gates from its checkpoint, the generations from its file. CPU time is not known."""
    import ast
    import types

    spec = json.loads(Path(spec_path).read_text())
    log_path = Path(spec_path).with_name(f"{spec['run_id']}.log")
    text = log_path.read_text(encoding="utf-8", errors="replace")
    work = Path(spec_path).parent.parent
    namespace = {"__builtins__": {}, "OrderedDict": collections.OrderedDict, "np": types.SimpleNamespace(float64=float)}

    def last(pattern):
        found = re.findall(pattern, text)
        if not found:
            raise ValueError(f"{log_path}: no line matches {pattern!r}; the run did not finish testing")
        return found[-1]

    test, encoder_test = (
        {
            mode: dict(eval(metrics, namespace))
            for mode, metrics in re.findall(prefix + r"test result \((\w+)\): (OrderedDict\(.*\))", text)
        }
        for prefix in (r"(?<!encoder )", r"encoder ")
    )
    generative = ast.literal_eval(last(r"generative test: (\{.*\})")) if "generative test:" in text else None
    saved_model_file = str((work / last(r"Saving current: (\S+\.pth)")).resolve())
    sys.argv = sys.argv[:1]
    from recbole_ilora.saved_run import load_data_and_model

    config, model = load_data_and_model(saved_model_file)[:2]
    epochs_run = len(re.findall(r"epoch \d+ training", text.split("Trainable parameters")[-1]))
    record = {
        "run_id": spec["run_id"],
        "row": spec["row"],
        "kind": spec["kind"],
        "model": spec["model"],
        "dataset": spec["dataset"],
        "seed": spec["seed"],
        "command": spec["command"],
        "commit": commit or git_commit(),
        "hardware": hardware(),
        "finished": datetime.datetime.fromtimestamp(log_path.stat().st_mtime, datetime.UTC).isoformat(
            timespec="seconds"
        ),
        "wall_seconds": log_path.stat().st_mtime - Path(spec_path).stat().st_mtime,
        "trainable_parameters": int(last(r"Trainable parameters: (\d+)")),
        "backbone": config["llm_backbone"] if spec["kind"] == "llm" else None,
        "epochs_cap": config["epochs"],
        "epochs_run": epochs_run,
        "stopped_early": epochs_run < config["epochs"],
        "timings": json.loads(last(r"timings \(s\): (\{.*\})")),
        "cpu_timings": json.loads(last(r"CPU seconds per phase: (\{.*\})")) if "CPU seconds" in text else None,
        "best_valid_score": None,
        "valid": {},
        "test": test,
        "encoder_test": encoder_test,
        "generative": generative,
        "lapse_drops": {},
        "saved_model_file": saved_model_file,
        "sasrec_checkpoint": config["sasrec_checkpoint"] if spec["kind"] == "llm" else None,
        "recovered_from_log": str(log_path.name),
        "budget": llm_budget(config) if spec["kind"] == "llm" else None,
        "init_from": spec.get("init_from"),
    }
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    targets = re.findall(r"LLM training budget: .*?, ([\d,]+) targets per epoch", plain)
    if targets:
        record["trained_targets"] = int(targets[-1].replace(",", ""))
    if spec["kind"] == "llm":  # what the saved model holds of its training (CoFiRec: its IDs' collisions and usage)
        record["model_summary"] = model.training_summary()
    if generative:
        with open(work / generative["generations_file"], "rb") as source:
            with gzip.open(Path(spec["output"]).with_suffix(".generations.jsonl.gz"), "wb") as target:
                shutil.copyfileobj(source, target)
    if has_gate_report(spec, config):
        record["gate"] = export_gates(saved_model_file, Path(spec["output"]).with_suffix(".gates.jsonl"))
    write_json_atomically(spec["output"], record)
    print(f"recovered {spec['output']} from {log_path}")


def has_gate_report(spec, config):
    """Whether a run's record gets its users' routing (gates.jsonl): an LLM model with a gate (iLoRA, Laser's
    router), the model asked (``has_gate``), and not a constant one (``gate_input: none``, UniformLoRA)."""
    from recbole_ilora.utils import get_model

    return spec["kind"] == "llm" and get_model(config["model"]).has_gate and config["gate_input"] != "none"


def export_gates(checkpoint, path):
    """Every test user's expert weights (rounded, JSON lines next to the run's JSON) and their summary."""
    from recbole_ilora.gate_report import gate_records, summarize
    from recbole_ilora.saved_run import load_data_and_model

    _, model, _, _, _, test_data = load_data_and_model(checkpoint)
    records = gate_records(model, test_data)
    with open(path, "w", encoding="utf-8") as file:
        for record in records:
            record = {
                **record,
                "weights": [round(w, 5) for w in record["weights"]],
                "entropy": round(record["entropy"], 5),
            }
            file.write(json.dumps(record) + "\n")
    return summarize(records)


def status_lines(planned, output):
    """``--status``: every planned run, done or pending; a pending run's wall time estimated from the finished runs of
    its row (on its dataset, else on any), so that a partial grid can be budgeted; then the total."""
    done = {(run["dataset"], run["run_id"]) for run in planned if finished(output, run)}
    walls = collections.defaultdict(list)
    for run in planned:
        if (run["dataset"], run["run_id"]) in done:
            wall = json.loads(run_file(output, run).read_text())["wall_seconds"]
            walls[(run["row"], run["dataset"])].append(wall)
            walls[(run["row"], None)].append(wall)
    lines, pending, unknown = [], 0.0, []
    for run in planned:
        if (run["dataset"], run["run_id"]) in done:
            lines.append(f"done    {run['dataset']:<12} {run['run_id']}")
            continue
        known = walls.get((run["row"], run["dataset"])) or walls.get((run["row"], None))
        estimate = statistics.fmean(known) / 3600 if known else None
        if estimate is None:
            unknown.append(run["row"])
        else:
            pending += estimate
        cost = f"~{estimate:.2f} h" if estimate is not None else "? h"
        lines.append(f"pending {run['dataset']:<12} {run['run_id']:<52} {cost}")
    waiting = len(planned) - len(done)
    lines.append(
        f"{len(done)} of {len(planned)} runs done; the {waiting - len(unknown)} pending runs with an "
        f"estimate need ~{pending:.1f} wall-hours as their rows' finished runs took"
        + (
            f"; {len(unknown)} more {'has' if len(unknown) == 1 else 'have'} no finished run of their row yet "
            f"({', '.join(sorted(set(unknown)))})"
            if unknown
            else ""
        )
    )
    return lines
