"""The wheel is complete: built from a copy of the source, installed into a fresh environment, run
from outside the source tree (issue 9: a wheel without recipes said `recipe 'tiny' is neither a file nor
a shipped recipe ()` while the editable install of `make test` hid it).

The fresh environment gets the wheel with `--no-deps`; it sees this venv's third-party packages through
a `.pth` line, which does not run this venv's editable-install hook, so `import spaceft` can only find
the wheel. Offline and about half a minute, most of it the tiny run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "runs",
                                "lab_out", ".pytest_cache", ".ruff_cache")  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the fresh environment's bin directory, the wheel)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    pip = [sys.executable, "-m", "pip"]
    dist = tmp / "dist"
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
                   check=True, cwd=tmp)  # fmt: skip
    (wheel,) = dist.glob("spaceft-*.whl")
    env_dir = tmp / "env"
    python = str(env_dir / "bin" / "python")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = subprocess.run([python, "-c", purelib], check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "_outer_venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    install = ["install", "--no-deps", "--no-index", "-q", str(wheel)]
    subprocess.run([*pip, "--python", python, *install], check=True)
    shutil.rmtree(src)  # nothing of the source tree is left to fall back on
    return env_dir / "bin", wheel


def test_wheel_holds_every_data_file_the_code_reads(installed: tuple[Path, Path]) -> None:
    _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "spaceft").rglob("*")
               if p.is_file() and p.suffix not in (".py", ".pyc")}  # fmt: skip
    assert shipped and shipped <= names, shipped - names
    assert "spaceft/recipes/accelerate/zero3.yaml" in names and "spaceft/recipes/tiny.yaml" in names


def test_installed_wheel_runs_the_tiny_recipe(installed: tuple[Path, Path], tmp_path: Path) -> None:
    bin_dir, _ = installed
    env = {**os.environ, "SPACEFT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    where = subprocess.run([str(bin_dir / "python"), "-c", "import spaceft; print(spaceft.__file__)"],
                           cwd=tmp_path, env=env, check=True, capture_output=True, text=True)  # fmt: skip
    where = where.stdout
    assert str(bin_dir.parent) in where and str(ROOT) not in where
    config = subprocess.run([str(bin_dir / "spaceft"), "config", "tiny"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert config.returncode == 0, config.stderr
    assert "name: tiny-space" in config.stdout and "model:\n  name: tiny-random" in config.stdout
    run = subprocess.run(
        [str(bin_dir / "spaceft"), "-q", "run", "tiny", "selfplay.iterations=1", "data.train_size=4",
         "data.eval_size=2", "generation.max_new_tokens=8", "eval.max_new_tokens=4",
         "train.global_batch_size=4", "train.micro_batch_size=2", "train.epochs=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    run_dir = tmp_path / "runs" / "tiny-space"
    assert (run_dir / "iter_0" / "model" / "model.safetensors").exists()
    assert (run_dir / "report.md").exists() and (run_dir / "logs" / "spaceft.log").exists()
    assert "Traceback" not in run.stderr and "Removed shared tensor" not in run.stderr
