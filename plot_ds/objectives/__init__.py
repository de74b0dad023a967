"""The losses, leaves of the house: they import only torch and the contract (``pair_batch``, ``forward.logprobs``). Vanilla terms and their registry, PLOT, the OT solvers."""
