"""The paper's claims, measured on both backbones: the "claims" and "targets" sections of ``benchmarks/grid.py``'s
reports (imported by it; nothing here trains).

Each claim compares rows of the grid. Over seeds, a difference is given in units of the pooled sample standard
deviation of the two rows (``d``); where a row has one seed, rows of the paper's protocol are compared user by user
instead (every row of a seed answers the very same candidate lists, so each user's two verdicts are paired): the
difference of HR@1 (all) and its standard error over users (``z``). A verdict needs |d| or |z| of at least 2.

The embedded backbone's figures come from ``results/embedded-legacy/`` (its grid ran the head objective for the
ablations, so its claims 2 and 3 read uni19 Hit@1 of those rows); the pretrained backbone's from the grid's own runs.
"""

import gzip
import json
import math
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LEGACY = REPO / "results" / "embedded-legacy"
NOTES = Path(__file__).resolve().parent / "claims_notes.json"
THRESHOLD = 2.0  # |d| or |z| needed for a verdict


# ----------------------------------------------------------------------------------------------------- records
def legacy_by_row(dataset):
    """The embedded backbone's records of ``dataset`` (``results/embedded-legacy/runs/<dataset>``), by row."""
    by_row = {}
    for path in sorted((LEGACY / "runs" / dataset).glob("*.json")):
        if ".superseded-" in path.name:
            continue
        record = json.loads(path.read_text())
        record["_path"] = str(path)
        by_row.setdefault(record["row"], []).append(record)
    return by_row


def with_partial_runs(by_row, planned, partial_dir):
    """``by_row`` plus, for each planned run without a record, the answers of a partial run of it kept in
    ``partial_dir`` (``<run_id>.answers.json`` from ``benchmarks/answers_summary.py``: the paper's-protocol answers
    of a run whose worker was stopped before its uni19 test; its generations and encoder-on-candidates files next
    to it). Such a record has the generative figures only and is marked ``partial``."""
    merged = {row: list(records) for row, records in by_row.items()}
    recorded = {record["run_id"] for records in by_row.values() for record in records}
    for run in planned:
        path = Path(partial_dir) / f"{run['run_id']}.answers.json"
        if run["run_id"] in recorded or not path.exists():
            continue
        answers = json.loads(path.read_text())
        record = {"run_id": run["run_id"], "row": run["row"], "seed": run["seed"], "partial": True}
        record.update(generative=answers["answers"], test={}, _path=str(path))
        merged.setdefault(run["row"], []).append(record)
    return merged


def row_label(by_row, row):
    """``row``, marked where one of its figures comes from a partial run (see :func:`with_partial_runs`)."""
    return row + (" (partial run: answers only)" if any(r.get("partial") for r in by_row.get(row, [])) else "")


def hr1_valid(record):
    return record["generative"]["hr@1_valid"] if record["generative"]["valid_ratio"] else None


def hr1_all(record):
    return record["generative"]["hr@1_all"]


def valid_ratio(record):
    return record["generative"]["valid_ratio"]


def uni19_hit1(record):
    return record["test"]["uni19"]["hit@1"] if "uni19" in record["test"] else None


def full_ndcg10(record):
    return record["test"]["full"]["ndcg@10"]


def per_user_correct(record, run_path, with_candidates=False):
    """{user: correct} of a generative run, from its generations file next to ``run_path`` (None if missing); with
    ``with_candidates``, also {user: its candidate ids} (None where the file does not hold them)."""
    path = Path(run_path).with_suffix(".generations.jsonl.gz")
    if not path.exists():
        return None
    with gzip.open(path, "rt", encoding="utf-8") as file:
        lines = [json.loads(text) for text in file]
    correct = {line["user_id"]: bool(line["correct"]) for line in lines}
    if not with_candidates:
        return correct
    return correct, {line["user_id"]: line.get("candidate_ids") for line in lines}


