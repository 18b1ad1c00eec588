"""Checkpoints through DeepSpeed, plus what an exact resume needs: data position and random states, and the run's
configuration (megatron_sp_config.json, read by tools/convert_checkpoint.py).

save() writes a step atomically (checkpoint_files: every rank finishes, then `latest` moves); load() resumes from
the step `latest` names when it is complete on every rank, else from the newest complete step before it, reading
every file weights-only; what DeepSpeed cannot load is one line before it fails with a traceback."""
import dataclasses
import json
import os
import pickle
import re
import shutil
from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_sp.errors import ConfigError
from megatron_sp.training.checkpoint_files import (LATEST, PARTIAL, RNG_FILE, RecordingCheckpointEngine, code_in,
                                                   commit_step, incomplete_reason, read_rng, rng_state,
                                                   unpickling_reason, weights_only_loads)
from megatron_sp.training.durable import writable_dir_problem

RUN_FILE = "megatron_sp_config.json"  # the run's configuration and tokenizer, in each step directory
LATEST_UNIVERSAL = "latest_universal"  # names the universal checkpoint to load with "load_universal"
# What DeepSpeed's ds_to_universal needs in a checkpoint to convert it: no tensor or pipeline parallel patterns.
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}
STEP = re.compile(r"global_step(\d+)")


class Resumed(NamedTuple):
    iteration: int
    consumed_samples: int
    rng_state: dict | None  # to restore once everything that draws random numbers is built (None: keep the seed's)


def prepare_save_dir(save_dir: str, load_dir: str | None, finetune: bool = False) -> str | None:
    """Check --save at start -> None, or the one-line reason it cannot be used.

    Creates the directory now, so that a path that cannot hold checkpoints fails before training,
    not at the first save. A directory that already holds another run's checkpoints is refused
    unless this run resumes from it (--load the same directory): a fresh run would overwrite that
    run's step tags and its `latest`. A --finetune run starts afresh, so it never saves where it loads."""
    if problem := writable_dir_problem(save_dir):
        return problem
    loads_here = bool(load_dir) and os.path.realpath(load_dir) == os.path.realpath(save_dir)
    if finetune and loads_here:
        return ("is also --load: a --finetune run starts again at iteration 0 and would overwrite the "
                "checkpoints it starts from; choose another --save directory")
    if has_checkpoint(save_dir) and not loads_here:
        return (f"already holds checkpoints (latest {latest_tag(save_dir)}) that this run would overwrite; "
                f"resume with --load {save_dir}{' without --finetune' if finetune else ''}, "
                "or choose an empty --save directory")
    return None


