"""Where a bag may be written: the writer's mark and the safe ``--overwrite``.

A tool must never delete what it did not write. Every :class:`~.writer.BagWriter` bag
carries :data:`WRITER_MARK_KEY` in its metadata.yaml; ``--overwrite`` replaces only such a
bag (file by file, never a recursive delete) or an empty folder, and refuses anything else
with one line naming the path and the reason.
"""
from __future__ import annotations

import errno
from pathlib import Path

from .types import METADATA_MAX_BYTES, BagError, load_yaml_no_aliases, some

#: custom_data key every BagWriter bag carries in metadata.yaml: ``--overwrite`` only ever
#: replaces a bag that has it (or an empty folder)
WRITER_MARK_KEY = "clip2scene.writer"
WRITER_MARK = "clip2scene_ros BagWriter"


def _own_bag_files(path: Path) -> list[Path] | str:
    """The files of a bag :class:`BagWriter` wrote at ``path`` (metadata.yaml last), or the
    reason why ``path`` is not such a bag."""
    if path.is_symlink():
        return "it is a symbolic link"
    if not path.is_dir():
        return "it is a file, not a bag directory"
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return []
    meta = path / "metadata.yaml"
    if "metadata.yaml" not in entries or meta.is_symlink() or not meta.is_file():
        return f"it is not a rosbag2 directory (no metadata.yaml; it holds {some(entries)})"
    try:
        if meta.stat().st_size > METADATA_MAX_BYTES:
            raise ValueError("too large")
        info = load_yaml_no_aliases(meta.read_text())["rosbag2_bagfile_information"]
        custom = info.get("custom_data") or {}
        files = [str(f) for f in info.get("relative_file_paths") or []]
    except Exception as exc:  # noqa: BLE001 - any unreadable metadata: not provably ours
        return f"its metadata.yaml is unreadable ({type(exc).__name__})"
    if not isinstance(custom, dict) or custom.get(WRITER_MARK_KEY) != WRITER_MARK:
        return ("it is a rosbag2 bag this tool did not write (no "
                f"'{WRITER_MARK_KEY}' mark in metadata.yaml: recorded by another tool or an older version)")
    if any(Path(f).name != f or f in (".", "..", "metadata.yaml") for f in files):
        return "its metadata.yaml lists files outside the bag directory"
    extra = [e for e in entries if e != "metadata.yaml" and e not in files]
    if extra:
        return f"it holds files that are not part of the bag: {some(extra)}"
    out = []
    for f in files:
        fp = path / f
        if fp.is_symlink() or (fp.exists() and not fp.is_file()):
            return f"its storage file {f} is not a regular file"
        if fp.exists():
            out.append(fp)
    return out + [meta]


def check_output_bag(path: str | Path, overwrite: bool = False, what: str = "--out") -> None:
    """Raise :class:`BagError` unless a bag may be written at ``path``.

    Nothing is deleted here (see :func:`prepare_output_bag`): tools call this before doing
    any work, so a refused path costs nothing. ``path`` may be missing (its parent must be a
    directory or creatable), an empty directory, or — with ``overwrite`` — a bag this
    package's :class:`BagWriter` wrote: its metadata.yaml carries the writer's mark and the
    directory holds only the storage files metadata.yaml lists.
    """
    path = Path(path)
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise BagError(f"{what} {path}: cannot create it, {parent} is a file, not a directory")
            break
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return
    if not overwrite:
        kind = "a file" if path.is_file() else "a folder"
        raise BagError(f"{what} {path} exists already ({kind}); pass --overwrite to replace a bag "
                       "this tool wrote, or choose another path")
    own = _own_bag_files(path)
    if isinstance(own, str):
        raise BagError(f"{what} {path}: refusing to replace it with --overwrite: {own}. "
                       "Only a bag this tool wrote or an empty folder is replaced; move it away "
                       "or choose another path")


def prepare_output_bag(path: str | Path, overwrite: bool = False, what: str = "--out") -> None:
    """:func:`check_output_bag`, then remove the empty folder or the tool's own old bag (file by
    file, then the folder: never a recursive delete)."""
    path = Path(path)
    check_output_bag(path, overwrite, what)
    if not path.is_dir():
        return
    own = _own_bag_files(path)
    if isinstance(own, str):   # changed since the check: refuse
        raise BagError(f"{what} {path}: refusing to replace it: {own}")
    try:
        for f in own:
            f.unlink()
        path.rmdir()
    except OSError as exc:
        raise BagError(f"{what} {path}: cannot remove the old bag: {exc.strerror or exc}") from exc


def os_error_text(exc: OSError) -> str:
    """``disk full`` etc. in words, for one-line CLI errors."""
    if exc.errno == errno.ENOSPC:
        return "no space left on the device (disk full)"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return exc.strerror or str(exc)