# ----------------------------------------------------------------------------------------------------- statistics
def summary(records, metric):
    values = [v for r in records if (v := metric(r)) is not None]
    if not values:
        return None
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def in_std_units(a, b):
    """(a mean - b mean) / pooled sample std, or None when either has one seed or the spread is zero."""
    if not a or not b or a["std"] is None or b["std"] is None:
        return None
    pooled = math.sqrt((a["std"] ** 2 + b["std"] ** 2) / 2)
    return (a["mean"] - b["mean"]) / pooled if pooled > 0 else None


def paired(a, b):
    """Per-user paired difference of two runs' verdicts ({user: correct}, the same users): (difference of the share
    correct, its standard error, z)."""
    users = sorted(set(a) & set(b))
    if not users or len(users) != len(a) or len(users) != len(b):
        return None
    diffs = [int(a[u]) - int(b[u]) for u in users]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return {"diff": mean, "se": se, "z": mean / se if se > 0 else None, "users": len(users)}


def fmt_summary(s, digits=4):
    if s is None:
        return "–"
    text = f"{s['mean']:.{digits}f}"
    if s["std"] is not None:
        text += f" ± {s['std']:.{digits}f}"
    return text + f" ({s['n']} seed{'s' if s['n'] != 1 else ''})"


def verdict_words(d, z, direction_holds, pairs=None):
    """Words for a comparison whose claimed direction is a > b."""
    score, basis = (d, "seeds") if d is not None else (z, "users, paired") if z is not None else (None, None)
    if score is None:
        if pairs is not None:
            return "not distinguishable at this budget (the two rows answer every user alike)"
        return "not distinguishable at this budget (one seed, no per-user verdicts to pair)"
    if abs(score) < THRESHOLD:
        return f"not distinguishable at this budget ({'d' if basis == 'seeds' else 'z'} = {score:+.1f}, within ±2)"
    return "reproduced" if direction_holds else "not reproduced (the other way round)"


# ----------------------------------------------------------------------------------------------------- claims
def _row_records(by_row, row):
    return [r for r in by_row.get(row, []) if r]


def compare_rows(by_row, row, others, metric, label):
    """``row`` against the best of ``others`` on ``metric``; returns the cell texts and the verdict."""
    mine = summary(_row_records(by_row, row), metric)
    rivals = {other: summary(_row_records(by_row, other), metric) for other in others}
    rivals = {other: s for other, s in rivals.items() if s}
    if not mine or not rivals:
        return {"figure": "not run", "verdict": "not measured"}
    best_other = max(rivals, key=lambda other: rivals[other]["mean"])
    b = rivals[best_other]
    d = in_std_units(mine, b)
    z = None
    pairs = None
    if label.startswith("HR@1"):
        mine_users, other_users = _users_by_seed(by_row, row), _users_by_seed(by_row, best_other)
        # Paired only where both runs of a seed answered the very same candidate lists (a partial run's answers,
        # generated by the CLI, sit on other lists than the grid's run of the same seed).
        per_seed = [
            paired(mine_users[seed][0], other_users[seed][0])
            for seed in sorted(set(mine_users) & set(other_users))
            if mine_users[seed][1] == other_users[seed][1]
        ]
        pairs = pooled_pairs([p for p in per_seed if p])
        z = pairs["z"] if pairs and d is None else None  # over seeds, d decides; the pairs are evidence beside it
    relative = (mine["mean"] - b["mean"]) / b["mean"] * 100 if b["mean"] else None
    text = f"{row_label(by_row, row)} {fmt_summary(mine)} vs {row_label(by_row, best_other)} {fmt_summary(b)} ({label})"
    if relative is not None:
        text += f"; {relative:+.1f}% relative"
    if d is not None:
        text += f"; d = {d:+.1f}"
    if pairs:
        text += f"; paired over {pairs['over']}: {pairs['diff']:+.4f} ± {pairs['se']:.4f}"
        text += f" (z = {pairs['z']:+.1f})" if pairs["z"] is not None else " (no user differs)"
    return {"figure": text, "verdict": verdict_words(d, z, mine["mean"] > b["mean"], pairs)}


def _users_by_seed(by_row, row):
    """{seed: (per-user verdicts, candidate lists)} of a generative row's runs that kept their answers."""
    found = {}
    for record in _row_records(by_row, row):
        if "_path" in record and record.get("generative"):
            users = per_user_correct(record, record["_path"], with_candidates=True)
            if users:
                found[record["seed"]] = users
    return found


