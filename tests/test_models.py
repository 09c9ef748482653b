"""Model sources and memory policy: tiny sets are deterministic; the residency policy follows the card's size."""

import numpy as np
import pytest
import torch

from wan_pipeline.errors import WanBenchError
from wan_pipeline.measure.media import resize_center_crop
from wan_pipeline.plan.config import ModelSetKey
from wan_pipeline.plan.plan import make_plan
from wan_pipeline.plan.presets import get_preset
from wan_pipeline.run import conditioning
from wan_pipeline.run.model_files import LoadingError, auto_mode
from wan_pipeline.run.models import Residency, load_model_set

GB = 10**9


@pytest.fixture(scope="module")
def tiny():
    cfg = get_preset("seed-832x1216-49f")
    return cfg, load_model_set(ModelSetKey.for_run(cfg, "tiny", None), seed=5)


def test_tiny_set_is_deterministic_from_its_seed(tiny):
    cfg, models = tiny
    again = load_model_set(ModelSetKey.for_run(cfg, "tiny", None), seed=5)
    for name in ("high", "low"):
        a, b = models.experts[name].state_dict(), again.experts[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(models.experts["high"].proj_out.weight, models.experts["low"].proj_out.weight)
    assert "random weights" in models.notes[0] and "meaningless" in models.notes[0]


def test_synthetic_on_a_cpu_is_refused():
    cfg = get_preset("seed-832x1216-49f")
    with pytest.raises(WanBenchError, match="use --mode tiny"):
        load_model_set(ModelSetKey.for_run(cfg, "synthetic", None), device=torch.device("cpu"))


def test_auto_mode_without_models_is_tiny_on_a_cpu_and_synthetic_on_a_gpu(tmp_path, monkeypatch):
    from wan_pipeline.measure import telemetry

    for has_gpu, mode in ((False, "tiny"), (True, "synthetic")):  # the device probe forced, on any machine
        monkeypatch.setattr(telemetry, "cuda_available", lambda: has_gpu)
        assert auto_mode(None)[0] == mode
        with pytest.raises(LoadingError, match=f"models folder {tmp_path} .* is not usable"):
            auto_mode(str(tmp_path))  # a folder without the files: an error, never this fall-back


class FakeSet:
    """Sizes of an A14B set, to decide policies without allocating anything."""

    def __init__(self, expert_bytes, text_bytes):
        self.device = torch.device("cuda")
        self.experts = {"high": expert_bytes, "low": expert_bytes}
        self.text_encoder, self.vae = text_bytes, int(0.25 * GB)
        self.key = ModelSetKey.for_run(get_preset("seed-832x1216-49f"), "synthetic", None)
        self.host_copies = {}


@pytest.mark.parametrize("expert_gb, total_gb, reserve_gb, policy", [
    (14.3, 85.5, 17, "resident"),  # fp8 experts on an 80 GB card
    (28.6, 85.5, 8, "resident"),  # bf16 experts with a small working set
    (28.6, 85.5, 17, "offload-text-encoder"),  # ... and with 49 frames' VAE: the encoder leaves after encoding
    (14.3, 48.0, 17, "offload-text-encoder"),
    (14.3, 25.7, 8, "offload-idle-expert"),  # a 24 GB card: one expert at a time, as ComfyUI does
])
def test_residency_policy_follows_the_card(monkeypatch, expert_gb, total_gb, reserve_gb, policy):
    import wan_pipeline.run.models as models

    fake = FakeSet(int(expert_gb * GB), int(11.4 * GB))
    monkeypatch.setattr(models, "parameter_bytes", lambda m: m if isinstance(m, int) else 0)
    assert Residency(fake, reserve_bytes=int(reserve_gb * GB), total_bytes=int(total_gb * GB)).policy == policy


def test_residency_refuses_a_card_too_small_for_one_expert(monkeypatch):
    import wan_pipeline.run.models as models

    monkeypatch.setattr(models, "parameter_bytes", lambda m: m if isinstance(m, int) else 0)
    with pytest.raises(WanBenchError, match="model set does not fit 24.00 GB .* needs at least 36.85 GB"):
        Residency(FakeSet(int(28.6 * GB), int(11.4 * GB)), reserve_bytes=int(8 * GB), total_bytes=int(24 * GB))


def test_start_image_is_resized_like_comfyui(tiny):
    image = conditioning.test_card(300, 200)
    ours = conditioning.upscale_center(image, 64, 96).numpy()
    reference = resize_center_crop(image, 64, 96).astype(np.float32) / 255.0
    assert ours.shape == (96, 64, 3)
    assert np.abs(ours - reference).max() < 1.5 / 255  # same crop, same bilinear (uint8 rounding apart)


def test_image_conditioning_is_mask_then_normalised_latent(tiny):
    cfg, models = tiny
    plan = make_plan(cfg, "tiny")
    image01 = conditioning.upscale_center(conditioning.test_card(plan.width, plan.height), plan.width, plan.height)
    concat = conditioning.image_conditioning(models, image01, plan)
    b, _, t, h, w = plan.latent_shape
    assert concat.shape == (b, 20, t, h, w)
    assert torch.all(concat[:, :4, 0] == 1) and torch.all(concat[:, :4, 1:] == 0)
    # the frames after the first are 0.5 gray: their latents differ from the start frame's
    assert not torch.allclose(concat[:, 4:, 0], concat[:, 4:, -1])


def test_the_vae_sees_comfyuis_video_start_frame_then_gray(tiny, monkeypatch):
    cfg, models = tiny
    plan = make_plan(cfg, "tiny")
    image01 = conditioning.upscale_center(conditioning.test_card(plan.width, plan.height), plan.width, plan.height)
    seen = []
    encode = models.vae.encode
    monkeypatch.setattr(models.vae, "encode", lambda x: seen.append(x.clone()) or encode(x))
    conditioning.image_conditioning(models, image01, plan)
    # WanImageToVideo: ones * 0.5 with the image as frame 0, then the VAE's [-1, 1] input, in float32
    video = torch.full((plan.frames, plan.height, plan.width, 3), 0.5)
    video[:1] = image01
    want = (video.permute(3, 0, 1, 2).unsqueeze(0) * 2.0 - 1.0).to(seen[0].dtype)
    assert torch.equal(seen[0], want)


def test_text_encoding_is_zero_past_the_end_token(tiny):
    _, models = tiny
    hidden = conditioning.encode_text(models, "a cat")
    tokens = models.tokenizer.tokenize("a cat")
    n = sum(tokens.attention_mask)
    assert hidden.shape[:2] == (1, 512) and n == len("a cat") + 1
    assert torch.count_nonzero(hidden[0, n:]) == 0 and torch.count_nonzero(hidden[0, :n]) > 0


def test_auto_precision_is_what_comfyui_runs_fp8_scaled_files_with(monkeypatch):
    from wan_pipeline.run.precision import resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    # ComfyUI 0.3.64, weight_dtype "default": dequantize and multiply in float16, even where fp8 compute exists
    assert resolve_precision("auto", torch.device("cuda", 0)) == "fp8-upcast-fp16"
    assert resolve_precision("auto", torch.device("cuda", 0), weight_dtype="fp8_e4m3fn_fast") == "fp8-scaled-mm-fp16"
    # a scaled_fp8 marker of other than two elements turns ComfyUI's fp8 optimizations on
    assert resolve_precision("auto", torch.device("cuda", 0), fp8_matmul_file=True) == "fp8-scaled-mm-fp16"
    assert resolve_precision("auto", torch.device("cuda", 0), file_format="bf16") == "fp16"
    assert resolve_precision("bf16", torch.device("cuda", 0), weight_dtype="fp8_e4m3fn_fast") == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert resolve_precision("auto", torch.device("cuda", 0)) == "fp8-upcast-fp16"  # A100: fp8 storage, fp16 math
    # no fp8 compute: fp8_e4m3fn_fast falls back to the upcast, as ComfyUI's fp8_linear does
    assert resolve_precision("auto", torch.device("cuda", 0), weight_dtype="fp8_e4m3fn_fast") == "fp8-upcast-fp16"


@pytest.mark.parametrize("precision, fast_accum", [("fp8-scaled-mm", False), ("fp8-scaled-mm-fast", True)])
def test_fp8_matmul_modes_differ_only_in_the_accumulation_they_ask_for(monkeypatch, precision, fast_accum):
    from wan_pipeline.run import precision as precision_module
    from wan_pipeline.run.precision import Fp8Linear, apply_precision

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(64, 48))
    reference = block[0].weight.detach().clone(), block[0].bias.detach().clone()
    transformer = torch.nn.Module()
    transformer.blocks = torch.nn.ModuleList([block])
    monkeypatch.setattr(precision_module, "check_fp8_matmul", lambda device, name: None)  # CPU _scaled_mm runs
    notes = apply_precision(transformer, precision, torch.float32)
    layer = transformer.blocks[0][0]
    assert isinstance(layer, Fp8Linear) and layer.fast_accum is fast_accum and layer.matmul
    assert ("fast accumulation" in notes[0]) is fast_accum
    seen = []
    real_scaled_mm = torch._scaled_mm

    def recording_scaled_mm(*args, **kwargs):
        seen.append(kwargs["use_fast_accum"])
        return real_scaled_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording_scaled_mm)
    x = torch.randn(5, 64)
    out = layer(x)
    assert seen == [fast_accum]
    expected = torch.nn.functional.linear(x, *reference)
    assert torch.nn.functional.cosine_similarity(out.flatten(), expected.flatten(), dim=0) > 0.99


