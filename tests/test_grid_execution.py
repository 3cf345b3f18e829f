"""The benchmark grid's execution (benchmarks/gridlib/execution.py, encoders.py, records.py): a tiny resumable grid
run and the files it writes, the lapse and continual protocols' runs, locks shared by several grid processes, the
encoder every LLM row reads, resuming and recovering killed runs, and the commit a record names."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

from benchmarks.gridlib import execution
from benchmarks.gridlib.encoders import encoder_checkpoint
from benchmarks.gridlib.execution import (
    continued_wall,
    earlier_attempt,
    execute,
    init_checkpoint,
    refuse_uncommitted,
    run_lock,
    status_lines,
    worker,
)
from benchmarks.gridlib.planning import plan, run_file
from benchmarks.gridlib.records import finished, keep_superseded, recorded_runs, write_json_atomically
from benchmarks.gridlib.report_standard import encoder_notes
from benchmarks.gridlib.rows import QUICK_BACKBONE
from benchmarks.gridlib.tables import incomplete_grid_lines
from recbole_ilora.model.sequence_encoder import read_sasrec_checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


FULL_METRIC_NAMES = ["recall", "mrr", "ndcg", "hit"]  # properties/dataset/lastfm.yaml's metrics


def quick_protocol_run(tmp_path, protocol, row):
    """One row of the quick grid under ``protocol``, run as a user runs it; returns its record."""
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "grid.py"), "--quick", "--protocol", protocol]
    command += ["--rows", row, "--output", str(tmp_path / protocol)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (path,) = (tmp_path / protocol / "runs" / "lastfm-tiny").glob(f"{row}-seed2020-*.json")
    return json.loads(path.read_text())


def test_quick_grid_writes_tables_charts_and_gates_and_resumes(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "grid.py"), "--quick", "--rows", "Pop", "iLoRA"]
    command += ["--output", str(tmp_path / "results")]
    first = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "0 of 3 runs finished; 3 to go" in first.stdout  # iLoRA brought its SASRec encoder in

    runs = tmp_path / "results" / "runs" / "lastfm-tiny"
    records = {path.name.split("-seed")[0]: json.loads(path.read_text()) for path in runs.glob("*.json")}
    assert sorted(records) == ["Pop", "SASRec-encoder", "iLoRA"]
    for record in records.values():
        assert record["seed"] == 2020 and record["wall_seconds"] > 0 and record["trainable_parameters"] > 0
        assert set(record["test"]) == {"full", "uni19"}
        assert set(record["test"]["full"]) == {f"{m}@{k}" for m in FULL_METRIC_NAMES for k in (1, 5, 10, 20)}
        assert record["epochs_cap"] == 2 and 1 <= record["epochs_run"] <= 2  # quick.yaml's cap, recorded
        assert record["stopped_early"] == (record["epochs_run"] < 2)
    assert records["iLoRA"]["backbone"] == "embedded" and records["Pop"]["backbone"] is None
    assert records["iLoRA"]["sasrec_checkpoint"] == records["SASRec-encoder"]["saved_model_file"]
    copy = runs / "encoders" / os.path.basename(records["SASRec-encoder"]["saved_model_file"])
    kept = read_sasrec_checkpoint(copy)  # the encoder, committed with the results: loadable by an LLM row
    assert "optimizer" not in kept and kept["config"]["seed"] == 2020
    gates = (runs / f"{records['iLoRA']['run_id']}.gates.jsonl").read_text().splitlines()
    assert len(gates) == 40 and records["iLoRA"]["gate"]["users"] == 40
    assert records["iLoRA"]["gate"]["mean_entropy"] <= math.log(4) + 1e-6

    markdown = (tmp_path / "results" / "lastfm-tiny.md").read_text()
    full_header = "| model | seeds | ndcg@5 | ndcg@10 | ndcg@20 | hit@1 | hit@5 | hit@10 | hit@20 | mrr@10 |"
    sampled_header = "| model | seeds | hit@1 | hit@5 | ndcg@5 | ndcg@10 | mrr@20 |"
    assert full_header in markdown and sampled_header in markdown
    # (a run from a working tree with uncommitted changes is marked "iLoRA †": this test runs in such trees too)
    ilora_lines = [line for line in markdown.splitlines() if line.startswith(("| iLoRA | 1 |", "| iLoRA † | 1 |"))]
    assert len(ilora_lines) == 3  # full, uni19 and gate tables
    assert f"{records['iLoRA']['test']['full']['ndcg@10']:.4f}" in ilora_lines[0]
    assert "| UniformLoRA | 0 |" in markdown and "Incomplete grid: 3 of 7 runs finished" in markdown
    assert "**" in markdown and "40 users, 1,461 items" in markdown
    run_line = next(line for line in markdown.splitlines() if line.startswith(f"| {records['iLoRA']['run_id']} |"))
    assert run_line.endswith(f"| {records['iLoRA']['hardware'].split(',')[0]} |")  # each run's times name its machine
    for chart in ("lastfm-tiny.png", "lastfm-tiny.gates.png"):
        assert (tmp_path / "results" / chart).read_bytes().startswith(PNG_MAGIC)

    # a worker that died after testing: its record rebuilt from its log holds the same figures
    spec = tmp_path / "results" / "work" / "logs" / f"{records['iLoRA']['run_id']}.spec.json"
    recover = [sys.executable, str(REPO_ROOT / "benchmarks" / "grid.py"), "--recover", str(spec)]
    recovered_run = subprocess.run(recover, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert recovered_run.returncode == 0, recovered_run.stderr[-3000:]
    recovered = json.loads((runs / f"{records['iLoRA']['run_id']}.json").read_text())
    assert recovered["recovered_from_log"] and recovered["test"] == records["iLoRA"]["test"]
    assert recovered["trainable_parameters"] == records["iLoRA"]["trainable_parameters"]
    assert recovered["saved_model_file"] == records["iLoRA"]["saved_model_file"] and recovered["epochs_run"] == 2
    assert recovered["gate"] == records["iLoRA"]["gate"]
    assert recovered["budget"] == records["iLoRA"]["budget"]  # the report puts it in the table of its budget
    assert recovered["trained_targets"] == records["iLoRA"]["trained_targets"]

    stamps = {path: os.stat(path).st_mtime_ns for path in runs.glob("*.json")}
    second = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "3 of 3 runs finished; 0 to go" in second.stdout
    assert {path: os.stat(path).st_mtime_ns for path in runs.glob("*.json")} == stamps  # nothing ran again


def test_a_retrained_encoder_keeps_the_record_its_llm_rows_used(tmp_path, monkeypatch):

    def record(run_id, ndcg, finished="2026-11-23T22:58:26+00:00", **extra):
        test = {"full": {"ndcg@10": ndcg}, "uni19": {"hit@1": 0.4}}
        return {"run_id": run_id, "dataset": "d", "finished": finished, "test": test, **extra}

    path = tmp_path / "runs" / "d" / "SASRec-encoder-seed1-e.json"
    path.parent.mkdir(parents=True)
    first = record("SASRec-encoder-seed1-e", 0.05, saved_model_file="/saved/old.pth")
    path.write_text(json.dumps(first))
    keep_superseded(path)  # the worker, before writing the retrained encoder's record
    kept = path.with_name("SASRec-encoder-seed1-e.superseded-2026-11-23T225826Z.json")
    assert json.loads(kept.read_text()) == first
    second = record("SASRec-encoder-seed1-e", 0.06, "2026-11-29T20:00:00+00:00", saved_model_file="/new.pth")
    second["hardware"] = "2 x CPU, no GPU"
    path.write_text(json.dumps(second))

    encoder_run = {"run_id": "SASRec-encoder-seed1-e", "dataset": "d", "kind": "encoder", "encoder": None}
    before = {"run_id": "iLoRA-seed1-a", "dataset": "d", "kind": "llm", "encoder": encoder_run["run_id"]}
    after = {**before, "run_id": "iLoRA-generative-seed1-b"}
    planned = [encoder_run, before, after]  # "before" was trained with the first encoder run, "after" with the second
    done = [
        second,
        record("iLoRA-seed1-a", 0.07, sasrec_checkpoint="/saved/old.pth"),
        record("iLoRA-generative-seed1-b", 0.01, sasrec_checkpoint="/new.pth"),
    ]
    for llm_record in done[1:]:
        (path.parent / f"{llm_record['run_id']}.json").write_text(json.dumps(llm_record))
    lines = encoder_notes(planned, done, tmp_path)
    assert lines == [
        f"| iLoRA-seed1-a | `{kept.name}` | 0.0500, 0.4000 (machine not recorded) | 0.0600, 0.4000 (2 x CPU) "
        "| to be trained again |"
    ]
    # the retrained encoder is another model (its metrics differ), so the grid trains "before" again, not "after"
    assert not finished(tmp_path, before) and finished(tmp_path, after)
    shown, stale = recorded_runs(planned, tmp_path)  # the tables compare runs of one encoder per seed
    assert [r["run_id"] for r in shown] == [second["run_id"], after["run_id"]]
    assert [r["run_id"] for r in stale] == [before["run_id"]]
    assert incomplete_grid_lines(len(shown), len(planned), len(stale))[0] == (
        "**Incomplete grid: 2 of 3 runs finished.** 1 more was trained with an earlier encoder and waits to be trained "
        'again: the tables leave it out (see "Encoders trained again"). Rerun the command to resume.'
    )
    assert incomplete_grid_lines(3, 3, 0) == []  # a complete grid's report has no warning

    # an encoder retrained into the same model (identical metrics, new checkpoint file) leaves its LLM rows valid
    reproduced = {**second, "test": first["test"]}
    path.write_text(json.dumps(reproduced))
    assert finished(tmp_path, before) and finished(tmp_path, after)
    notes = encoder_notes(planned, [reproduced, *done[1:]], tmp_path)
    assert notes[0].endswith("| kept: the encoder reproduced exactly |")
    kept.unlink()  # the earlier encoder's record is lost: which model trained "before" is unknown
    assert not finished(tmp_path, before) and finished(tmp_path, after)


def test_an_encoder_kept_with_the_results_resumes_its_llm_rows_on_a_machine_that_lost_the_checkpoint(
    tmp_path, monkeypatch
):

    saved = tmp_path / "work" / "saved" / "SASRec-Nov-30-2026_10-11-33.pth"
    saved.parent.mkdir(parents=True)
    weights = {"item_embedding.weight": torch.randn(5, 4)}
    torch.save({"config": {"model": "SASRec"}, "state_dict": weights, "optimizer": {"state": {}}}, saved)
    output = tmp_path / "results"
    encoder = {"run_id": "SASRec-encoder-seed1-e", "dataset": "d", "kind": "encoder", "encoder": None}
    llm = {"run_id": "iLoRA-seed1-a", "dataset": "d", "kind": "llm", "encoder": encoder["run_id"]}
    encoder_path = run_file(output, encoder)
    write_json_atomically(encoder_path, {"run_id": encoder["run_id"], "saved_model_file": str(saved)})

    execute([encoder], output, tmp_path / "work")  # finished: nothing runs, but the checkpoint is copied
    copy = output / "runs" / "d" / "encoders" / saved.name
    kept = torch.load(copy, weights_only=True)
    assert set(kept) == {"config", "state_dict"} and torch.equal(
        kept["state_dict"]["item_embedding.weight"], weights["item_embedding.weight"]
    )
    assert encoder_checkpoint(encoder_path) == str(saved)

    saved.unlink()  # a new machine: --work is empty, the results were cloned
    assert finished(output, encoder) and encoder_checkpoint(encoder_path) == str(copy)
    # an LLM row trained in another clone with the same encoder (same checkpoint name, another folder) stays valid
    llm_record = {"run_id": llm["run_id"], "sasrec_checkpoint": f"/elsewhere/results/runs/d/encoders/{saved.name}"}
    write_json_atomically(run_file(output, llm), llm_record)
    assert finished(output, llm)
    copy.unlink()  # the copy lost too: the encoder must be trained again
    assert not finished(output, encoder)


def test_grid_processes_sharing_a_folder_skip_each_others_runs_and_wait_for_an_encoder(tmp_path, monkeypatch):
    import threading

    def run(run_id, encoder=None):
        kind = "llm" if encoder else "baseline"
        return {"run_id": run_id, "dataset": "d", "kind": kind, "encoder": encoder}

    encoder = {**run("enc"), "kind": "encoder"}
    runs = [run("held"), run("a"), run("b"), run("c"), encoder, run("llm", encoder="enc")]
    output, work = tmp_path / "results", tmp_path / "work"
    ran = []

    def fake_worker(command, **kwargs):  # the worker subprocess: record the run as finished
        spec = json.loads(open(command[-1]).read())
        ran.append(spec["run_id"])
        if spec["run_id"] == "a":  # meanwhile another process finishes "b"
            write_json_atomically(run_file(output, run("b")), {"run_id": "b"})
        if spec["run_id"] == "llm":
            assert spec["encoder_file"] == str(run_file(output, encoder))
        write_json_atomically(spec["output"], {"run_id": spec["run_id"]})
        return 0

    monkeypatch.setattr(subprocess, "call", fake_worker)

    def other_process_trains_the_encoder(started):
        with run_lock(work, "enc", wait=True):
            started.set()
            while "c" not in ran:  # still training while this process reaches the LLM row
                threading.Event().wait(0.01)
            (tmp_path / "enc.pth").write_bytes(b"weights")
            write_json_atomically(run_file(output, encoder), {"saved_model_file": str(tmp_path / "enc.pth")})

    started = threading.Event()
    other = threading.Thread(target=other_process_trains_the_encoder, args=(started,))
    with run_lock(work, "held", wait=False) as held:  # another process is running "held"
        assert held
        other.start()
        started.wait()
        failed = execute(runs, output, work)
    other.join()
    assert failed == []
    assert ran == ["a", "c", "llm"]  # not "held" (locked), "b" (finished meanwhile) nor "enc" (locked)
    assert not run_file(output, run("held")).exists()
    with run_lock(work, "held", wait=False) as free:  # every lock was given back
        assert free


def test_a_grid_process_runs_other_runs_while_another_trains_the_encoder_it_needs(tmp_path, monkeypatch):
    """Two processes on seeds 1 and 2: while the other trains seed 1's encoder, this one trains seed 2's encoder and
    its LLM row instead of sleeping on the lock; it comes back to seed 1's LLM row at the end."""
    import threading

    output, work = tmp_path / "results", tmp_path / "work"
    enc1 = {"run_id": "enc1", "dataset": "d", "kind": "encoder", "encoder": None}
    enc2 = {**enc1, "run_id": "enc2"}
    llm1 = {"run_id": "llm1", "dataset": "d", "kind": "llm", "encoder": "enc1"}
    llm2 = {**llm1, "run_id": "llm2", "encoder": "enc2"}
    ran = []

    def fake_worker(command, **kwargs):
        spec = json.loads(open(command[-1]).read())
        ran.append(spec["run_id"])
        weights = tmp_path / f"{spec['run_id']}.pth"
        weights.write_bytes(b"weights")
        write_json_atomically(spec["output"], {"run_id": spec["run_id"], "saved_model_file": str(weights)})
        return 0

    monkeypatch.setattr(subprocess, "call", fake_worker)

    def other_process_trains_enc1(started):
        with run_lock(work, "enc1", wait=True):
            started.set()
            deadline = threading.Event()
            for _ in range(500):  # trains until this process has run llm2 (5 s at most: a waiting process never does)
                if "llm2" in ran:
                    break
                deadline.wait(0.01)
            (tmp_path / "enc1.pth").write_bytes(b"weights")
            write_json_atomically(run_file(output, enc1), {"saved_model_file": str(tmp_path / "enc1.pth")})

    started = threading.Event()
    other = threading.Thread(target=other_process_trains_enc1, args=(started,))
    other.start()
    started.wait()
    failed = execute([enc1, llm1, enc2, llm2], output, work)
    other.join()
    assert failed == []
    assert ran == ["enc2", "llm2", "llm1"]
    assert json.loads(open(tmp_path / "work" / "logs" / "llm1.spec.json").read())["encoder_file"] == str(
        run_file(output, enc1)
    )