def pooled_pairs(per_seed):
    """Seeds' paired differences (:func:`paired`, each over the same users of one seed) pooled: the mean of the
    seeds' differences, its standard error sqrt(sum of se^2) / seeds, z; None without a seed."""
    if not per_seed:
        return None
    k = len(per_seed)
    diff = statistics.fmean(p["diff"] for p in per_seed)
    se = math.sqrt(sum(p["se"] ** 2 for p in per_seed)) / k
    counts = {p["users"] for p in per_seed}
    users = f"{counts.pop()} users" if len(counts) == 1 else f"{sum(p['users'] for p in per_seed)} user-answers"
    over = f"{k} seeds x {users}" if k > 1 else users
    return {"diff": diff, "se": se, "z": diff / se if se > 0 else None, "over": over, "seeds": k}


def parameter_claim(by_row):
    """iLoRA's trainable parameters over UniformLoRA's (the head rows, else the generative ones: the same modules)."""
    for row, base in (("iLoRA", "UniformLoRA"), ("iLoRA-generative", "UniformLoRA-generative")):
        mine = [r for r in _row_records(by_row, row) if "trainable_parameters" in r]
        other = [r for r in _row_records(by_row, base) if "trainable_parameters" in r]
        if mine and other:
            break
    else:
        return {"figure": "not run", "verdict": "not measured"}
    a, b = mine[0]["trainable_parameters"], other[0]["trainable_parameters"]
    share = (a - b) / b * 100
    return {
        "figure": f"{row} {a:,} vs {base} {b:,} trainable: {share:+.2f}%",
        "verdict": "reproduced" if share < 1 else "not reproduced",
    }


def valid_ratio_claim(by_row, level=0.95):
    """The paper's ValidRatio (0.975 to 0.996) is a level, not a comparison: met where a row's mean reaches
    ``level``."""
    figures, met = [], []
    for row in ("iLoRA-generative", "UniformLoRA-generative"):
        s = summary(_row_records(by_row, row), valid_ratio)
        if s:
            figures.append(f"{row_label(by_row, row)} {fmt_summary(s)}")
            met.append(s["mean"] >= level)
    if not figures:
        return {"figure": "not run", "verdict": "not measured"}
    verdict = "reproduced" if all(met) else "not reproduced" if not any(met) else "reproduced for one row only"
    return {"figure": "; ".join(figures) + f" (ValidRatio; level {level})", "verdict": verdict}


def claims(by_row, generative_ablations):
    """The four claims on one backbone's rows: {claim number: (what is compared, result)}. ``generative_ablations``:
    whether the ablation rows ran the paper's protocol (``-generative`` rows) or the scoring head."""
    suffix, metric, label = ("-generative", hr1_valid, "HR@1 (valid)") if generative_ablations else (
        "", uni19_hit1, "uni19 Hit@1"
    )  # fmt: skip
    return {
        "1 (paper's protocol)": compare_rows(
            by_row, "iLoRA-generative", ["UniformLoRA-generative"], hr1_valid, "HR@1 (valid)"
        ),
        "1 (paper's protocol, all users)": compare_rows(
            by_row, "iLoRA-generative", ["UniformLoRA-generative"], hr1_all, "HR@1 (all)"
        ),
        "1 (ValidRatio)": valid_ratio_claim(by_row),
        "1 (scoring head)": compare_rows(by_row, "iLoRA", ["UniformLoRA"], uni19_hit1, "uni19 Hit@1"),
        "2": compare_rows(by_row, f"iLoRA{suffix}", [f"iLoRA-K2{suffix}", f"iLoRA-K8{suffix}"], metric, label),
        "3": compare_rows(
            by_row,
            f"iLoRA{suffix}",
            [f"iLoRA-gate-uniform{suffix}", f"iLoRA-gate-prompt_mean{suffix}"],
            metric,
            label,
        ),
        "4": parameter_claim(by_row),
    }


