"""The one install requirement that depends on a choice: the CPU or the GPU builds of the engines.

Everything else is in setup.cfg. By default stacker installs the CPU builds (``tensorflow-cpu``
on x86-64 and ``onnxruntime``): smaller, and all a laptop can use. ``STACKER_GPU=1 pip install
-e .`` requires the CUDA builds instead (``tensorflow[and-cuda]``, which brings CUDA and cuDNN as
wheels, and ``onnxruntime-gpu``) on Linux x86-64, so that the installed metadata says what is
installed. The two builds of each engine are one Python package under two names and must not
be installed side by side: in an environment that has the CPU builds, uninstall them first
(README, "GPUs").
"""

import os

from setuptools import setup

GPU = os.environ.get("STACKER_GPU", "").strip().lower() not in ("", "0", "false", "no")
LINUX_X86 = 'platform_system == "Linux" and platform_machine == "x86_64"'
OTHER = 'platform_system != "Linux" or platform_machine != "x86_64"'

if GPU:
    ENGINES = [f"tensorflow[and-cuda]>=2.16; {LINUX_X86}", f"onnxruntime-gpu>=1.17; {LINUX_X86}",
               f"tensorflow>=2.16; {OTHER}", f"onnxruntime>=1.17; {OTHER}"]
else:
    ENGINES = ['tensorflow-cpu>=2.16; platform_machine == "x86_64"', 'tensorflow>=2.16; platform_machine != "x86_64"',
               "onnxruntime>=1.17"]

setup(install_requires=ENGINES + [
    "keras>=3.14", "numpy>=1.26", "scikit-learn>=1.9", "h5py>=3.10", "joblib>=1.3", "skops>=0.13",
    "jsonschema>=4", "pillow>=10", "filelock>=3.12", "matplotlib>=3.7", "tf2onnx>=1.16", "fsspec>=2024.2",
])
