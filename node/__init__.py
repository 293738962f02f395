"""The resbm-node process: CLI, stage serving over hivemind, metrics, checkpoints, signals."""
