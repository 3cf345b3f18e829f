"""iLoRA through RecBole: end-to-end runs, training, sampled-protocol cost, checkpoints and input errors."""

import os

import pytest
import torch
from conftest import TINY, tiny_config
from recbole.data import create_dataset, data_preparation
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.data.interaction import Interaction
from test_learning import hit_at_k_from_scores

from recbole_ilora.checkpoints import training_state_file
from recbole_ilora.model import iLoRA
from recbole_ilora.quick_start import objective_function
from recbole_ilora.saved_run import load_data_and_model
from recbole_ilora.trainer import LLMRecTrainer

TRAINED_PREFIXES = ("llm.peft_model.", "gate_network.", "projector.", "score_head.")


def assert_recbole_metrics(result, expected_keys, recompute=True):
    """The run tested and returned RecBole's metrics, and (``recompute``, a full-ranking test) they are the saved
    model's: Hit@1 and Hit@5 of its full ranking, recomputed here from its scores, equal RecBole's (that a trained
    model finds a learnable target and an untrained one does not is tests/test_learning.py's job)."""
    test = result["test_result"]
    assert set(expected_keys) <= set(test), sorted(test)
    if recompute:
        _, model, _, _, _, test_data = load_data_and_model(result["saved_model_file"])
        assert isinstance(test_data, FullSortEvalDataLoader)
        for k in (1, 5):
            assert hit_at_k_from_scores(model, test_data, k) == pytest.approx(test[f"hit@{k}"], abs=5e-5), k


def build(sasrec_checkpoint, llm_cache, **overrides):
    config = tiny_config(sasrec_checkpoint=sasrec_checkpoint, llm_cache_dir=llm_cache, **overrides)
    train_data, valid_data, test_data = data_preparation(config, create_dataset(config))
    torch.manual_seed(0)
    model = iLoRA(config, train_data._dataset)
    return config, model, train_data, valid_data, test_data


@pytest.fixture
def tiny_ilora(sasrec_checkpoint, llm_cache):
    return build(sasrec_checkpoint, llm_cache)


def test_ilora_end_to_end_full_sort_with_sasrec_pretraining(llm_cache):
    result = objective_function(config_dict={**TINY, "model": "iLoRA", "epochs": 1, "llm_cache_dir": llm_cache})
    assert result["model"] == "iLoRA"
    assert_recbole_metrics(result, ["recall@10", "ndcg@10", "mrr@10", "hit@1", "hit@5"])
    names = sorted(name for name in os.listdir("saved") if name.endswith(".pth"))
    assert [name.split("-")[0] for name in names] == ["SASRec", "iLoRA", "iLoRA"]
    assert names[2] == names[1].replace(".pth", ".training_state.pth")


def test_ilora_end_to_end_uni19(sasrec_checkpoint, llm_cache):
    config = {**TINY, "model": "iLoRA", "epochs": 1, "sasrec_checkpoint": sasrec_checkpoint, "llm_cache_dir": llm_cache}
    config["eval_args"] = {**TINY["eval_args"], "mode": "uni19"}
    config["test_modes"] = ["uni19", "full"]
    result = objective_function(config_dict=config)
    assert_recbole_metrics(result, ["hit@1", "ndcg@5"], recompute=False)
    uni19, full = result["test_results"]["uni19"], result["test_results"]["full"]
    assert result["test_result"] == uni19
    for k in (1, 5, 10):  # the target among 20 candidates ranks no lower than among all items, user by user
        assert uni19[f"hit@{k}"] >= full[f"hit@{k}"], k
    assert uni19["hit@10"] > full["hit@10"]  # and strictly higher for some user: the candidates are fewer


@pytest.mark.parametrize("mode", ["full", "uni19"])
def test_sasrec_baseline_through_the_same_runner(mode):
    config = {**TINY, "model": "SASRec", "epochs": 2, "eval_args": {**TINY["eval_args"], "mode": mode}}
    result = objective_function(config_dict=config)
    assert result["model"] == "SASRec"
    assert_recbole_metrics(result, ["hit@1", "ndcg@5", "ndcg@10"], recompute=mode == "full")


