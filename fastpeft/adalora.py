"""AdaLoRA (adaptive budget allocation for LoRA) as PEFT 0.21 computes it (peft/tuners/adalora).

Each adapted layer holds an SVD-like triplet P Λ Q in PEFT's names and shapes: ``lora_A`` ``[r, in]``
(Q, right vectors), ``lora_E`` ``[r, 1]`` (Λ, the singular values), ``lora_B`` ``[out, r]`` (P):

    y = x·Wᵀ + b + s·x·(B·(A ⊙ E))ᵀ,    s = lora_alpha / (init_r + 1e-5)

(PEFT's ``scaling / (ranknum + 1e-5)``; ranknum stays init_r after pruning, so s never changes).
The forward is the fused ``lora_linear`` op called with A' = A ⊙ E; the gradient reaches E through
autograd of that product. PEFT initialises E = 0 (a no-op adapter) and A, B ~ N(0, 0.02).

Budget allocation (:class:`RankAllocator`, call :func:`update_and_allocate` after ``backward()`` and
before ``zero_grad()``): per parameter entry the sensitivity I = |p·∇p|, smoothed Ī ← β1·Ī + (1−β1)·I
and the uncertainty Ū ← β2·Ū + (1−β2)·|I − Ī|; an entry scores Ī·Ū and triplet i scores
S_E[i] + mean_j S_A[i, j] + mean_j S_B[j, i]. The total budget (sum of kept ranks) is init_r per
layer until ``tinit``, then falls cubically, b(t) = ⌊(b0 − bT)·(1 − (t − tinit)/(T − tfinal − tinit))³
+ bT⌋, reaching target_r per layer at T − tfinal; every ``deltaT`` steps the E entries of the
lowest-scoring triplets are zeroed so that exactly b(t) remain (barring tied scores). At
T − tfinal the pattern is frozen (``rank_pattern``) and re-applied every later step.

:func:`orthogonal_regularization` is PEFT's penalty, orth_reg_weight · mean over the matrices of
‖A·Aᵀ − I‖_F and ‖BᵀB − I‖_F (the trainer adds it to the loss; ``reduction="sum"`` gives the sum).

On disk (PEFT's AdaLoRA format): ``adapter_config.json`` with peft_type "ADALORA" and init_r,
target_r, tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight, total_step, rank_pattern
({"<module path>.lora_E": [bool] * init_r}); safetensors keys ``<path>.lora_A``, ``.lora_B``,
``.lora_E`` (no ``.weight``), pruned triplets dropped as PEFT does. Loading puts kept triplets back
at their positions in init_r-sized tensors, zeros elsewhere (the same function as PEFT's resize).
In a :class:`~fastpeft.LoraConfig` the settings live in ``variant_config``; ``r`` is init_r.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.adapters import LoraAdapter, check_rank
from fastpeft.inject import adapter_configs
from fastpeft.kernels.lora_linear import lora_linear
from fastpeft.lifecycle import active_adapter
from fastpeft.lora_linear import iter_adapter_layers
from fastpeft.variants import register_variant

ALLOCATORS_ATTR = "fastpeft_adalora_allocators"  # {adapter name: RankAllocator} on the model instance
TRIPLET = ("lora_A", "lora_B", "lora_E")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass
class AdaLoraSettings:
    """PEFT's AdaLoraConfig fields (same names and defaults; init_r defaults to LoraConfig.r)."""

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None

    def __post_init__(self) -> None:
        def bad(field: str, expected: str) -> ValueError:
            return ValueError(f"AdaLoRA variant_config[{field!r}] must be {expected}, got {getattr(self, field)!r}")

        if not _is_int(self.init_r) or self.init_r < 1:
            raise bad("init_r", "a positive int")
        if not _is_int(self.target_r) or not 1 <= self.target_r <= self.init_r:
            raise bad("target_r", f"an int in [1, init_r={self.init_r}]")
        if not _is_int(self.total_step) or self.total_step <= 0:
            raise bad("total_step", "a positive int (AdaLoRA's schedule needs the number of training steps)")
        for field in ("tinit", "tfinal"):
            if not _is_int(getattr(self, field)) or getattr(self, field) < 0:
                raise bad(field, "a non-negative int")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"AdaLoRA schedule tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step} "
                "leaves no budgeting phase (need tinit < total_step - tfinal)"
            )
        if not _is_int(self.deltaT) or self.deltaT < 1:
            raise bad("deltaT", "a positive int")
        for field in ("beta1", "beta2"):
            if not isinstance(getattr(self, field), (int, float)) or not 0 < getattr(self, field) < 1:
                raise bad(field, "a float in (0, 1)")
        if not isinstance(self.orth_reg_weight, (int, float)) or self.orth_reg_weight < 0:
            raise bad("orth_reg_weight", "a number >= 0")
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, dict):
                raise bad("rank_pattern", "None or a dict {'<module path>.lora_E': [bool] * init_r}")
            for key, mask in self.rank_pattern.items():
                ok = isinstance(mask, (list, tuple)) and len(mask) == self.init_r and all(m in (0, 1) for m in mask)
                if not (isinstance(key, str) and key.endswith(".lora_E") and ok):
                    raise ValueError(
                        f"AdaLoRA rank_pattern entry {key!r}: expected '<module path>.lora_E' -> "
                        f"{self.init_r} booleans, got {mask!r}"
                    )
            self.rank_pattern = {k: [bool(m) for m in v] for k, v in self.rank_pattern.items()}


