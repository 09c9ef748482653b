"""The ComfyUI 0.3.64 source snapshot in tests: where it is, its extraction, and a real server started from it on
the CPU (a free loopback port, a temporary base folder with the tiny model set of `wan_pipeline.run.comfy_files` in ComfyUI's layout, a
small custom node package), stopped at the end of the session.

ComfyUI builds its UMT5 text encoder at full XXL size whatever the file holds, so the test graphs take their
conditioning from the custom node ``WanBenchTestConditioning`` instead of CLIPLoader + CLIPTextEncode, or, where a
graph must keep the template's CLIPLoader (the cross-check, which wan-bench reads as well), load the tiny umt5 file
``TINY_TEXT_ENCODER``: the custom node package answers CLIPLoader for that one name with the conditioning
`precompute_conditioning` wrote beside the file (wan-bench's encoder on that file), and leaves every other name to
ComfyUI. Its VAELoader
builds the Wan 2.1 VAE at its fixed width (dim 96) from any Wan 2.1 state dict (the shapes are not read), so the
test VAE is that size, with random weights.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]  # the custom nodes import wan_pipeline from here
SNAPSHOT = CHECKOUT.parent / "shared" / "comfyui" / "ComfyUI-0.3.64-a125cd8.tar.gz"
# ComfyUI's imports beyond wan-bench's own that its Wan path and its server need (its requirements.txt names them).
COMFY_DEPENDENCIES = ("torchsde", "av", "einops", "psutil", "scipy", "tqdm", "yaml", "PIL", "safetensors",
                      "transformers", "sentencepiece", "tokenizers")
SERVER_DEPENDENCIES = ("aiohttp", "yarl", "alembic", "sqlalchemy", "comfyui_frontend_package", "websocket")
INPUT_IMAGE = "start.png"
TINY_TEXT_ENCODER = "wan-bench-tiny-umt5.safetensors"

CUSTOM_NODE = '''
"""wan-bench test nodes: conditioning without the XXL text encoder, and a node that takes its time."""
import time
import torch


class WanBenchTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 512})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "wan-bench/test"

    def encode(self, seed, tokens):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, 4096, generator=g) * 0.1, {}]],)


class WanBenchTestSleep:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seconds": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 3600.0})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "sleep"
    OUTPUT_NODE = True
    CATEGORY = "wan-bench/test"

    def sleep(self, seconds):
        end = time.time() + seconds
        import comfy.model_management
        while time.time() < end:
            comfy.model_management.throw_exception_if_processing_interrupted()
            time.sleep(0.05)
        return (seconds,)


class WanBenchTestFail:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"message": ("STRING", {"default": "failed on purpose"})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "fail"
    OUTPUT_NODE = True
    CATEGORY = "wan-bench/test"

    def fail(self, message):
        raise RuntimeError(message)


class WanBenchTestExit:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"code": ("INT", {"default": 3, "min": 0, "max": 255})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "exit"
    OUTPUT_NODE = True
    CATEGORY = "wan-bench/test"

    def exit(self, code):
        import os
        os._exit(code)


class _PrecomputedText:
    """What CLIPLoader returns for the tiny umt5 file: the conditioning of each prompt as wan-bench's encoder computes
    it from that file, precomputed by the test (ComfyUI would build the XXL model whatever the file holds)."""

    def __init__(self, path):
        from safetensors.torch import load_file

        self.path = path + ".conditioning.safetensors"
        self.by_text = load_file(self.path)

    def tokenize(self, text, **kwargs):
        return text

    def encode_from_tokens_scheduled(self, text, **kwargs):
        import hashlib

        key = hashlib.sha256(text.encode()).hexdigest()
        if key not in self.by_text:
            raise RuntimeError(f"{self.path} holds no conditioning for the prompt {text[:60]!r}")
        return [[self.by_text[key].clone(), {}]]


def _patch_clip_loader():
    import folder_paths
    import nodes

    original = nodes.CLIPLoader.load_clip

    def load_clip(self, clip_name, type="stable_diffusion", device="default"):
        if clip_name != "wan-bench-tiny-umt5.safetensors":
            return original(self, clip_name, type, device)
        return (_PrecomputedText(folder_paths.get_full_path_or_raise("text_encoders", clip_name)),)

    nodes.CLIPLoader.load_clip = load_clip


_patch_clip_loader()

NODE_CLASS_MAPPINGS = {"WanBenchTestConditioning": WanBenchTestConditioning, "WanBenchTestSleep": WanBenchTestSleep,
                       "WanBenchTestFail": WanBenchTestFail, "WanBenchTestExit": WanBenchTestExit}
'''


def comfyui_snapshot() -> Path:
    """The ComfyUI 0.3.64 source tarball: $WAN_COMFYUI_SNAPSHOT, else ../shared/comfyui/ beside the checkout."""
    env = os.environ.get("WAN_COMFYUI_SNAPSHOT")
    return Path(env) if env else SNAPSHOT


def extract_snapshot(tmp_path_factory, needs=COMFY_DEPENDENCIES) -> Path:
    """The snapshot extracted once under the pytest tmp root (kept between sessions there, keyed by its size and
    time), or a skip naming what is missing."""
    snapshot = comfyui_snapshot()
    if not snapshot.is_file():
        pytest.skip(f"ComfyUI snapshot not found at {snapshot} (set WAN_COMFYUI_SNAPSHOT)")
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"ComfyUI needs {', '.join(missing)} (pip install -e '.[test]')")
    stat = snapshot.stat()
    cache = tmp_path_factory.getbasetemp().parent / f"comfyui-{stat.st_size}-{int(stat.st_mtime)}"
    root = cache / "ComfyUI"
    if not (root / "nodes.py").is_file():
        partial = Path(tmp_path_factory.mktemp("comfyui-extract"))
        with tarfile.open(snapshot) as tar:
            tar.extractall(partial, filter="data")
        cache.mkdir(parents=True, exist_ok=True)
        try:
            (partial / "ComfyUI").rename(root)
        except OSError:  # another session got there first
            shutil.rmtree(partial, ignore_errors=True)
    return root


def torchvision_stub(folder: Path) -> list[str]:
    """A stand-in torchvision package where none is installed (ComfyUI imports it beside the Wan path and never
    calls it there; the registry's wheel replaces the CPU torch): the folder to put on the path, or nothing."""
    if importlib.util.find_spec("torchvision") is not None:
        return []
    pkg = folder / "torchvision"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text('"""Stand-in for the tests: the Wan path never calls torchvision."""\n'
                                     "from . import models, transforms\n")
    (pkg / "models.py").write_text("")
    (pkg / "transforms.py").write_text("")
    return [str(folder)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_models_tree(base: Path) -> None:
    """The tiny model set of `wan_pipeline.run.comfy_files` (the files wan-bench reads too) in ComfyUI's folder
    layout, the text encoder under the test name (``TINY_TEXT_ENCODER``), the start image and the custom node
    package."""
    import numpy as np
    from PIL import Image

    from wan_pipeline.plan.config import TEXT_ENCODER
    from wan_pipeline.run.comfy_files import write_comfyui_models

    write_comfyui_models(base / "models", "tiny", seed=10)
    # ComfyUI would build the XXL encoder for the template's name; the custom nodes answer the test name
    encoders = base / "models" / "text_encoders"
    (encoders / TEXT_ENCODER).rename(encoders / TINY_TEXT_ENCODER)
    (base / "input").mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8)).save(base / "input" / INPUT_IMAGE)
    nodes = base / "custom_nodes" / "wan-bench-test-nodes"
    nodes.mkdir(parents=True, exist_ok=True)
    (nodes / "__init__.py").write_text(CUSTOM_NODE)


