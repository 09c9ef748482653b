"""Talking to a ComfyUI server: its HTTP routes and the websocket events of one prompt, timestamped on arrival.

`POST /prompt` queues a prompt under this client's id; the websocket (`/ws?clientId=...`, through websocket-client)
then reports ``execution_start``, ``executing`` (a node begins; ``node: null`` is the end in older servers),
``progress`` (sampler steps), ``executed``, ``execution_cached`` (nodes skipped), ``execution_success`` and
``execution_error``. A node's seconds run from its ``executing`` event to the next one. Every failure is a
`ComfyServerError` naming the server, the node or the message at fault.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field

from wan_pipeline.errors import WanBenchError

DEFAULT_TIMEOUT_S = 600.0  # longest silence (no websocket event) before a prompt counts as hung


class ComfyServerError(WanBenchError):
    """The server is unreachable, is not ComfyUI, rejected the prompt, failed or hung while running it."""


@dataclass
class Execution:
    """One prompt as the server ran it: wall seconds from the POST to the end, each node's seconds, the cached
    nodes and every event (seconds since the POST, type, data)."""

    prompt_id: str
    total_seconds: float
    node_seconds: dict[str, float]
    cached: list[str]
    events: list[tuple[float, str, dict]] = field(default_factory=list)
    queued_seconds: float = 0.0  # POST to execution_start


def _node_error_text(body: dict) -> str:
    """The server's reasons for rejecting a prompt: each node's id, class and messages."""
    parts = []
    error = body.get("error")
    if isinstance(error, dict) and error.get("message"):
        parts.append(f"{error.get('message')}" + (f" ({error['details']})" if error.get("details") else ""))
    for nid, info in (body.get("node_errors") or {}).items():
        cls = info.get("class_type", "?")
        reasons = "; ".join(f"{e.get('message', '')}: {e.get('details', '')}".strip(": ")
                            for e in info.get("errors") or [])
        parts.append(f"node #{nid} ({cls}): {reasons or 'rejected'}")
    return "; ".join(parts) or json.dumps(body)[:300]


class ComfyClient:
    def __init__(self, url: str, timeout: float | None = DEFAULT_TIMEOUT_S):
        parsed = urllib.parse.urlparse(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ComfyServerError(f"ComfyUI URL {url!r}: expected http://HOST:PORT")
        self.url = f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"
        self.host = parsed.hostname
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.timeout = None if timeout is None else float(timeout)  # None: wait for the server however long
        self.client_id = uuid.uuid4().hex

    @property
    def is_local(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")

    # -- HTTP ----------------------------------------------------------------------------------------------------

    def _request(self, path: str, body: dict | None = None, timeout: float = 30.0) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            if path == "/prompt" and isinstance(parsed, dict):
                raise ComfyServerError(f"{self.url} rejected the prompt: {_node_error_text(parsed)}") from None
            raise ComfyServerError(f"{self.url}{path}: HTTP {exc.code} {exc.reason} (is this a ComfyUI server?)") \
                from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ComfyServerError(f"ComfyUI server {self.url} is unreachable ({reason}); start it or check "
                                   f"--wan-comfyui / WAN_COMFYUI_URL") from None

    def _json(self, path: str, body: dict | None = None, timeout: float = 30.0):
        raw = self._request(path, body, timeout)
        try:
            return json.loads(raw)
        except ValueError:
            raise ComfyServerError(f"{self.url}{path} did not answer JSON (is this a ComfyUI server?)") from None

    def system_stats(self) -> dict:
        stats = self._json("/system_stats")
        if not isinstance(stats, dict) or "system" not in stats or "devices" not in stats:
            raise ComfyServerError(f"{self.url}/system_stats is not ComfyUI's answer (no 'system' and 'devices'); "
                                   f"is this a ComfyUI server?")
        return stats

    def object_info(self) -> dict:
        info = self._json("/object_info", timeout=120.0)
        if not isinstance(info, dict) or not info:
            raise ComfyServerError(f"{self.url}/object_info lists no node classes (is this a ComfyUI server?)")
        return info

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self._request("/free", {"unload_models": unload_models, "free_memory": free_memory})

    def interrupt(self) -> None:
        try:
            self._request("/interrupt", {}, timeout=10.0)
        except ComfyServerError:
            pass

    def history(self, prompt_id: str, wait: float = 10.0) -> dict:
        """The prompt's history entry (its outputs and status). The server sends `execution_success` before its
        worker files the entry, so a fetch right after a run waits up to `wait` seconds for it to appear; {} if it
        never does."""
        deadline = time.monotonic() + wait
        while True:
            data = self._json(f"/history/{urllib.parse.quote(prompt_id)}")
            entry = data.get(prompt_id) if isinstance(data, dict) else None
            if entry or time.monotonic() >= deadline:
                return entry or {}
            time.sleep(0.05)

    def view(self, filename: str, subfolder: str = "", kind: str = "output") -> bytes:
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": kind})
        return self._request(f"/view?{query}", timeout=120.0)

    def submit(self, prompt: dict) -> str:
        answer = self._json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if not isinstance(answer, dict) or "prompt_id" not in answer:
            raise ComfyServerError(f"{self.url}/prompt did not return a prompt id ({str(answer)[:200]})")
        if answer.get("node_errors"):
            raise ComfyServerError(f"{self.url} rejected the prompt: {_node_error_text(answer)}")
        return str(answer["prompt_id"])

    # -- websocket -----------------------------------------------------------------------------------------------

    def _connect(self):
        import websocket  # websocket-client

        scheme = "wss" if self.url.startswith("https") else "ws"
        netloc = self.url.split("://", 1)[1]
        try:
            return websocket.create_connection(f"{scheme}://{netloc}/ws?clientId={self.client_id}",
                                               timeout=min(self.timeout or 30.0, 30.0))
        except (OSError, websocket.WebSocketException) as exc:
            raise ComfyServerError(f"ComfyUI server {self.url} is unreachable: cannot open its websocket ({exc}); "
                                   f"start it or check --wan-comfyui / WAN_COMFYUI_URL") from None

    def run(self, prompt: dict, on_progress=None) -> Execution:
        """Queue the prompt and follow it to the end. ``on_progress(node, value, max)`` gets the sampler steps.

        A silence longer than the timeout interrupts the prompt (`/interrupt`) and raises; so does a server that
        closes the websocket (it died) or reports an execution error."""
        import websocket

        ws = self._connect()
        try:
            ws.settimeout(self.timeout)
            start = time.perf_counter()
            prompt_id = self.submit(prompt)
            events: list[tuple[float, str, dict]] = []
            while True:
                try:
                    message = ws.recv()
                except websocket.WebSocketTimeoutException:
                    self.interrupt()
                    last = events[-1][1] if events else "no event"
                    raise ComfyServerError(f"ComfyUI server {self.url}: prompt {prompt_id} sent nothing for "
                                           f"{self.timeout:g} s (last: {last}); interrupted it (/interrupt)") \
                        from None
                except (websocket.WebSocketException, OSError) as exc:
                    raise ComfyServerError(f"ComfyUI server {self.url} closed the connection while running prompt "
                                           f"{prompt_id} (did it die?): {exc or type(exc).__name__}") from None
                now = time.perf_counter() - start
                if not isinstance(message, str):
                    continue  # binary previews
                try:
                    event = json.loads(message)
                except ValueError:
                    continue
                kind, data = event.get("type"), event.get("data") or {}
                if not isinstance(data, dict) or data.get("prompt_id") != prompt_id:
                    continue  # queue status, other clients' prompts
                events.append((now, kind, data))
                if kind == "progress" and on_progress is not None:
                    on_progress(str(data.get("node")), int(data.get("value", 0)), int(data.get("max", 0)))
                if kind == "execution_error":
                    raise ComfyServerError(
                        f"ComfyUI server {self.url}: node #{data.get('node_id')} ({data.get('node_type')}) failed: "
                        f"{data.get('exception_type', 'error')}: {str(data.get('exception_message', '')).strip()}")
                if kind == "execution_interrupted":
                    raise ComfyServerError(f"ComfyUI server {self.url}: prompt {prompt_id} was interrupted at node "
                                           f"#{data.get('node_id')} ({data.get('node_type')})")
                if kind == "execution_success" or (kind == "executing" and data.get("node") is None):
                    return timeline(prompt_id, events)
        finally:
            ws.close()


def timeline(prompt_id: str, events: list[tuple[float, str, dict]]) -> Execution:
    """Per-node seconds from a prompt's events: each ``executing`` opens a node and closes the one before; the end
    (``execution_success`` or ``executing`` with no node) closes the last."""
    node_seconds: dict[str, float] = {}
    cached: list[str] = []
    current, opened, started, end = None, 0.0, None, 0.0
    for t, kind, data in events:
        if kind == "execution_start" and started is None:
            started = t
        elif kind == "execution_cached":
            cached += [str(n) for n in data.get("nodes") or []]
        if kind in ("executing", "execution_success"):
            if current is not None:
                node_seconds[current] = node_seconds.get(current, 0.0) + (t - opened)
            node = data.get("node") if kind == "executing" else None
            current, opened = (None if node is None else str(node)), t
        end = t
    if current is not None:
        node_seconds[current] = node_seconds.get(current, 0.0) + (end - opened)
    return Execution(prompt_id, end, node_seconds, cached, events, queued_seconds=started or 0.0)