def test_lapse_grid_records_both_tests_and_reports_the_drop(tmp_path):
    record = quick_protocol_run(tmp_path, "lapse", "SASRec")
    assert set(record["test"]) == {"full", "full_no_lapse", "uni100", "uni100_no_lapse"}
    before, after = record["test"]["uni100_no_lapse"]["ndcg@10"], record["test"]["uni100"]["ndcg@10"]
    assert record["lapse_drops"]["uni100"]["ndcg@10"] == pytest.approx((before - after) / before)
    markdown = (tmp_path / "lapse" / "lastfm-tiny.md").read_text()
    line = next(line for line in markdown.splitlines() if line.startswith("| SASRec | 1 |"))
    assert f"{before:.4f} | {after:.4f} | {(before - after) / before:.4f}" in line
    assert "| CaseQ | 0 |" in markdown  # the quick lapse grid's other row, pending
    run_line = next(line for line in markdown.splitlines() if line.startswith(f"| {record['run_id']} |"))
    assert run_line.endswith(f"| {record['hardware'].split(',')[0]} |")  # its times name its machine
    assert "![both tests per model](lastfm-tiny.png)" in markdown
    assert (tmp_path / "lapse" / "lastfm-tiny.png").read_bytes().startswith(b"\x89PNG")  # the chart it shows


