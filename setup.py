"""bespoke_fast: learned Bespoke solvers for flow models, with fused Triton kernels and a
whole-loop CUDA-graph sampler. See README.md."""
import sys

from setuptools import setup

if "develop" in sys.argv[1:]:
    # `setup.py develop` (pip < 21.3, or setuptools < 64 with --no-build-isolation) ignores
    # package_dir, so bespoke_fast.kernels would silently not import: refuse it.
    sys.exit("bespoke_fast: editable installs need pip >= 21.3 and setuptools >= 64 (PEP 660); "
             "run `python -m pip install -U pip setuptools` and install again")

setup(
    name="bespoke_fast",
    version="0.1.0",
    description="Bespoke (learned scale-time) ODE solvers for flow-matching / diffusion models, "
    "fused Triton kernels and a one-CUDA-graph sampler",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["bespoke_fast", "bespoke_fast.solvers", "bespoke_fast.ops", "bespoke_fast.engine",
              "bespoke_fast.zoo", "bespoke_fast.kernels", "bespoke_fast.integrations",
              "bespoke_fast.fitting"],
    package_dir={"bespoke_fast.kernels": "kernels/bespoke_fast_kernels"},
    package_data={"bespoke_fast.zoo": ["weights/*.safetensors", "weights/*.json"]},
    install_requires=["torch>=2.1", "numpy", "tqdm", "safetensors"],
    extras_require={
        "triton": ["triton"],
        # bespoke_fast.integrations.diffusers (transformers: without it the SD3 / Flux pipeline
        # classes are dummies)
        "diffusers": ["diffusers", "transformers"],
        # the digits-exact model reads the 1797 digits from scikit-learn
        "digits": ["scikit-learn"],
        # photo-32's training photos (and its held-out crops) ship with these two; loading the
        # model needs neither
        "photos": ["scikit-learn", "scikit-image"],
        # flow_matching and diffusers: the peer-conversion tests check our adapters to them, and
        # the diffusers integration tests; nvidia-ml-py: the telemetry test runs against a fake
        # NVML on CPU machines
        # torchsde: k_diffusion.sampling's one dependency beyond these (k-diffusion itself
        # installs --no-deps: its requirements pull torchvision, which replaces torch)
        "test": ["pytest", "pytest-benchmark", "torchdiffeq", "scipy", "scikit-learn", "matplotlib",
                 "flow_matching", "diffusers", "transformers", "nvidia-ml-py", "torchsde",
                 "scikit-image"],
        "bench": ["pytest-benchmark", "nvidia-ml-py", "torchdiffeq", "flow_matching", "diffusers",
                  "matplotlib"],
        "viz": ["matplotlib"],
    },
    entry_points={"console_scripts": ["bespoke-fast=bespoke_fast.cli:main"]},
)
