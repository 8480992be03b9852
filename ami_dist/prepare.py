"""``ami-prepare``: check, tokenise and encode a run config's corpus once, into memory-mappable files.

Training runs on raw text do this themselves on their first start (and find the result on every later
one); running it first, as ``slurm/nmt_4node.sh`` does, keeps that work out of the job's start-up.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ami_dist.entry import Parser, command
from ami_dist.errors import UserError


@command
def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="ami-prepare", description=__doc__.split("\n\n")[0],
                    epilog="Overrides: any config key as key.path=value, e.g. data.prepare_workers=8")
    parser.add_argument("--config", required=True, help="run config (YAML), e.g. configs/nmt_lstm.yaml")
    parser.add_argument("--out", help="write here instead of the cache (data.cache_dir); train on it with "
                        "data.prepared=DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    args = parser.parse_args(argv)
    from ami_dist.config import load_config
    from ami_dist.data.prepare import prepare
    from ami_dist.data.prepared import read_manifest

    cfg = load_config(args.config, args.overrides)
    if cfg.data.prepared is not None:
        raise UserError(f"{args.config}: data.prepared is set; ami-prepare reads the raw files (data.train_src, "
                        "... or data.train_file, ...)")
    root = prepare(cfg, Path(args.out) if args.out else None, show=not args.quiet)
    manifest = read_manifest(root)
    train, valid, vocab = manifest["splits"]["train"], manifest["splits"]["valid"], manifest["vocab"]
    dropped = train["dropped_too_long"]
    size = sum(manifest["files"].values())
    print(f"{root}: {train['pairs']} training pairs ({train['tokens']['src']} + {train['tokens']['tgt']} tokens; "
          f"dropped as too long: {dropped['source']} source, {dropped['target']} target, {dropped['both']} both), "
          f"{valid['pairs']} validation pairs, {vocab['kind']} vocabulary of {vocab['size']}, "
          f"{size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
