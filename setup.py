"""Build ami-dist: the Python package and its C++ (CPU) / CUDA op for latent noise sampling.

The CUDA sources are added when CUDA is requested (see ``_extensions``); this is never decided by
``torch.cuda.is_available()`` so the package builds on GPU-less login nodes.
"""

import os
import sys
from glob import glob

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _extensions() -> list:
    """The LNS op (csrc/, DESIGN.md §3) as ``ami_dist._C``: CPU always, CUDA when requested."""
    here = os.path.dirname(os.path.abspath(__file__))
    cpu_sources = ["csrc/lns_cpu.cpp", "csrc/dropout_cpu.cpp", "csrc/module.cpp"]
    # at::parallel_for is an OpenMP pragma in a header, so the extension itself must be built
    # with OpenMP or it runs single-threaded; -fno-math-errno lets sqrt vectorise.
    cxx_flags = ["-O3", "-fno-math-errno"]
    link_flags = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    include_dirs = [os.path.join(here, "csrc")]
    force_cuda = os.environ.get("AMI_DIST_FORCE_CUDA", "0") == "1"
    # Decided from the toolkit and the torch build, never from torch.cuda.is_available(), so GPU
    # wheels build on login nodes without a GPU. TORCH_CUDA_ARCH_LIST is read by BuildExtension.
    with_cuda = force_cuda or (CUDA_HOME is not None and torch.version.cuda is not None)
    if not with_cuda:
        return [
            CppExtension(
                "ami_dist._C",
                cpu_sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=link_flags,
            )
        ]
    cuda_sources = ["csrc/lns_cuda.cpp", *sorted(glob("csrc/*.cu", root_dir=here))]
    return [
        CUDAExtension(
            "ami_dist._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
    ]


setup(
    name="ami-dist",
    version="0.1.0",
    description="Distributed Adversarial Mutual Information (AMI) training for text generation",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.11",
    packages=find_packages(include=["ami_dist", "ami_dist.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension},
    entry_points={
        "console_scripts": [
            "ami-train=ami_dist.cli:main",
            "ami-export=ami_dist.export:main",
            "ami-evaluate=ami_dist.evaluate:main",
            "ami-compare=ami_dist.compare:main",
            "ami-prepare=ami_dist.prepare:main",
            "ami-generate=ami_dist.generate:main",
        ]
    },
)
