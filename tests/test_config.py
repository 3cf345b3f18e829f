"""Configuration loading: plugin property files, precedence of overrides, the model registry and its errors."""

import os
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


def test_a_models_settings_for_a_dataset_come_after_the_datasets_and_touch_no_other_model():
    cofirec = Config(model="CoFiRec", dataset="ml-100k")  # properties/dataset/ml-100k/CoFiRec.yaml
    assert cofirec["load_col"]["item"] == ["item_id", "movie_title", "release_year", "class"]
    assert cofirec["cofirec_levels"][0] == "{class}" and cofirec["cofirec_levels"][-1] == "cf"
    assert len(cofirec["cofirec_codebook_sizes"]) == 4
    assert Config(model="CoFiRec", dataset="lastfm")["cofirec_levels"] == ["cf", "{title}", "cf"]
    assert Config(model="iLoRA", dataset="ml-100k")["load_col"]["item"] == ["item_id", "movie_title"]
    cli = Config(model="CoFiRec", dataset="ml-100k", config_dict={"cofirec_codebook_sizes": [8, 8, 8, 8]})
    assert cli["cofirec_codebook_sizes"] == [8, 8, 8, 8]  # the user's settings still win


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


def test_every_key_of_the_plugin_is_documented():
    files = sorted((REPO_ROOT / "properties" / "model").glob("*.yaml")) + [REPO_ROOT / "properties" / "overall.yaml"]
    keys = [line for path in files for line in path.read_text().splitlines() if re.match(r"^[A-Za-z_]+:", line)]
    assert len(keys) > 50
    for line in keys:
        assert re.search(r"#\s*\((int|float|str|bool|list|dict)\)\s+\S", line), f"undocumented key: {line}"
    config = Config(model="iLoRA", dataset="ml-100k")  # the shared file and iLoRA's own are both read
    assert config["llm_backbone"] == "smollm2-135m-instruct" and config["lora_num_experts"] == 4


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
    monkeypatch.setattr(config_module, "PACKAGED_PROPERTIES_DIR", tmp_path / "nor here")
    with pytest.raises(FileNotFoundError, match="property files are missing"):
        Config(model="iLoRA", dataset="ml-100k")


def test_uniform_lora_reads_ilora_keys_then_its_own():
    config = Config(model="UniformLoRA", dataset="ml-100k")
    ilora = Config(model="iLoRA", dataset="ml-100k")
    assert config["gate_input"] == "none" and ilora["gate_input"] == "sasrec"
    for key in ("lora_num_experts", "lora_expert_rank", "lora_alpha", "prompt_template", "epochs", "llm_hidden_size"):
        assert config[key] == ilora[key], key


def test_the_model_package_imports_nothing_of_the_runner():
    """recbole_ilora.model is used by the runner, never the other way round: importing it (in a fresh interpreter)
    loads neither the quick start, the trainer, the generative runner nor the gate report."""
    import subprocess
    import sys

    runner = [
        "recbole_ilora.quick_start",
        "recbole_ilora.pipeline",
        "recbole_ilora.data",
        "recbole_ilora.saved_run",
        "recbole_ilora.trainer",
        "recbole_ilora.generative",
        "recbole_ilora.gate_report",
        "recbole_ilora.continual",  # time blocks (a data split); the proximal term lives in model/proximal.py
        "recbole_ilora.continual_runner",
        "recbole_ilora.journal",  # the runner opens the score journal and hands it to the model
        "recbole_ilora.lapse",
    ]
    code = f"import sys, recbole_ilora.model; print([name for name in {runner!r} if name in sys.modules])"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip().splitlines()[-1] == "[]"


