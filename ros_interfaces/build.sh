#!/usr/bin/env bash
# Build the ROS 2 interface packages of ros_interfaces/ (tf2_msgs, vision_msgs: test-only
# partial builds, see README.md there) against the ROS 2 Kilted wheels of requirements-ros.txt
# and install them into the venv itself, beside those wheels:
#   ros_interfaces/build.sh [VENV]        (default .venv; `make ros` calls it)
# Libraries go to VENV/lib, Python packages to VENV's site-packages, share/ to VENV/share,
# so `VENV/bin/python -c "from tf2_msgs.msg import TFMessage"` works with nothing sourced.
# Build trees live in VENV/.ros_build (ignored). Idempotent: a rerun only re-installs.
# Needs cmake, a C/C++ compiler and Python.h (Debian: apt-get install cmake g++ python3-dev).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
venv="$(cd "${1:-$here/../.venv}" && pwd)"
py="$venv/bin/python"
build="$venv/.ros_build"
packages=(tf2_msgs vision_msgs)

# 1. The wheels' exported CMake targets <pkg>__rosidl_generator_py name the include folders
#    of the machine that built the wheels (/opt/python/cp311-cp311/...); CMake refuses an
#    imported target whose include folder does not exist. Point them at this venv's Python.h
#    and numpy headers. Rewrites only files under VENV/share; idempotent.
"$py" - "$venv" <<'PY'
import pathlib, re, sys, sysconfig
import numpy
venv = pathlib.Path(sys.argv[1])
inc = f'INTERFACE_INCLUDE_DIRECTORIES "{sysconfig.get_paths()["include"]};{numpy.get_include()}"'
pattern = re.compile(r'INTERFACE_INCLUDE_DIRECTORIES "[^"]*"')
changed = 0
for f in sorted((venv / "share").glob("*/cmake/export_*__rosidl_generator_pyExport.cmake")):
    text = f.read_text()
    new = pattern.sub(lambda m: inc, text)
    if new != text:
        f.write_text(new)
        changed += 1
print(f"ros_interfaces: include folders of {changed} rosidl_generator_py export file(s) "
      f"pointed at this Python" if changed else "ros_interfaces: export files already patched")
PY

# 2. Configure, build and install each package into the venv prefix.
jobs="$(nproc 2>/dev/null || echo 2)"
for pkg in "${packages[@]}"; do
    cmake -S "$here/$pkg" -B "$build/$pkg" \
        -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_INSTALL_PREFIX="$venv" \
        -DCMAKE_PREFIX_PATH="$venv" \
        -DPython3_EXECUTABLE="$py" \
        -DPython3_FIND_VIRTUALENV=ONLY \
        -DBUILD_TESTING=OFF \
        --log-level=WARNING >/dev/null
    cmake --build "$build/$pkg" -j "$jobs" -- --no-print-directory >/dev/null
    cmake --install "$build/$pkg" >/dev/null
    echo "ros_interfaces: $pkg installed into $venv (${SECONDS}s)"
done

# 3. Smoke test: the generated Python classes import, and the installed type descriptions carry
#    the official type hashes (RIHS01, as in the upstream tf2_msgs and vision_msgs 4.1.1).
"$py" - "$venv" <<'PY'
import json, pathlib, sys
from tf2_msgs.msg import TFMessage  # noqa: F401
from vision_msgs.msg import LabelInfo, VisionClass  # noqa: F401
share = pathlib.Path(sys.argv[1]) / "share"
official = {
    "tf2_msgs/msg/TFMessage": "RIHS01_e369d0f05a23ae52508854b66f6aa0437f3449d652e8cbf22d5abe85d020f087",
    "vision_msgs/msg/VisionClass": "RIHS01_1e4a11f0fed50b5623cb8ff26ca0e37952a48a9c074d16f804b44e9164c2037a",
    "vision_msgs/msg/LabelInfo": "RIHS01_3d37df4015cdf660cc851c51897f2acd957e1ca6205ba0a99aebffb9406b0783",
}
for name, want in official.items():
    pkg, _, msg = name.split("/")
    hashes = json.loads((share / pkg / "msg" / f"{msg}.json").read_text())["type_hashes"]
    got = next(h["hash_string"] for h in hashes if h["type_name"] == name)
    if got != want:
        raise SystemExit(f"ros_interfaces: {name} type hash {got} != official {want}")
print("ros_interfaces: TFMessage, VisionClass, LabelInfo import; type hashes match upstream")
PY
