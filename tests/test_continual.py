"""PESO's pieces (recbole_ilora/continual.py): time blocks of equal size in time order, each block's split, and the
proximal terms toward the previous adapter (PESO's softmax-KL and L2) inside an LLM model's loss."""

import numpy as np
import pytest
import torch
from conftest import TINY
from recbole.data import create_dataset

from recbole_ilora.config import Config
from recbole_ilora.continual import AdapterAnchor, apply_time_block, time_block_ids
from recbole_ilora.data import prepare_data
from recbole_ilora.model import iLoRA

# user: number of events; user u's k-th event is item "<u><k>" at time 4 * k + offset (the users interleave)
LENGTHS = {"a": 15, "b": 10, "c": 4, "d": 12}


def test_time_blocks_hold_every_interaction_once_in_time_order_and_equal_sizes():
    rng = np.random.default_rng(0)
    times = rng.integers(0, 50, size=103)  # many ties
    blocks = time_block_ids(times, 5)
    counts = np.bincount(blocks)
    assert len(counts) == 5 and counts.sum() == 103 and set(counts.tolist()) <= {20, 21}  # each once, equal sizes
    for b in range(4):
        assert times[blocks == b].max() <= times[blocks == b + 1].min()  # time order across blocks
    with pytest.raises(ValueError, match="continual_blocks"):
        time_block_ids(times, 0)


@pytest.fixture(scope="module")
def block_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "blk").mkdir()
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for offset, (user, length) in enumerate(LENGTHS.items()):
        lines += [f"{user}\t{user}{k}\t{4 * k + offset}" for k in range(length)]
    (root / "blk" / "blk.inter").write_text("\n".join(lines) + "\n")
    return str(root)


def block_config(data_path):
    return Config(model="SASRec", config_dict={
        **TINY, "dataset": "blk", "data_path": data_path, "model": "SASRec", "continual_blocks": 3,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "MAX_ITEM_LIST_LENGTH": 50,
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
    })  # fmt: skip


def targets_by_user(loader):
    dataset = loader._dataset
    out = {}
    for index in range(len(dataset)):
        row = dataset.inter_feat[index]
        user = str(dataset.id2token("user_id", int(row["user_id"])))
        history = [str(dataset.id2token("item_id", int(i))) for i in row["item_id_list"][: int(row["item_length"])]]
        out.setdefault(user, []).append((str(dataset.id2token("item_id", int(row["item_id"]))), history))
    return out


@pytest.mark.parametrize("cumulative", [False, True])
def test_each_block_trains_on_its_events_but_the_last_two_with_the_whole_past_as_history(block_data, cumulative):
    config = block_config(block_data)
    raw = create_dataset(config)
    times = raw.inter_feat["timestamp"].to_numpy()
    items = [str(raw.id2token("item_id", i)) for i in raw.inter_feat["item_id"].to_numpy()]
    block_of = dict(zip(items, time_block_ids(times, 3).tolist(), strict=True))
    for block in range(3):
        dataset = apply_time_block(config, create_dataset(config), block, cumulative)
        train, valid, test = (targets_by_user(loader) for loader in prepare_data(config, dataset))
        assert dataset.block_stats["users"] == len(test)
        for user, length in LENGTHS.items():
            order = [f"{user}{k}" for k in range(1, length)]  # the events that can be targets, in time order
            mine = [item for item in order if block_of[item] == block]
            if len(mine) < 3:
                assert user not in test and user not in valid
                continue
            ((valid_item, valid_history),) = valid[user]
            ((test_item, test_history),) = test[user]
            assert (valid_item, test_item) == (mine[-2], mine[-1])
            assert test_history == [f"{user}{k}" for k in range(int(test_item[1:]))]  # every earlier event
            trained = [item for item, _ in train.get(user, [])]
            earlier = [item for item in order if block_of[item] < block] if cumulative else []
            assert sorted(trained) == sorted(earlier + mine[:-2])
            assert valid_item not in trained and test_item not in trained
            for item, history in train.get(user, []):
                assert history == [f"{user}{k}" for k in range(int(item[1:]))]  # earlier blocks included


