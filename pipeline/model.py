"""Loading the reference model and tokenizer from a local directory, with provenance hashes.

    loaded = load_model(cfg.model)     # -> LoadedModel(model, tokenizer, device, dtype)

Weights load from safetensors only and `trust_remote_code` stays off unless the config turns it on.
`dtype: auto` picks bf16 on CUDA devices that support it and on CPUs with bf16 instructions
(AMX or AVX512-BF16), fp32 elsewhere (`cpu_supports_bf16`).
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError

from pipeline.config import ConfigError, ModelConfig
from pipeline.log import get_logger

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype  # as `model.dtype` resolved it (`auto` picks per device)


def resolve_device(name: str) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("model.device: 'cuda' asked for but CUDA is not available")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def cpu_supports_bf16() -> bool:
    """Whether this CPU multiplies bf16 faster than fp32, by what was measured (docs/results/
    2026-12-05-score-compile.md; scoring SmolLM2-135M, bf16 over fp32 tokens/s):
    - AMX that oneDNN may use (no ONEDNN_MAX_CPU_ISA cap below it): 3.0-3.4x;
    - AVX512-BF16 without AMX (AMD EPYC): 1.7x;
    - the same AMX CPU with oneDNN capped at AVX512_CORE_BF16: 0.7-0.8x, so fp32;
    - AVX512 without bf16 instructions, which oneDNN's own check accepts but where it converts
      every operand to fp32 first: fp32, like every CPU without AVX512.
    Other architectures (ARM) keep oneDNN's check."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if torch.cpu._is_amx_tile_supported():
        return amx_in_use()
    return bool(torch.cpu._is_avx512_bf16_supported()) and onednn_cap() not in LOWER_THAN_AVX512_BF16


def onednn_cap() -> str:
    """The ISA oneDNN is capped at (ONEDNN_MAX_CPU_ISA), or ALL."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()


def amx_in_use() -> bool:
    """Whether oneDNN multiplies on AMX here: the CPU has it and no ONEDNN_MAX_CPU_ISA withholds it."""
    cap = onednn_cap()
    return bool(torch.cpu._is_amx_tile_supported()) and (cap in ("ALL", "DEFAULT") or "AMX" in cap)


# oneDNN's ISA names below AVX512_CORE_BF16 (ONEDNN_MAX_CPU_ISA)
LOWER_THAN_AVX512_BF16 = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            while block := fh.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def weight_files(cfg: ModelConfig) -> list[Path]:
    path = Path(cfg.path)
    if not path.is_dir():
        hint = " (build it with `make model`)" if "smollm2" in path.name else ""
        raise ConfigError(f"model.path: {cfg.path!r} is not a local model directory{hint}")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ConfigError(
            f"model.path: {cfg.path!r} has no *.safetensors weights (other formats are not loaded)"
        )
    return weights


def fingerprint(cfg: ModelConfig) -> dict[str, str]:
    """Hashes of the weights and tokenizer files: what makes two scoring runs comparable."""
    path = Path(cfg.path)
    return {
        "weights_sha256": hash_files(weight_files(cfg)),
        "tokenizer_sha256": hash_files([path / f for f in TOKENIZER_FILES if (path / f).is_file()]),
    }


def check_model_dir(cfg: ModelConfig) -> None:
    """What a model directory must hold, checked before transformers reads it (whose own errors
    for a missing part are misleading: no tokenizer reads as 'need sentencepiece or tiktoken')."""
    path = Path(cfg.path)
    weight_files(cfg)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.path: {cfg.path!r} has no config.json (save the model with save_pretrained)"
        )
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise ConfigError(
            f"model.path: {cfg.path!r} has no tokenizer (tokenizer.json); save it beside the model with "
            "tokenizer.save_pretrained"
        )


def load_model(cfg: ModelConfig) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(cfg.path)
    check_model_dir(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    # a damaged or foreign directory; a config.json with a field of the wrong type (StrictDataclassError)
    except (
        OSError,
        ValueError,
        TypeError,
        KeyError,
        RuntimeError,
        SafetensorError,
        StrictDataclassError,
    ) as err:
        message = " ".join(str(err).split())[:300]
        raise ConfigError(
            f"model.path: {cfg.path!r} cannot be loaded ({type(err).__name__}: {message})"
        ) from None
    model.to(device).eval()
    if not tokenizer.is_fast:
        raise ConfigError(
            f"model.path: {cfg.path!r}: a fast (Rust) tokenizer is needed for character offsets"
        )
    get_logger().info(f"model {path} on {device} in {str(dtype).removeprefix('torch.')}")
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, dtype=dtype)
