"""The memory-saving pieces of a training step, switched on together or one by one.

``StepDesign`` fields and what each one changes (the ledger measures every combination):

- ``gradient_checkpointing``: each transformer block keeps only its input; its activations are
  recomputed in the backward (transformers' non-reentrant checkpointing);
- ``offload_activations``: those block inputs wait in host memory, copied out and prefetched back
  on a side stream (:mod:`fastpeft.training.offload`); implies checkpointing;
- ``mlp_tile_rows``: each gated MLP runs over row tiles of this size and saves only its input
  (:class:`fastpeft.tiled_mlp.TiledGatedMLP`), so ``[T, intermediate]`` tensors never exist whole;
- ``lean_norms``: RMSNorms save only x and rstd, fp32 temporaries per row chunk
  (:class:`fastpeft.lean_rms_norm.LeanRMSNorm`).
"""

from __future__ import annotations

import dataclasses

from torch import nn


@dataclasses.dataclass
class StepDesign:
    gradient_checkpointing: bool = True
    offload_activations: bool = False
    mlp_tile_rows: int | None = None
    lean_norms: bool = False

    def __post_init__(self) -> None:
        if self.mlp_tile_rows is not None and (
            isinstance(self.mlp_tile_rows, bool) or not isinstance(self.mlp_tile_rows, int) or self.mlp_tile_rows <= 0
        ):
            raise ValueError(f"mlp_tile_rows must be a positive integer or None, got {self.mlp_tile_rows!r}")

    @classmethod
    def long_context(cls) -> StepDesign:
        """The design the memory ledger picked for long sequences (see benchmarks/RESULTS.md)."""
        return cls(
            gradient_checkpointing=True, offload_activations=True, mlp_tile_rows=LONG_CONTEXT_TILE_ROWS, lean_norms=True
        )

    def label(self) -> str:
        parts = [
            "offloaded checkpointing"
            if self.offload_activations
            else "checkpointing"
            if self.gradient_checkpointing
            else "no checkpointing"
        ]
        if self.mlp_tile_rows is not None:
            parts.append(f"tiled MLP ({self.mlp_tile_rows} rows)")
        if self.lean_norms:
            parts.append("lean RMSNorm")
        return " + ".join(parts)


LONG_CONTEXT_TILE_ROWS = 2048


def apply_step_design(model: nn.Module, design: StepDesign) -> nn.Module:
    """Apply ``design`` to ``model`` in place (after the adapters are injected); returns it."""
    from fastpeft.training.model_setup import enable_gradient_checkpointing

    if design.mlp_tile_rows is not None:
        from fastpeft.tiled_mlp import tile_gated_mlps

        tile_gated_mlps(model, design.mlp_tile_rows)
    if design.lean_norms:
        from fastpeft.lean_rms_norm import lean_rms_norms

        lean_rms_norms(model)
    if design.offload_activations:
        from fastpeft.training.offload import enable_offloaded_checkpointing

        enable_offloaded_checkpointing(model)
    elif design.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model