def test_continual_grid_records_every_block_and_reports_them(tmp_path):
    record = quick_protocol_run(tmp_path, "continual", "UniformLoRA-peso")
    blocks = record["blocks"]
    assert [b["block"] for b in blocks] == [0, 1, 2] and record["strategy"] == "softmax_kl"
    assert [b["penalty"] for b in blocks] == ["none", "softmax_kl", "softmax_kl"]
    rates = [b["learning_rate"] for b in blocks]
    assert rates[1] == pytest.approx(rates[0] * 0.1) and rates[2] == rates[1]  # from the previous block's weights
    assert len({b["encoder"] for b in blocks}) == 3  # each block's own encoder
    assert all(0 < b["trained_sequences"] <= b["users"] <= 40 for b in blocks)  # one sequence per user, the budget
    markdown = (tmp_path / "continual" / "lastfm-tiny.md").read_text()
    line = next(line for line in markdown.splitlines() if line.startswith("| UniformLoRA-peso | 1 |"))
    figures = [b["test"]["full"]["ndcg@10"] for b in blocks]
    mean = record["mean_over_later_blocks"]["full"]["ndcg@10"]
    assert mean == pytest.approx((figures[1] + figures[2]) / 2)
    assert " | ".join(f"{v:.4f}" for v in figures) + f" | **{mean:.4f}** |" in line
    assert "| UniformLoRA-finetune | 0 |" in markdown  # the quick grid's other row, pending
    run_line = next(line for line in markdown.splitlines() if line.startswith(f"| {record['run_id']} |"))
    assert run_line.endswith(f"| {record['hardware'].split(',')[0]} |")  # its times name its machine
    assert (tmp_path / "continual" / "lastfm-tiny.png").read_bytes().startswith(b"\x89PNG")


