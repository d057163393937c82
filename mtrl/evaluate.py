"""Per-task success rate and mean return of a multi-task policy over deterministic episodes: the library behind
``mtrl-eval`` (:mod:`mtrl.cli.eval`, which calls :func:`evaluate_run`) and ``mtrl-train``'s evaluations.

Examples::

    mtrl-eval run_dir=outputs/mtrl/2025-01-01/12-00-00 episodes=20
    mtrl-eval run_dir=RUN episodes=10 video=true              # + one rgb_array video per task
    mtrl-eval run_dir=RUN gif_dir=RUN/gifs                    # + one small GIF per task (MUJOCO_GL=egl if unset)

Prints a table and writes ``RUN/evaluation.json`` (or ``output=PATH``)::

    {"tasks": {task: {"success": s, "return": r}}, "mean_success": s, "mean_return": r,
     "episodes": n, "seed": seed, "step": training step, "agent": name, "family": family.describe()}

An episode is a success when ``info["success"]`` is true at any step (Meta-World's convention: Yu et al.,
"Meta-World", CoRL 2019, Section 5); the policy is deterministic (``tanh(mean)``). Episode ``e`` of task
``t`` starts with ``reset(seed=episode_seed(EVAL_STREAM, seed, t, e))``, so a result depends on the seed,
the policy and the number of episodes only, not on how many envs run side by side. ``mtrl-train``'s
periodic evaluations use the same function with the run's seed.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtl.checkpoint import atomic_write_json
from mtrl.runs import load_run

__all__ = [
    "EVAL_STREAM",
    "CannotRender",
    "EvalConfig",
    "Evaluator",
    "episode_seed",
    "evaluate",
    "evaluate_run",
    "format_table",
    "record_gifs",
    "record_videos",
    "shrink",
    "write_gif",
    "use_headless_gl",
]

log = logging.getLogger("mtrl.evaluate")
EVAL_STREAM = 1  # episode-seed stream of evaluation envs (training uses mtrl.train.TRAIN_STREAM = 0)

Policy = Callable[[np.ndarray, np.ndarray], np.ndarray]


def episode_seed(stream: int, seed: int, index: int, episode: int) -> int:
    """A 32-bit reset seed for episode ``episode`` of env (or task) ``index`` in a seed ``stream``
    (``numpy.random.SeedSequence([stream, seed, index, episode])``: distinct streams never collide)."""
    if min(stream, seed, index, episode) < 0:
        raise ValueError(f"episode seeds need non-negative parts, got {(stream, seed, index, episode)}")
    return int(np.random.SeedSequence([stream, seed, index, episode]).generate_state(1)[0])


def as_policy(policy: Any) -> Policy:
    """``(obs [N, D] float32, task [N] int64) -> actions [N, A]``: an agent's deterministic ``act`` (anything
    with ``act(obs, task, deterministic=True)`` and ``device``) or a callable of that signature."""
    if hasattr(policy, "act"):
        device = getattr(policy, "device", torch.device("cpu"))

        def act(obs: np.ndarray, task: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                out = policy.act(torch.as_tensor(obs, device=device), torch.as_tensor(task, device=device), True)
            return out.cpu().numpy()

        return act
    if callable(policy):
        return policy
    raise TypeError(f"policy must have act(obs, task, deterministic) or be callable, got {type(policy).__name__}")


class Evaluator:
    """Runs ``episodes`` deterministic episodes of every task, ``envs_per_task`` of them side by side.

    The envs are made on the first call and kept for the next ones (training evaluates many times).

    Args:
        family: the task family.
        episodes: episodes per task.
        seed: seed of the episode seeds (see the module docstring).
        envs_per_task: envs per task run side by side (``None`` = ``episodes``).
    """

    def __init__(self, family: Any, *, episodes: int = 10, seed: int = 0, envs_per_task: int | None = None) -> None:
        if episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {episodes}")
        if envs_per_task is not None and envs_per_task < 1:
            raise ValueError(f"envs_per_task must be >= 1 or None, got {envs_per_task}")
        self.family = family
        self.task_names = tuple(family.task_names)
        self.episodes, self.seed = int(episodes), int(seed)
        self.width = min(self.episodes, envs_per_task or self.episodes)
        self._envs: list[list[Any]] | None = None  # [task][slot]

    def _make_envs(self) -> list[list[Any]]:
        if self._envs is None:
            self._envs = [[self.family.make_env(t) for _ in range(self.width)] for t in range(len(self.task_names))]
        return self._envs

    def __call__(self, policy: Any) -> dict[str, Any]:
        """``{"tasks": {task: {"success", "return"}}, "mean_success", "mean_return", "episodes", "seed"}``."""
        act = as_policy(policy)
        envs = self._make_envs()
        k = len(self.task_names)
        returns = np.zeros((k, self.episodes))
        success = np.zeros((k, self.episodes), dtype=bool)
        for start in range(0, self.episodes, self.width):
            slots = [(t, s) for t in range(k) for s in range(min(self.width, self.episodes - start))]
            obs = {}
            for t, s in slots:
                o, _ = envs[t][s].reset(seed=episode_seed(EVAL_STREAM, self.seed, t, start + s))
                obs[(t, s)] = np.asarray(o["obs"], dtype=np.float32)
            active = list(slots)
            while active:
                x = np.stack([obs[a] for a in active])
                tasks = np.array([a[0] for a in active], dtype=np.int64)
                actions = act(x, tasks)
                still = []
                for (t, s), action in zip(active, actions):
                    o, r, term, trunc, info = envs[t][s].step(action)
                    returns[t, start + s] += float(r)
                    success[t, start + s] |= bool(info.get("success", False))
                    obs[(t, s)] = np.asarray(o["obs"], dtype=np.float32)
                    if not (term or trunc):
                        still.append((t, s))
                active = still
        tasks_out = {
            name: {"success": float(success[t].mean()), "return": float(returns[t].mean())}
            for t, name in enumerate(self.task_names)
        }
        return {
            "tasks": tasks_out,
            "mean_success": float(success.mean()),
            "mean_return": float(returns.mean()),
            "episodes": self.episodes,
            "seed": self.seed,
        }

    def close(self) -> None:
        for row in self._envs or []:
            for env in row:
                env.close()
        self._envs = None


def evaluate(
    policy: Any, family: Any, *, episodes: int = 10, seed: int = 0, envs_per_task: int | None = None
) -> dict[str, Any]:
    """Per-task success rate and mean return over ``episodes`` deterministic episodes (see :class:`Evaluator`)."""
    evaluator = Evaluator(family, episodes=episodes, seed=seed, envs_per_task=envs_per_task)
    try:
        return evaluator(policy)
    finally:
        evaluator.close()


def _write_video(frames: Sequence[np.ndarray], stem: Path, fps: int) -> Path:
    """``stem.mp4`` through imageio's ffmpeg plugin when installed, else ``stem.gif`` through Pillow."""
    try:
        import imageio.v2 as imageio

        path = stem.with_suffix(".mp4")
        imageio.mimwrite(path, list(frames), fps=fps)
        return path
    except Exception as err:  # no ffmpeg backend (imageio-ffmpeg) or no imageio: fall back to a GIF
        log.debug("mp4 writer unavailable (%s); writing a GIF", err)
        stem.with_suffix(".mp4").unlink(missing_ok=True)
    from PIL import Image

    path = stem.with_suffix(".gif")
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


