"""Builds the ``wsshm`` package and its ``wsshm._C`` extension from ``csrc/``.

The C++ (CPU) part is always built. The CUDA kernels in ``csrc/cuda/*.cu`` are added when torch is a
CUDA build and nvcc is found; ``wsshm._C.build_info()`` says which variant was built.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp"))
    # -fno-trapping-math lets GCC turn csrc/augment.cpp's selects into vector blends (nothing here
    # uses FP traps); a flag rather than `#pragma GCC optimize`, which GCC says is for debugging only.
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math"]
    with_cuda = (
        os.environ.get("WSSHM_NO_CUDA", "0") != "1"
        and cpp_extension.CUDA_HOME is not None
        and __import__("torch").version.cuda is not None
    )
    if with_cuda:
        return cpp_extension.CUDAExtension(
            "wsshm._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            define_macros=[("WSSHM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "wsshm._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
    )


setup(
    name="wsshm",
    version="0.1.0",
    description="Weakly semi-supervised human matting with Matte Label Blending",
    python_requires=">=3.10",
    packages=find_packages(include=["wsshm", "wsshm.*"]) + ["wsshm.kernels"],
    package_dir={"wsshm.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    entry_points={
        "console_scripts": [
            "wsshm-shard=wsshm.shards.cli:main",
            "wsshm-eval=wsshm.evaluate:main",
            "wsshm-predict=wsshm.predict:main",
            "wsshm-export=wsshm.export:main",
            "wsshm-pseudo-label=wsshm.pseudo_label:main",
            "wsshm-sweep=wsshm.sweep.cli:main",
        ]
    },
)
