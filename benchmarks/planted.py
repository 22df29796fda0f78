"""Planted-alignment check of the trainer: generate a planted alignment (a random 3-layer GELU+LayerNorm MLP
plus noise, true map recall@1 ~0.6), train on it with the MSE and the contrastive loss, print recall@1 of the
true map, ridge regression, the trainer, and the share of its true map a linear map reaches with as many
pairs (is the bar reachable?). What it does and the figures: tests/support/planted.py, docs/planted.md.

    python benchmarks/planted.py --out runs/planted            # full size: 768-d inputs, 512-d targets, 200k pairs
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support.*: the test tooling

from support.planted import LOSSES, run_planted  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--n-train", type=int, default=200_000)
    p.add_argument("--n-eval", type=int, default=5_000, help="validation and test pairs (recall candidates)")
    p.add_argument("--in-dim", type=int, default=768)
    p.add_argument("--out-dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512, help="width of the planted MLP")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--proj-hidden", type=int, default=1024, help="trained projector width")
    p.add_argument("--num-blocks", type=int, default=2, help="trained projector residual blocks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--losses", nargs="+", default=["mse", "contrastive"], choices=[*LOSSES, "fit"],
                   help="losses to train (default: mse contrastive); contrastive is InfoNCE's text→image half, "
                        "contrastive-both CLIP's symmetric form, fit: MSE through fit's own data path")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    print(json.dumps(run_planted(a.out, n_train=a.n_train, n_eval=a.n_eval, in_dim=a.in_dim, out_dim=a.out_dim,
                                 hidden=a.hidden, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                                 proj_hidden=a.proj_hidden, num_blocks=a.num_blocks, seed=a.seed,
                                 progress=not a.quiet, losses=a.losses), indent=2))


if __name__ == "__main__":
    main()
