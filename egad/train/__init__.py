"""The trainer: the loop, a run's parts, optimizer windows, dev evaluation, checkpoint I/O and the metric log."""
