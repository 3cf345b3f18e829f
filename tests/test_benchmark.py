"""The benchmark's protocol and its grid: one test loader layout for every model, seeded uni19 candidates shared by
all models, and a tiny resumable grid run checking the files it writes."""

import gzip
import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, TINY, tiny_config
from recbole.utils import init_seed

from recbole_ilora.data import protocol_test_data
from recbole_ilora.gate_report import plot_routing, uniform_records
from recbole_ilora.model.sequence_encoder import read_sasrec_checkpoint
from recbole_ilora.quick_start import objective_function
from recbole_ilora.saved_run import load_data_and_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FULL_METRIC_NAMES = ["recall", "mrr", "ndcg", "hit"]  # properties/dataset/lastfm.yaml's metrics


def candidate_rows(config, mode="uni19"):
    """(user, item) of every row of the test loader, read the way the trainer reads it (after seeding)."""
    test_data = protocol_test_data(config, mode)
    init_seed(config["seed"], config["reproducibility"])
    rows = []
    for interaction, _, positive_u, positive_i in test_data:
        rows.append((interaction["user_id"], interaction["item_id"], positive_u, positive_i))
    return rows


def flatten(rows):
    return torch.cat([u for u, *_ in rows]).tolist(), torch.cat([i for _, i, *_ in rows]).tolist()


def test_uni19_candidates_are_the_same_for_every_model_and_hold_the_target():
    # Each model with its own eval_batch_size (RecBole samples each user's candidates in user order).
    pop, sasrec, ilora = (
        candidate_rows(tiny_config(model, eval_batch_size=size))
        for model, size in (("Pop", 4096), ("SASRec", 100), ("iLoRA", 512))
    )
    assert flatten(pop) == flatten(sasrec) == flatten(ilora)  # Pop (a general model) uses the same layout

    users, items = flatten(sasrec)
    per_user = {}
    for user, item in zip(users, items, strict=True):
        per_user.setdefault(user, []).append(item)
    assert len(per_user) == 40 and all(len(candidates) == 20 for candidates in per_user.values())
    # Each user's first row is its target (RecBole's positive), which none of its 19 sampled items repeats.
    for candidates in per_user.values():
        assert candidates[0] not in candidates[1:]

    other_seed = flatten(candidate_rows(tiny_config("SASRec", seed=7)))
    assert other_seed[0] == users and other_seed[1] != items  # same users and targets, other candidates


def test_test_modes_full_equals_recboles_own_test_and_adds_uni19():
    config = {**TINY, "model": "SASRec", "epochs": 2, "test_modes": ["full", "uni19"]}
    result = objective_function(config_dict=config)
    assert result["test_results"]["full"] == result["test_result"]  # the same loader RecBole builds itself
    uni19 = result["test_results"]["uni19"]
    assert uni19["hit@10"] > result["test_result"]["hit@10"]  # 20 candidates are easier than all 1,461 items
    # uni19's Hit@1 recomputed here from the saved model's scores of the very candidates the loader gave
    _, model, *_ = load_data_and_model(result["saved_model_file"])
    test_config = tiny_config("SASRec", epochs=2, test_modes=["full", "uni19"])
    first, users = {}, {}
    with torch.no_grad():
        for interaction, _, _, _ in _loader_batches(test_config):
            scores = model.predict(interaction)
            for user, item, score in zip(
                interaction["user_id"].tolist(), interaction["item_id"].tolist(), scores, strict=True
            ):
                first.setdefault(user, (item, float(score)))  # each user's first row is its target
                users.setdefault(user, []).append(float(score))
    hits = [first[user][1] > max(scores[1:]) for user, scores in users.items()]
    assert len(hits) == 40 and uni19["hit@1"] == pytest.approx(sum(hits) / len(hits))
    assert 0 < sum(hits) < 40  # neither every user nor none: the comparison means something
    assert result["trainable_parameters"] == sum(p.numel() for p in _sasrec_parameters(result))


def _loader_batches(config, mode="uni19"):
    test_data = protocol_test_data(config, mode)
    init_seed(config["seed"], config["reproducibility"])  # as the runner does before testing each mode
    return list(test_data)


def _sasrec_parameters(result):
    return torch.load(result["saved_model_file"], weights_only=True)["state_dict"].values()


