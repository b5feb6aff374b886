"""FLOP and byte counts: the explicit formulas behind every TFLOP/s, GB/s and hardware floor.

Conventions: a multiply-add is 2 FLOPs; element-wise work (scaling, softmax, bias) is not counted;
bytes are the minimum an implementation must move to or from device memory once per call.
"""

from __future__ import annotations

import math

BF16_BYTES = 2
NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for double-quantized absmax
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_linear_flops(m: int, k: int, n: int, r: int, backward: bool = False) -> int:
    """FLOPs of y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ for x ``[m, k]``, W ``[n, k]``, A ``[r, k]``, B ``[n, r]``.

    forward: 2mkn (x·Wᵀ) + 2mr(k+n) (x·Aᵀ, then ·Bᵀ).
    backward, W frozen: 2mnk (dX = dY·W) + 4mr(k+n) (dY·B, (dY·B)·A, dA = (dY·B)ᵀ·x, dB = dYᵀ·(x·Aᵀ)).
    """
    fwd = 2 * m * k * n + 2 * m * r * (k + n)
    return fwd + (2 * m * n * k + 4 * m * r * (k + n) if backward else 0)


def base_gemm_flops(m: int, k: int, n: int, backward: bool = False) -> int:
    """FLOPs of the frozen base GEMMs alone (x·Wᵀ, plus dY·W with backward): the GEMM floor's work."""
    return 2 * m * k * n * (2 if backward else 1)


def nf4_weight_bytes(k: int, n: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Device bytes of an NF4 weight ``[n, k]``, as ``NF4Weight.nbytes`` / bitsandbytes store it.

    packed codes ceil(kn/2) + absmax: fp32 per block, or with double quant a uint8 code per block
    + fp32 nested absmax per 256 blocks + the fp32 256-entry nested code + the fp32 offset.
    """
    numel = k * n
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4 * 256 + 4


def lora_linear_bytes(m: int, k: int, n: int, r: int, weight_bytes: int, elem: int = BF16_BYTES) -> int:
    """Bytes one forward must move: the base weight (any format) + x ``[m, k]`` + y ``[m, n]`` + A + B."""
    return weight_bytes + elem * (m * k + m * n + r * k + n * r)


def attention_pairs(t: int, p: int = 0) -> int:
    """(query, key) pairs per batch and head: causal over the sequence (t(t+1)/2) + every query × P prefix."""
    return t * (t + 1) // 2 + t * p


def attention_flops(b: int, h: int, t: int, p: int, d: int, backward: bool = False) -> int:
    """FLOPs of causal attention with a P-vector prefix, counting only the pairs that are attended.

    forward: Q·Kᵀ and P·V, 2 matmuls -> 4·d FLOPs per pair; backward: dV, dP, dQ, dK and the
    recomputed Q·Kᵀ, 5 matmuls -> 10·d per pair (FlashAttention's count). A concat + mask
    implementation computes the masked pairs too; they are not useful work and not counted.
    """
    per_pair = 4 * d + (10 * d if backward else 0)
    return b * h * attention_pairs(t, p) * per_pair


def llama_linear_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict[str, tuple[int, int]]:
    """(in, out) features of the 7 projections of one Llama decoder layer."""
    kv_dim = hidden // heads * kv_heads
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv_dim),
        "v_proj": (hidden, kv_dim),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }


def llama_qlora_step_flops(
    *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, batch: int, seq: int, r: int
) -> int:
    """Model FLOPs of one QLoRA training step (forward + backward, LoRA on all 7 projections).

    Frozen base weights (projections + lm_head, P_base) need forward and dX: 4·P_base per token;
    LoRA factors (P_lora) forward, dX and dW: 6·P_lora per token; causal attention forward +
    backward: 14·d per attended pair, per head and layer. Gradient checkpointing's recomputed
    forward is not counted (model FLOPs, not hardware FLOPs); nor are norms, rotary or the loss.
    """
    shapes = llama_linear_shapes(hidden, intermediate, heads, kv_heads).values()
    p_base = layers * sum(i * o for i, o in shapes) + vocab * hidden
    p_lora = layers * sum(r * (i + o) for i, o in shapes)
    tokens = batch * seq
    attention = layers * attention_flops(batch, heads, seq, 0, hidden // heads, backward=True)
    return tokens * (4 * p_base + 6 * p_lora) + attention


def llama_decode_step_bytes(
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    r: int,
    blocksize: int = 64,
    double_quant: bool = False,
) -> int:
    """Weight bytes one decode step must read: NF4 projections + LoRA factors (bf16) + bf16 lm_head.

    The KV cache, embeddings (a gather) and norms are not counted, so this is a lower bound.
    """
    shapes = llama_linear_shapes(hidden, intermediate, heads, kv_heads).values()
    nf4 = sum(nf4_weight_bytes(i, o, blocksize, double_quant) for i, o in shapes)
    lora = sum(BF16_BYTES * r * (i + o) for i, o in shapes)
    return layers * (nf4 + lora) + BF16_BYTES * vocab * hidden
