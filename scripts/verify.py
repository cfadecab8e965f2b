"""``accelerate launch scripts/verify.py ...``: the installed entry point :mod:`aftune_hf.launch` as a file.

See ``python -m aftune_hf.launch --help``; ``accelerate launch -m aftune_hf.launch ...`` is the same.
"""

from aftune_hf.launch import run

if __name__ == "__main__":
    run()
