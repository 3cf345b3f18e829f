"""What iLoRA costs, measured: writes ``<output>/performance.md`` and ``<output>/performance.json``.

    python benchmarks/performance.py                  # everything (about 40 min on 2 CPU cores, README run included)
    python benchmarks/performance.py --skip-readme-run
    python benchmarks/performance.py --quick --output /tmp/perf   # tiny sizes and data: the pipeline in minutes

1. Train-step time of iLoRA (4 experts x rank 2), UniformLoRA (rank 8) and RecBole's SASRec on the same batches
   (ml-100k, the shipped batch size and prompt), for the embedded default backbone and for a larger LLaMA built
   from a config (>= 100M parameters); the models take turns, repeatedly, and medians are reported, so that the
   ratios come from the same stretch of this shared machine.
2. Trainable parameters, iLoRA / UniformLoRA.
3. Backbone memory at the larger config: NF4 4-bit vs bf16, as the bytes of the loaded model's parameters,
   buffers and quantization state, and the peak resident memory of a process that only loads it.
4. Evaluation: full-ranking users per second, and the cost of ``uni100`` (RecBole repeats each history 101 times)
   relative to full ranking on the same users.
5. Checkpoint bytes against the bytes of the trained parameters.
6. Wall time of the README's iLoRA command, split into data preparation, SASRec pretraining, model building
   (LLM loading), training and testing (the runner's own timings).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's recbole_ilora, even where another one is installed
from machine import git_commit, hardware  # noqa: E402  (benchmarks/machine.py, next to this script)

LARGE = {"llm_hidden_size": 1024, "llm_num_layers": 8, "llm_num_heads": 16, "llm_intermediate_size": 2816}
QUICK_DATA = {
    "dataset": "lastfm-tiny",
    "data_path": str(REPO / "tests" / "data"),
    "config_files": [str(REPO / "properties" / "dataset" / "lastfm.yaml")],
}
QUICK_SIZES = {"llm_hidden_size": 32, "llm_num_heads": 2, "llm_intermediate_size": 64, "llm_vocab_size": 400}
QUICK_LARGE = {"llm_hidden_size": 64, "llm_num_layers": 2, "llm_num_heads": 2, "llm_intermediate_size": 128}


def config_for(model, data, overrides):
    from recbole_ilora.config import Config

    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        config_dict = {"show_progress": False, **overrides}
        if "data_path" in data:
            config_dict["data_path"] = data["data_path"]
        return Config(model=model, dataset=data["dataset"], config_file_list=data.get("config_files"),
                      config_dict=config_dict)  # fmt: skip
    finally:
        sys.argv = argv


# ----------------------------------------------------------------------------------------------- measurements
def sasrec_checkpoint(data, work):
    """A SASRec encoder for the LLM models (one epoch: speed does not depend on its quality)."""
    from recbole_ilora.pipeline import train_and_evaluate

    config = config_for("SASRec", data, {"epochs": 1, "checkpoint_dir": str(work / "saved"), "test_modes": []})
    return train_and_evaluate(config, saved=True, verbose=False)["saved_model_file"]


def build(model_name, data, overrides, encoder, work):
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from recbole_ilora.utils import get_model

    extra = {"checkpoint_dir": str(work / "saved")}
    if model_name != "SASRec":
        extra["sasrec_checkpoint"] = encoder
    config = config_for(model_name, data, {**overrides, **extra})
    init_seed(config["seed"], True)
    train_data, valid_data, test_data = data_preparation(config, create_dataset(config))
    model = get_model(model_name)(config, train_data._dataset)
    if hasattr(model, "attach_splits"):
        model.attach_splits(train_data, valid_data, test_data)
    return config, model, train_data, test_data


def step_times(data, overrides, encoder, work, repeats, steps, warmup=1):
    """Median seconds per training step of each model on the same batches, the models taking turns."""
    import torch

    models, batches = {}, None
    for name in ("iLoRA", "UniformLoRA", "SASRec"):
        config, model, train_data, _ = build(name, data, overrides, encoder, work)
        if batches is None:
            iterator = iter(train_data)
            batches = [next(iterator) for _ in range(steps)]
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        models[name] = (model.train(), optimizer)
    trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, (m, _) in models.items()}

    def step(model, optimizer, batch):
        optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        optimizer.step()

    # Warm-up: the first steps of a large model are slower (the allocator and the page faults of fresh memory).
    for _ in range(warmup):
        for model, optimizer in models.values():
            step(model, optimizer, batches[0])
    times = {name: [] for name in models}
    for turn in range(repeats):
        order = list(models.items()) if turn % 2 == 0 else list(models.items())[::-1]  # nobody always goes first
        for name, (model, optimizer) in order:
            for batch in batches:
                started = time.perf_counter()
                step(model, optimizer, batch)
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    profile = profile_steps(models["iLoRA"], batches)
    prompt_tokens = models["iLoRA"][0].prompt_builder.lengths(batches[0]["item_id_list"], batches[0]["item_length"])
    return {
        "batch_size": len(batches[0]["item_id"]),
        "mean_prompt_tokens": float(prompt_tokens.float().mean()),
        "backbone_parameters": parameter_count(models["iLoRA"][0].llm.peft_model.get_base_model()),
        "steps_timed_per_model": len(times["iLoRA"]),
        "warmup_steps_per_model": warmup,
        "median_step_seconds": medians,
        "step_seconds": times,
        "ilora_over_lora": medians["iLoRA"] / medians["UniformLoRA"],
        "ilora_over_sasrec": medians["iLoRA"] / medians["SASRec"],
        "trainable_parameters": trainable,
        "trainable_ilora_over_lora": trainable["iLoRA"] / trainable["UniformLoRA"],
        "ilora_profile": profile,
    }


def profile_steps(model_and_optimizer, batches, top=12):
    """torch.profiler over iLoRA's training steps: the operators that take the time (self CPU share)."""
    from torch.profiler import ProfilerActivity, profile

    model, optimizer = model_and_optimizer
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for batch in batches:
            optimizer.zero_grad()
            model.calculate_loss(batch).backward()
            optimizer.step()
    events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in events)
    return [
        {"operator": event.key, "self_cpu_share": event.self_cpu_time_total / total, "calls": event.count}
        for event in events[:top]
    ]


