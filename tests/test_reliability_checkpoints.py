"""Checkpoints under faults, on forked CPU ranks with the default dropout: a rank killed at each phase of a save,
files cut short, a full disk, a file that carries code, a `latest` that leads outside, --keep-checkpoints, and
one run per --save directory. After each fault the next run resumes from the newest complete step and trains on
exactly as an uninterrupted run."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from megatron_sp.training.checkpoint_files import FAULT_ENV
from tests.distributed import run_ranks
from tests.runs import _train, flags, train


@pytest.fixture(scope="module")
def saved_at_2(corpus, tmp_path_factory):
    """(flags of a 4-step run at SP 2 under ZeRO 1 with dropout, its uninterrupted losses, a checkpoint of its
    first 2 steps)."""
    common = flags(corpus, "--sequence-parallel-size", "2", "--zero-stage", "1", "--global-batch-size", "4",
                   "--hidden-dropout", "0.1", "--save-interval", "2", iters=4)
    base = tmp_path_factory.mktemp("base") / "ckpt"
    train(2, [*common, "--save", str(base), "--exit-interval", "2"])
    return common, train(2, common), base


def _copy(base, tmp_path) -> str:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base, ckpt)
    return str(ckpt)


def _latest(ckpt) -> str:
    with open(os.path.join(ckpt, "latest")) as f:
        return f.read()


# (phase, rank) of a kill: each kind of file of a save, on one rank and on all, and rank 0's two commits.
KILLS = [("model_states", "0"), ("optim_states", "1"), ("optim_states", "all"), ("rng", "all"), ("manifest", "0"),
         ("latest", "0")]


@pytest.mark.parametrize("phase, rank", KILLS)
def test_a_rank_killed_while_saving_leaves_the_last_complete_step_to_resume(saved_at_2, tmp_path, phase, rank):
    common, uninterrupted, base = saved_at_2
    ckpt = _copy(base, tmp_path)
    argv = [*common, "--save", ckpt, "--load", ckpt]
    with pytest.raises(AssertionError, match="died|failed"):  # killed at step 4's save
        run_ranks(2, _train, argv, env={FAULT_ENV: f"{phase}:{rank}"}, timeout=600)
    assert _latest(ckpt) == "global_step2"
    assert os.path.isdir(os.path.join(ckpt, "global_step4" + (".partial" if phase != "latest" else "")))
    assert train(2, argv) == uninterrupted[2:]  # resumed at 2, also over a step 4 committed without `latest`
    assert _latest(ckpt) == "global_step4"
    assert sorted(n for n in os.listdir(ckpt) if n.startswith("global_step")) == ["global_step2", "global_step4"]


def test_a_step_cut_short_is_passed_over_for_the_one_before(saved_at_2, tmp_path, capfd):
    """A file shorter than the manifest says (a copy cut short, a disk error) makes its step incomplete: the run
    says so in one line and resumes from the step before; with no complete step left, one error line."""
    common, uninterrupted, base = saved_at_2
    ckpt = _copy(base, tmp_path)
    argv = [*common, "--save", ckpt, "--load", ckpt]
    train(2, [*argv, "--exit-interval", "4"])
    shard = os.path.join(ckpt, "global_step4", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    os.truncate(shard, 1000)
    capfd.readouterr()
    assert train(2, argv) == uninterrupted[2:]
    assert (f"note: --load {ckpt}: global_step4 is incomplete (zero_pp_rank_1_mp_rank_00_optim_states.pt holds "
            f"1000 of its ") in capfd.readouterr().out
    for step in ("global_step2", "global_step4"):
        os.truncate(os.path.join(ckpt, step, "rng_state_rank0.pt"), 10)
    with pytest.raises(AssertionError) as failed:
        train(2, argv)
    assert (f"ConfigError: --load {ckpt}: no complete checkpoint (global_step4 and every step before it are "
            "incomplete)") in str(failed.value)


def _full_disk_at_step_4(rank, world, argv):
    """torch.save raises ENOSPC for rank 1's optimizer shard of step 4, as a full disk does."""
    import errno
    import torch
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if rank == 1 and "global_step4" in str(path) and "optim_states" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)
    torch.save = save  # this forked rank's torch only
    return _train(rank, world, argv)


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(saved_at_2, tmp_path):
    common, uninterrupted, base = saved_at_2
    ckpt = _copy(base, tmp_path)
    argv = [*common, "--save", ckpt, "--load", ckpt]
    with pytest.raises(AssertionError) as failed:
        run_ranks(2, _full_disk_at_step_4, argv)
    said = str(failed.value)
    assert (f"ConfigError: --save {ckpt}: could not save global_step4 (rank 1: writing "
            "zero_pp_rank_1_mp_rank_00_optim_states.pt failed (no space left on device)); ") in said
    assert " free there; 'latest' still names global_step2, intact: free space" in said
    assert sorted(os.listdir(ckpt)) == ["global_step2", "latest", "zero_to_fp32.py", "zero_to_torch.py"]
    assert train(2, argv) == uninterrupted[2:]


