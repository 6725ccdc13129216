"""What the sub-commands share: the common options (``--model``, ``--device``, ``--json``, ...),
the diffusers option group, model and GT loading, and the mapping of user errors to one line."""
from __future__ import annotations

import argparse
import errno
import json
from pathlib import Path

import torch

from .._checks import BespokeFastError, model_error, probe_model, raised_by_model
from ..fitting.gt import DEFAULT_KNOTS, load_trajectories
from ..fitting.trainers import DEFAULT_KIND, TRAINERS
from ..solvers.registry import solver_class
from ..zoo import resolve_model


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""



def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name!r} is not a device (cpu, cuda, cuda:1 or auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                           f"device(s)")
    return name



def load_model(args):
    """The ``--model`` (a bundled name, a factory or a diffusers pipeline); a factory's model
    gets one probe call at batch 2 before any work (see ``_checks.probe_model``)."""
    if args.model.startswith("diffusers:"):
        try:
            zm = diffusers_model(args)
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise CLIError(str(e)) from e
        args.model_object = zm.model
        return zm
    device = resolve_device(args.device)
    zm = resolve_model(args.model, device=device)
    args.model_object = zm.model
    if ":" in args.model:
        probe_model(zm.model, zm.shape, device, zm.extras)
    return zm



_DIFFUSERS_COMMANDS = ("gt", "train", "eval")     # the commands that take --model diffusers:DIR



def diffusers_model(args):
    """``--model diffusers:DIR``: a local pipeline folder, conditioned by --prompts / --classes
    (or by the table stored in the --gt directory)."""
    from ..integrations.diffusers import cli_model   # deferred: needs the optional diffusers
    if args.command not in _DIFFUSERS_COMMANDS:
        raise CLIError(f"{args.command} does not take diffusers pipelines; use "
                       f"bespoke_fast.integrations.diffusers.fast_pipeline from Python")
    opt = {k: getattr(args, k, None) for k in ("prompts", "classes", "guidance_scale", "height",
                                               "width", "gt")}
    return cli_model(args.model[len("diffusers:"):], device=resolve_device(args.device), **opt)



def load_gt(args, zm):
    gt = load_trajectories(args.gt, device=resolve_device(args.device))
    if tuple(gt.shape) != tuple(zm.shape):
        raise CLIError(f"{args.gt}: GT samples have shape {tuple(gt.shape)} but model {args.model!r} "
                       f"makes shape {tuple(zm.shape)}: generate GT for this model")
    name = gt.meta.get("model", {}).get("name")
    if name and name != zm.name and not getattr(args, "allow_model_mismatch", False):
        raise CLIError(f"{args.gt}: GT was generated with model {name!r}, not {zm.name!r}")
    return gt



def emit(args, summary, human_lines):
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        for line in human_lines:
            print(line)



def nfe_to_steps(solver_kind, header, nfe):
    """Steps of a ``solver_kind`` solver with ``header`` (its base or init) at ``nfe``, through
    the solver interface (:meth:`Solver.steps_for_nfe`)."""
    try:
        return solver_class(solver_kind).steps_for_nfe(header, nfe)
    except ValueError as e:
        raise CLIError(f"--{e}") from None



def trained_kinds() -> tuple:
    """The solver kinds ``--solver`` takes: those with a trainer (``fitting.TRAINERS``)."""
    return tuple(TRAINERS)



def default_kind() -> str:
    return DEFAULT_KIND



def parse_size(text):
    """'20GB', '500MB', '1.5e9' -> bytes."""
    units = {"TB": 1e12, "GB": 1e9, "MB": 1e6, "KB": 1e3, "B": 1}
    t = str(text).strip().upper()
    for unit, scale in units.items():
        if t.endswith(unit):
            try:
                return float(t[:-len(unit)]) * scale
            except ValueError:
                break
    try:
        return float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 20GB, 500MB)") from None



