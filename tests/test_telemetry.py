"""telemetry: fingerprint and NVML snapshots, with a fake pynvml (no GPU on CI)."""

import sys
import types
from collections import namedtuple

import pytest

from wan_pipeline.measure import telemetry

Mem = namedtuple("Mem", "total free used")
Viol = namedtuple("Viol", "referenceTime violationTime")


class FakeNVMLError(Exception):
    pass


def make_fake_nvml(reasons=0x4, old_api=False, broken=(), power_violation=5_404_905_952):
    """A pynvml stand-in with the values an H100 gave under load (driver 580.159.04, SW power cap active)."""
    n = types.SimpleNamespace()
    n.NVML_CLOCK_SM, n.NVML_CLOCK_MEM, n.NVML_TEMPERATURE_GPU = 1, 2, 0
    n.NVML_PERF_POLICY_POWER, n.NVML_PERF_POLICY_THERMAL = 0, 1
    n.calls = {"init": 0, "shutdown": 0}

    def fn(name, value):
        def call(*args):
            if name in broken:
                raise FakeNVMLError(name)
            return value(*args) if callable(value) else value
        setattr(n, name, call)

    n.nvmlInit = lambda: n.calls.__setitem__("init", n.calls["init"] + 1)
    n.nvmlShutdown = lambda: n.calls.__setitem__("shutdown", n.calls["shutdown"] + 1)
    fn("nvmlDeviceGetHandleByIndex", lambda i: ("handle", i))
    fn("nvmlDeviceGetName", b"NVIDIA H100 80GB HBM3")
    fn("nvmlSystemGetDriverVersion", "580.159.04")
    fn("nvmlSystemGetCudaDriverVersion", 13000)
    fn("nvmlDeviceGetCudaComputeCapability", (9, 0))
    fn("nvmlDeviceGetMemoryInfo", Mem(85520809984, 80000000000, 5520809984))
    fn("nvmlDeviceGetClockInfo", lambda h, c: 1545 if c == 1 else 2619)
    fn("nvmlDeviceGetMaxClockInfo", lambda h, c: 1980 if c == 1 else 2619)
    fn("nvmlDeviceGetTemperature", 61)
    fn("nvmlDeviceGetPowerUsage", 697049)
    fn("nvmlDeviceGetEnforcedPowerLimit", 700000)
    fn("nvmlDeviceGetPerformanceState", 0)
    fn("nvmlDeviceGetViolationStatus", lambda h, p: Viol(0, power_violation if p == 0 else 0))
    if old_api:
        fn("nvmlDeviceGetCurrentClocksThrottleReasons", reasons)
    else:
        fn("nvmlDeviceGetCurrentClocksEventReasons", reasons)
    return n


@pytest.fixture
def fake_nvml(monkeypatch):
    fake = make_fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def test_gpu_snapshot_reads_every_field(fake_nvml):
    snap = telemetry.gpu_snapshot(0)
    assert snap["name"] == "NVIDIA H100 80GB HBM3"  # bytes decoded
    assert snap["driver"] == "580.159.04"
    assert snap["compute_capability"] == "9.0"
    assert snap["memory_total_bytes"] == 85520809984 and snap["memory_used_bytes"] == 5520809984
    assert (snap["sm_clock_mhz"], snap["sm_clock_max_mhz"]) == (1545, 1980)
    assert (snap["mem_clock_mhz"], snap["mem_clock_max_mhz"]) == (2619, 2619)
    assert snap["temperature_c"] == 61
    assert snap["power_w"] == pytest.approx(697.049) and snap["power_limit_w"] == pytest.approx(700.0)
    assert snap["clock_event_reasons"] == ["sw_power_cap"]
    assert snap["violation_ns"] == {"power": 5_404_905_952, "thermal": 0}
    assert not any("uuid" in k.lower() or "serial" in k.lower() for k in snap)
    assert fake_nvml.calls["init"] == fake_nvml.calls["shutdown"] == 1


