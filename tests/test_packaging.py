"""The built wheel: it ships the grammar and every module, and its parser core runs in a bare
virtual environment that holds only the wheel, lark (with interegular, for strict mode), numpy
and scipy: no TensorFlow, no Keras.

Everything here works offline: the wheel is built without build isolation (setuptools comes
with the dev extra) and the bare environment borrows those four from this one
through a .pth file instead of downloading them.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORE_DEPENDENCIES = ("lark", "interegular", "numpy", "scipy")


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command; on failure, fail the test with its output."""
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {done.returncode}\n"
                    f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a clean copy: setuptools reuses build/lib, so a module deleted from the work
    # tree could otherwise linger in the wheel.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("keras_decomp", "grammar"):
        shutil.copytree(REPO / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)])
    (built,) = out.glob("keras_decomp-0.1.0-*.whl")
    return built


def borrow(distribution: str, into: Path) -> None:
    """Symlink the top-level files of an installed distribution (package, .libs, .dist-info)."""
    dist = importlib.metadata.distribution(distribution)
    tops = {Path(str(f)).parts[0] for f in dist.files or ()}
    for top in tops - {".."}:
        source = Path(dist.locate_file(top))
        if source.exists() and not (into / top).exists():
            (into / top).symlink_to(source)


@pytest.fixture(scope="module")
def bare_python(wheel, tmp_path_factory) -> Path:
    """The interpreter of a fresh venv (no system site-packages) with the wheel installed."""
    env = tmp_path_factory.mktemp("bare") / "venv"
    venv.EnvBuilder(system_site_packages=False, with_pip=False, symlinks=True).create(env)
    python = env / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install",
         "--no-deps", "--no-index", "--quiet", str(wheel)])
    core = tmp_path_factory.mktemp("core")
    for name in CORE_DEPENDENCIES:
        borrow(name, core)
    site = run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    (Path(site.stdout.strip()) / "core_dependencies.pth").write_text(f"{core}\n")
    return python


def test_wheel_ships_the_grammar_and_every_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "keras_decomp/grammar/decomp.lark" in names
    modules = {p.relative_to(REPO).as_posix()
               for p in (REPO / "keras_decomp").rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(modules - names)
    assert not missing, (f"not in the wheel: {missing}; "
                         "add new subpackages to [tool.setuptools] packages in pyproject.toml")


def test_wheel_declares_the_console_script(wheel):
    with zipfile.ZipFile(wheel) as zf:
        (entry_points,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = zf.read(entry_points).decode()
    assert "keras-decomp = keras_decomp.cli:main" in text


def test_installed_wheel_finds_the_grammar_by_importlib_resources(bare_python, tmp_path):
    code = ("import importlib.resources as r, keras_decomp.grammar as g; "
            "print((r.files('keras_decomp.grammar') / 'decomp.lark').is_file()); print(g.__file__)")
    # -I and a neutral cwd: the work tree must not shadow the installed package.
    done = run([str(bare_python), "-I", "-c", code], cwd=tmp_path)
    found, location = done.stdout.split()
    assert found == "True"
    assert Path(location).is_relative_to(bare_python.parent.parent)


def test_parser_core_runs_without_tensorflow(bare_python, tmp_path):
    code = ("from keras_decomp.language.parse import parse; d = parse('W = sum(G, n=8)', 16, 8); "
            "print(d.shape)")
    done = run([str(bare_python), "-I", "-c", code], cwd=tmp_path)
    assert done.stdout.strip() == "(16, 8)"
