"""Folders and files that appear on disk complete or not at all.

Run directories and SavedModel versions are written into a hidden staging
folder beside their final place and renamed into place when complete. The
staging folder is made with `os.mkdir`, so it gets the user's umask like any
folder the user creates (`tempfile.mkdtemp` would make it 0700, and a TF
Serving process running as another user could not read the model). Whatever a
failed write created, parents included, is removed again.
"""

from __future__ import annotations

import os
import secrets
import shutil


def missing_parents(path: str) -> list[str]:
    """The folders `os.makedirs(path)` would create, outermost first.

    Args:
        path: a folder path.

    Returns:
        Absolute paths of `path` and its ancestors that do not exist yet.

    Example:

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> [os.path.relpath(p, root) for p in missing_parents(f"{root}/a/b")]
    ['a', 'a/b']
    """
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing[::-1]


def remove_empty(folders: list[str]) -> None:
    """Removes the folders of `missing_parents` again, innermost first, if empty.

    Args:
        folders: folders this process created (from `missing_parents`).

    Returns:
        None.

    Example:

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> created = missing_parents(f"{root}/a/b")
    >>> os.makedirs(f"{root}/a/b")
    >>> remove_empty(created)
    >>> os.listdir(root)
    []
    """
    for folder in reversed(folders):
        try:
            os.rmdir(folder)
        except OSError:
            return


def writable_folder(path: str, what: str) -> list[str]:
    """Creates `path` (with parents) and checks that files can be made in it.

    Args:
        path: the folder.
        what: what will be written there, for the error message.

    Returns:
        The folders that were created (see `missing_parents`).

    Raises:
        PermissionError: the folder cannot be created or written; nothing
            is left behind.

    Example:

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> [os.path.basename(p) for p in writable_folder(f"{root}/runs", "a run")]
    ['runs']
    """
    created = missing_parents(path)
    try:
        os.makedirs(path, exist_ok=True)
        os.rmdir(make_staging_folder(path, ".write-check-"))
    except OSError as error:
        remove_empty(created)
        reason = error.strerror or str(error)
        raise PermissionError(
            f"Cannot write {what} under {path!r}: {reason}. Choose a folder you can write to."
        ) from None
    return created


def make_staging_folder(parent: str, prefix: str) -> str:
    """Creates a new hidden folder `<parent>/<prefix><random>` with the user's umask.

    Args:
        parent: an existing folder.
        prefix: the name's start, e.g. `".partial-run-"`.

    Returns:
        The new folder's path.

    Example:

    >>> import tempfile
    >>> folder = make_staging_folder(tempfile.mkdtemp(), ".tmp-")
    >>> os.path.basename(folder).startswith(".tmp-")
    True
    """
    while True:
        path = os.path.join(parent, f"{prefix}{secrets.token_hex(4)}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def discard(folder: str, created: list[str] = ()) -> None:
    """Removes a staging folder and the empty parents a failed write created.

    Args:
        folder: the staging folder.
        created: parents from `writable_folder` / `missing_parents`.

    Returns:
        None.

    Example:

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> created = writable_folder(f"{root}/out", "a run")
    >>> discard(make_staging_folder(f"{root}/out", ".partial-"), created)
    >>> os.listdir(root)
    []
    """
    shutil.rmtree(folder, ignore_errors=True)
    remove_empty(list(created))


def move_into_place(folder: str, target: str, prefix: str = ".tmp-old-") -> None:
    """Renames a finished staging folder to `target`, replacing what is there.

    An existing `target` is first renamed into a hidden folder beside it
    (`prefix` + random), then deleted, so `target` is never half-written.

    Args:
        folder: the staging folder, complete.
        target: its final path.
        prefix: start of the hidden folder that briefly holds the old `target`.

    Returns:
        None.

    Example:

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> os.mkdir(f"{root}/run"); os.mkdir(f"{root}/.partial-run")
    >>> write_atomic(f"{root}/.partial-run/new", "x")
    >>> move_into_place(f"{root}/.partial-run", f"{root}/run")
    >>> os.listdir(root), os.listdir(f"{root}/run")
    (['run'], ['new'])
    """
    if not os.path.exists(target):
        os.rename(folder, target)
        return
    old = make_staging_folder(os.path.dirname(target), prefix)
    os.rename(target, os.path.join(old, os.path.basename(target)))
    os.rename(folder, target)
    shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: str, data: bytes | str) -> None:
    """Writes a file beside `path` and renames it into place, so readers never see half.

    Args:
        path: the file to write (replaced if it exists).
        data: bytes, or text (written as UTF-8).

    Returns:
        None.

    Example:

    >>> import tempfile
    >>> path = f"{tempfile.mkdtemp()}/models.config"
    >>> write_atomic(path, "model_config_list {}")
    >>> open(path).read()
    'model_config_list {}'
    """
    partial = f"{path}.{os.getpid()}.partial"
    try:
        with open(partial, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