def test_gpu_snapshot_falls_back_to_the_old_throttle_api(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", make_fake_nvml(reasons=0x20 | 0x1, old_api=True))
    assert telemetry.gpu_snapshot()["clock_event_reasons"] == ["gpu_idle", "sw_thermal_slowdown"]


def test_gpu_snapshot_survives_failing_calls(monkeypatch):
    fake = make_fake_nvml(broken=("nvmlDeviceGetTemperature", "nvmlDeviceGetPowerUsage",
                                  "nvmlDeviceGetCurrentClocksEventReasons"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    snap = telemetry.gpu_snapshot()
    assert snap["temperature_c"] is None and snap["power_w"] is None
    assert snap["clock_event_reasons"] == [] and snap["name"] == "NVIDIA H100 80GB HBM3"


def test_no_nvml_gives_none(monkeypatch):
    fake = make_fake_nvml()

    def fail():
        raise FakeNVMLError("NVML Shared Library Not Found")

    fake.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert telemetry.gpu_snapshot() is None
    fp = telemetry.environment_fingerprint()
    assert fp["nvidia_driver"] is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed at all
    assert telemetry.gpu_snapshot() is None


def test_bad_index_gives_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", make_fake_nvml(broken=("nvmlDeviceGetHandleByIndex",)))
    assert telemetry.gpu_snapshot(3) is None


def test_fingerprint_names_speed_variables_and_versions(monkeypatch, fake_nvml):
    monkeypatch.setenv("TORCH_COMPILE", "1")
    monkeypatch.setenv("TORCHINDUCTOR_COORDINATE_DESCENT_TUNING", "1")
    monkeypatch.setenv("WAN_API_TOKEN", "secret")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # a speed variable, not a secret
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    fp = telemetry.environment_fingerprint()
    assert fp["env.TORCH_COMPILE"] == "1"
    assert fp["env.TORCHINDUCTOR_COORDINATE_DESCENT_TUNING"] == "1"
    assert "env.NVIDIA_TF32_OVERRIDE" in fp and fp["env.NVIDIA_TF32_OVERRIDE"] is None
    assert [k for k in fp if "TOKEN" in k] == ["env.TOKENIZERS_PARALLELISM"]
    assert fp["env.TOKENIZERS_PARALLELISM"] == "false"
    assert fp["version.pytest-benchmark"] is not None and fp["version.numpy"] is not None
    assert fp["nvidia_driver"] == "580.159.04" and fp["cuda_driver"] == "13.0"
    assert fp["kernel"] and fp["python"]
    assert all(v is None or isinstance(v, str) for v in fp.values())


def test_fingerprint_does_not_import_torch(monkeypatch):
    import subprocess

    code = ("import sys; from wan_pipeline.measure import telemetry; fp = telemetry.environment_fingerprint(); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(fp['torch.cuda'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_torch_versions_when_torch_is_imported(monkeypatch):
    fake_torch = types.SimpleNamespace(
        version=types.SimpleNamespace(cuda="13.0"),
        backends=types.SimpleNamespace(cudnn=types.SimpleNamespace(is_available=lambda: True, version=lambda: 91300)))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    fp = telemetry.environment_fingerprint()
    assert fp["torch.cuda"] == "13.0" and fp["torch.cudnn"] == "91300"


def test_throttle_reasons_between():
    before = {"clock_event_reasons": ["gpu_idle"], "violation_ns": {"power": 10, "thermal": 5}}
    after = {"clock_event_reasons": ["sw_power_cap", "applications_clocks_setting"],
             "violation_ns": {"power": 10, "thermal": 900}}
    assert telemetry.throttle_reasons_between(before, after) == ["sw_power_cap", "thermal_violation"]
    assert telemetry.throttle_reasons_between(None, None) == []
    assert telemetry.throttle_reasons_between({"clock_event_mask": 0x40 | 0x1}, None) == ["hw_thermal_slowdown"]
    assert telemetry.throttle_reasons_between({"clock_event_reasons": ["gpu_idle"]},
                                              {"clock_event_reasons": ["display_clock_setting"]}) == []


def test_decode_reasons_names_every_bit():
    assert telemetry.decode_clock_event_reasons(0x4 | 0x8 | 0x80) == ["sw_power_cap", "hw_slowdown",
                                                                       "hw_power_brake_slowdown"]
    assert telemetry.decode_clock_event_reasons(0x100000) == ["bit_0x100000"]


@pytest.mark.parametrize("value, slug", [
    ("NVIDIA-H100-80GB-HBM3", "nvidia-h100-80gb-hbm3"),
    ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
    ("NVIDIA GeForce RTX 4090 D", "nvidia-geforce-rtx-4090-d"),
    ({"name": "NVIDIA H200"}, "nvidia-h200"),
    ({"gpu": {"name": "NVIDIA H200"}, "node": "x"}, "nvidia-h200"),
    ({"gpu": None}, "cpu"),
    (None, "cpu"),
    ("  ", "cpu"),
])
def test_gpu_slug(value, slug):
    assert telemetry.gpu_slug(value) == slug


def test_snapshot_follows_cuda_visible_devices():
    from wan_pipeline.measure.telemetry import visible_gpu_index

    assert visible_gpu_index({}) == 0
    assert visible_gpu_index({"CUDA_VISIBLE_DEVICES": "3"}) == 3
    assert visible_gpu_index({"CUDA_VISIBLE_DEVICES": "2,0"}) == 2
    assert visible_gpu_index({"CUDA_VISIBLE_DEVICES": "GPU-8f1c"}) == 0
    assert visible_gpu_index({"CUDA_VISIBLE_DEVICES": ""}) is None  # every GPU hidden: a CPU worker
    assert visible_gpu_index({"CUDA_VISIBLE_DEVICES": "-1"}) is None


def test_a_process_that_sees_no_gpu_records_none_even_where_nvml_sees_one(monkeypatch):
    asked = []
    monkeypatch.setattr(telemetry, "_nvml", lambda: asked.append(1) or pytest.fail("NVML asked for a hidden GPU"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert telemetry.gpu_snapshot() is None and asked == []


@pytest.mark.parametrize("visible, present, expected", [
    (None, 2, True), (None, 0, False), ("", 2, False), ("-1", 2, False), ("1", 2, True), ("2", 2, False),
    ("0,5", 1, True), ("abc,0", 2, False), ("GPU-8a1b2c3d", 1, True),
])
def test_cuda_available_without_torch_follows_the_driver_and_cuda_visible_devices(monkeypatch, visible, present,
                                                                                    expected):
    fake = make_fake_nvml()
    fake.nvmlDeviceGetCount = lambda: present
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not imported (and not importable)
    monkeypatch.setattr(telemetry, "_torch_versions", lambda: {"torch.cuda": "13.0", "torch.cudnn": None})
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert telemetry.cuda_available(environ) is expected
    assert fake.calls["init"] == fake.calls["shutdown"] == 1


def test_cuda_available_is_false_for_a_cpu_build_of_torch_or_without_a_driver(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "pynvml", make_fake_nvml())
    monkeypatch.setattr(telemetry, "_torch_versions", lambda: {"torch.cuda": None, "torch.cudnn": None})
    assert telemetry.cuda_available({}) is False  # GPUs present, but this torch cannot use them
    monkeypatch.setattr(telemetry, "_torch_versions", lambda: {"torch.cuda": "13.0", "torch.cudnn": None})
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no NVML: no driver
    assert telemetry.cuda_available({}) is False


def test_cuda_available_asks_torch_once_it_is_imported(monkeypatch):
    for answer in (True, False):
        fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda answer=answer: answer))
        monkeypatch.setitem(sys.modules, "torch", fake_torch)
        assert telemetry.cuda_available({}) is answer


def test_cuda_available_agrees_with_torch_on_this_machine():
    """Without torch, then with it: the same answer (a CPU box says False twice, a GPU box True twice)."""
    import subprocess

    code = ("import sys; from wan_pipeline.measure import telemetry; before = telemetry.cuda_available(); "
            "assert 'torch' not in sys.modules; import torch; print(before, torch.cuda.is_available())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    before, after = out.stdout.split()
    assert before == after, out.stdout
