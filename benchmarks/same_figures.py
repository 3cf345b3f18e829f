"""Does a change leave behaviour alone? Tiny-fixture runs of the code at a commit and of this working tree, compared
exactly: every test mode's metrics, every epoch's training loss and a digest of the trained weights.

    python benchmarks/same_figures.py --before 86440ef [--runs ilora generative laser cofirec] [--output F.json]
    python benchmarks/same_figures.py --before ecd2856 --after 0bd3ec1 --runs ilora ilora-smollm2    # two commits

Each run is a fresh process (``PYTHONPATH`` at the checkout: ``git worktree`` of ``--before`` in a temporary folder,
then this repository or ``--after``'s worktree) on the tiny LastFM fixture with the embedded random LLaMA
(``ilora-smollm2``: the pretrained SmolLM2 in 4-bit, converted by each run), one thread, reading one SASRec encoder
trained once here. A run whose model does not exist at ``--before`` is reported
as such. Issue 46's check: a restructuring must give bit-identical figures; issue 47's: which commit moved them.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# One run per configuration, on the fixture and sizes of tests/conftest.py's TINY.
RUN = r"""
import hashlib, json, sys
sys.path.insert(0, sys.argv[3])
from conftest import TINY
import torch
from recbole_ilora.quick_start import objective_function

laser = {"mformer_num_queries": 4, "mformer_hidden_size": 16, "mformer_num_heads": 2, "mformer_num_layers": 1}
runs = {
    "sasrec": {**TINY, "model": "SASRec", "epochs": 2},
    "ilora": {**TINY, "model": "iLoRA", "epochs": 1, "llm_train_sequences_per_user": 8,
              "test_modes": ["full", "uni19"]},
    "generative": {**TINY, "model": "iLoRA", "objective": "generative", "epochs": 1, "llm_train_sequences_per_user": 1,
                   "eval_args": {**TINY["eval_args"], "mode": "uni19"}, "test_modes": ["uni19"], "num_candidates": 5,
                   "generation_max_new_tokens": 4},
    "ilora-smollm2": {**TINY, "model": "iLoRA", "llm_backbone": "smollm2-135m-instruct", "epochs": 1,
                      "llm_train_sequences_per_user": 1, "test_modes": ["full"]},
    "laser": {**TINY, "model": "Laser", "epochs": 1, "test_modes": ["full"], **laser},
    "cofirec": {**TINY, "model": "CoFiRec", "epochs": 1, "cofirec_levels": ["{title}", "cf"],
                "cofirec_codebook_sizes": [16, 256], "cofirec_tokenizer_steps": 20, "cofirec_beam_size": 20,
                "lora_rank": 4, "test_modes": ["full", "uni19"]},
}
config = dict(runs[sys.argv[1]])
if sys.argv[2] != "-":
    config.update(sasrec_checkpoint=sys.argv[2], llm_cache_dir="llm-cache")
result = objective_function(config_dict=config)
state = torch.load(result["saved_model_file"], weights_only=True)["state_dict"]
weights = hashlib.sha256(b"".join(state[k].contiguous().cpu().numpy().tobytes() for k in sorted(state)))
tests = result.get("test_results") or {"test": result["test_result"]}
generative = {k: v for k, v in (result.get("generative_result") or {}).items() if k != "generations_file"}
figures = {"saved_model_file": result["saved_model_file"], "test": {m: dict(r) for m, r in tests.items()},
           "recbole_test": dict(result["test_result"]), "train_losses": result.get("train_losses"),
           "weights": weights.hexdigest(), "generative": generative}
print("FIGURES " + json.dumps(figures, default=float))
"""


def run(code_dir, name, encoder, folder):
    """The figures of one run of ``name`` with the package at ``code_dir`` (None: the model is not there)."""
    if name == "cofirec" and not (Path(code_dir) / "recbole_ilora" / "model" / "cofirec.py").exists():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "PYTHONPATH": str(code_dir), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", RUN, name, encoder or "-", str(REPO / "tests")]
    done = subprocess.run(command, cwd=folder, env=environment, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("FIGURES ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{name} at {code_dir} failed (exit {done.returncode}; -9: killed):\n{done.stderr[-3000:]}")
    figures = json.loads(lines[-1][len("FIGURES ") :])
    figures["saved_model_file"] = str(folder / figures["saved_model_file"])
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the commit to compare this working tree with")
    parser.add_argument("--runs", nargs="+", default=["ilora", "generative", "laser", "cofirec"])
    parser.add_argument("--after", default=None, help="compare with this commit instead of the working tree")
    parser.add_argument("--output", help="write the comparison as JSON here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        trees = {"before": args.before, "after": args.after}
        for name, commit in trees.items():
            if commit:
                subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(Path(temporary) / name),
                                commit], check=True, capture_output=True)  # fmt: skip
        before = Path(temporary) / "before"
        after = Path(temporary) / "after" if args.after else REPO
        try:
            work = Path(temporary) / "runs"
            encoder = run(REPO, "sasrec", None, work / "encoder")["saved_model_file"]
            report = {"before": args.before, "after": args.after or "the working tree", "runs": {}}
            for name in args.runs:
                old = run(before, name, encoder, work / f"before-{name}")
                new = run(after, name, encoder, work / f"now-{name}")
                if old is None:
                    report["runs"][name] = "not at --before"
                    print(f"{name}: no such model at {args.before}")
                    continue
                # an older commit may lack a figure (train_losses) or name the test modes otherwise: compare what
                # both have; RecBole's own test result and the trained weights always
                keys = [k for k in ("recbole_test", "test", "train_losses", "weights", "generative")
                        if old.get(k) is not None and new.get(k) is not None
                        and (k != "test" or set(old[k]) == set(new[k]))]  # fmt: skip
                same = {key: old[key] == new[key] for key in keys}
                report["runs"][name] = {"identical": all(same.values()), **same, "now": {k: new[k] for k in keys}}
                print(f"{name}: {'bit-identical' if all(same.values()) else 'DIFFERENT ' + str(same)}")
        finally:
            for name, commit in trees.items():
                if commit:
                    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                                    str(Path(temporary) / name)], check=False)  # fmt: skip
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1, default=float) + "\n")
    return 0 if all(isinstance(r, str) or r["identical"] for r in report["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