def test_a_killed_continual_grid_run_resumes_from_its_progress_file_not_a_blocks_training_state(tmp_path, monkeypatch):

    logs, saved = tmp_path / "logs", tmp_path / "saved"
    logs.mkdir()
    saved.mkdir()
    (saved / "UniformLoRA-x.training_state.pth").write_bytes(b"state")
    (saved / "UniformLoRA-continual-t.continual.json").write_text("{}")
    (logs / "r.spec.json").write_text(json.dumps({"run_id": "r"}))
    in_block_0 = "Training state: saved/UniformLoRA-x.training_state.pth (resume with --resume_checkpoint=<it>)\n"
    (logs / "r.log").write_text(in_block_0)  # killed in its first block: no block finished, nothing to resume
    assert earlier_attempt(tmp_path, "r", continual=True)["resume_checkpoint"] is None
    (logs / "r.log").write_text(
        "\x1b[33mcontinual block 0\x1b[0m: {'full': {}} (progress: saved/UniformLoRA-continual-t.continual.json)\n"
        + in_block_0  # killed in block 1, after its first training state
    )
    resumed = earlier_attempt(tmp_path, "r", continual=True)
    assert resumed["resume_checkpoint"] == str(saved / "UniformLoRA-continual-t.continual.json")
    (logs / "r.spec.json").write_text(json.dumps({"run_id": "r", **resumed}))
    (logs / "r.log").write_text("continual: resuming saved/UniformLoRA-continual-t.continual.json at block 1\n")
    again = earlier_attempt(tmp_path, "r", continual=True)  # killed again before block 1 ended
    assert again["resume_checkpoint"] == resumed["resume_checkpoint"] and len(again["earlier_attempts"]) == 2


