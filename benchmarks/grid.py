"""The benchmark grid's command line: models x datasets x seeds, resumable, with reports. The grid is the package
``benchmarks/gridlib`` (its docstring, and ``python benchmarks/grid.py --help``, say what it does and how).

    python benchmarks/grid.py --status              # what is done and what is pending, without running
    python benchmarks/grid.py --help                # every option
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's recbole_ilora and benchmarks

from benchmarks.gridlib.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
