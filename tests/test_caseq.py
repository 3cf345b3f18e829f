"""CaseQ's maths: branch weights, the context distribution over paths, the KL term, its reduction to a plain causal
encoder with one context, masking, and training through the runner."""

import itertools
import math

import pytest
import torch
from conftest import TINY
from recbole.data import create_dataset

from recbole_ilora.config import Config
from recbole_ilora.data import prepare_data
from recbole_ilora.model.caseq import CaseQ
from recbole_ilora.quick_start import objective_function


def build(**overrides):
    config = Config(model="CaseQ", config_dict={**TINY, "model": "CaseQ", **overrides})
    train, _, test = prepare_data(config, create_dataset(config))
    torch.manual_seed(0)
    return CaseQ(config, train._dataset).eval(), test


def sequences(model, batch=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    length = model.max_seq_length
    items = torch.randint(1, model.n_items, (batch, length), generator=generator)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length
    items[torch.arange(length).unsqueeze(0) >= lengths.unsqueeze(1)] = 0  # right padding, as RecBole
    return items, lengths


@pytest.mark.parametrize("unit", ["attention", "gru"])
def test_branch_weights_are_distributions_and_zero_at_padding(unit):
    model, _ = build(context_unit=unit, num_contexts=3, num_branch_layers=3)
    items, lengths = sequences(model)
    _, weights = model.encode(items)
    valid = items != 0
    for depth, w in enumerate(weights):
        assert w.shape[-2:] == ((1, 3) if depth == 2 else (3, 3))
        assert torch.allclose(w.sum(-1)[valid], torch.ones(()), atol=1e-6)
        assert (w[~valid] == 0).all() and (w >= 0).all()


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_context_distribution_is_the_product_along_each_path_and_sums_to_one(layers):
    model, _ = build(num_contexts=3, num_branch_layers=layers)
    items, lengths = sequences(model)
    _, weights = model.encode(items)
    rows = torch.arange(len(items))
    at_last = [w[rows, lengths - 1] for w in weights]
    q = model.context_probabilities(at_last).detach()
    assert q.shape == (len(items), 3**layers)
    assert torch.allclose(q.sum(-1), torch.ones(len(items)), atol=1e-6)
    # by hand: path (i_0, ..., i_{L-1}) = w_0[i_1, i_0] * ... * w_{L-2}[i_{L-1}, i_{L-2}] * w_{L-1}[0, i_{L-1}]
    for b in range(len(items)):
        for index, path in enumerate(itertools.product(range(3), repeat=layers)):
            expected = 1.0
            for depth, unit in enumerate(path):
                next_stream = path[depth + 1] if depth + 1 < layers else 0
                expected *= float(at_last[depth][b, next_stream, unit].detach())
            assert float(q[b, index]) == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_kl_term_is_zero_at_the_prior_and_positive_away_from_it():
    model, _ = build()
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert float(model.kl_term(p.expand(5, -1), p)) == pytest.approx(0.0, abs=1e-7)
    q = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    expected = sum(a * math.log(a / b) for a, b in zip(q[0].tolist(), p.tolist(), strict=True))
    assert float(model.kl_term(q, p)) == pytest.approx(expected, rel=1e-6) and expected > 0


def test_prior_is_a_distribution_over_paths_and_is_only_computed_when_weighted(monkeypatch):
    model, test_data = build(num_contexts=2, num_branch_layers=2)
    prior = model.prior()
    assert prior.shape == (4,) and float(prior.sum()) == pytest.approx(1.0, abs=1e-6)
    interaction = next(iter(test_data))[0]  # its item_id is each row's target, as in training
    calls = []
    monkeypatch.setattr(model, "prior", lambda: calls.append(1) or prior)
    model.kl_weight = 0.0
    without = float(model.calculate_loss(interaction))
    assert calls == []
    model.kl_weight = 0.5
    weighted = float(model.calculate_loss(interaction))
    assert calls == [1] and weighted > without  # the KL term is >= 0, and > 0 unless q equals p exactly


@pytest.mark.parametrize("unit", ["attention", "gru"])
def test_one_context_is_a_plain_causal_encoder_of_the_same_units(unit):
    model, _ = build(context_unit=unit, num_contexts=1, num_branch_layers=2, kl_weight=0.0)
    items, lengths = sequences(model)
    # the plain encoder: embeddings, then the units one after the other, then the layer norm; no branching
    length = items.shape[1]
    x = model.item_embedding(items) * math.sqrt(model.hidden_size) + model.position_embedding(torch.arange(length))
    padding = (items == 0).unsqueeze(-1)
    x = x.masked_fill(padding, 0.0)
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    for units in model.layers:
        x = units[0](x, padding, causal)
    plain = model.output_norm(x)
    output, _ = model.encode(items)
    assert torch.allclose(output, plain, atol=1e-6)
    interaction = {model.ITEM_SEQ: items, model.ITEM_SEQ_LEN: lengths}
    scores = model.full_sort_predict(interaction)
    expected = model.gather_indexes(plain, lengths - 1) @ model.item_embedding.weight.T
    assert torch.allclose(scores, expected, atol=1e-5)


@pytest.mark.parametrize("unit", ["attention", "gru"])
def test_what_lies_after_the_history_changes_nothing(unit):
    model, _ = build(context_unit=unit)
    items, lengths = sequences(model)
    garbage = items.clone()
    after = torch.arange(items.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)
    garbage[after] = torch.randint(1, model.n_items, (int(after.sum()),))  # items where padding was
    a = model.forward(items, lengths)
    b = model.forward(garbage, lengths)
    assert torch.allclose(a, b, atol=1e-5)


def test_bad_keys_are_refused_naming_them():
    with pytest.raises(ValueError, match="'context_unit'"):
        build(context_unit="lstm")
    with pytest.raises(ValueError, match="'num_contexts'"):
        build(num_contexts=0)
    with pytest.raises(ValueError, match="train_neg_sample_args"):
        build(loss_type="BCE")  # TINY samples no negative


ONE_NEGATIVE = {"distribution": "uniform", "sample_num": 1, "alpha": 1.0, "dynamic": False, "candidate_num": 0}


@pytest.mark.parametrize("loss_type", ["CE", "BCE"])
def test_training_through_the_runner_lowers_the_loss(loss_type):
    negatives = ONE_NEGATIVE if loss_type == "BCE" else None
    result = objective_function(config_dict={**TINY, "model": "CaseQ", "epochs": 3, "loss_type": loss_type,
                                             "eval_step": 10, "train_neg_sample_args": negatives})  # fmt: skip
    losses = result["train_losses"]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
