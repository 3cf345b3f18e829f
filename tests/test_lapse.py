"""The lapse protocol (``lapse: L``, CaseQ's temporal-shift split) on a fixture whose events are named by their
position: which event lands in which split, for sequential and general models, and the two tests it reports."""

import pytest
from conftest import TINY
from recbole.data import create_dataset

from recbole_ilora.config import Config
from recbole_ilora.data import prepare_data, protocol_test_data
from recbole_ilora.quick_start import objective_function

LAPSE = 3
LENGTHS = {"a": 12, "b": 6, "c": 5, "d": 9}  # b has exactly 3 + L events; c is too short for the split


@pytest.fixture(scope="module")
def positions_data(tmp_path_factory):
    """User x's k-th event (time order) is item ``x<k>``; timestamps interleave the users."""
    root = tmp_path_factory.mktemp("data")
    (root / "pos").mkdir()
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for offset, (user, length) in enumerate(LENGTHS.items()):
        lines += [f"{user}\t{user}{k}\t{10 * k + offset}" for k in range(length)]
    (root / "pos" / "pos.inter").write_text("\n".join(lines) + "\n")
    return str(root)


def settings(data_path, model="SASRec", **overrides):
    return {
        **TINY,
        "dataset": "pos",
        "data_path": data_path,
        "model": model,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": 20,
        "user_inter_num_interval": "[0,inf)",
        "item_inter_num_interval": "[0,inf)",
        "lapse": LAPSE,
        **overrides,
    }


def config(data_path, model="SASRec", **overrides):
    return Config(model=model, config_dict=settings(data_path, model, **overrides))


def rows(loader):
    """(user, target, history) tokens of every row of a loader."""
    dataset = loader._dataset
    out = []
    for index in range(len(dataset)):
        row = dataset.inter_feat[index]
        user = dataset.id2token("user_id", row["user_id"]).item()
        target = dataset.id2token("item_id", row["item_id"]).item()
        history = []
        if "item_id_list" in dataset.inter_feat:
            length = int(row["item_length"])
            history = [str(dataset.id2token("item_id", int(i))) for i in row["item_id_list"][:length]]
        out.append((user, target, history))
    return out


def events(user, *positions):
    return [f"{user}{LENGTHS[user] + p if p < 0 else p}" for p in positions]


def test_each_event_lands_in_its_split_for_a_sequential_model(positions_data):
    cfg = config(positions_data)
    train, valid, test = prepare_data(cfg, create_dataset(cfg))
    no_lapse = protocol_test_data(cfg, "full", "no_lapse")
    for user in ("a", "b", "d"):
        n = LENGTHS[user]
        targets = sorted((t for u, t, _ in rows(train) if u == user), key=lambda t: int(t[1:]))
        assert targets == events(user, *range(1, n - (2 + LAPSE)))  # every event before the last 2 + L, but the first
        ((_, target, history),) = [r for r in rows(valid) if r[0] == user]
        assert target == events(user, -(2 + LAPSE))[0] and history == events(user, *range(n - (2 + LAPSE)))
        ((_, target, history),) = [r for r in rows(no_lapse) if r[0] == user]
        assert target == events(user, -(1 + LAPSE))[0] and history == events(user, *range(n - (1 + LAPSE)))
        ((_, target, history),) = [r for r in rows(test) if r[0] == user]
        assert target == events(user, -1)[0] and history == events(user, *range(n - 1))  # the full history
        # nothing of either test is a training target, and the lapse events are history only
        tests = set(events(user, -1, -(1 + LAPSE)))
        assert not tests & set(targets) and not set(events(user, *range(-LAPSE, -1))) & set(targets)
    # c (5 events < 3 + L) is trained on and not evaluated
    assert sorted(t for u, t, _ in rows(train) if u == "c") == events("c", 1, 2, 3, 4)
    assert all(u != "c" for loader in (valid, test, no_lapse) for u, *_ in rows(loader))
    assert len(rows(test)) == len(rows(no_lapse)) == len(rows(valid)) == 3


def test_a_general_model_splits_its_interactions_alike(positions_data):
    cfg = config(positions_data, model="Pop")
    train, valid, test = prepare_data(cfg, create_dataset(cfg))
    train_rows = rows(train)
    for user in ("a", "b", "d"):
        assert sorted((t for u, t, _ in train_rows if u == user), key=lambda t: int(t[1:])) == events(
            user, *range(LENGTHS[user] - (2 + LAPSE))
        )  # the first event too: an interaction, not a target after a history
    assert sorted(t for u, t, _ in train_rows if u == "c") == events("c", *range(5))


def test_a_run_reports_both_tests_and_the_relative_drop(positions_data):
    result = objective_function(config_dict=settings(positions_data, epochs=1, test_modes=["full", "uni19"]))
    tests = result["test_results"]
    assert set(tests) == {"full", "full_no_lapse", "uni19", "uni19_no_lapse"}
    assert tests["full"] == result["test_result"]  # RecBole's test is the test with lapse
    for mode in ("full", "uni19"):
        for metric, drop in result["lapse_drops"][mode].items():
            before, after = tests[f"{mode}_no_lapse"][metric], tests[mode][metric]
            assert drop == (pytest.approx((before - after) / before) if before else None)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lapse": -1}, "'lapse' must be a whole number"),
        ({"eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": "user", "mode": "full"}},
         "replaces RecBole's leave-one-out"),
        ({"lapse": 50}, "no user of 'pos' has the 53 events"),
    ],
)  # fmt: skip
def test_a_lapse_the_data_cannot_take_is_refused_with_the_key(positions_data, overrides, message):
    with pytest.raises(ValueError, match=message):
        objective_function(config_dict=settings(positions_data, epochs=1, **overrides))


def test_cold_targets_are_counted_on_the_runs_split(tmp_path):
    # Every item of the positions fixture is its user's own, so every target is cold, except user d's last event,
    # which here is a0: user a's first event, never a target but in the histories of a's training rows.
    import sys

    from conftest import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from lapse_cold_items import cold_shares

    (tmp_path / "pos").mkdir()
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for offset, (user, length) in enumerate(LENGTHS.items()):
        lines += [f"{user}\t{'a0' if (user, k) == ('d', length - 1) else f'{user}{k}'}\t{10 * k + offset}"
                  for k in range(length)]  # fmt: skip
    (tmp_path / "pos" / "pos.inter").write_text("\n".join(lines) + "\n")
    shares = cold_shares(config(str(tmp_path)))
    assert shares == {"users": 3, "valid": 1.0, "test_without_lapse": 1.0, "test_with_lapse": 2 / 3}  # a, b, d
