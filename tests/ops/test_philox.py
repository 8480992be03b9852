"""The LNS random stream: Philox known answers, draw indexing, precision and normality."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from ami_dist.ops import fused, reference

pytestmark = pytest.mark.usefixtures("built_extension")

# Random123, tests/kat_vectors, the three "philox4x32 10" lines: counter[4], key[2] -> out[4].
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]  # fmt: skip

M32 = 0xFFFFFFFF


def spec_philox(counter: tuple[int, ...], key: tuple[int, int]) -> tuple[int, ...]:
    """A scalar Philox4x32-10 in Python ints, written from the paper, as the tests' own oracle."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
    return c0, c1, c2, c3


def spec_normal(seed: int, j: int) -> float:
    """DESIGN.md §3 literally: z_(j mod 4) of counter j div 4, key (seed mod 2^32, seed div 2^32)."""
    q = j // 4
    x = spec_philox((q & M32, q >> 32, 0, 0), (seed & M32, seed >> 32))
    u = [(w + 0.5) * 2.0**-32 for w in x]
    r01, t01 = math.sqrt(-2 * math.log(u[0])), 2 * math.pi * u[1]
    r23, t23 = math.sqrt(-2 * math.log(u[2])), 2 * math.pi * u[3]
    return (r01 * math.cos(t01), r01 * math.sin(t01), r23 * math.cos(t23), r23 * math.sin(t23))[j % 4]


@pytest.mark.parametrize(("counter", "key", "expected"), KAT)
def test_python_oracle_matches_random123(counter, key, expected):
    assert spec_philox(counter, key) == expected


@pytest.mark.parametrize(("counter", "key", "expected"), KAT)
def test_reference_philox_matches_random123(counter, key, expected):
    out = reference.philox4x32_10(torch.tensor([counter], dtype=torch.int64), key)
    assert tuple(out[0].tolist()) == expected


def test_kernel_philox_matches_random123():
    for counter, key, expected in KAT:
        out = fused.philox4x32_10(torch.tensor([counter], dtype=torch.int64), key)
        assert tuple(out[0].tolist()) == expected


# (seed, offset): a key with a non-zero high word, a start that is not a multiple of 4, and a
# run that crosses counter 2^32 so that the counter's high word is exercised.
STREAMS = [(0, 0), (12345, 6), (0x1234_5678_9ABC_DEF0, 4 * 2**32 - 9), (2**64 - 1, 2**40 + 3)]


@pytest.mark.parametrize(("seed", "offset"), STREAMS)
def test_stream_draw_j_is_component_j_mod_4_of_counter_j_div_4(seed, offset, cpu_isa):
    n = 23
    expected = torch.tensor([spec_normal(seed, offset + t) for t in range(n)], dtype=torch.float64)
    torch.testing.assert_close(reference.normal_stream(seed, offset, n), expected, rtol=1e-12, atol=1e-12)
    # The kernels work in float32 (philox.h); ~3e-7 relative is their documented accuracy.
    got = fused.normal_stream(seed, offset, n).double()
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)


def test_tile_boundaries_of_the_kernel_generator(cpu_isa):
    # Runs longer than the CPU tile (1024 draws) starting at every phase modulo 4.
    for offset in range(4):
        n = 2 * 1024 + 7
        want = reference.normal_stream(99, offset, n)
        torch.testing.assert_close(fused.normal_stream(99, offset, n).double(), want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("impl", [fused, reference], ids=["fused", "reference"])
def test_op_draw_index_is_offset_plus_k_times_n_plus_i(impl, cpu_isa):
    # With h = 0, mu = 0 and lam = 1, h_noisy[k] = softplus(0) * eps_k exposes the draws.
    seed, offset, k, shape = 0xDEAD_BEEF_0000_0001, 4 * 2**32 - 10, 3, (2, 5)
    n = math.prod(shape)
    zeros = torch.zeros(shape, dtype=torch.float64)
    h_noisy, _ = impl.lns_sample(zeros, zeros, k, 1.0, seed, offset)
    eps = h_noisy / math.log(2.0)
    flat = torch.arange(n).reshape(shape)
    for kk in range(k):
        want = torch.tensor([spec_normal(seed, offset + kk * n + i) for i in flat.flatten().tolist()])
        torch.testing.assert_close(eps[kk].flatten(), want.double(), rtol=2e-6, atol=2e-6)


def test_kernel_normals_track_float64_definition_over_a_million_draws(cpu_isa):
    n = 1_000_000
    got = fused.normal_stream(7, 0, n).double()
    want = reference.normal_stream(7, 0, n)
    err = (got - want).abs() / want.abs().clamp_min(1.0)
    # philox.h documents ~3e-7; the log1p branch near u = 1 is what keeps it there.
    assert err.max().item() < 5e-7


@pytest.mark.parametrize("source", ["fused", "reference"])
def test_a_million_draws_are_standard_normal(source):
    n = 1_000_000
    z = fused.normal_stream(2024, 40, n) if source == "fused" else reference.normal_stream(2024, 40, n)
    z = z.double().numpy()
    assert abs(z.mean()) < 5.0 / math.sqrt(n)  # 5 standard errors
    assert abs(z.var() - 1.0) < 5.0 * math.sqrt(2.0 / n)
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
    # Neighbouring draws (the two halves of one Box–Muller pair included) must be uncorrelated.
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 5.0 / math.sqrt(n)
