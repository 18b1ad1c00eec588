"""Files that survive a crash or a power loss: fsync, atomic replacement, and directories probed before use."""
import os
import shutil
import tempfile


def fsync_file(path: str) -> None:
    """Flush a file's data to the disk (what this process and this client wrote of it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (a rename or a new file in it), where the filesystem allows."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # e.g. a filesystem that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; their renames are durable already
        pass
    finally:
        os.close(fd)


def temp_file_beside(path: str, suffix: str = "") -> tuple[int, str]:
    """(fd, name) of a new hidden file in path's directory, to be renamed onto path, with the permissions a
    plain open() would give (0666 less the umask): mkstemp's 0600 would leave a shared checkpoint or data
    cache unreadable to the rest of a team."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    umask = os.umask(0o022)  # read the umask (there is no call that only reads it) and put it back
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def write_atomically(path: str, text: str) -> None:
    """Replace `path` by `text`: readers see the old content or the new one, never a part (write, fsync, rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(directory)


def writable_dir_problem(path: str) -> str | None:
    """Create `path` if needed and write a probe file in it -> None, or why that fails (one phrase). A probe, not
    os.access: only a write tells a read-only filesystem, a quota or a root-squashed mount from a writable one."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        return err.strerror or str(err)
    return None


def free_bytes(path: str) -> float:
    """Bytes free on the filesystem holding path (its nearest existing ancestor); inf where unknown."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return float("inf")


def free_space(path: str) -> str:
    """'1.2 GB free' on the filesystem holding path."""
    free = free_bytes(path)
    if free == float("inf"):
        return "free space unknown"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if free >= size:
            return f"{free / size:.1f} {unit} free"
    return f"{free / 1e3:.0f} kB free"
