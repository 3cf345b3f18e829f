"""Learning from every position (issue 42): the reading after history item j targets item j + 1, nothing at a
position sees its future, every training target counts once, and the residual head starts at the encoder."""

import numpy as np
import pytest
import torch
from conftest import TINY, tiny_config
from recbole.data import create_dataset, data_preparation

from recbole_ilora.data import budget_training_data, training_windows
from recbole_ilora.model import UniformLoRA, iLoRA
from recbole_ilora.model.abstract_llm_recommender import next_item_targets
from recbole_ilora.model.sequence_encoder import sasrec_every_position
from recbole_ilora.quick_start import objective_function


def build(sasrec_checkpoint, llm_cache, model_class=iLoRA, **overrides):
    config = tiny_config(
        model=model_class.__name__, sasrec_checkpoint=sasrec_checkpoint, llm_cache_dir=llm_cache, **overrides
    )
    train_data, _, _ = data_preparation(config, create_dataset(config))
    torch.manual_seed(0)
    model = model_class(config, train_data._dataset).eval()
    return config, model, train_data


def randomise_adapter_and_head(model):
    """Freshly built, lora_B and the residual head are zero: the LLM would not reach the scores at all. Give them
    random values, so that any leak through the LLM, the gate or the prompt shows in the readings."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and (".lora_B." in name or name.startswith("score_head.")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def first_batch(train_data, rows=8):
    batch = next(iter(train_data))
    full = batch["item_length"] == train_data.config["MAX_ITEM_LIST_LENGTH"]
    index = torch.nonzero(full).flatten()[:rows]
    assert len(index) == rows, "the fixture needs users with full histories"
    return batch[index]


def mixed_lengths_batch(train_data):
    """Three rows with full histories and three with shorter ones (padded)."""
    batch = train_data._dataset.inter_feat
    lengths = batch["item_length"]
    full = torch.nonzero(lengths == train_data.config["MAX_ITEM_LIST_LENGTH"]).flatten()[:3]
    short = torch.nonzero((lengths > 1) & (lengths < 6)).flatten()[:3]
    return batch[torch.cat([full, short])]


def test_next_item_targets_by_hand():
    item_seq = torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0], [1, 2, 3, 4]])
    targets, valid = next_item_targets(item_seq, torch.tensor([3, 1, 4]), torch.tensor([9, 4, 7]))
    assert targets.tolist() == [[6, 7, 9, 0], [4, 0, 0, 0], [2, 3, 4, 7]]
    assert valid.tolist() == [[True, True, True, False], [True, False, False, False], [True, True, True, True]]


def test_sasrec_every_position_is_sasrec_on_each_prefix(sasrec_checkpoint, llm_cache):
    _, model, train_data = build(sasrec_checkpoint, llm_cache)
    batch = first_batch(train_data, rows=4)
    item_seq, item_seq_len = batch["item_id_list"], batch["item_length"]
    with torch.no_grad():
        positions = sasrec_every_position(model.sasrec, item_seq, item_seq_len)  # [B, L, d]
        for j in (0, 4, 9):
            prefix = item_seq.clone()
            prefix[:, j + 1 :] = 0
            expected = model.sasrec(prefix, torch.full_like(item_seq_len, j + 1))
            torch.testing.assert_close(positions[:, j], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gate_input", ["sasrec", "prompt_mean"])
def test_each_reading_is_the_models_reading_of_that_prefix(sasrec_checkpoint, llm_cache, gate_input):
    """The representation read after item j equals the model's own (test-time) reading of the history cut after
    item j: no position sees the items after it, through the LLM, the gate or the encoder."""
    _, model, train_data = build(sasrec_checkpoint, llm_cache, gate_input=gate_input)
    randomise_adapter_and_head(model)
    batch = first_batch(train_data, rows=4)
    item_seq, item_seq_len = batch["item_id_list"], batch["item_length"]
    with torch.no_grad():
        readings = model.position_representations(item_seq, item_seq_len)  # [B, L, d]
        assert readings.abs().max() > 0
        for j in (0, 3, 8):
            prefix = item_seq.clone()
            prefix[:, j + 1 :] = 0
            expected = model(prefix, torch.full_like(item_seq_len, j + 1))  # [B, d]
            torch.testing.assert_close(readings[:, j], expected, rtol=1e-4, atol=1e-5)


def test_changing_a_later_item_changes_no_earlier_reading_or_gate(sasrec_checkpoint, llm_cache):
    _, model, train_data = build(sasrec_checkpoint, llm_cache)
    randomise_adapter_and_head(model)
    batch = first_batch(train_data, rows=4)
    item_seq, item_seq_len = batch["item_id_list"], batch["item_length"]
    changed = item_seq.clone()
    changed[:, 6] = (changed[:, 6] % (model.n_items - 1)) + 1  # another real item at position 6
    with torch.no_grad():
        before = model.position_representations(item_seq, item_seq_len)
        after = model.position_representations(changed, item_seq_len)
        torch.testing.assert_close(after[:, :6], before[:, :6], rtol=1e-4, atol=1e-5)
        assert (after[:, 6:] - before[:, 6:]).abs().amax(dim=(1, 2)).min() > 1e-4  # the change reaches later ones
        gates = []
        for seq in (item_seq, changed):
            prompt = model.prompt_builder(seq, item_seq_len)
            positions = sasrec_every_position(model.sasrec, seq, item_seq_len)
            embeds = model.prompt_embeddings(prompt, model.llm.input_embeddings())
            gate = model.position_gate(positions, prompt, embeds, item_seq_len)  # [B, T, K]
            # Tokens up to the slot of item 5, counted from each row's first prompt token (rows are left-padded).
            slots = prompt.slot_mask.long().cumsum(1)
            starts = (prompt.attention_mask == 0).sum(1)
            gates.append([gate[row, starts[row] : int(torch.nonzero(slots[row] == 6)[0]) + 1] for row in range(4)])
        for old, new in zip(*gates, strict=True):
            torch.testing.assert_close(new, old)
            assert old.shape[0] > 6


def test_loss_is_the_mean_cross_entropy_over_every_target_once(sasrec_checkpoint, llm_cache):
    _, model, train_data = build(sasrec_checkpoint, llm_cache)
    randomise_adapter_and_head(model)
    batch = mixed_lengths_batch(train_data)
    item_seq, item_seq_len = batch["item_id_list"], batch["item_length"]
    assert len(set(item_seq_len.tolist())) > 1, "rows of several lengths: padding must not count"
    with torch.no_grad():
        loss = model.calculate_loss(batch)
        terms = []  # computed one target at a time, from the model's test-time reading of each prefix
        for row in range(len(item_seq)):
            length = int(item_seq_len[row])
            for j in range(length):
                prefix = item_seq[row : row + 1].clone()
                prefix[:, j + 1 :] = 0
                scores = model.full_sort_predict({model.ITEM_SEQ: prefix, model.ITEM_SEQ_LEN: torch.tensor([j + 1])})
                scores[:, 0] = float("-inf")
                target = int(item_seq[row, j + 1]) if j + 1 < length else int(batch["item_id"][row])
                terms.append(-torch.log_softmax(scores, dim=1)[0, target])
    assert len(terms) == int(item_seq_len.sum())
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-4, atol=1e-5)


def test_last_position_loss_reads_the_label_only(sasrec_checkpoint, llm_cache):
    _, model, train_data = build(sasrec_checkpoint, llm_cache, llm_loss_positions="last")
    randomise_adapter_and_head(model)
    batch = mixed_lengths_batch(train_data)
    with torch.no_grad():
        scores = model.full_sort_predict(batch)
        scores[:, 0] = float("-inf")
        expected = torch.nn.functional.cross_entropy(scores, batch["item_id"])
        torch.testing.assert_close(model.calculate_loss(batch), expected)


@pytest.mark.parametrize("model_class", [iLoRA, UniformLoRA])
def test_the_residual_head_ranks_exactly_as_the_encoder_at_step_0(sasrec_checkpoint, llm_cache, model_class):
    _, model, train_data = build(sasrec_checkpoint, llm_cache, model_class)
    batch = next(iter(train_data))
    with torch.no_grad():
        torch.testing.assert_close(model.full_sort_predict(batch), model.sasrec.full_sort_predict(batch))
        torch.testing.assert_close(model.predict(batch), model.sasrec.predict(batch))
    _, plain, _ = build(sasrec_checkpoint, llm_cache, model_class, score_head="plain")
    with torch.no_grad():
        assert not torch.allclose(plain.full_sort_predict(batch), model.sasrec.full_sort_predict(batch))


def test_the_residual_head_learns_from_step_1(sasrec_checkpoint, llm_cache):
    """The head starts at zero, so at step 0 only it gets a gradient; from step 1 the LLM's state reaches the scores
    (the projector and lora_B get gradients), from step 2 lora_A too (lora_B started at zero as well)."""
    _, model, train_data = build(sasrec_checkpoint, llm_cache)
    model.train()
    batch = next(iter(train_data))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def moved(part):
        grads = [p.grad for n, p in model.named_parameters() if part in n and p.requires_grad]
        return any(grad is not None and grad.abs().sum() > 0 for grad in grads)

    seen = []
    for _ in range(3):
        optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        seen.append([moved(part) for part in ("score_head.", "projector.", ".lora_B.", ".lora_A.")])
        optimizer.step()
    assert seen == [[True, False, False, False], [True, True, True, False], [True, True, True, True]]


def test_a_sequence_gate_with_a_loss_at_every_position_is_refused(sasrec_checkpoint, llm_cache):
    with pytest.raises(ValueError, match="'gate_scope' = 'sequence'.*llm_loss_positions"):
        build(sasrec_checkpoint, llm_cache, gate_scope="sequence")
    _, model, train_data = build(sasrec_checkpoint, llm_cache, gate_scope="sequence", llm_loss_positions="last")
    assert model.gate_scope == "sequence"


def test_training_windows_cover_every_training_target_once():
    config = tiny_config(model="SASRec")
    train_data, _, _ = data_preparation(config, create_dataset(config))
    inter = train_data._dataset.inter_feat
    rows = training_windows(config, train_data._dataset)
    users = inter["user_id"].numpy()
    expected, covered = {}, {}
    for user, target in zip(users, inter["item_id"].numpy(), strict=True):  # every training row's target
        expected.setdefault(user, []).append(int(target))
    for row in rows:
        length = int(inter["item_length"][row])
        items = inter["item_id_list"][row, :length].tolist()[1:] + [int(inter["item_id"][row])]
        covered.setdefault(users[row], []).extend(items)
    assert {user: sorted(items) for user, items in covered.items()} == {
        user: sorted(items) for user, items in expected.items()
    }
    assert len(rows) < len(inter) / 5  # windows of 10 items: about a tenth of RecBole's rows


def test_the_budget_counts_windows_and_targets():
    config = tiny_config(model="iLoRA", llm_train_sequences_per_user=1)
    train_data, _, _ = data_preparation(config, create_dataset(config))
    loader, targets = budget_training_data(config, train_data, every_position=True)
    dataset = loader._dataset
    users = dataset.inter_feat["user_id"].numpy()
    assert len(set(users)) == len(users) == train_data._dataset.user_num - 1  # one window per user
    # Each user's window is the most recent: its label is the user's last training target.
    inter = train_data._dataset.inter_feat
    last = {int(u): int(i) for u, i in zip(inter["user_id"].numpy(), inter["item_id"].numpy(), strict=True)}
    assert all(last[int(u)] == int(i) for u, i in zip(users, dataset.inter_feat["item_id"].numpy(), strict=True))
    assert targets == int(dataset.inter_feat["item_length"].sum())


def test_a_run_records_its_encoders_metrics_on_the_same_test(sasrec_checkpoint, llm_cache):
    """With a learning rate too small to move any weight, the residual model is its encoder: the run's own metrics
    and the encoder's, recorded beside them on the same loaders, are equal, in every test mode."""
    config = {
        **TINY,
        "model": "iLoRA",
        "epochs": 1,
        "learning_rate": 1e-30,
        "sasrec_checkpoint": sasrec_checkpoint,
        "llm_cache_dir": llm_cache,
        "test_modes": ["full", "uni19"],
    }
    result = objective_function(config_dict=config)
    assert result["encoder_test_result"] == result["test_result"]
    assert set(result["encoder_test_results"]) == {"full", "uni19"}
    for mode in ("full", "uni19"):
        assert result["encoder_test_results"][mode] == result["test_results"][mode]
    assert result["trained_targets"] > result["trained_sequences"]
    assert np.isclose(result["encoder_test_results"]["full"]["ndcg@10"], result["test_result"]["ndcg@10"])
