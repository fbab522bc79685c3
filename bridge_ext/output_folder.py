"""Install output folders without ever losing data the tool did not write.

A folder is built under a staging name beside its target (same filesystem) and installed by
renames that never replace anything the run did not expect to find there:

* A target is refused when it is the filesystem root, the working directory or one of its
  parents, or a symbolic link (:func:`check_output_target`); two outputs may not nest
  (:func:`check_distinct_outputs`). ``overwrite`` replaces only a folder that holds nothing but
  the files of a Hugging Face model or PEFT adapter folder (an earlier output), unless it is
  ``"any"``; the notes say what was replaced and where the old folder went.
* Staging folders are made with ``mkdir`` (so they honour the umask) and named
  ``.<name>.partial-<pid>-<token>``. The running process holds an ``flock`` on each, so a later
  run to the same target can tell the leftovers of a killed run (lock free: removed, and said)
  from a conversion still running (lock held: left alone).
* At install, under an ``flock`` of each target's parent, every target must still be what was
  found when the run started: absent, or the very same folder (device, inode and ctime, so
  unchanged) when replacing. New folders go in with a no-replace rename (``renameat2(RENAME_NOREPLACE)``); an
  old folder is first renamed aside and put back if anything fails, and removed only once every
  new folder is in place. An old folder holding an entry that cannot be removed (immutable, or a
  read-only subfolder) is kept whole beside the target and named in the notes.
* Errors of the filesystem while writing (no space left, file size limit, read-only, permission
  denied) become :class:`~bridge_ext.errors.OutputWriteError` after the staging folders are removed.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import signal
import struct
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from bridge_ext.errors import ConvertError, OutputExistsError, OutputLocationError, OutputWriteError

STAGING_MARK = ".partial-"
REPLACED_MARK = ".replaced-"
_DEFERRED_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (file size limit, ulimit -f)",
    errno.EROFS: "read-only file system",
}
_FS_IOC_GETFLAGS = 0x80086601  # _IOR('f', 1, long) on 64-bit Linux
_UNDELETABLE_FLAGS = {0x10: "immutable", 0x20: "append-only"}


def require_an_output(model_dir: str | Path | None, adapter_dir: str | Path | None) -> None:
    """Refuses a call that would write nothing (ConvertError, a ValueError)."""
    if model_dir is None and adapter_dir is None:
        raise ConvertError("nothing to write: give model_dir, adapter_dir or both")


#: ``overwrite=OVERWRITE_ANY`` (``--overwrite-any``) replaces a folder whatever it holds.
OVERWRITE_ANY = "any"
# What an earlier output holds: a Hugging Face model folder (config, weights, index, the
# companion files bridge_ext copies) or a PEFT adapter folder (PEFT's save_pretrained adds README.md).
_OUTPUT_FILE = re.compile(r"config\.json|model\.safetensors(\.index\.json)?|model-\d+-of-\d+\.safetensors"
                          r"|adapter_config\.json|adapter_model\.safetensors|README\.md")


@dataclass(frozen=True)
class FoundTarget:
    """What a target was when the run started: absent (``identity`` None) or this inode, unchanged
    since; ``entries``: the names it held."""

    identity: tuple[int, int, int] | None
    empty: bool = True
    entries: tuple[str, ...] = ()


def foreign_entries(target: Path) -> list[str]:
    """The entries of folder ``target`` that no Hugging Face model or PEFT adapter folder holds
    (anything but regular files of those names: a subfolder, a link, ``.ssh``, ``notes.txt``)."""
    from bridge_ext.save import COMPANION_FILES
    from bridge_ext.tables import companion_file_names

    companions = {*COMPANION_FILES, *companion_file_names()}
    foreign = []
    for entry in sorted(os.scandir(target), key=lambda entry: entry.name):
        known = _OUTPUT_FILE.fullmatch(entry.name) or entry.name in companions
        if not known or not entry.is_file(follow_symlinks=False):
            foreign.append(entry.name + ("/" if entry.is_dir(follow_symlinks=False) else ""))
    return foreign


def _identity(path: Path) -> tuple[int, int, int] | None:
    """(device, inode, ctime): the ctime tells a folder from a new one given a freed inode's number,
    and changes when entries are added to or removed from it."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino, info.st_ctime_ns


