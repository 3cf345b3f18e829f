"""The paper's generative protocol: title matching, candidate lists, prompts with candidates, the answer-only loss,
likelihood scoring with a reused prompt cache, greedy generation with per-user gates, a tiny end-to-end run, and
tests that resume where a killed run left them."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, tiny_config
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from recbole_ilora.generative import evaluate_generation, named_candidates, summarize_verdicts, verdict
from recbole_ilora.journal import JsonLinesJournal
from recbole_ilora.model import iLoRA
from recbole_ilora.model.abstract_llm_recommender import LLMSequentialRecommender
from recbole_ilora.quick_start import objective_function
from recbole_ilora.saved_run import load_data_and_model

GENERATIVE = {
    "objective": "generative",
    "eval_args": {**TINY["eval_args"], "mode": "uni19"},
    "valid_metric": "NDCG@5",
    "prompt_domain": "music",
    "generation_max_new_tokens": 6,
}


@pytest.mark.parametrize(
    "output, expected",
    [
        ("Heat Wave", [1]),  # 'Heat' only inside the longer named title does not count
        ("heat   WAVE and heat", [0, 1]),  # both named (the second 'heat' stands alone): invalid
        ("  The Heatwave", []),  # 'heat' inside another word is no title
        ("Heat", [0]),
        ("nothing at all", []),
        ("Heat (1995)", [2]),  # 'Heat' lies inside the longer 'Heat (1995)': only the longer counts
        ("toy story\n", [3]),
    ],
)
def test_title_matching(output, expected):
    titles = ["Heat", "Heat Wave", "heat (1995)", "Toy Story"]
    assert named_candidates(output, titles) == expected


def test_verdicts_and_ratios():
    titles = ["Heat", "Heat Wave", "Toy Story"]
    assert verdict("toy story", titles, 2) == (True, True, [2])
    assert verdict("Heat Wave", titles, 0) == (True, False, [1])
    assert verdict("Heat or Toy Story", titles, 2)[:2] == (False, False)  # two titles named: invalid
    assert verdict("", titles, 2)[:2] == (False, False)
    summary = summarize_verdicts([(True, True), (True, False), (False, False), (False, False)])
    assert summary == {"users": 4, "valid_ratio": 0.5, "hr@1_valid": 0.5, "hr@1_all": 0.25}
    # no valid answer: HR@1 (valid) is 0 / 0, undefined, and must not count as a miss in a mean over seeds
    summary = summarize_verdicts([(False, False), (False, False)])
    assert summary == {"users": 2, "valid_ratio": 0.0, "hr@1_valid": None, "hr@1_all": 0.0}


@pytest.fixture
def generative(sasrec_checkpoint, llm_cache):
    config = tiny_config(sasrec_checkpoint=sasrec_checkpoint, llm_cache_dir=llm_cache, **GENERATIVE)
    init_seed(config["seed"], True)
    train_data, valid_data, test_data = data_preparation(config, create_dataset(config))
    torch.manual_seed(0)
    model = iLoRA(config, train_data._dataset)
    model.attach_splits(train_data, valid_data, test_data)
    for layer in model.llm.lora_layers.values():  # a trained-looking adapter: experts that differ
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    return config, model.eval(), train_data, test_data


def teacher_forced(model, seq, length, candidates, answers=None):
    """The prompt (with the answers appended, if given) and the causal LM's logits over it, under the gate."""
    prompt = model.answer_prompt(seq, length, candidates, answers)
    inputs_embeds, gate = model.adapter_inputs(seq, length, prompt)
    with model.adapter(gate):
        logits = model.llm.causal_lm()(
            inputs_embeds=inputs_embeds, attention_mask=prompt.attention_mask, position_ids=prompt.position_ids
        ).logits.float()
    return prompt, logits


def all_items_of_users(config):
    dataset = create_dataset(config)
    users = dataset.inter_feat[dataset.uid_field].tolist()
    items = dataset.inter_feat[dataset.iid_field].tolist()
    seen = {}
    for user, item in zip(users, items, strict=True):
        seen.setdefault(user, set()).add(item)
    return seen


