"""Reward model: a scalar head on a (Q)LoRA causal LM, trained with the Bradley-Terry loss.

Data: ``{"prompt", "chosen", "rejected"[, "margin"]}`` records. Each side is scored at its last
token (the EOS the SFT tokenization appends); the loss is
:func:`~fastpeft.training.losses_preference.bradley_terry_loss` with the per-pair margin and optional
reward centering; held-out pairs give pairwise accuracy. The same :class:`ScalarHeadModel` serves
the process reward model and the reward-hacking detector; :class:`RewardScorer` plugs a trained one
into the RL recipes (as a reward function) and into search (as a ``Scorer``).

``objective="process"`` / ``"outcome"`` trains a process / outcome reward model on step-label
records instead of pairs (:mod:`fastpeft.training.step_reward_model`).

Saved: ``<output_dir>/adapter/`` (PEFT format) with ``score_head.safetensors`` beside the adapter.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fastpeft.training import distributed as dist_utils
from fastpeft.training.data import BatchPlan, load_records
from fastpeft.training.logprobs import backbone_hidden
from fastpeft.training.loop import Callback, RunResult, start_run
from fastpeft.training.losses_preference import bradley_terry_loss
from fastpeft.training.pairs import PairRow, collate_pairs, tokenize_pairs
from fastpeft.training.recipe import RecipeConfig, setup_run

HEAD_FILE = "score_head"


class ScalarHeadModel(nn.Module):
    """A causal LM's backbone plus ``head``: ``nn.Linear(hidden, 1)`` in fp32 -> one score per token.

    ``forward(input_ids [B, T], attention_mask [B, T]) -> scores [B, T]`` (fp32).
    The LM head is not used. The head starts at N(0, 1/(H+1)) weights and zero bias.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        device = lm.get_input_embeddings().weight.device
        self.head = nn.Linear(cfg.hidden_size, 1, device=device, dtype=torch.float32)
        with torch.no_grad():
            self.head.weight.normal_(0.0, 1.0 / math.sqrt(cfg.hidden_size + 1))
            self.head.bias.zero_()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden = backbone_hidden(self.lm, input_ids, attention_mask, position_ids)
        with torch.autocast(hidden.device.type, enabled=False):  # the fp32 head stays fp32 under autocast
            return self.head(hidden.float()).squeeze(-1)

    def sequence_scores(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The score at each row's last attended token: ``[B]``."""
        return last_token_scores(self(input_ids, attention_mask, position_ids), attention_mask)

    def head_state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.head.weight.detach().cpu(), "bias": self.head.bias.detach().cpu()}

    def load_head(self, path: str | Path) -> None:
        """Load ``score_head.safetensors`` (a file or the directory holding it)."""
        from safetensors.torch import load_file

        path = Path(path)
        path = path / f"{HEAD_FILE}.safetensors" if path.is_dir() else path
        state = load_file(str(path))
        if set(state) != {"weight", "bias"} or tuple(state["weight"].shape) != tuple(self.head.weight.shape):
            raise ValueError(
                f"{path}: expected a head with weight {tuple(self.head.weight.shape)} and bias, got "
                f"{ {k: tuple(v.shape) for k, v in state.items()} }"
            )
        with torch.no_grad():
            self.head.weight.copy_(state["weight"])
            self.head.bias.copy_(state["bias"])


