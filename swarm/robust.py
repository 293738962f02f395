"""Robust aggregation for replica averaging: coordinate-wise CenteredClip (Karimireddy et al., 2021).

Pure torch, no networking (node/averaging.py runs it inside hivemind's all-reduce, where one peer
reduces each part of the parameter vector from every replica's copy of that part).

    v_0     = center                      (see `choose_center`)
    v_{t+1} = v_t + mean_i clip(x_i - v_t, -tau, tau)        (per coordinate, t = 0 .. iters-1)

Contributions that contain NaN or inf are dropped whole before anything else.

Why one bad replica cannot move the result far (per coordinate, for any values it sends):
  * Each iteration moves v by a mean of numbers in [-tau, tau], so |v_L - center| <= L * tau.
    Whatever anyone sends, a round moves no coordinate more than L*tau from the center.
  * For a fixed set of the other inputs, v -> v + mean_i clip(x_i - v) is non-decreasing with
    slope in [0, 1] (its derivative is 1 - #unclipped/n), i.e. 1-Lipschitz; replacing ONE of the n
    inputs by anything changes it by at most 2*tau/n. Unrolled over L iterations from the same
    center: |v_L - v'_L| <= 2 * L * tau / n.  (`influence_bound`)
  * The center: with 3 or more finite contributions, the coordinate-wise median, which one bad
    replica cannot push outside the range of the honest ones; with fewer, the reducer's own copy.
When every contribution lies within tau of the current v, the update is the plain mean, so honest
replicas that drifted apart by less than tau get exactly the ordinary average.
"""
from __future__ import annotations

import torch

DEFAULT_ITERS = 3


def default_tau(lr: float, average_every: int) -> float:
    """A clip radius above what honest replicas drift apart between two rounds: AdamW and Muon move
    a coordinate by about lr (rarely more) per step, so 2*lr*steps leaves room for both sides."""
    return 2.0 * float(lr) * max(1, int(average_every))


def influence_bound(tau: float, n: int, iters: int = DEFAULT_ITERS) -> float:
    """The most one of n contributions can shift any coordinate of the result (same center)."""
    return 2.0 * iters * tau / max(1, n)


def finite_rows(points: torch.Tensor) -> torch.Tensor:
    """Boolean mask [n]: which contributions are entirely finite."""
    return torch.isfinite(points.reshape(points.shape[0], -1)).all(dim=1)


def choose_center(points: torch.Tensor, own: int | None = None) -> torch.Tensor:
    """Coordinate-wise median of >= 3 finite points; else the own point (if finite) or the first one."""
    if points.shape[0] >= 3:
        return points.median(dim=0).values
    if own is not None and own < points.shape[0]:
        return points[own]
    return points[0]


def centered_clip(points: torch.Tensor, tau: float, iters: int = DEFAULT_ITERS,
                  center: torch.Tensor | None = None, own: int | None = None) -> torch.Tensor:
    """Robust mean of `points` [n, ...] (all finite): CenteredClip from `center` (default
    `choose_center(points, own)`), coordinate-wise clip radius `tau`, `iters` iterations."""
    if points.shape[0] == 0:
        raise ValueError("centered_clip needs at least one point")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    pts = points.float()
    v = (choose_center(pts, own) if center is None else center.float()).clone()
    for _ in range(iters):
        v += (pts - v).clamp_(-tau, tau).mean(dim=0)
    return v


def robust_mean(points: torch.Tensor, tau: float, iters: int = DEFAULT_ITERS, own: int | None = None,
                fallback: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Drop non-finite contributions, then CenteredClip. Returns (result, number dropped).
    `own` indexes the caller's own contribution in `points`. If nothing finite is left, returns
    `fallback` (or zeros)."""
    keep = finite_rows(points)
    dropped = int((~keep).sum())
    if not keep.any():
        out = fallback if fallback is not None else torch.zeros(points.shape[1:])
        return out.float().clone(), dropped
    if own is not None:
        own = int(keep[:own].sum()) if bool(keep[own]) else None
    return centered_clip(points[keep], tau, iters, own=own), dropped


def bounded_update(delta: torch.Tensor, bound: float) -> torch.Tensor:
    """What a replica applies of an averaged result sent by someone else: non-finite entries are
    ignored (0) and every coordinate moves at most `bound`. Honest results never hit the bound."""
    return torch.nan_to_num(delta.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_(-bound, bound)
