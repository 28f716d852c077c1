"""The run directory (--out DIR) and checkpoint files on disk: atomic writes, reading a checkpoint
file once with errors in prg_fast's words, and RunDir, which claims DIR for one command (never
another command's run, an existing file, or a non-empty folder prg_fast did not make) and writes
its checkpoint.pt, metrics.json and log.csv. DIR itself is made by the first write, so a run that
fails before its first step leaves nothing behind."""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
import zipfile
from typing import Any, Dict, Iterable, Optional, Sequence

import torch

__all__ = ["atomic_write", "write_json", "CheckpointError", "CHECKPOINT_NAME", "checkpoint_file", "read_checkpoint",
           "check_checkpoint", "RunDir", "claim_file"]

CHECKPOINT_NAME = "checkpoint.pt"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
PICKLE_PROTOCOL_2_PLUS = b"\x80"  # the first byte of a pickle of protocol >= 2 (torch.save's legacy format)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, is not of the kind asked for, or does not fit the run that
    tries to use it."""


def atomic_write(path: str, write) -> None:
    """write(file) into a temporary file in the same directory (made if missing), then os.replace:
    a crash at any moment leaves either the old file or the new one, never a torn one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=os.path.basename(path))
    try:
        # mkstemp makes the file 0600; a run file should get the mode any other new file gets
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, obj: Dict[str, Any]) -> None:
    """One JSON object, atomically, in a folder made if missing (metrics.json and friends)."""
    text = json.dumps(obj, indent=1, allow_nan=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def claim_file(path: str, force: bool, what: str = "--out") -> None:
    """Refuse to replace an existing file unless `force`."""
    if os.path.isdir(path):
        raise FileExistsError(f"{what} {path} is a directory, not a file")
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{what} {path} already exists; it is not overwritten (name a new file, or pass --force "
                              f"to replace it)")


# -------------------------------------------------------------------------------------------------
# reading checkpoints


def checkpoint_file(path: str) -> str:
    """A run directory names its checkpoint.pt; a file names itself."""
    return os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path


def _file_kind(path: str) -> str:
    """What a file that torch.load refused looks like, in words."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    if head.startswith(ZIP_MAGIC):
        return ("a zip archive that is truncated or corrupted" if not zipfile.is_zipfile(path)
                else "a zip archive that is not a torch.save file")
    if head.startswith(PICKLE_PROTOCOL_2_PLUS):
        return "a pickle that is truncated, corrupted or holds more than tensors and plain containers"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of an unknown kind"
    first = text.strip().splitlines()[0][:60] if text.strip() else ""
    return f"a text file (it starts with {first!r})"


def read_checkpoint(path: str, *, what: str = "checkpoint", map_location="cpu") -> Dict[str, Any]:
    """torch.load(weights_only=True) of a checkpoint file or run directory; every failure is a
    FileNotFoundError or CheckpointError that names the file and says what it is instead."""
    path = checkpoint_file(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        # TorchVersion (a str subclass) is allowed because checkpoints of the first release stored
        # torch.__version__ itself; nothing else beyond weights_only's tensors and containers
        with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a truncated / foreign file
        lines = [s.strip() for s in str(e).splitlines() if s.strip()]
        # torch's weights_only refusal is a long text; its one informative line names the culprit
        culprit = next((s for s in lines if s.startswith("WeightsUnpickler error")), None)
        why = f" ({culprit})" if culprit else ""
        raise CheckpointError(f"{path} is not a readable checkpoint: it is {_file_kind(path)}{why}; expected a "
                              f"{what} written by prg-fast (a torch.save zip archive)") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a prg_fast {what} (it holds a {type(ckpt).__name__}, not a dict)")
    return ckpt


def check_checkpoint(ckpt: Dict[str, Any], where: str, fmt: str, version: int, required: Iterable[str],
                     kind: str) -> Dict[str, Any]:
    """Refuse a checkpoint of another format, a newer version, or one lacking required entries."""
    if ckpt.get("format") != fmt:
        raise CheckpointError(f"{where} is not a prg_fast {kind} checkpoint (format {ckpt.get('format')!r}, "
                              f"expected {fmt!r})")
    if not isinstance(ckpt.get("version"), int) or ckpt["version"] > version:
        raise CheckpointError(f"{where} has {kind} checkpoint version {ckpt.get('version')!r}; this prg_fast reads "
                              f"versions <= {version} (upgrade prg_fast)")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise CheckpointError(f"{where} lacks the entries {missing}; it is incomplete or from another tool")
    return ckpt


# -------------------------------------------------------------------------------------------------
# the run directory


class RunDir:
    """The run directory of one command (--out DIR): DIR/checkpoint.pt written atomically with its
    format and version, the resume checks, DIR/metrics.json (which names the command that made the
    run) and DIR/log.csv. Under torchrun only the main process writes (`main=False` makes every
    write a no-op) and speaks."""

    def __init__(self, out: str, fmt: Optional[str], version: int, command: str, *, kind: Optional[str] = None,
                 required: Sequence[str] = (), main: bool = True):
        if not isinstance(out, str) or not out:
            raise ValueError(f"out must be a directory path, got {out!r}")
        self.out, self.fmt, self.version, self.command = out, fmt, version, command
        self.kind, self.required, self.main = kind or command, tuple(required), main
        self.ckpt_path = os.path.join(out, CHECKPOINT_NAME)

    def say(self, msg: str) -> None:
        if self.main:
            print(f"prg-fast {self.command}: {msg}", file=sys.stderr, flush=True)

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def _owner(self, ckpt: Optional[Dict[str, Any]]) -> Optional[str]:
        """The command whose run DIR is: its checkpoint's format says so, else the "command" its
        metrics.json names (every command writes one); None for neither."""
        if ckpt is not None:
            fmt = str(ckpt.get("format"))
            return fmt[len("prg_fast."):] if fmt.startswith("prg_fast.") else fmt
        try:
            with open(self.path("metrics.json")) as f:
                command = json.load(f).get("command")
        except (OSError, ValueError, AttributeError):
            return None
        return command if isinstance(command, str) else None

    def claim(self, force: bool = False) -> Optional[Dict[str, Any]]:
        """Check, before any work, that this command may write DIR: DIR is new, empty, this
        command's own run, or (force) a non-empty folder prg_fast did not make. Returns the run's
        checkpoint when DIR holds one (to resume; the file is read once and validated: a newer
        version or one lacking entries is refused), else None."""
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise FileExistsError(f"--out {self.out} is an existing file, not a run directory; name a new directory")
        if not os.path.isdir(self.out) or not os.listdir(self.out):
            return None
        ckpt = read_checkpoint(self.ckpt_path) if os.path.isfile(self.ckpt_path) else None
        owner = self._owner(ckpt)
        if owner is not None and owner != self.command:
            held = (f"already holds a {ckpt.get('format')!r} checkpoint (a `prg-fast {owner}` run)"
                    if ckpt is not None else f"is the run directory of `prg-fast {owner}`")
            error = CheckpointError if ckpt is not None else FileExistsError
            raise error(f"--out {self.out} {held}; {self.command} does not write into another command's run "
                        f"(use a new --out)")
        if owner is None and not force:
            raise FileExistsError(f"--out {self.out} is a non-empty folder that prg-fast did not make; name a new or "
                                  f"empty directory, or pass --force to write into it")
        if ckpt is None:
            return None
        return check_checkpoint(ckpt, self.ckpt_path, self.fmt, self.version, self.required, self.kind)

    def check_resume(self, ckpt: Dict[str, Any], args: Dict[str, Any], keys: Iterable[str]) -> None:
        """Refuse to continue a run whose defining arguments differ from this one's."""
        old = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
        for key in keys:
            if key in old and old[key] != args.get(key):
                raise CheckpointError(f"{self.ckpt_path} was written by a run with {key}={old[key]!r}, but this run "
                                      f"has {key}={args.get(key)!r}; resume with the same arguments or use a new --out")

    def save(self, payload: Dict[str, Any]) -> None:
        if not self.main:
            return
        ckpt = {"format": self.fmt, "version": self.version, **payload, "torch_version": str(torch.__version__)}
        atomic_write(self.ckpt_path, lambda f: torch.save(ckpt, f))

    def write_json(self, name: str, obj: Dict[str, Any]) -> None:
        if self.main:
            write_json(self.path(name), obj)

    def write_log(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if not self.main:
            return
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(list(header))
        w.writerows(rows)
        atomic_write(self.path("log.csv"), lambda f: f.write(buf.getvalue().encode()))
