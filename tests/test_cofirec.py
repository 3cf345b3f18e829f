"""CoFiRec: the items' IDs (unique, mapped back, deterministic), the prefix tree's constraint, the beam against an
exhaustive search, training targets at every position, checkpoints that bring the IDs, and learning on the cycle."""

import pytest
import torch
from conftest import TINY
from recbole.data import create_dataset, data_preparation
from test_learning import cycle_data, hit_at_1_from_scores, settings  # noqa: F401 (cycle_data is a fixture)

from recbole_ilora.config import Config
from recbole_ilora.model import CoFiRec
from recbole_ilora.model.cofirec_tokenizer import CodeTrie, build_codes, separate_collisions
from recbole_ilora.quick_start import objective_function
from recbole_ilora.saved_run import load_data_and_model

CYCLE = {"cofirec_levels": ["{title}", "cf"], "cofirec_codebook_sizes": [4, 16], "cofirec_tokenizer_steps": 100,
         "cofirec_beam_size": 16, "lora_rank": 4, "test_modes": ["full", "uni19"]}  # fmt: skip


def test_colliding_items_keep_their_prefix_and_take_the_nearest_free_last_code():
    # Items 0 and 1 share (0, 1); item 1 is nearer code 1, so it keeps it; item 0 takes its nearest code among those
    # no item under prefix 0 holds (1 and 2 are held): codes 0 and 3, and 3 is nearer for item 0.
    codes = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 1]])
    distances = torch.tensor([[0.9, 0.5, 0.1, 0.3], [0.9, 0.1, 0.2, 0.8], [0.5, 0.5, 0.0, 0.5], [0.5, 0.0, 0.5, 0.5]])
    assert separate_collisions(codes, distances, "k").tolist() == [[0, 3], [0, 1], [0, 2], [1, 1]]
    full = torch.tensor([[0, 0], [0, 0], [0, 1]])  # three items under prefix 0, two last codes
    with pytest.raises(ValueError, match="'k': 3 items have the ID prefix \\[0\\], more than the last codebook's 2"):
        separate_collisions(full, torch.zeros(3, 2), "k")


def test_every_item_gets_a_unique_id_for_a_seed_and_the_tree_maps_it_back():
    generator = torch.Generator().manual_seed(0)
    levels = [torch.randn(200, 12, generator=generator), torch.randn(200, 6, generator=generator)]
    levels[0][5:8] = levels[0][4]  # items 4..7 identical on both levels: one ID before the fix
    levels[1][5:8] = levels[1][4]
    codes, report = build_codes(levels, [8, 64], fused=False, seed=1, steps=40)
    assert len({tuple(row) for row in codes.tolist()}) == 200  # unique after the fix
    assert len({tuple(row[:1]) for row in codes[4:8].tolist()}) == 1  # the twins still share their prefix
    assert report["collision_rate_before"] >= 4 / 200 and report["collision_rate_after"] == 0
    assert 0 <= int(codes[:, 0].max()) < 8 and 0 <= int(codes[:, 1].max()) < 64
    again, _ = build_codes(levels, [8, 64], fused=False, seed=1, steps=40)
    assert torch.equal(codes, again)  # deterministic for a seed
    fused, _ = build_codes(levels, [8, 64], fused=True, seed=1, steps=40)
    assert len({tuple(row) for row in fused.tolist()}) == 200

    tokens = torch.cat([torch.full((1, 2), -1), codes + torch.tensor([0, 8])])  # item 0: the padding item
    trie = CodeTrie(tokens, 72)
    for item in range(1, 201):
        node = 0
        for level in range(2):
            assert int(trie.node_of[item, level]) == node
            node = int(trie.child[node, tokens[item, level]])
        assert node == item  # the ID leads back to its item


def tiny_model(sasrec_checkpoint, llm_cache, **overrides):
    config = Config(
        model="CoFiRec",
        config_dict={**TINY, "cofirec_levels": ["{title}", "cf"], "cofirec_codebook_sizes": [16, 256],
                     "cofirec_tokenizer_steps": 20, "cofirec_beam_size": 2000, "lora_rank": 4,
                     "sasrec_checkpoint": sasrec_checkpoint, "llm_cache_dir": llm_cache, **overrides},
    )  # fmt: skip
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    torch.manual_seed(0)
    model = CoFiRec(config, train_data._dataset)
    with torch.no_grad():  # a random adapter too (LoRA B starts at zero)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    return model.eval(), test_data


def first_batch(test_data, rows=3):
    interaction = next(iter(test_data))[0]
    return interaction[:rows]


