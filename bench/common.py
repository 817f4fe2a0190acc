"""Shared by the bench scripts: provenance of a result, atomic JSON writing, default paths.

Every JSON a bench script writes carries ``provenance(...)``: the git revision (and whether
the tree was dirty), package versions, the device, the seed, the exact command line, and
the model's fingerprint, path and meta. A number in reports/ can always be traced to the
command, the code and the weights that produced it.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from diffcodec.checkpoint import LoadedModel
from diffcodec.errors import DiffcodecError
from diffcodec.runtime import device_string

REPO_ROOT = Path(__file__).resolve().parents[1]
REPORTS_DIR = REPO_ROOT / "reports"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
CIFAR10_TEST = SHARED_DATA / "cifar10" / "test"
PACKAGES = ("torch", "numpy", "constriction", "diffcodec")


def git_revision(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """{'commit': 40 hex or None, 'dirty': bool or None} of the repository holding the code."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip() if commit else None, "dirty": bool(status.strip()) if status is not None else None}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None when it is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: the interpreter's module/script and its arguments, shell-quoted."""
    argv = sys.argv if argv is None else argv
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and argv and argv[0].endswith(".py"):
        head = ["python", "-m", spec.name]  # run as `python -m bench.x`
        return shlex.join(head + list(argv[1:]))
    return shlex.join(["python", *argv]) if argv and argv[0].endswith(".py") else shlex.join(argv)


def module_command(module: str, argv: list[str] | None) -> str:
    """The command line of a bench ``main(argv)``: the real one when argv is None (run from
    the shell), else ``python -m MODULE ARGS`` (called from Python, e.g. a test)."""
    return command_line() if argv is None else shlex.join(["python", "-m", module, *argv])


def model_record(model: LoadedModel) -> dict[str, Any]:
    """Fingerprint, path (relative to the repo when inside it), configs, meta, parameter count."""
    from diffcodec.config import config_to_dict

    path = Path(model.path).resolve()
    try:
        shown = str(path.relative_to(REPO_ROOT))
    except ValueError:
        shown = str(path)
    return {
        "fingerprint": model.fingerprint,
        "path": shown,
        "meta": model.meta,
        "model_config": config_to_dict(model.model_config),
        "diffusion_config": config_to_dict(model.diffusion_config),
        "parameters": sum(p.numel() for p in model.model.parameters()),
    }


def provenance(
    args: Any = None,
    model: LoadedModel | None = None,
    seed: int | None = None,
    *,
    device: torch.device | str = "cpu",
    command: str | None = None,
) -> dict[str, Any]:
    """What produced a result: code revision, versions, device, seed, command, model.

    ``args`` is the script's argparse namespace (recorded as a dict); ``command`` the command
    line (default: this process's, see `command_line`).
    """
    return {
        "git": git_revision(),
        "versions": {**package_versions(), "python": platform.python_version()},
        "device": device_string(device),
        "seed": seed,
        "command": command if command is not None else command_line(),
        "args": {k: v for k, v in vars(args).items() if not callable(v)} if args is not None else None,
        "model": model_record(model) if model is not None else None,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _finite(value: Any) -> Any:
    """NaN/inf -> None so the file is strict JSON; numpy scalars/arrays -> Python values."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (temp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; reports are meant to be read by everyone
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as strict JSON (NaN/inf -> null, numpy -> lists), atomically."""
    return write_text(path, json.dumps(_finite(payload), indent=1, allow_nan=False) + "\n")


def write_report(path: str | os.PathLike, payload: dict[str, Any], render) -> None:
    """The JSON at ``path``, its markdown (``render(json)``) beside it as .md, the markdown
    printed, and where both went on stderr."""
    out = write_json(path, payload)
    md = write_text(out.with_suffix(".md"), render(read_json(out)))
    print(render(payload), end="")
    print(f"wrote {out} and {md}", file=sys.stderr)


def int_list(text: str, option: str) -> list[int]:
    """A comma-separated list of positive integers (a one-line error otherwise)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise DiffcodecError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if min(values) < 1:
        raise DiffcodecError(f"{option}: values must be positive, got {text!r}")
    return values


def read_json(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object at ``path``, or None when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def load_json_input(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A JSON object a bench script was given (``what`` names it in errors): one-line errors
    for a missing file, a file that is not JSON, or JSON that is not an object."""
    try:
        payload = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DiffcodecError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffcodecError(f"{path}: not {what} ({e})") from None
    if not isinstance(payload, dict):
        raise DiffcodecError(f"{path}: not {what} (not a JSON object)")
    return payload


def resolve_data(path: str | os.PathLike | None, default: Path = CIFAR10_TEST) -> Path:
    """A data path (relative paths against the current directory), or the shared default;
    DiffcodecError naming the path when it is absent."""
    chosen = Path(path) if path is not None else default
    if not chosen.exists():
        hint = "" if path is not None else \
            " (the CIFAR-10 test shards live in ../shared/data beside the repo; pass a path)"
        raise DiffcodecError(f"{chosen}: no such data{hint}")
    return chosen


def run_main(main, argv: list[str] | None = None) -> int:
    """Run a bench ``main(argv)``, printing a DiffcodecError as one line (exit status 2)."""
    try:
        return main(argv)
    except DiffcodecError as e:
        print(f"{Path(sys.argv[0]).stem}: error: {e}", file=sys.stderr)
        return 2