def _is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_output_target(target: str | Path, overwrite: bool | str) -> FoundTarget:
    """Refuse a dangerous or occupied target; return what is there now.

    Raises OutputLocationError (root, working directory or a parent of it, a symlink),
    OutputExistsError (not empty and no ``overwrite``; with ``overwrite=True``, holding anything
    but the files of a Hugging Face model or PEFT adapter folder, see :func:`foreign_entries`;
    ``overwrite="any"`` replaces whatever it holds), OutputWriteError (parent not writable).
    """
    target = Path(target)
    if target.is_symlink():
        raise OutputLocationError(f"{target} is a symbolic link (to {os.readlink(target)}): give the real "
                                  "folder's path; links are not followed for outputs")
    resolved = target.resolve()
    if resolved == Path(resolved.anchor):
        raise OutputLocationError(f"{target} is the filesystem root: choose a folder for the output")
    cwd = Path.cwd().resolve()
    if cwd.is_relative_to(resolved):
        what = "the working directory" if cwd == resolved else f"a parent of the working directory {cwd}"
        raise OutputLocationError(f"{target} is {what}: an output folder is replaced as a whole; choose a new folder")
    found = FoundTarget(_identity(target), _is_empty_folder(target))
    if found.identity is not None and not found.empty and not overwrite:
        what = "is not empty" if target.is_dir() else "is not a folder"
        raise OutputExistsError(f"{target} exists and {what} (pass --overwrite to replace it)")
    if found.identity is not None and not found.empty:
        found = FoundTarget(found.identity, False, _check_replaceable(target, overwrite))
    ancestor = resolved.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputLocationError(f"cannot create {target}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputWriteError(f"cannot create {target}: {ancestor} is not writable (permission denied)", ancestor)
    return found


def _check_replaceable(target: Path, overwrite: bool | str) -> tuple[str, ...]:
    """The entries of the occupied ``target``, refused unless they are an earlier output (or ``overwrite`` is ``"any"``)."""
    if not target.is_dir():
        if overwrite != OVERWRITE_ANY:
            raise OutputExistsError(f"{target} exists and is not a folder: --overwrite replaces only an earlier "
                                    "output folder (pass --overwrite-any to replace it anyway)")
        return (target.name,)
    foreign = foreign_entries(target)
    if foreign and overwrite != OVERWRITE_ANY:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise OutputExistsError(f"{target} holds what no Hugging Face model or PEFT adapter folder holds ({shown}): "
                                "--overwrite replaces only an earlier output; move those away, or pass "
                                "--overwrite-any to replace the folder whatever it holds")
    return tuple(sorted(os.listdir(target)))


def check_distinct_outputs(*outputs: str | Path | None) -> None:
    """Refuse two outputs that are the same folder or where one is inside the other.

    Each folder is replaced as a whole when installed, so a nested one would be deleted by (or
    would delete) the other.
    """
    given = [(Path(p), Path(p).resolve()) for p in outputs if p is not None]
    for i, (first, first_resolved) in enumerate(given):
        for second, second_resolved in given[i + 1:]:
            if first_resolved == second_resolved:
                raise OutputLocationError(f"the output folders {first} and {second} are the same folder: give two")
            if second_resolved.is_relative_to(first_resolved) or first_resolved.is_relative_to(second_resolved):
                outer, inner = (first, second) if second_resolved.is_relative_to(first_resolved) else (second, first)
                raise OutputLocationError(f"the output folder {inner} is inside the output folder {outer}: "
                                          "each output replaces its folder as a whole; give folders side by side")


@contextmanager
def atomic_directory(target: str | Path, *, overwrite: bool | str = False, notes: list[str] | None = None) -> Iterator[Path]:
    """Yield a staging folder that becomes ``target`` when the block succeeds (see :func:`staged_folders`)."""
    with staged_folders([Path(target)], overwrite=overwrite, notes=notes) as (staging,):
        yield staging


@contextmanager
def staged_folders(targets: list[Path], *, overwrite: bool | str = False, found: dict[Path, FoundTarget] | None = None,
                   notes: list[str] | None = None) -> Iterator[list[Path]]:
    """Yield one staging folder per target; install them all when the block succeeds, or none.

    ``found``: what each target was when the caller checked it (default: checked now). Notes
    for the user (stale staging folders, a replaced folder kept) are appended to ``notes``.
    """
    notes = notes if notes is not None else []
    targets = [Path(t) for t in targets]
    check_distinct_outputs(*targets)
    found = {t: (found or {}).get(t) or check_output_target(t, overwrite) for t in targets}
    for target in targets:
        notes.extend(sweep_stale_staging(target))
    created = [folder for target in targets for folder in _missing_folders(target.parent)]
    with ExitStack() as locks:
        stagings: list[Path] = []
        try:
            for target in targets:
                with signals_deferred():
                    staging, lock = _make_staging(target)
                    stagings.append(staging)
                    locks.callback(os.close, lock)
            yield list(stagings)
            for staging in stagings:
                apply_umask(staging)
            asides = _install_all(list(zip(targets, stagings, strict=True)), found, overwrite)
            replaced = [(target, found[target].entries) for target in targets if found[target].identity is not None]
        except BaseException as error:
            for target, aside in getattr(error, "installed", ()):
                kept = f"; the folder it replaced is kept at {aside}: remove it (or move it back) yourself" \
                    if aside is not None else ""
                notes.append(f"{target} was installed, complete, before the signal arrived{kept}")
            for staging in stagings:
                shutil.rmtree(staging, ignore_errors=True)
            for folder in created:  # deepest first; kept if anything else is in it by now
                with suppress(OSError):
                    os.rmdir(folder)
            translated = output_write_error(error, targets)
            if translated is not None:
                raise translated from error
            raise
    for aside, (target, entries) in zip(asides, replaced, strict=True):
        kept = remove_replaced_folder(aside)
        held = f"{len(entries)} entries: {', '.join(entries[:6])}{', ...' if len(entries) > 6 else ''}"
        notes.extend(kept or ([f"replaced {target}: the folder that was there ({held}) was deleted"] if entries else []))


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first (created for the staging folder)."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _make_staging(target: Path) -> tuple[Path, int]:
    """A new folder beside ``target`` (mode 0777 less the umask, like mkdir), locked by this process."""
    parent = target.parent
    while True:
        staging = parent / f".{_stem(target)}{STAGING_MARK}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(staging)
            lock = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        except FileExistsError:
            continue
        except FileNotFoundError:
            continue  # another run's sweep took it for a stale folder between mkdir and lock: a new name
        except OSError as error:
            reason = _WRITE_ERRNOS.get(error.errno, error.strerror.lower())
            raise OutputWriteError(f"cannot create {target}: cannot create a folder in {parent}: {reason}",
                                   parent) from error
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)  # another run's sweep holds it and is removing it: a new name
            continue
        except OSError:
            pass  # a filesystem without flock: a later run cannot tell this folder is in use and leaves it
        if _identity(staging) is not None and _identity(staging)[:2] == _fd_identity(lock):
            return staging, lock
        os.close(lock)  # swept and gone before the lock was taken


