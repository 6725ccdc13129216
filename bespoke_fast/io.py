"""General file utilities: atomic writes, sha256 of files, the bounded JSON reader, model
identity, and the run-folder claim shared by GT sets and sample folders. (Solver files live in
``bespoke_fast.solvers.files``.)

Bounded JSON (:func:`read_json_bounded`): the file is at most ``MAX_BYTES`` (1 MiB, unless the
caller allows more); JSON nesting at most ``MAX_DEPTH`` (32) levels; integers at most
``MAX_INT_DIGITS`` (20) digits; no duplicate keys, no NaN/Infinity literals.

Model identity: ``model_fingerprint`` is the sha256 of a module's parameters and buffers; a
model without any (a plain function, a stateless module) is identified by its import path,
``"callable:<module>.<qualname>"`` (so two lambdas of one module look alike).
"""
from __future__ import annotations

import errno as _errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch

from ._checks import InvalidArgumentError, InvalidFileError, MismatchError, OutputError

MAX_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_INT_DIGITS = 20

__all__ = ["model_fingerprint", "fingerprint_configs", "model_identity", "check_model_identity",
           "sha256_file", "atomic_write", "atomic_write_text", "write_with_sidecar", "read_sidecar",
           "save_figure", "verified_sidecar", "check_writable", "read_json_bounded",
           "claim_run_dir", "claim_sharded_run", "check_shard_plan", "seal", "unseal", "identity_hash", "Inventory",
           "read_run_record", "prepare_out_dir", "first_difference", "temp_prefix", "file_mode",
           "remove_stale_temp_files", "MAX_BYTES", "MAX_DEPTH", "MAX_INT_DIGITS"]


# ----------------------------------------------------------------------------- atomic files
def atomic_write(path, data) -> None:
    """Write ``data`` (bytes, or a callable ``data(binary_file)``) to ``path`` via a temp file in
    the same directory, fsync and ``os.replace``: readers never see a partial file, and no temp
    file stays behind on failure. ``OSError`` (permission, disk full, a directory in the way)
    becomes :class:`OutputError` naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp")
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise _output_error(path, e) from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


# the longest file name most file systems take is 255 bytes; a temp name adds ".", "." and
# mkstemp's 8 random characters + ".tmp"
_TEMP_NAME_KEEP = 200


def temp_prefix(name: str) -> str:
    """The prefix of the temp files :func:`atomic_write` makes for ``name``: ``"." + name + "."``,
    with ``name`` cut to 200 characters so that the temp name stays within 255 bytes."""
    return f".{name[:_TEMP_NAME_KEEP]}."


def file_mode() -> int:
    """The mode a new file gets under the current umask (``0o666 & ~umask``): what ``open()``
    would give; ``tempfile.mkstemp`` alone always gives 0600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _output_error(path, e: OSError) -> OutputError:
    reason = e.strerror or str(e)
    if e.errno in (_errno.ENOSPC, getattr(_errno, "EDQUOT", -1)) or "requested and" in str(e):
        reason = f"disk full ({reason})"
    err = OutputError(f"cannot write {path}: {reason}")
    err.errno = e.errno
    return err


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, text.encode("utf-8"))


def save_figure(fig, path, **savefig_kwargs) -> Path:
    """Save a matplotlib figure to ``path`` atomically (the format from the file's suffix, e.g.
    ``.png``), then close it; returns ``Path(path)``. ``savefig_kwargs`` go to ``fig.savefig``."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fmt = path.suffix.lstrip(".") or None
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=fmt, **savefig_kwargs))
    finally:
        plt.close(fig)
    return path


def write_with_sidecar(path, data, sidecar, info: dict, indent=None) -> dict:
    """Write ``data`` (as :func:`atomic_write` takes it) to ``path``, then the JSON ``sidecar``:
    ``info`` plus ``"sha256"`` of ``path``'s bytes. Both writes are atomic and the sidecar comes
    second, so a sidecar vouches for a complete file (check it with :func:`verified_sidecar`).
    Returns the sidecar's contents."""
    atomic_write(path, data)
    digest = hashlib.sha256(data).hexdigest() if isinstance(data, bytes) else sha256_file(path)
    info = {**info, "sha256": digest}
    atomic_write_text(sidecar, json.dumps(info, indent=indent) + "\n")
    return info