class CannotRender(RuntimeError):
    """A task's env cannot produce ``rgb_array`` frames here; the message says why."""


def _episode_frames(act: Policy, family: Any, t: int, seed: int, keep: Callable[[int], bool]) -> list[np.ndarray]:
    """Frames of evaluation episode 0 of task ``t`` (``render_mode="rgb_array"``): the reset frame (step 0) and
    the frame after every step ``i`` with ``keep(i)``.

    Raises:
        CannotRender: the env cannot be made with ``rgb_array``, renders ``None``, or rendering fails (no OpenGL).
    """
    try:
        env = family.make_env(t, render_mode="rgb_array")
    except Exception as err:  # families raise their own errors for unsupported render modes
        raise CannotRender(f"cannot make an rgb_array env ({err})") from err
    try:
        o, _ = env.reset(seed=episode_seed(EVAL_STREAM, seed, t, 0))
        try:
            first = env.render()
        except NotImplementedError as err:
            raise CannotRender(f"rendering is not implemented ({err})") from err
        except Exception as err:  # MuJoCo without a usable OpenGL back end (MUJOCO_GL) fails here
            raise CannotRender(f"rendering failed ({type(err).__name__}: {err})") from err
        if first is None:
            raise CannotRender("the env renders no rgb_array frames")
        frames, i, done = [np.asarray(first)], 0, False
        while not done:
            action = act(np.asarray(o["obs"], dtype=np.float32)[None], np.array([t], dtype=np.int64))[0]
            o, _, term, trunc, _ = env.step(action)
            i += 1
            done = bool(term or trunc)
            if keep(i) or done:
                frames.append(np.asarray(env.render()))
        return frames
    finally:
        env.close()


