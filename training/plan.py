"""Memory planner: estimate peak training memory for full fine-tuning, LoRA and QLoRA, and pick one.

For a decoder-only transformer with hidden size h, MLP size f, L layers, n_h query heads of size
d = h/n_h, n_kv key/value heads (kv = n_kv·d), vocabulary V, B·T tokens per micro-batch:

- parameters: per layer q,o: 2·h·h, k,v: 2·h·kv, MLP 3·h·f (gated) or 2·h·f, norms; embeddings
  V·h, plus an untied LM head V·h;
- weights: full/LoRA hold every parameter in the weight dtype; QLoRA holds the block linears in
  NF4 (0.5 byte + absmax: 4/blocksize bytes, or ~1/blocksize with double quantization);
- adapters: r·(in + out) per adapted linear (``target="all-linear"``), in the weight dtype;
- gradients: one per trainable parameter (weight dtype); optimizer: AdamW keeps two fp32-sized
  moments per trainable parameter (8-bit AdamW: 2 bytes), SGD with momentum one;
- activations saved for backward, per token per layer, in elements (counted with
  ``saved_tensors_hooks`` on transformers' Llama layer, fp32, and fitted):
  sdpa ``8h + 4f + 2kv + n_h``; eager adds the attention probabilities: ``10h + 4f + n_h·T``.
  Gradient checkpointing keeps only each layer's input (h per token per layer) plus one layer's
  full activations while it is recomputed;
- the loss: full logits cost ~3·B·T·V fp32 values (logits, their fp32 copy, their gradient);
  fastpeft's chunked loss one ``[C, V]`` fp32 chunk (C from the op's 256 MiB budget, so a short
  batch is one chunk) plus dH (and dW when the head trains).

The total is the plain sum (gradients are counted as if they coexisted with every activation,
which makes full fine-tuning estimates a little high); on CPU it lands within ~20% of the
measured peak for a small Llama in every mode (see ``tests/training/test_plan.py``).

Decision flow (a simplified form of the method choice in the survey "LLM Post-Training: A Deep
Dive into Reasoning Large Language Models", arXiv:2502.21321): if full fine-tuning fits and the
data is large (``data_tokens >= full_ft_tokens_per_param x parameters``) choose full FT; else LoRA
if it fits; else QLoRA if it fits; else nothing fits (shorter sequences, smaller batch, more GPUs).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from fastpeft.kernels.linear_cross_entropy import default_chunk_size

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
METHODS = ("full", "lora", "qlora")


@dataclasses.dataclass
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    gated_mlp: bool = True

    @classmethod
    def from_config(cls, cfg: Any) -> ModelShape:
        """From a transformers config object or a config.json dict (Llama/Mistral/Qwen/Gemma/GPT-2 names)."""
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        hidden = get("hidden_size") or get("n_embd")
        layers = get("num_hidden_layers") or get("n_layer")
        heads = get("num_attention_heads") or get("n_head")
        if not (hidden and layers and heads):
            raise ValueError("model config needs hidden_size, num_hidden_layers and num_attention_heads")
        gpt2 = get("model_type") == "gpt2"
        return cls(
            hidden=hidden,
            intermediate=get("intermediate_size") or get("n_inner") or 4 * hidden,
            layers=layers,
            heads=heads,
            kv_heads=get("num_key_value_heads") or heads,
            vocab=get("vocab_size"),
            tied=bool(get("tie_word_embeddings", gpt2)),
            gated_mlp=not gpt2,
        )

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of every linear in one block."""
        h, kv, f = self.hidden, self.kv_dim, self.intermediate
        mlp = [(h, f), (h, f), (f, h)] if self.gated_mlp else [(h, f), (f, h)]
        return [(h, h), (h, kv), (h, kv), (h, h)] + mlp

    def block_linear_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.linear_shapes())

    def other_params(self) -> int:
        norms = self.layers * 2 * self.hidden + self.hidden
        return self.vocab * self.hidden * (1 if self.tied else 2) + norms

    def total_params(self) -> int:
        return self.block_linear_params() + self.other_params()

    def lora_params(self, r: int) -> int:
        return self.layers * sum(r * (i + o) for i, o in self.linear_shapes())


@dataclasses.dataclass
class PlanInputs:
    model: str | None = None  # a local HF directory or a config .json file
    model_config: dict | None = None
    gpu_memory_gib: float = 80.0
    seq_len: int = 2048
    batch_size: int = 1
    data_tokens: int = 10_000_000
    lora_r: int = 16
    dtype: str = "bfloat16"
    optimizer: str = "adamw"
    attn_implementation: str = "sdpa"
    loss_impl: str = "fastpeft"
    double_quant: bool = True
    full_ft_tokens_per_param: float = 0.1
    headroom: float = 0.9  # plan against this fraction of the device memory
    measure: bool = False  # measure with the memory ledger instead (fastpeft.training.plan_measure)
    cuda_context_gib: float = 1.0  # --measure: device memory the tensors cannot use (CUDA context, allocator)

    def __post_init__(self) -> None:
        for name in ("gpu_memory_gib", "seq_len", "batch_size", "data_tokens", "lora_r", "full_ft_tokens_per_param"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not 0 < self.headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], got {self.headroom!r}")


