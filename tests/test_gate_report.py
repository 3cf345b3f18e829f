"""Reloading a saved iLoRA checkpoint and exporting how it routes every test user."""

import math
import os

import pytest
import torch
from conftest import TINY

from recbole_ilora.data import protocol_test_data
from recbole_ilora.gate_report import gate_records, summarize
from recbole_ilora.quick_start import objective_function
from recbole_ilora.saved_run import load_data_and_model


def test_saved_ilora_reloads_and_reports_its_routing(sasrec_checkpoint, llm_cache):
    config = {**TINY, "model": "iLoRA", "epochs": 1, "sasrec_checkpoint": sasrec_checkpoint, "llm_cache_dir": llm_cache}
    result = objective_function(config_dict=config)
    names = sorted(name for name in os.listdir("saved") if name.startswith("iLoRA-"))
    assert len(names) == 2 and names[1].endswith(".training_state.pth")  # the model checkpoint and its companion
    path = os.path.join("saved", names[0])

    loaded_config, model, dataset, _, _, test_data = load_data_and_model(path)
    assert loaded_config["sasrec_checkpoint"] == sasrec_checkpoint
    assert loaded_config["lora_num_experts"] == TINY["lora_num_experts"] and loaded_config["epochs"] == 1
    assert loaded_config["MAX_ITEM_LIST_LENGTH"] == TINY["MAX_ITEM_LIST_LENGTH"]
    saved_state = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(model.state_dict()[key], value) for key, value in saved_state.items())

    records = gate_records(model, test_data)
    assert len(records) == dataset.user_num - 1  # every test user once
    assert len({r["user_id"] for r in records}) == len(records)
    for record in records:
        assert len(record["weights"]) == TINY["lora_num_experts"]
        assert math.isclose(sum(record["weights"]), 1.0, rel_tol=1e-5)
        entropy = -sum(w * math.log(w) for w in record["weights"] if w > 0)
        assert record["entropy"] == pytest.approx(entropy, abs=1e-5)  # the weights' own entropy
    # A sampled loader (uni19, as a generative model is tested) repeats each user per candidate: still one record each.
    sampled_records = gate_records(model, protocol_test_data(loaded_config, "uni19"))
    sampled = {r["user_id"]: r for r in sampled_records}
    assert len(sampled_records) == len(records) and sorted(sampled) == sorted(r["user_id"] for r in records)
    for record in records:
        assert sampled[record["user_id"]]["weights"] == pytest.approx(record["weights"], abs=1e-6)
    summary = summarize(records)
    assert sum(summary["users_led_by_expert"]) == len(records)
    assert summary["max_entropy"] == math.log(TINY["lora_num_experts"])
    assert result["test_result"] is not None
