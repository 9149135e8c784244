from setuptools import find_packages, setup

setup(
    name="x-transformers-hybrid",
    packages=find_packages(exclude=["tests", "tests.*", "benchmarks"]),
    version="0.3.0",
    license="MIT",
    description="x-transformers: transformers and linear-attention / RNN hybrids from keyword flags, with Triton kernels",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.0",
        "einops>=0.8.0",
        "einx>=0.3.0",
        "loguru",
        "packaging>=21.0",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "triton": ["triton>=3.6,<3.10"],  # the tested range: CI runs tests/ops on its oldest and newest release
        "test": ["pytest", "hypothesis", "triton>=3.6,<3.10", "matplotlib"],
        "examples": ["tqdm", "matplotlib"],  # kept for upstream users' install commands
        # x_transformers.hf: transformers models, safetensors weights, lm-eval (whose hf model needs accelerate)
        "hf": ["transformers>=5,<6", "safetensors", "lm_eval>=0.4", "accelerate>=0.26"],
    },
    classifiers=[
        "Intended Audience :: Developers",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
    ],
)
