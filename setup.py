"""megatron_sp: Megatron-DeepSpeed-compatible GPT pretraining with sequence parallelism."""
from setuptools import find_packages, setup

setup(
    name="megatron_sp",
    version="0.1.0",
    description="GPT pretraining on very long sequences: Ulysses, ring and hybrid sequence parallelism on DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_sp", "megatron_sp.*"]),
    py_modules=["pretrain_gpt"],
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "triton>=3.0; sys_platform == 'linux'",
        "sentencepiece",
        "tokenizers",
        "numpy",
        "tensorboard",
    ],
    extras_require={
        # Hugging Face import (--load-hf) and export (tools/convert_checkpoint.py); neither pulls torch
        "hf": ["transformers>=4.45,<6", "safetensors>=0.4.3"],
        "test": ["pytest>=7", "transformers>=5,<6", "safetensors>=0.4.3"],
        "flash": ["flash-attn>=2.5"],
    },
)
