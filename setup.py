"""Build of fused_mtl_attn. Install with `pip install --no-build-isolation -e .` after requirements.txt."""
from setuptools import find_packages, setup

setup(
    name="fused_mtl_attn",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for the cross-task and cross-scale attention of SCA-MTL",
    packages=find_packages(include=["fused_mtl_attn", "fused_mtl_attn.*", "model", "model.*"]),
    package_data={"model": ["configs/*.yaml", "db_info/*.json"]},
    python_requires=">=3.10",
)
