"""Fixtures for the LNS op tests: the built extension is required, never silently skipped."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ami_dist import ops
from ami_dist.ops import fused


@pytest.fixture(scope="session")
def built_extension() -> None:
    """Fail (not skip) when ami_dist._C is missing: these tests are the op's coverage."""
    if fused.load_error() is not None:
        pytest.fail(f"ami_dist._C is not importable ({fused.load_error()}); {fused.BUILD_HINT}")


@pytest.fixture(autouse=True)
def _restore_impl() -> Iterator[None]:
    """Tests may switch the implementation; put the selection back afterwards."""
    before = ops.get_impl()
    yield
    ops.set_impl(before)


@pytest.fixture(params=["simd", "baseline"])
def cpu_isa(request, built_extension) -> Iterator[str]:
    """Run a test on the AVX2 CPU kernels and again on the baseline ones (same results expected)."""
    in_use = fused.set_cpu_avx2(request.param == "simd")
    assert in_use == (request.param == "simd") or request.param == "simd"  # no AVX2 on this CPU
    yield request.param
    fused.set_cpu_avx2(True)