def _fd_identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (a change would race other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def apply_umask(folder: Path) -> None:
    """Give ``folder`` and what it holds the modes ``mkdir`` and ``open`` give under the umask.

    Some writers create a file under a temporary name with mode 0600 and rename it (safetensors
    does); a serving account must be able to read what the umask allows it to.
    """
    umask = current_umask()
    os.chmod(folder, 0o777 & ~umask)
    for root, folders, files in os.walk(folder):
        for name in folders:
            os.chmod(os.path.join(root, name), 0o777 & ~umask, follow_symlinks=False)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def sweep_stale_staging(target: Path) -> list[str]:
    """Remove the staging folders of ``target`` that no live process holds; report the others."""
    parent, notes = target.parent, []
    if not parent.is_dir():
        return notes
    for entry in sorted(os.scandir(parent), key=lambda e: e.name):
        name, folder = entry.name, Path(entry.path)
        replaced = name.startswith(f".{_stem(target)}{REPLACED_MARK}")
        if not (replaced or name.startswith(f".{_stem(target)}{STAGING_MARK}")) or not entry.is_dir(follow_symlinks=False):
            continue
        owner = re.search(r"-(\d+)-[0-9a-f]+$", name)
        pid = owner.group(1) if owner else "unknown"
        lock = _lock(folder)
        if lock is _HELD:
            notes.append(f"{folder} is being written by a running conversion (pid {pid}): left alone")
        elif lock is None:
            notes.append(f"{folder} was left by a conversion (pid {pid}); without file locks here it cannot "
                         "be told whether that run is over: left alone, remove it if it is")
        elif replaced:
            os.close(lock)
            notes.append(f"{folder} holds the folder a killed run (pid {pid}) was replacing: kept, remove it "
                         "(or move it back) yourself")
        else:
            try:
                shutil.rmtree(folder, ignore_errors=True)
            finally:
                os.close(lock)
            notes.append(f"removed {folder}: an unfinished staging folder of {target} left by a killed run (pid {pid})")
    return notes


_HELD = -1


def _lock(folder: Path) -> int | None:
    """An fd holding ``folder``'s flock; ``_HELD`` when another open file holds it (a live run); None
    when it cannot be told (no such folder any more, no file locks on this filesystem)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        return _HELD if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
    return fd


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT / SIGTERM / SIGHUP back (delivered on exit) so a rename sequence is never cut in two."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # The mask holds back signals sent to this thread; one sent to the process may be delivered to
    # another thread (a read-ahead thread), whose Python handler would still run here at once: Python
    # handlers are replaced by ones that note the signal, which is raised again on exit.
    noted: list[int] = []
    handlers = {number: signal.getsignal(number) for number in _DEFERRED_SIGNALS}
    for number, handler in handlers.items():
        if callable(handler):
            signal.signal(number, lambda received, _frame: noted.append(received))
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        for number, handler in handlers.items():
            if callable(handler):
                signal.signal(number, handler)
        for number in dict.fromkeys(noted):
            signal.raise_signal(number)


@contextmanager
def _parent_locks(targets: list[Path]) -> Iterator[None]:
    """flock every target's parent (in inode order: two runs never wait on each other crosswise)."""
    parents = {}
    for target in targets:
        parents.setdefault(_identity(target.parent)[:2], target.parent)
    fds = []
    try:
        for _, parent in sorted(parents.items()):
            fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass  # no flock here: the no-replace renames still refuse what appeared
        yield
    finally:
        for fd in fds:
            os.close(fd)


def _install_all(pairs: list[tuple[Path, Path]], found: dict[Path, FoundTarget], overwrite: bool | str) -> list[Path]:
    """Rename every staging folder onto its target, or none; return the replaced folders set aside."""
    done: list[tuple[Path, Path | None]] = []
    installed = False
    try:
        with _parent_locks([target for target, _ in pairs]), signals_deferred():
            try:
                for target, staging in pairs:
                    done.append((target, _install(target, staging, found[target], overwrite)))
            except BaseException:
                for target, aside in reversed(done):  # put the old state back, newest first
                    _uninstall(target, aside)
                raise
            installed = True
    except BaseException as error:
        if installed:  # a signal held back during the renames arrives once all are done: say so
            error.installed = done  # type: ignore[attr-defined]
        raise
    return [aside for _, aside in done if aside is not None]


def _install(target: Path, staging: Path, found: FoundTarget, overwrite: bool | str) -> Path | None:
    if _identity(target) != found.identity:
        what = "appeared" if found.identity is None else "changed"
        raise OutputExistsError(f"{target} {what} during the conversion (another run or process wrote it): "
                                "it was left untouched and nothing was installed")
    if found.identity is None:
        try:
            rename_noreplace(staging, target)
        except FileExistsError:
            raise OutputExistsError(f"{target} appeared during the conversion: it was left untouched and "
                                    "nothing was installed") from None
        return None
    aside = _aside_name(target)
    rename_noreplace(target, aside)
    # the rename itself sets the ctime: the inode tells whether the checked folder is what moved
    if _identity(aside)[:2] != found.identity[:2] or (not overwrite and not _is_empty_folder(aside)):
        rename_noreplace(aside, target)
        raise OutputExistsError(f"{target} changed during the conversion: it was left untouched and nothing "
                                "was installed")
    try:
        rename_noreplace(staging, target)
    except BaseException:
        rename_noreplace(aside, target)
        raise
    return aside


def _uninstall(target: Path, aside: Path | None) -> None:
    """Undo one :func:`_install`: the new folder goes back to a staging name (removed), the old one back."""
    removed = _aside_name(target, STAGING_MARK)
    rename_noreplace(target, removed)
    if aside is not None:
        rename_noreplace(aside, target)
    shutil.rmtree(removed, ignore_errors=True)


def _aside_name(target: Path, mark: str = REPLACED_MARK) -> Path:
    return target.parent / f".{_stem(target)}{mark}{os.getpid()}-{secrets.token_hex(4)}"


# A file name has at most 255 bytes; a staging name adds a dot, a mark, a pid and a token (< 40).
_MAX_STEM_BYTES = 200


def _stem(target: Path) -> str:
    """The target's name as its staging and set-aside folders begin: whole when short, else cut
    to fit and told apart by a hash of the whole name."""
    encoded = os.fsencode(target.name)
    if len(encoded) <= _MAX_STEM_BYTES:
        return target.name
    digest = hashlib.sha256(encoded).hexdigest()[:12]
    return os.fsdecode(encoded[:_MAX_STEM_BYTES - 13]) + "~" + digest


def remove_replaced_folder(aside: Path) -> list[str]:
    """Remove a replaced folder (or file), unless an entry in it cannot be removed: then keep it whole."""
    if not aside.is_dir() or aside.is_symlink():
        aside.unlink()
        return []
    blocker = first_undeletable_entry(aside)
    if blocker is not None:
        return [f"the replaced folder was kept whole at {aside}: {blocker}; remove it yourself"]
    failures: list[str] = []
    lock = _lock(aside)  # a run sweeping stale folders meanwhile sees this one is in use
    try:
        shutil.rmtree(aside, onerror=lambda _function, path, info: failures.append(f"{path} ({info[1]})"))
    finally:
        if lock is not None and lock != _HELD:
            os.close(lock)
    if failures:
        return [f"the replaced folder could not be removed entirely; what is left is at {aside}: {', '.join(failures)}"]
    return []


def first_undeletable_entry(tree: Path) -> str | None:
    """The first entry of ``tree`` that removing the tree would fail on, said in words; None if none."""
    for folder, subfolders, files in os.walk(tree):
        if (subfolders or files) and os.geteuid() != 0 and not os.access(folder, os.W_OK | os.X_OK):
            return f"{folder} is not writable, so its entries cannot be removed"
        for name in (*subfolders, *files):
            flag = _undeletable_flag(Path(folder) / name)
            if flag is not None:
                return f"{Path(folder) / name} is {flag}"
    return None


def _undeletable_flag(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None  # a symlink, a socket...: flags cannot be set on them
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(8))[:4])[0]
    except OSError:
        return None  # the filesystem has no such flags
    finally:
        os.close(fd)
    return next((word for bit, word in _UNDELETABLE_FLAGS.items() if flags & bit), None)