class ComfyServer:
    """A ComfyUI server process on the CPU (its own process group, so that stop() ends it and its children)."""

    def __init__(self, root: Path, base: Path, log: Path, extra_path: list[str], flags: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="",
                   PYTHONPATH=os.pathsep.join(extra_path + [str(CHECKOUT)] +
                                              [p for p in [os.environ.get("PYTHONPATH")] if p]))
        cmd = [sys.executable, str(root / "main.py"), "--cpu", "--force-fp32", "--fp32-vae", "--listen", "127.0.0.1",
               "--port", str(self.port), "--base-directory", str(base), "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:", *flags]
        self._log = open(log, "wb")
        self.process = subprocess.Popen(cmd, cwd=base, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def wait_ready(self, timeout: float = 600.0) -> None:
        from wan_pipeline.run.comfyui.client import ComfyClient, ComfyServerError

        client = ComfyClient(self.url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}: {self.tail()}")
            try:
                client.system_stats()
                return
            except ComfyServerError:
                time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:g} s: {self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        self._log.flush()
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)
        self._log.close()


def start_server(tmp_path_factory, flags: tuple[str, ...] = (), base: Path | None = None) -> tuple[ComfyServer, Path]:
    """A ready server with the tiny models tree (written into a new base folder, or ``base``'s reused); the caller
    stops it. Skips (naming what) without the snapshot or a dependency."""
    root = extract_snapshot(tmp_path_factory, COMFY_DEPENDENCIES + SERVER_DEPENDENCIES)
    if base is None:
        base = Path(tmp_path_factory.mktemp("comfyui-base"))
        write_models_tree(base)
    log = Path(tmp_path_factory.mktemp("comfyui-log")) / "server.log"
    server = ComfyServer(root, base, log, torchvision_stub(base / "stubs"), flags)
    server.wait_ready()
    return server, base


def precompute_conditioning(models: Path, prompts: list[str]) -> Path:
    """Each prompt's conditioning as wan-bench encodes it from the tiny umt5 file (load, fp8 storage as the file has
    it, tokenize, encode), beside the file, for the custom nodes' CLIPLoader stand-in to return."""
    import hashlib
    from types import SimpleNamespace

    import torch
    from safetensors.torch import save_file

    from wan_pipeline.run.conditioning import encode_text
    from wan_pipeline.run.loading import load_text_encoder
    from wan_pipeline.run.precision import store_text_encoder_fp8

    path = models / "text_encoders" / TINY_TEXT_ENCODER
    encoder, tokenizer = load_text_encoder(path, device="cpu", dtype=torch.float32)
    if encoder.fp8_file_scales:
        store_text_encoder_fp8(encoder, torch.float32, encoder.fp8_file_scales)
    models_like = SimpleNamespace(tokenizer=tokenizer, text_encoder=encoder, device=torch.device("cpu"),
                                  dtype=torch.float32)
    with torch.no_grad():
        out = {hashlib.sha256(p.encode()).hexdigest(): encode_text(models_like, p).contiguous() for p in prompts}
    target = path.with_name(path.name + ".conditioning.safetensors")
    save_file(out, target)
    return target