def parameter_count(model):
    """Parameters of a model, counting a 4-bit packed tensor by the elements it stands for."""
    total = 0
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        total += state.shape.numel() if state is not None else parameter.numel()
    return total


def peak_rss_bytes():
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    with open("/proc/self/status", encoding="utf-8") as file:
        for line in file:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def model_bytes(model):
    """Bytes of parameters, buffers and bitsandbytes quantization state (absmax, nested state, code)."""
    import torch

    seen, total = set(), 0

    def add(tensor):
        nonlocal total
        if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()

    for tensor in list(model.parameters()) + list(model.buffers()):
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        while state is not None:
            for value in vars(state).values():
                add(value)
            state = getattr(state, "state2", None)
    return total


def memory_worker(spec):
    """Load the larger backbone one way (in its own process) and report its bytes and the peak RSS."""
    import torch

    from recbole_ilora.model.backbone import build_embedded_llm, load_causal_lm

    config = config_for("iLoRA", spec["data"], {**spec["overrides"], "checkpoint_dir": spec["work"]})
    path = build_embedded_llm(config, spec["corpus"])
    baseline = peak_rss_bytes()
    model, _ = load_causal_lm(path, config, torch.device("cpu"))
    print(
        json.dumps(
            {
                "bytes": model_bytes(model),
                "parameters": parameter_count(model),
                "peak_rss_bytes": peak_rss_bytes(),
                "peak_rss_before_loading_bytes": baseline,
            }
        )
    )


