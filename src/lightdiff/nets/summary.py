"""What a loaded model is made of: each network (a diffusers or transformers model: UNet or transformer, VAE, text
encoders, a teacher's, a discriminator's) with its class, parameter count and memory in its dtype, as the seed notes
tabulate SDXL-Turbo's parts. Logged at start by train.py (train.log and the wandb config) and sample.py."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass

import torch
from diffusers import ModelMixin
from torch import nn
from transformers import PreTrainedModel


@dataclass(frozen=True)
class Component:
    """One network of a model."""

    name: str  # its attribute path in the model (net, vae, conditioning.text_encoder_2, teacher.net, ...)
    cls: str  # its class
    parameters: int
    trainable: int  # parameters the optimiser updates (requires_grad)
    dtype: str  # of its parameters ("float16+float32" when mixed)
    bytes: int  # parameters and buffers, each in its own dtype

    def row(self) -> dict[str, object]:
        return asdict(self)


def _networks(module: nn.Module, prefix: str, seen: set[int]) -> Iterator[tuple[str, nn.Module]]:
    """The diffusers / transformers models inside `module` (each once, however often it is shared), outermost first."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if id(child) in seen:
            continue
        if isinstance(child, (ModelMixin, PreTrainedModel)):
            seen.add(id(child))
            yield path, child
        else:
            yield from _networks(child, path, seen)


def _component(name: str, tensors: list[torch.Tensor], trainable: int, cls: str) -> Component:
    dtypes = sorted({str(tensor.dtype).removeprefix("torch.") for tensor in tensors if tensor.is_floating_point()})
    return Component(
        name=name,
        cls=cls,
        parameters=sum(tensor.numel() for tensor in tensors if isinstance(tensor, nn.Parameter)),
        trainable=trainable,
        dtype="+".join(dtypes) or "-",
        bytes=sum(tensor.numel() * tensor.element_size() for tensor in tensors),
    )


def components(model: nn.Module) -> list[Component]:
    """Every network of `model`, then the parameters outside them ("other": class embeddings, heads) if any."""
    rows, covered, seen = [], set(), set()
    for name, network in _networks(model, "", seen):
        tensors = [*network.parameters(), *network.buffers()]
        covered.update(id(tensor) for tensor in tensors)
        trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
        rows.append(_component(name, tensors, trainable, type(network).__name__))
    rest = [tensor for tensor in [*model.parameters(), *model.buffers()] if id(tensor) not in covered]
    if any(isinstance(tensor, nn.Parameter) for tensor in rest):
        trainable = sum(p.numel() for p in rest if isinstance(p, nn.Parameter) and p.requires_grad)
        rows.append(_component("other", rest, trainable, "-"))
    return rows


def source_of(name: str, sources: Mapping[str, str]) -> str:
    """The source recorded for component `name` (`conditioning.text_encoder_2`) under its longest matching prefix."""
    matches = [key for key in sources if name == key or name.startswith(f"{key}.")]
    return sources[max(matches, key=len)] if matches else ""


def summary_table(rows: list[Component], sources: Mapping[str, str] | None = None) -> str:
    """The rows as a fixed-width table with a total line (memory in MiB); with `sources` (component name or prefix
    -> where its weights came from), a last column says so."""
    header = f"{'component':<34} {'class':<30} {'parameters':>14} {'trainable':>14} {'dtype':<16} {'MiB':>9}"
    header += "  from" if sources else ""
    lines = [header, "-" * len(header)]
    for row in rows:
        line = (
            f"{row.name:<34} {row.cls:<30} {row.parameters:>14,} {row.trainable:>14,} {row.dtype:<16} "
            f"{row.bytes / 2**20:>9.1f}"
        )
        lines.append(f"{line}  {source_of(row.name, sources)}".rstrip() if sources else line)
    parameters, trainable = sum(r.parameters for r in rows), sum(r.trainable for r in rows)
    total_bytes = sum(r.bytes for r in rows)
    lines.append(f"{'total':<34} {'':<30} {parameters:>14,} {trainable:>14,} {'':<16} {total_bytes / 2**20:>9.1f}")
    return "\n".join(lines)
