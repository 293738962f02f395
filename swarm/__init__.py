"""Model and training logic of a ResBM swarm; importable and testable without a network."""