def test_fp8_matmul_on_a_cpu_is_refused_with_the_precision_named():
    from wan_pipeline.run.precision import check_fp8_matmul

    with pytest.raises(WanBenchError, match="fp8-scaled-mm-fast needs a CUDA GPU"):
        check_fp8_matmul(torch.device("cpu"), "fp8-scaled-mm-fast")


def test_real_experts_park_in_cpu_memory_when_they_do_not_fit():
    from wan_pipeline.run.models import expert_load_device

    cuda = torch.device("cuda", 0)
    fp8_expert = int(14.3 * GB)
    assert expert_load_device(cuda, int(85.5 * GB), [fp8_expert] * 2, keep_fp8=True) == cuda  # H100, fp8
    assert expert_load_device(cuda, int(85.5 * GB), [fp8_expert] * 2, keep_fp8=False) == cuda  # bf16: 57 GB
    assert expert_load_device(cuda, int(51.0 * GB), [fp8_expert] * 2, keep_fp8=False) == torch.device("cpu")
    assert expert_load_device(cuda, int(25.7 * GB), [fp8_expert] * 2, keep_fp8=True) == torch.device("cpu")  # 24 GB
    assert expert_load_device(torch.device("cpu"), None, [fp8_expert] * 2, keep_fp8=True) == torch.device("cpu")