def settings_from_variant_config(r: int, variant_config: dict[str, Any]) -> AdaLoraSettings:
    """Validated settings; ``init_r`` defaults to ``r``. Unknown keys raise a ValueError naming them."""
    if not isinstance(variant_config, dict):
        raise ValueError(f"LoraConfig.variant_config must be a dict, got {variant_config!r}")
    known = {f.name for f in dataclasses.fields(AdaLoraSettings)}
    unknown = sorted(set(variant_config) - known)
    if unknown:
        raise ValueError(f"AdaLoRA variant_config has unknown keys {unknown}; known: {sorted(known)}")
    return AdaLoraSettings(**{"init_r": r, **variant_config})


# -- the registry's hooks (LoraConfig validation, adapter_config.json, on-disk tensors) -------------


def normalize_adalora_config(config: Any) -> None:
    """Fill in and check a LoraConfig's AdaLoRA settings; ``variant_config['init_r']`` sets r."""
    if config.use_rslora:
        raise ValueError("LoraConfig.use_rslora cannot be used with variant 'adalora' (its scaling is alpha/init_r)")
    settings = settings_from_variant_config(config.r, config.variant_config)
    config.r = settings.init_r
    config.variant_config = dataclasses.asdict(settings)


def adalora_peft_fields(config: Any) -> dict[str, Any]:
    """The keys PEFT's AdaLoraConfig adds to adapter_config.json (and r)."""
    fields = dict(config.variant_config)
    # PEFT ignores r for AdaLoRA and warns when it differs from its default 8; init_r is the rank
    return {**fields, "r": 8}


