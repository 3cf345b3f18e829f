"""How much training the LLM needs to pass its encoder: test full NDCG@10 against training targets seen (issue 42).

    python benchmarks/learning_curve.py --model iLoRA --sasrec-checkpoint saved/SASRec-....pth
    python benchmarks/learning_curve.py --model UniformLoRA --sasrec-checkpoint saved/SASRec-....pth
    python benchmarks/learning_curve.py --model iLoRA --objective generative --sasrec-checkpoint saved/SASRec-....pth
    python benchmarks/learning_curve.py --plot                   # the PNG and table of every curve in --folder

One run trains the model (the shipped head objective: a loss at every position of each window, residual head)
on each user's ``--windows-per-user`` most recent training windows, shuffled, with the shipped optimiser and
learning rate, and tests it (full ranking, RecBole's test split, every user) before training and each time the
targets seen pass a point of ``--points`` (log-spaced). The curve is one run read at several budgets, not one run
per budget: the learning rate is constant, so a run stopped at a point would be the same model. Both models of a
comparison read the same encoder (``--sasrec-checkpoint``; without it, one is pretrained with the shipped keys and
its path written into the JSON). The frozen encoder's own test is the horizontal line.

``--objective generative`` reads the paper's protocol instead (``properties/generative.yaml``: each user's most
recent training sequence, the LM loss on the answer title; an epoch is 943 targets on ml-100k, so the later points
are later epochs): at each point every test user's greedy answer to the same seeded 20 candidates, HR@1 over all
users, HR@1 over valid answers and ValidRatio; the horizontal lines are the frozen encoder ranking the very same
candidate lists and a random pick (1 / num_candidates). Each point's answers stay in ``--work``.

Resumable: the model, optimiser and loader state are saved at each point next to the JSON; rerunning the same
command goes on from the last point. Every figure in the JSON comes with the commit, machine and wall seconds.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from machine import git_commit, hardware  # noqa: E402

FOLDER = REPO / "results" / "learning_curve"
POINTS = (300, 1000, 3000, 10000, 30000)
GENERATIVE_POINTS = (236, 943, 1886, 3772)  # a quarter, one, two and four epochs of one sequence per user (ml-100k)


def write_json_atomically(path, data):
    path = Path(path)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(temporary, path)


def build(args):
    from recbole.utils import init_logger, init_seed

    from recbole_ilora.config import Config
    from recbole_ilora.data import budget_training_data, create_filtered_dataset, prepare_data
    from recbole_ilora.pipeline import prepare_model
    from recbole_ilora.trainer import LLMRecTrainer

    config_dict = {
        "seed": args.seed,
        "checkpoint_dir": str(Path(args.work) / "saved"),
        "show_progress": False,
    }
    if args.windows_per_user is not None:
        config_dict["llm_train_sequences_per_user"] = args.windows_per_user
    if args.sasrec_checkpoint:
        config_dict["sasrec_checkpoint"] = args.sasrec_checkpoint
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        dataset_file = REPO / "properties" / "dataset" / f"{args.dataset}.yaml"
        files = [str(dataset_file)] if dataset_file.exists() else []
        if args.objective == "generative":
            files.append(str(REPO / "properties" / "generative.yaml"))
        if args.dataset != "ml-100k":
            config_dict["data_path"] = str(REPO / "benchmarks" / "data")
        config_dict.update(json.loads(args.config_json or "{}"))  # settings of a test or a try, last
        config = Config(model=args.model, dataset=args.dataset, config_file_list=files or None, config_dict=config_dict)
    finally:
        sys.argv = argv
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    train_data, valid_data, test_data = prepare_data(config, create_filtered_dataset(config))
    model = prepare_model(config, train_data)
    model.attach_splits(train_data, valid_data, test_data)  # the generative objective's candidate lists
    loader, targets = budget_training_data(config, train_data, every_position=model.trains_every_position)
    trainer = LLMRecTrainer(config, model)
    return config, model, loader, targets, test_data, trainer


def test_metrics(trainer, test_data):
    result = trainer.evaluate(test_data, load_best_model=False)
    return {key: float(value) for key, value in result.items()}


def generative_metrics(config, model, answers):
    """The paper's test at this point: every test user's greedy answer (written to ``answers``), HR@1 and
    ValidRatio (``recbole_ilora.generative``)."""
    from recbole_ilora.generative import evaluate_generation

    result = evaluate_generation(config, model, output_file=str(answers))
    return {key: value for key, value in result.items() if key != "generations_file"}


def encoder_on_the_same_candidates(config, model, answers):
    """The frozen encoder ranking the very candidate lists of ``answers`` (its HR@1: the generative curve's line)."""
    from claims import sasrec_on_candidates

    from recbole_ilora.data import protocol_test_data

    test_data = protocol_test_data(config, "full")
    lines = [json.loads(line) for line in Path(answers).read_text(encoding="utf-8").splitlines() if line.strip()]
    model.sasrec.eval()
    result = sasrec_on_candidates(model.sasrec, test_data._dataset, test_data, lines)
    return {"users": result["users"], "hit@1": result["hit@1"]}


def run(args):
    import torch
    from recbole.trainer import Trainer

    from recbole_ilora.model.backbone import compute_dtype_name
    from recbole_ilora.pipeline import sasrec_pretraining_config

    generative = args.objective == "generative"
    kind = "-generative" if generative else ""
    output = Path(args.output or FOLDER / f"{args.dataset}-{args.model}{kind}-seed{args.seed}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    state_file = Path(args.work) / (output.stem + ".state.pth")
    config, model, loader, epoch_targets, test_data, trainer = build(args)

    def answers(targets):
        return Path(args.work) / f"{output.stem}.answers-{targets}.jsonl"

    def evaluate(targets):
        return generative_metrics(config, model, answers(targets)) if generative else test_metrics(trainer, test_data)

    record = json.loads(output.read_text()) if output.exists() and state_file.exists() else None
    if record is None:
        record = {
            "model": args.model, "dataset": args.dataset, "seed": args.seed, "objective": args.objective,
            "commit": git_commit(), "machine": hardware(), "sasrec_checkpoint": config["sasrec_checkpoint"],
            "windows_per_user": config["llm_train_sequences_per_user"], "windows_per_epoch": len(loader.dataset),
            "targets_per_epoch": epoch_targets, "batch_size": config["train_batch_size"],
            "learning_rate": config["learning_rate"], "score_head": config["score_head"],
            "llm_loss_positions": config["llm_loss_positions"], "gate_scope": config["gate_scope"],
            "compute_dtype": compute_dtype_name(config), "points": [],
        }  # fmt: skip
        model.sasrec.eval()
        started = time.perf_counter()
        step0 = evaluate(0)
        record["points"].append({"targets": 0, "windows": 0, "steps": 0, "train_seconds": 0.0, "test": step0,
                                 "test_seconds": time.perf_counter() - started})  # fmt: skip
        if generative:  # the encoder on the very candidate lists of the answers (the same at every point)
            record["encoder_test"] = encoder_on_the_same_candidates(config, model, answers(0))
            record["random_pick"] = 1 / config["num_candidates"]
        else:
            record["encoder_test"] = test_metrics(Trainer(sasrec_pretraining_config(config), model.sasrec), test_data)
        write_json_atomically(output, record)
        progress = {"targets": 0, "windows": 0, "steps": 0, "train_seconds": 0.0, "epoch": 0, "batch": 0}
    else:
        state = torch.load(state_file, weights_only=False)
        model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        progress = state["progress"]
        loader.generator.set_state(state["loader_generator"])
        print(f"resuming at {progress['targets']} targets (epoch {progress['epoch']}, batch {progress['batch']})")
    points = [point for point in args.points if point > progress["targets"]]
    losses = []
    while points:
        generator_state = loader.generator.get_state()
        model.train()
        for index, batch in enumerate(loader):
            if index < progress["batch"]:
                continue
            started = time.perf_counter()
            trainer.optimizer.zero_grad()
            loss = model.calculate_loss(batch)
            loss.backward()
            trainer.optimizer.step()
            progress["train_seconds"] += time.perf_counter() - started
            losses.append(float(loss))
            progress["steps"] += 1
            progress["batch"] = index + 1
            progress["windows"] += len(batch)
            lengths = batch[config["ITEM_LIST_LENGTH_FIELD"]]
            progress["targets"] += int(lengths.sum()) if model.trains_every_position else len(lengths)
            print(f"step {progress['steps']}: {progress['targets']} targets, loss {float(loss):.4f}", flush=True)
            if progress["targets"] >= points[0]:
                points.pop(0)
                started = time.perf_counter()
                metrics = evaluate(progress["targets"])
                record["points"].append({**{k: progress[k] for k in ("targets", "windows", "steps", "train_seconds")},
                                         "epoch": progress["epoch"], "train_loss": sum(losses) / len(losses),
                                         "test": metrics, "test_seconds": time.perf_counter() - started})  # fmt: skip
                losses = []
                name = "hr@1_all" if generative else "ndcg@10"
                print(f"point {progress['targets']} targets: test {name} {metrics[name]:.4f}", flush=True)
                torch.save({"model": model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                            "torch_rng": torch.get_rng_state(), "progress": dict(progress),
                            "loader_generator": generator_state}, state_file)  # fmt: skip
                write_json_atomically(output, record)
                model.train()
                if not points:
                    break
        else:
            progress["epoch"] += 1
            progress["batch"] = 0
    record["finished"] = True
    write_json_atomically(output, record)
    print(f"wrote {output}")


def plot(folder):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = [json.loads(path.read_text()) for path in sorted(Path(folder).glob("*.json"))]
    if not every:
        raise SystemExit(f"no curves in {folder}")
    generative = [record for record in every if record.get("objective") == "generative"]
    if generative:
        plot_generative(folder, generative, plt)
    records = [record for record in every if record.get("objective", "head") == "head"]
    if not records:
        return
    figure, axis = plt.subplots(figsize=(7, 4.5))
    lines = [
        "| model | dataset | seed | targets | windows | train min | test full NDCG@10 | encoder |",
        "|---" * 8 + "|",
    ]
    encoders = {}
    for record in records:
        xs = [max(point["targets"], 100) for point in record["points"]]  # step 0 drawn at 100 on the log axis
        ys = [point["test"]["ndcg@10"] for point in record["points"]]
        axis.plot(xs, ys, marker="o", label=f"{record['model']} (seed {record['seed']})")
        encoders[(record["dataset"], record["seed"])] = record["encoder_test"]["ndcg@10"]
        for point in record["points"]:
            lines.append(f"| {record['model']} | {record['dataset']} | {record['seed']} | {point['targets']} | "
                         f"{point['windows']} | {point['train_seconds'] / 60:.1f} | {point['test']['ndcg@10']:.4f} | "
                         f"{record['encoder_test']['ndcg@10']:.4f} |")  # fmt: skip
    models = {record["model"] for record in records}
    for path in sorted((REPO / "results" / "default-command").glob(f"*-{records[0]['dataset']}-*.json")):
        run = json.loads(path.read_text())  # the README command: one epoch of the shipped budget, 2 threads
        model = path.name.split("-")[0]
        if "trained_targets" in run and model in models and run.get("seed") == records[0]["seed"]:
            label = f"{model}, the README command ({run['commit']}: one epoch on 2 windows/user)"
            point = ([run["trained_targets"]], [run["test"]["full"]["ndcg@10"]])
            axis.plot(*point, marker="*", markersize=12, linestyle="none", label=label)
    for (dataset, seed), level in encoders.items():
        axis.axhline(level, linestyle="--", color="grey", label=f"its SASRec encoder ({dataset}, seed {seed})")
    labels = ("training targets seen (step 0 drawn at 100)", "test full NDCG@10", "Learning curve")
    finish_plot(figure, axis, labels, records[0], lines, Path(folder) / "learning_curve")


def finish_plot(figure, axis, labels, record, lines, stem):
    """Log x axis, ``labels`` (x, y, title), legend; ``<stem>.png`` and the table ``lines`` as ``<stem>.md``."""
    axis.set_xscale("log")
    axis.set_xlabel(labels[0])
    axis.set_ylabel(labels[1])
    axis.set_title(f"{labels[2]}, {record['dataset']}: {record['machine'].split(',')[0]}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(stem.with_suffix(".png"), dpi=120)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot_generative(folder, records, plt):
    """``learning_curve_generative.{png,md}``: HR@1 over all test users against training targets (answers) seen,
    with the encoder on the same candidate lists and a random pick as lines."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    lines = [
        "| model | dataset | seed | targets | epochs | train min | HR@1 (all) | HR@1 (valid) | ValidRatio | encoder on "
        "the same candidates |",
        "|---" * 10 + "|",
    ]
    for record in records:
        points = record["points"]
        axis.plot([max(p["targets"], 30) for p in points], [p["test"]["hr@1_all"] for p in points], marker="o",
                  label=f"{record['model']} (seed {record['seed']})")  # fmt: skip
        axis.axhline(record["encoder_test"]["hit@1"], linestyle="--", color="grey",
                     label=f"its SASRec encoder on the same candidates (seed {record['seed']})")  # fmt: skip
        for p in points:
            valid = p["test"]["hr@1_valid"]
            lines.append(f"| {record['model']} | {record['dataset']} | {record['seed']} | {p['targets']} | "
                         f"{p['targets'] / record['targets_per_epoch']:.2f} | {p['train_seconds'] / 60:.1f} | "
                         f"{p['test']['hr@1_all']:.4f} | {'–' if valid is None else f'{valid:.4f}'} | "
                         f"{p['test']['valid_ratio']:.3f} | {record['encoder_test']['hit@1']:.4f} |")  # fmt: skip
    axis.axhline(records[0]["random_pick"], linestyle=":", color="black", label="a random pick")
    labels = (
        "training targets (answers) seen (step 0 drawn at 30)",
        "HR@1 over all test users",
        "The paper's protocol",
    )
    finish_plot(figure, axis, labels, records[0], lines, Path(folder) / "learning_curve_generative")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="iLoRA")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--objective", choices=["head", "generative"], default="head")
    parser.add_argument("--windows-per-user", type=int, default=None,
                        help="head: 4 (default); generative: the shipped 1 sequence per user")  # fmt: skip
    parser.add_argument("--points", type=int, nargs="*", default=None,
                        help=f"head: {POINTS}; generative: {GENERATIVE_POINTS}")  # fmt: skip
    parser.add_argument("--sasrec-checkpoint", default=None)
    parser.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "learning_curve"))
    parser.add_argument("--output", default=None)
    parser.add_argument("--folder", default=str(FOLDER))
    parser.add_argument("--plot", action="store_true", help="only draw the curves found in --folder")
    parser.add_argument("--config-json", default=None, help="more settings as a JSON object (applied last)")
    args = parser.parse_args()
    if args.plot:
        plot(args.folder)
        return
    generative = args.objective == "generative"
    if args.windows_per_user is None and not generative:
        args.windows_per_user = 4
    if args.points is None:
        args.points = list(GENERATIVE_POINTS if generative else POINTS)
    if args.sasrec_checkpoint:
        args.sasrec_checkpoint = str(Path(args.sasrec_checkpoint).resolve())
    if args.output:
        args.output = str(Path(args.output).resolve())
    args.work, args.folder = str(Path(args.work).resolve()), str(Path(args.folder).resolve())
    Path(args.work).mkdir(parents=True, exist_ok=True)
    os.chdir(args.work)  # RecBole's log/ and log_tensorboard/ go there
    run(args)
    plot(args.folder)


if __name__ == "__main__":
    main()
