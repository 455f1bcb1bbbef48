#!/usr/bin/env python3
"""Reads a bellows run's TensorBoard event file with TensorBoard's own EventAccumulator.

    python3 -m venv /tmp/tb && /tmp/tb/bin/pip install tensorboard
    /tmp/tb/bin/python scripts/check-tensorboard.py runs/quickstart/tensorboard

Prints the scalar tags and the first and last train/loss points; exits 1 if the file does not load.
"""
import glob
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

files = glob.glob(f"{sys.argv[1]}/events.out.tfevents.*")
if not files:
    sys.exit(f"no event file in {sys.argv[1]}")
ea = EventAccumulator(files[0])
ea.Reload()
print("tags:", ea.Tags()["scalars"])
loss = ea.Scalars("train/loss")
print(f"train/loss: {len(loss)} points, step {loss[0].step} = {loss[0].value:.4f} ... step {loss[-1].step} = {loss[-1].value:.4f}")