PAPER = {
    "1 (paper's protocol)": "iLoRA beats uniform LoRA: +11.4% relative HR@1 on average over three datasets "
    "(Llama-2-7B)",
    "1 (paper's protocol, all users)": "(the paper reports HR@1 over valid answers; this is over all users, "
    "RecBole's Hit@1)",
    "1 (ValidRatio)": "ValidRatio about 0.98 (0.975 to 0.996; our level: 0.95)",
    "1 (scoring head)": "(no head objective in the paper: the same claim under a ranking head)",
    "2": "four experts are best among 2, 4 and 8",
    "3": "the SASRec-guided gate beats other gate inputs",
    "4": "iLoRA adds under 1% trainable parameters over uniform LoRA",
}


def notes(dataset):
    """Explanations written by hand for the claims of ``dataset`` (``benchmarks/claims_notes.json``)."""
    if not NOTES.exists():
        return {}
    return json.loads(NOTES.read_text(encoding="utf-8")).get(dataset, {})


def claims_section(dataset, pretrained_by_row, backbone, budget):
    """Markdown: one row per claim, the paper's figure, ours on the embedded backbone and on ``backbone``."""
    legacy = legacy_by_row(dataset)
    random_claims = claims(legacy, generative_ablations=False)
    real_claims = claims(pretrained_by_row, generative_ablations=True)
    explanations = notes(dataset)
    lines = [
        "## The paper's claims",
        "",
        f"Ours on the random backbone: the embedded 2-layer LLaMA (`results/embedded-legacy/`, its ablations under the "
        f"scoring head). Ours on the pretrained backbone: `{backbone}`, {budget}; ablations under the paper's "
        "protocol, seed 2020 only (the grid's budget of about 40 CPU-hours: the issue's rule cuts the ablations' seeds "
        "first). Each comparison "
        "is against the best of the other rows; d: the difference in pooled standard deviations over seeds; "
        "where a row has one seed, the paper's-protocol rows are compared user by user (the "
        "same candidate lists): the difference of the share of users answered right (HR@1 (all)) ± its standard "
        "error, and z. A verdict needs d or z beyond ±2.",
        "",
        "| claim | the paper | ours, random backbone | verdict | ours, pretrained backbone | verdict | why |",
        "|---|---|---|---|---|---|---|",
    ]
    for claim, paper in PAPER.items():
        a, b = random_claims[claim], real_claims[claim]
        why = explanations.get(claim, "").replace("|", "\\|")
        lines.append(f"| {claim} | {paper} | {a['figure']} | {a['verdict']} | {b['figure']} | {b['verdict']} | {why} |")
    return lines


# CoFiRec's claims (issue 44), the paper's words, and the rows that test each: (row, rivals, metric, label).
COFIREC_PAPER = {
    "coarse to fine beats fused (full ranking)": "tokenising each level on its own, coarse to fine, beats fusing "
    "every attribute into one embedding before quantising it (its ablation)",
    "coarse to fine beats fused (20 candidates)": "(the same, on uni19)",
    "the order matters": "generating coarse to fine beats the reverse order (its ablation)",
    "CoFiRec beats the baselines": "CoFiRec outperforms existing generative recommenders and sequential baselines "
    "(SASRec among them)",
}
COFIREC_TESTS = {
    "coarse to fine beats fused (full ranking)": ("CoFiRec", ["CoFiRec-fused"], full_ndcg10, "full NDCG@10"),
    "coarse to fine beats fused (20 candidates)": ("CoFiRec", ["CoFiRec-fused"], uni19_hit1, "uni19 Hit@1"),
    "the order matters": ("CoFiRec", ["CoFiRec-reversed"], full_ndcg10, "full NDCG@10"),
    "CoFiRec beats the baselines": ("CoFiRec", ["SASRec", "iLoRA"], full_ndcg10, "full NDCG@10"),
}


