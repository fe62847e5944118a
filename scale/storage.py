"""Inputs and outputs on any file system pyarrow opens (s3://, gs://, hdfs://, file://, ...):
`runtime.batch.process`'s `files`, and SRC listings for such URIs.

Object-store paths travel as PurePosixPath (bucket/key): `plan_jobs` names their outputs by
`sodiff-run`'s rules. Writes go to a hidden temporary key, then move to the output's key, so
an output that exists is whole (as the local atomic writes).
"""
from __future__ import annotations

import fnmatch
import io
import re
import uuid
from pathlib import PurePath, PurePosixPath

from runtime.batch import LOCAL, candidate_name
from runtime.errors import ImageError

from .config import LIST_SUFFIXES
from .listfile import parse_list

URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
GLOB_CHARS = frozenset("*?[")


def is_uri(text: str) -> bool:
    return bool(URI.match(str(text)))


def open_uri(uri: str):
    """(pyarrow file system, path inside it) for `uri`; ValueError with one line."""
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        raise ValueError(f"{uri}: cannot open its file system ({str(e).splitlines()[0]})") \
            from None


class ArrowFiles:
    """`process`'s files on the pyarrow file system of a URI (picklable: it keeps the URI and
    opens the file system where it runs)."""

    def __init__(self, uri: str):
        self.uri = uri
        self._fs = None

    def __getstate__(self):
        return {"uri": self.uri, "_fs": None}

    @property
    def fs(self):
        if self._fs is None:
            self._fs = open_uri(self.uri)[0]
        return self._fs

    def exists(self, path: PurePath) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(str(path)).type != fs.FileType.NotFound

    def open(self, path: PurePath):
        return self.fs.open_input_file(str(path))

    def read(self, path: PurePath, max_pixels: int):
        from runtime.imageio import decode_image

        try:
            with self.open(path) as f:
                data = f.read()
        except (OSError, FileNotFoundError) as e:
            raise ImageError(f"{path}: cannot read it ({str(e).splitlines()[0]})") from None
        return decode_image(data, str(path), max_pixels)

    def write(self, path: PurePath, array, icc, exif, quality: int, overwrite: bool) -> None:
        from runtime.imageio import encode_image, output_format

        buf = io.BytesIO()
        encode_image(buf, array, output_format(path), icc, exif, quality)
        if not overwrite and self.exists(path):
            raise ImageError(f"{path} exists; pass --overwrite to replace it")
        parent = PurePosixPath(str(path)).parent
        tmp = str(parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
        self.fs.create_dir(str(parent), recursive=True)
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(buf.getvalue())
            self.fs.move(tmp, str(path))
        finally:
            if self.exists(PurePosixPath(tmp)):
                self.fs.delete_file(tmp)


class SplitFiles:
    """Inputs from one file system, outputs to another (either may be local)."""

    def __init__(self, src, dst):
        self.src, self.dst = src, dst

    def exists(self, path):
        return self.dst.exists(path)

    def open(self, path):
        return opener(self.dst)(path)

    def read(self, path, max_pixels):
        return self.src.read(path, max_pixels)

    def write(self, *args):
        self.dst.write(*args)


def opener(files):
    """How to open an output of `files` for reading (the local `open` for local files)."""
    return getattr(files, "open", None) or (lambda path: open(path, "rb"))


def files_for(src: str, dst: str):
    """The `files` of a job from SRC to DST (local paths or URIs)."""
    s = ArrowFiles(src) if is_uri(src) else LOCAL
    d = ArrowFiles(dst) if is_uri(dst) else LOCAL
    return LOCAL if s is LOCAL and d is LOCAL else SplitFiles(s, d)


def find_remote(src: str):
    """`find_inputs` for a URI: a folder (recursive), a glob, or a list file on that file
    system -> ([(path, root or None)], refused jobs)."""
    from pyarrow import fs as pafs
    from runtime.batch import Job

    filesystem, path = open_uri(src)
    info = filesystem.get_file_info(path)
    p = PurePosixPath(path)
    if info.type == pafs.FileType.Directory:
        return [(f, p) for f in _walk(filesystem, path)], []
    if info.type == pafs.FileType.File:
        if p.suffix.lower() not in LIST_SUFFIXES:
            return [(p, None)], []
        with filesystem.open_input_stream(path) as f:
            text = f.read().decode("utf-8-sig")
        entries = [e if e.startswith("/") else str(p.parent / e) for e in parse_list(text, src)]
        found, refused = [], []
        for e in entries:
            if filesystem.get_file_info(e).type == pafs.FileType.File:
                ep = PurePosixPath(e)
                found.append((ep, p.parent if ep.is_relative_to(p.parent) else None))
            else:
                refused.append(Job(PurePosixPath(e), None, f"{e}: no such file"))
        return found, refused
    if GLOB_CHARS & set(path):
        base = path[:min(path.index(c) for c in GLOB_CHARS if c in path)].rsplit("/", 1)[0]
        files = [(f, None) for f in _walk(filesystem, base, names_only=False)
                 if fnmatch.fnmatchcase(str(f), path) and not f.name.startswith(".")]
        return files, [] if files else [Job(p, None, f"{src}: no file matches this pattern")]
    return [], [Job(p, None, f"{src}: no such file or folder")]


def _walk(filesystem, base: str, names_only: bool = True) -> list[PurePosixPath]:
    from pyarrow import fs as pafs

    try:
        infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    except FileNotFoundError:
        return []
    files = sorted(PurePosixPath(i.path) for i in infos if i.type == pafs.FileType.File)
    return [f for f in files if candidate_name(f)] if names_only else files