def test_only_adapter_gate_projector_and_head_train(tiny_ilora):
    _, model, *_ = tiny_ilora
    trainable = model.trainable_parameter_names()
    assert trainable and all(name.startswith(TRAINED_PREFIXES) for name in trainable)
    lora = [name for name in trainable if name.startswith("llm.")]
    assert lora and all(".lora_A." in name or ".lora_B." in name for name in lora)
    assert any(name.startswith("gate_network.") for name in trainable)
    assert not any(p.requires_grad for p in model.sasrec.parameters())


def fixed_loss(model, batch):
    model.eval()
    with torch.no_grad():
        return model.calculate_loss(batch).item()


def test_training_lowers_the_loss_and_survives_evaluation_on_4bit(tiny_ilora):
    config, model, train_data, valid_data, _ = tiny_ilora
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    trainer = LLMRecTrainer(config, model)
    batch = next(iter(train_data))
    initial = fixed_loss(model, batch)
    trainer._train_epoch(train_data, 0)
    trainer.evaluate(valid_data, load_best_model=False)  # eval mode + no_grad, as between RecBole epochs
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer._train_epoch(train_data, 1)
    unchanged = [name for name, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[name])]
    assert unchanged == []
    assert fixed_loss(model, batch) < initial


def test_predict_encodes_each_history_once_and_matches_full_sort(tiny_ilora):
    _, model, _, _, test_data = tiny_ilora
    model.eval()
    interaction = next(iter(test_data))[0]
    users = interaction[model.ITEM_SEQ][:5], interaction[model.ITEM_SEQ_LEN][:5]
    candidates = torch.tensor([[1, 5, 9, 13], [2, 3, 4, 5], [7, 8, 9, 10], [11, 12, 13, 14], [1, 2, 3, 4]])
    rows = Interaction(
        {
            model.ITEM_SEQ: users[0].repeat_interleave(4, dim=0),
            model.ITEM_SEQ_LEN: users[1].repeat_interleave(4),
            model.ITEM_ID: candidates.flatten(),
        }
    )
    encoded_rows = []
    original_forward = model.forward

    def counting_forward(item_seq, item_seq_len):
        encoded_rows.append(item_seq.shape[0])
        return original_forward(item_seq, item_seq_len)

    model.forward = counting_forward
    with torch.no_grad():
        scores = model.predict(rows)
        predict_encoded = sum(encoded_rows)
        full = model.full_sort_predict(Interaction({model.ITEM_SEQ: users[0], model.ITEM_SEQ_LEN: users[1]}))
    distinct = torch.unique(torch.cat([users[0], users[1].unsqueeze(1)], 1), dim=0).shape[0]
    assert predict_encoded == distinct < len(rows)  # one LLM encoding per distinct history, not per row
    assert scores.shape == (20,)
    assert torch.allclose(scores.view(5, 4), full.gather(1, candidates), atol=1e-5)


def test_checkpoint_round_trip_gives_identical_scores(sasrec_checkpoint, llm_cache):
    config, model, train_data, valid_data, test_data = build(sasrec_checkpoint, llm_cache, epochs=1)
    trainer = LLMRecTrainer(config, model)
    trainer.fit(train_data, valid_data, saved=True)
    checkpoint = torch.load(trainer.saved_model_file, map_location="cpu", weights_only=True)
    assert set(checkpoint["state_dict"]) == model.trainable_parameter_names()  # no backbone, no SASRec
    trained_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert sum(v.numel() * v.element_size() for v in checkpoint["state_dict"].values()) == trained_bytes
    assert "optimizer" not in checkpoint  # the model checkpoint holds weights; resuming reads the training state
    state = torch.load(training_state_file(trainer.saved_model_file), weights_only=True)
    assert state["finished"] and state["epoch"] == 1 and state["best_epoch"] == 0  # written as training ended
    assert state["state_dict"].keys() == checkpoint["state_dict"].keys()
    assert len(state["optimizer"]["state"]) == len(checkpoint["state_dict"])  # Adam's moments of every trained one
    assert len(state["optimizer"]["param_groups"][0]["params"]) == len(checkpoint["state_dict"])

    interaction = next(iter(test_data))[0]
    model.eval()
    with torch.no_grad():
        expected = model.full_sort_predict(interaction)

    _, fresh, *_ = build(sasrec_checkpoint, llm_cache, epochs=1)
    fresh.load_state_dict(checkpoint["state_dict"])
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh.full_sort_predict(interaction), expected)


