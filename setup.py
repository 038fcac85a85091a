"""fused_margin: the Python package (the C++/CUDA extension is added by the extension build)."""
from setuptools import find_packages, setup

setup(
    name="fused_margin",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for margin-based softmax cross-entropy losses",
    packages=find_packages(include=["fused_margin", "fused_margin.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
)
