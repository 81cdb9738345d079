"""bench.data on the real MNIST files: loading, downloading over a local HTTP mirror, every bad input, the CLI."""
import gzip
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from bench.data import FILES, MNIST, MNISTError, default_cache_dir, fetch, load_mnist
from commands import REPO

TRAIN_CLASS_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path, monkeypatch):
    """No test sees the user's MNIST_DIR, mirrors or cache: the cache is a fresh folder under tmp_path."""
    monkeypatch.delenv("MNIST_DIR", raising=False)
    monkeypatch.delenv("MNIST_MIRRORS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(scope="module")
def shared_mnist(mnist_dir, tmp_path_factory) -> Path:
    """The real MNIST as the four .gz files that mirrors serve: the given folder (conftest.py), or a gzipped copy."""
    folder = Path(mnist_dir)
    if all((folder / f"{name}.gz").is_file() for name in FILES):
        return folder
    copy = tmp_path_factory.mktemp("mnist-gz")
    for name in FILES:
        (copy / f"{name}.gz").write_bytes(gzip.compress((folder / name).read_bytes(), compresslevel=1))
    return copy


@pytest.fixture(scope="module")
def mnist(shared_mnist) -> MNIST:
    return load_mnist(shared_mnist)


def copy_of(shared_mnist, folder: Path) -> Path:
    shutil.copytree(shared_mnist, folder)
    return folder


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/"


class MirrorHandler(BaseHTTPRequestHandler):
    """Serves /MODE/NAME.gz: MODE good, corrupt (one byte flipped) or cut (full Content-Length, half the bytes)."""

    def __init__(self, *args, files, requests, **kwargs):
        self.files, self.requests = files, requests
        super().__init__(*args, **kwargs)

    def do_GET(self):
        self.requests.append(self.path)
        mode, _, file_name = self.path.strip("/").partition("/")
        body = self.files.get(file_name)
        if body is None or mode not in ("good", "corrupt", "cut"):
            return self.send_error(404)
        if mode == "corrupt":
            body = body[: len(body) // 2] + bytes([body[len(body) // 2] ^ 0xFF]) + body[len(body) // 2 + 1:]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if mode == "cut" else body)  # HTTP/1.0: the connection closes after

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def mirror(shared_mnist):
    """A real HTTP server on 127.0.0.1 that serves the real .gz files; yields (base URL, list of requested paths)."""
    files = {f"{name}.gz": (shared_mnist / f"{name}.gz").read_bytes() for name in FILES}
    requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(MirrorHandler, files=files, requests=requests))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", requests
    server.shutdown()
    server.server_close()


def check_real(mnist: MNIST):
    assert [a.shape for a in mnist] == [(60000, 28, 28), (60000,), (10000, 28, 28), (10000,)]
    assert all(a.dtype == np.uint8 for a in mnist)
    assert np.bincount(mnist.train_labels, minlength=10).tolist() == TRAIN_CLASS_COUNTS
    assert np.bincount(mnist.test_labels, minlength=10).tolist() == TEST_CLASS_COUNTS


# --- The real data ------------------------------------------------------------------------------------------------
def test_real_data_loads_with_digests_verified(mnist):
    check_real(mnist)  # load_mnist verifies digests by default: getting here means they matched


def test_uncompressed_files_load_the_same(mnist, shared_mnist, tmp_path):
    for name in FILES:
        (tmp_path / name).write_bytes(gzip.decompress((shared_mnist / f"{name}.gz").read_bytes()))
    assert all(np.array_equal(a, b) for a, b in zip(load_mnist(tmp_path), mnist))


def test_mnist_dir_environment_variable_is_honoured(mnist, shared_mnist, monkeypatch):
    monkeypatch.setenv("MNIST_DIR", str(shared_mnist))
    assert np.array_equal(load_mnist(download=False).test_labels, mnist.test_labels)


def test_loading_costs_little_beyond_decompressing_and_hashing(shared_mnist):
    """Parsing and checking stay vectorized: a load costs at most twice the work it cannot avoid (gunzip and SHA-256 of
    the four files), measured side by side in this process, so the bound holds on a slow or busy machine too."""
    def unavoidable():
        for name in FILES:
            hashlib.sha256(gzip.decompress((shared_mnist / f"{name}.gz").read_bytes())).digest()

    def fastest(work) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            work()
            times.append(time.perf_counter() - start)
        return min(times)

    floor, load = fastest(unavoidable), fastest(lambda: load_mnist(shared_mnist))
    print(f"load_mnist {load:.3f} s, gunzip + SHA-256 of the same files {floor:.3f} s")
    assert load <= 2 * floor


# --- Downloads over HTTP ------------------------------------------------------------------------------------------
def test_cache_is_the_project_folder_under_xdg_cache_home(tmp_path):
    assert default_cache_dir() == tmp_path / "xdg-cache" / "mnist-in-every-framework"


def test_download_falls_back_from_a_closed_port_to_the_next_mirror(mirror, tmp_path, monkeypatch, capsys):
    url, requests = mirror
    monkeypatch.setenv("MNIST_MIRRORS", f"{closed_port_url()} {url}/good/")
    check_real(load_mnist())
    assert sorted(p.name for p in default_cache_dir().iterdir()) == sorted(f"{name}.gz" for name in FILES)
    assert "Downloading" in capsys.readouterr().err
    requests.clear()
    check_real(load_mnist())  # the second load reads the cache
    assert requests == []


def test_download_falls_back_from_a_corrupt_file_to_the_next_mirror(mirror, tmp_path):
    url, requests = mirror
    requests.clear()
    cache = fetch(tmp_path / "fetched", mirrors=[f"{url}/corrupt/", f"{url}/good/"])
    check_real(load_mnist(cache))
    assert requests == [f"/{mode}/{name}.gz" for name in FILES for mode in ("corrupt", "good")]


def test_cut_off_download_leaves_nothing_that_passes_as_valid(mirror):
    url, _ = mirror
    with pytest.raises(MNISTError, match="could not download train-images-idx3-ubyte") as error:
        load_mnist(mirrors=[f"{url}/cut/"])
    assert "MNIST_DIR" in str(error.value)
    assert list(default_cache_dir().iterdir()) == []
    check_real(load_mnist(mirrors=[f"{url}/good/"]))  # a later load downloads afresh


def test_no_network_and_no_local_copy_tells_about_mnist_dir():
    with pytest.raises(MNISTError, match="MNIST_DIR") as error:
        load_mnist(mirrors=[closed_port_url()])
    assert "--mnist-dir" in str(error.value) and "train-images-idx3-ubyte" in str(error.value)
    with pytest.raises(MNISTError, match="MNIST_DIR"):
        load_mnist(download=False)


def test_a_given_folder_is_never_downloaded_into(mirror, tmp_path, monkeypatch):
    url, requests = mirror
    requests.clear()
    monkeypatch.setenv("MNIST_MIRRORS", f"{url}/good/")
    with pytest.raises(MNISTError, match=f"train-images-idx3-ubyte.gz is in {tmp_path}"):
        load_mnist(tmp_path)
    assert list(tmp_path.iterdir()) == []  # not even the cache was created
    assert requests == []


# --- Bad inputs, built as small synthetic IDX files ---------------------------------------------------------------
def idx(magic: int, shape, payload: bytes) -> bytes:
    return struct.pack(f">I{len(shape)}I", magic, *shape) + payload


def write_synthetic(folder: Path, count=3) -> Path:
    """A small dataset in MNIST format: `count` random 28x28 images per split, gzipped."""
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx(2051, images.shape, images.tobytes())))
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx(2049, labels.shape, labels.tobytes())))
    return folder


