"""setup.py in a build isolated from the installed packages, which sees no torch (pyproject.toml
asks for none): a wheel stops at once with the advice to build against the installed torch; the
metadata and the sdist need no torch."""

import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def setup_without_torch(*args: str) -> subprocess.CompletedProcess:
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', *sys.argv[1:]]; "
            "runpy.run_path('setup.py', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_pyproject_asks_for_no_torch():
    # with torch among the build requirements, isolation installed the newest torch and compiled against
    # it (pip's isolation was caught by its folder name; `python -m build`'s was not)
    requires = next(line for line in (REPO / "pyproject.toml").read_text().splitlines() if line.startswith("requires"))
    assert "torch" not in requires


def test_a_wheel_without_torch_stops_with_the_advice(tmp_path):
    result = setup_without_torch("bdist_wheel", "--dist-dir", str(tmp_path))
    assert result.returncode != 0 and "pip install --no-build-isolation ." in result.stderr
    assert not list(tmp_path.iterdir())


def test_the_sdist_needs_no_torch_and_carries_every_source(tmp_path):
    result = setup_without_torch("egg_info", "--egg-base", str(tmp_path), "sdist", "--dist-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    tracked = subprocess.run(["git", "ls-files", "csrc", "dalle_fast/assets"], cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    if tracked:  # a git checkout (CI's clean clone)
        assert set(tracked) <= names
    assert {"setup.py", "pyproject.toml", "README.md", "requirements.txt"} <= names