def cofirec_claims_section(by_row):
    """Markdown: CoFiRec's claims, each against the best of its rival rows (none before CoFiRec has a run)."""
    if not _row_records(by_row, "CoFiRec"):
        return []
    lines = [
        "## CoFiRec's claims",
        "",
        "Each comparison is against the best of the rival rows, with the same budget (a loss at every position of each "
        "user's 2 most recent windows, one epoch); d in pooled standard deviations over seeds, a verdict beyond ±2.",
        "",
        "| claim | the paper | ours | verdict |",
        "|---|---|---|---|",
    ]
    for claim, paper in COFIREC_PAPER.items():
        row, rivals, metric, label = COFIREC_TESTS[claim]
        result = compare_rows(by_row, row, rivals, metric, label)
        lines.append(f"| {claim} | {paper} | {result['figure']} | {result['verdict']} |")
    lines += [
        "",
        "The item IDs of each run (built on the training data, saved with the checkpoint): the share of items whose "
        "whole ID another item also had before the fix on the last level, and after it; each level's codebook usage "
        "(distinct codes over its size), coarse to fine (the reversed row writes them the other way).",
        "",
        "| run | tokenizer, order | collisions before | after | codebook usage |",
        "|---|---|---|---|---|",
    ]
    for row in ("CoFiRec", "CoFiRec-fused", "CoFiRec-reversed"):
        for record in sorted(_row_records(by_row, row), key=lambda r: r.get("seed", 0)):
            ids = (record.get("model_summary") or {}).get("tokenizer")
            if not ids:
                continue
            usage = " / ".join(f"{value:.2f}" for value in ids["codebook_usage"])
            before, after = ids["collision_rate_before"], ids["collision_rate_after"]
            name = record.get("run_id", row)
            lines.append(f"| {name} | {ids['tokenizer']}, {ids['order']} | {before:.4f} | {after:.4f} | {usage} |")
    return [*lines, ""]


# ----------------------------------------------------------------------------------------------------- targets
def encoder_on_candidates(generations_path, checkpoint, cache_path, data_path=None):
    """The SASRec encoder ranking exactly the candidates of a generative run's prompts: {users, hit@1, per_user}
    (``per_user``: user -> whether the target scored highest). Cached in ``cache_path``. ``data_path``: where the
    dataset is in this checkout (the checkpoint names where it was when it trained, another checkout's)."""
    cache_path = Path(cache_path)
    if cache_path.exists():
        return json.loads(cache_path.read_text())
    from recbole_ilora.saved_run import load_data_and_model

    _, model, dataset, _, _, test_data = load_data_and_model(checkpoint, data_path=data_path)
    with gzip.open(generations_path, "rt", encoding="utf-8") as file:
        result = sasrec_on_candidates(model, dataset, test_data, [json.loads(text) for text in file])
    cache_path.write_text(json.dumps(result))
    return result


def sasrec_on_candidates(model, dataset, test_data, lines):
    """A RecBole SASRec ``model`` ranking exactly the candidates of the generation records ``lines`` (each with
    ``user_id``, ``candidate_ids``): {users, hit@1, per_user} over the users of ``test_data``."""
    import torch

    histories = {}
    for interaction, *_ in test_data:
        for row, user in enumerate(interaction[dataset.uid_field].tolist()):
            histories[user] = (
                interaction[model.ITEM_SEQ][row],
                interaction[model.ITEM_SEQ_LEN][row],
                int(interaction[dataset.iid_field][row]),
            )
    per_user = {}
    with torch.no_grad():
        for line in lines:
            seq, length, target = histories[int(dataset.token2id(dataset.uid_field, line["user_id"]))]
            candidates = torch.tensor(line["candidate_ids"])
            if target not in line["candidate_ids"]:
                raise ValueError(f"user {line['user_id']}: the test target is not among the prompt's candidates")
            output = model.forward(seq.unsqueeze(0), length.unsqueeze(0))  # [1, d]
            scores = (output @ model.item_embedding.weight[candidates].T).squeeze(0)
            per_user[line["user_id"]] = bool(int(candidates[int(scores.argmax())]) == target)
    return {"users": len(per_user), "hit@1": statistics.fmean(per_user.values()), "per_user": per_user}