def test_a_killed_grid_run_resumes_from_the_training_state_its_log_names(tmp_path, monkeypatch):

    logs, saved = tmp_path / "logs", tmp_path / "saved"
    logs.mkdir()
    saved.mkdir()
    assert earlier_attempt(tmp_path, "r") == {}  # a first attempt resumes nothing
    (saved / "iLoRA-x.training_state.pth").write_bytes(b"state")
    (logs / "r.spec.json").write_text(json.dumps({"run_id": "r"}))
    (logs / "r.log").write_text(
        "INFO  \x1b[34mTraining state\x1b[0m: saved/iLoRA-x.training_state.pth (resume with --resume_checkpoint=<it>)\n"
        "Train     0:  24%|##4       | 14/59\n"  # killed here
    )
    started = (logs / "r.spec.json").stat().st_mtime
    os.utime(logs / "r.log", (started + 60, started + 60))  # the log's last line, then tests that log nothing
    (saved / "iLoRA-x.test_scores.jsonl").write_text('{"prompt_id": 0}\n')
    os.utime(saved / "iLoRA-x.test_scores.jsonl", (started + 600, started + 600))  # journaled until the kill
    first = earlier_attempt(tmp_path, "r")
    assert first["earlier_attempts"][0]["wall_seconds"] == pytest.approx(600)  # not 60: the journal ran on
    (saved / "iLoRA-x.test_scores.jsonl").unlink()
    assert first["resume_checkpoint"] == str(saved / "iLoRA-x.training_state.pth")
    assert [a["log"] for a in first["earlier_attempts"]] == ["r.attempt-1.log"]
    assert not (logs / "r.log").exists() and (logs / "r.attempt-1.log").exists()  # the killed attempt's log is kept

    # The resumed attempt is killed too: its log names the state it loaded, and both attempts are counted.
    (logs / "r.spec.json").write_text(json.dumps({"run_id": "r", **first}))
    (logs / "r.log").write_text("Training state loaded from saved/iLoRA-x.training_state.pth. Resume training\n")
    second = earlier_attempt(tmp_path, "r")
    assert second["resume_checkpoint"] == first["resume_checkpoint"]
    assert [a["log"] for a in second["earlier_attempts"]] == ["r.attempt-1.log", "r.attempt-2.log"]

    # A worker refused in its setup, before it loaded any state, resumes from the same state next time.
    (logs / "r.spec.json").write_text(json.dumps({"run_id": "r", **second}))
    (logs / "r.log").write_text("Traceback (most recent call last):\n  ValueError: 'llm_init_checkpoint' ...\n")
    refused = earlier_attempt(tmp_path, "r")
    assert refused["resume_checkpoint"] == first["resume_checkpoint"] and len(refused["earlier_attempts"]) == 3
    # A worker that died of an error starts again from scratch (the error may be in what it trained).
    (logs / "r.spec.json").write_text(json.dumps({"run_id": "r", **refused}))
    (logs / "r.log").write_text(
        "Training state: saved/iLoRA-x.training_state.pth (resume\nTraceback (most recent call last):\n  ValueError\n"
    )
    third = earlier_attempt(tmp_path, "r")
    assert third["resume_checkpoint"] is None and len(third["earlier_attempts"]) == 4

    # The record's wall time: the attempts a resumed run went on from, back to the last fresh start.
    walls = [{"wall_seconds": 100.0, "resumed_from": None}, {"wall_seconds": 10.0, "resumed_from": "s"}]
    assert continued_wall({"resume_checkpoint": "s", "earlier_attempts": walls}) == 110.0
    walls.append({"wall_seconds": 1.0, "resumed_from": None})  # this attempt started over (a worker's error)
    assert continued_wall({"resume_checkpoint": "s", "earlier_attempts": walls}) == 1.0
    assert continued_wall({"resume_checkpoint": None, "earlier_attempts": walls}) == 0.0  # a fresh start


