"""One distribution, `rto`, holding two import packages: `rto` (rto/) and `rto_kernels` (kernels/)."""

from setuptools import find_packages, setup

setup(
    name="rto",
    version="0.1.0",
    description="Reinforced Token Optimization (RTO) and PPO for RLHF, with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rto", "rto.*"]) + ["rto_kernels"],
    package_dir={"rto_kernels": "kernels"},
    package_data={"rto": ["recipes/*.yaml"]},
    install_requires=[
        # Install torch first (`pip install torch==2.13.0` on CPU machines): a bare requirement with no
        # torch present pulls the CUDA build.
        "torch>=2.6",
        "triton>=3.2; platform_system == 'Linux'",
        "transformers>=4.56",
        "datasets>=3.0",
        "omegaconf>=2.3",  # typed configs, YAML recipes, dotted overrides
        "tensorboard>=2.15",  # training curves (torch.utils.tensorboard)
        "tqdm>=4.60",
        "matplotlib>=3.7",  # report plots and `rto inspect` PNGs
    ],
    extras_require={
        # alpaca-eval: the export test runs AlpacaEval's own merge on our model outputs
        "dev": ["pytest>=8", "ruff>=0.8", "alpaca-eval>=0.6"],
        "gpu": ["liger-kernel>=0.5", "flash-attn>=2.6"],
        "vllm": ["vllm>=0.10"],
    },
    entry_points={"console_scripts": ["rto=rto.cli:main"]},
)
