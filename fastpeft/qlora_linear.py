"""QLoRALinear: an NF4 4-bit frozen base weight (bitsandbytes' exact format) plus named adapters.

The NF4 tensors are registered as buffers (``packed``, ``absmax`` and with double quantization
``nested_absmax``, ``nested_code``, ``offset``), so ``state_dict`` / ``load_state_dict`` and
``.to(device)`` carry them; dtype casts (``model.half()``) never touch them (``_apply`` keeps their
dtypes). The compute dtype — the dtype of x, the adapters and the bias — follows ``.to(dtype)``.

The forward uses the fused ``lora_linear`` op with the :class:`NF4Weight` (the kernel dequantizes
in registers); base-only calls dequantize and run ``F.linear``. Merging into NF4 re-quantizes the
merged weight (lossy, as PEFT does for bitsandbytes layers): unmerging afterwards is not exact.

Without any adapter a QLoRALinear is a plain NF4 linear (``inject(quantize="nf4")`` uses it for the
non-target linears of the transformer blocks).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from fastpeft.bnb_interop import linear4bit_view, nf4_from_linear4bit
from fastpeft.kernels.backend import tracing
from fastpeft.kernels.nf4 import FLOAT_DTYPES, NF4Weight, quantize_nf4
from fastpeft.kernels.nf4_dequantize import dequantize_nf4
from fastpeft.lora_linear import AdapterLinear, _plain_dense_module, linear_kind

_NF4_BUFFERS = ("packed", "absmax", "nested_absmax", "nested_code", "offset")


class QLoRALinear(AdapterLinear):
    """NF4 base ``[out, in]`` + adapters; computes in ``compute_dtype``."""

    def __init__(
        self,
        weight: NF4Weight,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
        fan_in_fan_out: bool = False,
    ) -> None:
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"QLoRALinear needs an NF4Weight, got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"QLoRALinear needs a 2-D NF4 weight [out, in], got shape {tuple(weight.shape)}")
        compute_dtype = compute_dtype or weight.dtype
        if compute_dtype not in FLOAT_DTYPES:
            raise TypeError(f"compute_dtype must be one of {FLOAT_DTYPES}, got {compute_dtype}")
        super().__init__(weight.shape[1], weight.shape[0], fan_in_fan_out)
        self.blocksize, self.weight_dtype = weight.blocksize, weight.dtype
        self._set_nf4(weight)
        # an empty tensor whose dtype/device follow .to(): the compute dtype and the device
        self.register_buffer(
            "_compute_marker", torch.empty(0, dtype=compute_dtype, device=weight.device), persistent=False
        )
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must be [{self.out_features}], got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    def _set_nf4(self, weight: NF4Weight) -> None:
        self.__dict__.pop("_nf4_view", None)
        self.double_quant = weight.double_quant
        for name, tensor in weight.tensors().items():
            if name == "nested_code":  # one cached [256] map shared by every layer: safetensors refuses that
                tensor = tensor.clone()
            if name in self._buffers:
                self._buffers[name] = tensor
            else:
                self.register_buffer(name, tensor)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def quantize_linear(
        cls, linear: nn.Module, blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype | None = None
    ) -> QLoRALinear:
        """An adapter-less QLoRALinear holding ``linear``'s weight in NF4 (nn.Linear or GPT-2 Conv1D)."""
        kind = linear_kind(linear)
        if kind not in ("linear", "conv1d"):
            raise TypeError(f"QLoRALinear.quantize_linear takes nn.Linear or Conv1D, got {type(linear).__name__}")
        weight = linear.weight.detach()
        quantized = quantize_nf4(weight.t() if kind == "conv1d" else weight, blocksize, double_quant)
        return cls(quantized, linear.bias, compute_dtype or weight.dtype, fan_in_fan_out=kind == "conv1d")

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        use_dora: bool = False,
        init_lora_weights: bool | str = True,
        adapter_name: str = "default",
    ) -> QLoRALinear:
        """Quantize ``linear`` to NF4 and add adapter ``adapter_name``."""
        layer = cls.quantize_linear(linear, blocksize, double_quant, compute_dtype)
        layer.add_adapter(
            adapter_name,
            r,
            lora_alpha,
            lora_dropout,
            use_rslora,
            variant="dora" if use_dora else "lora",
            init_lora_weights=init_lora_weights,
        )
        return layer

    @classmethod
    def wrap_bnb(cls, linear4bit: nn.Module, compute_dtype: torch.dtype | None = None) -> QLoRALinear:
        """An adapter-less QLoRALinear sharing a bitsandbytes ``Linear4bit``'s NF4 data (no re-quantizing)."""
        if linear_kind(linear4bit) != "linear4bit":
            raise TypeError(f"QLoRALinear.from_bnb takes a bitsandbytes Linear4bit, got {type(linear4bit).__name__}")
        weight = nf4_from_linear4bit(linear4bit)  # undoes bnb's CPU repack first, exactly
        bias = linear4bit.bias
        compute_dtype = compute_dtype or (bias.dtype if bias is not None else None) or weight.dtype
        return cls(weight, bias, compute_dtype)

    @classmethod
    def from_bnb(
        cls,
        linear4bit: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        compute_dtype: torch.dtype | None = None,
        use_dora: bool = False,
        init_lora_weights: bool | str = True,
        adapter_name: str = "default",
    ) -> QLoRALinear:
        """Wrap a bitsandbytes NF4 ``Linear4bit`` without re-quantizing and add adapter ``adapter_name``."""
        layer = cls.wrap_bnb(linear4bit, compute_dtype)
        layer.add_adapter(
            adapter_name,
            r,
            lora_alpha,
            lora_dropout,
            use_rslora,
            variant="dora" if use_dora else "lora",
            init_lora_weights=init_lora_weights,
        )
        return layer

    # -- base layer -------------------------------------------------------------------------------
    def nf4_weight(self) -> NF4Weight:
        """The buffers as an :class:`NF4Weight` (a view, no copy); built once per set of buffers (its
        checks cost more than a small layer's CPU matmul), again after ``.to()`` or a re-quantization."""
        buffers = tuple(self._buffers.get(n) for n in _NF4_BUFFERS)
        cached = self.__dict__.get("_nf4_view")
        if cached is not None and all(a is b for a, b in zip(cached[0], buffers)):
            return cached[1]
        nested = {n: getattr(self, n) for n in _NF4_BUFFERS[2:]} if self.double_quant else {}
        weight = NF4Weight(
            packed=self.packed,
            absmax=self.absmax,
            shape=(self.out_features, self.in_features),
            blocksize=self.blocksize,
            dtype=self.weight_dtype,
            **nested,
        )
        if not (torch.compiler.is_compiling() or tracing(*buffers)):  # never keep a traced view
            self.__dict__["_nf4_view"] = (buffers, weight)
        return weight

    @property
    def dtype(self) -> torch.dtype:
        return self._compute_marker.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def base_operand(self) -> NF4Weight:
        return self.nf4_weight()

    def get_base_layer(self) -> nn.Module:
        """A bitsandbytes Linear4bit sharing this layer's NF4 tensors and bias (no copy)."""
        return linear4bit_view(self.nf4_weight(), self.bias, self.dtype)

    @property
    def weight(self) -> nn.Parameter:
        """The base weight as bitsandbytes exposes it (a ``Params4bit`` over our bytes, with its
        ``quant_state``), as a PEFT layer over bnb answers ``.weight``."""
        return self.get_base_layer().weight

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_nf4(self.nf4_weight(), dtype)

    def write_base_weight(self, weight: torch.Tensor) -> None:
        warnings.warn(
            "merging into an NF4 weight re-quantizes it: outputs change by the NF4 rounding error and "
            "unmerge() cannot restore the original bytes exactly",
            stacklevel=3,
        )
        self._set_nf4(quantize_nf4(weight.to(self.weight_dtype), self.blocksize, self.double_quant))

    def to_dense_module(self, weight: torch.Tensor | None = None) -> nn.Module:
        """A plain nn.Linear / Conv1D in the compute dtype with ``weight`` (default: dequantized base)."""
        weight = self.dense_weight(self.dtype) if weight is None else weight.to(self.dtype)
        return _plain_dense_module(weight, self.bias, self.fan_in_fan_out)

    def to_nf4_module(self, weight: torch.Tensor) -> QLoRALinear:
        """An adapter-less QLoRALinear holding ``weight`` re-quantized with this layer's NF4 settings."""
        quantized = quantize_nf4(weight.to(self.weight_dtype), self.blocksize, self.double_quant)
        return QLoRALinear(quantized, self.bias, self.dtype, self.fan_in_fan_out)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # keep the NF4 tensors' dtypes (uint8 codes, fp32 statistics) through .half()/.to(dtype):
        # take only the device from fn's result
        self.__dict__.pop("_nf4_view", None)  # it holds the buffers being replaced
        saved = {n: self._buffers.pop(n) for n in _NF4_BUFFERS if n in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in saved.items():
                moved = fn(tensor)
                self._buffers[name] = moved if moved.dtype == tensor.dtype else tensor.to(moved.device)
        return self

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", nf4_blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.dtype}"
        )
