"""The `rto` command line. Run `rto --help`; one process (`rto <cmd>`) or many (`torchrun -m rto <cmd>`).

Commands:
  sft     supervised fine-tuning               rto sft --recipe toy model.path=... data.path=...
  rm      Bradley-Terry reward model           rto rm --recipe toy ...
  dpo     DPO family (dpo ipo rdpo simpo tdpo) rto dpo --loss ipo ...
  ppo     PPO / RTO and ablations              rto ppo algo=rto actor.path=... reward=... dpo=... data.path=...
  eval    evaluate a model                     rto eval model=... data.path=... reference=... reward=...
  inspect DPO token rewards, coloured          rto inspect model=... ref=... dpo=... data.path=...
  pipeline the toy world end to end            rto pipeline --recipe toy
  export  a checkpoint as Hugging Face folders rto export runs/<name>/checkpoints/step_00000042 <out>
  info    versions, device, and whether the Triton kernels are active
Settings are `key=value` overrides on top of a recipe (`--recipe NAME` from rto/recipes, or a YAML path);
`rto <cmd> --help-config` lists every setting with its default and meaning.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import sys
import threading

import torch

import rto
import rto_kernels
from rto_kernels._runtime import HAS_TRITON


def cmd_info(_args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probe = torch.zeros(1, device=device)
    if HAS_TRITON:
        import triton

        triton_version = triton.__version__
    else:
        triton_version = "not installed"
    rows = [
        ("rto", rto.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", triton_version),
        ("device", torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})"),
        (
            "kernels",
            "Triton" + (" (interpreter)" if rto_kernels.interpreting() else "")
            if rto_kernels.use_triton(probe)
            else "PyTorch reference (no CUDA; TRITON_INTERPRET unset)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


TRAIN_HELP = {
    "sft": "supervised fine-tuning",
    "rm": "Bradley-Terry reward model",
    "dpo": "DPO-family preference optimisation",
    "ppo": "PPO / RTO actor-critic training (algo=ppo|rto|rs-ppo|ddpo, estimator=gae|reinforce++)",
}


def _config(args: argparse.Namespace, recipe: str | None, overrides: list[str]):
    """The command's config, or None when the command only prints (--help-config, --print-config)."""
    from rto import config as C

    if args.help_config:
        print("\n".join(C.describe(C.COMMANDS[args.command])))
        return None
    cfg = C.load_config(args.command, recipe, overrides)
    if args.print_config:
        print(C.to_yaml(cfg))
        return None
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"loss={args.loss}"] if getattr(args, "loss", None) else [])
    cfg = _config(args, args.recipe, overrides)
    if cfg is None:
        return 0
    from rto.trainers import dpo, ppo, rm, sft

    trainer = {"sft": sft.main, "rm": rm.main, "dpo": dpo.main, "ppo": ppo.main}[args.command]
    trainer(cfg)
    return 0


TOOLS_HELP = {
    "eval": "generate, score (RM, toy gold), win rate vs a reference, AlpacaEval / Arena-Hard exports",
    "inspect": "responses with each token coloured by its DPO token reward (HTML and PNG)",
    "pipeline": "the whole pipeline on the toy world (world, SFT, RM, DPO family, PPO, RTO, eval, report)",
}


def cmd_tool(args: argparse.Namespace) -> int:
    overrides, stage_overrides, recipe = list(args.overrides), {}, args.recipe
    if args.command == "pipeline":
        from rto.pipeline import split_overrides

        overrides, stage_overrides = split_overrides(overrides)
        recipe = recipe or "toy"
    cfg = _config(args, recipe, overrides)
    if cfg is None:
        return 0
    if args.command == "eval":
        import json

        from rto.evaluate import evaluate

        print(json.dumps(evaluate(cfg), indent=1))
    elif args.command == "inspect":
        from rto.inspection import inspect_tokens

        print(inspect_tokens(cfg))
    else:
        from rto.pipeline import main as pipeline

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        pipeline(cfg, recipe, stage_overrides)
    return 0


EXPORT_HELP = "a training checkpoint as Hugging Face folders (<out>, or <out>/actor and <out>/critic for ppo)"


def cmd_export(args: argparse.Namespace) -> int:
    from rto.export import main as export

    return export(args)


def project_errors() -> dict[type, str]:
    """The project's own errors, each printed as one line naming its kind: bad input and run faults, never
    bugs (those keep their traceback). OSError covers I/O: a missing file, a full or read-only disk."""
    from rto.checkpoint import CheckpointError
    from rto.config import ConfigError
    from rto.data import DataError
    from rto.families import ModelError
    from rto.guard import NonFiniteError
    from rto.parallel import CollectiveError
    from rto.run import ResumeError
    from rto.rundir import RunDirError

    return {
        ModelError: "model",
        ConfigError: "config",
        RunDirError: "run folder",
        DataError: "data",
        ResumeError: "resume",
        CheckpointError: "checkpoint",
        NonFiniteError: "training",
        CollectiveError: "distributed",
        OSError: "I/O",
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rto", description="RTO: PPO with a dense DPO token reward, for RLHF.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name, text in {**TRAIN_HELP, **TOOLS_HELP}.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--recipe", help="recipe name (rto/recipes/NAME.yaml) or path to a YAML file")
        if name == "dpo":
            p.add_argument("--loss", choices=("dpo", "ipo", "rdpo", "simpo", "tdpo"), help="same as loss=...")
        p.add_argument("--help-config", action="store_true", help="list every setting with default and meaning")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("--debug", action="store_true", help="show the traceback of a project error (or RTO_DEBUG=1)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. optim.lr=1e-6")
        p.set_defaults(fn=cmd_train if name in TRAIN_HELP else cmd_tool)
    p = sub.add_parser("export", help=EXPORT_HELP, description=EXPORT_HELP)
    from rto.export import add_arguments

    add_arguments(p)
    p.set_defaults(fn=cmd_export)
    sub.add_parser("info", help="versions, device and kernel path of this installation").set_defaults(fn=cmd_info)
    return parser


def _exit_on_sigterm(signum, _frame) -> None:
    """SIGTERM (a scheduler's stop, torchrun's restart of the other ranks) unwinds like an error, so every exit
    path reaches the `finally` below that ends the process group."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    debug = getattr(args, "debug", False) or os.environ.get("RTO_DEBUG", "") not in ("", "0")
    try:
        return args.fn(args)
    except SystemExit as e:  # SIGTERM outside a training loop, or a second one inside: stop at once
        if isinstance(e.code, int) and e.code > 128 and not debug:
            name = signal.Signals(e.code - 128).name
            print(f"rto {args.command}: stopped at once by {name}, without a new checkpoint", file=sys.stderr)
            return e.code
        raise
    except BrokenPipeError:  # the reader of our output went away (`rto ppo --help-config | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (those stop at the end of a step)
        if debug:
            raise
        print(f"rto {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as e:
        from rto.run import PreemptedError

        if isinstance(e, PreemptedError):
            print(f"rto {args.command}: {e}", file=sys.stderr)
            return e.exit_code
        kind = next((k for cls, k in project_errors().items() if isinstance(e, cls)), None)
        if kind is None or debug:
            raise
        message = " ".join(str(e).split())  # one line, whatever the library's message looked like
        print(
            f"rto {args.command}: {kind} error: {message} (RTO_DEBUG=1 or --debug shows the traceback)", file=sys.stderr
        )
        return 2
    finally:
        from rto.parallel import close_distributed

        close_distributed()


if __name__ == "__main__":
    sys.exit(main())