def test_a_commit_that_fails_frees_what_the_step_wrote(tmp_path, monkeypatch):
    """Rank 0's manifest cannot be written (the disk filled between the ranks' files and the commit): the staging
    directory goes, its space being what a full disk needs back, and `latest` is untouched."""
    import errno
    from megatron_sp.training import checkpoint_files

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    staging = tmp_path / "global_step4.partial"
    staging.mkdir()
    (staging / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    monkeypatch.setattr(checkpoint_files, "write_atomically", full)
    said = checkpoint_files._commit(str(tmp_path), "global_step4", {"files": []})
    assert said == "committing global_step4 failed (no space left on device)"
    assert os.listdir(tmp_path) == []


FULL_DISK = """
import sys
sys.path.insert(0, {root!r})
from tests.distributed import run_ranks
from tests.runs import _train
try:
    run_ranks(2, _train, {argv!r})
except AssertionError as err:
    print("RESULT", str(err).strip().splitlines()[-1])
"""


def test_a_real_full_filesystem_while_saving(saved_at_2, tmp_path):
    """The same on a 900 kB tmpfs (one tiny checkpoint fits, two do not), where torch's writer fails in its own
    words; mounted in a user namespace, skipped where that is not allowed."""
    common, _, base = saved_at_2
    mount = tmp_path / "small"
    mount.mkdir()
    ckpt = str(mount / "ckpt")
    script = FULL_DISK.format(root=os.getcwd(), argv=[*common, "--save", ckpt, "--load", ckpt])
    shell = (f"mount -t tmpfs -o size=900k tmpfs {mount} && cp -r {base} {ckpt} && "
             f"{sys.executable} -c \"$0\" && echo RESULT $(cat {ckpt}/latest) $(ls {ckpt})")
    try:
        out = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", shell, script],
                             capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        pytest.skip("no unshare")
    if "mount" in out.stderr and out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()[:200]}")
    said, files = [line.removeprefix("RESULT ") for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert said.startswith(f"megatron_sp.errors.ConfigError: --save {ckpt}: could not save global_step4 (rank ")
    assert "failed (no space left on device)); " in said and " kB free there; 'latest' still names " in said
    assert files == "global_step2 global_step2 latest zero_to_fp32.py zero_to_torch.py"


class _Payload:
    """Unpickling this runs a shell command (what a crafted checkpoint file would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ["rng_state_rank1.pt", "mp_rank_00_model_states.pt",
                                  "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_file_that_would_run_code_is_refused_unread(saved_at_2, tmp_path, name):
    import torch
    common, _, base = saved_at_2
    ckpt = _copy(base, tmp_path)
    marker = tmp_path / "payload_ran"
    path = os.path.join(ckpt, "global_step2", name)
    torch.save({"module": _Payload(marker)}, path)
    manifest = os.path.join(ckpt, "global_step2", "manifest.json")
    with open(manifest) as f:
        contents = json.load(f)
    contents["files"] = [[n, os.path.getsize(path) if n == name else size, r] for n, size, r in contents["files"]]
    with open(manifest, "w") as f:
        json.dump(contents, f)  # a crafted file with a matching manifest: only the unpickler stands in the way
    with pytest.raises(AssertionError) as failed:
        train(2, [*common, "--save", ckpt, "--load", ckpt])
    assert (f"ConfigError: --load {ckpt}: global_step2/{name} holds the Python object posix.system, which a "
            "checkpoint never needs; refused unread") in str(failed.value)
    if name != "rng_state_rank1.pt":  # the export reads the weights (and ZeRO's partitions), never RNG states
        out = tmp_path / "hf"
        tool = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--load", ckpt, "--to-hf", str(out)],
                              capture_output=True, text=True)
        assert tool.returncode == 2 and len(tool.stderr.strip().splitlines()) == 1, tool.stderr
        assert "holds the Python object posix.system, which a checkpoint never needs" in tool.stderr
        assert not out.exists()
    assert not marker.exists()


def test_a_latest_that_leads_outside_load_is_refused(saved_at_2, tmp_path):
    common, _, base = saved_at_2
    ckpt = _copy(base, tmp_path)
    other = _copy(base, tmp_path / "other")
    for target in ("../other/ckpt/global_step2", other + "/global_step2", ".."):
        with open(os.path.join(ckpt, "latest"), "w") as f:
            f.write(target)
        with pytest.raises(AssertionError) as failed:
            train(2, [*common, "--save", ckpt, "--load", ckpt])
        assert (f"ConfigError: {ckpt}/latest holds {target!r}, which is not a step directory inside {ckpt}; "
                "write the name of one there (e.g. global_step100)") in str(failed.value)
        tool = subprocess.run([sys.executable, "tools/universal_checkpoint.py", "--load", ckpt],
                              capture_output=True, text=True)
        assert tool.returncode == 2 and tool.stderr.strip().startswith(f"error: {ckpt}/latest holds {target!r}")
    assert not os.path.exists(os.path.join(other, "global_step2_universal"))


def test_keep_checkpoints_keeps_the_newest_complete_steps(corpus, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    train(1, flags(corpus, "--save", ckpt, "--save-interval", "1", "--keep-checkpoints", "2", iters=4))
    assert sorted(os.listdir(ckpt)) == ["global_step3", "global_step4", "latest"]


def _lock(ckpt, host, pid, started="2026-01-01 00:00:00", process_start=None):
    os.makedirs(ckpt, exist_ok=True)
    with open(os.path.join(ckpt, "run.lock"), "w") as f:
        json.dump({"host": host, "pid": pid, "started": started, "process_start": process_start}, f)


def test_one_run_per_save_directory(corpus, tmp_path, capfd):
    """A second run on a --save directory in use is refused in one line; a lock whose process is gone is taken
    over with a note; one from another host is refused with the way out; a finished run leaves no lock."""
    import socket
    from megatron_sp.training.run_lock import _process_start
    ckpt = str(tmp_path / "ckpt")
    argv = flags(corpus, "--save", ckpt, "--load", ckpt, iters=1)
    lock = os.path.join(ckpt, "run.lock")
    _lock(ckpt, socket.gethostname(), os.getpid(), process_start=_process_start(os.getpid()))  # this test runs
    with pytest.raises(AssertionError) as failed:
        train(2, argv)
    assert (f"ConfigError: --save {ckpt}: another run uses it (pid {os.getpid()} on {socket.gethostname()}, "
            "started 2026-01-01 00:00:00); wait for it to end, or choose another --save") in str(failed.value)
    _lock(ckpt, "elsewhere.example", 4242)
    with pytest.raises(AssertionError) as failed:
        train(2, argv)
    assert (f"another run uses it (pid 4242 on elsewhere.example, started 2026-01-01 00:00:00, per {lock}); if "
            f"that run is over, delete {lock} and rerun") in str(failed.value)
    gone = subprocess.Popen(["true"])
    gone.wait()
    _lock(ckpt, socket.gethostname(), gone.pid)
    capfd.readouterr()
    assert len(train(2, argv)) == 1
    assert f"note: took over {lock} from a run that is no longer running (pid {gone.pid} on " in capfd.readouterr().out
    assert not os.path.exists(lock)
