"""Reliability: reproducible metrics, exact resumption after SIGKILL, atomic checkpoints, safe loading."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import recbole.trainer.trainer as recbole_trainer
import torch
import transformers
from conftest import REPO_ROOT, TINY, tiny_config
from recbole.data import create_dataset, data_preparation

from recbole_ilora.checkpoints import atomic_torch_save, claim_checkpoint_file, release_unused_file, safe_load
from recbole_ilora.model import iLoRA
from recbole_ilora.quick_start import objective_function
from recbole_ilora.saved_run import load_data_and_model

# A run in a subprocess (config as JSON in argv[1], result JSON to argv[2]); with argv[3] = "E", the process
# SIGKILLs itself on the third training batch of epoch E, after that epoch's training state was written; with
# argv[3] = "test", when the test starts (training has finished).
RUN_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from recbole_ilora.quick_start import objective_function
    from recbole_ilora.trainer import LLMRecTrainer

    config, output = json.loads(sys.argv[1]), sys.argv[2]
    if len(sys.argv) > 3 and sys.argv[3] == "test":
        evaluate = LLMRecTrainer.evaluate

        def dying_evaluate(self, eval_data, load_best_model=True, **kwargs):
            if load_best_model:  # RecBole's test (validation does not load the best model)
                os.kill(os.getpid(), signal.SIGKILL)
            return evaluate(self, eval_data, load_best_model, **kwargs)

        LLMRecTrainer.evaluate = dying_evaluate
    elif len(sys.argv) > 3:
        kill_epoch, train_epoch = int(sys.argv[3]), LLMRecTrainer._train_epoch

        def dying_train_epoch(self, train_data, epoch_idx, **kwargs):
            if epoch_idx == kill_epoch:
                loss, batches = self.model.calculate_loss, []

                def counting_loss(interaction):
                    batches.append(1)
                    if len(batches) == 3:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return loss(interaction)

                self.model.calculate_loss = counting_loss
            return train_epoch(self, train_data, epoch_idx, **kwargs)

        LLMRecTrainer._train_epoch = dying_train_epoch
    result = objective_function(config_dict=config)
    keys = ["best_valid_result", "test_result", "test_results", "saved_model_file", "train_losses", "epochs_run"]
    with open(output, "w") as file:
        json.dump({key: result[key] for key in keys}, file)
    """
)


def run(seed, sasrec_checkpoint, llm_cache):
    config = {**TINY, "model": "iLoRA", "epochs": 1, "seed": seed, "test_modes": ["full", "uni19"]}
    config["llm_train_sequences_per_user"] = 8  # the seed still orders training (5 batches) and draws candidates
    config.update(sasrec_checkpoint=sasrec_checkpoint, llm_cache_dir=llm_cache, checkpoint_dir=f"saved-{seed}")
    result = objective_function(config_dict=config)
    return result["best_valid_result"], result["test_results"]


def test_same_seed_same_metrics_other_seed_other_metrics(sasrec_checkpoint, llm_cache):
    first = run(2020, sasrec_checkpoint, llm_cache)
    again = run(2020, sasrec_checkpoint, llm_cache)
    assert first == again  # full ranking and the seeded uni19, exactly
    other = run(7, sasrec_checkpoint, llm_cache)
    assert other[1]["uni19"] != first[1]["uni19"]  # other candidates and another training order


def test_two_processes_on_one_machine_train_bit_identical_weights_and_metrics(sasrec_checkpoint, llm_cache, tmp_path):
    """What docs/reliability.md promises: the same code, seed and machine give the same figures in two processes,
    end to end: the trained weights bit for bit, every loss, and every metric (another CPU may sum floats otherwise)."""
    config = {**TINY, "model": "iLoRA", "epochs": 2, "test_modes": ["full", "uni19"]}
    config.update(llm_train_sequences_per_user=8, sasrec_checkpoint=sasrec_checkpoint, llm_cache_dir=llm_cache)
    results, weights = [], []
    for name in ("first", "second"):
        process, result = run_in_subprocess({**config, "checkpoint_dir": f"saved-{name}"}, tmp_path, name)
        assert process.returncode == 0, process.stderr[-3000:]
        weights.append(safe_load(tmp_path / result.pop("saved_model_file"))["state_dict"])
        results.append(result)
    assert results[0] == results[1]  # valid, test, both test modes, every epoch's loss
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 0
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


def run_in_subprocess(config, tmp_path, name, kill_epoch=None):
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    output = tmp_path / f"{name}.json"
    command = [sys.executable, str(script), json.dumps(config), str(output)]
    command += [] if kill_epoch is None else [str(kill_epoch)]
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=900)
    return process, (json.loads(output.read_text()) if output.exists() else None)


