"""Sampling throughput of fastpeft's batched KV-cache sampler, for the benchmark harness
(``fastpeft bench sampling``) to put beside HF ``generate``."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from fastpeft.reasoning.sampler import PrefixMode, Sampler
from fastpeft.reasoning.types import SamplingParams


def measure_sampling_throughput(
    model: torch.nn.Module,
    *,
    prompt_len: int,
    new_tokens: int,
    n: int,
    num_prompts: int = 1,
    repeats: int = 3,
    seed: int = 0,
    prefix_mode: PrefixMode = "shared",
    cuda_graph: bool = True,
) -> dict[str, Any]:
    """Sampling tokens/s: ``num_prompts`` random prompts of ``prompt_len`` tokens, ``n`` samples each,
    exactly ``new_tokens`` new tokens per row (EOS ignored), temperature 1.

    One warm-up call, then the median of ``repeats`` timed calls (prefill included; CUDA synchronised).
    Returns ``{"tokens_per_s", "seconds", "sequences", "prompt_len", "new_tokens", "device", ...}``.
    """
    if min(prompt_len, new_tokens, n, num_prompts, repeats) <= 0:
        raise ValueError("prompt_len, new_tokens, n, num_prompts and repeats must be positive")
    sampler = Sampler(model, max_seq_len=prompt_len + new_tokens, prefix_mode=prefix_mode, cuda_graph=cuda_graph)
    rng = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, sampler.vocab_size, (num_prompts, prompt_len), generator=rng).tolist()
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=seed)
    device = model.get_input_embeddings().weight.device

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        sampler.generate_ids(prompts, params, n, ignore_eos=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()
    seconds = statistics.median(timed() for _ in range(repeats))
    rows = num_prompts * n
    return {
        "tokens_per_s": rows * new_tokens / seconds,
        "seconds": seconds,
        "sequences": rows,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "n": n,
        "num_prompts": num_prompts,
        "prefix_mode": prefix_mode,
        "cuda_graph": cuda_graph and device.type == "cuda",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
    }