def test_candidates_hold_the_target_once_and_no_item_of_the_user(generative):
    config, model, train_data, _ = generative
    seen = all_items_of_users(config)
    interaction = next(iter(train_data))
    users, targets = interaction["user_id"], interaction["item_id"]
    init_seed(7, True)
    candidates = model.candidate_lists(interaction)
    assert candidates.shape == (len(users), 20)
    positions = set()
    for user, target, row in zip(users.tolist(), targets.tolist(), candidates.tolist(), strict=True):
        assert len(set(row)) == 20 and row.count(target) == 1
        assert not (set(row) - {target}) & seen[user]  # never an item the user interacted with, in any split
        positions.add(row.index(target))
    assert len(positions) > 5  # the target's place is shuffled
    init_seed(7, True)
    assert torch.equal(model.candidate_lists(interaction), candidates)  # seeded


def test_prompt_slots_line_up_with_history_then_candidates(generative):
    _, model, train_data, _ = generative
    interaction = next(iter(train_data))
    seq, length, targets = interaction["item_id_list"], interaction["item_length"], interaction["item_id"]
    candidates = model.candidate_lists(interaction)
    prompt = model.answer_prompt(seq, length, candidates, targets)
    start = 0
    for row in range(len(seq)):
        count = int(prompt.slot_mask[row].sum())
        expected = seq[row, : length[row]].tolist() + candidates[row].tolist()
        assert prompt.slot_items[start : start + count].tolist() == expected
        start += count
        answer = prompt.input_ids[row][prompt.answer_mask[row]].tolist()
        title = model.answer_prompt.answer_table[targets[row], : model.answer_prompt.answer_length[targets[row]]]
        assert answer == title.tolist() and answer[-1] == model.tokenizer.eos_token_id
        # the answer ends the row (no token after it) and holds no slot
        assert (
            prompt.answer_mask[row, -len(answer) :].all()
            and not (prompt.answer_mask[row] & prompt.slot_mask[row]).any()
        )


def test_loss_covers_only_the_answer_tokens(generative):
    _, model, train_data, _ = generative
    interaction = next(iter(train_data))
    seq, length, targets = interaction["item_id_list"], interaction["item_length"], interaction["item_id"]
    candidates = model.candidate_lists(interaction)
    loss = model.generative_loss(interaction, candidates)

    prompt, logits = teacher_forced(model, seq, length, candidates, targets)
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), prompt.input_ids[:, 1:], reduction="none")
    mask = prompt.answer_mask[:, 1:]
    torch.testing.assert_close(loss, per_token[mask].mean(), rtol=1e-5, atol=1e-5)
    assert mask.sum() == sum(int(model.answer_prompt.answer_length[t]) for t in targets)
    assert per_token[~mask & prompt.attention_mask[:, 1:].bool()].mean() != loss  # other tokens are not in it


def test_likelihood_scores_reuse_the_prompt_cache_exactly(generative):
    _, model, _, test_data = generative
    interaction = next(iter(test_data))[0]
    seq, length = interaction["item_id_list"][:3], interaction["item_length"][:3]
    candidates = torch.stack([torch.randperm(1400)[:5] + 1 for _ in range(3)])
    with torch.no_grad():
        cached = model._candidate_likelihood(seq, length, candidates)  # [3, 5]
        for column in range(5):  # teacher-forced prompt + answer, no cache
            answers = candidates[:, column]
            prompt, logits = teacher_forced(model, seq, length, candidates, answers)
            log_probs = torch.log_softmax(logits[:, :-1], -1).gather(-1, prompt.input_ids[:, 1:].unsqueeze(-1))
            mask = prompt.answer_mask[:, 1:]
            direct = (log_probs.squeeze(-1) * mask).sum(1) / mask.sum(1)
            torch.testing.assert_close(cached[:, column], direct, rtol=1e-4, atol=1e-4)


