"""Create the tiny Llama-style base model deterministically and print its digest.

    python scripts/make_base_model.py --out models/tiny-llama

The digest is what ``base_model.digest`` in ``configs/*.yaml`` must say.
"""

from __future__ import annotations

import argparse

from aftune_hf.recipes.causal_lm import make_base_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="models/tiny-llama", help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="weight seed")
    parser.add_argument("--hidden-size", type=int, default=None, help="override hidden_size")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    a = parser.parse_args()
    overrides = {}
    if a.hidden_size:
        overrides.update(hidden_size=a.hidden_size, intermediate_size=2 * a.hidden_size)
    if a.layers:
        overrides["num_hidden_layers"] = a.layers
    print(make_base_model(a.out, seed=a.seed, **overrides))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