def record_videos(policy: Any, family: Any, video_dir: str | Path, *, seed: int = 0, fps: int = 30) -> dict[str, str]:
    """One video per task of evaluation episode 0 (``render_mode="rgb_array"``): ``{task: path or reason}``.

    Tasks whose env cannot render (no ``rgb_array`` support, no frames) are skipped with the reason.
    """
    act = as_policy(policy)
    video_dir = Path(video_dir)
    video_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    for t, name in enumerate(family.task_names):
        try:
            frames = _episode_frames(act, family, t, seed, lambda i: True)
        except CannotRender as err:
            out[name] = f"skipped: {err}"
            continue
        out[name] = str(_write_video(frames, video_dir / name, fps))
    return out


def use_headless_gl() -> str | None:
    """Choose MuJoCo's offscreen OpenGL back end on a machine without a display: ``MUJOCO_GL=egl`` (GPU or Mesa
    EGL; ``osmesa`` needs the OSMesa library, often absent) unless ``MUJOCO_GL`` is set or a display is
    available. Returns the back end in force (``None``: MuJoCo's default, a window system). It only takes effect
    before ``mujoco`` is first imported (which a Meta-World family does), so call it before making one."""
    if "MUJOCO_GL" not in os.environ and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        if "mujoco" in sys.modules:
            log.warning("mujoco is already imported without MUJOCO_GL: offscreen rendering may fail")
        os.environ["MUJOCO_GL"] = "egl"
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    return os.environ.get("MUJOCO_GL")


def shrink(frame: np.ndarray, size: int) -> np.ndarray:
    """``frame`` (``[H, W, 3]`` uint8) resized so that its longer side is at most ``size`` pixels (Pillow's
    area-averaging ``Image.reduce`` for whole factors, then Lanczos), aspect ratio kept; smaller frames unchanged."""
    from PIL import Image

    h, w = frame.shape[:2]
    if max(h, w) <= size:
        return np.ascontiguousarray(frame[..., :3], dtype=np.uint8)
    image = Image.fromarray(np.ascontiguousarray(frame[..., :3], dtype=np.uint8))
    factor = max(h, w) // size
    if factor > 1:
        image = image.reduce(factor)
    scale = size / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
    return np.asarray(image)


