"""The VAE split over sequence-parallel ranks: band layout, the gather of unequal bands (simulated ranks and a real
gloo process group), exactness where the halo covers the receptive field, and the tiny Wan VAE end to end."""

import threading

import pytest
import torch
import torch.nn.functional as F

from wan_pipeline.run.vae_split import Band, VaeBands, bands, gather_bands


def test_bands_cover_every_row_once_evenly_with_clipped_halos():
    assert bands(152, 2, 8) == [Band(0, 76, 0, 84), Band(76, 152, 68, 152)]
    layout = bands(10, 3, 2)
    assert [(b.start, b.stop) for b in layout] == [(0, 4), (4, 7), (7, 10)]
    assert [(b.lo, b.hi) for b in layout] == [(0, 6), (2, 9), (5, 10)]
    assert bands(5, 1, 8) == [Band(0, 5, 0, 5)]
    with pytest.raises(ValueError, match="cannot split 3 latent rows into 4 bands"):
        bands(3, 4)


def simulated_ranks(world, work):
    """Run work(VaeSplit for rank r) on `world` threads whose all_gather is a real rendezvous; results by rank."""
    deposits, results, barrier = [None] * world, [None] * world, threading.Barrier(world)

    def run(rank):
        def all_gather(t):
            deposits[rank] = t.clone()
            barrier.wait()
            return list(deposits)

        results[rank] = work(VaeBands(parts=world, halo=1, rank=rank, all_gather=all_gather))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def local_decoder(z):
    """A 3x3 convolution then x8 upsampling: each pixel depends on one latent row either side."""
    weight = torch.arange(9 * 2 * 2, dtype=torch.float32).reshape(2, 2, 3, 3) / 50.0
    return F.interpolate(F.conv2d(z, weight, padding=1), scale_factor=8, mode="nearest")


def local_encoder(x):
    """x8 average pooling then a 3x3 convolution."""
    weight = torch.linspace(-1, 1, 2 * 2 * 9).reshape(2, 2, 3, 3)
    return F.conv2d(F.avg_pool2d(x, 8), weight, padding=1)


def test_bands_one_after_another_equal_the_whole_when_the_halo_covers_the_receptive_field():
    torch.manual_seed(0)
    z = torch.randn(1, 2, 11, 7)
    torch.testing.assert_close(VaeBands(3, halo=1).decode(local_decoder, z), local_decoder(z))
    x = torch.randn(1, 2, 11 * 8, 7 * 8)
    torch.testing.assert_close(VaeBands(4, halo=1).encode(local_encoder, x), local_encoder(x))


@pytest.mark.parametrize("world", [2, 3])
def test_split_decode_and_encode_equal_the_whole_when_the_halo_covers_the_receptive_field(world):
    torch.manual_seed(0)
    z = torch.randn(1, 2, 11, 7)  # 11 latent rows: unequal bands (4+4+3, 6+5)
    whole = local_decoder(z)
    for result in simulated_ranks(world, lambda split: split.decode(local_decoder, z)):
        torch.testing.assert_close(result, whole)  # equal up to the convolution's summation order
    x = torch.randn(1, 2, 11 * 8, 7 * 8)
    whole = local_encoder(x)
    for result in simulated_ranks(world, lambda split: split.encode(local_encoder, x)):
        torch.testing.assert_close(result, whole)


def test_gather_drops_the_padding_of_shorter_bands():
    pieces = [torch.ones(1, 3, 2), torch.full((1, 2, 2), 2.0)]
    out = gather_bands(pieces[1], [3, 2], lambda t: [F.pad(pieces[0], (0, 0, 0, 0)), t])
    assert out.shape == (1, 5, 2) and out[0, :3].eq(1).all() and out[0, 3:].eq(2).all()


def _gloo_rank(rank, world, port, queue):
    import torch.distributed as dist

    from wan_pipeline.run.vae_split import process_group_all_gather

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        z = torch.arange(5 * 3, dtype=torch.float32).reshape(1, 1, 5, 3)
        split = VaeBands(parts=world, halo=1, rank=rank, all_gather=process_group_all_gather)
        queue.put((rank, split.decode(lambda part: part.repeat_interleave(8, -2).repeat_interleave(8, -1), z)))
    finally:
        dist.destroy_process_group()


def test_the_process_group_gather_on_two_gloo_ranks():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gloo_rank, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    z = torch.arange(5 * 3, dtype=torch.float32).reshape(1, 1, 5, 3)
    expected = z.repeat_interleave(8, -2).repeat_interleave(8, -1)
    assert torch.equal(results[0], expected) and torch.equal(results[1], expected)


def test_the_tiny_wan_vae_split_in_two_stays_close_to_the_whole_frame():
    """The Wan VAE's mid-block attention sees band plus halo only: close, not identical (the launcher reports the
    PSNR of the real run's frames)."""
    from wan_pipeline.run.models import TINY_VAE, random_vae

    vae = random_vae(TINY_VAE, torch.device("cpu"), torch.float32, seed=3)
    torch.manual_seed(0)
    z = torch.randn(1, 16, 2, 24, 10)
    one_at_a_time = threading.Lock()  # the simulated ranks share one VAE and its causal cache

    def decode(part):
        with one_at_a_time:
            return vae.decode(part).sample

    with torch.no_grad():
        whole = vae.decode(z).sample
        halves = simulated_ranks(2, lambda split: VaeBands(2, rank=split.rank, all_gather=split.all_gather).decode(
            decode, z))
        one_gpu = VaeBands(2).decode(decode, z)  # the same bands one after another
    assert halves[0].shape == whole.shape and torch.equal(halves[0], halves[1])
    torch.testing.assert_close(one_gpu, halves[0])
    mse = torch.mean((halves[0] - whole) ** 2).item()
    signal = torch.mean(whole ** 2).item()
    assert mse < 0.01 * signal, (mse, signal)
