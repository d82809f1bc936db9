"""Hardware profiles shipped with hwopt (data only; see hwopt.hardware)."""