def head_target_lines(by_row, seeds=3):
    """Issue 42's targets for the head rows: iLoRA's full NDCG@10 above SASRec's (mean over ``seeds`` seeds, with d in
    pooled stds), and each LLM run against its own frozen encoder on the same test (the record's ``encoder_test``)."""
    lines = []
    mine, sasrec = (
        summary(_row_records(by_row, "iLoRA"), full_ndcg10),
        summary(_row_records(by_row, "SASRec"), full_ndcg10),
    )
    if mine and sasrec:
        d = in_std_units(mine, sasrec)
        figure = f"iLoRA {fmt_summary(mine)} vs SASRec {fmt_summary(sasrec)}" + (
            f"; d = {d:+.1f}" if d is not None else ""
        )
        if mine["n"] < seeds:
            met = f"not yet ({mine['n']} of {seeds} seeds)"
        elif mine["mean"] <= sasrec["mean"]:
            met = "no"
        elif d is not None and d >= 2:
            met = "yes"
        else:
            met = "above in the mean only (d within 2: not distinguishable)"
        lines.append(f"| full NDCG@10 above SASRec's (mean of {seeds} seeds) | iLoRA | {figure} | {met} |")
    for row in ("iLoRA", "UniformLoRA"):
        records = [r for r in _row_records(by_row, row) if (r.get("encoder_test") or {}).get("full")]
        if not records:
            continue
        gains = summary(records, lambda r: full_ndcg10(r) - r["encoder_test"]["full"]["ndcg@10"])
        per_seed = ", ".join(
            f"{r['seed']}: {full_ndcg10(r):.4f} vs {r['encoder_test']['full']['ndcg@10']:.4f}"
            for r in sorted(records, key=lambda r: r["seed"])
        )
        met = "yes" if gains["mean"] >= 0 else "no"
        lines.append(
            f"| full NDCG@10 at or above its own frozen encoder's (same run) | {row} | {fmt_summary(gains)} "
            f"(run - encoder; per seed {per_seed}) | {met} |"
        )
    return lines


def targets_section(dataset, by_row, encoder_results):
    """The issue's targets: ValidRatio >= 0.95, and (ml-100k) generative iLoRA's HR@1 (all) >= its encoder's Hit@1 on
    the same candidate lists. ``encoder_results``: {seed: encoder_on_candidates(...) of iLoRA-generative's run}."""
    lines = ["## Targets", "", "| target | row | figure | met |", "|---|---|---|---|"]
    lines += head_target_lines(by_row)
    for row in ("iLoRA-generative", "UniformLoRA-generative"):
        s = summary(_row_records(by_row, row), valid_ratio)
        if s:
            met = "yes" if s["mean"] >= 0.95 else "no"
            lines.append(f"| ValidRatio ≥ 0.95 | {row_label(by_row, row)} | {fmt_summary(s)} | {met} |")
    records = sorted(_row_records(by_row, "iLoRA-generative"), key=lambda r: r["seed"])
    if records and encoder_results:
        mine = summary(records, hr1_all)
        hits = [{"hit": encoder_results[r["seed"]]["hit@1"]} for r in records if r["seed"] in encoder_results]
        sasrec = summary(hits, lambda r: r["hit"])
        per_seed = []  # each seed's run against its own encoder on the very same lists, pooled over seeds
        for record in records:
            if record["seed"] in encoder_results and "_path" in record:
                users = per_user_correct(record, record["_path"])
                if users:
                    per_seed.append(paired(users, encoder_results[record["seed"]]["per_user"]))
        pairs = pooled_pairs([p for p in per_seed if p])
        figure = f"iLoRA-generative HR@1 (all) {fmt_summary(mine)} vs its SASRec encoder {fmt_summary(sasrec)}"
        if pairs:
            figure += f"; paired over {pairs['over']}: {pairs['diff']:+.4f} ± {pairs['se']:.4f}"
        lines.append(
            f"| HR@1 (all) ≥ SASRec's Hit@1 on the same 20 candidates | {row_label(by_row, 'iLoRA-generative')} | "
            f"{figure} | "
            f"{'yes' if mine['mean'] >= sasrec['mean'] else 'no'} |"
        )
    return lines if len(lines) > 4 else []
