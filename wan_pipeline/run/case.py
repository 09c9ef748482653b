"""One benchmark case: a configuration in a mode, run as warm-up plus timed rounds, reported as extra_info.

The pytest plugin parametrizes tests with WanCase objects; the test body drives a CaseRun. Everything the
history tools read later (extra_info keys) is assembled here.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass, field

from wan_pipeline.plan.config import RunConfig, config_to_dict, ordered_stages
from wan_pipeline.plan.plan import Plan, warmup_plan
from wan_pipeline.run.pipeline import Generation, Prepared, generate

WARMUP_STEPS_PER_PASS = 1  # a warm-up runs this many steps of each pass (plan.warmup_plan)


@dataclass(frozen=True)
class WanCase:
    """A benchmark configuration with its stable id (preset, attention, compile), and the key of the reference its
    whole generation is measured against (the stock diffusers case of its preset and mode), if it has one."""

    config: RunConfig
    mode: str
    reference: str | None = None

    @property
    def id(self) -> str:
        c = self.config
        sp = f"-sp{c.sequence_parallel}" if c.sequence_parallel > 1 else ""
        placement = f"-{c.residency}" if c.residency != "auto" else ""
        bands = f"-vae{c.vae_bands}bands" if c.vae_bands > 1 else ""
        return f"{c.name}-{c.attention}-{c.precision}-compile{int(c.compile)}{sp}{placement}{bands}"

    @property
    def single_gpu_id(self) -> str:
        """The id of the same configuration on one GPU: what a split case is compared with."""
        return WanCase(self.config.replace(sequence_parallel=1), self.mode).id

    def __str__(self) -> str:
        return self.id


def _compiled_graph_count() -> int:
    """Graphs torch.compile has produced so far in this process (a rise during the rounds is a recompile)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # pragma: no cover - dynamo unavailable
        return 0
    return int(counters["stats"]["unique_graphs"])