def killed_and_resumed(config, tmp_path, name, kill, drop=()):
    """The run of ``config`` killed at ``kill`` (see RUN_SCRIPT): its training state and the epoch of its model
    checkpoint when it was killed, its model file, and the result of the run resumed from it (without the keys
    ``drop``)."""
    killed = {**config, "checkpoint_dir": f"saved-{name}"}
    process, result = run_in_subprocess(killed, tmp_path, f"{name}-killed", kill_epoch=kill)
    assert process.returncode == -signal.SIGKILL and result is None
    (state_file,) = (tmp_path / f"saved-{name}").glob("iLoRA-*.training_state.pth")
    (model_file,) = [path for path in (tmp_path / f"saved-{name}").glob("iLoRA-*.pth") if path != state_file]
    state = safe_load(state_file)
    best_epoch = safe_load(model_file)["epoch"] if model_file.stat().st_size else None  # empty: never saved to
    resumed = {key: value for key, value in killed.items() if key not in drop}
    resumed["resume_checkpoint"] = str(model_file)
    process, result = run_in_subprocess(resumed, tmp_path, f"{name}-resumed")
    assert process.returncode == 0, process.stderr[-3000:]
    return state, best_epoch, model_file, result


def test_a_killed_run_resumes_to_the_same_metrics_from_an_epoch_a_batch_or_its_tests(
    sasrec_checkpoint, llm_cache, tmp_path
):
    # Dropout draws from the random state, so a replay that were off by a batch would not match.
    config = {**TINY, "model": "iLoRA", "epochs": 3, "stopping_step": 5, "test_modes": ["full", "uni19"]}
    config.update(sasrec_checkpoint=sasrec_checkpoint, llm_cache_dir=llm_cache, lora_dropout=0.1)
    config["training_state_every_batches"] = 0  # states at epoch starts only
    config["llm_train_sequences_per_user"] = 8  # 5 batches an epoch: enough to kill in the third, 7 runs stay cheap
    process, expected = run_in_subprocess({**config, "checkpoint_dir": "saved-whole"}, tmp_path, "whole")
    assert process.returncode == 0, process.stderr[-3000:]
    assert len(expected["train_losses"]) == 3
    keys = ("best_valid_result", "test_result", "test_results")

    # Killed in the third batch of epoch 1: resumed by the model file from the start of epoch 1; the SASRec encoder
    # comes from the training state (not given again).
    state, best_epoch, model_file, result = killed_and_resumed(config, tmp_path, "epoch", 1, ["sasrec_checkpoint"])
    assert (state["epoch"], state["batch"], best_epoch) == (1, 0, 0)
    assert result["saved_model_file"] == str(model_file)  # the same files go on
    for key in keys:
        assert result[key] == expected[key], key  # exactly: full ranking and uni19

    # With a state every 2 batches, killed in the third batch of epoch 0: resumed at batch 2 of epoch 0.
    config["training_state_every_batches"] = 2
    state, _, _, result = killed_and_resumed(config, tmp_path, "batch", 0)
    assert (state["epoch"], state["batch"], state["finished"]) == (0, 2, False)
    for key in keys:
        assert result[key] == expected[key], key
    assert result["epochs_run"] == 3 and result["train_losses"][1:] == expected["train_losses"][1:]

    # Killed when the test starts: the state written when training ended sends the run to its tests, untrained.
    state, _, _, result = killed_and_resumed(config, tmp_path, "test", "test")
    assert (state["epoch"], state["finished"]) == (3, True)
    assert result["train_losses"] == [] and result["epochs_run"] == 3
    for key in keys:
        assert result[key] == expected[key], key


def test_a_killed_warm_started_run_resumes_from_its_own_state_not_from_the_warm_start(
    sasrec_checkpoint, llm_cache, tmp_path
):
    # The grid resumes a killed row with the row's own keys, llm_init_checkpoint among them: the resumed run must go
    # on from its training state (loading the warm start again would overwrite the trained weights) and end where
    # the uninterrupted run ends.
    config = {**TINY, "model": "iLoRA", "epochs": 1, "test_modes": ["uni19"], "llm_train_sequences_per_user": 8}
    config.update(sasrec_checkpoint=sasrec_checkpoint, llm_cache_dir=llm_cache, checkpoint_dir=str(tmp_path / "head"))
    head = objective_function(config_dict=config)["saved_model_file"]
    config.update(epochs=2, stopping_step=5, training_state_every_batches=0, llm_init_checkpoint=head)
    process, expected = run_in_subprocess({**config, "checkpoint_dir": "saved-whole"}, tmp_path, "whole")
    assert process.returncode == 0, process.stderr[-3000:]
    state, _, model_file, result = killed_and_resumed(config, tmp_path, "warm", 1)
    assert state["epoch"] == 1
    for key in ("best_valid_result", "test_results"):
        assert result[key] == expected[key], key
    assert result["train_losses"] == expected["train_losses"][1:]

    other = tmp_path / "other-head.pth"
    shutil.copy(head, other)  # the same weights under another name: still another run's start
    with pytest.raises(ValueError, match="goes on with a run started from 'llm_init_checkpoint' = .*head"):
        objective_function(
            config_dict={**config, "llm_init_checkpoint": str(other), "resume_checkpoint": str(model_file)}
        )