def test_strict_load_rejects_a_foreign_state_dict(tiny_ilora):
    _, model, *_ = tiny_ilora
    state = model.state_dict()
    state.pop(next(iter(state)))
    with pytest.raises(RuntimeError, match="missing"):
        model.load_state_dict(state)


def test_missing_text_field_names_the_key_and_lists_fields(sasrec_checkpoint, llm_cache):
    with pytest.raises(ValueError) as error:
        build(sasrec_checkpoint, llm_cache, prompt_text_field="movie_title")
    message = str(error.value)
    assert "'prompt_text_field' = 'movie_title'" in message and "'title'" in message


def test_sasrec_checkpoint_from_another_dataset_is_refused(sasrec_checkpoint, llm_cache, tmp_path):
    checkpoint = torch.load(sasrec_checkpoint, weights_only=True)
    checkpoint["config"]["dataset"] = "ml-100k"
    other = tmp_path / "other.pth"
    torch.save(checkpoint, other)
    with pytest.raises(ValueError, match="trained on dataset 'ml-100k'"):
        build(str(other), llm_cache)
    with pytest.raises(FileNotFoundError, match="'sasrec_checkpoint'"):
        build(str(tmp_path / "missing.pth"), llm_cache)


def test_llm_path_loads_a_local_checkpoint_through_the_same_pipeline(sasrec_checkpoint, llm_cache, tmp_path):
    import shutil
    from pathlib import Path

    build(sasrec_checkpoint, llm_cache)  # makes sure the embedded LLaMA exists in the cache
    local = tmp_path / "my-llama"  # a local Hugging Face checkpoint folder: config, safetensors, tokenizer
    shutil.copytree(next(Path(llm_cache).glob("llama-*")), local)
    _, model, _, _, test_data = build(sasrec_checkpoint, llm_cache, llm_path=str(local), llm_load_in_4bit=False)
    assert model.llm_size == TINY["llm_hidden_size"]
    model.eval()
    with torch.no_grad():
        scores = model.full_sort_predict(next(iter(test_data))[0])
    assert scores.shape[1] == model.n_items and torch.isfinite(scores[:, 1:]).all()
    with pytest.raises(FileNotFoundError, match="'llm_path'"):
        build(sasrec_checkpoint, llm_cache, llm_path=str(tmp_path / "missing"))


def test_uniform_lora_is_ilora_minus_the_gate(sasrec_checkpoint, llm_cache):
    from recbole_ilora.model import UniformLoRA

    config = tiny_config("UniformLoRA", sasrec_checkpoint=sasrec_checkpoint, llm_cache_dir=llm_cache)
    train_data, _, _ = data_preparation(config, create_dataset(config))
    torch.manual_seed(0)
    uniform = UniformLoRA(config, train_data._dataset)
    _, ilora, *_ = build(sasrec_checkpoint, llm_cache)
    assert uniform.gate_network is None
    gate_names = {name for name in ilora.trainable_parameter_names() if name.startswith("gate_network.")}
    assert gate_names and uniform.trainable_parameter_names() == ilora.trainable_parameter_names() - gate_names
    batch = next(iter(train_data))
    seq, seq_len = batch[uniform.ITEM_SEQ], batch[uniform.ITEM_SEQ_LEN]
    gate = uniform.gate_weights(uniform.sequence_representation(seq, seq_len), None, None)
    assert torch.equal(gate, torch.ones(len(seq), TINY["lora_num_experts"]))


