"""Training loops (one per model) and their shared helpers: checkpoints, schedules, data order,
progress, data-parallel plumbing."""