def test_a_run_killed_before_its_first_checkpoint_resumes(sasrec_checkpoint, llm_cache, tmp_path):
    config = {**TINY, "model": "iLoRA", "epochs": 1, "checkpoint_dir": "saved-early"}
    config.update(sasrec_checkpoint=sasrec_checkpoint, llm_cache_dir=llm_cache, llm_train_sequences_per_user=8)
    process, _ = run_in_subprocess(config, tmp_path, "early", kill_epoch=0)
    assert process.returncode == -signal.SIGKILL
    (state_file,) = (tmp_path / "saved-early").glob("iLoRA-*.training_state.pth")
    (model_file,) = [path for path in (tmp_path / "saved-early").glob("iLoRA-*.pth") if path != state_file]
    assert model_file.stat().st_size == 0  # the run's claimed name, never saved to
    assert safe_load(state_file)["epoch"] == 0 and safe_load(state_file)["best_epoch"] is None

    process, result = run_in_subprocess({**config, "resume_checkpoint": str(model_file)}, tmp_path, "resumed")
    assert process.returncode == 0, process.stderr[-3000:]
    assert result["saved_model_file"] == str(model_file) and safe_load(model_file)["epoch"] == 0
    assert sorted(path.name for path in (tmp_path / "saved-early").iterdir()) == sorted(
        [model_file.name, state_file.name]
    )  # the resumed run's own claimed name was given back


def test_checkpoint_names_are_claimed_once(tmp_path):
    path = tmp_path / "saved" / "iLoRA-Nov-23-2026_21-49-29.pth"
    assert claim_checkpoint_file(path) == str(path) and path.stat().st_size == 0
    (tmp_path / "saved" / "iLoRA-Nov-23-2026_21-49-29-2.training_state.pth").write_bytes(b"a killed run's state")
    third = tmp_path / "saved" / "iLoRA-Nov-23-2026_21-49-29-3.pth"
    assert claim_checkpoint_file(path) == str(third)
    third.write_bytes(b"saved")
    release_unused_file(str(path))
    release_unused_file(str(third))
    assert not path.exists() and third.read_bytes() == b"saved"


def test_runs_started_in_the_same_second_keep_their_own_checkpoints(monkeypatch):
    # RecBole names checkpoints by the local time to the second: two runs (or two datasets of a benchmark side by
    # side) starting in one second shared one file, and the second run's test could reload the first's weights.
    monkeypatch.setattr(recbole_trainer, "get_local_time", lambda: "Nov-23-2026_21-49-29")
    config = {**TINY, "model": "SASRec", "epochs": 2}
    first = objective_function(config_dict=config)["saved_model_file"]
    first_bytes = open(first, "rb").read()
    second = objective_function(config_dict={**config, "seed": 7})["saved_model_file"]
    assert os.path.basename(first) == "SASRec-Nov-23-2026_21-49-29.pth"
    assert os.path.basename(second) == "SASRec-Nov-23-2026_21-49-29-2.pth"
    assert open(first, "rb").read() == first_bytes and safe_load(second)["config"]["seed"] == 7

    def failing_fit(*args, **kwargs):
        raise RuntimeError("training failed")

    monkeypatch.setattr(recbole_trainer.Trainer, "fit", failing_fit)
    with pytest.raises(RuntimeError, match="training failed"):
        objective_function(config_dict={**config, "seed": 8})
    assert sorted(os.listdir(os.path.dirname(first))) == sorted(map(os.path.basename, (first, second)))


KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys, torch
    from recbole_ilora.checkpoints import atomic_torch_save

    def dying_save(obj, file, *args, **kwargs):  # dies half way through writing the new checkpoint
        file.write(b"PK\\x03\\x04" + bytes(4096))
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = dying_save
    atomic_torch_save({"epoch": 1, "weight": torch.ones(8)}, sys.argv[1])
    """
)


def test_a_kill_during_a_checkpoint_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "model.pth"
    atomic_torch_save({"epoch": 0, "weight": torch.zeros(8)}, path)
    script = tmp_path / "save.py"
    script.write_text(KILLED_SAVE)
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.run([sys.executable, str(script), str(path)], env=environment, timeout=300)
    assert process.returncode == -signal.SIGKILL
    checkpoint = safe_load(path)
    assert checkpoint["epoch"] == 0 and torch.equal(checkpoint["weight"], torch.zeros(8))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".saving-")]  # the partial write stayed aside


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch exploited",))


def test_tampered_or_damaged_checkpoints_fail_cleanly_and_run_nothing(tmp_path):
    tampered = tmp_path / "tampered.pth"
    torch.save({"config": {}, "state_dict": {}, "payload": Exploit()}, tampered)
    damaged = tmp_path / "damaged.pth"
    atomic_torch_save({"config": {}, "state_dict": {"w": torch.zeros(1000)}}, damaged)
    damaged.write_bytes(damaged.read_bytes()[:500])
    for path in (tampered, damaged):
        with pytest.raises(ValueError, match="cannot be loaded safely"):
            load_data_and_model(str(path))
    with pytest.raises(ValueError, match="'sasrec_checkpoint' = .*cannot be loaded safely"):
        objective_function(config_dict={**TINY, "model": "iLoRA", "sasrec_checkpoint": str(tampered)})
    with pytest.raises(ValueError, match="'resume_checkpoint' = .*cannot be loaded safely"):
        objective_function(config_dict={**TINY, "model": "SASRec", "resume_checkpoint": str(tampered)})
    assert not os.path.exists("exploited") and not (tmp_path / "exploited").exists()


def test_recbole_builtin_checkpoint_reloads_through_the_plugin(sasrec_checkpoint):
    config, model, _, _, _, test_data = load_data_and_model(sasrec_checkpoint)
    assert config["model"] == "SASRec" and not model.training
    saved = safe_load(sasrec_checkpoint)["state_dict"]
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in saved.items())
    with torch.no_grad():
        scores = model.full_sort_predict(next(iter(test_data))[0])
    assert scores.shape[1] == model.n_items and torch.isfinite(scores).all()


def test_remote_code_is_off_unless_asked(sasrec_checkpoint, llm_cache, monkeypatch):
    seen = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def recording(path, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(path, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording)
    config = tiny_config(sasrec_checkpoint=sasrec_checkpoint, llm_cache_dir=llm_cache)
    assert config["llm_trust_remote_code"] is False
    iLoRA(config, data_preparation(config, create_dataset(config))[0]._dataset)
    assert seen == [False]


def test_recbole_builtin_model_resumes_through_the_runner(sasrec_checkpoint, tmp_path):
    """RecBole's own ``resume_checkpoint`` for its built-in models: the saved weights and optimizer, training from the
    epoch after the saved one. Not bit-exact beyond that (RecBole restarts its loaders' shuffling generator); the
    plugin's LLM runs resume exactly (test_a_killed_run_resumes_exactly)."""
    from recbole.utils import get_trainer

    copy = tmp_path / "SASRec-resumed.pth"
    shutil.copy(sasrec_checkpoint, copy)
    epoch = safe_load(copy)["epoch"]
    # nothing left to train: the run tests the saved weights, as RecBole's evaluator does on the untouched checkpoint
    config = {**TINY, "model": "SASRec", "epochs": epoch + 1, "resume_checkpoint": str(copy)}
    result = objective_function(config_dict=config)
    assert result["saved_model_file"] == str(copy) and result["train_losses"] == []
    saved_config, model, _, _, _, test_data = load_data_and_model(sasrec_checkpoint)
    trainer = get_trainer(saved_config["MODEL_TYPE"], saved_config["model"])(saved_config, model)
    assert result["test_result"] == trainer.evaluate(test_data, load_best_model=False)
    # two epochs more: exactly two are trained, starting from the saved weights (after 3 epochs on the fixture: its
    # first epoch's loss is below a fresh model's first epoch, which a restart from scratch would repeat exactly)
    shutil.copy(sasrec_checkpoint, copy)
    resumed = objective_function(config_dict={**config, "epochs": epoch + 3})
    fresh = objective_function(config_dict={**TINY, "model": "SASRec", "epochs": 1})
    assert len(resumed["train_losses"]) == 2
    assert resumed["train_losses"][0] < fresh["train_losses"][0], (resumed["train_losses"], fresh["train_losses"])
