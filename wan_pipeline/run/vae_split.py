"""The VAE in bands of rows: split over sequence-parallel ranks, or one band after another to save memory.

Ulysses splits the experts' tokens over the ranks, but the Wan VAE (a causal 3D convolution net, sequential in
time) would run whole on every rank and cap the speed-up (at 81 frames on two GPUs encode and decode were over a
quarter of the split run before the VAE was split too). As LightX2V and xDiT do, each rank takes a band of latent rows widened by a halo, so its
convolutions see their neighbours, runs the VAE on it, drops the halo and all-gathers the bands. The VAE's
mid-block attention sees band plus halo only, so the frames are close to, not bit-identical with, the whole-frame
VAE: `wan-bench run --gpus N` reports their PSNR against the one-GPU run.

On one GPU the same bands, run one after another (`vae_bands` in the run configuration), bound the VAE's working
memory, as ComfyUI's "VAE Decode (Tiled)" does; the default is the whole frame, as ComfyUI's "VAE Decode".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from wan_pipeline.plan.plan import VAE_SPATIAL

HALO_LATENT_ROWS = 8  # 64 pixel rows on each inner edge of a band


@dataclass(frozen=True)
class Band:
    """Latent rows [start, stop) are this rank's result; it computes rows [lo, hi) (the band plus its halo)."""

    start: int
    stop: int
    lo: int
    hi: int


def bands(rows: int, parts: int, halo: int = HALO_LATENT_ROWS) -> list[Band]:
    """`rows` latent rows in `parts` contiguous bands as even as possible (the first ones one row taller)."""
    if parts < 1 or parts > rows:
        raise ValueError(f"cannot split {rows} latent rows into {parts} bands")
    base, extra = divmod(rows, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append(Band(start, stop, max(0, start - halo), min(rows, stop + halo)))
        start = stop
    return out


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad dim -2 up to `rows` (all_gather needs equal shapes on every rank)."""
    missing = rows - t.shape[-2]
    return F.pad(t, (0, 0, 0, missing)) if missing else t


def gather_bands(local: torch.Tensor, heights: Sequence[int], all_gather: Callable) -> torch.Tensor:
    """Every rank's band (heights[i] rows along dim -2, padded to the tallest for the collective), in rank order."""
    tallest = max(heights)
    pieces = all_gather(_pad_rows(local.contiguous(), tallest))
    return torch.cat([p[..., :h, :] for p, h in zip(pieces, heights)], dim=-2)


def process_group_all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    import torch.distributed as dist

    pieces = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, t)
    return pieces


@dataclass(frozen=True)
class VaeBands:
    """The VAE run in `parts` bands of rows. With a `rank` (sequence parallel) this process computes its own band and
    `all_gather(tensor) -> [tensor of each rank]` assembles the frame; without, it computes every band one after
    another, which is how ComfyUI's tiled VAE nodes save memory."""

    parts: int
    halo: int = HALO_LATENT_ROWS
    rank: int | None = None
    all_gather: Callable | None = None

    def _run(self, fn: Callable, x: torch.Tensor, rows: int, scale_in: int, scale_out: int) -> torch.Tensor:
        layout = bands(rows, self.parts, self.halo)

        def one(band: Band) -> torch.Tensor:
            out = fn(x[..., band.lo * scale_in:band.hi * scale_in, :])
            return out[..., (band.start - band.lo) * scale_out:(band.stop - band.lo) * scale_out, :]

        if self.rank is None:
            return torch.cat([one(b) for b in layout], dim=-2)
        return gather_bands(one(layout[self.rank]), [(b.stop - b.start) * scale_out for b in layout],
                            self.all_gather or process_group_all_gather)

    def encode(self, encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
        """`encode` maps pixels [..., H, W] to a latent [..., H/8, W/8]."""
        return self._run(encode, pixels, pixels.shape[-2] // VAE_SPATIAL, VAE_SPATIAL, 1)

    def decode(self, decode: Callable[[torch.Tensor], torch.Tensor], latent: torch.Tensor) -> torch.Tensor:
        """`decode` maps a latent [..., h, w] to pixels [..., 8h, 8w]."""
        return self._run(decode, latent, latent.shape[-2], 1, VAE_SPATIAL)
