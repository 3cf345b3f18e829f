"""Configuration loading: plugin property files, precedence of overrides, the model registry and its errors."""

import re
import sys

import pytest
from conftest import REPO_ROOT
from recbole.trainer import Trainer

from recbole_ilora import config as config_module
from recbole_ilora.config import Config
from recbole_ilora.model import iLoRA
from recbole_ilora.trainer import LLMRecTrainer
from recbole_ilora.utils import get_model, get_trainer


def test_plugin_model_and_dataset_properties_are_loaded():
    config = Config(model="iLoRA", dataset="ml-100k")
    assert config["lora_num_experts"] == 4 and config["lora_expert_rank"] == 2
    assert config["prompt_text_field"] == "movie_title"  # dataset file wins over the model file's default
    assert config["MAX_ITEM_LIST_LENGTH"] == 10
    assert config["load_col"]["item"] == ["item_id", "movie_title"]
    assert config["eval_args"]["split"] == {"LS": "valid_and_test"} and config["eval_args"]["order"] == "TO"


def test_recbole_baseline_shares_the_dataset_protocol():
    config = Config(model="SASRec", dataset="ml-100k")
    ilora = Config(model="iLoRA", dataset="ml-100k")
    for key in ("MAX_ITEM_LIST_LENGTH", "eval_args", "metrics", "topk", "valid_metric", "load_col"):
        assert config[key] == ilora[key], key
    assert "lora_num_experts" not in config


def test_precedence_config_file_then_dict_then_command_line(tmp_path, monkeypatch):
    config_file = tmp_path / "override.yaml"
    config_file.write_text("lora_num_experts: 2\nlora_alpha: 8\nlearning_rate: 0.01\n")
    monkeypatch.setattr(sys, "argv", ["run_recbole_ilora.py", "--learning_rate=0.03"])
    config = Config(
        model="iLoRA",
        dataset="ml-100k",
        config_file_list=[str(config_file)],
        config_dict={"lora_alpha": 32, "learning_rate": 0.02},
    )
    assert config["lora_num_experts"] == 2  # file beats the model's property file
    assert config["lora_alpha"] == 32  # dict beats file
    assert config["learning_rate"] == 0.03  # command line beats dict


def test_every_ilora_key_is_documented():
    lines = (REPO_ROOT / "properties" / "model" / "iLoRA.yaml").read_text().splitlines()
    keys = [line for line in lines if re.match(r"^[A-Za-z_]+:", line)]
    assert len(keys) > 30
    for line in keys:
        assert re.search(r"#\s*\((int|float|str|bool|list|dict)\)\s+\S", line), f"undocumented key: {line}"


def test_registry_plugin_first_then_recbole():
    assert get_model("iLoRA") is iLoRA
    assert get_model("SASRec").__module__ == "recbole.model.sequential_recommender.sasrec"
    assert get_trainer(iLoRA.type, "iLoRA") is LLMRecTrainer
    assert get_trainer(iLoRA.type, "SASRec") is Trainer


def test_unknown_model_lists_known_models():
    with pytest.raises(ValueError) as error:
        get_model("ILoRA")
    message = str(error.value)
    assert "'ILoRA'" in message and "iLoRA" in message and "SASRec" in message and "GRU4Rec" in message
    with pytest.raises(ValueError, match="'model' = 'NoSuchModel'"):
        Config(model="NoSuchModel", dataset="ml-100k")


def test_missing_properties_folder_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(config_module, "PROPERTIES_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="property files are missing"):
        Config(model="iLoRA", dataset="ml-100k")


def test_uniform_lora_reads_ilora_keys_then_its_own():
    config = Config(model="UniformLoRA", dataset="ml-100k")
    ilora = Config(model="iLoRA", dataset="ml-100k")
    assert config["gate_input"] == "none" and ilora["gate_input"] == "sasrec"
    for key in ("lora_num_experts", "lora_expert_rank", "lora_alpha", "prompt_template", "epochs", "llm_hidden_size"):
        assert config[key] == ilora[key], key
