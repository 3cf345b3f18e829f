"""The plugin's models, registered by name for ``recbole_ilora.utils.get_model``.

Importing this package applies the RecBole compatibility shims first (``recbole_ilora._compat``): its modules
import RecBole's sequential models, whose ``sine.py`` would otherwise switch on autograd anomaly mode.
"""

from recbole_ilora import _compat

_compat.apply()

from recbole_ilora.model.caseq import CaseQ  # noqa: E402
from recbole_ilora.model.cofirec import CoFiRec  # noqa: E402
from recbole_ilora.model.ilora import iLoRA  # noqa: E402
from recbole_ilora.model.laser import Laser  # noqa: E402
from recbole_ilora.model.uniform_lora import UniformLoRA  # noqa: E402

__all__ = ["CaseQ", "CoFiRec", "iLoRA", "Laser", "UniformLoRA"]
