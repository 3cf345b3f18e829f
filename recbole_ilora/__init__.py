"""recbole-ilora: LLM-based sequential recommenders (first of all iLoRA) as a RecBole plugin.

Importing the package has no side effects: torch, RecBole and bitsandbytes load only when a submodule that
needs them is imported.
"""

__version__ = "0.1.0"