def read_sidecar(sidecar) -> dict | None:
    """The JSON object in ``sidecar``, or None when it is missing, unreadable or not an object."""
    try:
        info = json.loads(Path(sidecar).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def verified_sidecar(path, sidecar, **expected) -> dict | None:
    """The sidecar of ``path`` (see :func:`write_with_sidecar`) when ``path`` exists, the sidecar
    holds every ``expected`` key with that value, and its ``"sha256"`` matches ``path``'s bytes;
    else None (the file is to be computed again)."""
    info = read_sidecar(sidecar)
    if info is None or not Path(path).is_file():
        return None
    if any(info.get(k) != v for k, v in expected.items()):
        return None
    return info if info.get("sha256") == sha256_file(path) else None


def sha256_file(path) -> str:
    """Hex sha256 of a file's bytes (shards, weights), read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- identities
def fingerprint_configs(model) -> list:
    """Settings that change what a model computes but live outside its tensors (a guidance
    scale, the class list of a conditioning function): objects opt in by defining
    ``fingerprint_config() -> dict`` (JSON-able), on the model itself or any submodule."""
    parts = model.named_modules() if isinstance(model, torch.nn.Module) else [("", model)]
    return [[name, part.fingerprint_config()] for name, part in parts
            if callable(getattr(part, "fingerprint_config", None))]


def model_fingerprint(model) -> str:
    """Identity of a model: sha256 (first 16 hex digits) of a module's parameters and buffers
    and of the ``fingerprint_config()`` of any part that defines one (e.g. ``cfg``'s guidance
    scale); for a model without any of these (a plain function, a stateless module),
    ``"callable:<module>.<qualname>"`` (documented in the module docstring)."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else {}
    configs = fingerprint_configs(model)
    if not state and not configs:
        fn = getattr(model, "__func__", model)
        if not hasattr(fn, "__qualname__"):
            fn = type(model)
        return f"callable:{getattr(fn, '__module__', '?')}.{fn.__qualname__}"
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().to(torch.float64).numpy().tobytes())
    if configs:  # absent for models without settings: their hashes are unchanged
        h.update(json.dumps(configs, sort_keys=True).encode())
    return h.hexdigest()[:16]


def model_identity(model, name: str = "") -> dict:
    """``{"name": name, "hash": model_fingerprint(model)}``: what artefacts record."""
    return {"name": name or "", "hash": model_fingerprint(model)}


def check_model_identity(recorded, model, model_name: str = "", what: str = "the solver",
                         allow: bool = False) -> None:
    """Raise :class:`MismatchError` when ``recorded`` (``{"name", "hash"}``, as a solver file or
    GT manifest stores it) names another model than ``model``. Hashes decide when both are
    known; otherwise names do; an empty record matches anything. ``allow=True`` skips it."""
    if allow or not isinstance(recorded, dict):
        return
    want_hash, want_name = str(recorded.get("hash") or ""), str(recorded.get("name") or "")
    have_hash = model_fingerprint(model)
    if want_hash and have_hash:
        differs = want_hash != have_hash
    else:
        differs = bool(want_name and model_name and want_name != model_name)
    if differs:
        raise MismatchError(
            f"{what} was made for model {want_name or '?'!s} (hash {want_hash or '-'}), not for "
            f"{model_name or 'the given model'} (hash {have_hash}); make one for this model, or "
            f"pass --allow-model-mismatch (allow_model_mismatch=True) to use it anyway")


# ----------------------------------------------------------------------------- bounded JSON
class _Reject(Exception):
    """Raised inside the JSON hooks; turned into the caller's error naming the file."""