def test_uniform_lora_end_to_end(sasrec_checkpoint, llm_cache):
    config = {**TINY, "model": "UniformLoRA", "epochs": 1}
    result = objective_function(
        config_dict={**config, "sasrec_checkpoint": sasrec_checkpoint, "llm_cache_dir": llm_cache}
    )
    assert result["model"] == "UniformLoRA"
    assert_recbole_metrics(result, ["ndcg@10", "hit@1"])


@pytest.mark.parametrize("gate_input", ["uniform", "prompt_mean"])
def test_gate_input_ablations(sasrec_checkpoint, llm_cache, gate_input):
    _, model, train_data, *_ = build(sasrec_checkpoint, llm_cache, gate_input=gate_input)
    batch = next(iter(train_data))
    seq, seq_len = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
    prompt = model.prompt_builder(seq, seq_len)
    embeds = model.prompt_embeddings(prompt, model.llm.input_embeddings())
    with torch.no_grad():
        gate = model.gate_weights(model.sequence_representation(seq, seq_len), embeds, prompt.attention_mask)
    assert gate.shape == (len(seq), TINY["lora_num_experts"])
    assert torch.allclose(gate.sum(1), torch.ones(len(seq)))
    if gate_input == "uniform":
        assert model.gate_network is None and torch.equal(gate, torch.full_like(gate, 0.25))
    else:
        assert model.gate_network.in_features == TINY["llm_hidden_size"]
        assert not torch.allclose(gate[0], gate[1])  # users with different prompts are routed differently
    with torch.no_grad():
        assert torch.isfinite(model.calculate_loss(batch))


def test_unknown_gate_input_is_refused(sasrec_checkpoint, llm_cache):
    with pytest.raises(ValueError, match="'gate_input'"):
        build(sasrec_checkpoint, llm_cache, gate_input="user_id")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lora_num_experts", 0, "'lora_num_experts' is an integer >= 1"),
        ("lora_expert_rank", 2.5, "'lora_expert_rank' is an integer >= 1"),
        ("lora_dropout", 1.0, "'lora_dropout' is a number in [0.0, 1.0)"),
        ("lora_alpha", -1, "'lora_alpha' is a number > 0"),
        ("lora_target_modules", [], "'lora_target_modules' is a non-empty list"),
        ("llm_eval_batch_size", "all", "'llm_eval_batch_size' is an integer >= 1"),
        ("llm_num_heads", 3, "'llm_hidden_size' is a multiple of 'llm_num_heads'"),
        ("gate_input", "user_id", "'gate_input' in ['sasrec', 'uniform', 'prompt_mean']"),
    ],
)
def test_bad_values_are_refused_before_any_training(key, value, message, llm_cache):
    config = {**TINY, "model": "iLoRA", "llm_cache_dir": llm_cache, key: value}
    with pytest.raises(ValueError) as error:
        objective_function(config_dict=config)
    assert message in str(error.value)
    assert not os.path.exists("saved") or not any(name.endswith(".pth") for name in os.listdir("saved"))