@pytest.mark.parametrize("policy, name, evicted", [
    ("resident", "expert:high", []),
    ("offload-text-encoder", "expert:high", ["text_encoder"]),
    ("offload-text-encoder", "text_encoder", []),
    ("offload-idle-expert", "expert:high", ["text_encoder", "expert:low"]),
    ("offload-idle-expert", "text_encoder", ["expert:high", "expert:low"]),
    ("offload-idle-expert", "vae", ["text_encoder"]),
])
def test_residency_evicts_what_the_policy_says(monkeypatch, policy, name, evicted):
    import wan_pipeline.run.models as models

    monkeypatch.setattr(models, "parameter_bytes", lambda m: m if isinstance(m, int) else 0)
    residency = Residency(FakeSet(int(14.3 * GB), int(11.4 * GB)), reserve_bytes=0, total_bytes=int(100 * GB))
    residency.policy = policy
    moves = []
    monkeypatch.setattr(residency, "_place", lambda n, device: moves.append((n, str(device))))
    residency.need(name)
    assert moves == [(n, "cpu") for n in evicted] + [(name, "cuda")]


def test_a_chosen_residency_is_kept_when_it_fits_and_refused_with_the_numbers_when_not(monkeypatch):
    import wan_pipeline.run.models as models

    monkeypatch.setattr(models, "parameter_bytes", lambda m: m if isinstance(m, int) else 0)
    fake = FakeSet(int(14.3 * GB), int(11.4 * GB))
    chosen = Residency(fake, reserve_bytes=int(8 * GB), total_bytes=int(85.5 * GB), policy="offload-text-encoder")
    assert chosen.policy == "offload-text-encoder"  # auto would keep everything resident on this card
    with pytest.raises(WanBenchError, match="does not fit 48.00 GB .* with residency 'resident': it needs at least "
                                            "57.25 GB .*try residency auto"):
        Residency(fake, reserve_bytes=int(17 * GB), total_bytes=int(48 * GB), policy="resident")


def test_offloading_keeps_one_host_copy_and_moves_no_data_the_second_time(monkeypatch):
    import wan_pipeline.run.models as models

    encoder = torch.nn.Linear(4, 4)
    fake = FakeSet(int(14.3 * GB), int(11.4 * GB))
    fake.text_encoder = encoder
    monkeypatch.setattr(models, "parameter_bytes", lambda m: m if isinstance(m, int) else 0)
    residency = Residency(fake, reserve_bytes=0, total_bytes=int(100 * GB))
    original = encoder.weight.detach().clone()
    residency._offload("text_encoder", encoder)
    first = encoder.weight.data_ptr()
    encoder.weight.data = encoder.weight.data.clone()  # stands for the copy on the GPU
    residency._offload("text_encoder", encoder)
    assert encoder.weight.data_ptr() == first and torch.equal(encoder.weight, original)
    encoder.weight.data = encoder.weight.data.clone()
    next_case = Residency(fake, reserve_bytes=0, total_bytes=int(100 * GB))  # configure() makes one per case
    next_case._offload("text_encoder", encoder)
    assert encoder.weight.data_ptr() == first  # the model set's copy: nothing copied inside the next case's rounds


def test_random_text_encoders_stand_for_comfyuis_fp8_umt5_file_in_fp8_runs():
    import copy

    from wan_pipeline.run.models import TINY_UMT5, random_text_encoder
    from wan_pipeline.run.precision import Fp8Linear, store_text_encoder_fp8

    encoder = random_text_encoder(TINY_UMT5, torch.device("cpu"), torch.bfloat16, seed=5)
    reference = copy.deepcopy(encoder)
    notes = store_text_encoder_fp8(encoder, torch.bfloat16)
    fp8 = [n for n, m in encoder.named_modules() if isinstance(m, Fp8Linear)]
    assert len(fp8) == TINY_UMT5["num_layers"] * 6 and notes[0].startswith("text encoder: 12 block Linear layers")
    assert not any(n.endswith(".wo") for n in fp8)  # UMT5 casts activations to wo's dtype: wo stays bf16
    ids = torch.randint(2, 300, (1, 16))
    with torch.no_grad():
        want = reference(input_ids=ids).last_hidden_state.float().flatten()
        got = encoder(input_ids=ids).last_hidden_state.float().flatten()
    assert torch.nn.functional.cosine_similarity(want, got, dim=0) > 0.99
