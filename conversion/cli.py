"""`pvc-convert`: an InternVL2 checkpoint (original or transformers layout) -> a complete PVC Hub repo.

    pvc-convert --src OpenGVLab/InternVL2-8B --dst ./PVC-InternVL2-8B-init
    pvc-convert --src ./InternVL2-2B --dst ./internvl2-2b-copy --ablation a     # lossless InternVL2 copy

No code of the source repo is executed: weights are read from safetensors (or `.bin` with
`torch.load(weights_only=True)`), configs as JSON, tokenizers as data.
"""

import argparse
import json
import sys
from pathlib import Path

from .options import ABLATIONS, DTYPE_NAMES, nonempty_path, shard_size, whole_number

# model_type of the source -> its converter module (imported when used: `--help` loads no torch)
CONVERTERS = {
    "internvl_chat": "convert_internvl2",
    "internvl": "convert_internvl_hf",
    "pvc": "convert_pvc",  # InternVL2 in PVC's layout (ablation row a), e.g. trained after `--ablation a`
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="pvc-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--src", required=True, type=nonempty_path, help="source checkpoint: a local folder or a Hub id"
    )
    parser.add_argument("--dst", required=True, type=nonempty_path, help="output folder (written atomically)")
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPE_NAMES],
        default="auto",
        help="weights dtype; auto keeps the source's (default)",
    )
    parser.add_argument(
        "--max-shard-size", type=shard_size, default="5GB", help="largest safetensors shard (default 5GB)"
    )
    parser.add_argument(
        "--ablation",
        choices=sorted(ABLATIONS),
        default="pvc",
        help="pvc (default) or a row of the paper's Table 4: a = InternVL2 as is (lossless copy), "
        "b = 4 repeats + 64 tokens per frame, c = b + progressive layers",
    )
    parser.add_argument(
        "--projector-init",
        choices=["warm", "random"],
        default="warm",
        help="first projector layer: warm (default) reuses InternVL2's on the 2x2 sub-groups of each "
        "4x4 group; random starts it afresh",
    )
    parser.add_argument(
        "--num-temporal-layers",
        type=whole_number(0),
        default=None,
        help="progressive layers (default: a third of the ViT's layers, 8 for InternViT-300M)",
    )
    parser.add_argument(
        "--adaln-hidden-size",
        type=whole_number(1),
        default=None,
        help="hidden width of the progressive layers' AdaLN modulation (default: the ViT's width C)",
    )
    parser.add_argument(
        "--projector-adaln-hidden-size",
        type=whole_number(1),
        default=None,
        help="hidden width of the projector AdaLN's modulation (default: its input width 16C, as PVC-InternVL2-8B; "
        "with InternViT-6B that is 51200 and adds about 10B parameters, so a smaller width is worth choosing)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the new modules' initialisation (default 0); each module draws from a generator of this seed "
        "and its name, so the same source and seed give the same weights, and ablation rows share their common modules",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from .reading import ConversionError
    from .signals import Interrupted, termination_unwinds

    try:
        with termination_unwinds():
            summary, dtype = _convert(args)
    except ConversionError as error:
        print(f"pvc-convert: error: {error}", file=sys.stderr)
        return 1
    except Interrupted as stop:
        print(f"pvc-convert: stopped by {stop}; nothing was written to {args.dst}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print(f"pvc-convert: stopped by Ctrl-C (SIGINT); nothing was written to {args.dst}", file=sys.stderr)
        return 128 + 2
    print(f"\nWrote {args.dst} ({args.ablation}, {str(dtype).removeprefix('torch.')})")
    print("| parameters | tensors | values |\n|---|---|---|")
    for name, (count, values) in summary.items():
        print(f"| {name} | {count} | {values:,} |")
    return 0


def _convert(args):
    import importlib

    from .reading import ConversionError, resolve_source
    from .writing import DTYPES, write_repo

    source = resolve_source(args.src)
    config_path = source / "config.json"
    if not config_path.exists():
        raise ConversionError(f"{source} has no config.json.")
    meta = json.loads(config_path.read_text())
    kind = meta.get("model_type")
    if kind not in CONVERTERS:
        raise ConversionError(
            f"Unknown architecture: model_type {kind!r} (architectures {meta.get('architectures')}). "
            "pvc-convert reads InternVL2 checkpoints: 'internvl_chat' (original layout) or 'internvl' "
            "(transformers layout), or 'pvc' (an InternVL2-equivalent PVC checkpoint, ablation row a)."
        )
    choices = {
        "num_temporal_layers": args.num_temporal_layers,
        "adaln_hidden_size": args.adaln_hidden_size,
        "projector_adaln_hidden_size": args.projector_adaln_hidden_size,
    }
    converter = importlib.import_module(f".{CONVERTERS[kind]}", __package__)
    conversion = converter.convert(source, args.src, ABLATIONS[args.ablation], choices)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else _source_dtype(meta)
    summary = write_repo(
        conversion,
        Path(args.dst),
        dtype,
        args.max_shard_size,
        args.projector_init,
        overwrite=args.overwrite,
        seed=args.seed,
    )
    return summary, dtype


def _source_dtype(meta: dict):
    import torch

    name = meta.get("torch_dtype") or meta.get("dtype") or (meta.get("llm_config") or {}).get("torch_dtype")
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.float32


if __name__ == "__main__":
    sys.exit(main())
