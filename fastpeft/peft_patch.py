"""fastpeft's kernels behind a real ``peft.PeftModel``: :func:`patch_peft_model` / :func:`unpatch_peft_model`.

The PeftModel stays PEFT's in every respect (class, modules, parameters, ``state_dict``,
``save_pretrained``, ``disable_adapter()``, ``merge_adapter``, ``set_adapter``, TRL's reference
model). Only the ``forward`` of each LoRA layer *instance* that fastpeft can fuse is replaced (an
instance attribute; no class is touched). That forward reads PEFT's own ``lora_A`` / ``lora_B`` /
``lora_magnitude_vector`` parameters and the base layer's weight (a dense ``nn.Linear`` weight, or a
bitsandbytes NF4 ``Params4bit``'s bytes in place) at every call and runs the fused
``fastpeft.kernels.lora_linear.lora_linear`` op:

- LoRA / rsLoRA (any ``scaling``), ``lora_bias`` (folded into the op's bias as s·b_B);
- DoRA: y = (m / ||W + s·B·A||) ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b, the norm detached, as PEFT;
- LoRA dropout while training: the base term through the op (the NF4 weight is dequantized into
  the kernel's workspace, never saved for backward), the adapter term with PEFT's own modules,
  s·B(A(dropout(x))), which is exactly PEFT's maths.

Per call, anything the fused path does not cover runs PEFT's own forward unchanged: disabled or
merged adapters, several active adapters in one layer, ``adapter_names`` (mixed batches), other
PEFT variants (aLoRA, ...), DoRA with dropout while training or with ``lora_bias``, a trainable base
weight, inputs PEFT would reject. Adapters added after patching run fused in patched layers; layers
PEFT creates later run PEFT's forward until :func:`patch_peft_model` is called again.

The fused op computes in one dtype: the autocast dtype inside ``torch.autocast``, else the input's
(a dense base) or the bitsandbytes compute dtype (NF4); adapters in another dtype (PEFT keeps them
in fp32 by default) are cast to it differentiably, as autocast would.

bitsandbytes layers: a weight bnb already repacked for its CPU kernel is restored to the standard
layout first (exactly; see :mod:`fastpeft.bnb_interop`) and patched layers are kept from being
repacked again; :func:`unpatch_peft_model` lets bnb repack again.
"""

from __future__ import annotations

import dataclasses
import logging
import types
from collections import Counter
from typing import Any

import torch
from torch import nn

from fastpeft.bnb_interop import is_linear4bit, keep_standard_layout, nf4_from_linear4bit
from fastpeft.kernels import lora_linear as _fused  # module attribute: one place to find the op
from fastpeft.kernels.autocast import autocast_dtype
from fastpeft.kernels.nf4 import NF4Weight
from fastpeft.kernels.nf4_dequantize import dequantize_nf4

logger = logging.getLogger("fastpeft")

