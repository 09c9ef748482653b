"""The session's model cache: load a model set once, share it across tests, evict explicitly.

One model set is resident at a time (two full A14B sets do not fit one card). Loading is timed and reported
apart from the benchmark rounds; the cache counts loads so tests can prove that sharing happened.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import torch

from wan_pipeline.plan.config import ModelSetKey, RunConfig
from wan_pipeline.plan.plan import Plan, make_plan
from wan_pipeline.run.models import ModelSet, load_model_set, resolve_run_precision
from wan_pipeline.run.pipeline import Prepared, configure


@dataclass
class ModelCache:
    models_dir: str | None = None
    device: torch.device | None = None
    seed: int = 0
    loader: object = load_model_set  # injectable for tests
    current: ModelSet | None = None
    loads: list[dict] = field(default_factory=list)  # one entry per load: key, seconds
    warmed: set = field(default_factory=set)  # what has run on the resident set (see warm_up_needed)

    def prepare(self, config: RunConfig, mode: str) -> tuple[Plan, Prepared]:
        """The plan and a configured model set for `config`, loading only when the weights differ."""
        plan = make_plan(resolve_run_precision(config, mode, self.models_dir), mode)
        key = ModelSetKey.for_run(plan.config, mode, self.models_dir)
        if self.current is None or self.current.key.weights() != key.weights():
            self.evict()
            start = time.perf_counter()
            self.current = self.loader(key, device=self.device, seed=self.seed, models_dir=self.models_dir,
                                       config=plan.config)
            self.loads.append({"key": key, "seconds": time.perf_counter() - start})
        self.current.key = key
        return plan, configure(self.current, plan)

    def warm_up_needed(self, plan: Plan, prepared: Prepared) -> bool:
        """True the first time a shape, kernel, precision, compile setting, VAE split and residency policy runs on
        the resident set (a new policy's first offload makes the model set's host copies: warm-up work).

        Warm-up exists for lazy initialisation, kernel autotuning and compilation; a case that repeats all of them
        (a CFG variant of the same preset, say) finds them done and goes straight to its timed rounds.
        """
        bands = prepared.vae_bands.parts if prepared.vae_bands else 1  # bands give the VAE (and its compile) new shapes
        key = (plan.latent_shape, prepared.kernel.backend, plan.config.precision, prepared.compile_enabled, bands,
               prepared.residency.policy)
        if key in self.warmed:
            return False
        self.warmed.add(key)
        return True

    def evict(self) -> None:
        """Drop the resident model set and give its memory back (also after an out-of-memory failure)."""
        self.current = None
        self.warmed.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def last_load_seconds(self) -> float | None:
        return self.loads[-1]["seconds"] if self.loads else None
