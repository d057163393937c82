"""``mtrl-eval gif_dir=...``: one small GIF per task of evaluation episode 0 (:func:`mtrl.evaluate.record_gifs`).

Checked against independent computations: the frames kept (reset, every ``stride``-th step, the last), the
shrunk size, the decoded first and last frames against the env's own rendering of the same episode
(block-averaged by hand), a lossless round trip of a few-colour animation, skip messages for envs that cannot
render, the command line (files, JSON, exit status 2 on a bad option) and a 2-step Meta-World episode through
MuJoCo's offscreen renderer (skipped when metaworld or an OpenGL back end is missing).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from mtrl.config import CONFIG_DIR
from mtrl.envs import make_family
from mtrl.evaluate import EVAL_STREAM, episode_seed, record_gifs, shrink, write_gif
from mtrl.train import run

REPO = Path(__file__).resolve().parents[1]


def _frames(path: Path) -> list[np.ndarray]:
    image = Image.open(path)
    out = []
    for i in range(image.n_frames):
        image.seek(i)
        out.append(np.asarray(image.convert("RGB"), dtype=np.int16))
    return out


def _toward(x: float, y: float):
    """A policy that always pushes towards (x, y) at full speed."""

    def act(obs: np.ndarray, task: np.ndarray) -> np.ndarray:
        d = np.array([x, y], np.float32) - obs
        return (d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-9)).astype(np.float32)

    return act


def _block_mean(frame: np.ndarray, k: int) -> np.ndarray:
    h, w, c = frame.shape
    return frame.reshape(h // k, k, w // k, k, c).astype(np.float64).mean(axis=(1, 3))


def test_point_mass_gifs_keep_the_right_frames_and_match_the_env_rendering(tmp_path: Path) -> None:
    family = make_family("pointmass", num_goals=2, max_episode_steps=7)
    policy = _toward(1.0, 0.5)
    out = record_gifs(policy, family, tmp_path, seed=3, size=64, stride=3, fps=10)
    assert set(out) == set(family.task_names)
    for t, name in enumerate(family.task_names):
        path = Path(out[name])
        assert path == tmp_path / f"{name}.gif" and path.is_file()
        frames = _frames(path)
        assert len(frames) == 4  # steps 0 (reset), 3, 6 and 7 (the last)
        assert frames[0].shape == (64, 64, 3)  # 128 x 128 point-mass frames, halved
        assert Image.open(path).info["duration"] in (100, 110, 90)  # 10 fps (GIF stores hundredths)
        # The same episode, rendered by the env and shrunk by hand (2 x 2 block means).
        env = family.make_env(t, render_mode="rgb_array")
        o, _ = env.reset(seed=episode_seed(EVAL_STREAM, 3, t, 0))
        expected = [_block_mean(env.render(), 2)]
        for step in range(1, 8):
            o, *_ = env.step(policy(o["obs"][None].astype(np.float32), np.array([t]))[0])
            if step in (3, 6, 7):
                expected.append(_block_mean(env.render(), 2))
        for got, want in zip(frames, expected):
            assert np.abs(got - want).mean() < 2.0  # palette rounding of the averaged edge pixels only
        assert np.abs(frames[0] - frames[-1]).max() > 100  # the point moved


def test_write_gif_is_lossless_for_few_colours_and_shrink_keeps_the_aspect_ratio(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (12, 3))
    background = colours[rng.integers(0, 12, (40, 60))]
    frames = []
    for i in range(5):
        f = background.copy()
        f[5 + 4 * i : 12 + 4 * i, 10:20] = colours[i]
        frames.append(f.astype(np.uint8))
    path = write_gif(frames, tmp_path / "a.gif", fps=20, colours=64)
    decoded = _frames(path)
    assert len(decoded) == 5
    for got, want in zip(decoded, frames):
        np.testing.assert_array_equal(got, want)

    wide = np.zeros((240, 480, 3), np.uint8)
    wide[:, 240:] = 200
    small = shrink(wide, 128)
    assert small.shape == (64, 128, 3)
    assert small[:, :60].max() == 0 and small[:, 68:].min() == 200  # halves stay uniform away from the edge
    tiny = rng.integers(0, 256, (30, 20, 3)).astype(np.uint8)
    np.testing.assert_array_equal(shrink(tiny, 128), tiny)  # never enlarged
    with pytest.raises(ValueError, match="colours"):
        record_gifs(_toward(0, 0), make_family("pointmass", num_goals=2), tmp_path, colours=1)


class _Blind:
    """A family whose envs cannot render: make_env refuses rgb_array for task 0, renders None for task 1."""

    task_names = ("refuses", "blank")

    def __init__(self) -> None:
        self.inner = make_family("pointmass", num_goals=2, max_episode_steps=3)

    def make_env(self, task: int, seed: int | None = None, render_mode: str | None = None):
        if task == 0 and render_mode is not None:
            raise ValueError("no rgb_array here")
        return self.inner.make_env(task)  # render_mode None: render() returns None


def test_envs_that_cannot_render_are_skipped_with_the_reason(tmp_path: Path) -> None:
    out = record_gifs(_toward(0, 0), _Blind(), tmp_path / "g")
    assert out["refuses"].startswith("skipped: cannot make an rgb_array env (no rgb_array here)")
    assert out["blank"] == "skipped: the env renders no rgb_array frames"
    assert list((tmp_path / "g").iterdir()) == []


def _eval(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtrl.cli.eval", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_mtrl_eval_gif_dir_writes_one_gif_per_task_and_refuses_bad_options(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        "agent=mt_sac",
        "env.max_episode_steps=6",
        "agent.hidden=[8]",
        "trainer.total_steps=12",
        "trainer.learning_starts=6",
        "trainer.batch_size=4",
        "trainer.eval_episodes=1",
        "trainer.eval_interval=0",
        "trainer.checkpoint_interval=0",
        "trainer.progress=false",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        run(compose(config_name="mtrl", overrides=overrides), run_dir)
    gifs = tmp_path / "gifs"
    ok = _eval(f"run_dir={run_dir}", "episodes=1", f"gif_dir={gifs}", "gif_size=32", "gif_stride=2")
    assert ok.returncode == 0, ok.stderr[-3000:]
    saved = json.loads((run_dir / "evaluation.json").read_text())
    assert set(saved["gifs"]) == set(saved["tasks"])
    for name, where in saved["gifs"].items():
        assert Path(where) == gifs / f"{name}.gif" and f"gif {name}: {where}" in ok.stdout
        assert len(_frames(Path(where))) == 4 and Image.open(where).size == (32, 32)  # steps 0, 2, 4, 6
    bad = _eval(f"run_dir={run_dir}", f"gif_dir={gifs}", "gif_size=2")
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtrl-eval: error:") and "gif_size" in lines[0]


MT10_ONE_TASK = """
import json, sys
import numpy as np
from mtrl.evaluate import record_gifs, use_headless_gl
print("backend", use_headless_gl())
from mtrl.envs import make_family
family = make_family(name="mt10", max_episode_steps=2)
class First:  # the first task only: a test of the renderer, not of ten tasks
    task_names = family.task_names[:1]
    make_env = family.make_env
out = record_gifs(lambda o, t: np.zeros((len(t), 4), np.float32), First(), sys.argv[1], size=64, stride=1)
print(json.dumps(out))
"""


def test_a_two_step_meta_world_episode_renders_offscreen(tmp_path: Path) -> None:
    pytest.importorskip("metaworld")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    proc = subprocess.run(
        [sys.executable, "-c", MT10_ONE_TASK, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backend egl" in proc.stdout or "DISPLAY" in env
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["reach-v3"].startswith("skipped: rendering failed"):
        pytest.skip(f"no offscreen OpenGL back end here: {out['reach-v3']}")
    frames = _frames(Path(out["reach-v3"]))
    assert len(frames) == 3 and frames[0].shape == (64, 64, 3)  # reset + 2 steps, 480 x 480 shrunk
    assert frames[0].std() > 10  # a rendered scene, not a blank frame