def load_model_shape(model: str | None, model_config: dict | None) -> ModelShape:
    if model_config is not None:
        return ModelShape.from_config(model_config)
    if model is None:
        raise ValueError("give `model` (a local directory or config .json) or `model_config`")
    path = Path(model)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"model config {str(path)!r} does not exist")
    return ModelShape.from_config(json.loads(path.read_text()))


def activation_elements_per_token_layer(shape: ModelShape, seq_len: int, attn: str) -> int:
    """Saved-for-backward elements per token per layer (see the module docstring)."""
    h, f = shape.hidden, shape.intermediate
    if attn == "eager":
        return 10 * h + 4 * f + shape.heads * seq_len + 2
    return 8 * h + 4 * f + 2 * shape.kv_dim + shape.heads + 2


def estimate(inputs: PlanInputs, shape: ModelShape, method: str) -> dict[str, float]:
    """Bytes of each component and the totals with / without gradient checkpointing."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if inputs.dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {inputs.dtype!r}")
    wb = DTYPE_BYTES[inputs.dtype]
    tokens = inputs.seq_len * inputs.batch_size
    linear, other = shape.block_linear_params(), shape.other_params()
    if method == "qlora":
        per_param = 0.5 + ((1 / 64 + 4 / (64 * 256)) if inputs.double_quant else 4 / 64)
        weights = linear * per_param + other * wb
    else:
        weights = (linear + other) * wb
    trainable = shape.total_params() if method == "full" else shape.lora_params(inputs.lora_r)
    adapters = 0 if method == "full" else trainable * wb
    grads = trainable * wb
    state_bytes = {"adamw": 8, "adamw_8bit": 2, "paged_adamw": 8, "paged_adamw_8bit": 2, "sgd": 4}.get(
        inputs.optimizer, 8
    )
    optimizer = trainable * state_bytes
    per_layer = activation_elements_per_token_layer(shape, inputs.seq_len, inputs.attn_implementation) * tokens * wb
    outside = 3 * shape.hidden * tokens * wb  # embeddings output, final norm, LM-head input
    act_full = shape.layers * per_layer + outside
    act_ckpt = shape.layers * shape.hidden * tokens * wb + per_layer + outside
    if inputs.loss_impl == "full":
        loss = 3 * tokens * shape.vocab * 4
    else:
        chunk = min(tokens, default_chunk_size(tokens, shape.vocab))  # the op's own rule: a byte budget
        head_grad = shape.vocab * shape.hidden * wb if method == "full" else 0
        loss = chunk * shape.vocab * 4 + tokens * shape.hidden * wb + head_grad
    static = weights + adapters + grads + optimizer
    return {
        "weights": weights,
        "adapters": adapters,
        "gradients": grads,
        "optimizer": optimizer,
        "activations": act_full,
        "activations_ckpt": act_ckpt,
        "loss": loss,
        "total": static + act_full + loss,
        "total_ckpt": static + act_ckpt + loss,
        "trainable_params": trainable,
    }


def recommend(
    inputs: PlanInputs, shape: ModelShape, estimates: dict[str, dict[str, float]]
) -> tuple[str | None, bool, str]:
    """(method or None, use gradient checkpointing, reason) by the decision flow above."""
    budget = inputs.gpu_memory_gib * 2**30 * inputs.headroom

    def fits(method: str) -> tuple[bool, bool]:
        e = estimates[method]
        return (e["total"] <= budget or e["total_ckpt"] <= budget), e["total"] > budget

    large = inputs.data_tokens >= inputs.full_ft_tokens_per_param * shape.total_params()
    full_fits, full_ckpt = fits("full")
    if full_fits and large:
        return "full", full_ckpt, "full fine-tuning fits and the data is large enough to move every weight"
    for method in ("lora", "qlora"):
        ok, ckpt = fits(method)
        if ok:
            why = "the data is small for full fine-tuning" if full_fits else "full fine-tuning does not fit"
            if method == "qlora":
                why = "neither full fine-tuning nor 16-bit LoRA fits; the 4-bit base does"
            return method, ckpt, why
    return None, True, "nothing fits: shorten seq_len, lower batch_size, or shard across GPUs"


def plan(inputs: PlanInputs) -> dict[str, Any]:
    """Estimates for all methods and the recommendation."""
    shape = load_model_shape(inputs.model, inputs.model_config)
    estimates = {m: estimate(inputs, shape, m) for m in METHODS}
    method, ckpt, reason = recommend(inputs, shape, estimates)
    return {
        "shape": dataclasses.asdict(shape),
        "params": shape.total_params(),
        "estimates": estimates,
        "recommendation": method,
        "gradient_checkpointing": ckpt,
        "reason": reason,
    }
