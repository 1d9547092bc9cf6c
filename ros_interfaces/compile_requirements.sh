#!/usr/bin/env bash
# Regenerate ../requirements-ros.txt from requirements-ros.in: exact pins with the sha256 of the
# files this machine installs (CPython 3.11, manylinux x86_64, pure-Python wheels, the empy
# sdist), every transitive dependency included, non-ROS pins held to ../requirements.txt.
# Uses pip-tools in a throw-away venv (pip-tools is not a project dependency). ~1-2 minutes.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$root"
"${PYTHON:-python3}" -m venv "$work/tools"
"$work/tools/bin/pip" install -q pip-tools
"$work/tools/bin/pip-compile" -q --no-header --strip-extras --generate-hashes --annotation-style=line \
    --no-emit-index-url --no-emit-find-links -c requirements.txt \
    -o "$work/all-hashes.txt" ros_interfaces/requirements-ros.in
"$work/tools/bin/pip" download -q --no-deps --require-hashes -r "$work/all-hashes.txt" \
    -d "$work/files"
"$work/tools/bin/python" - "$work/all-hashes.txt" "$work/files" > "$work/body.txt" <<'PY'
# Keep, for each pin, only the hashes of the files pip downloaded for this platform.
import hashlib, pathlib, re, sys
have = {hashlib.sha256(p.read_bytes()).hexdigest() for p in pathlib.Path(sys.argv[2]).iterdir()}
out, kept = [], set()
for line in pathlib.Path(sys.argv[1]).read_text().splitlines():
    m = re.match(r"\s+--hash=sha256:([0-9a-f]{64})", line)
    if m:
        if m.group(1) in have:
            out.append(f"    --hash=sha256:{m.group(1)} \\")
            kept.add(m.group(1))
        continue
    if line.startswith("    #") and out and out[-1].endswith(" \\"):
        out[-1] = out[-1][:-2]
    out.append(line)
assert kept == have, "a downloaded file has no pinned hash"
print("\n".join(out))
PY
cat > requirements-ros.txt <<'HDR'
# ROS 2 Kilted layer of the project venv, installed by `make ros` (and so by `make test`):
# rclpy over Fast DDS (rmw_fastrtps_cpp), the message packages the tests import, and the
# rosidl/ament build tools that ros_interfaces/build.sh needs to build tf2_msgs and
# vision_msgs (not on PyPI). From PyPI's ros-* wheels; no ROS install or sourcing needed.
#
# Why exact pins WITH HASHES (pip --require-hashes): the ros-* wheels carry no author or
# project-URL metadata, so the install is pinned to the very files that were checked here,
# and hash-checking mode makes pip list every transitive dependency too. Hashes cover the
# CPython 3.11 manylinux x86_64 wheels, pure-Python wheels and the empy sdist only.
# Non-ROS pins agree with requirements.txt (compiled with -c requirements.txt).
# setuptools (wanted by ros-ament-index-python, ros-rosidl-pycommon) stays unpinned: the
# venv's own copy satisfies it.
# Regenerate with ros_interfaces/compile_requirements.sh (inputs: ros_interfaces/requirements-ros.in).
HDR
cat "$work/body.txt" >> requirements-ros.txt
echo "wrote $root/requirements-ros.txt"
