"""One benchmark case on a ComfyUI server: the workflow's prompt (a matrix variant), warm-up, timed rounds, the
record with the suite's stage names, the server's environment, its RSS across rounds, and the saved clip.

Rounds mean something despite ComfyUI's cache of unchanged nodes: ``warm`` rounds (the default) change the noise
seed each round, as a user's next generation does (the loaders and encoders stay cached, as on their install);
``cold`` rounds `POST /free` (unload models, drop the cache) before each, and the record says how many nodes a cold
round still found cached.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from wan_pipeline.plan.comfy.api import node_stages, prompt_variant, read_workflow_json, sampler_steps, to_api_prompt
from wan_pipeline.plan.config import ordered_stages
from wan_pipeline.run.comfyui.client import ComfyClient, ComfyServerError, Execution

BACKEND = "comfyui"
ROUND_KINDS = ("warm", "cold")
VIDEO_SUFFIXES = (".mp4", ".webm", ".webp", ".gif", ".png", ".apng", ".mov", ".mkv")
# Stages that are not part of one generation's compute: model loads are recorded apart (load_seconds).
APART = ("load",)


@dataclass(frozen=True)
class ComfyCase:
    """One matrix variant of a workflow, run on a server; its id says the backend (a history key of its own)."""

    name: str
    workflow: str
    length: int | None = None  # None: as in the workflow
    cfg: float | None = None
    seed: int = 0
    config: object = None  # the RunConfig the plan layer read from the workflow (names, sizes)
    mode: str = BACKEND
    reference: str | None = None
    backend: str = BACKEND

    @property
    def id(self) -> str:
        return f"{self.name}-{BACKEND}"

    def __str__(self) -> str:
        return self.id


def comfy_cases(workflow: str, object_info=None) -> list[ComfyCase]:
    """The workflow's matrix (as it is, 49/81/161 frames, CFG 1/3.5/7) as server cases.

    The plan layer reads the matrix without a server. A graph it cannot resolve (a custom node inside a sampling
    chain, such as a custom text encoder) has its matrix read from the prompt itself: an API file as it is, a UI
    file converted with ``object_info()`` (the server's, fetched then)."""
    from wan_pipeline.errors import WorkflowError
    from wan_pipeline.plan.comfy import load_workflow_configs, workflow_matrix
    from wan_pipeline.plan.comfy.api import is_api_format, prompt_matrix
    from wan_pipeline.plan.comfy.chains import _stem

    path = os.fspath(workflow)
    try:
        configs = load_workflow_configs(path)
    except WorkflowError as exc:
        data = read_workflow_json(path)
        if not is_api_format(data) and object_info is None:
            raise WorkflowError(f"{exc}; a UI file with custom nodes in its chain needs the server's /object_info "
                                f"to be read") from None
        prompt = to_api_prompt(data, {} if is_api_format(data) else object_info(), path)
        return [ComfyCase(name, path, length, cfg) for name, length, cfg in prompt_matrix(prompt, f"wf-{_stem(path)}")]
    cases = []
    for config in configs:
        for variant in workflow_matrix(config):
            length = variant.length if variant.length != config.length else None
            cfgs = {p.cfg for p in variant.passes}
            cfg = next(iter(cfgs)) if cfgs != {p.cfg for p in config.passes} else None
            cases.append(ComfyCase(variant.name, path, length, cfg, variant.seed, variant))
    return cases


def server_fingerprint(client: ComfyClient, object_info: dict | None = None) -> dict:
    """What the server says about itself, for machine_info: ComfyUI, Python and torch versions, the launch flags,
    devices and memory, and the custom-node packages (each node class's ``python_module``)."""
    stats = client.system_stats()
    system = stats.get("system") or {}
    info = object_info if object_info is not None else client.object_info()
    packages = sorted({str(v.get("python_module", "")).split(".", 1)[1].split(".")[0]
                       for v in info.values() if isinstance(v, dict)
                       and str(v.get("python_module", "")).startswith("custom_nodes.")})
    argv = [str(a) for a in system.get("argv") or []]
    return {
        "url": client.url,
        "version": system.get("comfyui_version"),
        "python": str(system.get("python_version", "")).split(" ")[0] or None,
        "torch": system.get("pytorch_version"),
        "launch_flags": launch_flags(argv),
        "devices": [{"name": d.get("name"), "type": d.get("type"), "vram_total": d.get("vram_total")}
                    for d in stats.get("devices") or []],
        "ram_total": system.get("ram_total"),
        "custom_nodes": packages,
        "node_classes": len(info),
        "local": client.is_local,
    }


def launch_flags(argv: list[str]) -> list[str]:
    """The server's launch flags that change what it does (``--use-sage-attention``, ``--fast fp16_accumulation``),
    without the script and the per-instance ones (port, listen address, folders)."""
    instance = {"--port", "--listen", "--base-directory", "--output-directory", "--input-directory",
                "--temp-directory", "--user-directory", "--extra-model-paths-config", "--database-url",
                "--front-end-root", "--front-end-version", "--verbose", "--log-stdout"}
    out, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = not arg.startswith("--")
            if skip:
                continue
        if arg.startswith("--"):
            name = arg.split("=", 1)[0]
            if name in instance or name == "--disable-auto-launch":
                skip = name in instance and "=" not in arg
                continue
            out.append(arg)
        elif out:
            out[-1] = f"{out[-1]} {arg}"
    return out


def server_rss(client: ComfyClient) -> int | None:
    """Resident memory of the local server process (the one listening on the URL's port), through psutil; None for
    a remote server (or where the process cannot be seen)."""
    if not client.is_local:
        return None
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == client.port and conn.pid:
                return int(psutil.Process(conn.pid).memory_info().rss)
    except Exception:  # psutil missing, no permission: not measured
        return None
    return None


@dataclass
class ServerSession:
    """The server a session benchmarks: its client, its object_info and fingerprint (read once), and each
    workflow's prompt (converted once)."""

    client: ComfyClient
    _object_info: dict | None = None
    _prompts: dict = field(default_factory=dict)
    _fingerprint: dict | None = None

    def object_info(self) -> dict:
        if self._object_info is None:
            self._object_info = self.client.object_info()
        return self._object_info

    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            self._fingerprint = server_fingerprint(self.client, self.object_info())
        return self._fingerprint

    def prompt_for(self, case: ComfyCase) -> dict:
        if case.workflow not in self._prompts:
            data = read_workflow_json(case.workflow)
            from wan_pipeline.plan.comfy.api import is_api_format

            info = {} if is_api_format(data) else self.object_info()
            self._prompts[case.workflow] = to_api_prompt(data, info, case.workflow)
        return prompt_variant(self._prompts[case.workflow], length=case.length, cfg=case.cfg, source=case.workflow)


def stage_seconds(execution: Execution, stages_of: dict[str, str]) -> dict[str, float]:
    """One execution's seconds per suite stage: its nodes' seconds summed by the stage each node maps onto."""
    out: dict[str, float] = {}
    for node, seconds in execution.node_seconds.items():
        stage = stages_of.get(node, "other")
        out[stage] = out.get(stage, 0.0) + seconds
    return out


@dataclass
class ComfyCaseRun:
    """A case's warm-up and rounds on the server, and the record they make (the in-process backend's keys)."""

    session: ServerSession
    case: ComfyCase
    rounds_kind: str = "warm"
    on_progress: object = None
    prompt: dict = field(default_factory=dict)
    stages_of: dict = field(default_factory=dict)
    rounds: list[Execution] = field(default_factory=list)
    warmup_seconds: list[float] = field(default_factory=list)
    rss: list[int | None] = field(default_factory=list)
    ram_free: list[int | None] = field(default_factory=list)
    gpu_before: dict | None = None
    gpu_after: dict | None = None
    _seed: int = 0

    def __post_init__(self):
        if self.rounds_kind not in ROUND_KINDS:
            raise ComfyServerError(f"rounds {self.rounds_kind!r}: expected one of {', '.join(ROUND_KINDS)}")
        self.prompt = self.session.prompt_for(self.case)
        self.stages_of = node_stages(self.prompt)
        self._seed = int(self.case.seed)

    @property
    def client(self) -> ComfyClient:
        return self.session.client

    def _next_prompt(self) -> dict:
        if self.rounds_kind == "warm":  # a new seed: what a user's next generation changes
            self._seed += 1
            return prompt_variant(self.prompt, seed=self._seed, source=self.case.workflow)
        self.client.free()
        time.sleep(0.5)  # the server's worker applies /free when it next wakes, before the prompt that follows
        return prompt_variant(self.prompt, seed=self._seed, source=self.case.workflow)

    def _execute(self) -> Execution:
        return self.client.run(self._next_prompt(), on_progress=self.on_progress)

    def warm_up(self, count: int) -> None:
        for _ in range(count):
            self.warmup_seconds.append(self._execute().total_seconds)
        from wan_pipeline.measure.telemetry import gpu_snapshot

        self.gpu_before = gpu_snapshot() if self.client.is_local else None
        self._sample_memory()

    def generate_once(self) -> None:
        """The timed target: one whole generation on the server, from the POST to its end event."""
        self.rounds.append(self._execute())
        self._sample_memory()

    def _sample_memory(self) -> None:
        self.rss.append(server_rss(self.client))
        try:
            self.ram_free.append((self.client.system_stats().get("system") or {}).get("ram_free"))
        except ComfyServerError:
            self.ram_free.append(None)

    def finish(self) -> None:
        from wan_pipeline.measure.telemetry import gpu_snapshot

        self.gpu_after = gpu_snapshot() if self.client.is_local else None

    # -- the record ----------------------------------------------------------------------------------------------

    def stage_seconds(self, execution: Execution) -> dict[str, float]:
        return stage_seconds(execution, self.stages_of)

    @property
    def stage_medians(self) -> dict[str, float]:
        per_round = [self.stage_seconds(r) for r in self.rounds]
        # every stage of the graph, 0 where its nodes were cached: the same names in every record
        names = [n for n in ordered_stages(*per_round, dict.fromkeys(self.stages_of.values())) if n not in APART]
        return {n: statistics.median(s.get(n, 0.0) for s in per_round) for n in names}

    @property
    def median_seconds(self) -> float:
        return statistics.median(r.total_seconds for r in self.rounds)

    def node_medians(self) -> dict[str, dict]:
        ids = sorted({n for r in self.rounds for n in r.node_seconds}, key=lambda n: (len(n), n))
        return {n: {"class_type": self.prompt.get(n, {}).get("class_type"), "stage": self.stages_of.get(n, "other"),
                    "seconds": round(statistics.median(r.node_seconds.get(n, 0.0) for r in self.rounds), 6)}
                for n in ids}

    def fetch_clip(self, out_dir: Path) -> Path | None:
        """The last round's saved clip, fetched through /history and /view into ``out_dir`` (None if it saved
        none)."""
        from wan_pipeline.fsutil import atomic_write_bytes

        if not self.rounds:
            return None
        outputs = self.client.history(self.rounds[-1].prompt_id).get("outputs") or {}
        for node_id in sorted(outputs, key=lambda n: (len(n), n)):
            for key in ("videos", "gifs", "images", "animated"):
                for item in outputs[node_id].get(key) or []:
                    if not isinstance(item, dict) or "filename" not in item:
                        continue
                    suffix = Path(item["filename"]).suffix.lower()
                    if suffix not in VIDEO_SUFFIXES:
                        continue
                    data = self.client.view(item["filename"], item.get("subfolder", ""), item.get("type", "output"))
                    target = Path(out_dir) / f"{self.case.id}{suffix}"
                    atomic_write_bytes(target, data)
                    return target
        return None

    def extra_info(self, *, metrics: dict | None, video: str | None, mode: str) -> dict:
        from wan_pipeline.measure.telemetry import environment_fingerprint, throttle_reasons_between

        throttled = throttle_reasons_between(self.gpu_before, self.gpu_after) if self.gpu_before else []
        if throttled:
            warnings.warn(f"{self.case.id}: the GPU reported {', '.join(throttled)} during the timed rounds; these "
                          f"timings may reflect a hot or power-capped card, not the software")
        loads = [sum(s for n, s in r.node_seconds.items() if self.stages_of.get(n) == "load") for r in self.rounds]
        rss = [v for v in self.rss if v is not None]
        fingerprint = self.session.fingerprint()
        cached = [len(r.cached) for r in self.rounds]
        size = next((e.get("inputs") or {} for e in self.prompt.values()
                     if e.get("class_type") in ("WanImageToVideo", "WanFirstLastFrameToVideo")), {})
        return {
            "backend": BACKEND,
            "mode": mode,
            "preset": self.case.name,
            "frames": size.get("length"),
            "width": size.get("width"),
            "height": size.get("height"),
            "cfg": self.case.cfg,
            "stages": {k: round(v, 6) for k, v in self.stage_medians.items()},
            "nodes": self.node_medians(),
            "sampler_steps": sampler_steps(self.prompt),
            "rounds_kind": self.rounds_kind,
            "cached_nodes_per_round": cached,
            "queued_seconds": [round(r.queued_seconds, 6) for r in self.rounds],
            "load_seconds": round(max(loads), 6) if loads else None,
            "warmup_seconds": self.warmup_seconds,
            "server": {"url": fingerprint.get("url"), "version": fingerprint.get("version"),
                       "launch_flags": fingerprint.get("launch_flags")},
            "server_memory": {
                "rss_bytes": self.rss,
                "rss_growth_bytes": (rss[-1] - rss[0]) if len(rss) >= 2 else None,
                "ram_free_bytes": self.ram_free,
                "measured": "psutil on the local server process" if rss else
                ("not measured: the server is remote; ram_free_bytes is its /system_stats" if not self.client.is_local
                 else "not measured: the server process was not found"),
            },
            "gpu": {"before": self.gpu_before, "after": self.gpu_after, "throttle_reasons": throttled}
            if self.gpu_before else None,
            "throttled": bool(throttled),
            "env": environment_fingerprint(),
            "metrics": metrics,
            "metrics_meaningful": mode == "real",
            "video": video,
            "notes": [] if all(c == 0 for c in cached) or self.rounds_kind == "warm" else
            [f"cold rounds still found cached nodes: {cached}"],
        }

    def record(self, info: dict) -> dict:
        return {"case": self.case.id, "workflow": self.case.workflow, "prompt": self.prompt,
                "round_seconds": [r.total_seconds for r in self.rounds], **info}
