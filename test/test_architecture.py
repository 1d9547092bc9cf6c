"""The layering the package promises: the core never imports ROS, the node holds no torch."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROS_MODULES = {"rclpy", "rosbags", "sensor_msgs", "std_msgs", "geometry_msgs", "tf2_ros",
               "tf2_msgs", "message_filters", "cv_bridge", "sensor_msgs_py", "builtin_interfaces",
               "diagnostic_msgs", "launch", "launch_ros", "clip2scene_ros", "training"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "clip2scene_core").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_core_has_no_ros_import(path):
    assert not (_imports(path) & ROS_MODULES), f"{path} imports {_imports(path) & ROS_MODULES}"


@pytest.mark.parametrize("name", ["node.py", "pipeline.py", "runner.py", "output_schema.py", "sync.py",
                                  "diagnostics.py", "label_info.py", "rviz_config.py", "frames.py", "topics.py",
                                  "typestore.py",
                                  "node_config.py", "pointcloud2.py", "image.py", "tf.py", "msgs.py"])
def test_ros_glue_has_no_torch(name):
    assert "torch" not in _imports(ROOT / "clip2scene_ros" / name)


def test_only_the_node_imports_rclpy():
    users = {p.name for p in (ROOT / "clip2scene_ros").glob("*.py") if "rclpy" in _imports(p)}
    assert users <= {"node.py"}, users


def test_package_xml_lists_what_the_node_imports():
    """package.xml's ROS dependencies are exactly the ROS packages the code imports."""
    import re
    import xml.etree.ElementTree as ET

    depends = {e.text for e in ET.parse(ROOT / "package.xml").getroot()
               if e.tag == "exec_depend" and not e.text.startswith("python3-")}
    node_src = (ROOT / "clip2scene_ros" / "node.py").read_text()
    imported = {name for name in _imports(ROOT / "clip2scene_ros" / "node.py")
                if name not in sys.stdlib_module_names and name not in ("clip2scene_core", "clip2scene_ros")}
    optional = {m.split(".")[0] for m in re.findall(r'optional_module\("([\w.]+)"\)', node_src)}
    launch = _imports(ROOT / "launch" / "segment.launch.py") & {"launch", "launch_ros"}
    # rclpy.lifecycle needs lifecycle_msgs; builtin_interfaces carries the stamps; messages
    # built by name through MessageFactory (TransformStamped) need geometry_msgs; the Python
    # module tf2_ros comes from the tf2_ros_py package; RViz is started by the launch file
    expected = (imported | optional | launch | {"lifecycle_msgs", "builtin_interfaces",
                                                "geometry_msgs", "rviz2"})
    expected = {"tf2_ros_py" if name == "tf2_ros" else name for name in expected}
    assert depends == expected


# ---------------------------------------------------------------- packaging and imports
SOURCES = sorted(p for d in ("clip2scene_core", "clip2scene_ros", "training", "test", "benchmarks", "launch")
                 for p in (ROOT / d).rglob("*.py")) + [ROOT / "setup.py"]


def _console_scripts() -> dict[str, str]:
    """``name → module:function`` of setup.py's console_scripts."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    entry = next(k.value for k in ast.walk(tree) if isinstance(k, ast.keyword) and k.arg == "entry_points")
    lines = ast.literal_eval(entry)["console_scripts"]
    return {name.strip(): target.strip() for name, target in (line.split("=") for line in lines)}


def test_nothing_edits_sys_path():
    """Code imports through the installed package (``pip install -e .``), never by editing sys.path."""
    offenders = [f"{p.relative_to(ROOT)}:{node.lineno}" for p in SOURCES
                 for node in ast.walk(ast.parse(p.read_text(), filename=str(p)))
                 if isinstance(node, ast.Attribute) and node.attr == "path"
                 and isinstance(node.value, ast.Name) and node.value.id == "sys"]
    assert not offenders, offenders


def test_the_ros_package_never_imports_training():
    users = [str(p.relative_to(ROOT)) for p in (ROOT / "clip2scene_ros").rglob("*.py") if "training" in _imports(p)]
    assert not users, users


def test_every_console_script_names_a_function_of_an_installed_package():
    import importlib.metadata
    import importlib.util

    scripts = _console_scripts()
    assert {"clip2scene-replay", "clip2scene-segment", "clip2scene-pretrain", "clip2scene-finetune",
            "clip2scene-evaluate", "clip2scene-nuscenes-to-bag", "clip2scene-semantickitti-to-bag",
            "clip2scene-demo"} <= set(scripts)
    for name, target in scripts.items():
        module, function = target.split(":")
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, f"{name}: no module {module}"
        defined = {n.name for n in ast.parse(Path(spec.origin).read_text()).body if isinstance(n, ast.FunctionDef)}
        assert function in defined, f"{name}: {module} has no function {function}"
    dist = importlib.metadata.distribution("clip2scene_ros")
    installed = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}
    assert installed == scripts, "the installed package is stale: make venv (pip install -e .)"
    # the demo and the converters import training: it is installed with the rest
    assert set(dist.read_text("top_level.txt").split()) == {"clip2scene_core", "clip2scene_ros", "training"}


# ---------------------------------------------------------------- module graph and size
PACKAGES = ("clip2scene_core", "clip2scene_ros", "training")
LONG_MODULE = 420          # "~400 lines": longer modules say why at their top
LONG_REASON = "Over ~400 lines:"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Our module → our modules it imports anywhere in its body (lazy imports count: a cycle
    through a function-level import is still two modules that cannot be understood apart)."""
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                deps.update(filter(None, (owner(a.name) for a in node.names)))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    target = owner(f"{base}.{a.name}") if f"{base}.{a.name}" in modules else owner(base)
                    if target:
                        deps.add(target)
        deps.discard(name)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert _cycles(_import_graph()) == []


def test_layers_point_down():
    """training → clip2scene_ros → clip2scene_core, never upwards (lazy imports included)."""
    rank = {"clip2scene_core": 0, "clip2scene_ros": 1, "training": 2}
    upward = [(m, d) for m, deps in _import_graph().items() for d in deps
              if rank[d.split(".")[0]] > rank[m.split(".")[0]]]
    assert not upward, upward


@pytest.mark.parametrize("path", sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_long_modules_say_why(path):
    lines = path.read_text().splitlines()
    if len(lines) > LONG_MODULE:
        doc = ast.get_docstring(ast.parse("\n".join(lines))) or ""
        assert LONG_REASON in " ".join(doc.split()[:80]), \
            f"{path.name}: {len(lines)} lines; its docstring must start with why ({LONG_REASON!r} …)"


def test_ruff_is_clean():
    """The pinned linter (requirements-dev.txt, ruff.toml) passes on the whole tree."""
    import shutil
    import subprocess

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (make venv installs it)")
    run = subprocess.run([ruff, "check", "--no-cache", "--output-format", "concise", "."], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-1000:]


@pytest.mark.parametrize("module", ["clip2scene_ros.replay", "clip2scene_ros.node", "clip2scene_core.cli",
                                    "training.demo"])
def test_entry_points_load_torch_only_after_their_preamble(module):
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it: an entry point whose import pulled
    torch in would set the passive policy too late and spin a shared core (issue 10)."""
    import subprocess

    code = f"import sys, {module}; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "False", f"importing {module} loads torch"