def test_no_module_of_the_model_package_imports_the_runner_even_lazily():
    """Function-level imports count too (an import inside a method closes the same circle when it runs)."""
    import ast

    runner = (
        "recbole_ilora.quick_start",
        "recbole_ilora.pipeline",
        "recbole_ilora.data",
        "recbole_ilora.saved_run",
        "recbole_ilora.trainer",
        "recbole_ilora.generative",
        "recbole_ilora.gate_report",
        "recbole_ilora.continual",  # time blocks (a data split); the proximal term lives in model/proximal.py
        "recbole_ilora.continual_runner",
        "recbole_ilora.journal",  # the runner opens the score journal and hands it to the model
        "recbole_ilora.lapse",
    )
    found = []
    for path in sorted((REPO_ROOT / "recbole_ilora" / "model").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            found += [f"{path.name}: {name}" for name in names if name.startswith(runner)]
    assert found == []


def test_a_given_data_path_is_honoured_for_ml_100k_too(tmp_path):
    """RecBole points the name ml-100k at its bundled copy whatever data_path says; a user's own copy is used (and
    reloaded: load_data_and_model passes the saved data_path back)."""
    default = Config(model="SASRec", dataset="ml-100k")
    assert default["data_path"].endswith(os.path.join("dataset_example", "ml-100k"))
    custom = Config(model="SASRec", dataset="ml-100k", config_dict={"data_path": str(tmp_path)})
    assert custom["data_path"] == os.path.join(str(tmp_path), "ml-100k")


def test_a_non_editable_install_finds_its_property_files_from_any_directory(tmp_path):
    """``pip install .`` (a wheel): the repository's top-level properties/ travel inside the package, and a model's
    configuration resolves from another directory with no checkout in sight."""
    import subprocess
    import sys

    from conftest import DATA_DIR, REPO_ROOT

    wheels, site = tmp_path / "wheels", tmp_path / "site"
    build = [sys.executable, "-m", "pip", "wheel", str(REPO_ROOT), "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*build, "-w", str(wheels)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("recbole_ilora-*.whl")
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=600)
    assert (site / "recbole_ilora" / "properties" / "model" / "iLoRA.yaml").is_file()
    script = (
        "import recbole_ilora, sys\n"
        "from recbole_ilora.config import Config, properties_dir\n"
        f"assert recbole_ilora.__file__.startswith({str(site)!r}), recbole_ilora.__file__\n"
        f"config = Config(model='iLoRA', dataset='lastfm-tiny', config_dict={{'data_path': {str(DATA_DIR)!r}}})\n"
        "print(properties_dir(), config['lora_num_experts'], config['gate_scope'], config['sasrec_epochs'])\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    environment = {**__import__("os").environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=environment, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    folder, experts, scope, epochs = result.stdout.split()[-4:]
    assert folder == str(site / "recbole_ilora" / "properties")
    assert (experts, scope, epochs) == ("4", "position", "30")  # iLoRA.yaml's and LLMSequentialRecommender.yaml's


def test_the_package_has_no_import_circle_even_through_function_level_imports(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import import_graph

    graph = import_graph.import_graph()
    assert graph["recbole_ilora.quick_start"] and "recbole_ilora.quick_start" not in sum(graph.values(), [])
    assert import_graph.circles(graph) == []
    # the detector finds a circle closed by an import inside a function
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import f\n")
    (package / "b.py").write_text("def f():\n    from pkg import a\n    return a\n")
    (package / "c.py").write_text("import pkg.b\n")
    found = import_graph.circles(import_graph.import_graph(package))
    assert found == [["pkg.a", "pkg.b", "pkg.a"]]


def test_every_module_imports_from_its_layer_or_below(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import import_graph

    graph = import_graph.import_graph()
    assert import_graph.upward_imports(graph) == []  # every module placed, none importing upwards
    assert import_graph.layer_of("recbole_ilora.model.cofirec") == import_graph.layer_of("recbole_ilora.model")
    # the check sees an upward import: the model package reaching for the trainer
    graph["recbole_ilora.model.ilora"] = [*graph["recbole_ilora.model.ilora"], "recbole_ilora.trainer"]
    assert import_graph.upward_imports(graph) == [("recbole_ilora.model.ilora", "recbole_ilora.trainer")]


def test_the_grids_package_has_no_import_circle_and_imports_from_its_layer_or_below():
    from benchmarks import import_graph

    graph = import_graph.import_graph(import_graph.GRID_PACKAGE, import_graph.REPO)
    assert "benchmarks.gridlib.execution" in graph["benchmarks.gridlib.cli"]
    assert import_graph.circles(graph) == []
    assert import_graph.upward_imports(graph, import_graph.GRID_LAYERS) == []
    graph["benchmarks.gridlib.rows"] = ["benchmarks.gridlib.reports"]  # what the grid runs reaching for a report
    assert import_graph.upward_imports(graph, import_graph.GRID_LAYERS) == [
        ("benchmarks.gridlib.rows", "benchmarks.gridlib.reports")
    ]
