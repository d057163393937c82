"""Env runners and ``mtrl-train``'s async pool: worker processes give bit-identical steps, resets and replays to
the in-process runner, async training runs equal sync ones and resume exactly, the env configs' ``vectorization``
and ``envs_per_task`` reach the trainer, and workers shut down on close, errors, SIGTERM, SIGINT and a killed
parent (each within a bounded time)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from mtrl_helpers import assert_same_agent_and_replay
from omegaconf import DictConfig

from mtl.checkpoint import load_checkpoint
from mtrl.config import CONFIG_DIR
from mtrl.envs import AsyncEnvRunner, PointMassFamily, SyncEnvRunner, default_env_workers, make_family
from mtrl.envs.pointmass import PointMassEnv
from mtrl.evaluate import episode_seed
from mtrl.runs import LAST
from mtrl.train import TRAIN_STREAM, EnvPool, run

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
TINY = [
    "agent=mt_sac",
    "env.max_episode_steps=20",
    "agent.hidden=[16,16]",
    "trainer.total_steps=60",
    "trainer.learning_starts=10",
    "trainer.batch_size=8",
    "trainer.replay_capacity=500",
    "trainer.eval_episodes=2",
    "trainer.eval_interval=0",
    "trainer.log_interval=10",
    "trainer.checkpoint_interval=0",
    "trainer.progress=false",
]
ASYNC = ["env.vectorization=async", "trainer.env_workers=2"]


def cfg_for(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="mtrl", overrides=[*TINY, *overrides])


def _same_training_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["step"] == b["step"]
    assert_same_agent_and_replay(a, b)
    assert np.array_equal(a["pool"]["obs"], b["pool"]["obs"])
    assert np.array_equal(a["pool"]["episode"], b["pool"]["episode"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


# ------------------------------------------------------------------------------------------------ runners


def test_async_runner_steps_resets_and_replays_like_the_in_process_one() -> None:
    family = make_family("pointmass", num_goals=3, max_episode_steps=6, random_goals=True)
    tasks = [j % 3 for j in range(7)]  # 7 envs over 3 workers: slices of 2, 3, 2
    sync, workers = SyncEnvRunner(family, tasks), AsyncEnvRunner(family, tasks, num_workers=3)
    try:
        assert workers.num_workers == 3 and len(set(workers.pids)) == 3 and os.getpid() not in workers.pids
        seeds = [(j, 100 + j) for j in range(7)]
        assert np.array_equal(sync.reset(seeds), workers.reset(seeds))
        # Against the envs made and driven by hand: the runners are what the family's envs do.
        by_hand = [family.make_env(t) for t in tasks]
        first = np.stack([e.reset(seed=100 + j)[0]["obs"] for j, e in enumerate(by_hand)])
        assert np.array_equal(workers.reset(seeds), first)
        rng = np.random.default_rng(0)
        for _ in range(5):
            actions = rng.uniform(-1, 1, (7, 2)).astype(np.float32)
            sync.step_async(actions)
            workers.step_async(actions)
            a, b = sync.step_wait(), workers.step_wait()
            expected = [e.step(actions[j]) for j, e in enumerate(by_hand)]
            for x, y in zip(a, b):
                assert x.dtype == y.dtype and np.array_equal(x, y)
            assert np.array_equal(a[0], np.stack([o["obs"] for o, *_ in expected]))
            assert a[1].tolist() == [r for _, r, *_ in expected]
        # A partial reset of envs on different workers, in any order.
        part = [(5, 7), (0, 8), (3, 9)]
        assert np.array_equal(sync.reset(part), workers.reset(part))
        assert np.array_equal(workers.reset(part)[1], by_hand[0].reset(seed=8)[0]["obs"])
        path = [rng.uniform(-1, 1, (m, 2)).astype(np.float32) for m in (0, 3, 5)]
        items = [(6, 1, path[0]), (2, 2, path[1]), (4, 3, path[2])]
        replayed = workers.replay(items)
        assert np.array_equal(replayed, sync.replay(items))
        by_hand[4].reset(seed=3)
        for action in path[2]:
            last = by_hand[4].step(action)[0]["obs"]
        assert np.array_equal(replayed[2], last) and np.array_equal(replayed[0], by_hand[6].reset(seed=1)[0]["obs"])
        with pytest.raises(RuntimeError, match="twice"):
            workers.step_async(np.zeros((7, 2), np.float32))
            workers.step_async(np.zeros((7, 2), np.float32))
        workers.step_wait()
        with pytest.raises(ValueError, match="expected 7 actions"):
            workers.step_async(np.zeros((6, 2), np.float32))
    finally:
        pids = workers.pids
        workers.close()
        sync.close()
    assert workers.pids == [] and not any(_alive(p) for p in pids)
    workers.close()  # idempotent


def test_default_env_workers_leaves_a_core_to_the_learner() -> None:
    cores = len(os.sched_getaffinity(0))
    assert default_env_workers(10) == max(1, min(10, cores - 1))
    assert default_env_workers(1) == 1
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        AsyncEnvRunner(make_family("pointmass", num_goals=2), [0, 1], num_workers=0)


def test_async_and_sync_pools_share_state_both_ways() -> None:
    family = make_family("pointmass", num_goals=4, max_episode_steps=7)
    rng = np.random.default_rng(1)
    pools = [EnvPool(family, 2, seed=5, vectorization=v, workers=2) for v in ("sync", "async", "sync", "async")]
    try:
        for p in pools[:2]:
            p.reset()
        for _ in range(10):  # through one episode end (every env resets at step 7 with its next episode's seed)
            actions = rng.uniform(-1, 1, (8, 2)).astype(np.float32)
            out = [p.step(actions) for p in pools[:2]]
            for x, y in zip(out[0][:3], out[1][:3]):
                assert np.array_equal(x, y)
            assert out[0][3] == out[1][3]
        assert pools[1].episode.tolist() == [1] * 8
        # the observation after the reset is that of episode 1's seed
        fresh = family.make_env(3)
        start = fresh.reset(seed=episode_seed(TRAIN_STREAM, 5, 3, 1))[0]["obs"]
        for action in pools[1].state_dict()["actions"][3]:
            start = fresh.step(action)[0]["obs"]
        assert np.array_equal(pools[1].obs[3], start)
        pools[2].load_state_dict(pools[1].state_dict())  # async -> sync
        pools[3].load_state_dict(pools[0].state_dict())  # sync -> async
        action = rng.uniform(-1, 1, (8, 2)).astype(np.float32)
        steps = [p.step(action)[0] for p in pools]
        assert all(np.array_equal(steps[0], s) for s in steps[1:])
    finally:
        for p in pools:
            p.close()


# ------------------------------------------------------------------------------------------------ training


def test_async_training_is_bit_identical_to_sync(tmp_path: Path) -> None:
    run(cfg_for(), tmp_path / "sync")
    run(cfg_for(*ASYNC), tmp_path / "async")
    a, b = load_checkpoint(tmp_path / "sync" / LAST), load_checkpoint(tmp_path / "async" / LAST)
    _same_training_state(a, b)
    assert a["overlap_updates"] is True and b["overlap_updates"] is True
    # the updates did happen (not a run that only collected data)
    assert a["agent"]["optimizers"]["critic"]["state"]


def test_async_run_stopped_and_resumed_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(cfg_for(*ASYNC, "trainer.eval_interval=25"), straight)
    run(cfg_for(*ASYNC, "trainer.total_steps=30"), split)
    first = load_checkpoint(split / LAST)
    assert first["step"] == 30 and any(len(x) == 10 for x in first["pool"]["actions"])  # mid-episode
    run(cfg_for(*ASYNC, "trainer.resume=true"), split)
    _same_training_state(load_checkpoint(straight / LAST), load_checkpoint(split / LAST))
    # and the vectorization may change on resume: a sync run resumed async (and the other way) is the same run
    mixed = tmp_path / "mixed"
    run(cfg_for("trainer.total_steps=30"), mixed)
    run(cfg_for(*ASYNC, "trainer.total_steps=45", "trainer.resume=true"), mixed)
    run(cfg_for("trainer.resume=true"), mixed)
    _same_training_state(load_checkpoint(straight / LAST), load_checkpoint(mixed / LAST))


def test_overlap_order_is_kept_from_the_checkpoint(tmp_path: Path) -> None:
    # The two orders train differently (the updates of a step see its transitions or not) ...
    run(cfg_for("trainer.overlap_updates=false"), tmp_path / "after")
    run(cfg_for(), tmp_path / "during")
    after, during = load_checkpoint(tmp_path / "after" / LAST), load_checkpoint(tmp_path / "during" / LAST)
    assert after["overlap_updates"] is False
    assert any(not torch.equal(v, during["agent"]["modules"][k]) for k, v in after["agent"]["modules"].items())
    # ... and a checkpoint written before the setting existed (no key) resumes in the old order: its run equals a
    # straight run with overlap_updates=false, under the default null.
    old = tmp_path / "old"
    run(cfg_for("trainer.overlap_updates=false", "trainer.total_steps=30"), old)
    state = load_checkpoint(old / LAST)
    del state["overlap_updates"]
    torch.save(state, old / LAST)
    run(cfg_for("trainer.resume=true", *ASYNC), old)
    _same_training_state(after, load_checkpoint(old / LAST))
    with pytest.raises(ValueError, match="trained with trainer.overlap_updates=false"):
        run(cfg_for("trainer.resume=true", "trainer.overlap_updates=true", "trainer.total_steps=70"), old)


def test_env_config_envs_per_task_sizes_the_pool_unless_the_trainer_sets_it(tmp_path: Path) -> None:
    run(cfg_for("env.envs_per_task=2", "trainer.total_steps=12"), tmp_path / "env")
    state = load_checkpoint(tmp_path / "env" / LAST)
    assert len(state["pool"]["episode"]) == 8 and state["replay"]["size"].tolist() == [24] * 4
    assert state["fingerprint"]["envs_per_task"] == 2
    run(cfg_for("env.envs_per_task=2", "trainer.envs_per_task=3", "trainer.total_steps=12"), tmp_path / "trainer")
    assert len(load_checkpoint(tmp_path / "trainer" / LAST)["pool"]["episode"]) == 12
    # the same pool size configured either way resumes; another one does not
    run(cfg_for("trainer.envs_per_task=2", "trainer.total_steps=14", "trainer.resume=true"), tmp_path / "env")
    with pytest.raises(ValueError, match="different envs_per_task"):
        run(cfg_for("trainer.total_steps=16", "trainer.resume=true"), tmp_path / "env")
    with pytest.raises(ValueError, match="env_workers must be >= 1 or null"):
        run(cfg_for("trainer.env_workers=0"), tmp_path / "bad")
    with pytest.raises(ValueError, match="env.vectorization: expected one of"):
        run(cfg_for("env.vectorization=threads"), tmp_path / "bad")


# ------------------------------------------------------------------------------------------------ shutdown


class _BrokenEnv(PointMassEnv):
    def step(self, action: np.ndarray) -> Any:
        if float(action[0]) > 0.99:
            raise ValueError("broken env: action too large")
        return super().step(action)


class BrokenFamily(PointMassFamily):
    """Point-mass envs that raise on an action of 1 (pickled by reference to the workers)."""

    def make_env(self, task: int, seed: int | None = None, render_mode: str | None = None) -> PointMassEnv:
        env = super().make_env(task, seed, render_mode)
        env.__class__ = _BrokenEnv
        return env


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return out


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def test_a_worker_error_is_raised_here_and_a_dead_worker_is_reported() -> None:
    family = BrokenFamily(num_goals=2, metadata_source="random")
    runner = AsyncEnvRunner(family, [0, 1], num_workers=2)
    try:
        runner.reset([(0, 1), (1, 2)])
        runner.step_async(np.array([[1.0, 0.0], [0.0, 0.0]], np.float32))  # worker 0 fails, worker 1 answers
        with pytest.raises(ValueError, match="action too large") as info:
            runner.step_wait()
        assert any("in env worker 0" in note and "test_mtrl_vector.py" in note for note in info.value.__notes__)
        # every answer was read: the next requests get their own answers
        assert runner.reset([(1, 2), (0, 1)]).shape == (2, 2)
        runner.step_async(np.zeros((2, 2), np.float32))
        assert runner.step_wait()[0].shape == (2, 2)
        os.kill(runner.pids[0], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="env worker 0 .* exited with code -9"):
            runner.reset([(0, 1)])
        assert time.monotonic() - t0 < 5
    finally:
        pids = runner.pids
        runner.close()
    assert _wait_gone(pids, 5) == []


def _train_subprocess(run_dir: Path, *extra: str) -> subprocess.Popen:
    overrides = [o for o in TINY if not o.startswith("trainer.total_steps")]
    return subprocess.Popen(
        [sys.executable, "-m", "mtrl.cli.train", *overrides, *ASYNC, "trainer.total_steps=1000000",
         f"hydra.run.dir={run_dir}", *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_training(proc: subprocess.Popen, run_dir: Path, step: int) -> list[int]:
    """Wait (at most 120 s) until the run logged ``step``; its worker processes then."""
    deadline = time.monotonic() + 120
    log = run_dir / "train_log.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and any(json.loads(x)["step"] >= step for x in log.read_text().splitlines() if x):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    return _children(proc.pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_async_run_checkpoints_and_leaves_no_worker_behind(sig: signal.Signals, tmp_path: Path) -> None:
    proc = _train_subprocess(tmp_path)
    try:
        children = _wait_training(proc, tmp_path, 20)
        assert len(children) >= 2  # the two env workers (and multiprocessing's resource tracker)
        for pid in [proc.pid, *children]:  # as Ctrl-C and `timeout` do, the whole group gets the signal
            os.kill(pid, sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    # KeyboardInterrupt: Python ends by re-raising SIGINT (a shell shows status 130)
    assert proc.returncode == (-signal.SIGINT if sig == signal.SIGINT else 128 + signal.SIGTERM), err[-3000:]
    step = load_checkpoint(tmp_path / LAST)["step"]
    assert step >= 20 and f"{sig.name} at step {step}" in out + err
    assert _wait_gone(children, 10) == []


def test_workers_exit_when_the_trainer_is_killed(tmp_path: Path) -> None:
    proc = _train_subprocess(tmp_path)
    try:
        children = _wait_training(proc, tmp_path, 10)
        assert len(children) >= 2
        proc.kill()
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert _wait_gone(children, 10) == []


def test_workers_are_shut_down_at_exit_without_close(tmp_path: Path) -> None:
    # A script that never closes its runner: multiprocessing's exit handler would SIGTERM (ignored by the workers)
    # and join them forever; the runner's own exit finaliser closes them first, so the script ends promptly.
    script = tmp_path / "forget.py"
    script.write_text(
        "import weakref\n"
        "class Anything: pass\n"
        "anything = Anything()\n"
        "weakref.finalize(anything, print)  # weakref's exit hook now runs after multiprocessing's\n"
        "from mtrl.envs import AsyncEnvRunner, make_family\n"
        "if __name__ == '__main__':\n"
        "    runner = AsyncEnvRunner(make_family('pointmass', num_goals=2), [0, 1], num_workers=2)\n"
        "    print(*runner.pids, flush=True)\n"
        "    keep = runner  # alive until the interpreter exits\n"
    )
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2 and _wait_gone(pids, 5) == []


def test_an_error_in_training_closes_the_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mtrl import train

    made: list[tuple[EnvPool, list[int]]] = []
    original = train.EnvPool.__init__

    def spy(self: EnvPool, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made.append((self, list(self.runner.pids)))

    def fail(self: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("update failed")

    monkeypatch.setattr(train.EnvPool, "__init__", spy)
    monkeypatch.setattr(train.RLTrainer, "_update", fail)
    with pytest.raises(RuntimeError, match="update failed"):
        run(cfg_for(*ASYNC), tmp_path)
    (pool, pids), = made
    assert pool.vectorization == "async" and len(pids) == 2 and pool.runner.pids == []
    assert _wait_gone(pids, 5) == []
