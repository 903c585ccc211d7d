from pathlib import Path

from setuptools import find_packages, setup


def read_requirements(name):
    lines = Path(__file__).parent.joinpath("requirements", name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


setup(
    name="sepllm-neox",
    version="0.1.0",
    description="GPT-NeoX-style distributed LLM pretraining with SepLLM Sep-Attention",
    packages=find_packages(include=["megatron", "megatron.*"]),
    package_data={"megatron.evaluation": ["tasks/*.yaml"]},  # the local lm-eval tasks
    python_requires=">=3.10",
    install_requires=read_requirements("base.txt"),
    extras_require={
        "dev": read_requirements("dev.txt"),
        "flash": read_requirements("flash.txt"),
        "tensorboard": ["tensorboard>=2.14"],
    },
)
