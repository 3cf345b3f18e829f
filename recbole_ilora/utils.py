"""Model and trainer lookup: the plugin's own classes first, RecBole's built-in ones otherwise.

This is RecBole-GNN's pattern for plugins.
"""

import importlib
import inspect

from recbole.model.abstract_recommender import AbstractRecommender
from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_ilora import _compat

_RECBOLE_MODEL_PACKAGES = (
    "general_recommender",
    "context_aware_recommender",
    "sequential_recommender",
    "knowledge_aware_recommender",
)


def _model_classes(module):
    return {
        name: obj
        for name, obj in vars(module).items()
        if inspect.isclass(obj) and issubclass(obj, AbstractRecommender) and not name.startswith("_")
    }


def plugin_models():
    """``{name: class}`` of the models this plugin registers (``recbole_ilora.model``)."""
    return _model_classes(importlib.import_module("recbole_ilora.model"))


def recbole_models():
    """Names of RecBole's built-in models, by family, for error messages."""
    _compat.apply()
    families = {}
    for package in _RECBOLE_MODEL_PACKAGES:
        module = importlib.import_module(f"recbole.model.{package}")
        families[package] = sorted(_model_classes(module))
    return families


def is_plugin_model(model_name):
    return model_name in plugin_models()


def get_model(model_name):
    """The model class called ``model_name``: this plugin's first, then RecBole's.

    Raises:
        ValueError: no such model; the message lists the plugin's models and RecBole's sequential ones.
    """
    _compat.apply()
    if not isinstance(model_name, str):
        raise TypeError(f"'model' must be a model name (str), got {type(model_name).__name__}")
    plugin = plugin_models()
    if model_name in plugin:
        return plugin[model_name]
    known = recbole_models()
    if any(model_name in names for names in known.values()):
        return recbole_get_model(model_name)
    # RecBole's own lookup would import its exlib package (xgboost, lightgbm) for an unknown name and fail there.
    raise ValueError(
        f"'model' = '{model_name}' is not a known model. recbole-ilora models: {sorted(plugin)}; "
        f"RecBole sequential models: {known['sequential_recommender']}; RecBole general models: "
        f"{known['general_recommender']} (model names are case-sensitive)."
    )


def get_trainer(model_type, model_name):
    """The trainer class for ``model_name``: ``recbole_ilora.trainer.<model_name>Trainer``, else the plugin's
    ``LLMRecTrainer`` for the plugin's models, else RecBole's choice."""
    if is_plugin_model(model_name):
        trainer_module = importlib.import_module("recbole_ilora.trainer")
        return getattr(trainer_module, f"{model_name}Trainer", trainer_module.LLMRecTrainer)
    return recbole_get_trainer(model_type, model_name)
