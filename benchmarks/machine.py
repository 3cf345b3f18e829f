"""What the benchmark scripts record about where a figure was measured: the hardware and the commit."""

from pathlib import Path

from recbole_ilora import provenance

REPO = Path(__file__).resolve().parent.parent


def hardware():
    """CPU model and count, GPU, torch version and its thread count, e.g. '2 x Intel Xeon ..., no GPU, torch ...'
    (the runner's own provenance: ``recbole_ilora/provenance.py``)."""
    return provenance.hardware()


def uncommitted_changes():
    """Tracked files of the package, properties or benchmarks that differ from this checkout's commit."""
    return provenance.uncommitted_changes(REPO)


def git_commit():
    """The checkout's short commit, '+uncommitted' when the code or properties differ from it."""
    commit = provenance.git("rev-parse", "--short", "HEAD", cwd=REPO) or "unknown"
    return commit + ("+uncommitted" if uncommitted_changes() else "")
