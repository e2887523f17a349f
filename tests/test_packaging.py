"""Packaging: the kernel library imports with torch alone; the model, CLIs and benchmark needs
are extras; the wheel holds no top-level "benchmarks" package; one version number."""

import email
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRAS_ONLY = ("rich", "matplotlib", "PIL", "tokenizers", "safetensors")

_BLOCK = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked for the test: {{name}}")
        return None
sys.meta_path.insert(0, Block())
"""


def test_the_kernel_library_needs_only_torch(tmp_path):
    code = _BLOCK.format(blocked=EXTRAS_ONLY) + """
import torch
import flashsloth_kernels as fk
from flashsloth_kernels import SpatialAttentionPool
pool = SpatialAttentionPool(8, window=3)
out = pool(torch.randn(2, 36, 8))
assert out.shape == (2, 4, 8), out.shape
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("ok", fk.__version__)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]


def _pyproject():
    try:
        import tomllib
    except ImportError:                      # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)


def test_dependencies_and_extras():
    project = _pyproject()["project"]
    assert [d.split(">")[0].split("=")[0] for d in project["dependencies"]] == ["torch"]
    extras = project["optional-dependencies"]
    assert {"model", "bench", "test", "all"} <= set(extras)
    text = " ".join(extras["model"])
    for dep in ("safetensors", "pillow", "tokenizers"):
        assert dep in text
    assert "rich" in " ".join(extras["bench"]) and "matplotlib" in " ".join(extras["bench"])
    assert "version" in project["dynamic"] and "version" not in project
    install = open(os.path.join(ROOT, "scripts", "install.sh")).read()
    assert '-e ".[all]"' in install


def test_the_wheel_has_no_top_level_benchmarks_and_one_version(tmp_path):
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build", "results")
    os.makedirs(src)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for name in ("flashsloth_kernels", "flashsloth", "benchmarks", "csrc"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=ignore)
    env = {**os.environ, "FLASHSLOTH_SKIP_CPP_BUILD": "1", "PIP_NO_INDEX": "1"}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = os.listdir(tmp_path / "dist")
    with zipfile.ZipFile(tmp_path / "dist" / wheel) as zf:
        names = zf.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(zf.read(meta_name))
        entry = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    tops = {n.split("/")[0] for n in names}
    assert "benchmarks" not in tops, sorted(tops)
    assert {"flashsloth", "flashsloth_kernels"} <= tops
    assert "flashsloth/_bench.py" in names
    assert "flashsloth-bench = flashsloth._bench:main" in entry
    import flashsloth_kernels

    assert meta["Version"] == flashsloth_kernels.__version__
    core = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    assert [r.split(">")[0] for r in core] == ["torch"], core
