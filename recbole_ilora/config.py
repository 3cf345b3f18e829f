"""RecBole's ``Config`` for the plugin: resolves plugin model names and loads ``properties/`` on top.

Order of precedence (lowest first), as in RecBole: RecBole's own property files, then this plugin's
``properties/model/<model>.yaml`` (and first those of the model's plugin base classes) and
``properties/dataset/<dataset>.yaml``, then ``properties/dataset/<dataset>/<model>.yaml`` (a model's settings for
that dataset), then ``--config_files``, then
``config_dict``, then ``--key=value`` on the command line.
"""

import os
from pathlib import Path

from recbole.config import Config as RecBoleConfig

from recbole_ilora import _compat
from recbole_ilora.utils import get_model

# The property files: the copy an installed wheel ships inside the package (setup.py copies the repository's
# top-level properties/ there when it builds), else the repository's own (an editable install or a checkout).
PACKAGED_PROPERTIES_DIR = Path(__file__).resolve().parent / "properties"
PROPERTIES_DIR = Path(__file__).resolve().parent.parent / "properties"


def properties_dir():
    """The plugin's ``properties/`` folder: the installed package's copy, else the repository's."""
    for folder in (PACKAGED_PROPERTIES_DIR, PROPERTIES_DIR):
        if (folder / "model").is_dir():
            return folder
    raise FileNotFoundError(
        f"recbole-ilora's property files are missing: expected the folder {PACKAGED_PROPERTIES_DIR} (an installed "
        f"package) or {PROPERTIES_DIR} (a checkout). Reinstall the plugin: pip install . (or pip install -e . from "
        "its repository)."
    )


class Config(RecBoleConfig):
    """RecBole's Config, plus the plugin's models and property files."""

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None):
        _compat.apply()
        super().__init__(model, dataset, config_file_list, config_dict)

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
        if isinstance(model, str):
            model = get_model(model)
        return super()._get_model_and_dataset(model, dataset)

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        root = properties_dir()
        self._load_plugin_property_file(root / "overall.yaml")  # the plugin's keys for every model
        # A plugin model reads its base classes' property files first (UniformLoRA reads
        # LLMSequentialRecommender.yaml, iLoRA.yaml, then its own).
        for cls in reversed(model_class.__mro__):
            if cls.__module__.startswith("recbole_ilora."):
                self._load_plugin_property_file(root / "model" / f"{cls.__name__}.yaml")
        dataset_keys = list(self._load_plugin_property_file(root / "dataset" / f"{dataset}.yaml"))
        # A model's settings for one dataset (CoFiRec's levels and the item fields they read), after the dataset's.
        for cls in reversed(model_class.__mro__):
            if cls.__module__.startswith("recbole_ilora."):
                dataset_keys += self._load_plugin_property_file(root / "dataset" / dataset / f"{cls.__name__}.yaml")
        self.parameters["Dataset"] += [key for key in dataset_keys if key not in self.parameters["Dataset"]]

    def _set_default_parameters(self):
        """RecBole's defaults, with two changes: ``train_neg_sample_args`` is None for cross-entropy models unless
        set, and a ``data_path`` the user gives is honoured for ``ml-100k`` too (RecBole always points that name at
        the copy inside its wheel, so a custom copy could be neither trained on nor reloaded)."""
        settings = self.final_config_dict
        # A model trained with cross-entropy over all items (loss_type CE, RecBole's SASRec, GRU4Rec, BERT4Rec, ...)
        # samples no negatives, and RecBole refuses the default sampling for it; pairwise models (BPR, FPMC) keep it.
        # So unless the user sets train_neg_sample_args, it follows the model, as RecBole's users set it by hand.
        uses_ce = not hasattr(self.model_class, "input_type") and settings.get("loss_type") == "CE"
        if uses_ce and "train_neg_sample_args" not in self.external_config_dict:
            settings["train_neg_sample_args"] = None
        super()._set_default_parameters()
        # A plugin model may take a pairwise loss RecBole does not know by name (CaseQ's BCE with one negative):
        # RecBole then sets no input type; the model's PAIRWISE_LOSS_TYPES says it reads a sampled negative.
        if settings.get("loss_type") in getattr(self.model_class, "PAIRWISE_LOSS_TYPES", ()):
            from recbole.utils import InputType

            settings["MODEL_INPUT_TYPE"] = InputType.PAIRWISE
        given = self.external_config_dict.get("data_path")
        if self.dataset == "ml-100k" and given:
            self.final_config_dict["data_path"] = os.path.join(given, self.dataset)

    def _init_device(self):
        """RecBole's device set-up, plus ``dist_backend`` for its distributed mode (``nproc``/``world_size``, which
        set ``local_rank``): 'nccl' (RecBole's, one CUDA device per process), 'gloo' (CPU processes, or CUDA where NCCL
        is missing), or unset: nccl when CUDA is usable, else gloo."""
        import torch

        settings = self.final_config_dict
        if "local_rank" not in settings:  # one process
            return super()._init_device()
        backend = settings.get("dist_backend")
        cuda = torch.cuda.is_available() and settings.get("use_gpu", True) and str(settings["gpu_id"]) != ""
        if backend is None:
            backend = "nccl" if cuda else "gloo"
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"Make sure 'dist_backend' in ['nccl', 'gloo'] (or unset), got {backend!r}.")
        settings["dist_backend"] = backend
        if backend == "nccl":
            return super()._init_device()
        settings["gpu_id"] = str(settings["gpu_id"])
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(
                backend="gloo",
                rank=settings["local_rank"] + (settings.get("offset") or 0),
                world_size=settings.get("world_size") or settings.get("nproc") or 1,
                init_method=f"tcp://{settings.get('ip') or 'localhost'}:{settings.get('port') or 5678}",
            )
        if cuda:
            settings["device"] = torch.device("cuda", settings["local_rank"])
            torch.cuda.set_device(settings["local_rank"])
        else:
            settings["device"] = torch.device("cpu")
        settings["single_spec"] = False
        if settings["local_rank"] != 0:  # as RecBole: only the first process logs and shows progress
            settings["state"] = "error"
            settings["show_progress"] = False
            settings["verbose"] = False

    def _load_plugin_property_file(self, path):
        if not os.path.isfile(path):
            return {}
        return self._update_internal_config_dict(str(path)) or {}
