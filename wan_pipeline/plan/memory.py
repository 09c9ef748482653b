"""GPU memory planning: sizes like ``24GB``, what each residency policy needs, and which one a memory budget allows.

Pure arithmetic (no torch): the run layer feeds it the measured bytes of the loaded components, the CLI's plan and
the default matrix feed it the A14B estimates below. A memory cap makes a big card plan (and, once the allocator is
capped, run) as a small one: every decision here reads the budget it is given, never the card.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from wan_pipeline.errors import WanBenchError
from wan_pipeline.plan.config import FP8_PRECISIONS

GB, GiB = 10**9, 2**30
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": GB, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": GiB, "tib": 2**40}

# Residency policies, fastest first: what `auto` tries in turn.
POLICIES = ("resident", "offload-text-encoder", "offload-idle-expert", "stream-expert")
# VAE band counts `auto` may raise the VAE to (ComfyUI's tiled VAE: more bands, less memory, a little more time).
VAE_BAND_STEPS = (1, 2, 4, 8)
STREAM_GROUPS_ON_DEVICE = 2  # diffusers' streamed group offloading: the running block and the one prefetched


class MemoryCapError(WanBenchError):
    """A memory cap that cannot be read or used: the message names the value and, where it applies, the smallest
    cap the preset needs."""


def parse_memory_size(text: str) -> int:
    """Bytes in ``24GB`` (GB = 10^9), ``16GiB`` (GiB = 2^30), ``500MB``, ``1.5TB``... (a number and a unit)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]+)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise MemoryCapError(f"memory size {text!r} is not a number with a unit such as 24GB (10^9 bytes) or 16GiB "
                             f"(2^30 bytes)")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise MemoryCapError(f"memory size {text!r} must be more than 0 bytes")
    return size


def format_bytes(n: int | float) -> str:
    """Both units, as the options accept them: ``24.00 GB (22.35 GiB)``."""
    return f"{n / GB:.2f} GB ({n / GiB:.2f} GiB)"


def cap_name(cap: int | None) -> str:
    """A cap in the shortest exact unit, as a user writes it: ``24GB``, ``16GiB``; "" for no cap."""
    if cap is None:
        return ""
    for unit, size in (("GiB", GiB), ("GB", GB), ("MiB", 2**20), ("MB", 10**6)):
        if cap % size == 0:
            return f"{cap // size}{unit}"
    return f"{cap}B"


def cap_label(cap: int | None) -> str:
    """A cap for folder names: ``24gb``, ``16gib``; "" for no cap."""
    return cap_name(cap).lower()


# ------------------------------------------------------------------------------------------ what the models weigh


@dataclass(frozen=True)
class ComponentBytes:
    """Device bytes of a model set's components, and how an expert splits into streamable blocks."""

    experts: tuple[int, ...]  # each expert, in pass order of first use
    text_encoder: int
    vae: int
    expert_block: int  # the largest transformer block (the unit streaming moves)
    expert_fixed: int  # an expert's bytes outside its blocks (embeddings, head), on the device while it runs
    # the text encoder while it is built or loaded: 16-bit, before its block weights go to fp8 storage (0 for sizes
    # measured after loading)
    text_encoder_load: int = 0

    @property
    def largest_expert(self) -> int:
        return max(self.experts)


# Element counts of the A14B classes, as diffusers / transformers build them (tests/test_memory.py checks them
# against meta-device builds): `fp8` are the elements precision stores in fp8 (block Linear weights; UMT5's
# block Linear weights but `wo`), `fp32` those diffusers keeps in float32, the rest is in the compute dtype.
A14B_EXPERT_ELEMENTS = 14_289_163_328
A14B_EXPERT_FP8_ELEMENTS = 14_050_918_400
A14B_EXPERT_FP32_ELEMENTS = 29_184_000
A14B_BLOCKS = 40
A14B_BLOCK_ELEMENTS = 351_394_304
A14B_BLOCK_FP8_ELEMENTS = 351_272_960
A14B_BLOCK_FP32_ELEMENTS = 40_960  # norm2 and scale_shift_table
UMT5_XXL_ELEMENTS = 6_731_059_200
UMT5_XXL_FP8_ELEMENTS = 3_623_878_656
WAN21_VAE_ELEMENTS = 126_892_531


