"""What the benchmark scripts record about where a figure was measured: the hardware and the commit."""

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def hardware():
    """CPU model and count, GPU, torch version and its thread count, e.g. '2 x Intel Xeon ..., no GPU, torch ...'."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            names = [line.split(":", 1)[1].strip() for line in file if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} x {cpu}, {gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


# What a figure depends on: a change here that is not committed makes the figure no commit's.
TRACKED = ("recbole_ilora", "properties", "benchmarks")


def git(*args):
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def uncommitted_changes():
    """Tracked files of the package, properties or benchmarks that differ from the checkout's commit."""
    return git("diff", "--name-only", "HEAD", "--", *TRACKED).splitlines()  # staged or not


def git_commit():
    """The checkout's short commit, '+uncommitted' when the code or properties differ from it."""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+uncommitted" if uncommitted_changes() else "")