def record_gifs(
    policy: Any,
    family: Any,
    gif_dir: str | Path,
    *,
    seed: int = 0,
    size: int = 128,
    stride: int = 2,
    fps: int = 15,
    colours: int = 128,
) -> dict[str, str]:
    """One small animated GIF per task of evaluation episode 0 (the episode :func:`evaluate` runs first):
    ``{task: path, or "skipped: why"}``.

    Frames come from ``render_mode="rgb_array"`` (MuJoCo's offscreen renderer for Meta-World: see
    :func:`use_headless_gl`; the point-mass draws its own), every ``stride``-th step plus the reset frame and
    the last step's, each shrunk to at most ``size`` pixels on its longer side (:func:`shrink`), written with
    one shared palette of ``colours`` colours (:func:`write_gif`) at ``fps`` frames per second, looping. A
    150-step Meta-World episode at the defaults is 76 frames of 128 x 128. Tasks whose env cannot render are
    skipped with the reason (:class:`CannotRender`), not an error.
    """
    if size < 8 or stride < 1 or fps < 1 or not 2 <= colours <= 256:
        raise ValueError(
            "GIFs need size >= 8, stride >= 1, fps >= 1 and 2 <= colours <= 256, "
            f"got {size}, {stride}, {fps}, {colours}"
        )
    act = as_policy(policy)
    gif_dir = Path(gif_dir)
    gif_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    for t, name in enumerate(family.task_names):
        try:
            frames = _episode_frames(act, family, t, seed, lambda i: i % stride == 0)
        except CannotRender as err:
            out[name] = f"skipped: {err}"
            continue
        path = gif_dir / f"{name}.gif"
        tmp = path.with_name(f".{path.name}.tmp.gif")
        write_gif([shrink(f, size) for f in frames], tmp, fps=fps, colours=colours)
        tmp.replace(path)
        out[name] = str(path)
    return out


