"""Build prg_fast: the C++ CPU kernels always, the CUDA kernels when a CUDA toolkit and a CUDA
build of torch are present (no GPU is needed to compile).

    pip install --no-build-isolation -e .

Environment knobs:
    PRG_FAST_CUDA=0|1        force the CUDA extension off / on (default: on when it can build)
    TORCH_CUDA_ARCH_LIST     CUDA architectures (default here "8.0;9.0": A100, H100/H200)
    CUDA_HOME                the toolkit root (the folder whose lib64/ holds libcudart.so)
"""
import glob
import json
import os

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
# No -std flag: torch.utils.cpp_extension adds the standard its own headers need (C++17 for older
# torch, C++20 from about 2.10 on; torch 2.14's headers do not compile as C++17).
# -ffp-contract=off: no fused multiply-add of the compiler's choosing in the CPU kernels. Where it
# contracts depends on the ISA clone (AVX-512 has FMA, AVX2's target does not) and on the loop (it may
# fuse either product of c0 t0 + c1 t1, or not in a remainder loop): the same sum then rounded
# differently in stage_combine and stage_combine_rows, and on different CPUs. Without it every
# product and every sum rounds once, in order, as the reference's PyTorch ops do (~6% of a 4-term
# float32 call at 2^20 elements on one thread).
CXX_FLAGS = ["-O3", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]


def cuda_build_decision():
    """(build_cuda, reason) -- the reason is shown by prg_fast.info() when CUDA is not built."""
    wanted = os.environ.get("PRG_FAST_CUDA")
    if wanted == "0":
        return False, "disabled by PRG_FAST_CUDA=0 at build time"
    if torch.version.cuda is None:
        why = f"not built with CUDA: torch {torch.__version__} is a CPU-only build"
    elif cpp_extension.CUDA_HOME is None:
        why = "not built with CUDA: no CUDA toolkit found (set CUDA_HOME)"
    else:
        return True, ""
    if wanted == "1":
        raise RuntimeError(f"PRG_FAST_CUDA=1 but the CUDA extension cannot be built: {why}")
    return False, why


def nvidia_header_dirs():
    """pip's nvidia-* packages ship CUDA library headers (cuBLAS, cuSPARSE, ...) that torch's
    headers include; a bare toolkit install may lack them."""
    import site

    dirs = []
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
    return dirs


def extensions():
    ext_modules = [
        cpp_extension.CppExtension(
            "prg_fast._C",
            sources=["csrc/prg_fast.cpp", "csrc/autograd.cpp", "csrc/python_calls.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp")),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": CXX_FLAGS},
        )
    ]
    build_cuda, reason = cuda_build_decision()
    arch_list = ""
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        ext_modules.append(
            cpp_extension.CUDAExtension(
                "prg_fast._C_cuda",
                sources=sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp")),
                include_dirs=[os.path.join(ROOT, "csrc")] + nvidia_header_dirs(),
                extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            )
        )
    print(f"prg_fast: CPU kernels: yes; CUDA kernels: {'yes, arch ' + arch_list if build_cuda else reason}")
    info = {
        "torch": torch.__version__,
        "cuda_built": build_cuda,
        "cuda_arch_list": arch_list,
        "cuda_reason": reason,
    }
    with open(os.path.join(ROOT, "prg_fast", "_build_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    return ext_modules


setup(
    name="prg_fast",
    version="0.1.0",
    description="Reverse pretrained flow / diffusion-ODE models with fused kernels and an exact, "
    "memory-flat discrete adjoint; PRG (arXiv 2412.01787) on top.",
    packages=find_packages(include=["prg_fast", "prg_fast.*"]),
    package_data={"prg_fast": ["_build_info.json"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    # the floor: torch.library.register_vmap (the operators' vmap rules, prg_fast/kernels/op_rules.py)
    # is new in torch 2.5 (2.4 fails at import; 2.5.1 is the release tested). The Triton kernels need
    # 2.6 (torch.library.triton_op).
    # .ci/run tests the floor, 2.11 and the newest release (.ci/torch_leg.sh) and checks that
    # pyproject.toml's build requirement says the same.
    install_requires=["torch>=2.5.1", "numpy", "einops", "scipy", "scikit-learn", "pillow", "tqdm"],
    extras_require={
        "test": ["pytest", "torchdiffeq", "matplotlib"],
        "triton": ["triton"],
        # networks from other libraries, tested as their users call them (python_tests/test_third_party_models.py).
        # torchdyn and torchcfm are left out: they require torchvision, whose PyPI wheel replaces a CPU torch
        # with a CUDA build; .ci/run installs them with --no-deps (see there)
        "thirdparty": ["diffusers", "peft", "torchode"],
        # prg_fast.from_diffusers: diffusers' models and schedulers (prg_fast.diffusion itself needs only torch)
        "diffusion": ["diffusers"],
    },
    entry_points={"console_scripts": ["prg-fast=prg_fast.cli:main"]},
)
