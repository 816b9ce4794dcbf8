"""Training loops: SFT (causal bootstrapping) and on-policy distillation (causal internalization)."""


class TrainingDiverged(FloatingPointError):
    """A step's loss or gradient norm is not finite: the edit is abandoned (its adapter is discarded)."""
