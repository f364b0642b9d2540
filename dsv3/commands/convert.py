"""`dsv3-run convert SRC DST --to FORMAT`: change a checkpoint's weight format (see dsv3.checkpoints.convert)."""
from __future__ import annotations

import argparse
import sys

EPILOG = """formats:
  bf16       BF16 projections (dequantised from FP8/INT8); runs on GPUs without FP8 (A100) and CPUs
  fp8-block  float8_e4m3fn, 128x128 block scales (DeepSeek's own format); --ue8m0 for power-of-two scales
  fp8-fnuz   float8_e4m3fnuz for AMD MI300 (exact from fp8-block: same bits, doubled scales)
  int8-w8a8  Ascend W8A8_DYNAMIC (ModelSlim layout): int8 weights, per-channel scales and offsets

Output is written to .DST.partial and renamed to DST when complete; run the same command again to
resume an interrupted conversion (finished shards whose SHA-256 still matches are kept; a full disk
keeps them too). Each converted tensor is checked against its float64 source.

examples:
  dsv3-run convert ~/DeepSeek-V3 ~/DeepSeek-V3-bf16 --to bf16
  dsv3-run convert ~/DeepSeek-V3-bf16 ~/DeepSeek-V3-fp8 --to fp8-block --ue8m0 --device cuda
  dsv3-run convert ~/DeepSeek-V3 ~/DeepSeek-V3-w8a8 --to int8-w8a8 --max-shard-size 4GB
"""


def register(subparsers) -> None:
    from dsv3.checkpoints.convert import TARGETS
    p = subparsers.add_parser("convert", help="convert a checkpoint between weight formats",
                              description="Convert a DeepSeek-V3 HF checkpoint to another weight format, "
                                          "with bounded memory, on the CPU or a GPU.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="source checkpoint directory (config.json + safetensors)")
    p.add_argument("dst", metavar="DST", help="output directory (must not exist, unless --overwrite)")
    p.add_argument("--to", required=True, choices=TARGETS, help="target weight format")
    p.add_argument("--ue8m0", action="store_true", help="fp8-block: round block scales up to powers of two (V3.1)")
    p.add_argument("--device", default="cpu", help="where the arithmetic runs: cpu (default) or cuda[:N]")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest output shard (default 5GB)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.set_defaults(func=run)


def run(args) -> int:
    from dsv3.checkpoints import convert
    try:
        report = convert.convert_checkpoint(args.src, args.dst, args.to, ue8m0=args.ue8m0, device=args.device,
                                            overwrite=args.overwrite,
                                            max_shard_bytes=convert.parse_size(args.max_shard_size),
                                            log=lambda msg: print(msg, file=sys.stderr))
    except KeyboardInterrupt:
        print("interrupted: the finished shards are kept; run the same command again to resume", file=sys.stderr)
        return 130
    print(report.table())
    resumed = f" ({report.shards_resumed} resumed)" if report.shards_resumed else ""
    print(f"wrote {report.dst} ({report.to}): {report.output_bytes / 1e9:.2f} GB in "
          f"{report.shards_written + report.shards_resumed} shards{resumed}, read {report.source_bytes / 1e9:.2f} GB "
          f"in {report.seconds:.1f} s ({report.source_bytes / 1e9 / max(report.seconds, 1e-9):.2f} GB/s)")
    if report.dropped:
        print(f"left out {len(report.dropped)} tensor(s) the model does not read, e.g. {report.dropped[0]}")
    return 0
