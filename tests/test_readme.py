"""The README's Python examples run as written (the serving client against a real mtlib-serve)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README_URL = "127.0.0.1:8000"
README_GRPC_URL = "127.0.0.1:8001"


def _blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert blocks, "README has no python example"
    return blocks


def _run(code: str) -> dict:
    namespace = {"__name__": "readme"}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_readme_python_example_runs(tmp_path: Path) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the example writes runs/demo relative to the working directory
    try:
        for code in _blocks():
            if "InferenceServerClient" not in code:
                _run(code)
    finally:
        os.chdir(cwd)
    assert (tmp_path / "runs" / "demo" / "best.pt").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_serving_client_runs_against_mtlib_serve(tmp_path: Path) -> None:
    """Train and export as the README's quick start does (tiny data), serve it, and run the client example."""
    from hydra import compose, initialize_config_module

    from mtl.config import CONFIG_PATH
    from mtrec.export import export_run
    from mtrec.train import run

    clients = [code for code in _blocks() if "InferenceServerClient" in code]
    assert clients, "README has no serving client example"
    overrides = [
        "data.n_rows=2000",
        "data.num_users=100",
        "data.num_items=200",
        "data.num_categories=10",
        "trainer.max_steps=5",
        "trainer.progress=false",
        "trainer.tensorboard=false",
    ]
    with initialize_config_module(CONFIG_PATH.removeprefix("pkg://"), version_base="1.3"):
        cfg = compose(config_name="mtrec", overrides=overrides)
    run(cfg, tmp_path / "run")
    repo = tmp_path / "model_repository"
    export_run(
        {
            "run_dir": str(tmp_path / "run"),
            "repository": str(repo),
            "model_name": "mmoe",
            "parity": {"batch_sizes": [1, 4]},
        }
    )

    port, grpc_port = _free_port(), _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving.cli",
            "--model-repository",
            str(repo),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--grpc-port",
            str(grpc_port),
            "--log-level",
            "WARNING",
        ],
        cwd=REPO,
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.1)
        assert any("tritonclient.grpc" in code for code in clients), "README has no gRPC client example"
        for code in clients:
            if "tritonclient.grpc" in code:
                assert README_GRPC_URL in code
                code = code.replace(README_GRPC_URL, f"127.0.0.1:{grpc_port}")
            else:
                assert README_URL in code
                code = code.replace(README_URL, f"127.0.0.1:{port}")
            ns = _run(code)
            click = ns["result"].as_numpy("click")
            assert click.shape == (4, 1) and ((click > 0) & (click < 1)).all()  # probabilities of 4 rows
    finally:
        server.terminate()
        server.wait(30)
