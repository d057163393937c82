"""The distribution: a built wheel carries every config of the repository's configs/ tree (as the package
``mtlib_configs``), composes every primary config and group option from the installed package, and its console
scripts run from any working directory in a fresh virtual environment (no checkout on the path)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PRIMARY = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and any(p.glob("*.yaml")))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the files git tracks (and the untracked ones it does not ignore): what a
    clean clone builds, and setuptools' build/ directory lands in the copy, not in the checkout."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True, timeout=60).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    # --no-build-isolation: the venv's setuptools builds it, nothing is downloaded
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("mtlib-*.whl")
    return path


@pytest.fixture(scope="module")
def fresh_env(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment with the wheel installed; its dependencies come from this venv's site-packages
    through a .pth line (which adds the directory without running its .pth files, so the editable install of the
    checkout stays out)."""
    root = tmp_path_factory.mktemp("env")
    env = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    py = env / "bin" / "python"
    site = Path(subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())  # fmt: skip
    (site / "mtlib_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return env


def test_wheel_carries_every_config(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"mtlib_configs/{p.relative_to(CONFIGS).as_posix()}" for p in CONFIGS.rglob("*.yaml")}
    assert expected and not expected - names, sorted(expected - names)
    assert "mtlib_configs/__init__.py" in names
    assert {f"mtlib_configs/{g}/" for g in GROUPS} <= {n.rsplit("/", 1)[0] + "/" for n in names}


COMPOSE_ALL = """
import json, sys
from pathlib import Path
import importlib
import mtlib_configs, mtl
from hydra import compose, initialize_config_module
for cli in ("mtrec.cli.train", "mtrec.cli.export", "mtrec.cli.teachers", "mtrec.cli.group", "mtrl.cli.train",
            "mtrl.cli.eval"):
    importlib.import_module(cli)  # each command registers its structured schemas (export_schema, ...)
from mtl.config import CONFIG_PATH, group_option
out = {"configs": mtlib_configs.__file__, "mtl": mtl.__file__, "primary": {}, "options": 0}
with initialize_config_module(CONFIG_PATH.removeprefix("pkg://"), version_base="1.3"):
    for name in json.loads(sys.argv[1]):
        out["primary"][name] = sorted(compose(config_name=name))
for group, names in json.loads(sys.argv[2]).items():
    for name in names:
        if group == "experiment":  # a global preset composes into a primary config: some command's must take it
            ok = []
            for primary in ("mtrec", "mtrl"):
                with initialize_config_module(CONFIG_PATH.removeprefix("pkg://"), version_base="1.3"):
                    try:
                        ok.append(bool(compose(config_name=primary, overrides=[f"experiment={name}"])))
                    except Exception:
                        pass
            assert any(ok), f"experiment={name} composes into neither mtrec nor mtrl"
        else:
            assert group_option(group, name) is not None
        out["options"] += 1
print(json.dumps(out))
"""


def test_installed_package_composes_every_config_from_anywhere(fresh_env: Path, tmp_path: Path) -> None:
    options = {g: sorted(p.stem for p in (CONFIGS / g).glob("*.yaml")) for g in GROUPS}
    proc = subprocess.run(
        [fresh_env / "bin" / "python", "-c", COMPOSE_ALL, json.dumps(PRIMARY), json.dumps(options)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("configs", "mtl"):  # the installed copies, not the checkout
        assert str(fresh_env) in out[key] and str(ROOT) not in out[key], out[key]
    assert set(out["primary"]) == set(PRIMARY) and all(out["primary"].values())
    assert out["options"] == sum(len(v) for v in options.values())


def test_installed_console_script_trains_from_another_directory(fresh_env: Path, tmp_path: Path) -> None:
    """The README's first command, from the wheel: ``mtrec-train trainer.max_steps=5`` in an empty directory."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [fresh_env / "bin" / "mtrec-train", "trainer.max_steps=5", "trainer.progress=false",
         f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600, env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val"] and metrics["test"]
