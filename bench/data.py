"""MNIST as four uint8 numpy arrays, guaranteed to be the real, uncorrupted dataset.

The files come from an explicit folder (`mnist_dir`, `--mnist-dir` or $MNIST_DIR), else the user cache, else a download
into the cache from the first mirror that serves a good copy. A file may be gzipped or not: each is parsed strictly as
IDX and checked by the SHA-256 of its decompressed content, which every faithful copy shares whatever its compression.
Every failure is an MNISTError whose one-line message names the file, what is wrong and how to fix it.

    python -m bench.data fetch [--mnist-dir DIR]                          download into the cache (or DIR), verify
    python -m bench.data verify [--mnist-dir DIR] [--no-verify-digests]   check the files load_mnist would read
"""
import argparse
import gzip
import hashlib
import math
import os
import struct
import sys
import tempfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import platformdirs
import pooch

from bench import cli
from bench.errors import BenchError

FILES = {  # name -> SHA-256 of the decompressed file
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MIRRORS = ("https://storage.googleapis.com/cvdf-datasets/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/")
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # IDX: 0x08 (unsigned bytes) then the number of dimensions, 3 or 1
SIDE = 28
GZIP_MAGIC = b"\x1f\x8b"
POINT_AT_FOLDER = "point --mnist-dir or MNIST_DIR at a folder that holds the four MNIST files (each .gz or not)"
REPLACE = "replace it with a faithful copy of MNIST (`python -m bench.data fetch --mnist-dir DIR` downloads one to DIR)"


class MNISTError(BenchError):
    """MNIST is missing, unreachable or not the real thing."""


class MNIST(NamedTuple):  # read-only views of the files' bytes
    train_images: np.ndarray  # (60000, 28, 28) uint8
    train_labels: np.ndarray  # (60000,) uint8
    test_images: np.ndarray  # (10000, 28, 28) uint8
    test_labels: np.ndarray  # (10000,) uint8


def default_cache_dir() -> Path:
    return platformdirs.user_cache_path("mnist-in-every-framework")


def mnist_folder(mnist_dir: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """Where MNIST is read from (`mnist_dir`, else $MNIST_DIR, else the user cache), and whether that was given; an
    MNISTError if a given one is no folder."""
    source = "--mnist-dir" if mnist_dir is not None else "MNIST_DIR"
    given = mnist_dir if mnist_dir is not None else os.environ.get("MNIST_DIR") or None
    if given is None:
        return default_cache_dir(), False
    folder = Path(given)
    if not folder.is_dir():
        what = ("a symbolic link that leads nowhere (dangling, or a loop)" if os.path.lexists(folder) and not
                os.path.exists(folder) else "a file, not a folder" if folder.exists() else "not there")
        raise MNISTError(f"{source} {str(folder)!r} is {what}; {POINT_AT_FOLDER}")
    return folder, True


def find(folder: Path, name: str) -> Path | None:
    """The copy of file `name` in `folder`, the uncompressed one first (it loads without decompressing)."""
    for path in (folder / name, folder / f"{name}.gz"):
        if os.path.lexists(path) and not os.path.exists(path):
            raise MNISTError(f"{path} is a symbolic link that leads nowhere (dangling, or a loop); {REPLACE}")
        if path.exists() and not path.is_file():
            raise MNISTError(f"{path} is not a file (a folder?); {REPLACE}")
        if path.is_file():
            return path
    return None


def content(raw: bytes, source: str, name: str, verify_digest: bool) -> bytes:
    """The decompressed bytes of a copy of MNIST file `name`, checked against its digest; `source` names the copy.
    Compressed or not is read from the gzip magic bytes, not the file name: a browser saves `*.gz` decompressed."""
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise MNISTError(f"{source} is a truncated or corrupt gzip file ({e}); {REPLACE}") from None
    if verify_digest and (digest := hashlib.sha256(raw).hexdigest()) != FILES[name]:
        raise MNISTError(f"{source}: the SHA-256 of its decompressed content is {digest}, not MNIST's {FILES[name]}; "
                         f"{REPLACE}, or for custom data in MNIST format pass verify_digests=False "
                         f"(--no-verify-digests)")
    return raw


def parse_idx(data: bytes, magic: int, source: str) -> np.ndarray:
    """IDX bytes -> a uint8 array of the shape its header declares, once the header is checked against the data."""
    kind, ndim = ("images" if magic == IMAGES_MAGIC else "labels"), magic & 0xFF
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise MNISTError(f"{source} holds {len(data)} bytes, too few for the {header}-byte header of IDX {kind}; "
                         f"{REPLACE}")
    if (found := struct.unpack_from(">I", data)[0]) != magic:
        raise MNISTError(f"{source}: magic number {found} where IDX {kind} have {magic}, so it is not an MNIST "
                         f"{kind} file; check the file name, or {REPLACE}")
    shape = struct.unpack_from(f">{ndim}I", data, 4)
    if shape[1:] not in ((), (SIDE, SIDE)):
        raise MNISTError(f"{source}: images are {shape[1]}x{shape[2]}, MNIST's are {SIDE}x{SIDE}; {REPLACE}")
    if (declared := math.prod(shape)) != len(data) - header:
        raise MNISTError(f"{source}: its header declares {shape[0]} {kind} ({declared} bytes) but {len(data) - header} "
                         f"bytes follow, so it is truncated or corrupt; {REPLACE}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_idx(folder: Path, name: str, verify_digest: bool) -> tuple[np.ndarray, Path]:
    if (path := find(folder, name)) is None:
        raise MNISTError(f"{name} is missing: neither {name} nor {name}.gz is in {folder}; {POINT_AT_FOLDER}, "
                         f"or leave both unset and run `python -m bench.data fetch` to download them into the cache")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise MNISTError(f"cannot read {path} ({e.strerror}); make it a readable file, or {POINT_AT_FOLDER}") from None
    data = content(raw, str(path), name, verify_digest)
    return parse_idx(data, IMAGES_MAGIC if "-images-" in name else LABELS_MAGIC, str(path)), path


def read_mnist(folder: Path, verify_digests: bool = True) -> MNIST:
    arrays = []
    for split in ("train", "t10k"):
        images, images_path = read_idx(folder, f"{split}-images-idx3-ubyte", verify_digests)
        labels, labels_path = read_idx(folder, f"{split}-labels-idx1-ubyte", verify_digests)
        if (out_of_range := np.flatnonzero(labels > 9)).size:
            first = out_of_range[0]
            raise MNISTError(f"{labels_path}: label {labels[first]} at index {first} is outside 0..9 "
                             f"({out_of_range.size} such labels); {REPLACE}")
        if len(labels) != len(images):
            raise MNISTError(f"{labels_path} holds {len(labels)} labels but {images_path} holds {len(images)} images; "
                             f"use the labels file that belongs to those images")
        arrays += [images, labels]
    return MNIST(*arrays)


def download(name: str, folder: Path, mirrors) -> None:
    """Download `name`.gz into `folder` from the first mirror that serves a copy with the right digest."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Streamed under a temporary name, renamed once verified: no interrupted or bad download passes as MNIST.
        handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
        os.close(handle)
    except OSError as e:
        raise MNISTError(f"cannot write into {folder} ({e}) to download {name}; make it writable, "
                         f"or {POINT_AT_FOLDER}") from None
    failures = []
    try:
        for base in mirrors:
            url = f"{base.rstrip('/')}/{name}.gz"
            try:
                print(f"Downloading {url}", file=sys.stderr)
                pooch.HTTPDownloader(progressbar=True, chunk_size=1 << 16)(url, temporary, None)
                raw = Path(temporary).read_bytes()
                content(raw, url, name, verify_digest=True)
                # A server may have sent it decompressed (Content-Encoding: gzip): named after what it holds.
                os.replace(temporary, folder / (f"{name}.gz" if raw[:2] == GZIP_MAGIC else name))
                return
            except MNISTError as e:  # its message names the URL
                failures.append(str(e))
            except OSError as e:  # requests' errors are OSErrors
                failures.append(f"{url}: {e}")
    finally:
        Path(temporary).unlink(missing_ok=True)
    raise MNISTError(f"could not download {name} and {folder} has no copy ({'; '.join(failures) or 'no mirrors'}); "
                     f"check the network or set MNIST_MIRRORS to working mirrors, or {POINT_AT_FOLDER}")


def download_missing(folder: Path, mirrors=None) -> None:
    mirrors = mirrors or os.environ.get("MNIST_MIRRORS", "").split() or MIRRORS
    for name in FILES:
        if find(folder, name) is None:
            download(name, folder, mirrors)


def fetch(cache_dir: str | os.PathLike | None = None, mirrors=None) -> Path:
    """Make sure `cache_dir` (default: the user cache) holds verified copies of the four files; return it."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    download_missing(folder, mirrors)
    read_mnist(folder, verify_digests=True)
    return folder


def load_mnist(mnist_dir: str | os.PathLike | None = None, *, verify_digests: bool = True, download: bool = True,
               mirrors=None) -> MNIST:
    """The four MNIST arrays from `mnist_dir`, else $MNIST_DIR, else the user cache (downloaded there if missing).

    `verify_digests=False` skips only the SHA-256 check, for custom data in MNIST format; structure is always checked.
    A given folder is never downloaded into: a file missing there is an error.
    """
    folder, given = mnist_folder(mnist_dir)
    if download and not given:
        download_missing(folder, mirrors)
    return read_mnist(folder, verify_digests)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.data", description="Download or check the MNIST files.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_command = commands.add_parser("fetch", help="download MNIST into the user cache (or --mnist-dir), verify it")
    fetch_command.add_argument("--mnist-dir", help="download into this folder instead of the user cache")
    verify_command = commands.add_parser("verify", help="check the MNIST files that the benchmarks would load")
    verify_command.add_argument("--mnist-dir", help="the folder to check (default: $MNIST_DIR, else the user cache)")
    verify_command.add_argument("--no-verify-digests", action="store_true",
                                help="skip the SHA-256 check, for custom data in MNIST format (structure is checked)")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(f"MNIST downloaded and verified in {fetch(args.mnist_dir)}")
            return 0
        folder, _ = mnist_folder(args.mnist_dir)
        mnist = read_mnist(folder, verify_digests=not args.no_verify_digests)
    except MNISTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    checked = "SHA-256 not checked" if args.no_verify_digests else "SHA-256 verified"
    print(f"MNIST OK in {folder}: train {len(mnist.train_images)} images ({SIDE}x{SIDE}) + {len(mnist.train_labels)} "
          f"labels, test {len(mnist.test_images)} images + {len(mnist.test_labels)} labels, {checked}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