def test_routing_png_draws_a_gate_next_to_the_uniform_gate(tmp_path):
    records = [
        {"user_id": str(u), "weights": w, "entropy": -sum(x * math.log(x) for x in w), "top_expert": w.index(max(w))}
        for u, w in enumerate([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6], [0.25, 0.25, 0.25, 0.25]])
    ]
    uniform = uniform_records(records)
    assert all(r["weights"] == [0.25] * 4 and r["entropy"] == math.log(4) for r in uniform)
    plot_routing({"iLoRA": records, "uniform gate": uniform}, tmp_path / "routing.png")
    assert (tmp_path / "routing.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="same number of experts"):
        plot_routing({"a": records, "b": [{**records[0], "weights": [0.5, 0.5]}]}, tmp_path / "bad.png")


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


def test_grid_plans_main_rows_then_generative_rows_then_ablations(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "grid.py"), "--quick", "--status"]
    status = subprocess.run(command + ["--output", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert status.returncode == 0, status.stderr[-3000:]
    rows = [line.split()[2].split("-seed")[0] for line in status.stdout.splitlines() if line.startswith("pending")]
    assert rows == [
        "Pop", "SASRec", "SASRec-encoder", "UniformLoRA", "iLoRA", "iLoRA-generative", "iLoRA-gate-uniform"
    ]  # fmt: skip


def test_answer_statistics_count_distinct_answers_and_collapsed_outputs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import grid

    verdicts = [
        {"output": "Star Wars", "named": []},
        {"output": " Star Wars ", "named": []},
        {"output": "Heat", "named": ["Heat"]},
        {"output": "Heat and Ghost", "named": ["Heat", "Ghost"]},
    ]
    path = tmp_path / "run.generations.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as file:
        file.writelines(json.dumps(verdict) + "\n" for verdict in verdicts)
    stats = grid.answer_statistics(path)
    assert stats == {
        "users": 4,
        "distinct_answers": 3,
        "top_answer": "Star Wars",
        "top_answer_share": 0.5,
        "naming_no_candidate": 0.5,
        "naming_several": 0.25,
    }
    record = {"row": "iLoRA-generative", "seed": 2020, "dataset": "d", "run_id": "iLoRA-generative-seed2020-x"}
    runs = tmp_path / "runs" / "d"
    runs.mkdir(parents=True)
    path.rename(runs / "iLoRA-generative-seed2020-x.generations.jsonl.gz")
    table = grid.answers_table({"iLoRA-generative": [record]}, tmp_path)
    assert "| iLoRA-generative | 2020 | 4 | 3 | `Star Wars` | 0.500 | 0.500 | 0.250 |" in table.splitlines()


def test_a_retrained_encoder_keeps_the_record_its_llm_rows_used(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import grid

    def record(run_id, ndcg, finished="2026-11-23T22:58:26+00:00", **extra):
        test = {"full": {"ndcg@10": ndcg}, "uni19": {"hit@1": 0.4}}
        return {"run_id": run_id, "dataset": "d", "finished": finished, "test": test, **extra}

    path = tmp_path / "runs" / "d" / "SASRec-encoder-seed1-e.json"
    path.parent.mkdir(parents=True)
    first = record("SASRec-encoder-seed1-e", 0.05, saved_model_file="/saved/old.pth")
    path.write_text(json.dumps(first))
    grid.keep_superseded(path)  # the worker, before writing the retrained encoder's record
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
    lines = grid.encoder_notes(planned, done, tmp_path)
    assert lines == [
        f"| iLoRA-seed1-a | `{kept.name}` | 0.0500, 0.4000 (machine not recorded) | 0.0600, 0.4000 (2 x CPU) "
        "| to be trained again |"
    ]
    # the retrained encoder is another model (its metrics differ), so the grid trains "before" again, not "after"
    assert not grid.finished(tmp_path, before) and grid.finished(tmp_path, after)
    shown, stale = grid.recorded_runs(planned, tmp_path)  # the tables compare runs of one encoder per seed
    assert [r["run_id"] for r in shown] == [second["run_id"], after["run_id"]]
    assert [r["run_id"] for r in stale] == [before["run_id"]]
    assert grid.incomplete_grid_lines(len(shown), len(planned), len(stale))[0] == (
        "**Incomplete grid: 2 of 3 runs finished.** 1 more was trained with an earlier encoder and waits to be trained "
        'again: the tables leave it out (see "Encoders trained again"). Rerun the command to resume.'
    )
    assert grid.incomplete_grid_lines(3, 3, 0) == []  # a complete grid's report has no warning

    # an encoder retrained into the same model (identical metrics, new checkpoint file) leaves its LLM rows valid
    reproduced = {**second, "test": first["test"]}
    path.write_text(json.dumps(reproduced))
    assert grid.finished(tmp_path, before) and grid.finished(tmp_path, after)
    notes = grid.encoder_notes(planned, [reproduced, *done[1:]], tmp_path)
    assert notes[0].endswith("| kept: the encoder reproduced exactly |")
    kept.unlink()  # the earlier encoder's record is lost: which model trained "before" is unknown
    assert not grid.finished(tmp_path, before) and grid.finished(tmp_path, after)


def test_an_encoder_kept_with_the_results_resumes_its_llm_rows_on_a_machine_that_lost_the_checkpoint(
    tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import grid

    saved = tmp_path / "work" / "saved" / "SASRec-Nov-30-2026_10-11-33.pth"
    saved.parent.mkdir(parents=True)
    weights = {"item_embedding.weight": torch.randn(5, 4)}
    torch.save({"config": {"model": "SASRec"}, "state_dict": weights, "optimizer": {"state": {}}}, saved)
    output = tmp_path / "results"
    encoder = {"run_id": "SASRec-encoder-seed1-e", "dataset": "d", "kind": "encoder", "encoder": None}
    llm = {"run_id": "iLoRA-seed1-a", "dataset": "d", "kind": "llm", "encoder": encoder["run_id"]}
    encoder_path = grid.run_file(output, encoder)
    grid.write_json_atomically(encoder_path, {"run_id": encoder["run_id"], "saved_model_file": str(saved)})

    grid.execute([encoder], output, tmp_path / "work")  # finished: nothing runs, but the checkpoint is copied
    copy = output / "runs" / "d" / "encoders" / saved.name
    kept = torch.load(copy, weights_only=True)
    assert set(kept) == {"config", "state_dict"} and torch.equal(
        kept["state_dict"]["item_embedding.weight"], weights["item_embedding.weight"]
    )
    assert grid.encoder_checkpoint(encoder_path) == str(saved)

    saved.unlink()  # a new machine: --work is empty, the results were cloned
    assert grid.finished(output, encoder) and grid.encoder_checkpoint(encoder_path) == str(copy)
    # an LLM row trained in another clone with the same encoder (same checkpoint name, another folder) stays valid
    llm_record = {"run_id": llm["run_id"], "sasrec_checkpoint": f"/elsewhere/results/runs/d/encoders/{saved.name}"}
    grid.write_json_atomically(grid.run_file(output, llm), llm_record)
    assert grid.finished(output, llm)
    copy.unlink()  # the copy lost too: the encoder must be trained again
    assert not grid.finished(output, encoder)


def test_grid_processes_sharing_a_folder_skip_each_others_runs_and_wait_for_an_encoder(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import threading

    import grid

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
            grid.write_json_atomically(grid.run_file(output, run("b")), {"run_id": "b"})
        if spec["run_id"] == "llm":
            assert spec["encoder_file"] == str(grid.run_file(output, encoder))
        grid.write_json_atomically(spec["output"], {"run_id": spec["run_id"]})
        return 0

    monkeypatch.setattr(grid.subprocess, "call", fake_worker)

    def other_process_trains_the_encoder(started):
        with grid.run_lock(work, "enc", wait=True):
            started.set()
            while "c" not in ran:  # still training while this process reaches the LLM row
                threading.Event().wait(0.01)
            (tmp_path / "enc.pth").write_bytes(b"weights")
            grid.write_json_atomically(grid.run_file(output, encoder), {"saved_model_file": str(tmp_path / "enc.pth")})

    started = threading.Event()
    other = threading.Thread(target=other_process_trains_the_encoder, args=(started,))
    with grid.run_lock(work, "held", wait=False) as held:  # another process is running "held"
        assert held
        other.start()
        started.wait()
        failed = grid.execute(runs, output, work)
    other.join()
    assert failed == []
    assert ran == ["a", "c", "llm"]  # not "held" (locked), "b" (finished meanwhile) nor "enc" (locked)
    assert not grid.run_file(output, run("held")).exists()
    with grid.run_lock(work, "held", wait=False) as free:  # every lock was given back
        assert free


def test_a_grid_process_runs_other_runs_while_another_trains_the_encoder_it_needs(tmp_path, monkeypatch):
    """Two processes on seeds 1 and 2: while the other trains seed 1's encoder, this one trains seed 2's encoder and
    its LLM row instead of sleeping on the lock; it comes back to seed 1's LLM row at the end."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import threading

    import grid

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
        grid.write_json_atomically(spec["output"], {"run_id": spec["run_id"], "saved_model_file": str(weights)})
        return 0

    monkeypatch.setattr(grid.subprocess, "call", fake_worker)

    def other_process_trains_enc1(started):
        with grid.run_lock(work, "enc1", wait=True):
            started.set()
            deadline = threading.Event()
            for _ in range(500):  # trains until this process has run llm2 (5 s at most: a waiting process never does)
                if "llm2" in ran:
                    break
                deadline.wait(0.01)
            (tmp_path / "enc1.pth").write_bytes(b"weights")
            grid.write_json_atomically(grid.run_file(output, enc1), {"saved_model_file": str(tmp_path / "enc1.pth")})

    started = threading.Event()
    other = threading.Thread(target=other_process_trains_enc1, args=(started,))
    other.start()
    started.wait()
    failed = grid.execute([enc1, llm1, enc2, llm2], output, work)
    other.join()
    assert failed == []
    assert ran == ["enc2", "llm2", "llm1"]
    assert json.loads(open(tmp_path / "work" / "logs" / "llm1.spec.json").read())["encoder_file"] == str(
        grid.run_file(output, enc1)
    )


def test_the_report_gives_lasers_balance_loss_per_seed_from_its_records(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import grid

    laser = [{"seed": 2021, "model_summary": {"balance_loss": 1.25}}, {"seed": 2020, "model_summary": None},
             {"seed": 2022, "model_summary": {"balance_loss": 7.9}}]  # fmt: skip
    (line, _) = grid.balance_lines({"Laser": laser, "iLoRA": [{"seed": 2020}]})
    assert line.endswith("seed 2021: 1.2500; seed 2022: 7.9000.")  # seed order; a run without the figure left out
    assert "one-hot by construction" in line  # the shipped mformer_top_k: 1 makes the gate table's entropy 0
    assert grid.balance_lines({"iLoRA": [{"seed": 2020}]}) == []  # no Laser row, no line


def test_the_readme_gets_each_table_apart_and_the_claims_without_their_why(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import grid

    results = "\n".join([
        "# ml-100k", "", "## Full ranking (test)", "", "| model | ndcg@10 |", "|---|---|", "| SASRec | 0.06 |", "",
        "## The paper's protocol: a generated title (test)", "", "Text.", "", "| model | hr@1 |", "|---|---|",
        "| iLoRA | 0.07 |", "", "What the models answered:", "", "| model | answers |", "|---|---|", "| iLoRA | 451 |",
        "", "## The paper's claims", "", "| claim | verdict | why |", "|---|---|---|",
        "| 1 | not distinguishable | a \\| b, long |", "", "## Runs", "", "| run | commit |", "|---|---|", "| r | c |",
    ])  # fmt: skip
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:ml-100k -->\nstale\n<!-- /results:ml-100k -->\nafter\n"
                      "<!-- results:lastfm -->\n<!-- /results:lastfm -->\nend\n", encoding="utf-8")  # fmt: skip
    grid.update_readme("ml-100k", results, 3, 4, readme=readme)
    grid.update_readme("lastfm", results.replace("ml-100k", "lastfm"), 1, 2, readme=readme)
    grid.update_readme("ml-1m", results, 1, 2, readme=readme)  # no markers of its own: nothing changes
    text = readme.read_text(encoding="utf-8")
    ours, lastfm = text.split("<!-- results:ml-100k -->")[1], text.split("<!-- results:lastfm -->")[1]
    assert text.startswith("intro\n") and "\nafter\n" in text and text.endswith("end\n") and "stale" not in text
    # Two tables of one section stay two tables (a blank line between), not one table with a second header inside.
    assert "| iLoRA | 0.07 |\n\n| model | answers |" in ours
    # The claims without the 'why' column (an escaped pipe inside it is no column break), linked to instead.
    assert "| claim | verdict |\n|---|---|\n| 1 | not distinguishable |\n" in ours and "long" not in ours
    assert "(results/ml-100k.md#the-papers-claims)" in ours
    assert "| run | commit |" not in ours  # only the sections the README shows
    assert "| SASRec | 0.06 |" not in lastfm.split("<!-- /results:lastfm -->")[0]  # LastFM: its claims only
    assert "(results/lastfm.md#the-papers-claims)" in lastfm and "1 of 2 runs finished" in lastfm


def test_answer_popularity_ranks_answers_and_targets_among_their_candidates_by_training_counts(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import answer_popularity as ap

    assert ap.ranks([5, 9, 5, 1]) == [2.5, 1.0, 2.5, 4.0]  # ties share their mean rank
    counts = {10: 9, 11: 5, 12: 5, 13: 1}  # times each item is a training target
    lines = [  # candidates 10..13; user a's target is the most trained, b's ties with another
        {"user_id": "a", "target_id": 10, "candidate_ids": [13, 10, 11, 12], "candidates": ["D", "A", "B", "C"],
         "named": ["D"]},  # answers the least trained: rank 4
        {"user_id": "b", "target_id": 11, "candidate_ids": [11, 12, 13, 99], "candidates": ["B", "C", "D", "Z"],
         "named": ["B", "C"]},  # names two candidates: not counted as an answer
    ]  # fmt: skip
    stats = ap.popularity_statistics(lines, counts, {"a": 10, "b": 11})
    assert stats["popularity_pick_hit@1"] == pytest.approx((1 + 0.5) / 2)  # b's target shares the top with item 12
    assert stats["target_rank_mean"] == pytest.approx((1 + 1.5) / 2)
    assert stats["answers_naming_one_candidate"] == 1 and stats["answer_rank_mean"] == 4.0
    assert stats["answers_most_trained"] == 0.0 and stats["random_pick"]["answer_rank_mean"] == 2.5
    assert stats["answers_by_position"] == [1, 0, 0, 0]  # a's answer, first in its list
    assert stats["targets_by_position"] == [1, 1, 0, 0]  # b's target first, a's second
    assert stats["right_answers_by_position"] == [0, 0, 0, 0]  # a answered wrong, b named two
    lines[0]["named"] = ["A"]  # now a names its target, second in its list
    assert ap.popularity_statistics(lines, counts, {"a": 10, "b": 11})["right_answers_by_position"] == [0, 1, 0, 0]
    with pytest.raises(ValueError, match="user b: the file's target 11 is not the user's test item"):
        ap.popularity_statistics(lines, counts, {"a": 10, "b": 12})  # another split: refused


def test_gate_table_gives_each_gate_its_top_weight_so_a_uniform_gate_is_not_read_as_routing(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import grid

    gates = {
        "iLoRA": [[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6]],  # routes: top weights 0.7 and 0.6
        "iLoRA-gate-uniform": [[0.25, 0.25, 0.25, 0.25]] * 2,  # every user "led" by expert 0, by index alone
    }
    by_row = {}
    for row, weights in gates.items():
        record = {"run_id": f"{row}-seed1-h", "dataset": "d", "seed": 1}
        entropies = [-sum(w * math.log(w) for w in user) for user in weights]
        leads = [sum(max(range(4), key=user.__getitem__) == k for user in weights) for k in range(4)]
        record["gate"] = {
            "num_experts": 4,
            "users": 2,
            "mean_entropy": sum(entropies) / 2,
            "users_led_by_expert": leads,
        }
        path = grid.run_file(tmp_path, record).with_suffix(".gates.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"weights": user}) + "\n" for user in weights))
        by_row[row] = [record]
    lines = grid.gate_table(by_row, tmp_path).splitlines()
    assert lines[2].startswith("| iLoRA | 1 | 4 |") and "| 0.650 | 0.50/0.00/0.00/0.50 |" in lines[2]
    assert (
        lines[3].startswith("| iLoRA-gate-uniform | 1 | 4 | 1.386 |") and "| 0.250 | 1.00/0.00/0.00/0.00 |" in lines[3]
    )


def test_generative_table_leaves_an_undefined_hr_at_1_valid_out_of_the_mean(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import grid

    def record(valid_ratio, hr_valid, hr_all):
        generative = {"users": 943, "valid_ratio": valid_ratio, "hr@1_valid": hr_valid, "hr@1_all": hr_all}
        return {"generative": generative, "trainable_parameters": 10, "wall_seconds": 60, "cpu_seconds": 60}

    # the third seed has no valid answer: HR@1 (valid) is None, or 0 in records written before it was None; no miss
    by_row = {
        "UniformLoRA-generative": [record(0.004, 0.5, 0.002), record(0.008, 0.25, 0.002), record(0.0, 0.0, 0.0)],
        "iLoRA-generative": [record(0.002, 1.0, 0.002), record(0.004, 0.5, 0.002), record(0.0, None, 0.0)],
    }
    table = grid.protocol_table(by_row, grid.GENERATIVE_METRICS, grid.generative_metrics, grid.GENERATIVE_ROWS)
    lines = table.splitlines()
    assert lines[2] == (
        "| UniformLoRA-generative | 3 | **0.0040 ± 0.0040** | 0.3750 ± 0.1768 (2 of 3 seeds) | "
        "**0.0013 ± 0.0012** | 10 | 1.0 | 1.0 |"
    )
    assert lines[3] == (
        "| iLoRA-generative | 3 | 0.0020 ± 0.0020 | **0.7500 ± 0.3536** (2 of 3 seeds) | "
        "**0.0013 ± 0.0012** | 10 | 1.0 | 1.0 |"
    )


def _generations(path, correct):
    with gzip.open(path, "wt", encoding="utf-8") as file:
        for user, is_correct in correct.items():
            file.write(json.dumps({"user_id": user, "correct": is_correct, "valid": True}) + "\n")


def test_claims_compare_one_seed_user_by_user_and_several_seeds_in_stds(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import claims

    users = [str(u) for u in range(100)]
    # iLoRA answers 30 users right, UniformLoRA 10 of them: a paired difference of 0.2 over 100 users
    ilora = {u: int(u) < 30 for u in users}
    uniform = {u: int(u) < 10 for u in users}
    for name, correct in (("iLoRA-generative", ilora), ("UniformLoRA-generative", uniform)):
        _generations(tmp_path / f"{name}.generations.jsonl.gz", correct)

    def record(name, seed, hr):
        return {"row": name, "seed": seed, "_path": str(tmp_path / f"{name}.json"), "trainable_parameters": 10,
                "generative": {"valid_ratio": 1.0, "hr@1_valid": hr, "hr@1_all": hr}}  # fmt: skip

    one_seed = {"iLoRA-generative": [record("iLoRA-generative", 2020, 0.3)],
                "UniformLoRA-generative": [record("UniformLoRA-generative", 2020, 0.1)]}  # fmt: skip
    result = claims.compare_rows(one_seed, "iLoRA-generative", ["UniformLoRA-generative"], claims.hr1_all, "HR@1 (all)")
    se = statistics.stdev([int(ilora[u]) - int(uniform[u]) for u in users]) / 10
    assert f"+0.2000 ± {se:.4f}" in result["figure"] and f"z = {0.2 / se:+.1f}" in result["figure"]
    assert result["verdict"] == "reproduced"  # z = 5
    assert claims.compare_rows(one_seed, "UniformLoRA-generative", ["iLoRA-generative"], claims.hr1_all, "HR@1 (all)")[
        "verdict"
    ].startswith("not reproduced")

    seeds = {row: [record(row, s, hr + 0.01 * k) for k, s in enumerate((2020, 2021, 2022))]
             for row, hr in (("iLoRA-generative", 0.30), ("UniformLoRA-generative", 0.29))}  # fmt: skip
    close = claims.compare_rows(seeds, "iLoRA-generative", ["UniformLoRA-generative"], claims.hr1_all, "HR@1 (all)")
    assert "d = +1.0" in close["figure"] and close["verdict"].startswith("not distinguishable")  # 0.01 / std 0.01
    # every seed's answers paired user by user, pooled over seeds (shown beside d; d decides over seeds)
    assert f"paired over 3 seeds x 100 users: +0.2000 ± {se / math.sqrt(3):.4f}" in close["figure"]
    seeds["UniformLoRA-generative"][1]["_path"] = str(tmp_path / "elsewhere.json")  # seed 2021 kept no answers
    assert "paired over 2 seeds x 100 users" in claims.compare_rows(
        seeds, "iLoRA-generative", ["UniformLoRA-generative"], claims.hr1_all, "HR@1 (all)")["figure"]  # fmt: skip
    parameters = {"iLoRA": [{"trainable_parameters": 1005}], "UniformLoRA": [{"trainable_parameters": 1000}]}
    assert claims.parameter_claim(parameters)["verdict"] == "reproduced"


def test_the_encoder_target_pairs_every_seed_with_its_own_encoder(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import claims

    users = [str(u) for u in range(100)]
    records, encoders, diffs = [], {}, []
    for k, seed in enumerate((2020, 2021)):
        mine = {u: int(u) < 10 + 10 * k for u in users}  # 10 then 20 users right
        encoder = {u: int(u) < 40 for u in users}  # its encoder: 40 right in both seeds
        _generations(tmp_path / f"run{seed}.generations.jsonl.gz", mine)
        hr = 0.1 + 0.1 * k
        generative = {"valid_ratio": 1.0, "hr@1_valid": hr, "hr@1_all": hr}
        records.append(
            {
                "row": "iLoRA-generative",
                "seed": seed,
                "_path": str(tmp_path / f"run{seed}.json"),
                "generative": generative,
            }
        )
        encoders[seed] = {"hit@1": 0.4, "per_user": encoder}
        diffs.append(claims.paired(mine, encoder))
    (line,) = [t for t in claims.targets_section("ml-100k", {"iLoRA-generative": records}, encoders) if "SASRec" in t]
    # By hand: seed 2020's per-user differences are -1 for 30 users and 0 for 70 (mean -0.3, sample variance
    # (30 x 0.7² + 70 x 0.3²) / 99 = 21/99); seed 2021's -1 for 20 and 0 for 80 (mean -0.2, variance 16/99). The
    # pooled difference is their mean, -0.25, with standard error sqrt(21/99/100 + 16/99/100) / 2 = 0.030567.
    assert diffs[0]["diff"] == -0.3 and diffs[1]["diff"] == -0.2  # the seeds differ: pooling can be told from one
    assert "paired over 2 seeds x 100 users: -0.2500 ± 0.0306" in line and line.endswith("| no |")


def test_encoder_on_prompt_candidates_equals_its_full_ranking_restricted_to_them(sasrec_checkpoint, tmp_path):
    monkeypatch_path = str(REPO_ROOT / "benchmarks")
    sys.path.insert(0, monkeypatch_path)
    try:
        import claims
    finally:
        sys.path.remove(monkeypatch_path)
    _, model, dataset, _, _, test_data = load_data_and_model(sasrec_checkpoint)
    lines, expected = [], {}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for interaction, _, _, _ in test_data:
            scores = model.full_sort_predict(interaction).view(len(interaction), -1)
            for row, user in enumerate(interaction["user_id"].tolist()):
                target = int(interaction["item_id"][row])
                others = [i for i in torch.randperm(dataset.item_num - 1, generator=generator)[:25].add(1).tolist()
                          if i != target][:19]  # fmt: skip
                candidates = others[:7] + [target] + others[7:]
                token = str(dataset.id2token("user_id", user))
                lines.append({"user_id": token, "candidate_ids": candidates})
                expected[token] = bool(candidates[int(scores[row, candidates].argmax())] == target)
    path = tmp_path / "run.generations.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as file:
        file.writelines(json.dumps(line) + "\n" for line in lines)
    result = claims.encoder_on_candidates(path, sasrec_checkpoint, tmp_path / "cache.json")
    assert result["per_user"] == expected and result["users"] == 40
    assert 0 < sum(expected.values()) < 40  # some right, some wrong: the comparison can fail
    assert claims.encoder_on_candidates(path, "no-such-file", tmp_path / "cache.json") == result  # cached


def quick_protocol_run(tmp_path, protocol, row):
    """One row of the quick grid under ``protocol``, run as a user runs it; returns its record."""
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "grid.py"), "--quick", "--protocol", protocol]
    command += ["--rows", row, "--output", str(tmp_path / protocol)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (path,) = (tmp_path / protocol / "runs" / "lastfm-tiny").glob(f"{row}-seed2020-*.json")
    return json.loads(path.read_text())


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


def test_the_continual_claim_compares_the_mean_over_later_blocks_over_seeds(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import grid

    def record(row, seed, later, hit=0.2):  # block 0 is the same for both rows: only blocks 1..T-1 count
        blocks = [{"block": b, "test": {"full": {"ndcg@10": 0.5 if b == 0 else later}, "uni19": {"hit@1": hit}},
                   "users": 10, "training_sequences": 30, "trained_sequences": 10, "wall_seconds": 60.0}
                  for b in range(3)]  # fmt: skip
        mean = {"full": {"ndcg@10": later}, "uni19": {"hit@1": hit}}
        return {"run_id": f"{row}-{seed}", "row": row, "seed": seed, "blocks": blocks, "blocks_total": 3,
                "mean_over_later_blocks": mean, "commit": "c", "hardware": "h", "finished": "t",
                "wall_seconds": 180.0, "epochs_cap": 1, "llm_train_sequences_per_user": 1}  # fmt: skip

    planned = [{"seed": seed, "backbone": "embedded"} for seed in (1, 2, 3)]

    def claim_line(peso, finetune, metric="ndcg@10 (full)", peso_hits=(0.2,) * 3, finetune_hits=(0.2,) * 3):
        rows = (("UniformLoRA-finetune", finetune, finetune_hits), ("UniformLoRA-peso", peso, peso_hits))
        by_row = {
            row: [record(row, seed, v, h) for seed, v, h in zip((1, 2, 3), values, hits, strict=True)]
            for row, values, hits in rows
        }
        done = [r for records in by_row.values() for r in records]
        markdown = grid.render_continual("d", planned, by_row, True, done)
        start = f"| UniformLoRA-peso vs UniformLoRA-finetune | {metric} |"
        return next(line for line in markdown.splitlines() if line.startswith(start))

    assert claim_line([0.30, 0.31, 0.32], [0.20, 0.21, 0.22]).endswith("| reproduced |")
    assert "not reproduced (the other way round)" in claim_line([0.20, 0.21, 0.22], [0.30, 0.31, 0.32])
    assert "not distinguishable at this budget (d = +0.5" in claim_line([0.21, 0.25, 0.23], [0.20, 0.24, 0.22])
    # the second metric has its own verdict, from its own figures: here the other way round to full NDCG@10's
    low, high = (0.20, 0.21, 0.22), (0.30, 0.31, 0.32)
    hit_line = claim_line(list(high), list(low), "hit@1 (uni19)", peso_hits=low, finetune_hits=high)
    assert "not reproduced (the other way round)" in hit_line and "0.2100 ± 0.0100 (3 seeds)" in hit_line


def test_the_continual_report_shows_the_proximal_terms_weight_or_that_a_run_did_not_record_it(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import grid

    def share(term, ratio):
        return {"batches": 3, "term": term, "penalty_grad_norm": ratio * 2.0, "task_grad_norm": 2.0,
                "grad_norm_ratio": ratio, "last_term": term}  # fmt: skip

    def record(seed, shares):
        blocks = [{"block": 0, "penalty": "none", "penalty_weight": None, "proximal": None}]
        blocks += [{"block": b + 1, "penalty": "softmax_kl", "penalty_weight": 2.0, "proximal": s}
                   for b, s in enumerate(shares)]  # fmt: skip
        return {"seed": seed, "blocks": blocks}

    lines = grid.proximal_share_lines({
        "UniformLoRA-peso": [record(2021, [share(1e-6, 1e-4), share(3e-6, 3e-4)]), record(2020, [None, None])],
        "UniformLoRA-finetune": [{"seed": 2020, "blocks": [{"block": 1, "penalty": "none", "proximal": None}]}],
    })  # fmt: skip
    rows = [line for line in lines if line.startswith("| UniformLoRA")]
    assert rows == [
        "| UniformLoRA-peso | 2020 | 2.0 | not recorded | – | – | – |",  # its seeds in order
        "| UniformLoRA-peso | 2021 | 2.0 | 2e-06 | 0.0004 | 2 | 0.0002 |",
    ]  # means over blocks 1..2
    assert grid.proximal_share_lines({"UniformLoRA-finetune": [record(2020, [])]}) == []  # no penalised row


def test_a_killed_continual_grid_run_resumes_from_its_progress_file_not_a_blocks_training_state(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import grid

    logs, saved = tmp_path / "logs", tmp_path / "saved"
    logs.mkdir()
    saved.mkdir()
    (saved / "UniformLoRA-x.training_state.pth").write_bytes(b"state")
    (saved / "UniformLoRA-continual-t.continual.json").write_text("{}")
    (logs / "r.spec.json").write_text(json.dumps({"run_id": "r"}))
    in_block_0 = "Training state: saved/UniformLoRA-x.training_state.pth (resume with --resume_checkpoint=<it>)\n"
    (logs / "r.log").write_text(in_block_0)  # killed in its first block: no block finished, nothing to resume
    assert grid.earlier_attempt(tmp_path, "r", continual=True)["resume_checkpoint"] is None
    (logs / "r.log").write_text(
        "\x1b[33mcontinual block 0\x1b[0m: {'full': {}} (progress: saved/UniformLoRA-continual-t.continual.json)\n"
        + in_block_0  # killed in block 1, after its first training state
    )
    resumed = grid.earlier_attempt(tmp_path, "r", continual=True)
    assert resumed["resume_checkpoint"] == str(saved / "UniformLoRA-continual-t.continual.json")
    (logs / "r.spec.json").write_text(json.dumps({"run_id": "r", **resumed}))
    (logs / "r.log").write_text("continual: resuming saved/UniformLoRA-continual-t.continual.json at block 1\n")
    again = grid.earlier_attempt(tmp_path, "r", continual=True)  # killed again before block 1 ended
    assert again["resume_checkpoint"] == resumed["resume_checkpoint"] and len(again["earlier_attempts"]) == 2


def test_a_killed_grid_run_resumes_from_the_training_state_its_log_names(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import grid

    logs, saved = tmp_path / "logs", tmp_path / "saved"
    logs.mkdir()
    saved.mkdir()
    assert grid.earlier_attempt(tmp_path, "r") == {}  # a first attempt resumes nothing
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
    first = grid.earlier_attempt(tmp_path, "r")
    assert first["earlier_attempts"][0]["wall_seconds"] == pytest.approx(600)  # not 60: the journal ran on
    (saved / "iLoRA-x.test_scores.jsonl").unlink()
    assert first["resume_checkpoint"] == str(saved / "iLoRA-x.training_state.pth")
    assert [a["log"] for a in first["earlier_attempts"]] == ["r.attempt-1.log"]
    assert not (logs / "r.log").exists() and (logs / "r.attempt-1.log").exists()  # the killed attempt's log is kept

    # The resumed attempt is killed too: its log names the state it loaded, and both attempts are counted.
    (logs / "r.spec.json").write_text(json.dumps({"run_id": "r", **first}))
    (logs / "r.log").write_text("Training state loaded from saved/iLoRA-x.training_state.pth. Resume training\n")
    second = grid.earlier_attempt(tmp_path, "r")
    assert second["resume_checkpoint"] == first["resume_checkpoint"]
    assert [a["log"] for a in second["earlier_attempts"]] == ["r.attempt-1.log", "r.attempt-2.log"]

    # A worker refused in its setup, before it loaded any state, resumes from the same state next time.
    (logs / "r.spec.json").write_text(json.dumps({"run_id": "r", **second}))
    (logs / "r.log").write_text("Traceback (most recent call last):\n  ValueError: 'llm_init_checkpoint' ...\n")
    refused = grid.earlier_attempt(tmp_path, "r")
    assert refused["resume_checkpoint"] == first["resume_checkpoint"] and len(refused["earlier_attempts"]) == 3
    # A worker that died of an error starts again from scratch (the error may be in what it trained).
    (logs / "r.spec.json").write_text(json.dumps({"run_id": "r", **refused}))
    (logs / "r.log").write_text(
        "Training state: saved/iLoRA-x.training_state.pth (resume\nTraceback (most recent call last):\n  ValueError\n"
    )
    third = grid.earlier_attempt(tmp_path, "r")
    assert third["resume_checkpoint"] is None and len(third["earlier_attempts"]) == 4

    # The record's wall time: the attempts a resumed run went on from, back to the last fresh start.
    walls = [{"wall_seconds": 100.0, "resumed_from": None}, {"wall_seconds": 10.0, "resumed_from": "s"}]
    assert grid.continued_wall({"resume_checkpoint": "s", "earlier_attempts": walls}) == 110.0
    walls.append({"wall_seconds": 1.0, "resumed_from": None})  # this attempt started over (a worker's error)
    assert grid.continued_wall({"resume_checkpoint": "s", "earlier_attempts": walls}) == 1.0
    assert grid.continued_wall({"resume_checkpoint": None, "earlier_attempts": walls}) == 0.0  # a fresh start


def test_status_estimates_pending_runs_from_finished_runs_of_their_row(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import grid

    def run(row, dataset, seed):
        return {"row": row, "dataset": dataset, "run_id": f"{row}-seed{seed}-h", "kind": "baseline", "encoder": None}

    planned = [run("A", "d", 1), run("A", "d", 2), run("A", "e", 1), run("B", "d", 1)]
    for done, wall in ((planned[0], 3600), (planned[2], 7200)):
        grid.run_file(tmp_path, done).parent.mkdir(parents=True, exist_ok=True)
        grid.run_file(tmp_path, done).write_text(json.dumps({"run_id": done["run_id"], "wall_seconds": wall}))
    lines = grid.status_lines(planned, tmp_path)
    assert lines[0].startswith("done") and lines[2].startswith("done")
    assert lines[1].startswith("pending") and lines[1].endswith("~1.00 h")  # row A on its own dataset d: 1 h
    assert lines[3].endswith("? h")  # row B never finished anywhere
    assert lines[-1].startswith("2 of 4 runs done; the 1 pending runs with an estimate need ~1.0 wall-hours")
    assert lines[-1].endswith("1 more has no finished run of their row yet (B)")


def test_the_pretrained_grid_runs_its_generative_ablations_for_the_first_seed_only(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import grid

    rows = ("iLoRA", "iLoRA-generative", "iLoRA-K2-generative")
    runs = grid.plan(["ml-100k"], list(rows), grid.SEEDS, quick=False)
    seeds = {row: sorted(r["seed"] for r in runs if r["row"] == row) for row in rows}
    # the budget's cut: the paper's-protocol ablations run seed 2020 only; the main rows keep every seed
    assert seeds == {"iLoRA": [2020, 2021, 2022], "iLoRA-generative": [2020, 2021, 2022], "iLoRA-K2-generative": [2020]}


def test_paired_answers_count_users_per_verdict_and_refuse_unpaired_files(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import paired_answers

    def line(user, output, correct, candidates=("A", "B")):
        return {"user_id": user, "candidates": list(candidates), "target": "A", "output": output,
                "valid": output in candidates, "correct": correct}  # fmt: skip

    a = {1: line(1, "A", True), 2: line(2, "A", True), 3: line(3, "B", False), 4: line(4, "x", False)}
    b = {1: line(1, "A", True), 2: line(2, "B", False), 3: line(3, "A", True), 4: line(4, "A", True)}
    result = paired_answers.compare(a, b)
    assert result["right"] == {"both": 1, "a_only": 1, "b_only": 2, "neither": 0}
    assert result["same_answer"] == 1 and result["a"]["hr@1_all"] == 0.5 and result["b"]["hr@1_all"] == 0.75
    assert result["paired_a_minus_b"]["diff"] == pytest.approx(-0.25)
    path = tmp_path / "a.generations.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as file:
        file.write("".join(json.dumps(value) + "\n" for value in a.values()))
    assert paired_answers.read_answers(path) == a
    with pytest.raises(ValueError, match="user 3 has other candidates"):
        paired_answers.compare(a, {**b, 3: line(3, "A", True, candidates=("A", "C"))})


def test_a_partial_runs_answers_enter_the_claims_marked_as_such(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import claims

    def write_answers(path, rights, first_candidate=1):
        with gzip.open(path, "wt", encoding="utf-8") as file:
            for user, right in enumerate(rights):
                line = {"user_id": str(user), "correct": right, "candidate_ids": [first_candidate, 7]}
                file.write(json.dumps(line) + "\n")

    rights_mine, rights_other = [True, True, True, False] * 5, [False, False, True, False] * 5
    partial = tmp_path / "partial"
    partial.mkdir()
    summary = {"users": 20, "valid_ratio": 1.0, "hr@1_valid": 0.75, "hr@1_all": 0.75}
    (partial / "iLoRA-generative-seed1-h.answers.json").write_text(json.dumps({"answers": summary}))
    # The CLI that answered for the partial run drew other candidate lists than the grid's run of the seed.
    write_answers(partial / "iLoRA-generative-seed1-h.answers.generations.jsonl.gz", rights_mine, first_candidate=2)
    other_path = tmp_path / "UniformLoRA-generative-seed1-g.json"
    write_answers(other_path.with_suffix(".generations.jsonl.gz"), rights_other)
    other = {"run_id": "UniformLoRA-generative-seed1-g", "row": "UniformLoRA-generative", "seed": 1, "test": {},
             "generative": {**summary, "hr@1_valid": 0.25, "hr@1_all": 0.25}, "_path": str(other_path)}  # fmt: skip
    planned = [{"run_id": "iLoRA-generative-seed1-h", "row": "iLoRA-generative", "seed": 1}, other]
    by_row = claims.with_partial_runs({"UniformLoRA-generative": [other]}, planned, partial)
    assert by_row["iLoRA-generative"][0]["partial"] and by_row["iLoRA-generative"][0]["generative"] == summary
    result = claims.compare_rows(by_row, "iLoRA-generative", ["UniformLoRA-generative"], claims.hr1_all, "HR@1 (all)")
    assert result["figure"].startswith("iLoRA-generative (partial run: answers only) 0.7500 (1 seed)")
    # Not paired: the two runs answered other candidate lists.
    assert "paired" not in result["figure"] and result["verdict"].endswith("no per-user verdicts to pair)")
    # On the same lists the two are paired user by user.
    write_answers(partial / "iLoRA-generative-seed1-h.answers.generations.jsonl.gz", rights_mine)
    result = claims.compare_rows(by_row, "iLoRA-generative", ["UniformLoRA-generative"], claims.hr1_all, "HR@1 (all)")
    assert "paired over 20 users: +0.5000" in result["figure"] and result["verdict"] == "reproduced"  # z = 4.4
    # A run with a record of its own is not replaced by its partial answers.
    own = {**other, "run_id": "iLoRA-generative-seed1-h", "row": "iLoRA-generative"}
    assert claims.with_partial_runs({"iLoRA-generative": [own]}, planned, partial)["iLoRA-generative"] == [own]


def test_a_record_names_the_commit_its_worker_started_from(tmp_path, monkeypatch):
    # A commit made while a run trains is not the code the run ran: the record keeps the commit of the worker's start.
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import grid

    (run,) = grid.plan(["lastfm-tiny"], ["Pop"], [2020], quick=True, backbone=grid.QUICK_BACKBONE)
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

    monkeypatch.setattr(grid, "git_commit", lambda: head["commit"])
    monkeypatch.setattr(pipeline, "train_and_evaluate", training_during_a_commit)
    grid.worker(str(spec_path))
    record = json.loads(output.read_text())
    assert record["row"] == "Pop" and record["commit"] == "abc1234"


def test_a_change_of_the_llms_objective_reruns_its_rows_but_keeps_the_committed_encoders(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import grid

    def ids(encoder_overrides=None, llm_overrides=None):
        if encoder_overrides is not None:
            monkeypatch.setitem(grid.ROWS, "SASRec-encoder", (*grid.ROWS["SASRec-encoder"][:2], encoder_overrides, ""))
        if llm_overrides is not None:
            monkeypatch.setitem(grid.ROWS, "iLoRA", (*grid.ROWS["iLoRA"][:2], llm_overrides, ""))
        runs = grid.plan(["ml-100k"], ["iLoRA"], [2020], quick=False)
        return {run["row"]: run["run_id"] for run in runs}

    shipped = ids()
    # the shipped defaults read the encoder whose record and checkpoint are committed (no retraining for issue 42)
    assert (REPO_ROOT / "results" / "runs" / "ml-100k" / f"{shipped['SASRec-encoder']}.json").exists()
    earlier = {"llm_loss_positions": "last", "gate_scope": "sequence", "score_head": "plain",
               "llm_train_sequences_per_user": 1}  # fmt: skip
    assert ids(encoder_overrides=earlier)["SASRec-encoder"] == shipped["SASRec-encoder"]  # the encoder reads none
    changed = ids(encoder_overrides={}, llm_overrides={"score_head": "plain"})
    assert changed["SASRec-encoder"] == shipped["SASRec-encoder"] and changed["iLoRA"] != shipped["iLoRA"]
    # a key the encoder does read still retrains it
    assert (
        ids(encoder_overrides={"sasrec_learning_rate": 0.002}, llm_overrides={})["SASRec-encoder"]
        != shipped["SASRec-encoder"]
    )


def test_earlier_llm_records_are_reported_apart_with_the_budget_they_trained_with(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import grid

    budget = {"objective": "head", "epochs": 1, "train_batch_size": 16, "learning_rate": 0.001,
              "llm_train_sequences_per_user": 2, "llm_loss_positions": "all", "gate_scope": "position",
              "score_head": "residual"}  # fmt: skip
    planned = [{"run_id": "iLoRA-seed2020-new", "row": "iLoRA", "kind": "llm", "budget": budget}]
    folder = tmp_path / "runs" / "ml-100k"
    folder.mkdir(parents=True)

    def record(run_id, ndcg, seed=2020, **extra):
        test = {"full": {"ndcg@10": ndcg}, "uni19": {"hit@1": 0.5}}
        data = {"run_id": run_id, "row": "iLoRA", "seed": seed, "commit": "abc1234", "test": test, **extra}
        (folder / f"{run_id}.json").write_text(json.dumps(data))

    record("iLoRA-seed2020-new", 0.07, trained_targets=18693)  # the planned run: the tables', not an earlier one
    record("iLoRA-seed2020-old", 0.04)  # recorded before issue 42: no targets, no budget
    record("iLoRA-seed2021-old", 0.02, seed=2021)
    record("iLoRA-seed2020-old.superseded-2026", 0.9)  # a superseded record is never shown
    lines = grid.earlier_lines("ml-100k", planned, tmp_path)
    (row,) = [line for line in lines if line.startswith("| iLoRA |")]
    assert "1 most recent training sequence, the label only, per-sequence gate, plain head" in row
    assert "| 2020, 2021 | 0.0300 ± 0.0141 |" in row  # the two earlier seeds only
    assert grid.budgets_line([json.loads((folder / "iLoRA-seed2020-new.json").read_text())], planned) == (
        "iLoRA: 1 epoch(s), batch 16; each user's 2 most recent training windows (18,693 targets), a loss at every "
        "position, per-position gate, residual head"
    )
    # a record with targets but no budget, planned nowhere, cannot be labelled: an error, not a wrong label
    with pytest.raises(ValueError, match="no budget"):
        grid.record_budget({"run_id": "x", "row": "iLoRA", "trained_targets": 5})


def test_the_grid_refuses_to_record_into_the_results_from_a_tree_with_uncommitted_changes(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import grid
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

    monkeypatch.setattr(grid, "uncommitted_changes", machine.uncommitted_changes)
    with pytest.raises(SystemExit, match="Refusing to record a run .*recbole_ilora/model.py"):
        grid.refuse_uncommitted(REPO_ROOT / "results" / "lapse")
    grid.refuse_uncommitted(tmp_path / "scratch")  # a scratch folder's records are marked instead


def test_runs_from_uncommitted_trees_are_marked_in_the_tables(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import grid

    def record(seed, commit):
        return {"run_id": f"SASRec-seed{seed}-h", "seed": seed, "commit": commit, "test": {"full": {"ndcg@10": 0.1}},
                "trainable_parameters": 10, "wall_seconds": 60}  # fmt: skip

    by_row = {"SASRec": [record(2020, "abc1234+uncommitted"), record(2021, "abc1234")], "Pop": [record(2020, "d")]}
    table = grid.protocol_table(by_row, ["ndcg@10"], lambda r: r["test"]["full"], ["SASRec", "Pop"])
    assert "| SASRec † | 2 |" in table and "| Pop | 1 |" in table
    (note, _) = grid.uncommitted_lines([r for records in by_row.values() for r in records])
    assert note.startswith("† 1 run(s)") and "`SASRec-seed2020-h`" in note
    assert grid.uncommitted_lines(by_row["Pop"]) == []


def test_the_head_targets_compare_ilora_with_sasrec_over_seeds_and_each_run_with_its_own_encoder(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import claims

    def record(seed, ndcg, encoder=None):
        return {"seed": seed, "test": {"full": {"ndcg@10": ndcg}},
                **({"encoder_test": {"full": {"ndcg@10": encoder}}} if encoder is not None else {})}  # fmt: skip

    sasrec = [record(2020, 0.05), record(2021, 0.06), record(2022, 0.07)]
    ilora = [record(2020, 0.06, 0.05), record(2021, 0.08, 0.06)]
    lines = claims.head_target_lines({"iLoRA": ilora, "SASRec": sasrec})
    # two of three seeds: no verdict yet; the runs against their own encoders: +0.01 and +0.02, mean 0.015
    assert lines[0].endswith("| not yet (2 of 3 seeds) |")
    assert "| iLoRA | 0.0150 ± 0.0071 (2 seeds) (run - encoder; per seed 2020: 0.0600 vs 0.0500, 2021: 0.0800 vs " in (
        lines[1]
    ) and lines[1].endswith("| yes |")
    ilora.append(record(2022, 0.04))  # a record without its encoder's test (before issue 42) counts for the first line
    lines = claims.head_target_lines({"iLoRA": ilora, "SASRec": sasrec})
    # iLoRA 0.06 ± 0.02, SASRec 0.06 ± 0.01: d = 0 / sqrt((0.02² + 0.01²) / 2) = 0, not above
    assert "iLoRA 0.0600 ± 0.0200 (3 seeds) vs SASRec 0.0600 ± 0.0100 (3 seeds); d = +0.0" in lines[0]
    assert lines[0].endswith("| no |")
    assert claims.head_target_lines({"SASRec": sasrec}) == []


def test_the_warm_generative_row_starts_from_the_same_seeds_head_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import grid

    runs = grid.plan(["ml-100k"], ["iLoRA-generative-warm"], [2020], quick=False)
    by_row = {run["row"]: run for run in runs}
    # the head run it starts from is planned with it (and before it: main rows run first), with their encoder
    assert set(by_row) == {"SASRec-encoder", "iLoRA", "iLoRA-generative-warm"}
    warm, head = by_row["iLoRA-generative-warm"], by_row["iLoRA"]
    assert warm["init_from"] == head["run_id"] and head["init_from"] is None
    assert runs.index(head) < runs.index(warm)
    cold = grid.plan(["ml-100k"], ["iLoRA", "iLoRA-generative"], [2020], quick=False)
    assert head["run_id"] in {run["run_id"] for run in cold}  # the head run is the grid's own iLoRA row
    cold_id = next(run["run_id"] for run in cold if run["row"] == "iLoRA-generative")
    assert warm["run_id"].split("-")[-1] != cold_id.split("-")[-1]  # the start is part of the run's identity
    # its checkpoint stays on the machine that trained it: elsewhere, a clear error naming what to do
    record = tmp_path / "head.json"
    record.write_text(json.dumps({"run_id": head["run_id"], "saved_model_file": str(tmp_path / "gone.pth")}))
    with pytest.raises(FileNotFoundError, match="is not on this machine .* rerun the grid"):
        grid.init_checkpoint(record)
    (tmp_path / "gone.pth").write_bytes(b"x")
    assert grid.init_checkpoint(record) == str(tmp_path / "gone.pth")


def test_the_sasrec_target_is_met_only_when_ilora_is_ahead_by_two_pooled_stds(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import claims

    def rows(ilora, sasrec):
        records = lambda values: [{"seed": s, "test": {"full": {"ndcg@10": v}}} for s, v in enumerate(values)]  # noqa: E731
        return claims.head_target_lines({"iLoRA": records(ilora), "SASRec": records(sasrec)})[0]

    # means 0.064 and 0.063, stds 0.01 and 0.005: d = 0.001 / sqrt((0.01² + 0.005²) / 2) = +0.1
    assert rows([0.054, 0.064, 0.074], [0.058, 0.063, 0.068]).endswith("| above in the mean only (d within 2: "
                                                                       "not distinguishable) |")  # fmt: skip
    # means 0.07 and 0.06, stds 0.002 each: d = +5.0
    line = rows([0.068, 0.07, 0.072], [0.058, 0.06, 0.062])
    assert "d = +5.0" in line and line.endswith("| yes |")


def test_cofirecs_claims_compare_it_with_each_ablation_and_wait_for_its_first_run(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import claims

    def record(row, ndcg, hit):
        return {"row": row, "test": {"full": {"ndcg@10": ndcg}, "uni19": {"hit@1": hit}}}

    assert claims.cofirec_claims_section({"SASRec": [record("SASRec", 0.06, 0.4)]}) == []  # nothing run yet
    by_row = {
        "CoFiRec": [record("CoFiRec", v, 0.30) for v in (0.050, 0.052, 0.054)],  # mean 0.052, std 0.002
        "CoFiRec-fused": [record("CoFiRec-fused", v, 0.31) for v in (0.040, 0.042, 0.044)],  # d = +5.0
        "SASRec": [record("SASRec", v, 0.40) for v in (0.060, 0.062, 0.064)],
    }
    lines = claims.cofirec_claims_section(by_row)
    fused = next(line for line in lines if line.startswith("| coarse to fine beats fused (full ranking)"))
    assert "d = +5.0" in fused and fused.endswith("| reproduced |")
    baselines = next(line for line in lines if line.startswith("| CoFiRec beats the baselines"))
    assert "vs SASRec 0.0620" in baselines and baselines.endswith("| not reproduced (the other way round) |")
    order = next(line for line in lines if line.startswith("| the order matters"))
    assert order.endswith("| not measured |")  # no reversed run yet
    by_row["CoFiRec"][0].update(run_id="CoFiRec-seed2020-x", model_summary={"tokenizer": {
        "tokenizer": "levels", "order": "coarse_to_fine", "collision_rate_before": 0.0071, "collision_rate_after": 0.0,
        "codebook_usage": [0.8125, 1.0]}})  # fmt: skip
    ids = claims.cofirec_claims_section(by_row)
    assert "| CoFiRec-seed2020-x | levels, coarse_to_fine | 0.0071 | 0.0000 | 0.81 / 1.00 |" in ids


def test_the_lambda_curve_lists_each_pesos_strength_beside_finetuning_and_plots_it(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import grid

    def record(seed, ndcg, hit, ratio=None):
        share = {"grad_norm_ratio": ratio} if ratio is not None else None
        test = {"full": {"ndcg@10": ndcg}, "uni19": {"hit@1": hit}}
        blocks = [{"block": b, "proximal": share, "test": test} for b in range(3)]
        return {"seed": seed, "blocks": blocks, "blocks_total": 3,
                "mean_over_later_blocks": {"full": {"ndcg@10": ndcg}, "uni19": {"hit@1": hit}}}  # fmt: skip

    by_row = {
        "UniformLoRA-finetune": [record(2020, 0.030, 0.25), record(2021, 0.9, 0.9)],  # seed 2021 is not read
        "UniformLoRA-peso": [record(2020, 0.030, 0.25, ratio=2e-6)],
        "UniformLoRA-peso-lambda2e6": [record(2020, 0.020, 0.20, ratio=1.5)],
    }
    assert grid.lambda_curve_lines("ml-100k", {"UniformLoRA-peso": by_row["UniformLoRA-peso"]}) == []  # one point
    lines = grid.lambda_curve_lines("ml-100k", by_row)
    assert "| PESO | 2 | 2e-06 | 0.0300 | 0.2500 |" in lines
    assert "| PESO | 2e+06 | 1.5 | 0.0200 | 0.2000 |" in lines
    assert "| UniformLoRA-finetune | – | – | 0.0300 | 0.2500 |" in lines
    grid.plot_continual("ml-100k", by_row, tmp_path / "ml-100k.png")
    assert (tmp_path / "ml-100k-lambda.png").read_bytes().startswith(b"\x89PNG")


def test_history_window_trains_each_window_with_its_own_encoder_on_the_same_items_and_chooses_on_validation(tmp_path):
    """benchmarks/history_window.py (issue 42's window choice): every window L gets an encoder pretrained at L and the
    same budget in items (L = 2 reads each user's 2 most recent windows, L = 4 one), and a finished window is not
    run again."""
    script = str(REPO_ROOT / "benchmarks" / "history_window.py")
    command = [sys.executable, script, "--quick", "--windows", "2", "4", "--items-per-user", "4",
               "--output", str(tmp_path / "out"), "--work", str(tmp_path / "work")]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
    records = {w: json.loads((tmp_path / "out" / f"lastfm-tiny-L{w}-seed2020.json").read_text()) for w in (2, 4)}
    for window, record in records.items():
        assert record["windows_per_user"] == 4 // window
        assert record["encoder_window"] == window
        assert read_sasrec_checkpoint(record["sasrec_checkpoint"])["config"]["MAX_ITEM_LIST_LENGTH"] == window
    assert records[2]["sasrec_checkpoint"] != records[4]["sasrec_checkpoint"]
    assert records[2]["trained_sequences"] > records[4]["trained_sequences"]  # more, shorter windows ...
    assert records[2]["trained_targets"] == records[4]["trained_targets"]  # ... the same targets
    again = subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
    assert again.stdout.count("finished already") == 2
    assert (tmp_path / "out" / "lastfm-tiny.png").read_bytes()[:8] == PNG_MAGIC


def test_the_history_window_is_chosen_on_validation_and_a_tie_goes_to_the_shorter_window(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    from history_window import chosen_window

    records = [{"window": 5, "best_valid_score": 0.070, "test": 0.09}, {"window": 10, "best_valid_score": 0.075,
               "test": 0.05}, {"window": 20, "best_valid_score": 0.072, "test": 0.08}]  # fmt: skip
    assert chosen_window(records) == 10
    assert chosen_window([{"window": 20, "best_valid_score": 0.07}, {"window": 10, "best_valid_score": 0.07}]) == 10
    with pytest.raises(ValueError):
        chosen_window([])
