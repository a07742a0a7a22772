"""The speed path: switches that make a denoiser train or sample faster without changing what it computes beyond
floating-point rounding. Training switches are the methods' arguments (`model.compile`, `model.channels_last`,
`model.gradient_checkpointing`; the fused optimiser kernel is `optimizer.fused`); sampling switches are `sample.py`'s
`speed` block.

Attention needs no switch: diffusers' attention layers use `F.scaled_dot_product_attention` (AttnProcessor2_0,
flash / memory-efficient kernels on GPU) by default, and nothing in lightdiff replaces it.
"""

from __future__ import annotations

import logging
import typing
from dataclasses import dataclass
from typing import Literal

import torch

from lightdiff.config import ConfigError

log = logging.getLogger(__name__)

SamplingDtype = Literal["float32", "bfloat16", "float16"]
Quantization = Literal["int8_dynamic", "int8_weight_only", "fp8"]
# torch.compile's modes. "reduce-overhead" (and "max-autotune") replay CUDA graphs: one launch per compiled region
# instead of one per kernel, the gain that matters for a small net whose GPU time is mostly launch latency.
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compile_denoiser(net: torch.nn.Module, mode: CompileMode = "default") -> str:
    """`torch.compile` `net` in place (with torch.compile's `mode`) and say how: "regional" or "whole".

    Regional compilation (diffusers' `compile_repeated_blocks`) compiles one block class once and reuses it for
    every repetition, so compile time stays seconds, not minutes, where the model declares `_repeated_blocks`
    (UNet2DConditionModel's transformer blocks, Flux's, ...). Other networks (UNet2DModel) are compiled whole.
    In place (`Module.compile`, not `torch.compile(net)`): parameter names keep no `_orig_mod.` prefix, so
    checkpoints, EMA and export see the same state dict with or without compilation.
    """
    repeated = getattr(net, "_repeated_blocks", None) or ()
    if repeated and any(type(module).__name__ in repeated for module in net.modules()):
        net.compile_repeated_blocks(mode=mode)
        return "regional"
    net.compile(mode=mode)
    return "whole"


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether `module` or any of its sub-modules was compiled in place."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def prepare_for_training(
    net: torch.nn.Module, compile: bool, channels_last: bool, gradient_checkpointing: bool, role: str = "model"
) -> None:
    """Apply the training speed switches to `net` (in place); `role` names the config keys in errors."""
    if gradient_checkpointing:
        if not getattr(net, "_supports_gradient_checkpointing", False):
            raise ConfigError(
                f"{role}.gradient_checkpointing=true, but {type(net).__name__} does not support gradient checkpointing"
            )
        net.enable_gradient_checkpointing()  # activations are recomputed in backward: less memory, more compute
    if channels_last:
        # Only 4-D weights change layout; on GPU, cuDNN then runs the convolutions in NHWC (tensor-core friendly).
        net.to(memory_format=torch.channels_last)
    if compile:
        how = compile_denoiser(net)
        log.info("compiled %s (%s); the first steps include the compilation", type(net).__name__, how)


@dataclass(frozen=True)
class SamplingSpeed:
    """`sample.py`'s `speed` block: how the denoiser is run, and how far that may move the images."""

    dtype: SamplingDtype = "float32"  # the denoiser's (and a text model's VAE and text encoder's) weights and latents
    channels_last: bool = False  # NHWC weights: faster cuDNN convolutions on a GPU
    fuse_qkv: bool = False  # fused query/key/value projections (diffusers' fuse_qkv_projections)
    quantize: Quantization | None = None  # torchao weight quantisation of the linear layers
    compile: bool = False  # torch.compile, regional where diffusers defines repeated blocks
    compile_mode: CompileMode = "default"  # reduce-overhead: CUDA graphs (GPU; a CPU compiles as default)
    check: bool = True  # compare the first images with the plain fp32 eager path; stop past the tolerance
    check_images: int = 4  # how many images the check draws (both ways)
    tolerance: float | None = None  # largest per-image mean |difference| in [0, 1]; None: TOLERANCES by dtype

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"speed.dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.quantize not in (None, *typing.get_args(Quantization)):
            raise ConfigError(f"speed.quantize={self.quantize!r} is not one of {typing.get_args(Quantization)} or null")
        if self.compile_mode not in typing.get_args(CompileMode):
            raise ConfigError(f"speed.compile_mode={self.compile_mode!r} is not one of {typing.get_args(CompileMode)}")
        if self.check_images < 1:
            raise ConfigError(f"speed.check_images={self.check_images} must be at least 1")

    @property
    def is_plain(self) -> bool:
        """No switch on: the network runs as trained, in fp32 eager mode."""
        return (self.dtype, self.channels_last, self.fuse_qkv, self.quantize, self.compile) == (
            "float32",
            False,
            False,
            None,
            False,
        )

    @property
    def allowed_difference(self) -> float:
        return self.tolerance if self.tolerance is not None else tolerance_for(self.dtype, self.quantize)

    def apply(self, net: torch.nn.Module) -> torch.nn.Module:
        return prepare_for_sampling(
            net, self.dtype, self.channels_last, self.fuse_qkv, self.quantize, self.compile, self.compile_mode
        )


