"""The command-line runner, as a user calls it: -m/-d, --config_files and --key=value overrides."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import DATA_DIR, REPO_ROOT, TINY


def test_runner_trains_a_recbole_baseline_with_config_files_and_overrides(tmp_path):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(
        "load_col: {inter: [user_id, item_id, timestamp], item: [item_id, title]}\n"
        "MAX_ITEM_LIST_LENGTH: 10\ntrain_neg_sample_args: ~\nshow_progress: False\n"
        "n_layers: 1\nn_heads: 1\nhidden_size: 16\ninner_size: 32\n"
    )
    command = [
        sys.executable,
        str(REPO_ROOT / "run_recbole_ilora.py"),
        "-m",
        "SASRec",
        "-d",
        "lastfm-tiny",
        f"--config_files={config_file}",
        f"--data_path={DATA_DIR}",
        "--epochs=2",
        "--topk=[1,5]",
        "--valid_metric=NDCG@5",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "test result" in output and "hit@5" in output and "hit@10" not in output  # --topk override applied
    assert len(list((tmp_path / "saved").glob("SASRec-*.pth"))) == 1
    # the run's own log says what produced its figures: code, machine, threads, and each phase's wall and CPU time
    (log,) = (tmp_path / "log" / "SASRec").glob("*.log")
    text = log.read_text(encoding="utf-8")
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout (an installed copy names its version instead)
        assert f"Code: commit {head.stdout.strip()}" in text
    assert f"Machine: {os.cpu_count()} x " in text and "Libraries: python " in text and " threads), recbole " in text
    (wall,) = [line.split("timings (s): ", 1)[1] for line in text.splitlines() if "timings (s): " in line]
    (cpu,) = [
        line.split("CPU seconds per phase: ", 1)[1] for line in text.splitlines() if "CPU seconds per phase" in line
    ]
    wall, cpu = json.loads(wall), json.loads(cpu)
    assert set(wall) == set(cpu) >= {"data_preparation", "training", "testing"}
    assert cpu["training"] > 0


def test_runner_reports_an_unknown_model(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "run_recbole_ilora.py"), "--model=NoSuchModel", "--dataset=ml-100k"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "'model' = 'NoSuchModel' is not a known model" in result.stderr


@pytest.mark.parametrize("model", ["BPR", "FPMC"])
def test_pairwise_models_get_recboles_negative_sampling(model):
    """A pairwise general (BPR) and sequential (FPMC) model need RecBole's negative sampling, which the plugin's
    dataset settings used to switch off for every model (KeyError: 'neg_item_id'); CE models get None."""
    from conftest import TINY

    from recbole_ilora.config import Config

    settings = {key: value for key, value in TINY.items() if key != "train_neg_sample_args"}
    assert Config(model=model, config_dict=settings)["train_neg_sample_args"]["distribution"] == "uniform"
    assert Config(model="SASRec", config_dict=settings)["train_neg_sample_args"]["distribution"] == "none"
    # that they learn through the runner: tests/test_learning.py (the cycle fixture)


def test_full_ranking_batches_are_bounded_by_full_sort_max_scores_and_rank_alike(sasrec_checkpoint):
    """RecBole's sequential full-sort loader takes eval_batch_size users per batch whatever the catalogue; the runner
    takes fewer where users x items would exceed full_sort_max_scores, and every metric stays the same."""
    import copy

    from recbole_ilora.data import bounded_full_sort, protocol_test_data
    from recbole_ilora.saved_run import load_data_and_model
    from recbole_ilora.utils import get_trainer

    config, model, dataset, _, valid_data, test_data = load_data_and_model(sasrec_checkpoint)
    items = dataset.item_num
    assert test_data.step == config["eval_batch_size"] == 256  # the tiny fixture's 40 users fit in one batch

    small = copy.deepcopy(config)
    small["full_sort_max_scores"] = 3 * items + 1  # three users' scores per batch
    bounded = bounded_full_sort(small, test_data)
    assert bounded.step == 3 and bounded is not test_data
    assert protocol_test_data(small, "full").step == 3  # the test modes' loaders too
    assert protocol_test_data(small, "uni19").step == protocol_test_data(config, "uni19").step  # scores 20 per user
    batches = [len(interaction) for interaction, *_ in bounded]
    assert max(batches) == 3 and sum(batches) == 40

    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    whole = trainer.evaluate(test_data, load_best_model=False)
    assert trainer.evaluate(bounded, load_best_model=False) == whole
    assert trainer.evaluate(bounded_full_sort(small, valid_data), load_best_model=False) == trainer.evaluate(
        valid_data, load_best_model=False
    )


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "AMX bfloat16"),  # Intel Xeon (Sapphire Rapids)
        ({"avx2", "avx512f", "avx512_bf16"}, "avx512_bf16"),  # AMD EPYC (Zen 4)
        ({"avx2", "fma"}, "AVX2, no bfloat16 units"),  # AMD EPYC (Zen 3): this repository's figures so far
        ({"avx2", "avx512f"}, "AVX-512, no bfloat16 units"),
    ],
)
def test_the_machine_line_says_which_bfloat16_units_the_cpu_has(flags, expected):
    from recbole_ilora.provenance import bf16_units

    assert bf16_units(flags) == expected


@pytest.mark.parametrize(
    "flags, device, setting, expected",
    [
        ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "cpu", "auto", torch.bfloat16),  # Intel Xeon, AMX
        ({"avx2", "avx512f", "avx512_bf16"}, "cpu", "auto", torch.bfloat16),  # AMD EPYC (Zen 4): 1.46x, measured
        ({"avx2", "fma"}, "cpu", "auto", torch.float32),  # AMD EPYC (Zen 3): no bfloat16 step in 300 s
        ({"avx2", "avx512f"}, "cpu", "auto", torch.float32),  # AVX-512 without bfloat16 arithmetic
        ({"avx2", "fma"}, "cuda", "auto", torch.bfloat16),
        ({"avx2", "avx512f", "avx512_bf16"}, "cpu", "float32", torch.float32),  # an explicit setting wins
        ({"avx2", "fma"}, "cpu", "bfloat16", torch.bfloat16),
    ],
)
def test_auto_compute_dtype_is_bfloat16_only_where_the_cpu_has_bfloat16_units(
    flags, device, setting, expected, monkeypatch
):
    from recbole_ilora.model import backbone

    monkeypatch.setattr(backbone, "cpu_flags", lambda: ("a CPU", set(flags)))
    assert backbone.compute_dtype({"llm_compute_dtype": setting}, device) == expected


def test_the_hardware_line_names_the_bfloat16_units(monkeypatch):
    from recbole_ilora import provenance

    monkeypatch.setattr(provenance, "cpu_flags", lambda: ("AMD EPYC", {"avx2", "avx512f", "avx512_bf16"}))
    assert provenance.hardware().startswith(f"{os.cpu_count()} x AMD EPYC (avx512_bf16), ")
    monkeypatch.setattr(provenance, "cpu_flags", lambda: ("AMD EPYC", {"avx2", "fma"}))
    assert provenance.hardware().split(",")[0] == f"{os.cpu_count()} x AMD EPYC (AVX2; no bfloat16 units)"


def test_an_installed_copy_names_its_version_and_phases_keep_wall_and_cpu_time_apart(tmp_path, monkeypatch):
    import time

    import recbole_ilora
    from recbole_ilora import provenance

    monkeypatch.setattr(provenance, "PACKAGE_DIR", tmp_path / "site-packages" / "recbole_ilora")  # no checkout
    (tmp_path / "site-packages" / "recbole_ilora").mkdir(parents=True)
    version = provenance.code_version()
    assert version.startswith("recbole-ilora ") and "no checkout" in version
    assert recbole_ilora.__version__ in version
    timings = provenance.PhaseTimes()
    with provenance.phase(timings, "waiting"):
        time.sleep(0.3)  # wall time, next to no CPU
    with provenance.phase(timings, "working"):
        deadline = time.process_time() + 0.3
        while time.process_time() < deadline:  # CPU time
            pass
    assert timings["waiting"] >= 0.3 and timings.cpu["waiting"] < 0.15
    assert timings.cpu["working"] >= 0.3 and set(timings) == set(timings.cpu) == {"waiting", "working"}


def test_the_learning_rate_warms_up_then_decays_by_the_step_alone():
    from recbole_ilora.trainer import lr_factor

    assert [lr_factor(step, 10, 4, "cosine") for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 10, 4, "cosine") == 1.0  # the decay starts after the warm-up
    assert lr_factor(7, 10, 4, "cosine") == pytest.approx(0.5)  # half-way through the 6 decaying steps
    assert lr_factor(10, 10, 4, "cosine") == pytest.approx(0.0)
    assert lr_factor(9, 10, 0, "constant") == 1.0 and lr_factor(1, 10, 4, "constant") == 0.5


def test_the_trainer_sets_each_batchs_rate_and_laser_trains_its_parts_at_their_own(
    sasrec_checkpoint, llm_cache, monkeypatch
):
    import math

    from recbole_ilora.model.laser import Laser
    from recbole_ilora.quick_start import objective_function

    seen = []
    original = Laser.calculate_loss

    def recording(self, interaction):
        seen.append([group["lr"] for group in self._optimizer_groups])
        return original(self, interaction)

    monkeypatch.setattr(Laser, "calculate_loss", recording)
    from recbole_ilora import trainer as trainer_module

    built = trainer_module.LLMRecTrainer._build_optimizer

    def keep_groups(self, **kwargs):
        optimizer = built(self, **kwargs)
        self.model._optimizer_groups = optimizer.param_groups
        return optimizer

    monkeypatch.setattr(trainer_module.LLMRecTrainer, "_build_optimizer", keep_groups)
    config = {**TINY, "model": "Laser", "mformer_num_queries": 4, "mformer_hidden_size": 16, "mformer_num_heads": 2,
              "mformer_num_layers": 1, "epochs": 2, "train_batch_size": 128, "learning_rate": 0.01,
              "llm_lr_warmup_steps": 2, "llm_lr_schedule": "cosine", "laser_mformer_lr_scale": 0.1,
              "sasrec_checkpoint": sasrec_checkpoint, "llm_cache_dir": llm_cache, "test_modes": ["full"]}  # fmt: skip
    objective_function(config_dict=config)
    steps = len(seen)
    assert steps >= 4 and steps % 2 == 0  # two epochs of the same number of batches
    for step, (mformer, rest) in enumerate(seen):
        warm = (step + 1) / 2 if step < 2 else 0.5 * (1 + math.cos(math.pi * (step - 2) / (steps - 2)))
        assert rest == pytest.approx(0.01 * warm) and mformer == pytest.approx(0.001 * warm), step
