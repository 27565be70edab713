"""The `rto` command line. Run `rto --help`; one process (`rto <cmd>`) or many (`torchrun -m rto <cmd>`).

Commands so far:
  info    what this installation will run on: versions, device, and whether the Triton kernels are active.
"""

from __future__ import annotations

import argparse
import platform
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rto", description="RTO: PPO with a dense DPO token reward, for RLHF.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    sub.add_parser("info", help="versions, device and kernel path of this installation").set_defaults(fn=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
