"""Build script: maps the repository's top-level folders into the one namespace ``livelm``."""

from setuptools import find_packages, setup

# folder in the repository -> package name under livelm
PACKAGE_ROOTS = {
    "livelm": "livelm",
    "livelm.daemon": "daemon",
    "livelm.protocol": "protocol",
    "livelm.native": "native",
    "livelm.client": "clients/python",
}


def _packages() -> list[str]:
    found = []
    for name, folder in PACKAGE_ROOTS.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(folder)]
    return found


setup(
    name="livelm",
    version="0.1.0",
    description="Stateful inference daemon for streaming data and agents",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir=PACKAGE_ROOTS,
    package_data={"livelm.native": ["ring.h", "ring.c"]},
    cffi_modules=["native/build_ring.py:ffibuilder"],
    setup_requires=["cffi>=1.15"],
    install_requires=[
        "torch>=2.4",
        "uvloop>=0.19",
        "msgspec>=0.18",
        "aiohttp>=3.9",
        "websockets>=12",
        "cffi>=1.15",
        "pyyaml>=6",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "jinja2>=3.1",
        "numpy>=1.24",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2",
            "hypothesis>=6",
            "ruff>=0.4",
            "transformers>=4.45",
            "openai>=1.40",
            "anthropic>=0.34",
            "requests>=2.31",
            # Triton's interpreter runs our GPU kernels' tests on the CPU
            'triton>=3.0; platform_system == "Linux" and platform_machine == "x86_64"',
        ],
        "flash": ["flash-attn"],
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["livelm=livelm.daemon.cli:main"]},
)
