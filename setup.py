"""`pip install .` makes `import pvc` work from the very files the Hub loads with `trust_remote_code=True`."""

from setuptools import setup
from setuptools.command.build_py import build_py

# The repository root is the `pvc` package; these root files are not part of it.
NOT_IN_PACKAGE = {"setup.py"}


class BuildPy(build_py):
    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [module for module in modules if not (package == "pvc" and module[2].endswith(tuple(NOT_IN_PACKAGE)))]


setup(
    name="pvc",
    version="0.1.0",
    description="PVC: Progressive Visual Token Compression for image and video VLMs, for Hugging Face Transformers",
    license="MIT",
    python_requires=">=3.10",
    packages=["pvc", "pvc.conversion", "pvc.training", "pvc.experiments", "pvc.serving", "pvc.evaluation"],
    package_dir={
        "pvc": ".",
        "pvc.conversion": "conversion",
        "pvc.training": "training",
        "pvc.experiments": "experiments",
        "pvc.serving": "serving",
        "pvc.evaluation": "evaluation",
    },
    entry_points={
        "console_scripts": [
            "pvc-convert=pvc.conversion.cli:main",
            "pvc-finetune=pvc.training.finetune:main",
            "pvc-demo=pvc.demo:main",
            "pvc-serve=pvc.serving.cli:main",
        ],
        # `lmms-eval --model pvc` (lmms-eval >= 0.6 finds models through this group)
        "lmms_eval.models": ["pvc=pvc.evaluation:lmms_eval_models"],
    },
    package_data={"pvc": ["demo_model/*"]},  # the demo's trained toy model (its code files are links, copied as files)
    cmdclass={"build_py": BuildPy},
    install_requires=[
        "torch>=2.6",
        "transformers>=5.0,<6",
        "einops>=0.7",
        "safetensors",
        "pillow",
        "numpy",
        "tokenizers",
        "tqdm",
        "huggingface_hub",
    ],
    extras_require={
        "video": ["av>=12"],
        # the torchvision pixel backend (PVC's processors work without it) and transformers' AutoVideoProcessor
        "vision": ["torchvision"],
        "train": ["accelerate>=1.0", "peft>=0.15"],
        "flash": ["flash-attn>=2.6"],
        "convert": ["sentencepiece", "protobuf"],
        "plots": ["matplotlib"],
        # lmms-eval 0.7.3 breaks with filelock >= 4; scripts/setup_lmms_eval.sh makes a working CPU environment
        "eval": ["lmms-eval==0.7.3", "filelock<4"],
        # parameterized: transformers' common test mixins (tests/transformers_suite.py) import it
        "test": [
            "pytest",
            "hypothesis",
            "parameterized",
            "av>=12",
            "accelerate>=1.0",
            "peft>=0.15",
            "sentencepiece",
            "protobuf",
        ],
    },
)