def test_generation_keeps_each_users_gate(generative):
    _, model, _, test_data = generative
    interaction = next(iter(test_data))[0]
    seq = interaction["item_id_list"][:1].repeat(2, 1)  # one history, twice
    length = interaction["item_length"][:1].repeat(2)
    candidates = (torch.randperm(1400)[:20] + 1).repeat(2, 1)
    gates = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])  # two users, different experts
    model.gate_weights = lambda *args: gates[: args[0].shape[0]]
    together = model.generate_answers(seq, length, candidates)
    assert together[0] != together[1]  # different experts answer differently
    model.gate_weights = lambda *args: gates[1:2]
    alone = model.generate_answers(seq[1:], length[1:], candidates[1:])
    assert alone == together[1:]  # in a batch, the second sequence kept its own gate

    # the first generated token is the argmax of the same prompt's forward (positions line up under left padding)
    model.gate_weights = lambda *args: gates[: args[0].shape[0]]
    _, tokens = model.generate_answers(seq, length, candidates, return_tokens=True)
    with torch.no_grad():
        _, logits = teacher_forced(model, seq, length, candidates)
    assert torch.equal(tokens[:, 0], logits[:, -1].argmax(-1))


@pytest.mark.parametrize("template", ["{history} only", "{candidates} only", "{history} {candidates} {history}"])
def test_template_without_its_placeholders_is_refused_at_start_up(template, llm_cache):
    config = {
        **TINY,
        **GENERATIVE,
        "model": "iLoRA",
        "generative_prompt_template": template,
        "llm_cache_dir": llm_cache,
    }
    with pytest.raises(ValueError, match="'generative_prompt_template' must contain each of the placeholders"):
        objective_function(config_dict=config)
    assert not list(__import__("pathlib").Path("saved").glob("*.pth"))  # refused before any training


def test_generative_objective_needs_a_sampled_mode(llm_cache):
    config = {**TINY, **GENERATIVE, "model": "iLoRA", "eval_args": TINY["eval_args"], "llm_cache_dir": llm_cache}
    with pytest.raises(ValueError, match="uni<N>"):
        objective_function(config_dict=config)


def test_a_user_s_candidates_must_fit_in_one_predict_call(llm_cache):
    # RecBole splits a batch larger than eval_batch_size rows: one user's 20 rows would go to two prompts listing 16
    # and 4 candidates, scored without a word of warning.
    config = {**TINY, **GENERATIVE, "model": "iLoRA", "eval_batch_size": 16, "llm_cache_dir": llm_cache}
    with pytest.raises(ValueError, match="'eval_batch_size' = 16 .* 20 rows"):
        objective_function(config_dict=config)


@pytest.mark.parametrize("model_name", ["iLoRA", "UniformLoRA"])
def test_generative_end_to_end(model_name, sasrec_checkpoint, llm_cache, monkeypatch):
    config = {**TINY, **GENERATIVE, "model": model_name, "epochs": 1, "test_modes": ["uni19"]}
    config["llm_train_sequences_per_user"] = 2  # a training budget, as in the benchmark: the candidates ignore it
    config.update(sasrec_checkpoint=sasrec_checkpoint, llm_cache_dir=llm_cache)
    scored = []  # histories scored by likelihood, per call
    original = LLMSequentialRecommender._predict_by_likelihood

    def counting(self, interaction, histories, row_to_history):
        scored.append(histories.shape[0])
        return original(self, interaction, histories, row_to_history)

    monkeypatch.setattr(LLMSequentialRecommender, "_predict_by_likelihood", counting)
    result = objective_function(config_dict=config)
    # One validation and one test of the 40 users: RecBole's uni19 test is the seeded test mode, scored once (the
    # costliest step of a generative run on CPU used to run twice) and reported under both names.
    assert sum(scored) == 80
    assert result["test_result"] == result["test_results"]["uni19"]
    generation = result["generative_result"]
    assert generation["users"] == 40
    lines = [json.loads(line) for line in open(generation["generations_file"], encoding="utf-8")]
    assert len(lines) == 40 and all(len(line["candidates"]) == 20 for line in lines)
    assert all(line["target"] in line["candidates"] for line in lines)
    # Every recorded verdict follows from its recorded answer, and the summary from the verdicts.
    for line in lines:
        valid, correct, named = verdict(line["output"], line["candidates"], line["candidates"].index(line["target"]))
        assert (valid, correct) == (line["valid"], line["correct"])
        assert [line["candidates"][index] for index in named] == line["named"]
    assert summarize_verdicts([(line["valid"], line["correct"]) for line in lines]) == {
        key: generation[key] for key in ("users", "valid_ratio", "hr@1_valid", "hr@1_all")
    }
    assert {"hit@1", "hit@5", "ndcg@5"} <= set(result["test_results"]["uni19"])
    # `python -m recbole_ilora.generative <checkpoint>` asks the saved model the very same questions, and it answers
    # as the run did: the two can be compared user by user.
    saved_config, saved_model, dataset, *_ = load_data_and_model(result["saved_model_file"])
    seen = all_items_of_users(saved_config)
    for line in lines:  # never an item of the user, in any split, whatever the training budget kept
        user = dataset.token2id(dataset.uid_field, line["user_id"])
        assert not (set(line["candidate_ids"]) - {line["target_id"]}) & seen[user]
    again = evaluate_generation(saved_config, saved_model, output_file="again.jsonl")
    lines_again = [json.loads(line) for line in open(again["generations_file"], encoding="utf-8")]
    assert [(line["user_id"], line["candidate_ids"], line["output"]) for line in lines_again] == [
        (line["user_id"], line["candidate_ids"], line["output"]) for line in lines
    ]