def test_decoding_emits_only_valid_ids_where_unconstrained_decoding_would_not(sasrec_checkpoint, llm_cache):
    model, test_data = tiny_model(sasrec_checkpoint, llm_cache, cofirec_beam_size=10)
    interaction = first_batch(test_data)
    seq, length = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
    items, scores = model(seq, length)
    assert bool((items >= 1).all()) and bool(torch.isfinite(scores).all())  # every beam ends at an item
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())  # best first
    with torch.no_grad():
        hidden = model.encode_prompt(seq, length)[0]
        raw = hidden @ model.code_embedding.weight.t()  # [B, C]: every code, unconstrained
    first_level = set(model.item_codes[1:, 0].tolist())
    assert any(int(code) not in first_level for code in raw.argmax(1))  # unconstrained: a code no ID starts with


def test_a_wide_beam_finds_the_exhaustive_ranking_and_full_sort_scores_equal_the_likelihood(
    sasrec_checkpoint, llm_cache
):
    # Three levels (the beam's caches are reordered between levels); beam 2000 > 1461 items: the search is exhaustive.
    three = {"cofirec_levels": ["{title}", "cf", "cf"], "cofirec_codebook_sizes": [8, 16, 128]}
    model, test_data = tiny_model(sasrec_checkpoint, llm_cache, **three)
    interaction = first_batch(test_data, rows=2)
    seq, length = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
    with torch.no_grad():
        full = model.full_sort_predict(interaction)  # [2, n_items]
        every = torch.arange(1, model.n_items).unsqueeze(0).expand(2, -1)
        exhaustive = model.candidate_log_likelihood(seq, length, every)  # each item scored alone
    torch.testing.assert_close(full[:, 1:], exhaustive, atol=2e-4, rtol=1e-4)
    assert torch.logsumexp(exhaustive, 1).tolist() == pytest.approx([0.0, 0.0], abs=1e-4)  # a distribution over items

    narrow = tiny_model(sasrec_checkpoint, llm_cache, cofirec_beam_size=20, **three)[0]
    narrow.load_state_dict(model.state_dict())
    with torch.no_grad():
        scores = narrow.full_sort_predict(interaction)
    reached = scores > -1e29
    assert int(reached[:, 1:].sum(1).min()) == 20
    torch.testing.assert_close(scores[reached], full[reached], atol=2e-4, rtol=1e-4)  # reached: their likelihood
    best = full[:, 1:].topk(5, dim=1).indices + 1
    assert bool(reached.gather(1, best).all())  # the likeliest items are reached


def test_training_reads_every_target_where_the_test_reads_it(sasrec_checkpoint, llm_cache):
    # The loss's per-target terms (one forward over history and label) equal each target's likelihood computed
    # alone after the history before it (its own prompt): no target sees its future, each counts once.
    model, test_data = tiny_model(sasrec_checkpoint, llm_cache)
    interaction = first_batch(test_data, rows=3)
    seq, length, label = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN], interaction[model.POS_ITEM_ID]
    expected = []
    with torch.no_grad():
        for row in range(3):
            items = seq[row, : length[row]].tolist() + [int(label[row])]
            for j in range(1, len(items)):
                history = torch.tensor([items[:j] + [0] * (seq.shape[1] - j)])
                expected.append(float(model.candidate_log_likelihood(history, torch.tensor([j]),
                                                                     torch.tensor([[items[j]]]))))  # fmt: skip
        loss = model.calculate_loss(interaction)
    assert float(loss) == pytest.approx(-sum(expected) / len(expected), abs=1e-4)
    assert len(expected) == int(length.sum())  # the label and every history item after the first


def test_a_saved_run_brings_its_ids_and_does_not_rebuild_them(sasrec_checkpoint, llm_cache, monkeypatch):
    config = {**TINY, "model": "CoFiRec", "cofirec_levels": ["{title}", "cf"], "cofirec_codebook_sizes": [16, 256],
              "cofirec_tokenizer_steps": 20, "cofirec_beam_size": 20, "lora_rank": 4, "epochs": 1,
              "sasrec_checkpoint": sasrec_checkpoint, "llm_cache_dir": llm_cache, "test_modes": ["full"]}  # fmt: skip
    result = objective_function(config_dict=config)
    assert result["model_summary"]["tokenizer"]["collision_rate_after"] == 0
    saved = torch.load(result["saved_model_file"], weights_only=True)["state_dict"]
    assert "item_codes" in saved and "code_embedding.weight" in saved
    assert not any(name.startswith("llm.") and "lora" not in name for name in saved)  # no frozen backbone weights

    def no_rebuild(self):
        raise AssertionError("the IDs were rebuilt instead of loaded")

    monkeypatch.setattr(CoFiRec, "build_item_codes", no_rebuild)
    _, model, _, _, _, test_data = load_data_and_model(result["saved_model_file"])
    assert torch.equal(model.item_codes.cpu(), saved["item_codes"])
    interaction = first_batch(test_data, rows=2)
    with torch.no_grad():
        assert bool(torch.isfinite(model(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN])[1]).all())


