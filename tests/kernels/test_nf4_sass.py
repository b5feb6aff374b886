"""The NF4 kernels' loads, read from their sm_90 SASS (compiled without a GPU, tests/kernels/conftest.py).

What the HBM floor needs and each compile must show: the packed codes read with 128-bit (at least
64-bit) vector loads and never byte by byte; a handful of scale loads per thread (per block, not per
element); the 16-entry code table read once and looked up in registers (shuffles, no per-element
gathers); no register spills. The decode kernel's general path (K not a multiple of the blocksize)
still goes element by element and is only checked for spills.
"""

from __future__ import annotations

import pytest
import torch

import fastpeft.kernels.nf4_dequantize as dequant
import fastpeft.kernels.nf4_lora_decode as decode

pytestmark = pytest.mark.slow
NF4_POINTERS = {
    "packed_ptr": "*u8",
    "w_ptr": "*u8",
    "code_ptr": "*fp32",
    "nested_absmax_ptr": "*fp32",
    "nested_code_ptr": "*fp32",
    "offset_ptr": "*fp32",
}


def dequant_spec(blocksize: int, double_quant: bool) -> dict:
    fn = dequant._nf4_dequant_kernel
    blocks = max(1, dequant.DEQUANT_TILE_BYTES // (blocksize // 2))
    const = {
        "BLOCKSIZE": blocksize,
        "DOUBLE_QUANT": double_quant,
        "NESTED_BLOCK": dequant.NESTED_BLOCKSIZE,
        "BLOCKS": blocks,
    }
    sig = {n: NF4_POINTERS.get(n, "i32") for n in fn.arg_names}
    sig.update(absmax_ptr="*u8" if double_quant else "*fp32", out_ptr="*bf16", **dict.fromkeys(const, "constexpr"))
    return {
        "label": f"dequant bs{blocksize} dq={double_quant}",
        "module": dequant.__name__,
        "kernel": fn.__name__,
        "signature": sig,
        "constexprs": const,
        "divisible": ["n", "n_bytes"],
        "num_warps": 4,
        "elements_per_thread": blocks * blocksize // 128,
    }


def decode_spec(blocksize: int, double_quant: bool, r: int, aligned: bool = True, adapters: int = 1) -> dict:
    fn = decode._lora_decode_kernel
    k = 4096 if aligned else 4095
    cfg = decode.decode_config(1, 4096, k, r * adapters, True, torch.device("cuda", 0), aligned)
    const = dict(
        IS_NF4=True,
        BLOCKSIZE=blocksize,
        DOUBLE_QUANT=double_quant,
        NESTED_BLOCK=dequant.NESTED_BLOCKSIZE,
        HAS_BIAS=True,
        SPLIT_K=4,
        FP32_DOT=False,
        ALIGNED=aligned,
        ROUTED=adapters > 1,
        SCALES_PER_TILE=max(1, cfg["block_k"] // blocksize),
        BLOCK_M=decode.DECODE_MAX_ROWS,
        BLOCK_N=cfg["block_n"],
        BLOCK_K=cfg["block_k"],
        BLOCK_R=cfg["block_r"],
    )
    sig = {n: NF4_POINTERS.get(n, "*bf16" if n.endswith("_ptr") else "i32") for n in fn.arg_names}
    sig.update(
        absmax_ptr="*u8" if double_quant else "*fp32",
        acc_ptr="*fp32",
        count_ptr="*i32",
        row_adapter_ptr="*i32",
        adapter_scale_ptr="*fp32",
        scaling="fp32",
        **dict.fromkeys(const, "constexpr"),
    )
    divisible = (
        ["N", "K", "k_bytes", "k_per_split", "k_per_split_bytes", "stride_xm", "stride_ar", "stride_bn", "stride_ym"]
        if aligned
        else ["N", "k_per_split", "stride_bn", "stride_ym"]
    )
    threads = 32 * cfg["num_warps"]
    return {
        "label": f"decode bs{blocksize} dq={double_quant} r={r}x{adapters} aligned={aligned}",
        "module": decode.__name__,
        "kernel": fn.__name__,
        "signature": sig,
        "constexprs": const,
        "divisible": divisible,
        "ones": ["stride_xk", "stride_ak", "stride_br", "stride_yn"],
        "num_warps": cfg["num_warps"],
        "num_stages": cfg["num_stages"],
        "elements_per_thread": cfg["block_n"] * cfg["block_k"] // threads,
    }


def test_nf4_kernels_vector_loads_and_no_spills(sm90, monkeypatch):
    monkeypatch.setattr(decode, "_sm_count", lambda index: 132)  # an H100's tiles, without asking CUDA
    specs = [
        dequant_spec(64, False),
        dequant_spec(64, True),
        dequant_spec(4096, True),
        decode_spec(64, False, 16),
        decode_spec(64, True, 16),
        decode_spec(128, True, 64),
        decode_spec(64, True, 16, adapters=4),
        decode_spec(64, True, 16, aligned=False),
    ]
    compiled = sm90([{k: v for k, v in s.items() if k != "elements_per_thread"} for s in specs])
    for spec in specs:
        got = compiled[spec["label"]]
        ops = got.memory_ops
        assert got.stack == 0 and got.local == 0 and not ops["LDL"] and not ops["STL"], (spec["label"], got.stack)
        loads = got.global_loads(loop_only=spec["kernel"] == decode._lora_decode_kernel.__name__)
        per_element = sum(loads.values()) / spec["elements_per_thread"]
        if not spec["constexprs"].get("ALIGNED", True):
            assert per_element >= 4, (spec["label"], loads)  # the general path: what the aligned one avoids
            continue
        wide = sum(c for op, c in loads.items() if op.startswith(("LDG.E.128", "LDG.E.64")))
        assert wide >= 1, (spec["label"], loads)  # the packed codes (and the table) in vector loads
        if not spec["constexprs"]["DOUBLE_QUANT"]:
            assert "LDG.E.U8" not in loads, (spec["label"], loads)  # no byte is loaded by itself
        # element by element it takes ~6 loads per weight (a byte twice, a code gather, the scale and,
        # with double quant, three more); here, per K step: a few vectors (codes, x, A) and the
        # per-block scales (replicated across the threads that share a block: L1 hits)
        assert per_element <= (1.25 if spec["constexprs"]["DOUBLE_QUANT"] else 0.5), (spec["label"], loads)
        assert ops["SHFL.IDX"] >= spec["elements_per_thread"], (spec["label"], ops)  # the table lookups