def run_record(cfg, tokenizer) -> dict:
    """What a checkpoint's reader needs to rebuild the model and its tokenizer without the command line: the
    whole RunConfig, and the tokenizer (its files as absolute paths, its size and end-of-document id)."""
    d = cfg.data
    files = {key: os.path.abspath(path) for key, path in (("tokenizer_model", d.tokenizer_model),
                                                           ("vocab_file", d.vocab_file), ("merge_file", d.merge_file))
             if path}
    return {"config": dataclasses.asdict(cfg), "tokenizer": {"type": d.tokenizer_type, **files,
                                                              "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod}}


def read_run_record(tag_dir: str) -> dict | None:
    """The run_record a step directory holds; None for a checkpoint saved without one."""
    path = os.path.join(tag_dir, RUN_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def save(engine, save_dir: str, iteration: int, consumed_samples: int, rank: int, record: dict | None = None,
         keep: int | None = None) -> str:
    """Write global_step{iteration}/ on every rank (model, optimizer, schedule and data position via DeepSpeed, this
    rank's random state, and on rank 0 the run's record, run_record), commit it (then `latest` names it), and with
    `keep` delete all but the newest `keep` steps. Call on every rank; a failed write on any rank is the same
    ConfigError on all of them."""
    tag = f"global_step{iteration}"
    staging = os.path.join(save_dir, tag + PARTIAL)
    problem = [None]
    if rank == 0:  # a crashed earlier attempt at this step left files that must not mix with this one's
        shutil.rmtree(staging, ignore_errors=True)
        problem[0] = writable_dir_problem(staging)
    dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise ConfigError(f"--save {save_dir}: cannot create {staging} ({problem[0]})")
    recorder = RecordingCheckpointEngine(engine.checkpoint_engine, rank)
    if record is not None and rank == 0:
        recorder.write_json(record, os.path.join(staging, RUN_FILE))
    engine.checkpoint_engine = recorder
    client_state = {"iteration": iteration, "consumed_samples": consumed_samples, **UNIVERSAL_INFO}
    try:
        engine.save_checkpoint(save_dir, tag=tag + PARTIAL, client_state=client_state, save_latest=False)
    except OSError as err:
        # the one write of DeepSpeed's save that bypasses its checkpoint engine: rank 0 copying the recovery
        # scripts into save_dir, right before the barrier that ends the save, where the others now wait
        recorder.error = f"copying DeepSpeed's recovery scripts failed ({err.strerror or err})"
        dist.barrier()
    finally:
        engine.checkpoint_engine = recorder.inner
    recorder.save(rng_state(), os.path.join(staging, RNG_FILE.format(rank=rank)))
    commit_step(save_dir, tag, rank, recorder, {"iteration": iteration, "consumed_samples": consumed_samples})
    if keep and rank == 0:
        _remove_older_steps(save_dir, iteration, keep)
    return os.path.join(save_dir, tag)


def _remove_older_steps(save_dir: str, newest: int, keep: int) -> None:
    """--keep-checkpoints: of the committed steps up to `newest` (just committed), all but the newest `keep` go,
    and so do unfinished saves of earlier steps. Steps after `newest` (of a run rolled back to an earlier
    `latest`) are left: the next saves replace them."""
    steps = []
    for name in os.listdir(save_dir):
        match = STEP.fullmatch(name.removesuffix(PARTIAL))
        if match and int(match.group(1)) <= newest:
            if name.endswith(PARTIAL):
                shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
            else:
                steps.append((int(match.group(1)), name))
    for _, name in sorted(steps)[:-keep]:
        shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)


def has_checkpoint(load_dir: str | None) -> bool:
    return bool(load_dir) and os.path.isfile(os.path.join(load_dir, LATEST))


def latest_tag(checkpoint_dir: str, name: str = LATEST) -> str:
    """The step directory that checkpoint_dir's `latest` (or `latest_universal`) file names, checked to be a
    directory directly inside checkpoint_dir (a `latest` of '../other_run/global_step10' is refused)."""
    try:
        with open(os.path.join(checkpoint_dir, name), encoding="utf-8") as f:
            tag = f.read().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{os.path.join(checkpoint_dir, name)} cannot be read ({err})") from None
    plain = tag not in ("", ".", "..") and os.path.basename(tag) == tag and not (os.altsep and os.altsep in tag)
    inside = plain and os.path.dirname(os.path.realpath(os.path.join(checkpoint_dir, tag))) == \
        os.path.realpath(checkpoint_dir)
    if not inside:
        raise ConfigError(f"{os.path.join(checkpoint_dir, name)} holds {tag[:100]!r}, which is not a step directory "
                          f"inside {checkpoint_dir}; write the name of one there (e.g. global_step100)")
    return tag


def _step_of(tag: str) -> int | None:
    """global_step12 and global_step12_universal -> 12; None for another name."""
    number = tag.removesuffix("_universal").removeprefix("global_step")
    return int(number) if tag.startswith("global_step") and number.isdigit() else None


def _universal_tag(load_dir: str, run_stage: int) -> str:
    """The tag a --universal-checkpoint run loads, checked: there, for ZeRO 1/2 (where the CPU tests show it
    exact), and not older than `latest` (a rerun that kept the flag would silently lose the newer steps)."""
    convert = f"make one with: python tools/universal_checkpoint.py --load {load_dir}"
    if not os.path.isfile(os.path.join(load_dir, LATEST_UNIVERSAL)):
        raise ConfigError(f"--universal-checkpoint: {load_dir} has no {LATEST_UNIVERSAL}; {convert}")
    if run_stage not in (1, 2):
        raise ConfigError(f"--universal-checkpoint is supported for ZeRO stages 1 and 2 (this run: {run_stage}); "
                          "DeepSpeed's stage-3 load does not reproduce the saved run exactly")
    tag, newest = latest_tag(load_dir, LATEST_UNIVERSAL), latest_tag(load_dir)
    if (_step_of(newest) or 0) > (_step_of(tag) or 0):
        raise ConfigError(f"--universal-checkpoint: {LATEST_UNIVERSAL} names {tag}, older than {newest}; drop the "
                          f"flag to resume from {newest} on its own number of ranks, or {convert}")
    return tag


def _saved_layout(tag_dir: str) -> tuple[int, int, bool, int]:
    """(ZeRO stage, ranks per pipeline stage, bf16, pipeline stages) of the run that saved tag_dir, from the first
    stage's DeepSpeed model states (memory-mapped, so that the weights in that file are not read). DeepSpeed
    counts every rank of a stage (DP x SP) as data-parallel, and the stages as model-parallel ranks."""
    latest = os.path.join(os.path.dirname(tag_dir), LATEST)
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # stages 0-2, stage 3
    for name in names:
        path = os.path.join(tag_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            with weights_only_loads():
                try:
                    states = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
                except RuntimeError:  # torch's legacy format cannot be memory-mapped: read it whole
                    states = torch.load(path, weights_only=True, map_location="cpu")
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
            raise ConfigError(f"{path} cannot be read ({unpickling_reason(err)}): this checkpoint is damaged; "
                              f"point {latest} at an earlier step directory") from None
        config = states.get("ds_config") or {}
        return (config.get("zero_optimization", {}).get("stage", 0), states.get("dp_world_size", 0),
                bool(config.get("bf16", {}).get("enabled")), states.get("mp_world_size", 1))
    raise ConfigError(f"{tag_dir} holds no DeepSpeed model states ({' or '.join(names)}): this checkpoint is "
                      f"incomplete; point {latest} at an earlier step directory")


def _check_layout(load_dir: str, tag_dir: str, engine, load_optimizer: bool) -> None:
    """What DeepSpeed cannot load, as one line before it fails with a traceback (found by loading every pair
    of stages on CPU): a stage-3 checkpoint outside stage 3 or another one inside it, even weights only; and
    with the optimizer, stage 0 <-> 1/2, or ZeRO partitions (stages 1-3, or bf16) split for another number of
    ranks. Weights alone load across stages 0-2 and rank counts; the optimizer across stages 1 and 2, and across
    DP x SP splits of the same number of ranks."""
    stage, dp, bf16, pp = _saved_layout(tag_dir)
    run_stage, run_dp = engine.zero_optimization_stage(), engine.seq_dp_world_size
    if pp != engine.mp_world_size:  # each stage's files hold its own layers
        raise ConfigError(f"--load {load_dir}: saved by a pipeline of {pp} stage(s), and a stage loads only the "
                          f"layers it saved (this run: {engine.mp_world_size}); use --pipeline-model-parallel-size {pp}")
    where = f"--load {load_dir}: saved under ZeRO stage {stage}"
    if (stage == 3) != (run_stage == 3):
        raise ConfigError(f"{where}, and DeepSpeed loads a stage-3 checkpoint only under stage 3 and others only "
                          f"under stages 0-2 (this run: {run_stage}); use --zero-stage {stage}")
    if not load_optimizer:
        return
    fresh = "or add --no-load-optim to keep weights, iteration and data position with a fresh optimizer"
    if stage != run_stage and 0 in (stage, run_stage):
        raise ConfigError(f"{where}, whose optimizer state does not load under stage {run_stage}; "
                          f"resume with --zero-stage {stage}, {fresh}")
    if (stage > 0 or bf16) and dp != run_dp:
        per_stage, universal = (" per pipeline stage", "") if pp > 1 else (
            "", "convert it with tools/universal_checkpoint.py and add --universal-checkpoint, ")
        raise ConfigError(f"{where} by {dp} ranks{per_stage}; its optimizer state is split {dp} ways and DeepSpeed "
                          f"cannot re-split it for this run's {run_dp}: resume on as many (any DP x SP), "
                          f"{universal}{fresh}")


def _complete_tag(load_dir: str, rank: int) -> str:
    """The step `latest` names if it is complete on every rank, else the newest complete step before it (each
    step passed over is said in one line). Rank 0 lists the candidates, so that every rank checks the same ones."""
    named = latest_tag(load_dir)
    candidates = [named]
    if rank == 0 and (match := STEP.fullmatch(named)):
        older = [int(m.group(1)) for n in os.listdir(load_dir) if (m := STEP.fullmatch(n))
                 and int(m.group(1)) < int(match.group(1)) and os.path.isdir(os.path.join(load_dir, n))]
        candidates += [f"global_step{n}" for n in sorted(older, reverse=True)]
    shared = [candidates]
    dist.broadcast_object_list(shared, src=0)
    for tag in shared[0]:
        if not os.path.isdir(os.path.join(load_dir, tag)):
            found = sorted(n for n in os.listdir(load_dir) if os.path.isdir(os.path.join(load_dir, n)))
            raise ConfigError(f"--load {load_dir}: its '{LATEST}' names {tag!r}, which is not there "
                              f"(step directories: {', '.join(found) or 'none'}); point '{LATEST}' at one of them")
        reason = agreed(incomplete_reason(os.path.join(load_dir, tag), rank, dist.get_world_size()))
        if reason is None:
            return tag
        if rank == 0:
            print(f"note: --load {load_dir}: {tag} is incomplete ({reason}); passing over it", flush=True)
    raise ConfigError(f"--load {load_dir}: no complete checkpoint ({named} and every step before it are "
                      "incomplete); start afresh in another --save directory")


def load(engine, load_dir: str, rank: int, load_optimizer: bool = True, load_rng: bool = True) -> Resumed:
    """Resume from load_dir's newest complete step (_complete_tag), or its universal checkpoint. A checkpoint of
    another model shape is a one-line ConfigError naming the first parameter that does not fit; so are a ZeRO
    layout DeepSpeed cannot load (_check_layout), a damaged file, and a file that pickles anything but data.
    The random state is returned, not set: the caller restores it once everything that draws from it is built."""
    universal = engine.load_universal_checkpoint()
    tag = _universal_tag(load_dir, engine.zero_optimization_stage()) if universal else _complete_tag(load_dir, rank)
    tag_dir = os.path.join(load_dir, tag)
    if not os.path.isdir(tag_dir):  # a universal checkpoint named but not there
        raise ConfigError(f"--load {load_dir}: its '{LATEST_UNIVERSAL}' names {tag!r}, which is not there; "
                          f"convert again with tools/universal_checkpoint.py")
    if code := agreed(code_in(tag_dir, rank, dist.get_world_size())):
        raise ConfigError(f"--load {load_dir}: {tag}/{code}, which a checkpoint never needs; refused unread "
                          "(has the checkpoint been tampered with?)")
    if not universal:  # a universal checkpoint loads on any number of ranks
        _check_layout(load_dir, tag_dir, engine, load_optimizer)
    rng, problem = None, None
    try:
        rng = _rng_of(tag_dir, rank) if load_rng else None
    except ConfigError as err:
        problem = str(err)
    if problem := agreed(problem):  # one rank's damaged file stops all of them, before DeepSpeed's collectives
        raise ConfigError(problem)
    client = _load_engine(engine, load_dir, tag, load_optimizer)
    # DeepSpeed restores the optimizer's param groups, with the saved run's lr, after the schedule: set the
    # lr again from this run's schedule (it differs when e.g. --train-iters changed)
    engine.lr_scheduler.apply()
    return Resumed(client["iteration"], client["consumed_samples"], rng)


def agreed(problem: str | None) -> str | None:
    """Each rank's finding (None: nothing wrong) -> the first one found, the same on every rank."""
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p), None)


def _rng_of(tag_dir: str, rank: int) -> dict | None:
    path = os.path.join(tag_dir, RNG_FILE.format(rank=rank))
    if os.path.isfile(path):
        return read_rng(path)
    print(f"note: rank {rank}: {path} is missing; the random state is not restored "
          "(--no-load-rng says that is intended)", flush=True)
    return None


def _load_engine(engine, load_dir: str, tag: str, load_optimizer: bool) -> dict:
    """DeepSpeed's load of `tag`, every file weights-only -> its client state; failures as one line."""
    try:
        with weights_only_loads():
            path, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=load_optimizer,
                                                  load_lr_scheduler_states=load_optimizer)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        # torch's load_state_dict: "size mismatch for ...", "Missing key(s) ..."
        misfit = next((line.strip() for line in str(err).splitlines()
                       if line.strip().startswith(("size mismatch", "Missing key", "Unexpected key"))), None)
        if misfit is None:
            raise ConfigError(f"--load {load_dir}: {tag} cannot be read ({unpickling_reason(err)}); point "
                              f"{os.path.join(load_dir, LATEST)} at an earlier step directory") from None
        misfit = misfit if len(misfit) <= 200 else misfit[:197] + "..."
        raise ConfigError(f"--load {load_dir}: its checkpoint does not fit this model ({misfit.rstrip('.')}); "
                          "use the model flags of the run that saved it") from None
    if path is None:
        raise ConfigError(f"--load {load_dir}: DeepSpeed found no loadable checkpoint in {os.path.join(load_dir, tag)}")
    return client
