"""Laser: the M-Former's masking and routing, its balance loss, a frozen LLM, the item table's life cycle, and
checkpoints that hold only what it trains."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, TINY
from recbole.data import create_dataset

from recbole_ilora.config import Config
from recbole_ilora.data import prepare_data
from recbole_ilora.model.laser import Laser, MFormer, table_geometry
from recbole_ilora.quick_start import objective_function
from recbole_ilora.saved_run import load_data_and_model

SMALL = {"mformer_num_queries": 4, "mformer_hidden_size": 16, "mformer_num_heads": 2, "mformer_num_layers": 1}


def mformer(top_k=1, experts=4):
    torch.manual_seed(0)
    return MFormer(8, 16, 12, experts, 3, top_k, num_layers=2, num_heads=2, dropout=0.0).eval()


def history(batch=5, length=6):
    generator = torch.Generator().manual_seed(1)
    items = torch.randn(batch, length, 8, generator=generator)
    lengths = torch.tensor([6, 1, 3, 4, 2])[:batch]
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    return items, mask


def test_padded_history_positions_change_nothing():
    model = mformer(top_k=2)
    items, mask = history()
    prefix, probs, weights = model(items, mask)
    assert prefix.shape == (5, 3, 12) and probs.shape == (5, 6, 4) and weights.shape == (5, 4)
    noisy = items.clone()
    noisy[~mask] = torch.randn(int((~mask).sum()), 8) * 100  # whatever lies at padded positions
    again = model(noisy, mask)
    for a, b in zip((prefix, probs, weights), again, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert (probs[~mask] == 0).all()


def test_top_k_keeps_k_experts_renormalised_and_k_equal_to_e_is_the_dense_mixture():
    items, mask = history()
    sparse = mformer(top_k=2)
    _, probs, weights = sparse(items, mask)
    assert ((weights > 0).sum(-1) == 2).all() and torch.allclose(weights.sum(-1), torch.ones(5))
    mean = probs.sum(1) / mask.sum(1, keepdim=True)  # the mean over real items
    top = mean.topk(2, dim=-1)
    assert torch.allclose(weights.gather(-1, top.indices), top.values / top.values.sum(-1, keepdim=True))

    dense = mformer(top_k=4)
    prefix, probs, weights = dense(items, mask)
    assert torch.allclose(weights, probs.sum(1) / mask.sum(1, keepdim=True), atol=1e-6)
    memory = dense.input_projection(items)
    by_hand = sum(
        weights[:, e, None, None] * dense.transformer(dense.queries[e].expand(5, -1, -1), memory,
                                                      memory_key_padding_mask=~mask)
        for e in range(4)
    )  # fmt: skip
    assert torch.allclose(prefix, dense.output_projection(by_hand), atol=1e-5)


def test_balance_loss_against_a_hand_computation():
    model = mformer(top_k=1, experts=2)
    probs = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], [[0.6, 0.4], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # real items: (0.9, 0.1), (0.2, 0.8), (0.6, 0.4): p = (1.7/3, 1.3/3); top-1: experts 0, 1, 0: f = (2/3, 1/3)
    expected = 2 * (1.7 / 3 * 2 / 3 + 1.3 / 3 * 1 / 3)
    assert float(model.balance_loss(probs, mask)) == pytest.approx(expected)


@pytest.fixture()
def laser(sasrec_checkpoint, llm_cache):
    settings = {**TINY, "model": "Laser", **SMALL, "sasrec_checkpoint": sasrec_checkpoint, "llm_cache_dir": llm_cache}
    config = Config(model="Laser", config_dict=settings)
    train, _, _ = prepare_data(config, create_dataset(config))
    return Laser(config, train._dataset), train


def test_the_llm_gets_no_gradient_and_stays_bit_identical(laser):
    model, train = laser
    before = {name: value.clone() for name, value in model.llm.state_dict().items()}
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and not any(p.requires_grad for p in model.llm.parameters())
    optimizer = torch.optim.Adam(trained, lr=0.01)
    model.train()
    for step, interaction in enumerate(train):
        optimizer.zero_grad()
        model.calculate_loss(interaction).backward()
        assert all(p.grad is None for p in model.llm.parameters())
        assert model.suffix.grad is not None and model.mformer.queries.grad is not None
        optimizer.step()
        if step == 1:
            break
    assert all(torch.equal(before[name], value) for name, value in model.llm.state_dict().items())
    assert set(model.state_dict()) == {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(name.startswith(("mformer.", "suffix")) for name in model.state_dict())


def test_item_table_is_refreshed_each_epoch_and_shared_by_the_test_modes(sasrec_checkpoint, llm_cache, monkeypatch):
    calls, tables = [], []
    original = Laser.item_table

    def counted(self):
        calls.append("train" if self.training else "eval")
        tables.append(original(self))
        return tables[-1]

    monkeypatch.setattr(Laser, "item_table", counted)
    settings = {**TINY, "model": "Laser", **SMALL, "epochs": 2, "test_modes": ["full", "uni19"]}
    settings.update(sasrec_checkpoint=sasrec_checkpoint, llm_cache_dir=llm_cache)
    result = objective_function(config_dict=settings)
    # One table per epoch, at its first training step; validation and every test mode score against the table the
    # weights were trained against (the official code's model.I), the best epoch's, which the checkpoint holds.
    assert calls == ["train", "train"]
    assert set(result["test_results"]) == {"full", "uni19"} and result["model_summary"]["balance_loss"] > 0
    geometry = result["model_summary"]["table_geometry"]  # the first table (initial weights) and the tested one
    assert geometry["tables"] == 2 and geometry["first"] == table_geometry(tables[0])
    assert geometry["last"] == table_geometry(tables[-1])
    checkpoint = torch.load(result["saved_model_file"], weights_only=True)
    assert torch.equal(checkpoint["other_parameter"]["item_vectors"], tables[checkpoint["epoch"]])

    calls.clear()
    _, model, _, _, _, test_data = load_data_and_model(result["saved_model_file"])
    interaction = next(iter(test_data))[0]
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
    assert calls == []  # the checkpoint brought its table
    assert set(checkpoint["state_dict"]) == set(model.state_dict())
    model.item_vectors = None  # a model without a table (never trained) computes one from its weights
    with torch.no_grad():
        model.full_sort_predict(interaction)
    assert calls == ["eval"]
    reloaded = load_data_and_model(result["saved_model_file"])[1]
    with torch.no_grad():
        assert torch.allclose(reloaded.full_sort_predict(interaction), scores, atol=1e-5)  # the same scores

    # benchmarks/laser_loss.py, the diagnosis of the benchmark's Laser rows: against the table the run trained
    # with, the trained weights fit the training sequences better than the same configuration untrained.
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import laser_loss

    command = ["laser_loss.py", result["saved_model_file"], "--sequences", "32", "--output", "loss.json"]
    monkeypatch.setattr(sys, "argv", command)
    laser_loss.main()
    with open("loss.json", encoding="utf-8") as file:
        figures = json.load(file)
    assert figures["sequences"] == 32
    assert figures["trained_cross_entropy"] < figures["untrained_cross_entropy"] - 0.05
    assert figures["table_geometry"] == table_geometry(checkpoint["other_parameter"]["item_vectors"])
    assert figures["test_users"] > 0 and figures["probe_training_sequences"] > figures["sequences"]
    assert figures["sasrec_hit@10"] == pytest.approx(result["encoder_test_result"]["hit@10"], abs=5e-5)


def test_the_linear_probe_recovers_a_linear_map(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import laser_loss

    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(50, 4, generator=generator), torch.randn(5, 3, generator=generator)
    y = torch.cat([x, torch.ones(50, 1)], 1) @ w
    torch.testing.assert_close(laser_loss.linear_probe(x, y, ridge=0.0).float(), w, atol=1e-5, rtol=1e-5)


def laser_with(sasrec_checkpoint, llm_cache, **overrides):
    settings = {**TINY, "model": "Laser", **SMALL, "sasrec_checkpoint": sasrec_checkpoint, "llm_cache_dir": llm_cache}
    config = Config(model="Laser", config_dict={**settings, **overrides})
    train, _, _ = prepare_data(config, create_dataset(config))
    torch.manual_seed(0)
    return Laser(config, train._dataset), next(iter(train))


def test_the_first_phase_trains_the_item_side_and_the_table_phase_does_not(sasrec_checkpoint, llm_cache, monkeypatch):
    model, batch = laser_with(sasrec_checkpoint, llm_cache, laser_phase1_epochs=1, laser_phase1_negatives=3)
    model.train()
    # the user side held fixed: what reaches the M-Former and the suffix then comes through the item side only
    user = torch.randn(len(batch), model.llm_size)
    probs = torch.zeros(len(batch), batch[model.ITEM_SEQ].shape[1], model.mformer.num_experts)
    monkeypatch.setattr(model, "_user", lambda *args: (user, probs, None))
    monkeypatch.setattr(model, "item_table", lambda: torch.randn(model.n_items, model.llm_size))
    gradients = {}
    for epoch in (0, 1):
        model.start_epoch(epoch)
        model.zero_grad()
        loss = model.calculate_loss(batch)
        if loss.requires_grad:
            loss.backward()
        grads = [p.grad for p in model.mformer.parameters()] + [model.suffix.grad]
        gradients[epoch] = sum(float(g.abs().sum()) for g in grads if g is not None)
    assert model.epoch == 1 and not model.in_phase1
    assert gradients[0] > 0  # phase 1 (epoch 0): the target's and the negatives' vectors carry gradients
    assert gradients[1] == 0  # the table phase (epoch 1): the items are a fixed table


def test_the_first_phase_loss_is_the_targets_cross_entropy_among_its_negatives(sasrec_checkpoint, llm_cache):
    model, batch = laser_with(sasrec_checkpoint, llm_cache, laser_phase1_epochs=2, laser_phase1_negatives=4)
    model.train()
    model.mformer.eval()  # no dropout: the vectors below are the ones the loss saw
    targets = batch[model.POS_ITEM_ID]
    negatives = model.sample_negatives(targets.repeat(200))
    assert negatives.shape == (200 * len(targets), 4)
    assert ((negatives >= 1) & (negatives < model.n_items)).all() and (negatives != targets.repeat(200)[:, None]).all()
    assert len(negatives.unique()) == model.n_items - 1  # every other item can be drawn
    torch.manual_seed(5)
    loss = model.calculate_loss(batch)
    torch.manual_seed(5)
    drawn = model.sample_negatives(targets)  # the same draws the loss made
    with torch.no_grad():
        user = model.forward(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
        items = torch.cat([targets[:, None], drawn], 1)
        vectors = torch.stack([model.encode_items(row)[0] for row in items])  # [B, 5, H], one row at a time
        logits = torch.nn.functional.cosine_similarity(user[:, None], vectors, dim=-1) / model.temperature
        expected = torch.nn.functional.cross_entropy(logits, torch.zeros_like(targets))
    balance = model.last_balance_loss * model.balance_weight
    assert float(loss) == pytest.approx(float(expected) + balance, rel=1e-4)


def test_laser_phase_keys_are_checked_before_any_work(sasrec_checkpoint, llm_cache):
    settings = {**TINY, "model": "Laser", **SMALL, "sasrec_checkpoint": sasrec_checkpoint, "llm_cache_dir": llm_cache}
    with pytest.raises(ValueError, match="'laser_phase1_negatives'"):
        objective_function(config_dict={**settings, "laser_phase1_negatives": 0})
    with pytest.raises(ValueError, match="'laser_phase1_epochs'"):
        objective_function(config_dict={**settings, "laser_phase1_epochs": -1})


def test_stage_1_aligns_the_prefix_with_the_historys_title_embeddings_without_the_llm(
    sasrec_checkpoint, llm_cache, monkeypatch
):
    model, batch = laser_with(sasrec_checkpoint, llm_cache, laser_stage1_epochs=1, laser_phase1_epochs=1)
    plain, _ = laser_with(sasrec_checkpoint, llm_cache)
    assert set(model.state_dict()) - set(plain.state_dict()) == {"stage1_log_scale"}  # stage 1 off: as before
    model.train()
    model.mformer.eval()  # no dropout: the prefix below is the one the loss saw
    stages = []
    for epoch in (0, 1, 2):
        model.start_epoch(epoch)
        stages.append((model.in_stage1, model.in_phase1))
    assert stages == [(True, False), (False, True), (False, False)]  # stage 1, phase 1, the table phase
    model.start_epoch(0)
    monkeypatch.setattr(model.llm, "decoder", lambda: (_ for _ in ()).throw(AssertionError("the LLM ran")))
    loss = model.calculate_loss(batch)
    loss.backward()
    assert model.suffix.grad is None and model.stage1_log_scale.grad is not None  # no LLM, no suffix
    assert model.mformer.queries.grad is not None
    # by hand: each title's mean token embedding, each history's mean title vector, the best cosine over the prefix
    # tokens, scaled by 1 / 0.07, symmetric cross-entropy with label smoothing 0.1
    seq = batch[model.ITEM_SEQ]
    embed = model.llm.input_embeddings()
    with torch.no_grad():
        texts = []
        for row in seq:
            titles = [model.prompt_builder.titles[int(i)] for i in row if int(i) != 0]
            vectors = [embed(torch.tensor(model.tokenizer(t, add_special_tokens=False)["input_ids"])).mean(0)
                       for t in titles]  # fmt: skip
            texts.append(torch.stack(vectors).mean(0))
        text = torch.stack(texts)
        prefix, probs, _ = model.mformer(model.item_embeddings()[seq], seq != 0)
        sims = torch.tensor([[max(float(torch.cosine_similarity(q, t, dim=0)) for q in p) for t in text]
                             for p in prefix]) / 0.07  # fmt: skip
        labels = torch.arange(len(seq))
        smooth = lambda s: torch.nn.functional.cross_entropy(s, labels, label_smoothing=0.1)  # noqa: E731
        expected = (smooth(sims) + smooth(sims.t())) / 2 + model.balance_weight * model.mformer.balance_loss(
            probs, seq != 0
        )
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)


def test_table_geometry_against_tables_whose_answer_is_known():
    orthonormal = torch.cat([torch.zeros(1, 6), torch.eye(6)[:4] * 3.0])  # row 0: padding, left out
    geometry = table_geometry(orthonormal)
    assert geometry["mean_cosine"] == pytest.approx(0.0, abs=1e-12)
    assert geometry["effective_rank"] == pytest.approx(4.0)  # four equal singular values
    parallel = torch.cat(
        [torch.zeros(1, 3), torch.tensor([[1.0, 2.0, 2.0]]).repeat(5, 1) * torch.arange(1, 6)[:, None]]
    )
    geometry = table_geometry(parallel)
    assert geometry["mean_cosine"] == pytest.approx(1.0) and geometry["effective_rank"] == pytest.approx(1.0)
    assert geometry["centred_effective_rank"] == 0.0  # nothing left once the common direction is removed
    # Two directions at 60 degrees: pairs (a, a) 1, (a, b) 0.5; 2 a's and 2 b's: (2 + 4 * 0.5) / 6 pairs.
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 3**0.5 / 2])
    geometry = table_geometry(torch.stack([torch.zeros(2), a, a, b, b]))
    assert geometry["mean_cosine"] == pytest.approx(4 / 6)


def test_centring_scores_the_cosine_of_both_sides_less_the_tables_mean(sasrec_checkpoint, llm_cache):
    model, _ = laser_with(sasrec_checkpoint, llm_cache, laser_center=True)
    generator = torch.Generator().manual_seed(2)
    table = torch.randn(model.n_items, model.llm_size, generator=generator) + 5.0  # a large common direction
    table[0] = 0
    model.item_vectors = table
    user = torch.randn(3, model.llm_size, generator=generator) + 5.0
    mean = table[1:].mean(0)
    expected = F.cosine_similarity((user - mean)[:, None], (table - mean)[None], dim=-1) / model.temperature
    torch.testing.assert_close(model.score_items(user), expected, atol=1e-4, rtol=1e-4)
    model.center = False  # the paper's score: the common direction makes every cosine large
    plain = model.score_items(user)
    assert (
        float(plain[:, 1:].mean()) * model.temperature > 0.9 > float(expected[:, 1:].abs().mean()) * model.temperature
    )
    with pytest.raises(ValueError, match="'laser_center' is True or False"):
        laser_with(sasrec_checkpoint, llm_cache, laser_center="yes")


def test_a_laser_run_starts_from_an_earlier_laser_runs_prefix_and_suffix(sasrec_checkpoint, llm_cache, monkeypatch):
    # Issue 43 ask 5: the warm start applies to Laser (its M-Former and suffix); every-position training does not
    # (docs/design.md says why).
    import recbole_ilora.pipeline as pipeline

    settings = {**TINY, "model": "Laser", **SMALL, "epochs": 1, "test_modes": ["full"],
                "sasrec_checkpoint": sasrec_checkpoint, "llm_cache_dir": llm_cache}  # fmt: skip
    first = objective_function(config_dict=settings)["saved_model_file"]
    trained = torch.load(first, weights_only=True)["state_dict"]
    started = {}
    original = pipeline.warm_start

    def warm_start_then_stop(model, checkpoint, path):
        loaded, fresh = original(model, checkpoint, path)
        started.update(state={k: v.clone() for k, v in model.state_dict().items()}, loaded=loaded, fresh=fresh)
        raise KeyboardInterrupt  # the wiring is what is tested

    monkeypatch.setattr(pipeline, "warm_start", warm_start_then_stop)
    with pytest.raises(KeyboardInterrupt):
        objective_function(config_dict={**settings, "llm_init_checkpoint": first})
    assert started["fresh"] == [] and set(started["loaded"]) == set(trained)
    assert all(name.startswith(("mformer.", "suffix")) for name in started["loaded"])
    for name, value in trained.items():
        assert torch.equal(started["state"][name], value), name
