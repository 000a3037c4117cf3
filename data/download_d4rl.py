"""Download D4RL datasets to where d4rl itself looks for them, without installing d4rl.

    python data/download_d4rl.py halfcheetah-medium-v2 hopper-medium-replay-v2 maze2d-umaze-v1

Names: the locomotion v2 datasets `<env>-<level>-v2` (env: halfcheetah, hopper, walker2d; level:
random, medium, medium-replay, medium-expert, expert, full-replay) and the maze2d v1 datasets
`maze2d-umaze-v1`, `maze2d-medium-v1`, `maze2d-large-v1`.

Files go to `--dir`, else `$D4RL_DATASET_DIR`, else `~/.d4rl/datasets`, under d4rl's own file
name (the last part of the URL, e.g. `hopper_medium_replay-v2.hdf5`, `maze2d-umaze-sparse-v1.hdf5`),
so d4rl and this project find the same files. `--base_url` (or `$D4RL_BASE_URL`) replaces
http://rail.eecs.berkeley.edu/datasets/offline_rl, e.g. for a mirror.

A download is written to `<file>.part` first. Running the command again after an interruption
resumes it with an HTTP Range request (or starts over if the server does not support ranges). The
file gets its final name only after it opened with h5py and holds observations, actions, rewards,
terminals and timeouts of one length; a file that fails this check is deleted. A valid file that is
already there is not downloaded again. Offline? Fetch the URL elsewhere and copy the file into the
directory above under that name.

Python: `download(name)` returns the path; `dataset_url(name)`, `dataset_filename(name)`.
"""
from __future__ import annotations

import argparse
import http.client
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request

import h5py
from tqdm import tqdm

DEFAULT_BASE_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl"
REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
CHUNK_BYTES = 1 << 20
# Copied from cnf.py: D4RL_LOCOMOTION
D4RL_LOCOMOTION = re.compile(r"^(halfcheetah|hopper|walker2d)-"
                             r"(random|medium|medium-replay|medium-expert|expert|full-replay)-v2$")
# Copied from cnf.py: D4RL_MAZE2D
D4RL_MAZE2D = re.compile(r"^maze2d-(umaze|medium|large)-v1$")


# Copied from cnf.py: d4rl_filename
def d4rl_filename(name: str) -> str:
    """The file name d4rl caches a dataset under (the basename of its URL)."""
    if D4RL_MAZE2D.match(name):
        return name.replace("-v1", "-sparse-v1") + ".hdf5"
    env, level = name[: -len("-v2")].split("-", 1)
    return f"{env}_{level.replace('-', '_')}-v2.hdf5"
# name -> path under the base URL, as in d4rl's infos.py.
DATASETS = {
    name: ("gym_mujoco_v2/" if D4RL_LOCOMOTION.match(name) else "maze2d/") + d4rl_filename(name)
    for name in [f"{env}-{level}-v2" for env in ("halfcheetah", "hopper", "walker2d")
                 for level in ("random", "medium", "medium-replay", "medium-expert", "expert", "full-replay")]
    + [f"maze2d-{size}-v1" for size in ("umaze", "medium", "large")]
}


class DownloadError(Exception):
    """A failed download; the message is one line that says what to do."""


def dataset_url(name: str, base_url: str | None = None) -> str:
    if name not in DATASETS:
        raise DownloadError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    base = base_url or os.environ.get("D4RL_BASE_URL") or DEFAULT_BASE_URL
    return f"{base.rstrip('/')}/{DATASETS[name]}"


def dataset_filename(name: str) -> str:
    return dataset_url(name).rsplit("/", 1)[1]


def dataset_dir(directory: str | None = None) -> str:
    return os.path.expanduser(directory or os.environ.get("D4RL_DATASET_DIR") or "~/.d4rl/datasets")


