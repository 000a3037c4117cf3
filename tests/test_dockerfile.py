"""Static checks of the Docker image (Dockerfile, requirements-docker.txt, .dockerignore); nothing is built."""
import re
import shlex
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
D4RL_ENV = re.compile(r"\bgym\.make\(\s*['\"](halfcheetah|hopper|walker2d|ant)-[a-z-]+-v2['\"]")


def instructions():
    """The Dockerfile as [(KEYWORD, arguments)]: comment lines dropped, continuation lines joined."""
    lines = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\[ \t]*\n", " ", "\n".join(lines))
    out = []
    for line in filter(str.strip, joined.splitlines()):
        keyword, _, args = line.strip().partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
    return out


def env_vars(args):
    """The variables of one `ENV A=1 B=2` (or legacy `ENV A 1`) instruction."""
    if "=" not in args.split()[0]:
        name, _, value = args.partition(" ")
        return {name: value}
    return dict(tok.split("=", 1) for tok in shlex.split(args))


def requirements(name):
    """{canonical name: (Requirement, comment)}; extras are ignored for the name, option lines skipped."""
    out = {}
    for line in (ROOT / name).read_text().splitlines():
        parts = re.split(r"(?:^|\s)#", line, maxsplit=1)
        spec, comment = parts[0].strip(), (parts[1].strip() if len(parts) > 1 else "")
        if spec and not spec.startswith("-"):
            req = Requirement(spec)
            key = canonicalize_name(req.name)
            assert key not in out, f"{name}: {req.name} listed twice"
            out[key] = (req, comment)
    return out


def index(pred, what):
    hits = [i for i, ins in enumerate(instructions()) if pred(*ins)]
    assert hits, f"Dockerfile: no {what}"
    return hits[0]


def test_base_image_is_cuda():
    base = next(args for kw, args in instructions() if kw == "FROM").split()[0]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+(\.\d+)?-(cudnn\d*-)?(runtime|devel)-ubuntu\d\d\.\d\d", base), base


def test_mujoco210_download_and_env():
    run = instructions()[index(lambda kw, a: kw == "RUN" and "mujoco210-linux-x86_64.tar.gz" in a, "MuJoCo 2.1 RUN")][1]
    assert "https://github.com/deepmind/mujoco/releases/download/2.1.0/mujoco210-linux-x86_64.tar.gz" in run
    assert re.search(r"\btar\b[^&;]*-C\s+/root/\.mujoco(/mujoco210)?(\s|$)", run), run
    assert "/root/.mujoco/mujoco210/bin" in run  # the extraction is checked to land in mujoco210/
    env = {}
    for kw, args in instructions():
        if kw == "ENV":
            env.update(env_vars(args))
    assert "/root/.mujoco/mujoco210/bin" in env.get("LD_LIBRARY_PATH", "").split(":")
    assert env.get("D4RL_DATASET_DIR") == "/root/.d4rl/datasets"


def test_legacy_pins():
    reqs = requirements("requirements-docker.txt")
    assert str(reqs["mujoco-py"][0].specifier) == "==2.1.2.14"
    cython = reqs["cython"][0].specifier
    assert Version("0.29.37") in cython and Version("3.0.0") not in cython and Version("3.1.2") not in cython
    assert re.fullmatch(r"==0\.23\.\d+", str(reqs["gym"][0].specifier))
    d4rl = reqs["d4rl"][0]
    pattern = r"git\+https://github\.com/Farama-Foundation/D4RL(\.git)?@([0-9a-f]{40}|master)"
    assert d4rl.url and re.fullmatch(pattern, d4rl.url)


def test_install_then_build_time_check_then_project():
    ins = instructions()
    mujoco = index(lambda kw, a: kw == "RUN" and "mujoco210-linux-x86_64.tar.gz" in a, "MuJoCo RUN")
    ld_path = index(lambda kw, a: kw == "ENV" and "LD_LIBRARY_PATH" in env_vars(a), "LD_LIBRARY_PATH ENV")
    copy_reqs = index(lambda kw, a: kw == "COPY" and "requirements-docker.txt" in a.split()[:-1],
                      "COPY of requirements-docker.txt")
    pip = index(lambda kw, a: kw == "RUN" and "pip install" in a and "requirements-docker.txt" in a,
                "pip install of it")
    pip_cmds = [c for c in re.split(r"&&|;", ins[pip][1]) if "pip install" in c]
    assert any(" -r " in c and "--no-deps" not in c for c in pip_cmds), \
        "the PyPI pins must be installed with their dependencies"

    def is_check(kw, args):
        groups = re.findall(r"\bimport\s+([\w.]+(?:\s*,\s*[\w.]+)*)", args)
        imported = {m.strip() for grp in groups for m in grp.split(",")}
        return (kw == "RUN" and "python -c" in args and {"mujoco_py", "d4rl", "gym"} <= imported
                and D4RL_ENV.search(args))

    check = index(is_check, "build-time `import mujoco_py, d4rl, gym; gym.make('<d4rl env>')` RUN")
    assert mujoco < check and ld_path < check and copy_reqs < pip < check
    workdir = index(lambda kw, a: kw == "WORKDIR", "WORKDIR")
    assert ins[workdir][1] == "/workspace/cnf"
    assert workdir < index(lambda kw, a: kw == "COPY" and a == ". .", "COPY . .")


def test_consistent_with_requirements_txt():
    docker = requirements("requirements-docker.txt")
    for name, (req, _) in requirements("requirements.txt").items():
        assert name in docker, f"{req.name} of requirements.txt is missing from requirements-docker.txt"
        other, comment = docker[name]
        if other.specifier != req.specifier or other.url != req.url:
            assert re.match(r"differs from requirements\.txt: \S", comment), \
                (f"{req.name}: {other.specifier or other.url} vs {req.specifier}, "
                 f"without '# differs from requirements.txt: <reason>'")


def test_dockerignore():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert {"runs/", "wandb/", ".git", "**/__pycache__"} <= set(lines)
    assert lines.index("!data/policies/*.hdf5") > lines.index("**/*.hdf5")