def test_softmax_kl_is_zero_at_the_snapshot_positive_away_and_its_gradient_is_the_closed_form():
    torch.manual_seed(0)
    a, b = torch.randn(4, 6, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    anchor = AdapterAnchor({"m": (a, b)})  # a snapshot: later changes of a and b do not move it
    assert float(anchor.softmax_kl({"m": (a, b)})) == pytest.approx(0.0, abs=1e-7)
    assert float(anchor.l2({"m": (a, b)})) == 0.0
    a2 = (a.detach() + 0.3 * torch.randn(4, 6)).requires_grad_()
    kl = anchor.softmax_kl({"m": (a2, b)})
    assert float(kl) > 0
    kl.backward()
    p, q = torch.softmax(a2.detach().flatten(), 0), torch.softmax(a.detach().flatten(), 0)
    value = float((p * (p.log() - q.log())).sum())
    assert float(kl) == pytest.approx(value, rel=1e-5)
    closed_form = p * (p.log() - q.log() - value)  # d/da KL(softmax(a) || q)
    assert torch.allclose(a2.grad.flatten(), closed_form, atol=1e-6)
    two = AdapterAnchor({"m": (a, b), "n": (b, a)})
    # the mean over modules: m moved (KL of A only), n at its snapshot
    assert float(two.softmax_kl({"m": (a2, b), "n": (b, a)})) == pytest.approx(value / 2, rel=1e-5)


@pytest.fixture()
def ilora(sasrec_checkpoint, llm_cache):
    def build(**overrides):
        config = Config(model="iLoRA", config_dict={**TINY, "sasrec_checkpoint": sasrec_checkpoint,
                                                    "llm_cache_dir": llm_cache, **overrides})  # fmt: skip
        train, _, _ = prepare_data(config, create_dataset(config))
        torch.manual_seed(0)
        return iLoRA(config, train._dataset), next(iter(train))

    return build


def test_the_penalty_joins_the_loss_and_weight_zero_is_plain_fine_tuning(ilora):
    plain, batch = ilora()
    model, _ = ilora(continual_penalty="softmax_kl", continual_penalty_weight=0.0)
    weighted, _ = ilora(continual_penalty="softmax_kl", continual_penalty_weight=2.0)
    for m in (model, weighted):
        m.load_state_dict(plain.state_dict())
        m.anchor_adapter()
    with torch.no_grad():  # move every adapter away from the snapshot the same way
        for m in (plain, model, weighted):
            torch.manual_seed(1)
            for a, b in m.llm.adapter_pairs().values():
                a.add_(0.05 * torch.randn_like(a))
                b.add_(0.05 * torch.randn_like(b))
    losses = {}
    for name, m in (("plain", plain), ("zero", model), ("weighted", weighted)):
        m.train()
        torch.manual_seed(2)
        loss = m.calculate_loss(batch)
        loss.backward()
        losses[name] = (float(loss), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert losses["zero"][0] == losses["plain"][0]  # lambda = 0: exactly plain fine-tuning
    assert all(torch.equal(losses["zero"][1][n], g) for n, g in losses["plain"][1].items())
    expected = 2.0 * float(weighted.anchor.softmax_kl(weighted.llm.adapter_pairs()))
    assert losses["weighted"][0] == pytest.approx(losses["plain"][0] + expected, rel=1e-6) and expected > 0
    gate = [n for n in losses["plain"][1] if n.startswith("gate_network")]
    assert gate and all(torch.equal(losses["weighted"][1][n], losses["plain"][1][n]) for n in gate)  # not anchored


def test_each_batch_records_the_terms_value_and_its_share_of_the_adapters_gradient(ilora):
    plain, batch = ilora(score_head="plain")  # the residual head starts at zero: no task gradient reaches the adapter
    weighted, _ = ilora(score_head="plain", continual_penalty="softmax_kl", continual_penalty_weight=2.0)
    weighted.load_state_dict(plain.state_dict())
    weighted.anchor_adapter()
    with torch.no_grad():
        for m in (plain, weighted):
            torch.manual_seed(1)
            for a, b in m.llm.adapter_pairs().values():
                a.add_(0.05 * torch.randn_like(a))
                b.add_(0.05 * torch.randn_like(b))
    grads = {}
    for name, m in (("plain", plain), ("weighted", weighted)):
        m.train()
        torch.manual_seed(2)
        m.calculate_loss(batch).backward()
        m.record_proximal_step()
        grads[name] = [g.grad.clone() for pair in m.llm.adapter_pairs().values() for g in pair]
    assert plain.training_summary() == {}  # no term: nothing recorded
    summary = weighted.training_summary()["proximal"]
    assert summary["batches"] == 1
    pairs = weighted.llm.adapter_pairs()  # the logged value is the float64 one (checked against numpy below)
    assert summary["term"] == pytest.approx(2.0 * float(weighted.anchor.softmax_kl(pairs, torch.float64)), rel=1e-9)
    norm = lambda tensors: float(sum(t.double().pow(2).sum() for t in tensors)) ** 0.5  # noqa: E731
    assert summary["task_grad_norm"] == pytest.approx(norm(grads["plain"]), rel=1e-4)  # the loss without the term
    difference = [w - p for w, p in zip(grads["weighted"], grads["plain"], strict=True)]  # the term's own gradient
    assert summary["penalty_grad_norm"] == pytest.approx(norm(difference), rel=1e-3) and summary["term"] > 0
    assert summary["grad_norm_ratio"] == pytest.approx(summary["penalty_grad_norm"] / summary["task_grad_norm"])


def test_a_bad_penalty_is_refused_naming_the_key(ilora):
    with pytest.raises(ValueError, match="'continual_penalty'"):
        ilora(continual_penalty="ewc")


@pytest.mark.parametrize(
    "overrides, message",
    [({"model": "SASRec"}, "not 'SASRec'"), ({"continual_strategy": "ewc"}, "'continual_strategy'"),
     ({"continual_blocks": 1}, "'continual_blocks'")],
)  # fmt: skip
def test_a_continual_run_refuses_what_it_cannot_do_before_any_work(continual_settings, overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        run_blocks(continual_settings, **overrides)
    assert not (tmp_path / "saved").exists() or not any((tmp_path / "saved").iterdir())  # nothing written


CONTINUAL = {"continual": True, "continual_blocks": 3, "epochs": 1, "test_modes": ["full"]}


def run_blocks(session_settings, **overrides):
    from recbole_ilora.quick_start import run_recbole_ilora

    return run_recbole_ilora(config_dict={**session_settings, **CONTINUAL, **overrides})


@pytest.fixture()
def continual_settings(llm_cache, tmp_path):
    return {**TINY, "model": "iLoRA", "llm_cache_dir": llm_cache, "checkpoint_dir": str(tmp_path / "saved")}


def test_each_block_starts_from_the_previous_blocks_weights_with_its_own_encoder(continual_settings, monkeypatch):
    from recbole_ilora.model.abstract_llm_recommender import LLMSequentialRecommender

    loaded, original = [], LLMSequentialRecommender.load_state_dict

    def spy(self, state_dict, strict=True, assign=False):
        loaded.append({name: value.clone() for name, value in state_dict.items()})
        return original(self, state_dict, strict, assign)

    monkeypatch.setattr(LLMSequentialRecommender, "load_state_dict", spy)
    progress = run_blocks(continual_settings, continual_strategy="softmax_kl")
    blocks = progress["blocks"]
    assert [b["block"] for b in blocks] == [0, 1, 2] and set(progress["mean_over_later_blocks"]) == {"full"}
    assert [b["penalty"] for b in blocks] == ["none", "softmax_kl", "softmax_kl"]
    assert blocks[0]["proximal"] is None  # every batch of the later blocks records the term's share
    assert [b["proximal"]["batches"] for b in blocks[1:]] == [
        -(-b["trained_sequences"] // continual_settings["train_batch_size"]) for b in blocks[1:]]  # fmt: skip
    assert [b["learning_rate"] for b in blocks] == pytest.approx([0.005, 0.0005, 0.0005])
    assert len({b["encoder"] for b in blocks}) == 3  # one encoder per block
    for block in (1, 2):  # the first state loaded in each later block is the previous block's best weights
        previous = torch.load(blocks[block - 1]["weights"], weights_only=True)
        starts = [state for state in loaded if set(state) == set(previous)]
        assert any(all(torch.equal(state[n], previous[n]) for n in previous) for state in starts)
    mean = progress["mean_over_later_blocks"]["full"]["ndcg@10"]
    assert mean == pytest.approx((blocks[1]["test"]["full"]["ndcg@10"] + blocks[2]["test"]["full"]["ndcg@10"]) / 2)


def test_a_killed_run_resumes_at_its_block_and_ends_as_an_uninterrupted_one(continual_settings, monkeypatch):
    import recbole_ilora.continual_runner as runner

    whole = run_blocks(continual_settings, continual_strategy="finetune")
    original, calls = runner.train_and_evaluate, []

    def killed_in_block_2(config, **kwargs):
        calls.append(config["continual_block"])
        if config["continual_block"] == 2:
            raise KeyboardInterrupt  # the run dies in its last block
        return original(config, **kwargs)

    monkeypatch.setattr(runner, "train_and_evaluate", killed_in_block_2)
    with pytest.raises(KeyboardInterrupt):
        run_blocks(continual_settings, continual_strategy="finetune")
    pattern = continual_settings["checkpoint_dir"] + "/*.continual.json"
    (progress_file,) = [p for p in __import__("glob").glob(pattern) if p != whole["progress_file"]]
    monkeypatch.setattr(runner, "train_and_evaluate", original)
    resumed = run_blocks(continual_settings, continual_strategy="finetune", resume_checkpoint=progress_file)
    assert calls == [0, 1, 2] and [b["block"] for b in resumed["blocks"]] == [0, 1, 2]
    assert [b["test"] for b in resumed["blocks"]] == [b["test"] for b in whole["blocks"]]  # the same final metrics
    with pytest.raises(ValueError, match="strategy 'finetune'"):
        run_blocks(continual_settings, continual_strategy="l2", resume_checkpoint=progress_file)


def test_runs_started_in_the_same_second_keep_their_own_progress_and_block_weights(continual_settings, monkeypatch):
    import recbole_ilora.continual_runner as runner

    # Another run of the same model started this second in the same checkpoint_dir (a grid's second process):
    # its progress file and its block weights, named after that file, must stay its own.
    monkeypatch.setattr(runner, "get_local_time", lambda: "Dec-06-2026_04-47-22")
    saved = continual_settings["checkpoint_dir"]
    __import__("os").makedirs(saved)
    other = f"{saved}/iLoRA-continual-Dec-06-2026_04-47-22.continual.json"
    other_weights = f"{saved}/iLoRA-continual-Dec-06-2026_04-47-22.block0.pth"
    with open(other, "w") as file:
        file.write('{"strategy": "softmax_kl", "blocks": []}')
    torch.save({"marker": torch.ones(1)}, other_weights)
    progress = run_blocks(continual_settings, continual_strategy="finetune")
    assert progress["progress_file"] != other
    assert open(other).read() == '{"strategy": "softmax_kl", "blocks": []}'
    assert set(torch.load(other_weights, weights_only=True)) == {"marker"}  # not overwritten by this run's block 0
    own_stem = progress["progress_file"][: -len(".continual.json")]
    assert all(b["weights"].startswith(own_stem) for b in progress["blocks"])
    assert len({b["weights"] for b in progress["blocks"]} | {other_weights}) == 4


def test_the_l2_weight_is_chosen_on_block_1s_validation_and_kept(continual_settings):
    progress = run_blocks(continual_settings, continual_strategy="l2", continual_l2_weights=[0.1, 10.0])
    scores = progress["l2_selection"]
    assert set(scores) == {"0.1", "10.0"}
    assert progress["l2_weight"] == float(max(scores, key=scores.get))  # valid NDCG@10: bigger is better
    blocks = progress["blocks"]
    assert [b["penalty_weight"] for b in blocks] == [None, progress["l2_weight"], progress["l2_weight"]]
    assert blocks[1]["valid"]["ndcg@10"] == pytest.approx(scores[str(progress["l2_weight"])])


def test_the_logged_term_is_computed_in_float64_where_float32_rounding_swamps_it():
    # PESO's term after one small step: differences near 1e-7 over a large matrix, the regime the grid's runs log
    generator = torch.Generator().manual_seed(0)
    a0 = torch.randn(64, 576, generator=generator)
    b0 = torch.randn(576, 64, generator=generator)
    a = a0 + 1e-4 * torch.randn(64, 576, generator=generator)
    anchor = AdapterAnchor({"m": (a0, b0)})
    # the same KL by hand in float64 (numpy): softmax over the flattened A, the snapshot's B unchanged
    x, y = a.double().flatten().numpy(), a0.double().flatten().numpy()
    log_p = x - x.max() - np.log(np.exp(x - x.max()).sum())
    log_q = y - y.max() - np.log(np.exp(y - y.max()).sum())
    exact = float((np.exp(log_p) * (log_p - log_q)).sum())
    assert 0 < exact < 1e-6
    in64 = float(anchor.penalty("softmax_kl", {"m": (a, b0)}, dtype=torch.float64))
    in32 = float(anchor.penalty("softmax_kl", {"m": (a, b0)}))
    assert in64 == pytest.approx(exact, rel=1e-6)
    assert abs(in32 - exact) > 100 * abs(in64 - exact)  # float32's rounding error is of the order of the term


def test_cofirec_keeps_block_0s_item_ids_in_every_later_block(continual_settings, monkeypatch):
    """PESO's own setting (issue 45): the semantic IDs are built once, on block 0's training data, and every later
    block reads them from the previous block's weights (an item first seen later has the ID block 0 gave it: its
    text levels from its title, its CF level from block 0's encoder, where its embedding had not been trained)."""
    from recbole_ilora.model import CoFiRec

    built, original = [], CoFiRec.build_item_codes

    def spy(self):
        built.append(True)
        return original(self)

    monkeypatch.setattr(CoFiRec, "build_item_codes", spy)
    cofirec = {"model": "CoFiRec", "cofirec_levels": ["{title}", "cf"], "cofirec_codebook_sizes": [16, 256],
               "cofirec_tokenizer_steps": 20, "cofirec_beam_size": 50, "lora_rank": 4}  # fmt: skip
    progress = run_blocks({**continual_settings, **cofirec}, continual_strategy="softmax_kl")
    blocks = progress["blocks"]
    assert [b["penalty"] for b in blocks] == ["none", "softmax_kl", "softmax_kl"]
    assert len(built) == 1  # block 0 only
    codes = [torch.load(b["weights"], weights_only=True)["item_codes"] for b in blocks]
    assert bool((codes[0][1:] >= 0).all())
    assert all(torch.equal(c, codes[0]) for c in codes[1:])
