"""Evaluation runs over the tasks: predictions on a split (run.py, predict.py) and the run report (report.py).
The scorers and baselines they and the tasks use are in spatialnet_dist/metrics, below the tasks."""