def test_building_the_ids_leaves_the_global_random_stream_alone(sasrec_checkpoint, llm_cache):
    model, _ = tiny_model(sasrec_checkpoint, llm_cache)
    state = torch.get_rng_state()
    model.ensure_codes()
    assert torch.equal(torch.get_rng_state(), state)  # a resumed run (IDs loaded) draws what the first run drew


def test_the_reversed_order_writes_the_same_codes_backwards(sasrec_checkpoint, llm_cache):
    forward, _ = tiny_model(sasrec_checkpoint, llm_cache)
    backward, _ = tiny_model(sasrec_checkpoint, llm_cache, cofirec_level_order="fine_to_coarse")
    forward.ensure_codes()
    backward.ensure_codes()
    local = forward.item_codes[1:] - torch.tensor(forward.offsets)  # codes within each level's codebook
    assert torch.equal(backward.item_codes[1:] - torch.tensor(backward.offsets), local.flip(1))
    assert backward.offsets == [0, 256]  # the CF level's 256 codes come first


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"cofirec_levels": ["{title}", "{genre}"]}, "'cofirec_levels' reads the item fields \\['genre'\\]"),
        ({"cofirec_codebook_sizes": [16]}, "'cofirec_codebook_sizes' must give one size per level"),
        ({"cofirec_levels": ["title", "cf"]}, "neither 'cf' nor a template"),
        ({"cofirec_beam_size": 5}, "cofirec_beam_size"),
        ({"objective": "generative"}, "CoFiRec generates its items' IDs"),
        ({"cofirec_tokenizer": "joint"}, "cofirec_tokenizer"),
        ({"cofirec_code_init": "titles"}, "cofirec_code_init"),
    ],
)
def test_bad_keys_stop_before_any_data_is_prepared(overrides, message):
    config = {**TINY, "model": "CoFiRec", "cofirec_levels": ["{title}", "cf"], "cofirec_codebook_sizes": [16, 256],
              **overrides}  # fmt: skip
    with pytest.raises(ValueError, match=message):
        objective_function(config_dict=config)


def test_trained_cofirec_decodes_the_next_item_and_recbole_agrees_with_its_scores(cycle_data):  # noqa: F811
    result = objective_function(config_dict=settings(cycle_data, "CoFiRec", epochs=100, **CYCLE))
    recbole_hit = result["test_result"]["hit@1"]
    _, model, _, _, _, test_data = load_data_and_model(result["saved_model_file"])
    assert hit_at_1_from_scores(model, test_data) == pytest.approx(recbole_hit, abs=5e-5)
    # A random pick among the 18 items outside a user's 12-item history is right 1 time in 18 (0.056).
    assert recbole_hit >= 0.7, result["test_result"]
    untrained = objective_function(config_dict=settings(cycle_data, "CoFiRec", epochs=1, learning_rate=1e-9, **CYCLE))
    assert untrained["test_result"]["hit@1"] <= 0.2


def test_text_init_starts_each_code_from_its_items_texts_and_random_init_leaves_the_rows(sasrec_checkpoint, llm_cache):
    model, _ = tiny_model(sasrec_checkpoint, llm_cache, cofirec_code_init="text")
    start = model.code_embedding.weight.detach().clone()
    model.ensure_codes()
    rows = model.code_embedding.weight.detach()
    table = model.llm.input_embeddings().weight.detach().float()
    # by hand, one code at a time: the mean over its items of their title tokens' mean embedding; then, per level,
    # the codes' deviations from their level's mean, scaled to the backbone rows' spread, plus the rows' mean
    vectors = {}
    for item in range(1, model.n_items):
        tokens = model.tokenizer(model.init_texts[item], add_special_tokens=False)["input_ids"]
        vectors[item] = table[tokens].mean(0)
    codes = model.item_codes.tolist()
    for level in range(model.depth):
        used = sorted({codes[item][level] for item in range(1, model.n_items)})
        members = [[vectors[i] for i in range(1, model.n_items) if codes[i][level] == code] for code in used]
        means = torch.stack([torch.stack(vectors_of_code).mean(0) for vectors_of_code in members])
        deviation = means - means.mean(0)
        expected = table.mean(0) + deviation * table.std(0).norm() / deviation.std(0).norm()
        assert torch.allclose(rows[used], expected, atol=1e-4), level
        level_codes = range(model.offsets[level], model.offsets[level] + model.codebook_sizes[level])
        unused = sorted(set(level_codes) - set(used))
        assert torch.equal(rows[unused], start[unused])  # codes no item holds keep their random rows
    assert model.tokenizer_report["code_init"] == "text"
    # the default: the random rows as they were drawn
    plain, _ = tiny_model(sasrec_checkpoint, llm_cache)
    before = plain.code_embedding.weight.detach().clone()
    plain.ensure_codes()
    assert torch.equal(plain.code_embedding.weight, before) and "code_init" not in plain.tokenizer_report
