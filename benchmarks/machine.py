"""What the benchmark scripts record about where a figure was measured: the hardware and the commit."""

import subprocess
from pathlib import Path

from recbole_ilora.provenance import TRACKED  # what a figure depends on

REPO = Path(__file__).resolve().parent.parent


def hardware():
    """CPU model and count, GPU, torch version and its thread count, e.g. '2 x Intel Xeon ..., no GPU, torch ...'
    (the runner's own provenance: ``recbole_ilora/provenance.py``)."""
    from recbole_ilora.provenance import hardware as runner_hardware

    return runner_hardware()


def git(*args):
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def uncommitted_changes():
    """Tracked files of the package, properties or benchmarks that differ from the checkout's commit."""
    return git("diff", "--name-only", "HEAD", "--", *TRACKED).splitlines()  # staged or not


def git_commit():
    """The checkout's short commit, '+uncommitted' when the code or properties differ from it."""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+uncommitted" if uncommitted_changes() else "")