def adalora_fields_from_peft(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """PEFT's AdaLoRA adapter_config.json dict -> (its LoRA fields, with r = init_r; variant_config)."""
    names = [f.name for f in dataclasses.fields(AdaLoraSettings)]
    settings = {k: data[k] for k in names if k in data}
    if "init_r" not in settings:
        raise ValueError("adapter_config.json has peft_type 'ADALORA' but no init_r")
    lora_data = {k: v for k, v in data.items() if k not in names}
    lora_data["r"] = settings["init_r"]
    return lora_data, settings


def _split_key(key: str, prefix: str) -> tuple[str, str]:
    """``prefix + '<module path>.<suffix>'`` -> (module path, suffix)."""
    head, _, suffix = key.rpartition(".")
    return head[len(prefix) :], suffix


def compress_by_rank_pattern(tensors: dict[str, torch.Tensor], config: Any, prefix: str) -> dict[str, torch.Tensor]:
    """Drop pruned triplets as PEFT's save does: A, E rows and B columns where rank_pattern is False."""
    pattern = config.variant_config.get("rank_pattern") or {}
    out = dict(tensors)
    for key, tensor in tensors.items():
        path, suffix = _split_key(key, prefix)
        mask = pattern.get(f"{path}.lora_E")
        if suffix in TRIPLET and mask is not None:
            keep = torch.tensor(mask, dtype=torch.bool, device=tensor.device)
            out[key] = tensor[:, keep] if suffix == "lora_B" else tensor[keep]
    return out


def expand_by_rank_pattern(adapters: dict[str, dict[str, torch.Tensor]], config: Any, prefix: str) -> None:
    """Inverse of :func:`compress_by_rank_pattern` on ``{module path: {suffix: tensor}}``, in place:
    kept triplets go back to their positions in init_r-sized tensors, zeros elsewhere."""
    pattern = config.variant_config.get("rank_pattern") or {}
    unknown = sorted(k for k in pattern if k[: -len(".lora_E")] not in adapters)
    if unknown:
        raise ValueError(f"adapter_config.json rank_pattern names modules with no tensors in the file: {unknown}")
    r = config.r
    for path, found in adapters.items():
        mask = pattern.get(f"{path}.lora_E")
        if mask is None:
            continue
        keep = torch.tensor(mask, dtype=torch.bool)
        kept = int(keep.sum())
        for suffix, tensor in list(found.items()):
            if suffix not in TRIPLET:
                continue
            dim = 1 if suffix == "lora_B" else 0
            if tensor.dim() != 2 or tensor.shape[dim] != kept:
                raise ValueError(
                    f"key {prefix}{path}.{suffix}: shape {tuple(tensor.shape)} does not hold the "
                    f"{kept} triplets its rank_pattern keeps"
                )
            shape = list(tensor.shape)
            shape[dim] = r
            full = tensor.new_zeros(shape)
            if dim:
                full[:, keep] = tensor
            else:
                full[keep] = tensor
            found[suffix] = full


# -- the adapter ------------------------------------------------------------------------------------


class AdaLoraAdapter(LoraAdapter):
    """A ``[r, in]``, E ``[r, 1]``, B ``[out, r]``; r = init_r for the adapter's whole life."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **settings: Any,
    ) -> None:
        check_rank(r)
        if use_rslora:
            raise ValueError("AdaLoRA does not support use_rslora (its scaling is lora_alpha / init_r)")
        # the schedule settings are validated by LoraConfig and used by the RankAllocator, not here
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(AdaLoraSettings)})
        if unknown:
            raise TypeError(f"AdaLoraAdapter got unknown settings {unknown}")
        if settings.get("init_r", r) != r:
            raise ValueError(f"AdaLoRA init_r={settings['init_r']} differs from the adapter rank r={r}")
        super().__init__(
            in_features,
            out_features,
            r,
            lora_alpha,
            lora_dropout,
            use_rslora,
            init_lora_weights,
            dtype=dtype,
            device=device,
        )
        self.lora_E = nn.Parameter(torch.empty(r, 1, dtype=dtype, device=device))
        self.ranknum = float(r)  # PEFT's ranknum: the scaling divisor, fixed at init_r
        self.reset_parameters(init_lora_weights)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.ranknum + 1e-5)

    @torch.no_grad()
    def reset_parameters(self, init_lora_weights: bool | str = True) -> None:
        """PEFT's: E = 0, A, B ~ N(0, 0.02) (True or "gaussian"); all three ~ N(0, 1) with False."""
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        if "lora_E" not in self._parameters:
            return  # LoraAdapter.__init__ calls this before E exists; __init__ calls it again after
        if init_lora_weights:
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        else:
            for param in (self.lora_A, self.lora_E, self.lora_B):
                nn.init.normal_(param)

    def scaled_A(self) -> torch.Tensor:
        """A ⊙ E ``[r, in]``: Λ folded into Q so the plain LoRA op (and its gradients) apply."""
        return self.lora_A * self.lora_E

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * F.linear(F.linear(x, self.scaled_A()), self.lora_B)

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.dropout_active() or layer.base_needs_grad():
            return layer.base_linear(x) + self.lora_output(self.dropout(x))
        return lora_linear(x, layer.base_operand(), layer.bias, self.scaled_A(), self.lora_B, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """s·B·(A ⊙ E) in fp32, ``[out, in]``."""
        a, e, b = (p.detach().float() for p in (self.lora_A, self.lora_E, self.lora_B))
        return self.scaling * (b @ (a * e))

    @classmethod
    def peft_shapes(cls, r: int, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
        return {"lora_A": (r, in_features), "lora_B": (out_features, r), "lora_E": (r, 1)}

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}


register_variant(
    "adalora",
    AdaLoraAdapter,
    normalize=normalize_adalora_config,
    peft_type="ADALORA",
    peft_fields=adalora_peft_fields,
    from_peft=adalora_fields_from_peft,
    pack=compress_by_rank_pattern,
    unpack=expand_by_rank_pattern,
)


def adalora_adapters(model: nn.Module, adapter_name: str | None = None) -> dict[str, AdaLoraAdapter]:
    """{module path: AdaLoraAdapter} for ``adapter_name`` (default: the active adapter)."""
    name = adapter_name or active_adapter(model)
    found = {p: layer.adapters[name] for p, layer in iter_adapter_layers(model) if name in layer.adapters}
    found = {p: a for p, a in found.items() if isinstance(a, AdaLoraAdapter)}
    if not found:
        raise ValueError(f"the model has no AdaLoRA adapter named {name!r}")
    return found  # type: ignore[return-value]


# -- budget allocation -------------------------------------------------------------------------------


class RankAllocator:
    """PEFT's RankAllocator over ``{module path: AdaLoraAdapter}`` (state: the EMAs, the rank pattern)."""

    def __init__(self, adapters: dict[str, AdaLoraAdapter], settings: AdaLoraSettings) -> None:
        if not adapters:
            raise ValueError("RankAllocator needs at least one AdaLoRA adapter")
        self.adapters, self.settings = dict(adapters), settings
        self.init_budget = sum(a.r for a in self.adapters.values())
        self.target_budget = settings.target_r * len(self.adapters)
        self.rank_pattern: dict[str, list[bool]] | None = settings.rank_pattern
        self.reset_importance()

    def reset_importance(self) -> None:
        self.ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total budget at ``step``, whether to mask at this step) — PEFT's cubic schedule."""
        s = self.settings
        if step <= s.tinit:
            return self.init_budget, False
        if step > s.total_step - s.tfinal:
            return self.target_budget, True
        coeff = 1 - (step - s.tinit) / (s.total_step - s.tfinal - s.tinit)
        budget = int((self.init_budget - self.target_budget) * coeff**3 + self.target_budget)
        return budget, step % s.deltaT == 0

    @torch.no_grad()
    def update_importance(self) -> None:
        """Per A, B, E entry: I = |p·∇p|, Ī ← β1·Ī + (1−β1)·I, Ū ← β2·Ū + (1−β2)·|I − Ī|."""
        beta1, beta2 = self.settings.beta1, self.settings.beta2
        for path, adapter in self.adapters.items():
            for name in TRIPLET:
                param = getattr(adapter, name)
                if param.grad is None:
                    raise RuntimeError(
                        f"{path}.{name} has no gradient; call update_and_allocate after "
                        "loss.backward() and before optimizer.zero_grad()"
                    )
                key = (path, name)
                if key not in self.ipt:
                    self.exp_avg_ipt[key] = torch.zeros_like(param)
                    self.exp_avg_unc[key] = torch.zeros_like(param)
                self.ipt[key] = (param * param.grad).abs()
                self.exp_avg_ipt[key] = beta1 * self.exp_avg_ipt[key] + (1 - beta1) * self.ipt[key]
                self.exp_avg_unc[key] = (
                    beta2 * self.exp_avg_unc[key] + (1 - beta2) * (self.ipt[key] - self.exp_avg_ipt[key]).abs()
                )

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """{path: ``[r]``}: S_E + mean over A's row + mean over B's column, with S = Ī·Ū."""
        if not self.exp_avg_ipt:
            raise RuntimeError("no importance recorded yet: update_and_allocate must run before the final step")
        scores = {}
        for path in self.adapters:
            score = {n: self.exp_avg_ipt[(path, n)] * self.exp_avg_unc[(path, n)] for n in TRIPLET}
            ab = torch.stack([score["lora_A"].mean(dim=1), score["lora_B"].mean(dim=0)], dim=1).sum(dim=1)
            scores[path] = score["lora_E"].view(-1) + ab
        return scores

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero E where a triplet scores at or below the (init − budget)-th smallest score."""
        scores = self.triplet_scores()
        first = next(iter(scores.values()))
        all_scores = torch.cat([s.to(first.device) for s in scores.values()])
        k = self.init_budget - budget
        # k <= 0 keeps everything (PEFT's kthvalue would fail there)
        threshold = torch.kthvalue(all_scores, k).values if k > 0 else None
        pattern = {}
        for path, score in scores.items():
            if threshold is None:
                keep = torch.ones_like(score, dtype=torch.bool)
            else:
                keep = score > threshold.to(score.device)
            self.adapters[path].lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[f"{path}.lora_E"] = keep.tolist()
        self.rank_pattern = pattern
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self) -> None:
        """Re-apply the frozen pattern (the optimizer can move a zeroed E entry again)."""
        if self.rank_pattern is None:
            raise RuntimeError("no rank_pattern to apply: the budgeting phase has not finished")
        for path, adapter in self.adapters.items():
            mask = self.rank_pattern.get(f"{path}.lora_E")
            if mask is None:
                raise ValueError(f"rank_pattern has no entry for {path}.lora_E")
            keep = torch.tensor(mask, dtype=torch.bool, device=adapter.lora_E.device)
            adapter.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

    def update_and_allocate(self, step: int) -> int:
        """One call per training step (PEFT's ``AdaLoraModel.update_and_allocate``); returns the budget."""
        end = self.settings.total_step - self.settings.tfinal
        if step < end:
            self.update_importance()
            budget, mask = self.budget_schedule(step)
            if mask:
                self.mask_to_budget(budget)
        elif step == end:  # final allocation: frozen from here on
            budget = self.budget_schedule(step)[0]
            self.mask_to_budget(budget)
            self.reset_importance()
        else:
            budget = self.target_budget
            self.mask_using_rank_pattern()
        return budget


def update_and_allocate(model: nn.Module, step: int, adapter_name: str | None = None) -> int:
    """Update importance and prune for training ``step`` (after backward, before zero_grad).

    The allocator for ``adapter_name`` (default: the active adapter) lives on the model instance;
    the rank pattern is written into the adapter's config so :func:`fastpeft.save_adapter` stores it.
    Returns the current total budget (sum of kept ranks).
    """
    if not _is_int(step) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    name = adapter_name or active_adapter(model)
    configs = adapter_configs(model)
    if name not in configs or configs[name].variant != "adalora":
        raise ValueError(f"adapter {name!r} is not an AdaLoRA adapter of this model (adapters: {list(configs)})")
    allocators = model.__dict__.setdefault(ALLOCATORS_ATTR, {})
    if name not in allocators:
        # own copy: a config object passed to inject may be shared with other models
        configs[name] = configs[name].replace()
        settings = settings_from_variant_config(configs[name].r, configs[name].variant_config)
        allocators[name] = RankAllocator(adalora_adapters(model, name), settings)
    allocator = allocators[name]
    budget = allocator.update_and_allocate(step)
    configs[name].variant_config["rank_pattern"] = allocator.rank_pattern
    return budget


def orthogonal_regularization(
    model: nn.Module, adapter_name: str | None = None, *, weight: float | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """weight · reduce(‖A·Aᵀ − I‖_F, ‖BᵀB − I‖_F over every layer), a scalar fp32 tensor.

    ``weight`` defaults to the adapter's orth_reg_weight; ``reduction="mean"`` divides by the number
    of matrices (2 per layer) as PEFT does, ``"sum"`` does not. Add the result to the training loss.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    adapters = adalora_adapters(model, adapter_name)
    if weight is None:
        config = adapter_configs(model).get(adapter_name or active_adapter(model))
        if config is None or config.variant != "adalora":
            raise ValueError("no AdaLoRA config on this model to read orth_reg_weight from; pass weight=")
        weight = config.variant_config["orth_reg_weight"]
    terms = []
    for adapter in adapters.values():
        a, b = adapter.lora_A.float(), adapter.lora_B.float()
        eye = torch.eye(adapter.r, dtype=torch.float32, device=a.device)
        terms += [torch.linalg.norm(a @ a.t() - eye), torch.linalg.norm(b.t() @ b - eye)]
    total = torch.stack([t.to(terms[0].device) for t in terms]).sum()
    return weight * (total / len(terms) if reduction == "mean" else total)