def a14b_component_bytes(fp8: bool, experts: int = 2) -> ComponentBytes:
    """The A14B i2v set's device bytes (synthetic or the template's files), fp8 storage or 16-bit."""

    def stored(total: int, fp8_part: int, fp32_part: int = 0) -> int:
        narrow = fp8_part if fp8 else 0
        return narrow + (total - narrow - fp32_part) * 2 + fp32_part * 4

    expert = stored(A14B_EXPERT_ELEMENTS, A14B_EXPERT_FP8_ELEMENTS, A14B_EXPERT_FP32_ELEMENTS)
    block = stored(A14B_BLOCK_ELEMENTS, A14B_BLOCK_FP8_ELEMENTS, A14B_BLOCK_FP32_ELEMENTS)
    return ComponentBytes(experts=(expert,) * experts, text_encoder=stored(UMT5_XXL_ELEMENTS, UMT5_XXL_FP8_ELEMENTS),
                          vae=WAN21_VAE_ELEMENTS * 2, expert_block=block, expert_fixed=expert - A14B_BLOCKS * block,
                          text_encoder_load=UMT5_XXL_ELEMENTS * 2)


# Each block Linear weight of the A14B experts: 8 of dim x dim (self- and cross-attention q, k, v, out) and the two
# feed-forward matrices of dim x ffn_dim (5120, 13824).
A14B_BLOCK_WEIGHT_ELEMENTS = (5120 * 5120,) * 8 + (5120 * 13824,) * 2


def pinned_allocation_bytes(n: int) -> int:
    """What torch's pinned host allocator takes for an `n`-byte tensor: the size rounded up to a power of two (its
    caching allocator rounds every request so that freed blocks can be reused)."""
    return 1 << max(int(n) - 1, 0).bit_length() if n > 0 else 0


def a14b_pinned_expert_bytes(fp8: bool) -> int:
    """Pinned host bytes one A14B expert takes in host memory, tensor by tensor as the host build and the loader
    pin them: the block weights dominate (about 1.5x their size after rounding), the rest is counted unrounded."""
    width = 1 if fp8 else 2
    weights = sum(pinned_allocation_bytes(n * width) for n in A14B_BLOCK_WEIGHT_ELEMENTS) * A14B_BLOCKS
    rest = a14b_component_bytes(fp8, 1).experts[0] - sum(A14B_BLOCK_WEIGHT_ELEMENTS) * width * A14B_BLOCKS
    return weights + rest


# ------------------------------------------------------------------------------------------------ working memory

MARGIN = 3 * GiB  # allocator slack and the text encoder's activations
LOAD_SLACK = 1 * GiB  # while loading: the fp8 swap's float32 temporaries and allocator slack


@dataclass(frozen=True)
class Working:
    """Bytes a run needs beyond the weights, per kind of stage."""

    transformer: int  # one expert forward's activations (+ margin)
    vae: int  # VAE encode or decode (+ margin)
    text: int = MARGIN

    @property
    def peak(self) -> int:
        return max(self.transformer, self.vae, self.text)


def working_memory(tokens: int, width: int, height: int, inner_dim: int = 5120, vae_bands: int = 1) -> Working:
    """VAE encode/decode of 49 x 1216 x 832 in bf16 is taken as 12 GiB (a round figure above what the allocator
    showed for the decode stage on an 80 GB card, so the estimate errs high), scaling with the frame area and down
    with the bands; a block's activations are about a dozen bf16 copies of the hidden states; both with the margin."""
    vae = int(12 * GiB * (width * height) / (832 * 1216) / vae_bands)
    transformer = tokens * inner_dim * 2 * 12
    return Working(transformer=transformer + MARGIN, vae=vae + MARGIN)


def working_memory_bytes(tokens: int, width: int, height: int, inner_dim: int = 5120, vae_bands: int = 1) -> int:
    """The larger of a transformer forward's and the VAE's working memory (see working_memory)."""
    return working_memory(tokens, width, height, inner_dim, vae_bands).peak


MEMORY_STAGES = ("load", "text_encode", "vae", "pass")


