"""The plugin's own training step on the pretrained backbone, by weight format and compute dtype (issue 42, part 3).

    python benchmarks/step_dtype.py                       # ml-100k, SmolLM2-135M-Instruct, 4 settings
    python benchmarks/step_dtype.py --steps 2 --output /tmp/step.json

iLoRA (the shipped head objective: a loss at every history position, residual head) is built four times on the same
batches of ml-100k training windows (``train_batch_size`` windows of 10 items): NF4 4-bit or dense weights, each
with float32 or bfloat16 compute (``llm_load_in_4bit``, ``llm_compute_dtype``). For each: the median wall time of a
training step (forward, backward, Adam) after one warm-up step, the same steps' losses (the same starting weights:
how far bfloat16 moves them from float32), and the step's floating-point operations, counted by
``torch.utils.flop_counter`` on the dense float32 model (matrix products; a 4-bit step does the same products after
dequantising), as a fraction of the machine's peak: cores x FLOP per cycle x base clock, from /proc/cpuinfo's
flags (AVX-512: 64 float32 FLOP per cycle and core; AVX2: 32; bfloat16 units: AMX 1024, avx512_bf16 128). The
encoder is random (speed does not depend on it), the score head plain (so that step 0's loss reads the LLM).
Writes JSON and prints a table; results/performance.md quotes it.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from machine import git_commit, hardware  # noqa: E402

from recbole_ilora import provenance  # noqa: E402

SETTINGS = (
    ("nf4", "float32"),
    ("dense", "float32"),
    ("dense", "bfloat16"),
    ("nf4", "bfloat16"),
)


def base_clock_ghz():
    """The base clock: BogoMIPS / 2 on x86 (the TSC rate; a boost clock may be higher)."""
    with open("/proc/cpuinfo", encoding="utf-8") as file:
        for line in file:
            if line.lower().startswith("bogomips"):
                return float(line.split(":", 1)[1]) / 2000
    return None


def peak_gflops(cores):
    """``{dtype: peak GFLOP/s}`` of this machine's vector units at the base clock (a bound, not a promise)."""
    flags, ghz = provenance.cpu_flags()[1], base_clock_ghz()
    fp32 = 64 if "avx512f" in flags else 32 if "avx2" in flags else 16
    if "amx_bf16" in flags:
        bf16 = 1024
    elif "avx512_bf16" in flags:
        bf16 = 128
    else:  # no bfloat16 arithmetic: converted to float32
        bf16 = fp32
    return {"float32": cores * fp32 * ghz, "bfloat16": cores * bf16 * ghz}, ghz, sorted(
        flag for flag in flags if flag.startswith(("avx512", "amx", "avx2")))  # fmt: skip


def build(weights, dtype, batch_size):
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from recbole_ilora.config import Config
    from recbole_ilora.data import budget_training_data
    from recbole_ilora.model import iLoRA

    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        config = Config(model="iLoRA", dataset="ml-100k", config_dict={
            "show_progress": False, "sasrec_allow_random": True, "score_head": "plain", "train_batch_size": batch_size,
            "llm_load_in_4bit": weights == "nf4", "llm_compute_dtype": dtype, "shuffle": False,
        })  # fmt: skip
    finally:
        sys.argv = argv
    init_seed(2020, True)
    train_data, _, _ = data_preparation(config, create_dataset(config))
    loader, _ = budget_training_data(config, train_data, every_position=True)
    init_seed(2020, True)
    model = iLoRA(config, train_data._dataset).train()
    return model, loader