# ----------------------------------------------------------------------------- parser
def add_command(sub, name, func, help, description, gt=False, epilog=None, **defaults):
    """A sub-command's parser with the options every command shares (``--model``, ``--device``,
    ``--json``, ``--quiet``, ``--threads``, ``--debug``; ``--gt`` with ``gt=True``), running
    ``func``; ``defaults`` override option defaults (e.g. the demo's ``threads=1``)."""
    p = sub.add_parser(name, help=help, description=description, epilog=epilog)
    pipelines = ", or diffusers:LOCAL_PIPELINE_DIR" if name in _DIFFUSERS_COMMANDS else ""
    p.add_argument("--model", default="digits-fmot",
                   help="bundled model name (gmm-64, digits-exact, digits-fmot, digits-vcs, "
                        "digits-eps), package.module:factory or path/to/file.py:factory "
                        "(imported from the current folder first; factory() returns (model, "
                        f"shape[, data_range]), a dict with those keys or a ZooModel){pipelines} "
                        "(default: %(default)s)")
    if gt:
        p.add_argument("--gt", required=True, type=Path, help="GT directory made by 'bespoke-fast gt'")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto (default)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout (default: off)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (default: off)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own; demo: 1)")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error instead of one line (default: off)")
    p.set_defaults(func=func, **defaults)  # after the options: it overrides their defaults
    return p



def add_nfe(p) -> None:
    """``--nfe``: the same flag, default and help in every command that fits a solver."""
    p.add_argument("--nfe", type=int, default=10,
                   help="network evaluations per sample of the fitted solver; a bespoke RK2 "
                        "solver needs an even number (default %(default)s)")


def add_model_dtype(p) -> None:
    """``--model-dtype``: the dtype the model runs in while sampling (``sample``, ``doctor``)."""
    p.add_argument("--model-dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="dtype the model runs in while sampling; the solver state stays fp32 "
                        "(default %(default)s)")


def add_overwrite(p, what):
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace the {what} in --out if it was made with other arguments "
                        f"(default: refuse; the same arguments resume)")



def add_allow_mismatch(p):
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="use a solver file (or GT set) made for another model than --model "
                        "(default: refuse)")



def add_diffusers_options(p):
    g = p.add_argument_group("diffusers pipelines (--model diffusers:LOCAL_PIPELINE_DIR, offline)")
    g.add_argument("--prompts", type=Path, default=None,
                   help="prompt embeddings (.safetensors: prompt_embeds, pooled_prompt_embeds and "
                        "negative_*) or a text file, one prompt per line; trajectory i uses prompt "
                        "i mod P (default for train/eval: the table stored in --gt)")
    g.add_argument("--classes", default=None,
                   help="class labels for class-conditional UNets: N (0..N-1) or a list 3,7,9 (default: none, unconditional)")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="the pipeline's guidance_scale (CFG; Flux: embedded guidance); default: "
                        "the pipeline's own default, or the value stored in --gt")
    g.add_argument("--height", type=int, default=None, help="image height (default: the pipeline's)")
    g.add_argument("--width", type=int, default=None, help="image width (default: the pipeline's)")



# OSErrors that are the user's to fix: a path that is missing, a directory, not writable, or a
# full disk. Others (EIO, ...) keep their traceback.
_USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST,
                errno.ENOSPC, errno.EROFS, errno.ENAMETOOLONG, getattr(errno, "EDQUOT", -1)}



def user_error(e: BaseException, model=None):
    """The one-line message for a user-fixable error, or None for a bug (see the docstring). An
    exception raised inside the user's ``model`` (its code is in the traceback) is the model's:
    one line too."""
    if isinstance(e, (CLIError, BespokeFastError)):
        text = str(e)
    elif model is not None and isinstance(e, Exception) and raised_by_model(e, model):
        text = str(model_error(e, "(in a call of the solver or the trainer)"))
    elif isinstance(e, OSError) and e.errno in _USER_ERRNOS:
        text = f"{e.strerror}: {e.filename}" if e.filename else str(e)
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            text = f"disk full ({text})"
    else:
        return None
    return " ".join(text.split()) or type(e).__name__



def fill_defaults(args):
    """Options given as None take the defaults of what they feed (train: ``_train_options``);
    a leading ``~`` of a path option is the home folder, as in a shell."""
    for name in ("out", "gt", "solver", "checkpoint", "prompts"):
        value = getattr(args, name, None)
        if isinstance(value, Path) or (name == "out" and isinstance(value, str)):
            trailing = "/" if str(value).endswith("/") else ""
            expanded = Path(value).expanduser()
            setattr(args, name, str(expanded) + trailing if isinstance(value, str) else expanded)
    if args.command == "gt" and args.knots is None:
        args.knots = DEFAULT_KNOTS