def check_dataset(path: str) -> int:
    """Return the number of transitions in `path`; raise DownloadError if it is no D4RL dataset."""
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in REQUIRED_KEYS if not isinstance(f.get(k), h5py.Dataset)]
            if missing:
                raise DownloadError(f"missing keys: {', '.join(missing)}")
            lengths = {k: f[k].shape[0] if f[k].ndim else None for k in REQUIRED_KEYS}
    except OSError as e:
        raise DownloadError(f"not an HDF5 file: {e}") from None
    if len(set(lengths.values())) != 1 or None in lengths.values():
        raise DownloadError(f"first dimensions differ: {lengths}")
    return lengths["rewards"]


def download(name: str, directory: str | None = None, base_url: str | None = None,
             timeout: float = 60.0, progress: bool = True) -> str:
    """Fetch dataset `name` into `directory` (see module docstring) and return its path."""
    url = dataset_url(name, base_url)
    directory = dataset_dir(directory)
    path = os.path.join(directory, dataset_filename(name))
    by_hand = f"download {url} elsewhere and save it in {directory} as {os.path.basename(path)}"
    if os.path.exists(path):
        try:
            check_dataset(path)
            return path
        except DownloadError as e:
            print(f"{path} is not a valid dataset ({e}); downloading it again", file=sys.stderr)
    os.makedirs(directory, exist_ok=True)
    part = f"{path}.part"
    try:
        _fetch(url, part, timeout, progress)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url} answered HTTP {e.code} {e.reason}; check the name, set --base_url "
                            f"to a mirror, or {by_hand}") from None
    except urllib.error.URLError as e:  # no connection at all: DNS failure, refused, unreachable
        raise DownloadError(f"cannot reach {urllib.parse.urlsplit(url).netloc} ({e.reason}); you seem to be "
                            f"offline: run this again once online, or {by_hand}") from None
    except (ConnectionError, TimeoutError, http.client.HTTPException) as e:  # lost while streaming
        raise DownloadError(f"connection to {urllib.parse.urlsplit(url).netloc} lost ({e}); run this again "
                            f"to resume, or {by_hand}") from None
    try:
        check_dataset(part)
    except DownloadError as e:
        os.remove(part)
        raise DownloadError(f"{url} is not a valid D4RL dataset ({e}); deleted it. Try again later, "
                            f"or {by_hand}") from None
    os.replace(part, path)
    return path


def _fetch(url: str, part: str, timeout: float, progress: bool) -> None:
    """Append the rest of `url` to `part`, or rewrite it if the server does not support ranges."""
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416:
            raise
        # Range past the end: the .part is the whole file if the server's size (`bytes */size`) is its
        # size; otherwise it is stale (or the size unknown) and the download starts over.
        size = e.headers.get("Content-Range", "").rpartition("/")[2]
        e.close()
        if size != str(offset):
            os.remove(part)
            _fetch(url, part, timeout, progress)
        return
    with response:
        if response.status != 206:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        received = offset
        with open(part, "ab" if offset else "wb") as f, \
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=os.path.basename(url), disable=not progress) as bar:
            while chunk := response.read(CHUNK_BYTES):
                f.write(chunk)
                bar.update(len(chunk))
                received += len(chunk)
    if total is not None and received < total:
        raise ConnectionError(f"got {received} of {total} bytes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=f"valid names: {', '.join(DATASETS)}")
    parser.add_argument("names", nargs="+", metavar="NAME")
    parser.add_argument("--dir", default=None, help="default: $D4RL_DATASET_DIR or ~/.d4rl/datasets")
    parser.add_argument("--base_url", default=None, help=f"default: $D4RL_BASE_URL or {DEFAULT_BASE_URL}")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without data before giving up")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        for name in args.names:  # a typo fails before anything is downloaded
            dataset_url(name)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        for name in args.names:
            print(download(name, args.dir, args.base_url, args.timeout, not args.no_progress))
    except (DownloadError, OSError) as e:  # OSError: the directory is not writable, the disk is full, ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
