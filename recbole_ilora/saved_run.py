"""Reloading a saved run: :func:`load_data_and_model`, RecBole's function of that name for the plugin's checkpoints
(weights-only; the frozen parts rebuilt from the saved configuration)."""

import os
import tempfile

import yaml
from recbole.data import create_dataset
from recbole.utils import init_seed

from recbole_ilora.checkpoints import (
    safe_load,
)
from recbole_ilora.config import Config
from recbole_ilora.data import prepare_data
from recbole_ilora.model.abstract_llm_recommender import LLMSequentialRecommender
from recbole_ilora.utils import get_model

_DERIVED_KEYS = {
    "MODEL_TYPE",
    "MODEL_INPUT_TYPE",
    "eval_type",
    "device",
    "single_spec",
    "local_rank",
    "valid_neg_sample_args",
    "test_neg_sample_args",
    "data_path",
    "model",
    "dataset",
}


def load_data_and_model(model_file, data_path=None):
    """RecBole's ``load_data_and_model`` for checkpoints saved through this plugin (weights-only loading).

    Args:
        model_file: the checkpoint (``saved/<model>-<time>.pth``).
        data_path: the folder holding the dataset's folder, for a checkpoint that moved from the checkout or machine
            it was trained on (its config names that place's absolute path); None: the checkpoint's own.

    Returns:
        tuple: ``config, model, dataset, train_data, valid_data, test_data``, the model in eval mode.
    """
    checkpoint = safe_load(model_file, "model_file")
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint):
        raise ValueError(f"{model_file!r} is not a RecBole model checkpoint (no config and state_dict).")
    saved = checkpoint["config"]
    restored = {key: value for key, value in saved.items() if key not in _DERIVED_KEYS}
    if restored.get("train_neg_sample_args", {}).get("distribution") == "none":  # RecBole's expansion of None
        restored["train_neg_sample_args"] = None
    # RecBole stores data_path joined with the dataset name; the plugin's Config honours it for every dataset.
    restored["data_path"] = data_path or os.path.dirname(os.path.normpath(saved["data_path"]))
    # Through a YAML file, not config_dict: RecBole eval()s config_dict strings (prompt templates, paths).
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, encoding="utf-8") as file:
        yaml.safe_dump(restored, file, allow_unicode=True)
    try:
        config = Config(model=saved["model"], dataset=saved["dataset"], config_file_list=[file.name])
    finally:
        os.remove(file.name)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = prepare_data(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    if isinstance(model, LLMSequentialRecommender):
        model.attach_splits(train_data, valid_data, test_data)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model.eval(), dataset, train_data, valid_data, test_data