def twin_rows(model, interaction, candidates):
    """Sampled-mode rows of two users (ids 1 and 2) with one identical history, each with its own candidates."""
    from recbole.data.interaction import Interaction

    seq, length = interaction[model.ITEM_SEQ][:1], interaction[model.ITEM_SEQ_LEN][:1]
    num = candidates.shape[1]
    return Interaction(
        {
            model.USER_ID: torch.tensor([1] * num + [2] * num),
            model.ITEM_SEQ: seq.repeat(2 * num, 1),
            model.ITEM_SEQ_LEN: length.repeat(2 * num),
            model.ITEM_ID: candidates.flatten(),
        }
    )


@pytest.mark.parametrize("objective", ["generative", "head"])
def test_two_users_with_one_history_in_a_batch_are_scored_apart(objective, generative, sasrec_checkpoint, llm_cache):
    _, model, _, test_data = generative
    if objective == "head":
        config = tiny_config(sasrec_checkpoint=sasrec_checkpoint, llm_cache_dir=llm_cache)
        train_data, *_ = data_preparation(config, create_dataset(config))
        torch.manual_seed(0)
        model = iLoRA(config, train_data._dataset).eval()
    interaction = next(iter(test_data))[0]
    torch.manual_seed(1)
    candidates = torch.stack([torch.randperm(1400)[:20] + 1 for _ in range(2)])  # [2 users, 20]
    both = twin_rows(model, interaction, candidates)
    with torch.no_grad():
        together = model.predict(both)  # [40]
        apart = torch.cat([model.predict(both[:20]), model.predict(both[20:])])
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)


def test_likelihood_scores_do_not_depend_on_candidates_per_forward(generative):
    _, model, _, test_data = generative
    interaction = next(iter(test_data))[0]
    seq, length = interaction["item_id_list"][:3], interaction["item_length"][:3]
    torch.manual_seed(2)
    candidates = torch.stack([torch.randperm(1400)[:7] + 1 for _ in range(3)])
    scores = {}
    with torch.no_grad():
        for per_forward in (7, 3, 1):  # one forward; 3 + 3 + 1; one candidate at a time
            model.candidates_per_forward = per_forward
            scores[per_forward] = model._candidate_likelihood(seq, length, candidates)
    torch.testing.assert_close(scores[3], scores[7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores[1], scores[7], rtol=1e-5, atol=1e-5)


class Killed(Exception):
    """Stands for the kill of a run's process at a chosen point of its tests."""


def test_a_journal_drops_a_line_torn_by_a_kill_and_refuses_a_file_it_did_not_write(tmp_path):
    path = tmp_path / "journal.jsonl"
    with JsonLinesJournal(path) as journal:
        journal.append([{"a": 1}, {"a": 2}, {"a": 3}])
    with open(path, "ab") as file:
        file.write(b'{"a": 4, "b"')  # the kill came in the middle of a line
    with JsonLinesJournal(path) as journal:
        assert journal.records == [{"a": 1}, {"a": 2}, {"a": 3}]
        journal.keep(2)
        journal.append([{"a": 5}])
    assert path.read_text().splitlines() == ['{"a": 1}', '{"a": 2}', '{"a": 5}']
    with JsonLinesJournal(path, fresh=True) as journal:
        assert journal.records == []
    assert path.read_text() == ""
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="journal.jsonl line 1"):
        JsonLinesJournal(path)