def write_gif(frames: Sequence[np.ndarray], path: str | Path, *, fps: int = 15, colours: int = 128) -> Path:
    """An animated, looping GIF of ``frames`` (``[H, W, 3]`` uint8, all one size) through Pillow.

    All frames share one palette of ``colours`` colours (median cut over the first, middle and last frames) and
    are mapped onto it without dithering, so pixels that do not change between frames keep their index and
    Pillow stores only the changed rectangle of each frame: a 150-step Meta-World episode at 128 x 128 is a
    few hundred KB rather than the megabyte that per-frame palettes with dithering take.
    """
    from PIL import Image

    if not frames:
        raise ValueError("write_gif needs at least one frame")
    images = [Image.fromarray(np.ascontiguousarray(f[..., :3], dtype=np.uint8)) for f in frames]
    picks = sorted({0, len(images) // 2, len(images) - 1})
    sample = Image.new("RGB", (images[0].width, images[0].height * len(picks)))
    for i, k in enumerate(picks):
        sample.paste(images[k], (0, images[0].height * i))
    palette = sample.quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
    indexed = [im.quantize(palette=palette, dither=Image.Dither.NONE) for im in images]
    path = Path(path)
    indexed[0].save(path, save_all=True, append_images=indexed[1:], duration=round(1000 / fps), loop=0, optimize=False)
    return path


def format_table(result: dict[str, Any]) -> str:
    """The per-task results as a text table with a mean row."""
    rows = [(name, f"{r['success']:.3f}", f"{r['return']:.2f}") for name, r in result["tasks"].items()]
    rows.append(("mean", f"{result['mean_success']:.3f}", f"{result['mean_return']:.2f}"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(("task", "success", "return"))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    header = line(("task", "success", "return"))
    return "\n".join([header, "-" * len(header), *map(line, rows[:-1]), "-" * len(header), line(rows[-1])])


@dataclass
class EvalConfig:
    """``mtrl-eval``'s config (``configs/mtrl_eval.yaml``)."""

    run_dir: str = MISSING
    """A ``mtrl-train`` run directory (``config.yaml`` and ``last.pt``)."""
    episodes: int = 10
    """Deterministic episodes per task."""
    seed: int | None = None
    """Seed of the episode seeds; ``null`` = the run's seed (the episodes its training evaluations used)."""
    envs_per_task: int | None = None
    """Envs per task run side by side (``null`` = ``episodes``)."""
    device: str = "cpu"
    """Where the policy runs."""
    output: str | None = None
    """Result JSON path; ``null`` = ``RUN/evaluation.json``."""
    video: bool = False
    """Also record evaluation episode 0 of every task (``rgb_array``; mp4, or GIF without ffmpeg)."""
    video_dir: str | None = None
    """Where videos go; ``null`` = ``RUN/videos``."""
    gif_dir: str | None = None
    """Also write one small GIF per task of evaluation episode 0 into this directory (:func:`record_gifs`);
    ``null`` = none."""
    gif_size: int = 128
    """Longer side of the GIF frames in pixels (frames are shrunk to it)."""
    gif_stride: int = 2
    """Keep every ``gif_stride``-th step's frame (plus the first and the last)."""
    gif_fps: int = 15
    """GIF frames per second."""
    gif_colours: int = 128
    """Colours of the palette all frames of a GIF share (2 to 256)."""


def evaluate_run(cfg: Any) -> dict[str, Any]:
    """Evaluate a ``mtrl-train`` run as ``cfg`` (an :class:`EvalConfig` or a mapping of its fields) says,
    print the table and write the JSON; returns the result.

    Raises:
        ValueError: a config error (an unknown key, no ``run_dir``), or ``run_dir`` is not an ``mtrl-train`` run with
            a checkpoint (:class:`mtrl.runs.NotARunError`, saying why and what to pass instead).
    """
    if isinstance(cfg, EvalConfig):
        c = cfg
    else:
        try:
            node = OmegaConf.merge(OmegaConf.structured(EvalConfig), cfg)
            c = EvalConfig(**OmegaConf.to_container(node, resolve=True, throw_on_missing=True))
        except OmegaConfBaseException as err:
            first = str(err).splitlines()[0]  # OmegaConf's first line names the key; the rest repeats it
            raise ValueError(f"config: {first} (e.g. mtrl-eval run_dir=RUN episodes=10)") from err
    if c.gif_dir is not None and (c.gif_size < 8 or c.gif_stride < 1 or c.gif_fps < 1 or not 2 <= c.gif_colours <= 256):
        raise ValueError(
            f"gif_size must be >= 8, gif_stride and gif_fps >= 1, gif_colours 2 to 256; got gif_size={c.gif_size}, "
            f"gif_stride={c.gif_stride}, gif_fps={c.gif_fps}, gif_colours={c.gif_colours}"
        )
    if c.video or c.gif_dir is not None:
        use_headless_gl()  # before load_run imports mujoco
    run = load_run(c.run_dir, c.device)
    seed = int(run.cfg.seed) if c.seed is None else int(c.seed)
    result = evaluate(run.agent, run.family, episodes=c.episodes, seed=seed, envs_per_task=c.envs_per_task)
    result.update({"step": run.step, "agent": run.agent.name, "family": run.family.describe()})
    if c.video:
        video_dir = Path(c.video_dir) if c.video_dir else Path(c.run_dir) / "videos"
        result["videos"] = record_videos(run.agent, run.family, video_dir, seed=seed)
        for name, where in result["videos"].items():
            print(f"video {name}: {where}")
    if c.gif_dir is not None:
        result["gifs"] = record_gifs(
            run.agent,
            run.family,
            c.gif_dir,
            seed=seed,
            size=c.gif_size,
            stride=c.gif_stride,
            fps=c.gif_fps,
            colours=c.gif_colours,
        )
        for name, where in result["gifs"].items():
            print(f"gif {name}: {where}")
    output = Path(c.output) if c.output else Path(c.run_dir) / "evaluation.json"
    atomic_write_json(result, output)
    print(f"{run.agent.name} at step {run.step}, {c.episodes} deterministic episodes per task (seed {seed}):")
    print(format_table(result))
    print(f"wrote {output}")
    return result