def test_synthetic_data_loads_without_digests(tmp_path):
    mnist = load_mnist(write_synthetic(tmp_path), verify_digests=False)
    assert [a.shape for a in mnist] == [(3, 28, 28), (3,), (3, 28, 28), (3,)]


def test_synthetic_data_fails_the_digest_check_by_default(tmp_path):
    with pytest.raises(MNISTError, match="train-images-idx3-ubyte.gz: the SHA-256 .*--no-verify-digests"):
        load_mnist(write_synthetic(tmp_path))


TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
BAD_INPUTS = {  # case -> (file it writes, its content, what the message must say)
    "truncated gzip": (TRAIN_LABELS, lambda: gzip.compress(idx(2049, [3], bytes([1, 2, 3])))[:-12],
                       "truncated or corrupt gzip"),
    "corrupt gzip": (TRAIN_LABELS, lambda: gzip.compress(idx(2049, [3], bytes([1, 2, 3])))[:-8] + b"\0" * 8,
                     "truncated or corrupt gzip"),
    "wrong magic": (TRAIN_LABELS, lambda: gzip.compress(idx(2051, [3], bytes([1, 2, 3]))), "magic number 2051"),
    "header too short": (TRAIN_LABELS, lambda: gzip.compress(b"\0\0\x08"), "too few for the 8-byte header"),
    "more declared than present": (TRAIN_LABELS, lambda: gzip.compress(idx(2049, [5], bytes([1, 2, 3]))),
                                   "declares 5 labels .* but 3 bytes follow"),
    "images of the wrong size": ("train-images-idx3-ubyte.gz",
                                 lambda: gzip.compress(idx(2051, [3, 28, 27], bytes(3 * 28 * 27))), "images are 28x27"),
    "label out of range": (TRAIN_LABELS, lambda: gzip.compress(idx(2049, [3], bytes([1, 10, 3]))),
                           "label 10 at index 1 is outside 0..9"),
    "label and image counts differ": (TRAIN_LABELS, lambda: gzip.compress(idx(2049, [2], bytes([1, 2]))),
                                      "holds 2 labels but .*train-images-idx3-ubyte.gz holds 3 images"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_a_clear_error(case, tmp_path):
    file_name, make_content, message = BAD_INPUTS[case]
    write_synthetic(tmp_path)
    (tmp_path / file_name).write_bytes(make_content())
    with pytest.raises(MNISTError, match=message) as error:
        load_mnist(tmp_path, verify_digests=False)
    assert file_name in str(error.value) and "\n" not in str(error.value)


def test_compression_is_read_from_the_content_not_the_name(mnist, shared_mnist, tmp_path):
    """A browser saves `*.gz` decompressed; a gzip file may lose its suffix: each loads as what it holds."""
    for name in FILES:
        gzipped = (shared_mnist / f"{name}.gz").read_bytes()
        if "images" in name:  # uncompressed bytes under the .gz name
            (tmp_path / f"{name}.gz").write_bytes(gzip.decompress(gzipped))
        else:  # gzip bytes under the plain name
            (tmp_path / name).write_bytes(gzipped)
    assert all(np.array_equal(a, b) for a, b in zip(load_mnist(tmp_path), mnist))


def test_missing_file_names_the_file_and_the_folder(tmp_path):
    (write_synthetic(tmp_path) / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(MNISTError, match=f"nor t10k-images-idx3-ubyte.gz is in {tmp_path}"):
        load_mnist(tmp_path, verify_digests=False)


# --- The command line ---------------------------------------------------------------------------------------------
def cli(*args) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key not in ("MNIST_DIR", "MNIST_MIRRORS")}
    return subprocess.run([sys.executable, "-m", "bench.data", *args], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=60)


def test_cli_verify_reports_the_counts(shared_mnist):
    result = cli("verify", "--mnist-dir", str(shared_mnist))
    assert result.returncode == 0, result.stderr
    assert f"MNIST OK in {shared_mnist}: train 60000 images" in result.stdout and "test 10000 images" in result.stdout


def corrupt_truncated_gzip(folder):
    path = folder / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:1000])
    return path.name