def last_token_scores(scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``scores[b, last t with attention_mask[b, t] = 1]``: ``[B, T] -> [B]`` (any padding side)."""
    positions = torch.arange(scores.shape[1], device=scores.device)
    last = (attention_mask.bool() * positions).argmax(dim=1)
    return scores.gather(1, last[:, None]).squeeze(1)


class RewardScorer:
    """A trained scalar-head model as a reward: ``score(prompt, response)`` = σ(r) in [0, 1] (the
    ``Scorer`` protocol) and ``__call__(prompt, completion, record)`` = r (a reward function)."""

    def __init__(self, model: ScalarHeadModel, tokenizer: Any, max_seq_len: int = 512):
        self.model, self.tokenizer, self.max_seq_len = model, tokenizer, max_seq_len
        self.__name__ = "reward_model"

    @torch.no_grad()
    def raw(self, prompt: str, response: str) -> float:
        ids = self.tokenizer(prompt + response)["input_ids"][: self.max_seq_len - 1]
        if self.tokenizer.eos_token_id is not None:  # scored like the training data: at the EOS
            ids = ids + [self.tokenizer.eos_token_id]
        device = next(self.model.parameters()).device
        x = torch.tensor([ids], device=device)
        was = self.model.training
        self.model.eval()
        try:
            return float(self.model.sequence_scores(x, torch.ones_like(x))[0])
        finally:
            self.model.train(was)

    def score(self, prompt: str, response: str) -> float:
        return float(torch.sigmoid(torch.tensor(self.raw(prompt, response))))

    def __call__(self, prompt: str, completion: str, record: Mapping[str, Any] | None = None) -> float:
        return self.raw(prompt, completion)


@dataclasses.dataclass
class RewardConfig(RecipeConfig):
    """Reward-model training (``fastpeft reward``); ``micro_batch_size`` counts pairs."""

    objective: Literal["pairwise", "process", "outcome"] = "pairwise"  # pairs, or step-label records
    label_key: Literal["soft", "hard", "checker"] = "soft"  # the step labels a process model fits
    centering_coef: float = 0.0
    margin_key: str = "margin"
    output_dir: str = "runs/reward"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.centering_coef < 0:
            raise ValueError(f"centering_coef must be >= 0, got {self.centering_coef}")
        if self.objective not in ("pairwise", "process", "outcome"):
            raise ValueError(f"objective must be 'pairwise', 'process' or 'outcome', got {self.objective!r}")


@dataclasses.dataclass
class RewardResult(RunResult):
    model: ScalarHeadModel | None = None  # the trained reward model, ready to score


@torch.no_grad()
def evaluate_pairs(
    model: ScalarHeadModel,
    pairs: Sequence[PairRow],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    bf16: bool = False,
) -> dict[str, float]:
    """Pairwise accuracy, mean BT loss and mean reward margin on ``pairs`` (model in eval mode)."""
    was = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for i in range(0, len(pairs), batch_size):
                chunk = list(pairs[i : i + batch_size])
                b = collate_pairs(chunk, pad_id, device)
                scores = model.sequence_scores(b["input_ids"], (b["segment_ids"] > 0).long(), b["position_ids"])
                chosen.append(scores[: len(chunk)])
                rejected.append(scores[len(chunk) :])
    finally:
        model.train(was)
    rc, rr = torch.cat(chosen), torch.cat(rejected)
    return {
        "eval_accuracy": float((rc > rr).float().mean()),
        "eval_loss": float(bradley_terry_loss(rc, rr)),
        "eval_margin": float((rc - rr).mean()),
        "eval_pairs": len(pairs),
    }


def train(
    config: RewardConfig, model: nn.Module | None = None, tokenizer: Any = None, callbacks: Sequence[Callback] = ()
) -> RewardResult:
    """Train a reward model as configured (``model``: an optional causal LM to start from)."""
    if config.objective != "pairwise":
        from fastpeft.training.step_reward_model import train_on_labels

        return train_on_labels(config, model, tokenizer, callbacks)
    ctx = setup_run(config, model, tokenizer)
    rm = ScalarHeadModel(ctx.model)
    rm.train()
    if config.train_data is None:
        raise ValueError("train_data is required (records with prompt, chosen, rejected)")
    pad = ctx.tokenizer.pad_token_id
    pairs = tokenize_pairs(
        load_records(config.train_data), ctx.tokenizer, config.max_seq_len, config.use_chat_template, config.margin_key
    )
    eval_pairs = []
    if config.eval_data is not None:
        eval_pairs = tokenize_pairs(
            load_records(config.eval_data),
            ctx.tokenizer,
            config.max_seq_len,
            config.use_chat_template,
            config.margin_key,
        )
    plan = BatchPlan(pairs, config.micro_batch_size, config.grad_accum_steps, ctx.world_size, ctx.rank, config.seed)
    layout = {"pairs": len(pairs), "global_batch_pairs": plan.global_batch}
    run = start_run(
        ctx,
        config,
        "reward",
        rm,
        config.total_steps(plan.steps_per_epoch),
        layout,
        saved_module=rm,
        find_unused=config.finetune == "full",
        callbacks=callbacks,  # the LM head is unused
        start_record={"pairs": len(pairs)},
    )
    evaluate = None
    if eval_pairs:

        def evaluate() -> dict[str, Any]:
            return evaluate_pairs(rm, eval_pairs, pad, config.eval_batch_size, ctx.device, config.bf16)

    run.evaluate_at_start(evaluate)
    for step in run.steps():
        micro = plan.micro_batches(step)
        n_pairs = float(dist_utils.all_reduce_sum(torch.tensor(float(sum(len(m) for m in micro)), device=ctx.device)))
        sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss, correct
        for j, mb in enumerate(micro):
            b = collate_pairs(mb, pad, ctx.device)
            with run.micro_batch(last=j == len(micro) - 1):
                segments = b["segment_ids"] > 0
                scores = last_token_scores(run.runner(b["input_ids"], segments.long(), b["position_ids"]), segments)
                rc, rr = scores[: len(mb)], scores[len(mb) :]
                margin = torch.tensor([p.margin for p in mb], device=ctx.device)
                loss = bradley_terry_loss(rc, rr, margin, config.centering_coef, reduction="sum")
                run.backward(loss / n_pairs)
            sums += torch.stack([loss.detach().double(), (rc > rr).sum().double()])
            run.count_tokens(int(segments.sum()))
        loss_value, accuracy = (dist_utils.all_reduce_sum(sums) / n_pairs).tolist()
        run.update(loss_value)
        run.end_step(step, {"loss": loss_value, "accuracy": accuracy}, evaluate)
    result = run.finish(evaluate, rm.head_state, HEAD_FILE)
    return RewardResult(**{f.name: getattr(result, f.name) for f in dataclasses.fields(result)}, model=rm)


def load_reward_model(lm: nn.Module, directory: str | Path) -> ScalarHeadModel:
    """A saved reward model: the adapter in ``directory`` loaded into ``lm`` plus its score head."""
    import fastpeft

    directory = Path(directory)
    if (directory / "adapter_config.json").exists():
        fastpeft.load_adapter(lm, directory)
    rm = ScalarHeadModel(lm)
    rm.load_head(directory)
    return rm