def _load_renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def rename_noreplace(source: Path, destination: Path) -> None:
    """Rename ``source`` to ``destination``; FileExistsError if ``destination`` exists, even as an empty folder.

    Linux ``renameat2(RENAME_NOREPLACE)`` decides atomically. Where it is missing (another OS, a
    filesystem without it) an existence check precedes ``os.rename``; callers hold the parent's
    flock, and a folder renamed onto a non-empty folder fails anyway.
    """
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(destination), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(source), None, str(destination))
    if os.path.lexists(destination):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(destination))
    os.rename(source, destination)


def output_write_error(error: BaseException, targets: list[Path]) -> OutputWriteError | None:
    """``error`` as an OutputWriteError when the filesystem refused a write of an output; else None."""
    if isinstance(error, OutputWriteError) or not isinstance(error, Exception):
        return None
    code, filename = _errno_of(error), getattr(error, "filename", None)
    if code is None:
        return None
    if code not in _WRITE_ERRNOS and not (filename is not None and _is_output_path(Path(filename), targets)):
        return None
    where = f" (writing {filename})" if filename else ""
    reason = _WRITE_ERRNOS.get(code, os.strerror(code).lower())
    names = ", ".join(str(t) for t in targets)
    return OutputWriteError(f"cannot write {names}: {reason}{where}; nothing was installed and the staging "
                            "folders were removed", Path(filename) if filename else None)


def _is_output_path(path: Path, targets: list[Path]) -> bool:
    """``path`` is inside a target, or is (inside) one of its staging or set-aside folders."""
    path = Path(os.path.abspath(path))
    for target in targets:
        target = Path(os.path.abspath(target))
        if path.is_relative_to(target):
            return True
        relative = path.relative_to(target.parent) if path.is_relative_to(target.parent) else None
        if relative is not None and relative.parts and relative.parts[0].startswith(f".{_stem(target)}."):
            return True
    return False


def _errno_of(error: BaseException) -> int | None:
    if isinstance(error, OSError):
        return error.errno
    # safetensors' Rust writer reports I/O failures as SafetensorError("... (os error 27)")
    match = re.search(r"os error (\d+)\)|code: (\d+)", str(error)) if type(error).__name__ == "SafetensorError" else None
    return int(match.group(1) or match.group(2)) if match else None
