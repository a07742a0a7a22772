"""A frozen base stored in low precision under trainable LoRA adapters, or a distillation method's frozen teacher
(`model.base_quantization`, `model.base_storage`; methods/teacher.FrozenTeacher.store_in_low_precision): the memory
of a big base (FLUX.1-dev's 12B, Qwen-Image's 20B, Wan's 14B) on one GPU, as QLoRA arranges it (Dettmers et al.
2023): the base's weights quantised and frozen, the adapters trained in the compute dtype on top, gradients flowing
through the dequantised base into them.

- `base_quantization=int8 | fp8`: torchao's weight-only quantisation of the base's linear layers (`Int8WeightOnly-
  Config`: int8 with one scale per output channel; `Float8WeightOnlyConfig`: float8_e4m3 likewise), what diffusers'
  `TorchAoConfig("int8wo" / "float8wo")` applies when it loads a model; each layer dequantises in its matmul. The
  adapters (peft's `lora_A` / `lora_B`) and every layer that is not linear (convolutions, norms, embeddings) keep
  their dtype. 1 byte per quantised weight instead of 4 (fp32) or 2 (bf16).
- `base_quantization=nf4`: QLoRA's own 4-bit NormalFloat (Dettmers et al. 2023, Section 3: 16 levels at the normal
  distribution's quantiles, one absmax per block of 64 weights, the absmaxes double-quantised to 8 bits per block of
  256) as torchao's `NF4Tensor` (the one torchtune's QLoRA uses), which runs on CPU and GPU alike, where
  bitsandbytes' NF4 needs CUDA; ~0.53 bytes per weight. A layer whose weight count is not a multiple of 64 stays as
  it is (none in the real families: their widths are multiples of 64); a tiny layer takes a smaller double-
  quantisation block where 256 does not divide its block count.
- `base_storage=fp8`: diffusers' layerwise casting (`ModelMixin.enable_layerwise_casting`): the base's weights
  stored in float8_e4m3fn and cast to the compute dtype (the network's own) just before their layer runs, the lighter
  option (no quantisation kernels, no torchao). diffusers' default patterns skip the layers that do not survive it
  (patch and position embeddings, norms, the input and output projections) and peft's adapters; convolutions are
  skipped too (their backward reads the stored fp8 weight): a transformer's weights are nearly all stored in fp8, a
  UNet's attention and feed-forward layers only.

Only a base that does not train can be stored so (LoRA: the adapters train; a full fine-tune would update the
quantised weights; a teacher never trains). The adapters' files and exports belong to the unquantised base: a
checkpoint holds the adapters alone and records the base's fingerprint taken before quantisation, and sampling or
exporting reloads the base at full precision from its source, so a LoRA trained on an int8 base loads on the
original pipeline (what users share).
"""

from __future__ import annotations

import typing
from typing import Literal

import torch

from lightdiff.config import ConfigError
from lightdiff.nets.lora import is_adapter_key

BaseQuantization = Literal["none", "int8", "fp8", "nf4"]
BaseStorage = Literal["none", "fp8"]


def check_base_precision(quantization: str, storage: str, base_trains: bool) -> None:
    """Refuse, naming the keys, what cannot be stored so: an unknown value, both options at once, a base that trains,
    a missing torchao. Called before anything is built or written."""
    if quantization not in typing.get_args(BaseQuantization):
        raise ConfigError(
            f"model.base_quantization={quantization!r} is not one of {', '.join(typing.get_args(BaseQuantization))}"
        )
    if storage not in typing.get_args(BaseStorage):
        raise ConfigError(f"model.base_storage={storage!r} is not one of {', '.join(typing.get_args(BaseStorage))}")
    if quantization == "none" and storage == "none":
        return
    if quantization != "none" and storage != "none":
        raise ConfigError(
            f"model.base_quantization={quantization} and model.base_storage={storage}: one or the other (quantised "
            "weights are already stored in 1 byte)"
        )
    key = f"model.base_quantization={quantization}" if quantization != "none" else f"model.base_storage={storage}"
    if base_trains:
        raise ConfigError(
            f"{key} stores a frozen base under LoRA adapters, and this run trains the whole network: set "
            "model.lora.rank (and model.pretrained with model.load_pretrained_unet=true), or drop the option"
        )
    if quantization != "none":
        try:
            import torchao.quantization  # noqa: F401  (optional: only this option needs it)
        except ImportError as error:
            raise ConfigError(f"{key} needs torchao: pip install 'lightdiff[quant]'") from error


def store_frozen_base(net: torch.nn.Module, quantization: str, storage: str) -> None:
    """Store `net`'s frozen base weights as `check_base_precision` allowed, leaving its adapters as they are. Call it
    after the adapters are added and the base's fingerprint is taken (nets/lora.adapt)."""
    if quantization == "nf4":
        _to_nf4(net)
    elif quantization != "none":
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        config = Int8WeightOnlyConfig() if quantization == "int8" else Float8WeightOnlyConfig()

        def frozen_linear(module: torch.nn.Module, name: str) -> bool:
            return isinstance(module, torch.nn.Linear) and not is_adapter_key(f"{name}.weight")

        quantize_(net, config, filter_fn=frozen_linear)
    elif storage == "fp8":
        # The compute dtype is the network's own (fp32, or bf16 under trainer.precision=bf16-true). Convolutions stay
        # as they are: the cast puts the fp8 weight back after the layer runs, and a convolution's backward reads the
        # weight it saved, now fp8 ("expected scalar type Float but found Float8_e4m3fn"); a linear layer's does not.
        convolutions = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
        net.enable_layerwise_casting(
            storage_dtype=torch.float8_e4m3fn, compute_dtype=net.dtype, skip_modules_classes=convolutions
        )


NF4_BLOCK = 64  # weights per absmax (QLoRA's)
NF4_SCALER_BLOCK = 256  # absmaxes per double-quantisation block (QLoRA's)


def _to_nf4(net: torch.nn.Module) -> None:
    """Every frozen linear layer's weight as an NF4Tensor (its matmul dequantises to the weight's dtype)."""
    from torchao.quantization import to_nf4

    for name, module in net.named_modules():
        if not isinstance(module, torch.nn.Linear) or is_adapter_key(f"{name}.weight"):
            continue
        blocks, remainder = divmod(module.weight.numel(), NF4_BLOCK)
        if remainder:
            continue
        scaler_block = NF4_SCALER_BLOCK
        while blocks % scaler_block:  # a power of two that divides the block count (tiny test layers)
            scaler_block //= 2
        weight = to_nf4(module.weight.detach(), NF4_BLOCK, scaler_block)
        module.weight = torch.nn.Parameter(weight, requires_grad=False)
