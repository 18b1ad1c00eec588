"""The files of one checkpoint step: written so that a crash never leaves a step that looks loadable, checked
before loading, and read without ever running code that a file carries.

Writing a step (commit_step): every rank writes its files (DeepSpeed's model states and optimizer shard, its random
state) into <save>/<tag>.partial/, each fsynced as it is closed, and reports to rank 0 what it wrote (names and sizes)
or why it could not. Only when every rank has written everything does rank 0 write the step's manifest, rename the
directory to <tag> and then replace `latest` (write, fsync, rename). A crash at any moment leaves `latest` naming a
complete step; a .partial directory is never loaded and is replaced by the next save of that step.

Reading: a step with a manifest is complete when every file it lists is there with its size (incomplete_reason).
Every torch.load, DeepSpeed's own included, unpickles only tensors, containers and the few DeepSpeed classes its
checkpoints hold (weights_only_loads); our files hold tensors and JSON only.
"""
import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal

import numpy as np
import torch
import torch.distributed as dist

from megatron_sp.errors import ConfigError
from megatron_sp.training.durable import free_bytes, free_space, fsync_dir, fsync_file, write_atomically

LATEST = "latest"  # DeepSpeed's file naming the newest step directory; here written only by commit_step
PARTIAL = ".partial"  # suffix of a step directory still being written
MANIFEST = "manifest.json"  # {"iteration", "consumed_samples", "world_size", "files": [[name, bytes, rank], ...]}
RNG_FILE = "rng_state_rank{rank}.pt"
FAULT_ENV = "MEGATRON_SP_FAULT"  # tests: "<phase>:<rank or all>", see fault_point
NEARLY_FULL = 64 << 20  # bytes free below which a failed write is taken for a full disk
NUMPY_DATA = ("numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct",  # prefixes of numpy's
              "numpy.core.multiarray._reconstruct")  # array data classes


def fault_point(phase: str, rank: int, path: str | None = None) -> None:
    """Fault injection for the tests: with MEGATRON_SP_FAULT=<phase>:<rank or all>, this rank cuts the file it has
    just written (`path`) to half its size and kills itself with SIGKILL, as a node that dies mid-write. Phases:
    model_states, optim_states, rng (after each such file), manifest (rank 0, after writing it), latest (rank 0,
    after the step directory is renamed, before `latest` is replaced). One environment lookup when unset."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or spec.partition(":")[0] != phase or spec.partition(":")[2] not in ("all", str(rank)):
        return
    if path and os.path.isfile(path):
        os.truncate(path, os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)


def _phase_of(name: str) -> str:
    return "optim_states" if "optim_states" in name else "model_states" if "model_states" in name else "rng"


class RecordingCheckpointEngine:
    """DeepSpeed's checkpoint engine during one save, with every file it writes fsynced and recorded (name: bytes).
    A write that fails (a full disk) is kept in `error`, not raised: this rank still takes part in every collective
    of DeepSpeed's save, writes nothing more, and commit_step then stops all ranks together with one line."""

    def __init__(self, inner, rank: int):
        self.inner, self.rank = inner, rank
        self.written: dict[str, int] = {}
        self.error: str | None = None

    def __getattr__(self, name):  # create/commit/makedirs/... as DeepSpeed's engine does them
        return getattr(self.inner, name)

    def save(self, state_dict, path: str) -> None:
        def write():
            self.inner.save(state_dict, path)
            fsync_file(path)
        if self._record(path, write):
            fault_point(_phase_of(os.path.basename(path)), self.rank, path)

    def write_json(self, content, path: str) -> None:
        """Our own metadata file of the step, recorded in the manifest as DeepSpeed's files are."""
        self._record(path, lambda: write_atomically(path, json.dumps(content, indent=1)))

    def _record(self, path: str, write) -> bool:
        """Run write() unless a write failed before; record the file's size -> whether it was written."""
        if self.error is not None:
            return False
        try:
            write()
        except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError of its zip writer
            self.error = f"writing {os.path.basename(path)} failed ({_write_failure(err, path)})"
            return False
        self.written[os.path.basename(path)] = os.path.getsize(path)
        return True


