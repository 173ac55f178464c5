"""LESS-style influence: how much a training row's gradient points where a target set's does.

Per row, the gradient of its mean response NLL with respect to LoRA parameters (seeded fresh
LoRA like GraNd's, or a given trained adapter) is flattened (parameters in name order) and
reduced by a seeded Gaussian random projection to `dim` dimensions (Johnson-Lindenstrauss:
inner products and cosines are kept up to ~1/sqrt(dim)). The projection matrix is never held
whole: its rows are generated in blocks of 1024 from (seed, block index), so the same seed
gives the same features in any process or batch, in O(1024 * dim) memory.

Score (`influence` column): cosine similarity between a row's projected gradient and the mean
of the target rows' unit-normalized projected gradients. Ranking by it equals ranking by
LESS's average cosine to the target examples (Xia et al. 2024), which is this cosine times a
constant. The target set is a small file the user names (`influence.target_path`: a
validation split, or a few examples of the task they care about).
"""

from __future__ import annotations

import math

from pydantic import Field

from frugalray.config import StrictModel
from frugalray.examples.loaders import FieldMapping


class InfluenceSettings(StrictModel):
    target_path: str | None = Field(
        default=None, description="small .jsonl/.json/.parquet/dataset dir of target examples (required for influence)"
    )
    target_fields: FieldMapping | None = Field(default=None, description="columns of the target set; default: `fields`")
    max_target_rows: int = Field(default=64, ge=1, description="target rows used (the first ones)")
    dim: int = Field(default=512, ge=16, le=8192, description="random-projection dimension")
    seed: int = Field(default=0, description="seeds both the projection and the fresh LoRA")
    lora_rank: int = Field(default=4, ge=1)
    lora_alpha: float = Field(default=8.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    adapter_path: str | None = Field(default=None, description="a trained PEFT adapter to take gradients at; None: fresh LoRA")


PROJECTION_BLOCK = 1024  # projection rows generated per seeded block: fixed, so features never depend on batching


def projection_chunk(seed: int, block_index: int, rows: int, dim: int):
    """Rows [block_index * PROJECTION_BLOCK, +rows) of the projection matrix, N(0, 1/dim) entries."""
    import torch

    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(block_index))
    return torch.randn(rows, dim, generator=gen, dtype=torch.float32) / math.sqrt(dim)


def project(grads, dim: int, seed: int):
    """[B, D] gradients -> [B, dim] features; the projection is generated block by block
    (O(PROJECTION_BLOCK * dim) memory), so the whole [D, dim] matrix never exists."""
    import torch

    out = torch.zeros(grads.shape[0], dim, dtype=torch.float32)
    for index, start in enumerate(range(0, grads.shape[1], PROJECTION_BLOCK)):
        block = grads[:, start:start + PROJECTION_BLOCK].float()
        out += block @ projection_chunk(seed, index, block.shape[1], dim)
    return out


def projection_matrix(n_params: int, dim: int, seed: int):
    """The whole [D, dim] matrix `project` applies (for checks on small D only)."""
    import torch

    return torch.cat([
        projection_chunk(seed, index, min(PROJECTION_BLOCK, n_params - start), dim)
        for index, start in enumerate(range(0, n_params, PROJECTION_BLOCK))
    ])


def target_direction(features):
    """Mean of the unit-normalized target features: [T, dim] -> [dim]."""
    import torch

    norms = features.norm(dim=1, keepdim=True)
    usable = norms[:, 0] > 0
    if not bool(usable.any()):
        raise ValueError("influence: every target row has a zero gradient; check the target set")
    return (features[usable] / norms[usable]).mean(0).to(torch.float32)


def cosine_to(features, direction) -> list[float]:
    """Cosine of each feature row to `direction`; NaN for a zero row."""
    dn = float(direction.norm())
    out = []
    for row in features:
        n = float(row.norm())
        out.append(float(row @ direction) / (n * dn) if n > 0 and dn > 0 else math.nan)
    return out


def projection_flops(n_params: int, dim: int) -> float:
    return 2.0 * n_params * dim
