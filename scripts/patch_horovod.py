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
