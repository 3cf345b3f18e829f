"""The SASRec encoder every LLM row of a dataset and seed reads: its checkpoint, the copy kept with the results, and
which record was trained with which encoder."""

import json
from pathlib import Path

from benchmarks.gridlib.planning import run_file


def encoder_copy(encoder_path, saved_model_file):
    """Where an encoder run's checkpoint is kept with the results: ``<output>/runs/<dataset>/encoders/<its name>``.
    The ml-100k encoders came out different on another CPU, so an encoder is never retrained to resume a grid on a
    new machine: LLM rows load this copy when ``--work`` lost the checkpoint."""
    return Path(encoder_path).parent / "encoders" / Path(saved_model_file).name


def encoder_checkpoint(encoder_path):
    """The checkpoint of the encoder run recorded at ``encoder_path``: the one in ``--work`` if it is still there, else
    its copy in the results, else None."""
    saved_model_file = json.loads(Path(encoder_path).read_text())["saved_model_file"]
    for path in (Path(saved_model_file), encoder_copy(encoder_path, saved_model_file)):
        if path.exists():
            return str(path)
    return None


def keep_encoder_copy(encoder_path):
    """Copy an encoder run's checkpoint into the results (weights and config, without the optimizer's state; weights-
    only loadable, written atomically) unless the copy exists or the checkpoint is gone."""
    from recbole_ilora.checkpoints import atomic_torch_save, safe_load

    saved_model_file = json.loads(Path(encoder_path).read_text())["saved_model_file"]
    copy = encoder_copy(encoder_path, saved_model_file)
    if copy.exists() or not Path(saved_model_file).exists():
        return
    copy.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = safe_load(saved_model_file, "saved_model_file")
    atomic_torch_save({key: value for key, value in checkpoint.items() if key != "optimizer"}, copy)


def same_checkpoint(used, saved_model_file):
    """Whether the checkpoint an LLM row loaded (``used``: the encoder's file in ``--work`` or its copy in another
    clone's results) is the encoder run's ``saved_model_file``: the same name, which carries the time it was saved."""
    return used is not None and Path(used).name == Path(saved_model_file).name


def used_current_encoder(record, encoder):
    """Whether an LLM row's record loaded its encoder's current checkpoint (or recorded none to compare)."""
    used = record.get("sasrec_checkpoint")
    return used is None or same_checkpoint(used, encoder["saved_model_file"])


def trained_with_another_encoder(output, run, record=None):
    """Whether an LLM row's record used an encoder checkpoint other than its encoder's current one that is not the same
    model: the earlier encoder run's record (kept as superseded) is missing or its valid or test metrics differ. A
    retrained encoder that reproduced its run exactly (same machine, same seed) leaves the LLM rows valid; one that
    came out different (another CPU's float sums) makes them stale, so every LLM row of a seed shares one encoder."""
    if not run.get("encoder"):
        return False
    encoder_path = run_file(output, {"dataset": run["dataset"], "run_id": run["encoder"]})
    if not encoder_path.exists():
        return False
    record = record or json.loads(run_file(output, run).read_text())
    encoder = json.loads(encoder_path.read_text())
    if used_current_encoder(record, encoder):
        return False
    return not same_encoder(earlier_encoder_record(encoder_path, record), encoder)


def same_encoder(earlier, encoder):
    """Whether an earlier encoder record (None: not kept) came out as the current one: same valid and test metrics."""
    return earlier is not None and (earlier.get("valid"), earlier["test"]) == (encoder.get("valid"), encoder["test"])


def earlier_encoder_record(encoder_path, record):
    """The superseded record (``<encoder run>.superseded-*.json``) of the encoder run whose checkpoint an LLM row's
    ``record`` used, or None if it was not kept."""
    for path in sorted(encoder_path.parent.glob(f"{encoder_path.stem}.superseded-*.json")):
        earlier = json.loads(path.read_text())
        if same_checkpoint(record["sasrec_checkpoint"], earlier["saved_model_file"]):
            return earlier
    return None