def test_resuming_needs_the_matching_training_state(sasrec_checkpoint, llm_cache):
    config, model, train_data, valid_data, _ = build(sasrec_checkpoint, llm_cache, epochs=2)
    trainer = LLMRecTrainer(config, model)
    trainer.fit(train_data, valid_data, saved=True)
    state_file = training_state_file(trainer.saved_model_file)
    state = torch.load(state_file, weights_only=True)
    assert state["finished"] and state["epoch"] == 2 and state["best_epoch"] == trainer.best_epoch  # as training ended
    resumed = LLMRecTrainer(config, model)
    resumed.resume_checkpoint(state_file)  # the state file or the model file: the same run
    assert resumed.start_epoch == 2 and resumed.saved_model_file == trainer.saved_model_file
    assert resumed.fit(train_data, valid_data) == (trainer.best_valid_score, trainer.best_valid_result)  # no training
    torch.save({**state, "best_epoch": 5}, state_file)
    with pytest.raises(ValueError, match="not from the same run"):
        LLMRecTrainer(config, model).resume_checkpoint(trainer.saved_model_file)
    torch.save({**state, "model": "UniformLoRA"}, state_file)
    with pytest.raises(ValueError, match="holds a UniformLoRA run, not a iLoRA"):
        LLMRecTrainer(config, model).resume_checkpoint(trainer.saved_model_file)
    os.remove(state_file)
    with pytest.raises(FileNotFoundError, match="training state"):
        LLMRecTrainer(config, model).resume_checkpoint(trainer.saved_model_file)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(sasrec_checkpoint, llm_cache):
    results = {}
    for checkpointing in (False, True):
        config, model, train_data, *_ = build(sasrec_checkpoint, llm_cache, llm_activation_checkpointing=checkpointing)
        torch.manual_seed(1)
        for layer in model.llm.lora_layers.values():  # an adapter that does something, experts that differ
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.2)
        mlp = model.llm.decoder().layers[0].mlp  # inside the checkpointed layer.forward
        calls = []
        handle = mlp.register_forward_pre_hook(lambda *args: calls.append(1))  # noqa: B023
        model.train()
        loss = model.calculate_loss(next(iter(train_data)))
        loss.backward()
        handle.remove()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        results[checkpointing] = (loss.detach(), grads, len(calls))
    (loss, grads, calls), (loss_ckpt, grads_ckpt, calls_ckpt) = results[False], results[True]
    assert calls == 1 and calls_ckpt == 2  # the layer ran again in the backward pass
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys() and any(name.startswith("gate_network.") for name in grads)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_training_budget_keeps_each_users_most_recent_sequences():
    from recbole_ilora.data import budget_training_data

    config = tiny_config(llm_train_sequences_per_user=2)
    train_data, *_ = data_preparation(config, create_dataset(config))
    full = train_data._dataset.inter_feat
    budgeted, targets = budget_training_data(config, train_data)
    kept = budgeted._dataset.inter_feat
    assert targets == len(kept)  # the label of each sequence (a loss at every position: see test_every_position)
    users = full["user_id"].unique().tolist()
    counts = {user: int((full["user_id"] == user).sum()) for user in users}
    assert len(kept) == sum(min(2, count) for count in counts.values()) < len(full)
    assert any(count > 2 for count in counts.values())
    for user in users:
        targets = full["item_id"][full["user_id"] == user]  # a user's rows are in time order
        assert torch.equal(kept["item_id"][kept["user_id"] == user], targets[-2:])  # the (at most) two most recent
    config["llm_train_sequences_per_user"] = None
    assert budget_training_data(config, train_data)[0] is train_data  # None: the whole training set


def test_test_modes_share_one_encoding_per_history(tiny_ilora):
    _, model, _, _, test_data = tiny_ilora
    interaction = next(iter(test_data))[0]
    users = len(interaction)
    model.eval()
    encoded = []
    forward = model.forward
    model.forward = lambda seq, length: encoded.append(len(seq)) or forward(seq, length)
    with torch.no_grad():
        plain = model.full_sort_predict(interaction)
        with model.reusing_encodings():
            first = model.full_sort_predict(interaction)
            second = model.full_sort_predict(interaction)  # the same histories: nothing encoded again
            assert sum(encoded) == 2 * users
            model.train()  # the weights may change: forget every encoding
            model.eval()
            model.full_sort_predict(interaction)
            assert sum(encoded) == 3 * users
        model.full_sort_predict(interaction)  # outside the block nothing is kept
    assert sum(encoded) == 4 * users
    torch.testing.assert_close(first, plain)
    torch.testing.assert_close(second, plain)
