"""What the lower pass writes: checkpoints and engines for the runtime and target that will serve the child."""