def stage_needs(sizes: ComponentBytes, working: Working) -> dict[str, dict[str, int]]:
    """Device bytes of each stage (text encode, VAE encode/decode, a sampling pass) under each residency policy:

    - resident: everything stays;
    - offload-text-encoder: the experts and the VAE stay, the encoder comes in for the text stage only;
    - offload-idle-expert: one expert at a time (swapped in per pass; the last one stays for the VAE), the encoder
      alone with the VAE for the text stage;
    - stream-expert: the experts stay in pinned host memory and run block by block (two blocks on the device, the
      one running and the one prefetched, plus the expert's embeddings and head while it runs).

    The load stage is the text encoder built or loaded at 16 bits before its fp8 storage, beside the VAE and the
    experts the policy keeps on the device (built or loaded before it).
    """
    experts, vae, te, one = sum(sizes.experts), sizes.vae, sizes.text_encoder, sizes.largest_expert
    te_load = max(sizes.text_encoder_load, te) if sizes.text_encoder_load else 0
    streamed = sizes.expert_fixed + STREAM_GROUPS_ON_DEVICE * sizes.expert_block
    weights = {  # policy -> stage -> weights on the device
        "resident": dict(dict.fromkeys(MEMORY_STAGES, experts + te + vae), load=experts + te_load + vae),
        "offload-text-encoder": {"load": experts + te_load + vae, "text_encode": experts + te + vae,
                                 "vae": experts + vae, "pass": experts + vae},
        "offload-idle-expert": {"load": te_load + vae, "text_encode": te + vae, "vae": one + vae, "pass": one + vae},
        "stream-expert": {"load": te_load + vae, "text_encode": te + vae, "vae": vae, "pass": streamed + vae},
    }
    extra = {"load": LOAD_SLACK, "text_encode": working.text, "vae": working.vae, "pass": working.transformer}
    return {policy: {stage: w + extra[stage] for stage, w in stages.items()} for policy, stages in weights.items()}


def policy_needs(sizes: ComponentBytes, working: Working) -> dict[str, int]:
    """Peak device bytes of each residency policy (its largest stage)."""
    return {policy: max(stages.values()) for policy, stages in stage_needs(sizes, working).items()}


@dataclass(frozen=True)
class MemoryChoice:
    """The residency policy and VAE bands a budget allows, with what every policy would need."""

    policy: str
    vae_bands: int
    budget: int
    needs: dict[str, int]  # policy -> peak bytes at the chosen bands
    smallest_cap: int  # the least budget any policy runs in (at the most VAE bands)

    def to_json(self) -> dict:
        return {"policy": self.policy, "vae_bands": self.vae_bands, "budget_bytes": self.budget,
                "needs_bytes": dict(self.needs), "smallest_cap_bytes": self.smallest_cap}


def smallest_cap(needs_at) -> int:
    """The least budget any policy fits in, `needs_at(bands)` giving policy -> bytes at that many VAE bands."""
    return min(min(needs_at(b).values()) for b in VAE_BAND_STEPS)


def choose_memory(needs_at, budget: int, *, policy: str = "auto", vae_bands: int = 1,
                  auto_bands: bool = False, what: str = "this run") -> MemoryChoice:
    """The fastest policy that fits `budget` (or the one asked for, checked), and the VAE bands it runs at.

    `needs_at(bands)` gives policy -> peak bytes. With `auto_bands` (a capped run under auto residency) the VAE may
    go from `vae_bands` up through VAE_BAND_STEPS when that lets a faster policy fit; bands cost little time,
    streaming or swapping an expert costs more. Raises MemoryCapError naming the smallest budget that would do.
    """
    bands = [vae_bands] + ([b for b in VAE_BAND_STEPS if b > vae_bands] if auto_bands else [])
    order = POLICIES if policy == "auto" else (policy,)
    for name in order:
        for b in bands:
            needs = needs_at(b)
            if needs[name] <= budget:
                return MemoryChoice(name, b, budget, needs, smallest_cap(needs_at))
    least = min(needs_at(b)[name] for name in order for b in bands)
    which = "any residency policy" if policy == "auto" else f"residency {policy!r}"
    hint = ("the smallest cap it runs in" if policy == "auto" else
            f"try residency auto; the smallest cap it runs in is {format_bytes(smallest_cap(needs_at))}")
    raise MemoryCapError(f"{what} does not fit {format_bytes(budget)} with {which}: it needs at least "
                         f"{format_bytes(least)} ({hint})")


def needs_for(sizes: ComponentBytes, tokens: int, width: int, height: int, inner_dim: int = 5120):
    """`needs_at(bands)` for choose_memory: policy -> peak bytes of this geometry at that many VAE bands."""
    return lambda bands: policy_needs(sizes, working_memory(tokens, width, height, inner_dim, bands))


def plan_memory(plan, budget: int, sizes: ComponentBytes | None = None) -> MemoryChoice:
    """The memory choice for a plan of the A14B pipeline (estimated sizes unless measured ones are given): the
    configured residency and VAE bands, the bands raised as needed when the run is capped under auto."""
    config = plan.config
    if sizes is None:
        sizes = a14b_component_bytes(fp8=config.precision in ("auto", *FP8_PRECISIONS),
                                     experts=len({p.expert for p in config.passes}))
    return choose_memory(needs_for(sizes, plan.tokens, plan.width, plan.height), budget, policy=config.residency,
                         vae_bands=config.vae_bands,
                         auto_bands=config.residency == "auto" and config.memory_cap is not None,
                         what=f"{config.name} ({plan.width}x{plan.height}x{plan.frames})")
