"""Running: one training run (`train`), its checkpoints, schedules, clean stopping, process
groups and progress; studies of arms x seeds; and `rankscope bench`."""