_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _int_hook(text):
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Reject(f"an integer with {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _constant_hook(name):
    raise _Reject(f"contains NaN or Inf ({name} is not allowed: numbers must be finite)")


def _pairs_hook(pairs):
    doc = {}
    for key, value in pairs:
        if key in doc:
            raise _Reject(f"duplicate key {key!r}")
        doc[key] = value
    return doc


def read_json_bounded(path, what: str = "JSON file", max_bytes: int = MAX_BYTES,
                      error=InvalidFileError):
    """Parse a small JSON file with the limits above (size, nesting depth, integer digits, no
    duplicate keys or NaN); every problem raises ``error`` with a message starting with ``path``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path}: {size} bytes is over the {max_bytes / 2**20:g} MB limit for a {what}")
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read the {what}: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not a {what}: not UTF-8 ({e.reason} at byte {e.start})") from e
    depth = 0
    for m in _TOKENS.finditer(text):
        tok = m.group()
        if tok in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise error(f"{path}: not a {what}: nested deeper than {MAX_DEPTH} levels")
        elif tok in "]}":
            depth -= 1
    try:
        return json.loads(text, parse_int=_int_hook, parse_constant=_constant_hook,
                          object_pairs_hook=_pairs_hook)
    except _Reject as e:
        raise error(f"{path}: not a valid {what}: {e}") from None
    except ValueError as e:  # JSONDecodeError
        raise error(f"{path}: not a {what}: not JSON ({e})") from None


# ----------------------------------------------------------------------------- run directories
# Shared by the GT sets (gt.py), the sample folders (sampling.py) and the fit job (job.py): a
# folder holds the output of ONE run, identified by a dict of everything that determines its
# bytes ("run identity"), stored with the run's inventory (the names of every file it may create,
# claimed before any is written) in the sealed run record RUN_FILE. A rerun with the same identity
# resumes; with another one it stops (MismatchError naming the field) unless overwrite=True,
# which deletes the files of the old run's inventory, and only those. A file the inventory does
# not list is the user's: a run never replaces it (it refuses, naming the file), and --overwrite
# refuses a folder that holds any. Manifests are written last and sealed with the sha256 of their
# own canonical JSON, so any damage to them is detected on read.
RUN_FILE = "run.json"
RUN_FORMAT = "bespoke_fast.run"
MAX_SHARDS = 1_000_000
MANIFEST_MAX_BYTES = 256 << 20
_TEMP_RE = re.compile(r"^\.(.+)\.[A-Za-z0-9_]+\.tmp$")


def _canonical(doc) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def identity_hash(identity: dict) -> str:
    """sha256 (hex) of a run identity's canonical JSON."""
    return hashlib.sha256(_canonical(identity)).hexdigest()


def seal(doc: dict) -> dict:
    """``doc`` plus ``"sealed_sha256"``: the sha256 of the rest (see :func:`unseal`)."""
    body = {k: v for k, v in doc.items() if k != "sealed_sha256"}
    return {**body, "sealed_sha256": hashlib.sha256(_canonical(body)).hexdigest()}


def unseal(path, doc, error=InvalidFileError):
    """Check a sealed document read from ``path``; raise ``error`` naming it when damaged."""
    if not isinstance(doc, dict) or not isinstance(doc.get("sealed_sha256"), str):
        raise error(f"{path}: damaged (not an object with a 'sealed_sha256' checksum)")
    body = {k: v for k, v in doc.items() if k != "sealed_sha256"}
    if hashlib.sha256(_canonical(body)).hexdigest() != doc["sealed_sha256"]:
        raise error(f"{path}: damaged (its checksum does not match its content)")
    return doc


def _first_difference(old, new, prefix=""):
    """Dotted name and the two values of the first field where ``old`` and ``new`` differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(new) + [k for k in old if k not in new]:
            if old.get(key, "<absent>") != new.get(key, "<absent>"):
                return _first_difference(old.get(key, "<absent>"), new.get(key, "<absent>"),
                                         f"{prefix}{key}.")
    return prefix.rstrip("."), old, new


def first_difference(old, new) -> str:
    """``"field was OLD, now NEW"`` for the first differing (dotted) field of two dicts."""
    field, a, b = _first_difference(old, new)
    return f"{field or 'the record'} was {_short(a)}, now {_short(b)}"


def _short(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Inventory:
    """The files a run may create in its folder (its claim), as stored in its run record.

    ``files``: plain names; ``series``: ``(prefix, suffix, count)`` for the numbered files
    ``f"{prefix}{k:05d}{suffix}"``, ``0 <= k < count`` (``count=None``: any k, only for records
    of older versions); ``dirs``: sub-folders that hold runs of their own (never deleted here).
    The run record and the temp files :func:`atomic_write` makes for any of these names belong
    to the run too.

    Example::

        >>> inv = Inventory(["manifest.json"], [("shard_", ".json", 3)])
        >>> inv.owns("shard_00002.json"), inv.owns("shard_00003.json"), inv.owns("notes.json")
        (True, False, False)
    """

    def __init__(self, files=(), series=(), dirs=()):
        self.files = sorted(set(files) | {RUN_FILE})
        self.series = [(str(p), str(x), None if n is None else int(n)) for p, x, n in series]
        self.dirs = sorted(set(dirs))

    def _owns_name(self, name: str) -> bool:
        if name in self.files or name in self.dirs:
            return True
        for prefix, suffix, count in self.series:
            if name.startswith(prefix) and name.endswith(suffix) and len(name) > len(prefix) + len(suffix):
                middle = name[len(prefix):len(name) - len(suffix)]
                if (middle.isdigit() and middle.isascii() and f"{int(middle):05d}" == middle
                        and (count is None or int(middle) < count)):
                    return True
        return False

    def owns(self, name: str) -> bool:
        """Whether ``name`` (a name in the run's folder) is one of this run's files."""
        if self._owns_name(name):
            return True
        m = _TEMP_RE.match(name)
        if m is None:
            return False
        base = m.group(1)
        return self._owns_name(base) or (len(base) == _TEMP_NAME_KEEP and any(
            f[:_TEMP_NAME_KEEP] == base for f in self.files))

    def is_temp(self, name: str) -> bool:
        """Whether ``name`` is a temp file :func:`atomic_write` left for one of these files."""
        return _TEMP_RE.match(name) is not None and self.owns(name)

    def unbounded(self) -> "Inventory":
        """The same names with every series unbounded (for a record that lists none)."""
        return Inventory(self.files, [(p, x, None) for p, x, _ in self.series], self.dirs)

    def to_json(self) -> dict:
        return {"files": self.files, "series": [list(s) for s in self.series], "dirs": self.dirs}

    @classmethod
    def from_json(cls, doc) -> "Inventory":
        """Parse a stored inventory; ``ValueError`` when it is malformed."""
        ok = (isinstance(doc, dict) and isinstance(doc.get("files"), list)
              and isinstance(doc.get("series"), list) and isinstance(doc.get("dirs"), list)
              and all(_plain_name(f) for f in doc["files"] + doc["dirs"])
              and all(isinstance(s, list) and len(s) == 3 and isinstance(s[0], str)
                      and isinstance(s[1], str) and type(s[2]) is int and 0 <= s[2] <= MAX_SHARDS
                      for s in doc["series"]))
        if not ok:
            raise ValueError("malformed inventory")
        return cls(doc["files"], doc["series"], doc["dirs"])

    def __eq__(self, other):
        return isinstance(other, Inventory) and self.to_json() == other.to_json()

    def __or__(self, other: "Inventory") -> "Inventory":
        counts = {}
        for p, x, n in self.series + other.series:
            old = counts.get((p, x), 0)
            counts[(p, x)] = None if n is None or old is None else max(old, n)
        return Inventory(self.files + other.files, [(p, x, n) for (p, x), n in counts.items()],
                         self.dirs + other.dirs)


def _plain_name(name) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= 255 and "/" not in name and "\\" not in name
            and name not in (".", ".."))


def prepare_out_dir(out) -> Path:
    """Create the output folder ``out`` (and its parents); ``out`` may be a symbolic link to a
    folder. Raises :class:`OutputError` when it is a file, a dangling link, or cannot be made."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise OutputError(f"cannot write {out}: it is a symbolic link to {os.readlink(out)}, which "
                          f"does not exist; create that folder, or pick another --out")
    if out.exists() and not out.is_dir():
        raise OutputError(f"cannot write {out}: it exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _output_error(out, e) from e
    return out


def read_run_record(out):
    """``(state, identity, inventory)`` of the run record in folder ``out``: state ``"none"``
    (no record), ``"ours"``, ``"legacy"`` (a record of an older version: an identity, no
    inventory), ``"damaged"`` (one of ours that no longer verifies) or ``"foreign"`` (a
    ``run.json`` bespoke_fast did not write: never used)."""
    path = Path(out) / RUN_FILE
    if not path.exists() and not path.is_symlink():
        return "none", None, None
    if path.is_symlink() or not path.is_file():
        return "foreign", None, None
    try:
        raw = path.read_bytes()[:MAX_BYTES + 1]
    except OSError:
        return "damaged", None, None
    marked = b"sealed_sha256" in raw or RUN_FORMAT.encode() in raw
    try:
        doc = unseal(path, read_json_bounded(path, "run record"))
    except InvalidFileError:
        return ("damaged" if marked else "foreign"), None, None
    identity = doc.get("identity")
    if not isinstance(identity, dict):
        return "damaged", None, None
    if doc.get("format") != RUN_FORMAT:
        return ("legacy" if "inventory" not in doc else "damaged"), identity, None
    try:
        return "ours", identity, Inventory.from_json(doc.get("inventory"))
    except ValueError:
        return "damaged", None, None


def _names(items, limit=5):
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def claim_run_dir(out, identity: dict, inventory: Inventory, overwrite: bool = False,
                  what: str = "run", rank: int = 0, grouped: bool = False,
                  dry_run: bool = False) -> str:
    """Make ``out`` the folder of the run ``identity`` (see the block comment above).

    ``inventory``: the files the run may create (:class:`Inventory`). Returns ``"resume"`` (the
    folder holds this run already), ``"new"`` or ``"replaced"`` (``overwrite`` deleted the files
    of another run's inventory first). Refuses, before touching anything:

    * a file in ``out`` that this run would write and no run record lists (the user's):
      :class:`OutputError` naming it;
    * ``out`` holding another run's files: :class:`MismatchError` naming the first differing
      field (or the damaged record), unless ``overwrite``;
    * ``overwrite`` of a folder that holds anything the old run's inventory does not list:
      :class:`OutputError` listing up to five names;
    * a ``run.json`` bespoke_fast did not write.

    ``dry_run``: only check (nothing is written or deleted). Only rank 0 deletes; in a process
    group (``grouped``) only rank 0 writes the record (the caller meets the others at a barrier).

    Example::

        >>> claim_run_dir("runs/gt", {"num": 8}, Inventory(["manifest.json"]))
        'new'
    """
    out = prepare_out_dir(out) if not dry_run else Path(out)
    if dry_run and not out.is_dir():
        if out.is_symlink() or out.exists():
            prepare_out_dir(out)          # raises: a file or a dangling link
        return "new"
    state, theirs, previous = read_run_record(out)
    if state == "foreign":
        raise OutputError(f"{out / RUN_FILE} was not written by bespoke_fast; refusing to read or "
                          f"replace it: pick an empty or new --out")
    if state in ("legacy", "damaged"):
        previous = inventory.unbounded()
    try:
        names = sorted(e.name for e in os.scandir(out) if e.name != RUN_FILE)
    except OSError as e:
        raise _output_error(out, e) from e
    ours = [n for n in names if previous is not None and previous.owns(n)]
    # temp files of this inventory's names are a killed writer's (removed before the run writes)
    foreign = [n for n in names if n not in ours and not inventory.is_temp(n)]
    collide = [n for n in foreign if inventory.owns(n)]
    same = state in ("ours", "legacy") and theirs == identity
    replacing = not same and overwrite and (bool(ours) or state != "none")
    if replacing and foreign:
        raise OutputError(f"--overwrite: {out} holds {len(foreign)} file(s) bespoke_fast did not "
                          f"write ({_names(foreign)}); it deletes only its own files and never "
                          f"replaces a folder holding others: pick an empty or new --out")
    if collide:
        raise OutputError(f"{out / collide[0]} was not written by this {what} (no run record in "
                          f"{out} lists it); refusing to replace it: move it, or pick an empty or "
                          f"new --out")
    if not same and ours and not overwrite:
        if state == "damaged":
            raise MismatchError(f"{out} holds a damaged {RUN_FILE} (a {what} of an unknown run); "
                                f"use another --out, or --overwrite (overwrite=True) to replace it")
        raise MismatchError(f"{out} holds a {what} made with other arguments: "
                            f"{first_difference(theirs, identity)}; use another --out, or "
                            f"--overwrite (overwrite=True) to replace it")
    result = "resume" if same else "replaced" if replacing else "new"
    if replacing and rank == 0 and not dry_run:
        for name in ours:
            f = out / name
            if f.is_symlink() or f.is_file():
                f.unlink()
    if dry_run or (rank != 0 and grouped):
        return result
    if same and state == "ours" and previous is not None and (previous | inventory) == previous:
        return result
    if same and state == "ours":
        inventory = previous | inventory
    atomic_write_text(out / RUN_FILE, json.dumps(seal({"format": RUN_FORMAT, "identity": identity,
                                                       "inventory": inventory.to_json()}),
                                                 indent=1) + "\n")
    return result


def check_writable(path, what: str = "output") -> None:
    """Fail before any work if ``path`` cannot be written: it is a directory, or its folder
    cannot be created or written (probed with a temp file that is removed again)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write the {what} {path}: it is a directory")
    if str(path).endswith(("/", os.sep)):
        raise OutputError(f"cannot write the {what} {path}: the name ends with '/' (a folder); "
                          f"give a file name, e.g. {Path(path) / 'solver.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise _output_error(path, e) from e


def remove_stale_temp_files(out, inventory: Inventory) -> None:
    """Delete the temp files a killed writer left in ``out`` for the files of ``inventory``
    (they are never read); other files are left alone."""
    try:
        entries = list(os.scandir(out))
    except OSError:
        return
    for e in entries:
        if inventory.is_temp(e.name) and e.is_file(follow_symlinks=False):
            Path(out, e.name).unlink(missing_ok=True)


def claim_sharded_run(out, identity: dict, inventory: Inventory, overwrite: bool, what: str,
                      rank: int, distributed: bool) -> str:
    """:func:`claim_run_dir` for a run whose ranks write shards side by side: rank 0 also removes
    a killed writer's temp files, before the barrier that every rank then meets (after it,
    another rank's temp files are live ones). Returns what :func:`claim_run_dir` returns."""
    result = claim_run_dir(out, identity, inventory, overwrite, what, rank, distributed)
    if rank == 0:
        remove_stale_temp_files(out, inventory)
    if distributed:
        torch.distributed.barrier()
    return result


def check_shard_plan(out, num: int, shard_size: int, bytes_per_item: int, existing: int = 0,
                     what: str = "run") -> int:
    """Fail fast on absurd sizes, before any work: at most ``MAX_SHARDS`` shards, and the bytes
    still to write must fit the free space of ``out``'s disk. Returns the number of shards."""
    n_shards = -(-num // shard_size)
    if n_shards > MAX_SHARDS:
        raise InvalidArgumentError(f"{what}: {num} items in shards of {shard_size} make {n_shards} "
                                   f"shards, over the limit of {MAX_SHARDS}; use a larger batch "
                                   f"size or a smaller count")
    import shutil
    need = num * bytes_per_item - existing
    probe = Path(out).absolute()
    while not probe.exists() and probe != probe.parent:   # the folder may not exist yet
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise InvalidArgumentError(f"{what}: {num} items need about {need / 1e9:.3g} GB but only "
                                   f"{free / 1e9:.3g} GB are free on {out}; use a smaller count or "
                                   f"another --out")
    return n_shards
