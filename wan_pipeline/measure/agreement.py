"""How close two results of the same computation are (two backends' final latents): pure numpy, in float64."""

from __future__ import annotations

import numpy as np

from wan_pipeline.errors import WanBenchError


def latent_agreement(a: np.ndarray, b: np.ndarray, names: tuple[str, str] = ("a", "b")) -> dict:
    """Cosine similarity of the flattened arrays, the largest absolute difference, and the L2 norm of the
    difference relative to `a`'s. Shapes must match (a batch axis of 1 on either side is ignored)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    x = x[0] if x.ndim == y.ndim + 1 and x.shape[0] == 1 else x
    y = y[0] if y.ndim == x.ndim + 1 and y.shape[0] == 1 else y
    if x.shape != y.shape:
        raise WanBenchError(f"latents differ in shape: {names[0]} {list(x.shape)}, {names[1]} {list(y.shape)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        bad = names[0] if not np.isfinite(x).all() else names[1]
        raise WanBenchError(f"the {bad} latent holds NaN or infinite values: nothing to compare")
    x, y = x.ravel(), y.ravel()
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    cosine = float(x @ y / (nx * ny)) if nx > 0 and ny > 0 else (1.0 if nx == ny else 0.0)
    diff = x - y
    return {
        "shape": list(np.asarray(a).shape),
        "cosine": cosine,
        "max_abs_diff": float(np.abs(diff).max()) if diff.size else 0.0,
        "relative_l2": float(np.linalg.norm(diff) / nx) if nx > 0 else float(np.linalg.norm(diff)),
    }
