"""Training infrastructure shared by train.py and sweep.py: checkpoints and resume, RNG state, processes,
optimisers and schedules, loss tracking, run records. Every function takes explicit arguments (never the
CLI's Config), so the pieces work in any training script."""
