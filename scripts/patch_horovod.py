"""Apply hvdtrain's source fixes to an unpacked Horovod 0.28.1 sdist.

Each fix is an exact text replacement that must match exactly once, so a changed
sdist fails loudly here instead of producing a half-patched build.
Run: python scripts/patch_horovod.py SDIST_DIR
"""
import sys
from pathlib import Path

HOROVOD_VERSION = "0.28.1"

# (file, original text, replacement, why)
FIXES = [
    ("CMakeLists.txt",
     "set(CMAKE_CXX_STANDARD 14)",
     "set(CMAKE_CXX_STANDARD 17)",
     "PyTorch >= 2.1 headers need C++17"),
    ("horovod/torch/CMakeLists.txt",
     "    set(CMAKE_CXX_STANDARD 14)",
     "    set(CMAKE_CXX_STANDARD 17)",
     "PyTorch >= 2.1 headers need C++17"),
    ("third_party/gloo/CMakeLists.txt",
     '-std=c++11 -fPIC',
     '-std=c++17 -fPIC',
     "gloo built as C++11 beside C++17 code gives duplicate Store::kDefaultTimeout"),
    ("third_party/gloo/CMakeLists.txt",
     "cmake_minimum_required(VERSION 2.8.12 FATAL_ERROR)",
     "cmake_minimum_required(VERSION 3.5 FATAL_ERROR)",
     "CMake 4 rejects minimum versions below 3.5"),
    ("CMakeLists.txt",
     "    set(CMAKE_POLICY_DEFAULT_CMP0074 NEW)\n    add_subdirectory(third_party/gloo)\n",
     "    set(CMAKE_POLICY_DEFAULT_CMP0074 NEW)\n"
     "    if(\"${HOROVOD_BUILD_ARCH_FLAGS}\" MATCHES \"-mavx\" AND \"${HOROVOD_BUILD_ARCH_FLAGS}\" MATCHES \"-mf16c\")\n"
     "        set(USE_AVX ON)\n"
     "        add_definitions(-DGLOO_USE_AVX=1)\n"
     "    endif()\n"
     "    add_subdirectory(third_party/gloo)\n",
     "gloo's float16 sum converted every element in software (an fp16 allreduce over Gloo took 3x its "
     "float32 time): the bundled gloo was configured without USE_AVX, and Horovod's own sources, which "
     "include gloo/math.h without gloo/config.h, instantiated the generic sum instead of linking gloo's F16C "
     "one. Both now see GLOO_USE_AVX where Horovod itself is built with -mavx -mf16c"),
    ("third_party/gloo/gloo/CMakeLists.txt",
     '  "${CMAKE_CURRENT_SOURCE_DIR}/types.cc"\n',
     '  "${CMAKE_CURRENT_SOURCE_DIR}/types.cc"\n  "${CMAKE_CURRENT_SOURCE_DIR}/math.cc"\n',
     "the F16C float16 sum lives in gloo/math.cc, which the bundled gloo's source list left out"),
    ("horovod/tensorflow/CMakeLists.txt",
     'list(APPEND TF_SOURCES "${PROJECT_SOURCE_DIR}/horovod/tensorflow/xla_mpi_ops.cc")\n',
     "",
     "optional XLA ops do not compile against TensorFlow 2.21 (highwayhash headers missing)"),
    ("horovod/common/gloo/gloo_controller.cc",
     "  global_ranks_.reserve(size_);\n",
     "  global_ranks_.resize(size_);\n",
     "the gloo controller left its rank list empty (reserve, not resize), so the stall inspector never "
     "named a missing rank nor shut a stalled job down"),
    ("horovod/common/util.py",
     "            # Suppress output\n"
     "            sys.stdout = open(os.devnull, 'w')\n",
     "            # Suppress output, the native libraries' too: TensorFlow logs to file descriptor 2 as it loads\n"
     "            devnull = os.open(os.devnull, os.O_WRONLY)\n"
     "            os.dup2(devnull, 1)\n"
     "            os.dup2(devnull, 2)\n"
     "            sys.stdout = open(os.devnull, 'w')\n",
     "horovodrun probes each framework in a forked process with Python's output muted, but TensorFlow's "
     "C++ start-up messages (CUDA drivers, CPU features) still reached every job's log, PyTorch jobs' too"),
]


def main(sdist_dir: str) -> int:
    root = Path(sdist_dir)
    version_file = root / "horovod" / "__init__.py"
    if f"__version__ = '{HOROVOD_VERSION}'" not in version_file.read_text():
        print(f"patch_horovod: {version_file} is not Horovod {HOROVOD_VERSION}", file=sys.stderr)
        return 1
    for rel, old, new, why in FIXES:
        path = root / rel
        text = path.read_text()
        count = text.count(old)
        if count != 1:
            print(f"patch_horovod: {rel}: expected 1 match of {old.strip()!r}, found {count}; "
                  "the sdist changed, review the fixes", file=sys.stderr)
            return 1
        path.write_text(text.replace(old, new))
        print(f"patched {rel}: {why}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: patch_horovod.py SDIST_DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