@dataclass
class CaseRun:
    plan: Plan
    prepared: Prepared
    rounds: list[Generation] = field(default_factory=list)
    warmup_seconds: list[float] = field(default_factory=list)
    gpu_before: dict | None = None
    gpu_after: dict | None = None
    graphs_in_warmup: int = 0
    graphs_before_rounds: int = 0
    graphs_after_rounds: int = 0

    def warm_up(self, count: int) -> None:
        """Untimed generations before the rounds: lazy init, autotuning, and the compile, measured apart. Each runs
        the first step of every pass (plan.warmup_plan): the later steps repeat the same shapes and kernels."""
        graphs_start = _compiled_graph_count()
        for _ in range(count):
            start = time.perf_counter()
            generate(self.prepared, warmup_plan(self.plan, WARMUP_STEPS_PER_PASS))
            self.warmup_seconds.append(time.perf_counter() - start)
        self.graphs_before_rounds = _compiled_graph_count()
        self.graphs_in_warmup = self.graphs_before_rounds - graphs_start
        from wan_pipeline.measure.telemetry import gpu_snapshot

        self.gpu_before = gpu_snapshot()

    def generate_once(self) -> None:
        """The timed target: one whole generation, synchronised at every stage boundary."""
        self.rounds.append(generate(self.prepared, self.plan))

    def finish(self) -> None:
        from wan_pipeline.measure.telemetry import gpu_snapshot

        self.gpu_after = gpu_snapshot()
        self.graphs_after_rounds = _compiled_graph_count()

    @property
    def stage_medians(self) -> dict[str, float]:
        names = ordered_stages(*(g.seconds for g in self.rounds))
        return {n: statistics.median(g.seconds.get(n, 0.0) for g in self.rounds) for n in names}

    @property
    def stage_peaks(self) -> dict[str, int]:
        """Each stage's allocator peak over the rounds (each stage resets the counter at its start)."""
        return {name: max(g.peak_bytes.get(name, 0) for g in self.rounds)
                for name in ordered_stages(*(g.peak_bytes for g in self.rounds))}

    @property
    def peak_bytes(self) -> int:
        """The allocator's peak over every stage of every round."""
        return max(self.stage_peaks.values(), default=0)

    def warmup_steady_seconds(self) -> float | None:
        """What one warm-up generation takes once compiled: the rounds' stage medians, each pass scaled to the
        warm-up's share of its steps. The first warm-up's excess over this is the compile (and other first-call
        costs)."""
        if not self.rounds:
            return None
        cut = warmup_plan(self.plan, WARMUP_STEPS_PER_PASS)
        share = {f"pass{i}": short.steps_run / full.steps_run  # generate() times pass i as stage "pass{i}"
                 for i, (full, short) in enumerate(zip(self.plan.passes, cut.passes), 1) if full.steps_run}
        return sum(seconds * share.get(name, 1.0) for name, seconds in self.stage_medians.items())

    @property
    def median_seconds(self) -> float:
        return statistics.median(g.total_seconds for g in self.rounds)

    def throttle_reasons(self) -> list[str]:
        from wan_pipeline.measure.telemetry import throttle_reasons_between

        return throttle_reasons_between(self.gpu_before, self.gpu_after)

    def extra_info(self, *, load_seconds: float | None, metrics: dict | None, video: str | None) -> dict:
        from wan_pipeline.measure.telemetry import environment_fingerprint

        plan, prepared = self.plan, self.prepared
        device = prepared.models.device
        stage_peaks = self.stage_peaks
        peak_torch = max(stage_peaks.values(), default=0)
        nvml_used = (self.gpu_after or {}).get("memory_used_bytes")
        throttled = self.throttle_reasons() if device.type == "cuda" else []
        if throttled:
            warnings.warn(f"{plan.config.name}: the GPU reported {', '.join(throttled)} during the timed rounds; "
                          f"these timings may reflect a hot or power-capped card, not the software")
        median_total = self.median_seconds if self.rounds else None
        stages = self.stage_medians
        warm = self.warmup_seconds[0] if self.warmup_seconds else None
        warm_steady = self.warmup_steady_seconds()
        from wan_pipeline.run.parallel import sequence_parallel_info

        split = sequence_parallel_info(plan.config.sequence_parallel, peak_torch)  # a collective over the ranks
        recompiles = self.graphs_after_rounds - self.graphs_before_rounds
        return {
            "mode": plan.mode,
            "preset": plan.config.name,
            "tokens": plan.tokens,
            "frames": plan.frames,
            "width": plan.width,
            "height": plan.height,
            "forwards": plan.forwards,
            "scaled_from": list(plan.scaled_from) if plan.scaled_from else None,
            "stages": {k: round(v, 6) for k, v in stages.items()},
            "peak_memory": {"torch_peak_bytes": peak_torch, "nvml_used_bytes": nvml_used,
                            "torch_peak_bytes_by_stage": stage_peaks},  # where the peak is: weights plus that stage
            "sequence_parallel": split,
            "attention_kernel": prepared.kernel.kernel,
            "attention": prepared.kernel.to_json(),
            "precision": plan.config.precision,
            "lora_rounding": plan.config.lora_rounding,
            "compile": {
                "enabled": prepared.compile_enabled,
                "warmup_seconds": warm,
                "warmup_steps_per_pass": WARMUP_STEPS_PER_PASS if self.warmup_seconds else None,
                "compile_seconds": (warm - warm_steady) if (prepared.compile_enabled and warm and warm_steady)
                else None,
                "graphs_compiled_in_warmup": self.graphs_in_warmup,
                "recompiles": recompiles,
                "recompiled_during_rounds": recompiles > 0,
            },
            "load_seconds": load_seconds,
            "residency": prepared.residency.policy,
            "memory_cap_bytes": plan.config.memory_cap,
            "memory": self.memory_info(stages),
            "gpu": {"before": self.gpu_before, "after": self.gpu_after, "throttle_reasons": throttled}
            if device.type == "cuda" else None,
            "throttled": bool(throttled),
            "env": environment_fingerprint(),
            "effective_tflops": effective_tflops(plan, prepared, stages),
            "metrics": metrics,
            "metrics_meaningful": plan.mode == "real",
            "video": video,
            "notes": prepared.notes,
        }

    def memory_info(self, stages: dict[str, float]) -> dict:
        """The memory plan the case ran under and what moved host->device per stage: streamed expert blocks per
        pass (counted from the group sizes times the forwards) and swapped-in experts in `switch` (their sizes);
        `effective` bandwidth those bytes over the stage's wall time, `copy_seconds` the bytes over the bandwidth
        of one synchronised pinned block copy (the time the copies take, hidden behind compute or not)."""
        residency = self.prepared.residency
        info = {"cap_bytes": self.plan.config.memory_cap, **residency.describe()}
        info.pop("bytes", None)
        streamed = self.rounds[-1].streamed_bytes if self.rounds else {}
        copy_bw = info.get("host_to_device_bandwidth_bytes_per_s")
        if streamed:
            info["host_to_device"] = {
                stage: {"bytes": moved,
                        "effective_bytes_per_s": moved / stages[stage] if stages.get(stage) else None,
                        "copy_seconds": moved / copy_bw if copy_bw else None}
                for stage, moved in streamed.items()}
            info["streamed_bytes_per_generation"] = sum(v for k, v in streamed.items() if k != "switch")
            info["swapped_bytes_per_generation"] = streamed.get("switch", 0)
        return info

    def record(self, info: dict) -> dict:
        """The JSON result record written next to the case's video: configuration, plan and extra_info."""
        return {"config": config_to_dict(self.plan.config), "plan": self.plan.to_json(),
                "warmup_seconds": self.warmup_seconds,
                "round_seconds": [g.total_seconds for g in self.rounds], **info}


def forward_flops(tokens: int, text_tokens: int = 512, dim: int = 5120, ffn: int = 13824, layers: int = 40) -> float:
    """FLOPs of one expert forward: linear layers plus self- and cross-attention matmuls."""
    per_layer_linear = 2 * tokens * (4 * dim * dim + 2 * dim * ffn) + 2 * (tokens * 2 * dim * dim) \
        + 2 * text_tokens * 2 * dim * dim
    self_attn = 4 * tokens * tokens * dim
    cross_attn = 4 * tokens * text_tokens * dim
    return float(layers * (per_layer_linear + self_attn + cross_attn))


def expert_forward_flops(tokens: int, expert) -> float:
    """forward_flops for the loaded expert's own width, FFN size and depth (tiny and A14B alike)."""
    cfg = expert.config
    return forward_flops(tokens, dim=cfg.num_attention_heads * cfg.attention_head_dim, ffn=cfg.ffn_dim,
                         layers=cfg.num_layers)


def effective_tflops(plan: Plan, prepared: Prepared, stages: dict[str, float]) -> float | None:
    """Model FLOP/s over the sampling passes (what fraction of the card's peak the experts reach)."""
    seconds = sum(v for k, v in stages.items() if k.startswith("pass"))
    if not seconds:
        return None
    flops = expert_forward_flops(plan.tokens, next(iter(prepared.models.experts.values()))) * plan.forwards
    return round(flops / seconds / 1e12, 3)