def test_status_estimates_pending_runs_from_finished_runs_of_their_row(tmp_path, monkeypatch):

    def run(row, dataset, seed):
        return {"row": row, "dataset": dataset, "run_id": f"{row}-seed{seed}-h", "kind": "baseline", "encoder": None}

    planned = [run("A", "d", 1), run("A", "d", 2), run("A", "e", 1), run("B", "d", 1)]
    for done, wall in ((planned[0], 3600), (planned[2], 7200)):
        run_file(tmp_path, done).parent.mkdir(parents=True, exist_ok=True)
        run_file(tmp_path, done).write_text(json.dumps({"run_id": done["run_id"], "wall_seconds": wall}))
    lines = status_lines(planned, tmp_path)
    assert lines[0].startswith("done") and lines[2].startswith("done")
    assert lines[1].startswith("pending") and lines[1].endswith("~1.00 h")  # row A on its own dataset d: 1 h
    assert lines[3].endswith("? h")  # row B never finished anywhere
    assert lines[-1].startswith("2 of 4 runs done; the 1 pending runs with an estimate need ~1.0 wall-hours")
    assert lines[-1].endswith("1 more has no finished run of their row yet (B)")


def test_a_record_names_the_commit_its_worker_started_from(tmp_path, monkeypatch):
    # A commit made while a run trains is not the code the run ran: the record keeps the commit of the worker's start.

    (run,) = plan(["lastfm-tiny"], ["Pop"], [2020], quick=True, backbone=QUICK_BACKBONE)
    output = tmp_path / "runs" / "Pop.json"
    output.parent.mkdir()
    spec_path = tmp_path / "Pop.spec.json"
    spec_path.write_text(json.dumps({**run, "output": str(output)}))
    import recbole_ilora.pipeline as pipeline

    head = {"commit": "abc1234"}  # HEAD when the worker starts; a commit lands while it trains
    train_and_evaluate = pipeline.train_and_evaluate

    def training_during_a_commit(*args, **kwargs):
        result = train_and_evaluate(*args, **kwargs)
        head["commit"] = "def5678"
        return result

    monkeypatch.setattr(execution, "git_commit", lambda: head["commit"])
    monkeypatch.setattr(pipeline, "train_and_evaluate", training_during_a_commit)
    worker(str(spec_path))
    record = json.loads(output.read_text())
    assert record["row"] == "Pop" and record["commit"] == "abc1234"