def backbone_memory(data, overrides, work):
    """NF4 vs bf16 for the same (larger) embedded LLaMA, each loaded in a fresh process."""
    from recbole.data import create_dataset, data_preparation

    from recbole_ilora.model.prompt import fill_missing_texts, item_texts, split_template

    config = config_for("iLoRA", data, {**overrides, "checkpoint_dir": str(work / "saved")})
    dataset = data_preparation(config, create_dataset(config))[0]._dataset  # item features as tensors
    texts = fill_missing_texts(item_texts(dataset, config["prompt_text_field"]), dataset)
    # The corpus the model itself trains the embedded tokenizer on, so that the cached LLaMA is shared.
    corpus = [*split_template(config["prompt_template"]), config["prompt_item_separator"], *texts[1:]]
    results = {}
    for name, extra in {
        # Modules bitsandbytes leaves unquantized (embeddings, LM head, norms) take the compute dtype: bf16 as on a
        # GPU for the comparison, and float32 (this plugin's CPU default) for reference.
        "nf4": {"llm_load_in_4bit": True, "llm_compute_dtype": "bfloat16"},
        "nf4_float32_compute": {"llm_load_in_4bit": True, "llm_compute_dtype": "float32"},
        "bf16": {"llm_load_in_4bit": False, "llm_compute_dtype": "bfloat16"},
    }.items():
        spec = {"data": data, "overrides": {**overrides, **extra}, "work": str(work / "saved"), "corpus": corpus}
        output = subprocess.run(
            [sys.executable, __file__, "--memory-worker", json.dumps(spec)], capture_output=True, text=True, check=True
        ).stdout
        results[name] = json.loads(output.strip().splitlines()[-1])
    results["nf4_over_bf16_bytes"] = results["nf4"]["bytes"] / results["bf16"]["bytes"]
    results["nf4_over_bf16_peak_rss"] = results["nf4"]["peak_rss_bytes"] / results["bf16"]["peak_rss_bytes"]
    return results


def evaluation_costs(data, overrides, encoder, work, repeats, users):
    """Full-ranking users per second, and uni100 against full ranking on the same users."""
    import torch
    from recbole.utils import init_seed

    from recbole_ilora.data import protocol_test_data
    from recbole_ilora.trainer import LLMRecTrainer

    config, model, _, _ = build("iLoRA", data, overrides, encoder, work)
    model.eval()
    trainer = LLMRecTrainer(config, model)
    full, sampled = protocol_test_data(config, "full"), protocol_test_data(config, "uni100")
    trainer.tot_item_num = full._dataset.item_num  # what Trainer.evaluate sets before its batch loop

    def first_users(loader):
        batches, count = [], 0
        init_seed(config["seed"], True)
        for batch in loader:
            batches.append(batch)
            count += int(batch[2].max()) + 1 if batch[2] is not None and len(batch[2]) else len(batch[0])
            if count >= users:
                break
        return batches

    full_batches, sampled_batches = first_users(full), first_users(sampled)
    full_users = sum(len(batch[0]) for batch in full_batches)
    sampled_users = sum(int(batch[2].max()) + 1 for batch in sampled_batches)
    full_times, sampled_times = [], []
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            for batch in full_batches:
                trainer._full_sort_batch_eval(batch)
            full_times.append((time.perf_counter() - started) / full_users)
            started = time.perf_counter()
            for batch in sampled_batches:
                trainer._neg_sample_batch_eval(batch)
            sampled_times.append((time.perf_counter() - started) / sampled_users)
    return {
        "users": {"full": full_users, "uni100": sampled_users},
        "full_users_per_second": 1.0 / statistics.median(full_times),
        "uni100_users_per_second": 1.0 / statistics.median(sampled_times),
        "uni100_over_full_per_user": statistics.median(sampled_times) / statistics.median(full_times),
    }


def checkpoint_bytes(data, overrides, encoder, work):
    """Train two steps, save through the trainer, compare file sizes with the trained parameters' bytes."""
    from recbole_ilora.checkpoints import training_state_file
    from recbole_ilora.trainer import LLMRecTrainer

    config, model, train_data, _ = build("iLoRA", data, overrides, encoder, work)
    trainer = LLMRecTrainer(config, model)
    iterator = iter(train_data)
    model.train()
    for _ in range(2):
        trainer.optimizer.zero_grad()
        model.calculate_loss(next(iterator)).backward()
        trainer.optimizer.step()
    trainer.best_valid_score = 0.0
    trainer._save_checkpoint(0, verbose=False)
    trainer.save_training_state(1)  # what resuming epoch 1 reads
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    model_file = os.path.getsize(trainer.saved_model_file)
    state_file = os.path.getsize(training_state_file(trainer.saved_model_file))
    return {
        "trained_parameter_bytes": trained,
        "model_checkpoint_bytes": model_file,
        "training_state_bytes": state_file,
        "model_checkpoint_over_trained": model_file / trained,
        "both_files_over_trained": (model_file + state_file) / trained,
    }