def test_a_generative_run_killed_in_its_tests_resumes_them_where_they_were(sasrec_checkpoint, llm_cache, monkeypatch):
    # uni19 scores one user per RecBole batch (20 rows); the answers come in two RecBole batches of 20 users, each
    # generated and journaled 8 users at a time (llm_eval_batch_size).
    config = {**TINY, **GENERATIVE, "model": "iLoRA", "epochs": 1, "test_modes": ["uni19"], "eval_batch_size": 20}
    config.update(sasrec_checkpoint=sasrec_checkpoint, llm_cache_dir=llm_cache, llm_eval_batch_size=8)
    config.update(llm_train_sequences_per_user=2, eval_step=0)  # a short training, no validation: the tests matter
    expected = objective_function(config_dict={**config, "checkpoint_dir": "saved-whole"})
    expected_answers = Path(expected["generative_result"]["generations_file"]).read_text()

    calls = {"scored": 0, "answered": 0}  # users scored in the tests, users answered
    score, answer = LLMSequentialRecommender._candidate_likelihood, LLMSequentialRecommender.generate_answers

    def scoring(self, item_seq, item_seq_len, candidates, kill_at=None):
        if self._score_journal is not None:  # the tests (validation is never journaled)
            if calls["scored"] == kill_at:
                raise Killed
            calls["scored"] += len(item_seq)
        return score(self, item_seq, item_seq_len, candidates)

    def answering(self, item_seq, item_seq_len, candidates, kill_at=None, **kwargs):
        if calls["answered"] == kill_at:
            raise Killed
        calls["answered"] += len(item_seq)
        return answer(self, item_seq, item_seq_len, candidates, **kwargs)

    # Killed after the uni19 test has scored 25 of the 40 users.
    monkeypatch.setattr(LLMSequentialRecommender, "_candidate_likelihood", lambda *a: scoring(*a, kill_at=25))
    killed = {**config, "checkpoint_dir": "saved-killed"}
    with pytest.raises(Killed):
        objective_function(config_dict=killed)
    (state_file,) = Path("saved-killed").glob("iLoRA-*.training_state.pth")
    model_file = str(state_file).replace(".training_state", "")
    assert len(Path(model_file.replace(".pth", ".test_scores.jsonl")).read_text().splitlines()) == 25
    resumed = {**killed, "resume_checkpoint": model_file}

    # Resumed, it scores the 15 others only, and is killed in the answers' second RecBole batch, after 20 + 8 users.
    calls.update(scored=0, answered=0)
    monkeypatch.setattr(LLMSequentialRecommender, "_candidate_likelihood", scoring)
    monkeypatch.setattr(LLMSequentialRecommender, "generate_answers", lambda *a, **k: answering(*a, kill_at=28, **k))
    with pytest.raises(Killed):
        objective_function(config_dict=resumed)
    assert calls == {"scored": 15, "answered": 28}
    answers_file = Path(model_file.replace(".pth", ".generations.jsonl"))
    assert len(answers_file.read_text().splitlines()) == 28  # every generation batch answered before the kill is kept
    with open(answers_file, "ab") as file:
        file.write(b'{"prompt_id": 28, "user')  # as if the kill had come in the middle of a line

    # Resumed again: no user scored, only the 12 users not yet answered, the figures of the whole run.
    calls.update(scored=0, answered=0)
    monkeypatch.setattr(LLMSequentialRecommender, "generate_answers", answering)
    result = objective_function(config_dict=resumed)
    assert calls == {"scored": 0, "answered": 12}
    assert result["test_results"] == expected["test_results"]  # uni19, exactly
    assert {key: value for key, value in result["generative_result"].items() if key != "generations_file"} == {
        key: value for key, value in expected["generative_result"].items() if key != "generations_file"
    }
    assert answers_file.read_text() == expected_answers

    # Answers of other candidates (another run's) are refused, naming the file.
    lines = answers_file.read_text().splitlines()
    lines[3] = json.dumps({**json.loads(lines[3]), "candidate_ids": list(range(1, 21))})
    answers_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="generations.jsonl line 4 answers user"):
        objective_function(config_dict=resumed)


