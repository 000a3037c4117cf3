"""data/download_d4rl.py against a loopback HTTP server that serves a tiny D4RL-layout file."""
import http.server
import io
import os
import socket
import subprocess
import sys
import threading

import h5py
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data.download_d4rl import DownloadError, dataset_filename, dataset_url, download, main  # noqa: E402

SCRIPT = os.path.join(ROOT, "data", "download_d4rl.py")
NAME, REMOTE_PATH, FILENAME = ("hopper-medium-replay-v2", "/gym_mujoco_v2/hopper_medium_replay-v2.hdf5",
                               "hopper_medium_replay-v2.hdf5")


def hdf5_bytes(n=300, drop=(), rewards_n=None) -> bytes:
    rng = np.random.default_rng(0)
    data = {"observations": rng.normal(size=(n, 11)), "actions": rng.normal(size=(n, 3)),
            "rewards": rng.normal(size=rewards_n or n), "terminals": np.zeros(n, bool),
            "timeouts": np.arange(n) % 100 == 99}
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        for key, value in data.items():
            if key not in drop:
                f[key] = value.astype(np.float32) if value.dtype == np.float64 else value
    return buffer.getvalue()


GOOD = hdf5_bytes()


class Handler(http.server.BaseHTTPRequestHandler):
    """GET with `Range: bytes=N-` (206, or 416 past the end) unless the server's honor_range is off;
    with the server's cut_after set, the connection closes after that many bytes of the body."""

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        body = server.files.get(self.path)
        if body is None:
            return self.send_error(404)
        start = int(self.headers["Range"][len("bytes="):-1]) if self.headers["Range"] else None
        if start is not None and server.honor_range:
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            body = body[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:server.cut_after])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.requests, httpd.honor_range, httpd.cut_after = {REMOTE_PATH: GOOD}, [], True, None
    httpd.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def run_script(*args):
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run([sys.executable, SCRIPT, "--no_progress", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def fetch(server, directory):
    return download(NAME, str(directory), server.base_url, timeout=10, progress=False)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_names_map_to_d4rl_urls_and_files(monkeypatch):
    monkeypatch.delenv("D4RL_BASE_URL", raising=False)
    assert dataset_url("halfcheetah-medium-v2") == \
        "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/halfcheetah_medium-v2.hdf5"
    assert dataset_url("maze2d-umaze-v1") == \
        "http://rail.eecs.berkeley.edu/datasets/offline_rl/maze2d/maze2d-umaze-sparse-v1.hdf5"
    assert dataset_filename("hopper-medium-replay-v2") == "hopper_medium_replay-v2.hdf5"
    assert dataset_filename("walker2d-medium-expert-v2") == "walker2d_medium_expert-v2.hdf5"
    assert dataset_filename("halfcheetah-full-replay-v2") == "halfcheetah_full_replay-v2.hdf5"
    assert dataset_filename("maze2d-large-v1") == "maze2d-large-sparse-v1.hdf5"
    monkeypatch.setenv("D4RL_BASE_URL", "http://mirror.example/d4rl/")
    assert dataset_url("hopper-random-v2") == "http://mirror.example/d4rl/gym_mujoco_v2/hopper_random-v2.hdf5"


def test_download_into_d4rl_dataset_dir(server, tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "datasets"))
    monkeypatch.setenv("D4RL_BASE_URL", server.base_url)
    path = download(NAME, progress=False)
    assert path == str(tmp_path / "datasets" / FILENAME)
    assert read(path) == GOOD
    assert os.listdir(tmp_path / "datasets") == [FILENAME]
    assert server.requests == [(REMOTE_PATH, None)]


def test_script_downloads_into_dir(server, tmp_path):
    result = run_script("--dir", str(tmp_path), "--base_url", server.base_url, NAME)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / FILENAME)
    assert read(tmp_path / FILENAME) == GOOD


def test_valid_file_is_not_downloaded_again_but_invalid_one_is(server, tmp_path):
    fetch(server, tmp_path)
    fetch(server, tmp_path)
    assert len(server.requests) == 1
    (tmp_path / FILENAME).write_bytes(b"not hdf5")
    fetch(server, tmp_path)
    assert len(server.requests) == 2 and read(tmp_path / FILENAME) == GOOD


def test_interrupted_download_resumes_with_range(server, tmp_path):
    k = len(GOOD) // 3
    (tmp_path / f"{FILENAME}.part").write_bytes(GOOD[:k])
    fetch(server, tmp_path)
    assert server.requests == [(REMOTE_PATH, f"bytes={k}-")]
    assert read(tmp_path / FILENAME) == GOOD
    assert not (tmp_path / f"{FILENAME}.part").exists()


def test_dropped_connection_keeps_part_for_the_next_run(server, tmp_path):
    k = len(GOOD) // 2
    server.cut_after = k
    with pytest.raises(DownloadError, match="lost .*resume"):
        fetch(server, tmp_path)
    assert os.listdir(tmp_path) == [f"{FILENAME}.part"] and read(tmp_path / f"{FILENAME}.part") == GOOD[:k]
    server.cut_after = None
    fetch(server, tmp_path)
    assert server.requests[-1] == (REMOTE_PATH, f"bytes={k}-")
    assert read(tmp_path / FILENAME) == GOOD


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.honor_range = False
    (tmp_path / f"{FILENAME}.part").write_bytes(GOOD[:1000])
    fetch(server, tmp_path)
    assert server.requests == [(REMOTE_PATH, "bytes=1000-")]
    assert read(tmp_path / FILENAME) == GOOD


@pytest.mark.parametrize("part", [GOOD, GOOD + b"stale tail"], ids=["complete", "stale"])
def test_range_not_satisfiable(server, tmp_path, part):
    (tmp_path / f"{FILENAME}.part").write_bytes(part)
    fetch(server, tmp_path)
    assert server.requests[0] == (REMOTE_PATH, f"bytes={len(part)}-")
    assert read(tmp_path / FILENAME) == GOOD


@pytest.mark.parametrize("body, message", [
    (os.urandom(5000), "not an HDF5 file"),
    (hdf5_bytes(drop=("timeouts",)), "missing keys: timeouts"),
    (hdf5_bytes(rewards_n=299), "first dimensions differ"),
], ids=["random-bytes", "missing-key", "lengths"])
def test_corrupt_file_is_reported_and_deleted(server, tmp_path, body, message):
    server.files[REMOTE_PATH] = body
    with pytest.raises(DownloadError, match=message):
        fetch(server, tmp_path)
    assert os.listdir(tmp_path) == []


def test_missing_file_gives_one_error_line(server, tmp_path, capsys):
    del server.files[REMOTE_PATH]
    assert main(["--no_progress", "--dir", str(tmp_path), "--base_url", server.base_url, NAME]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    assert "404" in err and FILENAME in err
    assert os.listdir(tmp_path) == []


def test_offline_gives_one_line_without_traceback(tmp_path):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_script("--dir", str(tmp_path / "d4rl"), "--base_url", f"http://127.0.0.1:{port}", NAME)
    assert result.returncode in (1, 2)
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, result.stderr
    assert "offline" in result.stderr and "Traceback" not in result.stderr
    assert f"save it in {tmp_path / 'd4rl'} as {FILENAME}" in result.stderr


def test_unknown_name_lists_valid_names(tmp_path, capsys):
    assert main(["--dir", str(tmp_path), "hopper-medium-v9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    assert "hopper-medium-v9" in err and "hopper-medium-v2" in err and "maze2d-large-v1" in err
    assert os.listdir(tmp_path) == []
    with pytest.raises(DownloadError, match="valid names"):
        dataset_url("hopper-medium-v9")
