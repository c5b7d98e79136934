"""The wheel installs only project-specific top-level names, carries the one version, and its console scripts
point into the `mokd` package."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import mokd

ROOT = Path(__file__).resolve().parents[2]
EXPECTED_TOP_LEVEL = {"mokd", "mokd_eval", "mokd_train", "mokd_analysis"}

pytestmark = pytest.mark.slow  # builds a wheel (setuptools from the package index) and starts interpreters


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    leftovers = [ROOT / "build", ROOT / "mokd.egg-info"]
    existed = {path for path in leftovers if path.exists()}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT)],
                   check=True, cwd=out)
    for path in set(leftovers) - existed:  # setuptools builds inside the source tree: leave the checkout as it was
        shutil.rmtree(path, ignore_errors=True)
    (found,) = out.glob("mokd-*.whl")
    return found


def _archive_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_wheel_installs_no_generic_top_level_name(wheel: Path) -> None:
    top_level = {name.split("/")[0] for name in _archive_names(wheel)}
    assert {name for name in top_level if not name.endswith(".dist-info")} == EXPECTED_TOP_LEVEL
    assert "cli.py" not in top_level and "analysis" not in top_level


def test_wheel_holds_every_module_of_the_tree(wheel: Path) -> None:
    """The package list in pyproject.toml is explicit (analysis/ installs under another name): a new subpackage
    that is not listed would be missing from every installation."""
    installed = {name for name in _archive_names(wheel) if name.endswith(".py")}
    for folder, package in (("mokd", "mokd"), ("mokd_eval", "mokd_eval"), ("mokd_train", "mokd_train"),
                            ("analysis", "mokd_analysis")):
        for path in (ROOT / folder).rglob("*.py"):
            assert f"{package}/{path.relative_to(ROOT / folder).as_posix()}" in installed, path


def test_wheel_version_and_scripts_come_from_the_package(wheel: Path) -> None:
    assert wheel.name.startswith(f"mokd-{mokd.__version__}-")
    with zipfile.ZipFile(wheel) as archive:
        entry_points = next(name for name in archive.namelist() if name.endswith("entry_points.txt"))
        parser = configparser.ConfigParser()
        parser.read_string(archive.read(entry_points).decode())
        metadata = archive.read(entry_points.replace("entry_points.txt", "METADATA")).decode()
    assert dict(parser["console_scripts"]) == {"mokd-eval": "mokd.cli:mokd_eval", "mokd-train": "mokd.cli:mokd_train"}
    assert "License-Expression: MIT" in metadata.splitlines()


def test_the_installed_wheel_imports_from_site_packages(wheel: Path, tmp_path: Path) -> None:
    """A fresh venv holding only the wheel, with this environment's third-party packages reachable through a
    .pth file, so that nothing of the checkout can be imported by accident."""
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    (site / "third_party.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = {path.name for path in site.iterdir() if not path.name.endswith((".dist-info", ".pth"))}
    assert installed - {"__pycache__"} == EXPECTED_TOP_LEVEL
    probe = ("import mokd, mokd.cli, mokd_eval, mokd_train, mokd_analysis.report; "
             "print(mokd.__version__); print(mokd.__file__)")
    done = subprocess.run([str(python), "-I", "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    shown = done.stdout.split()
    assert shown[0] == mokd.__version__
    assert Path(shown[1]).is_relative_to(site)