def head_run_checkpoint(path, sasrec_checkpoint, llm_cache, **overrides):
    """A head-objective iLoRA checkpoint as a finished run saves it (config and trained parameters), its trained
    parameters random so that a copy is told from a fresh build."""
    from recbole_ilora.checkpoints import atomic_torch_save, plain_config

    config = tiny_config(sasrec_checkpoint=sasrec_checkpoint, llm_cache_dir=llm_cache, **overrides)
    train_data, _, _ = data_preparation(config, create_dataset(config))
    model = iLoRA(config, train_data._dataset)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    atomic_torch_save({"config": plain_config(config), "state_dict": model.state_dict()}, str(path))
    return model.state_dict()


def test_a_generative_run_starts_from_a_head_runs_adapter_gate_and_projector(
    sasrec_checkpoint, llm_cache, tmp_path, monkeypatch
):
    import recbole_ilora.pipeline as pipeline

    head = head_run_checkpoint(tmp_path / "head.pth", sasrec_checkpoint, llm_cache)
    config = {**TINY, **GENERATIVE, "model": "iLoRA", "epochs": 1, "test_modes": ["uni19"], "llm_cache_dir": llm_cache}
    config["llm_init_checkpoint"] = str(tmp_path / "head.pth")  # no sasrec_checkpoint: the head run's is read
    started = {}

    def warm_start_then_stop(model, checkpoint, path):
        loaded, fresh = original(model, checkpoint, path)
        started.update(state=model.state_dict(), loaded=loaded, fresh=fresh)
        raise KeyboardInterrupt  # the run's wiring is what is tested here, not a generative epoch

    def prepare_model(config, *args, **kwargs):
        started["encoder"] = config["sasrec_checkpoint"]
        return built(config, *args, **kwargs)

    original, built = pipeline.warm_start, pipeline.prepare_model
    monkeypatch.setattr(pipeline, "warm_start", warm_start_then_stop)
    monkeypatch.setattr(pipeline, "prepare_model", prepare_model)
    with pytest.raises(KeyboardInterrupt):
        objective_function(config_dict=config)
    assert started["encoder"] == sasrec_checkpoint
    assert set(started["state"]) == set(head) and started["fresh"] == []  # the head too: the same shape here
    for name, value in head.items():
        assert torch.equal(started["state"][name], value), name


def test_a_warm_start_that_does_not_fit_stops_before_any_data_or_training(sasrec_checkpoint, llm_cache, tmp_path):
    head_run_checkpoint(tmp_path / "head.pth", sasrec_checkpoint, llm_cache)
    config = {**TINY, **GENERATIVE, "model": "iLoRA", "llm_cache_dir": llm_cache}
    with pytest.raises(ValueError, match="'llm_init_checkpoint' .* lora_num_experts = 4, this run has 2"):
        objective_function(config_dict={**config, "llm_init_checkpoint": str(tmp_path / "head.pth"),
                                        "lora_num_experts": 2})  # fmt: skip
    with pytest.raises(FileNotFoundError, match="'llm_init_checkpoint' = .*nothing.pth"):
        objective_function(config_dict={**config, "llm_init_checkpoint": str(tmp_path / "nothing.pth")})
    other = tmp_path / "other-sasrec.pth"
    other.write_bytes(open(sasrec_checkpoint, "rb").read() + b"\0")  # another encoder file's bytes
    with pytest.raises(ValueError, match="is not the encoder 'llm_init_checkpoint'"):
        objective_function(
            config_dict={**config, "llm_init_checkpoint": str(tmp_path / "head.pth"), "sasrec_checkpoint": str(other)}
        )
    assert not list(Path("saved").glob("*.pth"))  # refused before any training


