"""The finished runs' records: atomic writing, which record still stands (its encoder, its budget), superseded
records."""

import json
import os
import shutil
import tempfile
from pathlib import Path

from benchmarks.gridlib.encoders import encoder_checkpoint, trained_with_another_encoder
from benchmarks.gridlib.planning import EARLIER_BUDGET, run_file
from benchmarks.gridlib.rows import GENERATIVE_ROWS


def finished(output, run):
    """A run is done when its JSON exists (an encoder also needs its checkpoint, which LLM rows load: in ``--work`` or
    its copy in ``<output>``) and, for an LLM row, its encoder was not trained again into a different model since
    (``trained_with_another_encoder``)."""
    path = run_file(output, run)
    if not path.exists():
        return False
    if run["kind"] == "encoder":
        return encoder_checkpoint(path) is not None
    return not trained_with_another_encoder(output, run)


def write_json_atomically(path, payload):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        json.dump(payload, file, indent=1, default=str)
        file.flush()
        os.fsync(file.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o666 & ~umask)  # mkstemp's 0600 -> what open() would have given
    os.replace(staging, path)


def superseded_name(path, record):
    stamp = record["finished"].replace(":", "").replace("+0000", "Z")
    return Path(path).with_name(f"{Path(path).stem}.superseded-{stamp}.json")


def keep_superseded(path):
    """A run is redone only when its record is missing or, for an encoder, its checkpoint is gone; the LLM rows
    trained with that checkpoint still point to it, so the old record is kept next to the new one."""
    if path.exists():
        shutil.copy2(path, superseded_name(path, json.loads(path.read_text())))


def machine_of(record, missing="not recorded"):
    """The CPU a run's times were measured on ('2 x AMD EPYC'): they compare on one machine only."""
    return record.get("hardware", missing).split(",")[0]


def recorded_runs(planned, output):
    """The records of the ``planned`` runs: (those the tables show, those to be trained again because their encoder
    was trained again into a different model). An encoder's record counts even where its checkpoint is gone."""
    done, stale = [], []
    for run in planned:
        if run_file(output, run).exists():
            record = json.loads(run_file(output, run).read_text())
            record["_path"] = str(run_file(output, run))  # its generations and gates lie next to it
            (stale if trained_with_another_encoder(output, run, record) else done).append(record)
    return done, stale


def record_budget(record, planned=()):
    """An LLM record's budget settings: recorded with the run, else its planned run's, else (a record without
    ``trained_targets``, written before issue 42) :data:`EARLIER_BUDGET`."""
    # A budget without the compute dtype was recorded before it was (2026-12-08): every LLM run computed in float32
    if record.get("budget"):
        return {"compute_dtype": "float32", **record["budget"]}
    run = next((run for run in planned if run["run_id"] == record["run_id"]), None)
    if run and run.get("budget"):
        return {**run["budget"], "compute_dtype": "float32"}  # planned on this machine, run before the dtype was kept
    if "trained_targets" in record:
        raise ValueError(f"{record['run_id']}: no budget recorded or planned")
    generative = record["row"] in GENERATIVE_ROWS
    return {**EARLIER_BUDGET, "objective": "generative" if generative else "head"}


UNCOMMITTED = "+uncommitted"  # a record's commit ends so when its worker ran from a tree with uncommitted changes
