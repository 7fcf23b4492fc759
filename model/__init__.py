"""The SCA-MTL multi-task network and its training pipeline (data sets, losses, metrics, train/evaluate).

Importing `model` loads only the network; data, losses and metrics live in their own modules.
"""
from .network import KNOWN_TASKS, NYUD_TASKS, PASCAL_TASKS, SCAMTL, TASK_SETS, build_model, parameter_counts

__all__ = ["build_model", "SCAMTL", "parameter_counts", "NYUD_TASKS", "PASCAL_TASKS", "KNOWN_TASKS", "TASK_SETS"]