def test_the_generative_objective_is_blind_to_the_head_objectives_keys(sasrec_checkpoint, llm_cache):
    # The grid leaves llm_loss_positions, gate_scope and score_head out of a generative run's hash (its runs recorded
    # before those keys stay valid): the objective must not read them.
    losses, gradients = [], []
    for head_keys in (
        {"llm_loss_positions": "last", "gate_scope": "sequence", "score_head": "plain"},
        {"llm_loss_positions": "all", "gate_scope": "position", "score_head": "residual"},
    ):
        config = tiny_config(sasrec_checkpoint=sasrec_checkpoint, llm_cache_dir=llm_cache, **GENERATIVE, **head_keys)
        splits = data_preparation(config, create_dataset(config))
        train_data = splits[0]
        init_seed(config["seed"], config["reproducibility"])
        model = iLoRA(config, train_data._dataset)
        model.attach_splits(*splits)
        init_seed(config["seed"], config["reproducibility"])  # the candidates of the answer prompts are sampled
        loss = model.calculate_loss(next(iter(train_data)))
        loss.backward()
        losses.append(loss.item())
        gradients.append(
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "score_head" not in n}
        )
    assert losses[0] == losses[1]
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) > 0
    for name, gradient in gradients[0].items():
        assert torch.equal(gradient, gradients[1][name]), name


def test_the_generative_learning_curve_reads_each_points_answers(sasrec_checkpoint, llm_cache, tmp_path, monkeypatch):
    import argparse
    import json

    from conftest import REPO_ROOT

    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import learning_curve

    settings = {key: value for key, value in TINY.items() if key != "dataset"}
    settings.update(GENERATIVE, sasrec_checkpoint=sasrec_checkpoint, llm_cache_dir=llm_cache, train_batch_size=8,
                    llm_train_sequences_per_user=1)  # fmt: skip
    args = argparse.Namespace(model="iLoRA", dataset=TINY["dataset"], seed=2020, objective="generative",
                              windows_per_user=None, points=[8, 24], sasrec_checkpoint=None,
                              work=str(tmp_path / "work"), output=str(tmp_path / "curve.json"),
                              folder=str(tmp_path), config_json=json.dumps(settings))  # fmt: skip
    (tmp_path / "work").mkdir()
    learning_curve.run(args)
    record = json.loads((tmp_path / "curve.json").read_text())
    points = record["points"]
    # one answer a training sequence: the targets are the sequences seen, 8 a batch, read as each point passes
    assert [p["targets"] for p in points] == [0, 8, 24] and all(p["windows"] == p["targets"] for p in points)
    for point in points:  # each point's HR@1 and ValidRatio are those of its own answers file, recounted here
        lines = (tmp_path / "work" / f"curve.answers-{point['targets']}.jsonl").read_text().splitlines()
        answers = [json.loads(line) for line in lines]
        assert point["test"]["hr@1_all"] == pytest.approx(sum(a["correct"] for a in answers) / len(answers))
        assert point["test"]["valid_ratio"] == pytest.approx(sum(a["valid"] for a in answers) / len(answers))
        assert point["test"]["users"] == len(answers) == record["encoder_test"]["users"]
    assert record["random_pick"] == 1 / settings.get("num_candidates", 20)
    learning_curve.plot(tmp_path)
    assert (tmp_path / "learning_curve_generative.png").exists()
    table = (tmp_path / "learning_curve_generative.md").read_text()
    assert table.count("| iLoRA | lastfm-tiny | 2020 |") == 3
