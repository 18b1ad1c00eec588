"""Checkpoints through DeepSpeed, plus what an exact resume needs: data position and RNG states, and the run's
configuration (megatron_sp_config.json, read by tools/convert_checkpoint.py)."""
import dataclasses
import json
import os
import pickle
import random

import numpy as np
import torch

from megatron_sp.errors import ConfigError

RNG_FILE = "rng_state_rank{rank}.pt"
RUN_FILE = "megatron_sp_config.json"  # the run's configuration and tokenizer, in each step directory
LATEST = "latest"  # DeepSpeed's file naming the newest step directory
LATEST_UNIVERSAL = "latest_universal"  # and the universal checkpoint to load with "load_universal"
# What DeepSpeed's ds_to_universal needs in a checkpoint to convert it: no tensor or pipeline parallel patterns.
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def prepare_save_dir(save_dir: str, load_dir: str | None, finetune: bool = False) -> str | None:
    """Check --save at start -> None, or the one-line reason it cannot be used.

    Creates the directory now, so that a path that cannot hold checkpoints fails before training,
    not at the first save. A directory that already holds another run's checkpoints is refused
    unless this run resumes from it (--load the same directory): a fresh run would overwrite that
    run's step tags and its `latest`. A --finetune run starts afresh, so it never saves where it loads."""
    try:
        os.makedirs(save_dir, exist_ok=True)
    except OSError as err:
        return err.strerror or str(err)
    if not os.access(save_dir, os.W_OK | os.X_OK):
        return "not writable"
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


def save(engine, save_dir: str, iteration: int, consumed_samples: int, rank: int, record: dict | None = None) -> str:
    """Write global_step{iteration}/ (model, optimizer, schedule via DeepSpeed), this rank's RNG, and (rank 0)
    the run's record (run_record)."""
    tag = f"global_step{iteration}"
    if record is not None and rank == 0:
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, tag, RUN_FILE), "w") as f:
            json.dump(record, f, indent=1)
    client_state = {"iteration": iteration, "consumed_samples": consumed_samples, **UNIVERSAL_INFO}
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state)
    torch.save(_rng_state(), os.path.join(save_dir, tag, RNG_FILE.format(rank=rank)))
    return os.path.join(save_dir, tag)


def has_checkpoint(load_dir: str | None) -> bool:
    return bool(load_dir) and os.path.isfile(os.path.join(load_dir, LATEST))


def latest_tag(checkpoint_dir: str, name: str = LATEST) -> str:
    """The step directory name that checkpoint_dir's `latest` (or `latest_universal`) file holds."""
    with open(os.path.join(checkpoint_dir, name)) as f:
        return f.read().strip()


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
            try:
                states = torch.load(path, mmap=True, weights_only=False, map_location="cpu")
            except RuntimeError:  # torch's legacy format cannot be memory-mapped: read it whole
                states = torch.load(path, weights_only=False, map_location="cpu")
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
            reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
            raise ConfigError(f"{path} cannot be read ({reason}): this checkpoint is damaged; "
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


def load(engine, load_dir: str, rank: int, load_optimizer: bool = True, load_rng: bool = True) -> tuple[int, int]:
    """Resume from the latest tag in load_dir -> (iteration, consumed_samples). A checkpoint of another
    model shape is a one-line ConfigError naming the first parameter that does not fit; so is a `latest`
    that names a step directory which is not there, and a ZeRO layout DeepSpeed cannot load (_check_layout)."""
    universal = engine.load_universal_checkpoint()
    tag = _universal_tag(load_dir, engine.zero_optimization_stage()) if universal else latest_tag(load_dir)
    tag_dir = os.path.join(load_dir, tag)
    if not tag or not os.path.isdir(tag_dir):
        found = sorted(n for n in os.listdir(load_dir) if os.path.isdir(os.path.join(load_dir, n)))
        name = LATEST_UNIVERSAL if universal else LATEST
        raise ConfigError(f"--load {load_dir}: its '{name}' names {tag!r}, which is not there "
                          f"(step directories: {', '.join(found) or 'none'}); point '{name}' at one of them")
    if not universal:  # a universal checkpoint loads on any number of ranks
        _check_layout(load_dir, tag_dir, engine, load_optimizer)
    try:
        path, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=load_optimizer,
                                              load_lr_scheduler_states=load_optimizer)
    except RuntimeError as err:  # torch's load_state_dict: "size mismatch for ...", "Missing key(s) ..."
        misfit = next((line.strip() for line in str(err).splitlines()
                       if line.strip().startswith(("size mismatch", "Missing key", "Unexpected key"))), None)
        if misfit is None:
            raise
        misfit = misfit if len(misfit) <= 200 else misfit[:197] + "..."
        raise ConfigError(f"--load {load_dir}: its checkpoint does not fit this model ({misfit.rstrip('.')}); "
                          "use the model flags of the run that saved it") from None
    if path is None:
        raise ConfigError(f"--load {load_dir}: DeepSpeed found no loadable checkpoint in {tag_dir}")
    # DeepSpeed restores the optimizer's param groups, with the saved run's lr, after the schedule: set the
    # lr again from this run's schedule (it differs when e.g. --train-iters changed)
    engine.lr_scheduler.apply()
    rng_file = os.path.join(tag_dir, RNG_FILE.format(rank=rank))
    if load_rng and os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    elif load_rng:
        print(f"note: rank {rank}: {rng_file} is missing; the random state is not restored "
              "(--no-load-rng says that is intended)", flush=True)
    return client["iteration"], client["consumed_samples"]
