"""LightningModules, one per task type, sharing :class:`~medexp.tasks.base.BaseTask`."""