def count_flops(model, batch):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model.calculate_loss(batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(setting, steps, batch_size):
    """One setting's row (run in a child process of its own, so that a pathologically slow one can be stopped)."""
    import torch

    weights, dtype = setting.split("-")
    model, loader = build(weights, dtype, batch_size)
    iterator = iter(loader)
    batches = [next(iterator) for _ in range(steps + 1)]  # shuffle off: the same batches for every setting
    flops = count_flops(model, batches[0]) if (weights, dtype) == ("dense", "float32") else None
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses, times = [], []
    for batch in batches:
        started = time.perf_counter()
        optimizer.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)  # the first step warms up
        losses.append(float(loss))
    tokens = model.prompt_builder.lengths(batches[0]["item_id_list"], batches[0]["item_length"])
    return {"weights": weights, "compute_dtype": dtype, "warmup_step_seconds": times[0], "step_seconds": times[1:],
            "median_step_seconds": statistics.median(times[1:]), "losses": losses, "step_flops": flops,
            "mean_prompt_tokens": float(tokens.float().mean())}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", default=str(REPO / "results" / "performance" / "step_dtype.json"))
    parser.add_argument("--settings", nargs="*", default=[f"{w}-{d}" for w, d in SETTINGS])
    parser.add_argument("--give-up-after", type=float, default=600.0, help="seconds a setting may take in all")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: measure one setting
    parser.add_argument("--render", action="store_true", help="only write the Markdown table of --output's JSON")
    args = parser.parse_args()
    if args.render:
        render(Path(args.output))
        return
    if args.one:
        print("ROW " + json.dumps(measure(args.one, args.steps, args.batch_size)), flush=True)
        return

    import subprocess

    import torch

    results = []
    for setting in args.settings:
        command = [sys.executable, __file__, "--one", setting, "--steps", str(args.steps)]
        command += ["--batch-size", str(args.batch_size)]
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.give_up_after)
            rows = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
            if done.returncode or not rows:
                raise RuntimeError(f"{setting} failed:\n{done.stderr[-3000:]}")
            row = {**json.loads(rows[-1]), "gave_up": False}
        except subprocess.TimeoutExpired:
            weights, dtype = setting.split("-")
            row = {"weights": weights, "compute_dtype": dtype, "gave_up": True,
                   "stopped_after_seconds": time.perf_counter() - started}  # fmt: skip
        results.append(row)
        print(json.dumps(row), flush=True)

    flops = next((row["step_flops"] for row in results if row.get("step_flops")), None)
    cores = torch.get_num_threads()
    peaks, ghz, flags = peak_gflops(cores)
    reference = next((row for row in results if (row["weights"], row["compute_dtype"]) == ("nf4", "float32")), None)
    for row in results:
        if row["gave_up"]:
            continue
        if flops:
            row["gflops_per_second"] = flops / row["median_step_seconds"] / 1e9
            row["fraction_of_peak"] = row["gflops_per_second"] / peaks[row["compute_dtype"]]
        if reference:
            row["speedup_over_nf4_float32"] = reference["median_step_seconds"] / row["median_step_seconds"]
            row["max_loss_difference_from_nf4_float32"] = max(
                abs(a - b) for a, b in zip(row["losses"], reference["losses"], strict=True))  # fmt: skip
    record = {
        "machine": hardware(),
        "cpu_flags": flags,
        "base_clock_ghz": ghz,
        "peak_gflops": peaks,
        "commit": git_commit(),
        "batch_size": args.batch_size,
        "batch": "ml-100k training windows of 10 items (the first batches in time order), loss at every position",
        "step_flops": flops,
        "give_up_after_seconds": args.give_up_after,
        "settings": results,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n{record['machine']}; peak {peaks} GFLOP/s at {ghz:.2f} GHz; step {flops / 1e9 if flops else 0:.0f} GFLOP")
    print("| weights | compute | s/step | x NF4-fp32 | GFLOP/s | of peak | max |loss diff| |")
    for row in results:
        if row["gave_up"]:
            stopped = row["stopped_after_seconds"]
            print(f"| {row['weights']} | {row['compute_dtype']} | stopped after {stopped:.0f} s, unfinished |")
            continue
        cells = [row["weights"], row["compute_dtype"], f"{row['median_step_seconds']:.2f}"]
        cells.append(f"{row.get('speedup_over_nf4_float32', 0):.2f}")
        cells += [f"{row.get('gflops_per_second', 0):.0f}", f"{row.get('fraction_of_peak', 0):.0%}"]
        cells.append(f"{row.get('max_loss_difference_from_nf4_float32', 0):.4f}")
        print("| " + " | ".join(cells) + " |")
    print(f"wrote {output}")
    render(output)


def render(output):
    """``<output>.md``: the table of the JSON, with the machine, commit and what was measured."""
    record = json.loads(output.read_text())
    peaks = record["peak_gflops"]
    lines = [
        f"# The training step by weights and compute dtype ({record['machine']}; bfloat16 units: "
        f"{provenance.bf16_units(set(record['cpu_flags']))})",
        "",
        f"`python benchmarks/step_dtype.py` at commit `{record['commit']}`: iLoRA's head objective (a loss at every "
        f"position; the score head plain, so that the losses read the LLM) on SmolLM2-135M-Instruct, "
        f"{record['batch_size']} {record['batch']}; median of the timed steps after one warm-up step, each setting "
        f"in a process of its own. CPU flags: "
        f"{', '.join(record['cpu_flags']) or 'none of AVX2/AVX-512/AMX'}; peak {peaks['float32']:.0f} GFLOP/s float32 "
        f"and {peaks['bfloat16']:.0f} bfloat16 at the base clock {record['base_clock_ghz']:.2f} GHz (a boost clock "
        f"makes the true fraction lower); one step is {record['step_flops'] / 1e9:.0f} GFLOP (FlopCounterMode, dense "
        f"float32). Raw: `{output.name}`.",
        "",
        "| weights | compute | s/step | speed vs NF4 float32 | GFLOP/s | of peak | max loss difference vs NF4 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in record["settings"]:
        if row["gave_up"]:
            lines.append(f"| {row['weights']} | {row['compute_dtype']} | not one step in "
                         f"{row['stopped_after_seconds']:.0f} s (stopped) | | | | |")  # fmt: skip
            continue
        cells = [row["weights"], row["compute_dtype"], f"{row['median_step_seconds']:.2f}"]
        cells += [f"{row['speedup_over_nf4_float32']:.2f}x", f"{row['gflops_per_second']:.0f}"]
        cells += [f"{row['fraction_of_peak']:.0%}", f"{row['max_loss_difference_from_nf4_float32']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    output.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
