"""Token choice for one decode step, and stop-string detection.

Logprob convention (``Completion.token_logprobs``): the log-probability of the sampled token under
the distribution it was actually drawn from, i.e. ``log_softmax(logits / temperature)`` restricted
to the top-k / top-p set and renormalised over it. Greedy decoding (``temperature == 0``) has no
sampling distribution; there we report the model's own ``log_softmax(logits)`` (temperature 1,
no filtering), which is what verifiers and search strategies score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from fastpeft.reasoning.types import SamplingParams


def sampling_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities ``[B, V]`` of the distribution a token is drawn from (``-inf`` = filtered out).

    logits: ``[B, V]`` in float32 or float64.
    """
    if params.temperature == 0:
        return torch.log_softmax(logits, dim=-1)
    scaled = logits / params.temperature
    vocab = scaled.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        # keep the smallest prefix whose mass reaches top_p; the top token always survives
        drop_sorted = mass_before >= params.top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


def choose_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row. Returns (tokens ``[B]`` long, their logprobs ``[B]``).

    logits: ``[B, V]``; half-precision logits are upcast to float32 first (float64 stays float64).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logprobs = sampling_logprobs(logits, params)
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        tokens = sample_rows(logprobs.exp(), generator)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def sample_rows(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of ``probs`` ``[B, V]`` (each row summing to ~1), drawn with probability
    proportional to its entries: inverse transform, one uniform number per row against the row's
    cumulative sum. ``torch.multinomial`` draws V exponentials per row instead (3 ms a step for
    16 x 8192 on one CPU core, half of a small model's decode step). An entry of 0 is never drawn:
    the first cumulative sum above ``u`` belongs to a positive entry."""
    cdf = probs.cumsum(dim=-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def truncate_at_stop(text: str, stops: Sequence[str]) -> str | None:
    """``text`` cut right after the stop string that ends first (kept), or None if none occurs."""
    ends = [i + len(s) for s in stops if (i := text.find(s)) >= 0]
    return text[: min(ends)] if ends else None


class StopStringChecker:
    """Detects stop strings in a growing continuation without re-decoding all of it every step.

    Each step decodes only the last few tokens (enough to span the longest stop string even with
    byte-level tokens); a hit there is confirmed on the full decoded text, so a decode artefact at
    the window's left edge can neither cause nor hide a stop.
    """

    def __init__(self, stops: Sequence[str], decode: Callable[[list[int]], str]):
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop strings must be non-empty str, got {list(stops)!r}")
        self.stops = tuple(stops)
        self.decode = decode
        self.window = 4 * max(len(s) for s in self.stops) + 8

    def check(self, token_ids: list[int]) -> str | None:
        """The full text truncated after its first stop string, or None if no stop string occurs yet."""
        tail = self.decode(token_ids[-self.window :])
        if not any(s in tail for s in self.stops):
            return None
        return truncate_at_stop(self.decode(token_ids), self.stops)


class RowFinishState:
    """Every row's tokens, logprobs and finish state, kept on the device so a decode step needs no
    host round trip: :meth:`record` is a handful of tensor ops, :meth:`all_finished` (one sync) is
    called every few steps, and stop strings, which need text, are checked on the host in batches by
    :meth:`check_stops`, which finds the first token at which a stop string appears (so the result
    is the same as checking after every token; rows simply ran a few steps past it).

    Precedence within one token, as for a per-token check: EOS, then a stop string, then the budget.
    """

    RUNNING, EOS, STOP, LENGTH = 0, 1, 2, 3
    REASONS: ClassVar[dict[int, str]] = {EOS: "eos", STOP: "stop", LENGTH: "length"}

    def __init__(self, budgets: Sequence[int], eos_token_ids: Sequence[int], device: torch.device) -> None:
        rows, steps = len(budgets), max(budgets)
        self.tokens = torch.zeros((rows, steps), dtype=torch.long, device=device)
        self.logprobs = torch.zeros((rows, steps), dtype=torch.float32, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)  # tokens kept per row
        self.reasons = torch.zeros(rows, dtype=torch.int8, device=device)
        self.budgets = torch.tensor(list(budgets), dtype=torch.long, device=device)
        self.eos = torch.tensor(sorted(eos_token_ids), dtype=torch.long, device=device) if eos_token_ids else None
        self._host_tokens: list[list[int]] = [[] for _ in range(rows)]  # stop checks: tokens seen so far
        self._host_done = [False] * rows

    def record(self, step: int, tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
        """Store step ``step``'s tokens ``[B]`` and logprobs ``[B]``; finish rows at EOS or their budget."""
        running = self.reasons == self.RUNNING
        self.tokens[:, step] = tokens
        self.logprobs[:, step] = logprobs.float()
        self.lengths += running
        full = running & (self.lengths >= self.budgets)
        self.reasons.masked_fill_(full, self.LENGTH)
        if self.eos is not None:
            self.reasons.masked_fill_(running & torch.isin(tokens, self.eos), self.EOS)

    def all_finished(self) -> bool:
        return not bool((self.reasons == self.RUNNING).any())

    def check_stops(self, steps: int, checker: StopStringChecker) -> None:
        """Look for stop strings in the tokens of steps ``[already checked, steps)`` of unfinished rows."""
        lengths, reasons = self.lengths.tolist(), self.reasons.tolist()
        tokens = self.tokens[:, : max(lengths, default=0)].tolist()
        hits: list[tuple[int, int]] = []
        for r, seen in enumerate(self._host_tokens):
            if self._host_done[r]:
                continue
            for p in range(len(seen), min(steps, lengths[r])):
                seen.append(tokens[r][p])
                if reasons[r] == self.EOS and p == lengths[r] - 1:
                    break  # the EOS token itself ends the row before any stop check
                if checker.check(seen) is not None:
                    hits.append((r, p + 1))
                    break
            self._host_done[r] = reasons[r] != self.RUNNING or bool(hits and hits[-1][0] == r)
        if hits:
            rows = torch.tensor([r for r, _ in hits], device=self.lengths.device)
            self.lengths[rows] = torch.tensor([n for _, n in hits], device=self.lengths.device)
            self.reasons[rows] = self.STOP

    def results(self) -> list[tuple[list[int], list[float], str]]:
        """(token ids, logprobs, finish reason) per row; one transfer to the host."""
        lengths, reasons = self.lengths.tolist(), self.reasons.tolist()
        tokens, logprobs = self.tokens.tolist(), self.logprobs.tolist()
        return [
            (tokens[r][: lengths[r]], logprobs[r][: lengths[r]], self.REASONS.get(reasons[r], "length"))
            for r in range(len(lengths))
        ]