def _write_failure(err: BaseException, path: str) -> str:
    """Why a write failed: a full disk said as such (torch's writer reports it as e.g. 'unexpected pos 69376')."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC or free_bytes(path) < NEARLY_FULL:
        return "no space left on device"
    return err.strerror if isinstance(err, OSError) and err.strerror else _first_line(err)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def commit_step(save_dir: str, tag: str, rank: int, recorder: RecordingCheckpointEngine, meta: dict) -> None:
    """Call on every rank once it has written its files of <tag>.partial. Either every rank wrote everything and
    rank 0 commits the step (manifest, rename to <tag>, then `latest`), or every rank raises the same ConfigError
    naming the first failure and the free space, with `latest` and the steps it names untouched."""
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (recorder.written, recorder.error))  # also the barrier: all have written
    failed = next(((r, error) for r, (_, error) in enumerate(reports) if error), None)
    problem = None
    if rank == 0:
        files = [[name, size, r] for r, (written, _) in enumerate(reports) for name, size in sorted(written.items())]
        problem = _discard(save_dir, tag) if failed else _commit(save_dir, tag, {**meta, "world_size": len(reports),
                                                                                   "files": files})
    outcome = [problem]
    dist.broadcast_object_list(outcome, src=0)
    if failed or outcome[0]:
        where = f"rank {failed[0]}: {failed[1]}" if failed else f"rank 0: {outcome[0]}"
        kept = f"'{LATEST}' still names {_read_latest(save_dir)}" if os.path.isfile(os.path.join(save_dir, LATEST)) \
            else "no earlier checkpoint there"
        raise ConfigError(f"--save {save_dir}: could not save {tag} ({where}); {free_space(save_dir)} there; "
                          f"{kept}, intact: free space (or fix the directory) and rerun to resume")


def _read_latest(save_dir: str) -> str:
    with open(os.path.join(save_dir, LATEST)) as f:
        return f.read().strip()


def _discard(save_dir: str, tag: str) -> None:
    """Remove what a failed save wrote (its space is what a full disk needs back)."""
    shutil.rmtree(os.path.join(save_dir, tag + PARTIAL), ignore_errors=True)


def _commit(save_dir: str, tag: str, manifest: dict) -> str | None:
    """Rank 0: manifest, <tag>.partial -> <tag> (an older <tag>, from a run that was rolled back, is replaced),
    then `latest` -> None, or why a step of it failed (the step is then left uncommitted)."""
    staging, final = os.path.join(save_dir, tag + PARTIAL), os.path.join(save_dir, tag)
    try:
        manifest_path = os.path.join(staging, MANIFEST)
        write_atomically(manifest_path, json.dumps(manifest))
        fault_point("manifest", 0, manifest_path)
        if os.path.exists(final):
            old = final + ".replaced"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, final)
        fsync_dir(save_dir)
        fault_point("latest", 0)
        write_atomically(os.path.join(save_dir, LATEST), tag)
    except OSError as err:
        _discard(save_dir, tag)
        return f"committing {tag} failed ({_write_failure(err, save_dir)})"
    return None


def incomplete_reason(tag_dir: str, rank: int, world: int) -> str | None:
    """Why the step in tag_dir cannot be resumed from, as far as this rank checks (the files written by the saved
    ranks r with r % world == rank, so that the ranks share the work and together check every file), or None.
    A step without a manifest (saved before manifests existed) is taken as complete: nothing says otherwise."""
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {MANIFEST} cannot be read: {_first_line(err)}"
    for name, size, writer in files:
        if writer % world != rank:
            continue
        file = os.path.join(tag_dir, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != size:
            return f"{name} holds {os.path.getsize(file)} of its {size} bytes"
    return None


def code_in(tag_dir: str, rank: int, world: int) -> str | None:
    """'<file> holds the Python object <name>' for the first file of this rank's share of tag_dir (every world-th
    .pt file, from the rank-th) whose pickle names anything weights-only loading refuses, or None. Only the
    pickle records are read: a crafted file is found, and said on every rank, before any load is tried."""
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in _deepspeed_classes()}
    names = sorted(os.path.relpath(os.path.join(folder, name), tag_dir)
                   for folder, _, files in os.walk(tag_dir) for name in files if name.endswith(".pt"))
    for name in names[rank::world]:
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(os.path.join(tag_dir, name))
        except Exception:  # noqa: BLE001 - not a zip file, damaged: its load says why
            continue
        # numpy arrays (random states written by older versions) rebuild as data: read_rng says what to do
        foreign = sorted(g for g in found if g not in allowed and not g.startswith(NUMPY_DATA))
        if foreign:
            return f"{name} holds the Python object {foreign[0]}"
    return None


def _deepspeed_classes() -> list:
    """The classes DeepSpeed 0.19's checkpoints pickle besides tensors and containers (listed with
    torch.serialization.get_unsafe_globals_in_checkpoint over ZeRO 0-3, fp32/bf16 and universal checkpoints).
    Unpickling them builds plain records (an enum, a (numel, start) pair, a loss scale): no code runs."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


@contextlib.contextmanager
def weights_only_loads():
    """Inside, every torch.load is weights-only, DeepSpeed's too (its loaders pass weights_only=False; torch's
    TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides that), with DeepSpeed's own classes allowed: a file that pickles
    anything else (e.g. a call of os.system) is refused with pickle.UnpicklingError before any of it runs."""
    key, previous = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_classes()):
            yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def rng_state() -> dict:
    """This process's random states as tensors and numbers (loadable weights-only)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():  # a GPU run (a CPU run on a machine with GPUs leaves CUDA alone)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


def read_rng(path: str) -> dict:
    """A rank's saved random state, weights-only; a damaged or foreign file is one ConfigError line."""
    try:
        with weights_only_loads():
            state = torch.load(path, weights_only=True)
        if not isinstance(state, dict) or not isinstance(state.get("python"), list):
            raise ValueError("not this project's random-state format")
        return state
    except Exception as err:  # noqa: BLE001 - any way of failing to read it is the same one line
        raise ConfigError(f"{path} cannot be read as a random state ({unpickling_reason(err)}); it may be damaged or "
                          "from an older version: add --no-load-rng to resume without it") from None


def unpickling_reason(err: BaseException) -> str:
    """One phrase for a failed torch.load: a refused class (a file that would run code when unpickled) is named."""
    refused = re.search(r"GLOBAL ([\w.]+)", str(err))  # "Unsupported global: GLOBAL x" or "... GLOBAL x whose module"
    if refused:
        return f"it holds the Python object {refused.group(1)}, which a checkpoint never needs; refused unread"
    return _first_line(err)