def readme_run(work, quick):
    """The README's iLoRA command in a fresh folder; the runner logs its per-phase timings."""
    command = [sys.executable, str(REPO / "run_recbole_ilora.py"), "--model=iLoRA", "--show_progress=False"]
    if quick:
        command += [f"--dataset={QUICK_DATA['dataset']}", f"--data_path={QUICK_DATA['data_path']}"]
        command += [f"--config_files={QUICK_DATA['config_files'][0]}", "--sasrec_epochs=1"]
        command += [f"--{key}={value}" for key, value in QUICK_SIZES.items()]
    else:
        command += ["--dataset=ml-100k"]
    folder = Path(tempfile.mkdtemp(dir=work, prefix="readme-run-"))
    started = time.perf_counter()
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    line = next(line for line in (result.stdout + result.stderr).splitlines() if "timings (s)" in line)
    timings = json.loads(line.split("timings (s)", 1)[1].split(":", 1)[1])
    return {"command": " ".join(command[1:]).replace(str(REPO) + os.sep, ""), "wall_seconds": wall, **timings}


# ----------------------------------------------------------------------------------------------- report
def render(results):
    lines = [
        "# Performance: what iLoRA costs",
        "",
        f"`{results['command']}` at commit `{results['commit']}` on {results['hardware']}, "
        f"{results['date']}. Medians over repeated runs; every ratio is measured within one run (the models "
        "take turns on the same batches). Raw figures: `performance.json`.",
        "",
        "The training step by weights and compute dtype, per machine: [performance/step_dtype.md]"
        "(performance/step_dtype.md) (`benchmarks/step_dtype.py`).",
        "",
        "## 1-2. Train step and trainable parameters (batches of the shipped size: 64 histories of 10 items)",
        "",
        "| backbone | backbone params | batch | mean prompt tokens | iLoRA s/step | UniformLoRA s/step | "
        "SASRec s/step | iLoRA / LoRA time | iLoRA / LoRA params |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, item in results["steps"].items():
        median = item["median_step_seconds"]
        lines.append(
            f"| {name} | {item['backbone_parameters']:,} | {item['batch_size']} | {item['mean_prompt_tokens']:.0f} | "
            f"{median['iLoRA']:.3f} | {median['UniformLoRA']:.3f} | {median['SASRec']:.4f} | "
            f"{item['ilora_over_lora']:.3f} | {item['trainable_ilora_over_lora']:.4f} "
            f"({item['trainable_parameters']['iLoRA']:,} / {item['trainable_parameters']['UniformLoRA']:,}) |"
        )
    for name, item in results["steps"].items():
        if item.get("ilora_profile"):
            lines += ["", f"Where an iLoRA step spends its time ({name}; torch.profiler, self CPU time):", ""]
            lines += ["| operator | share | calls |", "|---|---|---|"]
            lines += [
                f"| `{op['operator']}` | {op['self_cpu_share']:.1%} | {op['calls']} |" for op in item["ilora_profile"]
            ]
    memory = results.get("memory")
    if memory:
        lines += [
            "",
            "## 3. Backbone memory at the larger config",
            "",
            "| load | parameters | bytes (params + buffers + quant state) | peak RSS of a process that loads it |",
            "|---|---|---|---|",
        ]
        labels = {
            "nf4": "NF4 4-bit, bf16 compute (unquantized modules in bf16)",
            "nf4_float32_compute": "NF4 4-bit, float32 compute (the CPU default; unquantized modules in float32)",
            "bf16": "bf16",
        }
        for name, label in labels.items():
            item = memory[name]
            lines.append(
                f"| {label} | {item['parameters']:,} | {item['bytes']:,} | {item['peak_rss_bytes'] / 2**20:,.0f} MiB |"
            )
        lines.append(
            f"| **NF4 (bf16 compute) / bf16** | | **{memory['nf4_over_bf16_bytes']:.3f}** | "
            f"{memory['nf4_over_bf16_peak_rss']:.3f} |"
        )
    evaluation = results["evaluation"]
    lines += [
        "",
        "## 4. Evaluation (default backbone)",
        "",
        f"Full ranking: {evaluation['full_users_per_second']:.1f} users/s; uni100: "
        f"{evaluation['uni100_users_per_second']:.1f} users/s; **uni100 / full = "
        f"{evaluation['uni100_over_full_per_user']:.3f}** per user (users timed: {evaluation['users']}).",
        "",
        "## 5. Checkpoint size (default backbone)",
        "",
    ]
    checkpoint = results["checkpoint"]
    lines += [
        f"Trained parameters {checkpoint['trained_parameter_bytes']:,} bytes; model checkpoint "
        f"{checkpoint['model_checkpoint_bytes']:,} bytes (**{checkpoint['model_checkpoint_over_trained']:.3f}x**); "
        f"training-state companion (optimizer, for resuming) {checkpoint['training_state_bytes']:,} bytes "
        f"(both files {checkpoint['both_files_over_trained']:.3f}x).",
    ]
    readme = results.get("readme_run")
    if readme:
        lines += [
            "",
            "## 6. The README's iLoRA command",
            "",
            f"`{readme['command']}`: wall clock {readme['wall_seconds'] / 60:.2f} min"
            + (f" (measured at commit `{readme['commit']}`, {readme['date']})." if "commit" in readme else "."),
            "",
            "| phase | seconds |",
            "|---|---|",
        ]
        for key in ("data_preparation", "sasrec_pretraining", "model_building", "training", "testing"):
            lines.append(f"| {key.replace('_', ' ')} | {readme[key]:.1f} |")
        other = readme["wall_seconds"] - sum(
            readme[k] for k in ("data_preparation", "sasrec_pretraining", "model_building", "training", "testing")
        )
        lines.append(f"| interpreter start, imports, configuration | {other:.1f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(REPO / "results"))
    parser.add_argument("--work", help="checkpoints and the embedded LLaMAs (default: benchmarks/work/performance)")
    parser.add_argument("--quick", action="store_true", help="tiny data and sizes: checks the pipeline in minutes")
    parser.add_argument("--repeats", type=int, default=5, help="turns per model (default 5)")
    parser.add_argument("--skip-readme-run", action="store_true", help="leave out measurement 6")
    parser.add_argument("--readme-run-from", help="take measurement 6 from an earlier performance.json (its commit)")
    parser.add_argument("--skip-large", action="store_true", help="leave out the larger backbone (1 and 3)")
    parser.add_argument("--only-memory", action="store_true", help="measurement 3 alone, merged into the JSON")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        return memory_worker(json.loads(args.memory_worker))

    work = Path(args.work or REPO / "benchmarks" / "work" / "performance").resolve()
    work.mkdir(parents=True, exist_ok=True)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    data = QUICK_DATA if args.quick else {"dataset": "ml-100k"}
    default = QUICK_SIZES if args.quick else {}
    large = {**QUICK_SIZES, **QUICK_LARGE} if args.quick else LARGE
    os.chdir(work)  # RecBole's log/ and saved/
    results = {
        "command": "python benchmarks/performance.py" + (" --quick" if args.quick else ""),
        "commit": git_commit(),
        "hardware": hardware(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if args.only_memory:  # rerun measurement 3 and merge it into an existing performance.json
        results = json.loads((output / "performance.json").read_text(encoding="utf-8"))
        results["memory"] = backbone_memory(data, large, work)
        results["memory_commit"] = git_commit()
        (output / "performance.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
        (output / "performance.md").write_text(render(results), encoding="utf-8")
        print(json.dumps(results["memory"], indent=1))
        return 0
    encoder = sasrec_checkpoint(data, work)
    steps = 2 if args.quick else 4
    results["steps"] = {"embedded default": step_times(data, default, encoder, work, args.repeats, steps)}
    print(json.dumps(results["steps"], indent=1), flush=True)
    if not args.skip_large:
        results["steps"]["larger config"] = step_times(data, large, encoder, work, args.repeats + 1, 1, warmup=3)
        print(json.dumps(results["steps"]["larger config"], indent=1), flush=True)
        results["memory"] = backbone_memory(data, large, work)
        print(json.dumps(results["memory"], indent=1), flush=True)
    results["evaluation"] = evaluation_costs(data, default, encoder, work, args.repeats, 40 if args.quick else 256)
    print(json.dumps(results["evaluation"], indent=1), flush=True)
    results["checkpoint"] = checkpoint_bytes(data, default, encoder, work)
    print(json.dumps(results["checkpoint"], indent=1), flush=True)
    if args.readme_run_from:
        earlier = json.loads(Path(args.readme_run_from).read_text(encoding="utf-8"))
        results["readme_run"] = {**earlier["readme_run"], "commit": earlier["commit"], "date": earlier["date"]}
    elif not args.skip_readme_run:
        results["readme_run"] = readme_run(work, args.quick)
        print(json.dumps(results["readme_run"], indent=1), flush=True)
    (output / "performance.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (output / "performance.md").write_text(render(results), encoding="utf-8")
    print(f"wrote {output / 'performance.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
