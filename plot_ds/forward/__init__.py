"""The forward of a micro-batch: pair rows (prompt sharing, packing), the LM head on response positions, log-probs, the reference's side, and the one micro-batch function."""