def prepare_for_sampling(
    net: torch.nn.Module,
    dtype: SamplingDtype,
    channels_last: bool,
    fuse_qkv: bool,
    quantize: Quantization | None,
    compile: bool,
    compile_mode: CompileMode = "default",
) -> torch.nn.Module:
    """The sampling speed path on `net` (in place, on its device), in the order diffusers' guides apply it:
    dtype, memory format, fused QKV projections, weight quantisation, then compilation of the result."""
    if dtype not in DTYPES:
        raise ConfigError(f"speed.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    if next(net.parameters()).dtype != DTYPES[dtype]:  # diffusers warns on every cast, even a no-op one
        net.to(dtype=DTYPES[dtype])
    if channels_last:
        net.to(memory_format=torch.channels_last)
    if fuse_qkv:
        if not hasattr(net, "fuse_qkv_projections"):
            raise ConfigError(f"speed.fuse_qkv=true, but {type(net).__name__} has no fused QKV projections")
        net.fuse_qkv_projections()  # one matmul for query, key and value (self-attention) / key and value (cross)
    if quantize is not None:
        quantize_weights(net, quantize)
    if compile:
        compile_denoiser(net, compile_mode)
    return net


def quantize_weights(net: torch.nn.Module, quantize: Quantization) -> None:
    """Dynamic int8, weight-only int8 or fp8 quantisation of the linear layers through torchao (optional: imported
    only here, so lightdiff runs without it). fp8 needs a GPU with fp8 tensor cores (compute capability >= 8.9)."""
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError as error:
        raise ConfigError(f"speed.quantize={quantize}: needs torchao (pip install 'lightdiff[quant]')") from error
    if quantize == "fp8":
        device = next(net.parameters()).device
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise ConfigError(
                f"speed.quantize=fp8 needs a CUDA GPU of compute capability >= 8.9; the model is on {device}"
            )
        config = Float8DynamicActivationFloat8WeightConfig()
    elif quantize == "int8_dynamic":
        config = Int8DynamicActivationInt8WeightConfig()
    elif quantize == "int8_weight_only":
        config = Int8WeightOnlyConfig()
    else:
        raise ConfigError(f"speed.quantize={quantize!r} is not one of int8_dynamic, int8_weight_only, fp8, null")
    quantize_(net, config)


# How far (mean absolute difference over images in [0, 1]) the fast path may move an image from the plain fp32
# eager one. Half precision rounds each step's output to 8 (bf16) or 11 (fp16) mantissa bits and the sampler
# carries that through every step; quantisation perturbs the weights themselves.
TOLERANCES: dict[str, float] = {"float32": 2e-3, "float16": 1e-2, "bfloat16": 3e-2, "quantized": 5e-2}


def tolerance_for(dtype: SamplingDtype, quantize: Quantization | None) -> float:
    return TOLERANCES["quantized"] if quantize is not None else TOLERANCES[dtype]


def fast_path_difference(plain: torch.Tensor, fast: torch.Tensor) -> float:
    """Largest per-image mean absolute difference between two batches of images in [0, 1]."""
    return float((plain.float() - fast.float()).abs().flatten(1).mean(dim=1).max())
