"""The frozen causal LLM behind the plugin's models: a local checkpoint (``llm_path``) or an embedded small LLaMA.

Both go through one loader, ``transformers.AutoModelForCausalLM.from_pretrained``, optionally 4-bit NF4 through
``BitsAndBytesConfig`` (``llm_load_in_4bit``), so the embedded default exercises the same path as Llama-2-7B.

The embedded backbone needs no download: a byte-pair tokenizer is trained offline with the ``tokenizers`` library
on the dataset's item texts and the prompt template, a ``LlamaConfig`` of the ``llm_*`` sizes is initialised with
``llm_init_seed`` and saved once under ``<checkpoint_dir>/embedded_llm/<hash>/``. The hash covers everything that
determines it, so an iLoRA checkpoint only needs the config to rebuild its frozen backbone.
"""

import hashlib
import json
import os
import shutil
import tempfile
from logging import getLogger

import torch

EMBEDDED_SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
_EMBEDDED_ARCH_KEYS = (
    "llm_hidden_size",
    "llm_num_layers",
    "llm_num_heads",
    "llm_intermediate_size",
    "llm_vocab_size",
    "llm_init_seed",
)


def compute_dtype(config, device):
    """``llm_compute_dtype``: 'auto' is bfloat16 on CUDA and float32 on CPU."""
    name = config["llm_compute_dtype"] or "auto"
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"Make sure 'llm_compute_dtype' in ['auto', {', '.join(map(repr, dtypes))}], got {name!r}.")
    return dtypes[name]


def embedded_llm_dir(config, corpus):
    """Where the embedded backbone for this config and text corpus lives (content-addressed)."""
    digest = hashlib.sha256()
    digest.update(json.dumps({key: config[key] for key in _EMBEDDED_ARCH_KEYS}, sort_keys=True).encode())
    for text in corpus:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    cache_root = config["llm_cache_dir"] or os.path.join(config["checkpoint_dir"], "embedded_llm")
    return os.path.join(cache_root, f"llama-{digest.hexdigest()[:16]}")


def train_embedded_tokenizer(corpus, vocab_size):
    """A byte-pair tokenizer trained offline on ``corpus`` (reversible: Metaspace pre-tokenizer and decoder)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=EMBEDDED_SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(EMBEDDED_SPECIAL_TOKENS.values()), show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **EMBEDDED_SPECIAL_TOKENS)


def build_embedded_llm(config, corpus):
    """Create (once) and return the directory of the embedded small LLaMA and its tokenizer."""
    target = embedded_llm_dir(config, corpus)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # transformers writes model files from global rank 0 only: it builds, the others wait (several machines need
        # an llm_cache_dir they share, or the backbone built once beforehand by a one-process run).
        if torch.distributed.get_rank() == 0:
            _build_embedded_llm(config, corpus, target)
        torch.distributed.barrier()
        if not os.path.isfile(os.path.join(target, "config.json")):
            raise FileNotFoundError(
                f"The embedded LLaMA {target} built by the first process is not visible here: with several machines, "
                "set llm_cache_dir to a folder they share, or build it first with a one-process run."
            )
        return target
    return _build_embedded_llm(config, corpus, target)


def _build_embedded_llm(config, corpus, target):
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    getLogger().info(f"Building the embedded LLaMA backbone in {target}")
    tokenizer = train_embedded_tokenizer(corpus, config["llm_vocab_size"])
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config["llm_hidden_size"],
        intermediate_size=config["llm_intermediate_size"],
        num_hidden_layers=config["llm_num_layers"],
        num_attention_heads=config["llm_num_heads"],
        num_key_value_heads=config["llm_num_heads"],
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config["llm_init_seed"])
        model = LlamaForCausalLM(llama_config)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=os.path.dirname(target))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not os.path.isfile(os.path.join(target, "config.json")):  # not merely lost a race to another process
            raise
    return target


def require_bitsandbytes():
    """``llm_load_in_4bit`` needs bitsandbytes: an error at start-up where it cannot be imported (no fallback that
    would silently train another model than the one asked for)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"'llm_load_in_4bit' is True but bitsandbytes cannot be imported ({error}); install it (setup.cfg pins "
            "it) or set --llm_load_in_4bit=False for the dense backbone."
        ) from error


def _quantization_config(config, dtype):
    from transformers import BitsAndBytesConfig

    require_bitsandbytes()
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config["llm_4bit_quant_type"],
        bnb_4bit_use_double_quant=config["llm_4bit_double_quant"],
        bnb_4bit_compute_dtype=dtype,
    )


def disable_cpu_weight_repacking(model):
    """Keep gradients flowing through bitsandbytes 4-bit layers after an evaluation.

    bitsandbytes 0.50 repacks a ``Linear4bit`` weight in place on its first eval-mode, no-grad CPU forward (on
    AVX512-BF16 machines); later forwards then use a kernel without autograd and input gradients silently vanish.
    RecBole evaluates between training epochs, so the repacking is switched off on every 4-bit layer.
    Returns the number of layers changed.
    """
    changed = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def _device_map_target(device):
    """accelerate's placement for the whole model: a CUDA index, or 'cpu'."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return device.index if device.index is not None else torch.cuda.current_device()


def load_causal_lm(path, config, device):
    """Load a local causal LM and its tokenizer from ``path``, frozen, 4-bit when ``llm_load_in_4bit``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = compute_dtype(config, device)
    kwargs = {"dtype": dtype, "trust_remote_code": bool(config["llm_trust_remote_code"])}
    if config["llm_load_in_4bit"]:
        kwargs["quantization_config"] = _quantization_config(config, dtype)
        kwargs["device_map"] = {"": _device_map_target(device)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=kwargs["trust_remote_code"])
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(f"'llm_path' = {path!r} could not be loaded as a causal language model: {error}") from error
    if not config["llm_load_in_4bit"]:
        model.to(device)
    model.requires_grad_(False)
    model.config.use_cache = False
    disable_cpu_weight_repacking(model)
    return model, tokenizer


def load_backbone(config, corpus, device):
    """The frozen backbone and its tokenizer: ``llm_path`` when set, else the embedded LLaMA built on ``corpus``."""
    path = config["llm_path"]
    if path:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"'llm_path' = {path!r} is not a directory (a local Hugging Face checkpoint).")
    else:
        path = build_embedded_llm(config, corpus)
    return load_causal_lm(path, config, device)
