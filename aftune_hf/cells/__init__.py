"""Layer-block cells (issue 19): audit one (step, block of decoder layers) at a time.

The flow follows the rest of the package: :mod:`.track` commits each step's cell table while
training (used by the recorder and the replay), :mod:`.opening` picks the challenged cells from
the client's nonce and writes the provider's opening, :mod:`.check` authenticates an opening and
re-executes each cell with :mod:`.execute` (one block in memory), :mod:`.plan` prices cells.
``open_cells``, ``challenge_cells``, ``check_cells`` and ``Cell`` are re-exported from ``aftune_hf``.

Example:
    >>> from aftune_hf import challenge_cells, open_cells
    >>> cells = challenge_cells(contract, trace_root, nonce)          # doctest: +SKIP
    >>> open_cells(contract, "runs/trace", cells, "runs/opening")     # doctest: +SKIP
"""