SUPPORTED_PEFT_TYPES = ("LORA", "PREFIX_TUNING")
REPORT_ATTR = "fastpeft_patch_report"  # on the PeftModel instance
_PATCHED = "_fastpeft_patched"  # on each patched LoRA layer instance


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch_peft_model` did: module paths patched, and why the other LoRA layers were not."""

    patched: list[str]
    skipped: dict[str, str]
    prefix_attention: bool = False

    def __str__(self) -> str:
        total = len(self.patched) + len(self.skipped)
        head = f"fastpeft: {len(self.patched)} of {total} PEFT LoRA layers run fastpeft's fused kernels"
        if self.prefix_attention:
            head = "fastpeft: PEFT prefix tuning runs fastpeft's prefix-attention kernel"
        reasons = Counter(self.skipped.values())
        tail = "; ".join(f"{n} not patched: {reason}" for reason, n in reasons.most_common())
        return head + (f" ({tail})" if tail else "")


def _peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - peft is a test dependency
        raise ImportError("patch_peft_model needs the peft package (pip install peft)") from err
    return peft


def _check_peft_model(model: object, caller: str) -> str:
    """The PeftModel's peft type name; TypeError/ValueError in one line otherwise."""
    peft = _peft()
    if not isinstance(model, peft.PeftModel):
        raise TypeError(
            f"{caller} expects a peft.PeftModel (from peft.get_peft_model or PeftModel.from_pretrained), got "
            f"{type(model).__name__}; for a plain transformers model use fastpeft.inject"
        )
    peft_type = getattr(model.peft_type, "value", str(model.peft_type))
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise ValueError(
            f"{caller}: PEFT tuner {peft_type} is not supported; supported: {', '.join(SUPPORTED_PEFT_TYPES)}"
        )
    return peft_type


# -------------------------------------------------------------------------------- which layers fuse


def _layer_classes() -> tuple[type, type | None]:
    from peft.tuners.lora import layer as lora_layer

    try:
        from peft.tuners.lora import bnb as lora_bnb

        linear4bit = getattr(lora_bnb, "Linear4bit", None)
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        linear4bit = None
    return lora_layer.Linear, linear4bit


def _why_not_fusable(module: nn.Module) -> str | None:
    """None if ``module`` (a PEFT LoRA layer) gets the fused forward, else the reason it does not."""
    lora_linear_cls, lora_4bit_cls = _layer_classes()
    kind = f"{type(module).__module__.removeprefix('peft.tuners.')}.{type(module).__name__}"
    if type(module) is lora_linear_cls:
        base = module.get_base_layer()
        if isinstance(base, nn.Linear) and type(base).__module__.split(".")[0] in ("torch", "transformers"):
            return None
        if type(base).__name__ == "Conv1D" and getattr(module, "fan_in_fan_out", False):
            return None
        return f"{kind} over {type(base).__name__}: only dense nn.Linear / Conv1D bases are fused"
    if lora_4bit_cls is not None and type(module) is lora_4bit_cls:
        quant_type = getattr(module.get_base_layer().weight, "quant_type", None)
        if quant_type == "nf4":
            return None
        return f"bitsandbytes {quant_type} weights: fastpeft's kernels read NF4 only"
    return f"{kind}: this PEFT layer type has no fused kernel"


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora.layer import LoraLayer

    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoraLayer)]


def _dora_variant_cls() -> type:
    from peft.tuners.lora.variants import DoraLinearVariant

    return DoraLinearVariant


def _fused_adapter(layer: nn.Module, x: Any, args: tuple, kwargs: dict) -> str | None:
    """The adapter the fused path runs for this call, or None to run PEFT's forward."""
    if args or any(v is not None for v in kwargs.values()):  # adapter_names, alora_offsets, ...
        return None
    if layer.disable_adapters or layer.merged:
        return None
    names = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(names) != 1:
        return None
    name = names[0]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0 or x.shape[-1] != layer.in_features:
        return None  # PEFT raises its own error
    variant = layer.lora_variant.get(name)
    if variant is not None:
        if not isinstance(variant, _dora_variant_cls()) or layer.lora_bias.get(name, False):
            return None
        if layer.training and isinstance(layer.lora_dropout[name], nn.Dropout):
            return None  # PEFT's DoRA dropout also re-runs the base matmul on the dropped input
    base = layer.get_base_layer()
    if is_linear4bit(base):
        if base.weight.quant_state is None:
            return None
    elif base.weight.requires_grad or (autocast_dtype(x.device) is None and x.dtype != base.weight.dtype):
        return None
    return name


# ----------------------------------------------------------------------------------- fused forward


def _base_operand(base: nn.Module, fan_in_fan_out: bool) -> torch.Tensor | NF4Weight:
    """The frozen W ``[out, in]``: bnb's NF4 bytes in place, or the dense weight (a view)."""
    if is_linear4bit(base):
        return nf4_from_linear4bit(base)
    return base.weight.t() if fan_in_fan_out else base.weight


def _fused_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The patched ``forward`` of one PEFT LoRA layer instance (``self``), ``x [..., in] -> [..., out]``."""
    name = _fused_adapter(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    nf4 = is_linear4bit(base)
    weight = _base_operand(base, getattr(self, "fan_in_fan_out", False))
    amp = autocast_dtype(x.device)
    dtype = amp or ((base.compute_dtype or x.dtype) if nf4 else x.dtype)
    lora_A, lora_B, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
    scaling = float(self.scaling[name])
    x2d = x.reshape(-1, self.in_features)
    a, b = lora_A.weight, lora_B.weight
    bias = base.bias
    if amp is None:  # one dtype for the op (inside autocast the op casts by itself)
        x2d, a, b = x2d.to(dtype), a.to(dtype), b.to(dtype)
        bias = None if bias is None else bias.to(dtype)

    if self.training and isinstance(dropout, nn.Dropout):
        # base term fused (scale 0, factors detached: no adapter gradient from it); adapter term as PEFT
        y = _fused.lora_linear(x2d, weight, bias, a.detach(), b.detach(), 0.0)
        lora_in = self._cast_input_dtype(x.reshape(-1, self.in_features), lora_A.weight.dtype)
        y = y + (lora_B(lora_A(dropout(lora_in))) * scaling).to(y.dtype)
    elif name in self.lora_variant:  # DoRA
        y = _fused.lora_linear(x2d, weight, None, a, b, scaling)
        y = y * _dora_scale(self, name, weight, a, b, scaling, y.dtype)
        y = y if bias is None else y + bias.to(y.dtype)
    else:
        if lora_B.bias is not None:  # lora_bias: s·(x·Aᵀ·Bᵀ + b_B)
            lora_bias = lora_B.bias * scaling
            bias = lora_bias if bias is None else bias + lora_bias.to(bias.dtype)
            bias = bias if amp is not None else bias.to(dtype)
        y = _fused.lora_linear(x2d, weight, bias, a, b, scaling)
    y = y.reshape(*x.shape[:-1], self.out_features)
    return y.to(x.dtype) if nf4 else y  # bitsandbytes returns the input dtype; a dense base its compute dtype


def _dora_scale(
    layer: nn.Module,
    name: str,
    weight: torch.Tensor | NF4Weight,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """m / ||W + s·B·A||_row ``[out]`` in ``dtype``; the norm detached (DoRA §4.3, as PEFT)."""
    with torch.no_grad():
        dense = dequantize_nf4(weight, dtype) if isinstance(weight, NF4Weight) else weight.to(dtype)
        norm = torch.linalg.norm(dense + scaling * (b.detach().to(dtype) @ a.detach().to(dtype)), dim=1)
    magnitude = layer.lora_magnitude_vector[name].weight
    return magnitude.to(dtype) / norm


# ------------------------------------------------------------------------------------ public API


def patch_peft_model(model: nn.Module) -> nn.Module:
    """Run a ``peft.PeftModel``'s LoRA layers (or its prefix tuning) on fastpeft's kernels, in place.

    Returns the same PeftModel. Its :class:`PatchReport` (how many layers were patched, why the
    others were not) is logged and kept as ``model.fastpeft_patch_report``. Calling it again
    patches layers PEFT created since. TypeError for a model that is not a PeftModel, ValueError
    for a PEFT tuner fastpeft does not run (only LORA and PREFIX_TUNING are).
    """
    peft_type = _check_peft_model(model, "patch_peft_model")
    if peft_type == "PREFIX_TUNING":
        from fastpeft.peft_patch_prefix import patch_prefix_tuning

        report = PatchReport([], {}, prefix_attention=patch_prefix_tuning(model))
    else:
        patched, skipped = [], {}
        for path, layer in _lora_layers(model):
            reason = _why_not_fusable(layer)
            if reason is not None:
                skipped[path] = reason
                continue
            if not layer.__dict__.get(_PATCHED, False):
                base = layer.get_base_layer()
                if is_linear4bit(base):
                    nf4_from_linear4bit(base)  # undo a CPU repack now (and check the layout)
                    keep_standard_layout(base)
                layer.forward = types.MethodType(_fused_forward, layer)
                layer.__dict__[_PATCHED] = True
            patched.append(path)
        if not patched:
            raise ValueError(f"patch_peft_model: no LoRA layer of this model can run fastpeft's kernels ({skipped})")
        report = PatchReport(patched, skipped)
    model.__dict__[REPORT_ATTR] = report
    (logger.warning if report.skipped else logger.info)(str(report))
    return model


def unpatch_peft_model(model: nn.Module) -> nn.Module:
    """Give every patched layer PEFT's own forward back (and bnb its CPU repack); returns ``model``."""
    peft_type = _check_peft_model(model, "unpatch_peft_model")
    if peft_type == "PREFIX_TUNING":
        from fastpeft.peft_patch_prefix import unpatch_prefix_tuning

        unpatch_prefix_tuning(model)
    for _, layer in _lora_layers(model):
        if layer.__dict__.pop(_PATCHED, False):
            layer.__dict__.pop("forward", None)
            base = layer.get_base_layer()
            if is_linear4bit(base):
                keep_standard_layout(base, keep=False)
    model.__dict__.pop(REPORT_ATTR, None)
    return model


def is_patched(layer: nn.Module) -> bool:
    """True if ``layer`` (a PEFT LoRA layer) runs fastpeft's fused forward."""
    return bool(layer.__dict__.get(_PATCHED, False))
