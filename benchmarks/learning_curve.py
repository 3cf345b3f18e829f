"""How much training the LLM needs to pass its encoder: test full NDCG@10 against training targets seen (issue 42).

    python benchmarks/learning_curve.py --model iLoRA --sasrec-checkpoint saved/SASRec-....pth
    python benchmarks/learning_curve.py --model UniformLoRA --sasrec-checkpoint saved/SASRec-....pth
    python benchmarks/learning_curve.py --plot                   # the PNG and table of every curve in --folder

One run trains the model (the shipped head objective: a loss at every position of each window, residual head)
on each user's ``--windows-per-user`` most recent training windows, shuffled, with the shipped optimiser and
learning rate, and tests it (full ranking, RecBole's test split, every user) before training and each time the
targets seen pass a point of ``--points`` (log-spaced). The curve is one run read at several budgets, not one run
per budget: the learning rate is constant, so a run stopped at a point would be the same model. Both models of a
comparison read the same encoder (``--sasrec-checkpoint``; without it, one is pretrained with the shipped keys and
its path written into the JSON). The frozen encoder's own test is the horizontal line.

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
        "llm_train_sequences_per_user": args.windows_per_user,
        "checkpoint_dir": str(Path(args.work) / "saved"),
        "show_progress": False,
    }
    if args.sasrec_checkpoint:
        config_dict["sasrec_checkpoint"] = args.sasrec_checkpoint
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        files = [str(REPO / "properties" / "dataset" / f"{args.dataset}.yaml")] if args.dataset != "ml-100k" else None
        if args.dataset != "ml-100k":
            config_dict["data_path"] = str(REPO / "benchmarks" / "data")
        config = Config(model=args.model, dataset=args.dataset, config_file_list=files, config_dict=config_dict)
    finally:
        sys.argv = argv
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    train_data, _, test_data = prepare_data(config, create_filtered_dataset(config))
    model = prepare_model(config, train_data)
    loader, targets = budget_training_data(config, train_data, every_position=True)
    trainer = LLMRecTrainer(config, model)
    return config, model, loader, targets, test_data, trainer


def test_metrics(trainer, test_data):
    result = trainer.evaluate(test_data, load_best_model=False)
    return {key: float(value) for key, value in result.items()}


def run(args):
    import torch
    from recbole.trainer import Trainer

    from recbole_ilora.pipeline import sasrec_pretraining_config

    output = Path(args.output or FOLDER / f"{args.dataset}-{args.model}-seed{args.seed}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    state_file = Path(args.work) / (output.stem + ".state.pth")
    config, model, loader, epoch_targets, test_data, trainer = build(args)
    record = json.loads(output.read_text()) if output.exists() and state_file.exists() else None
    if record is None:
        encoder = Trainer(sasrec_pretraining_config(config), model.sasrec)
        record = {
            "model": args.model, "dataset": args.dataset, "seed": args.seed, "commit": git_commit(),
            "machine": hardware(), "sasrec_checkpoint": config["sasrec_checkpoint"],
            "windows_per_user": args.windows_per_user, "windows_per_epoch": len(loader.dataset),
            "targets_per_epoch": epoch_targets, "batch_size": config["train_batch_size"],
            "learning_rate": config["learning_rate"], "score_head": config["score_head"],
            "llm_loss_positions": config["llm_loss_positions"], "gate_scope": config["gate_scope"],
            "encoder_test": test_metrics(encoder, test_data),
            "points": [],
        }  # fmt: skip
        model.sasrec.eval()
        started = time.perf_counter()
        record["points"].append({"targets": 0, "windows": 0, "steps": 0, "train_seconds": 0.0,
                                 "test": test_metrics(trainer, test_data),
                                 "test_seconds": time.perf_counter() - started})  # fmt: skip
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
            progress["targets"] += int(batch[config["ITEM_LIST_LENGTH_FIELD"]].sum())
            print(f"step {progress['steps']}: {progress['targets']} targets, loss {float(loss):.4f}", flush=True)
            if progress["targets"] >= points[0]:
                points.pop(0)
                started = time.perf_counter()
                metrics = test_metrics(trainer, test_data)
                record["points"].append({**{k: progress[k] for k in ("targets", "windows", "steps", "train_seconds")},
                                         "epoch": progress["epoch"], "train_loss": sum(losses) / len(losses),
                                         "test": metrics, "test_seconds": time.perf_counter() - started})  # fmt: skip
                losses = []
                print(f"point {progress['targets']} targets: test ndcg@10 {metrics['ndcg@10']:.4f}", flush=True)
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

    records = [json.loads(path.read_text()) for path in sorted(Path(folder).glob("*.json"))]
    if not records:
        raise SystemExit(f"no curves in {folder}")
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
    axis.set_xscale("log")
    axis.set_xlabel("training targets seen (step 0 drawn at 100)")
    axis.set_ylabel("test full NDCG@10")
    axis.set_title(f"Learning curve, {records[0]['dataset']}: {records[0]['machine'].split(',')[0]}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(Path(folder) / "learning_curve.png", dpi=120)
    (Path(folder) / "learning_curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="iLoRA")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--windows-per-user", type=int, default=4)
    parser.add_argument("--points", type=int, nargs="*", default=list(POINTS))
    parser.add_argument("--sasrec-checkpoint", default=None)
    parser.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "learning_curve"))
    parser.add_argument("--output", default=None)
    parser.add_argument("--folder", default=str(FOLDER))
    parser.add_argument("--plot", action="store_true", help="only draw the curves found in --folder")
    args = parser.parse_args()
    if args.plot:
        plot(args.folder)
        return
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