def test_the_grid_refuses_to_record_into_the_results_from_a_tree_with_uncommitted_changes(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import machine

    repo = tmp_path / "repo"
    (repo / "recbole_ilora").mkdir(parents=True)
    (repo / "recbole_ilora" / "model.py").write_text("A = 1\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    monkeypatch.setattr(machine, "REPO", repo)
    (repo / "notes.txt").write_text("untracked, outside the package\n")
    (repo / "recbole_ilora" / "new.py").write_text("untracked\n")
    assert machine.uncommitted_changes() == [] and not machine.git_commit().endswith("+uncommitted")
    (repo / "recbole_ilora" / "model.py").write_text("A = 2\n")
    assert machine.uncommitted_changes() == ["recbole_ilora/model.py"]
    assert machine.git_commit().endswith("+uncommitted")

    monkeypatch.setattr(execution, "uncommitted_changes", machine.uncommitted_changes)
    with pytest.raises(SystemExit, match="Refusing to record a run .*recbole_ilora/model.py"):
        refuse_uncommitted(REPO_ROOT / "results" / "lapse")
    refuse_uncommitted(tmp_path / "scratch")  # a scratch folder's records are marked instead


def test_the_warm_generative_row_starts_from_the_same_seeds_head_run(tmp_path, monkeypatch):

    runs = plan(["ml-100k"], ["iLoRA-generative-warm"], [2020], quick=False)
    by_row = {run["row"]: run for run in runs}
    # the head run it starts from is planned with it (and before it: main rows run first), with their encoder
    assert set(by_row) == {"SASRec-encoder", "iLoRA", "iLoRA-generative-warm"}
    warm, head = by_row["iLoRA-generative-warm"], by_row["iLoRA"]
    assert warm["init_from"] == head["run_id"] and head["init_from"] is None
    assert runs.index(head) < runs.index(warm)
    cold = plan(["ml-100k"], ["iLoRA", "iLoRA-generative"], [2020], quick=False)
    assert head["run_id"] in {run["run_id"] for run in cold}  # the head run is the grid's own iLoRA row
    cold_id = next(run["run_id"] for run in cold if run["row"] == "iLoRA-generative")
    assert warm["run_id"].split("-")[-1] != cold_id.split("-")[-1]  # the start is part of the run's identity
    # its checkpoint stays on the machine that trained it: elsewhere, a clear error naming what to do
    record = tmp_path / "head.json"
    record.write_text(json.dumps({"run_id": head["run_id"], "saved_model_file": str(tmp_path / "gone.pth")}))
    with pytest.raises(FileNotFoundError, match="is not on this machine .* rerun the grid"):
        init_checkpoint(record)
    (tmp_path / "gone.pth").write_bytes(b"x")
    assert init_checkpoint(record) == str(tmp_path / "gone.pth")