def corrupt_one_label(folder):
    """Structurally valid, uncompressed, one label changed: only the digest can tell."""
    path = folder / "t10k-labels-idx1-ubyte.gz"
    labels = bytearray(gzip.decompress(path.read_bytes()))
    labels[100] = (labels[100] + 1) % 10
    path.unlink()
    (folder / "t10k-labels-idx1-ubyte").write_bytes(bytes(labels))
    return "t10k-labels-idx1-ubyte"


def corrupt_magic(folder):
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(b"\0\0\x08\x03" + gzip.decompress(path.read_bytes())[4:]))
    return path.name


def remove_a_file(folder):
    (folder / "train-images-idx3-ubyte.gz").unlink()
    return "train-images-idx3-ubyte"


def loop_a_file(folder):
    """A symbolic link to itself where a file should be: not "missing", but a link that leads nowhere."""
    path = folder / "t10k-images-idx3-ubyte.gz"
    path.unlink()
    path.symlink_to(path)
    return "t10k-images-idx3-ubyte.gz is a symbolic link that leads nowhere (dangling, or a loop)"


@pytest.mark.parametrize("corrupt", [corrupt_truncated_gzip, corrupt_one_label, corrupt_magic, remove_a_file,
                                     loop_a_file])
def test_cli_verify_fails_with_one_line_naming_the_file(corrupt, shared_mnist, tmp_path):
    folder = copy_of(shared_mnist, tmp_path / "mnist")
    file_name = corrupt(folder)
    result = cli("verify", "--mnist-dir", str(folder))
    assert result.returncode == 2
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and file_name in result.stderr


@pytest.mark.parametrize("what", ["a file", "a symlink loop"])
def test_cli_verify_says_what_mnist_dir_points_at_when_it_is_no_folder(what, shared_mnist, tmp_path):
    target = tmp_path / "mnist"
    if what == "a file":
        target.write_text("")
        message = f"MNIST_DIR '{target}' is a file, not a folder; point --mnist-dir or MNIST_DIR at a folder"
    else:
        target.symlink_to(target)
        message = f"MNIST_DIR '{target}' is a symbolic link that leads nowhere (dangling, or a loop)"
    result = subprocess.run([sys.executable, "-m", "bench.data", "verify"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "MNIST_DIR": str(target)}, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {message}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
