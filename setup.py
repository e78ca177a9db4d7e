from pathlib import Path

from setuptools import setup

here = Path(__file__).parent

setup(
    name="fastkd",
    version="0.1.0",
    description="Fused Triton knowledge-distillation loss (KL + cross-entropy) for Transformers",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # kernels/ lives at the top of the repository but installs as fastkd.kernels: a top-level
    # module called `kernels` would clash with an existing PyPI package.
    packages=["fastkd", "fastkd.kernels", "fastkd.bench", "fastkd.hf", "fastkd.offline"],
    package_dir={"fastkd": "fastkd", "fastkd.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
    ],
    extras_require={
        # trl and liger-kernel: the fused-linear peers that tests and benchmarks compare with;
        # peft: the fastkd.hf tests build LoRA and prompt-tuning models (refusals, adapters).
        "test": ["pytest>=7.4", "pytest-benchmark>=4.0", "hypothesis>=6.80", "trl>=1.16",
                 "liger-kernel>=0.8", "peft>=0.13"],
        "bench": ["pytest-benchmark>=4.0", "matplotlib>=3.7", "tqdm>=4.60", "trl>=1.16",
                  "liger-kernel>=0.8"],
        "hf": ["transformers>=4.46", "accelerate>=1.0"],
        "examples": [
            "transformers>=4.46", "tokenizers>=0.15", "accelerate>=1.0", "matplotlib>=3.7",
            "tqdm>=4.60",
        ],
        "offline": ["safetensors>=0.4", "transformers>=4.46", "tqdm>=4.60"],
        "dev": [
            "pytest>=7.4", "pytest-benchmark>=4.0", "hypothesis>=6.80", "matplotlib>=3.7",
            "tqdm>=4.60", "ruff>=0.5",
        ],
    },
    entry_points={"console_scripts": [
        "fastkd-bench = fastkd.bench.cli:main",
        "fastkd-topk = fastkd.offline.cli:main",
    ]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
