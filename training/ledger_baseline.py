"""The HF transformers + bitsandbytes 4-bit + PEFT LoRA baseline, built for the memory ledger.

bitsandbytes' ops do not run on FakeTensors, so each 4-bit layer is a :class:`FakeLinear4bit`: a
``bitsandbytes.nn.Linear4bit`` subclass (so PEFT wraps it with its own 4-bit LoRA layer, and
``prepare_model_for_kbit_training`` leaves it alone, exactly as for the real thing) that holds the
same bytes as bitsandbytes' NF4 weight (packed uint8 codes and fp32 absmax; transformers'
``BitsAndBytesConfig`` default has no double quantization) and makes the same tensors per call as
bitsandbytes 0.50 on CUDA for more than 512 rows: the whole weight dequantized to the compute
dtype, ``F.linear``, the output cast back to the input dtype; the backward dequantizes again. It
computes nothing (its dense weight is ``torch.empty``): use it under ``FakeTensorMode`` only.

Everything else is the real code the anchors ran (``../shared/ANCHORS.md``): transformers' Llama,
``peft.prepare_model_for_kbit_training`` (embeddings, norms and LM head cast to fp32, reentrant
gradient checkpointing), ``peft.get_peft_model`` with LoRA on all seven projections, and the
model's own loss (full fp32 logits).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def nf4_nbytes(numel: int, blocksize: int = 64, double_quant: bool = False) -> int:
    """Device bytes of bitsandbytes' NF4 form of ``numel`` weights (codes + statistics)."""
    blocks = -(-numel // blocksize)
    if not double_quant:
        return (numel + 1) // 2 + 4 * blocks
    return (numel + 1) // 2 + blocks + 4 * -(-blocks // 256) + 4 * 256 + 4


class _DequantLinear(torch.autograd.Function):
    """bitsandbytes' ``MatMul4Bit`` for > 512 rows: dequantize, ``F.linear``; save only the 4-bit weight."""

    @staticmethod
    def forward(ctx, x, packed, shape, compute_dtype):  # type: ignore[override]
        ctx.shape, ctx.compute_dtype = shape, compute_dtype
        dense = torch.empty(shape, dtype=compute_dtype, device=x.device)  # dequantize_4bit's output
        return F.linear(x, dense)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        dense = torch.empty(ctx.shape, dtype=ctx.compute_dtype, device=grad_y.device)
        return torch.matmul(grad_y, dense.to(grad_y.dtype)), None, None, None


def fake_linear4bit_class() -> type[nn.Module]:
    """:class:`FakeLinear4bit`, defined on first use (bitsandbytes is imported only then)."""
    global _FAKE_CLASS
    if _FAKE_CLASS is None:
        import bitsandbytes as bnb

        class FakeLinear4bit(bnb.nn.Linear4bit):
            """A Linear4bit's memory without its arithmetic (see the module docstring)."""

            def __init__(
                self,
                linear: nn.Linear,
                compute_dtype: torch.dtype = torch.bfloat16,
                blocksize: int = 64,
                double_quant: bool = False,
            ) -> None:
                nn.Module.__init__(self)  # not bnb's __init__: its Params4bit quantizes real data
                n, k = linear.weight.shape
                self.in_features, self.out_features = k, n
                self.compute_dtype, self.compute_type_is_set = compute_dtype, True
                self.quant_state = None
                self.weight = nn.Parameter(
                    torch.empty(((n * k + 1) // 2, 1), dtype=torch.uint8, device=linear.weight.device),
                    requires_grad=False,
                )
                self.weight.compress_statistics, self.weight.quant_type = double_quant, "nf4"
                extra = nf4_nbytes(n * k, blocksize, double_quant) - (n * k + 1) // 2
                # the statistics (absmax, ...) as one buffer of their byte size
                self.register_buffer(
                    "quant_statistics",
                    torch.empty(extra, dtype=torch.uint8, device=linear.weight.device),
                    persistent=False,
                )
                self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
                self.dense_shape = (n, k)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                inp_dtype = x.dtype
                x = x.to(self.compute_dtype)
                y = _DequantLinear.apply(x, self.weight, self.dense_shape, self.compute_dtype)
                if self.bias is not None:
                    y = y + self.bias.to(self.compute_dtype)
                return y.to(inp_dtype)

        _FAKE_CLASS = FakeLinear4bit
    return _FAKE_CLASS


_FAKE_CLASS: type[nn.Module] | None = None


def quantize_blocks_fake(
    model: nn.Module, targets: tuple[str, ...] = LLAMA_PROJECTIONS, compute_dtype: torch.dtype = torch.bfloat16
) -> int:
    """Replace the block linears named in ``targets`` by :class:`FakeLinear4bit`; returns how many."""
    cls = fake_linear4bit_class()
    swaps = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    for name, module in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, cls(module, compute_dtype))
    return len(swaps)


def _move_adapter_by_replacing(self: Any, adapter_name: str, device: torch.device | None = None) -> None:
    """PEFT's ``_move_adapter_to_device_of_base_layer`` for FakeTensor parameters: the same target
    dtype (PEFT's own rule), reached by replacing each parameter, because ``Module.to`` cannot swap
    a FakeTensor parameter (FakeTensorMode keeps a weak reference to it)."""
    _, dtype = self._get_base_layer_device_and_dtype(self.get_base_layer())
    if dtype is None or not (dtype.is_floating_point or dtype.is_complex):
        return
    for layer_name in self.adapter_layer_names + self.other_param_names:
        container = getattr(self, layer_name, None)
        if not isinstance(container, nn.ModuleDict) or adapter_name not in container:
            continue
        for module in container[adapter_name].modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.is_floating_point() and p.dtype != dtype:
                    module._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)


def _to_without_swap(original: Any) -> Any:
    """``Module.to`` that returns the module unchanged for a move to the CPU without a dtype: PEFT
    moves each new adapter to its base layer's device, already the CPU here, and ``Module.to``
    cannot swap FakeTensor parameters (see :func:`_move_adapter_by_replacing`)."""

    def to(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is None and (device is None or device.type == "cpu"):
            return self
        return original(self, *args, **kwargs)

    return to


def build_hf_peft_model(model: nn.Module, method: str, r: int, lora_alpha: float) -> nn.Module:
    """The anchors' baseline around a freshly built bf16 ``model`` (call under ``FakeTensorMode``).

    ``method="qlora"``: 4-bit base (:class:`FakeLinear4bit`) + ``prepare_model_for_kbit_training``;
    ``method="lora"``: the bf16 base, gradient checkpointing (reentrant) and input grads as PEFT
    users enable them. Both then ``get_peft_model`` with LoRA on the seven projections.
    """
    from unittest import mock

    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    if method not in ("qlora", "lora"):
        raise ValueError(f"the HF + PEFT baseline measures 'qlora' or 'lora', got {method!r}")
    if method == "qlora":
        quantize_blocks_fake(model)
        model.is_loaded_in_4bit = True
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    lora = peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(LLAMA_PROJECTIONS), task_type="CAUSAL_LM")
    with (
        mock.patch.object(BaseTunerLayer, "_move_adapter_to_device_of_base_layer", _move_adapter_by_replacing),
        mock.patch.object(nn.Module, "to", _to_without_swap(nn.Module.to)),
    ):
        return peft.get_peft_model(model, lora).train()


def hf_loss(model: nn.Module, input_ids: torch.Tensor) -> Any:
    """The anchors' step loss: ``model(input_ids=ids, labels=ids).loss`` (full logits, mean)."""
    return model(input_ids=input_ids, labels=input_ids).loss
