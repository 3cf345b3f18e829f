"""Where a run's figures come from: the code (commit, or the installed version), the machine (CPU model and its
bfloat16 units, GPU, memory), the libraries and torch's thread count, and the wall and CPU seconds of each phase.

The runner logs :func:`provenance_lines` at the start of every run and :class:`PhaseTimes` at its end, so any run's
log says what produced it; ``benchmarks/machine.py`` records the same :func:`hardware` string with every benchmark
figure.
"""

import contextlib
import logging
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# What a figure depends on: a change here that is not committed makes the figure no commit's.
TRACKED = ("recbole_ilora", "properties", "benchmarks")
LIBRARIES = ("recbole", "transformers", "peft", "bitsandbytes")


def cpu_flags():
    """The CPU's model name and its flags (``/proc/cpuinfo``; the platform's processor name elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            lines = file.read().splitlines()
    except OSError:
        return platform.processor() or platform.machine(), set()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return (names[0] if names else platform.machine()), set(flags)


BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # CPU flags of bfloat16 matrix units (Intel AMX, AMD Zen 4)


def has_bf16_units(flags):
    """Whether a CPU with these flags multiplies bfloat16 matrices in hardware."""
    return any(flag in flags for flag in BF16_FLAGS)


def bf16_units(flags):
    """What the CPU offers bfloat16 matrix products: 'AMX bfloat16' (Intel Xeon), 'avx512_bf16' (AMD EPYC Zen 4),
    or the widest vectors without either ('AVX2, no bfloat16 units'): bfloat16 steps differ by an order of magnitude
    between them (results/performance/step_dtype.md)."""
    if "amx_bf16" in flags:
        return "AMX bfloat16"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    widest = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{widest}, no bfloat16 units"


def hardware():
    """``'2 x AMD EPYC (avx512_bf16), no GPU, torch 2.13.0+cpu, 1 threads'``: CPU count, model and bfloat16 units
    (two machines of the same model name differ there, and a step's speed with them), GPU, torch and its threads."""
    import torch

    cpu, flags = cpu_flags()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    units = bf16_units(flags).replace(", ", "; ")  # no comma: the tables read the machine up to the first one
    threads = torch.get_num_threads()
    return f"{os.cpu_count()} x {cpu} ({units}), {gpu}, torch {torch.__version__}, {threads} threads"


def git(*args, cwd=PACKAGE_DIR):
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def uncommitted_changes(root=PACKAGE_DIR.parent):
    """Tracked files of the package, properties or benchmarks in the checkout at ``root`` that differ from its commit
    (staged or not)."""
    return git("diff", "--name-only", "HEAD", "--", *TRACKED, cwd=root).splitlines()


def code_version():
    """``'commit d70deb8'`` (``+uncommitted`` when the package, properties or benchmarks differ from it) in a git
    checkout; ``'recbole-ilora 0.3.0 (installed, no checkout)'`` otherwise."""
    root = git("rev-parse", "--show-toplevel")
    commit = git("rev-parse", "--short", "HEAD") if root else ""
    if commit and Path(root).resolve() == PACKAGE_DIR.parent:
        return f"commit {commit}" + ("+uncommitted" if uncommitted_changes(root) else "")
    try:
        return f"recbole-ilora {metadata.version('recbole-ilora')} (installed, no checkout)"
    except metadata.PackageNotFoundError:
        return "recbole-ilora (unknown version)"


def memory_gib():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def provenance_lines():
    """The header every run's log starts with: code, machine, libraries."""
    import torch

    cpu, flags = cpu_flags()
    memory = memory_gib()
    versions = []
    for name in LIBRARIES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} not installed")
    return [
        f"Code: {code_version()}",
        f"Machine: {os.cpu_count()} x {cpu} ({bf16_units(flags)}), "
        + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
        + (f", {memory:.0f} GiB" if memory else ""),
        f"Libraries: python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), {', '.join(versions)}",
    ]


def log_provenance(logger=None):
    """Log the run's provenance header (code, machine, libraries: :func:`provenance_lines`)."""
    from recbole.utils import set_color

    for line in provenance_lines():
        (logger or logging.getLogger()).info(set_color(line.split(":", 1)[0], "yellow") + ":" + line.split(":", 1)[1])


class PhaseTimes(dict):
    """Wall seconds per phase (the dict itself, the runner's ``timings``) and the process's CPU seconds per phase
    (``cpu``, over all its threads: two cores busy for a minute are 120 s)."""

    def __init__(self):
        super().__init__()
        self.cpu = {}

    def cpu_rounded(self):
        """The CPU seconds per phase, rounded to 0.01 s (as the runner logs them)."""
        return {name: round(seconds, 2) for name, seconds in self.cpu.items()}


@contextlib.contextmanager
def phase(timings, name):
    """Time the block as phase ``name`` of ``timings`` (a :class:`PhaseTimes`, or a plain dict: wall seconds only)."""
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - wall
        if isinstance(timings, PhaseTimes):
            timings.cpu[name] = timings.cpu.get(name, 0.0) + time.process_time() - cpu
