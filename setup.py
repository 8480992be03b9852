"""Build ami-dist: the Python package and its C++ (CPU) / CUDA op for latent noise sampling.

The CUDA sources are added when CUDA is requested (see ``_extensions``); this is never decided by
``torch.cuda.is_available()`` so the package builds on GPU-less login nodes.
"""

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension


def _extensions() -> list:
    # The LNS op (csrc/) is added here; see DESIGN.md §3.
    return []


setup(
    name="ami-dist",
    version="0.1.0",
    description="Distributed Adversarial Mutual Information (AMI) training for text generation",
    python_requires=">=3.11",
    packages=find_packages(include=["ami_dist", "ami_dist.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension},
    entry_points={
        "console_scripts": [
            "ami-train=ami_dist.cli:main",
        ]
    },
)
