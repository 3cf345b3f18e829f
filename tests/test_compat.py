"""Each RecBole-1.2.1-on-today's-stack shim of recbole_ilora._compat, tested on the real failure."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY

from recbole_ilora import _compat


def test_numpy_2_aliases_let_recbole_config_build():
    _compat.apply()
    assert np.float_ is np.float64 and np.complex_ is np.complex128 and np.unicode_ is np.str_
    from recbole.config import Config as RecBoleConfig

    config = RecBoleConfig(model="SASRec", dataset="ml-100k", config_dict={"train_neg_sample_args": None})
    assert config["model"] == "SASRec"


def _python(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return result.stdout.strip().splitlines()[-1]


def test_recbole_sequential_import_turns_anomaly_mode_on_without_the_shim():
    assert _python("import torch, recbole.model.sequential_recommender; print(torch.is_anomaly_enabled())") == "True"


def test_importing_the_plugin_models_leaves_anomaly_mode_off():
    code = "import torch, recbole_ilora.model, recbole.model.sequential_recommender; print(torch.is_anomaly_enabled())"
    assert _python(code) == "False"


def test_anomaly_mode_set_by_the_user_is_kept():
    code = (
        "import torch; torch.autograd.set_detect_anomaly(True); import recbole_ilora.model; "
        "print(torch.is_anomaly_enabled())"
    )
    assert _python(code) == "True"


def test_pandas_3_is_refused_with_a_clear_error():
    with pytest.raises(ImportError, match="pandas<3"):
        _compat.check_pandas("3.0.1")
    _compat.check_pandas("2.3.3")
    _compat.check_pandas()  # the installed version passes


def test_recbole_checkpoint_loads_weights_only_and_best_model_reload_works():
    from recbole_ilora.quick_start import objective_function

    result = objective_function(config_dict={**TINY, "model": "SASRec", "epochs": 1})
    assert result["test_result"] is not None  # Trainer.evaluate(load_best_model=True) reloaded the checkpoint
    (path,) = [os.path.join("saved", name) for name in os.listdir("saved")]
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["config"]["model"] == "SASRec"
    assert checkpoint["config"]["dataset"] == "lastfm-tiny"
    assert isinstance(checkpoint["best_valid_score"], float)
    assert checkpoint["epoch"] == 0 and "item_embedding.weight" in checkpoint["state_dict"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_checkpoint_write_is_atomic(monkeypatch, tmp_path):
    from conftest import tiny_config
    from recbole.data import create_dataset, data_preparation
    from recbole.trainer import Trainer

    from recbole_ilora.utils import get_model

    config = tiny_config("SASRec")
    train_data, _, _ = data_preparation(config, create_dataset(config))
    trainer = Trainer(config, get_model("SASRec")(config, train_data._dataset))
    trainer._save_checkpoint(0, verbose=False)
    before = open(trainer.saved_model_file, "rb").read()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer._save_checkpoint(1, verbose=False)
    assert open(trainer.saved_model_file, "rb").read() == before
    assert os.listdir(os.path.dirname(trainer.saved_model_file)) == [os.path.basename(trainer.saved_model_file)]


def test_recbole_quick_start_and_its_ray_import_are_never_loaded():
    code = (
        "import sys, recbole_ilora.quick_start, recbole_ilora.model; "
        "print('recbole.quick_start' in sys.modules or 'ray' in sys.modules)"
    )
    assert _python(code) == "False"


def test_ensure_dir_tolerates_a_folder_another_process_created_after_the_check(tmp_path, monkeypatch):
    from recbole.data import utils as data_utils
    from recbole.trainer import trainer as recbole_trainer
    from recbole.utils import logger as recbole_logger

    _compat.apply()
    folder = tmp_path / "saved"
    folder.mkdir()  # the other process of a distributed run created it ...
    monkeypatch.setattr(os.path, "exists", lambda path: False)  # ... after this one checked
    with pytest.raises(FileExistsError):
        _compat.RECBOLE_ENSURE_DIR(str(folder))  # RecBole's own check-then-create
    for module in (recbole_trainer, data_utils, recbole_logger):
        assert module.ensure_dir is _compat.ensure_dir
    recbole_trainer.ensure_dir(str(folder))
    data_utils.ensure_dir(str(tmp_path / "new" / "nested"))
    monkeypatch.undo()
    assert folder.is_dir() and (tmp_path / "new" / "nested").is_dir()


def test_recboles_pandas_3_future_warnings_are_silenced_and_nothing_else(tmp_path):
    import warnings

    from recbole.data import create_dataset

    from recbole_ilora.config import Config

    config = Config(model="SASRec", config_dict={**TINY, "checkpoint_dir": str(tmp_path)})

    def warnings_building_the_dataset(quiet):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if quiet:
                _compat.quiet_recbole_pandas_warnings()
            create_dataset(config)
            warnings.warn("a FutureWarning of the plugin's own", FutureWarning, stacklevel=1)
        return [(w.category, os.path.basename(w.filename)) for w in caught]

    loud = warnings_building_the_dataset(quiet=False)
    assert loud.count((FutureWarning, "dataset.py")) >= 3  # RecBole 1.2.1 on pandas 2.3: fillna, agg(len)
    quiet = warnings_building_the_dataset(quiet=True)
    assert (FutureWarning, "dataset.py") not in quiet
    assert (FutureWarning, "test_compat.py") in quiet  # only RecBole's Dataset is silenced
